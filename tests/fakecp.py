"""A fake Techulus control plane that answers exactly like the real one (PROTOCOL.md §4-§6).

Why: every agent test that talks to "the control plane" talks to this, in-process or as a
separate process, so it must reject what the real control plane rejects, byte for byte
(the fixtures in /work/shared/fixtures/control-plane are replayed against it in
tests/test_contract.py). It re-implements the control plane's side of the cryptography
independently of `agent.crypto`, so a bug there cannot hide itself.

In-process use (pytest)::

    from tests.fakecp import FakeControlPlane

    with FakeControlPlane() as cp:               # 127.0.0.1, free port, real clock
        token = cp.add_token()                   # one-time registration token (24 h)
        ...  agent registers against cp.url ...
        cp.set_expected_state(server_id, {...})  # returned verbatim (dict, str or bytes)
        cp.add_work_item(server_id, "restart", {"deploymentId": "...", "containerId": "..."})
        cp.add_build(service_id="...", project_id="...", secrets={"K": "plain"})
        cp.fail_next(2)                          # next 2 agent requests get 500
        cp.status_reports / cp.completions / cp.build_updates / cp.requests

Authentication follows §5.2 in its order: missing header -> 400, parseInt-lenient timestamp
outside ±60 s -> 401, unknown server -> 404, Ed25519 over `x-timestamp + ":" + body` -> 401.
`clock` (seconds, float) replaces the real clock for the window check, the Date header and
createdAt values; `freeze(ms)` pins it.

Fault injection (each consumed by the next matching agent request; `path` limits a fault
to request paths starting with it): `delay_next(seconds)` (then answers normally),
`fail_next(n, status=500, body=...)`, `respond_next(status, body)` (any canned answer, e.g.
an oversized one or a redirect), `close_next(n)` (drop the connection without answering;
`after_processing=True`: act on the request, then drop the answer),
`garbage_next(n)` (200 with truncated JSON), `drip_next(body, pieces, interval)` (a slow
body). Admin (`/__test__/`) requests are never faulted nor recorded.

Standalone use (e.g. from an nspawn installer test; run from the repo root with the
repo's Python, which has `cryptography`)::

    python -m tests.fakecp [--host 127.0.0.1] [--port 0] [--seed seed.json]
                           [--token TOKEN ...] [--encryption-key HEX | --no-encryption-key]
                           [--url-file F] [--state-file F]

It prints its URL (`http://127.0.0.1:PORT`) as the first line on stdout (and writes it
atomically to --url-file), then serves until SIGTERM/SIGINT. --state-file is rewritten
atomically after every agent request with the snapshot described below. The seed file
(and `POST /__test__/seed`) is a JSON object with any of::

    {"encryptionKey": "<64 hex>" | null,
     "tokens": [{"token": "...", "serverId": "<24 hex, optional>", "createdAt": <ms, optional>}],
     "servers": [{"id", "signingPublicKey", "wireguardPublicKey", "subnetId", "publicIp"}],
     "expectedStates": {"<serverId>": <document>},
     "workItems": [{"serverId", "type", "payload": <object or string>, "id": optional}],
     "builds": [{"id", "serviceId", "projectId", "commitSha", "branch", "commitMessage",
                 "githubRepoId", "cloneUrl", "imageUri", "secrets": {"K": "plaintext"}}],
     "domains": {"app.example.com": 200},
     "services": [{"id"?, "name", "image", "replicas": {"<serverId>": 1},
                   "healthCheck"?: {"cmd", "interval"?, "timeout"?, "retries"?, "startPeriod"?},
                   "ports"?: [{"containerPort": 80, "domain"?: "app.example.com"}], "hostname"?}]}

Unauthenticated admin endpoints (JSON in, JSON out):
    GET  /__test__/snapshot          servers, statusReports, completions, buildUpdates,
                                     workItems, builds
    GET  /__test__/requests          every recorded agent request
    POST /__test__/seed              body as the seed file
    POST /__test__/tokens            {"token"?, "serverId"?, "createdAt"?} -> {"token"}
    PUT  /__test__/expected-state/ID body returned verbatim from now on; DELETE: default
    POST /__test__/work-items        {"serverId", "type", "payload", "id"?} -> {"id"}
    POST /__test__/builds            as one "builds" entry -> {"id"}
    POST /__test__/builds/ID         {"status": "cancelled"} (any status)
    POST /__test__/faults            {"kind": "status"|"close"|"lose_answer"|"garbage"|"delay"
                                      |"drip", "count", "status", "body", "seconds", "path"}
    POST /__test__/clock             {"nowMs": <int>} freezes, {"nowMs": null} real time,
                                     {"offsetSeconds": -200} runs 200 s behind
    POST /__test__/services          as one "services" entry -> {"id"}
    POST /__test__/services/ID/deploy                deployService -> {"rolloutId"}; 409 {"error"}
                                     when refused ("A deployment is already in progress")
    POST /__test__/services/ID/image {"image", "deploy"?: true} the service's new image (and deploy)
    GET  /__test__/rollout           services, deployments, rollouts and the timeline of every
                                     status change with its time (ms), for measurements

Rollouts (opt-in): a server whose expected state no test has set verbatim gets the document
the real control plane computes from its deployment rows, and every status report advances
the rows exactly as the real one does (ROLLOUT.md; tests/fakerollout.py)::

    svc = cp.add_service("web", "localhost/app:v1", {server_id: 1}, health_cmd=None,
                         ports=[(80, "app.test")])
    rollout = cp.deploy_service(svc.id)          # pending row, new IP, a `deploy` work item
    cp.redeploy(svc.id, "localhost/app:v2")      # new image for every row, then deployService
    cp.rollout_status(rollout.id), cp.deployment_rows(svc.id), cp.rollout_snapshot()

A test that sets an expected state verbatim keeps it (`on_status` remains a hook to change
it when a report arrives). Not modelled: GitHub, the offline flag, the servers list's
lazy offline marking, services' env and volumes.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import email.utils
import http.client
import json
import logging
import os
import re
import secrets
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import load_der_public_key

from tests.fakerollout import Port, Rollout, RolloutModel, RolloutRefused, ServerView, Service

log = logging.getLogger(__name__)

# The fixtures' ENCRYPTION_KEY; any 64-hex value works.
DEFAULT_ENCRYPTION_KEY = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
SPKI_ED25519_PREFIX = bytes.fromhex("302a300506032b6570032100")
TIMESTAMP_WINDOW_MS = 60_000
TOKEN_LIFETIME_MS = 24 * 3600 * 1000
API = "/api/v1/agent"
ADMIN = "/__test__"

# Exact error bodies of the real control plane (fixtures 02, 03, 05-08 and §4-§6).
ERR_MISSING_HEADERS = "Missing required headers: x-server-id, x-timestamp, x-signature"
ERR_TIMESTAMP = "Request timestamp expired or invalid"
ERR_UNKNOWN_SERVER = "Server not found or not registered"
ERR_SIGNATURE = "Invalid signature"
ERR_MISSING_FIELDS = "Missing required fields: token, wireguardPublicKey, signingPublicKey"
ERR_TOKEN = "Invalid, expired, or already used token"
ERR_INTERNAL = "Internal server error"
ERR_INVALID_JSON = "Invalid JSON body"
ERR_ALREADY_CLAIMED = "Build already claimed or not found"
ERR_NOT_CLAIMED = "Build not found or not claimed by this agent"
ERR_BUILD_NOT_FOUND = "Build not found"
ERR_DOMAIN_NOT_ALLOWED = "Domain not allowed"
ERR_DOMAIN_UNAVAILABLE = "Service not currently available"
# Not captured in the fixtures; the real wording may differ (only the status matters to Caddy).
ERR_DOMAIN_MISSING = "Domain parameter is required"

GARBAGE_JSON = b'{"containers":[{"deploymentId":"'
NEXT_404_PAGE = b"<!DOCTYPE html><html><body><h1>404</h1><p>This page could not be found.</p></body></html>"

# --- the control plane's side of the cryptography (independent of agent.crypto) -------------

_B64_KEEP = re.compile(r"[^A-Za-z0-9+/]")


def js_parse_int(text: str) -> int | None:
    """JavaScript `Number.parseInt(text, 10)`: leading whitespace and sign, then digits up to
    the first non-digit ("123abc" -> 123); None where JS gives NaN."""
    match = re.match(r"[\s\ufeff]*([+-]?)(\d+)", text)
    if not match:
        return None
    value = int(match.group(2))
    return -value if match.group(1) == "-" else value


def node_base64_decode(text: str) -> bytes:
    """Node's lenient `Buffer.from(text, "base64")`: accepts the URL-safe alphabet, skips
    characters outside the alphabet, stops at the first '=', never throws."""
    cleaned = text.split("=", 1)[0].replace("-", "+").replace("_", "/")
    cleaned = _B64_KEEP.sub("", cleaned)
    usable = len(cleaned) - (len(cleaned) % 4 == 1)  # a lone trailing sextet carries no byte
    cleaned = cleaned[:usable]
    return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4))


def node_request_text(raw: bytes) -> str:
    """What Next's `request.text()` yields: UTF-8 with replacement characters, BOM stripped."""
    text = raw.decode("utf-8", errors="replace")
    return text[1:] if text.startswith("\ufeff") else text


