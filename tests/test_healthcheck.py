"""The health runner's schedule (healthcheck.py): early checks while a container is new,
then its interval; podman records the outcome, the runner only decides when and reports
changes. And which mechanism a host gets."""

from agent import healthcheck
from agent.healthcheck import HealthRunner
from tests.fakes import FakePodman

SECOND = 1_000_000_000


class CheckingPodman(FakePodman):
    def __init__(self) -> None:
        super().__init__()
        self.configs: dict[str, dict] = {}
        self.outcomes: dict[str, bool] = {}
        self.checked: list[str] = []

    def inspect(self, ref):
        self.calls.append(("inspect", ref))
        return {"Id": ref, "Config": {"Healthcheck": self.configs.get(ref)}} if ref in self.containers else None

    def healthcheck_run(self, ref, timeout=None):
        self.checked.append(ref)
        return self.outcomes.get(ref, False)


class Clock:
    now = 100.0

    def __call__(self):
        return self.now


def setup(start_interval=1.0, on_interval=True):
    podman = CheckingPodman()
    clock = Clock()
    changes = []
    runner = HealthRunner(podman, start_interval, on_interval, on_change=lambda: changes.append(clock.now), clock=clock)
    return runner, podman, clock, changes


def with_check(podman, dep, interval=10, start_period=30):
    container = podman.add(dep)
    podman.configs[container.id] = {
        "Test": ["CMD-SHELL", "true"], "Interval": interval * SECOND, "Timeout": 5 * SECOND, "StartPeriod": start_period * SECOND,
    }
    return container.id


def advance(runner, clock, seconds, step=0.5):
    end = clock.now + seconds
    while clock.now < end:
        clock.now += step
        runner.run_once()


def test_early_checks_until_it_passes_then_the_interval():
    runner, podman, clock, changes = setup()
    cid = with_check(podman, "d1")
    runner.run_once()
    advance(runner, clock, 3)
    assert len(podman.checked) == 3, "a new container is checked every second while it has not passed"
    podman.outcomes[cid] = True
    advance(runner, clock, 1)
    assert len(podman.checked) == 4
    assert len(changes) == 2, "the first outcome and the change to passing each trigger a report"
    advance(runner, clock, 9)
    assert len(podman.checked) == 4, "once passed, the next check waits for the interval"
    advance(runner, clock, 1.5)
    assert len(podman.checked) == 5
    assert len(changes) == 2, "the same outcome again is no change"


def test_after_the_start_period_only_the_interval():
    runner, podman, clock, _ = setup()
    with_check(podman, "d1", interval=10, start_period=2)
    runner.run_once()
    advance(runner, clock, 2)
    early = len(podman.checked)
    advance(runner, clock, 9)
    assert len(podman.checked) == early, "failing after the start period: checked on the interval only"
    advance(runner, clock, 1.5)
    assert len(podman.checked) == early + 1


def test_containers_without_a_check_are_inspected_once_and_never_checked():
    runner, podman, clock, _ = setup()
    plain = podman.add("plain")
    runner.run_once()
    advance(runner, clock, 20)
    assert podman.checked == []
    assert [c for c in podman.calls if c[0] == "inspect"] == [("inspect", plain.id)]


def test_with_podman_timers_only_the_early_checks_are_ours():
    runner, podman, clock, _ = setup(on_interval=False)
    cid = with_check(podman, "d1")
    podman.outcomes[cid] = True
    runner.run_once()
    advance(runner, clock, 60)
    assert podman.checked == [cid]


def test_a_check_that_cannot_run_is_logged_once(caplog):
    runner, podman, clock, _ = setup()
    cid = with_check(podman, "d1", interval=1)

    def broken(ref, timeout=None):
        raise RuntimeError("no such container")

    podman.healthcheck_run = broken
    runner.run_once()
    advance(runner, clock, 5)
    assert caplog.text.count("could not run") == 1 and cid[:12] in caplog.text


def test_mechanism(tmp_path):
    assert healthcheck.mechanism("auto", tmp_path / "absent") == "agent"
    assert healthcheck.mechanism("auto", tmp_path) == "podman"
    assert healthcheck.mechanism("podman", tmp_path / "absent") == "podman"
    assert healthcheck.mechanism("agent", tmp_path) == "agent"
    assert "systemd is not PID 1" in healthcheck.describe("auto", tmp_path / "absent")


def test_podman_healthcheck_run_maps_exit_codes(fp):
    import pytest

    from agent.host.podman import Podman, PodmanError, PodmanOptions

    pm = Podman(PodmanOptions())
    fp.register(["podman", "healthcheck", "run", "c1"], returncode=0)
    fp.register(["podman", "healthcheck", "run", "c2"], returncode=1, stdout="unhealthy\n")
    fp.register(["podman", "healthcheck", "run", "c3"], returncode=125, stderr="Error: container c3 has no defined healthcheck\n")
    assert pm.healthcheck_run("c1") is True
    assert pm.healthcheck_run("c2") is False
    with pytest.raises(PodmanError, match="has no defined healthcheck"):
        pm.healthcheck_run("c3")


def test_a_listing_failure_is_logged_once_per_streak(caplog):
    runner, podman, clock, _ = setup()
    podman.fail["list"] = RuntimeError("podman hung")
    for _ in range(3):
        runner.run_once()
        clock.now += healthcheck.LIST_INTERVAL
    assert caplog.text.count("cannot list containers") == 1
    del podman.fail["list"]
    with_check(podman, "d1")
    runner.run_once()
    assert len(runner.tracked) == 1
