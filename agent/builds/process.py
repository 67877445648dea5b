"""The process groups of build steps: every step runs in its own group marked with the build
id, so whatever a step leaves behind (or a killed agent left running) can be found and
killed, and only when it provably is ours."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

#: Put into every build step's environment (value: the build id) to recognise it after a restart.
BUILD_MARKER = "TECHULUS_BUILD_ID"
_STEP_COMMANDS = frozenset({"git", "railpack", "buildctl"})


def kill_orphaned_step(state: Mapping[str, Any], build_id: str) -> list[int]:
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


def kill_leftovers(pgid: int) -> None:
    """Whatever the step started in its process group and left running dies with it."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def signal_name(number: int) -> str:
    try:
        return f"{signal.Signals(number).name} ({number})"
    except ValueError:
        return str(number)

