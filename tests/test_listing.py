"""The shared listing and its watch on podman's database (agent/host/listing.py): a listing
verified against an unchanged database serves without a `ps`; any change, our own or not, an
unquiet database, or RELIST_AFTER brings the `ps` back; a change the watched files missed
stops the watching."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from agent.drift import LABEL_DEPLOYMENT_ID, LABEL_SERVICE_ID, ContainerInfo
from agent.host.listing import QUIET, RELIST_AFTER, Listing, StateWatch
from agent.host.podman import Podman, PodmanOptions

SCOPE = "techulus.test.scope=unit"
PS = ["podman", "ps", "--all", "--filter", "label=techulus.service.id", "--filter", f"label={SCOPE}", "--format", "json"]
INFO = ["podman", "info", "--format", "{{.Store.GraphRoot}}"]


def ps_json(*states: str) -> str:
    return json.dumps([
        {"Id": f"{n:064x}", "Names": [f"c{n}"], "State": state, "StartedAt": 1000 + n,
         "Labels": {LABEL_SERVICE_ID: "s", LABEL_DEPLOYMENT_ID: f"d{n}", SCOPE.split("=")[0]: "unit"}}
        for n, state in enumerate(states, start=1)
    ])


def database(root: Path, age: float = 10.0) -> Path:
    db = root / "libpod" / "bolt_state.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_bytes(b"bolt")
    settle(db, age)
    return db


def settle(db: Path, age: float) -> None:
    """The database was last written `age` seconds ago."""
    then = time.time() - age
    os.utime(db, (then, then))


@pytest.fixture
def watched(tmp_path: Path, fp: Any) -> tuple[Podman, Path]:
    fp.register(INFO, stdout=f"{tmp_path}\n")
    options = PodmanOptions(scope_label=SCOPE, run_dir=tmp_path / "run", watch_state=True)
    return Podman(options), database(tmp_path)


def test_stamp_follows_the_database_files(tmp_path: Path) -> None:
    watch = StateWatch.under(tmp_path)
    assert watch.stamp() is None, "no database: nothing can be verified"
    db = database(tmp_path)
    first = watch.stamp()
    assert first is not None and watch.stamp() == first
    assert watch.quiet_before(first, time.time())
    db.write_bytes(b"bolt2")
    second = watch.stamp()
    assert second != first and not watch.quiet_before(second, time.time())
    assert watch.quiet_before(second, time.time() + QUIET + 0.1)
    (tmp_path / "db.sql-wal").write_bytes(b"wal")
    assert watch.stamp() != second, "SQLite's write-ahead log counts too"


def test_an_unchanged_database_spares_the_ps(watched: tuple[Podman, Path], fp: Any) -> None:
    podman, db = watched
    fp.register(PS, stdout=ps_json("running", "running"))
    first = podman.list_containers()
    assert podman.list_containers() == first and podman.list_containers_aged() == (first, 0.0)
    assert fp.call_count(PS) == 1 and fp.call_count(INFO) == 1
    fp.register(PS, stdout=ps_json("running", "exited"))
    db.write_bytes(b"changed")  # a container exited: podman wrote its database
    assert [c.state for c in podman.list_containers()] == ["running", "exited"]
    assert fp.call_count(PS) == 2
    fp.register(PS, stdout=ps_json("running", "exited"))
    podman.list_containers()
    assert fp.call_count(PS) == 3, "taken while the database was not quiet: not verified"
    settle(db, QUIET + 1)
    fp.register(PS, stdout=ps_json("running", "exited"))
    podman.list_containers()
    podman.list_containers()
    assert fp.call_count(PS) == 4


def test_our_own_changes_and_time_bring_the_ps_back(watched: tuple[Podman, Path], fp: Any) -> None:
    clock = [0.0]
    podman, _db = watched
    podman.listing = Listing(clock=lambda: clock[0])
    for _ in range(4):
        fp.register(PS, stdout=ps_json("running"))
    podman.list_containers()
    podman.listing.drop("c1")  # the adapter removed it
    podman.list_containers()
    assert fp.call_count(PS) == 2
    podman.listing.invalidate()
    podman.list_containers()
    assert fp.call_count(PS) == 3
    clock[0] += RELIST_AFTER - 1
    podman.list_containers()
    assert fp.call_count(PS) == 3
    clock[0] += 2
    podman.list_containers()
    assert fp.call_count(PS) == 4, "re-taken after RELIST_AFTER whatever the files say"


def test_a_change_the_files_missed_stops_the_watching(watched: tuple[Podman, Path], fp: Any, caplog: pytest.LogCaptureFixture) -> None:
    clock = [0.0]
    podman, _db = watched
    podman.listing = Listing(clock=lambda: clock[0])
    fp.register(PS, stdout=ps_json("running"))
    podman.list_containers()
    clock[0] += RELIST_AFTER + 1
    fp.register(PS, stdout=ps_json("exited"))  # the files are as they were, yet it exited
    with caplog.at_level(logging.WARNING):
        assert [c.state for c in podman.list_containers()] == ["exited"]
    assert "not the live database" in caplog.text
    for _ in range(2):
        fp.register(PS, stdout=ps_json("exited"))
        podman.list_containers()
    assert fp.call_count(PS) == 4, "every call lists from now on"


def test_no_database_or_no_graph_root_means_a_ps_every_time(tmp_path: Path, fp: Any) -> None:
    fp.register(INFO, stdout=f"{tmp_path / 'elsewhere'}\n")
    podman = Podman(PodmanOptions(scope_label=SCOPE, run_dir=tmp_path / "run", watch_state=True))
    for _ in range(2):
        fp.register(PS, stdout=ps_json("running"))
        podman.list_containers()
    assert fp.call_count(PS) == 2
    fp.register(["podman", "info", fp.any()], returncode=125, stderr="Error: boom\n")
    other = Podman(PodmanOptions(scope_label=SCOPE, run_dir=tmp_path / "run", watch_state=True))
    for _ in range(2):
        fp.register(PS, stdout=ps_json("running"))
        other.list_containers()
    assert fp.call_count(PS) == 4 and not other.listing.watching


def test_a_listing_keeps_what_the_adapter_added() -> None:
    listing = Listing()
    generation = listing.begin()
    listing.put([], generation, (("db", 1, 1, 1),))
    assert listing.unchanged((("db", 1, 1, 1),)) == []
    listing.add(ContainerInfo("a" * 64, "new", "img", "running"))
    assert listing.unchanged((("db", 1, 1, 1),)) is None, "our own change: the next call lists"
    assert [c.name for c in listing.get(10) or []] == ["new"]
