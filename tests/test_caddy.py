"""Caddy unit tests: route rendering and reading back, ownership, listen matching, validation."""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest

from agent.drift import caddy_hash
from agent.host.caddy import (
    check_body,
    CaddyError,
    CaddySync,
    config_etag,
    find_server,
    is_ours,
    listen_matches,
    managed_routes,
    parse_upstream_networks,
    parse_route,
    render_route,
    validate_routes,
)
from agent.model import CaddyRoute, ExpectedState
from agent.settings import Settings

ROUTE = CaddyRoute("app.example.com", "app.example.com", ("10.200.3.2:3000", "10.200.1.5:3000"), "svc-1")


def test_render_matches_the_protocol_and_reads_back() -> None:
    rendered = render_route(ROUTE, log_append=True)
    assert rendered == {
        "@id": "app.example.com",
        "match": [{"host": ["app.example.com"]}],
        "handle": [
            {"handler": "vars", "service_id": "svc-1"},
            {"handler": "log_append", "key": "service_id", "value": "{http.vars.service_id}"},
            {"handler": "reverse_proxy", "upstreams": [{"dial": "10.200.3.2:3000"}, {"dial": "10.200.1.5:3000"}]},
        ],
    }
    assert is_ours(rendered) and parse_route(rendered) == ROUTE
    plain = render_route(ROUTE, log_append=False)
    assert [h["handler"] for h in plain["handle"]] == ["vars", "reverse_proxy"]
    assert parse_route(plain) == ROUTE


def test_ownership() -> None:
    assert not is_ours({"match": [{"path": ["/__caddy_health__"]}], "handle": [{"handler": "static_response"}]})
    assert not is_ours({"@id": "someone", "handle": [{"handler": "static_response"}]})
    assert not is_ours({"@id": "", "handle": [{"handler": "vars", "service_id": "x"}]})
    assert not is_ours("garbage")
    assert is_ours({"@id": "x", "handle": [{"handler": "vars", "service_id": ""}]})


def test_a_standalone_agents_routes_carry_its_owner_mark_and_nobody_elses_are_its_own() -> None:
    mine = render_route(ROUTE, log_append=False, owner="standalone-1234")
    assert mine["@id"] == f"standalone-1234-{ROUTE.id}"  # unique in Caddy beside a registered agent's id
    assert mine["handle"][0] == {"handler": "vars", "service_id": ROUTE.service_id, "techulus_owner": "standalone-1234"}
    assert is_ours(mine, "standalone-1234") and parse_route(mine, "standalone-1234") == ROUTE
    check_body([mine], [], [ROUTE], "standalone-1234")
    # The registered agent (no mark) and another standalone agent leave it alone...
    assert not is_ours(mine) and not is_ours(mine, "standalone-9999")
    # ...and a standalone agent never takes the registered agent's (or the original one's) routes.
    registered = render_route(ROUTE, log_append=False)
    assert is_ours(registered) and not is_ours(registered, "standalone-1234")
    forged = {**registered, "@id": f"standalone-1234-{ROUTE.id}"}  # the prefix alone is no mark
    assert not is_ours(forged, "standalone-1234")
    with pytest.raises(CaddyError, match="do not read back"):
        check_body([mine], [], [ROUTE])  # sent as the registered agent's, it would not read back
    with pytest.raises(CaddyError, match="owner"):
        CaddySync(replace(Settings(), caddy_admin_url="http://127.0.0.1:9"), owner="a b/c")


def test_routes_without_upstreams_are_neither_written_nor_hashed() -> None:
    idle = CaddyRoute("idle.example.com", "idle.example.com", (), "svc-2")
    assert managed_routes([ROUTE, idle]) == [ROUTE]
    sync = CaddySync(replace(Settings(), caddy_admin_url="http://127.0.0.1:9"))
    assert sync.expected_hash(ExpectedState(caddy_routes=(ROUTE, idle))) == caddy_hash([ROUTE])


@pytest.mark.parametrize(
    ("entry", "wanted", "match"),
    [
        (":443", ":443", True),
        ("tcp/:443", ":443", True),
        ("0.0.0.0:443", ":443", True),
        ("127.0.0.1:8443", "127.0.0.1:8443", True),
        (":8443", "127.0.0.1:8443", True),
        (":80", ":443", False),
        ("127.0.0.2:8443", "127.0.0.1:8443", False),
        (":4430", ":443", False),
    ],
)
def test_listen_matching(entry: str, wanted: str, match: bool) -> None:
    assert listen_matches(entry, wanted) is match


