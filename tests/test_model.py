"""Expected-state parsing: every hostile or malformed value is rejected with a message
naming the deployment and field, and the rest of the document still applies."""

import ipaddress
import json
from pathlib import Path

import pytest

from agent.model import ModelError, parse_expected_state

SUBNET = ipaddress.IPv4Network("10.200.1.0/24")
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "control-plane"


def container(**overrides):
    base = {
        "deploymentId": "44444444-4444-4444-8444-444444444444",
        "serviceId": "22222222-2222-4222-8222-222222222222",
        "serviceName": "Web App",
        "name": "22222222-2222-4222-8222-222222222222-44444444",
        "image": "docker.io/library/nginx:alpine",
        "ipAddress": "10.200.1.2",
        "ports": [{"containerPort": 80, "hostPort": 30000}],
        "env": {},
        "healthCheck": None,
        "volumes": [{"name": "data", "hostPath": "/etc", "containerPath": "/data"}],
    }
    base.update(overrides)
    return base


def test_valid_container_parses_and_host_path_is_ours():
    state = parse_expected_state({"containers": [container()]}, SUBNET)
    assert not state.problems
    item = state.containers[0]
    assert item.ip_address == "10.200.1.2"
    # hostPath from the wire ("/etc") is ignored: the agent decides where volumes live.
    assert item.volume_host_path(Path("/data/volumes"), item.volumes[0]) == Path(
        "/data/volumes/22222222-2222-4222-8222-222222222222/data"
    )


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"image": "--privileged"}, "image"),
        ({"image": "nginx latest"}, "image"),
        ({"image": "nginx\n--privileged"}, "image"),
        ({"name": "web\nx"}, "container name"),
        ({"name": "-rm"}, "container name"),
        ({"serviceName": "Web\nApp"}, "serviceName"),
        ({"env": {"A=B": "x"}}, "environment variable name"),
        ({"env": {"A": 5}}, "value must be a string"),
        ({"ipAddress": "10.200.2.5"}, "outside"),
        ({"ipAddress": "10.200.1.1"}, "gateway"),
        ({"ipAddress": "not-an-ip"}, "IPv4"),
        ({"volumes": [{"name": "../etc", "containerPath": "/data"}]}, "volume name"),
        ({"volumes": [{"name": "a/b", "containerPath": "/data"}]}, "volume name"),
        ({"volumes": [{"name": "data", "containerPath": "/data:/etc"}]}, "containerPath"),
        ({"volumes": [{"name": "data", "containerPath": "relative"}]}, "containerPath"),
        ({"serviceId": "../../etc"}, "serviceId"),
        ({"serviceId": ""}, "serviceId"),
        ({"deploymentId": 7}, "deploymentId"),
        ({"ports": [{"containerPort": 0, "hostPort": 30000}]}, "containerPort"),
        ({"ports": "80"}, "ports"),
        ({"healthCheck": {"cmd": "true", "interval": -1}}, "interval"),
        ({"healthCheck": {"cmd": "true", "retries": "3"}}, "retries"),
    ],
)
def test_hostile_values_are_rejected_and_named(overrides, field):
    good = container(deploymentId="55555555-5555-4555-8555-555555555555", name="good", ipAddress="10.200.1.3")
    state = parse_expected_state({"containers": [container(**overrides), good]}, SUBNET)
    assert [c.name for c in state.containers] == ["good"]
    assert len(state.problems) == 1 and field in state.problems[0]
    if "deploymentId" not in overrides:
        # A bad entry protects its deployment's container from being treated as an orphan.
        assert state.protected_deployments == {"44444444-4444-4444-8444-444444444444"}


@pytest.mark.parametrize("document", [[], "x", None, 3, {"containers": {}}, {"dns": []}, {"wireguard": {"peers": 1}}])
def test_garbled_documents_raise(document):
    with pytest.raises(ModelError):
        parse_expected_state(document, SUBNET)


def test_nulls_and_missing_sections_are_empty():
    state = parse_expected_state({"containers": None, "dns": None}, SUBNET)
    assert state.containers == () and state.dns_records == () and state.caddy_routes == ()


def test_duplicate_deployment_and_ip_are_rejected():
    doc = {"containers": [container(), container(name="other"), container(deploymentId="d2", name="n2")]}
    state = parse_expected_state(doc, SUBNET)
    assert len(state.containers) == 1
    assert any("listed twice" in p for p in state.problems)
    assert any("also given" in p for p in state.problems)


def test_health_check_defaults_and_empty_cmd():
    state = parse_expected_state({"containers": [container(healthCheck={"cmd": "curl -f http://localhost/"})]}, SUBNET)
    check = state.containers[0].health_check
    assert check is not None and (check.interval, check.timeout, check.retries, check.start_period) == (10, 5, 3, 30)
    state = parse_expected_state({"containers": [container(healthCheck={"cmd": ""})]}, SUBNET)
    assert state.containers[0].health_check is None


