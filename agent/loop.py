"""The IDLE/PROCESSING state machine (PROTOCOL.md §8) and the reconcile steps (§9.5).

IDLE polls the expected state every tick. On drift the agent enters PROCESSING and
applies one change at a time, re-reading the actual state before each step (which also
verifies the previous one), back to back rather than one change per tick, for at most
`processing_timeout`. A failing change is skipped for this pass and retried later with
backoff, so one broken deployment does not block the rest. Status reports are sent by the
Heartbeat thread, so a long step never starves them.

Timing model (issue 9: a rollout in seconds, not tens of seconds). The control plane moves a
rollout one stage per status report and tells the agent about it only through the next poll
(ROLLOUT.md), so the latency is the report -> poll -> change -> report ping-pong:

* A report is triggered right after every change that can move a rollout: each applied
  step (container started or removed, DNS or Caddy applied), a drain that begins, and a
  newly fetched document while following a rollout (the control plane may be waiting for a
  report). The heartbeat coalesces triggers: reports are at least `report_coalesce` (0.25 s)
  apart and the triggers in between make one report.
* While following, the heartbeat re-reads containers and health every
  `health_poll_interval` (0.5 s) and reports at once when the report would differ (a
  health change); the health runner (healthcheck.py) also triggers a report when a check's
  outcome changes.
* *Following* a rollout: something moved (a new document, an applied change, a report
  that differed from the previous one, or a `deploy` work item: `wake`) within
  `fast_follow_timeout` (30 s) while a rollout is in progress (drift.rollout_in_progress: a
  drain pending, a service with several deployments listed, a listed deployment without a
  running container or with `starting` health), or within SETTLE_WINDOW (5 s) otherwise:
  once its container is up and healthy a deployment looks settled here while the control
  plane still needs several report/poll rounds (caddy_updating, stopping_old, running),
  each of which changes the document and so extends the window. While following, the
  expected state is polled right after each report that went out and at least every
  `fast_poll_interval` (1 s); otherwise every `tick_interval` (10 s). So a stuck rollout, or
  a service that just has several replicas, costs at most `fast_follow_timeout` of fast
  polling after its last movement.
* Bounds while following: polls <= 1 per report + 1 per `fast_poll_interval`; reports <= 1
  per `report_coalesce` and only on a trigger or a changed report; the heartbeat's extra
  podman reads (one `ps` unless the shared listing is recent, one inspect of the containers
  whose health is not settled) <= 1 per `health_poll_interval` (heartbeat.py). A no-drift
  poll triggers the report with resources at most once per `tick_interval`. Idle, nothing
  changes: one poll per tick and one report per heartbeat interval.

Convergence (issue 11): the images a pass needs are pulled first, up to PULL_PARALLELISM at a
time, and new deployments (a DEPLOY with no container yet: nothing to stop, a name and an IP of
their own) are started up to DEPLOY_PARALLELISM at a time, in chunks that hold `host_lock`
briefly. Each one is still verified by the adapter and followed by its own report trigger as it
completes; every other change runs alone, in plan order.

Drain (no public route to a container that is gone): when the control plane drops a
deployment whose running container's IP is still an upstream of a Caddy route (expected, or
live in Caddy), the container is not removed yet. It leaves the status reports at once (the
control plane then marks it `unknown` and completes the rollout), a report is triggered and
the loop polls after it, the new route is applied, and the container is removed only once no
route names it and `drain_grace` (default `tick_interval`) has passed since, for other
servers' Caddy, which route to it too, to poll and move on; or after `drain_timeout` (60 s;
logged). Without a Caddy adapter there is nothing to drain.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent import crypto
from agent.configsync import ConfigSync
from agent.drift import (
    CONFIG_KINDS, EMPTY_HASH, Change, ChangeKind, ContainerInfo, full_plan, rollout_in_progress, route_naming,
)
from agent.fsutil import atomic_write
from agent.host.podman import Podman, check_env
from agent.logformat import change_fields
from agent.observe import Observer
from agent.model import SECTIONS, ExpectedContainer, ExpectedState, ModelError, canonical_image, parse_expected_state
from agent.problems import FailureStreak, ProblemLog
from agent.settings import Settings

if TYPE_CHECKING:
    from concurrent.futures import Future

log = logging.getLogger(__name__)

IDLE = "IDLE"
PROCESSING = "PROCESSING"

REMOVALS = frozenset({ChangeKind.REMOVE_ORPHAN, ChangeKind.REMOVE_UNEXPECTED})
BACKOFF_BASE = 10.0
BACKOFF_MAX = 300.0
BACKOFF_WINDOW = 600.0
SNAPSHOT_MAX_AGE = 60.0
#: How long the loop keeps following after a movement when nothing looks in progress here.
SETTLE_WINDOW = 5.0
#: From a cached expected state (control plane unreachable at start) only bring workloads back.
RESTORE_KINDS = frozenset({ChangeKind.START, ChangeKind.DEPLOY})
#: New deployments started at once, and images pulled at once (module docstring).
DEPLOY_PARALLELISM = 4
PULL_PARALLELISM = 3
#: New deployments started under one hold of host_lock (work items wait at most this many).
DEPLOY_CHUNK = 2 * DEPLOY_PARALLELISM


class StateSource(Protocol):
    """Where the expected state comes from: the control plane or a local file.

    `follow_image_changes` (drift.py's module docstring): whether a lone deployment whose
    listed image changed is re-created. A control plane never asks for that (it changes
    images through new deployments); a state file is the operator's intent and does. A
    source without the attribute counts as a control plane, the rule that re-images nothing."""

    follow_image_changes: bool

    def fetch(self) -> ExpectedState:
        """The current expected state; raises on any failure (nothing acts on a failed fetch)."""


class Reporter(Protocol):
    def trigger(self, include_resources: bool = False) -> None: ...


class FollowingReporter(Reporter, Protocol):
    """The heartbeat, as the loop couples to it for following rollouts (see `couple`)."""

    exclude: Callable[[], frozenset[str]]
    following: Callable[[], bool]
    on_report: Callable[[bool], None] | None
    coalesce: float
    health_poll: float

    def last_health(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class Drain:
    """A dropped deployment's container kept running while a route still names it."""

    deployment_id: str
    name: str
    since: float
    # When no route here named it any more (None: one still does); it goes `drain_grace` later.
    routes_moved_at: float | None = None


def decrypt_env(container: ExpectedContainer, encryption_key: str) -> dict[str, str]:
    """Plaintext env for `podman run`; raises a message naming the deployment and variable."""
    if container.env and not encryption_key:
        raise crypto.SecretError(
            f"deployment {container.deployment_id} has secrets but this server has no encryption key"
        )
    env = {}
    for key, blob in container.env.items():
        try:
            env[key] = crypto.decrypt_secret(encryption_key, blob)
        except crypto.SecretError as exc:
            raise crypto.SecretError(f"deployment {container.deployment_id}: env {key}: {exc}") from exc
    return env


@dataclass
class Backoff:
    """Per-change retry pacing, so a crash-looping container is not restarted every tick."""

    clock: Callable[[], float] = time.monotonic
    attempts: dict[str, list[float]] = field(default_factory=dict)

    def wait(self, key: str) -> float:
        """Seconds until `key` may be tried again (0 when it may now)."""
        recent = self._recent(key)
        if not recent:
            return 0.0
        delay = min(BACKOFF_BASE * 2 ** (len(recent) - 1), BACKOFF_MAX)
        return max(0.0, delay - (self.clock() - recent[-1]))

    def clear(self, key: str) -> None:
        self.attempts.pop(key, None)

    def _recent(self, key: str) -> list[float]:
        now = self.clock()
        recent = [t for t in self.attempts.get(key, []) if now - t < BACKOFF_WINDOW]
        if recent:
            self.attempts[key] = recent
        else:
            self.attempts.pop(key, None)
        return recent

    def record(self, key: str) -> None:
        self.attempts.setdefault(key, []).append(self.clock())
        self._recent(key)


def change_key(change: Change) -> str:
    if change.expected is not None:
        return f"{change.kind.value}:{change.expected.deployment_id}"
    if change.container is not None:
        return f"{change.kind.value}:{change.container.id}"
    return change.kind.value


class Reconciler:
    observer: Observer = Observer()  # runtime.assemble gives it the Publisher (agent status, metrics)

    def __init__(
        self,
        settings: Settings,
        podman: Podman,
        source: StateSource,
        syncs: Sequence[ConfigSync],
        encryption_key: str,
        reporter: Reporter,
        host_lock: threading.Lock,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.podman = podman
        self.source = source
        self.syncs = {sync.name: sync for sync in syncs}
        self.encryption_key = encryption_key
        self.reporter = reporter
        self.host_lock = host_lock
        self.clock = clock
        self.state = IDLE
        self.backoff = Backoff(clock)
        self._empty_streak: dict[str, int] = {}
        self._deadline: float | None = None
        # Bumped whenever something else (a work item) changed containers: a change planned
        # before that is re-checked under the lock before it is applied.
        self._host_generation = 0
        self._plan_generation = 0
        self._live_empty: dict[str, bool] = {}
        self._pulled: set[str] = set()
        self.last_plan: list[Change] = []
        # Changes the last plan held back for safety (see _guard), for `agent plan`.
        self.held: list[Change] = []
        # Following rollouts (module docstring). Container id -> its drain; `excluded` is the
        # same ids as one immutable set, swapped whole, for the heartbeat thread to read.
        self.draining: dict[str, Drain] = {}
        self.excluded: frozenset[str] = frozenset()
        self._drain_held: list[Change] = []
        self._ips: dict[str, frozenset[str]] = {}
        self.reported_health: Callable[[], Mapping[str, str]] = dict
        self._poll_now = threading.Event()
        self._in_progress = False
        self._moved_at: float | None = None
        self._last_document: ExpectedState | None = None
        self._resources_at: float | None = None
        # Deployment id -> the listed image whose held-back drift was logged (once each).
        self._image_held_logged: dict[str, str] = {}
        # Deployments a user stopped through a `stop` work item. The control plane keeps
        # listing them (as `unknown`, PROTOCOL.md §17.27); re-creating them would undo the stop.
        self.stopped_deployments: Callable[[], frozenset[str]] = frozenset
        # The last expected state fetched (or restored from the cache at start): while no
        # fresh one can be had, crashed or missing containers of it are still brought back.
        self.last_good: ExpectedState | None = None
        self._poll_failures = FailureStreak(log, "expected state unavailable", clock=clock)
        # Config sections whose every listed entry is invalid: left as they are (see _guard).
        self._garbled = ProblemLog(log, "expected state", cleared="has a valid entry again in every section it lists",
                                   clock=clock)

    # --- observation ------------------------------------------------------------------------

    def observe(self, expected: ExpectedState) -> tuple[list[ContainerInfo], list[str]]:
        containers = self.podman.list_containers()
        drifted = []
        for name, sync in self.syncs.items():
            if name not in expected.sections:
                continue  # the document did not carry this section: unknown, not empty
            try:
                live = sync.actual_hash()
            except Exception as exc:  # noqa: BLE001 - any failure to read back counts as drift
                log.warning("%s: cannot read the live configuration (%s); treating it as drift", name, exc)
                self._live_empty[name] = False
                drifted.append(name)
                continue
            self._live_empty[name] = live == EMPTY_HASH
            if live != sync.expected_hash(expected):
                drifted.append(name)
        return containers, drifted

    def note_fetch(self, expected: ExpectedState) -> None:
        """Count, once per fetched document, how many polls in a row left each section empty."""
        self.observer.poll(None, expected)
        self.last_good = expected
        sizes = {
            # An entry that failed validation still means the document is not empty.
            "containers": len(expected.containers) + len(expected.protected_deployments),
            "dns": len(expected.dns_records) + expected.dropped.get("dns", 0),
            "caddy": len(expected.caddy_routes) + expected.dropped.get("caddy", 0),
            "wireguard": len(expected.wireguard_peers) + expected.dropped.get("wireguard", 0),
        }
        for section, size in sizes.items():
            empty = section in expected.sections and size == 0
            self._empty_streak[section] = self._empty_streak.get(section, 0) + 1 if empty else 0

    def compute_plan(self, expected: ExpectedState) -> list[Change]:
        document = expected
        expected = self._without_stopped(expected)
        containers, drifted = self.observe(expected)
        follow = bool(getattr(self.source, "follow_image_changes", False))
        planned = full_plan(expected, containers, drifted, follow_image_changes=follow)
        self._log_image_held(planned.held)
        self._plan_generation = self._host_generation
        changes = self._guard(document, containers, planned.changes)
        changes = self._drain(expected, containers, changes)
        self.held = [*self.held, *self._drain_held, *planned.held]
        self._in_progress = rollout_in_progress(expected, containers, self.reported_health(), bool(self.draining))
        return changes

    def _log_image_held(self, held: Sequence[Change]) -> None:
        """One line per deployment (and listed image) whose image change is held back, not
        one per tick; a deployment no longer held is forgotten."""
        logged: dict[str, str] = {}
        for change in held:
            if change.kind is not ChangeKind.REDEPLOY or change.expected is None or change.container is None:
                continue
            deployment_id, image = change.expected.deployment_id, change.expected.image
            logged[deployment_id] = image
            if self._image_held_logged.get(deployment_id) != image:
                log.info("deployment %s stays on its own image %s although listed with %s: %s",
                         deployment_id, change.container.image, image, change.held_because)
        self._image_held_logged = logged

    def _without_stopped(self, expected: ExpectedState) -> ExpectedState:
        stopped = self.stopped_deployments()
        if not stopped or not any(c.deployment_id in stopped for c in expected.containers):
            return expected
        kept = tuple(c for c in expected.containers if c.deployment_id not in stopped)
        ignored = stopped & {c.deployment_id for c in expected.containers}
        log.info("not re-creating %d deployment(s) stopped by a work item: %s", len(ignored), ", ".join(sorted(ignored)))
        return dataclasses.replace(
            expected, containers=kept, protected_deployments=expected.protected_deployments | ignored
        )

    def _guard(self, expected: ExpectedState, containers: list[ContainerInfo], changes: list[Change]) -> list[Change]:
        """Bad input destroys nothing: a section of the fetched document (`expected`, as the
        control plane sent it) that suddenly became empty must be confirmed by a second poll,
        a missing section is left alone, a config section that lists entries of which none is
        valid (a format slip in every peer or route) changes nothing, and a container entry
        without a usable deployment id blocks removals."""
        dropped: set[ChangeKind] = set()
        garbled = [section for section in CONFIG_KINDS if section in expected.sections and expected.all_dropped(section)]
        self._garbled.report([
            f"every {section} entry it lists is invalid (see above); nothing in {section} changes until one is valid"
            for section in garbled
        ])
        doubted = {CONFIG_KINDS[section] for section in garbled}
        ours = [c for c in containers if c.deployment_id]
        if "containers" not in expected.sections:
            dropped |= REMOVALS
        elif "containers" in expected.invalid_sections:
            if any(c.kind in REMOVALS for c in changes):
                log.error("no container is removed while the expected state has an invalid container entry (see above)")
            dropped |= REMOVALS
        elif (
            not expected.containers
            and not expected.protected_deployments
            and ours
            and self._empty_streak.get("containers", 0) < 2
        ):
            log.warning(
                "expected state lists no containers while %d of ours exist; waiting for the next poll to confirm before removing any",
                len(ours),
            )
            dropped |= REMOVALS
        for section, kind in CONFIG_KINDS.items():
            if not any(c.kind is kind for c in changes) or kind in doubted:
                continue
            if (
                self._expected_empty(section, expected)
                and not self._live_empty.get(section, False)
                and self._empty_streak.get(section, 0) < 2
            ):
                log.warning("%s: expected state suddenly lists nothing; waiting for the next poll to confirm", section)
                dropped.add(kind)
        self.held = [
            dataclasses.replace(c, held_because="every entry of its section is invalid: nothing changes until one is valid")
            if c.kind in doubted else
            dataclasses.replace(c, held_because="not until a second poll confirms it, or the invalid entry is fixed")
            for c in changes
            if c.kind in dropped | doubted
        ]
        return [c for c in changes if c.kind not in dropped | doubted]

    # --- draining (module docstring) ----------------------------------------------------------

    def _drain(self, expected: ExpectedState, containers: list[ContainerInfo], changes: list[Change]) -> list[Change]:
        """Hold back the removal of a running container that a Caddy route still names, and
        for `drain_grace` after no route does, for at most `drain_timeout`; the container
        leaves the status reports meanwhile."""
        present = {c.id for c in containers}
        listed = {c.deployment_id for c in expected.containers}
        now = self.clock()
        for container_id, drain in list(self.draining.items()):
            if container_id not in present:
                del self.draining[container_id]
            elif drain.deployment_id in listed and now - drain.since >= self.settings.drain_timeout:
                # Listed again (another server's part of the rollout still runs, or it was
                # rolled back): report it again rather than hide it for good.
                log.warning("%s (deployment %s) is listed again %.0fs after its drain began; reporting it again",
                            drain.name, drain.deployment_id, now - drain.since)
                del self.draining[container_id]
        self._ips = {cid: ips for cid, ips in self._ips.items() if cid in present}
        kept: list[Change] = []
        held: list[Change] = []
        caddy = self.syncs.get("caddy")
        live: list[Any] | None = None
        read_live = False
        for change in changes:
            container = change.container
            if caddy is None or change.kind is not ChangeKind.REMOVE_UNEXPECTED or container is None or not container.running:
                kept.append(change)
                continue
            if not read_live:
                live, read_live = self._live_routes(caddy), True
            route = route_naming(self._container_ips(container), expected.caddy_routes, live)
            reason = self._keep_draining(container, route, now)
            if reason:
                held.append(dataclasses.replace(change, held_because=reason))
            else:
                kept.append(change)
        self._drain_held = held
        self.excluded = frozenset(self.draining)
        return kept

    def _keep_draining(self, container: ContainerInfo, route: str, now: float) -> str:
        """Why a dropped running container is kept for now ("" once it may go): while `route`
        (a route naming it) is not "", then for `drain_grace` after no route here names it,
        since other servers' Caddy may still send it traffic until their next poll; never
        longer than `drain_timeout` after the drain began."""
        drain = self.draining.get(container.id)
        if drain is None:
            if not route:
                return ""  # no route named it when it was dropped: nothing to drain
            drain = self.draining[container.id] = Drain(container.deployment_id, container.name, now)
            self.excluded = frozenset(self.draining)  # before the report it triggers
            log.info(
                "draining %s (deployment %s): %s; it leaves the status reports now and is removed once no "
                "route names it (at most %.0fs)", container.name, container.deployment_id, route, self.settings.drain_timeout,
            )
            self._moved()
            self.reporter.trigger()
        elapsed = now - drain.since
        timeout = self.settings.drain_timeout
        if elapsed >= timeout:
            if route:
                log.warning("drain of %s ended after %.0fs although %s; removing it now", container.name, elapsed, route)
            return ""
        if route:
            if drain.routes_moved_at is not None:  # named again (a live route came back)
                self.draining[container.id] = dataclasses.replace(drain, routes_moved_at=None)
            return (f"draining for {elapsed:.0f}s: {route}; removed once no route does, "
                    f"at most {timeout:.0f}s after the drain began")
        grace = self.settings.drain_grace_seconds
        moved_at = drain.routes_moved_at
        if moved_at is None:
            moved_at = now
            self.draining[container.id] = dataclasses.replace(drain, routes_moved_at=now)
            log.info("%s (deployment %s): no route here names it any more; removing it in %.0fs, once other "
                     "servers' Caddy has moved on too", container.name, container.deployment_id, min(grace, timeout - elapsed))
        moved_ago = now - moved_at
        if moved_ago >= grace:
            return ""
        return (f"no route here names it since {moved_ago:.0f}s; kept {grace:.0f}s in all (drain_grace) for other "
                f"servers' Caddy to move on, at most {timeout:.0f}s after the drain began")

    def _live_routes(self, caddy: ConfigSync) -> list[Any] | None:
        """The CaddyRoutes live in Caddy (None when they cannot be read)."""
        read = getattr(caddy, "live_routes", None)
        if read is None:
            return []
        try:
            return list(read())
        except Exception as exc:  # noqa: BLE001 - unknown counts as "still routed": the bound ends it
            log.warning("caddy: cannot read the live routes to check a drain (%s); keeping the container", exc)
            return None

    def _container_ips(self, container: ContainerInfo) -> frozenset[str]:
        """The container's addresses (podman ps does not show them); a container's IP never
        changes, so each is inspected once."""
        if container.id not in self._ips:
            info = self.podman.inspect(container.id) or {}
            networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
            self._ips[container.id] = frozenset(
                str(n["IPAddress"]) for n in networks.values() if isinstance(n, dict) and n.get("IPAddress")
            )
        return self._ips[container.id]

    def draining_ids(self) -> frozenset[str]:
        """Container ids left out of status reports while they drain."""
        return self.excluded

    # --- following a rollout (module docstring) ------------------------------------------------

    def _moved(self) -> None:
        self._moved_at = self.clock()

    def following(self) -> bool:
        """Whether something moved within `fast_follow_timeout` while a rollout is in
        progress, or within SETTLE_WINDOW otherwise (module docstring)."""
        moved = self._moved_at
        if moved is None:
            return False
        window = self.settings.fast_follow_timeout if self._in_progress else min(SETTLE_WINDOW, self.settings.fast_follow_timeout)
        return self.clock() - moved < window

    def note_report(self, changed: bool) -> None:
        """The heartbeat sent a report (`changed`: it differed from the previous one)."""
        if changed:
            self._moved()
        self._poll_now.set()

    def wake(self) -> None:
        """Poll now and follow closely: something (a `deploy` work item) says a rollout starts."""
        self._moved()
        self._in_progress = True
        self._poll_now.set()

    def couple(self, heartbeat: FollowingReporter) -> None:
        """Let the heartbeat follow rollouts with this loop: leave draining containers out,
        re-read health fast while following, tell the loop when a report went out."""
        heartbeat.exclude = self.draining_ids
        heartbeat.following = self.following
        heartbeat.on_report = self.note_report
        heartbeat.coalesce = self.settings.report_coalesce
        heartbeat.health_poll = self.settings.health_poll_interval
        self.reported_health = heartbeat.last_health

    def _wait_next(self, stop: threading.Event, started: float) -> None:
        """Until the next poll: `tick_interval` after this one began; while following a
        rollout, as soon as a report went out, or `fast_poll_interval` after it began."""
        while not stop.is_set():
            interval = self.settings.fast_poll_interval if self.following() else self.settings.tick_interval
            remaining = started + interval - self.clock()
            if remaining <= 0:
                return
            if self._poll_now.wait(min(remaining, 0.5)):
                if self.following():
                    return
                self._poll_now.clear()

    @staticmethod
    def _expected_empty(section: str, expected: ExpectedState) -> bool:
        return not {
            "dns": expected.dns_records,
            "caddy": expected.caddy_routes,
            "wireguard": expected.wireguard_peers,
        }[section]

    # --- the state machine -----------------------------------------------------------------

    def tick(self, stop: threading.Event | None = None) -> None:
        """One IDLE tick; on drift, the whole PROCESSING pass, back to back."""
        try:
            expected = self.source.fetch()
        except Exception as exc:  # noqa: BLE001 - a failed poll removes and reconfigures nothing
            self.observer.poll(exc)
            last = self.last_good
            # A source that reported the problem itself (once, then counted) is not repeated here.
            level = logging.DEBUG if getattr(exc, "reported", False) else logging.ERROR
            if last is None:
                self._poll_failures.failed(exc, "changing nothing", level)
                return
            self._poll_failures.failed(exc, "only bringing back containers of the last good one", level)
            try:
                repairs = [c for c in self.compute_plan(last) if c.kind in RESTORE_KINDS]
            except Exception as read_error:  # noqa: BLE001
                log.error("cannot read the actual state, changing nothing: %s", read_error)
                return
            if repairs:
                for change in repairs:
                    log.info("local drift: %s", change.describe())
                self.process(last, stop, only=RESTORE_KINDS)
            return
        self._poll_failures.succeeded()
        self.note_fetch(expected)
        moved = self._last_document is not None and expected != self._last_document
        self._last_document = expected
        if moved:
            self._moved()
        try:
            changes = self.compute_plan(expected)
        except Exception as exc:  # noqa: BLE001
            log.error("cannot read the actual state, changing nothing: %s", exc)
            return
        self.last_plan = changes
        self.observer.plan(changes, self.held, self.syncs)
        if not changes:
            # "No drift" (the report with resources) only when nothing is being held back, at
            # most once per tick however often a rollout is polled. A new document gets a
            # report too: the control plane may wait for one to move the rollout on.
            now = self.clock()
            due = self._resources_at is None or now - self._resources_at >= self.settings.tick_interval * 0.9
            if due:
                self._resources_at = now
            if due or (moved and self.following()):
                self.reporter.trigger(include_resources=due and not self.held)
            return
        for change in changes:
            log.info("drift: %s", change.describe())
        self.process(expected, stop)

    def process(
        self,
        snapshot: ExpectedState,
        stop: threading.Event | None = None,
        only: frozenset[ChangeKind] | None = None,
    ) -> None:
        """Apply the changes `snapshot` asks for; `only` limits the kinds (restoring from a cache)."""
        self.state = PROCESSING
        self.observer.state(PROCESSING)
        self.reporter.trigger()
        started = self.clock()
        self._deadline = started + self.settings.processing_timeout
        snapshot_at = started
        skipped: set[str] = set()
        self._pulled = set()
        try:
            while not self._should_stop(started, stop):
                if self.clock() - snapshot_at > SNAPSHOT_MAX_AGE:
                    try:
                        snapshot = self.source.fetch()
                        snapshot_at = self.clock()
                        self.note_fetch(snapshot)
                    except Exception as exc:  # noqa: BLE001
                        log.warning("could not refresh the expected state, continuing with the snapshot: %s", exc)
                try:
                    changes = self.compute_plan(snapshot)
                except Exception as exc:  # noqa: BLE001
                    log.error("cannot read the actual state: %s; back to IDLE", exc)
                    return
                self.observer.plan(changes, self.held, self.syncs)
                pending = [c for c in changes if change_key(c) not in skipped and (only is None or c.kind in only)]
                if not pending:
                    if not changes:
                        log.info("converged")
                    return
                # Each step verifies itself (the adapters check the result), so the plan is
                # re-read once per batch rather than before every step; the next batch then
                # verifies the whole and picks up anything that did not stick.
                self._prefetch(pending)
                for group in groups(pending):
                    if self._should_stop(started, stop):
                        return
                    if len(group) == 1:
                        self._step(group[0], snapshot, skipped)
                    else:
                        self._steps(group, snapshot, skipped, lambda: self._should_stop(started, stop))
        finally:
            self.state = IDLE
            self.observer.state(IDLE)

    def _should_stop(self, started: float, stop: threading.Event | None) -> bool:
        if stop is not None and stop.is_set():
            return True
        if self.clock() - started > self.settings.processing_timeout:
            log.warning("processing took longer than %.0fs; back to IDLE", self.settings.processing_timeout)
            return True
        return False

    def _step(self, change: Change, snapshot: ExpectedState, skipped: set[str]) -> None:
        """Apply one change; whatever happens it is not tried again in this pass."""
        if not self._admit(change, skipped):
            return
        try:
            self.apply(change, snapshot, self._deadline)
        except Exception as exc:  # noqa: BLE001 - one failing change must not block the others
            self._finish(change, exc)
        else:
            self._finish(change, None)

    def _steps(
        self, group: Sequence[Change], snapshot: ExpectedState, skipped: set[str], should_stop: Callable[[], bool]
    ) -> None:
        """`_step` for independent new deployments, DEPLOY_PARALLELISM at a time, each
        reported as it completes (module docstring). None starts once the pass must stop."""
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait  # a pass's need, not idle's

        waiting = list(group)
        running: dict[Future[None], Change] = {}
        with self.host_lock, ThreadPoolExecutor(DEPLOY_PARALLELISM, "deploy") as pool:
            while waiting or running:
                while waiting and len(running) < DEPLOY_PARALLELISM and not should_stop():
                    change = waiting.pop(0)
                    if not self._admit(change, skipped):
                        continue
                    try:
                        env = self._prepare(change, self._deadline)
                    except Exception as exc:  # noqa: BLE001 - one failing change must not block the others
                        self._finish(change, exc)
                        continue
                    running[pool.submit(self._apply_locked, change, snapshot, env)] = change
                if not running:
                    return
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    error = future.exception()
                    self._finish(running.pop(future), error if isinstance(error, Exception) else None)

    def _admit(self, change: Change, skipped: set[str]) -> bool:
        """Whether `change` may be tried now (not within its backoff); it is not tried again in this pass."""
        key = change_key(change)
        skipped.add(key)
        wait = self.backoff.wait(key)
        if wait > 0:
            log.info("retrying in %.0fs (it failed recently): %s", wait, change.describe())
            self.observer.change(change, "backoff")
            return False
        self.backoff.record(key)
        return True

    def _finish(self, change: Change, error: Exception | None) -> None:
        if error is not None:
            log.error("failed: %s: %s", change.describe(), error, extra=change_fields(change))
            self.observer.change(change, "failed", error)
        else:
            log.info("%s", change.done(), extra=change_fields(change))
            self.observer.change(change, "applied")
            if change.kind not in (ChangeKind.START, ChangeKind.REDEPLOY):
                # A re-start or re-create that has to happen again soon is a loop: keep pacing
                # it. A fresh deploy (or removal, or config) is a new intent each time.
                self.backoff.clear(change_key(change))
        self._moved()
        self.reporter.trigger()

    def _prefetch(self, changes: Sequence[Change]) -> None:
        """Pull the images of the pass, PULL_PARALLELISM at a time; a failure is left to the
        change's own step, which pulls again and reports it."""
        images = list(dict.fromkeys(
            c.expected.image for c in changes
            if c.expected is not None and c.kind in (ChangeKind.DEPLOY, ChangeKind.REDEPLOY) and c.expected.image not in self._pulled
        ))
        if len(images) < 2:
            return
        from concurrent.futures import ThreadPoolExecutor

        def pull(image: str) -> None:
            try:
                self._pull(image, self._deadline)
            except Exception as exc:  # noqa: BLE001 - reported by the step that needs it
                log.debug("pull of %s failed ahead of its deploy: %s", image, exc)

        with ThreadPoolExecutor(min(PULL_PARALLELISM, len(images)), "pull") as pool:
            list(pool.map(pull, images))


    # --- applying one change -----------------------------------------------------------------

    def apply(self, change: Change, snapshot: ExpectedState, deadline: float | None = None) -> None:
        """Apply one change. Slow preparation (decrypting, pulling) happens before taking
        `host_lock`, so a long pull never holds up work items; the lock covers only the
        podman calls that change containers."""
        env = self._prepare(change, deadline)
        with self.host_lock:
            self._apply_locked(change, snapshot, env)

    def _prepare(self, change: Change, deadline: float | None) -> dict[str, str]:
        """What a change needs before it takes the lock: its decrypted env, its image."""
        env: dict[str, str] = {}
        if change.expected is not None and change.kind in (ChangeKind.DEPLOY, ChangeKind.REDEPLOY):
            env = decrypt_env(change.expected, self.encryption_key)
            check_env(env)  # a value that cannot reach the container fails before anything is stopped
            self._pull(change.expected.image, deadline)
        return env

    def _apply_locked(self, change: Change, snapshot: ExpectedState, env: Mapping[str, str]) -> None:
        """The podman calls of `apply`; the caller holds `host_lock`."""
        if change.expected is not None and change.expected.deployment_id in self.stopped_deployments():
            log.info("skipped: deployment %s was stopped by a work item meanwhile", change.expected.deployment_id)
            return
        if self._host_generation != self._plan_generation and self._outdated(change):
            log.info("skipped: %s (a work item changed this container meanwhile; the next pass decides)", change.describe())
            return
        if change.kind in REMOVALS:
            assert change.container is not None
            if change.container.running:
                self.podman.stop_and_remove(change.container.id)
            else:
                self.podman.force_remove(change.container.id)
        elif change.kind is ChangeKind.START:
            assert change.container is not None and change.expected is not None
            self._start(change.container, change.expected)
        elif change.kind in (ChangeKind.DEPLOY, ChangeKind.REDEPLOY):
            assert change.expected is not None
            if change.container is not None:
                self.podman.stop_and_remove(change.container.id)
            self.podman.run_container(change.expected, env, self.settings.volumes_dir)
        else:
            section = next(name for name, kind in CONFIG_KINDS.items() if kind is change.kind)
            self.syncs[section].apply(snapshot)

    def _start(self, container: ContainerInfo, spec: ExpectedContainer) -> None:
        try:
            self.podman.start(container.id)
            return
        except Exception as exc:  # noqa: BLE001
            if self.podman.inspect(container.id) is None:
                # Gone meanwhile (a work item, a user): the next plan decides, not a stale one.
                log.info("container %s vanished before it could be started; leaving it to the next pass", container.name)
                return
            # Removed here; the next plan of this pass deploys it afresh (pulling before it
            # takes the lock, unlike a re-create from inside this step would).
            log.warning("start of %s failed (%s); removing it so that it is deployed again", container.name, exc)
        self.podman.stop_and_remove(container.id)

    def note_host_change(self) -> None:
        """Called (by the work queue) after it changed containers."""
        self._host_generation += 1

    def _outdated(self, change: Change) -> bool:
        """Whether the container this change was planned against is gone, or a container
        for a deployment planned as missing has appeared."""
        if change.kind is ChangeKind.DEPLOY and change.expected is not None:
            return self.podman.inspect(change.expected.name) is not None
        if change.container is not None:
            return self.podman.inspect(change.container.id) is None
        return False

    def _pull(self, image: str, deadline: float | None) -> None:
        if image in self._pulled or not needs_pull(image, self.podman):
            return
        timeout = None
        if deadline is not None:
            # A pull may not outlast the pass (PROTOCOL.md §17.21), but gets at least 30 s.
            timeout = max(30.0, deadline - self.clock())
        try:
            self.podman.pull(image, timeout=timeout)
        except Exception as exc:  # noqa: BLE001
            if not self.podman.image_exists(image):
                raise
            log.warning("pull of %s failed (%s); using the local copy", image, exc)
        self._pulled.add(image)

    def run(self, stop: threading.Event, on_tick: Callable[[], None] | None = None) -> None:
        while not stop.is_set():
            started = self.clock()
            # Cleared before the tick: a report its steps trigger still calls the next poll.
            self._poll_now.clear()
            self.tick(stop)
            if on_tick is not None:
                on_tick()
            self._wait_next(stop, started)


def groups(changes: Sequence[Change]) -> list[list[Change]]:
    """`changes` in order, cut into runs that may go together: up to DEPLOY_CHUNK new
    deployments in a row (a DEPLOY with no container to replace) make one group; every other
    change is a group of its own."""
    result: list[list[Change]] = []
    for change in changes:
        fresh = change.kind is ChangeKind.DEPLOY and change.container is None and change.expected is not None
        last = result[-1] if result else None
        if fresh and last and len(last) < DEPLOY_CHUNK and last[0].kind is ChangeKind.DEPLOY and last[0].container is None:
            last.append(change)
        else:
            result.append([change])
    return result


def needs_pull(image: str, podman: Podman) -> bool:
    """Pull unless the local copy is pinned (a digest or a tag other than `latest`) or the
    image is local-only (`localhost/…`): re-pulling a pinned image only costs time, but a
    `latest` tag may have moved since the last pull."""
    reference = canonical_image(image)
    if reference.startswith("localhost/"):
        return False
    pinned = "@" in reference or not reference.endswith(":latest")
    return not (pinned and podman.image_exists(image))


STATE_FILE_KEYS = {
    "": {"containers", "dns", "caddy", "wireguard", "subnetId", "wireguardIp", "encryptionKey"},
    "containers": {"deploymentId", "serviceId", "serviceName", "name", "image", "ipAddress", "ports", "env",
                   "healthCheck", "volumes"},
    "healthCheck": {"cmd", "interval", "timeout", "retries", "startPeriod"},
    "volumes": {"name", "hostPath", "containerPath"},
    "dns": {"records"},
    "dns.records": {"name", "ips"},
    "caddy": {"routes"},
    "caddy.routes": {"id", "domain", "upstreams", "serviceId"},
}


class StateFileUnusable(ModelError):
    """The state file cannot be read or parsed. FileSource has logged it (once, then
    repeated only every few minutes), so the loop does not log it again every tick."""

    reported = True


class FileSource:
    """Standalone mode: the expected state is a local TOML or JSON file, re-read every tick.

    The file is the operator's whole intent: a section it leaves out is empty (deleting the
    last [[containers]] block removes the container). Unknown keys, the typos of a hand-
    written file, are named with a suggestion. A file that cannot be read or parsed is
    reported once (then counted), and "is valid again" once it can. A `wireguard` section
    is refused with one line (one host has no mesh); the rest of the file applies."""

    # The file is the operator's intent: a lone deployment's new image is applied.
    follow_image_changes = True

    def __init__(self, path: Path, subnet: Any) -> None:
        self.path = path
        self.subnet = subnet
        self._warned: set[str] = set()
        self.problems = ProblemLog(log, f"state file {path}")

    def fetch(self) -> ExpectedState:
        try:
            state = self.read()
        except ModelError as exc:
            # The subject already names the file: "state file X: not valid JSON: …".
            reason = str(exc).replace(f"cannot read state file {self.path}", "cannot be read")
            reason = reason.replace(f"state file {self.path} is ", "").replace(f"state file {self.path} ", "")
            self.problems.report([f"{reason}; nothing changes until it is fixed"])
            raise StateFileUnusable(str(exc)) from None
        self.problems.report(state.problems, state.problem_count)
        return state

    def read(self) -> ExpectedState:
        """The file's expected state, without reporting its problems (raises ModelError)."""
        data = load_state_file(self.path)
        self._check_keys(data)
        if data.get("subnetId", 1) != int(self.subnet.network_address.packed[2]):
            self._warn_once(f"subnetId changed to {data.get('subnetId')!r} in {self.path}; restart the agent to use it")
        if data.get("wireguard"):
            self._warn_once(
                f"{self.path}: the wireguard section is refused: a standalone agent manages no WireGuard mesh "
                "(one host, no peers); the rest of the file applies"
            )
        data.pop("wireguard", None)
        state = parse_expected_state(data, self.subnet)
        return dataclasses.replace(state, sections=frozenset(SECTIONS) - {"wireguard"})

    def _check_keys(self, data: dict[str, Any]) -> None:
        self._unknown(data, STATE_FILE_KEYS[""], "the top level")
        containers = data.get("containers")
        for index, item in enumerate(containers if isinstance(containers, list) else []):
            if not isinstance(item, dict):
                continue
            self._unknown(item, STATE_FILE_KEYS["containers"], f"containers[{index}]")
            if isinstance(item.get("healthCheck"), dict):
                self._unknown(item["healthCheck"], STATE_FILE_KEYS["healthCheck"], f"containers[{index}].healthCheck")
            volumes = item.get("volumes")
            for number, volume in enumerate(volumes if isinstance(volumes, list) else []):
                if isinstance(volume, dict):
                    self._unknown(volume, STATE_FILE_KEYS["volumes"], f"containers[{index}].volumes[{number}]")
        for section, entries in (("dns", "records"), ("caddy", "routes")):
            table = data.get(section)
            if not isinstance(table, dict):
                continue
            self._unknown(table, STATE_FILE_KEYS[section], section)
            items = table.get(entries)
            for index, item in enumerate(items if isinstance(items, list) else []):
                if isinstance(item, dict):
                    self._unknown(item, STATE_FILE_KEYS[f"{section}.{entries}"], f"{section}.{entries}[{index}]")

    def _unknown(self, table: dict[str, Any], known: set[str], where: str) -> None:
        for key in table:
            if key not in known:
                import difflib  # only for a typo in a hand-written state file

                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self._warn_once(f"{self.path}: unknown key {key!r} in {where}{hint}; ignored")

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)


def load_state_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read state file {path}: {exc.strerror}") from exc
    if path.suffix == ".toml":
        from agent.settings import toml_parser

        tomllib = toml_parser()

        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"state file {path} is not valid TOML: {exc}") from exc
        except RecursionError:
            raise ModelError(f"state file {path} is nested too deeply to be an expected state") from None
    else:
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"state file {path} is not valid JSON: {exc}") from exc
        except RecursionError:
            raise ModelError(f"state file {path} is nested too deeply to be an expected state") from None
    if not isinstance(data, dict):
        raise ModelError(f"state file {path} must hold an object/table at the top level")
    return data


