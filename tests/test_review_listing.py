"""Review of the watch on podman's database that spares the idle `podman ps` (issue 11,
agent/host/listing.py): cases where the watch served a listing that was not what `ps` would
say now (each a defect the review found, fixed since), and cases checked that hold.

The podman source relied on (containers/podman):
- libpod/healthcheck.go (5.x): `runHealthCheck` runs the check through `healthCheckExec`
  (PR #25003, podman 5.4: "Run HealthCheck without saving the ExecSession to the database",
  writes to the database reduced to zero) and records the result with `updateHealthCheckLog`
  in the file `healthcheck.log`; `healthCheckStatus` (what `ps` shows as "(healthy)") reads
  that file. Before 5.4 the check ran through `exec`, whose ExecCreate/ExecRemove save the
  container (database writes), the log file still being written after the last of them.
- libpod/runtime.go `getDBState`: bolt_state.db lives in the engine's static_dir (any path
  containers.conf names; graphroot/libpod only by default), or in its tmp dir with a
  transient store; `NewSqliteState` keeps db.sql elsewhere with a transient store too.
- libpod/sqlite_state.go: WAL mode (`PRAGMA journal_mode = WAL`): commits append to db.sql-wal,
  checkpoints write db.sql, the WAL is reset or removed when the last connection closes.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest

from agent.drift import LABEL_DEPLOYMENT_ID, LABEL_SERVICE_ID
from agent.heartbeat import Heartbeat
from agent.host import listing as listing_module
from agent.host import podman as podman_module
from agent.host.listing import QUIET, RELIST_AFTER, SUSPECT_FOR, Listing, StateWatch
from agent.host.podman import Podman, PodmanOptions

SCOPE = "techulus.test.scope=review12"
PS = ["podman", "ps", "--all", "--filter", "label=techulus.service.id", "--filter", f"label={SCOPE}", "--format", "json"]
INFO = ["podman", "info", "--format", "{{.Store.GraphRoot}}"]
CID = f"{1:064x}"


def ps_json(state: str = "running", health: str = "", started_at: int = 1001, pid: int = 0) -> str:
    status = "Up 5 seconds" + (f" ({health})" if health else "") if state == "running" else "Exited (1) 1 second ago"
    return json.dumps([{
        "Id": CID, "Names": ["c1"], "State": state, "Status": status, "StartedAt": started_at, "Pid": pid,
        "Labels": {LABEL_SERVICE_ID: "s", LABEL_DEPLOYMENT_ID: "d1", SCOPE.split("=")[0]: "review12"},
    }])


def write_db(path: Path, data: bytes = b"bolt", age: float = 10.0) -> Path:
    """A database file last written `age` seconds ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def watched_podman(root: Path, fp: Any, clock: list[float] | None = None) -> Podman:
    fp.register(INFO, stdout=f"{root}\n")
    podman = Podman(PodmanOptions(scope_label=SCOPE, run_dir=root / "run", watch_state=True))
    if clock is not None:
        podman.listing = Listing(clock=lambda: clock[0])
    return podman


def health_of(podman: Podman) -> list[tuple[str, str]]:
    return [(c.state, c.health) for c in podman.list_containers()]


# --- defects the review found (all fixed: each test first gets a verified listing) ----------

DEAD_PID = 4_194_304 + 1  # above any pid_max: no such process


def settle(podman: Podman, fp: Any, clock: list[float], stdout: str) -> None:
    """List until the listing is verified: the stamp seen, QUIET later seen again."""
    for _ in range(2):
        fp.register(PS, stdout=stdout)
    podman.list_containers()
    clock[0] += QUIET
    podman.list_containers()


def test_a_health_change_without_a_database_write_is_listed(tmp_path: Path, fp: Any) -> None:
    """podman >= 5.4 (PR #25003): a check's result is only in healthcheck.log."""
    clock = [0.0]
    write_db(tmp_path / "libpod" / "bolt_state.db")
    podman = watched_podman(tmp_path, fp, clock)
    settle(podman, fp, clock, ps_json(health="healthy"))
    fp.register(PS, stdout=ps_json(health="unhealthy"))  # the check failed: only healthcheck.log changed
    assert health_of(podman) == [("running", "unhealthy")]


