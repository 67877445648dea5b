"""The control-plane client (agent/api.py) against the fake control plane over real HTTP.

Why: what goes on the wire (signed bytes, header names, bodies) must match PROTOCOL.md §5
exactly, and a slow, broken or absent control plane must give a typed error quickly
instead of hanging the agent or being retried when retrying cannot help.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

import agent
from agent import api, crypto
from tests import fakecp
from tests.fakecp import FakeControlPlane

VECTOR_SEED = bytes(range(32))  # PROTOCOL.md §3.4
VECTOR_MS = 1767312000000
VECTOR_EMPTY_SIG = "pkaS44OshTUHMER8v3a6v3p8nTx8Di4uTrZqRQhbPf9ZrXR2TvR90Y0iw3RsX5+Wi9Hsi+OFksXLx++VLiMiAw=="
VECTOR_BODY_SIG = "E6jM28u4fqCmTK0ZYKXzjacr5x4iTZlmqLJy35jIB6WyzU+iRBsUPaFhFgSkgGa9NOOsUEoA+eEB4fdaYQjQBA=="


@dataclass
class Env:
    cp: FakeControlPlane
    server_id: str
    key: Any
    sleeps: list[float] = field(default_factory=list)

    def client(self, **options: Any) -> api.ControlPlane:
        settings: dict[str, Any] = {
            "retries": 2,
            "connect_timeout": 1.0,
            "read_timeout": 2.0,
            "sleep": self.sleeps.append,
        }
        settings.update(options)
        return api.ControlPlane(self.cp.url, api.Signer(self.server_id, self.key), **settings)


@pytest.fixture
def env() -> Iterator[Env]:
    key = crypto.new_signing_key()
    with FakeControlPlane() as cp:
        server = cp.add_server(crypto.public_key_b64(key))
        yield Env(cp, server.id, key)


@pytest.fixture
def vector_env() -> Iterator[Env]:
    """The §3.4 test-vector key and a fake whose clock stands at the vector's timestamp."""
    key = crypto.signing_key_from_file_bytes(VECTOR_SEED)
    with FakeControlPlane(clock=lambda: VECTOR_MS / 1000) as cp:
        server = cp.add_server(crypto.public_key_b64(key))
        yield Env(cp, server.id, key)


def _names(request: fakecp.RecordedRequest) -> list[str]:
    return [name for name, _ in request.headers]


# --- what goes on the wire ------------------------------------------------------------------------


def test_bodyless_get_is_signed_over_timestamp_colon(vector_env: Env) -> None:
    client = vector_env.client(clock=lambda: VECTOR_MS / 1000)
    client.expected_state()
    (request,) = vector_env.cp.requests
    assert request.method == "GET" and request.body == b""
    assert request.header("x-timestamp") == "1767312000000"
    assert request.header("x-signature") == VECTOR_EMPTY_SIG
    assert request.header("x-server-id") == vector_env.server_id
    assert request.header("content-type") is None
    assert request.header("user-agent") == "techulus-agent-py/" + agent.__version__


def test_json_body_is_sent_and_signed_byte_for_byte(vector_env: Env) -> None:
    client = vector_env.client(clock=lambda: VECTOR_MS / 1000)
    client.complete_work("w1", "completed")
    (request,) = vector_env.cp.requests
    assert request.body == b'{"id":"w1","status":"completed"}'
    assert request.header("x-signature") == VECTOR_BODY_SIG
    assert request.header("content-type") == "application/json"
    assert request.status == 200


def test_header_names_are_lowercase(env: Env) -> None:
    env.client().report_status({"containers": []})
    names = _names(env.cp.requests[0])
    for name in ("x-server-id", "x-timestamp", "x-signature"):
        assert name in names
    assert not any(n.lower().startswith("x-") and n != n.lower() for n in names)


def test_non_ascii_bodies_verify(env: Env) -> None:
    report = {"containers": [], "note": "ünïcødé ✓ \u2028"}
    env.client().report_status(report)
    (request,) = env.cp.requests
    assert request.status == 200
    assert json.loads(request.body) == report
    assert env.cp.status_reports[0].report == report


