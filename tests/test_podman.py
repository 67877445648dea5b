"""Unit tests of the Podman adapter: the exact argv of every operation (pytest-subprocess),
parsing from stdout only, not-found handling, refusal of foreign containers, and the
secrets path (values only in podman's own, minimal environment; the names podman reads in a
sealed memfd; never in argv)."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.drift import LABEL_DEPLOYMENT_ID, LABEL_SERVICE_ID, LABEL_SERVICE_NAME
from agent.host.podman import (
    DEFAULT_CAPS,
    MAX_ENV_LINE,
    Podman,
    PodmanCommandError,
    PodmanError,
    PodmanNotInstalled,
    HealthReading,
    PodmanOptions,
    check_env,
    parse_ps,
    podman_environment,
    podman_reads,
    split_env,
    stable_mac,
)
from agent.host.run import CommandError
from agent.model import ExpectedContainer, HealthCheck, PortMapping, Volume

CID = "a" * 64
CID2 = "b" * 64
NAME = "svc1-dep00001"
SCOPE = "techulus.test.scope=unit"
IMAGE = "docker.io/library/nginx:1.27"
WARNING = 'time="2026-01-01T00:00:00Z" level=warning msg="something odd"\n'
NO_SUCH = "Error: inspecting object: no such container x\n"


def ours(deployment: str = "dep00001-0000", scope: str = SCOPE, **extra: str) -> dict[str, str]:
    labels = {LABEL_SERVICE_ID: "svc1", LABEL_SERVICE_NAME: "web", LABEL_DEPLOYMENT_ID: deployment}
    if scope:
        key, _, value = scope.partition("=")
        labels[key] = value
    labels.update(extra)
    return labels


def inspect_json(
    cid: str = CID,
    labels: dict[str, str] | None = None,
    running: bool = True,
    status: str = "running",
    restarts: int = 0,
    started: str = "2026-01-01T00:00:00Z",
    ip: str = "",
    name: str = NAME,
) -> str:
    networks = {"techulus": {"IPAddress": ip}} if ip else {}
    return json.dumps([
        {
            "Id": cid,
            "Name": name,
            "RestartCount": restarts,
            "State": {"Status": status, "Running": running, "StartedAt": started, "ExitCode": 0},
            "Config": {"Labels": labels if labels is not None else ours()},
            "NetworkSettings": {"Networks": networks},
        }
    ])


def opts(tmp_path: Path, **kw: Any) -> PodmanOptions:
    base: dict[str, Any] = {"scope_label": SCOPE, "run_dir": tmp_path / "run", "stop_timeout": 3, "settle_time": 0.01}
    base.update(kw)
    return PodmanOptions(**base)


@pytest.fixture
def podman(tmp_path: Path) -> Podman:
    return Podman(opts(tmp_path), sleep=lambda _s: None)


def spec(**kw: Any) -> ExpectedContainer:
    base: dict[str, Any] = {
        "deployment_id": "dep00001-0000",
        "service_id": "svc1",
        "service_name": "My API",
        "name": NAME,
        "image": "nginx:1.27",
        "ip_address": "10.200.3.2",
    }
    base.update(kw)
    return ExpectedContainer(**base)


INSPECT = ["podman", "container", "inspect", "--format", "json"]


def register_inspect(fp: Any, ref: str, stdout: str = "", missing: bool = False, occurrences: int = 1) -> None:
    if missing:
        fp.register([*INSPECT, ref], stdout="[]\n", stderr=NO_SUCH, returncode=125, occurrences=occurrences)
    else:
        fp.register([*INSPECT, ref], stdout=stdout, stderr=WARNING, occurrences=occurrences)


def run_argvs(fp: Any) -> list[list[str]]:
    return [list(call) for call in fp.calls if list(call)[:2] == ["podman", "run"]]


# --- options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"insecure_registries": ("http://reg:5000",)},
        {"insecure_registries": ("reg/path",)},
        {"scope_label": "novalue"},
        {"network": "-bad"},
        {"dns_servers": ("not-an-ip",)},
        {"publish_address": "0.0.0.0; rm"},
        {"restart_policy": "sometimes"},
        {"pull_timeout": 0},
    ],
)
def test_bad_options_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(PodmanError):
        PodmanOptions(**kw)


# --- listing --------------------------------------------------------------------------------


def test_list_reads_stdout_only_and_filters_labels(fp: Any, podman: Podman) -> None:
    ps = [
        {"Id": CID, "Names": [NAME], "Image": IMAGE, "State": "running", "Created": 5, "Labels": ours()},
        # Foreign or out-of-scope entries podman should not have returned are dropped anyway.
        {"Id": CID2, "Names": ["db"], "Image": IMAGE, "State": "running", "Labels": {"x": "y"}},
        {"Id": "c" * 64, "Names": ["other"], "Image": IMAGE, "State": "exited", "Labels": ours(scope="techulus.test.scope=else")},
    ]
    fp.register(
        ["podman", "ps", "--all", "--filter", f"label={LABEL_SERVICE_ID}", "--filter", f"label={SCOPE}", "--format", "json"],
        stdout=json.dumps(ps),
        stderr=WARNING * 3,
    )
    containers = podman.list_containers()
    assert [c.id for c in containers] == [CID]
    c = containers[0]
    assert (c.name, c.image, c.state, c.created, c.deployment_id) == (NAME, IMAGE, "running", 5, "dep00001-0000")


def test_list_without_scope_label(fp: Any, tmp_path: Path) -> None:
    fp.register(["podman", "ps", "--all", "--filter", f"label={LABEL_SERVICE_ID}", "--format", "json"], stdout="[]")
    assert Podman(opts(tmp_path, scope_label="")).list_containers() == []


def test_parse_ps_tolerates_odd_entries() -> None:
    stdout = json.dumps([
        {"Id": "abc", "Names": None, "Labels": None, "State": "Exited", "Created": "yesterday"},
        {"Id": 7},
        "junk",
        {"Names": ["noid"]},
        {"Id": "short", "Names": [3], "Labels": {LABEL_DEPLOYMENT_ID: "x", "n": None}, "Created": True},
    ])
    parsed = parse_ps(stdout)
    assert [(c.id, c.name, c.state, c.created) for c in parsed] == [("abc", "", "exited", 0), ("short", "", "unknown", 0)]
    assert parsed[1].labels == {LABEL_DEPLOYMENT_ID: "x"}
    assert parsed[1].short_id == "short"  # short ids never crash (§17.17)
    assert parse_ps("") == [] and parse_ps("null") == []


def test_parse_ps_reads_health_start_time_and_restarts() -> None:
    """What lets a status report go without an inspect (issue 11): podman 4.3's ps shows
    health as a suffix of its human status and StartedAt as unix seconds; newer ones add
    a restart count."""
    stdout = json.dumps([
        {"Id": "a", "State": "running", "Status": "Up 3 minutes (healthy)", "StartedAt": 1796153734},
        {"Id": "b", "State": "running", "Status": "Up Less than a second ago (starting)", "Restarts": 4},
        {"Id": "c", "State": "running", "Status": "Up 14 seconds ago", "StartedAt": -62135596800},
        {"Id": "d", "State": "running", "Status": "Up 2 hours (unhealthy) ", "StartedAt": True, "Restarts": "2"},
        {"Id": "e", "State": "exited", "Status": "Exited (1) 2 seconds ago", "StartedAt": 5},
        {"Id": "f", "State": "running", "Status": "Up (healthy) for a while", "Restarts": None},
        {"Id": "g", "State": "running", "Status": ["(healthy)"]},
    ])
    assert [(c.id, c.health, c.started_at, c.restarts) for c in parse_ps(stdout)] == [
        ("a", "healthy", 1796153734, -1), ("b", "starting", 0, 4), ("c", "", 0, -1), ("d", "unhealthy", 0, -1),
        ("e", "", 5, -1), ("f", "", 0, -1), ("g", "", 0, -1),
    ]


@pytest.mark.parametrize("stdout", ["{not json", '{"Id": "x"}', WARNING])
def test_parse_ps_rejects_garbage(stdout: str) -> None:
    with pytest.raises(PodmanError):
        parse_ps(stdout)


def test_list_failure_raises_podman_and_command_error(fp: Any, podman: Podman) -> None:
    fp.register(["podman", "ps", fp.any()], returncode=125, stderr="Error: database is locked\n")
    with pytest.raises(PodmanError) as info:
        podman.list_containers()
    assert isinstance(info.value, CommandError)
    assert "database is locked" in str(info.value)


def test_podman_missing_gives_a_clear_error(fp: Any, tmp_path: Path) -> None:
    # The real Popen gets to try a binary that does not exist: nothing can start.
    fp.allow_unregistered(True)
    with pytest.raises(PodmanNotInstalled, match="podman is not installed or not on PATH") as info:
        Podman(opts(tmp_path, binary=str(tmp_path / "no-podman-here"))).list_containers()
    assert isinstance(info.value, PodmanError) and isinstance(info.value, CommandError)


# --- inspect / health -----------------------------------------------------------------------


def test_inspect_found_missing_and_failing(fp: Any, podman: Podman) -> None:
    register_inspect(fp, CID, inspect_json())
    register_inspect(fp, "gone", missing=True)
    fp.register([*INSPECT, "broken"], returncode=125, stderr="Error: permission denied\n")
    assert podman.inspect(CID)["Id"] == CID  # type: ignore[index]
    assert podman.inspect("gone") is None
    with pytest.raises(PodmanError, match="permission denied"):
        podman.inspect("broken")


@pytest.mark.parametrize("ref", ["-rf", "a b", "", "x;y", "../x", "--privileged"])
def test_bad_refs_never_reach_podman(fp: Any, podman: Podman, ref: str) -> None:
    for call in (podman.inspect, podman.stop_and_remove, podman.force_remove, podman.start, podman.restart):
        with pytest.raises(PodmanError, match="not a container name or id"):
            call(ref)
    assert fp.call_count(["podman", fp.any()]) == 0


def test_is_managed_and_is_running(fp: Any, podman: Podman) -> None:
    register_inspect(fp, "mine", inspect_json(running=False, status="exited"))
    register_inspect(fp, "foreign", inspect_json(labels={"maintainer": "x"}))
    register_inspect(fp, "otherscope", inspect_json(labels=ours(scope="techulus.test.scope=else")))
    register_inspect(fp, "gone", missing=True)
    register_inspect(fp, "mine", inspect_json(running=False, status="exited"))
    assert podman.is_managed("mine")
    assert not podman.is_managed("foreign")
    assert not podman.is_managed("otherscope")
    assert not podman.is_managed("gone")
    assert not podman.is_running("mine")


HEALTH_FORMAT = (
    "{{.Id}} {{.Name}} {{.State.Status}} {{.RestartCount}} "
    "{{if .Config.Healthcheck}}check{{else}}-{{end}} {{if .State.Health}}{{.State.Health.Status}}{{end}}"
)


def test_health_is_one_batched_call(fp: Any, podman: Podman) -> None:
    third = "c" * 64
    fp.register(
        ["podman", "container", "inspect", "--format", HEALTH_FORMAT, CID, CID2, third, "named", "vanished"],
        stdout=f"{CID} n1 running 0 check healthy\n{CID2} n2 running 2 - \n{third} n3 exited 0 check unhealthy\n"
        f"{'d' * 64} named running 0 check starting\n",
        stderr="Error: inspecting object: no such container vanished\n" + WARNING,
        returncode=125,
    )
    both = podman.read_health([CID, CID2, third, "named", "vanished"])
    assert both == {
        CID: HealthReading("healthy", 0, True), CID2: HealthReading("none", 2, False),
        third: HealthReading("none", 0, True), "named": HealthReading("starting", 0, True),
        "vanished": HealthReading("none", 0, False),
    }
    assert podman.health([]) == {}


def test_health_read_that_answers_nothing_raises(fp: Any, podman: Podman) -> None:
    fp.register(["podman", "container", "inspect", fp.any()], stderr="Error: podman is wedged\n", returncode=125)
    with pytest.raises(PodmanError, match="health read failed"):
        podman.health([CID])


def test_logs_tail(fp: Any, podman: Podman) -> None:
    fp.register(["podman", "logs", "--tail", "50", CID], stdout="out\n", stderr="err\n")
    assert podman.logs_tail(CID) == "out\nerr"


# --- network --------------------------------------------------------------------------------

NET_INSPECT = ["podman", "network", "inspect", "--", "techulus"]
NET_JSON = json.dumps([{"name": "techulus", "subnets": [{"subnet": "10.200.3.0/24", "gateway": "10.200.3.1"}]}])


def test_ensure_network_creates_once(fp: Any, podman: Podman) -> None:
    fp.register(NET_INSPECT, returncode=125, stderr="Error: unable to find network with name or ID techulus: network not found\n")
    fp.register(["podman", "network", "create", "--driver", "bridge", "--subnet=10.200.3.0/24", "--gateway=10.200.3.1",
                 "--disable-dns", "--", "techulus"], stdout="techulus\n")
    fp.register(NET_INSPECT, stdout=NET_JSON)
    assert podman.ensure_network("10.200.3.0/24", "10.200.3.1")
    assert podman.ensure_network("10.200.3.0/24", "10.200.3.1")
    assert fp.call_count(["podman", "network", "create", fp.any()]) == 1


def test_ensure_network_lost_race_counts_as_success(fp: Any, podman: Podman) -> None:
    fp.register(NET_INSPECT, returncode=125, stderr="Error: network not found\n")
    fp.register(["podman", "network", "create", fp.any()], returncode=125,
                stderr="Error: network name techulus already used: network already exists\n")
    fp.register(NET_INSPECT, stdout=NET_JSON)
    assert podman.ensure_network("10.200.3.0/24", "10.200.3.1")


def test_ensure_network_warns_on_subnet_mismatch(fp: Any, podman: Podman, caplog: pytest.LogCaptureFixture) -> None:
    fp.register(NET_INSPECT, stdout=NET_JSON, stderr=WARNING)
    with caplog.at_level(logging.WARNING):
        assert not podman.ensure_network("10.200.9.0/24", "10.200.9.1")
    assert "10.200.3.0/24" in caplog.text and "expected 10.200.9.0/24" in caplog.text
    assert fp.call_count(["podman", "network", "create", fp.any()]) == 0


def test_ensure_network_other_inspect_failure_creates_nothing(fp: Any, podman: Podman) -> None:
    fp.register(NET_INSPECT, returncode=125, stderr="Error: cannot open database: permission denied\n")
    with pytest.raises(PodmanError, match="permission denied"):
        podman.ensure_network("10.200.3.0/24", "10.200.3.1")


@pytest.mark.parametrize("subnet,gateway", [("10.200.3.0/33", "10.200.3.1"), ("10.200.3.0/24", "10.200.4.1"), ("x", "y")])
def test_ensure_network_bad_input(fp: Any, podman: Podman, subnet: str, gateway: str) -> None:
    with pytest.raises(PodmanError):
        podman.ensure_network(subnet, gateway)


# --- pull -----------------------------------------------------------------------------------


def test_pull_verifies_tls_except_for_listed_registries(fp: Any, tmp_path: Path) -> None:
    podman = Podman(opts(tmp_path, insecure_registries=("registry.local:5000",)))
    fp.register(["podman", "pull", "--quiet", "--", "docker.io/library/nginx:latest"], stdout="sha\n")
    fp.register(["podman", "pull", "--quiet", "--tls-verify=false", "--", "registry.local:5000/app:v1"], stdout="sha\n")
    fp.register(["podman", "pull", "--quiet", "--", "registry.local:5001/app:latest"], stdout="sha\n")
    podman.pull("nginx")
    podman.pull("registry.local:5000/app:v1")
    podman.pull("registry.local:5001/app")


def test_pull_timeout_is_passed_and_reported(fp: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.host.podman as module
    from agent.host.run import CommandTimeout

    seen: dict[str, Any] = {}

    def fake_run(argv: list[str], **kw: Any) -> Any:
        seen.update(kw)
        raise CommandTimeout(tuple(argv), None, reason="timed out after 7s and was killed")

    monkeypatch.setattr(module, "run", fake_run)
    with pytest.raises(PodmanError, match="longer than 7s"):
        Podman(opts(tmp_path, pull_timeout=7)).pull("nginx")
    assert seen["timeout"] == 7


@pytest.mark.parametrize("image", ["--privileged", "", "a b"])
def test_pull_bad_image(fp: Any, podman: Podman, image: str) -> None:
    with pytest.raises(PodmanError):
        podman.pull(image)


def test_image_exists(fp: Any, podman: Podman) -> None:
    fp.register(["podman", "image", "exists", "--", "docker.io/library/nginx:1.27"], returncode=0)
    fp.register(["podman", "image", "exists", "--", "docker.io/library/nginx:2"], returncode=1)
    assert podman.image_exists("nginx:1.27")
    assert not podman.image_exists("nginx:2")


# --- run ------------------------------------------------------------------------------------


def expected_run_argv(
    spec_: ExpectedContainer, volumes_dir: Path, env_file: str | None, env_names: tuple[str, ...] = (), **opt: Any
) -> list[str]:
    argv = ["podman", "run", "--detach", f"--name={spec_.name}", "--restart=always", "--pull=never",
            "--security-opt=no-new-privileges", "--cap-drop=ALL"]
    argv += [f"--cap-add={c}" for c in DEFAULT_CAPS]
    argv += ["--log-driver=k8s-file", "--log-opt=max-size=50mb"]
    argv += [f"--label={LABEL_SERVICE_ID}=svc1", f"--label={LABEL_SERVICE_NAME}={spec_.service_name}",
             f"--label={LABEL_DEPLOYMENT_ID}={spec_.deployment_id}", f"--label={SCOPE}"]
    if spec_.ip_address:
        argv += ["--network=techulus", f"--ip={spec_.ip_address}", f"--mac-address={stable_mac(spec_.ip_address)}"]
        argv += [f"--dns={d}" for d in opt.get("dns", ())]
    else:
        argv += [f"--publish={opt.get('bind', '127.0.0.1')}:{p.host_port}:{p.container_port}" for p in spec_.ports]
    if spec_.health_check:
        hc = spec_.health_check
        argv += [f"--health-cmd={hc.cmd}", f"--health-interval={hc.interval}s", f"--health-timeout={hc.timeout}s",
                 f"--health-retries={hc.retries}", f"--health-start-period={hc.start_period}s"]
    argv += [f"--volume={volumes_dir / 'svc1' / v.name}:{v.container_path}" for v in spec_.volumes]
    if env_file:
        argv.append(f"--env-file={env_file}")
    argv += [f"--env={name}" for name in env_names]
    return [*argv, "--", "docker.io/library/nginx:1.27"]


def register_verify(fp: Any, cid: str = CID, **kw: Any) -> None:
    register_inspect(fp, cid, inspect_json(cid, **kw))


IN_USE = (
    'Error: creating container storage: the container name "{}" is already in use by {}. You have to remove '
    "that container to be able to reuse that name: that name is already in use\n"
)


AGENT_ENV = {
    "PATH": "/usr/sbin:/usr/bin", "CONTAINERS_CONF": "/etc/test/containers.conf", "HTTPS_PROXY": "http://proxy:3128",
    "TECHULUS_AGENT_URL": "https://cp.example", "TECHULUS_AGENT_TOKEN": "agent-token-hunter2",
    "NOTIFY_SOCKET": "/run/systemd/notify", "SSH_AUTH_SOCK": "/tmp/ssh", "AWS_SECRET_ACCESS_KEY": "agent-aws",
}


def test_run_argv_is_exact_and_secrets_stay_out_of_it(fp: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if podman_reads(k)]:
        monkeypatch.delenv(key)
    for key, value in AGENT_ENV.items():
        monkeypatch.setenv(key, value)
    podman = Podman(opts(tmp_path, dns_servers=("10.200.3.1",)), sleep=lambda _s: None)
    volumes_dir = tmp_path / "volumes"
    s = spec(
        health_check=HealthCheck("curl -f http://localhost/ || exit 1", 10, 5, 3, 30),
        volumes=(Volume("data", "/data"), Volume("cache", "/var/cache/app")),
    )
    pem = "-----BEGIN PRIVATE KEY-----\nMIIE hunter2\n-----END PRIVATE KEY-----\n"
    env = {"DATABASE_URL": "postgres://u:hunter2-secret@db/x", "EMPTY": "", "PEM": pem, "JSON": '"{\n  \"a\": 1\n}"',
           "TZ": "Europe/Berlin", "PATH": "/app/bin:/usr/bin"}
    seen: dict[str, Any] = {}

    def capture(process: Any) -> None:
        argv = [str(a) for a in process.args]
        env_file = Path(next(a for a in argv if a.startswith("--env-file=")).split("=", 1)[1])
        seen["argv"] = argv
        seen["env"] = dict(process.kwargs["env"])
        seen["file"] = env_file
        fd = int(env_file.name)
        seen["pass_fds"] = tuple(process.kwargs["pass_fds"])
        seen["target"] = os.readlink(f"/proc/self/fd/{fd}")
        seen["mode"] = stat.S_IMODE(os.fstat(fd).st_mode)
        seen["content"] = env_file.read_text()

    fp.register(["podman", "run", fp.any()], stdout=CID + "\n", stderr=WARNING + "level=error msg=systemd\n", callback=capture)
    register_verify(fp)
    assert podman.run_container(s, env, volumes_dir) == CID

    # The happy path is exactly one run and one inspect.
    assert [list(c)[:3] for c in fp.calls] == [["podman", "run", "--detach"], [*INSPECT[:3]]]
    assert seen["argv"] == expected_run_argv(
        s, volumes_dir, str(seen["file"]), ("DATABASE_URL", "EMPTY", "PEM", "JSON"), dns=("10.200.3.1",)
    )
    assert not any("hunter2" in a or "Berlin" in a for a in seen["argv"])
    # Podman's environment: the values passed by name, and of the agent's own only what
    # podman reads (its config, PATH, proxies); no agent setting, token or notify socket.
    assert seen["env"] == {
        "PATH": "/usr/sbin:/usr/bin", "CONTAINERS_CONF": "/etc/test/containers.conf", "HTTPS_PROXY": "http://proxy:3128",
        "DATABASE_URL": env["DATABASE_URL"], "EMPTY": "", "PEM": pem, "JSON": env["JSON"],
    }
    # PATH and TZ are names podman reads: they go in the env file, a memfd handed to podman
    # as /dev/fd/N, never a file on disk.
    assert str(seen["file"]).startswith("/dev/fd/") and seen["pass_fds"] == (int(seen["file"].name),)
    assert seen["target"].startswith("/memfd:") and seen["mode"] == 0o600
    assert seen["content"] == "TZ=Europe/Berlin\nPATH=/app/bin:/usr/bin\n"
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").iterdir())
    with pytest.raises(OSError):  # closed after the run
        os.fstat(int(seen["file"].name))
    for name in ("data", "cache"):
        path = volumes_dir / "svc1" / name
        assert path.is_dir() and stat.S_IMODE(path.stat().st_mode) == 0o755


def test_run_without_variables_podman_reads_needs_no_env_file(fp: Any, podman: Podman, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TECHULUS_AGENT_TOKEN", "agent-token")
    s = spec()
    fp.register(expected_run_argv(s, tmp_path, None, ("K", "EMPTY")), stdout=CID + "\n")
    register_verify(fp)
    podman.run_container(s, {"K": "v", "EMPTY": ""}, tmp_path)
    fp.register(expected_run_argv(s, tmp_path, None), stdout=CID + "\n")
    register_verify(fp)
    podman.run_container(s, {}, tmp_path)  # no variables: still not the agent's environment
    runs = [c for c in fp.calls if list(c)[:2] == ["podman", "run"]]
    assert len(runs) == 2


def test_only_run_gets_a_minimal_environment(fp: Any, podman: Podman, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every other podman command runs as before, in the agent's environment (env=None)."""
    seen: list[Any] = []
    fp.register(["podman", "image", "exists", fp.any()], callback=lambda p: seen.append(p.kwargs.get("env")))
    podman.image_exists("nginx:1.27")
    assert seen == [None]


