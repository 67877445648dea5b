"""Contract tests: the captured exchanges with the real control plane (bc9b839) against the
agent's parsers, the agent's signing and the fake control plane.

Why: the fake is only worth testing against if it answers like the real thing, and the
agent's models are only right if they accept every real answer. The fixtures are read from
tests/fixtures/control-plane if present in the repo, else from /work/shared (or the
directory named by $TECHULUS_CP_FIXTURES).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent import api, crypto
from agent.identity import AgentConfig
from agent.model import parse_expected_state
from tests import fakecp
from tests.fakecp import FakeControlPlane

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent


def _fixture_dir() -> Path:
    candidates = [
        os.environ.get("TECHULUS_CP_FIXTURES", ""),
        str(REPO / "tests" / "fixtures" / "control-plane"),
        "/work/shared/fixtures/control-plane",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "SUMMARY.txt").is_file():
            return Path(candidate)
    # Failing, not skipping: a contract suite that silently skips cannot catch anything.
    pytest.fail(
        "control-plane fixtures not found: copy them to tests/fixtures/control-plane or set TECHULUS_CP_FIXTURES",
        pytrace=False,
    )
    raise AssertionError  # unreachable


FIXTURES = _fixture_dir()


@dataclass(frozen=True)
class Exchange:
    name: str  # e.g. "09-expected-state-a-empty"
    method: str
    url: str
    headers: dict[str, str]
    body: str
    status: int
    response: str

    @property
    def number(self) -> int:
        return int(self.name[:2])

    def json(self) -> Any:
        return json.loads(self.response)


def _load_exchanges() -> list[Exchange]:
    exchanges = []
    for request_file in sorted(FIXTURES.glob("[0-8]*.request.json")):
        name = request_file.name[: -len(".request.json")]
        data = json.loads(request_file.read_text())
        request = data["request"]
        response = (FIXTURES / f"{name}.response.json").read_text()
        exchanges.append(
            Exchange(
                name,
                request["method"],
                request["url"],
                request["headers"],
                request["body"],
                data["response"]["status"],
                response,
            )
        )
    return exchanges


EXCHANGES = _load_exchanges()
BY_NUMBER = {e.number: e for e in EXCHANGES}
EDGE_CASES: dict[str, list[Any]] = json.loads((FIXTURES / "90-edge-cases.json").read_text())


def _summary() -> tuple[dict[str, dict[str, str]], dict[str, tuple[str, str, int]]]:
    servers: dict[str, dict[str, str]] = {}
    table: dict[str, tuple[str, str, int]] = {}
    for line in (FIXTURES / "SUMMARY.txt").read_text().splitlines():
        server = re.fullmatch(r"server (\w) id=(\w+) signingPub=(\S+) wgPub=(\S+)", line.strip())
        if server:
            servers[server.group(1)] = {
                "id": server.group(2),
                "signingPub": server.group(3),
                "wgPub": server.group(4),
            }
            continue
        row = re.fullmatch(r"(\d\d-\S+)\s+(GET|POST)\s+(\S+)\s+(\d{3})\s+\d+B", line.strip())
        if row:
            table[row.group(1)] = (row.group(2), row.group(3), int(row.group(4)))
    return servers, table


SERVERS, TABLE = _summary()
A, B = SERVERS["A"], SERVERS["B"]
KEY_BY_ID = {A["id"]: A["signingPub"], B["id"]: B["signingPub"]}
SUBNET = {A["id"]: ipaddress.IPv4Network("10.200.1.0/24"), B["id"]: ipaddress.IPv4Network("10.200.2.0/24")}
ENCRYPTION_KEY = json.loads(BY_NUMBER[1].response)["encryptionKey"]
TOKEN_A = json.loads(BY_NUMBER[1].body)["token"]
TOKEN_B = json.loads(BY_NUMBER[4].body)["token"]
UPDATE_WIREGUARD_ID = json.loads(BY_NUMBER[10].response)["items"][0]["id"]
# createdAt of the two work items, as Unix ms (17:52:31.371Z and .548Z).
REGISTER_B_MS = 1795801951371
DEPLOY_ITEM_MS = 1795801951548


def _ts(exchange: Exchange) -> int:
    return int(exchange.headers["x-timestamp"])


# --- the fixture set itself ------------------------------------------------------------------


def test_summary_matches_the_fixture_files() -> None:
    assert {e.name for e in EXCHANGES} == set(TABLE), "SUMMARY.txt and the fixture files disagree"
    for exchange in EXCHANGES:
        method, url, status = TABLE[exchange.name]
        assert (exchange.method, exchange.url, exchange.status) == (method, url, status)
    assert len(EXCHANGES) == 25


# --- every response through the agent's parsers ------------------------------------------------

EXPECTED_STATES = [9, 12, 18, 20, 22, 23]
WORK_QUEUES = [10, 13, 16]
OK_ANSWERS = [14, 15, 17, 19, 21, 24]
ERRORS = {2: "Invalid, expired, or already used token", 3: fakecp.ERR_MISSING_FIELDS, 5: fakecp.ERR_MISSING_HEADERS,
          6: fakecp.ERR_TIMESTAMP, 7: fakecp.ERR_SIGNATURE, 8: fakecp.ERR_UNKNOWN_SERVER}  # fmt: skip
PARSED_ELSEWHERE = {1, 4, 11, 25}


def test_every_response_has_a_parser_test() -> None:
    covered = set(EXPECTED_STATES) | set(WORK_QUEUES) | set(OK_ANSWERS) | set(ERRORS) | PARSED_ELSEWHERE
    assert covered == set(BY_NUMBER), f"fixtures without a parsing test: {sorted(set(BY_NUMBER) - covered)}"


@pytest.mark.parametrize("number", [1, 4])
def test_registration_answers_parse_into_agent_config(number: int) -> None:
    answer = BY_NUMBER[number].json()
    config = AgentConfig.from_json(answer, BY_NUMBER[number].name)
    server = A if number == 1 else B
    assert config.server_id == server["id"]
    assert config.subnet_id == (1 if number == 1 else 2)
    assert config.wireguard_ip == f"10.100.{config.subnet_id}.1"
    assert config.encryption_key == ENCRYPTION_KEY
    assert config.container_subnet == f"10.200.{config.subnet_id}.0/24"
    # The peers have the expected-state peer shape (§4.4).
    peers = parse_expected_state({"wireguard": {"peers": answer["peers"]}}, None)
    assert not peers.problems
    if number == 1:
        assert peers.wireguard_peers == ()
    else:
        (peer,) = peers.wireguard_peers
        assert peer.public_key == A["wgPub"]
        assert peer.allowed_ips == "10.100.1.0/24,10.200.1.0/24"
        assert peer.endpoint == "203.0.113.10:51820"
    # config.json round trip keeps everything.
    assert AgentConfig.from_json(json.loads(config.to_json()), "config.json") == config


def test_registration_answer_without_encryption_key_gives_empty_key() -> None:
    answer = BY_NUMBER[1].json()
    del answer["encryptionKey"]
    assert AgentConfig.from_json(answer, "register").encryption_key == ""


@pytest.mark.parametrize("number", EXPECTED_STATES)
def test_expected_states_parse_without_problems(number: int) -> None:
    exchange = BY_NUMBER[number]
    server_id = exchange.headers["x-server-id"]
    state = parse_expected_state(exchange.json(), SUBNET[server_id])
    assert state.problems == ()
    assert state.protected_deployments == frozenset()
    other = B if server_id == A["id"] else A
    (peer,) = state.wireguard_peers
    assert peer.public_key == other["wgPub"]
    assert peer.endpoint == ("203.0.113.11:51820" if other is B else "203.0.113.10:51820")
    if number == 9 or number == 23:
        assert state.containers == ()
    else:
        (container,) = state.containers
        assert container.deployment_id == "44444444-4444-4444-8444-444444444444"
        assert container.service_id == "22222222-2222-4222-8222-222222222222"
        assert container.service_name == "Web App"
        assert container.name == "22222222-2222-4222-8222-222222222222-44444444"
        assert container.image == "docker.io/library/nginx:alpine"
        assert container.ip_address == "10.200.1.2"
        assert [(p.container_port, p.host_port) for p in container.ports] == [(80, 30000)]
        assert list(container.env) == ["GREETING"]
        assert container.health_check is None
        assert [(v.name, v.container_path) for v in container.volumes] == [("data", "/data")]
    dns = {r.name: r.ips for r in state.dns_records}
    routes = {r.domain: r for r in state.caddy_routes}
    if number in (9, 12):
        assert dns == {} and routes == {}
    else:
        assert dns == {"web-app.internal": ("10.200.1.2",)}
    if number in (18, 22, 23):
        route = routes["web.lab.example.com"]
        assert (route.id, route.upstreams, route.service_id) == (
            "web.lab.example.com",
            ("10.200.1.2:80",),
            "22222222-2222-4222-8222-222222222222",
        )
    elif number == 20:
        assert routes == {}  # the CP drops routes with no upstreams during caddy_updating


def test_server_a_state_rejects_an_ip_outside_its_subnet() -> None:
    """The same document with server B's subnet must not be acted on (the IP is A's)."""
    state = parse_expected_state(BY_NUMBER[12].json(), SUBNET[B["id"]])
    assert state.containers == ()
    assert state.protected_deployments == {"44444444-4444-4444-8444-444444444444"}


def test_secret_in_fixture_12_decrypts_with_the_key_of_fixture_01() -> None:
    blob = BY_NUMBER[12].json()["containers"][0]["env"]["GREETING"]
    assert crypto.decrypt_secret(ENCRYPTION_KEY, blob) == "hello-from-lab"
    with pytest.raises(crypto.SecretError):
        crypto.decrypt_secret("ff" * 32, blob)
    # The fake's encryption is the CP's format (IV || TAG || CT), readable by the agent.
    sealed = fakecp.encrypt_secret(ENCRYPTION_KEY, "hello-from-lab", iv=base64.b64decode(blob)[:12])
    assert sealed == blob


@pytest.mark.parametrize("number", WORK_QUEUES)
def test_work_queues_parse(number: int) -> None:
    items = [api.parse_work_item(raw) for raw in BY_NUMBER[number].json()["items"]]
    if number == 16:
        assert items == []
        return
    update = items[0]
    assert update.id == UPDATE_WIREGUARD_ID
    assert update.type == "update_wireguard"
    assert update.payload_error == ""
    assert update.payload is not None
    peers = parse_expected_state({"wireguard": update.payload}, None).wireguard_peers
    assert [p.public_key for p in peers] == [B["wgPub"]]
    if number == 13:
        deploy = items[1]
        assert (deploy.id, deploy.type) == ("99999999-9999-4999-8999-999999999999", "deploy")
        assert deploy.payload is not None
        assert deploy.payload["deploymentId"] == "44444444-4444-4444-8444-444444444444"
        assert deploy.payload["name"] == "22222222-2222-4222-8222-222222222222-1"  # not the container name
    else:
        assert len(items) == 1


@pytest.mark.parametrize(
    "payload, expected, error",
    [
        ('{"serviceId":"s1"}', {"serviceId": "s1"}, ""),
        ("", {}, ""),
        (None, {}, ""),
        ("null", {}, ""),
        ("{not json", None, "not valid JSON"),
        ("[1,2]", None, "must be a JSON object"),
        (5, None, "must be a JSON string"),
    ],
)
def test_work_item_payloads(payload: Any, expected: Any, error: str) -> None:
    item = api.parse_work_item({"id": "w1", "type": "cleanup_volumes", "payload": payload})
    assert item.payload == expected
    assert error in item.payload_error and bool(error) == bool(item.payload_error)


@pytest.mark.parametrize(
    "row", [[], {"type": "stop"}, {"id": "../x", "type": "stop"}, {"id": "w1"}, {"id": "w1", "type": 3}]
)
def test_work_items_without_usable_id_or_type_are_rejected(row: Any) -> None:
    with pytest.raises(api.BadResponse):
        api.parse_work_item(row)


@pytest.mark.parametrize("number", OK_ANSWERS)
def test_acknowledgements(number: int) -> None:
    assert BY_NUMBER[number].json() == {"ok": True}


@pytest.mark.parametrize("number", sorted(ERRORS))
def test_error_bodies_are_what_the_fake_sends(number: int) -> None:
    assert BY_NUMBER[number].json() == {"error": ERRORS[number]}
    assert api._error_text(BY_NUMBER[number].response) == ERRORS[number]


def test_pending_builds_none_and_caddy_check() -> None:
    assert BY_NUMBER[11].json() == {"build": None}
    assert BY_NUMBER[25].json() == {"allowed": True}


# --- signatures -------------------------------------------------------------------------------


SIGNED = [e.number for e in EXCHANGES if "x-signature" in e.headers]


@pytest.mark.parametrize("number", SIGNED)
def test_fixture_signatures_verify_with_the_summary_keys(number: int) -> None:
    exchange = BY_NUMBER[number]
    server_id = exchange.headers["x-server-id"]
    signed_body = exchange.body if exchange.method == "POST" and "/claim" not in exchange.url else ""
    args = (exchange.headers["x-timestamp"], signed_body, exchange.headers["x-signature"])
    if number == 8:
        assert server_id not in KEY_BY_ID
        return
    valid = fakecp.verify_signature(KEY_BY_ID[server_id], *args)
    assert valid is (number != 7), "fixture 07 is signed with a wrong key, all others with the server's key"
    # Not a trivially-true check: another key or another timestamp fails.
    other = B if server_id == A["id"] else A
    assert not fakecp.verify_signature(other["signingPub"], *args)
    tampered = (str(int(args[0]) + 1), args[1], args[2])
    assert not fakecp.verify_signature(KEY_BY_ID[server_id], *tampered)


def test_agent_signer_reproduces_the_protocol_test_vectors() -> None:
    key = crypto.signing_key_from_file_bytes(bytes(range(32)))
    signer = api.Signer("srv", key)
    assert crypto.public_key_b64(key) == "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
    empty = signer.headers(b"", 1767312000000)
    assert empty["x-signature"] == (
        "pkaS44OshTUHMER8v3a6v3p8nTx8Di4uTrZqRQhbPf9ZrXR2TvR90Y0iw3RsX5+Wi9Hsi+OFksXLx++VLiMiAw=="
    )
    body = signer.headers(b'{"id":"w1","status":"completed"}', 1767312000000)
    assert body["x-signature"] == (
        "E6jM28u4fqCmTK0ZYKXzjacr5x4iTZlmqLJy35jIB6WyzU+iRBsUPaFhFgSkgGa9NOOsUEoA+eEB4fdaYQjQBA=="
    )
    # ... and the fake accepts exactly what the agent signs.
    public = crypto.public_key_b64(key)
    assert fakecp.verify_signature(public, "1767312000000", "", empty["x-signature"])
    assert fakecp.verify_signature(
        public, "1767312000000", '{"id":"w1","status":"completed"}', body["x-signature"]
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1767312000000", 1767312000000),
        ("123abc", 123),
        ("  42", 42),
        ("-5", -5),
        ("+7x", 7),
        ("abc", None),
        ("", None),
        ("0x10", 0),
    ],
)
def test_timestamp_parsing_is_javascript_parseint(text: str, expected: int | None) -> None:
    assert fakecp.js_parse_int(text) == expected


def test_signature_decoding_is_as_lenient_as_node() -> None:
    raw = bytes(range(64))
    std = base64.b64encode(raw).decode()
    assert fakecp.node_base64_decode(std) == raw
    assert fakecp.node_base64_decode(base64.urlsafe_b64encode(raw).decode().rstrip("=")) == raw
    assert fakecp.node_base64_decode(std[:20] + "\n" + std[20:]) == raw
    assert fakecp.node_base64_decode("not base64 at all!") != raw


# --- replaying the whole capture against the fake ---------------------------------------------


def _new_ids(*ids: str) -> Iterator[str]:
    yield from ids
    raise AssertionError("the fake created more ids than the real control plane did")


@pytest.fixture
def replay_cp() -> Iterator[FakeControlPlane]:
    ids = _new_ids(UPDATE_WIREGUARD_ID)
    cp = FakeControlPlane(encryption_key=ENCRYPTION_KEY, new_id=lambda: next(ids))
    cp.freeze(REGISTER_B_MS - 60_000)
    cp.add_token(TOKEN_A, server_id=A["id"], created_ms=REGISTER_B_MS - 3_600_000)
    cp.add_token(TOKEN_B, server_id=B["id"], created_ms=REGISTER_B_MS - 3_600_000)
    with cp:
        yield cp


def _replay(cp: FakeControlPlane, exchange: Exchange) -> tuple[int, str]:
    headers = dict(exchange.headers)
    status, body = cp.send(exchange.method, exchange.url, headers, exchange.body)
    return status, body.decode()


def test_the_fake_answers_the_whole_capture_byte_for_byte(replay_cp: FakeControlPlane) -> None:
    cp = replay_cp
    for exchange in EXCHANGES:
        n = exchange.number
        if "x-timestamp" in exchange.headers:
            # The CP's clock at capture time; 06 was deliberately sent 120 s stale.
            cp.freeze(_ts(BY_NUMBER[7]) if n == 6 else _ts(exchange))
        elif n == 4:
            cp.freeze(REGISTER_B_MS)
        if n in (12, 18, 20, 22, 23):
            # The rollout logic is not modelled: the test plays the CP's database here.
            cp.set_expected_state(exchange.headers["x-server-id"], exchange.response)
        if n == 13:
            cp.add_work_item(A["id"], "deploy", json.loads(exchange.response)["items"][1]["payload"],
                             item_id="99999999-9999-4999-8999-999999999999", created_ms=DEPLOY_ITEM_MS)  # fmt: skip
        status, body = _replay(cp, exchange)
        assert (status, body) == (exchange.status, exchange.response), exchange.name
    # Side effects the capture implies.
    assert [c.id for c in cp.completions] == [UPDATE_WIREGUARD_ID, "99999999-9999-4999-8999-999999999999"]
    assert [r.server_id for r in cp.status_reports] == [A["id"]] * 3 + [B["id"]]
    assert cp.server(A["id"]).resources == {"cpuCores": 2, "memoryMb": 24000, "diskGb": 50}
    assert cp.server(B["id"]).public_ip == "203.0.113.11"


def test_default_expected_state_is_the_real_empty_one(replay_cp: FakeControlPlane) -> None:
    for n in (1, 4):
        assert _replay(replay_cp, BY_NUMBER[n])[0] == 200
    replay_cp.freeze(_ts(BY_NUMBER[9]))
    assert _replay(replay_cp, BY_NUMBER[9]) == (200, BY_NUMBER[9].response)


def test_registration_side_effects(replay_cp: FakeControlPlane) -> None:
    cp = replay_cp
    assert _replay(cp, BY_NUMBER[1]) == (200, BY_NUMBER[1].response)
    assert cp.work_items() == []  # nobody else to tell
    cp.freeze(REGISTER_B_MS)
    assert _replay(cp, BY_NUMBER[4]) == (200, BY_NUMBER[4].response)
    (item,) = cp.work_items(A["id"])
    assert item.row() == BY_NUMBER[10].json()["items"][0]
    assert cp.work_items(B["id"]) == []
    assert cp.server(B["id"]).status == "online"
    assert cp.server(A["id"]).token_used_ms is not None


def test_registration_errors(replay_cp: FakeControlPlane) -> None:
    cp = replay_cp
    register = BY_NUMBER[1]
    assert _replay(cp, BY_NUMBER[3]) == (400, BY_NUMBER[3].response)
    assert _replay(cp, register) == (200, register.response)
    assert _replay(cp, BY_NUMBER[2]) == (401, BY_NUMBER[2].response)
    assert _replay(cp, register)[0] == 401  # a used token stays used
    internal = '{"error":"Internal server error"}'
    assert cp.send("POST", "/api/v1/agent/register", {}, "token=abc") == (500, internal.encode())
    assert cp.send("POST", "/api/v1/agent/register", {}, "null") == (500, internal.encode())
    for body in ("{}", '{"token":"","wireguardPublicKey":"x","signingPublicKey":"y"}', "[]", "5"):
        assert cp.send("POST", "/api/v1/agent/register", {}, body) == (400, BY_NUMBER[3].response.encode()), (
            body
        )


def test_registration_token_expires_after_24_hours() -> None:
    now = REGISTER_B_MS
    with FakeControlPlane(clock=lambda: now / 1000) as cp:
        fresh = cp.add_token(created_ms=now - 24 * 3600 * 1000 + 1)
        stale = cp.add_token(created_ms=now - 24 * 3600 * 1000)
        client = api.ControlPlane(cp.url, retries=0)
        body = {"wireguardPublicKey": A["wgPub"], "signingPublicKey": A["signingPub"]}
        with pytest.raises(api.Rejected) as refused:
            client.register({"token": stale, **body})
        assert refused.value.status == 401 and "already used; create a new one" in str(refused.value)
        assert client.register({"token": fresh, **body})["subnetId"] == 1


def test_registration_allocates_the_lowest_free_subnet_and_omits_the_key_when_unset() -> None:
    with FakeControlPlane(encryption_key=None) as cp:
        cp.add_server(A["signingPub"], subnet_id=1, public_ip="198.51.100.1")
        cp.add_server(B["signingPub"], subnet_id=3, status="offline")
        token = cp.add_token()
        client = api.ControlPlane(cp.url, retries=0)
        answer = client.register(
            {"token": token, "wireguardPublicKey": A["wgPub"], "signingPublicKey": A["signingPub"]}
        )
        assert answer["subnetId"] == 2 and answer["wireguardIp"] == "10.100.2.1"
        assert "encryptionKey" not in answer
        assert AgentConfig.from_json(answer, "register").encryption_key == ""
        # Peers include the offline server; only the online one gets an update_wireguard item.
        assert [p["allowedIps"] for p in answer["peers"]] == [
            "10.100.1.0/24,10.200.1.0/24",
            "10.100.3.0/24,10.200.3.0/24",
        ]
        assert [p["endpoint"] for p in answer["peers"]] == ["198.51.100.1:51820", None]
        (item,) = cp.work_items()
        assert item.type == "update_wireguard"
        peers = json.loads(item.payload)["peers"]
        assert [p["allowedIps"] for p in peers] == [
            "10.100.3.0/24,10.200.3.0/24",
            "10.100.2.0/24,10.200.2.0/24",
        ]
        assert peers[1]["endpoint"] is None  # registered without publicIp


def test_subnet_exhaustion_is_a_500() -> None:
    with FakeControlPlane() as cp:
        for subnet in range(1, 256):
            cp.add_server(A["signingPub"], subnet_id=subnet, status="offline")
        token = cp.add_token()
        status, body = cp.send("POST", "/api/v1/agent/register", {},
                               json.dumps({"token": token, "wireguardPublicKey": "w", "signingPublicKey": "s"}))  # fmt: skip
        assert (status, body) == (500, b'{"error":"Internal server error"}')


# --- authentication order and details (§5.2) ----------------------------------------------------


@pytest.fixture
def a_cp() -> Iterator[FakeControlPlane]:
    """A fake that knows servers A and B with the fixtures' keys, clock at fixture 09."""
    with FakeControlPlane(clock=lambda: _ts(BY_NUMBER[9]) / 1000) as cp:
        cp.add_server(
            A["signingPub"], server_id=A["id"], wireguard_public_key=A["wgPub"], public_ip="203.0.113.10"
        )
        cp.add_server(
            B["signingPub"], server_id=B["id"], wireguard_public_key=B["wgPub"], public_ip="203.0.113.11"
        )
        yield cp


