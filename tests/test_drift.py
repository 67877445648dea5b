"""Hashes (PROTOCOL.md §9.3 worked examples), image comparison and plan order."""

import pytest

from agent import drift
from agent.drift import ChangeKind, ContainerInfo
from agent.model import CaddyRoute, DnsRecord, ExpectedContainer, ExpectedState, WireGuardPeer, images_match

EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_empty_hashes():
    assert drift.dns_hash([]) == drift.caddy_hash([]) == drift.wireguard_hash([]) == EMPTY


def test_dns_hash_example():
    records = [DnsRecord("web.internal", ("10.200.1.3",)), DnsRecord("api.internal", ("10.200.2.2", "10.200.1.2"))]
    assert drift.dns_hash(records) == "4d1eb501cfd6bdca845cb9712bf6d702d16dd516e78c897b6b6013292328055a"


def test_caddy_hash_example():
    routes = [CaddyRoute("app.example.com", "app.example.com", ("10.200.2.2:3000", "10.200.1.2:3000"), "svc-1")]
    assert drift.caddy_hash(routes) == "15a53a7d0ee2f8e5e812caff59584bd1df522c08b096589704ac88137e962e57"


def test_wireguard_hash_example():
    peers = [
        WireGuardPeer("BBBB=", "10.100.3.0/24,10.200.3.0/24", ""),
        WireGuardPeer("AAAA=", "10.100.2.0/24,10.200.2.0/24", "203.0.113.5:51820"),
    ]
    assert drift.wireguard_hash(peers) == "a54c1e47b93e0e5e3ae729877ef60b19476a813d0696b1c2cc62b29919f3bbd5"


def test_duplicate_dns_names_merge():
    merged = drift.merge_dns_records([DnsRecord("a.internal", ("10.0.0.1",)), DnsRecord("a.internal", ("10.0.0.2", "10.0.0.1"))])
    assert merged == [DnsRecord("a.internal", ("10.0.0.1", "10.0.0.2"))]


@pytest.mark.parametrize(
    ("expected", "actual"),
    [
        ("nginx", "docker.io/library/nginx:latest"),
        ("docker.io/library/nginx:1.27", "docker.io/library/nginx:1.27"),
        ("host:5000/app", "host:5000/app:latest"),
        ("docker.io/host:5000/app", "host:5000/app:latest"),
        ("user/app:1.2", "docker.io/user/app:1.2"),
        ("nginx@sha256:" + "a" * 64, "docker.io/library/nginx@sha256:" + "a" * 64),
        ("localhost/bb", "localhost/bb:latest"),
        # podman drops the tag of name:tag@digest
        ("nginx:1.27@sha256:" + "c" * 64, "docker.io/library/nginx@sha256:" + "c" * 64),
    ],
)
def test_images_that_match(expected, actual):
    assert images_match(expected, actual)


@pytest.mark.parametrize(
    ("expected", "actual"),
    [
        ("nginx:1.27", "docker.io/library/nginx:1.28"),
        ("nginx@sha256:" + "a" * 64, "docker.io/library/nginx@sha256:" + "b" * 64),
        ("host:5000/app:v2", "host:5000/app:v1"),
    ],
)
def test_images_that_differ(expected, actual):
    assert not images_match(expected, actual)


def _expected(dep: str, image: str = "localhost/bb:latest", service: str = "svc") -> ExpectedContainer:
    return ExpectedContainer(dep, service, "Svc", f"{service}-{dep}", image, "")


def _actual(dep: str, state: str = "running", image: str = "localhost/bb:latest", cid: str = "", service: str = "svc") -> ContainerInfo:
    labels = {drift.LABEL_SERVICE_ID: service}
    if dep:
        labels[drift.LABEL_DEPLOYMENT_ID] = dep
    return ContainerInfo(cid or f"id-{dep or 'orphan'}", f"n-{dep}", image, state, labels)