def test_which_names_podman_reads() -> None:
    for name in ("PATH", "HOME", "TMPDIR", "LD_PRELOAD", "LD_LIBRARY_PATH", "CONTAINERS_CONF", "CONTAINER_HOST",
                 "XDG_RUNTIME_DIR", "GODEBUG", "http_proxy", "NO_PROXY", "LANG", "LC_ALL", "TZ", "NOTIFY_SOCKET",
                 "PODMAN_USERNS", "_CONTAINERS_USERNS_CONFIGURED", "DBUS_SYSTEM_BUS_ADDRESS", "GOMAXPROCS",
                 "GOAMD64", "GOLANG_PROTOBUF_REGISTRATION_CONFLICT", "NETAVARK_FW", "AARDVARK_BINARY",
                 "RUST_BACKTRACE", "CNI_PATH", "OCICRYPT_KEYPROVIDER_CONFIG", "CONMON_SECCOMP_NOTIFY_PLUGINS",
                 "STORAGE_DRIVER", "BUILDAH_ISOLATION", "ZONEINFO"):
        assert podman_reads(name), name
    for name in ("DATABASE_URL", "PATHS", "GOOGLE_API_KEY", "NODE_ENV", "SECRET_KEY_BASE", "MY_HOME", "PRIVATE_KEY",
                 "GO_ENV", "GOOGLE_CLOUD_PROJECT"):
        assert not podman_reads(name), name
    environ = {"PATH": "/bin", "NOTIFY_SOCKET": "/run/n", "LISTEN_FDS": "3", "TECHULUS_AGENT_TOKEN": "t", "X": "1"}
    assert podman_environment(environ) == {"PATH": "/bin"}


