"""Ownership with real Podman: agents touch only what carries their own owner mark.

A registered agent (a real process against the fake control plane) and a standalone agent
(`agent standalone FILE`) run on one host at once, sharing one scope label so that only the
owner mark tells their containers apart, beside a foreign container with every techulus
label and another owner; after about a minute every container is the one it was. The
registered agent adopts the original Go agent's unmarked container on its network; a
standalone agent refuses to start on a collision; the image GC removes only our images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.host.images import ImageGC, ImageLedger, Watermarks
from agent.host.podman import Podman, PodmanOptions
from agent.model import ExpectedContainer
from tests import e2e
from tests.fakecp import FakeControlPlane
from tests.registry import LocalRegistry, local_registry  # noqa: F401
from tests.test_e2e_controlplane import Agent, occupy_subnets_except
from tests.test_e2e_standalone import AgentProcess
from tests.testbed import (  # noqa: F401
    BB_IMAGE,
    HTTPD_IMAGE,
    TestNetwork,
    create_network,
    podman,
    podman_env,
    podman_net,
    remove_network,
)

pytestmark = [pytest.mark.real]

OBSERVE_SECONDS = 60.0
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def second_net(podman_env: Path) -> Iterator[TestNetwork]:  # noqa: F811
    net = create_network()
    try:
        yield net
    finally:
        remove_network(net)


@pytest.fixture
def cp() -> Iterator[FakeControlPlane]:
    with FakeControlPlane() as plane:
        yield plane


def labels_argv(scope: str, service: str, deployment: str, owner: str | None) -> list[str]:
    argv = ["--label", f"techulus.service.id={service}", "--label", f"techulus.service.name={service}",
            "--label", f"techulus.deployment.id={deployment}", "--label", scope]
    return argv + (["--label", f"techulus.owner={owner}"] if owner else [])


def run_foreign(name: str, net: TestNetwork, scope: str, host: int, owner: str | None, deployment: str) -> str:
    """A container made behind the agents' backs: full techulus labels, `owner` or none."""
    argv = ["run", "-d", "--name", name, f"--network={net.name}", f"--ip={net.ip(host)}",
            *labels_argv(scope, f"svc-{name}", deployment, owner), HTTPD_IMAGE]
    return podman(*argv).stdout.strip().splitlines()[-1]


def snapshot(scope: str) -> dict[str, tuple[str, str, str]]:
    """name -> (id, state, started at) of every container with the shared scope label."""
    out = podman("ps", "-a", "--filter", f"label={scope}", "--format", "json").stdout
    found = {}
    for c in json.loads(out or "[]"):
        started = podman("inspect", "--format", "{{.State.StartedAt}}", c["Id"], check=False)
        if started.returncode == 0:  # else removed meanwhile: missing from the snapshot
            found[c["Names"][0]] = (c["Id"], c["State"], started.stdout.strip())
    return found


def standalone_state(net: TestNetwork, path: Path, prefix: str) -> Path:
    containers = [
        {"deploymentId": f"{prefix}-dep-{i}", "serviceId": f"{prefix}-svc-{i}", "serviceName": f"S{i}",
         "name": f"{prefix}-c{i}", "image": HTTPD_IMAGE, "ipAddress": net.ip(10 + i)}
        for i in (1, 2)
    ]
    path.write_text(json.dumps({"subnetId": net.subnet_id, "containers": containers}))
    return path


