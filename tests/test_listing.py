"""The shared listing and its watch on podman's database (agent/host/listing.py): a listing
verified against a database that stayed the same serves without a `ps`; any change, our own
or not, a database that was not quiet, a listing that shows health, a dead process or
RELIST_AFTER bring the `ps` back; a change the watched files missed stops the watching."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from agent.drift import LABEL_DEPLOYMENT_ID, LABEL_SERVICE_ID, ContainerInfo
from agent.host.listing import QUIET, RELIST_AFTER, SUSPECT_FOR, Listing, StateWatch
from agent.host.podman import Podman, PodmanOptions

SCOPE = "techulus.test.scope=unit"
PS = ["podman", "ps", "--all", "--filter", "label=techulus.service.id", "--filter", f"label={SCOPE}", "--format", "json"]
INFO = ["podman", "info", "--format", "{{.Store.GraphRoot}}"]


def ps_json(*states: str, health: str = "", pid: int = 0) -> str:
    return json.dumps([
        {"Id": f"{n:064x}", "Names": [f"c{n}"], "State": state, "StartedAt": 1000 + n, "Pid": pid,
         "Status": "Up 5 seconds" + (f" ({health})" if health else ""),
         "Labels": {LABEL_SERVICE_ID: "s", LABEL_DEPLOYMENT_ID: f"d{n}", SCOPE.split("=")[0]: "unit"}}
        for n, state in enumerate(states, start=1)
    ])


def database(root: Path) -> Path:
    db = root / "libpod" / "bolt_state.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_bytes(b"bolt")
    return db


class Watched:
    """A watching adapter on a test clock, over a database file in a temp dir."""

    def __init__(self, root: Path, fp: Any) -> None:
        fp.register(INFO, stdout=f"{root}\n")
        self.fp = fp
        self.clock = [0.0]
        self.db = database(root)
        self.podman = Podman(PodmanOptions(scope_label=SCOPE, run_dir=root / "run", watch_state=True))
        self.podman.listing = Listing(clock=lambda: self.clock[0])

    def ps(self, stdout: str, count: int = 1) -> None:
        for _ in range(count):
            self.fp.register(PS, stdout=stdout)

    @property
    def calls(self) -> int:
        return self.fp.call_count(PS)

    def settle(self, stdout: str) -> None:
        """List until the listing is verified (the database quiet for QUIET seconds)."""
        self.ps(stdout, 2)
        self.podman.list_containers()
        self.clock[0] += QUIET
        self.podman.list_containers()


@pytest.fixture
def watched(tmp_path: Path, fp: Any) -> Watched:
    return Watched(tmp_path, fp)


def test_stamp_follows_the_database_files(tmp_path: Path) -> None:
    watch = StateWatch.under(tmp_path)
    assert watch.stamp() is None, "no database: nothing can be verified"
    db = database(tmp_path)
    first = watch.stamp()
    assert first is not None and watch.stamp() == first
    db.write_bytes(b"bolt2")
    assert watch.stamp() != first
    second = watch.stamp()
    (tmp_path / "db.sql-wal").write_bytes(b"wal")
    assert watch.stamp() != second, "SQLite's write-ahead log counts too"


def test_a_quiet_unchanged_database_spares_the_ps(watched: Watched) -> None:
    watched.ps(ps_json("running"))
    watched.podman.list_containers()
    watched.ps(ps_json("running"))
    watched.podman.list_containers()
    assert watched.calls == 2, "the stamp was first seen just now: not quiet yet"
    watched.clock[0] += QUIET
    watched.ps(ps_json("running"))
    first = watched.podman.list_containers()
    assert watched.podman.list_containers() == first and watched.podman.list_containers_aged() == (first, 0.0)
    assert watched.calls == 3 and watched.fp.call_count(INFO) == 1
    watched.db.write_bytes(b"changed")  # a container exited: podman wrote its database
    watched.ps(ps_json("exited"), 2)
    assert [c.state for c in watched.podman.list_containers()] == ["exited"]
    watched.podman.list_containers()
    assert watched.calls == 5, "the new stamp is not quiet yet"


def test_our_own_changes_and_time_bring_the_ps_back(watched: Watched) -> None:
    watched.settle(ps_json("running"))
    before = watched.calls
    watched.podman.list_containers()
    assert watched.calls == before
    watched.db.write_bytes(b"removed")  # the adapter removed it: podman wrote its database
    watched.podman.listing.drop("c1")
    watched.ps(ps_json())
    watched.podman.list_containers()
    assert watched.calls == before + 1
    watched.clock[0] += QUIET
    watched.ps(ps_json())
    watched.podman.list_containers()
    watched.podman.list_containers()
    assert watched.calls == before + 2
    watched.clock[0] += RELIST_AFTER + 1
    watched.ps(ps_json())
    watched.podman.list_containers()
    assert watched.calls == before + 3, "re-taken after RELIST_AFTER whatever the files say"
    assert watched.podman.listing.watching


def test_a_listing_that_shows_health_is_never_served(watched: Watched) -> None:
    """podman >= 5.4 writes a check's result only to its own file."""
    watched.settle(ps_json("running", health="starting"))
    watched.ps(ps_json("running", health="healthy"))
    assert [c.health for c in watched.podman.list_containers()] == ["healthy"]
    assert watched.calls == 3