def test_any_value_an_environment_holds_is_passed_by_name() -> None:
    values = {"PEM": "a\nb\r\n", "Q": '"x', "S": "'y'", "EQ": "a=b=", "U": "héllo \u2028 ✓", "T": "\tx ",
              "BIG": "x" * (128 * 1024 - 5)}
    by_name, in_file = split_env(values)
    assert by_name == values and in_file == {}
    assert split_env({"HOME": "/app", "K": "v"}) == ({"K": "v"}, {"HOME": "/app"})


def test_run_without_ip_publishes_on_the_private_address_only(fp: Any, tmp_path: Path) -> None:
    s = spec(ip_address="", ports=(PortMapping(80, 30000), PortMapping(443, 30001)))
    for bind in ("127.0.0.1", "10.100.0.5"):
        podman = Podman(opts(tmp_path, publish_address="" if bind == "127.0.0.1" else bind), sleep=lambda _s: None)
        fp.register(expected_run_argv(s, tmp_path, None, bind=bind), stdout=CID + "\n")
        register_verify(fp)
        podman.run_container(s, {}, tmp_path)
    assert len(run_argvs(fp)) == 2
    assert not any("--publish=:" in a or "0.0.0.0" in a for argv in run_argvs(fp) for a in argv)


def test_run_pulls_a_missing_image(fp: Any, podman: Podman, tmp_path: Path) -> None:
    fp.register(["podman", "run", fp.any()], returncode=125, stderr="Error: docker.io/library/nginx:1.27: image not known\n")
    register_inspect(fp, NAME, missing=True)
    fp.register(["podman", "pull", "--quiet", "--", "docker.io/library/nginx:1.27"], stdout="sha\n")
    fp.register(["podman", "run", fp.any()], stdout=CID + "\n")
    register_verify(fp)
    assert podman.run_container(spec(), {}, tmp_path) == CID
    assert fp.call_count(["podman", "pull", fp.any()]) == 1 and len(run_argvs(fp)) == 2


