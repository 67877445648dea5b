"""install.sh without a real install: shellcheck, rendered units through systemd-analyze,
embedding, and every kind of bad input (each a clear message, non-zero exit, no change).

These run install.sh on the development machine itself, so each case stops before the
first change to the system: argument errors and the OS check come first, and downloads
are verified with --download-only (nothing outside the test's temp dirs is written).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "install.sh"
INSTALLER = REPO / "installer"
UNITS = ("techulus-agent.service", "caddy.service", "buildkit.service")
STAND_IN_CADDYFILE = ":80 {\n\trespond /__caddy_health__ \"ok\" 200\n}\n"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (scripts/install-test-deps.sh installs it)")
    return path


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    """installer/ as it is, plus a stand-in Caddyfile while the real one is not written yet."""
    target = tmp_path / "templates"
    shutil.copytree(INSTALLER, target)
    if not (target / "Caddyfile").exists():
        (target / "Caddyfile").write_text(STAND_IN_CADDYFILE)
    return target


def install_sh(*args: str, env: dict[str, str] | None = None, script: Path = INSTALL, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("TECHULUS_", "CF_API_TOKEN"))}
    full_env.update(env or {})
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, env=full_env, timeout=timeout, check=False
    )


@pytest.fixture
def sandbox(tmp_path: Path, templates: Path) -> dict[str, str]:
    """Environment that keeps install.sh's own files (log, cache) inside the test's dir."""
    os_release = tmp_path / "os-release"
    os_release.write_text('ID=debian\nVERSION_ID="12"\n')
    return {
        "TECHULUS_TEMPLATE_DIR": str(templates),
        "TECHULUS_INSTALL_LOG": str(tmp_path / "install.log"),
        "TECHULUS_INSTALL_CACHE": str(tmp_path / "cache"),
        "TECHULUS_OS_RELEASE": str(os_release),
    }


# --- static checks ----------------------------------------------------------------------


def test_shellcheck_clean(tmp_path: Path, templates: Path) -> None:
    shellcheck = need("shellcheck")
    embedded = tmp_path / "install-embedded.sh"
    result = subprocess.run(
        [str(INSTALLER / "embed.sh"), str(INSTALL), str(templates)], capture_output=True, text=True, check=True
    )
    embedded.write_text(result.stdout)
    scripts = [INSTALL, REPO / "build.sh", INSTALLER / "embed.sh", embedded, REPO / "bench" / "bench_install.sh"]
    scripts = [s for s in scripts if s.exists()]
    # The wrapper template is a POSIX sh script once rendered.
    out = tmp_path / "r"
    assert install_sh("--url", "https://cp.example.com", "--render-only", str(out),
                      env={"TECHULUS_TEMPLATE_DIR": str(templates)}).returncode == 0
    scripts.append(out / "usr/local/lib/techulus-agent/techulus-agent")
    check = subprocess.run([shellcheck, "-x", *map(str, scripts)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def render(tmp_path: Path, templates: Path, *args: str) -> Path:
    out = tmp_path / "root"
    result = install_sh("--url", "https://cp.example.com", "--token", "0123456789abcdef" * 4, "--render-only", str(out),
                        *args, env={"TECHULUS_TEMPLATE_DIR": str(templates)})
    assert result.returncode == 0, result.stderr
    return out


def test_rendered_units_pass_systemd_analyze_verify(tmp_path: Path, templates: Path) -> None:
    analyze = need("systemd-analyze")
    root = render(tmp_path, templates, "--registry", "10.100.1.1:5000", "--cf-api-token", "cf-token-123456")
    # verify --root resolves ExecStart= inside the root: provide the binaries and systemd's own units.
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for binary in ("usr/local/bin/caddy", "usr/bin/podman"):
        (root / binary).parent.mkdir(parents=True, exist_ok=True)
        (root / binary).write_text("#!/bin/sh\n")
        (root / binary).chmod(0o755)
    units = [root / "etc/systemd/system" / unit for unit in UNITS]
    result = subprocess.run([analyze, "verify", f"--root={root}", *map(str, units)], capture_output=True, text=True, check=False)
    # Unknown keys are only warnings (exit 0): any output at all is a failure.
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), result.stderr + result.stdout

    # The check can fail: a missing ExecStart binary is reported.
    (root / "usr/local/bin/caddy").unlink()
    broken = subprocess.run([analyze, "verify", f"--root={root}", str(units[1])], capture_output=True, text=True, check=False)
    assert broken.returncode != 0 and "caddy" in broken.stderr


def test_rendered_files_carry_the_settings_and_keep_secrets_private(tmp_path: Path, templates: Path) -> None:
    token = "0123456789abcdef" * 4
    root = render(tmp_path, templates, "--registry", "10.100.1.1:5000", "--cf-api-token", "cf-token-123456",
                  "--logs-endpoint", "http://logs.internal:9428", "--agent-env", "TECHULUS_AGENT_PUBLIC_IP=203.0.113.7")
    agent_env = root / "etc/techulus-agent/agent.env"
    text = agent_env.read_text()
    assert f"TECHULUS_AGENT_TOKEN='{token}'" in text
    assert "TECHULUS_AGENT_URL='https://cp.example.com'" in text
    assert "TECHULUS_AGENT_LOGS_ENDPOINT='http://logs.internal:9428'" in text
    assert "TECHULUS_AGENT_PUBLIC_IP='203.0.113.7'" in text
    assert oct(agent_env.stat().st_mode & 0o777) == "0o600"
    caddy_env = root / "etc/techulus-agent/caddy.env"
    assert "CF_API_TOKEN='cf-token-123456'" in caddy_env.read_text()
    assert "CONTROL_PLANE_URL='https://cp.example.com'" in caddy_env.read_text()
    assert oct(caddy_env.stat().st_mode & 0o777) == "0o600"
    unit = (root / "etc/systemd/system/techulus-agent.service").read_text()
    assert "KillMode=process" in unit and "Restart=always" in unit and "Type=notify" in unit
    assert token not in unit, "the token must not be in the unit (argv)"
    assert "EnvironmentFile=/etc/techulus-agent/agent.env" in unit
    toml = (root / "etc/buildkit/buildkitd.toml").read_text()
    assert '[registry."10.100.1.1:5000"]' in toml and "http = true" in toml and "insecure = true" in toml
    buildkit = (root / "etc/systemd/system/buildkit.service").read_text()
    assert "--name techulus-buildkit" in buildkit and "tcp://127.0.0.1:1234" in buildkit
    assert (root / "etc/sysctl.d/99-techulus-forwarding.conf").read_text().count("net.ipv4.ip_forward = 1") == 1
    placeholders = [p for p in root.rglob("*") if p.is_file() and re.search(r"@[A-Z][A-Z0-9_]*@", p.read_text())]
    assert not placeholders


def exec_argv(unit_text: str, key: str) -> list[list[str]]:
    """The argv of each `key=` line of a unit (continuation lines joined, `-` prefix dropped)."""
    joined = unit_text.replace("\\\n", " ")
    return [shlex.split(line.split("=", 1)[1].lstrip("-")) for line in joined.splitlines() if line.startswith(key + "=")]


def test_buildkit_build_steps_get_their_own_network(tmp_path: Path, templates: Path) -> None:
    root = render(tmp_path, templates, "--registry", "10.100.1.1:5000")
    config = tomllib.loads((root / "etc/buildkit/buildkitd.toml").read_text())
    # "auto" (the default) means host networking without a CNI config: RUN steps could then
    # reach Caddy's admin API and this daemon on 127.0.0.1.
    assert config["worker"]["oci"]["networkMode"] == "bridge"
    assert config["worker"]["oci"]["enabled"] is True and config["worker"]["containerd"]["enabled"] is False
    assert "insecure-entitlements" not in config, "no build may ask for network.host or security.insecure"
    assert "grpc" not in config, "the listen address is the unit's --addr, loopback only"
    assert config["registry"] == {"10.100.1.1:5000": {"http": True, "insecure": True}}

    unit = (root / "etc/systemd/system/buildkit.service").read_text()
    [run] = exec_argv(unit, "ExecStart")
    assert run[:3] == ["/usr/bin/podman", "run", "--rm"]
    assert run[run.index("--name") + 1] == "techulus-buildkit"
    addresses = [run[i + 1] for i, arg in enumerate(run) if arg == "--addr"]
    assert addresses == ["tcp://127.0.0.1:1234"]
    assert not any(arg.startswith(("--oci-worker-net", "--allow-insecure-entitlement")) for arg in run)
    # Every podman command of the unit names our container, never a bare "buildkit".
    commands = exec_argv(unit, "ExecStartPre") + exec_argv(unit, "ExecStop")
    assert commands == [["/usr/bin/podman", "rm", "--force", "--ignore", "techulus-buildkit"],
                        ["/usr/bin/podman", "stop", "--time", "10", "techulus-buildkit"]]
    assert "buildkit" not in run


def test_skip_switches_leave_out_caddy_and_build_tools(tmp_path: Path, templates: Path) -> None:
    root = render(tmp_path, templates, "--skip-caddy", "--skip-build-tools")
    assert (root / "etc/systemd/system/techulus-agent.service").exists()
    assert not (root / "etc/systemd/system/caddy.service").exists()
    assert not (root / "etc/systemd/system/buildkit.service").exists()


def test_embedded_script_renders_the_same_files_without_installer_dir(tmp_path: Path, templates: Path) -> None:
    embedded = tmp_path / "alone" / "install.sh"
    embedded.parent.mkdir()
    result = subprocess.run([str(INSTALLER / "embed.sh"), str(INSTALL), str(templates)], capture_output=True, text=True, check=True)
    embedded.write_text(result.stdout)
    args = ("--url", "https://cp.example.com", "--cf-api-token", "cf-token-123456")
    from_checkout = install_sh(*args, "--render-only", str(tmp_path / "a"), env={"TECHULUS_TEMPLATE_DIR": str(templates)})
    # Piped through bash like `curl … | bash -s --`: no file, no installer/ beside it.
    piped = subprocess.run(["bash", "-s", "--", *args, "--render-only", str(tmp_path / "b")], input=embedded.read_text(),
                           capture_output=True, text=True, check=False, env={"PATH": os.environ["PATH"]})
    assert from_checkout.returncode == 0 and piped.returncode == 0, piped.stderr
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 10
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_missing_template_is_a_clear_error(tmp_path: Path, templates: Path) -> None:
    (templates / "buildkitd.toml").unlink()
    result = install_sh("--url", "https://cp.example.com", "--render-only", str(tmp_path / "r"),
                        env={"TECHULUS_TEMPLATE_DIR": str(templates)})
    assert result.returncode != 0 and "template buildkitd.toml is missing" in result.stderr


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "https://cp.example.com", "--frobnicate"], "unknown option '--frobnicate'"),
        (["--token", "0123456789abcdef"], "--url is required"),
        (["--url"], "--url needs a value"),
        (["--url", "ftp://cp.example.com"], "is not an http(s) URL"),
        (["--url", "https://cp.example.com/$(reboot)"], "is not an http(s) URL"),
        (["--url", "https://cp.example.com", "--token", "bad token with spaces"], "unexpected characters"),
        (["--url", "https://cp.example.com", "--registry", "no-port"], "must look like HOST:PORT"),
        (["--url", "https://cp.example.com", "--agent-sha256", "abc"], "64 hex digits"),
        (["--url", "https://cp.example.com", "--agent-env", "PATH=/tmp"], "TECHULUS_AGENT_NAME=value"),
        (["--url=https://cp.example.com"], "with a space"),
    ],
)
def test_bad_arguments(args: list[str], message: str, sandbox: dict[str, str], tmp_path: Path) -> None:
    result = install_sh(*args, env=sandbox)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not Path(sandbox["TECHULUS_INSTALL_LOG"]).exists(), "nothing may be written before the arguments are valid"


@pytest.mark.parametrize("os_release", ['ID=centos\nVERSION_ID="9"\n', 'ID=ubuntu\nVERSION_ID="20.04"\n', "ID=debian\nVERSION_ID=11\n"])
def test_unsupported_os(os_release: str, sandbox: dict[str, str]) -> None:
    Path(sandbox["TECHULUS_OS_RELEASE"]).write_text(os_release)
    result = install_sh("--url", "https://cp.example.com", env=sandbox)
    assert result.returncode == 1
    assert "unsupported operating system" in result.stderr and "Nothing was changed" in result.stderr
    assert not Path(sandbox["TECHULUS_INSTALL_LOG"]).exists()
    assert not Path(sandbox["TECHULUS_INSTALL_CACHE"]).exists()


class Fixtures:
    """A loopback HTTP server for download fixtures; files live in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
        http.server.SimpleHTTPRequestHandler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fixtures(tmp_path: Path) -> Iterator[Fixtures]:
    root = tmp_path / "www"
    root.mkdir()
    served = Fixtures(root)
    yield served
    served.close()


