"""Container health checks where podman cannot schedule them: without systemd as PID 1.

Podman 4 runs `--health-cmd` from transient systemd timers. On a host without systemd
(containers, some VMs, the test machine) no timer exists, health stays `starting` forever
and no rollout with a health check ever finishes (issue 9). The setting `health_runner`
picks the mechanism: `podman` (its timers), `agent` (this module runs
`podman healthcheck run <id>` for every running container of ours that has a health check)
or `auto` (`agent` when `/run/systemd/system` is absent, the sd_booted() test).

Podman keeps the health state itself whenever `healthcheck run` is invoked: a failure within
the start period does not count, `retries` failures in a row make it `unhealthy`, a success
makes it `healthy`. So this module only decides *when* to check:

* every `interval` (as recorded in the container's config);
* while a container is new (within its start period) and has not passed yet, every
  `health_start_interval` (1 s): a failure there costs nothing and the first success makes it
  healthy at once, so a rollout does not wait a whole interval for its first check (what
  Docker calls --health-start-interval). With `podman` as the mechanism, only these early
  checks are run here (0 turns them off); the timers do the rest.

"New" is measured from when the runner first sees the container (the podman start time would
need parsing for no gain: a restarted agent only probes a little early). A check whose outcome
differs from the previous one triggers a status report (`on_change`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.host.podman import Podman
from agent.settings import Settings

log = logging.getLogger(__name__)

SYSTEMD_DIR = Path("/run/systemd/system")
PODMAN, AGENT = "podman", "agent"
#: Podman's defaults when the config leaves a duration out.
DEFAULT_INTERVAL = 30.0
DEFAULT_TIMEOUT = 30.0
#: How often the container list is re-read when nothing asks for it sooner (`wake`).
LIST_INTERVAL = 5.0
NANOSECONDS = 1e9


def mechanism(setting: str, systemd_dir: Path = SYSTEMD_DIR) -> str:
    """`podman` or `agent`: who runs health checks on this host."""
    if setting in (PODMAN, AGENT):
        return setting
    return PODMAN if systemd_dir.is_dir() else AGENT


def describe(setting: str, systemd_dir: Path = SYSTEMD_DIR) -> str:
    """One line for `agent doctor`."""
    if mechanism(setting, systemd_dir) == AGENT:
        why = "set by health_runner" if setting == AGENT else "systemd is not PID 1, so podman's timers cannot"
        return f"the agent runs `podman healthcheck run` on each container's interval ({why})"
    why = "set by health_runner" if setting == PODMAN else "systemd is PID 1"
    return f"podman's systemd timers ({why})"


@dataclass
class Tracked:
    """One running container with a health check, and when to check it next."""

    interval: float
    timeout: float
    start_period: float
    first_seen: float
    due: float
    passed: bool | None = None


def health_config(info: dict[str, Any]) -> tuple[float, float, float] | None:
    """(interval, timeout, start period) in seconds from `podman inspect`, or None when the
    container has no health check."""
    config = (info.get("Config") or {}).get("Healthcheck") or {}
    test = config.get("Test") if isinstance(config, dict) else None
    if not isinstance(test, list) or not test or test[0] == "NONE":
        return None

    def seconds(key: str, default: float) -> float:
        value = config.get(key)
        return value / NANOSECONDS if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default

    return seconds("Interval", DEFAULT_INTERVAL), seconds("Timeout", DEFAULT_TIMEOUT), seconds("StartPeriod", 0.0)


class HealthRunner:
    def __init__(
        self,
        podman: Podman,
        start_interval: float,
        on_interval: bool = True,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.podman = podman
        self.start_interval = start_interval
        # False when podman's timers run the regular checks: only the early ones are ours.
        self.on_interval = on_interval
        self.on_change = on_change
        self.clock = clock
        self.tracked: dict[str, Tracked | None] = {}
        self._next_list = 0.0
        self._wake = threading.Event()
        self._failing: set[str] = set()
        self._list_failing = False

    def wake(self) -> None:
        """Re-read the container list soon (something changed containers)."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            wait = self.run_once()
            if self._wake.wait(min(max(wait, 0.05), 0.5)):
                self._wake.clear()
                self._next_list = 0.0

    def run_once(self) -> float:
        """List if due, run the checks that are due; seconds until something is due next."""
        now = self.clock()
        if now >= self._next_list:
            self._next_list = now + LIST_INTERVAL
            try:
                self._refresh(now)
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                if not self._list_failing:
                    log.warning("health checks: cannot list containers (%s); retrying every %.0fs", exc, LIST_INTERVAL)
                self._list_failing = True
            else:
                self._list_failing = False
        for container_id, tracked in list(self.tracked.items()):
            if tracked is not None and self.clock() >= tracked.due:
                self._check(container_id, tracked)
        dues = [t.due for t in self.tracked.values() if t is not None]
        return min([self._next_list, *dues]) - self.clock()

    def _refresh(self, now: float) -> None:
        # The agent's shared listing (the reconciler's `ps`, kept current with its own changes) will do.
        running = {c.id for c in self.podman.list_containers(max_age=3 * LIST_INTERVAL) if c.running}
        for gone in [cid for cid in self.tracked if cid not in running]:
            del self.tracked[gone]
            self._failing.discard(gone)
        for container_id in running - set(self.tracked):
            info = self.podman.config_of(container_id)  # the inspect of its start, when the agent started it
            config = health_config(info) if info else None
            if config is None:
                self.tracked[container_id] = None  # no health check: never inspected again
                continue
            interval, timeout, start_period = config
            tracked = Tracked(interval, timeout, start_period, now, now)
            tracked.due = now + (self._early_wait(tracked, now) or interval)
            self.tracked[container_id] = tracked

    def _early_wait(self, tracked: Tracked, now: float) -> float:
        """The wait before the next early check, 0 when the container is past that phase."""
        if self.start_interval <= 0 or tracked.passed or now - tracked.first_seen >= tracked.start_period:
            return 0.0
        return self.start_interval

    def _check(self, container_id: str, tracked: Tracked) -> None:
        try:
            passed = self.podman.healthcheck_run(container_id, timeout=tracked.timeout + 10)
        except Exception as exc:  # noqa: BLE001 - logged once per container, retried on its interval
            if container_id not in self._failing:
                self._failing.add(container_id)
                log.warning("health check of %s could not run: %s", container_id[:12], exc)
            passed = None
        else:
            self._failing.discard(container_id)
        now = self.clock()
        if passed is not None and passed != tracked.passed:
            tracked.passed = passed
            if self.on_change is not None:
                self.on_change()
        early = self._early_wait(tracked, now)
        if early:
            tracked.due = now + early
        elif self.on_interval:
            tracked.due = now + tracked.interval
        else:
            self.tracked[container_id] = None  # podman's timers take it from here


def runner_task(settings: Settings, podman: Podman, on_change: Callable[[], None]) -> HealthRunner | None:
    """The runner this host needs (None when podman's timers do everything)."""
    agent = mechanism(settings.health_runner) == AGENT
    if not agent and settings.health_start_interval <= 0:
        return None
    log.info("health checks: %s", describe(settings.health_runner))
    return HealthRunner(podman, settings.health_start_interval, on_interval=agent, on_change=on_change)