def test_claim_sends_no_body_and_no_content_type(env: Env) -> None:
    build_id = env.cp.add_build()
    assert env.client().claim_build(build_id) is not None
    (request,) = env.cp.requests
    assert request.method == "POST" and request.body == b""
    assert request.header("content-type") is None
    assert request.status == 200  # the fake verified the signature over ""


def test_completion_and_build_status_bodies(env: Env) -> None:
    client = env.client()
    client.complete_work("w-1", "failed", "boom")
    assert env.cp.requests[-1].body == b'{"error":"boom","id":"w-1","status":"failed"}'
    build_id = env.cp.add_build()
    client.claim_build(build_id)
    client.build_status(build_id, "failed", "clone failed")
    assert env.cp.requests[-1].body == b'{"error":"clone failed","status":"failed"}'
    client.build_status(build_id, "completed")
    assert env.cp.requests[-1].body == b'{"status":"completed"}'


@pytest.mark.parametrize("status", ["done", "", "pending"])
def test_invalid_completion_status_is_refused_locally(env: Env, status: str) -> None:
    with pytest.raises(ValueError):
        env.client().complete_work("w1", status)
    with pytest.raises(ValueError):
        env.client().build_status("b1", status)
    assert env.cp.requests == []


@pytest.mark.parametrize("build_id", ["../status", "a/b", "x?y=1", "", "-rf", ".."])
def test_ids_are_never_spliced_into_paths(env: Env, build_id: str) -> None:
    client = env.client()
    for call in (client.claim_build, client.get_build_status, lambda i: client.build_status(i, "cloning")):
        with pytest.raises(api.BadResponse):
            call(build_id)
    assert env.cp.requests == []


def test_pending_build_with_a_hostile_id_is_rejected(env: Env) -> None:
    env.cp.respond_next(200, {"build": {"id": "../../register", "serviceId": "s"}})
    with pytest.raises(api.BadResponse, match="build id"):
        env.client().pending_build()


@pytest.mark.parametrize("server_id", ["", "has space", "new\nline", "x" * 300])
def test_signer_refuses_unusable_server_ids(server_id: str) -> None:
    with pytest.raises(ValueError):
        api.Signer(server_id, crypto.new_signing_key())


def test_trailing_slash_in_url(env: Env) -> None:
    client = api.ControlPlane(env.cp.url + "/", api.Signer(env.server_id, env.key))
    client.expected_state()
    assert env.cp.requests[0].path == "/api/v1/agent/expected-state"


@pytest.mark.parametrize("url", ["", "127.0.0.1:3000", "ftp://x", "http://"])
def test_bad_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError):
        api.ControlPlane(url)


def test_unregistered_client_cannot_sign(env: Env) -> None:
    client = api.ControlPlane(env.cp.url, None, retries=0)
    with pytest.raises(api.ApiError, match="not registered"):
        client.expected_state()
    assert env.cp.requests == []


def test_each_retry_is_signed_afresh(env: Env) -> None:
    now = [time.time()]

    def clock() -> float:
        now[0] += 1.0
        return now[0]

    env.cp.fail_next(1)
    env.client(clock=clock).expected_state()
    first, second = env.cp.requests
    assert first.header("x-timestamp") != second.header("x-timestamp")


# --- retries -------------------------------------------------------------------------------------


