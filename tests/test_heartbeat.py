"""Status reports: their own thread keeps them coming while a step blocks for long, a
podman failure reports the last known list rather than "nothing", and health is mapped so
a stopped container never counts as healthy (PROTOCOL.md §17.18)."""

import threading
import time
from dataclasses import replace

from agent import status
from agent.drift import LABEL_DEPLOYMENT_ID, LABEL_SERVICE_ID, ContainerInfo
from agent.heartbeat import Heartbeat
from agent.host.podman import HealthReading
from agent.loop import Reconciler
from agent.model import ExpectedContainer, ExpectedState
from agent.settings import Settings
from tests.fakes import FakePodman, ListSource


def info(dep, state="running", service="svc"):
    labels = {LABEL_SERVICE_ID: service}
    if dep:
        labels[LABEL_DEPLOYMENT_ID] = dep
    return ContainerInfo(f"id-{dep or 'orphan'}-{state}", f"n-{dep}", "localhost/x:latest", state, labels)


def test_reports_continue_while_a_step_blocks():
    podman = FakePodman()
    podman.run_delay = 2.0  # a slow pull/run
    reports = []
    heartbeat = Heartbeat(reports.append, podman, interval=0.2)
    settings = Settings.load({"data_dir": "/nonexistent-test-dir"}, environ={})
    state = ExpectedState(containers=(ExpectedContainer("d1", "svc", "S", "c-d1", "localhost/app:v1", ""),))
    reconciler = Reconciler(settings, podman, ListSource(state), [], "", heartbeat, threading.Lock())
    stop = threading.Event()
    thread = threading.Thread(target=heartbeat.run, args=(stop,), daemon=True)
    thread.start()
    try:
        time.sleep(0.3)
        before = len(reports)
        started = time.monotonic()
        reconciler.tick()
        assert time.monotonic() - started >= 2.0
        during = len(reports) - before
    finally:
        stop.set()
        thread.join(5)
    assert during >= 5, f"only {during} reports while a 2 s step ran with a 0.2 s heartbeat"
    assert not thread.is_alive(), "the heartbeat thread stops promptly"


def test_podman_failure_reports_the_last_known_containers():
    podman = FakePodman()
    podman.add("d1")
    reports = []
    heartbeat = Heartbeat(reports.append, podman, interval=10)
    heartbeat.send_once()
    podman.fail["list"] = RuntimeError("podman hung")
    heartbeat.send_once()
    assert [c["deploymentId"] for c in reports[-1]["containers"]] == ["d1"]


def test_failed_send_is_logged_not_raised(caplog):
    from agent.api import Unavailable

    def send(report):
        raise Unavailable("control plane down")

    Heartbeat(send, FakePodman(), interval=10).send_once()
    assert "status report failed: control plane down" in caplog.text


def test_report_shape_and_health_mapping():
    containers = [info("run"), info("exited", "exited"), info("created", "created"), info("", "running"), info("x", service="")]
    report = status.build_report(containers, {"id-run-running": "healthy"}, "203.0.113.7", include_resources=True)
    assert list(report) == ["resources", "publicIp", "containers"]
    assert set(report["resources"]) == {"cpuCores", "memoryMb", "diskGb"}
    assert report["resources"]["cpuCores"] >= 1 and report["resources"]["memoryMb"] > 0
    entries = {c["deploymentId"]: (c["status"], c["healthStatus"]) for c in report["containers"]}
    assert entries == {"run": ("running", "healthy"), "exited": ("stopped", "unhealthy"), "created": ("stopped", "starting")}


def test_report_without_resources_or_ip_still_has_containers():
    report = status.build_report([], {}, "", include_resources=False)
    assert report == {"containers": []}


def test_resources_only_when_triggered_for_no_drift():
    reports = []
    heartbeat = Heartbeat(reports.append, FakePodman(), interval=10)
    heartbeat.send_once()
    heartbeat.trigger(include_resources=True)
    heartbeat.send_once()
    heartbeat.send_once()
    assert ["resources" in r for r in reports] == [False, True, False]


