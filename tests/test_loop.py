"""The state machine against an in-memory Podman: order, back-to-back steps, failures
skipped with backoff, and the safety rules (garbled polls and sudden emptiness)."""

import threading

import pytest

from agent import crypto
from agent.api import BadResponse, Unavailable
from agent.heartbeat import Heartbeat
from agent.loop import IDLE, RESTORE_KINDS, SETTLE_WINDOW, Reconciler, decrypt_env
from agent.model import CaddyRoute, DnsRecord, ExpectedContainer, ExpectedState, ModelError
from agent.settings import Settings
from tests.fakes import FakePodman, ListSource, RecordingReporter

KEY = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"


def spec(dep, image="localhost/app:v1", env=None, service="svc", ip=""):
    return ExpectedContainer(dep, service, "Svc", f"c-{dep}", image, ip, env=env or {})


def make(source, podman=None, syncs=(), key=KEY):
    settings = Settings.load({"data_dir": "/nonexistent-test-dir"}, environ={})
    podman = podman or FakePodman()
    reporter = RecordingReporter()
    return Reconciler(settings, podman, source, list(syncs), key, reporter, threading.Lock()), podman, reporter


def test_twenty_changes_converge_in_one_tick():
    state = ExpectedState(containers=tuple(spec(f"d{i}") for i in range(20)))
    reconciler, podman, reporter = make(ListSource(state))
    reconciler.tick()
    assert sorted(c.deployment_id for c in podman.containers.values()) == sorted(f"d{i}" for i in range(20))
    assert reconciler.state == IDLE
    # A report after entering PROCESSING and after each of the 20 steps.
    assert len(reporter.triggers) == 21
    reconciler.tick()
    assert reporter.triggers[-1] is True  # no drift: report with resources


def test_order_orphans_first_then_starts_deploys_redeploys():
    podman = FakePodman()
    podman.add("", "running")
    podman.add("old")
    exited = podman.add("b", "exited")
    podman.add("c", image="localhost/app:v0", service="lone")  # a state file's lone deployment: re-imaged
    state = ExpectedState(containers=(spec("a"), spec("b"), spec("c", service="lone")))
    reconciler, podman, _ = make(ListSource(state, follow_image_changes=True), podman)
    reconciler.tick()
    ops = [op for op, _ in podman.calls if op != "list"]
    # localhost/ images are never pulled (there is no registry behind them).
    assert ops == ["stop", "stop", "start", "run", "stop", "run"]
    assert podman.containers[exited.id].state == "running"
    assert {c.deployment_id for c in podman.containers.values()} == {"a", "b", "c"}


def test_failing_change_does_not_block_the_others_and_backs_off():
    podman = FakePodman()
    state = ExpectedState(containers=(spec("bad", image="localhost/bad:v1"), spec("good")))
    original = podman.run_container

    def run_container(s, env, volumes_dir):
        if s.deployment_id == "bad":
            podman.calls.append(("run", s.name))
            raise RuntimeError("image is broken")
        return original(s, env, volumes_dir)

    podman.run_container = run_container
    reconciler, podman, _ = make(ListSource(state), podman)
    reconciler.tick()
    assert {c.deployment_id for c in podman.containers.values()} == {"good"}
    attempts = sum(1 for op, name in podman.calls if op == "run" and name == "c-bad")
    reconciler.tick()  # within the backoff window: not retried at once
    assert sum(1 for op, name in podman.calls if op == "run" and name == "c-bad") == attempts == 1


@pytest.mark.parametrize("error", [Unavailable("down"), BadResponse("garbage"), ModelError("not an object")])
def test_failed_or_garbled_poll_changes_nothing(error):
    podman = FakePodman()
    podman.add("a")
    reconciler, podman, reporter = make(ListSource(error), podman)
    reconciler.tick()
    assert len(podman.containers) == 1
    assert [op for op, _ in podman.calls] == []


def test_sudden_empty_state_needs_two_polls():
    podman = FakePodman()
    podman.add("a")
    podman.add("b")
    reconciler, podman, _ = make(ListSource(ExpectedState()), podman)
    reconciler.tick()
    assert len(podman.containers) == 2
    reconciler.tick()
    assert len(podman.containers) == 0


def test_empty_poll_counter_resets_when_state_returns():
    podman = FakePodman()
    podman.add("a")
    source = ListSource(ExpectedState(), ExpectedState(containers=(spec("a"),)), ExpectedState())
    reconciler, podman, _ = make(source, podman)
    for _ in range(3):
        reconciler.tick()
    assert len(podman.containers) == 1


def test_protected_deployment_survives():
    podman = FakePodman()
    podman.add("broken-entry")
    state = ExpectedState(containers=(spec("x"),), protected_deployments=frozenset({"broken-entry"}))
    reconciler, podman, _ = make(ListSource(state), podman)
    reconciler.tick()
    assert {c.deployment_id for c in podman.containers.values()} == {"broken-entry", "x"}


def test_secrets_are_decrypted_for_the_container():
    blob = crypto.encrypt_secret(KEY, "hello-from-lab")
    reconciler, podman, _ = make(ListSource(ExpectedState(containers=(spec("a", env={"GREETING": blob}),))))
    reconciler.tick()
    assert podman.last_env == {"GREETING": "hello-from-lab"}


