"""Image garbage collection that removes only this agent's images, only under disk pressure.

`podman image prune` (with or without `--all`) removes every unused image on the host:
another agent's, the operator's. So the agent keeps a ledger in its data dir
(`images.json`): each reference it pulled that did not name that image before (an image the
operator already had stays the operator's), with the image id the pull gave, and the last
two images each service ran. The GC removes a ledger image only when

- the disk holding podman's storage is above `start_percent` used (it stops as soon as
  usage is below `stop_percent`), and
- the reference still names the image id we pulled (nobody re-pointed it since), and
- no container on the host uses that image (whoever owns the container), and
- it is neither the current nor the previous image of a service (kept for a rollback).

Removal is `podman image rm REF` without `--force`: it untags our reference only, so an
image someone else also tagged, or that a container uses, stays on disk. Oldest pulls go
first. Builds push to a registry through BuildKit and leave nothing in podman's storage,
so pulls are the only images the agent puts there.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.fsutil import atomic_write

log = logging.getLogger(__name__)

LEDGER_FILE = "images.json"


class ImageLedger:
    """The references this agent pulled and the images its services ran, in one JSON file.
    Thread-safe within the process (the reconciler pulls, the GC thread reads and forgets);
    one agent per data dir, so no other process writes it. Without a path it records
    nothing (library use, unit tests)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()

    @property
    def records(self) -> bool:
        """Whether anything is recorded (a ledger without a path is a no-op)."""
        return self.path is not None

    def note_pulled(self, reference: str, image_id: str, now: float | None = None) -> None:
        def change(data: dict[str, Any]) -> None:
            data["images"][reference] = {"id": image_id, "pulled": time.time() if now is None else now}

        self._update(change)

    def note_deployed(self, service_id: str, reference: str) -> None:
        """`reference` now runs for `service_id`; what ran before stays as its rollback."""

        def change(data: dict[str, Any]) -> None:
            history = [ref for ref in data["services"].get(service_id, []) if ref != reference]
            data["services"][service_id] = [reference, *history[:1]]

        self._update(change)

    def forget(self, reference: str) -> None:
        self._update(lambda data: data["images"].pop(reference, None))

    def pulled(self) -> dict[str, tuple[str, float]]:
        """reference -> (image id, when pulled)."""
        with self._lock:
            images = self._load()["images"]
        return {ref: (str(entry.get("id") or ""), float(entry.get("pulled") or 0)) for ref, entry in images.items()}

    def kept(self) -> set[str]:
        """The current and previous reference of every service."""
        with self._lock:
            services = self._load()["services"]
        return {ref for history in services.values() for ref in history}

    def _update(self, change: Callable[[dict[str, Any]], object]) -> None:
        if self.path is None:
            return
        with self._lock:
            data = self._load()
            change(data)
            try:
                atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True))
            except OSError as exc:
                # Losing a record only means that image is never collected: not worth failing a deploy.
                log.warning("cannot record images in %s: %s", self.path, exc)

    def _load(self) -> dict[str, Any]:
        empty: dict[str, Any] = {"images": {}, "services": {}}
        if self.path is None:
            return empty
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return empty
        except (OSError, ValueError) as exc:
            log.warning("image ledger %s is unreadable (%s); starting a new one", self.path, exc)
            return empty
        if not isinstance(data, dict):
            return empty
        images = data.get("images")
        services = data.get("services")
        return {
            "images": {str(k): v for k, v in images.items() if isinstance(v, dict)} if isinstance(images, dict) else {},
            "services": {str(k): [str(r) for r in v][:2] for k, v in services.items() if isinstance(v, list)}
            if isinstance(services, dict)
            else {},
        }


class ImageStore(Protocol):
    """What the GC needs of podman (`agent.host.podman.Podman` provides it)."""

    def storage_path(self) -> Path: ...

    def images_in_use(self) -> set[str]: ...

    def image_id(self, reference: str) -> str | None: ...

    def remove_image(self, reference: str) -> bool: ...


@dataclass(frozen=True)
class Watermarks:
    start_percent: float = 85.0
    stop_percent: float = 80.0


def used_percent(path: Path) -> float:
    usage = shutil.disk_usage(path)
    return 100.0 * usage.used / usage.total if usage.total else 0.0


class ImageGC:
    """Runs `collect` every `interval` seconds; see the module docstring for the rules."""

    def __init__(
        self,
        store: ImageStore,
        ledger: ImageLedger,
        marks: Watermarks,
        interval: float = 600.0,
        lock: threading.Lock | None = None,
        usage: Callable[[Path], float] = used_percent,
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.marks = marks
        self.interval = interval
        # The host lock: no image goes while a reconcile step or work item is between pull and run.
        self.lock = lock or threading.Lock()
        self.usage = usage
        self._pressure = False

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            try:
                self.collect()
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("image GC failed: %s", exc)

    def collect(self) -> list[str]:
        """One round; returns the references removed."""
        path = self.store.storage_path()
        used = self.usage(path)
        if used <= self.marks.start_percent:
            if self._pressure:
                log.info("disk pressure cleared: %s is %.0f%% used", path, used)
                self._pressure = False
            return []
        if not self._pressure:
            log.warning(
                "disk pressure: %s is %.0f%% used (image GC starts above %g%%, stops below %g%%)",
                path, used, self.marks.start_percent, self.marks.stop_percent,
            )
        removed: list[str] = []
        with self.lock:
            for reference in self.candidates():
                if self.store.remove_image(reference):
                    self.ledger.forget(reference)
                    removed.append(reference)
                used = self.usage(path)
                if used < self.marks.stop_percent:
                    break
        if removed:
            log.info("image GC removed %d image(s) this agent pulled: %s; %s is %.0f%% used", len(removed), ", ".join(removed), path, used)
        if used < self.marks.stop_percent:
            log.info("disk pressure cleared: %s is %.0f%% used", path, used)
            self._pressure = False
        else:
            if removed or not self._pressure:
                log.warning("disk still %.0f%% used: no more unused images of this agent to remove", used)
            self._pressure = True
        return removed

    def candidates(self) -> list[str]:
        """Ledger references the GC may remove now, oldest pull first."""
        kept = self.ledger.kept()
        in_use = self.store.images_in_use()
        found = []
        for reference, (recorded_id, _pulled) in sorted(self.ledger.pulled().items(), key=lambda item: item[1][1]):
            if reference in kept:
                continue
            current = self.store.image_id(reference)
            if current is None:
                self.ledger.forget(reference)  # gone already
                continue
            if recorded_id and current != recorded_id:
                log.info("image GC: %s now names %s, not the image this agent pulled; leaving it", reference, current[:12])
                self.ledger.forget(reference)
                continue
            if _used(current, reference, in_use):
                continue
            found.append(reference)
        return found


def _used(image_id: str, reference: str, in_use: Collection[str]) -> bool:
    return image_id in in_use or reference in in_use
