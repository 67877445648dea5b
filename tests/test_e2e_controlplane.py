"""The agent as a real process against the fake control plane and real Podman:
register -> poll -> reconcile -> report, work items, bad answers that destroy nothing,
and workloads restored from the cached expected state while the control plane is down.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import e2e
from tests.e2e import free_port
from tests.fakecp import FakeControlPlane, encrypt_secret
from tests.fakevlogs import FakeVictoriaLogs
from tests.testbed import HTTPD_IMAGE, TICKER_IMAGE, TestNetwork, podman, podman_env, podman_net  # noqa: F401

pytestmark = [pytest.mark.real]

REPO = Path(__file__).resolve().parents[1]


class Agent:
    def __init__(self, tmp_path: Path, net: TestNetwork | None) -> None:
        self.data_dir = tmp_path / "data"
        self.run_dir = tmp_path / "run"
        self.log_path = tmp_path / "agent.log"
        self.net = net
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, url: str, *extra: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.update(
            {
                "TECHULUS_AGENT_MANAGE_DNS": "false",
                "TECHULUS_AGENT_MANAGE_CADDY": "false",
                "TECHULUS_AGENT_MANAGE_WIREGUARD": "false",
                "TECHULUS_AGENT_TICK_INTERVAL": "1",
                "TECHULUS_AGENT_HEARTBEAT_INTERVAL": "2",
                "TECHULUS_AGENT_WORKQUEUE_INTERVAL": "1",
                "TECHULUS_AGENT_STOP_TIMEOUT": "1",
                "TECHULUS_AGENT_HTTP_RETRIES": "0",
                "TECHULUS_AGENT_RUN_DIR": str(self.run_dir),
            }
        )
        if self.net is not None:
            env["TECHULUS_AGENT_NETWORK_NAME"] = self.net.name
            env["TECHULUS_AGENT_SCOPE_LABEL"] = self.net.scope_label
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--url", url, "--data-dir", str(self.data_dir), *extra],
            stdout=log, stderr=log, env=env, cwd=REPO,
        )

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_for(predicate, timeout: float, what: str, agent: Agent):
    return e2e.wait_for(predicate, timeout, what, agent.log_path, agent.proc)


def ours(net: TestNetwork) -> dict[str, dict]:
    out = podman("ps", "-a", "--filter", f"label={net.scope_label}", "--format", "json").stdout
    return {c["Labels"].get("techulus.deployment.id"): c for c in json.loads(out or "[]")}


def expected_container(net: TestNetwork, index: int, env: dict | None = None, image: str = HTTPD_IMAGE) -> dict:
    service = f"22222222-2222-4222-8222-00000000000{index}"
    deployment = f"44444444-4444-4444-8444-00000000000{index}"
    return {
        "deploymentId": deployment,
        "serviceId": service,
        "serviceName": f"Web {index}",
        "name": f"{service}-{deployment[:8]}",
        "image": image,
        "ipAddress": net.ip(index + 1),
        "ports": [{"containerPort": 80, "hostPort": 30000 + index}],
        "env": env or {},
        "healthCheck": None,
        "volumes": [{"name": "data", "hostPath": "/var/lib/techulus-agent/volumes/x/data", "containerPath": "/data"}],
    }


@pytest.fixture
def cp():
    with FakeControlPlane() as plane:
        yield plane


def occupy_subnets_except(cp: FakeControlPlane, keep: int) -> None:
    """Registration takes the lowest free subnet; make that the test network's subnet."""
    for subnet in range(1, 256):
        if subnet != keep:
            cp.add_server("placeholder", subnet_id=subnet, status="offline")