def test_5xx_is_retried_with_jittered_exponential_backoff(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    bounds: list[tuple[float, float]] = []
    real_uniform = api.random.uniform

    def uniform(low: float, high: float) -> float:
        bounds.append((low, high))
        return real_uniform(low, high)

    monkeypatch.setattr(api.random, "uniform", uniform)
    env.cp.fail_next(4)
    client = env.client(retries=4, backoff=0.5, max_backoff=1.5)
    assert client.expected_state()["containers"] == []
    assert [r.status for r in env.cp.requests] == [500, 500, 500, 500, 200]
    assert bounds == [(0.8, 1.2)] * 4
    for pause, base in zip(env.sleeps, [0.5, 1.0, 1.5, 1.5], strict=True):
        assert base * 0.8 <= pause <= base * 1.2


def test_jitter_differs_between_attempts(env: Env) -> None:
    env.cp.fail_next(30)
    with pytest.raises(api.Unavailable):
        env.client(retries=29, backoff=1.0, max_backoff=1.0).expected_state()
    assert len(env.sleeps) == 29 and len(set(env.sleeps)) > 1
    assert all(0.8 <= s <= 1.2 for s in env.sleeps)


def test_5xx_after_all_retries_is_unavailable(env: Env) -> None:
    env.cp.fail_next(5, 503, '{"error":"maintenance"}')
    with pytest.raises(api.Unavailable) as failed:
        env.client(retries=2).expected_state()
    assert failed.value.status == 503 and "maintenance" in str(failed.value)
    assert len(env.cp.requests) == 3 and len(env.sleeps) == 2


def test_html_error_pages_are_not_dumped_into_messages(env: Env) -> None:
    env.cp.fail_next(1, 502, "<html><body>Bad Gateway from the proxy</body></html>")
    with pytest.raises(api.Unavailable) as failed:
        env.client(retries=0).expected_state()
    assert "HTML error page" in str(failed.value) and "<body>" not in str(failed.value)


def test_dropped_connections_are_retried(env: Env) -> None:
    env.cp.close_next(2)
    assert env.client(retries=2).work_items() == []
    assert [r.status for r in env.cp.requests] == [None, None, 200]
    assert len(env.sleeps) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 429])
def test_4xx_is_not_retried(env: Env, status: int) -> None:
    env.cp.respond_next(status, {"error": "no"})
    with pytest.raises(api.Rejected) as refused:
        env.client(retries=3).expected_state()
    assert refused.value.status == status and refused.value.body == '{"error":"no"}'
    assert len(env.cp.requests) == 1 and env.sleeps == []


def test_registration_and_claims_are_never_retried(env: Env) -> None:
    client = env.client(retries=3)
    env.cp.fail_next(1, path="/api/v1/agent/register")
    with pytest.raises(api.Unavailable):
        client.register({"token": "t", "wireguardPublicKey": "w", "signingPublicKey": "s"})
    build_id = env.cp.add_build()
    env.cp.close_next(1, path="/api/v1/agent/builds/")
    with pytest.raises(api.Unavailable):
        client.claim_build(build_id)
    assert len(env.cp.requests) == 2 and env.sleeps == []


def test_lost_claim_answer_is_not_mistaken_for_a_lost_race(env: Env) -> None:
    """The CP answered 500 after marking the build claimed (§6.6): a retry would see 409."""
    build_id = env.cp.add_build(claim_error=(500, {"error": "REGISTRY_HOST is not configured"}))
    with pytest.raises(api.Unavailable, match="REGISTRY_HOST"):
        env.client(retries=3).claim_build(build_id)
    assert len(env.cp.requests) == 1


def test_409_claim_means_someone_else_won(env: Env) -> None:
    build_id = env.cp.add_build()
    client = env.client()
    assert client.claim_build(build_id) is not None
    assert client.claim_build(build_id) is None
    assert len(env.cp.requests) == 2


# --- operator-facing messages --------------------------------------------------------------------


@pytest.mark.parametrize("skew, word", [(120.0, "ahead of"), (-300.0, "behind")])
def test_timestamp_401_names_the_clock_skew(env: Env, skew: float, word: str) -> None:
    client = env.client(clock=lambda: time.time() + skew)
    with pytest.raises(api.Rejected) as refused:
        client.expected_state()
    message = str(refused.value)
    assert refused.value.status == 401 and "Request timestamp expired or invalid" in message
    match = re.search(r"about (\d+)s (ahead of|behind) the control plane", message)
    assert match, message
    assert abs(int(match.group(1)) - abs(skew)) <= 2 and match.group(2) == word
    assert "NTP" in message
    assert client.last_skew_seconds is not None and abs(client.last_skew_seconds - skew) <= 2


