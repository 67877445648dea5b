"""`agent doctor` (agent/doctor.py): one line per check, fix hints, exit status.

Tool version commands are faked (pytest-subprocess); the control plane is tests/fakecp.py
on loopback; /proc and /sys/class/net are temp dirs the test fills.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from agent import crypto
from agent.doctor import run_doctor
from agent.identity import AgentConfig, DataDir, PendingKeys
from agent.settings import Settings
from tests.fakecp import FakeControlPlane

TOOLS = {"podman": "podman version 4.3.1", "wg": "wireguard-tools v1.0", "dnsmasq": "Dnsmasq version 2.90",
         "git": "git version 2.39", "buildctl": "buildctl v0.15.2", "railpack": "railpack 0.15.4"}


def fake_tools(fp, present: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    for name, version in present.items():
        argv = [f"/usr/bin/{name}", "version" if name == "caddy" else "--version"]
        fp.register(argv, stdout=version + "\n", occurrences=5)


def which_of(present: set[str]):  # type: ignore[no-untyped-def]
    return lambda name: f"/usr/bin/{name}" if name in present else None


@pytest.fixture
def host(tmp_path: Path) -> tuple[Path, Path]:
    proc = tmp_path / "proc"
    (proc / "sys/net/ipv4").mkdir(parents=True)
    (proc / "sys/net/ipv4/ip_forward").write_text("1\n")
    (proc / "4242").mkdir()
    (proc / "4242/comm").write_text("dnsmasq\n")
    net = tmp_path / "net"
    net.mkdir()
    (tmp_path / "etc-techulus").mkdir()
    return proc, net


def doctor(settings: Settings, host: tuple[Path, Path], present: set[str]) -> tuple[int, str]:
    out = io.StringIO()
    conf_dir = host[0].parent / "etc-techulus"
    # The container probe runs real podman: tests/test_doctor_probe.py covers it.
    code = run_doctor(settings, out=out, which=which_of(present), proc=host[0], net=host[1], conf_dir=conf_dir,
                      container_check=lambda _settings: [])
    return code, out.getvalue()


def base_settings(tmp_path: Path, **extra: object) -> Settings:
    values: dict[str, object] = {"data_dir": str(tmp_path / "data"), "manage_caddy": False,
                                 "buildkit_host": "tcp://127.0.0.1:9", "url": "http://127.0.0.1:9",
                                 "wireguard_config_dir": str(tmp_path / "wireguard")}
    values.update(extra)
    return Settings.from_mapping(values)


def test_unregistered_without_token_fails_with_a_hint(fp, tmp_path: Path, host) -> None:  # type: ignore[no-untyped-def]
    fake_tools(fp, TOOLS)
    code, text = doctor(base_settings(tmp_path), host, set(TOOLS) | {"wg-quick"})
    assert code == 1
    lines = text.splitlines()
    assert "OK    podman: /usr/bin/podman (podman version 4.3.1)" in lines
    assert "OK    dnsmasq: running" in lines
    assert "OK    ip forwarding: enabled" in lines
    assert any(line.startswith("FAIL  registration: not registered") and "re-run install.sh with --token" in line for line in lines)
    assert any(line.startswith("FAIL  control plane: http://127.0.0.1:9 unreachable") for line in lines)
    assert any(line.startswith("WARN  buildkit: tcp://127.0.0.1:9") for line in lines)
    assert any(line.startswith("WARN  wireguard: interface wg0 does not exist") for line in lines)
    assert any(line.startswith("OK    health checks: ") for line in lines)
    assert lines[-1] == "17 checks: 2 failed, 4 warnings"


def test_missing_required_tool_fails_but_missing_build_tools_only_warn(fp, tmp_path: Path, host) -> None:  # type: ignore[no-untyped-def]
    present = {k: v for k, v in TOOLS.items() if k not in ("podman", "buildctl")}
    fake_tools(fp, present)
    code, text = doctor(base_settings(tmp_path, token="t" * 16), host, set(present) | {"wg-quick"})
    assert code == 1
    assert "FAIL  podman: not found on PATH -- fix: apt-get install podman" in text
    assert "WARN  buildctl: not found on PATH" in text
    assert "WARN  registration: not registered yet" in text


def test_forwarding_off_and_open_data_dir_fail(fp, tmp_path: Path, host) -> None:  # type: ignore[no-untyped-def]
    fake_tools(fp, TOOLS)
    (host[0] / "sys/net/ipv4/ip_forward").write_text("0\n")
    (host[0] / "4242/comm").write_text("bash\n")
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    code, text = doctor(base_settings(tmp_path), host, set(TOOLS) | {"wg-quick"})
    assert code == 1
    assert "FAIL  ip forwarding: disabled" in text
    assert "FAIL  dnsmasq: not running" in text
    assert f"chmod 700 {data}" in text


def test_registered_server_against_the_fake_control_plane(fp, tmp_path: Path, host) -> None:  # type: ignore[no-untyped-def]
    fake_tools(fp, TOOLS)
    (host[1] / "wg0").mkdir()
    with FakeControlPlane() as cp:
        keys = PendingKeys.generate()
        server = cp.add_server(crypto.public_key_b64(keys.signing_key), subnet_id=7)
        DataDir(tmp_path / "data").commit_registration(keys, AgentConfig(server.id, 7, "10.100.7.1"))
        settings = base_settings(tmp_path, url=cp.url, buildkit_host="unix:///run/buildkit.sock")
        code, text = doctor(settings, host, set(TOOLS) | {"wg-quick"})
    assert code == 0, text
    assert f"OK    registration: registered as server {server.id}" in text
    assert "OK    signed request" in text
    assert "OK    wireguard: interface wg0 is up" in text
    assert "OK    clock:" in text
    assert "this server can run the agent" in text.splitlines()[-1]


def test_unknown_server_is_reported(fp, tmp_path: Path, host) -> None:  # type: ignore[no-untyped-def]
    fake_tools(fp, TOOLS)
    with FakeControlPlane() as cp:
        keys = PendingKeys.generate()
        DataDir(tmp_path / "data").commit_registration(keys, AgentConfig("0" * 24, 7, "10.100.7.1"))
        code, text = doctor(base_settings(tmp_path, url=cp.url), host, set(TOOLS) | {"wg-quick"})
    assert code == 1
    assert "FAIL  signed request:" in text and "404" in text


# --- files holding secrets ------------------------------------------------------------------


def registered_server(tmp_path: Path) -> dict[str, Path]:
    """A registered data dir plus the files install.sh and the agent write, all mode 0600."""
    DataDir(tmp_path / "data").commit_registration(PendingKeys.generate(), AgentConfig("0" * 24, 7, "10.100.7.1"))
    conf = tmp_path / "etc-techulus"
    files = {
        "signing key": tmp_path / "data/keys/private.key",
        "wireguard key": tmp_path / "data/wireguard.key",
        "agent config": tmp_path / "data/config.json",
        "wireguard config": tmp_path / "wireguard/wg0.conf",
        "agent env file": conf / "agent.env",
        "caddy env file": conf / "caddy.env",
    }
    for path in files.values():
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("secret\n")
        path.chmod(0o600)
    return files


def test_private_secret_files_pass(fp, tmp_path: Path, host) -> None:  # type: ignore[no-untyped-def]
    fake_tools(fp, TOOLS)
    files = registered_server(tmp_path)
    code, text = doctor(base_settings(tmp_path), host, set(TOOLS) | {"wg-quick"})
    [line] = [line for line in text.splitlines() if "secret files" in line]
    assert line.startswith("OK    secret files: 6 private")
    assert all(str(path) in line for path in files.values())
    assert "chmod 600" not in text


@pytest.mark.parametrize("which", ["signing key", "wireguard key", "agent config", "wireguard config",
                                   "agent env file", "caddy env file"])
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_secret_file_readable_by_group_or_others_fails(which: str, mode: int, fp, tmp_path: Path, host) -> None:  # type: ignore[no-untyped-def]
    fake_tools(fp, TOOLS)
    files = registered_server(tmp_path)
    files[which].chmod(mode)
    code, text = doctor(base_settings(tmp_path), host, set(TOOLS) | {"wg-quick"})
    assert code == 1
    failed = [line for line in text.splitlines() if line.startswith("FAIL  ") and "chmod 600" in line]
    assert len(failed) == 1 and failed[0].startswith(f"FAIL  {which}"), text
    assert f"{files[which]} is mode {mode:04o}: group/others can read a secret -- fix: chmod 600 {files[which]}" in failed[0]
    assert "OK    secret files" not in text


def test_missing_optional_secret_files_are_skipped(fp, tmp_path: Path, host) -> None:  # type: ignore[no-untyped-def]
    fake_tools(fp, TOOLS)
    files = registered_server(tmp_path)
    for name in ("wireguard config", "caddy env file", "agent env file"):
        files[name].unlink()
    code, text = doctor(base_settings(tmp_path), host, set(TOOLS) | {"wg-quick"})
    assert "OK    secret files: 3 private" in text
    assert "wg0.conf" not in text and "caddy.env" not in text


def test_symlink_to_an_open_file_fails(fp, tmp_path: Path, host) -> None:  # type: ignore[no-untyped-def]
    fake_tools(fp, TOOLS)
    files = registered_server(tmp_path)
    exposed = tmp_path / "exposed.env"
    exposed.write_text("TECHULUS_AGENT_TOKEN='x'\n")
    exposed.chmod(0o644)
    files["agent env file"].unlink()
    files["agent env file"].symlink_to(exposed)
    code, text = doctor(base_settings(tmp_path), host, set(TOOLS) | {"wg-quick"})
    assert code == 1
    assert f"FAIL  agent env file (registration token): {files['agent env file']} is mode 0644" in text


def test_standalone_mode_checks_only_what_standalone_uses(fp, tmp_path: Path, host) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "state.toml"
    state.write_text("containers = []\n")
    fake_tools(fp, {"podman": TOOLS["podman"]})
    code, text = doctor(base_settings(tmp_path, state_file=str(state), url=""), host, {"podman"})
    assert code == 0, text
    for absent in ("registration", "control plane", "wireguard", "wg", "dnsmasq", "caddy", "buildkit", "buildctl"):
        assert f"  {absent}:" not in text, f"{absent} is not used in standalone mode:\n{text}"


def test_container_probe_is_skipped_with_a_warning_before_registration(fp, tmp_path: Path, host) -> None:  # type: ignore[no-untyped-def]
    from agent.doctor import collect

    fake_tools(fp, {"podman": TOOLS["podman"]})
    checks = collect(base_settings(tmp_path, manage_wireguard=False, manage_dns=False), which=which_of({"podman"}),
                     proc=host[0], net=host[1], conf_dir=host[0].parent / "etc-techulus")
    lines = [check.line() for check in checks]
    assert "WARN  container probe: skipped: not registered yet (the container subnet comes with registration)" in lines


def test_standalone_mode_only_warns_about_forwarding(fp, tmp_path: Path, host) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "state.toml"
    state.write_text("containers = []\n")
    (host[0] / "sys/net/ipv4/ip_forward").write_text("0\n")
    fake_tools(fp, {"podman": TOOLS["podman"]})
    code, text = doctor(base_settings(tmp_path, state_file=str(state), url=""), host, {"podman"})
    assert code == 0, text
    assert "WARN  ip forwarding: disabled" in text