def test_undecryptable_secret_fails_that_deployment_only():
    state = ExpectedState(containers=(spec("a", env={"X": "AAAA"}), spec("b")))
    reconciler, podman, _ = make(ListSource(state))
    reconciler.tick()
    assert {c.deployment_id for c in podman.containers.values()} == {"b"}
    with pytest.raises(crypto.SecretError, match="deployment a: env X"):
        decrypt_env(spec("a", env={"X": "AAAA"}), KEY)
    with pytest.raises(crypto.SecretError, match="no encryption key"):
        decrypt_env(spec("a", env={"X": "AAAA"}), "")


def test_an_env_value_that_cannot_reach_the_container_keeps_the_old_one_running():
    from agent.drift import Change, ChangeKind
    from agent.host.podman import PodmanError

    podman = FakePodman()
    old = podman.add("a", image="localhost/app:v0")
    reconciler, podman, _ = make(ListSource(ExpectedState()), podman)
    # PATH is read by podman itself: it travels in an env file, which holds no line break.
    new = spec("a", env={"PATH": crypto.encrypt_secret(KEY, "/app/bin\n/usr/bin")})
    with pytest.raises(PodmanError, match="line break"):
        reconciler.apply(Change(ChangeKind.REDEPLOY, "image", old, new), ExpectedState())
    assert list(podman.containers) == [old.id] and podman.pull_timeouts == []


def test_restore_mode_never_removes():
    podman = FakePodman()
    podman.add("stale")
    reconciler, podman, _ = make(ListSource(ExpectedState()), podman)
    reconciler.process(ExpectedState(containers=(spec("a"),)), only=RESTORE_KINDS)
    assert {c.deployment_id for c in podman.containers.values()} == {"stale", "a"}


def test_processing_cap_stops_the_pass():
    clock = [0.0]
    state = ExpectedState(containers=tuple(spec(f"d{i}") for i in range(5)))
    reconciler, podman, _ = make(ListSource(state))
    reconciler.clock = lambda: clock[0]
    original = podman.run_container

    def slow(s, env, volumes_dir):
        clock[0] += 120
        return original(s, env, volumes_dir)

    podman.run_container = slow
    reconciler.process(state)
    assert len(podman.containers) == 3  # 0, 120, 240 s: the fourth would start after 300 s


class FakeSync:
    name = "dns"

    def __init__(self):
        self.applied = []
        self.live = "old"

    def prepare(self):
        pass

    def expected_hash(self, state):
        return "new"

    def actual_hash(self):
        if self.live is None:
            raise OSError("cannot read")
        return self.live

    def apply(self, state):
        self.applied.append(state)
        self.live = "new"


RECORD = (DnsRecord("a.internal", ("10.200.1.2",)),)


def test_config_drift_applies_after_containers():
    sync = FakeSync()
    reconciler, podman, _ = make(ListSource(ExpectedState(containers=(spec("a"),), dns_records=RECORD)), syncs=[sync])
    reconciler.tick()
    assert len(sync.applied) == 1 and len(podman.containers) == 1
    reconciler.tick()
    assert len(sync.applied) == 1


def test_unreadable_config_counts_as_drift():
    sync = FakeSync()
    sync.live = None
    reconciler, _, _ = make(ListSource(ExpectedState(dns_records=RECORD)), syncs=[sync])
    reconciler.tick()
    assert len(sync.applied) == 1


def test_podman_failure_while_observing_changes_nothing():
    podman = FakePodman()
    podman.fail["list"] = RuntimeError("podman hung")
    reconciler, podman, reporter = make(ListSource(ExpectedState(containers=(spec("a"),))), podman)
    reconciler.tick()
    assert podman.containers == {}


class ImagesPodman(FakePodman):
    def __init__(self, local):
        super().__init__()
        self.local = local

    def image_exists(self, image):
        return image in self.local


@pytest.mark.parametrize(
    ("image", "local", "pulled"),
    [
        ("docker.io/library/nginx:latest", {"docker.io/library/nginx:latest"}, True),
        ("nginx", set(), True),
        ("registry.internal:5000/p/s:abc123", {"registry.internal:5000/p/s:abc123"}, False),
        ("registry.internal:5000/p/s:abc123", set(), True),
        ("localhost/app:v1", set(), False),
    ],
)
def test_pull_policy(image, local, pulled):
    podman = ImagesPodman(local)
    reconciler, podman, _ = make(ListSource(ExpectedState(containers=(spec("a", image=image),))), podman)
    reconciler.tick()
    assert (("pull", image) in podman.calls) is pulled


def test_failed_pull_uses_local_copy_or_fails():
    podman = ImagesPodman({"docker.io/library/nginx:latest"})
    podman.fail["pull"] = RuntimeError("registry down")
    reconciler, podman, _ = make(ListSource(ExpectedState(containers=(spec("a", image="docker.io/library/nginx:latest"), spec("b", image="docker.io/library/redis:latest")))), podman)
    reconciler.tick()
    assert {c.deployment_id for c in podman.containers.values()} == {"a"}


def test_deployment_stopped_by_a_work_item_is_not_recreated():
    podman = FakePodman()
    reconciler, podman, _ = make(ListSource(ExpectedState(containers=(spec("stopped"), spec("a")))), podman)
    reconciler.stopped_deployments = lambda: frozenset({"stopped"})
    reconciler.tick()
    assert {c.deployment_id for c in podman.containers.values()} == {"a"}