def _serve(status_code, body):
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(status_code)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def test_public_ip_detection_validates_the_answer():
    for code, body, expected in [
        (200, b"203.0.113.9\n", "203.0.113.9"), (200, b"<html>", ""), (500, b"1.2.3.4", ""), (200, b"2001:db8::1", ""),
    ]:
        server, url = _serve(code, body)
        try:
            assert status.detect_public_ip(url, timeout=2) == expected
        finally:
            server.shutdown()
    assert status.detect_public_ip("") == ""
    assert status.detect_public_ip("http://127.0.0.1:9/", timeout=1) == ""


def test_health_read_failure_never_reports_none():
    podman = FakePodman()
    podman.add("d1")
    reports = []
    heartbeat = Heartbeat(reports.append, podman, interval=10)
    podman.read_health = lambda ids: {i: HealthReading("starting", 0, True) for i in ids}
    heartbeat.send_once()

    def broken(ids):
        raise RuntimeError("inspect timed out")

    podman.read_health = broken
    heartbeat.send_once()
    assert reports[-1]["containers"][0]["healthStatus"] == "starting"
    podman.add("d2")
    heartbeat.send_once()
    assert {c["healthStatus"] for c in reports[-1]["containers"]} == {"starting"}


def test_first_listing_failure_sends_nothing():
    podman = FakePodman()
    podman.fail["list"] = RuntimeError("podman hung")
    reports = []
    Heartbeat(reports.append, podman, interval=10).send_once()
    assert reports == []


def test_public_ip_is_refreshed_and_a_failed_lookup_keeps_the_last(monkeypatch):
    answers = iter(["203.0.113.1", "", "203.0.113.2"])
    calls = []

    def lookup(url):
        calls.append(url)
        return next(answers)

    monkeypatch.setattr(status, "detect_public_ip", lookup)
    ip = status.PublicIp("", "http://lookup.invalid/", refresh=60)
    assert ip() == "203.0.113.1"
    assert ip() == "203.0.113.1" and len(calls) == 1, "calls never wait on the network again"
    ip.lookup()
    assert ip() == "203.0.113.1"  # lookup failed: keep the last good one
    ip.lookup()
    assert ip() == "203.0.113.2"
    assert status.PublicIp("198.51.100.1", "http://unused.invalid/")() == "198.51.100.1"


def test_a_container_podman_keeps_restarting_is_reported_unhealthy():
    podman = FakePodman()
    looping = podman.add("d1")
    clock = [0.0]
    reports = []
    heartbeat = Heartbeat(reports.append, podman, interval=10, clock=lambda: clock[0])
    podman.restart_counts[looping.id] = 2  # restarts before we first looked: no verdict
    heartbeat.send_once()
    assert reports[-1]["containers"][0]["healthStatus"] == "none"
    podman.restart_counts[looping.id] = 3  # one restart (an OOM kill, say) is not a loop
    clock[0] = 10
    heartbeat.send_once()
    assert reports[-1]["containers"][0]["healthStatus"] == "none"
    podman.restart_counts[looping.id] = 4
    clock[0] = 20
    heartbeat.send_once()
    assert reports[-1]["containers"][0]["healthStatus"] == "unhealthy"
    clock[0] = 20 + 301  # no restart for longer than the window: its own health again
    heartbeat.send_once()
    assert reports[-1]["containers"][0]["healthStatus"] == "none"


def test_state_of_vanished_containers_is_forgotten():
    podman = FakePodman()
    heartbeat = Heartbeat(lambda report: None, podman, interval=10)
    for index in range(50):
        info = podman.add(f"d{index}")
        podman.restart_counts[info.id] = 1
        heartbeat.send_once()
        del podman.containers[info.id]
    heartbeat.send_once()
    assert heartbeat._restarts == {} and heartbeat._last_health == {} and heartbeat._restart_times == {}


# --- following a rollout: drains left out, changes reported at once, triggers coalesced -----


def test_draining_containers_are_left_out_of_reports():
    podman = FakePodman()
    old = podman.add("d1")
    podman.add("d2")
    reports = []
    heartbeat = Heartbeat(reports.append, podman, interval=10)
    heartbeat.exclude = lambda: frozenset({old.id})
    heartbeat.send_once()
    assert [c["deploymentId"] for c in reports[-1]["containers"]] == ["d2"]