def test_register_reconcile_report_and_survive_bad_answers(cp, podman_net, tmp_path):  # noqa: F811
    net = podman_net
    occupy_subnets_except(cp, net.subnet_id)
    token = cp.add_token()
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    agent = Agent(tmp_path, net)
    try:
        agent.start(cp.url, "--token-file", str(token_file))
        config_path = agent.data_dir / "config.json"
        wait_for(config_path.exists, 20, "registration", agent)
        config = json.loads(config_path.read_text())
        server_id = config["serverId"]
        assert config["subnetId"] == net.subnet_id
        assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
        assert token not in agent.log(), "the token must never be logged"

        secret = encrypt_secret(cp.encryption_key, "hello-from-lab")
        document = {"containers": [expected_container(net, 1, {"GREETING": secret}), expected_container(net, 2)]}
        cp.set_expected_state(server_id, document)
        wait_for(lambda: len([c for c in ours(net).values() if c["State"] == "running"]) == 2, 30, "two containers", agent)
        first = ours(net)[document["containers"][0]["deploymentId"]]
        inside = podman("exec", first["Id"], "env").stdout
        assert "GREETING=hello-from-lab" in inside
        create_command = podman("inspect", "--format", "{{json .Config.CreateCommand}}", first["Id"]).stdout
        assert "hello-from-lab" not in create_command, "secrets must never be on podman's command line"
        assert not list(agent.run_dir.rglob("*env*")), "no env file on disk: podman reads it from memory"
        volume = agent.data_dir / "volumes" / document["containers"][0]["serviceId"] / "data"
        assert volume.is_dir(), "volume paths are chosen by the agent under its data dir"

        def reported_running():
            for report in reversed(cp.status_reports):
                entries = {c["deploymentId"]: c for c in report.report["containers"]}
                wanted = [c["deploymentId"] for c in document["containers"]]
                if all(entries.get(d, {}).get("status") == "running" for d in wanted):
                    return True
            return False

        wait_for(reported_running, 15, "a status report with both containers running", agent)

        # Work items: restart (acknowledged), update_wireguard (not managed here: completed), unknown type (failed).
        restart_id = cp.add_work_item(server_id, "restart", {"deploymentId": first["Labels"]["techulus.deployment.id"], "containerId": first["Id"]})
        wg_id = cp.add_work_item(server_id, "update_wireguard", {"peers": []})
        odd_id = cp.add_work_item(server_id, "sync_caddy", {})
        wait_for(lambda: {c.id for c in cp.completions} >= {restart_id, wg_id, odd_id}, 20, "three completions", agent)
        outcome = {c.id: c.status for c in cp.completions}
        assert outcome[restart_id] == "completed" and outcome[wg_id] == "completed" and outcome[odd_id] == "failed"

        # Garbled and failing answers change nothing.
        before = {d: c["Id"] for d, c in ours(net).items()}
        for bad in (b"not json at all", b'{"containers": "x"}', b"[]"):
            cp.set_expected_state(server_id, bad)
            time.sleep(2.5)
            assert {d: c["Id"] for d, c in ours(net).items()} == before
        cp.set_expected_state(server_id, document)
        cp.fail_next(4)
        time.sleep(2.5)
        assert {d: c["Id"] for d, c in ours(net).items()} == before
        hostile = json.loads(json.dumps(document))
        hostile["containers"][0]["image"] = "--privileged"
        cp.set_expected_state(server_id, hostile)
        time.sleep(2.5)
        assert {d: c["Id"] for d, c in ours(net).items()} == before, "an invalid entry protects its container"
        assert "image must not start with '-'" in agent.log()

        # Reports keep coming at the heartbeat pace throughout.
        times = [r.time_ms for r in cp.status_reports]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert max(gaps) < 6000, f"status reports must never pause long, saw a {max(gaps)} ms gap"

        # The control plane goes away; containers vanish (as after a reboot); the agent
        # brings them back from its cached expected state.
        cp.set_expected_state(server_id, document)
        time.sleep(2)
        assert agent.stop() == 0
        assert all(c["State"] == "running" for c in ours(net).values()), "stopping the agent leaves workloads running"
        podman("rm", "-f", "-t", "0", *[c["Id"] for c in ours(net).values()])
        leftover = agent.run_dir / "env-crashed" / "env"  # as a kill -9 mid-deploy would leave it
        leftover.parent.mkdir(parents=True)
        leftover.write_text("SECRET=x\n")
        agent.start(f"http://127.0.0.1:{free_port()}")
        wait_for(lambda: len([c for c in ours(net).values() if c["State"] == "running"]) == 2, 45, "restore from cache", agent)
        assert "restoring workloads from the cached expected state" in agent.log()
        assert not leftover.parent.exists(), "secret env files left by a crash are removed at start"
        agent.stop()

        # Back with the control plane, an empty expected state removes the containers
        # (after a second poll confirms it).
        cp.set_expected_state(server_id, {"containers": []})
        agent.start(cp.url)
        wait_for(lambda: not ours(net), 30, "removal after an empty expected state", agent)
        assert "waiting for the next poll to confirm" in agent.log()
    finally:
        agent.stop(signal.SIGKILL)


def test_refused_token_writes_nothing(cp, tmp_path):
    agent = Agent(tmp_path, None)
    agent.start(cp.url, "--token", "0" * 64)
    assert agent.proc is not None and agent.proc.wait(timeout=30) == 1
    assert "Invalid, expired, or already used token" in agent.log()
    assert not (agent.data_dir / "keys").exists() and not (agent.data_dir / "config.json").exists()
    # The same data dir registers fine with a good token afterwards.
    token = cp.add_token()
    agent.start(cp.url, "--token", token)
    wait_for((agent.data_dir / "config.json").exists, 20, "registration", agent)
    agent.stop(signal.SIGKILL)


def test_control_plane_down_at_first_start_is_a_clear_error(tmp_path):
    agent = Agent(tmp_path, None)
    agent.start(f"http://127.0.0.1:{free_port()}", "--token", "abc")
    assert agent.proc is not None and agent.proc.wait(timeout=60) == 1
    assert "cannot reach the control plane" in agent.log()
    assert not (agent.data_dir / "keys").exists()


def test_container_logs_are_shipped_by_the_running_agent(cp, podman_net, tmp_path):  # noqa: F811
    net = podman_net
    occupy_subnets_except(cp, net.subnet_id)
    vlogs = FakeVictoriaLogs()  # serving from construction
    agent = Agent(tmp_path, net)
    try:
        agent.start(cp.url, "--token", cp.add_token(), "--logs-endpoint", vlogs.url)
        wait_for((agent.data_dir / "config.json").exists, 20, "registration", agent)
        server_id = json.loads((agent.data_dir / "config.json").read_text())["serverId"]
        ticker = expected_container(net, 1, image=TICKER_IMAGE)
        cp.set_expected_state(server_id, {"containers": [ticker]})

        def shipped():
            entries = [e for e in vlogs.of_type("container") if e.get("deployment_id") == ticker["deploymentId"]]
            streams = {e["stream"] for e in entries}
            return entries if {"stdout", "stderr"} <= streams and len(entries) >= 10 else None

        entries = wait_for(shipped, 40, "container log lines in VictoriaLogs", agent)
        sample = next(e for e in entries if e["stream"] == "stdout")
        assert sample["service_id"] == ticker["serviceId"] and sample["_msg"].startswith("tick-")
        assert all(e["_msg"].startswith("err-") for e in entries if e["stream"] == "stderr")
        wait_for((agent.data_dir / "log-positions.json").exists, 20, "persisted log cursors", agent)
    finally:
        agent.stop(signal.SIGKILL)
        vlogs.down()