def test_plan_order_and_kinds():
    expected = ExpectedState(
        containers=(_expected("run"), _expected("exited"), _expected("missing"), _expected("newimg", "localhost/bb:v2", "lone"))
    )
    actual = [
        _actual("newimg", service="lone"),
        _actual("run"),
        _actual("gone"),
        _actual("exited", "exited"),
        _actual("", "running"),
    ]
    kinds = [(c.kind, (c.expected or c.container).name if (c.expected or c.container) else "") for c in drift.plan(expected, actual, ["wireguard", "dns"], follow_image_changes=True)]
    assert [k for k, _ in kinds] == [
        ChangeKind.REMOVE_ORPHAN,
        ChangeKind.REMOVE_UNEXPECTED,
        ChangeKind.START,
        ChangeKind.DEPLOY,
        ChangeKind.REDEPLOY,
        ChangeKind.UPDATE_DNS,
        ChangeKind.UPDATE_WIREGUARD,
    ]


def test_protected_deployment_is_never_removed():
    state = ExpectedState(protected_deployments=frozenset({"bad"}))
    assert drift.plan(state, [_actual("bad")]) == []


def test_no_drift_when_everything_matches():
    assert drift.plan(ExpectedState(containers=(_expected("a"),)), [_actual("a")]) == []


# --- image drift (ROLLOUT.md: the control plane changes images only through new deployments;
# every listed row gets the service's current image, an old running one included) ----------

BOTH_MODES = pytest.mark.parametrize("follow", [False, True], ids=["control-plane", "state-file"])


def _rollout(old_state: str = "running") -> tuple[ExpectedState, list[ContainerInfo]]:
    """D1 runs v1, D2 is new; the control plane lists both with v2."""
    expected = ExpectedState(containers=(_expected("d1", "localhost/bb:v2"), _expected("d2", "localhost/bb:v2")))
    return expected, [_actual("d1", old_state, image="localhost/bb:v1")]


@BOTH_MODES
def test_old_running_deployment_is_never_reimaged_during_a_rollout(follow):
    expected, actual = _rollout()
    result = drift.full_plan(expected, actual, follow_image_changes=follow)
    assert [(c.kind, c.expected.deployment_id) for c in result.changes] == [(ChangeKind.DEPLOY, "d2")]
    assert [(c.kind, c.container.deployment_id) for c in result.held] == [(ChangeKind.REDEPLOY, "d1")]
    assert "rollout" in result.held[0].held_because


@BOTH_MODES
@pytest.mark.parametrize("state", ["stopping", "removing"])
def test_old_container_in_transition_is_left_alone_during_a_rollout(state, follow):
    expected, actual = _rollout(state)
    assert [c.kind for c in drift.plan(expected, actual, follow_image_changes=follow)] == [ChangeKind.DEPLOY]


@BOTH_MODES
@pytest.mark.parametrize("state", ["exited", "created", "dead"])
def test_broken_old_container_is_restarted_on_its_own_image_not_reimaged(state, follow):
    expected, actual = _rollout(state)
    changes = drift.plan(expected, actual, follow_image_changes=follow)
    assert [(c.kind, (c.expected.deployment_id)) for c in changes] == [(ChangeKind.START, "d1"), (ChangeKind.DEPLOY, "d2")]
    assert changes[0].container is actual[0]


@BOTH_MODES
def test_missing_old_container_is_deployed_on_the_listed_image(follow):
    expected, _ = _rollout()
    changes = drift.plan(expected, [], follow_image_changes=follow)
    assert [(c.kind, c.expected.deployment_id, c.expected.image) for c in changes] == [
        (ChangeKind.DEPLOY, "d1", "localhost/bb:v2"),
        (ChangeKind.DEPLOY, "d2", "localhost/bb:v2"),
    ]


def _lone(state: str = "running") -> tuple[ExpectedState, list[ContainerInfo]]:
    """D1 of svc runs v1 and is listed alone with v2; another service is settled."""
    expected = ExpectedState(containers=(_expected("d1", "localhost/bb:v2"), _expected("x", service="other")))
    return expected, [_actual("d1", state, image="localhost/bb:v1"), _actual("x", service="other")]


def test_a_state_files_lone_deployment_whose_image_changed_is_redeployed():
    expected, actual = _lone()
    result = drift.full_plan(expected, actual, follow_image_changes=True)
    assert [(c.kind, c.container.deployment_id) for c in result.changes] == [(ChangeKind.REDEPLOY, "d1")]
    assert result.held == []