def test_only_changed_reports_go_out_between_beats_and_the_loop_is_told():
    podman = FakePodman()
    new = podman.add("d2")
    podman.health_status[new.id] = "starting"
    reports, told = [], []
    heartbeat = Heartbeat(reports.append, podman, interval=10)
    heartbeat.on_report = told.append
    assert heartbeat.send_once() is True
    assert heartbeat.send_once(only_if_changed=True) is False
    podman.health_status[new.id] = "healthy"
    assert heartbeat.send_once(only_if_changed=True) is True
    assert [c["healthStatus"] for r in reports for c in r["containers"]] == ["starting", "healthy"]
    assert told == [True, True]
    heartbeat.send_once()
    assert told == [True, True, False]


def test_a_health_change_is_reported_between_beats_while_following():
    podman = FakePodman()
    new = podman.add("d2")
    podman.health_status[new.id] = "starting"
    healthy = threading.Event()

    def send(report):
        if any(c["healthStatus"] == "healthy" for c in report["containers"]):
            healthy.set()

    heartbeat = Heartbeat(send, podman, interval=3600)
    heartbeat.following = lambda: True
    heartbeat.health_poll = 0.05
    stop = threading.Event()
    thread = threading.Thread(target=heartbeat.run, args=(stop,), daemon=True)
    thread.start()
    try:
        stop.wait(0.2)
        podman.health_status[new.id] = "healthy"
        assert healthy.wait(10), "reported without waiting for the hour-long interval"
    finally:
        stop.set()
        thread.join(5)


