"""The Podman adapter against real Podman 4.3 (TESTBED.md): static IPs reachable from the
host, labels, secrets (any value, byte for byte, never in argv nor on disk), volumes, batched health, stop/start/restart,
foreign containers left alone, IPAM recovery, pulls from a real loopback registry (TLS
only relaxed for listed registries), pull timeouts and the network bootstrap.

Every test runs on its own bridge and scope label (tests/testbed.py) and removes what it made.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import agent.host.podman as podman_module
from agent.drift import LABEL_DEPLOYMENT_ID, LABEL_SERVICE_ID, LABEL_SERVICE_NAME
from agent.host.podman import Podman, PodmanError, PodmanOptions, stable_mac
from agent.model import ExpectedContainer, HealthCheck, Volume
from tests.registry import LocalRegistry, local_registry  # noqa: F401
from tests.testbed import *  # noqa: F403
from tests.testbed import BB_IMAGE, TestNetwork, podman

pytestmark = pytest.mark.real

SERVICE = "svc-real"
HEALTH_CMD = "wget -q -O /dev/null http://127.0.0.1/"


@pytest.fixture(scope="session")
def httpd_image(podman_env: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The busybox test image with httpd as its CMD (ExpectedContainer has no command)."""
    tag = f"localhost/techulus-test-httpd-{uuid.uuid4().hex[:8]}:latest"
    context = tmp_path_factory.mktemp("httpd-image")
    (context / "Containerfile").write_text(f'FROM {BB_IMAGE}\nCMD ["httpd", "-f", "-p", "80", "-h", "/www"]\n')
    podman("build", "--pull=never", "--quiet", "-t", tag, str(context))
    try:
        yield tag
    finally:
        podman("rmi", "--force", tag, check=False)


def make_podman(net: TestNetwork, tmp_path: Path, **kw: Any) -> Podman:
    options: dict[str, Any] = {
        "network": net.name, "scope_label": net.scope_label, "run_dir": tmp_path / "run", "stop_timeout": 1,
        "timeout": 30.0, "verify_timeout": 10.0,
    }
    options.update(kw)
    return Podman(PodmanOptions(**options))


def make_spec(net: TestNetwork, host: int, image: str, **kw: Any) -> ExpectedContainer:
    deployment = kw.pop("deployment_id", f"dep{uuid.uuid4().hex[:12]}")
    base: dict[str, Any] = {
        "deployment_id": deployment,
        "service_id": SERVICE,
        "service_name": "Real test",
        "name": f"{SERVICE}-{net.name}-{deployment[:8]}",
        "image": image,
        "ip_address": net.ip(host),
    }
    base.update(kw)
    return ExpectedContainer(**base)


def inspect(ref: str) -> dict[str, Any]:
    return json.loads(podman("container", "inspect", "--format", "json", ref).stdout)[0]


def exists(ref: str) -> bool:
    return podman("container", "exists", ref, check=False).returncode == 0


def http_get(ip: str, attempts: int = 20) -> str:
    last: Exception | None = None
    for _ in range(attempts):
        try:
            with urllib.request.urlopen(f"http://{ip}/", timeout=2) as response:  # noqa: S310 - test bridge
                return str(response.read().decode())
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    raise AssertionError(f"http://{ip}/ did not answer: {last}")


@pytest.fixture
def foreign(podman_net: TestNetwork) -> Iterator[list[str]]:
    """Names of containers a test creates WITHOUT our labels; removed afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        podman("rm", "--force", "--time", "0", name, check=False)


@pytest.fixture
def capture_runs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Records every command the adapter runs, its environment, and the env file as `podman run` saw it."""
    calls: list[dict[str, Any]] = []
    real_run = podman_module.run

    def recording_run(argv: list[str], **kw: Any) -> Any:
        record: dict[str, Any] = {"argv": list(argv), "env": kw.get("env"), "inherit_env": kw.get("inherit_env", True)}
        env_files = [a.split("=", 1)[1] for a in argv if a.startswith("--env-file=")]
        if env_files:
            path = Path(env_files[0])
            record["env_file"] = path
            record["env_target"] = os.readlink(f"/proc/self/fd/{path.name}") if path.parent == Path("/dev/fd") else ""
            record["pass_fds"] = tuple(kw.get("pass_fds", ()))
        calls.append(record)
        return real_run(argv, **kw)

    monkeypatch.setattr(podman_module, "run", recording_run)
    return calls