def test_one_empty_poll_removes_nothing_even_with_other_changes_pending():
    podman = FakePodman()
    podman.add("a")
    podman.add("b")
    sync = FakeSync()
    source = ListSource(ExpectedState(), ExpectedState(containers=(spec("a"), spec("b"))))
    reconciler, podman, _ = make(source, podman, syncs=[sync])
    reconciler.tick()  # the config change makes it process the same snapshot again
    assert len(podman.containers) == 2
    assert sync.applied == [], "a config section that suddenly empties waits for a second poll too"


def test_config_section_emptied_twice_is_applied():
    sync = FakeSync()
    reconciler, _, _ = make(ListSource(ExpectedState()), syncs=[sync])
    reconciler.tick()
    assert sync.applied == []
    reconciler.tick()
    assert len(sync.applied) == 1


def test_missing_sections_are_unknown_not_empty():
    from agent.model import parse_expected_state

    podman = FakePodman()
    podman.add("a")
    sync = FakeSync()
    state = parse_expected_state({"dns": {"records": []}}, None)
    reconciler, podman, _ = make(ListSource(state), podman, syncs=[sync])
    for _ in range(3):
        reconciler.tick()
    assert len(podman.containers) == 1, "no containers key: nothing is removed"
    caddy_sync = FakeSync()
    caddy_sync.name = "caddy"
    reconciler, _, _ = make(ListSource(parse_expected_state({"containers": []}, None)), syncs=[caddy_sync])
    for _ in range(3):
        reconciler.tick()
    assert caddy_sync.applied == [], "no caddy key: Caddy is left alone"


def test_a_bad_entry_is_skipped_and_the_rest_of_its_section_applies():
    from agent.model import parse_expected_state

    sync = FakeSync()
    state = parse_expected_state(
        {"dns": {"records": [{"name": "a.internal", "ips": ["10.200.1.2"]}, {"name": "bad name", "ips": ["1.2.3.4"]}]}}, None
    )
    reconciler, _, _ = make(ListSource(state), syncs=[sync])
    reconciler.tick()
    assert len(sync.applied) == 1 and [r.name for r in sync.applied[0].dns_records] == ["a.internal"]


GARBLED_DNS = {"dns": {"records": [{"name": "bad name", "ips": ["10.200.1.2"]}, {"name": "b.internal", "ips": "10.200.1.3"}]}}


def test_a_section_whose_every_entry_is_invalid_changes_nothing_and_says_so_once(caplog):
    import logging

    from agent.model import parse_expected_state

    caplog.set_level(logging.INFO, logger="agent.loop")
    sync = FakeSync()
    garbled = parse_expected_state(GARBLED_DNS, None)
    source = ListSource(garbled)
    reconciler, _, _ = make(source, syncs=[sync])
    for _ in range(5):
        reconciler.tick()
    assert sync.applied == []
    assert [c.held_because for c in reconciler.held] == ["every entry of its section is invalid: nothing changes until one is valid"]
    lines = [r.getMessage() for r in caplog.records if "every dns entry" in r.getMessage()]
    assert lines == ["expected state: every dns entry it lists is invalid (see above); nothing in dns changes until one is valid"]
    assert not [r for r in caplog.records if "suddenly lists nothing" in r.getMessage()]
    # Fixed: the valid entry applies, and the all-clear is said once.
    source.items = [parse_expected_state({"dns": {"records": [{"name": "a.internal", "ips": ["10.200.1.2"]}]}}, None)]
    reconciler.tick()
    reconciler.tick()
    assert len(sync.applied) == 1
    assert [r.getMessage() for r in caplog.records if "has a valid entry again" in r.getMessage()] == [
        "expected state has a valid entry again in every section it lists"]


def test_a_garbled_section_does_not_count_as_an_empty_poll():
    # Garbled, then really empty: the empty list still needs its own second poll.
    from agent.model import parse_expected_state

    sync = FakeSync()
    reconciler, _, _ = make(ListSource(parse_expected_state(GARBLED_DNS, None), ExpectedState()), syncs=[sync])
    reconciler.tick()
    reconciler.tick()
    assert sync.applied == []
    reconciler.tick()
    assert len(sync.applied) == 1


def test_a_slow_pull_does_not_hold_the_host_lock():
    podman = ImagesPodman(set())
    release = threading.Event()
    pulling = threading.Event()
    original = podman.pull

    def slow_pull(image, timeout=None):
        pulling.set()
        release.wait(10)
        original(image, timeout)

    podman.pull = slow_pull
    reconciler, podman, _ = make(ListSource(ExpectedState(containers=(spec("a", image="docker.io/library/nginx:1.27"),))), podman)
    worker = threading.Thread(target=reconciler.tick)
    worker.start()
    try:
        assert pulling.wait(5)
        assert reconciler.host_lock.acquire(timeout=1), "a work item must not wait for a pull"
        reconciler.host_lock.release()
    finally:
        release.set()
        worker.join(10)
    assert len(podman.containers) == 1