@pytest.mark.parametrize("number", [5, 6, 7, 8])
def test_auth_failures_replay_identically(a_cp: FakeControlPlane, number: int) -> None:
    exchange = BY_NUMBER[number]
    if number != 5:
        a_cp.freeze(_ts(BY_NUMBER[7]))
    assert _replay(a_cp, exchange) == (exchange.status, exchange.response)
    assert a_cp.requests[-1].status == exchange.status


def test_fixture_requests_are_accepted_at_their_own_time_only(a_cp: FakeControlPlane) -> None:
    exchange = BY_NUMBER[9]
    for offset_ms, status in [(0, 200), (60_000, 200), (-60_000, 200), (60_001, 401), (-60_001, 401)]:
        a_cp.freeze(_ts(exchange) + offset_ms)
        assert _replay(a_cp, exchange)[0] == status, offset_ms


def test_each_missing_or_empty_header_is_a_400(a_cp: FakeControlPlane) -> None:
    exchange = BY_NUMBER[9]
    for name in ("x-server-id", "x-timestamp", "x-signature"):
        for headers in (
            {k: v for k, v in exchange.headers.items() if k != name},
            {**exchange.headers, name: ""},
        ):
            assert a_cp.send("GET", exchange.url, headers) == (400, BY_NUMBER[5].response.encode())
    # Header names are case-insensitive.
    upper = {k.upper(): v for k, v in exchange.headers.items()}
    assert a_cp.send("GET", exchange.url, upper)[0] == 200


