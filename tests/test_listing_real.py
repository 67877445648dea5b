"""The listing's watch on podman's database with real Podman 4.3 (agent/host/listing.py): a
quiet database spares the `ps`, and what a `ps` would show after a change made behind the
agent's back (a stop by hand, a health check run) is listed at once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import agent.host.podman as podman_module
from agent.host.listing import QUIET
from agent.model import HealthCheck
from tests.test_podman_real import httpd_image, make_podman, make_spec  # noqa: F401
from tests.testbed import *  # noqa: F403
from tests.testbed import TestNetwork, podman

pytestmark = pytest.mark.real


@pytest.fixture
def ps_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []
    real_run = podman_module.run

    def counting_run(argv: list[str], **kw: Any) -> Any:
        if argv[1:2] == ["ps"]:
            calls.append(argv)
        return real_run(argv, **kw)

    monkeypatch.setattr(podman_module, "run", counting_run)
    return calls


def verified(pm: podman_module.Podman, ps_calls: list[list[str]], timeout: float = 20.0) -> bool:
    """Lists until a listing is served without a `ps` (the database stays quiet long enough)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pm.list_containers()
        before = len(ps_calls)
        pm.list_containers()
        if len(ps_calls) == before:
            return True
        time.sleep(QUIET)
    return False


def test_a_quiet_database_spares_the_ps_and_changes_behind_our_back_are_seen(
    podman_net: TestNetwork, httpd_image: str, tmp_path: Path, ps_calls: list[list[str]],  # noqa: F811
) -> None:
    pm = make_podman(podman_net, tmp_path, watch_state=True)
    cid = pm.run_container(make_spec(podman_net, 7, httpd_image), {}, tmp_path / "volumes")
    assert verified(pm, ps_calls), "a quiet database serves the listing without a ps"

    podman("stop", "-t", "0", cid)  # behind the agent's back
    assert [c.state for c in pm.list_containers()] == ["exited"]
    podman("start", cid)
    assert [c.state for c in pm.list_containers()] == ["running"]
    assert verified(pm, ps_calls)
    podman("kill", "--signal", "KILL", cid)  # restart=always: podman brings it back at once
    listed = pm.list_containers()
    assert [c.state for c in listed] in (["running"], ["exited"], ["stopped"])
    assert listed[0].pid != 0 or listed[0].state != "running"

    # A container with a health check: its listing shows health, which podman >= 5.4 keeps
    # out of its database, so it is listed afresh every time.
    check = HealthCheck(cmd="true", interval=3600, timeout=5, retries=3, start_period=0)
    checked = pm.run_container(make_spec(podman_net, 8, httpd_image, health_check=check), {}, tmp_path / "volumes")
    assert not verified(pm, ps_calls, timeout=3 * QUIET)
    assert {c.id: c.health for c in pm.list_containers()}[checked] == "starting"
    podman("healthcheck", "run", checked)
    assert {c.id: c.health for c in pm.list_containers()}[checked] == "healthy"