def test_run_missing_image_that_cannot_be_pulled(fp: Any, podman: Podman, tmp_path: Path) -> None:
    fp.register(["podman", "run", fp.any()], returncode=125, stderr="Error: x: image not known\n")
    register_inspect(fp, NAME, missing=True)
    fp.register(["podman", "pull", fp.any()], returncode=125, stderr="Error: manifest unknown\n")
    with pytest.raises(PodmanError, match="manifest unknown"):
        podman.run_container(spec(), {"K": "secret-value"}, tmp_path)
    assert not list((tmp_path / "run").glob("env-*"))


def test_run_container_id_from_stdout_only(fp: Any, podman: Podman, tmp_path: Path) -> None:
    fp.register(["podman", "run", fp.any()], stdout=f"noise\n{CID}\n", stderr=f"{CID2}\nError: warning\n")
    register_verify(fp)
    assert podman.run_container(spec(), {"K": "value"}, tmp_path) == CID


def test_run_container_id_masked_by_a_secret_falls_back_to_inspect(fp: Any, podman: Podman, tmp_path: Path) -> None:
    fp.register(["podman", "run", fp.any()], stdout=f"{CID}\n")  # masked by run(): the secret is "aaaaaaaa"
    register_inspect(fp, NAME, inspect_json())
    register_verify(fp)
    assert podman.run_container(spec(), {"K": "aaaaaaaa"}, tmp_path) == CID
    assert fp.call_count([*INSPECT, NAME]) == 1


def test_run_refuses_a_foreign_container_with_our_name(fp: Any, podman: Podman, tmp_path: Path) -> None:
    fp.register(["podman", "run", fp.any()], returncode=125, stderr=IN_USE.format(NAME, CID2))
    register_inspect(fp, NAME, inspect_json(CID2, labels={"maintainer": "someone"}))
    with pytest.raises(PodmanError, match="does not manage"):
        podman.run_container(spec(), {"K": "secret-value"}, tmp_path)
    assert len(run_argvs(fp)) == 1
    assert fp.call_count(["podman", "rm", fp.any()]) == 0 and fp.call_count(["podman", "stop", fp.any()]) == 0
    assert not list((tmp_path / "run").glob("env-*"))


def test_run_replaces_a_leftover_of_ours(fp: Any, podman: Podman, tmp_path: Path) -> None:
    fp.register(["podman", "run", fp.any()], returncode=125, stderr=IN_USE.format(NAME, CID2))
    register_inspect(fp, NAME, inspect_json(CID2, running=False, status="created"))
    fp.register(["podman", "rm", "--force", "--time", "3", NAME], stdout=NAME + "\n")
    register_inspect(fp, NAME, missing=True)
    fp.register(["podman", "run", fp.any()], stdout=CID + "\n")
    register_verify(fp)
    assert podman.run_container(spec(), {}, tmp_path) == CID


def test_run_gives_up_when_the_name_stays_taken(fp: Any, podman: Podman, tmp_path: Path) -> None:
    fp.register(["podman", "run", fp.any()], returncode=125, stderr=IN_USE.format(NAME, CID2), occurrences=2)
    register_inspect(fp, NAME, missing=True, occurrences=2)
    with pytest.raises(PodmanError, match="already in use"):
        podman.run_container(spec(), {}, tmp_path)
    assert len(run_argvs(fp)) == 2


@pytest.mark.parametrize(
    "env,match",
    [({"K": "a\x00b"}, "NUL"), ({"K": "a\ud800"}, "surrogate"), ({"BAD-KEY": "v"}, "must match"),
     ({"K": "x" * (128 * 1024 - 2)}, "128 KiB"),
     ({f"K{i}": "x" * 120_000 for i in range(9)}, "add up to"),
     ({"PATH": "a\nb"}, "line break.*podman reads this name"), ({"HOME": "a\rb"}, "line break"),
     ({"TZ": '"Europe/Berlin"'}, "quote"), ({"LD_PRELOAD": "x" * MAX_ENV_LINE}, "env-file limit")],
)
def test_run_bad_env_runs_nothing(fp: Any, podman: Podman, tmp_path: Path, env: dict[str, str], match: str) -> None:
    with pytest.raises(PodmanError, match=match):
        check_env(env)  # what the loop asks before it stops the container being replaced
    with pytest.raises(PodmanError, match=match):
        podman.run_container(spec(), env, tmp_path)
    assert fp.call_count(["podman", fp.any()]) == 0
    assert not list((tmp_path / "run").glob("env-*"))