def test_two_agents_and_a_foreign_container_leave_each_other_alone(cp, podman_net, second_net, tmp_path):  # noqa: F811
    reg_net, alone_net = podman_net, second_net
    scope = reg_net.scope_label  # shared: only the owner mark separates the two agents
    tag = uuid.uuid4().hex[:6]
    foreign = f"foreign-{tag}"
    legacy = f"legacy-{tag}"
    run_foreign(foreign, reg_net, scope, 60, "someone-else", "dep-foreign")
    # The original Go agent's container for a deployment the control plane still expects.
    legacy_deployment = "44444444-4444-4444-8444-000000000009"
    legacy_id = run_foreign(legacy, reg_net, scope, 61, None, legacy_deployment)

    occupy_subnets_except(cp, reg_net.subnet_id)
    token_file = tmp_path / "token"
    token_file.write_text(cp.add_token())
    registered = Agent(tmp_path / "reg", reg_net)
    alone = AgentProcess(
        standalone_state(alone_net, tmp_path / "state.json", f"sa{tag}"),
        tmp_path / "alone" / "data",
        TestNetwork(alone_net.name, alone_net.subnet_id, scope),
        tmp_path / "alone.log",
    )
    (tmp_path / "alone").mkdir()
    (tmp_path / "reg").mkdir()
    try:
        registered.start(cp.url, "--token-file", str(token_file))
        config = registered.data_dir / "config.json"
        e2e.wait_for(config.exists, 20, "registration", registered.log_path, registered.proc)
        server_id = json.loads(config.read_text())["serverId"]
        expected = [
            {"deploymentId": legacy_deployment, "serviceId": f"svc-{legacy}", "serviceName": "Legacy", "name": legacy,
             "image": HTTPD_IMAGE, "ipAddress": reg_net.ip(61), "ports": [], "env": {}, "healthCheck": None, "volumes": []},
            {"deploymentId": "44444444-4444-4444-8444-000000000001", "serviceId": "svc-new", "serviceName": "New",
             "name": f"new-{tag}", "image": HTTPD_IMAGE, "ipAddress": reg_net.ip(2), "ports": [], "env": {},
             "healthCheck": None, "volumes": []},
        ]
        cp.set_expected_state(server_id, {"containers": expected})
        alone.start()

        def all_running() -> bool:
            state = snapshot(scope)
            names = {foreign, legacy, f"new-{tag}", f"sa{tag}-c1", f"sa{tag}-c2"}
            return names <= set(state) and all(state[n][1] == "running" for n in names)

        e2e.wait_for(all_running, 60, "both agents' containers", alone.log_path, alone.proc)
        before = snapshot(scope)
        assert len(before) == 5, before
        assert before[legacy][0] == legacy_id, "the registered agent adopted the Go agent's container instead of replacing it"
        time.sleep(OBSERVE_SECONDS)
        assert registered.proc is not None and registered.proc.poll() is None, registered.log()
        assert alone.proc is not None and alone.proc.poll() is None, alone.log()
        after = snapshot(scope)
        assert after == before, "every container is the one it was, started once"
        for log in (registered.log(), alone.log()):
            assert "remove-orphan" not in log and "remove-unexpected" not in log and "redeploy" not in log
        labels = json.loads(podman("inspect", "--format", "{{json .Config.Labels}}", before[f"new-{tag}"][0]).stdout)
        assert labels["techulus.owner"] == server_id
        labels = json.loads(podman("inspect", "--format", "{{json .Config.Labels}}", before[f"sa{tag}-c1"][0]).stdout)
        assert labels["techulus.owner"].startswith("standalone-")
    finally:
        registered.stop()
        alone.stop()
        subprocess.run(["podman", "rm", "-f", "-t", "0", foreign, legacy], capture_output=True, check=False)


