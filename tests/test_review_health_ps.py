"""Review of issue 11 (status health from `podman ps` instead of an inspect per tick): cases
where a report could now be wrong. Tests that reproduced a defect the review found (marked
"defect" in their section; all fixed since) and tests guarding cases that were checked and held.

Unit tests use tests/fakes.py; the `real` ones run real Podman 4.3 (tests/testbed.py)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from agent.drift import LABEL_DEPLOYMENT_ID, LABEL_SERVICE_ID
from agent.heartbeat import Heartbeat
from agent.host.podman import HealthReading, Podman, PodmanOptions
from agent.model import ExpectedContainer
from tests.fakes import FakePodman
from tests.testbed import *  # noqa: F403
from tests.testbed import BB_IMAGE, TestNetwork, cleanup_scope, podman


class ReviewPodman(FakePodman):
    """FakePodman (ps like podman 4.3) with knobs: a start time per container that tests move
    by hand, inspect readings forced once, and every health read recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.started: dict[str, int] = {}
        self.forced: dict[str, HealthReading] = {}
        self.health_reads: list[list[str]] = []
        self.ps_restarts = False  # a podman (5) whose ps carries "Restarts"
        self.ps_started_at = True  # False: a ps without "StartedAt"

    def list_containers(self, max_age: float = 0.0):
        listed = super().list_containers(max_age)
        return [
            replace(
                c,
                started_at=self.started.get(c.id, c.started_at) if self.ps_started_at else 0,
                restarts=self.restart_counts.get(c.id, 0) if self.ps_restarts else -1,
            )
            for c in listed
        ]

    def read_health(self, ids):
        self.health_reads.append(list(ids))
        found = super().read_health(ids)
        for cid in ids:
            if cid in self.forced:
                found[cid] = self.forced.pop(cid)
        return found


def beat(
    podman: FakePodman | Podman, clock: list[float] | None = None, interval: float = 10.0
) -> tuple[Heartbeat, list[dict]]:
    """A heartbeat on `podman`; on a test clock (`clock[0]`), else on the real one."""
    reports: list[dict] = []
    ticks = (lambda: clock[0]) if clock is not None else time.monotonic
    return Heartbeat(reports.append, podman, interval=interval, clock=ticks), reports


def health_of(reports: list[dict]) -> dict[str, str]:
    return {c["deploymentId"]: c["healthStatus"] for c in reports[-1]["containers"]}


# --- defects (unit) -------------------------------------------------------------------------


def test_a_newer_listing_that_says_unhealthy_beats_the_last_reports_healthy():
    pm = ReviewPodman()
    checked = pm.add("d1")
    pm.health_status[checked.id] = "healthy"
    clock = [0.0]
    heartbeat, reports = beat(pm, clock)
    heartbeat.send_once()  # fresh listing, first sight: inspected, healthy
    assert health_of(reports) == {"d1": "healthy"}
    # The check fails. Idle, every report is the one the reconciler's tick asks for (a beat
    # of our own waits BEAT_SLACK for it): it reuses the tick's ps ("(unhealthy)"), taken
    # 0.4 s before (the pass after the ps, the coalescing gap).
    pm.health_status[checked.id] = "unhealthy"
    pm.listing_age_value = 0.4
    for tick in range(1, 4):
        clock[0] = 10.0 * tick
        heartbeat.send_once(triggered=True)
    # Before issue 11 a full inspect at least every interval said unhealthy; now not while
    # every report reuses a listing older than the coalescing gap.
    assert health_of(reports) == {"d1": "unhealthy"}


@pytest.mark.parametrize("ps_restarts", [False, True], ids=["same-second-start", "ps-with-restarts"])
def test_a_restart_puts_a_healthy_container_back_to_starting(ps_restarts: bool):
    pm = ReviewPodman()
    pm.ps_restarts = ps_restarts
    checked = pm.add("d1")
    pm.started[checked.id] = 1_000_000
    pm.health_status[checked.id] = "healthy"
    clock = [0.0]
    heartbeat, reports = beat(pm, clock)
    heartbeat.send_once()
    assert health_of(reports) == {"d1": "healthy"}
    # Restarted (by hand, or once by --restart=always): podman puts its health back to starting.
    pm.health_status[checked.id] = "starting"
    pm.restart_counts[checked.id] = 1 if ps_restarts else 0  # a `podman restart` counts nothing
    if ps_restarts:
        pm.started[checked.id] = 1_000_003
    pm.listing_age_value = 0.5
    for tick in range(1, 4):
        clock[0] = 10.0 * tick
        heartbeat.send_once(triggered=True)
    assert health_of(reports) == {"d1": "starting"}  # before issue 11: read each interval


