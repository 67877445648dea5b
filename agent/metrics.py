"""The OpenMetrics/Prometheus endpoint (off unless `metrics_listen` is set).

Uses prometheus_client for the exposition format (plain text or OpenMetrics, whichever the
scraper asks for) and the process collector (the agent's RSS and CPU); it is imported only
when metrics are on. The figures are read from the Publisher (agent/observe.py) at scrape
time, so components do nothing per scrape and a scrape costs well under 5 ms
(bench/bench_ops.py). It listens on loopback or on a unix socket: the setting refuses
anything else unless `metrics_allow_remote` is set.
"""

from __future__ import annotations

import http.server
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.observe import Publisher

log = logging.getLogger(__name__)

PREFIX = "techulus_agent"


class AgentCollector:
    """Turns the Publisher's counters into metric families, once per scrape."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

        counts, sums, containers = self.publisher.metrics()

        def counter(name: str, doc: str, key: str, labels: list[str]) -> Any:
            family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
            for values, value in sorted(counts.get(key, {}).items()):
                family.add_metric(list(values), value)
            return family

        def summary(name: str, doc: str, key: str, labels: list[str]) -> Any:
            family = SummaryMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
            for values, (count, total) in sorted(sums.get(key, {}).items()):
                family.add_metric(list(values), count_value=int(count), sum_value=total)
            return family

        yield counter("polls", "Expected-state polls by result", "polls", ["result"])
        yield counter("poll_failures", "Failed expected-state polls by kind of failure", "poll_failures", ["kind"])
        yield counter("changes", "Changes by kind and result (applied, failed, backoff)", "changes", ["kind", "result"])
        yield summary("pass_duration_seconds", "Duration of PROCESSING passes", "pass_seconds", [])
        yield summary("podman_call_duration_seconds", "podman commands by verb", "podman", ["verb"])
        yield counter("podman_call_failures", "podman commands that failed, by verb", "podman_failures", ["verb"])
        yield counter("status_reports", "Status reports by result (sent, failed)", "reports", ["result"])
        yield counter("work_items", "Work items by type and result", "work_items", ["type", "result"])
        yield summary("build_duration_seconds", "Builds by result", "builds", ["result"])
        last = GaugeMetricFamily(f"{PREFIX}_last_successful_poll_timestamp_seconds", "Unix time of the last good poll")
        last.add_metric([], self.publisher.last_ok_poll)
        yield last
        by_state: dict[tuple[str, str], int] = {}
        for container in containers:
            key = (container.get("state", ""), container.get("health", ""))
            by_state[key] = by_state.get(key, 0) + 1
        family = GaugeMetricFamily(f"{PREFIX}_containers", "Managed containers by state and health", labels=["state", "health"])
        for (state, health), number in sorted(by_state.items()):
            family.add_metric([state, health], number)
        yield family
        logs = self.publisher.logs()
        if logs is not None:
            shipped = CounterMetricFamily(f"{PREFIX}_log_entries_shipped", "Log entries delivered to VictoriaLogs")
            shipped.add_metric([], logs["shipped"])
            dropped = CounterMetricFamily(f"{PREFIX}_log_entries_dropped", "Log entries dropped (queue full or refused)")
            dropped.add_metric([], logs["dropped"])
            queued = GaugeMetricFamily(f"{PREFIX}_log_queue_entries", "Log entries waiting to be shipped")
            queued.add_metric([], logs["queued"])
            yield from (shipped, dropped, queued)


def registry_for(publisher: Publisher) -> Any:
    from prometheus_client import CollectorRegistry, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(publisher))  # type: ignore[arg-type]
    ProcessCollector(registry=registry)  # process_resident_memory_bytes, process_cpu_seconds_total
    return registry


def scrape(registry: Any, accept: str = "") -> tuple[bytes, str]:
    """The exposition the scraper asked for (OpenMetrics when its Accept says so)."""
    from prometheus_client.exposition import choose_encoder

    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


class _Handler(http.server.BaseHTTPRequestHandler):
    registry: Any = None

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        body, content_type = scrape(self.registry, self.headers.get("Accept", ""))
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - scrapes are not logged
        pass

    def address_string(self) -> str:
        return "local"


class _TcpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, Any]:
        request, _ = super().get_request()
        return request, ("local", 0)  # http.server expects a (host, port) client address


class MetricsServer:
    """Serves /metrics on `address` (("tcp", host, port) or ("unix", path)) until stopped."""

    def __init__(self, address: tuple[Any, ...], publisher: Publisher) -> None:
        self.address = address
        handler = type("Handler", (_Handler,), {"registry": registry_for(publisher)})
        self._handler = handler
        self.server: socketserver.BaseServer | None = None

    def bind(self) -> socketserver.BaseServer:
        if self.address[0] == "unix":
            path = Path(self.address[1])
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_socket():
                path.unlink()  # left by an agent that was killed: the lock says none runs now
            server: socketserver.BaseServer = _UnixServer(str(path), self._handler)
            os.chmod(path, 0o660)
        else:
            host, port = self.address[1], self.address[2]
            server_class = type("Server", (_TcpServer,), {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
            server = server_class((host, port), self._handler)
        self.server = server
        return server

    def run(self, stop: threading.Event) -> None:
        try:
            server = self.bind()
        except OSError as exc:
            log.error("metrics endpoint off: cannot listen on %s: %s", self.describe(), exc.strerror or exc)
            return
        log.info("metrics on %s", self.describe())
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="metrics-http", daemon=True)
        thread.start()
        stop.wait()
        server.shutdown()
        server.server_close()
        if self.address[0] == "unix":
            Path(self.address[1]).unlink(missing_ok=True)

    def describe(self) -> str:
        if self.address[0] == "unix":
            return f"unix:{self.address[1]}"
        host = self.address[1]
        return f"http://[{host}]:{self.address[2]}/metrics" if ":" in host else f"http://{host}:{self.address[2]}/metrics"