def test_checks_run_in_protocol_order(a_cp: FakeControlPlane) -> None:
    good = BY_NUMBER[9].headers
    stale = str(_ts(BY_NUMBER[9]) - 120_000)
    # stale timestamp + unknown server -> the timestamp is reported (checked first)
    headers = {**good, "x-timestamp": stale, "x-server-id": "000000000000000000000000"}
    assert a_cp.send("GET", BY_NUMBER[9].url, headers)[1] == BY_NUMBER[6].response.encode()
    # unknown server + garbage signature -> 404 (checked before the signature)
    headers = {**good, "x-server-id": "000000000000000000000000", "x-signature": "AAAA"}
    assert a_cp.send("GET", BY_NUMBER[9].url, headers) == (404, BY_NUMBER[8].response.encode())
    # a timestamp that is not a number
    assert a_cp.send("GET", BY_NUMBER[9].url, {**good, "x-timestamp": "soon"}) == (
        401,
        BY_NUMBER[6].response.encode(),
    )


def test_lenient_timestamp_is_checked_parsed_but_signed_verbatim(a_cp: FakeControlPlane) -> None:
    exchange = BY_NUMBER[9]
    # "<ts>abc" passes the window (parseInt) but the signature covered "<ts>" only.
    headers = {**exchange.headers, "x-timestamp": exchange.headers["x-timestamp"] + "abc"}
    assert a_cp.send("GET", exchange.url, headers) == (401, BY_NUMBER[7].response.encode())
    # Signed over the verbatim header, the same lenient value is accepted.
    key = crypto.new_signing_key()
    server = a_cp.add_server(crypto.public_key_b64(key))
    odd = f"{_ts(exchange)}abc"
    headers = {
        "x-server-id": server.id,
        "x-timestamp": odd,
        "x-signature": crypto.sign(key, f"{odd}:".encode()),
    }
    assert a_cp.send("GET", exchange.url, headers)[0] == 200


