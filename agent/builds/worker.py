"""The build worker (PROTOCOL.md §6.5-6.8): polls for a pending build, claims it, runs the
stages (checkout, build and push) under one deadline with cancellation, and keeps the
on-disk record that lets a restarted agent settle a build it was holding."""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent import crypto, fsutil, validate
from agent.api import ApiError, Rejected
from agent.builds.buildkit import build_and_push, plan_dir
from agent.builds.checkout import clone
from agent.builds.claim import BuildAborted, BuildError, ClaimedBuild, parse_claim, reserved_env_name
from agent.builds.cleanup import CLEANUP_INTERVAL, remove_stale
from agent.builds.context import BuildContext, require_tool
from agent.builds.process import BUILD_MARKER, kill_leftovers, kill_orphaned_step, signal_name
from agent.host.run import CommandNotFound, kill_group, popen
from agent.logship.buildlogs import BuildLogStream
from agent.observe import Observer

log = logging.getLogger(__name__)

STATE_FILE = "build-in-progress.json"
MAX_ERROR = 1000


class BuildWorker:
    observer: Observer = Observer()  # runtime gives it the Publisher (agent status, metrics)

    def __init__(
        self,
        settings: Any,
        client: Any,
        encryption_key: str,
        *,
        cancel_poll_interval: float = 10.0,
    ) -> None:
        self.settings = settings
        self.client = client
        self.encryption_key = encryption_key
        self.cancel_poll_interval = cancel_poll_interval
        self.state_path = Path(settings.data_dir) / STATE_FILE
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._current: str | None = None

    # -- loop --

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        next_cleanup = time.monotonic()  # once at start: removes what a crash left behind
        while not stop.is_set():
            built = False
            try:
                built = self.poll_once()
            except Exception:  # noqa: BLE001 - the worker must outlive any single failure
                log.exception("build poll failed")
            if time.monotonic() >= next_cleanup:
                try:
                    self.cleanup_once()
                except Exception:  # noqa: BLE001
                    log.exception("build cleanup failed")
                next_cleanup = time.monotonic() + CLEANUP_INTERVAL
            if not built:
                stop.wait(self.settings.build_poll_interval)

    def poll_once(self) -> bool:
        """Recover, then look for one pending build and run it; True when one was handled."""
        if not self._lock.acquire(blocking=False):
            log.debug("a build is already running on this server")
            return False
        try:
            if not self._recover():
                return False
            try:
                pending = self.client.pending_build()
            except ApiError as exc:
                log.warning("cannot fetch pending builds: %s", exc)
                return False
            if not pending:
                return False
            try:
                build_id = validate.identifier(pending.get("id"), "build id")
            except ValueError as exc:
                log.error("ignoring a pending build with an invalid id: %s", exc)
                return False
            return self._claim_and_build(build_id)
        finally:
            self._lock.release()

    # -- the on-disk record --

    def _write_state(self, build_id: str, phase: str, status: str = "", error: str = "", **extra: Any) -> None:
        self.observer.build(build_id, phase, status)
        fsutil.ensure_dir(self.state_path.parent, 0o700)
        fsutil.atomic_write_json(self.state_path, {"buildId": build_id, "phase": phase, "status": status, "error": error, **extra})

    def _clear_state(self) -> None:
        self.observer.build(None)
        try:
            self.state_path.unlink()
        except FileNotFoundError:
            pass

    def _recover(self) -> bool:
        """Settle a build left by an earlier run; False while that is not yet possible."""
        try:
            state = fsutil.read_json(self.state_path)
        except (ValueError, OSError) as exc:
            log.error("discarding unreadable %s: %s", self.state_path, exc)
            self._clear_state()
            return True
        if state is None:
            return True
        build_id = state.get("buildId") if isinstance(state, dict) else None
        if not isinstance(build_id, str) or not build_id:
            self._clear_state()
            return True
        # The unit stops only the agent's own process (KillMode=process) and a crash kills
        # nothing: the step that was running may still be, under nobody's deadline.
        kill_orphaned_step(state, build_id)
        if state.get("phase") == "finished" and state.get("status") in ("completed", "failed"):
            status, error = state["status"], str(state.get("error") or "")
        else:
            status, error = "failed", "the build was interrupted because the agent stopped or crashed; start it again"
        try:
            self.client.build_status(build_id, status, error)
            log.warning("reported build %s as %s after an agent restart", build_id, status)
        except Rejected as exc:
            log.info("build %s left by an earlier run is not ours any more (%s)", build_id, exc)
        except ApiError as exc:
            log.warning("cannot report the interrupted build %s yet: %s", build_id, exc)
            return False
        self._clear_state()
        if _safe_name(build_id):
            shutil.rmtree(Path(self.settings.builds_dir) / build_id, ignore_errors=True)
            shutil.rmtree(self._plan_dir(build_id), ignore_errors=True)
        return True

    def _plan_dir(self, build_id: str) -> Path:
        return plan_dir(self.settings.builds_dir, build_id)

    # -- one build --

    def _claim_and_build(self, build_id: str) -> bool:
        # The record is written before the claim: if we die before the answer arrives we
        # still report the build on restart (the CP answers 404 if it was never ours).
        self._write_state(build_id, "claiming")
        try:
            answer = self.client.claim_build(build_id)
        except Rejected as exc:
            log.warning("claiming build %s failed: %s", build_id, exc)
            # The CP marks the build claimed before some of these errors (§6.6): report it
            # failed so it does not stay claimed forever.
            self._finish(build_id, "failed", f"claim failed: {exc}")
            return True
        except ApiError as exc:
            log.warning("claiming build %s failed: %s", build_id, exc)
            self._recover()
            return False
        if answer is None:
            log.info("build %s was claimed by another server", build_id)
            self._clear_state()
            return False
        try:
            build = parse_claim(answer, build_id)
        except BuildError as exc:
            log.error("build %s: %s", build_id, exc)
            self._finish(build_id, "failed", f"invalid build data from the control plane: {exc}")
            return True
        self._write_state(build_id, "running")
        status, error = self._build(build)
        self._finish(build_id, status, error)
        return True

    def _finish(self, build_id: str, status: str, error: str) -> None:
        self._write_state(build_id, "finished", status, error)
        try:
            self.client.build_status(build_id, status, error)
        except Rejected as exc:
            log.warning("control plane refused the final status of build %s: %s", build_id, exc)
        except ApiError as exc:
            log.warning("cannot report build %s as %s yet (will retry): %s", build_id, status, exc)
            return
        self._clear_state()

    def _build(self, build: ClaimedBuild) -> tuple[str, str]:
        secrets_to_hide = [s for s in (build.credentials.password,) if s]

        def redact(text: str) -> str:
            for secret in secrets_to_hide:
                text = text.replace(secret, "***")
            return _strip_userinfo(text)

        logs = BuildLogStream(self.settings.logs_endpoint, build.id, build.service_id, build.project_id, redact=redact)
        workdir = self.settings.builds_dir / build.id
        ctx = BuildContext(build, logs, time.monotonic() + self.settings.build_timeout, workdir, redact)
        watcher_stop = threading.Event()
        watcher = threading.Thread(target=self._watch_cancel, args=(ctx, watcher_stop), name=f"build-cancel-{build.id[:8]}", daemon=True)
        self._current = build.id
        started = time.monotonic()
        try:
            self._report(ctx, "cloning")
            watcher.start()
            plaintext = self._decrypt(ctx)
            secrets_to_hide.extend(v for v in plaintext.values() if len(v) >= 4)
            self._check_cancel(ctx)
            require_tool("buildctl")
            clone(ctx, self._step)
            self._check_cancel(ctx)
            self._report(ctx, "building")
            build_and_push(ctx, self.settings, plaintext, self._step)
            logs.line(f"Build completed in {time.monotonic() - started:.0f}s: {build.image_uri}")
            log.info("build %s completed: %s", build.id, build.image_uri)
            return "completed", ""
        except BuildError as exc:
            message = redact(str(exc))[:MAX_ERROR]
            logs.line(f"Build failed: {message}")
            log.warning("build %s failed: %s", build.id, message)
            return "failed", message
        except Exception as exc:  # noqa: BLE001 - report, never leave the build hanging
            log.exception("build %s crashed", build.id)
            message = redact(f"internal agent error: {type(exc).__name__}: {exc}")[:MAX_ERROR]
            logs.line(f"Build failed: {message}")
            return "failed", message
        finally:
            watcher_stop.set()
            self._current = None
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.rmtree(self._plan_dir(build.id), ignore_errors=True)
            logs.close()

    def _report(self, ctx: BuildContext, status: str) -> None:
        try:
            answer = self.client.build_status(ctx.build.id, status)
        except ApiError as exc:
            log.warning("cannot report build %s as %s: %s", ctx.build.id, status, exc)
            return
        if isinstance(answer, dict) and answer.get("cancelled"):
            ctx.cancelled.set()
            self._check_cancel(ctx)

    def _watch_cancel(self, ctx: BuildContext, done: threading.Event) -> None:
        while not done.wait(self.cancel_poll_interval):
            try:
                if self.client.get_build_status(ctx.build.id) == "cancelled":
                    ctx.cancelled.set()
                    return
            except ApiError:
                continue  # any error counts as "not cancelled" (§6.8)

    def _check_cancel(self, ctx: BuildContext, ask: bool = True) -> None:
        if ask and not ctx.cancelled.is_set():
            try:
                if self.client.get_build_status(ctx.build.id) == "cancelled":
                    ctx.cancelled.set()
            except ApiError:
                pass
        if ctx.cancelled.is_set():
            raise BuildAborted("build cancelled")
        if self._stop.is_set():
            raise BuildAborted("the agent is shutting down; build interrupted")

    def _decrypt(self, ctx: BuildContext) -> dict[str, str]:
        plaintext: dict[str, str] = {}
        for name, blob in sorted(ctx.build.secrets.items()):
            try:
                validate.env_key(name)
            except ValueError:
                ctx.logs.line(f"Skipping secret {name[:64]!r}: not a valid environment variable name")
                continue
            if reserved_env_name(name):
                ctx.logs.line(f"Skipping secret {name}: that name would change how the build tools run")
                continue
            try:
                plaintext[name] = crypto.decrypt_secret(self.encryption_key, blob)
            except crypto.SecretError as exc:
                log.warning("build %s: secret %s skipped: %s", ctx.build.id, name, exc)
                ctx.logs.line(f"Skipping secret {name}: it cannot be decrypted ({exc})")
        return plaintext


    # -- running one step --

    def _step(self, ctx: BuildContext, argv: list[str], what: str, *, env: Mapping[str, str], watch_push: bool = False) -> None:
        """Run one command of the build in its own process group, streaming its output."""
        self._check_cancel(ctx, ask=False)
        if time.monotonic() >= ctx.deadline:
            raise BuildAborted(f"build timed out after {self.settings.build_timeout:g}s (before {what})")
        # The marker lets a restarted agent tell this step's processes from whatever reuses
        # their ids later (see process.kill_orphaned_step).
        child_env = {**env, BUILD_MARKER: ctx.build.id}
        try:
            proc = popen(argv, env=child_env, cwd=str(ctx.workdir) if ctx.workdir.is_dir() else None, merge_stderr=True)
        except CommandNotFound as exc:
            raise BuildError(f"{argv[0]} is not installed on this server (not found on PATH)") from exc
        except OSError as exc:
            raise BuildError(f"cannot start {what}: {exc}") from exc
        try:
            # popen makes the child a session (and so process group) leader: pgid == pid.
            self._write_state(ctx.build.id, "running", pgid=proc.pid, command=os.path.basename(argv[0]))
        except OSError as exc:
            log.warning("cannot record the running build step in %s: %s", self.state_path, exc)
        try:
            self._wait_step(ctx, proc, what, watch_push)
        finally:
            if proc.poll() is None:  # only on an unexpected error: never leave it running
                kill_group(proc)
                proc.wait()
            try:
                self._write_state(ctx.build.id, "running")
            except OSError as exc:
                log.warning("cannot update %s: %s", self.state_path, exc)

    def _wait_step(self, ctx: BuildContext, proc: Any, what: str, watch_push: bool) -> None:
        tail: list[str] = []
        reader = threading.Thread(target=self._pump, args=(proc, ctx, tail, watch_push), name="build-output", daemon=True)
        reader.start()
        reason = ""
        while proc.poll() is None:
            if ctx.cancelled.is_set():
                reason = "build cancelled"
            elif self._stop.is_set():
                reason = "the agent is shutting down; build interrupted"
            elif time.monotonic() >= ctx.deadline:
                reason = f"build timed out after {self.settings.build_timeout:g}s (during {what})"
            if reason:
                kill_group(proc)
                proc.wait()
                break
            if ctx.pushing_seen.is_set() and not ctx.pushing_reported:
                ctx.pushing_reported = True
                self._report(ctx, "pushing")
            time.sleep(0.1)
        kill_leftovers(proc.pid)
        reader.join(timeout=5)
        if not reason and proc.returncode == 0 and ctx.pushing_seen.is_set() and not ctx.pushing_reported:
            ctx.pushing_reported = True  # it finished faster than we looked: still say so
            self._report(ctx, "pushing")
        if reason:
            ctx.logs.line(f"{what} stopped: {reason}")
            raise BuildAborted(reason)
        code = proc.returncode
        if code != 0:
            detail = f"killed by signal {signal_name(-code)}" if code < 0 else f"exited with code {code}"
            last = "; ".join(line for line in tail[-3:] if line.strip())
            raise BuildError(f"{what} {detail}" + (f": {last}" if last else ""))

    @staticmethod
    def _pump(proc: Any, ctx: BuildContext, tail: list[str], watch_push: bool) -> None:
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                ctx.logs.line(line)
                tail.append(ctx.redact(line)[:300])
                del tail[:-5]
                if watch_push and "pushing" in line.lower():
                    ctx.pushing_seen.set()
        except (OSError, ValueError):
            pass
        finally:
            proc.stdout.close()

    # -- cleanup (§13.6) --

    def cleanup_once(self, now: float | None = None) -> list[str]:
        """Remove build directories older than an hour (never the running one)."""
        return remove_stale(self.settings.builds_dir, self._current, now)


def _safe_name(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..")


_USERINFO = re.compile(r"(https?://)[^/@\s]+@")


def _strip_userinfo(text: str) -> str:
    """Any `scheme://user:pass@` that slipped into a message becomes `scheme://***@`."""
    return _USERINFO.sub(r"\1***@", text)

