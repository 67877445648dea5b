"""Build images from GitHub sources with Railpack + BuildKit (PROTOCOL.md §6.5-6.8, §13).

Why it is shaped like this (fixing §17 items 4, 10 and 15):

* One build at a time per server, guarded by a real lock taken before the first network
  call, not a flag set after the claim.
* The GitHub token never reaches an argv, a log line or an error: it is cut out of the
  clone URL and handed to git through `GIT_ASKPASS` (a tiny script in a 0700 directory
  that prints environment variables), with `HOME` pointed at that directory and
  credential helpers disabled so git stores it nowhere. The helper answers only prompts
  for the clone URL's own origin, git follows no redirect, and a URL that would send
  credentials over plain http:// is refused. Secret values reach `railpack`
  and `buildctl` through their environment only (`railpack prepare --env NAME` reads the
  value from the environment; `buildctl --secret id=NAME,env=NAME` likewise).
* Every command runs in its own process group under the whole-build deadline; timeout,
  cancellation in the UI (polled while the build runs) and agent shutdown kill the group.
* The tools run as root over the tenant's checkout and follow symlinks, so a checkout
  with a link that is absolute or leads outside it is refused before any tool reads it,
  and railpack writes its plan into a directory of the agent's, not into the checkout.
* A small record in the data dir says which build this server holds, so a build that an
  agent crash interrupted is reported `failed` on the next start instead of staying
  `claimed` forever, and a final status the control plane did not receive is re-sent.
  The record also names the running step's process group, so the step a killed agent
  left behind (the unit uses KillMode=process) is killed first, once proven ours.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from agent import crypto, fsutil, validate
from agent.api import ApiError, Rejected
from agent.host.run import CommandError, CommandNotFound, kill_group, popen, run
from agent.logship import BuildLogStream
from agent.observe import Observer

log = logging.getLogger(__name__)

#: The BuildKit frontend of §13.4 and the railpack CLI release it belongs to: one railpack
#: release makes both, and a plan from another CLI release may not mean the same to this
#: frontend. What builds.py relies on in the CLI (0.15.4): `prepare DIR --plan-out FILE`
#: (creates FILE's directory, writes JSON) and `--env NAME`, which takes NAME's value from
#: railpack's own environment. A different installed CLI gets a warning in the build log.
RAILPACK_VERSION = "0.15.4"
RAILPACK_FRONTEND = f"ghcr.io/railwayapp/railpack-frontend:v{RAILPACK_VERSION}"
PLAN_FILE = "railpack-plan.json"
PLAN_DIR_PREFIX = ".plan-"
#: Put into every build step's environment (value: the build id) to recognise it after a restart.
BUILD_MARKER = "TECHULUS_BUILD_ID"
_STEP_COMMANDS = frozenset({"git", "railpack", "buildctl"})
STATE_FILE = "build-in-progress.json"
CLEANUP_INTERVAL = 3600.0
STALE_AFTER = 3600.0
MAX_ERROR = 1000

_SHA = re.compile(r"[0-9a-fA-F]{7,40}\Z")
_VERSION = re.compile(r"\bv?(\d+\.\d+\.\d+)\b")
_BRANCH = re.compile(r"[A-Za-z0-9._/+-]{1,255}\Z")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")

# Secret names that would change how the build tools themselves behave if they landed in
# their environment (the values are put there verbatim): refused with a build-log line.
_RESERVED_ENV = frozenset({
    "PATH", "HOME", "SHELL", "USER", "LOGNAME", "PWD", "IFS", "ENV", "BASH_ENV", "TMPDIR", "TERM",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy", "all_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "GODEBUG", "GOMAXPROCS", "GOTRACEBACK", "GOGC", "TZ",
})
_RESERVED_PREFIXES = ("LD_", "GIT_", "BUILDKIT_", "BUILDCTL_", "DOCKER_", "XDG_", "TECHULUS_", "GCONV_", "MALLOC_")

# Answers git's credential prompts from the environment (nothing secret is in this file),
# and only for the clone URL's own origin: git's prompt is `Password for
# 'https://user@host:port': `, and a prompt for any other origin (a redirect, a submodule)
# gets no answer, so git fails instead of handing the token to someone else.
ASKPASS_SCRIPT = """#!/bin/sh
url=${1#*\\'}
url=${url%\\'*}
rest=${url#*://}
origin="${url%%://*}://${rest##*@}"
[ "$origin" = "$TECHULUS_GIT_ORIGIN" ] || exit 1
case "$1" in
  Username*) printf '%s\\n' "$TECHULUS_GIT_USERNAME" ;;
  Password*) printf '%s\\n' "$TECHULUS_GIT_PASSWORD" ;;
  *) exit 1 ;;