def test_get_bodies_are_verified_as_empty(a_cp: FakeControlPlane) -> None:
    """A GET's signature covers "" even if a body is sent (§5.1 table)."""
    exchange = BY_NUMBER[9]
    assert a_cp.send("GET", exchange.url, exchange.headers, b'{"sneaky":1}')[0] == 200


def test_post_signatures_cover_the_exact_body(a_cp: FakeControlPlane) -> None:
    exchange = BY_NUMBER[17]
    a_cp.freeze(_ts(exchange))
    assert _replay(a_cp, exchange)[0] == 200
    reordered = json.dumps(json.loads(exchange.body))  # same JSON, other bytes
    assert a_cp.send("POST", exchange.url, exchange.headers, reordered) == (
        401,
        BY_NUMBER[7].response.encode(),
    )


def test_unknown_paths_and_methods(a_cp: FakeControlPlane) -> None:
    assert a_cp.send("GET", "/api/v1/agent/nothing")[0] == 404
    assert a_cp.send("DELETE", "/api/v1/agent/expected-state", BY_NUMBER[9].headers)[0] == 405
    assert a_cp.send("GET", "/api/v1/agent/register")[0] == 405


# --- the fake with the agent's client: edge cases of 90-edge-cases.json -------------------------


@pytest.fixture
def own() -> Iterator[tuple[FakeControlPlane, api.ControlPlane, str]]:
    """A fake with a server whose private key we hold, and a client for it."""
    key = crypto.new_signing_key()
    with FakeControlPlane() as cp:
        server = cp.add_server(crypto.public_key_b64(key))
        client = api.ControlPlane(
            cp.url, api.Signer(server.id, key), retries=0, connect_timeout=2, read_timeout=2
        )
        yield cp, client, server.id