def agent_download_env(fixtures: Fixtures, sandbox: dict[str, str], payload: bytes, listed_sha: str | None = None) -> dict[str, str]:
    (fixtures.root / "agent").mkdir(exist_ok=True)
    (fixtures.root / "agent" / "agent-linux-amd64").write_bytes(payload)
    (fixtures.root / "agent" / "agent-linux-arm64").write_bytes(payload)
    digest = listed_sha or hashlib.sha256(payload).hexdigest()
    (fixtures.root / "agent" / "SHA256SUMS").write_text(f"{digest}  agent-linux-amd64\n{digest}  agent-linux-arm64\n")
    return sandbox


def test_download_only_fetches_and_verifies_with_the_published_checksums(fixtures: Fixtures, sandbox: dict[str, str]) -> None:
    env = agent_download_env(fixtures, sandbox, b"zipapp bytes")
    result = install_sh("--url", fixtures.url, "--skip-caddy", "--skip-build-tools", "--download-only", env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "Downloads verified" in result.stdout and "1 fetched" in result.stdout
    again = install_sh("--url", fixtures.url, "--skip-caddy", "--skip-build-tools", "--download-only", env=env)
    assert again.returncode == 0 and "all cached" in again.stdout


def test_checksum_mismatch_deletes_the_download_and_stops(fixtures: Fixtures, sandbox: dict[str, str]) -> None:
    env = agent_download_env(fixtures, sandbox, b"tampered", listed_sha="0" * 64)
    result = install_sh("--url", fixtures.url, "--skip-caddy", "--skip-build-tools", "--download-only", env=env)
    assert result.returncode == 1
    assert "checksum mismatch for agent" in result.stderr and "nothing was installed" in result.stderr
    assert not (Path(sandbox["TECHULUS_INSTALL_CACHE"]) / "agent-linux-amd64").exists()
    assert not (Path(sandbox["TECHULUS_INSTALL_CACHE"]) / "agent-linux-amd64.part").exists()


def test_explicit_checksum_overrides_and_is_checked(fixtures: Fixtures, sandbox: dict[str, str]) -> None:
    env = agent_download_env(fixtures, sandbox, b"zipapp bytes")
    wrong = hashlib.sha256(b"other").hexdigest()
    result = install_sh("--url", fixtures.url, "--agent-sha256", wrong, "--skip-caddy", "--skip-build-tools", "--download-only", env=env)
    assert result.returncode == 1 and "checksum mismatch for agent" in result.stderr


def test_unreachable_download(sandbox: dict[str, str]) -> None:
    # A loopback port with nothing listening: refused at once, no outside traffic.
    url = "http://127.0.0.1:9/x"
    env = dict(sandbox, TECHULUS_RAILPACK_URL=url, TECHULUS_RAILPACK_SHA256="0" * 64, TECHULUS_BUILDKIT_URL=url,
               TECHULUS_BUILDKIT_SHA256="1" * 64)
    result = install_sh("--url", "http://127.0.0.1:9", "--agent-binary", str(INSTALL), "--skip-caddy", "--download-only", env=env)
    assert result.returncode == 1
    assert "cannot download" in result.stderr and "127.0.0.1:9" in result.stderr
    assert "Nothing was installed" in result.stderr


def test_missing_checksum_file_names_the_override(sandbox: dict[str, str], fixtures: Fixtures) -> None:
    (fixtures.root / "railpack.tar.gz").write_bytes(b"x")
    env = dict(sandbox, TECHULUS_RAILPACK_URL=f"{fixtures.url}/railpack.tar.gz",
               TECHULUS_RAILPACK_SHA256_URL=f"{fixtures.url}/missing.txt",
               TECHULUS_BUILDKIT_URL=f"{fixtures.url}/railpack.tar.gz",
               TECHULUS_BUILDKIT_SHA256=hashlib.sha256(b"x").hexdigest())
    result = install_sh("--url", fixtures.url, "--agent-binary", str(INSTALL), "--skip-caddy", "--download-only", env=env)
    assert result.returncode == 1
    assert "checksum file for railpack" in result.stderr and "TECHULUS_RAILPACK_SHA256" in result.stderr


def test_missing_agent_binary_file(sandbox: dict[str, str], tmp_path: Path) -> None:
    result = install_sh("--url", "https://cp.example.com", "--agent-binary", str(tmp_path / "nope"), "--skip-caddy",
                        "--skip-build-tools", "--download-only", env=sandbox)
    assert result.returncode == 1 and "no such file" in result.stderr


# --- pinned versions ----------------------------------------------------------------------


def install_default(name: str) -> str:
    """The default of a `NAME=${TECHULUS_NAME:-default}` line of install.sh."""
    match = re.search(rf"^{name}=\$\{{TECHULUS_{name}:-([^}}]*)\}}$", INSTALL.read_text(), re.M)
    assert match, f"install.sh has no default for {name}"
    return match.group(1)


def test_railpack_cli_matches_the_frontend_image_the_agent_builds_with() -> None:
    from agent.builds import RAILPACK_FRONTEND

    assert RAILPACK_FRONTEND.startswith("ghcr.io/railwayapp/railpack-frontend:v")
    assert install_default("RAILPACK_VERSION") == RAILPACK_FRONTEND.rsplit(":v", 1)[1]


def test_caddy_dns_module_is_built_at_a_pinned_version() -> None:
    assert re.fullmatch(r"v\d+\.\d+\.\d+(-[0-9]{14}-[0-9a-f]{12})?", install_default("CADDY_CLOUDFLARE_VERSION"))
    builds = [line for line in INSTALL.read_text().splitlines() if "--with " in line]
    assert builds and all('--with "github.com/caddy-dns/cloudflare@$CADDY_CLOUDFLARE_VERSION"' in line for line in builds)


def railpack_fixture(fixtures: Fixtures, sandbox: dict[str, str]) -> tuple[dict[str, str], bytes]:
    """Railpack served from loopback, its checksum file in the release's format (both CPUs)."""
    payload = b"railpack release archive"
    (fixtures.root / "railpack.tar.gz").write_bytes(payload)
    version = install_default("RAILPACK_VERSION")
    (fixtures.root / "checksums.txt").write_text(
        f"{hashlib.sha256(payload).hexdigest()}  railpack-v{version}-arm64-unknown-linux-musl.tar.gz\n"
        f"{'0' * 64}  railpack-v{version}-x86_64-unknown-linux-musl.tar.gz\n")
    (fixtures.root / "buildkit.tar.gz").write_bytes(b"buildkit")
    env = dict(sandbox, TECHULUS_RAILPACK_URL=f"{fixtures.url}/railpack.tar.gz",
               TECHULUS_RAILPACK_SHA256_URL=f"{fixtures.url}/checksums.txt",
               TECHULUS_BUILDKIT_URL=f"{fixtures.url}/buildkit.tar.gz",
               TECHULUS_BUILDKIT_SHA256=hashlib.sha256(b"buildkit").hexdigest())
    return env, payload


def test_railpack_arm64_uses_the_release_asset_name(fixtures: Fixtures, sandbox: dict[str, str]) -> None:
    env, payload = railpack_fixture(fixtures, sandbox)
    version = install_default("RAILPACK_VERSION")
    result = install_sh("--url", fixtures.url, "--agent-binary", str(INSTALL), "--skip-caddy", "--download-only",
                        env=dict(env, TECHULUS_ARCH="arm64"))
    assert result.returncode == 0, result.stderr
    cached = Path(sandbox["TECHULUS_INSTALL_CACHE"]) / f"railpack-v{version}-arm64-unknown-linux-musl.tar.gz"
    assert cached.read_bytes() == payload
    # The same file for amd64 is checked against the x86_64 entry, which does not match.
    other = install_sh("--url", fixtures.url, "--agent-binary", str(INSTALL), "--skip-caddy", "--download-only",
                       env=dict(env, TECHULUS_ARCH="amd64"))
    assert other.returncode == 1 and "checksum mismatch for railpack" in other.stderr


def test_buildkit_image_can_be_pinned_by_digest(tmp_path: Path, templates: Path) -> None:
    digest = "sha256:" + "ab" * 32
    out = tmp_path / "r"
    result = install_sh("--url", "https://cp.example.com", "--render-only", str(out),
                        env={"TECHULUS_TEMPLATE_DIR": str(templates), "TECHULUS_BUILDKIT_IMAGE_DIGEST": digest})
    assert result.returncode == 0, result.stderr
    [run] = exec_argv((out / "etc/systemd/system/buildkit.service").read_text(), "ExecStart")
    assert f"docker.io/moby/buildkit:{install_default('BUILDKIT_VERSION')}@{digest}" in run


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TECHULUS_BUILDKIT_IMAGE_DIGEST": "sha256:abc"}, "64 lowercase hex digits"),
        ({"TECHULUS_BUILDKIT_IMAGE_DIGEST": "ab" * 32}, "64 lowercase hex digits"),
        ({"TECHULUS_BUILDKIT_IMAGE": "docker.io/moby/buildkit:v1 --privileged"}, "is not an image reference"),
        ({"TECHULUS_BUILDKIT_IMAGE": "docker.io/moby/buildkit@sha256:" + "0" * 64,
          "TECHULUS_BUILDKIT_IMAGE_DIGEST": "sha256:" + "1" * 64}, "already has a digest"),
        ({"TECHULUS_RAILPACK_VERSION": "0.15.4/../../x"}, "is not a version"),
        ({"TECHULUS_CADDY_CLOUDFLARE_VERSION": "latest"}, "is not a version"),
        ({"TECHULUS_ARCH": "riscv64"}, "amd64 or arm64"),
        ({"TECHULUS_ARCH": "arm64"}, "only goes with --download-only or --render-only"),
    ],
)
def test_bad_version_and_image_overrides(env: dict[str, str], message: str, sandbox: dict[str, str]) -> None:
    result = install_sh("--url", "https://cp.example.com", env=dict(sandbox, **env))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not Path(sandbox["TECHULUS_INSTALL_LOG"]).exists()


