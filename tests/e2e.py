"""Helpers shared by the end-to-end tests that run the agent as a real process."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    """SIGTERM an agent process (it finishes its step and exits), SIGKILL it after `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    log_path: Path,
    proc: subprocess.Popen[bytes] | None = None,
) -> Any:
    """Poll `predicate` until it is truthy; fail with the agent's log if time runs out or
    the agent process exits meanwhile. An OSError from the predicate counts as "not yet"."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"agent exited ({proc.returncode}) while waiting for {what}\n{_tail(log_path)}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}\n--- agent log ---\n{_tail(log_path)}")


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-5000:] if log_path.exists() else "(no log)"