esac
"""


class BuildError(Exception):
    """A build failed; the message is safe to show (no credentials) and goes to the CP."""


class BuildAborted(BuildError):
    """Cancelled in the UI, timed out or interrupted by agent shutdown."""


# --- validated input -------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    username: str = field(repr=False, default="")
    password: str = field(repr=False, default="")

    def __bool__(self) -> bool:
        return bool(self.username or self.password)


@dataclass(frozen=True)
class ClaimedBuild:
    id: str
    commit_sha: str
    branch: str
    service_id: str
    project_id: str
    clone_url: str  # without credentials
    credentials: Credentials
    image_uri: str
    secrets: Mapping[str, str] = field(repr=False, default_factory=dict)  # still encrypted


def split_credentials(url: Any) -> tuple[str, Credentials]:
    """`https://user:token@host/x.git` -> (`https://host/x.git`, credentials); only http(s)."""
    if not isinstance(url, str) or not url or _CONTROL.search(url):
        raise BuildError("cloneUrl is missing or contains spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise BuildError(f"cloneUrl must be an http(s) URL, not {parts.scheme or 'a bare path'}://…")
    host = parts.hostname
    if not host:
        raise BuildError("cloneUrl has no host")
    try:
        port = parts.port
    except ValueError as exc:
        raise BuildError("cloneUrl has an invalid port") from exc
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    creds = Credentials(unquote(parts.username or ""), unquote(parts.password or ""))
    if creds and parts.scheme != "https":
        # Anyone on the path would read the installation token off the wire.
        raise BuildError("cloneUrl carries credentials over plain http://; refusing to send them unencrypted (use https://)")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")), creds


def askpass_origin(clone_url: str) -> str:
    """`scheme://host[:port]` of a credential-free clone URL, as git names it in its prompts."""
    parts = urlsplit(clone_url)
    return f"{parts.scheme}://{parts.netloc}"


def parse_claim(answer: Any, build_id: str) -> ClaimedBuild:
    """Validate the claim answer (§6.6); raises BuildError naming the bad field."""
    if not isinstance(answer, dict) or not isinstance(answer.get("build"), dict):
        raise BuildError("claim answer has no build object")
    build = answer["build"]
    if build.get("id") not in (None, build_id):
        raise BuildError("claim answer is for a different build")
    sha = build.get("commitSha") or "HEAD"
    if not isinstance(sha, str) or (sha != "HEAD" and not _SHA.match(sha)):
        raise BuildError(f"commitSha {str(sha)[:50]!r} is neither HEAD nor a hex commit id")
    branch = build.get("branch") or "main"
    if not isinstance(branch, str) or not valid_branch(branch):
        raise BuildError(f"branch {str(branch)[:80]!r} is not a valid git branch name")
    try:
        service_id = validate.identifier(build.get("serviceId"), "serviceId")
        project_id = validate.identifier(build.get("projectId"), "projectId")
        image = validate.image_reference(answer.get("imageUri"))
    except ValueError as exc:
        raise BuildError(str(exc)) from exc
    if image.startswith("-") or "," in image:
        raise BuildError("imageUri is not a valid image reference")
    url, creds = split_credentials(answer.get("cloneUrl"))
    raw_secrets = answer.get("secrets") or {}
    if not isinstance(raw_secrets, dict):
        raise BuildError("secrets must be an object")
    secrets: dict[str, str] = {}
    for key, value in raw_secrets.items():
        if isinstance(key, str) and isinstance(value, str):
            secrets[key] = value
    return ClaimedBuild(build_id, sha.lower() if sha != "HEAD" else sha, branch, service_id, project_id, url, creds, image, secrets)


def valid_branch(name: str) -> bool:
    """A safe subset of git's ref-name rules; nothing that could read as an option."""
    return bool(
        _BRANCH.match(name)
        and not name.startswith(("-", "/", "."))
        and not name.endswith(("/", ".", ".lock"))
        and ".." not in name
        and "//" not in name
        and "/." not in name
    )


def secrets_hash(secrets: Mapping[str, str]) -> str:
    """§13.4: sha256 over `K=V\\n` for the keys in ascending order."""
    text = "".join(f"{key}={secrets[key]}\n" for key in sorted(secrets))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def reserved_env_name(name: str) -> bool:
    return name in _RESERVED_ENV or name.startswith(_RESERVED_PREFIXES)


