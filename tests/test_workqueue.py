"""Unit tests of the work queue with a recording fake control plane and a fake Podman.

No subprocess runs here (the autouse fixture would fail the test): Podman is replaced by a
small in-memory object that records every change and can be told to fail.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.api import BadResponse, Rejected, Unavailable
from agent.drift import LABEL_DEPLOYMENT_ID, LABEL_SERVICE_ID, LABEL_SERVICE_NAME, ContainerInfo
from agent.host.podman import PodmanError
from agent.model import WireGuardPeer
from agent.settings import Settings
from agent.workqueue import DONE_FILE, MAX_REMEMBERED, WorkQueue

SVC = "0b3e5c1a-1111-4c39-9e0d-2f4a6b8c0d1e"
DEP = "8d1f6c2e-5b7a-4c39-9e0d-2f4a6b8c0d1e"


class FakeClient:
    """Serves a list of work items and records acknowledgements; each can be made to fail."""

    def __init__(self, items: list[Any] | None = None) -> None:
        self.items: list[Any] = list(items or [])
        self.completed: list[tuple[str, str, str]] = []
        self.get_error: Exception | None = None
        self.ack_errors: list[Exception] = []  # raised by the next acknowledgements, in order
        self.gets = 0

    def work_items(self) -> list[Any]:
        self.gets += 1
        if self.get_error is not None:
            raise self.get_error
        return list(self.items)

    def complete_work(self, item_id: str, status: str, error: str = "") -> None:
        if self.ack_errors:
            raise self.ack_errors.pop(0)
        self.completed.append((item_id, status, error))
        # Like the CP: a completed item is no longer pending.
        self.items = [i for i in self.items if not (isinstance(i, dict) and i.get("id") == item_id)]


class FakePodman:
    """Containers as id -> labels/running; records changes; `fail[method] = exc` injects errors."""

    def __init__(self, scope_label: str = "") -> None:
        self.containers: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, Exception] = {}
        self.scope_label = scope_label

    def add(self, cid: str, labels: dict[str, str], running: bool = True, name: str = "") -> None:
        self.containers[cid] = {"labels": dict(labels), "running": running, "name": name or cid}

    def _maybe_fail(self, method: str) -> None:
        if method in self.fail:
            raise self.fail[method]

    def inspect(self, ref: str) -> dict[str, Any] | None:
        self._maybe_fail("inspect")
        c = self.containers.get(ref)
        if c is None:
            return None
        return {"Id": ref, "Config": {"Labels": dict(c["labels"])}, "State": {"Running": c["running"]}}

    def is_managed(self, ref: str) -> bool:
        c = self.containers.get(ref)
        return c is not None and bool(c["labels"].get(LABEL_SERVICE_ID))

    def list_containers(self) -> list[ContainerInfo]:
        self._maybe_fail("list_containers")
        return [
            ContainerInfo(cid, c["name"], "img", "running" if c["running"] else "exited", dict(c["labels"]))
            for cid, c in self.containers.items()
            if c["labels"].get(LABEL_SERVICE_ID)
        ]

    def restart(self, ref: str) -> None:
        self.calls.append(("restart", ref))
        self._maybe_fail("restart")
        self.containers[ref]["running"] = True

    def stop_and_remove(self, ref: str) -> None:
        self.calls.append(("stop_and_remove", ref))
        self._maybe_fail("stop_and_remove")
        self.containers.pop(ref, None)

    def force_remove(self, ref: str) -> None:
        self.calls.append(("force_remove", ref))
        self._maybe_fail("force_remove")
        self.containers.pop(ref, None)


def ours(service: str = SVC, deployment: str | None = DEP) -> dict[str, str]:
    labels = {LABEL_SERVICE_ID: service, LABEL_SERVICE_NAME: "web"}
    if deployment is not None:
        labels[LABEL_DEPLOYMENT_ID] = deployment
    return labels


def item(item_id: str, kind: Any, payload: Any) -> dict[str, Any]:
    encoded = json.dumps(payload) if isinstance(payload, dict | list) else payload
    return {
        "id": item_id, "serverId": "a" * 24, "type": kind, "payload": encoded,
        "status": "pending", "createdAt": "2026-01-02T03:04:05.678Z", "startedAt": None, "attempts": 0,
    }


class Harness:
    def __init__(self, tmp_path: Path, items: list[Any] | None = None, wireguard: bool = True, **kwargs: Any) -> None:
        self.settings = Settings(data_dir=tmp_path / "data", workqueue_interval=0.01)
        self.client = FakeClient(items)
        self.podman = FakePodman()
        self.lock = threading.Lock()
        self.applied: list[tuple[WireGuardPeer, ...]] = []
        self.changes = 0
        self.apply_error: Exception | None = None
        self.lock_held_during_apply: list[bool] = []
        self.queue = self.make(wireguard, **kwargs)

    def make(self, wireguard: bool = True, **kwargs: Any) -> WorkQueue:
        def apply(peers: Any) -> None:
            self.lock_held_during_apply.append(self.lock.locked())
            if self.apply_error is not None:
                raise self.apply_error
            self.applied.append(tuple(peers))

        def changed() -> None:
            self.changes += 1

        return WorkQueue(
            self.client, self.podman, self.settings, self.lock, apply if wireguard else None, changed, **kwargs  # type: ignore[arg-type]
        )

    @property
    def volumes(self) -> Path:
        return self.settings.volumes_dir

    def outcome(self, item_id: str) -> tuple[str, str]:
        found = [(s, e) for i, s, e in self.client.completed if i == item_id]
        assert len(found) == 1, f"{item_id} acknowledged {len(found)} times: {self.client.completed}"
        return found[0]


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


# --- restart / stop ---------------------------------------------------------------------------


def test_restart_our_container(h: Harness) -> None:
    h.podman.add("c1", ours(), running=False)
    h.client.items = [item("w1", "restart", {"deploymentId": DEP, "containerId": "c1"})]
    h.queue.poll_once()
    assert h.outcome("w1") == ("completed", "")
    assert h.podman.calls == [("restart", "c1")]
    assert h.changes == 1


def test_restart_missing_container_fails_clearly(h: Harness) -> None:
    h.client.items = [item("w1", "restart", {"deploymentId": DEP, "containerId": "gone"})]
    h.queue.poll_once()
    status, error = h.outcome("w1")
    assert status == "failed" and "gone" in error and "does not exist" in error
    assert h.podman.calls == []


def test_restart_failure_is_reported(h: Harness) -> None:
    h.podman.add("c1", ours())
    h.podman.fail["restart"] = PodmanError("did not stay running")
    h.client.items = [item("w1", "restart", {"deploymentId": DEP, "containerId": "c1"})]
    h.queue.poll_once()
    status, error = h.outcome("w1")
    assert status == "failed" and "did not stay running" in error


def test_stop_removes_our_container_and_remembers_deployment(h: Harness) -> None:
    h.podman.add("c1", ours())
    h.client.items = [item("w1", "stop", {"deploymentId": DEP, "containerId": "c1"})]
    h.queue.poll_once()
    assert h.outcome("w1") == ("completed", "")
    assert "c1" not in h.podman.containers
    assert h.queue.stopped_deployments() == frozenset({DEP})
    # Survives a restart of the agent (a new WorkQueue reads the file).
    assert h.make().stopped_deployments() == frozenset({DEP})


def test_stop_of_missing_container_is_completed_without_marking_the_deployment(h: Harness) -> None:
    h.client.items = [item("w1", "stop", {"deploymentId": DEP, "containerId": "c9"})]
    h.queue.poll_once()
    assert h.outcome("w1") == ("completed", "")
    assert h.podman.calls == []
    assert h.changes == 0
    # Issue 8 §3: a stop naming no container must not keep the deployment down for 90 days.
    assert h.queue.stopped_deployments() == frozenset()
    assert h.make().stopped_deployments() == frozenset()


def test_stop_failure_is_reported(h: Harness) -> None:
    h.podman.add("c1", ours())
    h.podman.fail["stop_and_remove"] = PodmanError("still exists after podman rm")
    h.client.items = [item("w1", "stop", {"deploymentId": DEP, "containerId": "c1"})]
    h.queue.poll_once()
    status, error = h.outcome("w1")
    assert status == "failed" and "still exists" in error


@pytest.mark.parametrize("kind", ["stop", "restart"])
def test_foreign_container_is_never_touched(h: Harness, kind: str) -> None:
    h.podman.add("db", {"maintainer": "someone"})
    h.client.items = [item("w1", kind, {"deploymentId": DEP, "containerId": "db"})]
    h.queue.poll_once()
    status, error = h.outcome("w1")
    assert status == "failed" and "not managed" in error
    assert h.podman.calls == [] and "db" in h.podman.containers


@pytest.mark.parametrize("kind", ["stop", "restart"])
def test_container_of_another_deployment_is_not_touched(h: Harness, kind: str) -> None:
    h.podman.add("c1", ours(deployment="other-deployment"))
    h.client.items = [item("w1", kind, {"deploymentId": DEP, "containerId": "c1"})]
    h.queue.poll_once()
    status, error = h.outcome("w1")
    assert status == "failed" and "other-deployment" in error
    assert h.podman.calls == []


def test_container_without_deployment_label_is_accepted(h: Harness) -> None:
    h.podman.add("c1", ours(deployment=None))
    h.client.items = [item("w1", "stop", {"deploymentId": DEP, "containerId": "c1"})]
    h.queue.poll_once()
    assert h.outcome("w1") == ("completed", "")
    assert h.podman.calls == [("stop_and_remove", "c1")]
    # Removed, but it did not prove it belonged to DEP: the deployment is not marked stopped.
    assert h.queue.stopped_deployments() == frozenset()


def _disk_full(monkeypatch: pytest.MonkeyPatch, full: list[bool]) -> None:
    from agent import fsutil

    real = fsutil.atomic_write_json

    def write(path: Any, value: Any, mode: int = 0o600) -> None:
        if full[0]:
            raise OSError(28, "No space left on device")
        real(path, value, mode)

    monkeypatch.setattr(fsutil, "atomic_write_json", write)


def test_item_is_acknowledged_only_after_its_outcome_is_saved(
    h: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    full = [True]
    _disk_full(monkeypatch, full)
    h.podman.add("c1", ours(), running=False)
    h.client.items = [item("w1", "restart", {"deploymentId": DEP, "containerId": "c1"})]
    with caplog.at_level(logging.ERROR):
        h.queue.poll_once()
        h.queue.poll_once()  # re-delivered while the disk is still full
    assert h.client.completed == []
    assert h.podman.calls == [("restart", "c1")]
    assert caplog.text.count("cannot write") == 1
    full[0] = False
    h.queue.poll_once()
    assert h.outcome("w1") == ("completed", "")
    assert h.podman.calls == [("restart", "c1")]  # ran once, acknowledged once
    assert json.loads((h.settings.data_dir / DONE_FILE).read_text())["items"]["w1"]["status"] == "completed"


def test_stop_marked_while_the_disk_is_full_is_saved_before_the_acknowledgement(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = [True]
    _disk_full(monkeypatch, full)
    h.podman.add("c1", ours())
    h.client.items = [item("w1", "stop", {"deploymentId": DEP, "containerId": "c1"})]
    h.queue.poll_once()
    assert h.client.completed == [] and h.queue.stopped_deployments() == frozenset({DEP})
    full[0] = False
    h.queue.poll_once()
    assert h.outcome("w1") == ("completed", "")
    assert h.make().stopped_deployments() == frozenset({DEP})


@pytest.mark.parametrize(
    "payload, needle",
    [
        ({"deploymentId": DEP, "containerId": "--all"}, "containerId"),
        ({"deploymentId": DEP, "containerId": ""}, "containerId"),
        ({"deploymentId": DEP, "containerId": "a b"}, "containerId"),
        ({"deploymentId": DEP, "containerId": 7}, "containerId"),
        ({"deploymentId": DEP}, "containerId"),
        ({"deploymentId": "../x", "containerId": "c1"}, "deploymentId"),
        ({"containerId": "c1"}, "deploymentId"),
    ],
)
def test_stop_with_hostile_payload_fails_and_touches_nothing(h: Harness, payload: dict[str, Any], needle: str) -> None:
    h.podman.add("c1", ours())
    h.client.items = [item("w1", "stop", payload)]
    h.queue.poll_once()
    status, error = h.outcome("w1")
    assert status == "failed" and needle in error
    assert h.podman.calls == [] and "c1" in h.podman.containers


# --- payload shape ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload, needle",
    [
        ("{not json", "not JSON"),
        ('["a", "b"]', "must be a JSON object"),
        ('"just a string"', "must be a JSON object"),
        ("null", "must be a JSON object"),
        (None, "missing"),
        (42, "must be a JSON string"),
    ],
)
@pytest.mark.parametrize("kind", ["stop", "restart", "force_cleanup", "cleanup_volumes", "update_wireguard"])
def test_bad_payload_is_failed_with_the_parse_error(h: Harness, kind: str, payload: Any, needle: str) -> None:
    h.client.items = [item("w1", kind, payload)]
    h.queue.poll_once()
    status, error = h.outcome("w1")
    assert status == "failed" and needle in error and kind in error
    assert h.podman.calls == [] and h.applied == []


# --- force_cleanup ----------------------------------------------------------------------------


def test_force_cleanup_removes_only_our_containers_of_that_service(h: Harness) -> None:
    h.podman.add("mine1", ours())
    h.podman.add("mine2", ours(deployment="d2"), running=False)
    h.podman.add("other-svc", ours(service="another-service"))
    h.podman.add("foreign", {LABEL_DEPLOYMENT_ID: DEP})  # no service label: not ours
    payload = {"serviceId": SVC, "containerIds": ["mine1", "mine2", "other-svc", "foreign", "missing", "--rm", 5]}
    h.client.items = [item("w1", "force_cleanup", payload)]
    h.queue.poll_once()
    assert h.outcome("w1") == ("completed", "")
    assert set(h.podman.containers) == {"other-svc", "foreign"}
    assert [c for c in h.podman.calls] == [("stop_and_remove", "mine1"), ("stop_and_remove", "mine2")]
    assert h.changes == 1


def test_force_cleanup_errors_are_logged_and_completed(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h.podman.add("mine1", ours())
    h.podman.add("mine2", ours())
    h.podman.fail["stop_and_remove"] = PodmanError("stop timed out")
    h.podman.fail["force_remove"] = PodmanError("rm failed")
    h.client.items = [item("w1", "force_cleanup", {"serviceId": SVC, "containerIds": ["mine1", "mine2"]})]
    with caplog.at_level(logging.ERROR):
        h.queue.poll_once()
    assert h.outcome("w1") == ("completed", "")
    assert ("force_remove", "mine1") in h.podman.calls and ("force_remove", "mine2") in h.podman.calls
    assert "rm failed" in caplog.text


def test_force_cleanup_falls_back_to_force_remove(h: Harness) -> None:
    h.podman.add("mine1", ours())
    h.podman.fail["stop_and_remove"] = PodmanError("stop timed out")
    h.client.items = [item("w1", "force_cleanup", {"serviceId": SVC, "containerIds": ["mine1"]})]
    h.queue.poll_once()
    assert h.outcome("w1") == ("completed", "")
    assert "mine1" not in h.podman.containers


@pytest.mark.parametrize(
    "payload, needle",
    [
        ({"serviceId": SVC, "containerIds": "mine1"}, "containerIds must be a list"),
        ({"serviceId": SVC, "containerIds": {"a": 1}}, "containerIds must be a list"),
        ({"serviceId": "", "containerIds": ["mine1"]}, "serviceId"),
        ({"serviceId": "../..", "containerIds": ["mine1"]}, "serviceId"),
        ({"containerIds": ["mine1"]}, "serviceId"),
    ],
)
def test_force_cleanup_bad_payload(h: Harness, payload: dict[str, Any], needle: str) -> None:
    h.podman.add("mine1", ours())
    h.client.items = [item("w1", "force_cleanup", payload)]
    h.queue.poll_once()
    status, error = h.outcome("w1")
    assert status == "failed" and needle in error
    assert "mine1" in h.podman.containers and h.podman.calls == []


def test_force_cleanup_with_null_container_ids_is_a_no_op(h: Harness) -> None:
    h.client.items = [item("w1", "force_cleanup", {"serviceId": SVC, "containerIds": None})]
    h.queue.poll_once()
    assert h.outcome("w1") == ("completed", "")


# --- cleanup_volumes --------------------------------------------------------------------------


def make_volumes(h: Harness) -> tuple[Path, Path, Path]:
    mine = h.volumes / SVC / "data"
    other = h.volumes / "other-service" / "data"
    for directory in (mine, other):
        directory.mkdir(parents=True)
        (directory / "file").write_text("x")
    outside = h.settings.data_dir / "keys"
    outside.mkdir(parents=True)
    (outside / "private.key").write_text("secret")
    return mine, other, outside


def test_cleanup_volumes_deletes_only_that_service(h: Harness) -> None:
    mine, other, outside = make_volumes(h)
    h.client.items = [item("w1", "cleanup_volumes", {"serviceId": SVC})]
    h.queue.poll_once()
    assert h.outcome("w1") == ("completed", "")
    assert not (h.volumes / SVC).exists()
    assert (other / "file").exists() and (outside / "private.key").exists()


def test_cleanup_volumes_of_service_without_volumes(h: Harness) -> None:
    h.client.items = [item("w1", "cleanup_volumes", {"serviceId": SVC})]
    h.queue.poll_once()
    assert h.outcome("w1") == ("completed", "")


@pytest.mark.parametrize("service_id", ["", "..", "../..", "a/b", "/", "/etc", ".", ".hidden", "-rf", "a\nb", None, 5, ["x"]])
def test_cleanup_volumes_hostile_id_deletes_nothing(h: Harness, service_id: Any) -> None:
    mine, other, outside = make_volumes(h)
    (h.volumes / "a").mkdir()
    (h.volumes / "a" / "b").mkdir()
    h.client.items = [item("w1", "cleanup_volumes", {"serviceId": service_id})]
    h.queue.poll_once()
    status, error = h.outcome("w1")
    assert status == "failed" and "serviceId" in error
    assert (mine / "file").exists() and (other / "file").exists() and (outside / "private.key").exists()
    assert (h.volumes / "a" / "b").is_dir()


def test_cleanup_volumes_refuses_symlink_out_of_volumes_dir(h: Harness, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("x")
    h.volumes.mkdir(parents=True)
    (h.volumes / SVC).symlink_to(precious)
    h.client.items = [item("w1", "cleanup_volumes", {"serviceId": SVC})]
    h.queue.poll_once()
    status, error = h.outcome("w1")
    assert status == "failed" and "refusing" in error
    assert (precious / "keep").exists()


def test_cleanup_volumes_waits_for_containers_then_fails(tmp_path: Path) -> None:
    now = [1000.0]
    h = Harness(tmp_path, monotonic=lambda: now[0], volume_cleanup_grace=60.0)
    mine, _, _ = make_volumes(h)
    h.podman.add("c1", ours(), name="web-1")
    h.client.items = [item("w1", "cleanup_volumes", {"serviceId": SVC})]
    h.queue.poll_once()
    # Still pending: not acknowledged, not remembered, nothing deleted.
    assert h.client.completed == [] and (mine / "file").exists()
    now[0] += 61
    h.queue.poll_once()
    status, error = h.outcome("w1")
    assert status == "failed" and "web-1" in error and "still exist" in error
    assert (mine / "file").exists()


def test_cleanup_volumes_proceeds_once_containers_are_gone(tmp_path: Path) -> None:
    now = [1000.0]
    h = Harness(tmp_path, monotonic=lambda: now[0], volume_cleanup_grace=60.0)
    mine, _, _ = make_volumes(h)
    h.podman.add("c1", ours())
    h.client.items = [item("w1", "cleanup_volumes", {"serviceId": SVC})]
    h.queue.poll_once()
    assert h.client.completed == []
    del h.podman.containers["c1"]  # the reconciler removed the orphan
    now[0] += 10
    h.queue.poll_once()
    assert h.outcome("w1") == ("completed", "")
    assert not mine.exists()


def test_cleanup_volumes_when_podman_cannot_list_fails(h: Harness) -> None:
    mine, _, _ = make_volumes(h)
    h.podman.fail["list_containers"] = PodmanError("podman ps: output is not JSON")
    h.client.items = [item("w1", "cleanup_volumes", {"serviceId": SVC})]
    h.queue.poll_once()
    status, error = h.outcome("w1")
    assert status == "failed" and "not JSON" in error
    assert (mine / "file").exists()


# --- deploy, update_wireguard, sync_caddy, unknown ---------------------------------------------


def test_deploy_is_acknowledged_without_action(h: Harness) -> None:
    h.client.items = [item("w1", "deploy", {"name": "--privileged", "image": "evil"}), item("w2", "deploy", "{garbage")]
    h.queue.poll_once()
    assert h.outcome("w1") == ("completed", "")
    assert h.outcome("w2") == ("completed", "")
    assert h.podman.calls == []


def _public_key(n: int) -> str:
    import base64

    return base64.b64encode(bytes([n]) * 32).decode()


def test_update_wireguard_applies_validated_peers(h: Harness) -> None:
    peers = [{"publicKey": _public_key(2), "allowedIps": "10.100.2.0/24,10.200.2.0/24", "endpoint": "198.51.100.2:51820"},
             {"publicKey": _public_key(3), "allowedIps": "10.100.3.0/24,10.200.3.0/24", "endpoint": None}]
    h.client.items = [item("w1", "update_wireguard", {"peers": peers})]
    h.queue.poll_once()
    assert h.outcome("w1") == ("completed", "")
    assert h.applied == [(
        WireGuardPeer(_public_key(2), "10.100.2.0/24,10.200.2.0/24", "198.51.100.2:51820"),
        WireGuardPeer(_public_key(3), "10.100.3.0/24,10.200.3.0/24", ""),
    )]
    assert h.lock_held_during_apply == [True]


@pytest.mark.parametrize(
    "peers, needle",
    [
        ("not a list", "peers must be a list"),
        (None, "peers must be a list"),
        ([{"publicKey": "short", "allowedIps": "10.100.2.0/24"}], "publicKey"),
        ([{"publicKey": _public_key(2), "allowedIps": "10.100.2.0/24\nPostUp = rm -rf /"}], "allowedIps"),
        ([{"publicKey": _public_key(2), "allowedIps": "10.100.2.0/24", "endpoint": "x:y"}], "endpoint"),
        (["string"], "must be an object"),
    ],
)
def test_update_wireguard_invalid_peers_apply_nothing(h: Harness, peers: Any, needle: str) -> None:
    good = {"publicKey": _public_key(9), "allowedIps": "10.100.9.0/24"}
    payload = {"peers": peers if not isinstance(peers, list) else [good, *peers]}
    h.client.items = [item("w1", "update_wireguard", payload)]
    h.queue.poll_once()
    status, error = h.outcome("w1")
    assert status == "failed" and needle in error
    assert h.applied == []


def test_update_wireguard_apply_failure(h: Harness) -> None:
    h.apply_error = RuntimeError("wg syncconf failed: no such device")
    h.client.items = [item("w1", "update_wireguard", {"peers": [{"publicKey": _public_key(2), "allowedIps": "10.100.2.0/24"}]})]
    h.queue.poll_once()
    status, error = h.outcome("w1")
    assert status == "failed" and "no such device" in error


def test_update_wireguard_empty_list_is_not_applied(h: Harness) -> None:
    h.client.items = [item("w1", "update_wireguard", {"peers": []})]
    h.queue.poll_once()
    assert h.outcome("w1") == ("completed", "")
    assert h.applied == []


def test_update_wireguard_when_not_managed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(tmp_path, wireguard=False)
    h.client.items = [item("w1", "update_wireguard", {"peers": [{"publicKey": _public_key(2), "allowedIps": "10.100.2.0/24"}]})]
    with caplog.at_level(logging.INFO, logger="agent.workqueue"):
        h.queue.poll_once()
    assert h.outcome("w1") == ("completed", "")
    assert "not managed" in caplog.text


@pytest.mark.parametrize("kind", ["sync_caddy", "reboot", "", None, 7, ["stop"], "x" * 500])
def test_unknown_types_are_failed_once_not_refetched_forever(h: Harness, kind: Any) -> None:
    h.client.items = [item("w1", kind, {"deploymentId": DEP, "containerId": "c1"})]
    h.queue.poll_once()
    h.queue.poll_once()
    status, error = h.outcome("w1")
    assert status == "failed" and error
    if kind == "sync_caddy":
        assert "sync_caddy" in error
    else:
        assert "unknown work item type" in error
    assert len(error) < 400


# --- idempotency and failures of the queue itself ---------------------------------------------


def test_redelivery_after_lost_ack_executes_once(h: Harness) -> None:
    h.podman.add("c1", ours())
    h.client.items = [item("w1", "restart", {"deploymentId": DEP, "containerId": "c1"})]
    h.client.ack_errors = [Unavailable("POST /api/v1/agent/work-queue: control plane answered 502")]
    h.queue.poll_once()
    assert h.client.completed == [] and h.podman.calls == [("restart", "c1")]
    # The item comes back; a fresh agent process (restart) must not run it again either.
    again = h.make()
    again.poll_once()
    assert h.outcome("w1") == ("completed", "")
    assert h.podman.calls == [("restart", "c1")]


def test_redelivery_keeps_failed_outcome(h: Harness) -> None:
    h.client.items = [item("w1", "restart", {"deploymentId": DEP, "containerId": "nope"})]
    h.client.ack_errors = [Rejected("400 Invalid JSON body", 400)]
    h.queue.poll_once()
    h.queue.poll_once()
    status, error = h.outcome("w1")
    assert status == "failed" and "nope" in error


def test_outcome_is_on_disk_before_the_acknowledgement(h: Harness) -> None:
    path = h.settings.data_dir / DONE_FILE
    seen: list[Any] = []
    original = h.client.complete_work

    def complete(item_id: str, status: str, error: str = "") -> None:
        seen.append(json.loads(path.read_text())["items"].get(item_id, {}).get("status"))
        original(item_id, status, error)

    h.client.complete_work = complete  # type: ignore[method-assign]
    h.client.items = [item("w1", "deploy", {})]
    h.queue.poll_once()
    assert seen == ["completed"]
    assert os.stat(path).st_mode & 0o077 == 0


@pytest.mark.parametrize("content", ["{broken", "[1, 2]", '{"items": "x", "stopped": 3}', '{"items": {"w1": {"status": "weird"}}}', "\x00\x01"])
def test_corrupt_done_file_is_treated_as_empty(h: Harness, caplog: pytest.LogCaptureFixture, content: str) -> None:
    h.settings.data_dir.mkdir(parents=True)
    (h.settings.data_dir / DONE_FILE).write_text(content)
    h.podman.add("c1", ours())
    h.client.items = [item("w1", "stop", {"deploymentId": DEP, "containerId": "c1"})]
    with caplog.at_level(logging.WARNING):
        h.queue.poll_once()
    assert h.outcome("w1") == ("completed", "")
    assert "c1" not in h.podman.containers
    if content.startswith("{broken") or content.startswith("[") or content.startswith("\x00"):
        assert DONE_FILE in caplog.text
    # The file is rewritten as valid JSON.
    assert json.loads((h.settings.data_dir / DONE_FILE).read_text())["items"]["w1"]["status"] == "completed"


def test_done_record_is_bounded(tmp_path: Path) -> None:
    now = [1_000_000.0]
    h = Harness(tmp_path, clock=lambda: now[0])
    h.settings.data_dir.mkdir(parents=True)
    seeded = {f"old{i}": {"status": "completed", "error": "", "at": now[0] - 1000 + i} for i in range(MAX_REMEMBERED)}
    (h.settings.data_dir / DONE_FILE).write_text(json.dumps({"version": 1, "items": seeded, "stopped": {}}))
    h.client.items = [item(f"new{i}", "deploy", {}) for i in range(5)]
    h.queue.poll_once()
    record = json.loads((h.settings.data_dir / DONE_FILE).read_text())["items"]
    assert len(record) == MAX_REMEMBERED
    # The oldest entries made room; the newest are kept.
    assert "old0" not in record and "old4" not in record and "old5" in record and "new4" in record
    # Entries expire after a week.
    now[0] += 8 * 24 * 3600
    h.client.items = [item("fresh", "deploy", {})]
    h.queue.poll_once()
    record = json.loads((h.settings.data_dir / DONE_FILE).read_text())["items"]
    assert list(record) == ["fresh"]


def test_one_item_exception_does_not_stop_the_others(h: Harness) -> None:
    h.podman.add("c2", ours())
    h.podman.fail["inspect"] = RuntimeError("boom")
    h.client.items = [
        item("w1", "stop", {"deploymentId": DEP, "containerId": "c1"}),
        "not an object",
        {"type": "deploy"},  # no id: cannot be acknowledged
        {"id": 12, "type": "deploy"},
        item("w2", "deploy", {}),
    ]
    h.queue.poll_once()
    status, error = h.outcome("w1")
    assert status == "failed" and "boom" in error
    assert h.outcome("w2") == ("completed", "")
    assert len(h.client.completed) == 2


def test_unacknowledgeable_items_are_one_summary_then_counted_then_cleared(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    bad: list[Any] = ["not an object", {"type": "deploy"}, {"id": "x\n", "type": "stop"}, {"id": "y\n"}]
    h = Harness(tmp_path, items=[*bad, item("w1", "deploy", {})], monotonic=lambda: now[0])
    caplog.set_level(logging.INFO, logger="agent.workqueue")

    def problem_lines() -> list[str]:
        lines = [r.getMessage() for r in caplog.records if "cannot be acknowledged" in r.getMessage()]
        caplog.clear()
        return lines

    h.queue.poll_once()
    lines = problem_lines()
    # One line per kind (with its first item), one count; the good item is worked as ever.
    assert len(lines) == 4 and "4 problem(s) in all" in lines[-1], lines
    assert any("not an object (first: item #0 is str)" in line for line in lines)
    assert any("no id (first: item #1)" in line for line in lines)
    assert any("unusable id (first: item #2:" in line for line in lines)
    assert h.outcome("w1") == ("completed", "")
    h.queue.poll_once()
    assert problem_lines() == []
    now[0] += 601  # repeated every 10 minutes while it lasts
    h.queue.poll_once()
    assert len(problem_lines()) == 4
    h.client.items = [item("w2", "deploy", {})]
    h.queue.poll_once()
    assert problem_lines() == ["work queue: items that cannot be acknowledged (served again on every poll) are gone"]


def test_on_change_failure_is_contained(h: Harness) -> None:
    def broken() -> None:
        raise RuntimeError("loop gone")

    h.queue.on_change = broken
    h.podman.add("c1", ours())
    h.client.items = [item("w1", "stop", {"deploymentId": DEP, "containerId": "c1"}), item("w2", "deploy", {})]
    h.queue.poll_once()
    assert h.outcome("w1") == ("completed", "") and h.outcome("w2") == ("completed", "")


@pytest.mark.parametrize(
    "error", [Unavailable("cannot reach the control plane at http://cp"), Rejected("answered 401: Invalid signature", 401), BadResponse("answer is not JSON")]
)
def test_get_errors_are_logged_and_poll_returns(h: Harness, caplog: pytest.LogCaptureFixture, error: Exception) -> None:
    h.client.get_error = error
    with caplog.at_level(logging.WARNING):
        h.queue.poll_once()
    assert str(error) in caplog.text
    assert h.client.completed == []


def test_host_lock_is_held_while_changing_containers(h: Harness) -> None:
    held: list[bool] = []
    h.podman.add("c1", ours())
    original = h.podman.stop_and_remove

    def stop_and_remove(ref: str) -> None:
        held.append(h.lock.locked())
        original(ref)

    h.podman.stop_and_remove = stop_and_remove  # type: ignore[method-assign]
    h.client.items = [item("w1", "stop", {"deploymentId": DEP, "containerId": "c1"})]
    h.queue.poll_once()
    assert held == [True]
    assert not h.lock.locked()


def test_run_polls_until_stopped_and_survives_errors(h: Harness) -> None:
    stop = threading.Event()
    polls = 0
    original = h.client.work_items

    def work_items() -> list[Any]:
        nonlocal polls
        polls += 1
        if polls == 1:
            raise RuntimeError("unexpected")  # not an ApiError: run() must survive it too
        if polls >= 3:
            stop.set()
        return original()

    h.client.work_items = work_items  # type: ignore[method-assign]
    h.client.items = [item("w1", "deploy", {})]
    thread = threading.Thread(target=h.queue.run, args=(stop,))
    thread.start()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert polls >= 3
    assert h.outcome("w1") == ("completed", "")


def test_stopped_deployments_does_not_wait_for_a_blocked_item(h: Harness) -> None:
    """The reconciler may ask for stopped deployments while it holds host_lock; an item
    waiting for that lock must not block the question (no lock-order deadlock)."""
    h.podman.add("c1", ours())
    h.client.items = [item("w1", "stop", {"deploymentId": DEP, "containerId": "c1"})]
    with h.lock:
        worker = threading.Thread(target=h.queue.poll_once)
        worker.start()
        for _ in range(500):  # until the item has been fetched and waits for host_lock
            if h.client.gets:
                break
            time.sleep(0.01)
        time.sleep(0.05)
        answer: list[frozenset[str]] = []
        asker = threading.Thread(target=lambda: answer.append(h.queue.stopped_deployments()))
        asker.start()
        asker.join(timeout=5)
        assert answer == [frozenset()]
        assert h.client.completed == []
    worker.join(timeout=5)
    assert h.outcome("w1") == ("completed", "")
    assert h.queue.stopped_deployments() == frozenset({DEP})


def test_repeated_fetch_error_is_not_logged_every_poll(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    h = Harness(tmp_path, monotonic=lambda: now[0])
    h.client.get_error = Unavailable("cannot reach the control plane at http://cp: refused")
    with caplog.at_level(logging.INFO, logger="agent.workqueue"):
        for _ in range(5):
            h.queue.poll_once()
            now[0] += 5
        assert caplog.text.count("refused") == 1
        now[0] += 60
        h.queue.poll_once()
        assert caplog.text.count("refused") == 2
        h.client.get_error = Rejected("answered 401: Invalid signature", 401)
        h.queue.poll_once()
        assert "Invalid signature" in caplog.text
        h.client.get_error = None
        h.queue.poll_once()
        assert "works again" in caplog.text


def test_deferred_cleanup_forgotten_when_the_item_disappears(tmp_path: Path) -> None:
    now = [0.0]
    h = Harness(tmp_path, monotonic=lambda: now[0], volume_cleanup_grace=60.0)
    mine, _, _ = make_volumes(h)
    h.podman.add("c1", ours())
    h.client.items = [item("w1", "cleanup_volumes", {"serviceId": SVC})]
    h.queue.poll_once()
    h.client.items = []  # deleted on the CP (abortRollout deletes pending items)
    now[0] += 100
    h.queue.poll_once()
    # Re-queued later under the same id: it gets a fresh grace period, not an instant failure.
    h.client.items = [item("w1", "cleanup_volumes", {"serviceId": SVC})]
    h.queue.poll_once()
    assert h.client.completed == [] and (mine / "file").exists()


# --- against the fake control plane (real signed client, real HTTP) ----------------------------


def test_end_to_end_with_the_fake_control_plane(tmp_path: Path) -> None:
    from agent import crypto
    from agent.api import ControlPlane, Signer
    fakecp = pytest.importorskip("tests.fakecp", reason="tests/fakecp.py (the fake control plane) is not in this checkout")
    FakeControlPlane = fakecp.FakeControlPlane  # noqa: N806

    key = crypto.new_signing_key()
    with FakeControlPlane() as cp:
        server = cp.add_server(crypto.public_key_b64(key))
        lost_once = [True]

        class LosingClient(ControlPlane):
            """Drops the connection of the first acknowledgement, as a network blip would."""

            def complete_work(self, item_id: str, status: str, error: str = "") -> None:
                if lost_once[0]:
                    lost_once[0] = False
                    cp.close_next(1, path="/api/v1/agent/work-queue")
                super().complete_work(item_id, status, error)

        client = LosingClient(cp.url, Signer(server.id, key), retries=0, read_timeout=5)
        h = Harness(tmp_path)
        h.podman.add("c1", ours())
        queue = WorkQueue(client, h.podman, h.settings, h.lock, None)  # type: ignore[arg-type]
        restart = cp.add_work_item(server.id, "restart", {"deploymentId": DEP, "containerId": "c1"})
        wireguard = cp.add_work_item(server.id, "update_wireguard", {"peers": []})
        garbage = cp.add_work_item(server.id, "stop", "{not json")
        unknown = cp.add_work_item(server.id, "sync_caddy", {})

        queue.poll_once()  # the restart's acknowledgement is lost
        queue.poll_once()  # re-delivered: acknowledged from the record, not restarted again
        queue.poll_once()  # nothing pending any more

        assert h.podman.calls == [("restart", "c1")]
        statuses = {item.id: item.status for item in cp.work_items(server.id)}
        assert statuses == {restart: "completed", wireguard: "completed", garbage: "failed", unknown: "failed"}
        by_id = {c.id: c for c in cp.completions}
        assert by_id[restart].error is None  # `error` omitted when empty
        assert "not JSON" in by_id[garbage].error and "sync_caddy" in by_id[unknown].error
        assert len(cp.requests_to("/api/v1/agent/work-queue", "GET")) == 3
        assert lost_once == [False] and [c.id for c in cp.completions].count(restart) == 1
        assert len(cp.requests_to("/api/v1/agent/work-queue", "POST")) == 5  # one of them dropped


def test_long_error_is_cut_before_it_is_stored_and_sent(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h.podman.add("c1", ours())
    h.podman.fail["restart"] = PodmanError("did not stay running; last log lines:\n" + "x" * 5000 + "END")
    h.client.items = [item("w1", "restart", {"deploymentId": DEP, "containerId": "c1"})]
    with caplog.at_level(logging.WARNING):
        h.queue.poll_once()
    status, error = h.outcome("w1")
    assert status == "failed" and len(error) <= 1000 and error.endswith("...")
    assert "END" in caplog.text
    stored = json.loads((h.settings.data_dir / DONE_FILE).read_text())["items"]["w1"]["error"]
    assert stored == error


def test_items_with_odd_ids_do_not_break_the_poll(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h.client.items = [{"id": ["x"], "type": "deploy", "payload": "{}"}, {"id": {"a": 1}}, item("ok", "deploy", {})]
    h.queue.poll_once()
    h.queue.poll_once()
    assert h.outcome("ok") == ("completed", "")
    assert "Traceback" not in caplog.text
