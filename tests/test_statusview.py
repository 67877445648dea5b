"""`agent status`: alive only with the data dir's flock held and a fresh file; says so otherwise."""

from __future__ import annotations

import fcntl
import json
import os
import time

import pytest

from agent import cli
from agent.statusview import (
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_STALE,
    STALE_AFTER,
    gather,
    lock_held,
    render,
    status_path,
)


@pytest.fixture
def dirs(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    run.mkdir()
    return data, run


@pytest.fixture
def held(dirs):
    data, _ = dirs
    with open(data / "agent.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield handle


def publish(run, data, **fields):
    snapshot = {
        "pid": os.getpid(), "version": "9.9", "mode": "standalone from x.toml", "updated": time.time(),
        "loop": {"state": "PROCESSING", "since": time.time() - 3},
        "poll": {"ok": False, "at": time.time(), "error": "connection refused", "lastOk": time.time() - 60},
        "containers": [{"name": "web-1", "state": "running", "health": "healthy", "ip": "10.200.1.2",
                        "image": "img:1", "deployment": "dep-1"}],
        "work": [{"id": "w-1", "type": "restart"}],
        "sync": {"dns": True, "caddy": False},
        **fields,
    }
    status_path(run, data).write_text(json.dumps(snapshot))


def test_the_lock_is_seen_held_without_being_taken(dirs):
    data, _ = dirs
    lock = data / "agent.lock"
    assert not lock_held(lock)  # no file
    with open(lock, "a+") as handle:
        assert not lock_held(lock)
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert lock_held(lock)
        # Looking did not take it: another open file description still cannot lock it.
        with open(lock, "a+") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not lock_held(lock)


def test_no_agent_running_when_nobody_holds_the_lock_even_with_a_fresh_file(dirs):
    data, run = dirs
    publish(run, data)
    code, shown = gather(run, data)
    assert code == EXIT_NOT_RUNNING and shown["running"] is False
    assert shown["problem"] == f"no agent running (data dir {data})"


def test_a_running_agent_is_shown(dirs, held):
    data, run = dirs
    publish(run, data)
    code, shown = gather(run, data)
    assert code == EXIT_OK and shown["running"] is True and "problem" not in shown
    text = render(shown)
    assert "state:       PROCESSING since 3s ago" in text
    assert "last poll:   FAILED (connection refused)" in text and "last good 60s ago" in text
    assert "web-1" in text and "10.200.1.2" in text and "healthy" in text
    assert "w-1 (restart)" in text
    assert "caddy:       NOT in sync" in text and "dns:         in sync" in text


def test_a_stale_file_means_no_agent_publishing(dirs, held):
    data, run = dirs
    publish(run, data, updated=time.time() - STALE_AFTER - 5)
    code, shown = gather(run, data)
    assert code == EXIT_STALE and shown["running"] is False and "stopped publishing" in shown["problem"]


def test_a_lock_without_a_file_is_named(dirs, held):
    data, run = dirs
    code, shown = gather(run, data)
    assert code == EXIT_STALE and "has published no status" in shown["problem"]


def test_the_upgrade_outcome_is_shown_verbatim_running_or_not(dirs):
    data, run = dirs
    record = {"outcome": "rolled back", "reason": "no READY within 60s", "from": "0.1.0", "to": "0.2.0"}
    (data / "upgrade-state.json").write_text(json.dumps(record))
    code, shown = gather(run, data)
    assert code == EXIT_NOT_RUNNING and shown["upgrade"] == record
    assert "upgrade:     outcome=rolled back, reason=no READY within 60s, from=0.1.0, to=0.2.0" in render(shown)


def test_cli_status_exits_non_zero_when_no_agent_runs(dirs, monkeypatch, capsys):
    data, run = dirs
    monkeypatch.setenv("TECHULUS_AGENT_RUN_DIR", str(run))
    assert cli.main(["status", "--data-dir", str(data)]) == EXIT_NOT_RUNNING
    assert capsys.readouterr().out == f"no agent running (data dir {data})\n"
    assert cli.main(["status", "--json", "--data-dir", str(data)]) == EXIT_NOT_RUNNING
    assert json.loads(capsys.readouterr().out)["running"] is False


def test_cli_status_json_of_a_running_agent(dirs, held, monkeypatch, capsys):
    data, run = dirs
    monkeypatch.setenv("TECHULUS_AGENT_RUN_DIR", str(run))
    publish(run, data)
    assert cli.main(["status", "--json", "--data-dir", str(data)]) == EXIT_OK
    shown = json.loads(capsys.readouterr().out)
    assert shown["running"] is True and shown["containers"][0]["deployment"] == "dep-1"


def test_json_goes_with_status_only(capsys):
    assert cli.main(["plan", "--json"]) == cli.EXIT_USAGE
    assert "--json goes with status" in capsys.readouterr().err