def test_start_of_a_vanished_container_does_not_redeploy():
    podman = FakePodman()
    gone = podman.add("a", "exited")
    reconciler, podman, _ = make(ListSource(ExpectedState(containers=(spec("a"),))), podman)
    podman.fail["start"] = RuntimeError("no such container")
    del podman.containers[gone.id]  # removed between plan and step (e.g. a stop work item)
    from agent.drift import Change, ChangeKind

    reconciler.apply(Change(ChangeKind.START, "exited", gone, spec("a")), ExpectedState())
    assert not any(op == "run" for op, _ in podman.calls)


def test_change_for_a_deployment_stopped_meanwhile_is_skipped():
    from agent.drift import Change, ChangeKind

    reconciler, podman, _ = make(ListSource(ExpectedState()))
    reconciler.stopped_deployments = lambda: frozenset({"a"})
    reconciler.apply(Change(ChangeKind.DEPLOY, "missing", expected=spec("a")), ExpectedState())
    assert podman.containers == {}


def test_pull_timeout_is_capped_by_the_processing_deadline():
    clock = [1000.0]
    podman = ImagesPodman(set())
    reconciler, podman, _ = make(ListSource(ExpectedState(containers=(spec("a", image="docker.io/library/nginx:1.27"),))), podman)
    reconciler.clock = lambda: clock[0]
    reconciler.tick()
    assert podman.pull_timeouts == [300.0]


def test_state_file_typos_are_named_and_a_missing_section_is_empty(tmp_path, caplog):
    import ipaddress

    from agent.loop import FileSource

    path = tmp_path / "state.toml"
    path.write_text(
        'subnetID = 3\n[[containers]]\ndeploymentid = "d1"\nserviceId = "s"\nname = "n"\nimage = "localhost/x"\n'
        '[containers.healthCheck]\ncmd = "true"\nintervall = 5\n'
    )
    source = FileSource(path, ipaddress.IPv4Network("10.200.1.0/24"))
    state = source.fetch()
    source.fetch()
    text = caplog.text
    assert "unknown key 'subnetID' in the top level (did you mean subnetId?)" in text
    assert "unknown key 'deploymentid' in containers[0] (did you mean deploymentId?)" in text
    assert "unknown key 'intervall' in containers[0].healthCheck (did you mean interval?)" in text
    assert text.count("unknown key 'subnetID'") == 1, "each typo is named once, not every tick"
    assert "deploymentId must be" in state.problems[0] and "but it is missing" in state.problems[0]
    assert "containers" in state.invalid_sections
    path.write_text("")  # the last block deleted
    assert FileSource(path, ipaddress.IPv4Network("10.200.1.0/24")).fetch().sections >= {"containers"}


def test_no_removal_while_a_container_entry_is_invalid():
    from agent.model import parse_expected_state

    podman = FakePodman()
    podman.add("d2")
    typo = {"deploymentid": "d2", "serviceId": "svc", "serviceName": "S", "name": "c-d2", "image": "localhost/app:v1"}
    state = parse_expected_state({"containers": [typo]}, None)
    reconciler, podman, _ = make(ListSource(state), podman)
    for _ in range(3):
        reconciler.tick()
    assert [c.deployment_id for c in podman.containers.values()] == ["d2"]


def test_unexpected_container_is_removed_when_only_stopped_deployments_are_listed():
    podman = FakePodman()
    podman.add("gone")
    reconciler, podman, _ = make(ListSource(ExpectedState(containers=(spec("stopped"),))), podman)
    reconciler.stopped_deployments = lambda: frozenset({"stopped"})
    reconciler.tick()
    assert podman.containers == {}, "the document is not empty: no second poll is needed"


def test_one_bad_field_with_a_valid_deployment_id_blocks_only_that_deployment():
    from agent.model import parse_expected_state

    podman = FakePodman()
    podman.add("d1")
    podman.add("old")
    bad = {"deploymentId": "d1", "serviceId": "svc", "serviceName": "S", "name": "c-d1", "image": "bad image"}
    reconciler, podman, _ = make(ListSource(parse_expected_state({"containers": [bad]}, None)), podman)
    reconciler.tick()
    assert [c.deployment_id for c in podman.containers.values()] == ["d1"]


def test_failed_start_removes_the_container_and_the_same_pass_deploys_it_outside_the_lock():
    podman = ImagesPodman(set())
    exited = podman.add("a", "exited", image="docker.io/library/nginx:1.27")
    podman.fail["start"] = RuntimeError("cannot start")
    reconciler, podman, _ = make(ListSource(ExpectedState(containers=(spec("a", image="docker.io/library/nginx:1.27"),))), podman)
    locked_during_pull = []
    original = podman.pull

    def pull(image, timeout=None):
        locked_during_pull.append(reconciler.host_lock.locked())
        original(image, timeout)

    podman.pull = pull
    reconciler.tick()
    assert exited.id not in podman.containers and [c.deployment_id for c in podman.containers.values()] == ["a"]
    assert locked_during_pull == [False]


def test_a_change_outdated_by_a_work_item_is_skipped():
    from agent.drift import Change, ChangeKind

    podman = FakePodman()
    old = podman.add("a", image="localhost/app:v0")
    reconciler, podman, _ = make(ListSource(ExpectedState()), podman)
    reconciler.compute_plan(ExpectedState(containers=(spec("a"),)))
    del podman.containers[old.id]  # a work item removed it while we were pulling
    reconciler.note_host_change()
    reconciler.apply(Change(ChangeKind.REDEPLOY, "image", old, spec("a")), ExpectedState())
    assert podman.containers == {}, "the removal by the work item is not undone"


