"""Ship container, Caddy access and build logs to VictoriaLogs (PROTOCOL.md §12, §13.5).

Why it is shaped like this (fixing §17 items 24 and 9):

* Every source hands finished JSON lines to a `LogSender`: one bounded FIFO in memory
  (entries and bytes capped, the oldest dropped with a counted warning) drained by its
  own thread, which POSTs batches to `/insert/jsonline` and retries with backoff for as
  long as VictoriaLogs is down. Nothing here ever blocks reconciliation or heartbeats.
* A source's position (container cursor, Caddy byte offset) is *committed* only once
  every entry read before it has left the queue (delivered, or dropped on purpose), and
  committed positions are written with `fsutil.atomic_write` every second. A `kill -9`
  therefore neither loses lines nor re-sends more than the last second or so.
* Producers pause while their queue is over a high-water mark: the podman log file and
  the Caddy log file are better buffers than our memory, so an outage costs lag, not
  lines, for as long as those files keep them.
* Container cursors are exact: podman's `--since` is strict ("after"), several lines can
  share one timestamp, so a cursor is (timestamp, lines already seen at it). We query
  from one nanosecond before it and skip what we already shipped, so interleaved
  stdout/stderr can neither lose nor repeat lines.
"""

from __future__ import annotations

import calendar
import collections
import itertools
import json
import logging
import os
import random
import re
import selectors
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import urllib3

from agent import fsutil
from agent.drift import ContainerInfo
from agent.host.run import CommandError, kill_group, popen

log = logging.getLogger(__name__)

INSERT_PATH = "/insert/jsonline"
#: VictoriaLogs stream fields: per-service streams instead of one default stream (§17.24).
STREAM_FIELDS = "log_type,service_id"
MAX_LINE = 1024 * 1024
POSITIONS_FILE = "log-positions.json"
CADDY_POSITION_FILE = "caddy-log-position.json"
#: Entries in one collection pass that make the next pass come sooner.
BUSY_PASS = 2000
#: Bytes one `podman logs` read may hold (then podman is killed; the rest comes next read),
#: never less than MIN_READ_BYTES even when the queue is nearly full.
READ_BYTES = 8 * 1024 * 1024
MIN_READ_BYTES = 1024 * 1024
#: What a container entry adds to its message (JSON framing, ids, time), for byte budgets.
ENTRY_OVERHEAD = 200

_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d\d):(\d\d))\Z"
)
_CONTAINER_ID = re.compile(r"[0-9a-f]{12,64}\Z")
_FIELD_VALUE_MAX = 256


# --- time ------------------------------------------------------------------------------------


def parse_rfc3339_ns(text: str) -> int | None:
    """Nanoseconds since the epoch for an RFC 3339 timestamp (nanoseconds allowed), or None."""
    match = _RFC3339.match(text)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        return None
    fraction = (match.group(7) or "").ljust(9, "0")
    try:
        seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (OverflowError, ValueError):
        return None
    if match.group(9):
        offset = int(match.group(10)) * 3600 + int(match.group(11)) * 60
        seconds -= offset if match.group(9) == "+" else -offset
    return seconds * 1_000_000_000 + int(fraction)