def test_a_dead_process_brings_the_ps_back(watched: Watched) -> None:
    """Before podman's cleanup writes the database, `ps` already says exited."""
    watched.settle(ps_json("running", pid=os.getpid()))
    watched.podman.list_containers()
    assert watched.calls == 2
    dead = 4_194_304 + 1  # above any pid_max: no such process
    watched.ps(ps_json("running", pid=dead), 2)
    watched.clock[0] += RELIST_AFTER + 1
    watched.podman.list_containers()
    watched.clock[0] += QUIET
    watched.podman.list_containers()
    assert watched.calls == 4
    watched.ps(ps_json("exited"))
    assert [c.state for c in watched.podman.list_containers()] == ["exited"], "its process is gone: listed again"


def test_a_change_the_files_missed_stops_the_watching(watched: Watched, caplog: pytest.LogCaptureFixture) -> None:
    watched.settle(ps_json("running"))
    watched.podman.listing.invalidate()  # the agent changed it; the watched file did not move
    watched.ps(ps_json("exited"))
    with caplog.at_level(logging.WARNING):
        assert [c.state for c in watched.podman.list_containers()] == ["exited"]
        watched.clock[0] += QUIET
        watched.ps(ps_json("exited"))
        watched.podman.list_containers()
        assert watched.calls == 4, "suspect: nothing is verified while the stamp stays"
        assert watched.podman.listing.watching, "a dying container's cleanup may be late"
        watched.clock[0] += SUSPECT_FOR
        watched.ps(ps_json("exited"), 2)
        watched.podman.list_containers()
        watched.podman.list_containers()
    assert "not its live database" in caplog.text and not watched.podman.listing.watching
    assert watched.calls == 6, "every call lists from now on"
    assert caplog.text.count("not its live database") == 1


def test_a_late_cleanup_clears_the_suspicion(watched: Watched) -> None:
    """A process died; ps says exited at once, podman's cleanup writes the database later."""
    watched.settle(ps_json("running", pid=os.getpid()))
    watched.podman.listing.invalidate()
    watched.ps(ps_json("exited"))
    watched.podman.list_containers()
    watched.db.write_bytes(b"cleaned up")
    watched.clock[0] += SUSPECT_FOR
    watched.ps(ps_json("exited"), 2)
    watched.podman.list_containers()
    watched.clock[0] += QUIET
    watched.podman.list_containers()
    assert watched.podman.listing.watching
    before = watched.calls
    watched.podman.list_containers()
    assert watched.calls == before, "verified again"


def test_no_database_or_no_graph_root_means_a_ps_every_time(tmp_path: Path, fp: Any) -> None:
    fp.register(INFO, stdout=f"{tmp_path / 'elsewhere'}\n")
    podman = Podman(PodmanOptions(scope_label=SCOPE, run_dir=tmp_path / "run", watch_state=True))
    for _ in range(2):
        fp.register(PS, stdout=ps_json("running"))
        podman.list_containers()
        time.sleep(0.01)
    assert fp.call_count(PS) == 2
    fp.register(["podman", "info", fp.any()], returncode=125, stderr="Error: boom\n")
    other = Podman(PodmanOptions(scope_label=SCOPE, run_dir=tmp_path / "run", watch_state=True))
    for _ in range(2):
        fp.register(PS, stdout=ps_json("running"))
        other.list_containers()
    assert fp.call_count(PS) == 4 and not other.listing.watching


def test_a_listing_keeps_what_the_adapter_added() -> None:
    clock = [0.0]
    listing = Listing(clock=lambda: clock[0])
    stamp = (("db", 1, 1, 1),)
    listing.put([], listing.begin(), stamp=stamp, verify=True)
    assert listing.unchanged(stamp) == []
    listing.add(ContainerInfo("a" * 64, "new", "img", "running"))
    assert listing.unchanged(stamp) is None, "our own change: the next call lists"
    assert [c.name for c in listing.get(10) or []] == ["new"]


def test_an_older_listing_never_replaces_a_newer_one() -> None:
    clock = [10.0]
    listing = Listing(clock=lambda: clock[0])
    newer = [ContainerInfo("b" * 64, "b", "img", "exited")]
    listing.put(newer, listing.begin(), began=5.0)
    listing.put([ContainerInfo("b" * 64, "b", "img", "running")], listing.begin(), began=4.0)
    assert listing.get(10) == newer
