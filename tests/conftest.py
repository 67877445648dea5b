"""Shared fixtures. Unit tests run with every subprocess faked: a command a test did not
register with `fp` fails the test. Tests marked `real` use the real tools instead."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _forbid_unfaked_subprocesses(request: pytest.FixtureRequest):
    if request.node.get_closest_marker("real"):
        yield None
        return
    yield request.getfixturevalue("fp")