def format_rfc3339_ns(ns: int) -> str:
    """UTC RFC 3339 with nanoseconds, trailing zeros trimmed (Go's RFC3339Nano)."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    frac = f"{fraction:09d}".rstrip("0")
    return f"{base}.{frac}Z" if frac else f"{base}Z"


def format_local_time(unix_seconds: float) -> str:
    """Caddy's float `ts` as RFC 3339 in the agent's local zone (§12.3)."""
    ns = int(round(unix_seconds * 1_000_000_000))
    seconds, fraction = divmod(ns, 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc).astimezone()
    offset = moment.utcoffset()
    total = int(offset.total_seconds()) if offset is not None else 0
    if total == 0:
        zone = "Z"
    else:
        sign = "+" if total > 0 else "-"
        zone = f"{sign}{abs(total) // 3600:02d}:{abs(total) % 3600 // 60:02d}"
    frac = f"{fraction:09d}".rstrip("0")
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + zone


class MonotonicClock:
    """Strictly increasing wall-clock nanoseconds: every build-log line its own `_time`
    (§17.15), in the order the lines were produced, even within one clock tick."""

    def __init__(self, now_ns: Callable[[], int] = time.time_ns) -> None:
        self._now_ns = now_ns
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._last = max(self._now_ns(), self._last + 1)
            return self._last


# --- the sender ------------------------------------------------------------------------------


@dataclass
class SenderStats:
    enqueued: int = 0
    delivered: int = 0
    dropped: int = 0
    failed_posts: int = 0
    blank_skipped: int = 0


class LogSender:
    """A bounded FIFO of JSON lines and the thread that delivers them to VictoriaLogs.

    Each entry gets a sequence number; `done_seq` says that every entry up to it has
    left the queue (delivered, or dropped on purpose), which is what sources wait for
    before they commit a position.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        name: str = "logs",
        max_entries: int = 20_000,
        max_bytes: int = 16 * 1024 * 1024,
        batch_entries: int = 1000,
        batch_bytes: int = 4 * 1024 * 1024,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        stream_fields: str = STREAM_FIELDS,
        max_backoff: float = 30.0,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"logs endpoint must start with http:// or https://, got {endpoint!r}")
        self.name = name
        self.url = endpoint.rstrip("/") + INSERT_PATH + (f"?_stream_fields={stream_fields}" if stream_fields else "")
        self.max_entries = max(1, max_entries)
        self.max_bytes = max(1024, max_bytes)
        self.batch_entries = max(1, batch_entries)
        self.batch_bytes = max(1024, batch_bytes)
        self.max_backoff = max_backoff
        self.stats = SenderStats()
        self._queue: collections.deque[tuple[int, bytes]] = collections.deque()
        self._bytes = 0
        self._next_seq = 1
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._sleep = sleep
        self._dropped_since_warning = 0
        self._last_drop_warning = 0.0
        self._http = urllib3.PoolManager(
            num_pools=1,
            maxsize=1,
            timeout=urllib3.Timeout(connect=connect_timeout, read=timeout),
            retries=False,
        )

    # -- producers --

    def put(self, line: bytes) -> int:
        return self.put_many((line,))

    def put_many(self, lines: Iterable[bytes]) -> int:
        """Queue JSON lines (no trailing newline); returns the sequence of the last one."""
        with self._cond:
            for line in lines:
                self._queue.append((self._next_seq, line))
                self._next_seq += 1
                self._bytes += len(line) + 1
                self.stats.enqueued += 1
            self._enforce_bounds()
            self._cond.notify()
            return self._next_seq - 1

    def _enforce_bounds(self) -> None:
        dropped = 0
        while self._queue and (len(self._queue) > self.max_entries or self._bytes > self.max_bytes):
            _, line = self._queue.popleft()
            self._bytes -= len(line) + 1
            dropped += 1
        if dropped:
            self.stats.dropped += dropped
            self._dropped_since_warning += dropped
            now = time.monotonic()
            if now - self._last_drop_warning >= 30.0:
                log.warning(
                    "%s: dropped the %d oldest log entries (queue full at %d entries / %d bytes: "
                    "VictoriaLogs unreachable or too slow); %d dropped in total",
                    self.name, self._dropped_since_warning, self.max_entries, self.max_bytes, self.stats.dropped,
                )
                self._dropped_since_warning = 0
                self._last_drop_warning = now

    @property
    def last_seq(self) -> int:
        with self._cond:
            return self._next_seq - 1

    @property
    def done_seq(self) -> int:
        """Every entry with a sequence up to this one has left the queue."""
        with self._cond:
            return self._queue[0][0] - 1 if self._queue else self._next_seq - 1

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def pending_bytes(self) -> int:
        with self._cond:
            return self._bytes

    def congested(self) -> bool:
        """Over the high-water mark (half full): producers should stop reading for now."""
        with self._cond:
            return len(self._queue) * 2 >= self.max_entries or self._bytes * 2 >= self.max_bytes

    # -- delivery --

    def send_once(self) -> bool | None:
        """POST one batch from the head of the queue. True = delivered, False = failed
        (entries stay queued), None = nothing to send."""
        with self._cond:
            batch: list[tuple[int, bytes]] = []
            size = 0
            for seq, line in itertools.islice(self._queue, 0, self.batch_entries):
                if batch and size + len(line) + 1 > self.batch_bytes:
                    break
                batch.append((seq, line))
                size += len(line) + 1
        if not batch:
            return None
        body = b"\n".join(line for _, line in batch) + b"\n"
        try:
            response = self._http.request(
                "POST", self.url, body=body, headers={"Content-Type": "application/json"}, preload_content=True
            )
            status = response.status
            detail = response.data[:200].decode("utf-8", "replace").strip()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            status, detail = 0, str(getattr(exc, "reason", None) or exc)
        if status in (200, 204):
            last = batch[-1][0]
            with self._cond:
                while self._queue and self._queue[0][0] <= last:
                    _, line = self._queue.popleft()
                    self._bytes -= len(line) + 1
                    self.stats.delivered += 1
            return True
        self.stats.failed_posts += 1
        self._last_error = f"HTTP {status}: {detail}" if status else detail
        self._last_status = status
        return False

    def drop_head(self, count: int) -> None:
        with self._cond:
            for _ in range(min(count, len(self._queue))):
                _, line = self._queue.popleft()
                self._bytes -= len(line) + 1
                self.stats.dropped += 1

    def run(self, stop: threading.Event, drain_timeout: float = 5.0) -> None:
        """Deliver until `stop` is set, then try to empty the queue for `drain_timeout` s."""
        failures = 0
        client_errors = 0
        drain_deadline: float | None = None
        while True:
            if stop.is_set() and drain_deadline is None:
                drain_deadline = time.monotonic() + drain_timeout
            if drain_deadline is not None and (time.monotonic() >= drain_deadline or self.pending() == 0):
                break
            if self.pending() == 0:
                with self._cond:
                    if not self._queue:
                        self._cond.wait(0.25)
                continue
            outcome = self.send_once()
            if outcome is not False:
                if failures:
                    log.info("%s: VictoriaLogs reachable again; %d entries queued", self.name, self.pending())
                failures = client_errors = 0
                continue
            failures += 1
            status = getattr(self, "_last_status", 0)
            if 400 <= status < 500 and status != 429:
                # The same batch will be refused again: after 3 tries it is dropped, so one
                # bad entry cannot wedge the queue forever.
                client_errors += 1
                if client_errors >= 3:
                    size = min(self.batch_entries, self.pending())
                    log.error("%s: VictoriaLogs refused a batch 3 times (%s); dropping %d entries", self.name, self._last_error, size)
                    self.drop_head(size)
                    client_errors = 0
                    continue
            delay = min(self.max_backoff, float(failures if failures <= 3 else 3 * 2 ** (failures - 3)))
            delay *= random.uniform(0.9, 1.1)
            if failures == 1 or failures % 10 == 0:
                log.warning(
                    "%s: cannot deliver logs to %s (%s); %d entries queued, retrying in %.1fs",
                    self.name, self.url, self._last_error, self.pending(), delay,
                )
            if drain_deadline is not None:
                delay = min(delay, max(0.0, drain_deadline - time.monotonic()))
            if self._sleep is not None:
                self._sleep(delay)
            elif drain_deadline is None:
                stop.wait(delay)
            else:
                time.sleep(delay)
        if self.pending():
            log.warning("%s: %d log entries not delivered at shutdown (positions not committed past them)", self.name, self.pending())

    def close(self) -> None:
        self._http.clear()


