"""A fake VictoriaLogs `/insert/jsonline` endpoint for tests (VictoriaLogs has no package here).

It parses every line of every POST as the real server would, checks the fields the
protocol promises for each `log_type` (PROTOCOL.md §12.2-12.4) and records what is wrong
in `problems`, so a test can assert both "these lines arrived" and "nothing malformed
did". It can answer errors (`fail_with`) or go away entirely (`down()`/`up()`, same port).
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)\Z")

REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "container": {"deployment_id": str, "service_id": str, "stream": str},
    "http": {
        "service_id": str, "host": str, "method": str, "path": str, "status": int,
        "duration_ms": (int, float), "size": int, "client_ip": str,
    },
    "build": {"build_id": str, "service_id": str, "project_id": str},
}


class FakeVictoriaLogs:
    def __init__(self, port: int = 0) -> None:
        self.entries: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.requests = 0
        self.query_strings: list[str] = []
        self.fail_with: int | None = None
        self.is_down = False
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = port
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                if fake.is_down:  # kept-alive connections must not outlive down()
                    self.close_connection = True
                    return
                path, _, query = self.path.partition("?")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if path != "/insert/jsonline" or fake.fail_with is not None:
                    self.send_response(404 if fake.fail_with is None else fake.fail_with)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                fake._ingest(body, self.headers.get("Content-Type", ""), query)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.is_down = False
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Stop listening: connections are refused (open ones dropped) until `up()`."""
        self.is_down = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    close = down

    def _ingest(self, body: bytes, content_type: str, query: str) -> None:
        with self._lock:
            self.requests += 1
            self.query_strings.append(query)
            if content_type != "application/json":
                self.problems.append(f"Content-Type is {content_type!r}")
            if body and not body.endswith(b"\n"):
                self.problems.append("body does not end with a newline")
            for raw in body.split(b"\n"):
                if not raw:
                    continue
                try:
                    entry = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    self.problems.append(f"not JSON ({exc}): {raw[:100]!r}")
                    continue
                problem = check_entry(entry)
                if problem:
                    self.problems.append(f"{problem}: {raw[:200]!r}")
                self.entries.append(entry)

    def of_type(self, log_type: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.entries if e.get("log_type") == log_type]

    def messages(self, log_type: str | None = None) -> list[str]:
        with self._lock:
            return [e["_msg"] for e in self.entries if log_type is None or e.get("log_type") == log_type]

    def wait_for(self, predicate: Any, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()


def check_entry(entry: Any) -> str:
    """What is wrong with one ingested entry, or "" when it is as the protocol says."""
    if not isinstance(entry, dict):
        return "entry is not an object"
    msg = entry.get("_msg")
    if not isinstance(msg, str) or not msg.strip():
        return "_msg missing or blank"
    stamp = entry.get("_time")
    if not isinstance(stamp, str) or not _RFC3339.match(stamp):
        return f"_time {stamp!r} is not RFC 3339"
    log_type = entry.get("log_type")
    if log_type not in REQUIRED:
        return f"unknown log_type {log_type!r}"
    for name, kind in REQUIRED[log_type].items():
        value = entry.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{log_type} entry: field {name} is {value!r}"
    if log_type == "container" and entry["stream"] not in ("stdout", "stderr"):
        return f"stream {entry['stream']!r}"
    if log_type == "http":
        expected = f"{entry['method']} {entry['path']} {entry['status']} {int(entry['duration_ms'])}ms"
        if msg != expected:
            return f"http _msg {msg!r} != {expected!r}"
    return ""