def test_every_apt_get_call_waits_for_the_dpkg_lock() -> None:
    # A fresh cloud VM's unattended-upgrades holds the lock for minutes; apt-get gives up at
    # once unless told to wait. Each command that runs apt-get must go through apt_get().
    calls = [line.strip() for line in INSTALL.read_text().splitlines()
             if not line.lstrip().startswith("#") and re.search(r"(^\s*|\brun\s+(env\s+\S+\s+)?|[;&|]\s*)apt-get\s", line)]
    assert calls == ['run env LC_ALL=C apt-get -o DPkg::Lock::Timeout="$APT_LOCK_TIMEOUT" "$@"']
    assert re.search(r"^APT_LOCK_TIMEOUT=600$", INSTALL.read_text(), re.M)
    assert "\n  apt_get_update\n  apt_get install " in INSTALL.read_text()


# --- the registration token ---------------------------------------------------------------


def test_registered_server_gets_no_token_in_agent_env(tmp_path: Path, templates: Path) -> None:
    token = "0123456789abcdef" * 4
    out = tmp_path / "root"
    key = out / "var/lib/techulus-agent/keys/private.key"
    key.parent.mkdir(parents=True)
    key.write_bytes(b"key")
    result = install_sh("--url", "https://cp.example.com", "--token", token, "--agent-env", "TECHULUS_AGENT_PUBLIC_IP=203.0.113.7",
                        "--render-only", str(out), env={"TECHULUS_TEMPLATE_DIR": str(templates)})
    assert result.returncode == 0, result.stderr
    assert "already registered: the registration token was not used" in result.stdout
    text = (out / "etc/techulus-agent/agent.env").read_text()
    assert token not in text and not re.search(r"^TECHULUS_AGENT_TOKEN=", text, re.M)
    assert "# TECHULUS_AGENT_TOKEN: removed by install.sh, this server is registered" in text
    # Everything else is still there, and the wrapper can still source the file.
    assert "TECHULUS_AGENT_URL='https://cp.example.com'" in text and "TECHULUS_AGENT_PUBLIC_IP='203.0.113.7'" in text
    sourced = subprocess.run(["sh", "-c", 'set -a; . "$1"; printf "%s|%s" "$TECHULUS_AGENT_URL" "${TECHULUS_AGENT_TOKEN-unset}"', "sh",
                              str(out / "etc/techulus-agent/agent.env")], capture_output=True, text=True, check=True)
    assert sourced.stdout == "https://cp.example.com|unset"


