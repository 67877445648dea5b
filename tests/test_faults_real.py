"""Faults that must not cost workloads or data, against real Podman (issue 8 §5).

A `podman stop` killed mid-way (kill -9 of the agent) leaves the container `stopping`;
`podman rm --force` then answers 0 and forgets the container while its process runs on.
The agent's removals must leave no process of the container behind.
"""

from __future__ import annotations

import json
import signal
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.drift import LABEL_SERVICE_ID
from agent.host.podman import Podman, PodmanOptions
from tests.testbed import BB_IMAGE, HTTPD_IMAGE, TestNetwork, podman, podman_env, podman_net  # noqa: F401

pytestmark = [pytest.mark.real]


def processes_of(container_id: str) -> list[int]:
    """Independent of the agent's own scan: live pids whose cgroup or argv names the id."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "cgroup").read_text() + (entry / "cmdline").read_text(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if container_id in text and state != "Z" and "container\x00cleanup" not in text:
            found.append(int(entry.name))
    return found


def wait(predicate, timeout: float, what: str):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def inspect(ref: str) -> dict:
    return json.loads(podman("container", "inspect", "--format", "json", ref).stdout)[0]


@pytest.fixture
def stuck(podman_net: TestNetwork) -> Iterator[tuple[str, Podman, TestNetwork]]:  # noqa: F811
    """A container of ours that ignores SIGTERM (busybox `sleep` as PID 1, no --init), left
    `stopping` by a `podman stop` that was killed with SIGKILL half way."""
    name = f"tt-stuck-{uuid.uuid4().hex[:8]}"
    podman(
        "run", "--detach", f"--name={name}", "--network=none", f"--label={LABEL_SERVICE_ID}=svc-stuck",
        f"--label={podman_net.scope_label}", BB_IMAGE, "sleep", "1000",
    )
    container_id = inspect(name)["Id"]
    stopper = subprocess.Popen(["podman", "stop", "--time", "120", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait(lambda: inspect(name)["State"]["Status"] == "stopping", 30, "the container to be stopping")
    finally:
        stopper.kill()  # kill -9 of the podman stop, as when the agent dies mid-step
        stopper.wait()
    assert inspect(name)["State"]["Status"] == "stopping" and processes_of(container_id)
    options = PodmanOptions(network=podman_net.name, scope_label=podman_net.scope_label, stop_timeout=1, timeout=60)
    try:
        yield container_id, Podman(options), podman_net
    finally:
        for pid in processes_of(container_id):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        podman("rm", "--force", "--time", "0", container_id, check=False)


@pytest.mark.parametrize("removal", ["stop_and_remove", "force_remove"])
def test_removal_after_an_interrupted_stop_leaves_no_process(stuck: tuple[str, Podman, TestNetwork], removal: str) -> None:
    container_id, adapter, _net = stuck
    getattr(adapter, removal)(container_id)
    assert podman("ps", "--all", "--quiet", "--no-trunc", "--filter", f"id={container_id}").stdout.strip() == ""
    # conmon exits by itself once its container process is gone; nothing may be left.
    wait(lambda: not processes_of(container_id), 20, "no process of the container to be left")


def test_a_container_podman_already_forgot_is_killed(stuck: tuple[str, Podman, TestNetwork], caplog: pytest.LogCaptureFixture) -> None:
    """What the next agent met before: plain `podman rm --force` on the stopping container
    answers 0 and forgets it, while its process runs on; the agent's check kills it."""
    container_id, adapter, _net = stuck
    podman("rm", "--force", "--time", "0", container_id)
    assert podman("ps", "--all", "--quiet", "--no-trunc", "--filter", f"id={container_id}").stdout.strip() == ""
    assert processes_of(container_id), "podman no longer leaks the process: this test lost its premise"
    with caplog.at_level("WARNING"):
        adapter.force_remove(container_id)  # not found by podman: success, and the leftovers are checked
    wait(lambda: not processes_of(container_id), 20, "no process of the container to be left")
    assert caplog.text.count("was removed but") == 1


def files_holding(needle: bytes, roots: list[Path], since: float) -> list[Path]:
    """Regular files under `roots` changed since `since` whose content holds `needle`."""
    found = []
    for root in roots:
        for path in root.rglob("*") if root.is_dir() else ():
            try:
                if path.is_file() and not path.is_symlink() and path.stat().st_mtime >= since and needle in path.read_bytes():
                    found.append(path)
            except OSError:
                continue  # vanished meanwhile (other tests), or unreadable
    return found