def test_skew_is_measured_against_the_control_plane_clock_not_ours(env: Env) -> None:
    """The fake runs 200 s in the past; the agent's clock is right: the agent is 'ahead'."""
    env.cp.set_clock(lambda: time.time() - 200)
    with pytest.raises(api.Rejected, match=r"about (19[89]|20[012])s ahead of"):
        env.client().expected_state()


def test_unknown_server_404_says_to_re_register(env: Env) -> None:
    client = api.ControlPlane(env.cp.url, api.Signer("000000000000000000000000", env.key), retries=0)
    with pytest.raises(api.Rejected) as refused:
        client.expected_state()
    assert refused.value.status == 404
    assert "Server not found or not registered" in str(refused.value) and "Re-register" in str(refused.value)


def test_wrong_key_401_names_the_key_file(env: Env) -> None:
    client = api.ControlPlane(env.cp.url, api.Signer(env.server_id, crypto.new_signing_key()), retries=0)
    with pytest.raises(api.Rejected, match=r"Invalid signature -- keys/private.key does not match"):
        client.expected_state()


def test_used_token_401_says_to_create_a_new_one(env: Env) -> None:
    token = env.cp.add_token()
    body = {"token": token, "wireguardPublicKey": "w", "signingPublicKey": "s"}
    client = env.client()
    client.register(body)
    with pytest.raises(api.Rejected, match="already used; create a new one"):
        client.register(body)


def test_other_401_on_signed_paths_does_not_blame_the_token(env: Env) -> None:
    env.cp.respond_next(401, {"error": "Unauthorized"})
    with pytest.raises(api.Rejected) as refused:
        env.client().expected_state()
    assert "token" not in str(refused.value)


def test_missing_headers_400_points_at_a_proxy(env: Env) -> None:
    env.cp.respond_next(400, {"error": fakecp.ERR_MISSING_HEADERS})
    with pytest.raises(api.Rejected, match="strips the x-\\* headers"):
        env.client().work_items()


def test_redirects_are_not_followed(env: Env) -> None:
    env.cp.respond_next(301, "", content_type=None, headers={"Location": "https://elsewhere.example/api"})
    with pytest.raises(api.BadResponse, match="elsewhere.example") as failed:
        env.client().expected_state()
    assert failed.value.status == 301 and len(env.cp.requests) == 1


# --- malformed answers ------------------------------------------------------------------------------


def test_truncated_json_is_a_bad_response_and_not_retried(env: Env) -> None:
    env.cp.garbage_next(1)
    with pytest.raises(api.BadResponse, match="not JSON"):
        env.client().expected_state()
    assert len(env.cp.requests) == 1 and env.sleeps == []


@pytest.mark.parametrize("body", [b"", b"[]", b"null", b'"text"', b"42"])
def test_expected_state_must_be_an_object(env: Env, body: bytes) -> None:
    env.cp.respond_next(200, body)
    with pytest.raises(api.BadResponse):
        env.client().expected_state()


@pytest.mark.parametrize(
    "call, body",
    [
        ("work_items", b'{"items":{}}'),
        ("work_items", b"[]"),
        ("pending_build", b'{"build":"b1"}'),
        ("pending_build", b"null"),
        ("get_build_status", b'{"status":3}'),
    ],
)
def test_wrong_shapes_are_bad_responses(env: Env, call: str, body: bytes) -> None:
    env.cp.respond_next(200, body)
    client = env.client()
    with pytest.raises(api.BadResponse):
        getattr(client, call)(*(["b1"] if call == "get_build_status" else []))


def test_missing_items_mean_an_empty_queue(env: Env) -> None:
    env.cp.respond_next(200, b'{"items":null}')
    assert env.client().work_items() == []