def test_unregistered_server_keeps_the_token(tmp_path: Path, templates: Path) -> None:
    token = "0123456789abcdef" * 4
    root = render(tmp_path, templates)
    assert f"TECHULUS_AGENT_TOKEN='{token}'" in (root / "etc/techulus-agent/agent.env").read_text()


def test_usage_explains_keeping_the_token_off_command_lines() -> None:
    result = install_sh("--help")
    assert result.returncode == 0
    usage = " ".join(result.stdout.split())
    assert "--token-file FILE safer: read the token from FILE" in usage
    assert "shell history" in usage and "sudo's log" in usage
    assert "After registration install.sh removes the token from agent.env" in usage


# --- signed releases and uninstalling ---------------------------------------------------------


@pytest.fixture
def release_key(tmp_path: Path, templates: Path) -> Path:
    """A signed release: build.sh's SIGNING_KEY and the public key among the templates."""
    need("openssl")
    key = tmp_path / "release.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(templates / "release-signing.pub")],
                   check=True, capture_output=True)
    return key


def sign(key: Path, path: Path) -> None:
    subprocess.run(["openssl", "pkeyutl", "-sign", "-inkey", str(key), "-rawin", "-in", str(path), "-out", f"{path}.sig"],
                   check=True, capture_output=True)


