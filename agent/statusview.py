"""`agent status`: reads what the running agent publishes and says whether it is alive.

Kept apart from the publisher (agent/observe.py) and free of heavy imports, so a cold
start of the zipapp answers in a fraction of a second, whatever the agent is doing and
whether or not the control plane answers. Alive means: some process holds the data dir's
`agent.lock` (an flock, looked up in /proc/locks without taking it, so a starting agent is
never refused because of us) and the published file is fresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The publisher rewrites the file at least this often, changed or not.
REFRESH = 5.0
#: A file older than this was left by an agent that no longer publishes.
STALE_AFTER = 30.0
LOCK_FILE = "agent.lock"
UPGRADE_FILE = "upgrade-state.json"

EXIT_OK = 0
EXIT_STALE = 1
EXIT_NOT_RUNNING = 3  # LSB `status`: program is not running


def status_path(run_dir: Path, data_dir: Path) -> Path:
    """One file per data dir (one agent each): a registered and a standalone agent on one
    host, or parallel tests, never overwrite each other's."""
    digest = hashlib.sha256(os.path.realpath(data_dir).encode()).hexdigest()[:12]
    return Path(run_dir) / f"status-{digest}.json"


def lock_held(lock_path: Path, locks_file: Path = Path("/proc/locks")) -> bool:
    """Whether any process holds an flock on `lock_path` (read from /proc/locks: taking
    the lock to test it could make an agent starting at that instant refuse to run)."""
    try:
        st = os.stat(lock_path)
        text = locks_file.read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in text.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; "->" marks a waiter, not a holder.
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue
        if fields[5] == wanted:
            return True
    return False


def gather(run_dir: Path, data_dir: Path, now: Callable[[], float] = time.time) -> tuple[int, dict[str, Any]]:
    """(exit code, what to show). The dict always has `running` and, when not running or
    stale, `problem`; the agent's own snapshot otherwise, and `upgrade` when the data dir
    holds the outcome of the last `agent upgrade` (its fields verbatim)."""
    result: dict[str, Any] = {"running": False, "dataDir": str(data_dir)}
    upgrade = _read_json(Path(data_dir) / UPGRADE_FILE)
    if isinstance(upgrade, dict):
        result["upgrade"] = upgrade
    if not lock_held(Path(data_dir) / LOCK_FILE):
        result["problem"] = f"no agent running (data dir {data_dir})"
        return EXIT_NOT_RUNNING, result
    path = status_path(run_dir, data_dir)
    snapshot = _read_json(path)
    if not isinstance(snapshot, dict):
        result["problem"] = f"an agent holds {Path(data_dir) / LOCK_FILE} but has published no status in {path} (starting, or an older version)"
        return EXIT_STALE, result
    age = now() - float(snapshot.get("updated") or 0)
    result.update(snapshot)
    if age > STALE_AFTER:
        result["running"] = False
        result["problem"] = f"no agent running: its status in {path} is {age:.0f}s old (pid {snapshot.get('pid', '?')} stopped publishing)"
        return EXIT_STALE, result
    result["running"] = True
    return EXIT_OK, result


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _age(now: float, at: Any) -> str:
    if not isinstance(at, int | float) or at <= 0:
        return "never"
    seconds = max(0.0, now - at)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def render(status: dict[str, Any], now: float | None = None) -> str:
    """The one screen an operator reads: is this server OK, and what is the agent doing."""
    now = time.time() if now is None else now
    lines: list[str] = []
    if status.get("problem"):
        lines.append(status["problem"])
    if "pid" in status:
        lines += _render_agent(status, now)
    upgrade = status.get("upgrade")
    if isinstance(upgrade, dict):
        lines.append("upgrade:     " + ", ".join(f"{key}={value}" for key, value in upgrade.items()))
    return "\n".join(lines) + "\n"


def _render_agent(s: dict[str, Any], now: float) -> list[str]:
    loop = s.get("loop") or {}
    poll = s.get("poll") or {}
    report = s.get("report") or {}
    lines = [
        f"agent:       pid {s.get('pid')}, version {s.get('version', '?')}, {s.get('mode', '?')}"
        + (f", server {s['serverId']}" if s.get("serverId") else ""),
        f"state:       {loop.get('state', '?')} since {_age(now, loop.get('since'))}",
    ]
    if poll.get("ok") is None:
        lines.append("last poll:   none yet")
    else:
        outcome = "ok" if poll["ok"] else f"FAILED ({poll.get('error', '')})"
        lines.append(f"last poll:   {outcome}, {_age(now, poll.get('at'))}; last good {_age(now, poll.get('lastOk'))}")
    if report:
        outcome = "sent" if report.get("ok") else f"FAILED ({report.get('error', '')})"
        lines.append(f"last report: {outcome}, {_age(now, report.get('at'))}")
    last = s.get("lastPass") or {}
    if last:
        lines.append(
            f"last pass:   {len(last.get('applied', []))} applied, {len(last.get('failed', []))} failed, "
            f"{last.get('seconds', 0):.1f}s, {_age(now, last.get('ended'))}"
        )
        lines += [f"  failed: {entry}" for entry in last.get("failed", [])]
    lines += [f"held back:   {entry}" for entry in s.get("held") or []]
    containers = s.get("containers") or []
    lines.append(f"containers:  {len(containers)}")
    for c in containers:
        lines.append(
            f"  {c.get('name', '?'):<24} {c.get('state', '?'):<8} {c.get('health', '-'):<9} "
            f"{c.get('ip') or '-':<15} {c.get('image', '?')}  (deployment {c.get('deployment') or '-'})"
        )
    work = s.get("work") or []
    lines.append("work items:  " + (", ".join(f"{w.get('id')} ({w.get('type')})" for w in work) or "none in flight"))
    build = s.get("build")
    lines.append("build:       " + (f"{build.get('id')} {build.get('phase')}" if build else "none in progress"))
    logs = s.get("logs")
    if logs:
        lines.append(f"log shipping: {logs.get('queued', 0)} queued, {logs.get('shipped', 0)} shipped, {logs.get('dropped', 0)} dropped")
    for name, synced in sorted((s.get("sync") or {}).items()):
        lines.append(f"{name + ':':<13}{'in sync' if synced else 'NOT in sync'}")
    wireguard = s.get("wireguard")
    if isinstance(wireguard, dict):
        if wireguard.get("error"):
            lines.append(f"wireguard:   cannot read ({wireguard['error']})")
        for peer in wireguard.get("peers", []):
            lines.append(f"  peer {peer.get('publicKey', '?')[:16]}… handshake {_age(now, peer.get('handshake'))}")
    return lines