def test_a_none_read_mid_restart_does_not_stick_to_a_checked_container():
    pm = ReviewPodman()
    checked = pm.add("d1")
    pm.started[checked.id] = 1_000_000
    pm.health_status[checked.id] = "starting"
    # The first-sight inspect lands while podman restarts it: state not running -> "none".
    pm.forced[checked.id] = HealthReading("none", 1, True)
    clock = [0.0]
    heartbeat, reports = beat(pm, clock)
    heartbeat.send_once()
    assert health_of(reports) == {"d1": "starting"}, "a checked container is never 'none'"
    # Running again in the same whole second: every later listing says "(starting)".
    pm.listing_age_value = 0.5
    for tick in range(1, 4):
        clock[0] = 10.0 * tick
        heartbeat.send_once(triggered=True)
    assert health_of(reports) == {"d1": "starting"}  # before issue 11: the next full inspect said so


def test_a_crash_loop_is_caught_when_ps_has_no_start_time():
    pm = ReviewPodman()
    pm.ps_started_at = False
    looping = pm.add("d1")
    clock = [0.0]
    heartbeat, reports = beat(pm, clock)
    heartbeat.send_once()
    for tick in range(1, 4):
        pm.restart_counts[looping.id] = 2 * tick
        clock[0] = 10.0 * tick
        heartbeat.send_once()
    assert health_of(reports) == {"d1": "unhealthy"}


def test_restarts_between_the_agents_run_and_the_first_ps_are_counted():
    pm = ReviewPodman()
    new = pm.add("d1")
    pm.started[new.id] = 0  # Listing.add after run_container: no StartedAt yet
    clock = [0.0]
    heartbeat, reports = beat(pm, clock)
    heartbeat.send_once(triggered=True)  # first sight from the added entry: baseline 0 restarts
    pm.restart_counts[new.id] = 2  # crashed twice at once (podman 4: no backoff), then stays up
    pm.started[new.id] = 1_000_002
    clock[0] = 10.0
    heartbeat.send_once()
    assert health_of(reports) == {"d1": "unhealthy"}  # before issue 11: the per-tick inspect saw 2


def test_an_old_listing_is_not_taken_for_current_when_another_thread_just_listed():
    pm = ReviewPodman()
    checked = pm.add("d1")
    pm.health_status[checked.id] = "starting"
    clock = [100.0]
    heartbeat, reports = beat(pm, clock)
    heartbeat.send_once()
    old = pm.list_containers()  # the shared listing, 5 s old when the next report takes it
    pm.listing_age_value = 5.0
    clock[0] += 1
    pm.health_status[checked.id] = "healthy"

    def cached_then_relisted(max_age: float = 0.0):
        # The heartbeat gets the cached listing; right after, the reconciler's tick lists
        # afresh, so the age the heartbeat asks for next is that of the new listing.
        pm.listing_age_value = 0.0
        return old

    pm.list_containers = cached_then_relisted  # type: ignore[method-assign]
    heartbeat.send_once(triggered=True)
    assert health_of(reports) == {"d1": "healthy"}  # before issue 11: starting is inspected


# --- cases that hold (unit) -----------------------------------------------------------------


def test_a_current_listing_reports_a_health_change_without_an_inspect():
    pm = ReviewPodman()
    checked = pm.add("d1")
    pm.health_status[checked.id] = "healthy"
    heartbeat, reports = beat(pm)
    heartbeat.send_once()
    pm.health_status[checked.id] = "unhealthy"
    heartbeat.send_once()  # a beat of its own: a fresh ps
    assert health_of(reports) == {"d1": "unhealthy"}
    assert len(pm.health_reads) == 1


def test_an_unsettled_container_is_inspected_when_the_listing_is_old():
    pm = ReviewPodman()
    checked = pm.add("d1")
    pm.health_status[checked.id] = "starting"
    clock = [100.0]
    heartbeat, reports = beat(pm, clock)
    heartbeat.send_once()
    clock[0] += 1  # the last inspect is older than the coalescing gap, the listing older still
    pm.listing_age_value = 5.0
    pm.health_status[checked.id] = "unhealthy"  # the listing (FakePodman: as of now) would say so too
    heartbeat.send_once(triggered=True)
    assert len(pm.health_reads) == 2 and pm.health_reads[-1] == [checked.id]
    assert health_of(reports) == {"d1": "unhealthy"}


