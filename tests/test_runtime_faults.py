"""A control plane that fails, hangs or trickles must cost no workload (issue 8 §5).

Against the fake control plane's fault injection over real HTTP, with an in-memory Podman:
at start any failure to get a fresh expected state restores the cached one (starts and
creates only), and while polls keep failing the loop still brings back crashed or missing
containers of the last good state, never removing or reconfiguring anything.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent import api, crypto
from agent.loop import ControlPlaneSource, Reconciler
from agent.runtime import restore_from_cache
from agent.settings import Settings
from tests.fakecp import FakeControlPlane
from tests.fakes import FakePodman, RecordingReporter

SUBNET = ipaddress.IPv4Network("10.200.7.0/24")
STATE_PATH = f"{api.API}/expected-state"


def entry(dep: str, host: int) -> dict:
    return {
        "deploymentId": dep, "serviceId": f"svc-{dep}", "serviceName": dep, "name": f"c-{dep}",
        "image": "localhost/app:v1", "ipAddress": f"10.200.7.{host}", "ports": [], "env": {},
        "healthCheck": None, "volumes": [],
    }


DOCUMENT = {"containers": [entry("a", 2), entry("b", 3)], "dns": {"records": []}, "caddy": {"routes": []}, "wireguard": {"peers": []}}


@dataclass
class Env:
    cp: FakeControlPlane
    server_id: str
    podman: FakePodman
    source: ControlPlaneSource
    reconciler: Reconciler
    client: api.ControlPlane

    def deployments(self) -> dict[str, str]:
        return {c.labels.get("techulus.deployment.id", c.name): c.state for c in self.podman.containers.values()}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    key = crypto.new_signing_key()
    with FakeControlPlane() as cp:
        server = cp.add_server(crypto.public_key_b64(key))
        cp.set_expected_state(server.id, DOCUMENT)
        # Real retries and timeouts: the deadline, not a short per-attempt timeout, must bound a poll.
        client = api.ControlPlane(cp.url, api.Signer(server.id, key), connect_timeout=5, read_timeout=10, retries=3)
        source = ControlPlaneSource(client, SUBNET, tmp_path / "expected-state.json", deadline=0.5)
        podman = FakePodman()
        settings = Settings.load({"data_dir": str(tmp_path)}, environ={})
        reconciler = Reconciler(settings, podman, source, [], "", RecordingReporter(), threading.Lock())
        yield Env(cp, server.id, podman, source, reconciler, client)


FAULTS: dict[str, Callable[[FakeControlPlane], None]] = {
    "hang": lambda cp: cp.delay_next(3.0, count=10, path=STATE_PATH),
    "trickle": lambda cp: cp.drip_next(json.dumps(DOCUMENT).encode(), pieces=30, interval=0.1, count=10, path=STATE_PATH),
    "5xx": lambda cp: cp.fail_next(10, path=STATE_PATH),
    "401 clock skew": lambda cp: cp.respond_next(401, {"error": "Request timestamp too old"}, count=10, path=STATE_PATH),
    "404": lambda cp: cp.respond_next(404, {"error": "Server not registered"}, count=10, path=STATE_PATH),
    "garbage": lambda cp: cp.garbage_next(10, path=STATE_PATH),
    "dropped": lambda cp: cp.close_next(10, path=STATE_PATH),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_start_restores_from_the_cache_whatever_the_failure(env: Env, fault: str) -> None:
    env.source.fetch()  # a previous run cached the document
    stray = env.podman.add("stray")  # not in the cache: a restore never removes it
    FAULTS[fault](env.cp)
    components = SimpleNamespace(source=env.source, client=env.client, reconciler=env.reconciler)
    restore_from_cache(components, threading.Event())  # type: ignore[arg-type]
    assert env.deployments() == {"a": "running", "b": "running", "stray": "running"}
    assert stray.id in env.podman.containers
    # The loop may repair from it while the control plane stays unreachable.
    assert env.reconciler.last_good is not None


def test_a_hanging_start_poll_gives_up_at_the_restore_deadline(env: Env) -> None:
    """However many retries the client has, one attempt cut to the deadline is all."""
    env.source.fetch()
    before = len(env.cp.requests_to(STATE_PATH))
    FAULTS["hang"](env.cp)
    components = SimpleNamespace(source=env.source, client=env.client, reconciler=env.reconciler)
    restore_from_cache(components, threading.Event(), deadline=0.3)  # type: ignore[arg-type]
    assert len(env.cp.requests_to(STATE_PATH)) - before == 1
    assert set(env.deployments()) == {"a", "b"}


def test_start_with_a_fresh_state_leaves_the_work_to_the_loop(env: Env) -> None:
    env.source.fetch()
    components = SimpleNamespace(source=env.source, client=env.client, reconciler=env.reconciler)
    restore_from_cache(components, threading.Event())  # type: ignore[arg-type]
    assert env.podman.calls == []
    polls = len(env.cp.requests_to(STATE_PATH))
    env.reconciler.tick()
    assert len(env.cp.requests_to(STATE_PATH)) == polls, "the start-up poll is the first tick's"
    assert env.deployments() == {"a": "running", "b": "running"}
    env.reconciler.tick()
    assert len(env.cp.requests_to(STATE_PATH)) == polls + 1, "only once"


def test_start_without_a_cache_changes_nothing(env: Env) -> None:
    env.podman.add("stray")
    FAULTS["5xx"](env.cp)
    components = SimpleNamespace(source=env.source, client=env.client, reconciler=env.reconciler)
    restore_from_cache(components, threading.Event())  # type: ignore[arg-type]
    assert env.deployments() == {"stray": "running"}


@pytest.mark.parametrize("fault", ["hang", "trickle", "5xx", "401 clock skew", "garbage"])
def test_local_drift_is_repaired_from_the_last_good_state_while_polls_fail(env: Env, fault: str) -> None:
    env.reconciler.tick()
    assert env.deployments() == {"a": "running", "b": "running"}
    # Meanwhile: a crashes, b is removed behind our back, a stray container of ours appears.
    crashed = next(cid for cid, c in env.podman.containers.items() if c.labels["techulus.deployment.id"] == "a")
    env.podman.containers[crashed] = replace(env.podman.containers[crashed], state="exited")
    gone = next(cid for cid, c in env.podman.containers.items() if c.labels["techulus.deployment.id"] == "b")
    del env.podman.containers[gone]
    env.podman.add("stray")
    env.podman.calls.clear()
    FAULTS[fault](env.cp)
    env.reconciler.tick()
    assert env.deployments() == {"a": "running", "b": "running", "stray": "running"}
    assert ("start", crashed) in env.podman.calls
    assert not [op for op, _ in env.podman.calls if op in ("stop", "rm")]


def test_a_failing_poll_without_a_last_good_state_changes_nothing(env: Env) -> None:
    env.podman.add("stray")
    FAULTS["hang"](env.cp)
    env.reconciler.tick()
    assert [op for op, _ in env.podman.calls if op != "list"] == []


def test_the_poll_deadline_is_shorter_than_the_tick() -> None:
    assert Settings(tick_interval=10).poll_deadline == 8
    assert Settings(tick_interval=120).poll_deadline == 40  # connect + read timeouts
    assert Settings(tick_interval=0.5).poll_deadline == 2  # never too short for a loaded machine
