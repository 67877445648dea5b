"""Status reports on their own thread, so no podman call or build can starve them.

The control plane marks a server offline after 30 s without a report; this thread sends
one at least every `heartbeat_interval` seconds, and at once when the reconciler asks
(after each step). If podman cannot be read in time it reports the last known list
rather than an empty one, which the control plane would read as "all containers gone".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent import status
from agent.api import ApiError
from agent.drift import ContainerInfo
from agent.host.podman import Podman
from agent.observe import Observer

log = logging.getLogger(__name__)

#: A container podman restarted this many times within the window is crash-looping.
CRASH_LOOP_RESTARTS = 2
CRASH_LOOP_WINDOW = 300.0


class Heartbeat:
    observer: Observer = Observer()  # runtime.assemble gives it the Publisher (agent status, metrics)

    def __init__(
        self,
        send: Callable[[dict[str, Any]], None] | None,
        podman: Podman,
        interval: float,
        public_ip: Callable[[], str] = lambda: "",
        on_beat: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._send = send
        self.podman = podman
        self.interval = interval
        self.public_ip = public_ip
        self.on_beat = on_beat
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._include_resources = False
        self._last_containers: list[ContainerInfo] | None = None
        self._last_health: dict[str, str] = {}
        self._restarts: dict[str, int] = {}
        self._restart_times: dict[str, list[float]] = {}

    def trigger(self, include_resources: bool = False) -> None:
        """Send a report as soon as possible (with resources when there is no drift)."""
        with self._lock:
            self._include_resources = self._include_resources or include_resources
        self._wake.set()

    def send_once(self) -> None:
        with self._lock:
            include_resources = self._include_resources
            self._include_resources = False
        try:
            containers = self.podman.list_containers()
            self._last_containers = containers
            self._forget_gone(containers)
        except Exception as exc:  # noqa: BLE001 - report what we last knew instead of nothing
            if self._last_containers is None:
                # An empty list would tell the control plane every deployment is gone.
                log.warning("cannot list containers for the status report (%s); not reporting yet", exc)
                return
            log.warning("cannot list containers for the status report (%s); reporting the last known list", exc)
            containers = self._last_containers
        running = [c.id for c in containers if c.running]
        try:
            found = self.podman.health_and_restarts(running)
            health = {cid: self._crash_looping(cid, status, restarts) for cid, (status, restarts) in found.items()}
            self._last_health = dict(health)
            self.observer.containers(containers, health)  # after a failed read `agent status` keeps the last
        except Exception as exc:  # noqa: BLE001
            # Never guess "none" (the control plane counts it as healthy): last known, else "starting".
            log.warning("cannot read container health (%s); reporting the last known", exc)
            health = {cid: self._last_health.get(cid, "starting") for cid in running}
        report = status.build_report(containers, health, self.public_ip(), include_resources)
        if self._send is None:
            return
        try:
            self._send(report)
        except ApiError as exc:
            log.warning("status report failed: %s", exc)

    def _crash_looping(self, container_id: str, status: str, restarts: int) -> str:
        """`unhealthy` for a container podman restarted at least CRASH_LOOP_RESTARTS times
        within CRASH_LOOP_WINDOW: with --restart=always a crash loop looks "running" at almost
        every look, and the control plane would count it healthy (PROTOCOL.md §17.18). A
        single restart (one OOM kill) does not count."""
        now = self._clock()
        previous = self._restarts.get(container_id)
        self._restarts[container_id] = restarts
        times = [t for t in self._restart_times.get(container_id, []) if now - t < CRASH_LOOP_WINDOW]
        if previous is not None and restarts > previous:
            times.extend([now] * min(restarts - previous, CRASH_LOOP_RESTARTS))
        if times:
            self._restart_times[container_id] = times
        else:
            self._restart_times.pop(container_id, None)
        if len(times) >= CRASH_LOOP_RESTARTS:
            if previous is not None and restarts > previous:
                log.warning("container %s keeps restarting (%d restarts); reporting it unhealthy", container_id[:12], restarts)
            return "unhealthy"
        return status

    def _forget_gone(self, containers: list[ContainerInfo]) -> None:
        present = {c.id for c in containers}
        for table in (self._restarts, self._restart_times, self._last_health):
            for gone in [cid for cid in table if cid not in present]:
                del table[gone]

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            # The next beat is due `interval` after this one started, however long it takes.
            deadline = time.monotonic() + self.interval
            self._wake.clear()
            if self.on_beat is not None:
                self.on_beat()
            try:
                self.send_once()
            except Exception:  # noqa: BLE001 - the heartbeat thread must never die
                log.exception("status report crashed")
            # Wake early for a triggered report (never more than ~4 per second) or to stop.
            stop.wait(0.25)
            while not stop.is_set() and not self._wake.is_set() and time.monotonic() < deadline:
                self._wake.wait(min(0.5, max(0.0, deadline - time.monotonic())))