@pytest.mark.parametrize(
    "section",
    [
        {"dns": {"records": [{"name": "a.internal\naddress=/x/1.2.3.4", "ips": ["10.0.0.1"]}]}},
        {"dns": {"records": [{"name": "a/b.internal", "ips": ["10.0.0.1"]}]}},
        {"dns": {"records": [{"name": "a.internal", "ips": ["10.0.0.300"]}]}},
        {"caddy": {"routes": [{"id": "x", "domain": "bad domain", "upstreams": ["10.0.0.1:80"], "serviceId": "s"}]}},
        {"caddy": {"routes": [{"id": "x", "domain": "a.example.com", "upstreams": ["10.0.0.1"], "serviceId": "s"}]}},
        {"wireguard": {"peers": [{"publicKey": "short", "allowedIps": "10.100.2.0/24"}]}},
        {"wireguard": {"peers": [{"publicKey": "A" * 43 + "=", "allowedIps": "10.100.2.0/24, 10.200.2.0/24"}]}},
        {"wireguard": {"peers": [{"publicKey": "A" * 43 + "=", "allowedIps": "10.100.2.0/24", "endpoint": "x y:1"}]}},
    ],
)
def test_hostile_network_entries_are_skipped(section):
    state = parse_expected_state(section, SUBNET)
    assert len(state.problems) == 1
    assert not state.dns_records and not state.caddy_routes and not state.wireguard_peers
    # The section listed an entry and none was valid: doubt, not emptiness (loop._guard).
    (name,) = section
    assert state.dropped == {name: 1} and state.all_dropped(name)


def test_dropped_entries_are_counted_per_section():
    peer = {"publicKey": "A" * 43 + "=", "allowedIps": "10.100.2.0/24"}
    state = parse_expected_state({
        "wireguard": {"peers": [peer, {**peer, "allowedIps": "10.100.3.0/24, 10.200.3.0/24"}]},
        "caddy": {"routes": [{"id": "r", "domain": "a.example.com", "upstreams": "10.200.1.2:80"}] * 3},
        "dns": {"records": []},
    }, SUBNET)
    assert state.dropped == {"wireguard": 1, "caddy": 3}
    assert not state.all_dropped("wireguard"), "one valid peer: the section applies"
    assert state.all_dropped("caddy") and not state.all_dropped("dns"), "an empty list is empty, not garbled"


def test_every_fixture_expected_state_parses():
    names = sorted(FIXTURES.glob("*expected-state*.response.json"))
    assert len(names) == 6
    for path in names:
        data = json.loads(path.read_text())
        if "error" in data:
            continue
        subnet = ipaddress.IPv4Network("10.200.2.0/24" if "-b" in path.name else "10.200.1.0/24")
        state = parse_expected_state(data, subnet)
        assert not state.problems, (path.name, state.problems)


def test_parse_wireguard_peers_for_work_items():
    from agent.model import parse_wireguard_peers

    good = {"publicKey": "11RXTfrcyoZt2d7lU9xvoix87aedvwyjV7HsIbFkikg=", "allowedIps": "10.100.2.0/24,10.200.2.0/24", "endpoint": None}
    peers, problems = parse_wireguard_peers([good, {"publicKey": "x"}])
    assert len(peers) == 1 and peers[0].endpoint == "" and len(problems) == 1
    assert parse_wireguard_peers("nope") == ([], ["peers must be a list, got str"])


def test_peer_endpoint_with_an_unbracketed_ipv6_address_is_accepted():
    from agent.model import parse_wireguard_peers

    peer = {"publicKey": "11RXTfrcyoZt2d7lU9xvoix87aedvwyjV7HsIbFkikg=", "allowedIps": "10.100.2.0/24", "endpoint": "2001:db8::1:51820"}
    peers, problems = parse_wireguard_peers([peer])
    assert problems == [] and peers[0].endpoint == "2001:db8::1:51820"


# --- doubt protects ----------------------------------------------------------------------------

DEP = "44444444-4444-4444-8444-444444444444"


def _running(deployment_id: str):
    from agent.drift import LABEL_DEPLOYMENT_ID, ContainerInfo

    return ContainerInfo("c" * 64, f"web-{deployment_id[:8]}", "docker.io/library/nginx:alpine", "running",
                         {LABEL_DEPLOYMENT_ID: deployment_id})


@pytest.mark.parametrize("garbled", [DEP + " ", " " + DEP, DEP + "\n", DEP + "\u2028", "\x00" + DEP])
def test_a_garbled_deployment_id_protects_the_container_it_might_describe(garbled):
    from agent.drift import ChangeKind, plan

    state = parse_expected_state({"containers": [container(deploymentId=garbled)]}, SUBNET)
    assert state.containers == () and state.problem_count == 1
    assert DEP in state.protected_deployments
    # The control plane still lists the deployment: its running container is not "no longer expected".
    assert not [c for c in plan(state, [_running(DEP)]) if c.kind is ChangeKind.REMOVE_UNEXPECTED]


@pytest.mark.parametrize(
    "entry",
    [container(deploymentId="x" * 5000), container(deploymentId=DEP + "/.."), container(deploymentId=None),
     container(deploymentId=7), container(deploymentId=""), {}, "not an object", None],
)
def test_an_entry_without_a_usable_id_blocks_every_removal(entry):
    state = parse_expected_state({"containers": [entry]}, SUBNET)
    assert state.containers == ()
    # It might describe any container: the reconciler removes none while it is listed.
    assert state.invalid_sections == {"containers"}