def test_edge_status_without_containers(own: tuple[FakeControlPlane, api.ControlPlane, str]) -> None:
    cp, client, _ = own
    status, body = EDGE_CASES["status_without_containers"]
    with pytest.raises(ValueError, match="containers"):
        client.report_status({"resources": {"cpuCores": 1}})  # the client refuses to send it
    assert cp.requests == []
    with pytest.raises(api.Unavailable) as failed:
        client._request("POST", "/api/v1/agent/status", {"publicIp": "203.0.113.7"})
    assert (failed.value.status, failed.value.body) == (status, body)
    assert "(empty body)" in str(failed.value)
    assert cp.status_reports == []


class _SignsEmptyBody(api.Signer):
    def headers(self, body: bytes, now_ms: int) -> dict[str, str]:
        return super().headers(b"", now_ms)


def test_edge_status_body_signed_as_empty(own: tuple[FakeControlPlane, api.ControlPlane, str]) -> None:
    cp, client, server_id = own
    assert client.signer is not None
    client.signer = _SignsEmptyBody(server_id, client.signer.key)
    status, body = EDGE_CASES["status_body_signed_as_empty"]
    with pytest.raises(api.Rejected) as refused:
        client.report_status({"containers": []})
    assert (refused.value.status, refused.value.body) == (status, body)
    assert "does not match" in str(refused.value)
    client.expected_state()  # body-less requests are still fine: "" is what they sign


