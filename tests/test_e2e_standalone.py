"""The agent as a real process in standalone mode, driving real Podman.

Deploys containers with static IPs that the host reaches over HTTP, follows edits of the
state file (image change, removal), heals containers stopped or removed behind its back,
and survives a kill -9 in the middle of a pass without duplicating or restarting anything.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests import e2e
from tests.testbed import HTTPD_IMAGE, TestNetwork, cleanup_scope, podman, podman_env, podman_net  # noqa: F401

pytestmark = [pytest.mark.real]

REPO = Path(__file__).resolve().parents[1]
V2_IMAGE = "localhost/techulus-test-httpd:v2"


def container(net: TestNetwork, index: int, image: str = HTTPD_IMAGE) -> dict:
    return {
        "deploymentId": f"dep-{index}",
        "serviceId": f"svc-{index}",
        "serviceName": f"Service {index}",
        "name": f"svc-{index}-dep-{index}",
        "image": image,
        "ipAddress": net.ip(index + 1),
        "ports": [],
        "env": {},
        "healthCheck": None,
        "volumes": [],
    }


class AgentProcess:
    def __init__(
        self, state_file: Path, data_dir: Path, net: TestNetwork, log_path: Path, extra_env: dict[str, str] | None = None
    ) -> None:
        self.state_file, self.data_dir, self.net, self.log_path = state_file, data_dir, net, log_path
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    cwd = REPO

    def environment(self) -> dict[str, str]:
        """The agent's environment: the test's network, scope, a fast tick, `extra_env`."""
        env = dict(os.environ)
        env.update(
            {
                "TECHULUS_AGENT_NETWORK_NAME": self.net.name,
                "TECHULUS_AGENT_SCOPE_LABEL": self.net.scope_label,
                "TECHULUS_AGENT_STOP_TIMEOUT": "1",
                "TECHULUS_AGENT_TICK_INTERVAL": "1",
                "TECHULUS_AGENT_RUN_DIR": str(self.data_dir.parent / "run"),
                "PYTHONPATH": str(REPO),
                **self.extra_env,
            }
        )
        return env

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "standalone", str(self.state_file), "--data-dir", str(self.data_dir)],
            stdout=log, stderr=log, env=self.environment(), cwd=REPO,
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def ours(net: TestNetwork) -> list[dict]:
    out = podman("ps", "-a", "--filter", f"label={net.scope_label}", "--format", "json").stdout
    return json.loads(out or "[]")


def wait_for(predicate, timeout: float, what: str, agent: AgentProcess):
    return e2e.wait_for(predicate, timeout, what, agent.log_path, agent.proc)


def http_ok(ip: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{ip}/", timeout=1) as response:
            return response.status == 200 and b"hello from techulus test" in response.read()
    except OSError:
        return False


def by_deployment(net: TestNetwork) -> dict[str, dict]:
    return {c["Labels"].get("techulus.deployment.id"): c for c in ours(net)}


@pytest.fixture
def agent_env(tmp_path, podman_net):  # noqa: F811
    state_file = tmp_path / "state.json"
    agent = AgentProcess(state_file, tmp_path / "data", podman_net, tmp_path / "agent.log")
    yield agent, podman_net, state_file
    agent.stop(signal.SIGKILL)


def write_state(path: Path, net: TestNetwork, containers: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"subnetId": net.subnet_id, "containers": containers}))
    tmp.replace(path)


def test_deploy_update_remove_and_heal(agent_env):
    agent, net, state_file = agent_env
    podman("tag", HTTPD_IMAGE, V2_IMAGE)
    write_state(state_file, net, [container(net, 1), container(net, 2)])
    agent.start()
    wait_for(lambda: http_ok(net.ip(2)) and http_ok(net.ip(3)), 30, "both containers to serve HTTP", agent)
    deployed = by_deployment(net)
    assert set(deployed) == {"dep-1", "dep-2"}
    labels = deployed["dep-1"]["Labels"]
    assert labels["techulus.service.id"] == "svc-1" and labels["techulus.service.name"] == "Service 1"

    # Change the image of dep-2: it is re-created on the same IP with the new image.
    write_state(state_file, net, [container(net, 1), container(net, 2, V2_IMAGE)])
    wait_for(lambda: by_deployment(net).get("dep-2", {}).get("Image") == V2_IMAGE, 30, "dep-2 on the new image", agent)
    wait_for(lambda: http_ok(net.ip(3)), 15, "dep-2 to serve again", agent)
    assert by_deployment(net)["dep-1"]["Id"] == deployed["dep-1"]["Id"], "dep-1 must not be touched"

    # Stopped behind the agent's back: started again, same container.
    podman("stop", "-t", "0", deployed["dep-1"]["Id"])
    wait_for(lambda: by_deployment(net).get("dep-1", {}).get("State") == "running", 30, "dep-1 to be started again", agent)
    assert by_deployment(net)["dep-1"]["Id"] == deployed["dep-1"]["Id"]

    # Removed behind its back: deployed again.
    podman("rm", "-f", "-t", "0", deployed["dep-1"]["Id"])
    wait_for(lambda: http_ok(net.ip(2)), 30, "dep-1 to be re-created", agent)

    # Dropped from the state: removed.
    write_state(state_file, net, [container(net, 2, V2_IMAGE)])
    wait_for(lambda: set(by_deployment(net)) == {"dep-2"}, 30, "dep-1 to be removed", agent)

    # A garbled state file changes nothing, and is said once, not every tick; its repair too.
    state_file.write_text("{garbled")
    time.sleep(3)
    assert set(by_deployment(net)) == {"dep-2"}
    assert agent.log().count("not valid JSON") == 1, agent.log()
    write_state(state_file, net, [container(net, 2, V2_IMAGE)])
    wait_for(lambda: "is valid again" in agent.log(), 15, "the repair to be said", agent)
    time.sleep(2)
    assert agent.log().count(f"state file {state_file} is valid again") == 1, agent.log()

    agent.stop()
    assert agent.proc is not None and agent.proc.returncode == 0
    # Stopping the agent leaves the workload running.
    assert by_deployment(net)["dep-2"]["State"] == "running"


def test_kill_mid_pass_then_restart_converges_without_duplicates(agent_env):
    agent, net, state_file = agent_env
    write_state(state_file, net, [container(net, i) for i in range(1, 7)])
    agent.start()
    wait_for(lambda: len(ours(net)) >= 2, 30, "the first containers", agent)
    agent.stop(signal.SIGKILL)
    before = {c["Labels"]["techulus.deployment.id"]: c["Id"] for c in ours(net) if c["State"] == "running"}
    agent.start()
    wait_for(lambda: len(by_deployment(net)) == 6 and all(c["State"] == "running" for c in ours(net)), 60, "all six", agent)
    time.sleep(2)
    after = ours(net)
    assert len(after) == 6, "exactly one container per deployment"
    ids = {c["Labels"]["techulus.deployment.id"]: c["Id"] for c in after}
    for deployment, cid in before.items():
        assert ids[deployment] == cid, f"{deployment} was re-created after the restart"
    for c in after:
        if c["Labels"]["techulus.deployment.id"] in before:
            restarts = podman("inspect", "--format", "{{.RestartCount}}", c["Id"]).stdout.strip()
            assert restarts in ("0", ""), f"{c['Names']} was restarted"


def test_a_failed_podman_run_is_one_line_and_the_rest_applies(agent_env):
    """podman's own error and the container name at ERROR; the whole argv only at DEBUG."""
    agent, net, state_file = agent_env
    broken = f"localhost/techulus-test-broken-{net.name}:latest"
    workdir = agent.data_dir.parent / "broken-image"
    workdir.mkdir()
    (workdir / "Containerfile").write_text(f'FROM {HTTPD_IMAGE}\nCMD ["/nonexistent"]\n')
    podman("build", "-q", "-t", broken, str(workdir))
    agent.extra_env = {"TECHULUS_AGENT_LOG_LEVEL": "DEBUG"}
    try:
        write_state(state_file, net, [container(net, 1), container(net, 2, broken)])
        agent.start()
        wait_for(lambda: http_ok(net.ip(2)), 30, "the good container to serve", agent)
        name = container(net, 2)["name"]
        wait_for(lambda: f"podman run of container {name} failed" in agent.log(), 30, "the failed run", agent)
        agent.stop()
        lines = agent.log().splitlines()
        loud = [line for line in lines if name in line and (" ERROR " in line or " WARNING " in line)]
        assert loud, agent.log()
        for line in loud:
            assert f"podman run of container {name} failed (exit 127): Error: " in line, line
            assert "/nonexistent" in line and "--cap-drop" not in line and "--label" not in line, line
        argv = [line for line in lines if " DEBUG " in line and f"podman run of {name} failed" in line]
        assert argv and "--cap-drop=ALL" in argv[0] and f"--name={name}" in argv[0]
    finally:
        agent.stop(signal.SIGKILL)
        cleanup_scope(net.scope_label)
        podman("rmi", broken, check=False)
