"""Shared fixtures. Unit tests run with every subprocess faked: a command a test did not
register with `fp` fails the test. Tests marked `real` use the real tools instead."""

from __future__ import annotations

import os

import pytest

# Never let a test (or an agent process a test starts) ask a public service for our IP:
# test traffic stays on this machine.
os.environ["TECHULUS_AGENT_PUBLIC_IP"] = "203.0.113.7"


@pytest.fixture(autouse=True)
def _forbid_unfaked_subprocesses(request: pytest.FixtureRequest):
    if request.node.get_closest_marker("real"):
        yield None
        return
    yield request.getfixturevalue("fp")