def environ_holders(needle: bytes) -> set[int]:
    """Live pids whose environment holds `needle`."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "environ").read_bytes():
                found.add(int(entry.name))
        except OSError:
            continue
    return found


def test_secrets_reach_the_container_from_memory_and_never_touch_the_disk(
    podman_net: TestNetwork, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """podman 4.3 takes `--env=NAME` values from its own environment and reads the names it
    uses itself from `--env-file=/dev/fd/N` (a memfd it inherits): the container sees every
    variable, and neither the agent nor podman writes a file holding one (outside podman's
    own record of the container in its storage), so a kill -9 leaves none behind; and no
    process outlives `podman run` with a value in its environment but the container's."""
    from agent.host import podman as podman_module
    from agent.model import ExpectedContainer

    secret = f"s3cr3t-{uuid.uuid4().hex}"
    values = {"DATABASE_URL": secret, "PEM": f"-----BEGIN KEY-----\n{secret}\n-----END KEY-----\n", "EMPTY": "",
              "TZ": f"UTC-{secret}"}
    env_files: list[str] = []
    argvs: list[list[str]] = []
    real_run = podman_module.run

    def recording_run(argv: list[str], **kw: object) -> object:
        argvs.append(list(argv))
        for arg in argv:
            if arg.startswith("--env-file="):
                path = arg.split("=", 1)[1]
                env_files.append(os.readlink(f"/proc/self/fd/{Path(path).name}") if path.startswith("/dev/fd/") else path)
        return real_run(argv, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(podman_module, "run", recording_run)
    adapter = Podman(
        PodmanOptions(network=podman_net.name, scope_label=podman_net.scope_label, run_dir=tmp_path / "run", stop_timeout=1)
    )
    spec = ExpectedContainer(
        "dep-secret", "svc-secret", "Secret", f"tt-secret-{uuid.uuid4().hex[:8]}", HTTPD_IMAGE, podman_net.ip(9)
    )
    started = time.time() - 1
    container_id = adapter.run_container(spec, values, tmp_path / "volumes")
    try:
        environ = subprocess.run(["podman", "exec", container_id, "cat", "/proc/1/environ"], capture_output=True,
                                 check=True, timeout=60).stdout.split(b"\0")
        assert {f"{k}={v}".encode() for k, v in values.items()} <= set(environ)
        assert len(env_files) == 1 and env_files[0].startswith("/memfd:")  # TZ: a name podman reads itself
        assert not any(secret in arg for argv in argvs for arg in argv)
        assert not (tmp_path / "run").exists() or not list((tmp_path / "run").iterdir())
        temp = [Path(p) for p in {os.environ.get("TMPDIR", "/tmp"), "/tmp", "/var/tmp", "/dev/shm", "/run/techulus-agent"}]
        assert files_holding(secret.encode(), [tmp_path, *temp], started) == []
        holders = environ_holders(secret.encode())
        assert holders and holders <= set(processes_of(container_id))
    finally:
        podman("rm", "--force", "--time", "0", container_id, check=False)


@pytest.mark.parametrize("fault", ["hang", "401 clock skew"])
def test_agent_restores_and_repairs_while_the_control_plane_misbehaves(
    podman_net: TestNetwork, tmp_path: Path, fault: str  # noqa: F811
) -> None:
    """The agent as a process, registered with the fake control plane and real Podman. After
    a restart whose control plane hangs (or answers 401, as after a reboot with a skewed
    clock) the cached workloads come back; while it keeps failing, a container that dies
    is brought back from the last good state, and nothing is removed."""
    from tests.fakecp import FakeControlPlane
    from tests.test_e2e_controlplane import Agent, expected_container, occupy_subnets_except, ours

    net = podman_net
    with FakeControlPlane() as cp:
        occupy_subnets_except(cp, net.subnet_id)
        token_file = tmp_path / "token"
        token_file.write_text(cp.add_token() + "\n")
        agent = Agent(tmp_path, net)
        try:
            agent.start(cp.url, "--token-file", str(token_file))
            config_path = agent.data_dir / "config.json"
            e2e_wait(agent, config_path.exists, 30, "registration")
            server_id = json.loads(config_path.read_text())["serverId"]
            document = {"containers": [expected_container(net, 1), expected_container(net, 2)]}
            cp.set_expected_state(server_id, document)
            e2e_wait(agent, lambda: running(net) == 2, 60, "two containers")
            assert agent.stop() == 0
            podman("rm", "-f", "-t", "0", *[c["Id"] for c in ours(net).values()])  # as after a reboot

            path = "/api/v1/agent/expected-state"
            if fault == "hang":
                cp.delay_next(3600, count=10_000, path=path)
            else:
                cp.respond_next(401, {"error": "Request timestamp too old"}, count=10_000, path=path)
            started = time.monotonic()
            agent.start(cp.url)
            e2e_wait(agent, lambda: running(net) == 2, 60, "restore from the cache")
            print(f"\n[figure] {fault}: workloads restored {time.monotonic() - started:.1f}s after the agent started")
            assert "restoring workloads from the cached expected state" in agent.log()

            # The control plane still fails; a workload dies: it comes back from the last good state.
            victim = next(iter(ours(net).values()))
            podman("rm", "-f", "-t", "0", victim["Id"])
            e2e_wait(agent, lambda: running(net) == 2, 60, "the lost container to be re-created")
            assert "only bringing back containers of the last good one" in agent.log()
            assert agent.proc is not None and agent.proc.poll() is None
        finally:
            agent.stop(signal.SIGKILL)
            cp.clear_faults()


def running(net: TestNetwork) -> int:
    from tests.test_e2e_controlplane import ours

    return len([c for c in ours(net).values() if c["State"] == "running"])


def e2e_wait(agent, predicate, timeout: float, what: str):  # noqa: ANN001, ANN201
    from tests import e2e

    return e2e.wait_for(predicate, timeout, what, agent.log_path, agent.proc)