# --- checkpoints: positions committed only behind the sender ----------------------------------


class Checkpoints:
    """Positions a source reached, released once the sender is done with what came before."""

    def __init__(self) -> None:
        self._pending: collections.deque[tuple[int, Any]] = collections.deque()
        self._lock = threading.Lock()

    def add(self, seq: int, position: Any) -> None:
        with self._lock:
            self._pending.append((seq, position))

    def release(self, done_seq: int) -> list[Any]:
        released = []
        with self._lock:
            while self._pending and self._pending[0][0] <= done_seq:
                released.append(self._pending.popleft()[1])
        return released


# --- container logs (§12.1) -----------------------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """Lines up to `ns` were read; `count` of them carry exactly the timestamp `ns`."""

    ns: int
    count: int = 0

    @property
    def text(self) -> str:
        return format_rfc3339_ns(self.ns)


@dataclass(slots=True)
class LogLine:
    ns: int | None
    time_text: str
    stream: str
    message: str


def split_podman_line(raw: bytes) -> tuple[int | None, str, str]:
    """`<RFC3339Nano> <message>` -> (ns, time text, message); no timestamp -> (None, "", line)."""
    space = raw.find(b" ", 1, 40)
    if space > 0:
        stamp = raw[:space].decode("ascii", "replace")
        ns = parse_rfc3339_ns(stamp)
        if ns is not None:
            return ns, stamp, raw[space + 1:].decode("utf-8", "replace")
    return None, "", raw.decode("utf-8", "replace")


def _json_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def container_entry(message: str, time_text: str, deployment_id: str, service_id: str, stream: str) -> bytes:
    """The §12.2 container entry, field order as the protocol shows it."""
    return (
        '{"_msg":' + _json_str(message) + ',"_time":' + _json_str(time_text)
        + ',"deployment_id":' + _json_str(deployment_id) + ',"service_id":' + _json_str(service_id)
        + ',"stream":"' + stream + '","log_type":"container"}'
    ).encode("utf-8")