@pytest.mark.parametrize("signature", ["good", "other key", "missing"])
def test_a_signed_release_installs_only_a_signed_agent(signature: str, fixtures: Fixtures, sandbox: dict[str, str],
                                                       release_key: Path, tmp_path: Path) -> None:
    env = agent_download_env(fixtures, sandbox, b"zipapp bytes")
    binary = fixtures.root / "agent" / "agent-linux-amd64"
    if signature == "good":
        sign(release_key, binary)
    elif signature == "other key":
        other = tmp_path / "other.pem"
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(other)], check=True, capture_output=True)
        sign(other, binary)
    result = install_sh("--url", fixtures.url, "--skip-caddy", "--skip-build-tools", "--download-only", env=env)
    if signature == "good":
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 1
    assert {"other key": "does not match this release's key", "missing": "cannot download the agent's signature"}[signature] in result.stderr
    assert "Nothing was installed" in result.stderr


def test_a_signed_release_installs_its_public_key(tmp_path: Path, templates: Path, release_key: Path) -> None:
    root = render(tmp_path, templates)
    assert (root / "etc/techulus-agent/release-signing.pub").read_text() == (templates / "release-signing.pub").read_text()
    (templates / "release-signing.pub").unlink()
    unsigned = tmp_path / "unsigned"
    result = install_sh("--url", "https://cp.example.com", "--render-only", str(unsigned), env={"TECHULUS_TEMPLATE_DIR": str(templates)})
    assert result.returncode == 0 and not (unsigned / "etc/techulus-agent/release-signing.pub").exists()