# --- rollouts (ROLLOUT.md): no re-image of the old deployment, drain, fast follow -----------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RoutedPodman(FakePodman):
    """FakePodman whose containers have IPs (the drain looks them up with inspect) and that
    logs every change into a shared event list, to check the order against Caddy's."""

    def __init__(self, events: list) -> None:
        super().__init__()
        self.ips: dict[str, str] = {}
        self.events = events

    def add_at(self, dep: str, ip: str, **kw) -> str:
        info = self.add(dep, **kw)
        self.ips[info.id] = ip
        return info.id

    def inspect(self, ref):
        if ref not in self.containers:
            return None
        ip = self.ips.get(ref, "")
        return {"Id": ref, "NetworkSettings": {"Networks": {"techulus": {"IPAddress": ip}}}}

    def run_container(self, spec, env, volumes_dir):
        cid = super().run_container(spec, env, volumes_dir)
        self.ips[cid] = spec.ip_address
        self.events.append(("run", spec.deployment_id))
        return cid

    def stop_and_remove(self, ref):
        self.events.append(("remove", self.containers[ref].deployment_id))
        super().stop_and_remove(ref)


class FakeCaddy:
    """A Caddy adapter: live routes in memory, applied from the expected state."""

    name = "caddy"

    def __init__(self, events: list, live: tuple = ()) -> None:
        self.live = list(live)
        self.events = events

    def prepare(self):
        pass

    def expected_hash(self, state):
        return repr(sorted((r.id, r.upstreams) for r in state.caddy_routes))

    def actual_hash(self):
        return repr(sorted((r.id, r.upstreams) for r in self.live))

    def live_routes(self):
        return list(self.live)

    def apply(self, state):
        self.live = list(state.caddy_routes)
        self.events.append(("caddy", tuple(u for r in self.live for u in r.upstreams)))


D1_IP, D2_IP = "10.200.1.2", "10.200.1.3"


def route(*ips):
    return CaddyRoute("app.example.com", "app.example.com", tuple(f"{ip}:80" for ip in ips), "svc")


def rollout_setup(clock=None, caddy=True):
    """D1 (v1) serves; D2 (v2) runs; the Caddy route lists both (caddy_updating)."""
    events: list = []
    podman = RoutedPodman(events)
    d1 = podman.add_at("d1", D1_IP, image="localhost/app:v1")
    podman.add_at("d2", D2_IP, image="localhost/app:v2")
    syncs = [FakeCaddy(events, (route(D1_IP, D2_IP),))] if caddy else []
    source = ListSource(ExpectedState())
    settings = Settings.load({"data_dir": "/nonexistent-test-dir"}, environ={})
    reporter = RecordingReporter()
    reconciler = Reconciler(settings, podman, source, syncs, KEY, reporter, threading.Lock(), clock=clock or FakeClock())
    return reconciler, podman, source, reporter, events, d1


def stage(source, containers, *route_ips):
    source.items = [ExpectedState(containers=containers, caddy_routes=(route(*route_ips),) if route_ips else ())]


D1 = spec("d1", "localhost/app:v2", ip=D1_IP)
D2 = spec("d2", "localhost/app:v2", ip=D2_IP)


def test_redeploy_never_recreates_the_old_running_container():
    events: list = []
    podman = RoutedPodman(events)
    d1 = podman.add_at("d1", D1_IP, image="localhost/app:v1")
    reconciler, podman, _ = make(ListSource(ExpectedState(containers=(D1, D2))), podman)
    reconciler.tick()
    reconciler.tick()
    assert events == [("run", "d2")]
    assert podman.containers[d1].image == "localhost/app:v1"  # the same container, still serving
    assert [(c.kind.value, c.container.deployment_id) for c in reconciler.held] == [("redeploy", "d1")]


def test_crash_looped_old_container_is_restarted_not_reimaged():
    podman = FakePodman()
    d1 = podman.add("d1", "exited", image="localhost/app:v1")
    reconciler, podman, _ = make(ListSource(ExpectedState(containers=(D1, D2))), podman)
    reconciler.tick()
    assert ("start", d1.id) in podman.calls
    assert podman.containers[d1.id].state == "running" and podman.containers[d1.id].image == "localhost/app:v1"