@pytest.mark.parametrize("field,value", [("name", "-x"), ("name", "a b"), ("image", "--privileged"), ("image", "a b")])
def test_run_bad_spec_runs_nothing(fp: Any, podman: Podman, tmp_path: Path, field: str, value: str) -> None:
    with pytest.raises(PodmanError):
        podman.run_container(spec(**{field: value}), {}, tmp_path)
    assert fp.call_count(["podman", fp.any()]) == 0


def test_volume_outside_volumes_dir_is_refused(fp: Any, podman: Podman, tmp_path: Path) -> None:
    (tmp_path / "volumes" / "svc1").mkdir(parents=True)
    (tmp_path / "volumes" / "svc1" / "data").symlink_to("/etc")
    with pytest.raises(PodmanError, match="outside|symlink"):
        podman.run_container(spec(volumes=(Volume("data", "/data"),)), {}, tmp_path / "volumes")
    assert fp.call_count(["podman", fp.any()]) == 0


def test_env_files_older_agents_left_are_removed(fp: Any, podman: Podman, tmp_path: Path) -> None:
    stale = tmp_path / "run" / "env-old"
    stale.mkdir(parents=True)
    (stale / "env").write_text("K=secret\n")
    os.utime(stale, (1, 1))
    other = tmp_path / "run" / "agent.lock"
    other.write_text("")
    podman.remove_stale_env_files(older_than=300)
    assert not stale.exists()
    fresh = tmp_path / "run" / "env-new"
    fresh.mkdir()
    podman.remove_stale_env_files()  # at start-up: all of them
    assert not fresh.exists() and other.exists()
    assert fp.call_count([fp.any()]) == 0


def register_removal(fp: Any, ref: str = CID) -> None:
    fp.register(["podman", "rm", "--force", "--time", "0", ref])
    register_inspect(fp, ref, missing=True)


def test_run_that_crash_loops_is_removed_and_reported(fp: Any, podman: Podman, tmp_path: Path) -> None:
    fp.register(["podman", "run", fp.any()], stdout=CID + "\n")
    register_inspect(fp, CID, inspect_json(running=True, restarts=3, started="2026-01-01T00:00:01Z"))
    fp.register(["podman", "logs", "--tail", "50", CID], stderr="panic: no DATABASE_URL\n")
    register_removal(fp)
    with pytest.raises(PodmanError, match="(?s)did not stay running.*no DATABASE_URL"):
        podman.run_container(spec(), {}, tmp_path)
    assert fp.call_count(["podman", "rm", "--force", "--time", "0", CID]) == 1


def test_run_exited_at_once_fails_fast(fp: Any, podman: Podman, tmp_path: Path) -> None:
    fp.register(["podman", "run", fp.any()], stdout=CID + "\n")
    register_inspect(fp, CID, inspect_json(running=False, status="exited"))
    fp.register(["podman", "logs", fp.any()], stdout="boom\n")
    register_removal(fp)
    with pytest.raises(PodmanError, match="boom"):
        podman.run_container(spec(), {}, tmp_path)
    assert fp.call_count([*INSPECT, CID]) == 2  # one verification, one check that it is gone


def test_start_that_crash_loops_is_halted_and_kept(fp: Any, podman: Podman) -> None:
    register_inspect(fp, CID, inspect_json(running=False, status="exited", restarts=2))
    fp.register(["podman", "start", CID])
    register_inspect(fp, CID, inspect_json(running=True, restarts=5))
    fp.register(["podman", "logs", fp.any()], stdout="crash\n")
    fp.register(["podman", "stop", "--time", "0", CID], occurrences=2)
    register_inspect(fp, CID, inspect_json(running=False, status="exited", restarts=6))
    register_inspect(fp, CID, inspect_json(running=False, status="stopped", restarts=7))  # the stop did not stick
    register_inspect(fp, CID, inspect_json(running=False, status="exited", restarts=8), occurrences=2)
    with pytest.raises(PodmanError, match="did not stay running after start: crash"):
        podman.start(CID)
    assert fp.call_count(["podman", "stop", "--time", "0", CID]) == 2
    assert fp.call_count(["podman", "rm", fp.any()]) == 0  # halted, kept for its logs


def test_restart_that_keeps_respinning_is_removed(fp: Any, podman: Podman) -> None:
    register_inspect(fp, CID, inspect_json(restarts=0))
    fp.register(["podman", "restart", "--time", "3", CID])
    register_inspect(fp, CID, inspect_json(running=False, status="stopped", restarts=1))
    fp.register(["podman", "logs", fp.any()], stdout="crash\n")
    for count in range(2, 8, 2):
        fp.register(["podman", "stop", "--time", "0", CID])
        register_inspect(fp, CID, inspect_json(running=False, status="stopped", restarts=count))
        register_inspect(fp, CID, inspect_json(running=False, status="stopped", restarts=count + 1))
    register_removal(fp)
    with pytest.raises(PodmanError, match="did not stay running after restart"):
        podman.restart(CID)
    assert fp.call_count(["podman", "rm", "--force", "--time", "0", CID]) == 1


def test_run_still_starting_is_polled_until_running(fp: Any, tmp_path: Path) -> None:
    slept: list[float] = []
    podman = Podman(opts(tmp_path), sleep=slept.append)
    fp.register(["podman", "run", fp.any()], stdout=CID + "\n")
    register_inspect(fp, CID, inspect_json(running=False, status="created"), occurrences=3)
    register_verify(fp)
    assert podman.run_container(spec(), {}, tmp_path) == CID
    assert slept == [0.01, 0.1, 0.2, 0.4]


def test_run_failure_removes_the_created_leftover(fp: Any, podman: Podman, tmp_path: Path) -> None:
    fp.register(["podman", "run", fp.any()], returncode=126, stderr="Error: runc: executable file not found\n")
    register_inspect(fp, NAME, inspect_json(running=False, status="created"))
    fp.register(["podman", "rm", "--force", "--time", "0", NAME])
    register_inspect(fp, NAME, missing=True)
    with pytest.raises(PodmanError, match="executable file not found"):
        podman.run_container(spec(), {}, tmp_path)
    assert fp.call_count(["podman", "rm", fp.any()]) == 1


IPAM = "Error: IPAM error: requested ip address 10.200.3.2 is already allocated to container ID {}\n"


def register_ipam_failure(fp: Any, holder: str) -> None:
    fp.register(["podman", "run", fp.any()], returncode=126, stderr=IPAM.format(holder))
    register_inspect(fp, NAME, inspect_json(running=False, status="created"))
    fp.register(["podman", "rm", "--force", "--time", "0", NAME])
    register_inspect(fp, NAME, missing=True)


def test_ipam_conflict_with_a_stale_container_of_ours_recovers(fp: Any, podman: Podman, tmp_path: Path) -> None:
    register_ipam_failure(fp, CID2)
    register_inspect(fp, CID2, inspect_json(CID2, ours(deployment="old-deployment"), running=False, status="paused"))
    fp.register(["podman", "rm", "--force", "--time", "0", CID2])
    register_inspect(fp, CID2, missing=True)
    fp.register(["podman", "run", fp.any()], stdout=CID + "\n")
    register_verify(fp)
    assert podman.run_container(spec(), {}, tmp_path) == CID
    assert len(run_argvs(fp)) == 2