def test_triggers_during_a_report_make_one_more_report():
    podman = FakePodman()
    podman.add("d1")
    release, first_started = threading.Event(), threading.Event()
    reports = []

    def send(report):
        reports.append(report)
        first_started.set()
        release.wait(10)

    heartbeat = Heartbeat(send, podman, interval=3600)
    heartbeat.coalesce = 0.05
    stop = threading.Event()
    thread = threading.Thread(target=heartbeat.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert first_started.wait(10)
        for _ in range(20):  # a burst of changes while the first report is on its way
            heartbeat.trigger()
        release.set()
        while len(reports) < 2:
            stop.wait(0.01)
        stop.wait(0.5)
    finally:
        stop.set()
        thread.join(5)
    assert len(reports) == 2, "twenty triggers coalesced into one report"


def test_a_look_between_beats_stays_quiet_when_podman_fails(caplog):
    podman = FakePodman()
    podman.add("d1")
    reports = []
    heartbeat = Heartbeat(reports.append, podman, interval=10)
    heartbeat.send_once()
    podman.fail["list"] = RuntimeError("podman hung")
    assert heartbeat.send_once(only_if_changed=True) is False
    assert "cannot list containers" not in caplog.text and len(reports) == 1
    heartbeat.send_once()  # the regular beat reports the last known list, and says so
    assert "reporting the last known list" in caplog.text and len(reports) == 2


# --- issue 11: what a report costs in podman calls ------------------------------------------


class CountingPodman(FakePodman):
    """Records the listing age each read accepts and the ids each health read asks for."""

    def __init__(self) -> None:
        super().__init__()
        self.ages: list[float] = []
        self.health_reads: list[list[str]] = []

    def list_containers(self, max_age: float = 0.0):
        self.ages.append(max_age)
        return super().list_containers(max_age)

    def read_health(self, ids):
        self.health_reads.append(list(ids))
        return super().read_health(ids)


def test_health_comes_from_the_listing_and_an_inspect_reads_only_what_it_cannot_tell():
    podman = CountingPodman()
    plain, checked = podman.add("d1"), podman.add("d2")
    podman.health_status[checked.id] = "starting"
    clock = [0.0]
    reports = []
    heartbeat = Heartbeat(reports.append, podman, interval=10, clock=lambda: clock[0])
    health = lambda: [c["healthStatus"] for c in reports[-1]["containers"]]  # noqa: E731
    heartbeat.send_once()  # a beat nobody asked for: a fresh listing
    assert podman.ages == [0.0]
    assert podman.health_reads == [[plain.id, checked.id]], "first sight: restart baseline and whether it has a check"
    assert health() == ["none", "starting"]
    clock[0] = 1
    heartbeat.send_once(triggered=True)  # the listing was just taken (the reconciler's tick)
    assert podman.ages[-1] == 10, "a triggered report takes the shared listing up to an interval old"
    assert len(podman.health_reads) == 1, "a current listing says all: no inspect"
    podman.listing_age_value = 5.0  # an older listing: its health of a starting container is stale
    podman.health_status[checked.id] = "healthy"
    clock[0] = 2
    assert heartbeat.send_once(only_if_changed=True)
    assert podman.ages[-1] == 2 * heartbeat.health_poll and podman.health_reads[-1] == [checked.id]
    assert health() == ["none", "healthy"]
    clock[0] = 3
    assert not heartbeat.send_once(only_if_changed=True)
    assert len(podman.health_reads) == 2, "all settled: a look costs no health read"
    podman.listing_age_value = 0.0
    podman.restart_counts[plain.id] = 1  # it restarted: its start time moved
    clock[0] = 11
    heartbeat.send_once(triggered=True)
    assert podman.health_reads[-1] == [plain.id], "a moved start time asks how many restarts"
    heartbeat.send_once(triggered=True)
    assert len(podman.health_reads) == 3
    assert health() == ["none", "healthy"]


def test_a_listing_without_health_falls_back_to_an_inspect_of_checked_containers():
    podman = CountingPodman()
    podman.ps_shows_health = False
    podman.add("d1")
    checked = podman.add("d2")
    podman.health_status[checked.id] = "starting"
    reports = []
    heartbeat = Heartbeat(reports.append, podman, interval=10)
    heartbeat.send_once()
    podman.health_status[checked.id] = "unhealthy"
    heartbeat.send_once(triggered=True)
    assert podman.health_reads[-1] == [checked.id], "only the container with a health check"
    assert [c["healthStatus"] for c in reports[-1]["containers"]] == ["none", "unhealthy"]


def test_a_restart_count_in_the_listing_spares_the_inspect():
    podman = CountingPodman()
    looping = podman.add("d1")
    clock = [0.0]
    reports = []
    heartbeat = Heartbeat(reports.append, podman, interval=10, clock=lambda: clock[0])
    counted = lambda restarts, moved: [  # noqa: E731 - a podman whose ps carries "Restarts"
        replace(c, restarts=restarts, started_at=1000 + moved) for c in FakePodman.list_containers(podman)
    ]
    podman.list_containers = lambda max_age=0.0: counted(0, 0)
    heartbeat.send_once()
    for tick, restarts in enumerate((3, 6), start=1):
        clock[0] = 10 * tick
        podman.list_containers = lambda max_age=0.0, r=restarts: counted(r, r)  # noqa: B008
        heartbeat.send_once()
    assert podman.health_reads == [[looping.id]], "only the first sight is inspected"
    assert reports[-1]["containers"][0]["healthStatus"] == "unhealthy"


def test_a_due_beat_waits_briefly_for_the_reconcilers_tick():
    podman = FakePodman()
    podman.add("d1")
    reports = []
    heartbeat = Heartbeat(lambda r: reports.append((time.monotonic(), r)), podman, interval=0.5)
    heartbeat.coalesce = 0.01
    stop = threading.Event()
    thread = threading.Thread(target=heartbeat.run, args=(stop,), daemon=True)
    thread.start()
    try:
        for _ in range(6):  # a reconciler ticking every interval, a little late each time
            stop.wait(0.6)
            heartbeat.trigger(include_resources=True)
        stop.wait(0.3)
    finally:
        stop.set()
        thread.join(5)
    with_resources = [t for t, r in reports if "resources" in r]
    assert len(with_resources) == 6
    assert len(reports) <= 8, f"{len(reports)} reports for 6 ticks: the beats did not merge with them"
