"""The agent's shared `podman ps` of its containers, and how it knows that one is still true.

Listing: the last listing and when it was taken, shared by every Podman adapter of one agent
(reconciler, status report, health runner), so one `ps` per tick serves them all (issue 11).
The adapter keeps it current with the changes it makes itself (`run_container` adds, a removal
drops, anything else invalidates), so a report sent during a pass shows the reconciler's own
view without running podman again. A listing that was taken while the adapter changed
something is not kept (it may predate the change).

StateWatch: at 100 containers a `podman ps` costs ~100 ms of CPU, most of an idle agent's
cost. Podman writes its container database (bolt_state.db, or db.sql and its WAL) on every
change of a container: created, started, exited and cleaned up, restarted, removed (and, before
podman 5.4, on each health check run). A `ps` does not write it. So when the database files are
as they were when a listing was taken, that listing is still what `ps` would say, and the idle
tick needs no `ps`. Guards, each against a way the files could fail to tell:
* health: podman 5.4 and later keep a check's result only in its own log file, so a listing
  that shows any container's health is never served again (hosts with health checks list
  every tick, as before);
* a process that died before podman's cleanup wrote the database: a served listing needs every
  running container's process (its `Pid`) alive;
* a result file written just after a database write, coarse file times, clock steps: a
  listing is verified only when the same stamp was seen QUIET seconds before its `ps` (on the
  monotonic clock) and again right after it;
* not the live database (another static dir, a transient store, a file left behind): when a
  `ps` (after one of the agent's own changes, or the re-take at least every RELIST_AFTER
  seconds) finds containers other than the last verified listing's while the stamp is still
  that listing's, nothing is verified until the stamp moves; if it has not moved SUSPECT_FOR
  seconds later, watching stops, with one line, and every call lists again.
Of two listings taken at once by two threads, the one whose `ps` began last is kept.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.drift import ContainerInfo

log = logging.getLogger(__name__)

#: The database files podman may keep under its graph root (BoltDB before 5, SQLite since).
DATABASE_FILES = ("libpod/bolt_state.db", "db.sql", "db.sql-wal")
#: Seconds the database must have been unchanged before a `ps` for that listing to be verified.
QUIET = 1.0
#: A verified listing is taken again after this long anyway.
RELIST_AFTER = 60.0
#: Containers changed while the stamp did not: if it still has not moved this much later,
#: the files are not the live database (a process that died moves it once podman cleans up).
SUSPECT_FOR = 10.0

Stamp = tuple[tuple[str, int, int, int], ...]


class StateWatch:
    """Stat of podman's database files: the same stamp means no container changed."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    @classmethod
    def under(cls, graph_root: Path) -> StateWatch:
        return cls([graph_root / name for name in DATABASE_FILES])

    def stamp(self) -> Stamp | None:
        """(path, mtime ns, size, inode) of each database file that exists; None when none
        does or one cannot be read (then nothing is verified)."""
        found = []
        for path in self.paths:
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue
            except OSError:
                return None
            found.append((str(path), stat.st_mtime_ns, stat.st_size, stat.st_ino))
        return tuple(found) or None


