"""The log shipper the agent runs: container collection, the Caddy tail and their senders as
threads, positions persisted every second, everything drained and saved at shutdown."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import fsutil
from agent.logship.caddy import CADDY_POSITION_FILE, CaddyLogTailer
from agent.logship.containers import POSITIONS_FILE, ContainerLogCollector
from agent.logship.sender import LogSender

log = logging.getLogger(__name__)

#: Entries in one collection pass that make the next pass come sooner.
BUSY_PASS = 2000


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