def test_the_heartbeat_sees_a_passed_health_check_within_seconds(tmp_path: Path, fp: Any) -> None:
    clock = [0.0]
    write_db(tmp_path / "libpod" / "bolt_state.db")
    podman = watched_podman(tmp_path, fp, clock)
    reports: list[dict[str, Any]] = []
    heartbeat = Heartbeat(reports.append, podman, interval=10, clock=lambda: clock[0])
    inspect = ["podman", "container", "inspect", fp.any()]
    settle(podman, fp, clock, ps_json(health="starting"))
    fp.register(PS, stdout=ps_json(health="starting"))
    fp.register(inspect, stdout=f"{CID} c1 running 0 check starting\n")
    heartbeat.send_once()
    assert reports[-1]["containers"][0]["healthStatus"] == "starting"
    # The first check passed: podman wrote healthcheck.log, not its database.
    fp.register(PS, stdout=ps_json(health="healthy"), occurrences=20)
    fp.register(inspect, stdout=f"{CID} c1 running 0 check healthy\n", occurrences=20)
    for _ in range(10):  # the looks of a rollout that follows this container, 0.5 s apart
        clock[0] += 0.5
        heartbeat.send_once(only_if_changed=True)
    assert reports[-1]["containers"][0]["healthStatus"] == "healthy"