def test_find_server_by_listen_address() -> None:
    servers = {"srv0": {"listen": [":80"]}, "srv1": {"listen": [":443"]}}
    assert find_server(servers, ":443") == "srv1"
    with pytest.raises(CaddyError, match="no Caddy server listens on :8443"):
        find_server(servers, ":8443")
    with pytest.raises(CaddyError, match="no HTTP servers"):
        find_server(None, ":443")


@pytest.mark.parametrize(
    ("route", "problem"),
    [
        (replace(ROUTE, domain="evil.com\nx"), "not a valid host name"),
        (replace(ROUTE, domain="App.Example.com"), "lower case"),
        (replace(ROUTE, upstreams=("10.200.3.2",)), "host:port"),
        (replace(ROUTE, upstreams=("10.200.3.2:0",)), "1..65535"),
        (replace(ROUTE, upstreams=("a b:80",)), "not a valid host name"),
        (replace(ROUTE, id="x\ny"), "control or separator character"),
        (replace(ROUTE, id=""), "must not be empty"),
        (replace(ROUTE, service_id="../x"), "serviceId"),
    ],
)
def test_bad_routes(route: CaddyRoute, problem: str) -> None:
    problems = validate_routes([route])
    assert problems and problem in problems[0], problems


@pytest.mark.parametrize(
    ("upstream", "problem"),
    [
        ("127.0.0.1:2019", "loopback"),  # Caddy's own admin API, published on a public domain
        ("127.1.2.3:80", "loopback"),
        ("169.254.169.254:80", "link-local"),  # cloud metadata
        ("0.0.0.0:80", "unspecified"),
        ("224.0.0.1:80", "multicast"),
        ("255.255.255.255:80", "reserved"),
        ("localhost:1234", "not a host name"),
        ("app.internal:80", "not a host name"),
        ("[::1]:80", "IPv4"),
        ("[fd00::1]:80", "IPv4"),
        ("192.168.1.10:80", "outside the deployment networks 10.200.0.0/16"),
        ("10.200.1.1:22", "gateway (the server itself) address of container subnet 10.200.1.0/24"),
        ("10.200.7.0:80", "network address of container subnet 10.200.7.0/24"),
        ("10.200.7.255:80", "broadcast address of container subnet 10.200.7.0/24"),
        ("10.100.2.1:9100", "WireGuard address"),  # another server's exporter over the mesh
        ("10.0.0.1:80", "outside the deployment networks"),
        ("010.200.1.2:80", "not a host name"),  # not an IPv4 literal Python or Go would read alike
    ],
)
def test_upstreams_must_be_deployment_addresses(upstream: str, problem: str) -> None:
    problems = validate_routes([replace(ROUTE, upstreams=("10.200.3.2:3000", upstream))])
    assert len(problems) == 1 and problem in problems[0] and upstream in problems[0], problems


def test_loopback_only_when_a_loopback_network_is_configured() -> None:
    route = replace(ROUTE, upstreams=("127.0.0.1:8080",))
    assert validate_routes([route], parse_upstream_networks(["10.200.0.0/16", "127.0.0.0/8"])) == []
    # A wide range is not a way around it; nor is it for link-local addresses.
    wide = parse_upstream_networks(["0.0.0.0/0"])
    assert "loopback" in " ".join(validate_routes([route], wide))
    assert "link-local" in " ".join(validate_routes([replace(ROUTE, upstreams=("169.254.169.254:80",))], wide))
    assert validate_routes([replace(ROUTE, upstreams=("192.168.1.10:80",))], wide) == []