def test_deploy_two_containers_reachable_with_labels_secrets_volumes_health(
    podman_net: TestNetwork, httpd_image: str, tmp_path: Path, capture_runs: list[dict[str, Any]]
) -> None:
    pm = make_podman(podman_net, tmp_path)
    volumes_dir = tmp_path / "volumes"
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    first = make_spec(
        podman_net, 2, httpd_image,
        volumes=(Volume("data", "/data"),),
        health_check=HealthCheck(HEALTH_CMD, interval=30, timeout=5, retries=3, start_period=0),
    )
    second = make_spec(podman_net, 3, httpd_image)
    id1 = pm.run_container(first, {"DATABASE_URL": secret, "EMPTY": "", "SPACED": " a b "}, volumes_dir)
    id2 = pm.run_container(second, {}, volumes_dir)
    assert len(id1) == 64 and len(id2) == 64 and id1 != id2

    # Reachable from the host on their static IPs, with the stable MACs.
    assert "hello from techulus test" in http_get(first.ip_address)
    assert "hello from techulus test" in http_get(second.ip_address)
    info1 = inspect(id1)
    network = info1["NetworkSettings"]["Networks"][podman_net.name]
    assert network["IPAddress"] == first.ip_address
    assert network["MacAddress"] == stable_mac(first.ip_address)

    # Exactly our labels (plus the test scope), hardened run options.
    scope_key, _, scope_value = podman_net.scope_label.partition("=")
    labels = info1["Config"]["Labels"]
    assert {k: labels.get(k) for k in (LABEL_SERVICE_ID, LABEL_SERVICE_NAME, LABEL_DEPLOYMENT_ID, scope_key)} == {
        LABEL_SERVICE_ID: SERVICE, LABEL_SERVICE_NAME: "Real test", LABEL_DEPLOYMENT_ID: first.deployment_id,
        scope_key: scope_value,
    }
    assert info1["HostConfig"]["RestartPolicy"]["Name"] == "always"
    assert info1["HostConfig"]["LogConfig"]["Type"] == "k8s-file"
    assert info1["HostConfig"]["LogConfig"]["Size"] == "50MB"
    assert "no-new-privileges" in " ".join(info1["HostConfig"].get("SecurityOpt") or [])

    # The secret is inside the container, but was never in an argv nor on disk: podman 4.3
    # took it from its own environment (`--env=DATABASE_URL`).
    env_inside = podman("exec", id1, "env").stdout.splitlines()
    assert {f"DATABASE_URL={secret}", "EMPTY=", "SPACED= a b "} <= set(env_inside)
    assert all(secret not in arg for call in capture_runs for arg in call["argv"])
    runs = [call for call in capture_runs if call["argv"][1:2] == ["run"]]
    assert len(runs) == 2 and not any("env_file" in call for call in runs)
    assert {"--env=DATABASE_URL", "--env=EMPTY", "--env=SPACED"} <= set(runs[0]["argv"])
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").iterdir())

    # The volume lives under the agent's volumes dir, 0755, and is the container's /data.
    volume = volumes_dir / SERVICE / "data"
    assert volume.is_dir() and stat.S_IMODE(volume.stat().st_mode) == 0o755
    podman("exec", id1, "sh", "-c", "echo written-inside > /data/proof")
    assert (volume / "proof").read_text() == "written-inside\n"

    # Listing sees both (and only ours); health comes from one batched inspect.
    listed = {c.id: c for c in pm.list_containers()}
    assert set(listed) == {id1, id2}
    assert listed[id1].deployment_id == first.deployment_id and listed[id1].running
    assert pm.health([id1, id2]) == {id1: "starting", id2: "none"}
    podman("healthcheck", "run", id1)  # no systemd timer here: run the check by hand
    calls_before = len(capture_runs)
    assert pm.health([id1, id2]) == {id1: "healthy", id2: "none"}
    assert len(capture_runs) == calls_before + 1
    checked = pm.read_health([id1, id2])
    assert checked[id1].checked and not checked[id2].checked and checked[id1].restarts == 0

    # What podman's own listing says matches the inspect (issue 11: reports need no inspect):
    # the health suffix of its status, and a start time that a restart moves.
    listed = {c.id: c for c in pm.list_containers()}
    assert (listed[id1].health, listed[id2].health) == ("healthy", "")
    started = listed[id2].started_at
    assert abs(started - time.time()) < 600
    time.sleep(1.1)  # StartedAt has whole seconds
    podman("restart", "-t", "0", id2)
    moved = {c.id: c for c in pm.list_containers()}[id2]
    assert moved.started_at > started and moved.running
    assert pm.read_health([id2])[id2].restarts == 0, "a restart by hand is not one by the restart policy"


