"""The work queue against real Podman: a `stop` item removes our container and leaves a
foreign one (no techulus labels) running. The control plane is a recording fake."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.drift import LABEL_DEPLOYMENT_ID, LABEL_SERVICE_ID, LABEL_SERVICE_NAME
from agent.host.podman import Podman, PodmanOptions
from agent.settings import Settings
from agent.workqueue import WorkQueue
from tests import testbed
from tests.testbed import BB_IMAGE, podman, podman_env, podman_net  # noqa: F401 - fixtures

pytestmark = pytest.mark.real

SVC = "svc-real-1"
DEP = "dep-real-1"


class RecordingClient:
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items
        self.completed: list[tuple[str, str, str]] = []

    def work_items(self) -> list[Any]:
        return list(self.items)

    def complete_work(self, item_id: str, status: str, error: str = "") -> None:
        self.completed.append((item_id, status, error))
        self.items = [i for i in self.items if i["id"] != item_id]


def run_container(net: testbed.TestNetwork, name: str, labels: dict[str, str], host: int) -> str:
    argv = ["run", "-d", "--init", "--name", name, "--network", net.name, "--ip", net.ip(host), "--label", net.scope_label]
    for key, value in labels.items():
        argv += ["--label", f"{key}={value}"]
    return podman(*argv, BB_IMAGE, "sleep", "600").stdout.strip()


def running(ref: str) -> bool:
    result = podman("container", "inspect", "--format", "{{.State.Running}}", ref, check=False)
    return result.returncode == 0 and result.stdout.strip() == "true"


def test_stop_item_removes_ours_and_leaves_foreign_running(podman_net: testbed.TestNetwork, tmp_path: Path) -> None:  # noqa: F811
    suffix = podman_net.name
    mine = run_container(
        podman_net, f"{suffix}-mine", {LABEL_SERVICE_ID: SVC, LABEL_SERVICE_NAME: "web", LABEL_DEPLOYMENT_ID: DEP}, 2
    )
    foreign = run_container(podman_net, f"{suffix}-foreign", {"owner": "someone-else"}, 3)
    items = [
        {"id": "w-foreign", "type": "stop", "payload": json.dumps({"deploymentId": DEP, "containerId": foreign})},
        {"id": "w-mine", "type": "stop", "payload": json.dumps({"deploymentId": DEP, "containerId": mine})},
    ]
    client = RecordingClient(items)
    adapter = Podman(
        PodmanOptions(network=podman_net.name, scope_label=podman_net.scope_label, stop_timeout=2, run_dir=tmp_path / "run")
    )
    queue = WorkQueue(client, adapter, Settings(data_dir=tmp_path / "data"), threading.Lock(), None)  # type: ignore[arg-type]

    queue.poll_once()

    outcomes = {item_id: (status, error) for item_id, status, error in client.completed}
    assert outcomes["w-mine"] == ("completed", "")
    assert outcomes["w-foreign"][0] == "failed" and "not managed" in outcomes["w-foreign"][1]
    assert podman("container", "exists", mine, check=False).returncode == 1
    assert running(foreign)
    # Re-delivered (lost acknowledgement): acknowledged again, not executed again.
    client.items = items[1:]
    queue.poll_once()
    assert [c for c in client.completed if c[0] == "w-mine"] == [("w-mine", "completed", "")] * 2