def test_a_leftover_database_under_the_graph_root_does_not_hide_an_exit(
    tmp_path: Path, fp: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The live database is elsewhere (static_dir): the exit shows as a dead process."""
    clock = [0.0]
    alive = {4242}
    monkeypatch.setattr(listing_module, "_alive", lambda pid: pid in alive)
    write_db(tmp_path / "libpod" / "bolt_state.db", age=86400)  # left from before static_dir moved
    live = write_db(tmp_path / "elsewhere" / "bolt_state.db")  # where podman writes now
    podman = watched_podman(tmp_path, fp, clock)
    settle(podman, fp, clock, ps_json(pid=4242))
    assert health_of(podman) == [("running", "")] and fp.call_count(PS) == 2, "served without a ps"
    alive.clear()  # it exited
    write_db(live, b"exited", age=5)  # podman's cleanup wrote the live database, not the watched file
    fp.register(PS, stdout=ps_json("exited"))
    assert health_of(podman) == [("exited", "")]


def test_a_missed_change_stops_the_watching_even_after_an_own_change(tmp_path: Path, fp: Any) -> None:
    clock = [0.0]
    write_db(tmp_path / "libpod" / "bolt_state.db", age=86400)  # not podman's live database
    podman = watched_podman(tmp_path, fp, clock)
    settle(podman, fp, clock, ps_json())
    clock[0] += 30
    podman.listing.invalidate()  # the reconciler changed another container meanwhile
    fp.register(PS, stdout=ps_json("exited"))  # c1 exited; the watched file did not change
    assert health_of(podman) == [("exited", "")]
    clock[0] += SUSPECT_FOR
    fp.register(PS, stdout=ps_json("exited"))
    podman.list_containers()
    assert not podman.listing.watching, "containers changed while the watched files did not"


def test_a_coarse_mtime_does_not_make_a_fresh_write_look_quiet(tmp_path: Path, fp: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    begins = math.floor(time.time()) + 0.05  # the ps begins 0.1 s after the exec session's last write
    db = write_db(tmp_path / "libpod" / "bolt_state.db")
    recorded = math.floor(begins - 0.1)  # which a 1 s filesystem records as a whole second
    os.utime(db, ns=(recorded * 10**9, recorded * 10**9))
    monkeypatch.setattr(podman_module, "time", types.SimpleNamespace(time=lambda: begins, monotonic=time.monotonic, sleep=time.sleep))
    podman = watched_podman(tmp_path, fp)
    fp.register(PS, stdout=ps_json(health="starting"))
    assert health_of(podman) == [("running", "starting")]
    fp.register(PS, stdout=ps_json(health="healthy"))  # healthcheck.log written right after the ps
    assert health_of(podman) == [("running", "healthy")]


def test_a_clock_step_forward_does_not_make_a_fresh_write_look_quiet(tmp_path: Path, fp: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    write_db(tmp_path / "libpod" / "bolt_state.db", age=0.0)  # written just now
    stepped = time.time() + 3600
    monkeypatch.setattr(podman_module, "time", types.SimpleNamespace(time=lambda: stepped, monotonic=time.monotonic, sleep=time.sleep))
    podman = watched_podman(tmp_path, fp)
    fp.register(PS, stdout=ps_json())
    assert health_of(podman) == [("running", "")]
    fp.register(PS, stdout=ps_json("exited"))
    assert health_of(podman) == [("exited", "")]


def test_an_exit_before_podmans_cleanup_is_listed(tmp_path: Path, fp: Any) -> None:
    """The process died; the database says running until conmon's cleanup writes it."""
    clock = [0.0]
    write_db(tmp_path / "libpod" / "bolt_state.db")
    podman = watched_podman(tmp_path, fp, clock)
    settle(podman, fp, clock, ps_json(pid=DEAD_PID))  # verified, then its process died
    fp.register(PS, stdout=ps_json("exited"))  # conmon wrote exits/<id>; the database is untouched yet
    assert health_of(podman) == [("exited", "")]
    assert podman.listing.watching, "a late cleanup is no reason to stop watching"


def test_two_listings_straddling_a_database_write_do_not_stop_the_watching(tmp_path: Path, fp: Any) -> None:
    clock = [0.0]
    db = write_db(tmp_path / "libpod" / "bolt_state.db")
    podman = watched_podman(tmp_path, fp, clock)
    settle(podman, fp, clock, ps_json("running"))
    podman.listing.invalidate()  # the next call lists
    seen: list[list[tuple[str, str]]] = []

    def other_thread_lists(process: Any) -> None:
        # The heartbeat's list, begun while the reconciler's ps (this one) is under way: its
        # stamp is taken before the container exits, its ps after.
        seen.append([(c.state, c.health) for c in podman.list_containers()])

    def container_exits(process: Any) -> None:
        write_db(db, b"exited", age=0.0)

    fp.register(PS, stdout=ps_json("running"), callback=other_thread_lists)
    fp.register(PS, stdout=ps_json("exited"), callback=container_exits)
    podman.list_containers()
    assert seen == [[("exited", "")]]
    clock[0] += SUSPECT_FOR
    fp.register(PS, stdout=ps_json("exited"))
    podman.list_containers()
    assert podman.listing.watching, "the files did change: podman's database is live"


def test_an_older_listing_does_not_replace_a_newer_one(tmp_path: Path, fp: Any) -> None:
    db = write_db(tmp_path / "libpod" / "bolt_state.db")
    podman = watched_podman(tmp_path, fp)

    def other_thread_lists(process: Any) -> None:
        write_db(db, b"exited", age=0.0)
        podman.list_containers()

    fp.register(PS, stdout=ps_json("running"), callback=other_thread_lists)
    fp.register(PS, stdout=ps_json("exited"))
    podman.list_containers()
    assert [c.state for c in podman.listing.get(10) or []] == ["exited"]


# --- cases that hold --------------------------------------------------------------------------


def test_a_health_check_that_writes_the_database_just_before_the_ps_is_not_trusted(tmp_path: Path, fp: Any) -> None:
    """podman < 5.4: the check's exec session is saved and removed (database writes), its result
    file written just after; a ps within QUIET of that write is not verified, so the next call
    lists again and sees the result."""
    db = write_db(tmp_path / "libpod" / "bolt_state.db")
    podman = watched_podman(tmp_path, fp)
    fp.register(PS, stdout=ps_json(health="starting"))
    assert health_of(podman) == [("running", "starting")]
    write_db(db, b"exec session removed", age=0.0)
    fp.register(PS, stdout=ps_json(health="starting"))  # taken before healthcheck.log was written
    assert health_of(podman) == [("running", "starting")]
    fp.register(PS, stdout=ps_json(health="healthy"))
    assert health_of(podman) == [("running", "healthy")]
    assert fp.call_count(PS) == 3


def test_removed_database_files_verify_nothing(tmp_path: Path, fp: Any) -> None:
    """`podman system reset` removes the static dir: no stamp, a ps every call."""
    db = write_db(tmp_path / "libpod" / "bolt_state.db")
    podman = watched_podman(tmp_path, fp)
    fp.register(PS, stdout=ps_json())
    podman.list_containers()
    db.unlink()
    for _ in range(2):
        fp.register(PS, stdout="[]")
        assert podman.list_containers() == []
    assert fp.call_count(PS) == 3


def test_a_file_replaced_by_rename_with_the_same_mtime_and_size_changes_the_stamp(tmp_path: Path) -> None:
    """A restore that keeps mtime and size (cp -p, rsync -a) still makes a new inode."""
    db = write_db(tmp_path / "libpod" / "bolt_state.db", b"same")
    watch = StateWatch.under(tmp_path)
    before = watch.stamp()
    keep = db.parent / "keep"  # holds the old inode so the new file cannot reuse its number
    os.link(db, keep)
    replacement = write_db(db.parent / "restored", b"same")
    stat = os.stat(db)
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, db)
    assert watch.stamp() != before