def test_the_embedded_script_carries_the_release_key(tmp_path: Path, release_key: Path) -> None:
    # The embedding step alone, as build.sh runs it: every template plus the key.
    templates = tmp_path / "with-key"
    shutil.copytree(INSTALLER, templates)
    shutil.copy(tmp_path / "templates" / "release-signing.pub", templates / "release-signing.pub")
    embedded = subprocess.run([str(INSTALLER / "embed.sh"), str(INSTALL), str(templates)], capture_output=True, text=True, check=True)
    script = tmp_path / "install.sh"
    script.write_text(embedded.stdout)
    out = tmp_path / "r"
    result = install_sh("--url", "https://cp.example.com", "--render-only", str(out), script=script,
                        env={"TECHULUS_TEMPLATE_DIR": str(tmp_path / "none")})
    assert result.returncode == 0, result.stderr
    assert "BEGIN PUBLIC KEY" in (out / "etc/techulus-agent/release-signing.pub").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--purge"], "go with --uninstall"),
        (["--url", "https://cp.example.com", "--yes"], "go with --uninstall"),
        (["--uninstall", "--url", "https://cp.example.com"], "--uninstall takes only"),
        (["--uninstall", "--yes"], "go with --purge"),
        (["--uninstall", "--purge-packages"], "go with --purge"),
    ],
)
def test_bad_uninstall_arguments(args: list[str], message: str, sandbox: dict[str, str]) -> None:
    result = install_sh(*args, env=sandbox)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not Path(sandbox["TECHULUS_INSTALL_LOG"]).exists()