def test_oversized_answer_is_refused_and_the_connection_not_reused(env: Env) -> None:
    client = env.client(max_response_bytes=4096)
    env.cp.respond_next(200, {"containers": [], "padding": "x" * 100_000})
    with pytest.raises(api.BadResponse, match="larger than 4096"):
        client.expected_state()
    # The unread rest of that answer must not be read as the next answer.
    assert client.expected_state()["containers"] == []
    assert len(env.cp.requests) == 2 and env.sleeps == []


def test_oversized_answer_without_content_length(env: Env) -> None:
    """No Content-Length to reject up front: the cap must hold while streaming."""
    client = env.client(max_response_bytes=4096)
    env.cp.drip_next(b'{"x":"' + b"y" * 200_000 + b'"}', pieces=50, interval=0.0, content_length=False)
    with pytest.raises(api.BadResponse, match="larger than 4096"):
        client.expected_state()
    assert client.expected_state()["containers"] == []


# --- timeouts and an absent control plane ------------------------------------------------------


def test_read_timeout_on_a_silent_server(env: Env) -> None:
    env.cp.delay_next(3.0)
    client = env.client(retries=0, read_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(api.Unavailable, match="expected-state: .* did not answer in time"):
        client.expected_state()
    assert time.monotonic() - started < 2.5  # the fake would have answered at 3 s


def test_read_timeouts_are_retried_then_succeed(env: Env) -> None:
    env.cp.delay_next(3.0)
    assert env.client(retries=1, read_timeout=0.3).expected_state()["containers"] == []
    assert len(env.sleeps) == 1


def test_a_trickling_answer_hits_the_total_deadline(env: Env) -> None:
    body = json.dumps(env.cp.default_expected_state(env.server_id)).encode()
    env.cp.drip_next(body, pieces=20, interval=0.15)  # each piece well within the read timeout
    client = env.client(retries=0, read_timeout=1.0, total_timeout=0.6)
    started = time.monotonic()
    with pytest.raises(api.Unavailable, match="no complete answer within"):
        client.expected_state()
    assert time.monotonic() - started < 2.5  # the whole answer would take 2.85 s


def test_a_slow_but_complete_answer_within_the_deadline_is_fine(env: Env) -> None:
    body = json.dumps(env.cp.default_expected_state(env.server_id)).encode()
    env.cp.drip_next(body, pieces=3, interval=0.1)
    assert env.client(retries=0, read_timeout=1.0).expected_state()["containers"] == []


def test_a_hanging_control_plane_gives_up_at_the_poll_deadline(env: Env) -> None:
    """Without the deadline this would be 4 attempts of 2 s plus backoff; with it, one
    attempt cut to the deadline and no retry that could not finish in time."""
    env.cp.delay_next(3.0, count=4, path=f"{api.API}/expected-state")
    client = env.client(retries=3, read_timeout=2.0)
    with pytest.raises(api.Unavailable, match="deadline of 0.4s"):
        client.expected_state(deadline=0.4)
    assert len(env.cp.requests_to(f"{api.API}/expected-state")) == 1
    assert env.sleeps == []


def test_a_trickling_answer_is_cut_at_the_poll_deadline(env: Env) -> None:
    body = json.dumps(env.cp.default_expected_state(env.server_id)).encode()
    env.cp.drip_next(body, pieces=20, interval=0.15)  # 2.85 s in all, each piece within the read timeout
    client = env.client(retries=2, read_timeout=1.0)  # its own per-attempt deadline is 2 s
    with pytest.raises(api.Unavailable, match="no complete answer within 0.6s"):
        client.expected_state(deadline=0.6)
    assert len(env.cp.requests_to(f"{api.API}/expected-state")) == 1


def test_a_body_that_stops_mid_way_is_cut_at_the_poll_deadline(env: Env) -> None:
    body = json.dumps(env.cp.default_expected_state(env.server_id)).encode()
    env.cp.drip_next(body, pieces=2, interval=3.0)  # half, then silence longer than the deadline
    client = env.client(retries=0, read_timeout=10.0)
    with pytest.raises(api.Unavailable, match="no complete answer within 0.5s"):
        client.expected_state(deadline=0.5)


def test_retries_still_happen_within_the_poll_deadline(env: Env) -> None:
    env.cp.fail_next(1, path=f"{api.API}/expected-state")
    assert env.client(retries=2).expected_state(deadline=5.0)["containers"] == []
    assert len(env.sleeps) == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_control_plane_down_is_unavailable_quickly() -> None:
    sleeps: list[float] = []
    url = f"http://127.0.0.1:{_free_port()}"
    client = api.ControlPlane(url, api.Signer("s1", crypto.new_signing_key()), retries=2, sleep=sleeps.append)
    started = time.monotonic()
    with pytest.raises(api.Unavailable) as failed:
        client.expected_state()
    assert time.monotonic() - started < 2.0
    message = str(failed.value)
    assert "cannot reach the control plane at " + url in message and "refused" in message
    assert " at 0x" not in message and failed.value.status is None
    assert len(sleeps) == 2


def test_connect_timeout_to_a_server_that_never_accepts() -> None:
    """A listening socket whose backlog is full: connect() hangs until the connect timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):  # fill the backlog so further connects stall
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                fillers.append(filler)
            client = api.ControlPlane(
                f"http://127.0.0.1:{port}", retries=0, connect_timeout=0.3, read_timeout=0.3
            )
            started = time.monotonic()
            with pytest.raises(api.Unavailable) as failed:
                client.register({"token": "t"})
            assert time.monotonic() - started < 2.5
            assert "timed out" in str(failed.value) and " at 0x" not in str(failed.value)
        finally:
            for filler in fillers:
                filler.close()


# --- concurrency ----------------------------------------------------------------------------------------


def test_one_client_from_many_threads(env: Env) -> None:
    client = env.client(retries=0)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                client.report_status({"containers": []})
                client.expected_state()
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert errors == []
    assert len(env.cp.status_reports) == 60
    assert all(r.status == 200 for r in env.cp.requests) and len(env.cp.requests) == 120


# --- deeply nested answers -------------------------------------------------------------------------

NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("call", ["expected_state", "work_items"])
def test_deeply_nested_json_is_one_clear_bad_response(env: Env, call: str) -> None:
    env.cp.respond_next(200, NESTED)
    with pytest.raises(api.BadResponse, match="nested too deeply"):
        getattr(env.client(), call)()


def test_a_deeply_nested_payload_is_a_payload_error() -> None:
    item = api.parse_work_item({"id": "w1", "type": "stop", "payload": "[" * 100_000})
    assert item.payload is None and "nested too deeply" in item.payload_error


def test_work_queue_poll_of_a_deeply_nested_answer_logs_one_line_without_traceback(
    env: Env, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from agent.settings import Settings
    from agent.workqueue import WorkQueue

    env.cp.respond_next(200, NESTED, count=3)
    queue = WorkQueue(env.client(), None, Settings(data_dir=tmp_path), threading.Lock(), None)  # type: ignore[arg-type]
    with caplog.at_level(logging.DEBUG, logger="agent"):
        for _ in range(3):
            queue.poll_once()
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(problems) == 1 and "nested too deeply" in problems[0].getMessage()
    assert all(record.exc_info is None for record in caplog.records)


def test_work_item_with_a_deeply_nested_payload_fails_with_one_line(
    env: Env, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from agent.settings import Settings
    from agent.workqueue import WorkQueue

    env.cp.respond_next(200, {"items": [{"id": "w1", "type": "stop", "payload": "[" * 100_000}]}, path="/api/v1/agent/work-queue")
    queue = WorkQueue(env.client(), None, Settings(data_dir=tmp_path), threading.Lock(), None)  # type: ignore[arg-type]
    with caplog.at_level(logging.DEBUG, logger="agent"):
        queue.poll_once()
    assert all(record.exc_info is None for record in caplog.records)
    assert any("nested too deeply" in record.getMessage() for record in caplog.records)