def buildkit_output(image: str, insecure: bool) -> str:
    return f"type=image,name={image},push=true" + (",registry.insecure=true" if insecure else "")


def dockerfile_argv(addr: str, output: str, secret_names: list[str], buildctl: str = "buildctl") -> list[str]:
    argv = [buildctl, "--addr", addr, "build", "--frontend", "dockerfile.v0",
            "--local", "context=.", "--local", "dockerfile=.", "--output", output]
    for name in secret_names:
        argv += ["--secret", f"id={name},env={name}"]
    return argv


def railpack_prepare_argv(secret_names: list[str], plan_dir: str, railpack: str = "railpack") -> list[str]:
    # Deviation from §13.4 (`--plan-out railpack-plan.json`, inside the checkout): railpack
    # runs as root and writes the plan with a plain open-and-truncate that follows symlinks,
    # so a committed `railpack-plan.json -> /etc/passwd` would overwrite a host file. The
    # plan goes to a directory the agent owns instead.
    argv = [railpack, "prepare", ".", "--plan-out", os.path.join(plan_dir, PLAN_FILE)]
    for name in secret_names:
        argv += ["--env", name]  # bare name: railpack reads the value from its environment
    return argv


def railpack_build_argv(
    addr: str,
    output: str,
    secrets: Mapping[str, str],
    plan_dir: str,
    buildctl: str = "buildctl",
    frontend: str = RAILPACK_FRONTEND,
) -> list[str]:
    # As §13.4 except `--local dockerfile=<plan_dir>` (not `.`): the plan is read from the
    # agent's own directory, never from the tenant's checkout (see railpack_prepare_argv).
    argv = [buildctl, "--addr", addr, "build", "--frontend", "gateway.v0", "--opt", f"source={frontend}",
            "--local", "context=.", "--local", f"dockerfile={plan_dir}", "--opt", f"filename={PLAN_FILE}", "--output", output]
    if secrets:
        argv += ["--opt", f"build-arg:secrets-hash={secrets_hash(secrets)}"]
    for name in sorted(secrets):
        argv += ["--secret", f"id={name},env={name}"]
    return argv


def check_symlinks(root: Path) -> None:
    """Refuse a checkout with a symlink that is absolute or resolves outside it.

    railpack (and anything else we run as root over the tree) reads and writes files by
    name and follows links: `.nvmrc -> /var/lib/techulus-agent/config.json` would copy the
    encryption key into the tenant-visible build log. Links inside the tree are fine.
    The top-level `.git` is git's own, written by us, and not walked.
    """
    top = str(root)
    real_root = os.path.realpath(top)

    def fail(error: OSError) -> None:
        raise BuildError(f"cannot inspect the checkout: {error.strerror or error}")

    for dirpath, dirnames, filenames in os.walk(top, onerror=fail, followlinks=False):
        if dirpath == top and ".git" in dirnames and not os.path.islink(os.path.join(top, ".git")):
            dirnames.remove(".git")
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                continue
            rel = os.path.relpath(path, top)
            try:
                target = os.readlink(path)
            except OSError as exc:
                raise BuildError(f"cannot read the symbolic link {rel!r} in the repository: {exc.strerror}") from exc
            resolved = os.path.realpath(path)
            inside = resolved == real_root or resolved.startswith(real_root.rstrip(os.sep) + os.sep)
            if os.path.isabs(target) or not inside:
                raise BuildError(
                    f"the repository contains a symbolic link that points outside it: {rel[:200]!r} -> {target[:200]!r}; "
                    "builds refuse such links (replace it with a copy of the file or a link inside the repository)"
                )


