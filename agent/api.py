"""The control-plane client: Ed25519-signed requests over urllib3 (PROTOCOL.md §4-§7).

Every call has connect and read timeouts and a cap on the response size. Network errors
and 5xx answers are retried with jittered backoff; 4xx answers are not, and raise typed
errors whose messages tell an operator what to do (a 401 for the timestamp says how far
the clock is off, judging by the server's Date header).
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import __version__, crypto

log = logging.getLogger(__name__)

API = "/api/v1/agent"


class ApiError(Exception):
    """A request failed. `status` is None for transport errors."""

    def __init__(self, message: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class Unavailable(ApiError):
    """The control plane could not be reached or answered 5xx (after retries)."""


class Rejected(ApiError):
    """The control plane refused the request (4xx); retrying the same request will not help."""


class BadResponse(ApiError):
    """The answer was not what the protocol says (not JSON, too large)."""


@dataclass(frozen=True)
class Signer:
    server_id: str
    key: Ed25519PrivateKey

    def headers(self, body: bytes, now_ms: int) -> dict[str, str]:
        timestamp = str(now_ms)
        message = timestamp.encode() + b":" + body
        return {"x-server-id": self.server_id, "x-timestamp": timestamp, "x-signature": crypto.sign(self.key, message)}


class ControlPlane:
    def __init__(
        self,
        base_url: str,
        signer: Signer | None = None,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        retries: int = 3,
        max_response_bytes: int = 16 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        # The original concatenates blindly (a trailing '/' gives '//api/...'); we do not.
        self.base_url = base_url.rstrip("/")
        self.signer = signer
        self.retries = max(0, retries)
        self.max_response_bytes = max_response_bytes
        self._clock = clock
        self._sleep = sleep
        self._http = urllib3.PoolManager(
            num_pools=2,
            maxsize=4,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=False,
            headers={"User-Agent": f"techulus-agent-py/{__version__}"},
        )
        self._lock = threading.Lock()
        self.last_skew_seconds: float | None = None

    # --- endpoints ------------------------------------------------------------------------

    def register(self, body: dict[str, Any]) -> dict[str, Any]:
        answer = self._request("POST", f"{API}/register", body, signed=False, retries=0)
        if not isinstance(answer, dict):
            raise BadResponse("register: expected a JSON object")
        return answer

    def expected_state(self) -> Any:
        return self._request("GET", f"{API}/expected-state")

    def report_status(self, report: dict[str, Any], *, retries: int | None = None) -> None:
        self._request("POST", f"{API}/status", report, retries=retries)

    def work_items(self) -> list[Any]:
        answer = self._request("GET", f"{API}/work-queue")
        items = answer.get("items") if isinstance(answer, dict) else None
        if items is None:
            return []
        if not isinstance(items, list):
            raise BadResponse("work-queue: items must be a list")
        return items

    def complete_work(self, item_id: str, status: str, error: str = "") -> None:
        # Go marshals a map: keys alphabetical, `error` only when non-empty.
        body: dict[str, str] = {}
        if error:
            body["error"] = error
        body["id"] = item_id
        body["status"] = status
        self._request("POST", f"{API}/work-queue", body)

    def pending_build(self) -> dict[str, Any] | None:
        answer = self._request("GET", f"{API}/pending-builds")
        build = answer.get("build") if isinstance(answer, dict) else None
        return build if isinstance(build, dict) else None

    def claim_build(self, build_id: str) -> dict[str, Any] | None:
        """The claimed build, or None when another server won (409)."""
        try:
            answer = self._request("POST", f"{API}/builds/{build_id}/claim", None)
        except Rejected as exc:
            if exc.status == 409:
                return None
            raise
        if not isinstance(answer, dict):
            raise BadResponse("claim: expected a JSON object")
        return answer

    def build_status(self, build_id: str, status: str, error: str = "") -> dict[str, Any]:
        body: dict[str, str] = {}
        if error:
            body["error"] = error
        body["status"] = status
        answer = self._request("POST", f"{API}/builds/{build_id}/status", body)
        return answer if isinstance(answer, dict) else {}

    def get_build_status(self, build_id: str) -> str:
        answer = self._request("GET", f"{API}/builds/{build_id}/status")
        status = answer.get("status") if isinstance(answer, dict) else None
        return status if isinstance(status, str) else ""

    # --- transport ------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        signed: bool = True,
        retries: int | None = None,
    ) -> Any:
        body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode("utf-8")
        attempts = 1 + (self.retries if retries is None else retries)
        delay = 0.5
        last: ApiError | None = None
        for attempt in range(attempts):
            try:
                return self._once(method, path, body, payload is not None, signed)
            except Unavailable as exc:
                last = exc
                if attempt + 1 < attempts:
                    pause = delay * random.uniform(0.8, 1.2)
                    log.warning("%s %s failed (%s); retrying in %.1fs", method, path, exc, pause)
                    self._sleep(pause)
                    delay = min(delay * 2, 8.0)
        assert last is not None
        raise last

    def _once(self, method: str, path: str, body: bytes, has_body: bool, signed: bool) -> Any:
        headers: dict[str, str] = {}
        if has_body:
            headers["Content-Type"] = "application/json"
        if signed:
            if self.signer is None:
                raise ApiError("this request must be signed but the agent is not registered")
            headers.update(self.signer.headers(body, int(self._clock() * 1000)))
        url = self.base_url + path
        try:
            response = self._http.request(
                method, url, body=body if has_body else None, headers=headers, preload_content=False, redirect=False
            )
        except urllib3.exceptions.HTTPError as exc:
            raise Unavailable(f"{method} {path}: cannot reach the control plane at {self.base_url}: {_reason(exc)}") from exc
        try:
            raw = self._read_capped(response, method, path)
        finally:
            response.release_conn()
        text = raw.decode("utf-8", errors="replace")
        status = response.status
        self._note_clock(response)
        if status >= 500:
            raise Unavailable(f"{method} {path}: control plane answered {status}: {_error_text(text)}", status, text)
        if status >= 400:
            raise Rejected(self._explain(method, path, status, text), status, text)
        if status != 200:
            raise BadResponse(f"{method} {path}: unexpected status {status}", status, text)
        try:
            return json.loads(text) if text.strip() else None
        except json.JSONDecodeError as exc:
            raise BadResponse(f"{method} {path}: answer is not JSON ({exc})", status, text[:200]) from exc

    def _read_capped(self, response: Any, method: str, path: str) -> bytes:
        chunks: list[bytes] = []
        total = 0
        try:
            while True:
                chunk = response.read(65536)
                if not chunk:
                    break
                total += len(chunk)
                if total > self.max_response_bytes:
                    raise BadResponse(f"{method} {path}: answer larger than {self.max_response_bytes} bytes; ignored")
                chunks.append(chunk)
        except urllib3.exceptions.HTTPError as exc:
            raise Unavailable(f"{method} {path}: connection broke while reading the answer: {_reason(exc)}") from exc
        return b"".join(chunks)

    def _note_clock(self, response: Any) -> None:
        date = response.headers.get("Date")
        if not date:
            return
        try:
            server_time = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
        self.last_skew_seconds = self._clock() - server_time

    def _explain(self, method: str, path: str, status: int, text: str) -> str:
        error = _error_text(text)
        prefix = f"{method} {path}: control plane answered {status}: {error}"
        if status == 401 and "timestamp" in error.lower():
            skew = self.last_skew_seconds
            if skew is not None:
                direction = "ahead of" if skew > 0 else "behind"
                return f"{prefix} -- this server's clock is about {abs(skew):.0f}s {direction} the control plane's (limit 60s); enable NTP (timedatectl set-ntp true)"
            return f"{prefix} -- this server's clock is off by more than 60s; enable NTP (timedatectl set-ntp true)"
        if status == 401 and "signature" in error.lower():
            return f"{prefix} -- keys/private.key does not match the key the control plane has for this server"
        if status == 401:
            return f"{prefix} -- the registration token is wrong, expired (24 h) or already used; create a new one"
        if status == 404 and path != f"{API}/register":
            return f"{prefix} -- the control plane does not know this server id; was the server deleted? Re-register with a new token"
        return prefix


def _error_text(text: str) -> str:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text.strip()[:200] or "(empty body)"
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return data["error"]
    return text.strip()[:200]


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc)