def test_a_failing_inspect_reports_the_last_known_and_rereads_next_time():
    pm = ReviewPodman()
    known = pm.add("d1")
    pm.health_status[known.id] = "healthy"
    heartbeat, reports = beat(pm)
    heartbeat.send_once()
    new = pm.add("d2")
    pm.health_status[new.id] = "starting"
    original = pm.read_health

    def failing(ids):
        pm.health_reads.append(list(ids))
        raise RuntimeError("podman inspect timed out")

    pm.read_health = failing  # type: ignore[method-assign]
    heartbeat.send_once()
    assert health_of(reports) == {"d1": "healthy", "d2": "starting"}, "never 'none' for an unread container"
    pm.read_health = original  # type: ignore[method-assign]
    pm.health_status[new.id] = "unhealthy"
    pm.listing_age_value = 5.0
    heartbeat.send_once(triggered=True)
    assert new.id in pm.health_reads[-1], "the failed first sight is read again"
    assert health_of(reports) == {"d1": "healthy", "d2": "unhealthy"}


def test_a_container_replaced_under_the_same_name_gets_a_fresh_baseline():
    pm = ReviewPodman()
    old = pm.add("d1")
    pm.restart_counts[old.id] = 1
    clock = [0.0]
    heartbeat, reports = beat(pm, clock)
    heartbeat.send_once()
    del pm.containers[old.id]
    new = pm.add("d1")  # same name, new id, podman counted restarts of its own before we looked
    pm.restart_counts[new.id] = 7
    clock[0] = 10
    heartbeat.send_once()
    assert pm.health_reads[-1] == [new.id]
    assert health_of(reports) == {"d1": "none"}, "another container's count is no crash loop"


def test_an_id_that_comes_back_after_it_was_gone_is_read_afresh():
    pm = ReviewPodman()
    box = pm.add("d1")
    pm.restart_counts[box.id] = 1
    clock = [0.0]
    heartbeat, reports = beat(pm, clock)
    heartbeat.send_once()
    gone = pm.containers.pop(box.id)
    heartbeat.send_once()
    pm.containers[box.id] = gone
    pm.restart_counts[box.id] = 9  # e.g. a restored checkpoint
    clock[0] = 10
    heartbeat.send_once()
    assert pm.health_reads[-1] == [box.id]
    assert health_of(reports) == {"d1": "none"}


def test_a_start_time_that_goes_backwards_still_counts_as_a_restart():
    pm = ReviewPodman()
    looping = pm.add("d1")
    pm.started[looping.id] = 1_000_000
    clock = [0.0]
    heartbeat, reports = beat(pm, clock)
    heartbeat.send_once()
    for tick, started in enumerate((999_990, 999_980), start=1):  # the wall clock stepped back
        pm.started[looping.id] = started
        pm.restart_counts[looping.id] = tick
        clock[0] = 10.0 * tick
        heartbeat.send_once()
    assert health_of(reports) == {"d1": "unhealthy"}


def test_a_crash_loop_seen_only_at_every_other_look_is_still_counted():
    pm = ReviewPodman()
    looping = pm.add("d1")
    pm.started[looping.id] = 1_000_000
    clock = [0.0]
    heartbeat, reports = beat(pm, clock)
    heartbeat.send_once()
    # Whole-second StartedAt: two restarts fall in the second of the last look, then it moves.
    pm.restart_counts[looping.id] = 2
    clock[0] = 1
    heartbeat.send_once()
    assert len(pm.health_reads) == 1 and health_of(reports) == {"d1": "none"}, "not seen yet"
    clock[0] = 2
    pm.started[looping.id] = 1_000_010
    pm.restart_counts[looping.id] = 3
    heartbeat.send_once()
    assert health_of(reports) == {"d1": "unhealthy"}


def test_state_of_containers_that_come_and_go_is_forgotten():
    pm = ReviewPodman()
    heartbeat, _reports = beat(pm)
    for index in range(200):
        box = pm.add(f"d{index}")
        pm.health_status[box.id] = "starting"
        pm.restart_counts[box.id] = index % 3
        heartbeat.send_once()
        pm.containers[box.id] = replace(pm.containers[box.id], state="exited")
        heartbeat.send_once()
        del pm.containers[box.id]
    heartbeat.send_once()
    tables = (heartbeat._seen, heartbeat._restarts, heartbeat._restart_times, heartbeat._last_health)
    assert all(not table for table in tables)