def test_drain_reports_without_the_old_one_and_removes_it_only_after_the_route_moved():
    clock = FakeClock()
    reconciler, podman, source, reporter, events, d1 = rollout_setup(clock)
    reports: list = []
    heartbeat = Heartbeat(reports.append, podman, interval=10)
    reconciler.couple(heartbeat)
    heartbeat.send_once()
    assert [c["deploymentId"] for c in reports[-1]["containers"]] == ["d1", "d2"]
    # stopping_old: D1 is no longer listed, the route names D1 only.
    stage(source, (D2,), D1_IP)
    reconciler.tick()
    assert d1 in podman.containers, "D1 keeps serving: the route still names it"
    assert reconciler.draining_ids() == frozenset({d1})
    heartbeat.send_once()
    assert [c["deploymentId"] for c in reports[-1]["containers"]] == ["d2"], "D1 leaves the status reports"
    assert reporter.triggers, "a report goes out at once"
    assert reconciler.following(), "and the loop polls right after it"
    assert any("draining for" in c.held_because for c in reconciler.held)
    # A later poll of the same stage: still draining (nothing times out in between).
    clock.now += 5
    reconciler.tick()
    assert d1 in podman.containers
    # The rollout completed: the route names D2. Caddy first, then D1 goes once the other
    # servers' Caddy had a poll to move on too (drain_grace, tick_interval by default).
    stage(source, (D2,), D2_IP)
    clock.now += 1
    reconciler.tick()
    assert d1 in podman.containers and reconciler.draining_ids() == frozenset({d1})
    assert any("no route here names it since 0s" in c.held_because for c in reconciler.held)
    clock.now += reconciler.settings.tick_interval
    reconciler.tick()
    assert d1 not in podman.containers
    assert events == [("caddy", (f"{D1_IP}:80",)), ("caddy", (f"{D2_IP}:80",)), ("remove", "d1")]
    reconciler.tick()
    assert reconciler.draining_ids() == frozenset()


def test_drain_is_bounded(caplog):
    clock = FakeClock()
    reconciler, podman, source, _, events, d1 = rollout_setup(clock)
    stage(source, (D2,), D1_IP)
    reconciler.tick()
    assert d1 in podman.containers
    clock.now += reconciler.settings.drain_timeout
    reconciler.tick()
    assert d1 not in podman.containers
    assert "drain of c-d1 ended after 60s although route app.example.com still sends traffic to 10.200.1.2:80" in caplog.text


def test_the_live_route_alone_keeps_the_drain():
    # The expected route already moved to D2, the live one still names D1 only: the removal
    # comes after Caddy is applied, never before.
    clock = FakeClock()
    reconciler, podman, source, _, events, d1 = rollout_setup(clock)
    reconciler.syncs["caddy"].live = [route(D1_IP)]
    stage(source, (D2,), D2_IP)
    reconciler.tick()
    assert d1 in podman.containers and events == [("caddy", (f"{D2_IP}:80",))]
    clock.now += reconciler.settings.drain_grace_seconds
    reconciler.tick()
    assert events == [("caddy", (f"{D2_IP}:80",)), ("remove", "d1")]


def grace_setup(clock, **settings):
    """rollout_setup with settings; D1 drained at stopping_old, then the route moves to D2."""
    reconciler, podman, source, reporter, events, d1 = rollout_setup(clock)
    reconciler.settings = Settings.load({"data_dir": "/nonexistent-test-dir", **settings}, environ={})
    stage(source, (D2,), D1_IP)
    reconciler.tick()
    assert reconciler.draining_ids() == frozenset({d1})
    return reconciler, podman, source, events, d1


def test_a_drained_container_is_kept_for_the_grace_after_the_routes_moved(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="agent.loop")
    clock = FakeClock()
    reconciler, podman, source, events, d1 = grace_setup(clock, drain_grace=7)
    clock.now += 3
    stage(source, (D2,), D2_IP)
    reconciler.tick()  # this server's route moved: other servers' may not have yet
    for _ in range(3):
        clock.now += 2
        reconciler.tick()
        assert d1 in podman.containers, "within the grace"
        assert reconciler.draining_ids() == frozenset({d1}), "still out of the reports"
    assert len([r for r in caplog.records if "no route here names it any more; removing it in 7s" in r.getMessage()]) == 1
    clock.now += 1  # 7 s after the routes moved
    reconciler.tick()
    assert d1 not in podman.containers
    assert events[-1] == ("remove", "d1")


def test_a_route_that_names_it_again_restarts_the_grace():
    clock = FakeClock()
    reconciler, podman, source, _, d1 = grace_setup(clock, drain_grace=5)
    stage(source, (D2,), D2_IP)
    reconciler.tick()
    clock.now += 4
    reconciler.syncs["caddy"].live = [route(D1_IP)]  # e.g. Caddy restored an old config
    stage(source, (D2,), D1_IP)
    reconciler.tick()
    stage(source, (D2,), D2_IP)
    clock.now += 1
    reconciler.tick()
    clock.now += 4
    reconciler.tick()
    assert d1 in podman.containers, "the grace counts from the last time a route named it"
    clock.now += 1
    reconciler.tick()
    assert d1 not in podman.containers


def test_the_grace_never_outlasts_the_drain_timeout():
    clock = FakeClock()
    reconciler, podman, source, _, d1 = grace_setup(clock, drain_grace=500, drain_timeout=20)
    assert reconciler.settings.drain_grace_seconds == 20
    clock.now += 15
    stage(source, (D2,), D2_IP)
    reconciler.tick()
    assert d1 in podman.containers
    clock.now += 5  # 20 s after the drain began, 5 s into the grace
    reconciler.tick()
    assert d1 not in podman.containers


def test_a_zero_grace_removes_it_as_soon_as_the_routes_moved():
    clock = FakeClock()
    reconciler, podman, source, _, d1 = grace_setup(clock, drain_grace=0)
    stage(source, (D2,), D2_IP)
    reconciler.tick()
    assert d1 not in podman.containers