def test_edge_timestamp_50s_ahead_is_accepted(own: tuple[FakeControlPlane, api.ControlPlane, str]) -> None:
    cp, client, server_id = own
    status, prefix = EDGE_CASES["expected_state_ts_plus_50s"]
    cp.set_expected_state(server_id, BY_NUMBER[23].response)
    client._clock = lambda: time.time() + 50
    assert client.expected_state() == BY_NUMBER[23].json()
    assert cp.requests[-1].status == status and cp.requests[-1].response.decode().startswith(prefix)
    client._clock = lambda: time.time() + 65
    with pytest.raises(api.Rejected) as refused:
        client.expected_state()
    assert refused.value.status == 401 and "ahead of the control plane" in str(refused.value)


# --- the rest of the fake's endpoints through the agent's client -------------------------------


def test_work_queue_completion_marks_items_done(own: tuple[FakeControlPlane, api.ControlPlane, str]) -> None:
    cp, client, server_id = own
    first = cp.add_work_item(server_id, "restart", {"deploymentId": "d1", "containerId": "c1"})
    second = cp.add_work_item(server_id, "stop", '{"deploymentId":"d2","containerId":"c2"}')
    cp.add_work_item("someone-else", "stop", {})
    rows = client.work_items()
    assert [r["id"] for r in rows] == [first, second]
    assert set(rows[0]) == {
        "id",
        "serverId",
        "type",
        "payload",
        "status",
        "createdAt",
        "startedAt",
        "attempts",
    }
    assert api.parse_work_item(rows[0]).payload == {"deploymentId": "d1", "containerId": "c1"}
    client.complete_work(first, "failed", "no such container")
    assert (
        cp.requests[-1].body == f'{{"error":"no such container","id":"{first}","status":"failed"}}'.encode()
    )
    assert [r["id"] for r in client.work_items()] == [second]
    client.complete_work("not-a-real-id", "completed")  # the CP does not check; neither does the fake
    (done, unknown) = cp.completions
    assert (done.id, done.status, done.error) == (first, "failed", "no such container")
    assert unknown.id == "not-a-real-id"
    assert cp.work_items(server_id)[0].status == "failed"
    headers = api.Signer(server_id, client.signer.key).headers(b"{oops", int(time.time() * 1000))  # type: ignore[union-attr]
    assert cp.send("POST", "/api/v1/agent/work-queue", headers, "{oops") == (
        400,
        b'{"error":"Invalid JSON body"}',
    )


