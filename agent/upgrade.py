"""`agent upgrade`: replace the installed agent with a new build, and keep it only if it proves healthy.

Why a transaction: a fleet upgrade must never leave a server without a working agent. So:

1. Fetch the new zipapp (`--binary URL|FILE`; TLS verified, at most MAX_BINARY_BYTES and
   DOWNLOAD_TIMEOUT seconds) into `<install dir>/.staging/agent.pyz`, verify its SHA-256
   (`--sha256`, else the SHA256SUMS beside it) and, when a release key is installed
   (`/etc/techulus-agent/release-signing.pub`, written by install.sh when build.sh signed
   the build), its detached Ed25519 signature (`<binary>.sig`, 64 raw bytes). Then run its
   `--version` (which also pre-extracts it under SHIV_ROOT). Any failure here changes
   nothing installed: the outcome is `refused`.
2. Swap: `agent.pyz.previous` becomes a hard link to the running binary, then the staged
   file is renamed over `agent.pyz` (same directory, atomic). The health marker is deleted.
3. `systemctl restart --no-block techulus-agent`: with `KillMode=process` only the agent's
   own process is signalled, never conmon or a container.
4. Watch, for at most `--timeout` seconds. The new agent is healthy when the unit is
   `active` (Type=notify: READY=1 was sent) and the health marker (`health.json` in the
   data dir) names the unit's current MainPID. The agent writes that marker itself after
   its first tick whose poll succeeded (standalone: its first pass), through the `on_tick`
   hook `HealthMarker` (so identity was loaded and the control plane answered).
5. Commit, or roll back: a new agent that exits (the unit goes to auto-restart or fails)
   is rolled back at once; one that hangs before READY or never completes a poll is rolled
   back when the bound runs out; so is the watch interrupted by SIGINT/SIGTERM. Rolling
   back renames `previous` back over `agent.pyz` and restarts the unit again.

The supervisor is this command itself, in the foreground (SIGHUP is ignored, so a dropped
SSH session does not end it; install.sh re-runs call it the same way). Its backstop is on
systemd's side: should the command die before deciding (SIGKILL, a reboot), the record stays
`in_progress` with a `deadline_epoch`, and the unit's ExecStartPre (installer/upgrade-guard)
decides at the next start after that deadline — and a new build that exits or hangs before
READY keeps being (re)started by systemd (Restart=always, TimeoutStartSec): it keeps the new
build if it wrote the health marker, else renames `previous` back. (A build that sends READY
but never polls is not restarted, so only this command catches that one.)

The outcome — committed, rolled_back or refused, why, both versions and checksums, times —
goes to the journal (with OBJECT_SYSTEMD_UNIT, so `journalctl -u techulus-agent` shows it)
and to `upgrade-state.json` in the data dir (atomic; `Record`, read by `last_outcome()`),
which `agent status` reads.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import sys
import threading
import time
import urllib.parse
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Protocol

from agent import __version__, sdnotify
from agent.fsutil import atomic_write_json, read_json
from agent.host.run import CommandError, run

log = logging.getLogger(__name__)

INSTALL_DIR = Path("/usr/local/lib/techulus-agent")
PUBLIC_KEY = Path("/etc/techulus-agent/release-signing.pub")
UNIT = "techulus-agent.service"
BINARY = "agent.pyz"
PREVIOUS = "agent.pyz.previous"
STATE_FILE = "upgrade-state.json"
HEALTH_FILE = "health.json"
MAX_BINARY_BYTES = 256 * 1024 * 1024
DOWNLOAD_TIMEOUT = 300.0
HEALTH_TIMEOUT = 90.0
#: How long to wait for the rolled-back agent to be healthy again before saying it is not.
RECOVERY_TIMEOUT = 60.0
POLL_INTERVAL = 0.5
SIGNATURE_BYTES = 64


class UpgradeRefused(Exception):
    """The new binary cannot be used; nothing installed was changed."""


@dataclass(frozen=True)
class Options:
    binary: str
    data_dir: Path
    sha256: str = ""
    signature: str = ""
    timeout: float = HEALTH_TIMEOUT
    install_dir: Path = INSTALL_DIR
    public_key: Path = PUBLIC_KEY
    unit: str = UNIT
    python: str = sys.executable or "/usr/bin/python3"


# --- the health marker (written by the running agent) -----------------------------------------


class _HasLastGood(Protocol):
    last_good: Any


class HealthMarker:
    """`on_tick` hook of the reconcile loop: after the first tick whose poll succeeded, write
    `health.json` once. A successful poll replaces `last_good` with a new document (a
    failed one leaves it), so comparing identities tells one from the other without
    touching the loop."""

    def __init__(self, data_dir: Path, reconciler: _HasLastGood) -> None:
        self.path = data_dir / HEALTH_FILE
        self.reconciler = reconciler
        self._baseline = reconciler.last_good  # a state restored from the cache is not a poll
        self.written = False

    def __call__(self) -> None:
        if self.written or self.reconciler.last_good is self._baseline:
            return
        self.written = True
        try:
            atomic_write_json(self.path, {"pid": os.getpid(), "version": __version__, "at": _now()}, 0o644)
        except OSError as exc:
            log.warning("cannot write the health marker %s: %s", self.path, exc)


# --- fetching and verifying ------------------------------------------------------------------


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _local_path(source: str) -> Path:
    return Path(urllib.parse.urlparse(source).path) if source.startswith("file://") else Path(source)


def fetch(source: str, dest: Path, limit: int = MAX_BINARY_BYTES, timeout: float = DOWNLOAD_TIMEOUT) -> None:
    """Copy a URL or a local file to `dest`, refusing more than `limit` bytes or `timeout` s."""
    if not _is_url(source):
        path = _local_path(source)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise UpgradeRefused(f"cannot read {path}: {exc.strerror or exc}") from None
        if size > limit:
            raise UpgradeRefused(f"{path} is {size} bytes, more than the {limit} allowed")
        shutil.copyfile(path, dest)
        return
    import urllib3

    deadline = time.monotonic() + timeout
    http = urllib3.PoolManager(
        cert_reqs="CERT_REQUIRED", timeout=urllib3.Timeout(connect=15, read=60), retries=urllib3.Retry(2, redirect=5)
    )
    try:
        response = http.request("GET", source, preload_content=False)
    except urllib3.exceptions.HTTPError as exc:
        raise UpgradeRefused(f"cannot download {source}: {exc}") from None
    try:
        if response.status != 200:
            raise UpgradeRefused(f"cannot download {source}: HTTP {response.status}")
        received = 0
        with open(dest, "wb") as handle:
            for chunk in response.stream(1024 * 1024):
                received += len(chunk)
                if received > limit:
                    raise UpgradeRefused(f"{source} is larger than the {limit} bytes allowed")
                if time.monotonic() > deadline:
                    raise UpgradeRefused(f"downloading {source} took longer than {timeout:g}s")
                handle.write(chunk)
    except urllib3.exceptions.HTTPError as exc:
        raise UpgradeRefused(f"cannot download {source}: {exc}") from None
    finally:
        response.release_conn()


def _beside(source: str, name: str) -> str:
    """The URL or path of `name` in the same directory as `source`."""
    if _is_url(source):
        return urllib.parse.urljoin(source, name)
    return str(_local_path(source).with_name(name))


def _basename(source: str) -> str:
    return Path(urllib.parse.urlparse(source).path if _is_url(source) else _local_path(source)).name


def _read_small(source: str, scratch: Path, what: str, limit: int = 1024 * 1024) -> bytes:
    try:
        fetch(source, scratch, limit=limit, timeout=60)
        return scratch.read_bytes()
    except UpgradeRefused as exc:
        raise UpgradeRefused(f"no {what}: {exc}") from None
    finally:
        scratch.unlink(missing_ok=True)


def expected_sha256(options: Options, scratch: Path) -> str:
    """`--sha256`, else the entry for the binary's name in SHA256SUMS beside it."""
    if options.sha256:
        return options.sha256.lower()
    sums_source = _beside(options.binary, "SHA256SUMS")
    text = _read_small(sums_source, scratch, f"checksum (give --sha256 or publish {sums_source})").decode(errors="replace")
    name = _basename(options.binary)
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == name and len(parts[0]) == 64:
            return parts[0].lower()
    raise UpgradeRefused(f"{sums_source} has no entry for {name}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_signature(binary: Path, signature: bytes, public_key_pem: bytes) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(public_key_pem)
    except ValueError as exc:
        raise UpgradeRefused(f"the installed release key is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UpgradeRefused("the installed release key is not an Ed25519 key")
    if len(signature) != SIGNATURE_BYTES:
        raise UpgradeRefused(f"the signature is {len(signature)} bytes, not {SIGNATURE_BYTES}")
    try:
        key.verify(signature, binary.read_bytes())
    except InvalidSignature:
        raise UpgradeRefused("the signature does not match the installed release key") from None


def build_id(zipapp: Path) -> str:
    """shiv's build id (it names the extraction dir)."""
    import json

    with zipfile.ZipFile(zipapp) as archive:
        return str(json.loads(archive.read("environment.json"))["build_id"])


# --- systemd ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitState:
    active: str
    sub: str
    main_pid: int
    exit_status: str


class Systemd:
    def __init__(self, unit: str) -> None:
        self.unit = unit

    def restart(self) -> None:
        # --no-block: a new agent that hangs before READY would block `restart` until the
        # unit's TimeoutStartSec; the watch below has its own, shorter bound.
        run(["systemctl", "restart", "--no-block", self.unit], timeout=30)

    def state(self) -> UnitState:
        result = run(
            ["systemctl", "show", "-p", "ActiveState,SubState,MainPID,ExecMainStatus", self.unit], timeout=15
        )
        values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        return UnitState(
            values.get("ActiveState", ""),
            values.get("SubState", ""),
            _int(values.get("MainPID", "0")),
            values.get("ExecMainStatus", ""),
        )


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


# --- the transaction -------------------------------------------------------------------------


@dataclass
class Record:
    """What `upgrade-state.json` holds (read by `agent status`)."""

    outcome: str  # in_progress | committed | rolled_back | refused | unchanged
    reason: str
    from_version: str
    to_version: str
    from_sha256: str
    to_sha256: str
    source: str
    started_at: str
    finished_at: str = ""
    seconds: float = 0.0
    # While in_progress: when installer/upgrade-guard may decide in this command's place.
    deadline_epoch: int = 0


class Interrupted(Exception):
    pass


class Upgrade:
    def __init__(
        self,
        options: Options,
        systemd: Systemd | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.options = options
        self.systemd = systemd or Systemd(options.unit)
        self.clock = clock
        self.sleep = sleep
        self.current = options.install_dir / BINARY
        self.previous = options.install_dir / PREVIOUS
        self.staging = options.install_dir / ".staging"
        self.state_path = options.data_dir / STATE_FILE
        self.marker = options.data_dir / HEALTH_FILE

    def run(self) -> Record:
        """The whole transaction; returns (and records) its outcome."""
        started, started_at = self.clock(), _now()
        record = Record("refused", "", self._version(self.current), "", _sha_or_empty(self.current), "",
                        self.options.binary, started_at)
        with self._lock():
            try:
                staged = self._stage(record)
            except UpgradeRefused as exc:
                record.reason = str(exc)
                shutil.rmtree(self.staging, ignore_errors=True)
                return self._finish(record, started)
            if record.to_sha256 == record.from_sha256:
                shutil.rmtree(self.staging, ignore_errors=True)
                record.outcome, record.reason = "unchanged", "this build is already installed"
                log.info("%s is already installed; nothing to do", record.to_version)
                return record
            record.outcome = "in_progress"
            record.deadline_epoch = int(time.time() + self.options.timeout + RECOVERY_TIMEOUT)
            self._write(record)
            self._swap(staged)
            try:
                healthy, why = self._watch()
            except Interrupted as exc:
                healthy, why = False, str(exc)
            except CommandError as exc:  # systemctl itself failed: the new build is unproven
                healthy, why = False, f"cannot restart or watch {self.options.unit}: {exc}"
            if healthy:
                record.outcome, record.reason = "committed", why
            else:
                record.outcome, record.reason = "rolled_back", why
                record.reason += self._roll_back()
            self._prune()
            return self._finish(record, started)

    # -- steps --

    def _stage(self, record: Record) -> Path:
        options = self.options
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(mode=0o700, parents=True)
        staged = self.staging / BINARY
        fetch(options.binary, staged)
        want = expected_sha256(options, self.staging / "SHA256SUMS")
        got = sha256_file(staged)
        record.to_sha256 = got
        if got != want:
            raise UpgradeRefused(f"checksum mismatch for {options.binary}: expected {want}, got {got}")
        if options.public_key.exists():
            sig_source = options.signature or options.binary + ".sig"
            signature = _read_small(sig_source, self.staging / "signature", f"signature ({sig_source})", limit=4096)
            verify_signature(staged, signature, options.public_key.read_bytes())
            log.info("signature of %s verified with %s", options.binary, options.public_key)
        else:
            log.info("no release key at %s: the signature is not checked (the checksum is)", options.public_key)
        try:
            build_id(staged)
        except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
            raise UpgradeRefused(f"{options.binary} is not an agent zipapp (no shiv environment.json: {exc})") from None
        staged.chmod(0o755)
        version = self._version(staged)
        if not version:
            raise UpgradeRefused(f"{options.binary} does not start here: `--version` failed (see above)")
        record.to_version = version
        return staged

    def _version(self, zipapp: Path) -> str:
        """`--version` of a zipapp (which also extracts it into SHIV_ROOT); "" when it fails."""
        if not zipapp.exists():
            return ""
        try:
            return run([self.options.python, str(zipapp), "--version"], timeout=120).stdout.strip()
        except CommandError as exc:
            log.error("%s", exc)
            return ""

    def _swap(self, staged: Path) -> None:
        if self.current.exists():
            link = self.options.install_dir / f".{PREVIOUS}.tmp"
            link.unlink(missing_ok=True)
            os.link(self.current, link)
            os.replace(link, self.previous)
        self.marker.unlink(missing_ok=True)
        os.replace(staged, self.current)
        shutil.rmtree(self.staging, ignore_errors=True)
        log.info("installed the new agent as %s (the old one is %s); restarting %s", self.current, self.previous,
                 self.options.unit)

    def _watch(self) -> tuple[bool, str]:
        """Restart the unit and wait for the new agent to prove healthy."""
        old_pid = self.systemd.state().main_pid
        self.systemd.restart()
        begun = self.clock()
        deadline = begun + self.options.timeout
        state = None
        with _signals(_interrupt):
            while True:
                state = self.systemd.state()
                # auto-restart: the new process exited and systemd waits RestartSec to retry.
                if state.sub == "auto-restart" or state.active == "failed":
                    return False, f"the new agent exited at start (status {state.exit_status or '?'})"
                if state.active == "active" and self._healthy_pid(state, old_pid):
                    return True, f"healthy after {self.clock() - begun:.1f}s (READY sent, first poll succeeded)"
                if self.clock() >= deadline:
                    break
                self.sleep(POLL_INTERVAL)
        if state is not None and state.active == "active" and state.main_pid not in (0, old_pid):
            why = "it sent READY but completed no successful poll"
        else:
            why = f"it never sent READY (unit {state.active if state else '?'}/{state.sub if state else '?'})"
        return False, f"the new agent was not healthy within {self.options.timeout:g}s: {why}"

    def _healthy_pid(self, state: UnitState, old_pid: int) -> bool:
        """The marker names the unit's main process, and that is not the agent we replaced
        (which may have written its own marker just before the restart)."""
        return state.main_pid not in (0, old_pid) and self._marker_pid() == state.main_pid

    def _roll_back(self) -> str:
        """Put `previous` back and restart it; returns a note on how that went."""
        if not self.previous.exists():
            return "; no previous version to roll back to"
        with _signals(signal.SIG_IGN):  # half a rollback is worse than a slow one
            link = self.options.install_dir / f".{BINARY}.rollback"
            link.unlink(missing_ok=True)
            os.link(self.previous, link)
            os.replace(link, self.current)
            self.marker.unlink(missing_ok=True)
            try:
                old_pid = self.systemd.state().main_pid
                self.systemd.restart()
                deadline = self.clock() + RECOVERY_TIMEOUT
                while self.clock() < deadline:
                    state = self.systemd.state()
                    if state.active == "active" and self._healthy_pid(state, old_pid):
                        return "; the previous version runs again"
                    self.sleep(POLL_INTERVAL)
            except CommandError as exc:
                return f"; the previous version was restored but cannot be restarted: {exc}"
        return f"; the previous version was restored but is not healthy within {RECOVERY_TIMEOUT:g}s either"

    def _prune(self) -> None:
        """Extraction dirs of builds that are neither current nor previous (a rejected
        build's included)."""
        root = os.environ.get("SHIV_ROOT")
        if not root:
            return
        keep = set()
        for zipapp in (self.current, self.previous):
            try:
                keep.add(build_id(zipapp))
            except (OSError, KeyError, ValueError, zipfile.BadZipFile):
                continue
        for entry in Path(root).glob(f"{BINARY}_*"):
            if entry.is_dir() and entry.name.rsplit("_", 1)[-1] not in keep:
                shutil.rmtree(entry, ignore_errors=True)
                (entry.parent / f".{entry.name}_lock").unlink(missing_ok=True)
                log.info("removed the old extraction dir %s", entry)

    # -- bookkeeping --

    def _marker_pid(self) -> int:
        try:
            value = read_json(self.marker)
        except (OSError, ValueError):
            return 0
        return value.get("pid", 0) if isinstance(value, dict) and isinstance(value.get("pid"), int) else 0

    def _finish(self, record: Record, started: float) -> Record:
        record.finished_at = _now()
        record.seconds = round(self.clock() - started, 1)
        self._write(record)
        message = (
            f"upgrade {record.outcome}: {record.from_version or '(none)'} -> {record.to_version or record.source}: "
            f"{record.reason}"
        )
        if record.outcome == "committed":
            log.info("%s", message)
        else:
            log.error("%s", message)
        sdnotify.journal(message, priority=6 if record.outcome == "committed" else 3, unit=self.options.unit)
        return record

    def _write(self, record: Record) -> None:
        try:
            self.options.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write_json(self.state_path, dataclasses.asdict(record), 0o644)
        except OSError as exc:
            log.warning("cannot record the upgrade in %s: %s", self.state_path, exc)

    @contextmanager
    def _lock(self) -> Iterator[IO[str]]:
        self.options.install_dir.mkdir(parents=True, exist_ok=True)
        with open(self.options.install_dir / ".upgrade.lock", "a+", encoding="ascii") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UpgradeRefused("another upgrade is running") from None
            yield handle


def _interrupt(signum: int, _frame: Any) -> None:
    raise Interrupted(f"the upgrade was interrupted ({signal.Signals(signum).name})")


@contextmanager
def _signals(handler: Any) -> Iterator[None]:
    """SIGINT/SIGTERM go to `handler` (roll back, or ignore while rolling back); SIGHUP (a
    dropped SSH session) is always ignored. Signals can only be handled on the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, action) for signum, action in
                ((signal.SIGINT, handler), (signal.SIGTERM, handler), (signal.SIGHUP, signal.SIG_IGN))}
    try:
        yield
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


def _sha_or_empty(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError:
        return ""


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def last_outcome(data_dir: Path) -> dict[str, Any] | None:
    """The last upgrade's record, for `agent status`; None when there was none or it is unreadable."""
    try:
        value = read_json(data_dir / STATE_FILE)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def run_upgrade(options: Options) -> int:
    """The CLI's entry: 0 committed or unchanged, 1 otherwise (refused or rolled back)."""
    try:
        record = Upgrade(options).run()
    except UpgradeRefused as exc:  # the lock: nothing was recorded, another upgrade owns the state
        log.error("upgrade refused: %s", exc)
        return 1
    return 0 if record.outcome in ("committed", "unchanged") else 1
