"""`agent doctor`'s container probe (agent/host/probe.py) against real Podman.

It must pass where containers run, fail where they do not (naming the cause: the two
broken setups below are the ones newcomers met: ulimits above the hard limit, a CNI
backend without plugins), and leave no container behind either way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.doctor import OK, check_container
from agent.host.podman import Podman, PodmanOptions
from agent.host.probe import cause, http_get, run_probe
from agent.settings import Settings
from tests.testbed import CONTAINERS_CONF, TestNetwork, podman, podman_env, podman_net  # noqa: F401

pytestmark = [pytest.mark.real]


def standalone_settings(tmp_path: Path, net: TestNetwork, network_name: str = "") -> Settings:
    state = tmp_path / "state.toml"
    state.write_text(f'subnetId = {net.subnet_id}\n')
    return Settings.from_mapping({
        "state_file": str(state), "data_dir": str(tmp_path / "data"), "network_name": network_name or net.name,
        "scope_label": net.scope_label, "run_dir": str(tmp_path / "run"),
    })


def leftovers(net: TestNetwork) -> list[str]:
    return podman("ps", "-aq", "--filter", f"label={net.scope_label}").stdout.split()


def test_probe_runs_a_container_of_ours_on_the_network_and_removes_it(tmp_path: Path, podman_net: TestNetwork) -> None:  # noqa: F811
    seen: list[dict] = []

    def fetch(url: str, timeout: float) -> str:
        if not seen:  # while it runs: it carries our labels and sits on our network
            seen.extend(json.loads(podman("ps", "--filter", f"label={podman_net.scope_label}", "--format", "json").stdout))
        return http_get(url, timeout)

    adapter = Podman(PodmanOptions(network=podman_net.name, scope_label=podman_net.scope_label, run_dir=tmp_path / "run"))
    result = run_probe(adapter, podman_net.subnet, podman_net.gateway, tmp_path, taken={podman_net.ip(254)}, fetch=fetch)
    assert result.ip == podman_net.ip(253), "the probe avoids the addresses the state uses"
    assert len(seen) == 1 and seen[0]["Labels"]["techulus.service.id"] == "techulus-doctor"
    assert podman_net.name in seen[0]["Networks"]
    assert leftovers(podman_net) == []
    print(f"probe: {result.seconds:.2f}s")


def test_doctor_reports_the_probe_in_standalone_mode(tmp_path: Path, podman_net: TestNetwork) -> None:  # noqa: F811
    checks = check_container(standalone_settings(tmp_path, podman_net))
    assert [c.status for c in checks] == [OK], checks
    assert f"removed a container on network {podman_net.name}" in checks[0].detail
    assert leftovers(podman_net) == []


def test_ulimits_above_the_hard_limit_are_named(tmp_path: Path, podman_net: TestNetwork, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    conf = tmp_path / "ulimits.conf"
    conf.write_text(CONTAINERS_CONF.replace("nofile=20000:20000", "nofile=999999999:999999999"))
    monkeypatch.setenv("CONTAINERS_CONF", str(conf))
    [check] = check_container(standalone_settings(tmp_path, podman_net))
    monkeypatch.undo()
    assert check.status == "FAIL" and check.detail.startswith("start failed")
    assert "cannot apply podman's default ulimits" in check.detail and "default_ulimits" in check.hint
    assert leftovers(podman_net) == []


def test_cni_without_plugins_is_named(tmp_path: Path, podman_net: TestNetwork, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    cni = tmp_path / "cni"
    cni.mkdir()
    conf = tmp_path / "cni.conf"
    conf.write_text(CONTAINERS_CONF.replace(
        'network_backend = "netavark"',
        f'network_backend = "cni"\ncni_plugin_dirs = ["{tmp_path}/no-plugins"]\nnetwork_config_dir = "{cni}"',
    ))
    monkeypatch.setenv("CONTAINERS_CONF", str(conf))
    [check] = check_container(standalone_settings(tmp_path, podman_net, network_name=f"{podman_net.name}c"))
    monkeypatch.undo()  # back to the working config, to look for leftovers
    assert check.status == "FAIL", check
    assert "network backend" in check.detail and "netavark" in check.hint
    assert leftovers(podman_net) == []


@pytest.mark.parametrize(
    ("podman_error", "expected"),
    [
        ("Error: crun: setrlimit `RLIMIT_NOFILE`: Operation not permitted: OCI permission denied", "ulimits"),
        ("Error: OCI runtime error: crun: cgroups in hybrid mode not supported, drop all controllers from cgroupv2", "cgroups"),
        ("Error: unable to find network with name or ID techulus: network not found", "network backend"),
        ("Error: mkdir /var/lib/containers/storage/overlay/x: no space left on device", "full"),
        ("Error: subnet 10.200.1.0/24 is already used on the host or by another config", "already uses this subnet"),
        ("Error: something nobody has seen", ""),
    ],
)
def test_cause_names_the_errors_seen_on_real_hosts(podman_error: str, expected: str) -> None:
    what, fix = cause(podman_error)
    assert expected in what and bool(fix) == bool(expected)



def test_without_a_static_busybox_the_probe_is_skipped_with_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.host import probe

    dynamic = Path("/bin/sh").resolve()  # dash: dynamically linked
    assert probe.is_static(Path("/bin/busybox")) and not probe.is_static(dynamic)
    monkeypatch.setattr(probe, "PROBE_IMAGE", f"localhost/techulus-no-such-probe:{tmp_path.name}")
    with pytest.raises(probe.ProbeSkipped, match="apt-get install busybox-static"):
        probe.ensure_image(Podman(PodmanOptions()), tmp_path, busybox=dynamic)


def test_reach_names_what_answered_or_why_nothing_did() -> None:
    from agent.host.probe import ProbeFailed, reach

    def refused(url: str, timeout: float) -> str:
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(ProbeFailed, match=r"http://10\.200\.9\.254/ did not answer within 0\.3s: .*Connection refused") as exc:
        reach("10.200.9.254", refused, timeout=0.3)
    assert exc.value.step == "reach"
    with pytest.raises(ProbeFailed, match="another page"):
        reach("10.200.9.254", lambda url, timeout: "<h1>someone else</h1>", timeout=0.3)
