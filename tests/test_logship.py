"""Log shipping without Podman: timestamps, entry mapping, the bounded sender against a fake
VictoriaLogs (down, failing, back), the Caddy tailer across rotation/truncation/restart,
and the container cursor logic against a scripted `podman logs`."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from agent import logship
from agent.logship import containers as logship_containers
from agent.drift import ContainerInfo
from agent.logship import (
    BuildLogStream,
    CaddyLogTailer,
    ContainerLogCollector,
    Cursor,
    LogSender,
    MonotonicClock,
    caddy_entry,
    format_rfc3339_ns,
    parse_rfc3339_ns,
    split_podman_line,
)
from tests.fakevlogs import FakeVictoriaLogs, check_entry


@pytest.fixture
def vlogs():
    server = FakeVictoriaLogs()
    yield server
    server.down()


def run_sender(sender: LogSender) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=sender.run, args=(stop, 5.0), daemon=True)
    thread.start()
    return stop, thread


# --- timestamps --------------------------------------------------------------------------------


def test_rfc3339_roundtrip_keeps_nanoseconds():
    ns = parse_rfc3339_ns("2026-01-02T03:04:05.123456789Z")
    assert ns == 1767323045123456789
    assert format_rfc3339_ns(ns) == "2026-01-02T03:04:05.123456789Z"
    assert format_rfc3339_ns(ns - 123456789) == "2026-01-02T03:04:05Z"
    assert format_rfc3339_ns(ns + 11) == "2026-01-02T03:04:05.1234568Z"  # trailing zeros trimmed
    assert parse_rfc3339_ns("2026-01-02T14:04:05.123456789+11:00") == ns
    assert parse_rfc3339_ns("2026-01-02T03:04:05.1Z") == 1767323045100000000


@pytest.mark.parametrize("bad", ["", "yesterday", "2026-13-02T03:04:05Z", "2026-01-02 03:04:05Z", "2026-01-02T03:04:05", "2026-01-02T03:04:05.1234567890Z", "2026-01-02T03:04:05Z trailing"])
def test_rfc3339_rejects_garbage(bad):
    assert parse_rfc3339_ns(bad) is None


def test_split_podman_line():
    assert split_podman_line(b"2026-01-02T03:04:05.5Z hello world") == (1767323045500000000, "2026-01-02T03:04:05.5Z", "hello world")
    # No timestamp (or one past byte 40): the whole line is the message.
    assert split_podman_line(b"hello world") == (None, "", "hello world")
    assert split_podman_line(b"notatimestamp: x") == (None, "", "notatimestamp: x")
    assert split_podman_line(b"2026-01-02T03:04:05Z ") == (1767323045000000000, "2026-01-02T03:04:05Z", "")
    assert split_podman_line("2026-01-02T03:04:05Z caf\u00e9 \xff".encode("latin-1"))[2].startswith("caf")


def test_monotonic_clock_never_repeats_a_time():
    clock = MonotonicClock(now_ns=lambda: 1000)
    assert [clock.next() for _ in range(3)] == [1000, 1001, 1002]


# --- entries --------------------------------------------------------------------------------------


CADDY_RECORD = {
    "level": "info", "ts": 1767323045.123456, "logger": "http.log.access", "msg": "handled request",
    "request": {"remote_ip": "10.0.0.1", "client_ip": "198.51.100.9", "proto": "HTTP/2.0", "method": "GET",
                "host": "app.example.com", "uri": "/api/items?x=1", "headers": {"User-Agent": ["curl"]}},
    "bytes_read": 0, "user_id": "", "duration": 0.012345, "size": 512, "status": 200,
    "resp_headers": {}, "service_id": "svc-1",
}


def test_caddy_entry_maps_the_protocol_fields(monkeypatch):
    monkeypatch.setenv("TZ", "Australia/Sydney")
    time.tzset()
    try:
        entry = json.loads(caddy_entry(CADDY_RECORD))
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert entry == {
        "_msg": "GET /api/items?x=1 200 12ms", "_time": "2026-01-02T14:04:05.123456+11:00", "service_id": "svc-1",
        "host": "app.example.com", "method": "GET", "path": "/api/items?x=1", "status": 200,
        "duration_ms": pytest.approx(12.345), "size": 512, "client_ip": "198.51.100.9", "log_type": "http",
    }
    assert list(entry)[:2] == ["_msg", "_time"]
    assert check_entry(entry) == ""


@pytest.mark.parametrize("change", [
    {"msg": "received request"},
    {"request": {"method": "GET", "uri": "/"}},          # no host
    {"request": "nonsense"},
])
def test_caddy_entry_skips_what_is_not_a_handled_request(change):
    assert caddy_entry({**CADDY_RECORD, **change}) is None


def test_caddy_entry_survives_wrong_types():
    record = {**CADDY_RECORD, "status": "200", "size": None, "duration": "slow", "ts": "now", "service_id": 7}
    entry = json.loads(caddy_entry(record))
    assert (entry["status"], entry["size"], entry["duration_ms"], entry["service_id"]) == (0, 0, 0.0, "")
    assert parse_rfc3339_ns(entry["_time"]) is not None


def test_container_entry_is_valid_json_for_any_message():
    raw = logship.container_entry('quote " backslash \\ tab \t \u2603 \x00', "2026-01-02T03:04:05Z", "d1", "s1", "stderr")
    entry = json.loads(raw)
    assert entry["_msg"] == 'quote " backslash \\ tab \t \u2603 \x00'
    assert list(entry) == ["_msg", "_time", "deployment_id", "service_id", "stream", "log_type"]
    assert check_entry(entry) == ""


# --- the sender --------------------------------------------------------------------------------


def _line(i: int) -> bytes:
    return logship.container_entry(f"line {i}", format_rfc3339_ns(1767323045000000000 + i), "d1", "s1", "stdout")


def test_sender_delivers_batches_as_jsonlines(vlogs):
    sender = LogSender(vlogs.url, batch_entries=10)
    sender.put_many(_line(i) for i in range(25))
    while sender.send_once():
        pass
    assert vlogs.messages() == [f"line {i}" for i in range(25)]
    assert vlogs.requests == 3 and vlogs.problems == []
    assert vlogs.query_strings[0] == "_stream_fields=log_type,service_id"
    assert sender.done_seq == sender.last_seq == 25 and sender.pending() == 0


def test_sender_queue_is_bounded_and_drops_oldest_with_a_count(vlogs, caplog):
    sender = LogSender(vlogs.url, max_entries=100, max_bytes=1 << 30)
    sender.put_many(_line(i) for i in range(250))
    assert sender.pending() == 100 and sender.stats.dropped == 150
    assert "dropped the 150 oldest log entries" in caplog.text
    # What was dropped counts as done: positions behind it may be committed.
    assert sender.done_seq == 150
    while sender.send_once():
        pass
    assert vlogs.messages() == [f"line {i}" for i in range(150, 250)]
    byte_bound = LogSender(vlogs.url, max_entries=10**6, max_bytes=10_000)
    byte_bound.put_many(_line(i) for i in range(1000))
    assert byte_bound.pending_bytes() <= 10_000 and byte_bound.stats.dropped > 0


def test_sender_keeps_entries_while_victorialogs_is_down_then_delivers(vlogs):
    vlogs.down()
    sender = LogSender(vlogs.url, max_backoff=0.2, connect_timeout=1)
    stop, thread = run_sender(sender)
    try:
        sender.put_many(_line(i) for i in range(500))
        time.sleep(0.8)
        assert sender.stats.failed_posts >= 1 and sender.pending() == 500 and sender.done_seq == 0
        vlogs.up()
        assert vlogs.wait_for(lambda: len(vlogs.entries) == 500, 15)
        # The server counts the lines before its answer reaches the sender: wait for that too.
        assert vlogs.wait_for(lambda: sender.done_seq == 500, 5)
    finally:
        stop.set()
        thread.join(10)
    assert vlogs.messages() == [f"line {i}" for i in range(500)] and vlogs.problems == []


def test_sender_retries_server_errors_and_gives_up_on_a_refused_batch(vlogs):
    sender = LogSender(vlogs.url, max_backoff=0.05, batch_entries=5)
    vlogs.fail_with = 503
    sender.put_many(_line(i) for i in range(5))
    assert sender.send_once() is False and sender.pending() == 5
    vlogs.fail_with = 400
    stop, thread = run_sender(sender)
    try:
        deadline = time.monotonic() + 10
        while sender.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sender.pending() == 0 and sender.stats.dropped == 5  # refused 3 times, then dropped
        vlogs.fail_with = None
        sender.put(_line(99))
        assert vlogs.wait_for(lambda: vlogs.messages() == ["line 99"], 5)
    finally:
        stop.set()
        thread.join(10)


def test_sender_rejects_a_bad_endpoint():
    with pytest.raises(ValueError, match="http"):
        LogSender("athena:9428")


def test_sender_stop_gives_up_after_the_drain_timeout(vlogs):
    vlogs.down()
    sender = LogSender(vlogs.url, max_backoff=0.1, connect_timeout=0.5)
    sender.put(_line(1))
    stop = threading.Event()
    stop.set()
    started = time.monotonic()
    sender.run(stop, drain_timeout=0.5)
    assert time.monotonic() - started < 3 and sender.pending() == 1


# --- build log stream -----------------------------------------------------------------------------


def test_build_log_lines_each_get_their_own_increasing_time_and_no_blanks(vlogs):
    stream = BuildLogStream(vlogs.url, "b1", "s1", "p1", redact=lambda t: t.replace("ghs_secret", "***"))
    for text in ["Cloning repo", "", "   ", "step 1\nstep 2\n\nstep 3", "token ghs_secret here"]:
        stream.line(text)
    stream.close()
    entries = vlogs.of_type("build")
    assert [e["_msg"] for e in entries] == ["Cloning repo", "step 1", "step 2", "step 3", "token *** here"]
    times = [parse_rfc3339_ns(e["_time"]) for e in entries]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert all((e["build_id"], e["service_id"], e["project_id"]) == ("b1", "s1", "p1") for e in entries)
    assert vlogs.problems == []


def test_build_log_stream_without_endpoint_only_keeps_a_tail():
    stream = BuildLogStream("", "b1", "s1", "p1")
    for i in range(60):
        stream.line(f"l{i}")
    stream.close()
    assert list(stream.lines)[0] == "l10" and len(stream.lines) == 50


# --- Caddy tailer ---------------------------------------------------------------------------------


def _access(i: int, host: str = "app.example.com") -> str:
    record = {**CADDY_RECORD, "request": {**CADDY_RECORD["request"], "uri": f"/r/{i}", "host": host}}
    return json.dumps(record) + "\n"


def _drain(tailer: CaddyLogTailer) -> None:
    tailer.poll_once()
    while tailer.sender.send_once():
        pass
    tailer.persist()


def _paths(vlogs: FakeVictoriaLogs) -> list[str]:
    return [e["path"] for e in vlogs.of_type("http")]


def test_caddy_tail_follows_rename_rotation_and_truncation(tmp_path, vlogs):
    log_path = tmp_path / "caddy" / "techulus.log"
    state = tmp_path / "caddy-pos.json"
    sender = LogSender(vlogs.url)
    tailer = CaddyLogTailer(log_path, sender, state)
    assert tailer.poll_once() == 0  # no file yet: wait for it
    log_path.parent.mkdir()
    with open(log_path, "a") as handle:
        handle.write(_access(1) + "\n" + "not json\n" + json.dumps({"msg": "other"}) + "\n" + _access(2))
        handle.write(_access(3)[:40])  # a line Caddy is still writing
    _drain(tailer)
    assert _paths(vlogs) == ["/r/1", "/r/2"]
    with open(log_path, "a") as handle:
        handle.write(_access(3)[40:])
    # Rename rotation: the old file gets a last line after the rename, then a new file appears.
    rotated = log_path.with_name("techulus-2026-01-02T03-04-05.log")
    os.rename(log_path, rotated)
    with open(rotated, "a") as handle:
        handle.write(_access(4))
    _drain(tailer)
    log_path.write_text(_access(5))
    _drain(tailer)
    _drain(tailer)
    assert _paths(vlogs) == ["/r/1", "/r/2", "/r/3", "/r/4", "/r/5"]
    # Truncation in place (copytruncate).
    with open(log_path, "a") as handle:
        handle.write(_access(6))
    _drain(tailer)
    with open(log_path, "w") as handle:
        handle.write(_access(7))
    _drain(tailer)
    assert _paths(vlogs) == ["/r/1", "/r/2", "/r/3", "/r/4", "/r/5", "/r/6", "/r/7"]
    assert vlogs.problems == []
    tailer.close()


def test_caddy_offset_survives_restart_and_rotation_while_down(tmp_path, vlogs):
    log_path = tmp_path / "techulus.log"
    state = tmp_path / "caddy-pos.json"
    log_path.write_text(_access(1) + _access(2))
    first = CaddyLogTailer(log_path, LogSender(vlogs.url), state)
    _drain(first)
    first.close()
    saved = json.loads(state.read_text())
    assert saved["offset"] == log_path.stat().st_size and saved["inode"] == log_path.stat().st_ino
    assert state.stat().st_mode & 0o777 == 0o600
    # Restart: nothing is re-sent, new lines flow.
    with open(log_path, "a") as handle:
        handle.write(_access(3))
    second = CaddyLogTailer(log_path, LogSender(vlogs.url), state)
    _drain(second)
    second.close()
    assert _paths(vlogs) == ["/r/1", "/r/2", "/r/3"]
    # Down while Caddy wrote more and rotated: the tail of the rotated file comes first.
    with open(log_path, "a") as handle:
        handle.write(_access(4))
    os.rename(log_path, tmp_path / "techulus-old.log")
    log_path.write_text(_access(5))
    third = CaddyLogTailer(log_path, LogSender(vlogs.url), state)
    for _ in range(3):
        _drain(third)
    third.close()
    assert _paths(vlogs) == ["/r/1", "/r/2", "/r/3", "/r/4", "/r/5"]


def test_caddy_offset_is_committed_only_after_delivery(tmp_path, vlogs):
    log_path = tmp_path / "techulus.log"
    state = tmp_path / "caddy-pos.json"
    log_path.write_text(_access(1) + _access(2))
    vlogs.fail_with = 503
    tailer = CaddyLogTailer(log_path, LogSender(vlogs.url), state)
    tailer.poll_once()
    assert tailer.sender.send_once() is False
    tailer.persist()
    assert not state.exists()  # a crash now re-reads both lines
    vlogs.fail_with = None
    _drain(tailer)
    assert json.loads(state.read_text())["offset"] == log_path.stat().st_size
    tailer.close()


def test_caddy_corrupt_state_file_is_ignored(tmp_path, vlogs):
    state = tmp_path / "caddy-pos.json"
    state.write_text("{not json")
    log_path = tmp_path / "techulus.log"
    log_path.write_text(_access(1))
    tailer = CaddyLogTailer(log_path, LogSender(vlogs.url), state)
    _drain(tailer)
    tailer.close()
    assert _paths(vlogs) == ["/r/1"]


# --- container cursors against a scripted podman ----------------------------------------------------

FAKE_PODMAN = r'''#!{python}
"""Replays `{script}`: prints lines after --since (strictly, as podman 4 does)."""
import json, sys
args = sys.argv[1:]
with open({calls!r}, "a") as f:
    f.write(json.dumps(args) + "\n")
assert args[:2] == ["logs", "--timestamps"], args
since = None
if "--since" in args:
    since = args[args.index("--since") + 1]
sys.path.insert(0, {root!r})
from agent.logship import parse_rfc3339_ns
since_ns = parse_rfc3339_ns(since) if since else None
lines = json.load(open({script!r}))
if args[-1] not in lines:
    print("Error: no container with name or ID " + args[-1] + " found: no such container", file=sys.stderr)
    sys.exit(125)
for stream, stamp, text in lines[args[-1]]:
    if since_ns is None or parse_rfc3339_ns(stamp) > since_ns:
        # Flushed line by line, as podman writes them: the two pipes see lines in log order.
        print(stamp + " " + text, file=sys.stdout if stream == "stdout" else sys.stderr, flush=True)
'''

CID = "a" * 64
CID2 = "b" * 64


def _container(cid: str = CID, state: str = "running") -> ContainerInfo:
    return ContainerInfo(id=cid, name="web", image="img", state=state, labels={"techulus.service.id": "svc", "techulus.deployment.id": "dep"})


@pytest.fixture
def scripted_podman(tmp_path):
    script = tmp_path / "podman-lines.json"
    calls = tmp_path / "podman-calls.jsonl"
    binary = tmp_path / "podman"
    binary.write_text(FAKE_PODMAN.format(python=sys.executable, script=str(script), calls=str(calls), root=str(Path(__file__).resolve().parents[1])))
    binary.chmod(0o755)

    class Scripted:
        path = str(binary)
        lines: dict[str, list[tuple[str, str, str]]] = {}

        def set(self, lines):
            self.lines = lines
            script.write_text(json.dumps(lines))

        def calls(self):
            return [json.loads(x) for x in calls.read_text().splitlines()] if calls.exists() else []

    return Scripted()


T = "2026-01-02T03:04:05.{:09d}Z"


@pytest.mark.real  # runs a scripted stand-in for podman, nothing else
def test_container_cursor_handles_shared_timestamps_and_interleaved_streams(tmp_path, vlogs, scripted_podman):
    lines = [("stdout", T.format(1), "a"), ("stdout", T.format(2), "b1"), ("stdout", T.format(2), "b2"),
             ("stderr", T.format(3), "err"), ("stdout", T.format(3), ""), ("stdout", T.format(4), "c")]
    scripted_podman.set({CID: lines[:3]})
    sender = LogSender(vlogs.url)
    positions = tmp_path / "log-positions.json"
    containers = [_container()]
    collector = ContainerLogCollector(scripted_podman.path, lambda: containers, sender, positions, now_ns=lambda: parse_rfc3339_ns(T.format(0)) + 10**9)
    assert collector.collect_once() == 3
    # b3 was written with the same timestamp as b1/b2 after our read: it must not be lost.
    scripted_podman.set({CID: lines[:3] + [("stdout", T.format(2), "b3")] + lines[3:]})
    assert collector.collect_once() == 3  # b3, err, c (the blank line is skipped)
    assert collector.collect_once() == 0
    while sender.send_once():
        pass
    collector.persist()
    assert vlogs.messages() == ["a", "b1", "b2", "b3", "err", "c"]
    streams = {e["_msg"]: e["stream"] for e in vlogs.entries}
    assert streams["err"] == "stderr" and streams["c"] == "stdout"
    assert vlogs.problems == [] and sender.stats.blank_skipped == 1
    calls = scripted_podman.calls()
    assert calls[0][2] == "--since" and parse_rfc3339_ns(calls[0][3]) == parse_rfc3339_ns(T.format(0)) - 59 * 10**9
    assert calls[1] == ["logs", "--timestamps", "--since", T.format(1).replace("000000001", "000000001"), CID]
    saved = json.loads(positions.read_text())
    assert saved["positions"] == {CID: "2026-01-02T03:04:05.000000004Z"} and saved["counts"] == {CID: 1}
    assert positions.stat().st_mode & 0o777 == 0o600
    # A restart continues from the file: nothing is repeated.
    again = ContainerLogCollector(scripted_podman.path, lambda: containers, sender, positions)
    assert again.collect_once() == 0


@pytest.mark.real
def test_container_cursor_commits_only_delivered_lines_and_handles_exit_and_removal(tmp_path, vlogs, scripted_podman):
    scripted_podman.set({CID: [("stdout", T.format(1), "one")], CID2: [("stdout", T.format(5), "other")]})
    positions = tmp_path / "log-positions.json"
    # A Go agent's file (2-space indented, cursor = last + 1 ns, no counts) is understood.
    positions.write_text(json.dumps({"positions": {CID2: "2026-01-02T03:04:05.000000006Z", "bogus": "x"}}, indent=2))
    vlogs.fail_with = 503
    sender = LogSender(vlogs.url)
    state = {"list": [_container(), _container(CID2, "exited")]}
    collector = ContainerLogCollector(scripted_podman.path, lambda: state["list"], sender, positions)
    assert collector.collect_once() == 1  # "one" (no --since: new since the last run); "other" was shipped already
    assert scripted_podman.calls()[0] == ["logs", "--timestamps", CID]
    assert sender.send_once() is False
    collector.persist()
    assert collector.committed() == {CID2: Cursor(parse_rfc3339_ns(T.format(6)), 0)}
    vlogs.fail_with = None
    while sender.send_once():
        pass
    collector.persist()
    assert collector.committed()[CID] == Cursor(parse_rfc3339_ns(T.format(1)), 1)
    # The exited container is read once more only if its state changes.
    before = len(scripted_podman.calls())
    collector.collect_once()
    assert [c[-1] for c in scripted_podman.calls()[before:]] == [CID]
    # Removed containers are forgotten; a podman error for one container is only logged.
    state["list"] = [_container("c" * 64)]
    collector.collect_once()
    collector.persist()
    assert json.loads(positions.read_text())["positions"] == {}
    assert vlogs.messages() == ["one"]


@pytest.mark.real
def test_a_backlog_is_read_in_bounded_slices_without_losing_lines(tmp_path, vlogs, scripted_podman):
    lines = [("stdout" if i % 3 else "stderr", T.format(i + 1), f"m{i}") for i in range(40)]
    scripted_podman.set({CID: lines})
    sender = LogSender(vlogs.url)
    collector = ContainerLogCollector(scripted_podman.path, lambda: [_container()], sender, tmp_path / "pos.json",
                                      max_lines=7, now_ns=lambda: parse_rfc3339_ns(T.format(0)))
    assert collector.collect_once() == 40
    assert len(scripted_podman.calls()) >= 2  # more than one slice was needed
    while sender.send_once():
        pass
    assert sorted(vlogs.messages(), key=lambda m: int(m[1:])) == [f"m{i}" for i in range(40)]
    assert len(vlogs.messages()) == 40


LONG = 200 * 1024


def long_lines(count: int) -> list[tuple[str, str, str]]:
    return [("stdout" if i % 4 else "stderr", T.format(i + 1), f"m{i} " + "x" * LONG) for i in range(count)]


@pytest.mark.real
def test_a_podman_logs_read_stops_at_its_byte_budget_with_an_exact_prefix(scripted_podman):
    scripted_podman.set({CID: long_lines(40)})  # about 8 MB
    argv = [scripted_podman.path, "logs", "--timestamps", CID]
    got, complete = logship.read_podman_logs(argv, 30, max_lines=20_000, max_bytes=1024 * 1024)
    assert complete is False
    # Stopped near the budget (a read chunk, the pipes and one line may follow the kill) ...
    held = sum(len(line.message) for line in got)
    assert 1024 * 1024 - LONG <= held < 2 * 1024 * 1024, held
    # ... and what it holds is the log's beginning, whole lines only: nothing skipped.
    assert [line.message.split(" ")[0] for line in got] == [f"m{i}" for i in range(len(got))]
    assert all(len(line.message) == len(f"m{i} ") + LONG for i, line in enumerate(got))
    everything, complete = logship.read_podman_logs(argv, 30)
    assert complete is True and len(everything) == 40


@pytest.mark.real
def test_a_backlog_of_long_lines_never_holds_more_than_the_queue_and_loses_nothing(tmp_path, vlogs, scripted_podman, monkeypatch):
    scripted_podman.set({CID: long_lines(60)})  # about 12 MB: three times this queue
    queue_bytes = 4 * 1024 * 1024
    sender = LogSender(vlogs.url, max_bytes=queue_bytes, batch_bytes=1024 * 1024)
    held: list[int] = []
    real_read = logship.read_podman_logs

    def spying_read(*args, **kwargs):
        lines, complete = real_read(*args, **kwargs)
        held.append(sum(len(line.message) for line in lines))
        return lines, complete

    monkeypatch.setattr(logship_containers, "read_podman_logs", spying_read)  # where the collector looks it up
    collector = ContainerLogCollector(scripted_podman.path, lambda: [_container()], sender, tmp_path / "pos.json",
                                      now_ns=lambda: parse_rfc3339_ns(T.format(0)))
    stop, thread = run_sender(sender)
    try:
        assert collector.collect_once() == 60
    finally:
        stop.set()
        thread.join(30)
    assert len(held) >= 3 and max(held) < queue_bytes, held
    assert sender.stats.dropped == 0
    assert [m.split(" ")[0] for m in vlogs.messages()] == [f"m{i}" for i in range(60)]
    assert vlogs.problems == []