def test_standalone_refuses_to_start_on_a_collision(podman_net, tmp_path):  # noqa: F811
    net = podman_net
    foreign = f"foreign-{uuid.uuid4().hex[:6]}"
    run_foreign(foreign, net, net.scope_label, 70, "server-of-someone-else", "dep-x")
    cases = {
        # The registered agent's network, with its container on it.
        "same-network": (net.name, net.subnet_id, f"container {foreign} (server-of-someone-else) is on our network {net.name}"),
        # Its own network name, but the registered agent's subnet.
        "same-subnet": (f"tt{uuid.uuid4().hex[:10]}", net.subnet_id, f"network {net.name} (subnet {net.subnet}) overlaps"),
    }
    for case, (network, subnet_id, message) in cases.items():
        state = tmp_path / f"{case}.json"
        state.write_text(json.dumps({"subnetId": subnet_id, "containers": [
            {"deploymentId": "d1", "serviceId": "s1", "serviceName": "S", "name": f"c-{case}-{foreign}",
             "image": HTTPD_IMAGE, "ipAddress": f"10.200.{subnet_id}.70"}]}))
        env = {"TECHULUS_AGENT_NETWORK_NAME": network, "TECHULUS_AGENT_SCOPE_LABEL": net.scope_label,
               "TECHULUS_AGENT_RUN_DIR": str(tmp_path / "run")}
        done = subprocess.run(
            [sys.executable, "-m", "agent", "standalone", str(state), "--data-dir", str(tmp_path / case)],
            capture_output=True, text=True, timeout=60, env={**os.environ, **env, "PYTHONPATH": str(REPO)},
            cwd=REPO,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 1, output
        assert "standalone agent refuses to start" in output and message in output, output
        assert "Traceback" not in output
        assert podman("container", "exists", f"c-{case}-{foreign}", check=False).returncode == 1, "it created nothing"
        if network != net.name:
            assert podman("network", "exists", network, check=False).returncode == 1, "nor its network"
    assert podman("container", "inspect", "--format", "{{.State.Running}}", foreign).stdout.strip() == "true"


def build_image(tag: str, marker: str, context: Path) -> None:
    context.mkdir(parents=True)
    (context / "Containerfile").write_text(f'FROM {BB_IMAGE}\nLABEL techulus.test.marker="{marker}"\nCMD ["httpd", "-f", "-p", "80", "-h", "/www"]\n')
    podman("build", "--pull=never", "--quiet", "-t", tag, str(context))


def test_image_gc_removes_only_our_unused_images(podman_net, tmp_path, local_registry: LocalRegistry):  # noqa: F811
    net = podman_net
    uid = uuid.uuid4().hex[:8]
    names = ("unused", "aliased", "used", "rollback", "current")
    local = {name: f"localhost/techulus-gc-{name}-{uid}:1" for name in names}
    foreign = f"localhost/techulus-gc-foreign-{uid}:1"
    alias = f"localhost/techulus-gc-alias-{uid}:1"
    pulled: dict[str, str] = {}
    podman_adapter = Podman(
        PodmanOptions(network=net.name, scope_label=net.scope_label, run_dir=tmp_path / "run", stop_timeout=1,
                      owner="server-gc-test", adopt_legacy=True, insecure_registries=(local_registry.host,)),
        images=ImageLedger(tmp_path / "images.json"),
    )
    try:
        for name in names:
            build_image(local[name], f"{name}-{uid}", tmp_path / name)
            pulled[name] = local_registry.push(local[name], f"techulus-gc-{name}-{uid}:1")
            podman("rmi", local[name])
            podman_adapter.pull(pulled[name])
        build_image(foreign, f"foreign-{uid}", tmp_path / "foreign")  # someone else's, never pulled by us
        podman("tag", pulled["aliased"], alias)  # someone else tagged one of our images too

        def deploy(service: str, image: str, host: int) -> str:
            spec = ExpectedContainer(deployment_id=f"d{host}-{uid}", service_id=service, service_name=service,
                                     name=f"gc-{uid}-{host}", image=image, ip_address=net.ip(host))
            return podman_adapter.run_container(spec, {}, tmp_path / "volumes")

        deploy("svc-used", pulled["used"], 2)
        old = deploy("svc-rolling", pulled["rollback"], 3)
        podman_adapter.force_remove(old)
        deploy("svc-rolling", pulled["current"], 4)  # the rollback image is now unused, but kept

        gc = ImageGC(podman_adapter, podman_adapter.images, Watermarks(0.0, 0.0), interval=600)
        removed = gc.collect()
        assert sorted(removed) == sorted([pulled["unused"], pulled["aliased"]])

        def exists(reference: str) -> bool:
            return podman("image", "exists", reference, check=False).returncode == 0

        assert not exists(pulled["unused"]) and not exists(pulled["aliased"])
        assert exists(alias), "an image someone else tagged too keeps their tag"
        assert exists(foreign), "an image we never pulled survives"
        assert exists(BB_IMAGE) and exists(HTTPD_IMAGE)
        assert all(exists(pulled[name]) for name in ("used", "rollback", "current"))
        assert gc.collect() == [], "nothing more of ours is removable"
    finally:
        podman("rm", "-f", "-t", "0", *[f"gc-{uid}-{h}" for h in (2, 3, 4)], check=False)
        podman("rmi", "-f", foreign, alias, *pulled.values(), *local.values(), check=False)
