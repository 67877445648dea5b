"""The control plane's rollout stage machine (../shared/ROLLOUT.md), statement by statement.

Why: the agent's rollout behaviour (no re-image of the old deployment, drain, fast reports)
can only be proven against a control plane that lists, per stage, exactly what the real one
lists and advances deployments exactly as its status handler does. `tests/fakecp.py` serves
this model over HTTP; it is pure (no HTTP, no threads, no clock of its own) so the unit tests
in tests/test_fakecp_rollout.py drive it directly.

References in comments are to the real control plane at bc9b839 as ROLLOUT.md cites them
(`projects.ts` = web/actions/projects.ts, `expected-state` and `status` = the agent routes).
Where ROLLOUT.md and PROTOCOL.md are silent, a comment says so and what we chose.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# Every deployment status of the real schema.
STATUSES = (
    "pending", "pulling", "starting", "healthy", "dns_updating", "caddy_updating", "stopping_old",
    "running", "unknown", "stopping", "stopped", "failed", "rolled_back",
)  # fmt: skip
# expected-state 17-27: the rows the agent is told about.
LISTED = (
    "pending",
    "pulling",
    "starting",
    "healthy",
    "dns_updating",
    "caddy_updating",
    "stopping_old",
    "running",
    "unknown",
)
# expected-state 30: rows whose IP is in the service's DNS record (on any server).
DNS_LISTED = ("dns_updating", "caddy_updating", "stopping_old", "running", "unknown")
# expected-state 29: rows whose IP is a Caddy upstream (stopping_old is NOT routable).
ROUTABLE = ("caddy_updating", "running", "unknown")
# projects.ts 612-629: a deployment of the service in one of these refuses a new deployService.
IN_PROGRESS = (
    "pending",
    "pulling",
    "starting",
    "healthy",
    "dns_updating",
    "caddy_updating",
    "stopping_old",
    "stopping",
)
# status 223-254: rows with a container that must be reported, else they become `unknown`.
MUST_BE_REPORTED = (
    "starting",
    "healthy",
    "dns_updating",
    "caddy_updating",
    "stopping_old",
    "running",
    "stopping",
)
# checkRolloutProgress 24-146: rollout rows it no longer waits for.
SETTLED = ("running", "stopped", "rolled_back")
# lib/wireguard.ts 25-56 and the host-port allocator: per-server ranges.
FIRST_HOST, LAST_HOST = 2, 254
FIRST_HOST_PORT, LAST_HOST_PORT = 30000, 32767
HEALTH_DEFAULTS = {"interval": 10, "timeout": 5, "retries": 3, "startPeriod": 30}
VOLUMES_ROOT = "/var/lib/techulus-agent/volumes"

ERR_IN_PROGRESS = "A deployment is already in progress"


class RolloutRefused(ValueError):
    """deployService refused (a server not online, a deployment already in progress)."""


@dataclass
class Port:
    container_port: int
    domain: str | None = None  # a public port with a domain gets a Caddy route


@dataclass
class Service:
    id: str
    name: str
    image: str  # as the user typed it; the expected state normalises it (cp_image)
    placements: dict[str, int]  # serverId -> replicas (pending-changes.tsx 135-141)
    health_cmd: str | None = None
    health: dict[str, int | None] = field(default_factory=dict)  # interval/timeout/retries/startPeriod
    ports: list[Port] = field(default_factory=list)
    hostname: str | None = None
    project_id: str = "00000000-0000-4000-8000-000000000000"

    def health_check(self) -> dict[str, Any] | None:
        """expected-state 133-141: present only with a command; nulls get the defaults."""
        if self.health_cmd is None:
            return None
        values = {key: self.health.get(key) for key in HEALTH_DEFAULTS}
        return {
            "cmd": self.health_cmd,
            **{k: HEALTH_DEFAULTS[k] if v is None else v for k, v in values.items()},
        }

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "image": self.image,
            "replicas": dict(self.placements),
            "healthCheck": self.health_check(),
            "ports": [{"containerPort": p.container_port, "domain": p.domain} for p in self.ports],
            "hostname": self.hostname,
        }


@dataclass
class Deployment:
    id: str
    service_id: str
    server_id: str
    status: str
    ip: str | None
    host_ports: dict[int, int]  # containerPort -> hostPort
    rollout_id: str | None
    created_ms: int
    container_id: str | None = None
    health_status: str | None = None
    failed_stage: str | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "serviceId": self.service_id,
            "serverId": self.server_id,
            "status": self.status,
            "ipAddress": self.ip,
            "rolloutId": self.rollout_id,
            "containerId": self.container_id,
            "healthStatus": self.health_status,
            "failedStage": self.failed_stage,
        }


@dataclass
class Rollout:
    id: str
    service_id: str
    status: str  # in_progress | completed | failed | rolled_back
    stage: str
    created_ms: int
    completed_ms: int | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "serviceId": self.service_id,
            "status": self.status,
            "currentStage": self.stage,
            "createdAt": self.created_ms,
            "completedAt": self.completed_ms,
        }


@dataclass(frozen=True)
class Change:
    """One entry of the timeline: a deployment's or a rollout's status moved."""

    time_ms: int
    kind: str  # deployment | rollout
    id: str
    service_id: str
    old: str | None  # None: created
    new: str  # "deleted" when the row went away
    cause: str

    def snapshot(self) -> dict[str, Any]:
        return {
            "time": self.time_ms, "kind": self.kind, "id": self.id, "serviceId": self.service_id,
            "from": self.old, "to": self.new, "cause": self.cause,
        }  # fmt: skip


@dataclass(frozen=True)
class ServerView:
    """What the model needs to know about a server (the fake CP owns the server rows)."""

    id: str
    subnet_id: int | None
    online: bool


def cp_image(image: str) -> str:
    """The CP's image normalisation (PROTOCOL.md §6.1.1), its bugs included: no `/` ->
    `docker.io/library/`; no `.` anywhere and exactly one `/` -> `docker.io/`."""
    if "/" not in image:
        return f"docker.io/library/{image}"
    if "." not in image and image.count("/") == 1:
        return f"docker.io/{image}"
    return image


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class RolloutModel:
    """Services, deployment rows and rollouts of the control plane, and what they imply.

    `servers` answers the current server rows; `add_work_item(serverId, type, payload)` queues
    the `deploy` item deployService creates; `clock` gives Unix milliseconds."""

    def __init__(
        self,
        servers: Callable[[], Iterable[ServerView]],
        add_work_item: Callable[[str, str, dict[str, Any]], str],
        clock: Callable[[], int],
        new_id: Callable[[], str] | None = None,
    ) -> None:
        self._servers = servers
        self._add_work_item = add_work_item
        self._clock = clock
        self._new_id = new_id or (lambda: str(uuid.uuid4()))
        self.services: dict[str, Service] = {}
        self.deployments: list[Deployment] = []  # insertion order = the DB's order here
        self.rollouts: dict[str, Rollout] = {}
        self.timeline: list[Change] = []

    @property
    def active(self) -> bool:
        """The model has anything to say (a service exists)."""
        return bool(self.services)

    # --- services ---------------------------------------------------------------------------

    def add_service(
        self,
        name: str,
        image: str,
        placements: dict[str, int],
        *,
        service_id: str | None = None,
        health_cmd: str | None = None,
        health: dict[str, int | None] | None = None,
        ports: Iterable[Port] = (),
        hostname: str | None = None,
    ) -> Service:
        service = Service(
            service_id or self._new_id(), name, image, dict(placements), health_cmd, dict(health or {}),
            list(ports), hostname,
        )  # fmt: skip
        if service.id in self.services:
            raise ValueError(f"service {service.id} exists already")
        self.services[service.id] = service
        return service

    def update_image(self, service_id: str, image: str) -> None:
        """updateServiceConfig (projects.ts 853-858): the service row's image changes at once,
        so every listed deployment of the service shows it from the next poll on."""
        self.services[service_id].image = image

    def rows(self, service_id: str | None = None, server_id: str | None = None) -> list[Deployment]:
        return [
            d for d in self.deployments
            if (service_id is None or d.service_id == service_id) and (server_id is None or d.server_id == server_id)
        ]  # fmt: skip

    def deployment(self, deployment_id: str) -> Deployment | None:
        return next((d for d in self.deployments if d.id == deployment_id), None)

    # --- deployService (projects.ts 549-783) --------------------------------------------------

    def deploy_service(self, service_id: str) -> Rollout:
        service = self.services[service_id]
        servers = {s.id: s for s in self._servers()}
        for server_id in service.placements:
            view = servers.get(server_id)
            if view is None or not view.online:  # 598-600
                raise RolloutRefused(f"Server {server_id} is not online")
        if any(d.status in IN_PROGRESS for d in self.rows(service_id)):  # 612-629
            raise RolloutRefused(ERR_IN_PROGRESS)
        now = self._clock()
        rollout = Rollout(self._new_id(), service_id, "in_progress", "deploying", now)  # 631-641
        self.rollouts[rollout.id] = rollout
        self._note("rollout", rollout.id, service_id, None, "in_progress", "deployService")
        for row in [d for d in self.rows(service_id) if d.status != "running"]:  # 643-648
            self._delete(row, "deployService deletes the service's non-running rows")
        for server_id, replicas in service.placements.items():  # 683-713
            for _ in range(replicas):
                row = Deployment(
                    self._new_id(), service_id, server_id, "pending",
                    self._free_ip(servers[server_id]), self._free_host_ports(server_id, service), rollout.id, now,
                )  # fmt: skip
                self.deployments.append(row)
                self._note("deployment", row.id, service_id, None, "pending", "deployService")
                self._add_work_item(
                    server_id, "deploy", self._deploy_payload(service, row, servers[server_id])
                )  # 731-748
        return rollout

    def redeploy(self, service_id: str, image: str | None = None) -> Rollout:
        """A user changing the image (or a finished build) and then deploying."""
        if image is not None:
            self.update_image(service_id, image)
        return self.deploy_service(service_id)

    def _free_ip(self, server: ServerView) -> str:
        """lib/wireguard.ts 25-56: the first free 10.200.<subnet>.2..254 among the server's rows."""
        if server.subnet_id is None:
            raise RolloutRefused(f"Server {server.id} has no subnet")
        taken = {d.ip for d in self.rows(server_id=server.id)}
        for host in range(FIRST_HOST, LAST_HOST + 1):
            ip = f"10.200.{server.subnet_id}.{host}"
            if ip not in taken:
                return ip
        raise RolloutRefused(f"No free IP on server {server.id}")

    def _free_host_ports(self, server_id: str, service: Service) -> dict[int, int]:
        taken = {port for d in self.rows(server_id=server_id) for port in d.host_ports.values()}
        free = (p for p in range(FIRST_HOST_PORT, LAST_HOST_PORT + 1) if p not in taken)
        return {port.container_port: next(free) for port in service.ports}

    def _deploy_payload(self, service: Service, row: Deployment, server: ServerView) -> dict[str, Any]:
        """PROTOCOL.md §10 (the agent only acknowledges it; its `name` is not the container's)."""
        replica = sum(1 for d in self.rows(service.id) if d.rollout_id == row.rollout_id)
        return {
            "deploymentId": row.id,
            "serviceId": service.id,
            "serviceName": service.name,
            "image": cp_image(service.image),
            "portMappings": [{"containerPort": c, "hostPort": h} for c, h in row.host_ports.items()],
            "wireguardIp": f"10.100.{server.subnet_id}.1",
            "ipAddress": row.ip,
            "name": f"{service.id}-{replica}",
            "healthCheck": service.health_check(),
            "env": {},
            "volumeMounts": [],
        }

    # --- GET expected-state ------------------------------------------------------------------

    def expected_state(self, server_id: str, peers: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "containers": self.containers_for(server_id),
            "dns": {"records": self.dns_records()},
            "caddy": {"routes": self.caddy_routes()},
            "wireguard": {"peers": peers},
        }

    def containers_for(self, server_id: str) -> list[dict[str, Any]]:
        """expected-state 17-27, 50-71, 114-141."""
        mine = [d for d in self.rows(server_id=server_id) if d.status in LISTED]
        retiring = {d.service_id for d in mine if d.status == "stopping_old"}
        listed = [d for d in mine if not (d.status == "running" and d.service_id in retiring)]
        return [self._container(d) for d in listed]

    def _container(self, row: Deployment) -> dict[str, Any]:
        service = self.services[row.service_id]
        return {
            "deploymentId": row.id,
            "serviceId": service.id,
            "serviceName": service.name,
            "name": f"{service.id}-{row.id[:8]}",
            "image": cp_image(service.image),  # the service's CURRENT image, old rows included
            "ipAddress": row.ip,
            "ports": [{"containerPort": c, "hostPort": h} for c, h in row.host_ports.items()],
            "env": {},
            "healthCheck": service.health_check(),
            "volumes": [],
        }

    def dns_records(self) -> list[dict[str, Any]]:
        """expected-state 146-171: per service, IPs of its rows on ANY server; none when empty."""
        records = []
        for service in self.services.values():
            ips = [d.ip for d in self.rows(service.id) if d.status in DNS_LISTED and d.ip]
            if ips:
                records.append({"name": f"{service.hostname or slugify(service.name)}.internal", "ips": ips})
        return records

    def caddy_routes(self) -> list[dict[str, Any]]:
        """expected-state 173-207: per public port with a domain; no upstream, no route (197)."""
        routes = []
        for service in self.services.values():
            for port in service.ports:
                if not port.domain:
                    continue
                upstreams = [
                    f"{d.ip}:{port.container_port}"
                    for d in self.rows(service.id)
                    if d.status in ROUTABLE and d.ip
                ]
                if upstreams:
                    routes.append(
                        {
                            "id": port.domain,
                            "domain": port.domain,
                            "upstreams": upstreams,
                            "serviceId": service.id,
                        }
                    )
        return routes

    # --- POST status (steps 2-4; step 1, the server row, is the fake CP's) ----------------------

    def on_report(self, server_id: str, report: dict[str, Any]) -> None:
        entries = [c for c in report.get("containers", []) if isinstance(c, dict)]
        reported = {c.get("deploymentId") for c in entries if c.get("deploymentId")}
        for row in self.rows(server_id=server_id):  # step 2 (223-254)
            if row.container_id is not None and row.status in MUST_BE_REPORTED and row.id not in reported:
                self._set(row, "unknown", "not in the status report")
                row.health_status = None
        for entry in entries:  # step 3 (256-402)
            self._on_container(entry)
        for rollout in [r for r in self.rollouts.values() if r.status == "in_progress"]:  # step 4 (404-411)
            self.check_rollout_progress(rollout.id)

    def _on_container(self, entry: dict[str, Any]) -> None:
        deployment_id = entry.get("deploymentId")
        if not deployment_id:
            # The fallback for entries without a deploymentId (match by containerId, adopt a
            # stuck pending row) is not modelled: this agent always sends the id.
            return
        row = self.deployment(str(deployment_id))  # by id alone, on any server, like the CP
        if row is None:
            return
        read = row.status  # every decision below uses the row as read
        health = entry.get("healthStatus")
        row.health_status = health
        container_id = entry.get("containerId")
        if container_id != row.container_id:
            row.container_id = container_id
        service = self.services[row.service_id]
        if read in ("pending", "pulling"):  # 329-354
            if service.health_cmd is not None:
                self._set(row, "starting", "attached; the service has a health check")
                row.health_status = "starting"
            else:
                self._set(row, "healthy", "attached; no health check")
                if row.rollout_id:
                    self.check_rollout_progress(row.rollout_id)
                    return
        if read == "unknown":  # 356-365
            self._set(
                row, "running" if health in ("healthy", "none") else "starting", f"reported again ({health})"
            )
        if read == "starting" and health in ("healthy", "none"):  # 372-388
            self._set(row, "healthy", f"health {health}")
            if row.rollout_id:
                self.check_rollout_progress(row.rollout_id)
        if read == "starting" and health == "unhealthy":  # 390-401
            self._set(row, "failed", "health unhealthy")
            row.failed_stage = "health_check"
            if row.rollout_id:
                self.roll_back(row.rollout_id, "health_check")

    def check_rollout_progress(self, rollout_id: str) -> None:
        """checkRolloutProgress (24-146): at most one stage per call."""
        rollout = self.rollouts[rollout_id]
        rows = [d for d in self.deployments if d.rollout_id == rollout_id and d.status not in SETTLED]
        if not rows:
            return
        statuses = {d.status for d in rows}
        for current, following in (("healthy", "dns_updating"), ("dns_updating", "caddy_updating"),
                                   ("caddy_updating", "stopping_old")):  # fmt: skip
            if statuses == {current}:  # 41-93
                for row in rows:
                    self._set(row, following, "checkRolloutProgress")
                rollout.stage = following
                return
        if statuses == {"stopping_old"} and not any(
            d.status == "running" for d in self.rows(rollout.service_id)
        ):
            # 95-145. ROLLOUT.md says "every row of the service from other rollouts"; rows with
            # no rollout at all count as other rollouts here.
            for row in [d for d in self.rows(rollout.service_id) if d.rollout_id != rollout_id]:
                self._delete(row, "rollout completed")
            for row in rows:
                self._set(row, "running", "rollout completed")
            self._set_rollout(rollout, "completed", "completed")

    def roll_back(self, rollout_id: str, failed_stage: str) -> None:
        """handleRolloutFailure (148-174; PROTOCOL.md §6.2 step 3): the rollout goes `failed`,
        then its deployments not `running`/`stopped` go `rolled_back` (the one that just
        failed included: it ends `rolled_back` with failedStage set), then the rollout is
        `rolled_back`. Both specs are silent on the old deployments (other rollouts): they are
        left as they are, `running`, and on the service's image, which is NOT reverted: the
        expected state keeps listing the old deployment with the new (broken) image."""
        rollout = self.rollouts[rollout_id]
        self._set_rollout(rollout, "failed", failed_stage)
        for row in [
            d
            for d in self.deployments
            if d.rollout_id == rollout_id and d.status not in ("running", "stopped")
        ]:
            self._set(row, "rolled_back", f"rollout failed at {failed_stage}")
            row.failed_stage = failed_stage
        self._set_rollout(rollout, "rolled_back", failed_stage)

    # --- bookkeeping ------------------------------------------------------------------------

    def _set(self, row: Deployment, status: str, cause: str) -> None:
        if row.status != status:
            self._note("deployment", row.id, row.service_id, row.status, status, cause)
            row.status = status

    def _set_rollout(self, rollout: Rollout, status: str, stage: str) -> None:
        self._note("rollout", rollout.id, rollout.service_id, rollout.status, status, stage)
        rollout.status, rollout.stage = status, stage
        if status != "in_progress":
            rollout.completed_ms = self._clock()

    def _delete(self, row: Deployment, cause: str) -> None:
        self.deployments.remove(row)
        self._note("deployment", row.id, row.service_id, row.status, "deleted", cause)

    def _note(self, kind: str, id: str, service_id: str, old: str | None, new: str, cause: str) -> None:
        self.timeline.append(Change(self._clock(), kind, id, service_id, old, new, cause))

    def snapshot(self) -> dict[str, Any]:
        return {
            "services": [s.snapshot() for s in self.services.values()],
            "deployments": [d.snapshot() for d in self.deployments],
            "rollouts": [r.snapshot() for r in self.rollouts.values()],
            "timeline": [c.snapshot() for c in self.timeline],
        }
