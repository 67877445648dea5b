"""Work-queue processing (PROTOCOL.md §6.3, §6.4, §10): one-off commands from the control plane.

The control plane returns every pending item on every poll until it is acknowledged, and
an acknowledgement can be lost, so items are executed at most once per id: the outcome is
written to `<data-dir>/work-done.json` before the acknowledgement is sent (and, if it cannot
be written, the item is not acknowledged until it can), and a
re-delivered item is only acknowledged again with the remembered outcome. Payloads are
validated before anything acts on them; only containers carrying our labels are touched;
volume deletion is confined to `<data-dir>/volumes/<serviceId>`. Unknown types are
completed as failed instead of being re-fetched forever (PROTOCOL.md §17 items 8, 14).
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import fsutil, validate
from agent.api import ApiError, ControlPlane, decode_json
from agent.drift import LABEL_DEPLOYMENT_ID, LABEL_SERVICE_ID
from agent.host.podman import Podman
from agent.model import ModelError, WireGuardPeer, parse_expected_state
from agent.observe import Observer
from agent.problems import ProblemLog
from agent.settings import Settings
from agent.validate import InvalidValue

log = logging.getLogger(__name__)

DONE_FILE = "work-done.json"
#: Bounds of the idempotency record: enough to outlive any re-delivery, small enough to rewrite.
MAX_REMEMBERED = 1000
REMEMBER_SECONDS = 7 * 24 * 3600
#: Deployments stopped by a `stop` item stay listed as `unknown` by the CP (§17 item 27);
#: they are remembered longer so the reconciler can decline to re-create them.
STOPPED_REMEMBER_SECONDS = 90 * 24 * 3600
#: How long a `cleanup_volumes` item waits for the service's containers to disappear (the
#: CP queues it together with the deletion the reconciler carries out) before it fails.
VOLUME_CLEANUP_GRACE = 600.0

#: Longer error texts (podman output, container logs) are cut before they are stored and sent.
MAX_ERROR_CHARS = 1000
#: While the same fetch error persists it is logged again only this often (seconds).
FETCH_ERROR_REPEAT = 60.0

COMPLETED = "completed"
FAILED = "failed"


class PayloadError(ValueError):
    """The item's payload is not what its type requires; the item is completed as failed."""


@dataclass(frozen=True)
class Outcome:
    status: str  # COMPLETED or FAILED
    error: str = ""
    changed: bool = False

    @classmethod
    def ok(cls, changed: bool = False) -> Outcome:
        return cls(COMPLETED, "", changed)

    @classmethod
    def fail(cls, error: str, changed: bool = False) -> Outcome:
        return cls(FAILED, error, changed)


class _Defer(Exception):
    """Leave the item pending (no record, no acknowledgement); it is tried again next poll."""