#: How long a poll made with `keep` stands in for the next one (runtime.restore_from_cache's,
#: which the loop's first tick follows at once).
KEPT_FOR = 2.0


class ControlPlaneSource:
    """Polls GET expected-state; keeps the last good answer on disk for restarts without a CP."""

    # The control plane changes images only through new deployments (drift.py's docstring).
    follow_image_changes = False

    def __init__(self, client: Any, subnet: Any, cache_path: Path | None, deadline: float | None = None) -> None:
        self.client = client
        self.subnet = subnet
        self.cache_path = cache_path
        self._cached_text = ""
        # Seconds for a whole poll, retries included, so a hanging control plane cannot
        # stall the loop past its tick.
        self.deadline = deadline
        self.problems = ProblemLog(log, "expected state")
        self._kept: tuple[ExpectedState, float] | None = None

    def fetch(self, deadline: float | None = None, keep: bool = False) -> ExpectedState:
        """The expected state, polled now. With `keep`, the answer also serves the next call
        if that comes within KEPT_FOR seconds: the start-up poll is then the loop's first."""
        kept, self._kept = self._kept, None
        if kept is not None and time.monotonic() - kept[1] <= KEPT_FOR:
            return kept[0]
        data = self.client.expected_state(deadline=deadline or self.deadline)
        state = parse_expected_state(data, self.subnet)
        self.problems.report(state.problems, state.problem_count)
        text = json.dumps(data, sort_keys=True)
        if self.cache_path is not None and text != self._cached_text:
            try:
                atomic_write(self.cache_path, text, 0o600)
                self._cached_text = text
            except OSError as exc:
                log.warning("cannot cache the expected state in %s: %s", self.cache_path, exc)
        if keep:
            self._kept = (state, time.monotonic())
        return state

    def cached(self) -> ExpectedState | None:
        if self.cache_path is None or not self.cache_path.exists():
            return None
        try:
            state = parse_expected_state(json.loads(self.cache_path.read_text(encoding="utf-8")), self.subnet)
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("ignoring the cached expected state %s: %s", self.cache_path, exc)
            return None
        self.problems.report(state.problems, state.problem_count)
        return state