@pytest.mark.parametrize("caddy", [False, True])
def test_no_drain_without_caddy_or_without_a_route_naming_it(caddy):
    reconciler, podman, source, _, events, d1 = rollout_setup(caddy=caddy)
    if caddy:
        reconciler.syncs["caddy"].live = [route(D2_IP)]
    stage(source, (D2,), *([D2_IP] if caddy else []))
    reconciler.tick()
    assert d1 not in podman.containers and reconciler.draining_ids() == frozenset()


def test_unreadable_live_routes_keep_the_drain():
    reconciler, podman, source, _, _, d1 = rollout_setup()

    def broken():
        raise OSError("admin API down")

    reconciler.syncs["caddy"].live_routes = broken
    stage(source, (D2,), D2_IP)
    reconciler.tick()
    assert d1 in podman.containers and reconciler.draining_ids() == frozenset({d1})


def test_fast_follow_starts_with_a_rollout_and_stops_when_nothing_moves():
    clock = FakeClock()
    reconciler, podman, source, reporter, _, _ = rollout_setup(clock, caddy=False)
    settled = ExpectedState(containers=(spec("d1", "localhost/app:v1", ip=D1_IP),))
    podman.containers = {k: v for k, v in podman.containers.items() if v.deployment_id == "d1"}
    source.items = [settled]
    reconciler.tick()
    assert not reconciler.following(), "nothing in progress: the normal tick"
    # A redeploy: D2 listed without a container. The deploy moves things: follow.
    source.items = [ExpectedState(containers=(D1, D2))]
    clock.now += 10
    reconciler.tick()
    assert reconciler.following()
    # A report that differs (health changed) keeps it going and asks for a poll at once.
    clock.now += 20
    reconciler.note_report(changed=True)
    assert reconciler._poll_now.is_set()
    clock.now += 20
    assert reconciler.following()
    # Two deployments stay listed, but nothing moves for fast_follow_timeout: back to normal.
    clock.now += reconciler.settings.fast_follow_timeout
    reconciler.tick()
    assert not reconciler.following()
    # The rollout settles (one deployment): the control plane still needs a few rounds that
    # look settled here, so the loop follows a short while after the last movement, no longer.
    podman.containers = {k: v for k, v in podman.containers.items() if v.deployment_id == "d2"}
    source.items = [ExpectedState(containers=(D2,))]
    reconciler.tick()
    assert reconciler.following()
    clock.now += SETTLE_WINDOW
    assert not reconciler.following()


def test_a_new_document_while_following_triggers_a_report_but_no_drift_ticks_do_not_flood():
    clock = FakeClock()
    reconciler, podman, source, reporter, _, _ = rollout_setup(clock, caddy=False)
    source.items = [ExpectedState(containers=(D1, D2))]
    reconciler.tick()
    reconciler.tick()  # first no-drift tick: the report with resources
    count = len(reporter.triggers)
    for _ in range(5):  # fast polls, nothing new: no report each time
        clock.now += 1
        reconciler.tick()
    assert len(reporter.triggers) == count
    source.items = [ExpectedState(containers=(D1, D2), dns_records=RECORD, sections=frozenset({"containers"}))]
    clock.now += 1
    reconciler.tick()
    assert len(reporter.triggers) == count + 1 and reporter.triggers[-1] is False


def test_run_polls_right_after_a_report_while_following():
    fetched = threading.Event()
    count = [0]

    class CountingSource:
        def fetch(self):
            count[0] += 1
            if count[0] >= 2:
                fetched.set()
            return ExpectedState(containers=(D1, D2))

    settings = Settings.load({"data_dir": "/nonexistent-test-dir", "tick_interval": 3600, "fast_poll_interval": 3600}, environ={})
    podman = FakePodman()
    podman.add("d1", image="localhost/app:v1")
    podman.add("d2", image="localhost/app:v2")
    reconciler = Reconciler(settings, podman, CountingSource(), [], KEY, RecordingReporter(), threading.Lock())
    stop = threading.Event()
    thread = threading.Thread(target=reconciler.run, args=(stop,), daemon=True)
    thread.start()
    try:
        while count[0] < 1:
            stop.wait(0.01)
        reconciler.wake()  # e.g. a deploy work item, or a report that went out
        assert fetched.wait(10), "the loop polls again without waiting for its hour-long tick"
    finally:
        stop.set()
        thread.join(5)


def test_a_rolled_back_rollout_leaves_the_old_deployment_on_its_image():
    podman = FakePodman()
    d1 = podman.add("d1", image="localhost/app:v1")
    broken_d1 = spec("d1", "localhost/app:broken")
    source = ListSource(ExpectedState(containers=(broken_d1, spec("d2", "localhost/app:broken"))))
    reconciler, podman, _ = make(source, podman)
    reconciler.tick()
    # Rolled back: D2 is gone from the list, D1 is listed alone with the broken image.
    source.items = [ExpectedState(containers=(broken_d1,))]
    reconciler.tick()
    reconciler.tick()
    assert podman.containers[d1.id].image == "localhost/app:v1"
    assert [c.kind.value for c in reconciler.held] == ["redeploy"]