def _remove_no_follow(path: Path) -> bool:
    """Remove `path` itself (a link is unlinked, never followed); True when something was there."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path)  # rmtree does not follow links inside it either
    else:
        os.unlink(path)
    return True


# --- the worker ----------------------------------------------------------------------------------


@dataclass
class _Context:
    build: ClaimedBuild
    logs: BuildLogStream
    deadline: float
    workdir: Path
    redact: Callable[[str], str]
    cancelled: threading.Event = field(default_factory=threading.Event)
    pushing_seen: threading.Event = field(default_factory=threading.Event)
    pushing_reported: bool = False


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
        _kill_orphaned_step(state, build_id)
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
        """Where railpack writes the plan: the agent's, beside (not inside) the checkout.
        The leading dot keeps it from ever being a build id (those start with a letter or digit)."""
        return Path(self.settings.builds_dir) / f"{PLAN_DIR_PREFIX}{build_id}"

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
        ctx = _Context(build, logs, time.monotonic() + self.settings.build_timeout, workdir, redact)
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
            self._require_tool("buildctl")
            self._clone(ctx)
            self._check_cancel(ctx)
            self._report(ctx, "building")
            self._build_and_push(ctx, plaintext)
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

    def _report(self, ctx: _Context, status: str) -> None:
        try:
            answer = self.client.build_status(ctx.build.id, status)
        except ApiError as exc:
            log.warning("cannot report build %s as %s: %s", ctx.build.id, status, exc)
            return
        if isinstance(answer, dict) and answer.get("cancelled"):
            ctx.cancelled.set()
            self._check_cancel(ctx)

    def _watch_cancel(self, ctx: _Context, done: threading.Event) -> None:
        while not done.wait(self.cancel_poll_interval):
            try:
                if self.client.get_build_status(ctx.build.id) == "cancelled":
                    ctx.cancelled.set()
                    return
            except ApiError:
                continue  # any error counts as "not cancelled" (§6.8)

    def _check_cancel(self, ctx: _Context, ask: bool = True) -> None:
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

    def _decrypt(self, ctx: _Context) -> dict[str, str]:
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

    def _require_tool(self, name: str) -> None:
        if shutil.which(name) is None:
            raise BuildError(f"{name} is not installed on this server (not found on PATH); builds need {name}")

    # -- clone --

    def _clone(self, ctx: _Context) -> None:
        build = ctx.build
        self._require_tool("git")
        shutil.rmtree(ctx.workdir, ignore_errors=True)
        fsutil.ensure_dir(ctx.workdir.parent, 0o700)
        askpass_dir = Path(tempfile.mkdtemp(prefix=".git-auth-", dir=ctx.workdir.parent))  # 0700
        try:
            env = self._git_env(askpass_dir, build.credentials, build.clone_url)
            target = f"commit {build.commit_sha}" if build.commit_sha != "HEAD" else "latest commit"
            ctx.logs.line(f"Cloning {build.clone_url} (branch {build.branch}, {target})")
            self._step(ctx, ["git", "clone", "--depth", "1", "--branch", build.branch, "--", build.clone_url, str(ctx.workdir)], "git clone", env=env)
            if build.commit_sha != "HEAD":
                try:
                    self._step(ctx, ["git", "-C", str(ctx.workdir), "fetch", "--depth", "1", "origin", build.commit_sha], "git fetch", env=env)
                except BuildAborted:
                    raise
                except BuildError as exc:
                    ctx.logs.line(f"Fetching the commit directly failed ({exc}); fetching the branch history instead")
                    self._step(ctx, ["git", "-C", str(ctx.workdir), "fetch", "--unshallow", "origin", build.branch], "git fetch --unshallow", env=env)
                try:
                    self._step(ctx, ["git", "-C", str(ctx.workdir), "-c", "advice.detachedHead=false", "checkout", "--detach", build.commit_sha, "--"], "git checkout", env=env)
                except BuildAborted:
                    raise
                except BuildError as exc:
                    raise BuildError(f"commit {build.commit_sha} not found in {build.clone_url} (branch {build.branch})") from exc
            head = self._git_head(ctx, env)
            if build.commit_sha != "HEAD" and not head.startswith(build.commit_sha):
                raise BuildError(f"checked out {head} but the build asked for {build.commit_sha}")
            # Before any tool reads the tree, in both build modes (§17 item 4's cousin: root
            # tools following tenant symlinks).
            check_symlinks(ctx.workdir)
            ctx.logs.line(f"Clone completed at commit {head}")
        finally:
            shutil.rmtree(askpass_dir, ignore_errors=True)

    def _git_env(self, private_dir: Path, creds: Credentials, clone_url: str) -> dict[str, str]:
        env = {
            "HOME": str(private_dir),  # no ~/.gitconfig, no credential store of root's
            "XDG_CONFIG_HOME": str(private_dir),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_ALLOW_PROTOCOL": "http:https",
            "GIT_LFS_SKIP_SMUDGE": "1",
            # An empty helper clears any configured one: git keeps the token nowhere.
            "GIT_CONFIG_COUNT": "2",
            "GIT_CONFIG_KEY_0": "credential.helper",
            "GIT_CONFIG_VALUE_0": "",
            # No redirect is followed, not even git's default "initial" one: the token
            # must only ever go to the host the control plane named.
            "GIT_CONFIG_KEY_1": "http.followRedirects",
            "GIT_CONFIG_VALUE_1": "false",
            "GIT_ASKPASS": "",
            "SSH_ASKPASS": "",
        }
        if creds:
            script = private_dir / "askpass"
            fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
            with os.fdopen(fd, "w") as handle:
                handle.write(ASKPASS_SCRIPT)
            env.update({
                "GIT_ASKPASS": str(script),
                "TECHULUS_GIT_USERNAME": creds.username or "x-access-token",
                "TECHULUS_GIT_PASSWORD": creds.password,
                "TECHULUS_GIT_ORIGIN": askpass_origin(clone_url),
            })
        return env

    def _git_head(self, ctx: _Context, env: Mapping[str, str]) -> str:
        remaining = max(1.0, ctx.deadline - time.monotonic())
        try:
            result = run(["git", "-C", str(ctx.workdir), "rev-parse", "HEAD"], timeout=min(60.0, remaining), env=env)
        except CommandError as exc:
            raise BuildError(f"cannot read the checked-out commit: {ctx.redact(str(exc))}") from exc
        return result.stdout.strip().lower()

    # -- build and push --

    def _build_and_push(self, ctx: _Context, plaintext: Mapping[str, str]) -> None:
        build = ctx.build
        addr = self.settings.buildkit_host
        if not addr or addr.startswith("-") or _CONTROL.search(addr):
            raise BuildError(f"BUILDKIT_HOST {addr!r} is not a usable address")
        output = buildkit_output(build.image_uri, self.settings.registry_insecure_push)
        names = sorted(plaintext)
        env = dict(plaintext)
        dockerfile = ctx.workdir / "Dockerfile"
        if dockerfile.is_file() and not dockerfile.is_symlink():
            ctx.logs.line("Using existing Dockerfile")
            ctx.logs.line(f"Building and pushing {build.image_uri}")
            self._step(ctx, dockerfile_argv(addr, output, names), "buildctl build", env=env, watch_push=True)
            return
        ctx.logs.line("No Dockerfile found, using Railpack...")
        self._require_tool("railpack")
        try:
            if _remove_no_follow(ctx.workdir / PLAN_FILE):
                ctx.logs.line(f"Ignoring the {PLAN_FILE} committed in the repository: Railpack writes its own plan")
        except OSError as exc:
            raise BuildError(f"cannot remove {PLAN_FILE} from the checkout: {exc.strerror}") from exc
        self._check_railpack_version(ctx)
        plan_dir = self._plan_dir(build.id)
        shutil.rmtree(plan_dir, ignore_errors=True)
        os.mkdir(plan_dir, 0o700)
        self._step(ctx, railpack_prepare_argv(names, str(plan_dir)), "railpack prepare", env=env)
        plan = plan_dir / PLAN_FILE
        if not plan.is_file() or plan.is_symlink():
            raise BuildError("railpack prepare wrote no build plan")
        ctx.logs.line(f"Building and pushing {build.image_uri}")
        self._step(ctx, railpack_build_argv(addr, output, plaintext, str(plan_dir), frontend=self.settings.railpack_frontend or RAILPACK_FRONTEND), "buildctl build", env=env, watch_push=True)

    def _check_railpack_version(self, ctx: _Context) -> None:
        """Say so in the build log when the installed CLI is not the frontend's release."""
        try:
            result = run(["railpack", "--version"], timeout=max(1.0, min(30.0, ctx.deadline - time.monotonic())), check=False)
        except CommandError as exc:
            log.debug("cannot ask railpack for its version: %s", exc)
            return
        found = _VERSION.search(result.stdout or result.stderr)
        if found is None:
            log.debug("railpack --version printed no version: %r", (result.stdout or result.stderr)[:200])
            return
        if found.group(1) != RAILPACK_VERSION:
            message = (f"Warning: the installed railpack CLI is {found.group(1)}, but builds use the {RAILPACK_VERSION} "
                       "BuildKit frontend; their build plans may not agree (reinstall the agent's build tools)")
            ctx.logs.line(message)
            log.warning("build %s: %s", ctx.build.id, message)

    def _step(self, ctx: _Context, argv: list[str], what: str, *, env: Mapping[str, str], watch_push: bool = False) -> None:
        """Run one command of the build in its own process group, streaming its output."""
        self._check_cancel(ctx, ask=False)
        if time.monotonic() >= ctx.deadline:
            raise BuildAborted(f"build timed out after {self.settings.build_timeout:g}s (before {what})")
        # The marker lets a restarted agent tell this step's processes from whatever reuses
        # their ids later (see _kill_orphaned_step).
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

    def _wait_step(self, ctx: _Context, proc: Any, what: str, watch_push: bool) -> None:
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
        _kill_leftovers(proc.pid)
        reader.join(timeout=5)
        if not reason and proc.returncode == 0 and ctx.pushing_seen.is_set() and not ctx.pushing_reported:
            ctx.pushing_reported = True  # it finished faster than we looked: still say so
            self._report(ctx, "pushing")
        if reason:
            ctx.logs.line(f"{what} stopped: {reason}")
            raise BuildAborted(reason)
        code = proc.returncode
        if code != 0:
            detail = f"killed by signal {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
            last = "; ".join(line for line in tail[-3:] if line.strip())
            raise BuildError(f"{what} {detail}" + (f": {last}" if last else ""))

    @staticmethod
    def _pump(proc: Any, ctx: _Context, tail: list[str], watch_push: bool) -> None:
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
        now = time.time() if now is None else now
        removed = []
        directory = Path(self.settings.builds_dir)
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if self._current is not None and entry.name in (self._current, f"{PLAN_DIR_PREFIX}{self._current}"):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if now - info.st_mtime < STALE_AFTER:
                continue
            path = Path(entry.path)
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(entry.name)
        if removed:
            log.info("removed %d stale build director%s: %s", len(removed), "y" if len(removed) == 1 else "ies", ", ".join(removed))
        # No `podman image prune` here: it removes every unused image on the host, other
        # agents' and the operator's. Builds leave nothing in podman's storage (BuildKit
        # pushes); the agent's own pulls are collected by agent/host/images.py.
        return removed


