"""Status reports on their own thread, so no podman call or build can starve them.

The control plane marks a server offline after 30 s without a report; this thread sends
one at least every `heartbeat_interval` seconds, and at once when the reconciler asks
(after each step). If podman cannot be read in time it reports the last known list
rather than an empty one, which the control plane would read as "all containers gone".

Coalescing: a trigger sends a report at once, unless the previous report went out less
than `coalesce` (0.25 s) ago; then one report goes out when that gap ends, however many
triggers came in between. While the reconciler follows a rollout (`following`), containers
and health are re-read every `health_poll` (0.5 s) and a report goes out as soon as it
would differ from the last one sent, so a health change reaches the control plane within
about a second. Containers the reconciler is draining (`exclude`) are left out of reports.
After each report `on_report(changed)` tells the reconciler, which polls right after it.

Podman cost (issue 11): a report that a trigger asked for uses the shared listing of the
containers (`Listing` in agent/host/listing.py: the reconciler's own `podman ps`, kept current
with the changes the agent made since) when it is at most `interval` old, and a look while
following one at most `2 * health_poll` old; a beat nobody asked for lists afresh, unless
podman's database did not change since the listing was taken (then that listing is what a `ps`
would say). The listing carries each container's health ("Up 3 minutes (healthy)") and when it
last started, so a report normally costs no inspect at all. For each checked container the
newer of the listing and the last inspect decides. One batched inspect reads only what the
listing cannot tell: a container seen for the first time (its restart count, the baseline of
crash-loop detection, and whether it has a health check at all), one whose start time moved or
is unknown (it restarted: by how many restarts?), one whose best known health is unsettled
(`starting`) and older than the coalescing gap, and every checked one that a newer listing
shows without health (a podman whose `ps` does not show it). A checked container is never
reported `none`. Idle, the reconciler's tick asks for the report with resources every
`interval`, so a beat of our own is held back up to BEAT_SLACK for that trigger: one report
and at most one `ps` per tick rather than two.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
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
#: How long a due beat waits for the trigger of a reconciler that ticks at the same interval.
BEAT_SLACK = 1.0
UNSETTLED = frozenset({"starting"})


def _listed_restarts(container: ContainerInfo) -> int | None:
    """The listing's restart count, trusted only from a real `ps` (one that says when the
    container started): the agent's own entry for a container it just ran says 0, which is
    a baseline, not a reading."""
    return container.restarts if container.started_at and container.restarts >= 0 else None


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
        # Container id -> (when it last started as the listing said, has a health check).
        self._seen: dict[str, tuple[int, bool]] = {}
        # Container id -> its own health check's status as last observed, and when (clock).
        self._observed: dict[str, tuple[str, float]] = {}
        self._restart_times: dict[str, list[float]] = {}
        # Set by Reconciler.couple (defaults: nothing excluded, never following).
        self.exclude: Callable[[], frozenset[str]] = frozenset
        self.following: Callable[[], bool] = lambda: False
        self.on_report: Callable[[bool], None] | None = None
        # Told of every trigger (something changed containers), e.g. the health runner's wake.
        self.on_trigger: Callable[[], None] | None = None
        self.coalesce = 0.25
        self.health_poll = 0.5
        self._last_entries: list[dict[str, str]] | None = None
        self._resources_asked_at: float | None = None

    def trigger(self, include_resources: bool = False) -> None:
        """Send a report as soon as possible (with resources when there is no drift)."""
        with self._lock:
            self._include_resources = self._include_resources or include_resources
            if include_resources:
                self._resources_asked_at = time.monotonic()
        self._wake.set()
        if self.on_trigger is not None:
            self.on_trigger()

    def last_health(self) -> Mapping[str, str]:
        """Container id -> the health last read (for the reconciler's rollout check)."""
        return dict(self._last_health)

    def send_once(self, only_if_changed: bool = False, triggered: bool = False) -> bool:
        """Build and send a report; with `only_if_changed`, only when its containers differ
        from the last one sent (and no resources are due). True when one was sent. A report
        something asked for (`triggered`) and a look reuse what podman said lately (module
        docstring)."""
        with self._lock:
            include_resources = self._include_resources
        max_age = self.interval if triggered else 2 * self.health_poll if only_if_changed else 0.0
        listed_at = self._clock()
        try:
            containers, age = self.podman.list_containers_aged(max_age=max_age)
            listed_at -= age
            self._last_containers = containers
            self._forget_gone(containers)
        except Exception as exc:  # noqa: BLE001 - report what we last knew instead of nothing
            if only_if_changed:
                return False  # a look between beats: the next beat reports (and logs) it
            if self._last_containers is None:
                # An empty list would tell the control plane every deployment is gone.
                log.warning("cannot list containers for the status report (%s); not reporting yet", exc)
                return False
            log.warning("cannot list containers for the status report (%s); reporting the last known list", exc)
            containers = self._last_containers
        excluded = self.exclude()
        containers = [c for c in containers if c.id not in excluded]
        running = [c for c in containers if c.running]
        try:
            health = self._health(running, listed_at)
            self._last_health = dict(health)
            self.observer.containers(containers, health)  # after a failed read `agent status` keeps the last
        except Exception as exc:  # noqa: BLE001
            if only_if_changed:
                return False
            # Never guess "none" (the control plane counts it as healthy): last known, else "starting".
            log.warning("cannot read container health (%s); reporting the last known", exc)
            health = {c.id: self._last_health.get(c.id, "starting") for c in running}
        entries = status.container_entries(containers, health)
        changed = entries != self._last_entries
        if only_if_changed and not changed and not include_resources:
            return False
        with self._lock:
            self._include_resources = False
        report = status.build_report(containers, health, self.public_ip(), include_resources)
        if self._send is not None:
            try:
                self._send(report)
            except ApiError as exc:
                log.warning("status report failed: %s", exc)
                return False
        self._last_entries = entries
        if self.on_report is not None:
            self.on_report(changed)
        return True

    def _health(self, running: list[ContainerInfo], listed_at: float) -> dict[str, str]:
        """Container id -> health of the running containers: what the listing (taken at
        `listed_at`) says, and one batched inspect for what it cannot tell (module docstring)."""
        now = self._clock()
        read = []
        # The best word on each checked container not read: decided once, used below.
        bests: dict[str, tuple[str, float] | None] = {}
        for container in running:
            seen = self._seen.get(container.id)
            if seen is None or (self._moved(container, seen[0]) and _listed_restarts(container) is None):
                read.append(container.id)  # first sight, or restarted: by how many restarts?
                continue
            if not (seen[1] or container.health):
                continue  # no health check: always `none`
            best = bests[container.id] = self._best_health(container, listed_at)
            if best is None or (
                best[0] in UNSETTLED and now - best[1] > self.coalesce
            ) or (not container.health and listed_at > best[1]):
                # Not settled and older than the coalescing gap; or a podman whose listing
                # shows no health has listed it since the last read.
                read.append(container.id)
        found = self.podman.read_health(read) if read else {}
        health = {}
        for container in running:
            seen = self._seen.get(container.id)
            reading = found.get(container.id)
            restarts: int | None = None
            if reading is not None:
                checked, restarts = reading.checked, reading.restarts
                # A checked container caught between a crash and its restart reads "none",
                # which the control plane counts as healthy: it is starting.
                status = "starting" if checked and reading.status == "none" else reading.status
                self._observed[container.id] = (status, now)
                if seen is None and container.restarts >= 0:
                    # The agent's own run (0) or a ps that counts restarts: the baseline
                    # predates this inspect, so restarts in between are counted.
                    self._restarts.setdefault(container.id, container.restarts)
            elif seen is not None:
                checked = seen[1] or bool(container.health)
                best = bests.get(container.id) if checked else None
                status = best[0] if best is not None else "starting" if checked else "none"
                if checked and best is not None:
                    self._observed[container.id] = best
                if self._moved(container, seen[0]):
                    restarts = _listed_restarts(container)
            else:  # pragma: no cover - read_health answers every ref it is given
                status, checked = "none", False
            self._seen[container.id] = (container.started_at or (seen[0] if seen else 0), checked)
            health[container.id] = self._crash_looping(container.id, status, restarts)
        return health

    @staticmethod
    def _moved(container: ContainerInfo, started_at: int) -> bool:
        """Whether the container may have restarted since `started_at` was seen: its start
        time moved, or the listing does not say when it started."""
        return not container.started_at or container.started_at != started_at

    def _best_health(self, container: ContainerInfo, listed_at: float) -> tuple[str, float] | None:
        """The newest word on a checked container's health, and when it was said: the
        listing's when it was taken after the last inspect, else that inspect's."""
        observed = self._observed.get(container.id)
        if container.health and (observed is None or listed_at >= observed[1]):
            return container.health, listed_at
        return observed

    def _crash_looping(self, container_id: str, status: str, restarts: int | None) -> str:
        """`unhealthy` for a container podman restarted at least CRASH_LOOP_RESTARTS times
        within CRASH_LOOP_WINDOW: with --restart=always a crash loop looks "running" at almost
        every look, and the control plane would count it healthy (PROTOCOL.md §17.18). A
        single restart (one OOM kill) does not count. `restarts` is podman's RestartCount,
        None when it was not read this time (its start time did not move)."""
        now = self._clock()
        previous = self._restarts.get(container_id)
        if restarts is not None:
            self._restarts[container_id] = restarts
        restarted = restarts is not None and previous is not None and restarts > previous
        times = [t for t in self._restart_times.get(container_id, []) if now - t < CRASH_LOOP_WINDOW]
        if restarted:
            assert restarts is not None and previous is not None
            times.extend([now] * min(restarts - previous, CRASH_LOOP_RESTARTS))
        if times:
            self._restart_times[container_id] = times
        else:
            self._restart_times.pop(container_id, None)
        if len(times) >= CRASH_LOOP_RESTARTS:
            if restarted:
                log.warning("container %s keeps restarting (%d restarts); reporting it unhealthy", container_id[:12], restarts)
            return "unhealthy"
        return status

    def _forget_gone(self, containers: list[ContainerInfo]) -> None:
        present = {c.id for c in containers}
        for table in (self._restarts, self._restart_times, self._last_health, self._seen, self._observed):
            for gone in [cid for cid in table if cid not in present]:
                del table[gone]

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            # The next beat is due `interval` after this one started, however long it takes.
            deadline = time.monotonic() + self.interval
            triggered = self._wake.is_set()
            self._wake.clear()
            if self.on_beat is not None:
                self.on_beat()
            self._send_guarded(False, triggered)
            self._until_next(stop, deadline)

    def _send_guarded(self, only_if_changed: bool, triggered: bool = False) -> bool:
        try:
            return self.send_once(only_if_changed, triggered)
        except Exception:  # noqa: BLE001 - the heartbeat thread must never die
            log.exception("status report crashed")
            return False

    def _until_next(self, stop: threading.Event, deadline: float) -> None:
        """Wait for the next beat (module docstring): the deadline, or a trigger once the
        coalescing gap is over; while following a rollout, report changes in between."""
        stop.wait(self.coalesce)  # the coalescing gap: triggers in it make one report after it
        next_look = time.monotonic() + max(0.0, self.health_poll - self.coalesce)
        while not stop.is_set() and not self._wake.is_set():
            now = time.monotonic()
            if now >= deadline:
                # A reconciler that asked for resources one interval ago asks again any moment:
                # that report is this beat (at most BEAT_SLACK late).
                asked = self._resources_asked_at
                until = deadline if asked is None else min(asked + self.interval, deadline) + BEAT_SLACK
                if now >= until:
                    return
                self._wake.wait(until - now)
                continue
            if not self.following():
                self._wake.wait(min(0.5, deadline - now))
                continue
            if now < next_look:
                self._wake.wait(min(next_look, deadline) - now)
                continue
            if self._send_guarded(True):
                stop.wait(self.coalesce)
            next_look = time.monotonic() + self.health_poll
