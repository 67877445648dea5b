"""The control-plane client: Ed25519-signed requests over urllib3 (PROTOCOL.md §4-§7).

Every call has connect and read timeouts, a deadline for the whole answer and a cap on the
response size; a caller may also give one deadline for the whole call, retries included
(the expected-state poll must end before the next tick, however the server misbehaves). Network errors and 5xx answers are retried with jittered backoff; 4xx
answers are not, and raise typed errors whose messages tell an operator what to do (a 401
for the timestamp says how far the clock is off, judging by the server's Date header).
Calls that must not be repeated blindly (registration, build claims) are never retried.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3

from agent import __version__, crypto

log = logging.getLogger(__name__)

API = "/api/v1/agent"

# Ids we put into URL paths: they come from the control plane, so a '/', '?' or '..' must
# not be able to point a signed request at another endpoint.
_PATH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# What may go into the x-server-id header (http.client would raise on CR/LF anyway).
_HEADER_VALUE = re.compile(r"[\x21-\x7e]{1,256}")
WORK_STATUSES = ("completed", "failed")
BUILD_STATUSES = ("cloning", "building", "pushing", "completed", "failed")


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
    """The answer was not what the protocol says (not JSON, wrong shape, too large)."""


@dataclass(frozen=True)
class Signer:
    server_id: str
    key: crypto.SigningKey

    def __post_init__(self) -> None:
        if not isinstance(self.server_id, str) or not _HEADER_VALUE.fullmatch(self.server_id):
            raise ValueError(
                f"server id must be 1-256 printable ASCII characters without spaces, got {self.server_id!r}"
            )

    def headers(self, body: bytes, now_ms: int) -> dict[str, str]:
        """§5.1: sign `<ms>:<exact body bytes>`; header names lowercase like the Go agent."""
        timestamp = str(now_ms)
        message = timestamp.encode() + b":" + body
        return {
            "x-server-id": self.server_id,
            "x-timestamp": timestamp,
            "x-signature": crypto.sign(self.key, message),
        }


@dataclass(frozen=True)
class WorkItem:
    """One work-queue row (§6.3). `payload` is the decoded payload object, or None with
    `payload_error` saying why it could not be decoded (§10: report the item `failed`)."""

    id: str
    type: str
    payload: dict[str, Any] | None
    payload_error: str = ""


def parse_work_item(raw: Any) -> WorkItem:
    """Validate one row of `{"items": [...]}`; the payload is a JSON string parsed a second time.

    Raises BadResponse when the row has no usable id or type (nothing can be reported for it).
    """
    if not isinstance(raw, dict):
        raise BadResponse(f"work item must be an object, got {type(raw).__name__}")
    item_id = raw.get("id")
    if not isinstance(item_id, str) or not _PATH_ID.fullmatch(item_id):
        raise BadResponse(f"work item id must be 1-128 characters of [A-Za-z0-9_.-], got {item_id!r}")
    item_type = raw.get("type")
    if not isinstance(item_type, str) or not item_type:
        raise BadResponse(f"work item {item_id}: type must be a non-empty string, got {item_type!r}")
    payload_raw = raw.get("payload")
    if payload_raw is None or payload_raw == "":
        return WorkItem(item_id, item_type, {})  # Go: null/missing decodes to the zero value
    if isinstance(payload_raw, dict):
        return WorkItem(item_id, item_type, payload_raw)  # tolerate an already-decoded object
    if not isinstance(payload_raw, str):
        return WorkItem(
            item_id, item_type, None, f"payload must be a JSON string, got {type(payload_raw).__name__}"
        )
    try:
        payload = decode_json(payload_raw)
    except ValueError as exc:
        return WorkItem(item_id, item_type, None, f"payload is not valid JSON: {exc}")
    if payload is None:
        return WorkItem(item_id, item_type, {})
    if not isinstance(payload, dict):
        return WorkItem(
            item_id, item_type, None, f"payload must be a JSON object, got {type(payload).__name__}"
        )
    return WorkItem(item_id, item_type, payload)


class ControlPlane:
    def __init__(
        self,
        base_url: str,
        signer: Signer | None = None,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        total_timeout: float | None = None,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        max_response_bytes: int = 16 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not re.match(r"https?://[^/\s]+", base_url or ""):
            raise ValueError(f"control plane URL must start with http:// or https://, got {base_url!r}")
        # The original concatenates blindly (a trailing '/' gives '//api/...'); we do not.
        self.base_url = base_url.rstrip("/")
        self.signer = signer
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_response_bytes = max_response_bytes
        # A server that trickles its answer byte by byte defeats a per-read timeout; this
        # bounds a whole attempt (checked between reads, so it may overrun by one read).
        self.total_timeout = total_timeout if total_timeout is not None else connect_timeout + read_timeout
        self._clock = clock
        self._sleep = sleep
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._http = urllib3.PoolManager(
            num_pools=2,
            maxsize=4,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=False,
        )
        self._user_agent = f"techulus-agent-py/{__version__}"
        self.last_skew_seconds: float | None = None

    # --- endpoints ------------------------------------------------------------------------

    def register(self, body: dict[str, Any]) -> dict[str, Any]:
        """§4: unsigned, never retried (a lost answer after the CP used the token cannot be
        recovered by repeating it: the token is then spent)."""
        answer = self._request("POST", f"{API}/register", body, signed=False, retries=0)
        return _expect_object(answer, "register")

    def expected_state(self, *, deadline: float | None = None) -> dict[str, Any]:
        """The raw expected-state document (validate it with `agent.model.parse_expected_state`).
        `deadline`: seconds for the whole call (connect, retries, backoff, body)."""
        return _expect_object(self._request("GET", f"{API}/expected-state", deadline=deadline), "expected-state")

    def report_status(self, report: dict[str, Any], *, retries: int | None = None) -> None:
        if not isinstance(report.get("containers"), list):
            # The CP dereferences containers.length and answers a bare 500 without it.
            raise ValueError("a status report must carry a containers list (possibly empty)")
        self._request("POST", f"{API}/status", report, retries=retries)

    def work_items(self) -> list[Any]:
        """The raw rows of `{"items": [...]}`; decode each with `parse_work_item`."""
        answer = _expect_object(self._request("GET", f"{API}/work-queue"), "work-queue")
        items = answer.get("items")
        if items is None:
            return []
        if not isinstance(items, list):
            raise BadResponse("work-queue: items must be a list")
        return items

    def complete_work(self, item_id: str, status: str, error: str = "") -> None:
        if status not in WORK_STATUSES:
            raise ValueError(f"work item status must be one of {WORK_STATUSES}, got {status!r}")
        if not isinstance(item_id, str) or not item_id:
            raise ValueError("work item id must be a non-empty string")
        # Go marshals a map: keys alphabetical, `error` only when non-empty.
        body: dict[str, str] = {}
        if error:
            body["error"] = error
        body["id"] = item_id
        body["status"] = status
        self._request("POST", f"{API}/work-queue", body)

    def pending_build(self) -> dict[str, Any] | None:
        answer = _expect_object(self._request("GET", f"{API}/pending-builds"), "pending-builds")
        build = answer.get("build")
        if build is None:
            return None
        if not isinstance(build, dict):
            raise BadResponse(f"pending-builds: build must be an object or null, got {type(build).__name__}")
        _path_id(build.get("id"), "pending-builds: build id")
        return build

    def claim_build(self, build_id: str) -> dict[str, Any] | None:
        """The claimed build, or None when another server won (409).

        Never retried: if the CP marked the build claimed but the answer was lost, a retry
        would get 409 and the build would look taken by someone else."""
        path = f"{API}/builds/{_path_id(build_id, 'build id')}/claim"
        try:
            answer = self._request("POST", path, None, retries=0)
        except Rejected as exc:
            if exc.status == 409:
                return None
            raise
        return _expect_object(answer, "claim")

    def build_status(self, build_id: str, status: str, error: str = "") -> dict[str, Any]:
        """Report build progress; the answer has `"cancelled": true` if the user cancelled it."""
        if status not in BUILD_STATUSES:
            raise ValueError(f"build status must be one of {BUILD_STATUSES}, got {status!r}")
        body: dict[str, str] = {}
        if error:
            body["error"] = error
        body["status"] = status
        answer = self._request("POST", f"{API}/builds/{_path_id(build_id, 'build id')}/status", body)
        return answer if isinstance(answer, dict) else {}

    def get_build_status(self, build_id: str) -> str:
        answer = _expect_object(
            self._request("GET", f"{API}/builds/{_path_id(build_id, 'build id')}/status"), "build status"
        )
        status = answer.get("status")
        if not isinstance(status, str):
            raise BadResponse(f"build status: status must be a string, got {status!r}")
        return status

    # --- transport ------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        signed: bool = True,
        retries: int | None = None,
        deadline: float | None = None,
    ) -> Any:
        body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode("utf-8")
        attempts = 1 + (self.retries if retries is None else max(0, retries))
        delay = self.backoff
        last: ApiError | None = None
        end = None if deadline is None else time.monotonic() + deadline
        out_of_time = False
        for attempt in range(attempts):
            budget = None if end is None else end - time.monotonic()
            if budget is not None and budget <= 0:
                out_of_time = True
                break
            try:
                return self._once(method, path, body, payload is not None, signed, budget)
            except Unavailable as exc:
                last = exc
                if attempt + 1 < attempts:
                    pause = delay * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not crypto
                    if end is not None and time.monotonic() + pause >= end:
                        out_of_time = True  # no time left for another attempt
                        break
                    # Info, not warning: the caller logs the final failure; an outage should
                    # not triple the warnings of every timer tick.
                    log.info("%s (attempt %d/%d); retrying in %.1fs", exc, attempt + 1, attempts, pause)
                    self._sleep(pause)
                    delay = min(delay * 2, self.max_backoff)
        if last is None:
            raise Unavailable(f"{method} {path}: no answer within the deadline of {deadline:g}s")
        if out_of_time:
            raise Unavailable(f"{last} (gave up at the deadline of {deadline:g}s)", last.status, last.body)
        raise last

    def _once(
        self, method: str, path: str, body: bytes, has_body: bool, signed: bool, budget: float | None = None
    ) -> Any:
        """One attempt; `budget` (seconds) caps it whole, connection and body included."""
        headers = {"User-Agent": self._user_agent}
        if has_body:
            headers["Content-Type"] = "application/json"
        if signed:
            if self.signer is None:
                raise ApiError("this request must be signed but the agent is not registered")
            # Signed immediately before sending, so retries after a backoff carry a fresh timestamp.
            headers.update(self.signer.headers(body, int(self._clock() * 1000)))
        url = self.base_url + path
        started = time.monotonic()
        total = self.total_timeout if budget is None else min(self.total_timeout, budget)
        timeout = urllib3.Timeout(connect=min(self.connect_timeout, total), read=min(self.read_timeout, total))
        try:
            response = self._http.request(
                method,
                url,
                body=body if has_body else None,
                headers=headers,
                preload_content=False,
                redirect=False,
                timeout=timeout,
            )
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise Unavailable(
                f"{method} {path}: the control plane at {self.base_url} did not answer in time: {_reason(exc)}"
            ) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unavailable(
                f"{method} {path}: cannot reach the control plane at {self.base_url}: {_reason(exc)}"
            ) from exc
        try:
            raw = self._read_capped(response, method, path, started, total)
        except BaseException:
            response.close()  # never return a half-read connection to the pool
            response.release_conn()
            raise
        response.release_conn()
        text = raw.decode("utf-8", errors="replace")
        status = response.status
        self._note_clock(response)
        if status >= 500:
            raise Unavailable(
                f"{method} {path}: control plane answered {status}: {_error_text(text)}", status, text
            )
        if status >= 400:
            raise Rejected(self._explain(method, path, status, text), status, text)
        if 300 <= status < 400:
            location = response.headers.get("Location", "")
            raise BadResponse(
                f"{method} {path}: control plane answered {status} redirecting to {location!r}; "
                "signed requests are not followed across redirects: set the control plane URL to the final address",
                status,
                text,
            )
        if status != 200:
            raise BadResponse(f"{method} {path}: unexpected status {status}", status, text)
        try:
            return decode_json(text) if text.strip() else None
        except ValueError as exc:
            raise BadResponse(f"{method} {path}: answer is not JSON ({exc})", status, text[:200]) from exc

    def _read_capped(self, response: Any, method: str, path: str, started: float, limit: float) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_response_bytes:
            raise BadResponse(
                f"{method} {path}: answer of {declared} bytes is larger than {self.max_response_bytes}; ignored"
            )
        # read1 returns after one socket read, so the deadline is checked while a slow answer trickles in.
        read = getattr(response, "read1", None) or response.read
        chunks: list[bytes] = []
        total = 0
        try:
            while True:
                left = limit - (time.monotonic() - started)
                if left <= 0:
                    raise Unavailable(f"{method} {path}: no complete answer within {limit:.1f}s")
                # One read may not outlast the deadline either (a server that stops mid-body).
                _limit_next_read(response, min(self.read_timeout, left))
                chunk = read(65536)
                if not chunk:
                    break
                total += len(chunk)
                if total > self.max_response_bytes:
                    raise BadResponse(
                        f"{method} {path}: answer larger than {self.max_response_bytes} bytes; ignored"
                    )
                chunks.append(chunk)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if time.monotonic() - started >= limit:
                raise Unavailable(f"{method} {path}: no complete answer within {limit:.1f}s") from exc
            raise Unavailable(
                f"{method} {path}: connection broke while reading the answer: {_reason(exc)}"
            ) from exc
        return b"".join(chunks)

    def _note_clock(self, response: Any) -> None:
        date = response.headers.get("Date")
        if not date:
            return
        try:
            moment = email.utils.parsedate_to_datetime(date)
        except (TypeError, ValueError, IndexError):
            return
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.timezone.utc)  # RFC 7231 dates are GMT
        self.last_skew_seconds = self._clock() - moment.timestamp()

    def _explain(self, method: str, path: str, status: int, text: str) -> str:
        error = _error_text(text)
        prefix = f"{method} {path}: control plane answered {status}: {error}"
        registering = path == f"{API}/register"
        if status == 401 and "timestamp" in error.lower():
            skew = self.last_skew_seconds
            if skew is not None:
                direction = "ahead of" if skew > 0 else "behind"
                return (
                    f"{prefix} -- this server's clock is about {abs(skew):.0f}s {direction} the control plane's "
                    "(limit 60s); enable NTP (timedatectl set-ntp true)"
                )
            return f"{prefix} -- this server's clock is off by more than 60s; enable NTP (timedatectl set-ntp true)"
        if status == 401 and "signature" in error.lower():
            return (
                f"{prefix} -- keys/private.key does not match the key the control plane has for this server"
            )
        if status == 401 and registering:
            return f"{prefix} -- the registration token is wrong, expired (24 h) or already used; create a new one"
        if status == 400 and "missing required headers" in error.lower():
            return f"{prefix} -- something between this server and the control plane strips the x-* headers"
        if status == 404 and "not registered" in error.lower():
            return f"{prefix} -- the control plane does not know this server id; was the server deleted? Re-register with a new token"
        return prefix


def _limit_next_read(response: Any, seconds: float) -> None:
    """Set the socket timeout of the response's connection (urllib3 sets it only once, before
    the headers); best effort, as a pooled or already closed connection may have no socket."""
    sock = getattr(getattr(response, "connection", None), "sock", None)
    if sock is not None:
        try:
            sock.settimeout(max(0.001, seconds))
        except OSError:
            pass


def decode_json(text: str | bytes) -> Any:
    """json.loads, with a nesting too deep for the parser's recursion (100,000 `[`) as a
    ValueError like any other malformed answer: one clear line, never a traceback."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("it is nested too deeply") from None


def _expect_object(answer: Any, what: str) -> dict[str, Any]:
    if not isinstance(answer, dict):
        shape = "an empty answer" if answer is None else type(answer).__name__
        raise BadResponse(f"{what}: expected a JSON object, got {shape}")
    return answer


def _path_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _PATH_ID.fullmatch(value) or ".." in value:
        raise BadResponse(f"{what} must be 1-128 characters of [A-Za-z0-9_.-], got {value!r}")
    return value


def _error_text(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        stripped = text.strip()
        if stripped.startswith("<"):
            return "(an HTML error page)"
        return stripped[:200] or "(empty body)"
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return data["error"][:500]
    return text.strip()[:200]


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    args: tuple[Any, ...] = tuple(getattr(reason, "args", ()))
    # urllib3 timeouts carry (connection object, message): the message is what matters.
    text = args[-1] if len(args) >= 2 and isinstance(args[-1], str) else str(reason)
    # urllib3 prefixes "HTTPConnection(host=..., port=...): "; the URL is already in our message.
    return re.sub(r"^<?\w*HTTPS?Connection(?:Pool)?\b[^:]*>?: ", "", text) or type(exc).__name__
