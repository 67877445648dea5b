"""The publisher behind `agent status` and the metrics: what components report, what it writes."""

from __future__ import annotations

import ipaddress
import json
import logging
import threading

import pytest

from agent.drift import Change, ChangeKind, ContainerInfo
from agent.host.podman import PodmanCommandError, PodmanOptions
from agent.model import parse_expected_state
from agent.observe import ObservedPodman, Observer, Publisher, podman_verb, read_handshakes
from agent.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def publisher(tmp_path, clock=None) -> Publisher:
    clock = clock or Clock()
    return Publisher(tmp_path / "run" / "status.json", {"mode": "test"}, clock=clock, monotonic=clock)


def expected(ip: str = "10.200.1.2"):
    return parse_expected_state(
        {"containers": [{
            "deploymentId": "dep-1", "serviceId": "svc-1", "serviceName": "s", "name": "s-1", "image": "img:1",
            "ipAddress": ip, "ports": [], "env": {}, "healthCheck": None, "volumes": [],
        }]},
        ipaddress.IPv4Network("10.200.1.0/24"),
    )


def info(name: str = "s-1", state: str = "running") -> ContainerInfo:
    labels = {"techulus.deployment.id": "dep-1", "techulus.service.id": "svc-1"}
    return ContainerInfo("c" * 64, name, "img:1", state, labels)


def test_the_base_observer_does_nothing_but_runs_work():
    observer = Observer()
    observer.poll(None)
    observer.change(Change(ChangeKind.DEPLOY, "missing"), "applied")
    assert observer.work("w1", "restart", lambda: 42) == 42


def test_a_pass_is_recorded_with_what_it_applied_and_what_failed(tmp_path):
    clock = Clock()
    pub = publisher(tmp_path, clock)
    state = expected()
    deploy = Change(ChangeKind.DEPLOY, "missing", expected=state.containers[0])
    pub.poll(None, state)
    pub.state("PROCESSING")
    clock.now += 2.5
    pub.change(deploy, "applied")
    pub.change(Change(ChangeKind.UPDATE_DNS, "drift"), "failed", RuntimeError("dnsmasq said no\nsecond line"))
    pub.state("IDLE")
    shown = pub.snapshot()
    assert shown["loop"] == {"state": "IDLE", "since": clock.now}
    assert shown["lastPass"]["seconds"] == 2.5
    assert len(shown["lastPass"]["applied"]) == 1 and "dep-1" in shown["lastPass"]["applied"][0]
    assert shown["lastPass"]["failed"][0].endswith(": dnsmasq said no")
    counts, sums, _ = pub.metrics()
    assert counts["changes"] == {("deploy", "applied"): 1, ("update-dns", "failed"): 1}
    assert sums["pass_seconds"] == {(): [1, 2.5]}


def test_failed_polls_are_counted_by_kind_and_the_last_good_one_is_kept(tmp_path):
    clock = Clock()
    pub = publisher(tmp_path, clock)
    pub.poll(None)
    clock.now += 10
    pub.poll(TimeoutError("control plane did not answer"))
    poll = pub.snapshot()["poll"]
    assert poll == {"ok": False, "at": 1010.0, "error": "control plane did not answer", "lastOk": 1000.0}
    counts, _, _ = pub.metrics()
    assert counts["polls"] == {("ok",): 1, ("failed",): 1}
    assert counts["poll_failures"] == {("TimeoutError",): 1}
    assert pub.last_ok_poll == 1000.0


def test_containers_carry_the_ip_of_their_deployment_and_their_health(tmp_path):
    pub = publisher(tmp_path)
    pub.poll(None, expected("10.200.1.9"))
    pub.containers([info(), info("s-0", "exited")], {"c" * 64: "healthy"})
    shown = pub.snapshot()["containers"]
    assert [c["name"] for c in shown] == ["s-0", "s-1"]
    assert shown[1] == {
        "name": "s-1", "id": "c" * 12, "deployment": "dep-1", "service": "svc-1", "image": "img:1",
        "ip": "10.200.1.9", "state": "running", "health": "healthy",
    }
    assert shown[0]["health"] == "-"


def test_held_changes_and_config_sync_come_from_the_plan_and_backoff(tmp_path):
    pub = publisher(tmp_path)
    held = Change(ChangeKind.REMOVE_ORPHAN, "not expected", container=info())
    pub.plan([Change(ChangeKind.UPDATE_CADDY, "drift")], [held], ["dns", "caddy"])
    pub.change(Change(ChangeKind.START, "exited", container=info()), "backoff")
    shown = pub.snapshot()
    assert shown["sync"] == {"dns": True, "caddy": False}
    assert "second poll" in shown["held"][0] and "backoff" in shown["held"][1]
    pub.plan([], [], ["dns", "caddy"])
    assert pub.snapshot()["sync"] == {"dns": True, "caddy": True} and pub.snapshot()["held"] == []