def test_a_wal_reset_or_removal_changes_the_stamp(tmp_path: Path) -> None:
    """After a checkpoint SQLite rewrites the WAL from its start (same size, new mtime) or, at
    the last connection's close, removes it: either changes the stamp."""
    write_db(tmp_path / "db.sql", b"pages")
    wal = write_db(tmp_path / "db.sql-wal", b"frame1")
    watch = StateWatch.under(tmp_path)
    before = watch.stamp()
    write_db(wal, b"frame2", age=5.0)
    after_reset = watch.stamp()
    assert after_reset != before
    wal.unlink()
    assert watch.stamp() not in (before, after_reset, None)


def test_a_clock_stepped_backwards_only_costs_a_ps(tmp_path: Path, fp: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database's mtime lies in the future of a clock stepped back: never quiet, so never
    verified (a ps every call, no stale listing)."""
    write_db(tmp_path / "libpod" / "bolt_state.db", age=0.0)
    stepped = time.time() - 3600
    monkeypatch.setattr(podman_module, "time", types.SimpleNamespace(time=lambda: stepped, monotonic=time.monotonic, sleep=time.sleep))
    podman = watched_podman(tmp_path, fp)
    for health in ("starting", "healthy"):
        fp.register(PS, stdout=ps_json(health=health))
        assert health_of(podman) == [("running", health)]


def test_a_database_write_during_the_ps_is_seen_by_the_next_call(tmp_path: Path, fp: Any) -> None:
    """The stamp is taken before the ps: a change that lands during it (restart policy, OOM
    cleanup, a `podman rm` by root) leaves the listing verified against the older stamp, which
    no longer matches."""
    db = write_db(tmp_path / "libpod" / "bolt_state.db")
    podman = watched_podman(tmp_path, fp)

    def restarted(process: Any) -> None:
        write_db(db, b"restarted", age=5.0)

    fp.register(PS, stdout=ps_json(started_at=1001), callback=restarted)
    podman.list_containers()
    fp.register(PS, stdout=ps_json(started_at=2002))
    assert [c.started_at for c in podman.list_containers()] == [2002]


def test_a_listing_taken_across_an_own_change_is_not_verified() -> None:
    """Threads: the health runner's ps begun before the reconciler's removal is dropped."""
    listing = Listing()
    stamp = (("db", 1, 1, 1),)
    generation = listing.begin()
    done = threading.Event()

    def reconciler() -> None:
        listing.drop("c1")
        done.set()

    threading.Thread(target=reconciler).start()
    assert done.wait(5)
    listing.put([], generation, stamp)
    assert listing.unchanged(stamp) is None


def test_relist_after_bounds_every_stale_view(tmp_path: Path, fp: Any) -> None:
    """Whatever the files miss, a listing older than RELIST_AFTER is never served as verified."""
    clock = [0.0]
    write_db(tmp_path / "libpod" / "bolt_state.db")
    podman = watched_podman(tmp_path, fp, clock)
    fp.register(PS, stdout=ps_json(health="healthy"))
    podman.list_containers()
    clock[0] += RELIST_AFTER + QUIET
    fp.register(PS, stdout=ps_json(health="unhealthy"))
    assert health_of(podman) == [("running", "unhealthy")]
