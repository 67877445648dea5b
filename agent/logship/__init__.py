"""Ship container, Caddy access and build logs to VictoriaLogs (PROTOCOL.md §12, §13.5).

The package splits shipping by stage: timestamps.py, sender.py (the bounded queue to
VictoriaLogs and the checkpoints behind it), containers.py (podman logs, cursors), caddy.py
(the access-log tail), buildlogs.py (one build's stream), shipper.py (the threads the agent runs).

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

import importlib
import logging
from typing import Any

# Name -> submodule, imported on first access (PEP 562): an agent without a logs endpoint
# only needs buildlogs (and what it uses) for builds, not the shipper's threads and tailers.
_EXPORTS = {
    "BuildLogStream": "buildlogs",
    **dict.fromkeys(("CADDY_POSITION_FILE", "CaddyLogTailer", "FilePosition", "caddy_entry"), "caddy"),
    **dict.fromkeys(
        (
            "ENTRY_OVERHEAD",
            "MIN_READ_BYTES",
            "POSITIONS_FILE",
            "READ_BYTES",
            "ContainerLogCollector",
            "Cursor",
            "LogLine",
            "container_entry",
            "read_podman_logs",
            "split_podman_line",
        ),
        "containers",
    ),
    **dict.fromkeys(("INSERT_PATH", "MAX_LINE", "STREAM_FIELDS", "Checkpoints", "LogSender", "SenderStats"), "sender"),
    **dict.fromkeys(("BUSY_PASS", "LogShipper"), "shipper"),
    **dict.fromkeys(("MonotonicClock", "format_local_time", "format_rfc3339_ns", "parse_rfc3339_ns"), "timestamps"),
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


log = logging.getLogger(__name__)

__all__ = [
    "BUSY_PASS",
    "BuildLogStream",
    "CADDY_POSITION_FILE",
    "CaddyLogTailer",
    "Checkpoints",
    "ContainerLogCollector",
    "Cursor",
    "ENTRY_OVERHEAD",
    "FilePosition",
    "INSERT_PATH",
    "LogLine",
    "LogSender",
    "LogShipper",
    "MAX_LINE",
    "MIN_READ_BYTES",
    "MonotonicClock",
    "POSITIONS_FILE",
    "READ_BYTES",
    "STREAM_FIELDS",
    "SenderStats",
    "caddy_entry",
    "container_entry",
    "format_local_time",
    "format_rfc3339_ns",
    "parse_rfc3339_ns",
    "read_podman_logs",
    "split_podman_line",
]