def test_a_lost_acknowledgement_still_took_effect(
    own: tuple[FakeControlPlane, api.ControlPlane, str],
) -> None:
    cp, client, server_id = own
    item = cp.add_work_item(server_id, "restart", {"deploymentId": "d1", "containerId": "c1"})
    cp.close_next(1, path="/api/v1/agent/work-queue", after_processing=True)
    with pytest.raises(api.Unavailable):
        client.complete_work(item, "completed")
    assert cp.work_items(server_id)[0].status == "completed"
    assert client.work_items() == []
    assert [r.status for r in cp.requests] == [None, 200]


def test_status_reports_are_recorded(own: tuple[FakeControlPlane, api.ControlPlane, str]) -> None:
    cp, client, server_id = own
    seen: list[tuple[str, dict[str, Any]]] = []
    cp.on_status = lambda sid, report: seen.append((sid, report))
    report = {
        "resources": {"cpuCores": 2, "memoryMb": 100, "diskGb": 5},
        "publicIp": "203.0.113.9",
        "containers": [],
    }
    before = cp.now_ms()
    client.report_status(report)
    (recorded,) = cp.status_reports
    assert recorded.report == report and recorded.server_id == server_id and recorded.time_ms >= before
    assert seen == [(server_id, report)]
    assert cp.server(server_id).public_ip == "203.0.113.9"
    assert cp.server(server_id).last_heartbeat_ms == recorded.time_ms


def test_build_lifecycle(own: tuple[FakeControlPlane, api.ControlPlane, str]) -> None:
    cp, client, server_id = own
    other_key = crypto.new_signing_key()
    other = cp.add_server(crypto.public_key_b64(other_key))
    rival = api.ControlPlane(cp.url, api.Signer(other.id, other_key), retries=0)
    assert client.pending_build() is None
    build_id = cp.add_build(commit_sha="a" * 40, secrets={"NPM_TOKEN": "s3cret"}, commit_message="fix")
    pending = client.pending_build()
    assert pending is not None and pending["id"] == build_id and pending["githubRepoId"] is None
    claimed = client.claim_build(build_id)
    assert claimed is not None
    assert claimed["imageUri"].endswith(":" + "a" * 40)
    assert crypto.decrypt_secret(fakecp.DEFAULT_ENCRYPTION_KEY, claimed["secrets"]["NPM_TOKEN"]) == "s3cret"
    assert rival.claim_build(build_id) is None  # 409: lost the race
    assert client.pending_build() is None
    with pytest.raises(api.Rejected) as refused:
        rival.build_status(build_id, "cloning")
    assert refused.value.status == 404
    assert client.build_status(build_id, "cloning") == {"ok": True}
    assert rival.get_build_status(build_id) == "cloning"  # no ownership check on reads
    cp.set_build_status(build_id, "cancelled")
    assert client.build_status(build_id, "failed", "build cancelled") == {"ok": True, "cancelled": True}
    assert cp.build(build_id).status == "cancelled"
    assert [(u.status, u.error) for u in cp.build_updates] == [
        ("cloning", None),
        ("failed", "build cancelled"),
    ]
    with pytest.raises(api.Rejected) as missing:
        client.get_build_status("00000000-0000-4000-8000-000000000000")
    assert missing.value.status == 404 and missing.value.body == '{"error":"Build not found"}'