class Listing:
    """The last `podman ps` of our containers (module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._at: float | None = None
        self._containers: list[ContainerInfo] = []
        self._generation = 0
        # When the `ps` of the kept listing began: an older one never replaces it.
        self._began = float("-inf")
        # The database stamp the listing was verified against (None: not verified).
        self._stamp: Stamp | None = None
        # The stamp last seen, and since when (monotonic): quiet once it is QUIET old.
        self._seen: tuple[Stamp | None, float] | None = None
        # The stamp and containers of the last verified listing; kept across our own changes
        # (podman writes its database for those too, so they move the stamp).
        self._verified: tuple[Stamp, frozenset[tuple[str, str, str, int]]] | None = None
        # (stamp, since): containers changed while the stamp did not; cleared when it moves.
        self._suspect: tuple[Stamp, float] | None = None
        # Set once by the first adapter that watches (its graph root), None: not watching.
        self.watch: StateWatch | None = None
        self.watching = True

    def now(self) -> float:
        return self._clock()

    def get(self, max_age: float) -> list[ContainerInfo] | None:
        """The listing, when it is at most `max_age` seconds old; else None."""
        aged = self.get_aged(max_age)
        return None if aged is None else aged[0]

    def get_aged(self, max_age: float) -> tuple[list[ContainerInfo], float] | None:
        """The listing and its age, when it is at most `max_age` seconds old; else None."""
        with self._lock:
            age = None if self._at is None else self._clock() - self._at
            if age is None or age > max_age:
                return None
            return list(self._containers), age

    def see(self, stamp: Stamp | None) -> None:
        """Note the database stamp as it is now (before each listing or use of one)."""
        dead = False
        with self._lock:
            if self._seen is None or self._seen[0] != stamp:
                self._seen = (stamp, self._clock())
            if self._suspect is not None:
                if self._suspect[0] != stamp:
                    self._suspect = None  # podman wrote it after all (its cleanup came later)
                else:
                    dead = self._clock() - self._suspect[1] >= SUSPECT_FOR
        if dead:
            self._stop_watching("containers changed while they did not")

    def quiet(self, stamp: Stamp | None) -> bool:
        """Whether `stamp` has been the database's for at least QUIET seconds."""
        with self._lock:
            return (
                stamp is not None and self._seen is not None and self._seen[0] == stamp
                and self._clock() - self._seen[1] >= QUIET
            )

    def unchanged(self, stamp: Stamp | None) -> list[ContainerInfo] | None:
        """The listing, when it was verified against `stamp` (the database as it is now) at
        most RELIST_AFTER seconds ago and every running container's process still lives:
        as good as a `ps` taken now."""
        with self._lock:
            if (
                stamp is None or self._stamp != stamp or self._at is None
                or self._clock() - self._at > RELIST_AFTER
            ):
                return None
            containers = list(self._containers)
        if not all(_alive(c.pid) for c in containers if c.running and c.pid):
            return None  # it died; podman's cleanup has not written the database yet
        return containers

    def begin(self) -> int:
        """Call before listing; pass the result to `put`."""
        with self._lock:
            return self._generation

    def put(
        self, containers: Sequence[ContainerInfo], generation: int, began: float | None = None,
        stamp: Stamp | None = None, verify: bool = False,
    ) -> None:
        """Keep a listing whose `ps` began at `began` (the listing's clock) since `begin`.
        `stamp`: the database stamp, the same before and after the `ps` (else None); `verify`:
        that stamp had been quiet before the `ps`, so the listing may serve while it holds."""
        began = self._clock() if began is None else began
        signature = _signature(containers)
        with self._lock:
            if generation != self._generation or began < self._began:
                return
            if stamp is not None and self._verified is not None and self._suspect is None and (
                self._verified[0] == stamp and self._verified[1] != signature
            ):
                self._suspect = (stamp, self._clock())
            self._containers, self._at, self._began = list(containers), self._clock(), began
            # A listing that shows health is never served again: podman >= 5.4 writes health
            # results only to each container's own file, not to the database.
            trusted = (
                stamp is not None and verify and self._suspect is None and not any(c.health for c in containers)
            )
            self._stamp = stamp if trusted else None
            if trusted:
                assert stamp is not None
                self._verified = (stamp, signature)

    def _stop_watching(self, why: str) -> None:
        if not self.watching:
            return
        self.watching = False
        watched = ", ".join(str(p) for p in self.watch.paths) if self.watch else "?"
        log.warning(
            "%s: podman's database files (%s) are not its live database; listing containers every "
            "tick from now on", why, watched,
        )

    def _changed(self) -> None:
        """Under the lock: the agent changes or changed a container: the listing is not verified."""
        self._generation += 1
        self._stamp = None

    def add(self, container: ContainerInfo) -> None:
        with self._lock:
            self._changed()
            self._containers = [c for c in self._containers if c.id != container.id and c.name != container.name]
            self._containers.append(container)

    def drop(self, ref: str) -> None:
        with self._lock:
            self._changed()
            self._containers = [c for c in self._containers if ref not in (c.id, c.name) and not c.id.startswith(ref)]

    def invalidate(self) -> None:
        """Forget the listing: a change is under way (its `ps` would predate it)."""
        with self._lock:
            self._changed()
            self._at = None


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _signature(containers: Sequence[ContainerInfo]) -> frozenset[tuple[str, str, str, int]]:
    """What a database change would alter in a listing (not podman's "Up 3 minutes" text)."""
    return frozenset((c.id, c.state, c.health, c.started_at) for c in containers)