def test_problems_are_counted_but_only_the_first_texts_kept():
    from agent.model import MAX_PROBLEMS

    state = parse_expected_state({"containers": [{}] * 1000, "dns": {"records": [{}] * 10}}, SUBNET)
    assert state.problem_count == 1010
    assert len(state.problems) == MAX_PROBLEMS
    assert state.invalid_sections == {"containers"}


def test_model_parsing_logs_nothing_itself(caplog):
    with caplog.at_level("DEBUG"):
        parse_expected_state({"containers": [{}] * 50}, SUBNET)
    assert caplog.records == []


class _Client:
    def __init__(self, text: str) -> None:
        self.text = text

    def expected_state(self, deadline=None):
        return json.loads(self.text)


def test_a_15_mb_state_of_empty_entries_logs_a_bounded_number_of_lines(caplog):
    from agent.loop import ControlPlaneSource

    text = '{"containers":[' + ",".join(["{}"] * (15 * 1024 * 1024 // 3)) + "]}"
    source = ControlPlaneSource(_Client(text), SUBNET, None)
    with caplog.at_level("DEBUG"):
        for _ in range(2):
            state = source.fetch()
    assert state.problem_count == 5_242_880 and state.invalid_sections == {"containers"}
    # The first poll names a few and counts the rest; the next polls say nothing new.
    assert 1 <= len(caplog.records) <= 10, len(caplog.records)
    assert any("5,242,880" in record.getMessage() for record in caplog.records)


def test_the_expected_state_says_once_when_it_is_valid_again(caplog):
    from agent.loop import ControlPlaneSource

    client = _Client(json.dumps({"containers": [container(ipAddress="10.200.1.2"), container(deploymentId="d2", ipAddress="10.200.1.2")]}))
    source = ControlPlaneSource(client, SUBNET, None)
    with caplog.at_level("INFO"):
        source.fetch()
        source.fetch()
        client.text = json.dumps({"containers": [container()]})
        source.fetch()
        source.fetch()
    messages = [record.getMessage() for record in caplog.records]
    assert sum("also given" in m for m in messages) == 1
    assert messages.count("expected state is valid again") == 1


def test_five_thousand_entries_sharing_one_ip_are_logged_once_not_every_poll(caplog):
    from agent.loop import ControlPlaneSource

    entries = [container(deploymentId=f"dep-{i}", name=f"web-{i}", ipAddress="10.200.1.2") for i in range(5000)]
    source = ControlPlaneSource(_Client(json.dumps({"containers": entries})), SUBNET, None)
    with caplog.at_level("DEBUG"):
        for _ in range(10):
            state = source.fetch()
    assert len(state.containers) == 1 and state.problem_count == 4999
    assert len(caplog.records) <= 6
    assert "4,999 problem(s) in all" in caplog.records[-1].getMessage()


def test_a_hostile_registration_peer_is_dropped_with_one_line(tmp_path, caplog):
    from agent.identity import DataDir
    from agent.registration import ensure_registered
    from agent.settings import Settings
    from tests.test_identity import ANSWER, FakeRegisterClient

    evil = {"publicKey": "11RXTfrcyoZt2d7lU9xvoix87aedvwyjV7HsIbFkikg=", "allowedIps": "10.100.3.0/24",
            "endpoint": "fe80::1%x\n[Interface]\nPreUp = cd; touch pwned:51820"}
    answer = dict(ANSWER, peers=[*ANSWER["peers"], evil])
    settings = Settings.load({"token": "tok", "data_dir": str(tmp_path)}, environ={})
    with caplog.at_level("INFO"):
        result = ensure_registered(settings, DataDir(tmp_path), FakeRegisterClient(answer), "")
    assert [peer.allowed_ips for peer in result.initial_peers] == ["10.100.2.0/24,10.200.2.0/24"]
    assert [r.getMessage() for r in caplog.records if "registration answer" in r.getMessage() and "endpoint" in r.getMessage()]


def test_the_doctor_probes_service_id_is_reserved_and_named():
    from agent.host.podman import DOCTOR_PROBE_SERVICE
    from agent.model import RESERVED_SERVICE_IDS

    assert DOCTOR_PROBE_SERVICE in RESERVED_SERVICE_IDS
    entry = {"deploymentId": "d1", "serviceId": DOCTOR_PROBE_SERVICE, "serviceName": "x", "name": "c1",
             "image": "nginx", "ipAddress": "10.200.1.5"}
    state = parse_expected_state({"containers": [entry, {**entry, "deploymentId": "d2", "serviceId": "web",
                                                         "ipAddress": "10.200.1.6"}]}, SUBNET)
    assert [c.deployment_id for c in state.containers] == ["d2"]
    assert state.protected_deployments == {"d1"}
    assert state.problems == ("container #0 (deployment 'd1'): serviceId techulus-doctor is reserved for the agent's own "
                              "doctor probe; skipped",)
