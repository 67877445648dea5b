"""Pure drift detection: (expected, actual) -> an ordered list of changes, and the hashes.

No I/O here. The order of the plan is the order in which PROCESSING applies changes,
one at a time: orphans, unexpected deployments, created/exited containers, missing
containers, wrong images, then DNS, Caddy and WireGuard (PROTOCOL.md §9.3-9.5). This is
the documented order; the Go code deployed missing containers before starting stopped
ones (§9.5 note). Starting first is cheap and brings a known-good container back sooner.

Image drift (ROLLOUT.md). The control plane changes a service's image only through NEW
deployments (deployService makes new rows); the image listed for an existing row merely
follows the service's current configuration: the not-yet-deployed one, the new image during
a rollout (the old running row included, also when the new row runs on another server), or
the failed image after a rollback. So with a control plane (`follow_image_changes=False`):

* a running (or stopping/removing) container whose image differs is never stopped,
  restarted or re-created for that: the change is *held back* (shown by `agent plan`).
  It keeps serving until the control plane drops its deployment, and then goes the way
  of every unexpected deployment (drained first, see loop.py);
* a container whose image differs and that is exited, created or crash-looped to a halt is
  repaired by a START on its own image, never re-imaged (if it cannot be started, the
  loop removes it and the next plan deploys it like a missing one);
* a *missing* container is deployed on the listed image: the agent has no other image to
  give it.

In standalone mode (`follow_image_changes=True`: the state file is the operator's intent) a
lone deployment whose image changed is re-created on the new image (REDEPLOY); while a
service has two or more deployments listed (a rollout written into the file, or replicas)
the rules above apply to it, so the old deployment keeps serving until the file drops it.
The rule depends only on the document and the mode: an agent restart changes nothing.
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
    # What `podman ps` says besides (issue 11: the status report needs no inspect per tick):
    # the health check's status ("" when ps shows none), when the container last started
    # (unix seconds; a restart moves it, 0 = unknown) and podman's restart count (-1 where
    # ps does not carry it, as podman 4.3's does not).
    health: str = ""
    started_at: int = 0
    restarts: int = -1
    # Its main process on this host (0 = unknown, or not running).
    pid: int = 0

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
    # Why the change is deliberately not made (for `agent plan`'s "held back" lines); the
    # reason stays what the change itself would do.
    held_because: str = ""

    def describe(self) -> str:
        target = ""
        if self.expected is not None:
            target = f" {self.expected.name} (deployment {self.expected.deployment_id})"
        elif self.container is not None:
            target = f" {self.container.name} ({self.container.short_id})"
        return f"{self.kind.value}{target}: {self.reason}"

    def done(self) -> str:
        """The line for a change that was applied: it reads as what now holds ("deployed …"),
        not as the drift that asked for it ("deploy …: no container yet" read as a failure)."""
        if self.expected is not None:
            target = f"{self.expected.name} (deployment {self.expected.deployment_id})"
            where = f" on {self.expected.ip_address}" if self.expected.ip_address else ""
            if self.kind is ChangeKind.DEPLOY:
                return f"deployed {target}{where}, image {self.expected.image}"
            if self.kind is ChangeKind.REDEPLOY:
                return f"re-created {target}{where}, image {self.expected.image} (was: {self.reason})"
            if self.kind is ChangeKind.START:
                return f"started {target} (was: {self.reason})"
        if self.container is not None and self.kind in (ChangeKind.REMOVE_ORPHAN, ChangeKind.REMOVE_UNEXPECTED):
            return f"removed {self.container.name} ({self.container.short_id}): {self.reason}"
        return f"applied: {self.describe()}"


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


def several_deployments(expected: ExpectedState) -> frozenset[str]:
    """Services with two or more listed deployments: a rollout (or replicas) in progress."""
    counts: dict[str, int] = {}
    for item in expected.containers:
        counts[item.service_id] = counts.get(item.service_id, 0) + 1
    return frozenset(service for service, count in counts.items() if count > 1)


@dataclass(frozen=True)
class Plan:
    """What to do, in order, and what is deliberately not done (for `agent plan` and logs)."""

    changes: list[Change]
    held: list[Change]


def container_plan(
    expected: ExpectedState,
    actual: Sequence[ContainerInfo],
    *,
    follow_image_changes: bool = False,
) -> Plan:
    """Container changes in the order they are applied, and the image changes held back
    (see the module docstring). `follow_image_changes`: a lone deployment whose listed
    image changed is re-created (standalone); without it (a control plane, the default, as
    it never re-images anything) no existing container is re-imaged."""
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
    rolling = several_deployments(expected)
    starts: list[Change] = []
    deploys: list[Change] = []
    redeploys: list[Change] = []
    held: list[Change] = []
    for item in expected.containers:
        found = by_deployment.get(item.deployment_id)
        if found is None:
            deploys.append(Change(ChangeKind.DEPLOY, "no container yet", expected=item))
        elif not images_match(item.image, found.image) and (not follow_image_changes or item.service_id in rolling):
            if found.running or found.state in TRANSIENT_STATES:
                held.append(Change(
                    ChangeKind.REDEPLOY, f"image {found.image} should be {item.image}", found, item,
                    held_because=_why_image_held(item.service_id in rolling, follow_image_changes),
                ))
            else:
                starts.append(Change(ChangeKind.START, f"container is {found.state} (restarted on its own image)", found, item))
        elif not images_match(item.image, found.image):
            redeploys.append(Change(ChangeKind.REDEPLOY, f"image {found.image} should be {item.image}", found, item))
        elif found.running or found.state in TRANSIENT_STATES:
            continue
        elif found.state in STARTABLE_STATES:
            starts.append(Change(ChangeKind.START, f"container is {found.state}", found, item))
        else:
            redeploys.append(Change(ChangeKind.REDEPLOY, f"container is {found.state}", found, item))
    return Plan(orphans + duplicates + unexpected + starts + deploys + redeploys, held)


def _why_image_held(rolling: bool, follow_image_changes: bool) -> str:
    if follow_image_changes:
        why = "its service has other deployments listed (a rollout, or replicas)"
    else:
        why = "the control plane changes images only through new deployments" + (
            " (its service has other deployments listed: a rollout)" if rolling else
            " (a rollout elsewhere, a rolled-back one, or a configuration not deployed yet)"
        )
    return f"{why}, so this one keeps serving on its own image until the control plane drops it"


def rollout_in_progress(
    expected: ExpectedState,
    actual: Sequence[ContainerInfo],
    health: Mapping[str, str],
    draining: bool = False,
) -> bool:
    """Whether a rollout looks under way on this server, so that the agent follows it
    closely (loop.py): a drain is pending, a service has several deployments listed, or a
    listed deployment has no running container yet or its health is still `starting`
    (`health`: container id -> last reported health)."""
    if draining or several_deployments(expected):
        return True
    by_deployment = {c.deployment_id: c for c in actual if c.deployment_id}
    for item in expected.containers:
        found = by_deployment.get(item.deployment_id)
        if found is None or not found.running or health.get(found.id) == "starting":
            return True
    return False


def route_naming(ips: frozenset[str], expected: Sequence[CaddyRoute], live: Sequence[CaddyRoute] | None) -> str:
    """Which expected or live route names one of `ips` as an upstream host ("" when none);
    live routes that could not be read (None) count as naming them."""
    if not ips:
        return ""
    if live is None:
        return "the live Caddy routes cannot be read"
    for route in [*expected, *live]:
        for upstream in route.upstreams:
            host = upstream.rsplit(":", 1)[0].strip("[]")
            if host in ips:
                return f"route {route.id} still sends traffic to {upstream}"
    return ""


def full_plan(
    expected: ExpectedState,
    actual: Sequence[ContainerInfo],
    config_drift: Sequence[str] = (),
    *,
    follow_image_changes: bool = False,
) -> Plan:
    """Everything that differs, and what is held back. `config_drift` names the config
    sections whose hashes differ; `follow_image_changes` as for `container_plan`."""
    containers = container_plan(expected, actual, follow_image_changes=follow_image_changes)
    changes = list(containers.changes)
    for section in ("dns", "caddy", "wireguard"):
        if section in config_drift:
            changes.append(Change(CONFIG_KINDS[section], f"{section} configuration differs"))
    return Plan(changes, containers.held)


def plan(
    expected: ExpectedState,
    actual: Sequence[ContainerInfo],
    config_drift: Sequence[str] = (),
    *,
    follow_image_changes: bool = False,
) -> list[Change]:
    """Everything that differs. `config_drift` names the config sections whose hashes differ."""
    return full_plan(expected, actual, config_drift, follow_image_changes=follow_image_changes).changes
