"""The expected state (PROTOCOL.md §6.1) as validated dataclasses.

Parsing happens once, at the edge: everything after this module may trust the values.
A malformed document raises ModelError and nothing acts on it; a single bad entry is
dropped with a problem line naming it. Parsing logs nothing itself: the caller owns a
`problems.ProblemLog` that reports the problems once, then counts them, so a document of
five million bad entries costs a few log lines, not five million.

Doubt protects: an entry that cannot be fully parsed protects every container it might
describe, so that the reconciler never removes a running container because the control
plane sent a garbled description of it:
* an entry whose deploymentId is valid protects that deployment's container;
* an entry whose deploymentId becomes valid once surrounding white space and control or
  separator characters are stripped (`"abc "`, `"abc\n"`) protects the deployment so
  stripped (its container carries the clean id) as well as the raw string;
* an entry with no usable deploymentId at all (missing, not a string, too long, with
  characters no id may hold, or not an object) could describe any container: while it
  is listed, no container is removed (`invalid_sections` holds "containers").
A DNS record, route or peer that is invalid is dropped and the rest of its section applies;
`dropped` counts them per section, so that a section whose every entry was dropped (a format
slip in each) is told from an empty one: nothing acts on it.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import validate
from agent.validate import InvalidValue

log = logging.getLogger(__name__)


SECTIONS = ("containers", "dns", "caddy", "wireguard")
#: Problem texts kept per document (all of them are counted): a hostile document of millions
#: of bad entries must not cost memory or log lines in proportion.
MAX_PROBLEMS = 100
#: The service id of `agent doctor`'s throwaway container (agent/host/probe.py): the Podman
#: adapter hides its containers from the reconciler.
DOCTOR_PROBE_SERVICE = "techulus-doctor"
#: Service ids the agent uses itself and so refuses from the wire: a listed service with the
#: probe's id would be deployed again on every pass (its containers are hidden).
RESERVED_SERVICE_IDS = frozenset({DOCTOR_PROBE_SERVICE})
# What is stripped from a deploymentId to find the container a garbled entry might describe.
_SURROUNDING_JUNK = re.compile(r"^[\s\x00-\x1f\x7f-\x9f\u2028\u2029]+|[\s\x00-\x1f\x7f-\x9f\u2028\u2029]+$")


class ModelError(ValueError):
    """The document as a whole is unusable (not an object, wrong top-level types)."""


@dataclass(frozen=True)
class PortMapping:
    container_port: int
    host_port: int


@dataclass(frozen=True)
class HealthCheck:
    cmd: str
    interval: int = 10
    timeout: int = 5
    retries: int = 3
    start_period: int = 30


@dataclass(frozen=True)
class Volume:
    name: str
    container_path: str


@dataclass(frozen=True)
class ExpectedContainer:
    deployment_id: str
    service_id: str
    service_name: str
    name: str
    image: str
    ip_address: str
    ports: tuple[PortMapping, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    health_check: HealthCheck | None = None
    volumes: tuple[Volume, ...] = ()

    def volume_host_path(self, volumes_dir: Path, volume: Volume) -> Path:
        """Where a volume lives on this host: chosen by the agent, never taken from the wire."""
        return volumes_dir / self.service_id / volume.name


@dataclass(frozen=True)
class DnsRecord:
    name: str
    ips: tuple[str, ...]


@dataclass(frozen=True)
class CaddyRoute:
    id: str
    domain: str
    upstreams: tuple[str, ...]
    service_id: str


@dataclass(frozen=True)
class WireGuardPeer:
    public_key: str
    allowed_ips: str
    endpoint: str = ""


@dataclass(frozen=True)
class ExpectedState:
    containers: tuple[ExpectedContainer, ...] = ()
    dns_records: tuple[DnsRecord, ...] = ()
    caddy_routes: tuple[CaddyRoute, ...] = ()
    wireguard_peers: tuple[WireGuardPeer, ...] = ()
    # Deployment ids whose entries were invalid: their containers must be left alone.
    protected_deployments: frozenset[str] = frozenset()
    # The first MAX_PROBLEMS problem texts; `problem_count` counts them all.
    problems: tuple[str, ...] = ()
    # Top-level sections the document actually carried ("containers", "dns", "caddy",
    # "wireguard"). A missing one is unknown, not empty: nothing acts on it.
    sections: frozenset[str] = frozenset(SECTIONS)
    # "containers" when a container entry without a usable deployment id was dropped: then no
    # container is removed. (A bad DNS record, route or peer is only skipped, and the rest
    # of its section applies: freezing a whole global section would stop every server.)
    invalid_sections: frozenset[str] = frozenset()
    problem_count: int = 0
    # Section -> how many of its listed entries were dropped as invalid. A section whose
    # entries were ALL dropped is doubt, not emptiness (loop.py's _guard changes nothing in it).
    dropped: Mapping[str, int] = field(default_factory=dict)

    def all_dropped(self, section: str) -> bool:
        """Whether `section` listed entries and none of them was valid."""
        kept = {
            "containers": self.containers, "dns": self.dns_records,
            "caddy": self.caddy_routes, "wireguard": self.wireguard_peers,
        }[section]
        return not kept and self.dropped.get(section, 0) > 0

    def container(self, deployment_id: str) -> ExpectedContainer | None:
        for item in self.containers:
            if item.deployment_id == deployment_id:
                return item
        return None


# --- image references -------------------------------------------------------------------


def canonical_image(reference: str) -> str:
    """Fully qualify an image reference the way podman reports it.

    `nginx` -> `docker.io/library/nginx:latest`, `user/app:1.2` -> `docker.io/user/app:1.2`,
    `host:5000/app` -> `host:5000/app:latest` (the tag is looked for in the last path
    component only), digests kept. Also undoes the control plane's `docker.io/host:5000/x`.
    """
    name, _, digest = reference.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    parts = name.split("/")
    if len(parts) >= 3 and parts[0] in ("docker.io", "index.docker.io") and _is_registry(parts[1]):
        parts = parts[1:]
    if len(parts) == 1:
        parts = ["docker.io", "library", *parts]
    elif not _is_registry(parts[0]):
        parts = ["docker.io", *parts]
    if parts[0] == "index.docker.io":
        parts[0] = "docker.io"
    if parts[0] == "docker.io" and len(parts) == 2:
        parts = ["docker.io", "library", parts[1]]
    result = "/".join(parts)
    if digest:
        # Podman drops the tag of `name:tag@digest` (the digest decides), so do we.
        return result + "@" + digest
    return result + ":" + (tag or "latest")


def _is_registry(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def images_match(expected: str, actual: str) -> bool:
    return canonical_image(expected) == canonical_image(actual)


# --- parsing ---------------------------------------------------------------------------


def parse_expected_state(data: Any, subnet: ipaddress.IPv4Network | None) -> ExpectedState:
    """Validate a decoded expected-state document.

    `subnet` is this server's container subnet (10.200.X.0/24); static IPs outside it are
    rejected. Go decodes null/missing as empty, and so do we.
    """
    if not isinstance(data, dict):
        raise ModelError(f"expected state must be a JSON object, got {type(data).__name__}")
    problems = _Problems()
    protected: set[str] = set()

    containers = _list(data.get("containers"), "containers")
    dns = _list(_section(data, "dns").get("records"), "dns.records")
    routes = _list(_section(data, "caddy").get("routes"), "caddy.routes")
    peers = _list(_section(data, "wireguard").get("peers"), "wireguard.peers")

    invalid: set[str] = set()
    parsed_containers: list[ExpectedContainer] = []
    seen_ids: set[str] = set()
    seen_ips: dict[str, str] = {}
    for index, raw in enumerate(containers):
        try:
            item = _container(raw, subnet)
            if item.deployment_id in seen_ids:
                raise InvalidValue("deploymentId is listed twice")
            if item.ip_address and item.ip_address in seen_ips:
                raise InvalidValue(f"ipAddress {item.ip_address} is also given to deployment {seen_ips[item.ip_address]}")
        except InvalidValue as exc:
            problems.add(f"container {_container_label(raw, index)}: {exc}; skipped" if problems.keeping else "")
            described = might_describe(raw)
            if described:
                protected |= described
            else:
                # Without a usable deployment id its container cannot be told apart from an
                # orphan: no removal at all while such an entry is there.
                invalid.add("containers")
            continue
        seen_ids.add(item.deployment_id)
        if item.ip_address:
            seen_ips[item.ip_address] = item.deployment_id
        parsed_containers.append(item)

    parsed_dns = _entries(dns, "dns record", _dns_record, problems)
    parsed_routes = _entries(routes, "caddy route", _caddy_route, problems)
    parsed_peers = _entries(peers, "wireguard peer", _wireguard_peer, problems)
    dropped = {
        "containers": len(containers) - len(parsed_containers),
        "dns": len(dns) - len(parsed_dns),
        "caddy": len(routes) - len(parsed_routes),
        "wireguard": len(peers) - len(parsed_peers),
    }
    return ExpectedState(
        tuple(parsed_containers),
        tuple(parsed_dns),
        tuple(parsed_routes),
        tuple(parsed_peers),
        frozenset(protected),
        tuple(problems.texts),
        frozenset(section for section in SECTIONS if data.get(section) is not None),
        frozenset(invalid),
        problems.count,
        {section: count for section, count in dropped.items() if count},
    )


def might_describe(raw: Any) -> frozenset[str]:
    """The deployment ids whose containers an invalid container entry might describe; empty
    when it has no usable id (then it might describe any container)."""
    if not isinstance(raw, dict):
        return frozenset()
    value = raw.get("deploymentId")
    if not isinstance(value, str) or not value:
        return frozenset()
    candidates = {value, _SURROUNDING_JUNK.sub("", value)}
    usable = set()
    for candidate in candidates:
        try:
            usable.add(validate.identifier(candidate, "deploymentId"))
        except InvalidValue:
            continue
    if not usable:
        return frozenset()
    # The raw string too: it is what an older agent might have written as the label.
    return frozenset(usable | {value})


class _Problems:
    """Counts every problem, keeps the text of the first MAX_PROBLEMS (built only for those)."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.count = 0

    @property
    def keeping(self) -> bool:
        """Whether the next problem's text is kept (callers build the text only then)."""
        return len(self.texts) < MAX_PROBLEMS

    def add(self, text: str) -> None:
        self.count += 1
        if self.keeping:
            self.texts.append(text)