def test_an_exited_container_is_unhealthy_whatever_its_listing_said():
    pm = ReviewPodman()
    box = pm.add("d1")
    pm.health_status[box.id] = "healthy"
    heartbeat, reports = beat(pm)
    heartbeat.send_once()
    pm.containers[box.id] = replace(pm.containers[box.id], state="exited")
    pm.listing_age_value = 5.0
    heartbeat.send_once(triggered=True)
    assert reports[-1]["containers"][0]["status"] == "stopped"
    assert health_of(reports) == {"d1": "unhealthy"}


# --- real Podman ----------------------------------------------------------------------------


def run_box(net: TestNetwork, name: str, *args: str) -> str:
    result = podman(
        "run", "-d", "--name", f"{net.name}-{name}", "--label", net.scope_label,
        "--label", f"{LABEL_SERVICE_ID}=svc", "--label", f"{LABEL_DEPLOYMENT_ID}={name}", *args,
    )
    return result.stdout.strip().splitlines()[-1]


def adapter(net: TestNetwork, tmp_path: Path) -> Podman:
    return Podman(PodmanOptions(network=net.name, scope_label=net.scope_label, run_dir=tmp_path))


CHECK_FILE = ("--health-cmd", "test -e /tmp/ok", "--health-interval", "1h", "--health-retries", "1")


@pytest.mark.real
def test_real_unhealthy_after_healthy_is_reported_from_the_reconcilers_listing(podman_net, tmp_path):  # noqa: F811
    name = f"{podman_net.name}-hc"
    run_box(podman_net, "hc", *CHECK_FILE, BB_IMAGE, "sleep", "600")
    podman("exec", name, "touch", "/tmp/ok")
    podman("healthcheck", "run", name, check=False)
    pm = adapter(podman_net, tmp_path)
    heartbeat, reports = beat(pm, interval=2.0)
    heartbeat.send_once()
    assert health_of(reports) == {"hc": "healthy"}
    podman("exec", name, "rm", "/tmp/ok")
    assert podman("healthcheck", "run", name, check=False).returncode != 0
    assert "(unhealthy)" in podman("ps", "--filter", f"name={name}", "--format", "{{.Status}}").stdout
    time.sleep(2.0)  # an interval later (before issue 11: a full inspect was due)
    pm.list_containers()  # the reconciler's tick lists ...
    time.sleep(0.5)  # ... and its report goes out after the pass (longer than the 0.25 s gap)
    heartbeat.send_once(triggered=True)
    assert health_of(reports) == {"hc": "unhealthy"}


@pytest.mark.real
def test_real_crash_loop_of_a_checked_container_is_unhealthy(podman_net, tmp_path):  # noqa: F811
    run_box(podman_net, "loop", "--restart=always", *CHECK_FILE, BB_IMAGE, "sh", "-c", "sleep 1; exit 1")
    pm = adapter(podman_net, tmp_path)
    heartbeat, reports = beat(pm)
    heartbeat.send_once()
    verdict: dict[str, str] = {}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and verdict.get("loop") != "unhealthy":
        time.sleep(0.5)
        pm.list_containers()  # the reconciler's tick; the report it asks for reuses that listing
        heartbeat.send_once(triggered=True)
        verdict = health_of(reports) if reports[-1]["containers"] else {}
    assert verdict.get("loop") == "unhealthy", reports[-1]


@pytest.mark.real
def test_real_restarts_by_hand_are_no_crash_loop_and_read_starting(podman_net, tmp_path):  # noqa: F811
    name = f"{podman_net.name}-hand"
    run_box(podman_net, "hand", "--restart=always", *CHECK_FILE, BB_IMAGE, "sleep", "600")
    podman("exec", name, "touch", "/tmp/ok")
    podman("healthcheck", "run", name, check=False)
    pm = adapter(podman_net, tmp_path)
    heartbeat, reports = beat(pm)
    heartbeat.send_once()
    assert health_of(reports) == {"hand": "healthy"}
    for by_hand in (("restart",), ("restart",), ("stop", "start"), ("stop", "start")):
        time.sleep(1.1)  # a new whole second: the start time moves
        for verb in by_hand:  # as an operator would, or the agent's restart work item
            podman(verb, *(["-t", "0"] if verb != "start" else []), name)
        pm.list_containers()
        time.sleep(0.4)  # an old listing: health comes from the inspect a moved start asks for
        heartbeat.send_once(triggered=True)
        assert health_of(reports) == {"hand": "starting"}, "podman restarts the health check too"
    podman("healthcheck", "run", name, check=False)
    heartbeat.send_once()
    assert health_of(reports) == {"hand": "healthy"}, "four restarts by hand are no crash loop"