def test_a_work_item_is_in_flight_while_it_runs_and_counted_after(tmp_path):
    pub = publisher(tmp_path)
    seen = []
    assert pub.work("w-1", "restart", lambda: seen.append(pub.snapshot()["work"]) or "done") == "done"
    assert seen == [[{"id": "w-1", "type": "restart"}]]
    with pytest.raises(RuntimeError):
        pub.work("w-2", "stop", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert pub.snapshot()["work"] == []
    pub.work_done("restart", "completed")
    assert pub.metrics()[0]["work_items"] == {("restart", "completed"): 1}


def test_a_build_is_shown_while_it_runs_and_timed_when_it_finishes(tmp_path):
    clock = Clock()
    pub = publisher(tmp_path, clock)
    pub.build("b-1", "claiming")
    pub.build("b-1", "running")
    assert pub.snapshot()["build"] == {"id": "b-1", "phase": "running", "since": 1000.0}
    clock.now += 40
    pub.build("b-1", "finished", "completed")
    assert pub.snapshot()["build"] is None
    assert pub.metrics()[1]["builds"] == {("completed",): [1, 40.0]}
    pub.build("b-2", "claiming")
    pub.build(None)
    assert pub.snapshot()["build"] is None


def test_reports_and_log_shipping_counts(tmp_path):
    pub = publisher(tmp_path)
    pub.report(None)
    pub.report(RuntimeError("503"))
    assert pub.snapshot()["report"]["error"] == "503"
    assert pub.metrics()[0]["reports"] == {("sent",): 1, ("failed",): 1}

    class Sender:
        def __init__(self, pending, delivered, dropped):
            self.stats = type("Stats", (), {"delivered": delivered, "dropped": dropped})()
            self._pending = pending

        def pending(self):
            return self._pending

    shipper = type("Shipper", (), {"container_sender": Sender(5, 100, 2), "caddy_sender": Sender(1, 10, 0)})()
    pub.watch_logs(shipper)
    assert pub.snapshot()["logs"] == {"queued": 6, "shipped": 110, "dropped": 2}


def test_publish_replaces_the_file_and_run_removes_it_when_stopping(tmp_path):
    pub = Publisher(tmp_path / "run" / "status.json", {"mode": "test"})
    stop = threading.Event()
    thread = threading.Thread(target=pub.run, args=(stop,))
    thread.start()
    try:
        for _ in range(100):
            if pub.path.exists():
                break
            stop.wait(0.05)
        first = json.loads(pub.path.read_text())
        assert first["mode"] == "test" and first["loop"]["state"] == "IDLE"
        assert pub.path.stat().st_mode & 0o777 == 0o600  # errors may name hosts and commands: root's only
        pub.state("PROCESSING")
        for _ in range(100):
            if json.loads(pub.path.read_text())["loop"]["state"] == "PROCESSING":
                break
            stop.wait(0.05)
        assert json.loads(pub.path.read_text())["loop"]["state"] == "PROCESSING"
        assert not [p for p in pub.path.parent.iterdir() if p.name != "status.json"]  # no temp file left
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive() and not pub.path.exists()


def test_podman_calls_are_counted_and_timed_by_verb(fp):
    pub = Publisher(__import__("pathlib").Path("/nonexistent/status.json"), {})
    podman = ObservedPodman(PodmanOptions())
    podman.observer = pub
    fp.register(["podman", "ps", fp.any()], stdout="[]")
    fp.register(["podman", "container", "inspect", fp.any()], returncode=125, stderr="no such container", occurrences=1)
    fp.register(["podman", "ps", fp.any()], returncode=125, stderr="boom")
    assert podman.list_containers() == []
    assert podman.inspect("abc") is None
    with pytest.raises(PodmanCommandError):
        podman.list_containers()
    _, sums, _ = pub.metrics()
    assert {key: value[0] for key, value in sums["podman"].items()} == {("ps",): 2, ("container inspect",): 1}
    assert pub.metrics()[0]["podman_failures"] == {("ps",): 1, ("container inspect",): 1}


def test_podman_verbs():
    assert podman_verb(("ps", "--all")) == "ps"
    assert podman_verb(("image", "exists", "x")) == "image exists"
    assert podman_verb(()) == "?"


def test_wireguard_handshakes_are_read_in_the_configured_netns(fp):
    fp.register(["ip", "netns", "exec", "t1", "wg", "show", "wg7", "latest-handshakes"], stdout="KEY1=\t1700000000\nKEY2=\t0\n")
    settings = Settings(wireguard_netns="t1", wireguard_interface="wg7")
    assert read_handshakes(settings) == [
        {"publicKey": "KEY1=", "handshake": 1700000000},
        {"publicKey": "KEY2=", "handshake": 0},
    ]


def test_a_wireguard_read_failure_is_shown_not_raised(tmp_path, fp):
    fp.register(["wg", "show", "wg0", "latest-handshakes"], returncode=1, stderr="Unable to access interface")
    pub = publisher(tmp_path)
    pub.watch_wireguard(Settings())
    pub.publish()
    shown = json.loads(pub.path.read_text())["wireguard"]
    assert shown["peers"] == [] and "Unable to access interface" in shown["error"]


def test_the_reconciler_reports_polls_passes_and_changes(tmp_path):
    from agent.api import Unavailable
    from agent.loop import Reconciler
    from agent.model import ExpectedContainer, ExpectedState
    from tests.fakes import FakePodman, ListSource, RecordingReporter

    podman = FakePodman()
    original = podman.run_container

    def run_container(spec, env, volumes_dir):
        if spec.deployment_id == "bad":
            raise RuntimeError("image is broken")
        return original(spec, env, volumes_dir)

    podman.run_container = run_container
    state = ExpectedState(containers=tuple(
        ExpectedContainer(dep, "svc", "Svc", f"c-{dep}", "localhost/app:v1", "") for dep in ("bad", "good")
    ))
    source = ListSource(state)
    settings = Settings.load({"data_dir": "/nonexistent-test-dir"}, environ={})
    reconciler = Reconciler(settings, podman, source, [], "", RecordingReporter(), threading.Lock())
    pub = publisher(tmp_path)
    reconciler.observer = pub
    reconciler.tick()
    shown = pub.snapshot()
    assert shown["poll"]["ok"] is True and shown["loop"]["state"] == "IDLE"
    assert [entry.split(" (")[0] for entry in shown["lastPass"]["applied"]] == ["deploy c-good"]
    assert shown["lastPass"]["failed"][0].endswith(": image is broken")
    reconciler.tick()  # the failed deploy waits out its backoff
    assert any("backoff" in entry for entry in pub.snapshot()["held"])
    source.items = [Unavailable("control plane down")]
    reconciler.tick()
    assert pub.snapshot()["poll"]["error"] == "control plane down"


def test_the_heartbeat_reports_containers_and_the_sender_reports_outcomes(tmp_path):
    from agent.api import Unavailable
    from agent.heartbeat import Heartbeat
    from agent.runtime import report_sender
    from tests.fakes import FakePodman

    pub = publisher(tmp_path)
    outcomes = [None, Unavailable("control plane down")]
    sent = []

    class Client:
        def report_status(self, report, retries):
            error = outcomes.pop(0)
            if error is not None:
                raise error
            sent.append((report, retries))

    podman = FakePodman()
    podman.add("d1")
    heartbeat = Heartbeat(report_sender(Client(), pub), podman, interval=10)
    heartbeat.observer = pub
    heartbeat.send_once()
    assert len(sent) == 1 and sent[0][1] == 0
    assert pub.snapshot()["report"]["ok"] is True
    assert [c["deployment"] for c in pub.snapshot()["containers"]] == ["d1"]
    heartbeat.send_once()
    assert pub.snapshot()["report"] == {"ok": False, "at": 1000.0, "error": "control plane down"}
    assert pub.metrics()[0]["reports"] == {("sent",): 1, ("failed",): 1}


def test_the_work_queue_shows_an_item_in_flight_and_counts_its_result(tmp_path, caplog):
    from tests.test_workqueue import DEP, Harness, item, ours

    h = Harness(tmp_path)
    pub = publisher(tmp_path)
    h.queue.observer = pub
    h.podman.add("c1", ours(), running=False)
    during = []
    restart = h.podman.restart
    h.podman.restart = lambda ref: (during.append(pub.snapshot()["work"]), restart(ref))  # type: ignore[method-assign]
    h.client.items = [item("w1", "restart", {"deploymentId": DEP, "containerId": "c1"})]
    with caplog.at_level(logging.INFO):
        h.queue.poll_once()
    assert during == [[{"id": "w1", "type": "restart"}]]
    assert pub.snapshot()["work"] == []
    assert pub.metrics()[0]["work_items"] == {("restart", "completed"): 1}
    assert [r.work_item for r in caplog.records if r.getMessage().endswith("completed")] == ["w1"]


def test_a_build_claimed_elsewhere_leaves_no_build_shown(tmp_path):
    from agent.builds import BuildWorker

    class Client:
        def pending_build(self):
            return {"id": "b-1"}

        def claim_build(self, build_id):
            seen.append(pub.snapshot()["build"])
            return None  # another server got it

    seen: list = []
    pub = publisher(tmp_path)
    worker = BuildWorker(Settings(data_dir=tmp_path / "data"), Client(), "")
    worker.observer = pub
    assert worker.poll_once() is False
    assert seen == [{"id": "b-1", "phase": "claiming", "since": 1000.0}]
    assert pub.snapshot()["build"] is None
