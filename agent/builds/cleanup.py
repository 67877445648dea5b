"""Build-directory cleanup (PROTOCOL.md §13.6): checkouts and plan directories older than
an hour go, whatever left them (a crash, a kill); the running build's never do."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from pathlib import Path

from agent.builds.buildkit import PLAN_DIR_PREFIX

log = logging.getLogger(__name__)

CLEANUP_INTERVAL = 3600.0
STALE_AFTER = 3600.0


def remove_stale(builds_dir: str | Path, current: str | None, now: float | None = None) -> list[str]:
    """Remove build directories older than an hour (never the running one)."""
    now = time.time() if now is None else now
    removed = []
    directory = Path(builds_dir)
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        entries = []
    for entry in entries:
        if current is not None and entry.name in (current, f"{PLAN_DIR_PREFIX}{current}"):
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