def _kill_orphaned_step(state: Mapping[str, Any], build_id: str) -> list[int]:
    """Kill the process group of a step an earlier agent run left behind; returns the pids.

    Only what provably is ours dies: the group leader must still be the recorded command
    (git/railpack/buildctl) and carry our marker for this build in its environment; without
    a leader, only members carrying the marker are killed, one by one. A pid reused by
    anything else after a reboot or a long outage never matches.
    """
    pgid, command = state.get("pgid"), state.get("command")
    if not isinstance(pgid, int) or isinstance(pgid, bool) or pgid <= 1 or command not in _STEP_COMMANDS:
        return []
    members = _process_group(pgid)
    if not members:
        return []
    marker = f"{BUILD_MARKER}={build_id}".encode()
    if pgid in members and _runs(pgid, str(command)) and _has_env(pgid, marker):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError as exc:
            log.warning("cannot kill the orphaned %s of build %s (process group %d): %s", command, build_id, pgid, exc)
            return []
        log.warning("killed the %s of build %s left running by an earlier agent run (process group %d)", command, build_id, pgid)
        return members
    killed = []
    for pid in members:
        if _has_env(pid, marker):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                continue
    if killed:
        log.warning("killed %d leftover process(es) of build %s (process group %d)", len(killed), build_id, pgid)
    return killed