@pytest.mark.real
def test_real_replaced_and_exited_containers(podman_net, tmp_path):  # noqa: F811
    name = f"{podman_net.name}-rep"
    first = run_box(podman_net, "rep", "--restart=always", BB_IMAGE, "sh", "-c", "sleep 1; exit 1")
    pm = adapter(podman_net, tmp_path)
    heartbeat, reports = beat(pm)
    heartbeat.send_once()
    time.sleep(2.5)  # it restarted at least once
    podman("rm", "-f", "-t", "0", name)
    second = run_box(podman_net, "rep", BB_IMAGE, "sleep", "600")
    heartbeat.send_once()
    assert [c["containerId"] for c in reports[-1]["containers"]] == [second]
    assert health_of(reports) == {"rep": "none"}
    assert first not in heartbeat._seen and first not in heartbeat._restarts
    podman("stop", "-t", "0", name)
    heartbeat.send_once()
    assert reports[-1]["containers"][0]["status"] == "stopped"
    assert health_of(reports) == {"rep": "unhealthy"}
    podman("rm", "-f", "-t", "0", name)
    heartbeat.send_once()
    assert reports[-1]["containers"] == [] and not heartbeat._seen and not heartbeat._restarts


@pytest.mark.real
def test_real_inspect_of_a_vanished_container_keeps_the_others(podman_net, tmp_path):  # noqa: F811
    kept = run_box(podman_net, "kept", *CHECK_FILE, BB_IMAGE, "sleep", "600")
    pm = adapter(podman_net, tmp_path)
    found = pm.read_health([kept, "0" * 64])
    assert found[kept] == HealthReading("starting", 0, True)
    assert found["0" * 64].status == "none"


FLAKY_START = 'c=$(cat /tmp/c 2>/dev/null || echo 0); echo $((c+1)) > /tmp/c; [ "$c" -ge 2 ] && exec sleep 600; sleep 2; exit 1'


@pytest.mark.real
def test_real_two_crashes_right_after_the_agents_run_are_counted(podman_net, tmp_path):  # noqa: F811
    image = f"localhost/techulus-review11-{podman_net.name}:flaky"
    podman("create", "--name", f"{podman_net.name}-base", "--label", podman_net.scope_label, BB_IMAGE)
    podman("commit", "--change", "CMD " + json.dumps(["sh", "-c", FLAKY_START]), f"{podman_net.name}-base", image)
    try:
        pm = Podman(PodmanOptions(
            network=podman_net.name, scope_label=podman_net.scope_label, run_dir=tmp_path / "run",
            stop_timeout=1, timeout=30.0, verify_timeout=10.0,
        ))
        dep = f"flaky-{podman_net.scope_label[-8:]}"
        spec = ExpectedContainer(dep, "svc-flaky", "Flaky", f"{podman_net.name}-flaky", image, podman_net.ip(2))
        heartbeat, reports = beat(pm)
        pm.list_containers()  # the reconciler's tick before it ran the container
        cid = pm.run_container(spec, {}, tmp_path / "volumes")  # wait_running passes: it crashes at 2 s
        heartbeat.send_once(triggered=True)  # the report the step asks for: the shared listing
        assert heartbeat._restarts.get(cid) == 0, "first sight read the baseline before any crash"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            state = podman("container", "inspect", "--format", "{{.RestartCount}} {{.State.Status}}", cid).stdout.split()
            if state == ["2", "running"]:
                break
            time.sleep(0.2)
        assert state == ["2", "running"], state
        heartbeat.send_once()  # the next beat: a fresh ps, its StartedAt the third start
        heartbeat.send_once()
        assert health_of(reports) == {dep: "unhealthy"}  # two restarts within the window
    finally:
        cleanup_scope(podman_net.scope_label)
        podman("rmi", "-f", image, check=False)
