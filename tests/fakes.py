"""In-memory stand-ins for the Podman adapter and the reporter, for loop unit tests.

They behave like the real adapter at its interface (containers appear, change state and
vanish) and can inject failures, so the state machine can be tested without subprocesses.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import replace

from agent.drift import LABEL_DEPLOYMENT_ID, LABEL_SERVICE_ID, LABEL_SERVICE_NAME, ContainerInfo
from agent.host.podman import HealthReading
from agent.model import canonical_image


class FakePodman:
    def __init__(self) -> None:
        self.containers: dict[str, ContainerInfo] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, Exception] = {}
        self.run_delay = 0.0
        self.health_status: dict[str, str] = {}
        self.restart_counts: dict[str, int] = {}
        self.pull_timeouts: list[float | None] = []
        self._ids = itertools.count(1)
        self.lock = threading.Lock()

    def add(self, deployment_id: str, state: str = "running", image: str = "localhost/app:v1", service: str = "svc") -> ContainerInfo:
        labels = {LABEL_SERVICE_ID: service}
        if deployment_id:
            labels[LABEL_DEPLOYMENT_ID] = deployment_id
        cid = f"{next(self._ids):064x}"
        info = ContainerInfo(cid, f"c-{deployment_id or cid[-6:]}", canonical_image(image), state, labels, int(time.time()))
        self.containers[cid] = info
        return info

    def _maybe_fail(self, op: str, ref: str) -> None:
        self.calls.append((op, ref))
        error = self.fail.get(op)
        if error is not None:
            raise error

    def list_containers(self, max_age: float = 0.0) -> list[ContainerInfo]:
        """Like `podman ps` (4.3): health as its status suffix shows it, a start time that
        each restart moves, no restart count."""
        self._maybe_fail("list", "")
        return [
            replace(info, health=self._ps_health(cid), started_at=1_000_000 + self.restart_counts.get(cid, 0))
            for cid, info in self.containers.items()
        ]

    def _ps_health(self, cid: str) -> str:
        status = self.health_status.get(cid, "none")
        return "" if status == "none" or not self.ps_shows_health else status

    # How old the listing is said to be (`Podman.list_containers_aged`); 0: taken now.
    listing_age_value: float | None = 0.0
    # Whether `ps` shows health (podman 4.3 does); False: a podman whose listing does not.
    ps_shows_health = True

    def list_containers_aged(self, max_age: float = 0.0) -> tuple[list[ContainerInfo], float]:
        """The listing with the age it had when it was taken from the cache (`listing_age_value`)."""
        age = self.listing_age_value or 0.0
        return self.list_containers(max_age), age

    def health(self, ids):
        return {i: reading.status for i, reading in self.read_health(ids).items()}

    def read_health(self, ids):
        return {
            i: HealthReading(self.health_status.get(i, "none"), self.restart_counts.get(i, 0), i in self.health_status)
            for i in ids
        }

    def pull(self, image: str, timeout: float | None = None) -> None:
        self._maybe_fail("pull", image)
        self.pull_timeouts.append(timeout)

    def image_exists(self, image: str) -> bool:
        return True

    def run_container(self, spec, env, volumes_dir) -> str:
        self._maybe_fail("run", spec.name)
        if self.run_delay:
            time.sleep(self.run_delay)
        for cid, info in list(self.containers.items()):
            if info.name == spec.name:
                del self.containers[cid]
        cid = f"{next(self._ids):064x}"
        labels = {LABEL_SERVICE_ID: spec.service_id, LABEL_SERVICE_NAME: spec.service_name, LABEL_DEPLOYMENT_ID: spec.deployment_id}
        self.containers[cid] = ContainerInfo(cid, spec.name, canonical_image(spec.image), "running", labels)
        self.last_env = dict(env)
        return cid

    def inspect(self, ref: str):
        return {"Id": ref} if ref in self.containers else None

    def config_of(self, ref: str):
        return self.inspect(ref)

    def start(self, ref: str) -> None:
        self._maybe_fail("start", ref)
        self.containers[ref] = replace(self.containers[ref], state="running")

    def stop_and_remove(self, ref: str) -> None:
        self._maybe_fail("stop", ref)
        self.containers.pop(ref, None)

    def force_remove(self, ref: str) -> None:
        self._maybe_fail("rm", ref)
        self.containers.pop(ref, None)


class RecordingReporter:
    def __init__(self) -> None:
        self.triggers: list[bool] = []

    def trigger(self, include_resources: bool = False) -> None:
        self.triggers.append(include_resources)


class ListSource:
    """Returns the queued states (or raises queued exceptions) in order, then repeats the last.
    Like the control plane, it does not ask for a lone deployment's image change to be applied
    unless `follow_image_changes` (a state file) is given."""

    def __init__(self, *items, follow_image_changes: bool = False) -> None:
        self.items = list(items)
        self.follow_image_changes = follow_image_changes

    def fetch(self):
        item = self.items.pop(0) if len(self.items) > 1 else self.items[0]
        if isinstance(item, Exception):
            raise item
        return item