def test_ipam_conflict_with_an_older_copy_of_the_same_deployment(fp: Any, podman: Podman, tmp_path: Path) -> None:
    register_ipam_failure(fp, CID2)
    register_inspect(fp, CID2, inspect_json(CID2, ours(), running=True, name="renamed-copy"))
    fp.register(["podman", "rm", "--force", "--time", "0", CID2])
    register_inspect(fp, CID2, missing=True)
    fp.register(["podman", "run", fp.any()], stdout=CID + "\n")
    register_verify(fp)
    assert podman.run_container(spec(), {}, tmp_path) == CID


def test_ipam_conflict_with_a_foreign_holder_fails_clearly(fp: Any, podman: Podman, tmp_path: Path) -> None:
    register_ipam_failure(fp, CID2)
    register_inspect(fp, CID2, inspect_json(CID2, {"maintainer": "x"}, name="their-db"))
    with pytest.raises(PodmanError, match="held by container their-db, which the agent does not manage"):
        podman.run_container(spec(), {}, tmp_path)
    assert fp.call_count(["podman", "rm", "--force", "--time", "0", CID2]) == 0


def test_ipam_conflict_with_a_running_container_of_another_deployment(fp: Any, podman: Podman, tmp_path: Path) -> None:
    register_ipam_failure(fp, CID2)
    register_inspect(fp, CID2, inspect_json(CID2, ours(deployment="other"), name="svc1-other"))
    with pytest.raises(PodmanError, match="held by running container svc1-other of deployment other"):
        podman.run_container(spec(), {}, tmp_path)
    assert fp.call_count(["podman", "rm", "--force", "--time", "0", CID2]) == 0


def test_ipam_conflict_twice_is_not_looped(fp: Any, podman: Podman, tmp_path: Path) -> None:
    register_ipam_failure(fp, CID2)
    register_inspect(fp, CID2, inspect_json(CID2, ours(deployment="old"), running=False, status="exited"))
    fp.register(["podman", "rm", "--force", "--time", "0", CID2])
    register_inspect(fp, CID2, missing=True)
    register_ipam_failure(fp, CID2)
    with pytest.raises(PodmanError, match="already allocated"):
        podman.run_container(spec(), {}, tmp_path)
    assert len(run_argvs(fp)) == 2


# --- start / restart / stop / remove --------------------------------------------------------


def test_start_and_restart(fp: Any, podman: Podman) -> None:
    register_inspect(fp, CID, inspect_json(running=False, status="exited", restarts=2))
    fp.register(["podman", "start", CID], stdout=CID)
    register_inspect(fp, CID, inspect_json(restarts=2), occurrences=2)
    podman.start(CID)
    register_inspect(fp, CID, inspect_json(restarts=2))
    fp.register(["podman", "restart", "--time", "3", CID], stdout=CID)
    register_inspect(fp, CID, inspect_json(restarts=2), occurrences=2)
    podman.restart(CID)


def test_start_missing_or_foreign_is_an_error(fp: Any, podman: Podman) -> None:
    register_inspect(fp, "gone", missing=True, occurrences=2)
    register_inspect(fp, "db", inspect_json(labels={}), occurrences=4)
    with pytest.raises(PodmanError, match="does not exist"):
        podman.start("gone")
    with pytest.raises(PodmanError, match="does not exist"):
        podman.restart("gone")
    for call in (podman.start, podman.restart, podman.stop_and_remove, podman.force_remove):
        with pytest.raises(PodmanError, match="not managed"):
            call("db")
    assert fp.call_count(["podman", fp.any()]) == 6


def test_stop_and_remove(fp: Any, podman: Podman) -> None:
    register_inspect(fp, CID, inspect_json())
    fp.register(["podman", "stop", "--time", "3", CID], stdout=CID, stderr=WARNING)
    fp.register(["podman", "rm", "--force", "--time", "0", CID], stdout=CID)
    register_inspect(fp, CID, missing=True)
    podman.stop_and_remove(CID)


def test_stop_and_remove_of_a_missing_container_is_success(fp: Any, podman: Podman) -> None:
    register_inspect(fp, CID, missing=True)
    podman.stop_and_remove(CID)
    register_inspect(fp, CID, inspect_json())
    fp.register(["podman", "stop", fp.any()], returncode=125,
                stderr=f'Error: no container with name or ID "{CID}" found: no such container\n')
    podman.stop_and_remove(CID)


def test_force_remove_retries_then_fails(fp: Any, podman: Podman) -> None:
    register_inspect(fp, CID, inspect_json(running=False, status="exited"))
    fp.register(["podman", "rm", "--force", "--time", "3", CID], returncode=125,
                stderr="Error: container is being removed\n", occurrences=3)
    register_inspect(fp, CID, inspect_json(running=False, status="removing"), occurrences=3)
    with pytest.raises(PodmanError, match="still exists after podman rm.*being removed"):
        podman.force_remove(CID)


def test_force_remove_of_a_stopping_container_finishes_the_stop_first(fp: Any, podman: Podman) -> None:
    """`stopping` for good (its `podman stop` was killed): `rm --force` alone would answer 0
    and leave the process running, so the stop is finished before the removal."""
    register_inspect(fp, CID, inspect_json(running=True, status="stopping"))
    fp.register(["podman", "stop", "--time", "3", CID])
    fp.register(["podman", "rm", "--force", "--time", "3", CID])
    register_inspect(fp, CID, missing=True)
    podman.force_remove(CID)
    calls = [list(c)[1] for c in fp.calls if list(c)[1] in ("stop", "rm")]
    assert calls == ["stop", "rm"]


def test_removal_waits_while_another_podman_removes_it(fp: Any, podman: Podman) -> None:
    register_inspect(fp, CID, inspect_json(running=False, status="removing"))
    register_inspect(fp, CID, inspect_json(running=False, status="removing"))
    register_inspect(fp, CID, missing=True)
    podman.stop_and_remove(CID)
    assert fp.call_count(["podman", "stop", fp.any()]) == 0 and fp.call_count(["podman", "rm", fp.any()]) == 0


