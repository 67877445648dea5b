"""With real Podman: a container that --restart=always keeps restarting looks "running",
yet the status report calls it unhealthy, so it cannot pass a rollout (§17.18)."""

import time

import pytest

from agent.drift import LABEL_DEPLOYMENT_ID, LABEL_SERVICE_ID
from agent.heartbeat import Heartbeat
from agent.host.podman import Podman, PodmanOptions
from tests.testbed import BB_IMAGE, podman, podman_env, podman_net  # noqa: F401

pytestmark = pytest.mark.real


def test_crash_loop_is_reported_unhealthy(podman_net, tmp_path):  # noqa: F811
    net = podman_net
    for name, command in (("loop", "sleep 1; exit 1"), ("steady", "sleep 600")):
        podman(
            "run", "-d", "--name", f"{net.name}-{name}", "--restart=always", "--label", net.scope_label,
            "--label", f"{LABEL_SERVICE_ID}=svc", "--label", f"{LABEL_DEPLOYMENT_ID}={name}",
            BB_IMAGE, "sh", "-c", command,
        )
    adapter = Podman(PodmanOptions(network=net.name, scope_label=net.scope_label, run_dir=tmp_path))
    reports = []
    heartbeat = Heartbeat(reports.append, adapter, interval=10)
    heartbeat.send_once()
    verdict = {}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and verdict.get("loop") != "unhealthy":
        time.sleep(0.5)
        heartbeat.send_once()
        verdict = {c["deploymentId"]: c["healthStatus"] for c in reports[-1]["containers"]}
    assert verdict.get("loop") == "unhealthy", reports[-1]
    assert verdict.get("steady") == "none"
