"""The one way log entries leave the agent: a bounded FIFO of JSON lines drained by its own
thread into VictoriaLogs' /insert/jsonline, retrying with backoff while it is down, and the
checkpoints that let a source commit a position only once what came before has left the queue."""

from __future__ import annotations

import collections
import itertools
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import urllib3

log = logging.getLogger(__name__)

INSERT_PATH = "/insert/jsonline"
#: VictoriaLogs stream fields: per-service streams instead of one default stream (§17.24).
STREAM_FIELDS = "log_type,service_id"
MAX_LINE = 1024 * 1024


FIELD_VALUE_MAX = 256


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


def json_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)
