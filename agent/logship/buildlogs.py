"""One build's log stream (PROTOCOL.md §12.4, §13.5): redacted lines, each with its own
increasing `_time`, sent by a sender of its own so a build never waits on VictoriaLogs."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

from agent.logship.sender import MAX_LINE, LogSender, json_str
from agent.logship.timestamps import MonotonicClock, format_rfc3339_ns

log = logging.getLogger(__name__)

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
            ',"build_id":' + json_str(build_id) + ',"service_id":' + json_str(service_id)
            + ',"project_id":' + json_str(project_id) + ',"log_type":"build"}'
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
                self._sender.put(('{"_msg":' + json_str(piece[:MAX_LINE]) + ',"_time":"' + stamp + '"' + self._tail).encode("utf-8"))

    def close(self) -> None:
        """Flush what is queued (up to 10 s) and stop the sender thread."""
        if self._thread is not None and self._sender is not None:
            self._stop.set()
            self._thread.join(timeout=15)
            self._sender.close()
            self._thread = None
