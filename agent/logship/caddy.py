"""Caddy's JSON access log (PROTOCOL.md §12.3): tailed across rename-rotation and truncation,
each "handled request" mapped to an http entry, the byte offset persisted behind the sender."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import fsutil
from agent.logship.sender import FIELD_VALUE_MAX, MAX_LINE, Checkpoints, LogSender
from agent.logship.timestamps import format_local_time, format_rfc3339_ns

log = logging.getLogger(__name__)

CADDY_POSITION_FILE = "caddy-log-position.json"


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
        "service_id": _str(record.get("service_id"))[:FIELD_VALUE_MAX],
        "host": host[:FIELD_VALUE_MAX],
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