def test_uninstall_is_in_the_usage() -> None:
    usage = install_sh("--help").stdout
    assert "install.sh --uninstall [--purge [--yes]] [--purge-packages]" in usage and "TECHULUS_UPGRADE_TIMEOUT" in usage


# --- upgrade-guard: the backstop of an upgrade whose command died -------------------------------


def guard_box(tmp_path: Path, templates: Path, deadline: float, healthy: bool = False) -> dict[str, Path]:
    """The rendered guard, an installed new build with `previous`, and an in_progress record
    written by agent/upgrade.py itself."""
    import dataclasses
    import time

    from agent.fsutil import atomic_write_json
    from agent.upgrade import Record

    lib, data = tmp_path / "lib", tmp_path / "data"
    lib.mkdir(parents=True)
    data.mkdir()
    guard = lib / "upgrade-guard"
    guard.write_text((templates / "upgrade-guard").read_text().replace("@LIB_DIR@", str(lib)).replace("@DATA_DIR@", str(data)))
    guard.chmod(0o755)
    (lib / "agent.pyz").write_text("new build\n")
    (lib / "agent.pyz.previous").write_text("old build\n")
    if healthy:
        (data / "health.json").write_text('{"pid": 1}\n')
    record = Record("in_progress", "", "techulus-agent 0.1.0 (old)", "techulus-agent 0.2.0 (new)", "a" * 64, "b" * 64,
                    "/tmp/agent \"quoted\"", "2026-01-01T00:00:00Z", deadline_epoch=int(time.time() + deadline))
    atomic_write_json(data / "upgrade-state.json", dataclasses.asdict(record), 0o644)
    return {"guard": guard, "lib": lib, "state": data / "upgrade-state.json"}


