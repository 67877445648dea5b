"""Property tests: no value from the wire becomes a line of a file, nor an extra argument.

Random text (control characters, `%`, `\\r`, `\\n`, `\\u2028`, NUL, very long strings, and
valid-looking prefixes such as `fe80::1%x\\n[Interface]`) goes into every wire field that
reaches wg0.conf, the dnsmasq hosts file, Caddy's JSON, podman's environment, the podman
env file or podman's argv. Each property parses the result the way its real reader does (wg-quick, dnsmasq,
Caddy, podman) with a parser written here, independent of the agent's own read-back, and
asserts that it holds exactly the intended entries, or that the entry was refused.
Example counts are bounded (PROFILE) so that the whole file runs in a few seconds.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import crypto, validate
from agent.drift import merge_dns_records
from agent.host import caddy as caddy_module
from agent.host.dns import DnsError, check_hosts, render_hosts, sort_records
from agent.host.podman import Podman, PodmanError, PodmanOptions, podman_reads, split_env
from agent.host.wireguard import WireGuardError, check_rendered, render_quick_conf, sort_peers
from agent.model import ModelError, parse_expected_state, parse_wireguard_peers

PROFILE = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SUBNET = ipaddress.IPv4Network("10.200.1.0/24")
PRIV = crypto.new_wireguard_private_key()
PUB = crypto.wireguard_public_key(PRIV)
KEY = crypto.wireguard_public_key(crypto.new_wireguard_private_key())
INTERFACE = {"PrivateKey": PRIV, "Address": "10.100.1.1/32", "ListenPort": "51820", "MTU": "1420"}

TROUBLE = ["\n", "\r", "\r\n", "\x00", "\x85", "\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "%", "#", " ", "\t", "=", ",",
           "[", "]", "{", "}", '"', "'", "\\", ":", "/", "\u202e", "\ufeff", "\ud800", "５"]
PREFIXES = ["fe80::1%x", "fe80::1%x\n[Interface]\nPreUp = cd; touch pwned", "10.100.2.0/24", "1.2.3.4:51820", "10.0.0.1",
            "a.internal", "10.200.1.2:80", KEY, "docker.io/library/nginx:1.27", "44444444-4444-4444-8444-444444444444"]


def hostile_text() -> st.SearchStrategy[str]:
    """Text built from trouble characters, plausible values and random Unicode."""
    piece = st.one_of(st.sampled_from(TROUBLE), st.sampled_from(PREFIXES), st.text(max_size=8))
    joined = st.lists(piece, max_size=6).map("".join)
    long = st.tuples(st.sampled_from(PREFIXES), st.integers(300, 6000), st.sampled_from(TROUBLE)).map(
        lambda t: t[0] + "a" * t[1] + t[2]
    )
    return st.one_of(joined, long, st.sampled_from(PREFIXES))


def field(valid: list[str]) -> st.SearchStrategy[str]:
    """A field that is often valid, often a valid value with trouble around it, often garbage."""
    return st.one_of(
        st.sampled_from(valid),
        st.tuples(st.sampled_from(valid), hostile_text()).map("".join),
        st.tuples(hostile_text(), st.sampled_from(valid)).map("".join),
        hostile_text(),
    )


# --- independent readers ----------------------------------------------------------------------


def wg_quick_read(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) as wg-quick's bash `read -r` loop and wg's parser see them."""
    entries = []
    section = ""
    for raw in text.split("\n"):
        line = raw.split("#", 1)[0].strip(" \t\r\v\f")
        if not line:
            continue
        if line.startswith("["):
            section = line.lower()
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(" \t\r\v\f").lower(), value.strip(" \t\r\v\f")))
    return entries


def dnsmasq_read(text: str) -> set[tuple[str, str]]:
    """(address, name) pairs as dnsmasq reads a hosts file: any of \\n \\r ends a line."""
    pairs = set()
    for line in text.replace("\r", "\n").split("\n"):
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2:
            pairs.update((fields[0], name) for name in fields[1:])
    return pairs


# --- properties -------------------------------------------------------------------------------


PEER = {"publicKey": KEY, "allowedIps": "10.100.2.0/24,10.200.2.0/24", "endpoint": "1.2.3.4:51820"}
PEER_VALUES = {"publicKey": [KEY], "allowedIps": ["10.100.2.0/24,10.200.2.0/24", "10.100.2.0/24"],
               "endpoint": ["1.2.3.4:51820", "[fe80::1]:51820", "2001:db8::1:51820", "vpn.example.com:51820", ""]}


def one_field_changed(base: dict[str, object], values: dict[str, list[str]]) -> st.SearchStrategy[dict[str, object]]:
    """`base` with one field (chosen at random) replaced by a hostile variant of its values."""
    return st.sampled_from(sorted(values)).flatmap(lambda key: field(values[key]).map(lambda v: {**base, key: v}))


