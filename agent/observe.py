"""What the running agent is doing, for `agent status` and the metrics endpoint.

Components report through narrow calls on an `Observer`; the base class does nothing, so a
component built without one (plan, doctor, unit tests) reports nowhere. The `Publisher`
keeps the latest of everything plus the counters the metrics endpoint exposes, and writes
a JSON snapshot to the run dir (agent/statusview.py reads it): atomically replaced, on
change but at most about once a second, and at least every REFRESH seconds so that a
reader can tell a live agent from a file left behind.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from agent.fsutil import atomic_write
from agent.host.podman import Podman
from agent.host.run import Result
from agent.statusview import REFRESH

if TYPE_CHECKING:
    from agent.drift import Change, ContainerInfo
    from agent.model import ExpectedState
    from agent.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

#: At most one write of the status file per this many seconds.
WRITE_INTERVAL = 1.0
#: WireGuard handshakes are read this rarely (a `wg` process each time).
WIREGUARD_INTERVAL = 30.0
#: Compound podman commands whose second word says what they do.
PODMAN_GROUPS = frozenset({"container", "image", "network", "volume", "system"})


class Observer:
    """The calls components make; each does nothing here (see Publisher)."""

    def poll(self, error: BaseException | None, expected: ExpectedState | None = None) -> None:
        """An expected-state poll ended: `error` None when it succeeded."""

    def plan(self, changes: Sequence[Change], held: Sequence[Change], syncs: Iterable[str]) -> None:
        """The reconciler planned `changes` and held `held` back; `syncs` are the config parts it manages."""

    def state(self, state: str) -> None:
        """The reconciler entered IDLE or PROCESSING."""

    def change(self, change: Change, outcome: str, error: BaseException | None = None) -> None:
        """One change was `applied`, `failed`, or held by `backoff`."""

    def report(self, error: BaseException | None) -> None:
        """A status report was sent (error None) or failed."""

    def containers(self, containers: Sequence[ContainerInfo], health: Mapping[str, str]) -> None:
        """The managed containers and their health, as the heartbeat last read them."""

    def work(self, item_id: str, item_type: object, run: Callable[[], T]) -> T:
        """Run one work item (its type as the control plane sent it), shown in flight meanwhile."""
        return run()

    def work_done(self, item_type: object, result: str) -> None:
        """A work item ended with `result` (completed/failed)."""

    def build(self, build_id: str | None, phase: str = "", status: str = "") -> None:
        """A build entered `phase` (`finished` with its status); None: no build any more."""

    def podman_call(self, verb: str, seconds: float, ok: bool) -> None:
        """One podman command ran."""

    def watch_logs(self, shipper: Any) -> None:
        """Log shipping counts are to be read from `shipper` (agent/logship/shipper.py's LogShipper)."""

    def watch_wireguard(self, settings: Settings) -> None:
        """The mesh peers' handshakes are to be read (settings name the interface)."""


def podman_verb(args: Sequence[str]) -> str:
    if not args:
        return "?"
    if args[0] in PODMAN_GROUPS and len(args) > 1:
        return f"{args[0]} {args[1]}"
    return args[0]


class ObservedPodman(Podman):
    """Podman whose every command is counted and timed by verb (for the metrics)."""

    observer: Observer = Observer()

    def _run(self, *args: str, **kwargs: Any) -> Result:  # type: ignore[override]
        started = time.monotonic()
        ok = False
        try:
            result = super()._run(*args, **kwargs)
            ok = True
            return result
        finally:
            self.observer.podman_call(podman_verb(args), time.monotonic() - started, ok)


def type_label(value: object) -> str:
    """A work item's type as a short label (the control plane's value is not trusted)."""
    return value[:64] if isinstance(value, str) else f"<{type(value).__name__}>"


def _describe_error(error: BaseException) -> str:
    return (str(error) or type(error).__name__).splitlines()[0][:300]


class Publisher(Observer):
    """Keeps what the components report; writes it to `path` and feeds the metrics."""

    def __init__(
        self,
        path: Path,
        info: Mapping[str, Any],
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._dirty = True
        self._written_at: float | None = None
        now = clock()
        self._data: dict[str, Any] = {
            **info,
            "pid": os.getpid(),
            "started": now,
            "loop": {"state": "IDLE", "since": now},
            "poll": {},
            "report": {},
            "lastPass": {},
            "held": [],
            "containers": [],
            "work": [],
            "build": None,
            "sync": {},
        }
        self._pass: dict[str, Any] | None = None
        self._pass_started = 0.0
        self._build_started = 0.0
        self._ips: dict[str, str] = {}
        self._in_flight: dict[str, str] = {}
        # Held by the plan (replaced by every plan) and by backoff (for the current pass).
        self._held: list[str] = []
        self._backoff: set[str] = set()
        # Metrics: counters by label values, and summaries as [count, sum].
        self.counts: dict[str, dict[tuple[str, ...], float]] = {}
        self.sums: dict[str, dict[tuple[str, ...], list[float]]] = {}
        self.last_ok_poll = 0.0
        self._logs: Callable[[], dict[str, int]] | None = None
        self._wireguard: Callable[[], list[dict[str, Any]]] | None = None
        self._wireguard_due = 0.0

    # --- what components report ----------------------------------------------------------------

    def poll(self, error: BaseException | None, expected: ExpectedState | None = None) -> None:
        now = self._clock()
        with self._lock:
            poll = self._data["poll"]
            poll.update(ok=error is None, at=now, error="" if error is None else _describe_error(error))
            if error is None:
                poll["lastOk"] = self.last_ok_poll = now
                self._count("polls", ("ok",))
            else:
                self._count("polls", ("failed",))
                self._count("poll_failures", (type(error).__name__,))
            if expected is not None:
                self._ips = {c.deployment_id: c.ip_address for c in expected.containers}
            self._changed()

    def plan(self, changes: Sequence[Change], held: Sequence[Change], syncs: Iterable[str]) -> None:
        from agent.drift import CONFIG_KINDS

        pending = {change.kind for change in changes} | {change.kind for change in held}
        with self._lock:
            self._held = [f"{change.describe()} (waiting for a second poll)" for change in held]
            self._backoff &= {change.describe() for change in changes}  # still wanted, still waiting
            self._show_held()
            self._data["sync"] = {name: CONFIG_KINDS[name] not in pending for name in syncs if name in CONFIG_KINDS}
            self._changed()

    def state(self, state: str) -> None:
        now, tick = self._clock(), self._monotonic()
        with self._lock:
            if state == self._data["loop"]["state"]:
                return
            self._data["loop"] = {"state": state, "since": now}
            if state != "IDLE":
                self._pass, self._pass_started = {"applied": [], "failed": []}, tick
            elif self._pass is not None:
                seconds = tick - self._pass_started
                self._data["lastPass"] = {**self._pass, "seconds": seconds, "ended": now}
                self._sum("pass_seconds", (), seconds)
                self._pass = None
            self._changed()

    def change(self, change: Change, outcome: str, error: BaseException | None = None) -> None:
        with self._lock:
            self._count("changes", (change.kind.value, outcome))
            text = change.describe()
            if outcome == "backoff":
                self._backoff.add(text)
                self._show_held()
            elif self._pass is not None:
                self._pass[outcome].append(text if error is None else f"{text}: {_describe_error(error)}")
            self._changed()

    def report(self, error: BaseException | None) -> None:
        with self._lock:
            self._count("reports", ("sent" if error is None else "failed",))
            self._data["report"] = {
                "ok": error is None, "at": self._clock(), "error": "" if error is None else _describe_error(error)
            }
            self._changed()

    def containers(self, containers: Sequence[ContainerInfo], health: Mapping[str, str]) -> None:
        with self._lock:
            shown = [
                {
                    "name": c.name,
                    "id": c.short_id,
                    "deployment": c.deployment_id,
                    "service": c.service_id,
                    "image": c.image,
                    "ip": self._ips.get(c.deployment_id, ""),
                    "state": c.state,
                    "health": health.get(c.id, "none") if c.running else "-",
                }
                for c in sorted(containers, key=lambda c: c.name)
            ]
            if shown != self._data["containers"]:
                self._data["containers"] = shown
                self._changed()

    def work(self, item_id: str, item_type: object, run: Callable[[], T]) -> T:
        with self._lock:
            self._in_flight[item_id] = type_label(item_type)
            self._refresh_work()
        try:
            return run()
        finally:
            with self._lock:
                self._in_flight.pop(item_id, None)
                self._refresh_work()

    def work_done(self, item_type: object, result: str) -> None:
        with self._lock:
            self._count("work_items", (type_label(item_type), result))

    def build(self, build_id: str | None, phase: str = "", status: str = "") -> None:
        now, tick = self._clock(), self._monotonic()
        with self._lock:
            current = self._data["build"]
            if build_id is None:
                self._data["build"] = None
            elif phase == "finished":
                if current is not None:
                    self._sum("builds", (status,), tick - self._build_started)
                self._data["build"] = None
            elif current is None or current.get("id") != build_id:
                self._build_started = tick
                self._data["build"] = {"id": build_id, "phase": phase, "since": now}
            else:
                current["phase"] = phase
            self._changed()

    def podman_call(self, verb: str, seconds: float, ok: bool) -> None:
        with self._lock:
            self._sum("podman", (verb,), seconds)
            if not ok:
                self._count("podman_failures", (verb,))

    # --- pulled at low rate --------------------------------------------------------------------

    def watch_logs(self, shipper: Any) -> None:
        """Log shipping counts, read from the shipper's senders when published or scraped."""
        senders = (shipper.container_sender, shipper.caddy_sender)

        def counts() -> dict[str, int]:
            return {
                "queued": sum(s.pending() for s in senders),
                "shipped": sum(s.stats.delivered for s in senders),
                "dropped": sum(s.stats.dropped for s in senders),
            }

        self._logs = counts

    def watch_wireguard(self, settings: Settings) -> None:
        """The mesh peers' last handshakes, read every WIREGUARD_INTERVAL by the publisher."""
        self._wireguard = lambda: read_handshakes(settings)

    def logs(self) -> dict[str, int] | None:
        return self._logs() if self._logs is not None else None

    # --- publishing ----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            data = json.loads(json.dumps(self._data))
        logs = self.logs()
        if logs is not None:
            data["logs"] = logs
        data["updated"] = self._clock()
        return data

    def metrics(self) -> tuple[dict[str, dict[tuple[str, ...], float]], dict[str, dict[tuple[str, ...], list[float]]], list[dict[str, Any]]]:
        """Copies of the counters, summaries and containers, for one scrape."""
        with self._lock:
            counts = {name: dict(values) for name, values in self.counts.items()}
            sums = {name: {key: list(value) for key, value in values.items()} for name, values in self.sums.items()}
            return counts, sums, list(self._data["containers"])

    def publish(self) -> None:
        """Write the snapshot now (atomically: a reader sees the old file or the new one)."""
        self._read_wireguard()
        with self._lock:
            self._dirty = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(self.snapshot(), sort_keys=True), 0o600)
        self._written_at = self._monotonic()

    def run(self, stop: threading.Event) -> None:
        """Publish on change (at most every WRITE_INTERVAL) and every REFRESH; remove the
        file at the end, so `agent status` says at once that no agent runs."""
        try:
            while not stop.is_set():
                due = self._written_at is None or self._monotonic() - self._written_at >= REFRESH
                if self._dirty or due:
                    try:
                        self.publish()
                    except OSError as exc:
                        log.warning("cannot write the status file %s: %s", self.path, exc)
                        stop.wait(REFRESH)
                stop.wait(WRITE_INTERVAL)
                until = self._monotonic() + REFRESH - WRITE_INTERVAL
                while not stop.is_set() and not self._wake.is_set() and self._monotonic() < until:
                    self._wake.wait(0.5)
                self._wake.clear()
        finally:
            try:
                self.path.unlink()
            except OSError:
                pass

    def _read_wireguard(self) -> None:
        if self._wireguard is None or self._monotonic() < self._wireguard_due:
            return
        self._wireguard_due = self._monotonic() + WIREGUARD_INTERVAL
        try:
            found: dict[str, Any] = {"peers": self._wireguard(), "at": self._clock()}
        except Exception as exc:  # noqa: BLE001 - status shows the error; nothing else depends on it
            found = {"peers": [], "at": self._clock(), "error": _describe_error(exc)}
        with self._lock:
            self._data["wireguard"] = found

    def _show_held(self) -> None:
        backoff = [f"{text} (backoff after a recent failure)" for text in sorted(self._backoff)]
        self._data["held"] = self._held + backoff

    def _refresh_work(self) -> None:
        self._data["work"] = [{"id": item_id, "type": kind} for item_id, kind in self._in_flight.items()]
        self._changed()

    def _changed(self) -> None:
        self._dirty = True
        self._wake.set()

    def _count(self, name: str, labels: tuple[str, ...]) -> None:
        values = self.counts.setdefault(name, {})
        values[labels] = values.get(labels, 0.0) + 1

    def _sum(self, name: str, labels: tuple[str, ...], value: float) -> None:
        entry = self.sums.setdefault(name, {}).setdefault(labels, [0.0, 0.0])
        entry[0] += 1
        entry[1] += value


def read_handshakes(settings: Settings) -> list[dict[str, Any]]:
    """`wg show IF latest-handshakes`: each peer's public key and last handshake (unix
    time, 0 = never). Read-only; in the configured netns like every other `wg` call."""
    from agent.host.run import run

    prefix = ("ip", "netns", "exec", settings.wireguard_netns) if settings.wireguard_netns else ()
    result = run([*prefix, "wg", "show", settings.wireguard_interface, "latest-handshakes"], timeout=5.0)
    peers = []
    for line in result.stdout.splitlines():
        key, _, at = line.partition("\t")
        if key.strip():
            peers.append({"publicKey": key.strip(), "handshake": int(at) if at.strip().isdigit() else 0})
    return peers
