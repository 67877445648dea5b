"""Pure drift detection: (expected, actual) -> an ordered list of changes, and the hashes.

No I/O here. The order of the plan is the order in which PROCESSING applies changes,
one at a time: orphans, unexpected deployments, created/exited containers, missing
containers, wrong images, then DNS, Caddy and WireGuard (PROTOCOL.md §9.3-9.5). This is
the documented order; the Go code deployed missing containers before starting stopped
ones (§9.5 note). Starting first is cheap and brings a known-good container back sooner.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from agent.model import CaddyRoute, DnsRecord, ExpectedContainer, ExpectedState, WireGuardPeer, images_match

LABEL_SERVICE_ID = "techulus.service.id"
LABEL_SERVICE_NAME = "techulus.service.name"
LABEL_DEPLOYMENT_ID = "techulus.deployment.id"

STARTABLE_STATES = frozenset({"created", "exited", "stopped", "configured", "initialized"})
# States a container passes through on its own; acting on them would fight podman.
TRANSIENT_STATES = frozenset({"stopping", "removing"})


@dataclass(frozen=True)
class ContainerInfo:
    """One managed container as `podman ps -a` reports it."""

    id: str
    name: str
    image: str
    state: str
    labels: Mapping[str, str] = field(default_factory=dict)
    created: int = 0

    @property
    def deployment_id(self) -> str:
        return self.labels.get(LABEL_DEPLOYMENT_ID, "") or ""

    @property
    def service_id(self) -> str:
        return self.labels.get(LABEL_SERVICE_ID, "") or ""

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def short_id(self) -> str:
        return self.id[:12]


class ChangeKind(str, Enum):
    REMOVE_ORPHAN = "remove-orphan"
    REMOVE_UNEXPECTED = "remove-unexpected"
    START = "start"
    DEPLOY = "deploy"
    REDEPLOY = "redeploy"
    UPDATE_DNS = "update-dns"
    UPDATE_CADDY = "update-caddy"
    UPDATE_WIREGUARD = "update-wireguard"


CONFIG_KINDS = {"dns": ChangeKind.UPDATE_DNS, "caddy": ChangeKind.UPDATE_CADDY, "wireguard": ChangeKind.UPDATE_WIREGUARD}


@dataclass(frozen=True)
class Change:
    kind: ChangeKind
    reason: str
    container: ContainerInfo | None = None
    expected: ExpectedContainer | None = None

    def describe(self) -> str:
        target = ""
        if self.expected is not None:
            target = f" {self.expected.name} (deployment {self.expected.deployment_id})"
        elif self.container is not None:
            target = f" {self.container.name} ({self.container.short_id})"
        return f"{self.kind.value}{target}: {self.reason}"


# --- hashes (PROTOCOL.md §9.3.2-9.3.5) -------------------------------------------------


EMPTY_HASH = hashlib.sha256(b"").hexdigest()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def merge_dns_records(records: Iterable[DnsRecord]) -> list[DnsRecord]:
    """One record per name with the union of its IPs (first-seen order): the CP may repeat names."""
    merged: dict[str, list[str]] = {}
    for record in records:
        ips = merged.setdefault(record.name, [])
        for ip in record.ips:
            if ip not in ips:
                ips.append(ip)
    return [DnsRecord(name, tuple(ips)) for name, ips in merged.items()]


def dns_hash(records: Iterable[DnsRecord]) -> str:
    text = "".join(
        f"{r.name}:{','.join(sorted(r.ips))}|" for r in sorted(records, key=lambda r: r.name.encode())
    )
    return _sha(text)


def caddy_hash(routes: Iterable[CaddyRoute]) -> str:
    text = "".join(
        f"{r.id}:{r.domain}:{r.service_id}:{','.join(sorted(r.upstreams))}|"
        for r in sorted(routes, key=lambda r: r.id.encode())
    )
    return _sha(text)


def wireguard_hash(peers: Iterable[WireGuardPeer]) -> str:
    text = "".join(
        f"{p.public_key}:{p.allowed_ips}:{p.endpoint or ''}|"
        for p in sorted(peers, key=lambda p: p.public_key.encode())
    )
    return _sha(text)


# --- the plan ----------------------------------------------------------------------------


def container_changes(expected: ExpectedState, actual: Sequence[ContainerInfo]) -> list[Change]:
    """Container changes in the order they are applied."""
    by_deployment: dict[str, ContainerInfo] = {}
    orphans: list[Change] = []
    duplicates: list[Change] = []
    for container in actual:
        deployment_id = container.deployment_id
        if not deployment_id:
            orphans.append(Change(ChangeKind.REMOVE_ORPHAN, "managed container without a deployment id", container))
            continue
        previous = by_deployment.get(deployment_id)
        if previous is not None:
            # Two containers for one deployment: keep the running / newer one, remove the other.
            keep, drop = sorted([previous, container], key=lambda c: (c.running, c.created), reverse=True)
            by_deployment[deployment_id] = keep
            duplicates.append(Change(ChangeKind.REMOVE_ORPHAN, f"second container for deployment {deployment_id}", drop))
            continue
        by_deployment[deployment_id] = container

    expected_ids = {item.deployment_id for item in expected.containers}
    unexpected = [
        Change(ChangeKind.REMOVE_UNEXPECTED, "deployment is no longer expected", container)
        for deployment_id, container in by_deployment.items()
        if deployment_id not in expected_ids and deployment_id not in expected.protected_deployments
    ]
    starts: list[Change] = []
    deploys: list[Change] = []
    redeploys: list[Change] = []
    for item in expected.containers:
        found = by_deployment.get(item.deployment_id)
        if found is None:
            deploys.append(Change(ChangeKind.DEPLOY, "no container yet", expected=item))
        elif not images_match(item.image, found.image):
            redeploys.append(Change(ChangeKind.REDEPLOY, f"image {found.image} should be {item.image}", found, item))
        elif found.running or found.state in TRANSIENT_STATES:
            continue
        elif found.state in STARTABLE_STATES:
            starts.append(Change(ChangeKind.START, f"container is {found.state}", found, item))
        else:
            redeploys.append(Change(ChangeKind.REDEPLOY, f"container is {found.state}", found, item))
    return orphans + duplicates + unexpected + starts + deploys + redeploys


def plan(
    expected: ExpectedState,
    actual: Sequence[ContainerInfo],
    config_drift: Sequence[str] = (),
) -> list[Change]:
    """Everything that differs. `config_drift` names the config sections whose hashes differ."""
    changes = container_changes(expected, actual)
    for section in ("dns", "caddy", "wireguard"):
        if section in config_drift:
            changes.append(Change(CONFIG_KINDS[section], f"{section} configuration differs"))
    return changes