def test_start_restart_stop_and_remove(podman_net: TestNetwork, httpd_image: str, tmp_path: Path) -> None:
    # An init as PID 1 lets httpd see SIGTERM, so stops do not wait out the grace period.
    pm = make_podman(podman_net, tmp_path, init=True)
    spec = make_spec(podman_net, 4, httpd_image)
    cid = pm.run_container(spec, {}, tmp_path / "volumes")

    podman("stop", "--time", "0", cid)
    assert not pm.is_running(cid)
    pm.start(cid)
    assert pm.is_running(cid)
    http_get(spec.ip_address)

    started = inspect(cid)["State"]["StartedAt"]
    pm.restart(cid)
    assert pm.is_running(cid) and inspect(cid)["State"]["StartedAt"] != started

    pm.stop_and_remove(cid)
    assert not exists(cid) and pm.inspect(cid) is None
    pm.stop_and_remove(cid)  # already gone: success
    pm.force_remove(cid)
    with pytest.raises(PodmanError, match="does not exist"):
        pm.start(cid)

    # Redeploying the same spec reuses the IP (and MAC) at once.
    again = pm.run_container(spec, {}, tmp_path / "volumes")
    http_get(spec.ip_address)
    pm.force_remove(again)
    assert not exists(again)


def test_init_option_makes_stop_prompt(podman_net: TestNetwork, httpd_image: str, tmp_path: Path) -> None:
    pm = make_podman(podman_net, tmp_path, init=True, stop_timeout=20)
    cid = pm.run_container(make_spec(podman_net, 5, httpd_image), {}, tmp_path / "volumes")
    assert inspect(cid)["HostConfig"]["Init"] is True
    started = time.monotonic()
    pm.stop_and_remove(cid)
    # With an init as PID 1, httpd gets the SIGTERM: no waiting out the 20 s grace period.
    assert time.monotonic() - started < 15
    assert not exists(cid)


def test_crash_looping_container_fails_the_deploy_and_is_removed(
    podman_net: TestNetwork, httpd_image: str, tmp_path: Path
) -> None:
    pm = make_podman(podman_net, tmp_path)
    # The plain busybox image runs `/bin/sh` with no stdin: it exits at once, every time,
    # and restart=always respins it at once.
    spec = make_spec(podman_net, 6, BB_IMAGE)
    with pytest.raises(PodmanError, match="did not stay running"):
        pm.run_container(spec, {}, tmp_path / "volumes")
    assert not exists(spec.name)
    # The address is free again for a working deployment.
    cid = pm.run_container(make_spec(podman_net, 6, httpd_image), {}, tmp_path / "volumes")
    http_get(podman_net.ip(6))
    assert pm.is_running(cid)


