"""SIGHUP re-reads the configuration instead of killing the agent (issue 8 §5).

The reloader alone (what it applies, what it names for a restart, a bad file keeping the old
settings), then the agent as a real process in standalone mode (real Podman, an empty
state): it receives SIGHUP, keeps running, logs what changed, and still stops on SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.runtime import Reloader
from agent.settings import Settings, SettingsError
from tests import e2e
from tests.testbed import TestNetwork, podman_env, podman_net  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def root_level() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    level = root.level
    yield root
    root.setLevel(level)


def test_reload_applies_the_log_level_and_names_what_needs_a_restart(
    root_level: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    root_level.setLevel(logging.INFO)
    fresh = Settings(log_level="DEBUG", tick_interval=3, token="")
    reloader = Reloader(Settings(token="secret-token"), lambda: fresh)
    with caplog.at_level(logging.INFO, logger="agent.runtime"):
        reloader()
    assert root_level.level == logging.DEBUG
    assert "applied: log_level='DEBUG'; needs a restart: tick_interval" in caplog.text
    assert "token" not in caplog.text  # the token left the environment at start: no false change
    assert reloader.settings.log_level == "DEBUG" and reloader.settings.tick_interval == 10


def test_a_bad_configuration_keeps_the_current_settings(root_level: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    root_level.setLevel(logging.INFO)

    def broken() -> Settings:
        raise SettingsError("config file /etc/x.toml is not valid TOML: line 1")

    reloader = Reloader(Settings(), broken)
    with caplog.at_level(logging.INFO, logger="agent.runtime"):
        reloader()
    assert root_level.level == logging.INFO
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "keeping the current settings" in errors[0].getMessage()
    assert "not valid TOML" in errors[0].getMessage()


@pytest.mark.real
def test_sighup_keeps_the_agent_running_and_reloads(tmp_path: Path, podman_net: TestNetwork) -> None:  # noqa: F811
    config = tmp_path / "agent.toml"
    common = (
        f'network_name = "{podman_net.name}"\nscope_label = "{podman_net.scope_label}"\n'
        f'run_dir = "{tmp_path / "run"}"\n'
    )
    config.write_text(common + 'log_level = "INFO"\ntick_interval = 1\n')
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"subnetId": podman_net.subnet_id, "containers": []}))
    log_path = tmp_path / "agent.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "standalone", str(state), "--config", str(config), "--data-dir", str(tmp_path / "data")],
            stdout=log, stderr=log, env=env, cwd=REPO,
        )
    try:
        def logged(text: str) -> bool:
            return text in log_path.read_text(errors="replace")

        e2e.wait_for(lambda: logged("agent running"), 30, "the agent to start", log_path, proc)
        config.write_text(common + 'log_level = "DEBUG"\ntick_interval = 2\n')
        proc.send_signal(signal.SIGHUP)
        e2e.wait_for(
            lambda: logged("applied: log_level='DEBUG'; needs a restart: tick_interval"), 30, "the reload line", log_path, proc
        )
        # The new level is in force: the next tick's podman call is logged at DEBUG.
        e2e.wait_for(lambda: logged(" DEBUG agent.host.run: ran "), 30, "a DEBUG line", log_path, proc)

        config.write_text("this is [not toml\n")
        proc.send_signal(signal.SIGHUP)
        e2e.wait_for(lambda: logged("keeping the current settings"), 30, "the bad-file line", log_path, proc)
        assert proc.poll() is None
        text = log_path.read_text(errors="replace")
        assert text.count("keeping the current settings") == 1 and "Traceback" not in text

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