def _process_group(pgid: int, proc_root: str = "/proc") -> list[int]:
    """Pids of the live processes in process group `pgid`."""
    members = []
    try:
        names = os.listdir(proc_root)
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"{proc_root}/{name}/stat", "rb") as handle:
                text = handle.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = text[text.rfind(b")") + 1:].split()
        if len(fields) > 2 and fields[0] != b"Z" and fields[2] == str(pgid).encode():
            members.append(int(name))
    return members


def _runs(pid: int, command: str) -> bool:
    """The process runs `command` (argv[0], or the script an interpreter runs)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return False
    return command.encode() in {os.path.basename(arg) for arg in argv[:2]}


def _has_env(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return marker in handle.read().split(b"\0")
    except OSError:
        return False


def _kill_leftovers(pgid: int) -> None:
    """Whatever the step started in its process group and left running dies with it."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _signal_name(number: int) -> str:
    try:
        return f"{signal.Signals(number).name} ({number})"
    except ValueError:
        return str(number)


def _safe_name(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..")


_USERINFO = re.compile(r"(https?://)[^/@\s]+@")


def _strip_userinfo(text: str) -> str:
    """Any `scheme://user:pass@` that slipped into a message becomes `scheme://***@`."""
    return _USERINFO.sub(r"\1***@", text)