def test_upstream_network_settings_are_checked() -> None:
    settings = replace(Settings(), caddy_admin_url="http://127.0.0.1:9")
    assert [str(n) for n in CaddySync(settings).upstream_networks] == ["10.200.0.0/16"]
    # Container IPs of any server pass, from .2 to .254 of its /24.
    edges = replace(ROUTE, upstreams=("10.200.1.2:80", "10.200.255.254:8080", "10.200.0.2:1"))
    assert validate_routes([edges], CaddySync(settings).upstream_networks) == []
    narrow = CaddySync(replace(settings, caddy_upstream_networks=("10.200.3.0/24",)))
    assert "outside" in " ".join(validate_routes([replace(ROUTE, upstreams=("10.200.4.2:80",))], narrow.upstream_networks))
    # A server address only when the operator lists a range of them; even 0.0.0.0/0 is not that.
    servers = CaddySync(replace(settings, caddy_upstream_networks=("10.200.0.0/16", "10.100.0.0/16")))
    assert validate_routes([replace(ROUTE, upstreams=("10.100.1.1:80",))], servers.upstream_networks) == []
    wide = parse_upstream_networks(["0.0.0.0/0"])
    assert "WireGuard" in " ".join(validate_routes([replace(ROUTE, upstreams=("10.100.1.1:80",))], wide))
    assert "gateway" in " ".join(validate_routes([replace(ROUTE, upstreams=("10.200.1.1:80",))], wide))
    for bad in (("10.200.0.1/16",), ("fd00::/8",), ("nonsense",)):
        with pytest.raises(CaddyError, match="not an IPv4 network"):
            CaddySync(settings, upstream_networks=bad)


def test_a_bad_upstream_is_refused_before_caddy_is_asked() -> None:
    # The admin API is unreachable: a refusal that names the upstream proves nothing was sent.
    sync = CaddySync(replace(Settings(), caddy_admin_url="http://127.0.0.1:9"))
    with pytest.raises(CaddyError, match=r"nothing was changed.*127\.0\.0\.1:2019.*loopback"):
        sync.apply(ExpectedState(caddy_routes=(replace(ROUTE, upstreams=("127.0.0.1:2019",)),)))


def test_duplicate_ids_rejected() -> None:
    assert "also used" in " ".join(validate_routes([ROUTE, replace(ROUTE, domain="b.example.com")]))
    assert validate_routes([ROUTE, replace(ROUTE, id="b", domain="*.example.com")]) == []


def test_unreachable_admin_api_raises_and_is_drift() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connection refused
        sync = CaddySync(replace(Settings(), caddy_admin_url=f"http://127.0.0.1:{port}"))
        with pytest.raises(CaddyError, match="unreachable"):
            sync.actual_hash()
        with pytest.raises(CaddyError, match="unreachable"):
            sync.apply(ExpectedState(caddy_routes=(ROUTE,)))


def test_settings_are_checked() -> None:
    with pytest.raises(CaddyError, match="caddy_admin_url"):
        CaddySync(replace(Settings(), caddy_admin_url="localhost:2019"))


def test_config_etag_is_caddys() -> None:
    # Values Caddy 2.6.2 sent (in its ETag trailer) for these exact bodies.
    path = "/config/apps/http/servers/s/routes"
    assert config_etag(path, b"[]\n") == f'"{path} 6dfb3b7d"'
    body = b'[{"@id":"x","handle":[{"handler":"static_response"}]}]\n'
    assert config_etag(path, body) == f'"{path} 306784a6"'
    # If-Match is split on white space by Caddy: such a path cannot be sent conditionally.
    assert config_etag("/config/apps/http/servers/my server/routes", b"[]\n") is None


def test_one_bad_route_is_skipped_once_and_the_rest_hashed(caplog) -> None:  # type: ignore[no-untyped-def]
    sync = CaddySync(replace(Settings(), caddy_admin_url="http://127.0.0.1:9"))
    state = ExpectedState(caddy_routes=(replace(ROUTE, id="bad", upstreams=("127.0.0.1:2019",)), ROUTE))
    with caplog.at_level("INFO"):
        for _ in range(3):
            assert sync.expected_hash(state) == caddy_hash([ROUTE])
    assert len([r for r in caplog.records if "loopback" in r.getMessage()]) == 1


def test_the_json_sent_must_read_back_as_the_intended_routes() -> None:
    foreign = [{"@id": "theirs", "handle": [{"handler": "static_response"}]}]
    body = foreign + [render_route(ROUTE, False)]
    check_body(body, foreign, [ROUTE])
    tampered = foreign + [render_route(ROUTE, False)]
    tampered[1]["match"][0]["host"].append("evil.example.com")
    with pytest.raises(CaddyError, match="nothing was changed"):
        check_body(tampered, foreign, [ROUTE])
    with pytest.raises(CaddyError, match="nothing was changed"):
        check_body(body, [], [ROUTE])

