"""Timestamps as VictoriaLogs and podman write them: RFC 3339 with nanoseconds parsed
and formatted exactly (cursors depend on it), Caddy's float seconds in local time, and a clock
that gives every build-log line its own increasing time."""

from __future__ import annotations

import calendar
import logging
import re
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

log = logging.getLogger(__name__)

_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d\d):(\d\d))\Z"
)


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
