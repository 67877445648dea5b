"""A failed `podman run` is one short line (the container, podman's own words); the whole
command line only at DEBUG."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from agent.host.podman import Podman, PodmanOptions, PodmanRunFailed, podman_says
from agent.host.run import CommandError, CommandTimeout
from agent.model import ExpectedContainer

NAME = "api-dep00001"
NOISE = 'time="2026-01-01T00:00:00Z" level=warning msg="The cgroupv2 manager is set to systemd but there is no systemd user session"\n'
RUNC = 'Error: runc: runc create failed: unable to start container process: exec: "/nonexistent": stat /nonexistent: no such file or directory\n'


def spec() -> ExpectedContainer:
    return ExpectedContainer("dep00001", "svc1", "My API", NAME, "localhost/app:v1", "10.200.3.2")


def test_a_failed_run_is_one_line_with_podmans_error_and_the_argv_only_at_debug(
    fp: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.host.podman")
    podman = Podman(PodmanOptions(run_dir=tmp_path / "run", owner="me"), sleep=lambda _s: None)
    fp.register(["podman", "run", fp.any()], returncode=127, stderr=NOISE + RUNC)
    fp.register(["podman", "container", "inspect", "--format", "json", NAME], returncode=125, stdout="[]",
                stderr=f"Error: no such container {NAME}\n")
    with pytest.raises(PodmanRunFailed) as raised:
        podman.run_container(spec(), {}, tmp_path / "volumes")
    message = str(raised.value)
    assert message == f"podman run of container {NAME} failed (exit 127): {RUNC.strip()}"
    assert "\n" not in message and "--cap-drop" not in message and "level=warning" not in message
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "--cap-drop=ALL" in r.getMessage()]
    assert len(debug) == 1 and f"--name={NAME}" in debug[0] and "exited with 127" in debug[0]
    # Still a command error, classified as before (callers may look at it).
    assert raised.value.returncode == 127 and not raised.value.timed_out and not raised.value.not_found


def test_podmans_words() -> None:
    assert podman_says(CommandError(("podman", "run"), 125, "", NOISE + RUNC)) == RUNC.strip()
    assert podman_says(CommandError(("podman", "run"), 1, "", NOISE)) == NOISE.strip()
    assert podman_says(CommandError(("podman", "run"), 1, "", "")) == "no output"
    timeout = CommandTimeout(("podman", "run"), None, reason="timed out after 60s and was killed")
    assert podman_says(timeout) == "timed out after 60s and was killed"
    assert len(podman_says(CommandError(("podman",), 1, "", "Error: " + "x" * 5000))) == 500