def test_a_control_planes_lone_deployment_whose_image_changed_keeps_serving():
    # The new deployment runs on another server, or a rollout rolled back (the failed image
    # stays the service's), or the configuration changed without a deploy: the control plane
    # changes the image through a new deployment, never by re-imaging this one.
    expected, actual = _lone()
    result = drift.full_plan(expected, actual)
    assert result.changes == []
    assert [(c.kind, c.container.deployment_id) for c in result.held] == [(ChangeKind.REDEPLOY, "d1")]
    assert "only through new deployments" in result.held[0].held_because
    assert drift.plan(expected, actual, follow_image_changes=False) == []


@pytest.mark.parametrize("state", ["exited", "created", "dead"])
def test_a_control_planes_lone_crashed_deployment_is_restarted_on_its_own_image(state):
    expected, actual = _lone(state)
    changes = drift.plan(expected, actual)
    assert [(c.kind, c.container) for c in changes] == [(ChangeKind.START, actual[0])]


def test_a_control_planes_lone_missing_deployment_is_deployed_on_the_listed_image():
    expected, actual = _lone()
    changes = drift.plan(expected, actual[1:])
    assert [(c.kind, c.expected.image) for c in changes] == [(ChangeKind.DEPLOY, "localhost/bb:v2")]


@BOTH_MODES
def test_once_the_old_deployment_is_dropped_it_is_removed_and_nothing_is_held(follow):
    expected = ExpectedState(containers=(_expected("d2", "localhost/bb:v2"),))
    actual = [_actual("d1", image="localhost/bb:v1"), _actual("d2", image="localhost/bb:v2")]
    result = drift.full_plan(expected, actual, follow_image_changes=follow)
    assert [(c.kind, c.container.deployment_id) for c in result.changes] == [(ChangeKind.REMOVE_UNEXPECTED, "d1")]
    assert result.held == []


@pytest.mark.parametrize(
    ("containers", "actual", "health", "draining", "expected"),
    [
        # settled: one deployment per service, running, healthy
        ((_expected("a"),), [_actual("a")], {"id-a": "healthy"}, False, False),
        ((_expected("a"),), [_actual("a")], {}, False, False),
        # a listed deployment without a container
        ((_expected("a"),), [], {}, False, True),
        # not running yet, or health still starting
        ((_expected("a"),), [_actual("a", "created")], {}, False, True),
        ((_expected("a"),), [_actual("a")], {"id-a": "starting"}, False, True),
        # two deployments of one service
        ((_expected("a"), _expected("b")), [_actual("a"), _actual("b")], {}, False, True),
        # a drain pending
        ((_expected("a"),), [_actual("a")], {}, True, True),
    ],
)
def test_rollout_in_progress(containers, actual, health, draining, expected):
    assert drift.rollout_in_progress(ExpectedState(containers=containers), actual, health, draining) is expected


def test_an_applied_change_reads_as_what_now_holds():
    from agent.drift import Change, ChangeKind, ContainerInfo

    spec = ExpectedContainer("dep-1", "svc", "Svc", "svc-dep-1", "localhost/app:v2", "10.200.1.5")
    old = ContainerInfo("c" * 64, "svc-dep-1", "localhost/app:v1", "exited")
    assert Change(ChangeKind.DEPLOY, "no container yet", expected=spec).done() == (
        "deployed svc-dep-1 (deployment dep-1) on 10.200.1.5, image localhost/app:v2"
    )
    assert Change(ChangeKind.START, "container is exited", old, spec).done() == (
        "started svc-dep-1 (deployment dep-1) (was: container is exited)"
    )
    assert Change(ChangeKind.REMOVE_UNEXPECTED, "deployment is no longer expected", old).done() == (
        "removed svc-dep-1 (cccccccccccc): deployment is no longer expected"
    )
    assert Change(ChangeKind.UPDATE_CADDY, "caddy configuration differs").done() == (
        "applied: update-caddy: caddy configuration differs"
    )
