"""The agent's shared `podman ps` of its containers, and how it knows that one is still true.

Listing: the last listing and when it was taken, shared by every Podman adapter of one agent
(reconciler, status report, health runner), so one `ps` per tick serves them all (issue 11).
The adapter keeps it current with the changes it makes itself (`run_container` adds, a removal
drops, anything else invalidates), so a report sent during a pass shows the reconciler's own
view without running podman again. A listing that was taken while the adapter changed
something is not kept (it may predate the change).

StateWatch: at 100 containers a `podman ps` costs ~100 ms of CPU, most of an idle agent's
cost. Podman writes its container database (bolt_state.db, or db.sql and its WAL) on every
change of a container: created, started, exited and cleaned up, restarted, removed, and on each
health check run (an exec session). A `ps` does not write it. So when the database files are as
they were when a listing was taken, that listing is still what `ps` would say, and the idle tick
needs no `ps`. Guards: the listing only counts as verified when the database had been quiet for
QUIET seconds before the `ps` began (a health check writes its result file just after its last
database write); a listing is re-taken at least every RELIST_AFTER seconds whatever the files
say; and when such a re-take finds the containers changed although the files did not, the
watched files are not podman's live database (another static dir, another backend): watching
stops, with one line, and every tick lists again.
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

Stamp = tuple[tuple[str, int, int, int], ...]


class StateWatch:
    """Stat of podman's database files: the same stamp means no container changed."""

    def __init__(self, paths: Sequence[Path], clock: Callable[[], float] = time.time) -> None:
        self.paths = list(paths)
        self._clock = clock

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

    def quiet_before(self, stamp: Stamp, moment: float) -> bool:
        """Whether no database file changed within QUIET seconds before `moment` (epoch)."""
        return all(mtime_ns / 1e9 <= moment - QUIET for _path, mtime_ns, _size, _inode in stamp)


class Listing:
    """The last `podman ps` of our containers (module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._at: float | None = None
        self._containers: list[ContainerInfo] = []
        self._generation = 0
        # The database stamp the listing was verified against (None: not verified).
        self._stamp: Stamp | None = None
        # Set once by the first adapter that watches (its graph root), None: not watching.
        self.watch: StateWatch | None = None
        self.watching = True

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

    def unchanged(self, stamp: Stamp | None) -> list[ContainerInfo] | None:
        """The listing, when it was verified against `stamp` (the database as it is now) at
        most RELIST_AFTER seconds ago: as good as a `ps` taken now."""
        with self._lock:
            if (
                stamp is None or self._stamp != stamp or self._at is None
                or self._clock() - self._at > RELIST_AFTER
            ):
                return None
            return list(self._containers)

    def begin(self) -> int:
        """Call before listing; pass the result to `put`."""
        with self._lock:
            return self._generation

    def put(self, containers: Sequence[ContainerInfo], generation: int, stamp: Stamp | None = None) -> None:
        """Keep a listing taken since `begin`; `stamp`: the database stamp it is verified against."""
        with self._lock:
            if generation != self._generation:
                return
            missed = (
                stamp is not None and stamp == self._stamp and self._at is not None
                and _signature(containers) != _signature(self._containers)
            )
            self._containers, self._at = list(containers), self._clock()
            self._stamp = None if missed else stamp
        if missed:
            self.watching = False
            watched = ", ".join(str(p) for p in self.watch.paths) if self.watch else "?"
            log.warning(
                "containers changed while podman's database files (%s) did not: they are not the live "
                "database; listing containers every tick from now on", watched,
            )

    def add(self, container: ContainerInfo) -> None:
        with self._lock:
            self._generation += 1
            self._stamp = None
            self._containers = [c for c in self._containers if c.id != container.id and c.name != container.name]
            self._containers.append(container)

    def drop(self, ref: str) -> None:
        with self._lock:
            self._generation += 1
            self._stamp = None
            self._containers = [c for c in self._containers if ref not in (c.id, c.name) and not c.id.startswith(ref)]

    def invalidate(self) -> None:
        with self._lock:
            self._generation += 1
            self._stamp = None
            self._at = None


def _signature(containers: Sequence[ContainerInfo]) -> set[tuple[str, str, str, int]]:
    """What a database change would alter in a listing (not podman's "Up 3 minutes" text)."""
    return {(c.id, c.state, c.health, c.started_at) for c in containers}
