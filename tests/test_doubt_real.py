"""Doubt protects, with the real agent process and real Podman: a container entry that
cannot be fully parsed never gets the container it might describe removed, while the rest
of the document still applies (issue 8 §3)."""

from __future__ import annotations

import pytest

from tests.test_e2e_standalone import (  # noqa: F401 - fixtures
    agent_env,
    by_deployment,
    container,
    http_ok,
    podman_env,
    podman_net,
    wait_for,
    write_state,
)

pytestmark = [pytest.mark.real]


def test_garbled_deployment_ids_protect_their_containers(agent_env):  # noqa: F811
    agent, net, state_file = agent_env
    write_state(state_file, net, [container(net, 1), container(net, 2), container(net, 3)])
    agent.start()
    wait_for(lambda: all(http_ok(net.ip(i + 1)) for i in (1, 2, 3)), 60, "three containers to serve HTTP", agent)
    before = {dep: info["Id"] for dep, info in by_deployment(net).items()}

    # dep-1's id arrives with a trailing space, dep-3 is gone from the document. The pass that
    # removes dep-3 (so it did act on this document) leaves dep-1's container alone.
    write_state(state_file, net, [dict(container(net, 1), deploymentId="dep-1 "), container(net, 2)])
    wait_for(lambda: "dep-3" not in by_deployment(net), 30, "dep-3 to be removed", agent)
    assert by_deployment(net)["dep-1"]["Id"] == before["dep-1"]
    assert by_deployment(net)["dep-1"]["State"] == "running"

    # An entry with no usable id at all (5,000 characters) might describe any container: the
    # pass that deploys dep-4 (so it did act on this document) removes nothing.
    write_state(state_file, net, [container(net, 1), dict(container(net, 2), deploymentId="x" * 5000), container(net, 4)])
    wait_for(lambda: http_ok(net.ip(5)), 30, "dep-4 to serve HTTP", agent)
    current = by_deployment(net)
    assert current["dep-2"]["Id"] == before["dep-2"] and current["dep-2"]["State"] == "running"
    assert current["dep-1"]["Id"] == before["dep-1"]
    # The bad entry is named once, not once per tick (the agent ticks every second).
    assert agent.log().count("deploymentId must be") <= 2, agent.log()[-3000:]