@PROFILE
@given(raw=one_field_changed(PEER, PEER_VALUES))
def test_peer_fields_never_become_lines_of_wg0_conf(raw: dict[str, object]) -> None:
    peers, _ = parse_wireguard_peers([raw])
    usable, _ = sort_peers(peers, PUB, ("10.100.1.0/24", "10.200.1.0/24"))
    text = render_quick_conf(PRIV, "10.100.1.1", 51820, 1420, usable)
    check_rendered(text, "wg0.conf", INTERFACE, usable)
    intended = [("[interface]", "privatekey", PRIV), ("[interface]", "address", "10.100.1.1/32"),
                ("[interface]", "listenport", "51820"), ("[interface]", "mtu", "1420")]
    for peer in usable:
        intended += [("[peer]", "publickey", peer.public_key), ("[peer]", "allowedips", peer.allowed_ips)]
        intended += [("[peer]", "endpoint", peer.endpoint)] if peer.endpoint else []
        intended += [("[peer]", "persistentkeepalive", "25")]
    assert wg_quick_read(text) == intended


@PROFILE
@given(key=hostile_text(), allowed=hostile_text(), endpoint=hostile_text())
def test_the_wg_read_back_refuses_what_would_not_read_as_intended(key: str, allowed: str, endpoint: str) -> None:
    # Past the model (a peer built by hand): the renderer's own read-back is the last guard.
    from agent.model import WireGuardPeer

    peer = WireGuardPeer(key, allowed, endpoint)
    text = render_quick_conf(PRIV, "10.100.1.1", 51820, 1420, [peer])
    try:
        check_rendered(text, "wg0.conf", INTERFACE, [peer])
    except WireGuardError:
        return
    sections = [entry[0] for entry in wg_quick_read(text)]
    assert sections.count("[interface]") == 4 and len(wg_quick_read(text)) <= 8
    assert all(k in ("publickey", "allowedips", "endpoint", "persistentkeepalive") for s, k, _ in wg_quick_read(text) if s == "[peer]")


@PROFILE
@given(name=field(["api.internal", "web.internal", "www.google.com"]),
       ips=st.lists(st.one_of(st.sampled_from(["10.200.1.2", "fd00::1"]), field(["10.200.1.2", "fd00::1", "fe80::1"])),
                    min_size=1, max_size=3))
def test_dns_fields_never_become_lines_of_the_hosts_file(name: str, ips: list[str]) -> None:
    state = parse_expected_state({"dns": {"records": [{"name": name, "ips": ips}]}}, SUBNET)
    usable, _ = sort_records(state.dns_records)
    usable = merge_dns_records(usable)  # as DnsSync.apply_records does
    text = render_hosts(usable)
    check_hosts(text, usable)
    assert dnsmasq_read(text) == {(ip, record.name) for record in usable for ip in record.ips}


@PROFILE
@given(name=hostile_text(), ip=hostile_text())
def test_the_hosts_read_back_refuses_what_would_not_read_as_intended(name: str, ip: str) -> None:
    from agent.model import DnsRecord

    records = [DnsRecord(name, (ip,))]
    text = render_hosts(records)
    try:
        check_hosts(text, records)
    except DnsError:
        return
    assert dnsmasq_read(text) == {(ip, name)}


ROUTE = {"id": "app", "domain": "app.example.com", "upstreams": "10.200.3.2:3000", "serviceId": "svc-1"}
ROUTE_VALUES = {"id": ["app", "route-1"], "domain": ["app.example.com", "*.example.com"],
                "upstreams": ["10.200.3.2:3000", "10.200.2.254:80"], "serviceId": ["svc-1", ""]}


@PROFILE
@given(changed=one_field_changed(ROUTE, ROUTE_VALUES))
def test_route_fields_reach_caddy_as_exactly_the_intended_route(changed: dict[str, object]) -> None:
    raw = {**changed, "upstreams": [changed["upstreams"]]}
    state = parse_expected_state({"caddy": {"routes": [raw]}}, SUBNET)
    usable, _ = caddy_module.sort_routes(state.caddy_routes)
    body = [caddy_module.render_route(route, True) for route in usable]
    caddy_module.check_body(body, [], usable)
    decoded = json.loads(json.dumps(body))
    assert len(decoded) == len(usable)
    for sent, route in zip(decoded, usable, strict=True):
        assert sent["match"] == [{"host": [route.domain]}]
        assert [u["dial"] for u in sent["handle"][-1]["upstreams"]] == list(route.upstreams)
        address, _, port = route.upstreams[0].rpartition(":")
        assert ipaddress.IPv4Address(address) in ipaddress.IPv4Network("10.0.0.0/8") and port.isascii()
        assert validate.bad_character(route.domain + route.id) is None and "{" not in route.domain


