"""A podman network removed under a running agent is re-created (same subnet, our owner
label) by the next deploy that needs it, which then succeeds (issue 11, goal 5)."""

from __future__ import annotations

import json
import signal

import pytest

from tests.test_e2e_standalone import AgentProcess, by_deployment, container, http_ok, wait_for, write_state
from tests.testbed import podman, podman_env, podman_net  # noqa: F401

pytestmark = [pytest.mark.real]


def network(name: str) -> dict | None:
    result = podman("network", "inspect", name, check=False)
    return json.loads(result.stdout)[0] if result.returncode == 0 else None


def test_a_network_removed_under_a_running_agent_is_recreated(tmp_path, podman_net):  # noqa: F811
    net = podman_net
    state_file = tmp_path / "state.json"
    agent = AgentProcess(state_file, tmp_path / "data", net, tmp_path / "agent.log")
    write_state(state_file, net, [container(net, 1)])
    try:
        agent.start()
        wait_for(lambda: http_ok(net.ip(2)), 30, "the container to serve HTTP", agent)
        before = by_deployment(net)["dep-1"]["Id"]
        # `-f` removes the containers on it too: the next pass must deploy on a network that is gone.
        podman("network", "rm", "-f", net.name)
        assert network(net.name) is None
        wait_for(lambda: http_ok(net.ip(2)) and by_deployment(net).get("dep-1", {}).get("Id") not in (None, before),
                 60, "the container deployed again on a re-created network", agent)
        again = network(net.name)
        assert again is not None
        assert [s["subnet"] for s in again["subnets"]] == [net.subnet]
        assert (again.get("labels") or {}).get("techulus.owner", "").startswith("standalone-")
        assert "re-creating it" in agent.log_path.read_text()
    finally:
        agent.stop(signal.SIGKILL)