def run_guard(box: dict[str, Path]) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    import json

    result = subprocess.run([str(box["guard"])], capture_output=True, text=True, timeout=30, check=False)
    return result, json.loads(box["state"].read_text())


def test_upgrade_guard_rolls_back_an_unfinished_upgrade_after_its_deadline(tmp_path: Path, templates: Path) -> None:
    box = guard_box(tmp_path, templates, deadline=-1)
    result, state = run_guard(box)
    assert result.returncode == 0 and "upgrade rolled_back" in result.stderr
    assert (box["lib"] / "agent.pyz").read_text() == "old build\n"
    assert state["outcome"] == "rolled_back" and "rolled back at start by upgrade-guard" in str(state["reason"])
    assert state["source"] == "/tmp/agent \"quoted\"" and state["finished_at"] != ""
    again, _ = run_guard(box)  # decided: later starts change nothing
    assert again.stderr == "" and (box["lib"] / "agent.pyz").read_text() == "old build\n"


def test_upgrade_guard_keeps_a_build_that_proved_healthy(tmp_path: Path, templates: Path) -> None:
    box = guard_box(tmp_path, templates, deadline=-1, healthy=True)
    result, state = run_guard(box)
    assert state["outcome"] == "committed" and (box["lib"] / "agent.pyz").read_text() == "new build\n"


def test_upgrade_guard_leaves_a_running_upgrade_alone(tmp_path: Path, templates: Path) -> None:
    import fcntl

    before = guard_box(tmp_path / "early", templates, deadline=600)
    assert run_guard(before)[1]["outcome"] == "in_progress", "before the deadline"
    live = guard_box(tmp_path / "live", templates, deadline=-1)
    with open(live["lib"] / ".upgrade.lock", "a+") as held:  # what a live `agent upgrade` holds
        fcntl.flock(held, fcntl.LOCK_EX)
        assert run_guard(live)[1]["outcome"] == "in_progress"
    assert (live["lib"] / "agent.pyz").read_text() == "new build\n"
