"""Boot a throwaway Debian bookworm with systemd-nspawn for installer tests (TESTBED.md).

The base root is debootstrapped once per machine into `BASE_ROOT` (about 50 s; reused by
later runs, so CI pays it once per run) and never modified: every boot uses
`--volatile=overlay`, so all writes go to a tmpfs layer that vanishes with the container.
Without a private network the container shares the host's network namespace, which is
what lets it reach the host's loopback fixtures and the Debian mirror.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

BASE_ROOT = Path(os.environ.get("TECHULUS_NSPAWN_ROOT", "/var/tmp/techulus-nspawn-root"))
INCLUDE = "systemd-sysv,dbus,python3,ca-certificates,curl,iproute2"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def missing_tools() -> list[str]:
    return [t for t in ("debootstrap", "systemd-nspawn", "nsenter") if shutil.which(t) is None]


def apt_mirror() -> str:
    """The Debian mirror this machine's own apt sources use."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = path.read_text()
        except OSError:
            continue
        for match in re.finditer(r"(?:^URIs:\s*|^deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.M):
            uri = match.group(1)
            if "security" not in uri and uri.startswith("http"):
                return uri.rstrip("/")
    return DEFAULT_MIRROR


def ensure_base_root() -> Path:
    """The cached bookworm root, debootstrapped into a temp dir and renamed when complete."""
    if (BASE_ROOT / "usr/bin/python3").exists() and (BASE_ROOT / "sbin/init").exists():
        return BASE_ROOT
    partial = BASE_ROOT.with_name(BASE_ROOT.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={INCLUDE}", "bookworm", str(partial), apt_mirror()],
        check=True, capture_output=True, timeout=900,
    )
    try:
        partial.rename(BASE_ROOT)
    except OSError:  # another run finished first
        shutil.rmtree(partial, ignore_errors=True)
    return BASE_ROOT


class Machine:
    """A booted container; `run()` executes inside it through nsenter."""

    def __init__(self, binds: dict[Path, str] | None = None) -> None:
        self.name = f"techulus-e2e-{uuid.uuid4().hex[:8]}"
        argv = ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "-b", "-D", str(BASE_ROOT),
                "--volatile=overlay", f"--machine={self.name}", "--console=passive"]
        for source, target in (binds or {}).items():
            argv.append(f"--bind-ro={source}:{target}")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.leader = self._wait_leader()

    def _wait_leader(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            try:
                pids = children.read_text().split()
            except OSError:
                pids = []
            for pid in pids:
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        # Wait until systemd inside answers.
                        state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=60, pid=int(pid))
                        if state.stdout.strip() in ("running", "degraded"):
                            return int(pid)
                except OSError:
                    pass
            time.sleep(0.2)
        raise RuntimeError("the container did not boot")

    def run(self, *argv: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 120,
            pid: int | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
        environment = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        environment.update(env or {})
        full = ["nsenter", "-t", str(pid or self.leader), "-a", "--", "env", "-i",
                *[f"{k}={v}" for k, v in environment.items()], *argv]
        result = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def write(self, path: str, content: str, mode: str = "644") -> None:
        self.run("sh", "-c", f'mkdir -p "$(dirname "$1")" && cat >"$1" && chmod {mode} "$1"', "sh", path, input=content)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
