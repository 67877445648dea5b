"""The agent as a real process (standalone, real Podman): `agent status --json` shows its
container, the metrics endpoint answers on loopback, JSON logs carry the deployment, and
once the agent is gone `agent status` says so and exits non-zero."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import pytest

from tests import e2e
from tests.test_e2e_standalone import REPO, AgentProcess, container, http_ok, wait_for, write_state
from tests.testbed import cleanup_scope, podman_env, podman_net  # noqa: F401

pytestmark = [pytest.mark.real]


def status(agent: AgentProcess) -> tuple[int, dict]:
    done = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--json", "--data-dir", str(agent.data_dir)],
        env=agent.environment(), cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    return done.returncode, json.loads(done.stdout)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_status_and_metrics_of_a_running_agent(tmp_path, podman_net):  # noqa: F811
    port = e2e.free_port()
    state_file = tmp_path / "state.json"
    agent = AgentProcess(
        state_file, tmp_path / "data", podman_net, tmp_path / "agent.log",
        extra_env={
            "TECHULUS_AGENT_METRICS_LISTEN": f"127.0.0.1:{port}",
            "TECHULUS_AGENT_HEARTBEAT_INTERVAL": "1",
            "TECHULUS_AGENT_LOG_FORMAT": "json",
            "TECHULUS_AGENT_MANAGE_DNS": "false",
            "TECHULUS_AGENT_MANAGE_CADDY": "false",
        },
    )
    write_state(state_file, podman_net, [container(podman_net, 1)])
    try:
        code, shown = status(agent)
        assert code == 3 and shown["running"] is False and "no agent running" in shown["problem"]

        agent.start()
        wait_for(lambda: http_ok(podman_net.ip(2)), 90, "the container to serve", agent)

        def listed():
            code, shown = status(agent)
            # The heartbeat may list the container before the pass that started it has ended.
            passed = shown.get("lastPass") and shown["loop"]["state"] == "IDLE"
            return shown if code == 0 and passed and shown["containers"] and shown["containers"][0]["health"] != "-" else None

        shown = wait_for(listed, 30, "agent status to list the container", agent)
        assert shown["running"] is True and shown["mode"].startswith("standalone from")
        (entry,) = shown["containers"]
        assert entry["deployment"] == "dep-1" and entry["ip"] == podman_net.ip(2) and entry["state"] == "running"
        assert shown["lastPass"]["applied"] and not shown["lastPass"]["failed"]
        assert shown["poll"]["ok"] is True

        text = scrape(port)
        assert 'techulus_agent_changes_total{kind="deploy",result="applied"} 1.0' in text
        assert 'techulus_agent_containers{health="none",state="running"} 1.0' in text
        assert "techulus_agent_podman_call_duration_seconds_count{verb=\"run\"}" in text
        assert "process_resident_memory_bytes" in text

        lines = [json.loads(line) for line in agent.log().splitlines() if line.startswith("{")]
        applied = [line for line in lines if line["msg"].startswith("deployed ")]
        assert applied and applied[0]["deployment"] == "dep-1" and applied[0]["change"] == "deploy"
        assert {"ts", "level", "logger", "msg"} <= set(applied[0])

        agent.stop(signal.SIGTERM)
        code, shown = status(agent)
        assert code == 3 and shown["running"] is False
    finally:
        agent.stop(signal.SIGKILL)
        cleanup_scope(podman_net.scope_label)