def test_start_of_a_crashing_container_is_halted(podman_net: TestNetwork, tmp_path: Path) -> None:
    pm = make_podman(podman_net, tmp_path)
    name = f"{SERVICE}-{uuid.uuid4().hex[:8]}"
    podman(
        "create", "--name", name, "--restart", "always", "--label", f"{LABEL_SERVICE_ID}={SERVICE}",
        "--label", podman_net.scope_label, BB_IMAGE,
    )
    with pytest.raises(PodmanError, match="did not stay running after start"):
        pm.start(name)
    if exists(name):  # halted and kept, or removed when the stop did not stick
        first = inspect(name)
        time.sleep(0.5)
        again = inspect(name)
        assert not again["State"]["Running"] and again["RestartCount"] == first["RestartCount"]


def environ_of(container_id: str, pid: str = "1") -> dict[str, str]:
    """A process's environment inside the container, exactly as execve gave it."""
    # Read as bytes: text mode would turn the \r of a value into \n.
    raw = subprocess.run(
        ["podman", "exec", container_id, "cat", f"/proc/{pid}/environ"], capture_output=True, check=True, timeout=60
    ).stdout
    entries = [entry.partition(b"=") for entry in raw.split(b"\0") if entry]
    return {key.decode(): value.decode("utf-8") for key, _, value in entries}