class ContainerLogCollector:
    """`podman logs --timestamps --since` for every managed container, cursors persisted."""

    def __init__(
        self,
        podman_binary: str,
        list_containers: Callable[[], Sequence[ContainerInfo]],
        sender: LogSender,
        positions_path: Path,
        *,
        read_timeout: float = 30.0,
        max_lines: int = 20_000,
        max_bytes: int = READ_BYTES,
        first_run_window: float = 60.0,
        now_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.podman = podman_binary
        self.list_containers = list_containers
        self.sender = sender
        self.positions_path = positions_path
        self.read_timeout = read_timeout
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.last_read_complete = True
        self.stop_event = threading.Event()  # set by the shipper at shutdown
        self.first_run_window = first_run_window
        self._now_ns = now_ns
        self._read: dict[str, Cursor] = {}
        self._committed: dict[str, Cursor] = {}
        self._finished: dict[str, str] = {}
        self._checkpoints = Checkpoints()
        self._saved_snapshot: dict[str, Cursor] | None = None
        self._had_positions_file = False
        self._load()

    def _load(self) -> None:
        try:
            data = fsutil.read_json(self.positions_path)
        except (ValueError, OSError) as exc:
            log.warning("ignoring unreadable %s: %s", self.positions_path, exc)
            return
        if data is None:
            return
        self._had_positions_file = True
        positions = data.get("positions") if isinstance(data, dict) else None
        counts = data.get("counts") if isinstance(data, dict) else None
        if not isinstance(positions, dict):
            return
        counts = counts if isinstance(counts, dict) else {}
        for cid, stamp in positions.items():
            if not isinstance(cid, str) or not _CONTAINER_ID.match(cid) or not isinstance(stamp, str):
                continue
            ns = parse_rfc3339_ns(stamp)
            if ns is None:
                continue
            count = counts.get(cid)
            cursor = Cursor(ns, count if isinstance(count, int) and 0 <= count < 1_000_000 else 0)
            self._read[cid] = self._committed[cid] = cursor
        self._saved_snapshot = dict(self._committed)

    # -- collection --

    def collect_once(self) -> int:
        """One pass over the managed containers; returns the number of entries queued."""
        try:
            containers = list(self.list_containers())
        except (CommandError, RuntimeError, ValueError) as exc:
            log.warning("log collection: cannot list containers: %s", exc)
            return 0
        current = {c.id for c in containers}
        for cid in list(self._read):
            if cid not in current:  # removed: its cursor is of no further use
                self._read.pop(cid, None)
                self._finished.pop(cid, None)
        queued = 0
        for container in containers:
            if not container.deployment_id or not container.service_id or not _CONTAINER_ID.match(container.id):
                continue
            if not container.running and self._finished.get(container.id) == container.state:
                continue  # an exited container whose final lines we already have
            try:
                queued += self._collect_container(container)
                # A backlog is read in bounded slices, back to back, each as large as the
                # queue has room for; waiting (briefly) for the sender between slices.
                rounds = 1
                while not self.last_read_complete and rounds < 100 and self._wait_for_room():
                    queued += self._collect_container(container)
                    rounds += 1
            except CommandError as exc:
                log.warning("log collection for %s failed: %s", container.short_id, exc)
                continue
            if container.running:
                self._finished.pop(container.id, None)
            else:
                self._finished[container.id] = container.state
        return queued

    def _since_arg(self, cid: str) -> list[str]:
        cursor = self._read.get(cid)
        if cursor is not None:
            # podman's --since is strict; one ns earlier returns the lines at the cursor too,
            # and the count tells which of those we already have.
            return ["--since", format_rfc3339_ns(cursor.ns - 1)]
        if self._had_positions_file:
            return []  # a container new since we last ran: all of its logs
        return ["--since", format_rfc3339_ns(self._now_ns() - int(self.first_run_window * 1e9))]

    def _wait_for_room(self, patience: float = 10.0) -> bool:
        deadline = time.monotonic() + patience
        while self.sender.congested():
            if time.monotonic() >= deadline or self.stop_event.is_set():
                return False
            time.sleep(0.05)
        return True

    def _collect_container(self, container: ContainerInfo) -> int:
        cid = container.id
        argv = [self.podman, "logs", "--timestamps", *self._since_arg(cid), cid]
        # Never read more than the queue can take below its high-water mark: reading more
        # would only make the sender drop the oldest of it.
        room = max(1000, self.sender.max_entries // 2 - self.sender.pending())
        room_bytes = max(MIN_READ_BYTES, self.sender.max_bytes // 2 - self.sender.pending_bytes())
        lines, complete = read_podman_logs(argv, self.read_timeout, min(self.max_lines, room), min(self.max_bytes, room_bytes))
        self.last_read_complete = complete
        cursor = self._read.get(cid)
        deployment = container.deployment_id[:_FIELD_VALUE_MAX]
        service = container.service_id[:_FIELD_VALUE_MAX]
        entries: list[bytes] = []
        skip_at_cursor = cursor.count if cursor is not None else 0
        max_ns = cursor.ns if cursor is not None else None
        at_max = cursor.count if cursor is not None else 0
        blank = 0
        for line in lines:
            if line.ns is not None:
                if cursor is not None and line.ns < cursor.ns:
                    continue
                if cursor is not None and line.ns == cursor.ns and skip_at_cursor > 0:
                    skip_at_cursor -= 1
                    continue
                if max_ns is None or line.ns > max_ns:
                    max_ns, at_max = line.ns, 1
                elif line.ns == max_ns:
                    at_max += 1
                time_text = line.time_text
            else:
                time_text = format_rfc3339_ns(self._now_ns())
            if not line.message.strip():
                blank += 1
                continue
            message = line.message if len(line.message) <= MAX_LINE else line.message[:MAX_LINE]
            entries.append(container_entry(message, time_text, deployment, service, line.stream))
        self.sender.stats.blank_skipped += blank
        seq = self.sender.put_many(entries) if entries else self.sender.last_seq
        if max_ns is not None:
            new_cursor = Cursor(max_ns, at_max)
            if new_cursor != cursor:
                self._read[cid] = new_cursor
                self._checkpoints.add(seq, (cid, new_cursor))
        return len(entries)

    # -- persistence --

    def commit(self) -> None:
        for cid, cursor in self._checkpoints.release(self.sender.done_seq):
            self._committed[cid] = cursor
        for cid in list(self._committed):
            if cid not in self._read:
                self._committed.pop(cid)

    def persist(self) -> bool:
        """Write the committed cursors if they changed; True when written."""
        self.commit()
        if self._saved_snapshot == self._committed:
            return False
        snapshot = dict(self._committed)
        data = {
            "positions": {cid: c.text for cid, c in sorted(snapshot.items())},
            "counts": {cid: c.count for cid, c in sorted(snapshot.items())},
        }
        try:
            fsutil.atomic_write(self.positions_path, json.dumps(data, indent=2) + "\n", mode=0o600)
        except OSError as exc:
            log.warning("cannot save log positions to %s: %s", self.positions_path, exc)
            return False
        self._saved_snapshot = snapshot
        self._had_positions_file = True
        return True

    def committed(self) -> dict[str, Cursor]:
        return dict(self._committed)


def read_podman_logs(
    argv: Sequence[str], timeout: float, max_lines: int = 20_000, max_bytes: int = READ_BYTES
) -> tuple[list[LogLine], bool]:
    """Run `podman logs`, reading stdout and stderr concurrently; lines ordered by time.

    Returns (lines, complete). At `max_lines` or `max_bytes` (bounded memory: a container
    log file holds up to 50 MB of possibly very long lines) or on timeout the child's
    process group is killed first and its pipes are then read to the end: podman writes
    lines in log order, so what we got is exactly a prefix of the log and the cursor
    taken from it skips nothing. A line cut by the kill is dropped (re-read next time).
    Bytes count what was read plus ENTRY_OVERHEAD per line (what a queued entry adds);
    the kill lands after the line that crossed the budget, so every read makes progress,
    and at most a read chunk, the pipes' contents and one line more arrive after it.
    """
    proc = popen(argv)
    assert proc.stdout is not None and proc.stderr is not None
    streams = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
    buffers = {fd: bytearray() for fd in streams}
    overflow = {fd: False for fd in streams}
    collected: dict[str, list[LogLine]] = {"stdout": [], "stderr": []}
    selector = selectors.DefaultSelector()
    for fd in streams:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    open_streams = set(streams)
    killed = ""
    total = 0
    read_bytes = 0
    try:
        while open_streams:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if killed:
                    break  # pipes still held open by something: give up on them
                killed = f"did not finish within {timeout:g}s"
                kill_group(proc)
                deadline = time.monotonic() + 5.0
                continue
            for key, _ in selector.select(min(remaining, 1.0)):
                fd = key.fd
                try:
                    chunk = os.read(fd, 256 * 1024)
                except BlockingIOError:
                    continue
                if not chunk:
                    selector.unregister(fd)
                    open_streams.discard(fd)
                    if buffers[fd] and not killed:
                        _add_line(bytes(buffers[fd]), streams[fd], collected)
                    buffers[fd].clear()
                    continue
                added = _split_chunk(chunk, buffers[fd], overflow, fd, streams[fd], collected)
                total += added
                read_bytes += len(chunk) + added * ENTRY_OVERHEAD
            if (total >= max_lines or read_bytes >= max_bytes) and not killed:
                killed = f"reached {max_lines} lines" if total >= max_lines else f"reached {read_bytes} bytes"
                kill_group(proc)
                deadline = time.monotonic() + 5.0
    finally:
        selector.close()
        if open_streams:
            kill_group(proc)
        try:
            proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - a wedged podman must not wedge the shipper
            kill_group(proc)
        for pipe in (proc.stdout, proc.stderr):
            pipe.close()
    if killed:
        log.debug("`%s` %s; continuing from there next time", " ".join(argv), killed)
    elif proc.returncode not in (0, None):
        stderr_text = " ".join(ln.message for ln in collected["stderr"][-3:])
        if not collected["stdout"] and collected["stderr"] and all(ln.ns is None for ln in collected["stderr"]):
            raise CommandError(tuple(argv), proc.returncode, "", stderr_text)
    merged = collected["stdout"] + collected["stderr"]
    merged.sort(key=lambda ln: ln.ns if ln.ns is not None else 0)
    return merged, not killed


def _split_chunk(
    chunk: bytes, buffer: bytearray, overflow: dict[int, bool], fd: int, stream: str, collected: dict[str, list[LogLine]]
) -> int:
    """Add the complete lines in `chunk` (after what `buffer` holds); returns how many."""
    added = 0
    start = 0
    while True:
        newline = chunk.find(b"\n", start)
        if newline < 0:
            break
        piece = chunk[start:newline]
        if overflow[fd]:
            overflow[fd] = False  # the tail of an over-long line: already cut
        elif buffer:
            buffer.extend(piece)
            _add_line(bytes(buffer[:MAX_LINE]), stream, collected)
            buffer.clear()
            added += 1
        else:
            _add_line(piece[:MAX_LINE], stream, collected)
            added += 1
        start = newline + 1
    if not overflow[fd]:
        buffer.extend(chunk[start:])
        if len(buffer) > MAX_LINE:
            _add_line(bytes(buffer[:MAX_LINE]), stream, collected)
            buffer.clear()
            overflow[fd] = True
            added += 1
    return added


def _add_line(raw: bytes, stream: str, collected: dict[str, list[LogLine]]) -> None:
    ns, stamp, message = split_podman_line(raw)
    collected[stream].append(LogLine(ns, stamp, stream, message))


# --- Caddy access log (§12.3) ----------------------------------------------------------------


def caddy_entry(record: Mapping[str, Any]) -> bytes | None:
    """Map one Caddy JSON access-log record to the §12.3 entry; None when it is not one."""
    if record.get("msg") != "handled request":
        return None
    request = record.get("request")
    if not isinstance(request, dict):
        return None
    host = request.get("host")
    if not isinstance(host, str) or not host:
        return None
    method = _str(request.get("method"))
    uri = _str(request.get("uri"))
    status = _int(record.get("status"))
    duration = record.get("duration")
    duration_ms = float(duration) * 1000.0 if isinstance(duration, (int, float)) and not isinstance(duration, bool) else 0.0
    ts = record.get("ts")
    when = format_local_time(float(ts)) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else format_rfc3339_ns(time.time_ns())
    entry = {
        "_msg": f"{method} {uri} {status} {int(duration_ms)}ms",
        "_time": when,
        "service_id": _str(record.get("service_id"))[:_FIELD_VALUE_MAX],
        "host": host[:_FIELD_VALUE_MAX],
        "method": method[:32],
        "path": uri,
        "status": status,
        "duration_ms": duration_ms,
        "size": _int(record.get("size")),
        "client_ip": _str(request.get("client_ip"))[:64],
        "log_type": "http",
    }
    return json.dumps(entry, ensure_ascii=False).encode("utf-8")


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return 0


@dataclass(frozen=True)
class FilePosition:
    device: int
    inode: int
    offset: int


class CaddyLogTailer:
    """Tails Caddy's JSON access log across rename-rotation and truncation, offset persisted."""

    def __init__(self, path: Path, sender: LogSender, state_path: Path, *, max_read: int = 4 * 1024 * 1024) -> None:
        self.path = Path(path)
        self.sender = sender
        self.state_path = state_path
        self.max_read = max_read
        self._file: Any = None
        self._identity: tuple[int, int] | None = None
        self._offset = 0
        self._partial = bytearray()
        self._skipping_long_line = False
        self._checkpoints = Checkpoints()
        self._committed: FilePosition | None = None
        self._saved: FilePosition | None = None
        self._last_checkpoint: FilePosition | None = None
        self._bad_lines = 0
        self._missing_logged = False
        self._load()

    def _load(self) -> None:
        try:
            data = fsutil.read_json(self.state_path)
        except (ValueError, OSError) as exc:
            log.warning("ignoring unreadable %s: %s", self.state_path, exc)
            return
        if not isinstance(data, dict):
            return
        values = [data.get(k) for k in ("device", "inode", "offset")]
        if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            self._committed = self._saved = FilePosition(*values)  # type: ignore[arg-type]

    def _open(self, path: Path, position: int) -> bool:
        try:
            handle = open(path, "rb")  # noqa: SIM115 - kept open across polls
        except OSError:
            return False
        info = os.fstat(handle.fileno())
        if position > info.st_size:
            position = 0  # truncated while we were not looking
        handle.seek(position)
        self._close()
        self._file = handle
        self._identity = (info.st_dev, info.st_ino)
        self._offset = position
        self._partial.clear()
        self._skipping_long_line = False
        return True

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _start(self) -> bool:
        """First open: continue where the committed offset says, in whichever file it was."""
        try:
            info = os.stat(self.path)
        except OSError:
            if not self._missing_logged:
                log.info("Caddy access log %s does not exist yet; waiting for it", self.path)
                self._missing_logged = True
            return False
        saved = self._committed
        if saved is None:
            return self._open(self.path, 0)
        if (info.st_dev, info.st_ino) == (saved.device, saved.inode):
            return self._open(self.path, saved.offset)
        rotated = self._find_rotated(saved)
        if rotated is not None and self._open(rotated, saved.offset):
            log.info("finishing rotated Caddy log %s before %s", rotated, self.path)
            return True
        return self._open(self.path, 0)

    def _find_rotated(self, saved: FilePosition) -> Path | None:
        """The file we were reading, renamed by Caddy's roller while we were down."""
        try:
            entries = list(os.scandir(self.path.parent))
        except OSError:
            return None
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (saved.device, saved.inode) and entry.is_file(follow_symlinks=False):
                return Path(entry.path)
        return None

    def poll_once(self) -> int:
        """Read what is new (following rotation/truncation); returns entries queued."""
        if self._file is None and not self._start():
            return 0
        queued = self._drain()
        if self._file is None:
            return queued
        # At EOF: has the file been truncated, or replaced by a new one?
        size = os.fstat(self._file.fileno()).st_size
        if size < self._offset:
            log.info("Caddy access log %s was truncated; reading it from the start", self.path)
            self._file.seek(0)
            self._offset = 0
            self._partial.clear()
            return queued + self._drain()
        try:
            info = os.stat(self.path)
        except OSError:
            return queued  # renamed and not re-created yet: keep the old one open
        if (info.st_dev, info.st_ino) != self._identity:
            queued += self._drain()  # last lines written to the old file before the rename
            log.info("Caddy access log %s was rotated; following the new file", self.path)
            if self._open(self.path, 0):
                queued += self._drain()
        return queued

    def _drain(self) -> int:
        assert self._file is not None and self._identity is not None
        entries: list[bytes] = []
        budget = self.max_read
        consumed_to = self._offset
        while budget > 0:
            chunk = self._file.read(min(256 * 1024, budget))
            if not chunk:
                break
            budget -= len(chunk)
            start = 0
            base = self._offset
            while True:
                newline = chunk.find(b"\n", start)
                if newline < 0:
                    break
                if self._skipping_long_line:
                    self._skipping_long_line = False
                else:
                    self._partial.extend(chunk[start:newline])
                    entry = self._parse(bytes(self._partial))
                    if entry is not None:
                        entries.append(entry)
                self._partial.clear()
                start = newline + 1
                consumed_to = base + start
            if not self._skipping_long_line:
                self._partial.extend(chunk[start:])
                if len(self._partial) > MAX_LINE:
                    log.warning("skipping a Caddy access-log line longer than %d bytes", MAX_LINE)
                    self._partial.clear()
                    self._skipping_long_line = True
            self._offset = base + len(chunk)
        position = FilePosition(self._identity[0], self._identity[1], consumed_to)
        if position != self._last_checkpoint or entries:
            seq = self.sender.put_many(entries) if entries else self.sender.last_seq
            # Only complete lines count as consumed: a restart re-reads a half-written one.
            self._checkpoints.add(seq, position)
            self._last_checkpoint = position
        return len(entries)

    def _parse(self, raw: bytes) -> bytes | None:
        if not raw.strip():
            return None
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._bad_lines += 1
            if self._bad_lines == 1 or self._bad_lines % 1000 == 0:
                log.warning("skipping %d Caddy access-log line(s) that are not JSON", self._bad_lines)
            return None
        return caddy_entry(record) if isinstance(record, dict) else None

    def persist(self) -> bool:
        for position in self._checkpoints.release(self.sender.done_seq):
            self._committed = position
        if self._committed is None or self._committed == self._saved:
            return False
        position = self._committed
        data = {"path": str(self.path), "device": position.device, "inode": position.inode, "offset": position.offset}
        try:
            fsutil.atomic_write(self.state_path, json.dumps(data, indent=2) + "\n", mode=0o600)
        except OSError as exc:
            log.warning("cannot save the Caddy log offset to %s: %s", self.state_path, exc)
            return False
        self._saved = position
        return True

    @property
    def committed(self) -> FilePosition | None:
        return self._committed

    def close(self) -> None:
        self._close()


# --- build logs (§12.4, §13.5) -----------------------------------------------------------------


class BuildLogStream:
    """Build log lines for one build, each with its own increasing `_time`, sent in the
    background; also mirrored to the agent's own log at debug level."""

    def __init__(
        self,
        endpoint: str,
        build_id: str,
        service_id: str,
        project_id: str,
        *,
        redact: Callable[[str], str] = lambda text: text,
        clock: MonotonicClock | None = None,
    ) -> None:
        self.build_id = build_id
        self._redact = redact
        self._clock = clock or MonotonicClock()
        self._tail = (
            ',"build_id":' + _json_str(build_id) + ',"service_id":' + _json_str(service_id)
            + ',"project_id":' + _json_str(project_id) + ',"log_type":"build"}'
        )
        self._sender: LogSender | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=50)  # for error messages
        if endpoint:
            self._sender = LogSender(endpoint, name=f"build {build_id} logs", max_entries=50_000, max_bytes=16 * 1024 * 1024)
            self._thread = threading.Thread(target=self._sender.run, args=(self._stop, 10.0), name=f"build-logs-{build_id[:8]}", daemon=True)
            self._thread.start()

    def line(self, text: str) -> None:
        for piece in text.splitlines() or [text]:
            piece = self._redact(piece.rstrip("\r"))
            if not piece.strip():
                continue  # blank lines are noise in VictoriaLogs (§17.24)
            self.lines.append(piece)
            log.debug("build %s: %s", self.build_id, piece)
            if self._sender is not None:
                stamp = format_rfc3339_ns(self._clock.next())
                self._sender.put(('{"_msg":' + _json_str(piece[:MAX_LINE]) + ',"_time":"' + stamp + '"' + self._tail).encode("utf-8"))

    def close(self) -> None:
        """Flush what is queued (up to 10 s) and stop the sender thread."""
        if self._thread is not None and self._sender is not None:
            self._stop.set()
            self._thread.join(timeout=15)
            self._sender.close()
            self._thread = None


# --- the shipper the agent runs ----------------------------------------------------------------


class LogShipper:
    """Container logs every 5 s, the Caddy access-log tail and their senders, as threads."""

    def __init__(
        self,
        settings: Any,
        podman: Any,
        *,
        collect_interval: float = 5.0,
        tail_interval: float = 0.5,
        persist_interval: float = 1.0,
        queue_entries: int = 20_000,
        queue_bytes: int = 16 * 1024 * 1024,
        drain_timeout: float = 5.0,
    ) -> None:
        if not settings.logs_endpoint:
            raise ValueError("LogShipper needs settings.logs_endpoint")
        self.settings = settings
        self.collect_interval = collect_interval
        self.tail_interval = tail_interval
        self.persist_interval = persist_interval
        self.drain_timeout = drain_timeout
        data_dir = Path(settings.data_dir)
        fsutil.ensure_dir(data_dir, 0o700)
        self.container_sender = LogSender(settings.logs_endpoint, name="container logs", max_entries=queue_entries, max_bytes=queue_bytes)
        self.caddy_sender = LogSender(settings.logs_endpoint, name="caddy logs", max_entries=max(1, queue_entries // 4), max_bytes=max(1024, queue_bytes // 4))
        self.containers = ContainerLogCollector(settings.podman, podman.list_containers, self.container_sender, data_dir / POSITIONS_FILE)
        self.caddy = CaddyLogTailer(Path(settings.caddy_access_log), self.caddy_sender, data_dir / CADDY_POSITION_FILE)

    def collect_once(self) -> int:
        if self.container_sender.congested():
            log.debug("container log queue is over its high-water mark; collection paused")
            return 0
        return self.containers.collect_once()

    def tail_once(self) -> int:
        if self.caddy_sender.congested():
            return 0
        return self.caddy.poll_once()

    def persist_once(self) -> None:
        self.containers.persist()
        self.caddy.persist()

    def run(self, stop: threading.Event) -> None:
        sender_stop = threading.Event()
        senders = [
            threading.Thread(target=s.run, args=(sender_stop, self.drain_timeout), name=f"logship-{n}", daemon=True)
            for n, s in (("containers", self.container_sender), ("caddy", self.caddy_sender))
        ]
        loops = [
            threading.Thread(target=self._loop, args=(stop, self.collect_interval, self.collect_once, self.containers.persist), name="logship-collect", daemon=True),
            threading.Thread(target=self._loop, args=(stop, self.tail_interval, self.tail_once, self.caddy.persist), name="logship-caddy", daemon=True),
        ]
        for thread in senders + loops:
            thread.start()
        stop.wait()
        self.containers.stop_event.set()
        for thread in loops:
            thread.join()
        sender_stop.set()
        for thread in senders:
            thread.join()
        self.persist_once()
        self.caddy.close()
        for sender in (self.container_sender, self.caddy_sender):
            sender.close()
        log.info(
            "log shipping stopped: %d container and %d Caddy entries delivered, %d dropped",
            self.container_sender.stats.delivered, self.caddy_sender.stats.delivered,
            self.container_sender.stats.dropped + self.caddy_sender.stats.dropped,
        )

    def _loop(self, stop: threading.Event, interval: float, work: Callable[[], int], persist: Callable[[], bool]) -> None:
        next_work = time.monotonic()
        next_persist = time.monotonic() + self.persist_interval
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_work:
                done = 0
                try:
                    done = work()
                except Exception:  # noqa: BLE001 - one bad pass must not end log shipping
                    log.exception("log shipping pass failed")
                # A busy source is read again sooner: podman caps a container's log file
                # (10 MB), which at 10,000 lines/s holds only a few seconds.
                pause = min(interval, 1.0) if done >= BUSY_PASS else interval
                next_work = max(next_work + pause, time.monotonic()) if pause == interval else time.monotonic() + pause
            if time.monotonic() >= next_persist:
                try:
                    persist()
                except Exception:  # noqa: BLE001
                    log.exception("saving log positions failed")
                next_persist = time.monotonic() + self.persist_interval
            stop.wait(max(0.0, min(next_work, next_persist) - time.monotonic()))
