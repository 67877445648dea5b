"""The health runner against real Podman 4.3 on this machine, where systemd is not PID 1 and
podman's timers never run: a passing check reaches `healthy`, a failing one `unhealthy`."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.healthcheck import HealthRunner, mechanism
from agent.host.podman import Podman, PodmanOptions
from agent.model import ExpectedContainer, HealthCheck
from tests.testbed import *  # noqa: F403
from tests.testbed import HTTPD_IMAGE, TestNetwork

pytestmark = pytest.mark.real


def spec(net: TestNetwork, host: int, cmd: str) -> ExpectedContainer:
    dep = f"hc{host}-{net.scope_label[-8:]}"
    return ExpectedContainer(
        dep, "svc-health", "Health", f"hc-{dep}", HTTPD_IMAGE, net.ip(host),
        health_check=HealthCheck(cmd, interval=1, timeout=5, retries=2, start_period=0),
    )


def test_health_reaches_healthy_and_unhealthy_without_systemd(podman_net: TestNetwork, tmp_path: Path) -> None:
    if mechanism("auto") != "agent":
        pytest.skip("systemd is PID 1 here: podman's timers run health checks")
    pm = Podman(PodmanOptions(
        network=podman_net.name, scope_label=podman_net.scope_label, run_dir=tmp_path / "run", stop_timeout=1,
        timeout=30.0, verify_timeout=10.0, init=True,
    ))
    good = pm.run_container(spec(podman_net, 2, "wget -q -O /dev/null http://127.0.0.1/"), {}, tmp_path / "volumes")
    bad = pm.run_container(spec(podman_net, 3, "test -e /nonexistent"), {}, tmp_path / "volumes")
    assert pm.health([good, bad]) == {good: "starting", bad: "starting"}
    changes = []
    runner = HealthRunner(pm, start_interval=1.0, on_change=lambda: changes.append(1))
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    try:
        give_up = time.monotonic() + 60
        while time.monotonic() < give_up and pm.health([good, bad]) != {good: "healthy", bad: "unhealthy"}:
            stop.wait(0.2)
    finally:
        stop.set()
        thread.join(10)
    assert pm.health([good, bad]) == {good: "healthy", bad: "unhealthy"}
    assert len(changes) >= 2, "each container's first outcome triggered a report"
