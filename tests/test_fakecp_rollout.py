"""The fake control plane's rollout stage machine against ROLLOUT.md, table by table.

Each table row below is a line of ROLLOUT.md: what the expected state lists at each stage of
a new deployment D2 (old D1 `running`), and how each status report moves the rows (with and
without a health check), the rollback, and deployService's refusals. Then the same machine
over HTTP (admin endpoints, signed agent requests) as the e2e tests drive it, and the e2e
rig's dead-route arithmetic.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest

from agent import api, crypto
from agent.model import parse_expected_state
from tests.fakecp import FakeControlPlane
from tests.fakerollout import ERR_IN_PROGRESS, Port, RolloutModel, RolloutRefused, ServerView, cp_image
from tests.rolloutrig import ProbeSample, RouteProber

SERVER, OTHER = "a" * 24, "b" * 24
V1, V2 = "registry.test/app:v1", "registry.test/app:v2"
DOMAIN = "app.test"
HEALTH = "wget -q -O /dev/null http://127.0.0.1/health"


class World:
    """A model with two online servers (subnets 5 and 6) and a recording work queue."""

    def __init__(self) -> None:
        self.online = {SERVER: True, OTHER: True}
        self.work: list[tuple[str, str, dict[str, Any]]] = []
        ticks = itertools.count(1_000)
        ids = (f"{n:08d}-0000-4000-8000-000000000000" for n in itertools.count(1))
        self.model = RolloutModel(
            lambda: [ServerView(SERVER, 5, self.online[SERVER]), ServerView(OTHER, 6, self.online[OTHER])],
            lambda server, kind, payload: self.work.append((server, kind, payload)) or "item",
            lambda: next(ticks),
            lambda: next(ids),
        )

    def service(self, health: bool = False, replicas: int = 1) -> str:
        service = self.model.add_service(
            "My Web", V1, {SERVER: replicas}, health_cmd=HEALTH if health else None, ports=[Port(80, DOMAIN)]
        )
        return service.id

    def status(self, deployment_id: str) -> str | None:
        row = self.model.deployment(deployment_id)
        return None if row is None else row.status

    def report(self, *entries: tuple[str, str], server: str = SERVER) -> None:
        """A status report listing (deploymentId, healthStatus) pairs, as the agent sends it."""
        containers = [
            {"deploymentId": d, "containerId": f"c-{d}", "status": "running", "healthStatus": h}
            for d, h in entries
        ]
        self.model.on_report(server, {"containers": containers})

    def listed(self, server: str = SERVER) -> list[tuple[str, str]]:
        return [(c["deploymentId"], c["image"]) for c in self.model.containers_for(server)]

    def dns(self) -> list[str]:
        (record,) = self.model.dns_records() or [{"ips": []}]
        return list(record["ips"])

    def upstreams(self) -> list[str] | None:
        routes = self.model.caddy_routes()
        return None if not routes else list(routes[0]["upstreams"])

    def running_first_deploy(self, health: bool = False) -> tuple[str, str]:
        """A service with D1 `running` (reported, container c-D1)."""
        service = self.service(health)
        d1 = self.deploy(service)
        row = self.model.deployment(d1)
        assert row is not None and row.rollout_id is not None
        row.status, row.container_id = "running", f"c-{d1}"
        self.model.rollouts[row.rollout_id].status = "completed"
        return service, d1

    def deploy(self, service: str) -> str:
        rollout = self.model.deploy_service(service)
        (row,) = [d for d in self.model.deployments if d.rollout_id == rollout.id]
        return row.id


@pytest.fixture
def world() -> World:
    return World()


def ip(host: int) -> str:
    return f"10.200.5.{host}"


# --- what the expected state lists per stage (ROLLOUT.md's table) --------------------------------

# D2 status -> (listed deployments, DNS ips, Caddy upstreams); D1 is .2, D2 is .3.
REDEPLOY_TABLE = [
    ("pending", ["D1", "D2"], [ip(2)], [f"{ip(2)}:80"]),
    ("starting", ["D1", "D2"], [ip(2)], [f"{ip(2)}:80"]),
    ("healthy", ["D1", "D2"], [ip(2)], [f"{ip(2)}:80"]),
    ("dns_updating", ["D1", "D2"], [ip(2), ip(3)], [f"{ip(2)}:80"]),
    ("caddy_updating", ["D1", "D2"], [ip(2), ip(3)], [f"{ip(2)}:80", f"{ip(3)}:80"]),
    ("stopping_old", ["D2"], [ip(2), ip(3)], [f"{ip(2)}:80"]),
]


@pytest.mark.parametrize(("stage", "listed", "dns", "upstreams"), REDEPLOY_TABLE)
def test_redeploy_lists_per_stage_of_the_new_deployment(
    world: World, stage: str, listed: list[str], dns: list[str], upstreams: list[str]
) -> None:
    service, d1 = world.running_first_deploy()
    world.model.update_image(service, V2)
    d2 = world.deploy(service)
    row = world.model.deployment(d2)
    assert row is not None
    row.status = stage
    names = {d1: "D1", d2: "D2"}
    assert [(names[d], image) for d, image in world.listed()] == [(n, V2) for n in listed], "every row on v2"
    assert world.dns() == dns
    assert world.upstreams() == upstreams
    assert world.model.deployment(d1).ip == ip(2) and row.ip == ip(3)  # type: ignore[union-attr]


# D1 status in a first deploy -> (listed, DNS, upstreams or None for "route omitted").
FIRST_DEPLOY_TABLE = [
    ("pending", ["D1"], [], None),
    ("starting", ["D1"], [], None),
    ("caddy_updating", ["D1"], [ip(2)], [f"{ip(2)}:80"]),
    ("stopping_old", ["D1"], [ip(2)], None),  # not routable, and nothing else is
    ("running", ["D1"], [ip(2)], [f"{ip(2)}:80"]),
]


@pytest.mark.parametrize(("stage", "listed", "dns", "upstreams"), FIRST_DEPLOY_TABLE)
def test_first_deploy_lists_per_stage(
    world: World, stage: str, listed: list[str], dns: list[str], upstreams: list[str] | None
) -> None:
    service = world.service()
    d1 = world.deploy(service)
    world.model.deployment(d1).status = stage  # type: ignore[union-attr]
    assert world.listed() == [(d1, V1)] * len(listed)
    assert world.dns() == dns
    assert world.upstreams() == upstreams
    assert world.model.dns_records() == ([{"name": "my-web.internal", "ips": dns}] if dns else [])


def test_dns_spans_servers_and_containers_stay_per_server(world: World) -> None:
    service = world.model.add_service("api", V1, {SERVER: 1, OTHER: 1}, hostname="backend")
    world.model.deploy_service(service.id)
    for row in world.model.rows(service.id):
        row.status = "running"
    assert world.model.dns_records() == [{"name": "backend.internal", "ips": [ip(2), "10.200.6.2"]}]
    assert [c["ipAddress"] for c in world.model.containers_for(OTHER)] == ["10.200.6.2"]
    assert world.model.caddy_routes() == [], "no public port, no route"


def test_listed_containers_have_the_wire_shape_and_parse_in_the_agent(world: World) -> None:
    service = world.model.add_service(
        "web",
        "nginx",
        {SERVER: 1},
        health_cmd=HEALTH,
        health={"interval": 2, "retries": None},
        ports=[Port(80, DOMAIN)],
    )
    d1 = world.deploy(service.id)
    (container,) = world.model.containers_for(SERVER)
    assert container == {
        "deploymentId": d1,
        "serviceId": service.id,
        "serviceName": "web",
        "name": f"{service.id}-{d1[:8]}",
        "image": "docker.io/library/nginx",
        "ipAddress": ip(2),
        "ports": [{"containerPort": 80, "hostPort": 30000}],
        "env": {},
        "healthCheck": {"cmd": HEALTH, "interval": 2, "timeout": 5, "retries": 3, "startPeriod": 30},
        "volumes": [],
    }
    state = parse_expected_state(
        world.model.expected_state(SERVER, []), ipaddress.IPv4Network("10.200.5.0/24")
    )
    assert [c.deployment_id for c in state.containers] == [d1]


@pytest.mark.parametrize(
    ("image", "normalised"),
    [
        ("nginx", "docker.io/library/nginx"),
        ("user/app", "docker.io/user/app"),
        ("localhost/app:v1", "docker.io/localhost/app:v1"),  # the CP's bug; the agent undoes it
        ("host:5000/x", "docker.io/host:5000/x"),
        ("user/app:1.2", "user/app:1.2"),
        ("registry.test/app:v1", "registry.test/app:v1"),
    ],
)
def test_images_are_normalised_like_the_control_plane(image: str, normalised: str) -> None:
    assert cp_image(image) == normalised


# --- how reports move a rollout ---------------------------------------------------------------


def test_redeploy_without_health_check_takes_three_reports(world: World) -> None:
    service, d1 = world.running_first_deploy()
    rollout = world.model.redeploy(service, V2)
    d2 = world.model.rows(service)[-1].id
    steps = [
        # (reported deployments, D1 after, D2 after)
        (
            [d1, d2],
            "running",
            "caddy_updating",
        ),  # attach: pending -> healthy -> dns_updating -> caddy_updating
        ([d1, d2], "running", "stopping_old"),
        ([d1, d2], "running", "stopping_old"),  # waits while D1 is still reported running
        ([d2], None, "running"),  # the first report without D1: D1 unknown, then deleted
    ]
    for reported, d1_after, d2_after in steps:
        world.report(*[(d, "none") for d in reported])
        assert (world.status(d1), world.status(d2)) == (d1_after, d2_after), reported
    assert rollout.status == "completed" and world.model.deployment(d2).rollout_id == rollout.id  # type: ignore[union-attr]
    assert world.listed() == [(d2, V2)] and world.dns() == [ip(3)] and world.upstreams() == [f"{ip(3)}:80"]


def test_redeploy_with_health_check_takes_four_reports(world: World) -> None:
    service, d1 = world.running_first_deploy(health=True)
    world.model.redeploy(service, V2)
    d2 = world.model.rows(service)[-1].id
    steps = [
        ([(d1, "healthy"), (d2, "starting")], "starting"),  # attach: health forced `starting`
        ([(d1, "healthy"), (d2, "starting")], "starting"),  # still starting
        ([(d1, "healthy"), (d2, "healthy")], "caddy_updating"),  # healthy -> dns_updating -> caddy_updating
        ([(d1, "healthy"), (d2, "healthy")], "stopping_old"),
        ([(d2, "healthy")], "running"),
    ]
    for entries, d2_after in steps:
        world.report(*entries)
        assert world.status(d2) == d2_after, entries
    assert world.status(d1) is None
    assert world.model.deployment(d2).health_status == "healthy"  # type: ignore[union-attr]


def test_first_deploy_completes_once_nothing_of_the_service_runs(world: World) -> None:
    service = world.service()
    d1 = world.deploy(service)
    for expected in ("caddy_updating", "stopping_old", "running"):
        world.report((d1, "none"))
        assert world.status(d1) == expected
    assert world.upstreams() == [f"{ip(2)}:80"]


def test_a_report_never_waits_for_other_replicas(world: World) -> None:
    service = world.service(replicas=2)
    rollout = world.model.deploy_service(service)
    a, b = (d.id for d in world.model.rows(service))
    world.report((a, "none"))
    assert (world.status(a), world.status(b)) == ("healthy", "pending"), "all rows must be healthy to move on"
    world.report((a, "none"), (b, "none"))
    assert (world.status(a), world.status(b)) == ("caddy_updating", "caddy_updating")
    assert world.model.rollouts[rollout.id].stage == "caddy_updating"


def test_unreported_rows_become_unknown_and_come_back(world: World) -> None:
    service, d1 = world.running_first_deploy()
    world.report()
    assert world.status(d1) == "unknown" and world.model.deployment(d1).health_status is None  # type: ignore[union-attr]
    assert world.listed() == [(d1, V1)] and world.upstreams() == [f"{ip(2)}:80"], (
        "unknown stays listed and routed"
    )
    world.report((d1, "starting"))
    assert world.status(d1) == "starting"
    world.report((d1, "none"))
    # starting -> healthy runs checkRolloutProgress for the row's (completed) rollout: one
    # stage; later reports never move it again (step 4 only sees in-progress rollouts), so
    # the restored old deployment stays out of the route (a pitfall of the real CP).
    assert world.status(d1) == "dns_updating"
    world.report((d1, "none"))
    assert world.status(d1) == "dns_updating" and world.upstreams() is None


def test_rows_without_a_container_are_not_marked_unknown(world: World) -> None:
    service = world.service()
    d1 = world.deploy(service)
    world.report()
    assert world.status(d1) == "pending"


def test_reports_of_other_servers_move_rollouts_too(world: World) -> None:
    service = world.service()
    d1 = world.deploy(service)
    world.report((d1, "none"))
    world.report(server=OTHER)
    assert world.status(d1) == "stopping_old", "step 4 runs for every in-progress rollout"


def test_reported_status_field_is_ignored(world: World) -> None:
    service = world.service(health=True)
    d1 = world.deploy(service)
    world.report((d1, "starting"))
    world.model.on_report(
        SERVER,
        {
            "containers": [
                {"deploymentId": d1, "containerId": "x", "status": "stopped", "healthStatus": "none"}
            ]
        },
    )
    assert world.status(d1) == "caddy_updating", "a stopped container's `none` counts as healthy (pitfall)"
    assert world.model.deployment(d1).container_id == "x"  # type: ignore[union-attr]


def test_unhealthy_new_deployment_rolls_back_and_the_old_one_keeps_the_new_image(world: World) -> None:
    service, d1 = world.running_first_deploy(health=True)
    rollout = world.model.redeploy(service, "registry.test/app:broken")
    d2 = world.model.rows(service)[-1].id
    world.report((d1, "healthy"), (d2, "starting"))
    world.report((d1, "healthy"), (d2, "unhealthy"))
    row = world.model.deployment(d2)
    assert row is not None and (row.status, row.failed_stage) == ("rolled_back", "health_check")
    assert world.model.rollouts[rollout.id].status == "rolled_back"
    assert world.status(d1) == "running"
    assert world.listed() == [(d1, "registry.test/app:broken")], "the service image is not reverted"
    assert world.upstreams() == [f"{ip(2)}:80"]
    moves = [(c.old, c.new) for c in world.model.timeline if c.id == d2]
    assert moves == [
        (None, "pending"),
        ("pending", "starting"),
        ("starting", "failed"),
        ("failed", "rolled_back"),
    ]
    assert [c.new for c in world.model.timeline if c.id == rollout.id] == [
        "in_progress",
        "failed",
        "rolled_back",
    ]
    # The next deployService deletes the rolled-back row and takes its IP again.
    world.model.deploy_service(service)
    assert world.model.deployment(d2) is None and world.model.rows(service)[-1].ip == ip(3)


# --- deployService ------------------------------------------------------------------------------


@pytest.mark.parametrize("in_progress", ["pending", "pulling", "starting", "healthy", "dns_updating",
                                         "caddy_updating", "stopping_old", "stopping"])  # fmt: skip
def test_deploy_is_refused_while_a_deployment_is_in_progress(world: World, in_progress: str) -> None:
    service = world.service()
    d1 = world.deploy(service)
    world.model.deployment(d1).status = in_progress  # type: ignore[union-attr]
    with pytest.raises(RolloutRefused, match=ERR_IN_PROGRESS):
        world.model.deploy_service(service)


@pytest.mark.parametrize("settled", ["running", "unknown", "stopped", "failed", "rolled_back"])
def test_deploy_is_allowed_once_settled_and_deletes_non_running_rows(world: World, settled: str) -> None:
    service = world.service()
    d1 = world.deploy(service)
    world.model.deployment(d1).status = settled  # type: ignore[union-attr]
    world.model.deploy_service(service)
    assert (world.status(d1) is not None) == (settled == "running")


def test_deploy_is_refused_when_a_target_server_is_offline(world: World) -> None:
    service = world.service()
    world.online[SERVER] = False
    with pytest.raises(RolloutRefused, match="not online"):
        world.model.deploy_service(service)
    assert not world.model.rows(service) and not world.model.rollouts and not world.work


def test_deploy_takes_the_first_free_ip_and_queues_a_deploy_item(world: World) -> None:
    other = world.model.add_service("other", V1, {SERVER: 1})
    world.deploy(other.id)  # .2
    service, d1 = world.running_first_deploy()  # .3
    rollout = world.model.redeploy(service, V2)
    d2 = world.model.rows(service)[-1]
    assert (world.model.deployment(d1).ip, d2.ip) == (ip(3), ip(4))  # type: ignore[union-attr]
    assert (d2.status, d2.rollout_id) == ("pending", rollout.id)
    server, kind, payload = world.work[-1]
    assert (server, kind, payload["deploymentId"], payload["ipAddress"], payload["image"]) == (
        SERVER, "deploy", d2.id, ip(4), V2,
    )  # fmt: skip
    assert d2.host_ports == {80: 30001}, "the first free host port on the server (D1 holds 30000)"


# --- over HTTP, as the e2e tests drive it ---------------------------------------------------------


@pytest.fixture
def served() -> Iterator[tuple[FakeControlPlane, api.ControlPlane, str]]:
    key = crypto.new_signing_key()
    with FakeControlPlane() as cp:
        server = cp.add_server(crypto.public_key_b64(key), subnet_id=5)
        client = api.ControlPlane(
            cp.url, api.Signer(server.id, key), retries=0, connect_timeout=2, read_timeout=2
        )
        yield cp, client, server.id


def admin(cp: FakeControlPlane, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    status, raw = cp.send(
        method, "/__test__" + path, {"Content-Type": "application/json"}, json.dumps(body or {})
    )
    return status, json.loads(raw)


def test_admin_endpoints_drive_a_rollout_that_the_agent_endpoints_serve(
    served: tuple[FakeControlPlane, api.ControlPlane, str],
) -> None:
    cp, client, server_id = served
    assert client.expected_state() == cp.default_expected_state(server_id), "no service: the default document"
    status, created = admin(cp, "POST", "/services", {
        "name": "web", "image": V1, "replicas": {server_id: 1}, "ports": [{"containerPort": 80, "domain": DOMAIN}],
    })  # fmt: skip
    assert status == 200
    service = created["id"]
    status, deployed = admin(cp, "POST", f"/services/{service}/deploy")
    assert status == 200 and deployed["rolloutId"]
    assert admin(cp, "POST", f"/services/{service}/deploy") == (409, {"error": ERR_IN_PROGRESS})
    (listed,) = client.expected_state()["containers"]
    assert cp.work_items(server_id)[-1].type == "deploy"

    report = {"containers": [{"deploymentId": listed["deploymentId"], "containerId": "c1", "status": "running",
                              "healthStatus": "none"}]}  # fmt: skip
    for _ in range(3):
        client.report_status(report)
    assert [d["status"] for d in cp.deployment_rows(service)] == ["running"]
    assert client.expected_state()["caddy"]["routes"][0]["upstreams"] == [f"{ip(2)}:80"]
    assert cp.send("GET", f"/api/v1/caddy/check?domain={DOMAIN}")[0] == 200

    assert admin(cp, "POST", f"/services/{service}/image", {"image": V2, "deploy": True})[0] == 200
    assert [c["image"] for c in client.expected_state()["containers"]] == [V2, V2]
    status, snapshot = admin(cp, "GET", "/rollout")
    assert status == 200 and [r["status"] for r in snapshot["rollouts"]] == ["completed", "in_progress"]
    moves = [(c["from"], c["to"]) for c in snapshot["timeline"] if c["id"] == listed["deploymentId"]]
    assert moves == [(None, "pending"), ("pending", "healthy"), ("healthy", "dns_updating"),
                     ("dns_updating", "caddy_updating"), ("caddy_updating", "stopping_old"), ("stopping_old", "running")]  # fmt: skip
    times = [c["time"] for c in snapshot["timeline"]]
    assert times == sorted(times)


def test_a_verbatim_expected_state_still_wins(served: tuple[FakeControlPlane, api.ControlPlane, str]) -> None:
    cp, client, server_id = served
    cp.add_service("web", V1, {server_id: 1})
    cp.set_expected_state(server_id, {"containers": []})
    assert client.expected_state() == {"containers": []}
    cp.clear_expected_state(server_id)
    assert len(client.expected_state()["containers"]) == 0, "a service without a deployment lists nothing"


def test_seeded_services_and_admin_errors(served: tuple[FakeControlPlane, api.ControlPlane, str]) -> None:
    cp, _, server_id = served
    cp.seed({"services": [{"id": "s1", "name": "web", "image": V1, "replicas": {server_id: 2},
                           "healthCheck": {"cmd": HEALTH, "interval": 1}}]})  # fmt: skip
    rollout = cp.deploy_service("s1")
    assert cp.rollout_status(rollout.id) == "in_progress"
    assert [d["ipAddress"] for d in cp.deployment_rows("s1")] == [ip(2), ip(3)]
    assert admin(cp, "POST", "/services/nope/deploy")[0] == 404
    assert admin(cp, "POST", "/services", {"name": "x"})[0] == 400


# --- the e2e rig's dead-route measurement -------------------------------------------------------


def test_dead_route_stretches_count_only_after_the_route_was_first_live() -> None:
    prober = RouteProber("http://127.0.0.1:9", "app.test")
    up, down = ("10.200.5.2:80",), ()
    timeline = [(0.0, down), (0.1, up), (0.2, down), (0.3, down), (0.5, up), (0.6, down), (0.9, down)]
    prober.samples = [ProbeSample(t, up, live, ("v1",) * len(live)) for t, live in timeline]
    assert prober.dead_intervals() == [(0.2, pytest.approx(0.3)), (0.6, pytest.approx(0.3))]
    assert prober.longest_dead() == pytest.approx(0.3)
    assert prober.dead_samples() == 4, "the samples before the route was first live do not count"
    prober.samples = prober.samples[:1]
    assert (prober.dead_intervals(), prober.longest_dead(), prober.dead_samples()) == ([], 0.0, 0)