class WorkQueue:
    observer: Observer = Observer()  # runtime gives it the Publisher (agent status, metrics)

    def __init__(
        self,
        client: ControlPlane,
        podman: Podman,
        settings: Settings,
        host_lock: threading.Lock,
        apply_wireguard_peers: Callable[[Sequence[WireGuardPeer]], None] | None,
        on_change: Callable[[], None] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        volume_cleanup_grace: float = VOLUME_CLEANUP_GRACE,
    ) -> None:
        self.client = client
        self.podman = podman
        self.settings = settings
        self.host_lock = host_lock
        self.apply_wireguard_peers = apply_wireguard_peers
        self.on_change = on_change
        self._clock = clock
        self._monotonic = monotonic
        self._volume_cleanup_grace = volume_cleanup_grace
        self._path = settings.data_dir / DONE_FILE
        self._poll_lock = threading.Lock()
        # Guards the record below; held only briefly and never while waiting for host_lock,
        # so the reconciler may call stopped_deployments() while it holds host_lock.
        self._record_lock = threading.Lock()
        # id -> {"status", "error", "at"}; loaded lazily so construction never touches disk.
        self._done: dict[str, dict[str, Any]] | None = None
        self._stopped: dict[str, float] = {}
        # Outcomes recorded in memory but not yet on disk, and whether writing is failing.
        self._unsaved = False
        self._save_failing = False
        # cleanup_volumes item id -> monotonic time it was first deferred.
        self._deferred_since: dict[str, float] = {}
        # The last fetch error and when it was logged: an outage is logged once a minute, not every 5 s.
        self._fetch_error: tuple[str, float] | None = None
        # Items without a usable id are never acknowledged, so the CP serves them on every
        # poll: logged once per kind, then counted (not one line per item per poll).
        self._unacknowledgeable = ProblemLog(
            log, "work queue: items that cannot be acknowledged (served again on every poll)",
            cleared="are gone", clock=monotonic,
        )

    # --- public -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Poll every `workqueue_interval` seconds until `stop` is set. Never raises."""
        while not stop.is_set():
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("work queue: poll failed unexpectedly")
            stop.wait(self.settings.workqueue_interval)

    def poll_once(self) -> None:
        """Fetch pending items and handle each in order; one item's failure never stops the rest."""
        with self._poll_lock:
            try:
                items = self.client.work_items()
            except ApiError as exc:
                self._log_fetch_error(str(exc))
                return
            if self._fetch_error is not None:
                log.info("work queue: fetching pending items works again")
                self._fetch_error = None
            unusable: dict[str, str] = {}  # kind -> the first such item
            unusable_count = 0
            for index, raw in enumerate(items):
                try:
                    problem = self._handle(raw, index)
                except Exception:  # noqa: BLE001 - isolate items from each other
                    log.exception("work queue: item #%d failed unexpectedly", index)
                    continue
                if problem is not None:
                    unusable_count += 1
                    unusable.setdefault(problem[0], problem[1])
            self._unacknowledgeable.report(
                [f"{kind} (first: {first})" for kind, first in unusable.items()], total=unusable_count
            )
            # Items the CP no longer lists (deleted by an aborted rollout) stop waiting.
            # Only string ids can match what we recorded (an odd id must not crash the poll).
            listed = {raw.get("id") for raw in items if isinstance(raw, Mapping) and isinstance(raw.get("id"), str)}
            for item_id in list(self._deferred_since):
                if item_id not in listed:
                    del self._deferred_since[item_id]

    def _log_fetch_error(self, message: str) -> None:
        now = self._monotonic()
        previous = self._fetch_error
        if previous is None or previous[0] != message or now - previous[1] >= FETCH_ERROR_REPEAT:
            log.warning("work queue: cannot fetch pending items: %s", message)
            self._fetch_error = (message, now)
        else:
            log.debug("work queue: cannot fetch pending items: %s", message)

    def stopped_deployments(self) -> frozenset[str]:
        """Deployment ids a `stop` item removed. The CP keeps listing them (status `unknown`,
        PROTOCOL.md §17 item 27); the reconciler should not re-create them."""
        with self._record_lock:
            self._load()
            return frozenset(self._stopped)

    # --- one item -----------------------------------------------------------------------------

    def _handle(self, raw: Any, index: int) -> tuple[str, str] | None:
        """Work one item; (kind, example) when it cannot be acknowledged (the caller
        reports those together, once per poll)."""
        if not isinstance(raw, Mapping):
            return "not an object", f"item #{index} is {type(raw).__name__}"
        item_id = raw.get("id")
        try:
            item_id = validate.free_text(item_id, "id", max_len=200)
        except InvalidValue as exc:
            return "unusable id", f"item #{index}: {exc}"
        if not item_id:
            return "no id", f"item #{index}"
        item_type = raw.get("type")

        remembered = self._remembered(item_id)
        if remembered is not None:
            if not self._saved():
                # Still only in memory (the disk was full): acknowledging now would let a
                # restart run it again. It stays pending until the record is on disk.
                return None
            log.info("work queue: item %s (%s) was already handled (%s); acknowledging again", item_id, _show(item_type), remembered.status)
            self._acknowledge(item_id, remembered)
            return None

        try:
            outcome = self.observer.work(item_id, item_type, lambda: self._execute(item_id, item_type, raw.get("payload")))
        except _Defer:
            return None
        except Exception as exc:  # noqa: BLE001 - a bug or an odd podman failure fails this item only
            log.exception("work queue: item %s (%s) raised", item_id, _show(item_type))
            outcome = Outcome.fail(f"agent error while handling {_show(item_type)}: {exc}")
        self._deferred_since.pop(item_id, None)
        self.observer.work_done(item_type, outcome.status)
        if len(outcome.error) > MAX_ERROR_CHARS:
            # Keep work-done.json and the request small; the full text goes to the log here.
            log.warning("work queue: item %s (%s) failed: %s", item_id, _show(item_type), outcome.error)
            outcome = Outcome(outcome.status, outcome.error[: MAX_ERROR_CHARS - 3] + "...", outcome.changed)
        elif outcome.status == COMPLETED:
            log.info("work queue: item %s (%s) completed", item_id, _show(item_type), extra={"work_item": item_id})
        else:
            log.warning("work queue: item %s (%s) failed: %s", item_id, _show(item_type), outcome.error, extra={"work_item": item_id})
        # Remember first: if the acknowledgement is lost the item comes back, and must not run
        # again. Not saved (disk full): not acknowledged either; the re-delivered item is
        # found in memory, saved and acknowledged then, never run twice.
        if self._remember(item_id, outcome):
            self._acknowledge(item_id, outcome)
        if outcome.changed and self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # noqa: BLE001
                log.exception("work queue: on_change callback failed")
        return None

    def _acknowledge(self, item_id: str, outcome: Outcome) -> None:
        try:
            self.client.complete_work(item_id, outcome.status, outcome.error)
        except ApiError as exc:
            log.warning("work queue: acknowledging item %s failed (retried on the next poll): %s", item_id, exc)
        except Exception:  # noqa: BLE001
            log.exception("work queue: acknowledging item %s failed (retried on the next poll)", item_id)

    def _execute(self, item_id: str, item_type: Any, payload_raw: Any) -> Outcome:
        if item_type == "deploy":
            # Expected-state reconciliation creates the container; the payload is never used
            # (its `name` differs from the expected-state name, PROTOCOL.md §10). `changed`:
            # a rollout starts, so the reconciler polls at once and follows it (loop.py).
            return Outcome.ok(changed=True)
        if item_type == "sync_caddy":
            return Outcome.fail("sync_caddy is not supported by this agent: Caddy routes are applied from the expected state")
        handlers: dict[str, Callable[[dict[str, Any], str], Outcome]] = {
            "restart": self._restart,
            "stop": self._stop,
            "force_cleanup": self._force_cleanup,
            "cleanup_volumes": self._cleanup_volumes,
            "update_wireguard": self._update_wireguard,
        }
        if not isinstance(item_type, str) or item_type not in handlers:
            return Outcome.fail(f"unknown work item type {_show(item_type)}; this agent handles {', '.join(['deploy', *handlers])}")
        try:
            payload = _parse_payload(payload_raw)
        except PayloadError as exc:
            return Outcome.fail(f"invalid {item_type} payload: {exc}")
        try:
            return handlers[item_type](payload, item_id)
        except PayloadError as exc:
            return Outcome.fail(f"invalid {item_type} payload: {exc}")

    # --- handlers -----------------------------------------------------------------------------

    def _target(self, payload: dict[str, Any]) -> tuple[str, str]:
        container_id = _field(payload, "containerId", validate.container_name)
        deployment_id = _field(payload, "deploymentId", lambda v: validate.identifier(v, "deploymentId"))
        return container_id, deployment_id

    def _refusal(self, container_id: str, deployment_id: str, info: Mapping[str, Any]) -> str:
        """Why we must not touch this container, or "" when it is ours and matches the item."""
        if not self.podman.is_managed(container_id):
            return f"container {container_id} is not managed by this agent (another agent's owner mark, or no techulus labels); left alone"
        label = _labels(info).get(LABEL_DEPLOYMENT_ID, "")
        if label and label != deployment_id:
            return f"container {container_id} belongs to deployment {label}, not {deployment_id}; left alone"
        return ""

    def _restart(self, payload: dict[str, Any], item_id: str) -> Outcome:
        container_id, deployment_id = self._target(payload)
        with self.host_lock:
            info = self.podman.inspect(container_id)
            if info is None:
                return Outcome.fail(f"cannot restart container {container_id}: it does not exist on this server")
            refusal = self._refusal(container_id, deployment_id, info)
            if refusal:
                return Outcome.fail(refusal)
            try:
                self.podman.restart(container_id)
            except Exception as exc:  # noqa: BLE001 - podman errors become the item's error
                return Outcome.fail(f"failed to restart container {container_id}: {exc}", changed=True)
        log.info("work queue: restarted container %s (deployment %s)", container_id, deployment_id)
        return Outcome.ok(changed=True)

    def _stop(self, payload: dict[str, Any], item_id: str) -> Outcome:
        """Stop and remove the container. The deployment is remembered as stopped (never
        re-created) only when the container removed was ours and labelled with exactly that
        deployment: a stop naming a missing or unlabelled container must not switch off a
        deployment that may run elsewhere or later."""
        container_id, deployment_id = self._target(payload)
        with self.host_lock:
            info = self.podman.inspect(container_id)
            if info is None:
                log.info("work queue: container %s is already gone; deployment %s is not marked stopped", container_id, deployment_id)
                return Outcome.ok()
            refusal = self._refusal(container_id, deployment_id, info)
            if refusal:
                return Outcome.fail(refusal)
            try:
                self.podman.stop_and_remove(container_id)
            except Exception as exc:  # noqa: BLE001
                return Outcome.fail(f"failed to stop container {container_id}: {exc}", changed=True)
            if _labels(info).get(LABEL_DEPLOYMENT_ID, "") == deployment_id:
                self._note_stopped(deployment_id)
            else:
                log.info("work queue: container %s carried no deployment label; deployment %s is not marked stopped", container_id, deployment_id)
        log.info("work queue: stopped and removed container %s (deployment %s)", container_id, deployment_id)
        return Outcome.ok(changed=True)

    def _force_cleanup(self, payload: dict[str, Any], item_id: str) -> Outcome:
        service_id = _field(payload, "serviceId", lambda v: validate.identifier(v, "serviceId"))
        container_ids = payload.get("containerIds")
        if container_ids is None:
            container_ids = []
        if not isinstance(container_ids, list):
            raise PayloadError(f"containerIds must be a list, got {type(container_ids).__name__}")
        changed = False
        for raw_id in container_ids:
            try:
                container_id = validate.container_name(raw_id)
            except InvalidValue as exc:
                log.error("work queue: force_cleanup of service %s: skipping container id: %s", service_id, exc)
                continue
            try:
                changed |= self._force_remove_one(service_id, container_id)
            except Exception as exc:  # noqa: BLE001 - errors are only logged (PROTOCOL.md §10)
                log.error("work queue: force_cleanup of service %s: container %s: %s", service_id, container_id, exc)
        return Outcome.ok(changed=changed)

    def _force_remove_one(self, service_id: str, container_id: str) -> bool:
        with self.host_lock:
            info = self.podman.inspect(container_id)
            if info is None:
                log.info("work queue: force_cleanup: container %s is already gone", container_id)
                return False
            if not self.podman.is_managed(container_id):
                log.warning("work queue: force_cleanup: container %s is not managed by this agent; left alone", container_id)
                return False
            owner = _labels(info).get(LABEL_SERVICE_ID, "")
            if owner != service_id:
                log.warning(
                    "work queue: force_cleanup: container %s belongs to service %s, not %s; left alone", container_id, owner, service_id
                )
                return False
            try:
                self.podman.stop_and_remove(container_id)
            except Exception as exc:  # noqa: BLE001 - fall back to a forced removal
                log.warning("work queue: force_cleanup: stopping %s failed (%s); forcing removal", container_id, exc)
                self.podman.force_remove(container_id)
        log.info("work queue: force_cleanup: removed container %s of service %s", container_id, service_id)
        return True

    def _cleanup_volumes(self, payload: dict[str, Any], item_id: str) -> Outcome:
        service_id = _field(payload, "serviceId", lambda v: validate.identifier(v, "serviceId"))
        root = self.settings.volumes_dir
        with self.host_lock:
            remaining = [c for c in self.podman.list_containers() if c.service_id == service_id]
            if remaining:
                names = ", ".join(c.name or c.short_id for c in remaining)
                first = self._deferred_since.setdefault(item_id, self._monotonic())
                waited = self._monotonic() - first
                if waited < self._volume_cleanup_grace:
                    log.info(
                        "work queue: cleanup_volumes for service %s waits until its containers are removed (%s)", service_id, names
                    )
                    raise _Defer()
                return Outcome.fail(
                    f"refusing to delete the volumes of service {service_id}: its containers still exist ({names}) "
                    f"after {waited:.0f}s"
                )
            try:
                target = _volume_dir(root, service_id)
            except PayloadError as exc:
                return Outcome.fail(str(exc))
            if target is None:
                log.info("work queue: service %s has no volumes under %s", service_id, root)
                return Outcome.ok()
            errors: list[str] = []

            def onerror(_func: Any, path: str, exc_info: Any) -> None:
                errors.append(f"{path}: {exc_info[1]}")

            if sys.version_info >= (3, 12):
                shutil.rmtree(target, onexc=lambda func, path, exc: errors.append(f"{path}: {exc}"))
            else:  # pragma: no cover - Python 3.10/3.11
                shutil.rmtree(target, onerror=onerror)
        if errors:
            return Outcome.fail(f"could not delete all volumes of service {service_id}: {'; '.join(errors[:5])}")
        log.info("work queue: deleted volumes of service %s (%s)", service_id, target)
        return Outcome.ok(changed=True)

    def _update_wireguard(self, payload: dict[str, Any], item_id: str) -> Outcome:
        peers_raw = payload.get("peers")
        if not isinstance(peers_raw, list):
            raise PayloadError(f"peers must be a list, got {type(peers_raw).__name__}")
        try:
            parsed = parse_expected_state({"wireguard": {"peers": peers_raw}}, None)
        except ModelError as exc:
            raise PayloadError(str(exc)) from exc
        if parsed.problems:
            # Applying the valid rest would drop the invalid peer's server from the mesh.
            return Outcome.fail("invalid peers, nothing applied: " + "; ".join(parsed.problems))
        if self.apply_wireguard_peers is None:
            log.info("work queue: update_wireguard: WireGuard is not managed by this agent; nothing to do")
            return Outcome.ok()
        if not parsed.wireguard_peers:
            # An empty list would cut this server off from every other one; the expected
            # state, which carries the same peers, is the authority for that.
            log.warning("work queue: update_wireguard with no peers; leaving WireGuard to expected-state reconciliation")
            return Outcome.ok()
        with self.host_lock:
            try:
                self.apply_wireguard_peers(parsed.wireguard_peers)
            except Exception as exc:  # noqa: BLE001
                return Outcome.fail(f"failed to apply WireGuard peers: {exc}")
        log.info("work queue: applied %d WireGuard peer(s)", len(parsed.wireguard_peers))
        return Outcome.ok(changed=True)

    # --- the idempotency record ---------------------------------------------------------------

    def _load(self) -> None:
        if self._done is not None:
            return
        self._done = {}
        self._stopped = {}
        try:
            data = fsutil.read_json(self._path)
        except (ValueError, OSError) as exc:
            log.warning("work queue: %s is unreadable (%s); starting with an empty record", self._path, exc)
            return
        if data is None:
            return
        if not isinstance(data, dict):
            log.warning("work queue: %s is not a JSON object; starting with an empty record", self._path)
            return
        items = data.get("items")
        if isinstance(items, dict):
            for item_id, entry in items.items():
                if (
                    isinstance(item_id, str)
                    and isinstance(entry, dict)
                    and entry.get("status") in (COMPLETED, FAILED)
                    and isinstance(entry.get("error", ""), str)
                    and isinstance(entry.get("at"), int | float)
                    and not isinstance(entry.get("at"), bool)
                ):
                    self._done[item_id] = {"status": entry["status"], "error": entry.get("error", ""), "at": float(entry["at"])}
        stopped = data.get("stopped")
        if isinstance(stopped, dict):
            for deployment_id, at in stopped.items():
                if isinstance(deployment_id, str) and isinstance(at, int | float) and not isinstance(at, bool):
                    self._stopped[deployment_id] = float(at)
        self._prune()

    def _prune(self) -> None:
        assert self._done is not None
        now = self._clock()
        fresh = sorted(
            ((k, v) for k, v in self._done.items() if now - v["at"] < REMEMBER_SECONDS), key=lambda kv: kv[1]["at"]
        )
        self._done = dict(fresh[-MAX_REMEMBERED:])
        stopped = sorted(((k, at) for k, at in self._stopped.items() if now - at < STOPPED_REMEMBER_SECONDS), key=lambda kv: kv[1])
        self._stopped = dict(stopped[-MAX_REMEMBERED:])

    def _remembered(self, item_id: str) -> Outcome | None:
        with self._record_lock:
            self._load()
            assert self._done is not None
            entry = self._done.get(item_id)
        if entry is None:
            return None
        return Outcome(entry["status"], entry["error"])

    def _remember(self, item_id: str, outcome: Outcome) -> bool:
        """Record the outcome; True once it is on disk."""
        with self._record_lock:
            self._load()
            assert self._done is not None
            self._done[item_id] = {"status": outcome.status, "error": outcome.error, "at": self._clock()}
            self._unsaved = True
            return self._save()

    def _saved(self) -> bool:
        """Whether the record on disk is complete, writing it again if an earlier write failed."""
        with self._record_lock:
            return not self._unsaved or self._save()

    def _note_stopped(self, deployment_id: str) -> None:
        # Called with host_lock held (lock order: host_lock, then _record_lock); saved with
        # the item's outcome right after.
        with self._record_lock:
            self._load()
            self._stopped[deployment_id] = self._clock()

    def _save(self) -> bool:
        """Write the record; False (logged once per failure streak) when it cannot be written."""
        self._prune()
        document = {"version": 1, "items": self._done, "stopped": self._stopped}
        try:
            fsutil.ensure_dir(self.settings.data_dir, 0o700)
            fsutil.atomic_write_json(self._path, document)
        except OSError as exc:
            # Kept in memory and not acknowledged: the CP re-delivers it, and it is
            # acknowledged once the record is on disk.
            if not self._save_failing:
                log.error("work queue: cannot write %s (%s); items are not acknowledged until it can be written", self._path, exc)
            self._save_failing = True
            return False
        if self._save_failing:
            log.info("work queue: %s is written again", self._path)
        self._save_failing = False
        self._unsaved = False
        return True