def verify_signature(
    signing_public_key_b64: str, timestamp_header: str, body_text: str, signature_b64: str
) -> bool:
    """The CP's `verifySignature`: SPKI(prefix || 32-byte key), Ed25519 over `ts:body` (UTF-8)."""
    raw_key = node_base64_decode(signing_public_key_b64)
    signature = node_base64_decode(signature_b64)
    if len(raw_key) != 32 or len(signature) != 64:
        return False
    public_key = load_der_public_key(SPKI_ED25519_PREFIX + raw_key)
    if not isinstance(public_key, Ed25519PublicKey):
        return False
    try:
        public_key.verify(signature, f"{timestamp_header}:{body_text}".encode())
    except InvalidSignature:
        return False
    return True


def encrypt_secret(hex_key: str, plaintext: str, iv: bytes | None = None) -> str:
    """The CP's `encrypt`: std_base64(IV[12] || TAG[16] || CIPHERTEXT), AES-256-GCM, no AAD."""
    nonce = iv if iv is not None else os.urandom(12)
    sealed = AESGCM(bytes.fromhex(hex_key)).encrypt(nonce, plaintext.encode(), None)
    return base64.b64encode(nonce + sealed[-16:] + sealed[:-16]).decode()


def iso_ms(ms: int) -> str:
    """JavaScript `Date.prototype.toISOString()`."""
    moment = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(milliseconds=ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


def js_json(value: Any) -> bytes:
    """`JSON.stringify` output: compact, non-ASCII unescaped."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def js_json_parse(text: str) -> Any:
    """`JSON.parse`: raises ValueError on anything JS would reject (NaN, Infinity, empty)."""
    return json.loads(text, parse_constant=_reject_constant)


# --- state ---------------------------------------------------------------------------------


@dataclass
class Server:
    id: str
    agent_token: str | None = None
    token_created_ms: int = 0
    token_used_ms: int | None = None
    signing_public_key: str | None = None
    wireguard_public_key: str | None = None
    subnet_id: int | None = None
    wireguard_ip: str | None = None
    public_ip: str | None = None
    status: str = "pending"
    last_heartbeat_ms: int | None = None
    resources: dict[str, Any] | None = None

    def peer(self) -> dict[str, Any]:
        return {
            "publicKey": self.wireguard_public_key,
            "allowedIps": f"10.100.{self.subnet_id}.0/24,10.200.{self.subnet_id}.0/24",
            "endpoint": f"{self.public_ip}:51820" if self.public_ip else None,
        }

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "subnetId": self.subnet_id,
            "wireguardIp": self.wireguard_ip,
            "wireguardPublicKey": self.wireguard_public_key,
            "signingPublicKey": self.signing_public_key,
            "publicIp": self.public_ip,
            "status": self.status,
            "lastHeartbeat": self.last_heartbeat_ms,
            "resources": self.resources,
        }


@dataclass
class WorkItem:
    id: str
    server_id: str
    type: str
    payload: str
    created_ms: int
    status: str = "pending"

    def row(self) -> dict[str, Any]:
        # Key order of the real rows (fixture 10).
        return {
            "id": self.id,
            "serverId": self.server_id,
            "type": self.type,
            "payload": self.payload,
            "status": self.status,
            "createdAt": iso_ms(self.created_ms),
            "startedAt": None,
            "attempts": 0,
        }


@dataclass
class Build:
    id: str
    service_id: str
    project_id: str
    commit_sha: str = "HEAD"
    commit_message: str | None = None
    branch: str = "main"
    github_repo_id: str | None = None
    clone_url: str = "https://github.com/example/app.git"
    image_uri: str = ""
    secrets: dict[str, str] = field(default_factory=dict)  # already encrypted
    status: str = "pending"
    claimed_by: str | None = None
    claimed_ms: int | None = None
    started_ms: int | None = None
    completed_ms: int | None = None
    error: str | None = None
    # (status, body) answered to the claim after marking the build claimed, like the real
    # CP's failures after the claim (§6.6); None answers 200.
    claim_error: tuple[int, dict[str, Any]] | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "serviceId": self.service_id,
            "projectId": self.project_id,
            "commitSha": self.commit_sha,
            "status": self.status,
            "claimedBy": self.claimed_by,
            "startedAt": self.started_ms,
            "completedAt": self.completed_ms,
            "error": self.error,
            "imageUri": self.image_uri,
        }


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # without the query
    query: str
    headers: tuple[tuple[str, str], ...]  # names as sent, in order
    body: bytes
    time_ms: int
    status: int | None  # None: the connection was dropped
    response: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)

    def snapshot(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": [list(h) for h in self.headers],
            "body": self.body.decode("utf-8", errors="replace"),
            "time": self.time_ms,
            "status": self.status,
            "response": self.response.decode("utf-8", errors="replace"),
        }


@dataclass(frozen=True)
class StatusReport:
    server_id: str
    time_ms: int
    report: dict[str, Any]


@dataclass(frozen=True)
class Completion:
    server_id: str
    time_ms: int
    id: Any
    status: Any
    error: Any


@dataclass(frozen=True)
class BuildUpdate:
    server_id: str
    time_ms: int
    build_id: str
    status: Any
    error: Any


@dataclass
class Fault:
    kind: str  # status | close | lose_answer | garbage | delay | drip
    count: int = 1
    status: int = 500
    body: bytes = b""
    seconds: float = 0.0
    pieces: int = 2
    path: str = ""
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    content_length: bool = True


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    close: bool = False  # drop the connection instead of answering
    delay: float = 0.0
    drip_pieces: int = 0
    drip_interval: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    content_length: bool = True  # False: no Content-Length, the end of the body is the close
    accepted_report: StatusReport | None = None  # for FakeControlPlane.on_status


def _build_summary(build: Build) -> dict[str, Any]:
    """The fields pending-builds (§6.5) and claim (§6.6) share, in the CP's key order."""
    return {
        "id": build.id,
        "commitSha": build.commit_sha,
        "commitMessage": build.commit_message,
        "branch": build.branch,
        "serviceId": build.service_id,
    }


def _error(status: int, message: str) -> Response:
    return Response(status, js_json({"error": message}))


def _ok(value: Any) -> Response:
    return Response(200, js_json(value))


_OK = {"ok": True}


class FakeControlPlane:
    """An in-memory control plane served over HTTP on loopback; see the module docstring."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        encryption_key: str | None = DEFAULT_ENCRYPTION_KEY,
        clock: Callable[[], float] | None = None,
        new_id: Callable[[], str] | None = None,
        state_file: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.encryption_key = encryption_key
        self._clock = clock or time.time
        self._new_id = new_id or (lambda: str(uuid.uuid4()))
        self.state_file = state_file
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._servers: dict[str, Server] = {}
        self._expected: dict[str, bytes] = {}
        self._work: list[WorkItem] = []
        self._builds: list[Build] = []
        self._domains: dict[str, int] = {}
        self._faults: list[Fault] = []
        self._requests: list[RecordedRequest] = []
        self._reports: list[StatusReport] = []
        self._completions: list[Completion] = []
        self._build_updates: list[BuildUpdate] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # The rollout stage machine (tests/fakerollout.py); it speaks for a server whose
        # expected state no test has set verbatim.
        self.rollout = RolloutModel(self._server_views, self._queue_work, self.now_ms, lambda: self._new_id())
        # Called (outside the lock) after every accepted status report; tests use it to move
        # expected states along like the CP's rollout logic would.
        self.on_status: Callable[[str, dict[str, Any]], None] | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> FakeControlPlane:
        httpd = ThreadingHTTPServer((self.host, self.port), _Handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False
        httpd.cp = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None

    def __enter__(self) -> FakeControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- clock ----------------------------------------------------------------------------

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def freeze(self, ms: int | None) -> None:
        """Pin the clock at `ms` (Unix milliseconds); None returns to real time."""
        with self._lock:
            self._clock = time.time if ms is None else (lambda: ms / 1000)

    def set_clock(self, clock: Callable[[], float]) -> None:
        """Any clock (seconds), e.g. `lambda: time.time() - 200` for a CP running behind."""
        with self._lock:
            self._clock = clock

    # --- seeding --------------------------------------------------------------------------

    def add_token(
        self, token: str | None = None, *, server_id: str | None = None, created_ms: int | None = None
    ) -> str:
        """A pending server row with a one-time registration token (64 hex by default)."""
        token = token or secrets.token_hex(32)
        with self._lock:
            server_id = server_id or secrets.token_hex(12)
            if server_id in self._servers:
                raise ValueError(f"server {server_id} exists already")
            created = self.now_ms() if created_ms is None else created_ms
            self._servers[server_id] = Server(server_id, agent_token=token, token_created_ms=created)
        return token

    def add_server(
        self,
        signing_public_key: str,
        *,
        server_id: str | None = None,
        wireguard_public_key: str | None = None,
        subnet_id: int | None = None,
        public_ip: str | None = None,
        status: str = "online",
    ) -> Server:
        """A server that is already registered (skips §4 for tests that do not need it)."""
        with self._lock:
            server_id = server_id or secrets.token_hex(12)
            if server_id in self._servers:
                raise ValueError(f"server {server_id} exists already")
            subnet = subnet_id or self._free_subnet()
            server = Server(
                server_id,
                token_used_ms=self.now_ms(),
                signing_public_key=signing_public_key,
                wireguard_public_key=wireguard_public_key or base64.b64encode(os.urandom(32)).decode(),
                subnet_id=subnet,
                wireguard_ip=f"10.100.{subnet}.1",
                public_ip=public_ip,
                status=status,
            )
            self._servers[server_id] = server
            return server

    def server(self, server_id: str) -> Server:
        with self._lock:
            return self._servers[server_id]

    @property
    def servers(self) -> list[Server]:
        with self._lock:
            return list(self._servers.values())

    def set_expected_state(self, server_id: str, document: Any) -> None:
        """Answer `document` (dict/list -> JSON; str/bytes verbatim) to this server's polls."""
        if isinstance(document, bytes):
            raw = document
        elif isinstance(document, str):
            raw = document.encode()
        else:
            raw = js_json(document)
        with self._lock:
            self._expected[server_id] = raw

    def clear_expected_state(self, server_id: str) -> None:
        with self._lock:
            self._expected.pop(server_id, None)

    def default_expected_state(self, server_id: str) -> dict[str, Any]:
        """What the CP sends a server with no deployments: empty sections and its peers."""
        with self._lock:
            return {
                "containers": [],
                "dns": {"records": []},
                "caddy": {"routes": []},
                "wireguard": {"peers": self._peers_for(server_id)},
            }

    # --- rollouts (tests/fakerollout.py) -------------------------------------------------

    def add_service(
        self,
        name: str,
        image: str,
        replicas: dict[str, int],
        *,
        service_id: str | None = None,
        health_cmd: str | None = None,
        health: dict[str, int | None] | None = None,
        ports: list[tuple[int, str | None]] | None = None,
        hostname: str | None = None,
    ) -> Service:
        """A service (no deployment yet) placed as `replicas` ({serverId: count}); `ports` are
        (containerPort, public domain or None); `health` holds interval/timeout/retries/startPeriod."""
        with self._lock:
            return self.rollout.add_service(
                name, image, replicas, service_id=service_id, health_cmd=health_cmd, health=health,
                ports=[Port(port, domain) for port, domain in ports or []], hostname=hostname,
            )  # fmt: skip

    def deploy_service(self, service_id: str) -> Rollout:
        """deployService: a new rollout, or RolloutRefused (e.g. one is already in progress)."""
        with self._lock:
            return self.rollout.deploy_service(service_id)

    def update_image(self, service_id: str, image: str) -> None:
        """updateServiceConfig: every listed deployment of the service shows `image` at once."""
        with self._lock:
            self.rollout.update_image(service_id, image)

    def redeploy(self, service_id: str, image: str | None = None) -> Rollout:
        """update_image (when given) and deploy_service in one step, as a finished build does."""
        with self._lock:
            return self.rollout.redeploy(service_id, image)

    def deployment_rows(self, service_id: str | None = None) -> list[dict[str, Any]]:
        """Copies of the deployment rows (as in the rollout snapshot), oldest first."""
        with self._lock:
            return [d.snapshot() for d in self.rollout.rows(service_id)]

    def rollout_status(self, rollout_id: str) -> str:
        with self._lock:
            return self.rollout.rollouts[rollout_id].status

    def rollout_snapshot(self) -> dict[str, Any]:
        """services, deployments, rollouts and the timeline of status changes (with times)."""
        with self._lock:
            return self.rollout.snapshot()

    def _server_views(self) -> list[ServerView]:
        return [ServerView(s.id, s.subnet_id, s.status == "online") for s in self._servers.values()]

    def _queue_work(self, server_id: str, type: str, payload: dict[str, Any]) -> str:
        return self.add_work_item(server_id, type, payload)

    def add_work_item(
        self,
        server_id: str,
        type: str,
        payload: Any,
        *,
        item_id: str | None = None,
        created_ms: int | None = None,
    ) -> str:
        """Queue a pending item; `payload` objects are JSON-encoded into the string the CP sends."""
        text = payload if isinstance(payload, str) else js_json(payload).decode()
        with self._lock:
            item = WorkItem(
                item_id or self._new_id(),
                server_id,
                type,
                text,
                self.now_ms() if created_ms is None else created_ms,
            )
            self._work.append(item)
            return item.id

    def work_items(self, server_id: str | None = None) -> list[WorkItem]:
        """All items (any status), oldest first."""
        with self._lock:
            return [WorkItem(**vars(i)) for i in self._work if server_id is None or i.server_id == server_id]

    def add_build(
        self,
        *,
        service_id: str | None = None,
        project_id: str | None = None,
        build_id: str | None = None,
        commit_sha: str = "HEAD",
        commit_message: str | None = None,
        branch: str = "main",
        github_repo_id: str | None = None,
        clone_url: str = "https://github.com/example/app.git",
        image_uri: str | None = None,
        secrets: dict[str, str] | None = None,
        encrypted_secrets: dict[str, str] | None = None,
        registry: str = "registry.internal:5000",
        claim_error: tuple[int, dict[str, Any]] | None = None,
    ) -> str:
        """A pending build; `secrets` are plaintext (encrypted with the CP key here)."""
        service_id = service_id or str(uuid.uuid4())
        project_id = project_id or str(uuid.uuid4())
        sealed = dict(encrypted_secrets or {})
        if secrets:
            if not self.encryption_key:
                raise ValueError("plaintext build secrets need an encryption key")
            sealed.update({k: encrypt_secret(self.encryption_key, v) for k, v in secrets.items()})
        tag = "latest" if commit_sha == "HEAD" else commit_sha
        with self._lock:
            build = Build(
                build_id or self._new_id(),
                service_id,
                project_id,
                commit_sha,
                commit_message,
                branch,
                github_repo_id,
                clone_url,
                image_uri or f"{registry}/{project_id}/{service_id}:{tag}",
                sealed,
                claim_error=claim_error,
            )
            self._builds.append(build)
            return build.id

    def set_build_status(self, build_id: str, status: str) -> None:
        """E.g. "cancelled", as a user cancelling the build in the UI."""
        with self._lock:
            self._build(build_id).status = status

    def build(self, build_id: str) -> Build:
        with self._lock:
            return Build(**vars(self._build(build_id)))

    def add_domain(self, domain: str, status: int = 200) -> None:
        """The answer of the Caddy on-demand TLS check: 200, 404 or 503."""
        with self._lock:
            self._domains[domain] = status

    def seed(self, data: dict[str, Any]) -> None:
        """Apply a seed document (module docstring); unknown keys are an error."""
        known = {
            "encryptionKey",
            "tokens",
            "servers",
            "expectedStates",
            "workItems",
            "builds",
            "domains",
            "services",
        }
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown seed keys: {sorted(unknown)}")
        if "encryptionKey" in data:
            self.encryption_key = data["encryptionKey"] or None
        for token in data.get("tokens", []):
            if isinstance(token, str):
                token = {"token": token}
            self.add_token(
                token.get("token"), server_id=token.get("serverId"), created_ms=token.get("createdAt")
            )
        for server in data.get("servers", []):
            self.add_server(
                server["signingPublicKey"],
                server_id=server.get("id"),
                wireguard_public_key=server.get("wireguardPublicKey"),
                subnet_id=server.get("subnetId"),
                public_ip=server.get("publicIp"),
                status=server.get("status", "online"),
            )
        for server_id, document in data.get("expectedStates", {}).items():
            self.set_expected_state(server_id, document)
        for item in data.get("workItems", []):
            self.add_work_item(
                item["serverId"], item["type"], item.get("payload", {}), item_id=item.get("id")
            )
        for build in data.get("builds", []):
            self.add_build(
                build_id=build.get("id"),
                service_id=build.get("serviceId"),
                project_id=build.get("projectId"),
                commit_sha=build.get("commitSha", "HEAD"),
                commit_message=build.get("commitMessage"),
                branch=build.get("branch", "main"),
                github_repo_id=build.get("githubRepoId"),
                clone_url=build.get("cloneUrl", "https://github.com/example/app.git"),
                image_uri=build.get("imageUri"),
                secrets=build.get("secrets"),
                encrypted_secrets=build.get("encryptedSecrets"),
            )
        for domain, status in data.get("domains", {}).items():
            self.add_domain(domain, int(status))
        for service in data.get("services", []):
            health = service.get("healthCheck") or {}
            self.add_service(
                str(service["name"]),
                str(service["image"]),
                {str(k): int(v) for k, v in service["replicas"].items()},
                service_id=service.get("id"),
                health_cmd=health.get("cmd"),
                health={k: health.get(k) for k in ("interval", "timeout", "retries", "startPeriod")},
                ports=[(int(p["containerPort"]), p.get("domain")) for p in service.get("ports", [])],
                hostname=service.get("hostname"),
            )

    # --- faults ---------------------------------------------------------------------------

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def fail_next(
        self, count: int = 1, status: int = 500, body: bytes | str = b"", *, path: str = ""
    ) -> None:
        self.respond_next(
            status, body, count=count, path=path, content_type=None if not body else "application/json"
        )

    def respond_next(
        self,
        status: int,
        body: bytes | str | dict[str, Any],
        *,
        count: int = 1,
        path: str = "",
        content_type: str | None = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next `count` requests with this, e.g. an oversized body or a redirect."""
        raw = body.encode() if isinstance(body, str) else js_json(body) if isinstance(body, dict) else body
        self.add_fault(
            Fault(
                "status",
                count,
                status,
                raw,
                path=path,
                content_type=content_type,
                headers=dict(headers or {}),
            )
        )

    def close_next(self, count: int = 1, *, path: str = "", after_processing: bool = False) -> None:
        """Drop the connection without an answer; with `after_processing` the request takes
        effect first (the CP did the work, the agent never hears of it)."""
        self.add_fault(Fault("lose_answer" if after_processing else "close", count, path=path))

    def garbage_next(self, count: int = 1, *, path: str = "") -> None:
        self.add_fault(Fault("garbage", count, 200, GARBAGE_JSON, path=path))

    def delay_next(self, seconds: float, count: int = 1, *, path: str = "") -> None:
        self.add_fault(Fault("delay", count, seconds=seconds, path=path))

    def drip_next(
        self,
        body: bytes,
        pieces: int,
        interval: float,
        *,
        count: int = 1,
        path: str = "",
        content_length: bool = True,
    ) -> None:
        """Answer 200 `body` in `pieces` parts with `interval` seconds between them; without
        `content_length` the body ends when the connection closes."""
        self.add_fault(
            Fault(
                "drip",
                count,
                200,
                body,
                seconds=interval,
                pieces=pieces,
                path=path,
                content_length=content_length,
            )
        )

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # --- records --------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_to(self, path: str, method: str | None = None) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path and (method is None or r.method == method)]

    @property
    def status_reports(self) -> list[StatusReport]:
        with self._lock:
            return list(self._reports)

    @property
    def completions(self) -> list[Completion]:
        with self._lock:
            return list(self._completions)

    @property
    def build_updates(self) -> list[BuildUpdate]:
        with self._lock:
            return list(self._build_updates)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "servers": [s.snapshot() for s in self._servers.values()],
                "statusReports": [
                    {"serverId": r.server_id, "time": r.time_ms, "report": r.report} for r in self._reports
                ],
                "completions": [
                    {
                        "serverId": c.server_id,
                        "time": c.time_ms,
                        "id": c.id,
                        "status": c.status,
                        "error": c.error,
                    }
                    for c in self._completions
                ],
                "buildUpdates": [
                    {
                        "serverId": u.server_id,
                        "time": u.time_ms,
                        "buildId": u.build_id,
                        "status": u.status,
                        "error": u.error,
                    }
                    for u in self._build_updates
                ],
                "workItems": [i.row() for i in self._work],
                "builds": [b.snapshot() for b in self._builds],
            }

    # --- a raw client for tests -----------------------------------------------------------

    def send(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | str = b"",
        timeout: float = 5.0,
    ) -> tuple[int, bytes]:
        """Send exactly these headers and body (no Content-Type unless given); (status, body)."""
        raw = body.encode() if isinstance(body, str) else body
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            connection.putrequest(method, path, skip_accept_encoding=True)
            for name, value in (headers or {}).items():
                connection.putheader(name, value)
            if raw or method in ("POST", "PUT", "PATCH"):
                connection.putheader("Content-Length", str(len(raw)))
            connection.endheaders(raw or None)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    # --- request handling -----------------------------------------------------------------

    def handle(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> Response:
        """Answer one HTTP request (everything but the socket)."""
        parts = urlsplit(target)
        path, query = parts.path, parts.query
        if path.startswith(ADMIN + "/"):
            return self._admin(method, path[len(ADMIN) :], body)
        fault = self._take_fault(path)
        processed = fault is None or fault.kind in ("delay", "lose_answer")
        response = None if processed else self._fault_response(fault)  # type: ignore[arg-type]
        if response is None:
            with self._lock:
                response = self._route(method, path, query, headers, body)
            if fault is not None:
                response.delay = fault.seconds
                # Processed, then the answer is lost on the way back (a lost acknowledgement).
                response.close = fault.kind == "lose_answer"
        with self._lock:
            self._requests.append(
                RecordedRequest(
                    method,
                    path,
                    query,
                    tuple(headers),
                    body,
                    self.now_ms(),
                    None if response.close else response.status,
                    response.body,
                )
            )
        self._write_state_file()
        if response.accepted_report is not None and self.on_status is not None:
            self.on_status(response.accepted_report.server_id, response.accepted_report.report)
        return response

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if path.startswith(fault.path):
                    fault.count -= 1
                    if fault.count <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    @staticmethod
    def _fault_response(fault: Fault) -> Response:
        if fault.kind == "close":
            return Response(0, close=True)
        if fault.kind == "drip":
            return Response(
                200,
                fault.body,
                drip_pieces=max(1, fault.pieces),
                drip_interval=fault.seconds,
                content_length=fault.content_length,
            )
        return Response(
            fault.status, fault.body, content_type=fault.content_type, headers=dict(fault.headers)
        )

    def _route(
        self, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes
    ) -> Response:
        if path == "/api/v1/caddy/check":
            return self._caddy_check(method, query)
        if path == f"{API}/register":
            return self._register(body) if method == "POST" else Response(405, content_type=None)
        routes: list[tuple[str, str, Callable[..., Response], bool]] = [
            ("GET", r"/expected-state", self._expected_state, False),
            ("POST", r"/status", self._status, True),
            ("GET", r"/work-queue", self._work_queue, False),
            ("POST", r"/work-queue", self._complete, True),
            ("GET", r"/pending-builds", self._pending_builds, False),
            ("POST", r"/builds/(?P<id>[^/]+)/claim", self._claim, False),
            ("POST", r"/builds/(?P<id>[^/]+)/status", self._post_build_status, True),
            ("GET", r"/builds/(?P<id>[^/]+)/status", self._get_build_status, False),
        ]
        path_known = False
        for route_method, pattern, handler, signs_body in routes:
            match = re.fullmatch(re.escape(API) + pattern, path)
            if not match:
                continue
            path_known = True
            if route_method != method:
                continue
            text = node_request_text(body) if signs_body else ""
            server_or_error = self._authenticate(headers, text)
            if isinstance(server_or_error, Response):
                return server_or_error
            return handler(server_or_error, text, **match.groupdict())
        if path_known:
            return Response(405, content_type=None)
        return Response(404, NEXT_404_PAGE, content_type="text/html; charset=utf-8")

    def _authenticate(self, headers: list[tuple[str, str]], body_text: str) -> Server | Response:
        """§5.2, in its order."""

        def header(name: str) -> str:
            # Fetch's Headers.get joins repeated headers with ", ".
            return ", ".join(v.strip() for k, v in headers if k.lower() == name)

        server_id, timestamp, signature = header("x-server-id"), header("x-timestamp"), header("x-signature")
        if not server_id or not timestamp or not signature:
            return _error(400, ERR_MISSING_HEADERS)
        parsed = js_parse_int(timestamp)
        if parsed is None or abs(self.now_ms() - parsed) > TIMESTAMP_WINDOW_MS:
            return _error(401, ERR_TIMESTAMP)
        server = self._servers.get(server_id)
        if server is None or not server.signing_public_key:
            return _error(404, ERR_UNKNOWN_SERVER)
        if not verify_signature(server.signing_public_key, timestamp, body_text, signature):
            return _error(401, ERR_SIGNATURE)
        return server

    # --- §4 registration -------------------------------------------------------------------

    def _register(self, body: bytes) -> Response:
        try:
            data = js_json_parse(node_request_text(body))
        except ValueError:
            return _error(500, ERR_INTERNAL)
        if data is None:
            return _error(500, ERR_INTERNAL)  # destructuring null throws
        fields = data if isinstance(data, dict) else {}
        token = fields.get("token")
        wireguard_key = fields.get("wireguardPublicKey")
        signing_key = fields.get("signingPublicKey")
        public_ip = fields.get("publicIp")
        if not token or not wireguard_key or not signing_key:
            return _error(400, ERR_MISSING_FIELDS)
        now = self.now_ms()
        server = next(
            (
                s
                for s in self._servers.values()
                if s.agent_token == token
                and s.token_used_ms is None
                and s.token_created_ms > now - TOKEN_LIFETIME_MS
            ),
            None,
        )
        if server is None:
            return _error(401, ERR_TOKEN)
        subnet = self._free_subnet()
        if subnet is None:
            return _error(500, ERR_INTERNAL)
        server.signing_public_key = str(signing_key)
        server.wireguard_public_key = str(wireguard_key)
        server.subnet_id = subnet
        server.wireguard_ip = f"10.100.{subnet}.1"
        server.public_ip = str(public_ip) if public_ip else None
        server.token_used_ms = now
        server.status = "online"
        server.last_heartbeat_ms = now
        for other in self._servers.values():
            if other.id != server.id and other.status == "online" and other.subnet_id is not None:
                self.add_work_item(other.id, "update_wireguard", {"peers": self._peers_for(other.id)})
        answer: dict[str, Any] = {
            "serverId": server.id,
            "subnetId": subnet,
            "wireguardIp": server.wireguard_ip,
            "peers": self._peers_for(server.id),
        }
        if self.encryption_key:
            answer["encryptionKey"] = self.encryption_key
        return _ok(answer)

    def _free_subnet(self) -> int | None:
        used = {s.subnet_id for s in self._servers.values() if s.subnet_id is not None}
        return next((n for n in range(1, 256) if n not in used), None)

    def _peers_for(self, server_id: str) -> list[dict[str, Any]]:
        return [
            s.peer()
            for s in self._servers.values()
            if s.id != server_id and s.wireguard_public_key and s.subnet_id is not None
        ]

    # --- §6 agent endpoints ----------------------------------------------------------------

    def _expected_state(self, server: Server, _text: str) -> Response:
        raw = self._expected.get(server.id)
        if raw is None:
            # With no service this is the default document (empty sections, the peers).
            raw = js_json(self.rollout.expected_state(server.id, self._peers_for(server.id)))
        return Response(200, raw)

    def _status(self, server: Server, text: str) -> Response:
        try:
            report = js_json_parse(text)
        except ValueError:
            return _error(400, ERR_INVALID_JSON)
        # The CP dereferences report.containers.length unguarded: Next's bare 500 (edge cases).
        if not isinstance(report, dict) or not isinstance(report.get("containers"), list):
            return Response(500, b"", content_type=None)
        now = self.now_ms()
        server.last_heartbeat_ms = now
        server.status = "online"
        if isinstance(report.get("resources"), dict):
            server.resources = report["resources"]
        if isinstance(report.get("publicIp"), str) and report["publicIp"]:
            server.public_ip = report["publicIp"]
        self.rollout.on_report(server.id, report)  # steps 2-4, after step 1 above
        accepted = StatusReport(server.id, now, report)
        self._reports.append(accepted)
        response = _ok(_OK)
        response.accepted_report = accepted
        return response

    def _work_queue(self, server: Server, _text: str) -> Response:
        items = [i.row() for i in self._work if i.server_id == server.id and i.status == "pending"]
        return _ok({"items": items})

    def _complete(self, server: Server, text: str) -> Response:
        try:
            body = js_json_parse(text)
        except ValueError:
            return _error(400, ERR_INVALID_JSON)
        fields = body if isinstance(body, dict) else {}
        item_id, status = fields.get("id"), fields.get("status")
        self._completions.append(Completion(server.id, self.now_ms(), item_id, status, fields.get("error")))
        # Like the CP: no ownership check, unknown ids silently ignored.
        for item in self._work:
            if item.id == item_id and isinstance(status, str):
                item.status = status
        return _ok(_OK)

    def _pending_builds(self, _server: Server, _text: str) -> Response:
        build = next((b for b in self._builds if b.status == "pending"), None)
        if build is None:
            return _ok({"build": None})
        return _ok({"build": {**_build_summary(build), "githubRepoId": build.github_repo_id}})

    def _claim(self, server: Server, _text: str, id: str) -> Response:
        build = next((b for b in self._builds if b.id == id and b.status == "pending"), None)
        if build is None:
            return _error(409, ERR_ALREADY_CLAIMED)
        build.status = "claimed"
        build.claimed_by = server.id
        build.claimed_ms = self.now_ms()
        if build.claim_error is not None:
            return Response(build.claim_error[0], js_json(build.claim_error[1]))
        return _ok(
            {
                "build": {**_build_summary(build), "projectId": build.project_id},
                "cloneUrl": build.clone_url,
                "imageUri": build.image_uri,
                "secrets": build.secrets,
            }
        )

    def _post_build_status(self, server: Server, text: str, id: str) -> Response:
        try:
            body = js_json_parse(text)
        except ValueError:
            return _error(400, ERR_INVALID_JSON)
        fields = body if isinstance(body, dict) else {}
        build = next((b for b in self._builds if b.id == id and b.claimed_by == server.id), None)
        if build is None:
            return _error(404, ERR_NOT_CLAIMED)
        status, error = fields.get("status"), fields.get("error")
        self._build_updates.append(BuildUpdate(server.id, self.now_ms(), id, status, error))
        if build.status == "cancelled":
            return _ok({"ok": True, "cancelled": True})
        now = self.now_ms()
        if isinstance(status, str):
            build.status = status
        if status == "cloning" and build.started_ms is None:
            build.started_ms = now
        if status in ("completed", "failed"):
            build.completed_ms = now
        if error:
            build.error = str(error)
        return _ok(_OK)

    def _get_build_status(self, _server: Server, _text: str, id: str) -> Response:
        build = next((b for b in self._builds if b.id == id), None)
        if build is None:
            return _error(404, ERR_BUILD_NOT_FOUND)
        return _ok({"status": build.status})

    def _caddy_check(self, method: str, query: str) -> Response:
        if method != "GET":
            return Response(405, content_type=None)
        domain = (parse_qs(query).get("domain") or [""])[0]
        if not domain:
            return _error(400, ERR_DOMAIN_MISSING)
        status = self._domains.get(domain)
        if status is None:
            status = self._domain_from_routes(domain)
        if status == 200:
            return _ok({"allowed": True})
        if status == 503:
            return _error(503, ERR_DOMAIN_UNAVAILABLE)
        return _error(404, ERR_DOMAIN_NOT_ALLOWED)

    def _domain_from_routes(self, domain: str) -> int:
        """Without an explicit answer, a domain routed in any expected state is allowed."""
        documents = [*self._expected.values(), js_json({"caddy": {"routes": self.rollout.caddy_routes()}})]
        for raw in documents:
            try:
                routes = json.loads(raw).get("caddy", {}).get("routes") or []
            except (ValueError, AttributeError):
                continue
            for route in routes:
                if isinstance(route, dict) and route.get("domain") == domain:
                    return 200 if route.get("upstreams") else 503
        return 404

    def _build(self, build_id: str) -> Build:
        for build in self._builds:
            if build.id == build_id:
                return build
        raise KeyError(f"no build {build_id}")

    # --- admin ------------------------------------------------------------------------------

    def _admin(self, method: str, path: str, body: bytes) -> Response:
        try:
            data = json.loads(body) if body.strip() else {}
        except ValueError as exc:
            data = exc  # only an error for endpoints that read JSON (PUT expected-state does not)
        try:
            return self._admin_route(method, path, data, body)
        except (KeyError, TypeError, ValueError) as exc:
            return _error(400, f"admin: {exc}")

    def _admin_route(self, method: str, path: str, data: Any, body: bytes) -> Response:
        match = re.fullmatch(r"/expected-state/([^/]+)", path)
        if match and method == "PUT":
            self.set_expected_state(match.group(1), body)
            return _ok(_OK)
        if match and method == "DELETE":
            self.clear_expected_state(match.group(1))
            return _ok(_OK)
        if isinstance(data, ValueError):
            raise ValueError(f"body is not JSON: {data}")
        if method == "GET" and path == "/snapshot":
            return _ok(self.snapshot())
        if method == "GET" and path == "/requests":
            return _ok([r.snapshot() for r in self.requests])
        if method == "POST" and path == "/seed":
            self.seed(data)
            return _ok(_OK)
        if method == "POST" and path == "/tokens":
            token = self.add_token(
                data.get("token"), server_id=data.get("serverId"), created_ms=data.get("createdAt")
            )
            return _ok({"token": token})
        if method == "POST" and path == "/work-items":
            item_id = self.add_work_item(
                data["serverId"], data["type"], data.get("payload", {}), item_id=data.get("id")
            )
            return _ok({"id": item_id})
        if method == "POST" and path == "/builds":
            before = len(self._builds)
            self.seed({"builds": [data]})
            return _ok({"id": self._builds[before].id})
        match = re.fullmatch(r"/builds/([^/]+)", path)
        if match and method == "POST":
            self.set_build_status(match.group(1), str(data["status"]))
            return _ok(_OK)
        if path.startswith("/services") or path == "/rollout":
            return self._admin_rollout(method, path, data)
        if method == "POST" and path == "/faults":
            raw = data.get("body", "")
            self.add_fault(
                Fault(
                    str(data["kind"]),
                    int(data.get("count", 1)),
                    int(data.get("status", 500)),
                    raw.encode() if isinstance(raw, str) else js_json(raw),
                    float(data.get("seconds", 0.0)),
                    int(data.get("pieces", 2)),
                    str(data.get("path", "")),
                )
            )
            return _ok(_OK)
        if method == "POST" and path == "/clock":
            if data.get("offsetSeconds") is not None:
                offset = float(data["offsetSeconds"])
                self.set_clock(lambda: time.time() + offset)
            else:
                now = data.get("nowMs")
                self.freeze(None if now is None else int(now))
            return _ok(_OK)
        return _error(404, f"admin: no endpoint {method} {path}")

    def _admin_rollout(self, method: str, path: str, data: Any) -> Response:
        if method == "GET" and path == "/rollout":
            return _ok(self.rollout_snapshot())
        if method == "POST" and path == "/services":
            self.seed({"services": [data]})
            return _ok({"id": list(self.rollout.services)[-1]})
        match = re.fullmatch(r"/services/([^/]+)/(deploy|image)", path)
        if match is None or method != "POST":
            return _error(404, f"admin: no endpoint {method} {path}")
        service_id = match.group(1)
        if service_id not in self.rollout.services:
            return _error(404, f"admin: no service {service_id}")
        try:
            if match.group(2) == "image":
                self.update_image(service_id, str(data["image"]))
                if not data.get("deploy"):
                    return _ok(_OK)
            rollout = self.deploy_service(service_id)
        except RolloutRefused as exc:
            return _error(409, str(exc))
        return _ok({"rolloutId": rollout.id})

    def _write_state_file(self) -> None:
        if self.state_file is None:
            return
        with self._lock:  # snapshot and rename together, so an older snapshot never wins
            text = json.dumps(self.snapshot(), indent=2)
            fd, tmp = tempfile.mkstemp(dir=self.state_file.parent, prefix=".fakecp-")
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.replace(tmp, self.state_file)

    def wait(self, seconds: float) -> bool:
        """Sleep unless the server is stopping (so delayed answers do not outlive a test)."""
        return self._stopping.wait(seconds)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the agent's connection pool expects
    server_version = "fakecp"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("fakecp: " + format, *args)

    def date_time_string(self, timestamp: float | None = None) -> str:
        cp: FakeControlPlane = self.server.cp  # type: ignore[attr-defined]
        return email.utils.formatdate(cp._clock() if timestamp is None else timestamp, usegmt=True)

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _serve(self) -> None:
        cp: FakeControlPlane = self.server.cp  # type: ignore[attr-defined]
        try:
            body = self._read_body()
        except ValueError:
            self.send_error(400, "bad body framing")
            return
        response = cp.handle(self.command, self.path, list(self.headers.items()), body)
        if response.delay and cp.wait(response.delay):
            self.close_connection = True
            return
        if response.close:
            self.close_connection = True
            return
        try:
            self.send_response(response.status)
            if response.content_type:
                self.send_header("Content-Type", response.content_type)
            for name, value in response.headers.items():
                self.send_header(name, value)
            if response.content_length:
                self.send_header("Content-Length", str(len(response.body)))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if response.drip_pieces:
                size = -(-len(response.body) // response.drip_pieces)
                for start in range(0, len(response.body), size):
                    self.wfile.write(response.body[start : start + size])
                    self.wfile.flush()
                    if start + size < len(response.body) and cp.wait(response.drip_interval):
                        self.close_connection = True
                        return
            else:
                self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (a timeout test); nothing to do


# --- standalone process -----------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakecp", description="Fake Techulus control plane for tests."
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="listen address (loopback or a test namespace only)"
    )
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--seed", type=Path, help="JSON seed file (see the module docstring)")
    parser.add_argument("--token", action="append", default=[], help="add a registration token (repeatable)")
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--encryption-key", default=DEFAULT_ENCRYPTION_KEY, help="ENCRYPTION_KEY (64 hex)")
    key.add_argument("--no-encryption-key", action="store_true", help="omit encryptionKey at registration")
    parser.add_argument("--url-file", type=Path, help="write the URL here once listening")
    parser.add_argument(
        "--state-file", type=Path, help="rewrite a JSON snapshot here after every agent request"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr)
    encryption_key = None if args.no_encryption_key else args.encryption_key
    if encryption_key and not re.fullmatch(r"[0-9a-fA-F]{64}", encryption_key):
        print("--encryption-key must be 64 hex characters", file=sys.stderr)
        return 2
    cp = FakeControlPlane(
        host=args.host, port=args.port, encryption_key=encryption_key, state_file=args.state_file
    )
    try:
        if args.seed:
            cp.seed(json.loads(args.seed.read_text()))
        for token in args.token:
            cp.add_token(token)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"cannot seed the fake control plane: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    cp.start()
    if args.url_file:
        fd, tmp = tempfile.mkstemp(dir=args.url_file.parent, prefix=".fakecp-url-")
        with os.fdopen(fd, "w") as handle:
            handle.write(cp.url + "\n")
        os.replace(tmp, args.url_file)
    print(cp.url, flush=True)
    try:
        while not stop.wait(0.2):
            pass
    finally:
        cp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