def test_any_env_value_reaches_the_container_exactly_and_no_argv_holds_it(
    podman_net: TestNetwork, httpd_image: str, tmp_path: Path, capture_runs: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What an env file cannot carry (line breaks, leading quotes, 100 KB) arrives byte for
    byte through podman's environment; names podman reads itself (TZ, LANG) come through
    the in-memory env file; no argv, no CreateCommand and no helper process holds a value."""
    monkeypatch.setenv("TECHULUS_AGENT_URL", "https://cp.example/agent-setting")
    tag = uuid.uuid4().hex
    values = {
        "PEM": f"-----BEGIN PRIVATE KEY-----\nMIIEv{tag}\nQ==\n-----END PRIVATE KEY-----\n",
        "JSON": f'{{\n  "key": "{tag}",\n  "n": 1\n}}',
        "QUOTED": f'"{tag}" and \'more\'',
        "SINGLE": f"'{tag}",
        "EQUALS": f"a={tag}==b=",
        "UNICODE": f"héllo ✓ 日本語 \u2028 \U0001f680 {tag}",
        "CRLF": f"{tag}\r\nsecond\r",
        "SPACES": f"  {tag}\t ",
        "EMPTY": "",
        "BIG": tag + "x" * (100_000 - len(tag)),
        "LARGEST": "y" * (128 * 1024 - len("LARGEST") - 2),  # Linux's MAX_ARG_STRLEN, NUL included
        "TZ": "Europe/Berlin",
        "LANG": f"C.UTF-8-{tag}",
    }
    pm = make_podman(podman_net, tmp_path)
    container_id = pm.run_container(make_spec(podman_net, 12, httpd_image), values, tmp_path / "volumes")

    try:
        inside = environ_of(container_id)
        assert {key: inside.get(key) for key in values} == values
        secrets = [value for value in values.values() if len(value) >= 4]
        # No argv holds a value: ours, nor the one podman records (CreateCommand).
        (run_call,) = [call for call in capture_runs if call["argv"][1:2] == ["run"]]
        assert not any(value in arg for value in secrets for arg in run_call["argv"])
        create_command = inspect(container_id)["Config"]["CreateCommand"]
        assert not any(value in arg for value in secrets for arg in create_command)
        env_args = [arg for arg in run_call["argv"] if arg.startswith("--env")]
        assert [arg for arg in create_command if arg.startswith("--env")] == env_args
        assert set(env_args) == {f"--env={key}" for key in values if key not in ("TZ", "LANG")} | {f"--env-file={run_call['env_file']}"}
        assert run_call["env_target"].startswith("/memfd:")
        # podman's environment is the values plus the few variables podman reads; not the agent's.
        assert run_call["inherit_env"] is False and not any(key.startswith("TECHULUS_") for key in run_call["env"])
        assert run_call["env"]["CONTAINERS_CONF"] == os.environ["CONTAINERS_CONF"]
        # The container's monitor (conmon) outlives podman: it does not carry the values.
        conmon = Path(f"/proc/{inspect(container_id)['State']['ConmonPid']}/environ").read_bytes()
        assert not any(value.encode() in conmon for value in secrets)
    finally:
        podman("rm", "--force", "--time", "0", container_id, check=False)


def test_foreign_container_with_our_name_is_refused(
    podman_net: TestNetwork, httpd_image: str, tmp_path: Path, foreign: list[str]
) -> None:
    pm = make_podman(podman_net, tmp_path)
    spec = make_spec(podman_net, 7, httpd_image)
    foreign.append(spec.name)
    foreign_id = podman("run", "-d", "--name", spec.name, httpd_image).stdout.strip().splitlines()[-1]
    with pytest.raises(PodmanError, match="does not manage"):
        pm.run_container(spec, {"K": "secret-value"}, tmp_path / "volumes")
    assert inspect(spec.name)["Id"] == foreign_id and inspect(spec.name)["State"]["Running"]
    assert not list((tmp_path / "run").glob("env-*"))


def test_foreign_containers_are_never_listed_or_touched(
    podman_net: TestNetwork, httpd_image: str, tmp_path: Path, foreign: list[str]
) -> None:
    pm = make_podman(podman_net, tmp_path)
    ours = pm.run_container(make_spec(podman_net, 8, httpd_image), {}, tmp_path / "volumes")
    plain = f"foreign-{uuid.uuid4().hex[:8]}"
    unscoped = f"foreign-{uuid.uuid4().hex[:8]}"
    foreign += [plain, unscoped]
    podman("run", "-d", "--name", plain, httpd_image)
    # Carries the service label but not this run's scope: another agent's (or test's) container.
    podman("run", "-d", "--name", unscoped, "--label", f"{LABEL_SERVICE_ID}=x", "--label",
           f"{LABEL_DEPLOYMENT_ID}=y", httpd_image)
    assert [c.id for c in pm.list_containers()] == [ours]
    for name in (plain, unscoped):
        assert not pm.is_managed(name)
        for operation in (pm.stop_and_remove, pm.force_remove, pm.restart, pm.start):
            with pytest.raises(PodmanError, match="not managed"):
                operation(name)
        assert inspect(name)["State"]["Running"]


def test_ipam_stale_holder_of_ours_is_removed(podman_net: TestNetwork, httpd_image: str, tmp_path: Path) -> None:
    pm = make_podman(podman_net, tmp_path)
    ip = podman_net.ip(9)
    stale = f"stale-{uuid.uuid4().hex[:8]}"
    podman(
        "run", "-d", "--name", stale, "--network", podman_net.name, "--ip", ip,
        "--label", f"{LABEL_SERVICE_ID}={SERVICE}", "--label", f"{LABEL_DEPLOYMENT_ID}=old-deployment",
        "--label", podman_net.scope_label, httpd_image,
    )
    podman("pause", stale)  # not running, yet it still holds its address
    spec = make_spec(podman_net, 9, httpd_image)
    cid = pm.run_container(spec, {}, tmp_path / "volumes")
    assert not exists(stale)
    assert inspect(cid)["NetworkSettings"]["Networks"][podman_net.name]["IPAddress"] == ip
    http_get(ip)


def test_ipam_foreign_holder_fails_clearly_and_leaves_nothing(
    podman_net: TestNetwork, httpd_image: str, tmp_path: Path, foreign: list[str]
) -> None:
    pm = make_podman(podman_net, tmp_path)
    ip = podman_net.ip(10)
    holder = f"holder-{uuid.uuid4().hex[:8]}"
    foreign.append(holder)
    podman("run", "-d", "--name", holder, "--network", podman_net.name, "--ip", ip, httpd_image)
    spec = make_spec(podman_net, 10, httpd_image)
    with pytest.raises(PodmanError, match=f"IP {ip} is held by container {holder}, which the agent does not manage"):
        pm.run_container(spec, {}, tmp_path / "volumes")
    assert inspect(holder)["State"]["Running"]
    assert not exists(spec.name)  # the half-created container of ours was cleaned up
    assert pm.list_containers() == []


@pytest.fixture
def plain_registries_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No registry is insecure unless the adapter says so (the host's /etc is not read)."""
    conf = tmp_path / "registries.conf"
    conf.write_text("unqualified-search-registries = []\n")
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(conf))