# --- helpers --------------------------------------------------------------------------------


def _parse_payload(raw: Any) -> dict[str, Any]:
    if isinstance(raw, str):
        try:
            value = decode_json(raw)
        except ValueError as exc:
            raise PayloadError(f"payload is not JSON: {exc}") from exc
    elif isinstance(raw, dict):  # tolerate a CP that sends the object itself
        value = raw
    elif raw is None:
        raise PayloadError("payload is missing")
    else:
        raise PayloadError(f"payload must be a JSON string, got {type(raw).__name__}")
    if not isinstance(value, dict):
        raise PayloadError(f"payload must be a JSON object, got {type(value).__name__}")
    return value


def _field(payload: Mapping[str, Any], key: str, check: Callable[[Any], str]) -> str:
    try:
        return check(payload.get(key))
    except InvalidValue as exc:
        raise PayloadError(f"{key}: {exc}") from exc


def _labels(info: Mapping[str, Any]) -> Mapping[str, str]:
    labels = (info.get("Config") or {}).get("Labels") or {}
    return labels if isinstance(labels, dict) else {}


def _volume_dir(root: Path, service_id: str) -> Path | None:
    """`root/service_id` if it exists and resolves strictly inside `root`; None if absent."""
    candidate = root / service_id
    if not candidate.exists() and not candidate.is_symlink():
        return None
    resolved_root = root.resolve()
    resolved = candidate.resolve()
    if resolved == resolved_root or resolved_root not in resolved.parents or candidate.is_symlink():
        raise PayloadError(f"refusing to delete {candidate}: it does not resolve to a directory inside {root}")
    if not resolved.is_dir():
        raise PayloadError(f"refusing to delete {candidate}: not a directory")
    return resolved


def _show(value: Any) -> str:
    """A type name safe for a log line (the CP's value is not trusted)."""
    if isinstance(value, str):
        return repr(value[:64])
    return f"<{type(value).__name__}>"