def test_leftover_processes_are_the_container_cgroup_and_its_conmon(tmp_path: Path) -> None:
    from agent.host.podman import leftover_processes

    def proc(pid: int, cgroup: str, argv: list[str], state: str = "S") -> None:
        entry = tmp_path / str(pid)
        entry.mkdir()
        (entry / "cgroup").write_text(cgroup)
        (entry / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        (entry / "stat").write_text(f"{pid} (name with ) paren) {state} 1 2 3\n")

    proc(100, f"0::/libpod_parent/libpod-{CID}\n", ["sleep", "1000"])
    proc(101, "0::/libpod_parent/conmon\n", ["/usr/bin/conmon", "--api-version", "1", "-c", CID, "-n", NAME])
    proc(102, f"0::/libpod_parent/libpod-{CID}\n", ["sh"], state="Z")  # a zombie is not running
    proc(103, f"0::/libpod_parent/libpod-{CID2}\n", ["sleep", "1000"])  # another container
    proc(104, "0::/user.slice\n", ["podman", "container", "cleanup", CID])  # not conmon, not in its cgroup
    (tmp_path / "self").mkdir()
    assert sorted(leftover_processes(CID, tmp_path)) == [100, 101]
    assert leftover_processes("c" * 64, tmp_path) == []


def test_force_remove_missing_is_success(fp: Any, podman: Podman) -> None:
    register_inspect(fp, CID, missing=True)
    podman.force_remove(CID)
    assert fp.call_count(["podman", "rm", fp.any()]) == 0


# --- ownership ------------------------------------------------------------------------------

ME = "server-1"
THEM = "standalone-0123456789abcdef"


def registered(tmp_path: Path, **kw: Any) -> Podman:
    return Podman(opts(tmp_path, owner=ME, adopt_legacy=True, **kw), sleep=lambda _s: None)


def standalone(tmp_path: Path, **kw: Any) -> Podman:
    return Podman(opts(tmp_path, owner=THEM, network="techulus-standalone", **kw), sleep=lambda _s: None)


@pytest.mark.parametrize(
    "mode,labels,networks,expected",
    [
        ("registered", ours(**{"techulus.owner": ME}), ["techulus"], True),
        ("registered", ours(**{"techulus.owner": THEM}), ["techulus"], False),  # full labels, another owner
        ("registered", ours(**{"techulus.owner": "server-2"}), ["techulus"], False),
        ("registered", ours(), ["techulus"], True),  # the Go agent's, on our network: adopted
        ("registered", ours(), ["podman"], True),  # the Go agent's port-publishing container
        ("registered", ours(), [], False),  # unmarked on --network=host or none (podman lists no network): not adopted
        ("registered", ours(), ["techulus-standalone"], False),  # unmarked, on someone else's network
        ("registered", ours(scope="techulus.test.scope=else", **{"techulus.owner": ME}), ["techulus"], False),
        ("registered", {"maintainer": "x", "techulus.owner": ME}, ["techulus"], False),  # no §9.1 labels
        ("standalone", ours(**{"techulus.owner": THEM}), ["techulus-standalone"], True),
        ("standalone", ours(**{"techulus.owner": ME}), ["techulus-standalone"], False),
        ("standalone", ours(), ["techulus-standalone"], False),  # a standalone agent adopts nothing
        ("standalone", ours(), ["techulus"], False),
        ("anonymous", ours(), ["techulus"], True),  # no owner: claims unmarked only
        ("anonymous", ours(**{"techulus.owner": ME}), ["techulus"], False),
    ],
)
def test_ownership_rules(tmp_path: Path, mode: str, labels: dict[str, str], networks: list[str], expected: bool) -> None:
    podman = {"registered": registered, "standalone": standalone, "anonymous": lambda p: Podman(opts(p))}[mode](tmp_path)
    verdict = podman.judge(labels, networks)
    assert verdict.ours is expected, verdict.why
    assert verdict.why


def test_owner_must_be_a_plain_label_value() -> None:
    for bad in ("a b", "x\ny", "é", "x" * 257):
        with pytest.raises(PodmanError, match="owner"):
            PodmanOptions(owner=bad)


def test_list_drops_other_owners_containers(fp: Any, tmp_path: Path) -> None:
    ps = [
        {"Id": CID, "Names": ["mine"], "State": "running", "Labels": ours(**{"techulus.owner": ME}), "Networks": ["techulus"]},
        {"Id": CID2, "Names": ["theirs"], "State": "running", "Labels": ours(**{"techulus.owner": THEM}), "Networks": ["techulus"]},
        {"Id": "c" * 64, "Names": ["legacy"], "State": "running", "Labels": ours(), "Networks": ["techulus"]},
    ]
    fp.register(["podman", "ps", fp.any()], stdout=json.dumps(ps), occurrences=2)
    assert [c.name for c in registered(tmp_path).list_containers()] == ["mine", "legacy"]
    assert [c.name for c in standalone(tmp_path).list_containers()] == ["theirs"]  # the standalone agent is THEM


def test_another_owners_container_is_never_changed(fp: Any, tmp_path: Path) -> None:
    register_inspect(fp, "theirs", inspect_json(CID2, labels=ours(**{"techulus.owner": THEM}), ip="10.200.3.9"), occurrences=5)
    podman = registered(tmp_path)
    assert not podman.is_managed("theirs")
    for call in (podman.start, podman.restart, podman.stop_and_remove, podman.force_remove):
        with pytest.raises(PodmanError, match=f"owned by another agent \\(techulus.owner={THEM}\\)"):
            call("theirs")
    assert [list(c)[1] for c in fp.calls] == ["container"] * 5, "only inspects, never a change"


def test_run_refuses_a_name_or_ip_held_by_another_owner(fp: Any, tmp_path: Path) -> None:
    podman = registered(tmp_path)
    theirs = inspect_json(CID2, labels=ours(**{"techulus.owner": THEM}), running=False, status="exited", ip="10.200.3.2")
    fp.register(["podman", "run", fp.any()], returncode=125, stderr=IN_USE.format(NAME, CID2))
    register_inspect(fp, NAME, theirs)
    with pytest.raises(PodmanError, match="does not manage"):
        podman.run_container(spec(), {}, tmp_path)
    fp.register(["podman", "run", fp.any()], returncode=125,
                stderr=f"Error: IPAM error: requested ip address 10.200.3.2 is already allocated to container ID {CID2}\n")
    register_inspect(fp, NAME, missing=True)
    register_inspect(fp, CID2, theirs)
    with pytest.raises(PodmanError, match="does not manage"):
        podman.run_container(spec(), {}, tmp_path)
    assert fp.call_count(["podman", "rm", fp.any()]) == 0 and fp.call_count(["podman", "stop", fp.any()]) == 0


def test_run_marks_the_container_with_our_owner(fp: Any, tmp_path: Path) -> None:
    fp.register(["podman", "run", fp.any()], stdout=CID + "\n")
    register_verify(fp)
    registered(tmp_path).run_container(spec(), {}, tmp_path)
    argv = run_argvs(fp)[0]
    assert f"--label=techulus.owner={ME}" in argv and argv.index(f"--label={SCOPE}") < argv.index("--")


def test_network_is_created_with_our_owner_and_another_owners_is_left_alone(
    fp: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    podman = registered(tmp_path)
    fp.register(NET_INSPECT, returncode=125, stderr="Error: network not found\n")
    fp.register(["podman", "network", "create", "--driver", "bridge", "--subnet=10.200.3.0/24", "--gateway=10.200.3.1",
                 "--disable-dns", f"--label=techulus.owner={ME}", "--", "techulus"], stdout="techulus\n")
    assert podman.ensure_network("10.200.3.0/24", "10.200.3.1")
    foreign = json.loads(NET_JSON)
    foreign[0]["labels"] = {"techulus.owner": THEM}
    fp.register(NET_INSPECT, stdout=json.dumps(foreign))
    with caplog.at_level(logging.ERROR):
        assert not podman.ensure_network("10.200.3.0/24", "10.200.3.1")
    assert f"belongs to another agent (techulus.owner={THEM})" in caplog.text
    assert fp.call_count(["podman", "network", "create", fp.any()]) == 1
    assert fp.call_count(["podman", "network", "rm", fp.any()]) == 0


def network_ls(*networks: tuple[str, str, str]) -> str:
    return json.dumps([
        {"name": name, "subnets": [{"subnet": subnet}], "labels": {"techulus.owner": owner} if owner else {}}
        for name, subnet, owner in networks
    ])


def ps_all(*containers: tuple[str, dict[str, str], list[str]]) -> str:
    return json.dumps([
        {"Id": f"{i:x}" * 64, "Names": [name], "State": "running", "Labels": labels, "Networks": networks}
        for i, (name, labels, networks) in enumerate(containers, start=10)
    ])


def test_collisions_name_each_clash_with_another_owner(fp: Any, tmp_path: Path) -> None:
    fp.register(["podman", "network", "ls", "--format", "json"], stdout=network_ls(
        ("podman", "10.88.0.0/16", ""),
        ("techulus-standalone", "10.200.5.0/24", ME),
        ("techulus", "10.200.5.0/25", ME),
    ))
    fp.register(["podman", "ps", "--all", "--format", "json"], stdout=ps_all(
        ("mine", ours(**{"techulus.owner": THEM}), ["techulus-standalone"]),
        ("legacy", ours(), ["techulus-standalone"]),
        (NAME, {"maintainer": "x"}, ["podman"]),
        ("unrelated", {}, ["podman"]),
    ))
    problems = standalone(tmp_path).collisions("10.200.5.0/24", [spec(), spec(name="other", deployment_id="d2")])
    assert problems == [
        f"network techulus-standalone belongs to another agent (techulus.owner={ME})",
        "network techulus (subnet 10.200.5.0/25) overlaps our container subnet 10.200.5.0/24",
        "container legacy (no owner mark) is on our network techulus-standalone",
        f"container {NAME} (no owner mark) has the name of one of our containers",
    ]


def test_no_collision_with_our_own_state(fp: Any, tmp_path: Path) -> None:
    fp.register(["podman", "network", "ls", "--format", "json"], stdout=network_ls(
        ("techulus-standalone", "10.200.5.0/24", THEM), ("techulus", "10.200.1.0/24", ME),
    ))
    fp.register(["podman", "ps", "--all", "--format", "json"], stdout=ps_all(
        (NAME, ours(**{"techulus.owner": THEM}), ["techulus-standalone"]),
        ("svc-of-registered", ours(**{"techulus.owner": ME}), ["techulus"]),
    ))
    assert standalone(tmp_path).collisions("10.200.5.0/24", [spec()]) == []


def test_podman_command_error_is_both_kinds() -> None:
    error = PodmanCommandError(CommandError(("podman", "ps"), 125, "", "Error: no such container x"))
    assert isinstance(error, PodmanError) and isinstance(error, CommandError)
    assert error.not_found and not error.timed_out
    assert "exited with 125" in str(error)


def test_stable_mac() -> None:
    assert stable_mac("10.200.3.2") == "02:42:0a:c8:03:02"
    with pytest.raises(ValueError):
        stable_mac("10.200.3")


def test_each_mode_gets_its_owner_network_and_adoption_rule(tmp_path: Path) -> None:
    from agent.identity import AgentConfig, standalone_owner
    from agent.runtime import podman_options
    from agent.settings import Settings

    config = AgentConfig("server-7", 3, "10.100.0.3")
    registered_opts = podman_options(Settings.load({"data_dir": str(tmp_path)}, environ={}), config, ())
    assert (registered_opts.owner, registered_opts.network, registered_opts.adopt_legacy) == ("server-7", "techulus", True)
    alone = Settings.load({"data_dir": str(tmp_path), "state_file": str(tmp_path / "s.toml")}, environ={})
    alone_opts = podman_options(alone, config, ())
    assert (alone_opts.owner, alone_opts.network, alone_opts.adopt_legacy) == (
        standalone_owner(tmp_path), "techulus-standalone", False,
    )


# --- issue 11: one listing per tick, images remembered, the network re-created -------------

PS_OURS = ["podman", "ps", "--all", "--filter", f"label={LABEL_SERVICE_ID}", "--filter", f"label={SCOPE}", "--format", "json"]


def test_a_recent_listing_is_shared_and_follows_the_adapters_own_changes(fp: Any, podman: Podman, tmp_path: Path) -> None:
    ps = [{"Id": CID2, "Names": ["old"], "Image": IMAGE, "State": "running", "Labels": ours("old-dep")}]
    fp.register(PS_OURS, stdout=json.dumps(ps))
    assert [c.id for c in podman.list_containers()] == [CID2]
    reader = Podman(podman.options, listing=podman.listing)  # the heartbeat's adapter
    assert [c.id for c in reader.list_containers(max_age=10)] == [CID2]  # no second `ps` (fp would refuse it)
    fp.register(["podman", "run", fp.any()], stdout=CID + "\n")
    register_verify(fp)
    podman.run_container(spec(), {}, tmp_path)
    seen = {c.id: c for c in reader.list_containers(max_age=10)}
    assert set(seen) == {CID, CID2} and seen[CID].running and seen[CID].deployment_id == "dep00001-0000"
    assert podman.judge(seen[CID].labels, []).ours, "the entry carries the labels podman ps would show"
    fp.register(["podman", "stop", "--time", "3", CID2])
    register_inspect(fp, CID2, inspect_json(CID2, name="old"))
    fp.register(["podman", "rm", "--force", "--time", "0", CID2])
    register_inspect(fp, CID2, missing=True)
    podman.stop_and_remove(CID2)
    assert [c.id for c in reader.list_containers(max_age=10)] == [CID]
    assert fp.call_count(PS_OURS) == 1


def test_a_listing_taken_while_the_adapter_changed_something_is_not_kept(podman: Podman) -> None:
    generation = podman.listing.begin()
    podman.listing.drop("x")  # a removal finished while `ps` ran
    podman.listing.put([], generation)
    assert podman.listing.get(10) is None
    podman.listing.put([], podman.listing.begin())
    assert podman.listing.get(10) == []
    podman.listing.invalidate()
    assert podman.listing.get(10) is None


def test_an_image_seen_here_is_not_asked_about_again(fp: Any, podman: Podman, tmp_path: Path) -> None:
    fp.register(["podman", "image", "exists", "--", "docker.io/library/nginx:1.27"], returncode=0)
    assert podman.image_exists("nginx:1.27") and podman.image_exists("docker.io/library/nginx:1.27")
    assert fp.call_count(["podman", "image", "exists", fp.any()]) == 1
    # Removed behind our back: the run says so, the image is pulled and known again.
    fp.register(["podman", "run", fp.any()], returncode=125, stderr="Error: docker.io/library/nginx:1.27: image not known\n")
    register_inspect(fp, NAME, missing=True)
    fp.register(["podman", "pull", "--quiet", "--", "docker.io/library/nginx:1.27"], stdout="sha\n")
    fp.register(["podman", "run", fp.any()], stdout=CID + "\n")
    register_verify(fp)
    podman.run_container(spec(), {}, tmp_path)
    assert podman.image_exists("nginx:1.27") and fp.call_count(["podman", "image", "exists", fp.any()]) == 1
    fp.register(["podman", "image", "rm", "--", "nginx:1.27"])
    podman.remove_image("nginx:1.27")
    fp.register(["podman", "image", "exists", "--", "docker.io/library/nginx:1.27"], returncode=1)
    assert not podman.image_exists("nginx:1.27")


def test_health_is_matched_by_full_id_name_and_short_id(fp: Any, podman: Podman) -> None:
    ids = [f"{n:064x}" for n in range(1, 301)]
    lines = "".join(f"{cid} n{i} running 0 check healthy\n" for i, cid in enumerate(ids))
    fp.register(["podman", "container", "inspect", "--format", fp.any()], stdout=lines + f"{CID} named running 2 check starting\n")
    found = podman.read_health([*ids, "named", CID[:12], "gone"])
    assert all(found[cid] == HealthReading("healthy", 0, True) for cid in ids)
    assert found["named"] == found[CID[:12]] == HealthReading("starting", 2, True)
    assert found["gone"] == HealthReading("none", 0, False)


def test_a_network_removed_under_the_agent_is_recreated_by_the_next_run(fp: Any, podman: Podman, tmp_path: Path) -> None:
    network = json.dumps([{"name": "techulus", "subnets": [{"subnet": "10.200.3.0/24"}]}])
    fp.register(["podman", "network", "inspect", "--", "techulus"], stdout=network)
    assert podman.ensure_network("10.200.3.0/24", "10.200.3.1")
    fp.register(["podman", "run", fp.any()], returncode=125,
                stderr="Error: unable to find network with name or ID techulus: network not found\n")
    register_inspect(fp, NAME, missing=True)
    fp.register(["podman", "network", "inspect", "--", "techulus"], returncode=125,
                stderr="Error: unable to find network with name or ID techulus: network not found\n")
    fp.register(["podman", "network", "create", "--driver", "bridge", "--subnet=10.200.3.0/24", "--gateway=10.200.3.1",
                 "--disable-dns", "--", "techulus"])
    fp.register(["podman", "run", fp.any()], stdout=CID + "\n")
    register_verify(fp)
    assert podman.run_container(spec(), {}, tmp_path) == CID
    assert fp.call_count(["podman", "network", "create", fp.any()]) == 1 and len(run_argvs(fp)) == 2


def test_the_health_runner_gets_a_started_containers_config_without_another_inspect(
    fp: Any, podman: Podman, tmp_path: Path
) -> None:
    fp.register(["podman", "run", fp.any()], stdout=CID + "\n")
    register_verify(fp)
    podman.run_container(spec(), {}, tmp_path)
    assert (podman.config_of(CID) or {}).get("Id") == CID  # fp refuses a second inspect
    register_inspect(fp, CID, inspect_json())
    assert (podman.config_of(CID) or {}).get("Id") == CID and fp.call_count([*INSPECT, CID]) == 2, "kept once only"
