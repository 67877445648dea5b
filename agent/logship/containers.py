"""Container logs (PROTOCOL.md §12.1): `podman logs --timestamps --since` for every managed
container, read in bounded slices, with exact cursors ((timestamp, lines seen at it): podman's
--since is strict and lines share timestamps) persisted behind the sender."""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent import fsutil
from agent.drift import ContainerInfo
from agent.host.run import CommandError, kill_group, popen
from agent.logship.sender import FIELD_VALUE_MAX, MAX_LINE, Checkpoints, LogSender, json_str
from agent.logship.timestamps import format_rfc3339_ns, parse_rfc3339_ns

log = logging.getLogger(__name__)

POSITIONS_FILE = "log-positions.json"


#: Bytes one `podman logs` read may hold (then podman is killed; the rest comes next read),
#: never less than MIN_READ_BYTES even when the queue is nearly full.
READ_BYTES = 8 * 1024 * 1024
MIN_READ_BYTES = 1024 * 1024
#: What a container entry adds to its message (JSON framing, ids, time), for byte budgets.
ENTRY_OVERHEAD = 200


_CONTAINER_ID = re.compile(r"[0-9a-f]{12,64}\Z")


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


def container_entry(message: str, time_text: str, deployment_id: str, service_id: str, stream: str) -> bytes:
    """The §12.2 container entry, field order as the protocol shows it."""
    return (
        '{"_msg":' + json_str(message) + ',"_time":' + json_str(time_text)
        + ',"deployment_id":' + json_str(deployment_id) + ',"service_id":' + json_str(service_id)
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
        deployment = container.deployment_id[:FIELD_VALUE_MAX]
        service = container.service_id[:FIELD_VALUE_MAX]
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