def test_a_held_image_change_is_logged_once_per_deployment_not_per_tick(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="agent.loop")
    podman = FakePodman()
    podman.add("d1", image="localhost/app:v1")
    source = ListSource(ExpectedState(containers=(spec("d1", "localhost/app:v2"),)))
    reconciler, podman, _ = make(source, podman)
    for _ in range(5):
        reconciler.tick()
    lines = [r.getMessage() for r in caplog.records if "stays on its own image" in r.getMessage()]
    assert len(lines) == 1 and "deployment d1" in lines[0] and "localhost/app:v2" in lines[0], lines
    assert "only through new deployments" in lines[0]
    # Listed with yet another image (a new configuration, still not deployed): one more line.
    source.items = [ExpectedState(containers=(spec("d1", "localhost/app:v3"),))]
    reconciler.tick()
    reconciler.tick()
    assert len([r for r in caplog.records if "stays on its own image" in r.getMessage()]) == 2


def test_a_state_files_lone_image_change_is_applied_but_a_control_planes_is_not(tmp_path):
    import ipaddress

    from agent.loop import ControlPlaneSource, FileSource

    path = tmp_path / "state.json"
    path.write_text('{"containers": [{"deploymentId": "d1", "serviceId": "svc", "serviceName": "Svc", '
                    '"name": "c-d1", "image": "localhost/app:v2"}]}')
    subnet = ipaddress.IPv4Network("10.200.1.0/24")
    podman = FakePodman()
    old = podman.add("d1", image="localhost/app:v1")
    reconciler, podman, _ = make(FileSource(path, subnet), podman)
    reconciler.tick()
    assert old.id not in podman.containers
    assert [c.image for c in podman.containers.values()] == ["localhost/app:v2"]
    assert FileSource.follow_image_changes and not ControlPlaneSource.follow_image_changes


def test_a_control_plane_outage_is_logged_once_then_counted_and_its_end_once(caplog):
    """30 failed polls (a 5-minute outage at 10 s ticks) give one line, not 30; a failure
    that lasts past the repeat window is logged again with a count; recovery gives one line."""
    import logging

    now = [1000.0]
    outage = [Unavailable(f"timeout #{n}") for n in range(30)]
    source = ListSource(*outage, ExpectedState())
    settings = Settings.load({"data_dir": "/nonexistent-test-dir"}, environ={})
    reconciler = Reconciler(settings, FakePodman(), source, [], KEY, RecordingReporter(), threading.Lock(), clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="agent.loop")
    for _ in range(30):
        reconciler.tick()
        now[0] += 10
    unavailable = [r for r in caplog.records if "expected state unavailable" in r.getMessage()]
    assert len(unavailable) == 1 and "timeout #0" in unavailable[0].getMessage()
    now[0] += 600  # past the repeat window: one reminder with the count, then recovery
    source.items.insert(0, Unavailable("timeout #30"))
    reconciler.tick()
    reconciler.tick()
    lines = [r.getMessage() for r in caplog.records if "expected state unavailable" in r.getMessage()]
    assert len(lines) == 3, lines
    assert "31 times in a row" in lines[1] and "timeout #30" in lines[1]
    assert "works again after 31 failure(s)" in lines[2]


# --- issue 11: new deployments start together, images are pulled together -----------------


def test_new_deployments_start_four_at_a_time_each_verified_and_reported():
    from agent.loop import DEPLOY_PARALLELISM

    state = ExpectedState(containers=tuple(spec(f"d{i}", image=f"registry.test/app{i % 3}:latest") for i in range(10)))
    reconciler, podman, reporter = make(ListSource(state))
    together = threading.Barrier(DEPLOY_PARALLELISM, timeout=10)
    inflight, most = [0], [0]
    lock = threading.Lock()
    original = podman.run_container

    def run(s, env, volumes_dir):
        with lock:
            inflight[0] += 1
            most[0] = max(most[0], inflight[0])
        if s.deployment_id in ("d0", "d1", "d2", "d3"):
            together.wait()  # breaks (and fails the deploy) unless four run at once
        try:
            return original(s, env, volumes_dir)
        finally:
            with lock:
                inflight[0] -= 1

    podman.run_container = run
    pulls = []
    podman.pull = lambda image, timeout=None: pulls.append(image)
    reconciler.tick()
    assert sorted(c.deployment_id for c in podman.containers.values()) == sorted(f"d{i}" for i in range(10))
    assert most[0] == DEPLOY_PARALLELISM
    assert len(reporter.triggers) == 11, "a report after entering PROCESSING and after each deployment"
    assert sorted(pulls) == [f"registry.test/app{i}:latest" for i in range(3)], "each image pulled once"


def test_only_new_deployments_go_together():
    from agent.drift import Change, ChangeKind
    from agent.loop import DEPLOY_CHUNK, groups

    existing = FakePodman().add("x")
    fresh = [Change(ChangeKind.DEPLOY, "missing", expected=spec(f"d{i}")) for i in range(DEPLOY_CHUNK + 5)]
    replace = Change(ChangeKind.DEPLOY, "missing", expected=spec("x"), container=existing)
    remove = Change(ChangeKind.REMOVE_ORPHAN, "orphan", container=existing)
    cut = groups([remove, *fresh[:3], replace, *fresh[3:]])
    assert [len(g) for g in cut] == [1, 3, 1, DEPLOY_CHUNK, 2]
    assert cut[0] == [remove] and cut[2] == [replace]