def parse_wireguard_peers(raw: Any) -> tuple[list[WireGuardPeer], list[str]]:
    """Peers from a payload (e.g. `update_wireguard`), with the expected state's checks;
    returns the valid peers and one problem line per rejected entry."""
    problems = _Problems()
    try:
        items = _list(raw, "peers")
    except ModelError as exc:
        return [], [str(exc)]
    return _entries(items, "wireguard peer", _wireguard_peer, problems), problems.texts


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ModelError(f"{key} must be an object, got {type(value).__name__}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ModelError(f"{what} must be a list, got {type(value).__name__}")
    return value


def _entries(raw_items: list[Any], what: str, parse: Any, problems: _Problems) -> list[Any]:
    parsed = []
    for index, raw in enumerate(raw_items):
        try:
            parsed.append(parse(raw))
        except InvalidValue as exc:
            problems.add(f"{what} #{index}: {exc}; skipped" if problems.keeping else "")
    return parsed


def _container_label(raw: Any, index: int) -> str:
    if isinstance(raw, dict) and isinstance(raw.get("deploymentId"), str):
        return f"#{index} (deployment {raw['deploymentId'][:64]!r})"
    return f"#{index}"


def _object(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidValue(f"must be an object, got {type(raw).__name__}")
    return raw


def _container(raw: Any, subnet: ipaddress.IPv4Network | None) -> ExpectedContainer:
    obj = _object(raw)
    deployment_id = validate.identifier(obj.get("deploymentId"), "deploymentId")
    service_id = validate.identifier(obj.get("serviceId"), "serviceId")
    if service_id in RESERVED_SERVICE_IDS:
        raise InvalidValue(f"serviceId {service_id} is reserved for the agent's own doctor probe")
    service_name = validate.free_text(obj.get("serviceName"), "serviceName")
    name = validate.container_name(obj.get("name"))
    image = validate.image_reference(obj.get("image"))
    ip_raw = obj.get("ipAddress") or ""
    if ip_raw:
        if subnet is None:
            ip_address = str(validate.ipv4(ip_raw, "ipAddress"))
        else:
            ip_address = validate.container_ip(ip_raw, subnet)
    else:
        ip_address = ""
    ports = tuple(
        PortMapping(
            validate.port(_object(p).get("containerPort"), "ports[].containerPort"),
            validate.port(_object(p).get("hostPort"), "ports[].hostPort"),
        )
        for p in _list_field(obj, "ports")
    )
    env_raw = obj.get("env") or {}
    if not isinstance(env_raw, dict):
        raise InvalidValue("env must be an object")
    env: dict[str, str] = {}
    for key, value in env_raw.items():
        validate.env_key(key)
        if not isinstance(value, str):
            raise InvalidValue(f"env {key}: value must be a string")
        env[key] = value
    health = _health(obj.get("healthCheck"))
    volumes: list[Volume] = []
    for volume in _list_field(obj, "volumes"):
        volume = _object(volume)
        volumes.append(Volume(validate.volume_name(volume.get("name")), validate.container_path(volume.get("containerPath"))))
    if len({v.name for v in volumes}) != len(volumes):
        raise InvalidValue("two volumes share a name")
    return ExpectedContainer(
        deployment_id, service_id, service_name, name, image, ip_address, ports, env, health, tuple(volumes)
    )


def _list_field(obj: dict[str, Any], key: str) -> list[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidValue(f"{key} must be a list")
    return value


def _health(raw: Any) -> HealthCheck | None:
    if raw is None:
        return None
    obj = _object(raw)
    cmd = obj.get("cmd") or ""
    if isinstance(cmd, str) and not cmd.strip():
        return None
    cmd = validate.free_text(cmd, "healthCheck.cmd", max_len=4096)
    return HealthCheck(
        cmd,
        validate.bounded_int(_default(obj, "interval", 10), "healthCheck.interval", 1, 86400),
        validate.bounded_int(_default(obj, "timeout", 5), "healthCheck.timeout", 1, 86400),
        validate.bounded_int(_default(obj, "retries", 3), "healthCheck.retries", 1, 1000),
        validate.bounded_int(_default(obj, "startPeriod", 30), "healthCheck.startPeriod", 0, 86400),
    )


def _default(obj: dict[str, Any], key: str, default: int) -> Any:
    value = obj.get(key)
    return default if value is None else value


def _dns_record(raw: Any) -> DnsRecord:
    obj = _object(raw)
    name = validate.hostname(obj.get("name"), "dns name")
    ips = obj.get("ips")
    if not isinstance(ips, list) or not ips:
        raise InvalidValue(f"dns record {name}: ips must be a non-empty list")
    return DnsRecord(name, tuple(validate.ip_address(ip, f"dns record {name} ip") for ip in ips))


def _caddy_route(raw: Any) -> CaddyRoute:
    obj = _object(raw)
    domain = validate.hostname(obj.get("domain"), "caddy domain", allow_wildcard=True)
    route_id = obj.get("id") or domain
    validate.free_text(route_id, "caddy route id")
    upstreams = obj.get("upstreams") or []
    if not isinstance(upstreams, list):
        raise InvalidValue(f"caddy route {domain}: upstreams must be a list")
    for upstream in upstreams:
        validate.host_port(upstream, f"caddy route {domain} upstream")
    service_id = obj.get("serviceId") or ""
    if service_id:
        validate.identifier(service_id, "caddy route serviceId")
    return CaddyRoute(route_id, domain, tuple(upstreams), service_id)


def _wireguard_peer(raw: Any) -> WireGuardPeer:
    obj = _object(raw)
    key = validate.wireguard_key(obj.get("publicKey"))
    allowed = validate.cidr_list(obj.get("allowedIps"))
    endpoint = obj.get("endpoint") or ""
    if endpoint:
        validate.host_port(endpoint, "wireguard endpoint")
        endpoint = str(endpoint)
    return WireGuardPeer(key, allowed, endpoint)