CONTAINER = {
    "deploymentId": "44444444-4444-4444-8444-444444444444", "serviceId": "svc-1", "serviceName": "Web App",
    "name": "web-1", "image": "docker.io/library/nginx:1.27", "ipAddress": "10.200.1.2",
    "healthCheck": {"cmd": "curl -f http://localhost/"}, "volumes": [{"name": "data", "containerPath": "/data"}],
}


@PROFILE
@given(key=st.sampled_from(["deploymentId", "serviceId", "serviceName", "name", "image", "ipAddress"]),
       value=field(["44444444-4444-4444-8444-444444444444", "svc-1", "Web App", "web-1", "nginx:1.27", "10.200.1.3"]),
       health=field(["curl -f http://localhost/"]), path=field(["/data", "/var/lib/x"]))
def test_container_fields_never_become_extra_podman_arguments(key: str, value: str, health: str, path: str) -> None:
    entry = dict(CONTAINER, **{key: value}, healthCheck={"cmd": health}, volumes=[{"name": "data", "containerPath": path}])
    try:
        state = parse_expected_state({"containers": [entry]}, SUBNET)
    except ModelError:
        return
    if not state.containers:
        return
    spec = state.containers[0]
    podman = Podman(PodmanOptions(run_dir=Path("/nonexistent")))
    try:
        argv = podman._run_argv(spec, Path("/var/lib/techulus-agent/volumes"))
    except PodmanError:
        return
    validate.argv(argv)
    # One argument per option: the values stay inside their own `--opt=value`.
    assert argv[-2] == "--" and argv.count("--") == 1
    labels = [arg for arg in argv if arg.startswith("--label=")]
    assert labels[:3] == [f"--label=techulus.service.id={spec.service_id}",
                          f"--label=techulus.service.name={spec.service_name}",
                          f"--label=techulus.deployment.id={spec.deployment_id}"]
    assert sum(arg.startswith("--name=") for arg in argv) == 1
    assert all(not arg.startswith("-") or "=" in arg or arg in ("--detach", "--", "--init") for arg in argv[1:-1])


ENV_VALUES = ["s3cr3t", "postgres://u:p@h/db", "", "-----BEGIN KEY-----\nAAAA\n-----END KEY-----\n", '"{\n}"', "a=b"]


def environment_read(entries: list[bytes]) -> dict[str, str]:
    """An environment as execve hands it on and Go's os.Getenv reads it: NUL-terminated
    `KEY=VALUE` strings, each at most MAX_ARG_STRLEN (131072) bytes, split at the first '='."""
    assert all(b"\0" not in entry and len(entry) + 1 <= 131072 for entry in entries)
    return {key.decode(): value.decode("utf-8") for key, _, value in (entry.partition(b"=") for entry in entries)}


def env_file_read(text: str) -> dict[str, str]:
    """podman's --env-file: lines split at \\n, KEY=VALUE at the first '='; a value opening with a
    quote is read across lines by podman 4.7+, so this reader gives up on it."""
    read = {}
    for line in text.split("\n"):
        if line:
            key, _, value = line.rstrip("\r").partition("=")
            assert value[:1] not in ('"', "'")
            read[key] = value
    return read


@PROFILE
@given(values=st.dictionaries(st.sampled_from(["A", "DATABASE_URL", "TOKEN", "PATH", "TZ", "LD_PRELOAD"]),
                              field(ENV_VALUES), min_size=1, max_size=4))
def test_env_values_reach_the_container_exactly_and_never_argv(values: dict[str, str]) -> None:
    podman = Podman(PodmanOptions(run_dir=Path("/nonexistent")))
    try:
        by_name, in_file = split_env(values)
        fd = podman._env_file(in_file) if in_file else None
    except PodmanError:
        return
    try:
        text = os.pread(fd, 1 << 20, 0).decode() if fd is not None else ""
    finally:
        if fd is not None:
            os.close(fd)
    # Names podman itself reads travel in the env file, every other one by name alone.
    assert all(podman_reads(key) for key in in_file) and not any(podman_reads(key) for key in by_name)
    received = environment_read([f"{k}={v}".encode() for k, v in by_name.items()])
    assert {**received, **env_file_read(text)} == values and len(by_name) + len(in_file) == len(values)
    spec = parse_expected_state({"containers": [CONTAINER]}, SUBNET).containers[0]
    argv = podman._run_argv(spec, Path("/v"), list(by_name), Path("/dev/fd/9") if in_file else None)
    validate.argv(argv)
    assert [a for a in argv if a.startswith("--env")] == (["--env-file=/dev/fd/9"] if in_file else []) + [
        f"--env={key}" for key in by_name
    ]