def test_pull_from_a_real_registry_needs_the_insecure_setting(
    podman_net: TestNetwork, httpd_image: str, tmp_path: Path, local_registry: LocalRegistry,  # noqa: F811
    plain_registries_conf: None,
) -> None:
    reference = local_registry.push(httpd_image, f"techulus-test-{uuid.uuid4().hex[:8]}:v1")
    try:
        strict = make_podman(podman_net, tmp_path)
        with pytest.raises(PodmanError, match="HTTP response to HTTPS client"):
            strict.pull(reference)
        assert not strict.image_exists(reference)

        relaxed = make_podman(podman_net, tmp_path, insecure_registries=(local_registry.host,))
        relaxed.pull(reference)
        assert relaxed.image_exists(reference)
        # And it deploys from the pulled reference.
        cid = relaxed.run_container(make_spec(podman_net, 11, reference), {}, tmp_path / "volumes")
        assert inspect(cid)["ImageName"] == reference
        relaxed.force_remove(cid)
    finally:
        podman("rmi", "--force", reference, check=False)


def test_pull_timeout_is_honoured(podman_net: TestNetwork, tmp_path: Path, plain_registries_conf: None) -> None:
    # A "registry" that accepts connections and never answers.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        pm = make_podman(podman_net, tmp_path, pull_timeout=1.5, insecure_registries=(f"127.0.0.1:{port}",))
        started = time.monotonic()
        with pytest.raises(PodmanError, match="longer than 1.5s"):
            pm.pull(f"127.0.0.1:{port}/never:v1")
        assert time.monotonic() - started < 10
        assert accepted, "podman never connected to the silent registry"
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()


def test_ensure_network_creates_once_and_warns_on_mismatch(
    podman_net: TestNetwork, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pm = make_podman(podman_net, tmp_path)
    podman("network", "rm", podman_net.name)
    assert pm.ensure_network(podman_net.subnet, podman_net.gateway)
    created = json.loads(podman("network", "inspect", podman_net.name).stdout)[0]
    assert [s["subnet"] for s in created["subnets"]] == [podman_net.subnet]
    assert created["dns_enabled"] is False

    assert pm.ensure_network(podman_net.subnet, podman_net.gateway)
    assert json.loads(podman("network", "inspect", podman_net.name).stdout)[0]["id"] == created["id"]

    with caplog.at_level(logging.WARNING):
        assert not pm.ensure_network("10.201.0.0/24", "10.201.0.1")
    assert f"has subnet(s) {podman_net.subnet}, expected 10.201.0.0/24" in caplog.text
    assert json.loads(podman("network", "inspect", podman_net.name).stdout)[0]["id"] == created["id"]


def test_podman_missing_is_a_clear_error(tmp_path: Path) -> None:
    pm = Podman(PodmanOptions(binary=str(tmp_path / "podman"), run_dir=tmp_path))
    with pytest.raises(PodmanError, match="podman is not installed"):
        pm.list_containers()
    assert os.listdir(tmp_path) == []