def test_build_completion_and_claim_failure(own: tuple[FakeControlPlane, api.ControlPlane, str]) -> None:
    cp, client, _ = own
    build_id = cp.add_build()
    assert client.claim_build(build_id) is not None
    client.build_status(build_id, "completed")
    assert cp.build(build_id).status == "completed" and cp.build(build_id).completed_ms is not None
    broken = cp.add_build(claim_error=(400, {"error": "No repository configured"}))
    with pytest.raises(api.Rejected, match="No repository configured"):
        client.claim_build(broken)
    assert cp.build(broken).status == "claimed"  # stuck, like the real CP


def test_caddy_check(own: tuple[FakeControlPlane, api.ControlPlane, str]) -> None:
    cp, _, server_id = own
    cp.add_domain("down.example.com", 503)
    cp.set_expected_state(server_id, BY_NUMBER[22].response)
    check = "/api/v1/caddy/check?domain="
    assert cp.send("GET", check + "web.lab.example.com") == (200, BY_NUMBER[25].response.encode())
    assert cp.send("GET", check + "down.example.com") == (503, b'{"error":"Service not currently available"}')
    assert cp.send("GET", check + "other.example.com") == (404, b'{"error":"Domain not allowed"}')
    assert cp.send("GET", check)[0] == 400


# --- the fake as a separate process ----------------------------------------------------------------


def test_standalone_process(tmp_path: Path, fp: Any) -> None:
    fp.allow_unregistered(True)  # this test starts the fake itself, nothing of the agent's
    key = crypto.new_signing_key()
    seed = {
        "tokens": [{"token": "t" * 64, "serverId": "abcdefabcdefabcdefabcdef"}],
        "expectedStates": {"abcdefabcdefabcdefabcdef": {"containers": [], "dns": {"records": []}}},
        "workItems": [
            {"serverId": "abcdefabcdefabcdefabcdef", "type": "stop", "payload": {"deploymentId": "d"}}
        ],
    }
    (tmp_path / "seed.json").write_text(json.dumps(seed))
    state_file, url_file = tmp_path / "state.json", tmp_path / "url"
    argv = [sys.executable, "-m", "tests.fakecp", "--seed", str(tmp_path / "seed.json"), "--token", "u" * 64,
            "--state-file", str(state_file), "--url-file", str(url_file)]  # fmt: skip
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url), url
        assert url_file.read_text().strip() == url
        client = api.ControlPlane(url, retries=0)
        answer = client.register(
            {
                "token": "t" * 64,
                "wireguardPublicKey": A["wgPub"],
                "signingPublicKey": crypto.public_key_b64(key),
            }
        )
        assert answer["serverId"] == "abcdefabcdefabcdefabcdef"
        signed = api.ControlPlane(url, api.Signer(answer["serverId"], key), retries=0)
        assert signed.expected_state() == {"containers": [], "dns": {"records": []}}
        (item,) = signed.work_items()
        assert api.parse_work_item(item).payload == {"deploymentId": "d"}
        # Admin endpoints drive it from outside.
        admin = api.ControlPlane(url, retries=0)
        admin._request(
            "PUT",
            "/__test__/expected-state/" + answer["serverId"],
            {"containers": [], "caddy": {"routes": []}},
            signed=False,
        )
        assert signed.expected_state() == {"containers": [], "caddy": {"routes": []}}
        admin._request(
            "POST", "/__test__/faults", {"kind": "status", "status": 503, "count": 1}, signed=False
        )
        with pytest.raises(api.Unavailable):
            signed.expected_state()
        admin._request(
            "POST",
            "/__test__/work-items",
            {"serverId": answer["serverId"], "type": "restart", "payload": {}},
            signed=False,
        )
        assert len(signed.work_items()) == 2
        signed.report_status({"containers": []})
        snapshot = admin._request("GET", "/__test__/snapshot", signed=False)
        assert [r["report"] for r in snapshot["statusReports"]] == [{"containers": []}]
        assert json.loads(state_file.read_text())["statusReports"] == snapshot["statusReports"]
        recorded = admin._request("GET", "/__test__/requests", signed=False)
        assert [r["status"] for r in recorded][-3:] == [503, 200, 200]
        with pytest.raises(api.Rejected):
            admin._request("POST", "/__test__/nothing", {}, signed=False)
        admin._request("POST", "/__test__/clock", {"offsetSeconds": -200}, signed=False)
        with pytest.raises(api.Rejected, match="ahead of the control plane"):
            signed.expected_state()
        admin._request("POST", "/__test__/clock", {"nowMs": None}, signed=False)
        signed.expected_state()
        # The second token from --token works as well.
        assert (
            client.register(
                {"token": "u" * 64, "wireguardPublicKey": B["wgPub"], "signingPublicKey": "eA=="}
            )["subnetId"]
            == 2
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=5) == 0
        finally:
            process.kill()
            process.communicate()


def test_standalone_rejects_a_bad_seed(tmp_path: Path, fp: Any) -> None:
    fp.allow_unregistered(True)
    (tmp_path / "seed.json").write_text('{"nonsense": 1}')
    argv = [sys.executable, "-m", "tests.fakecp", "--seed", str(tmp_path / "seed.json")]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "unknown seed keys" in result.stderr
