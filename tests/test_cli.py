"""The command line: usage errors are one clear line and a non-zero exit, never a traceback."""

import subprocess
import sys

import pytest

from agent import __version__, cli


@pytest.fixture
def run_cli(capsys, caplog):
    """Runs the CLI in-process; returns (exit code, everything it printed or logged)."""

    def runner(*argv):
        caplog.clear()
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out + captured.err + caplog.text

    return runner


def test_missing_url_is_a_usage_error(run_cli, tmp_path):
    code, output = run_cli("--data-dir", str(tmp_path))
    assert code == 2 and "--url is required" in output and "Traceback" not in output


def test_unknown_flag_and_command():
    with pytest.raises(SystemExit) as exc:
        cli.main(["--bogus"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["launch"])
    assert exc.value.code == 2


def test_bad_url_and_config(run_cli, tmp_path):
    code, output = run_cli("--url", "cp.example.com")
    assert code == 2 and "must be an http" in output
    bad = tmp_path / "agent.toml"
    bad.write_text("tick_interval = 'soon'\n")
    code, output = run_cli("--config", str(bad), "--url", "http://127.0.0.1:9")
    assert code == 2 and "tick_interval" in output


def test_standalone_needs_a_file(run_cli):
    code, output = run_cli("standalone")
    assert code == 2 and "state file" in output


def test_standalone_with_missing_or_garbled_file(run_cli, tmp_path):
    code, output = run_cli("plan", "--state", str(tmp_path / "missing.toml"), "--data-dir", str(tmp_path))
    assert code == 1 and "cannot read state file" in output
    garbled = tmp_path / "state.json"
    garbled.write_text("{not json")
    code, output = run_cli("plan", "--state", str(garbled), "--data-dir", str(tmp_path))
    assert code == 1 and "not valid JSON" in output


def test_plan_refuses_to_register(run_cli, tmp_path):
    code, output = run_cli("plan", "--url", "http://127.0.0.1:9", "--data-dir", str(tmp_path))
    assert code == 1 and "not registered" in output


def test_unregistered_run_without_token_says_how(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("TECHULUS_AGENT_PUBLIC_IP", "203.0.113.9")
    code, output = run_cli("--url", "http://127.0.0.1:9", "--data-dir", str(tmp_path))
    assert code == 1 and "--token" in output and "Traceback" not in output


@pytest.mark.real
def test_version_as_a_process():
    out = subprocess.run([sys.executable, "-m", "agent", "--version"], capture_output=True, text=True, check=True).stdout
    assert __version__ in out


@pytest.mark.parametrize("url", ["http://", "https://:80", "http://host:notaport", "http://a b"])
def test_unusable_urls_are_usage_errors(run_cli, url):
    code, output = run_cli("--url", url)
    assert code == 2 and "must be an http:// or https:// URL" in output and "Traceback" not in output


def test_data_dir_that_cannot_be_created(run_cli):
    code, output = run_cli("--url", "http://127.0.0.1:9", "--data-dir", "/proc/nope/x", "--token", "t")
    assert code == 1 and "/proc/nope" in output and "Traceback" not in output


def test_token_is_removed_from_the_environment_children_inherit(run_cli, tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("TECHULUS_AGENT_TOKEN", "secret-token")
    run_cli("plan", "--url", "http://127.0.0.1:9", "--data-dir", str(tmp_path))
    assert "TECHULUS_AGENT_TOKEN" not in os.environ


def test_abbreviations_and_bad_log_levels_are_refused():
    for argv in (["--stat", "x.toml"], ["--log-level", "verbose"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2


def test_plan_takes_the_state_file_as_argument_and_touches_no_disk(run_cli, tmp_path, fp):
    import json

    from agent.identity import standalone_owner

    me = standalone_owner(tmp_path / "data")

    def container(cid: str, name: str, owner: str, network: str) -> dict:
        labels = {"techulus.service.id": "s", "techulus.deployment.id": name, "techulus.owner": owner}
        return {"Id": cid * 64, "Names": [name], "State": "running", "Image": "localhost/x:latest", "Labels": labels,
                "Networks": [network]}

    # A registered agent's container on its own network: no collision, and never touched.
    listing = json.dumps([container("a", "old", me, "techulus-standalone"), container("b", "theirs", "server-42", "techulus")])
    fp.register(["podman", "network", "ls", "--format", "json"], stdout="[]")
    for _ in range(3):  # the collision check, the plan, the ownership survey
        fp.register(["podman", "ps", fp.any()], stdout=listing)
    state = tmp_path / "state.toml"
    state.write_text("containers = []\n")
    code, output = run_cli("plan", str(state), "--data-dir", str(tmp_path / "data"))
    assert code == 0, output
    assert "held back: remove-unexpected old" in output and "no changes" not in output
    assert f"held back: would remove container old (aaaaaaaaaaaa): deployment is no longer expected; ours because techulus.owner={me}" in output
    assert "left alone: container theirs (bbbbbbbbbbbb): owned by another agent (techulus.owner=server-42)" in output
    assert "theirs" not in output.split("left alone")[0], "another owner's container is never planned for removal"
    assert not (tmp_path / "data").exists(), "plan changes nothing, not even the data dir"


def test_standalone_plan_refuses_a_collision_with_one_message(run_cli, tmp_path, fp):
    import json

    network = {"name": "techulus", "subnets": [{"subnet": "10.200.1.0/24"}], "labels": {"techulus.owner": "server-1"}}
    fp.register(["podman", "network", "ls", "--format", "json"], stdout=json.dumps([network]))
    fp.register(["podman", "ps", "--all", "--format", "json"], stdout="[]")
    state = tmp_path / "state.toml"
    state.write_text("subnetId = 1\ncontainers = []\n")
    code, output = run_cli("plan", str(state), "--data-dir", str(tmp_path / "data"))
    assert code == 1 and "Traceback" not in output
    assert "standalone agent refuses to start" in output
    assert "network techulus (subnet 10.200.1.0/24) overlaps our container subnet 10.200.1.0/24" in output


def test_unknown_environment_variables_are_named(run_cli, monkeypatch):
    monkeypatch.setenv("TECHULUS_AGENT_TICK_INTERVL", "3")
    code, output = run_cli("plan", "--url", "http://127.0.0.1:9", "--data-dir", "/nonexistent-techulus")
    assert "ignoring unknown environment variable TECHULUS_AGENT_TICK_INTERVL (did you mean TECHULUS_AGENT_TICK_INTERVAL?)" in output


def test_one_agent_per_data_dir(tmp_path):
    from agent.runtime import AlreadyRunning, hold_lock

    first = hold_lock(tmp_path)
    try:
        with pytest.raises(AlreadyRunning, match=f"pid {__import__('os').getpid()}"):
            hold_lock(tmp_path)
    finally:
        first.close()
    hold_lock(tmp_path).close()  # released: the next agent may start


def test_plan_with_wrongly_typed_sections_is_a_clean_error(run_cli, tmp_path):
    state = tmp_path / "state.toml"
    state.write_text("containers = 5\n")
    code, output = run_cli("plan", str(state), "--data-dir", str(tmp_path / "data"))
    assert code == 1 and "containers must be a list" in output and "Traceback" not in output


def test_plan_exits_2_and_names_each_invalid_entry_once(run_cli, tmp_path, fp):
    fp.register(["podman", "network", "ls", "--format", "json"], stdout="[]")
    fp.register(["podman", "ps", fp.any()], stdout="[]", occurrences=3)
    state = tmp_path / "state.toml"
    state.write_text(
        '[[containers]]\ndeploymentId = "good"\nserviceId = "s"\nserviceName = "S"\nname = "good"\n'
        'image = "localhost/x:latest"\nipAddress = "10.200.1.2"\n'
        '[[containers]]\ndeploymentId = "bad"\nserviceId = "s2"\nserviceName = "S2"\nname = "bad"\n'
        'image = "localhost/x:latest"\nipAddress = "10.200.9.2"\n'
    )
    code, output = run_cli("plan", str(state), "--data-dir", str(tmp_path / "data"))
    assert code == 2
    assert output.count("10.200.9.2 is outside") == 1, output
    assert "invalid: container #1 (deployment 'bad')" in output
    assert "deploy good (deployment good)" in output, "the valid entry is still planned"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--down", "--url", "http://127.0.0.1:9"], "--down goes with standalone"),
        (["standalone", "x.toml", "--purge"], "--purge goes with --down"),
    ],
)
def test_down_and_purge_flags_are_checked(run_cli, argv, message):
    code, output = run_cli(*argv)
    assert code == 2 and message in output and "Traceback" not in output


LABELS = {"techulus.service.id": "hello", "techulus.deployment.id": "hello-1"}
CID = "c" * 64


def fake_down(fp, data_dir, network_rm: dict, network_exists: bool = True) -> None:  # type: ignore[type-arg]
    import json

    from agent.identity import standalone_owner

    labels = {**LABELS, "techulus.owner": standalone_owner(data_dir)}
    ps = [{"Id": CID, "Names": ["hello-hello-1"], "State": "running", "Image": "localhost/x:latest", "Labels": labels,
           "Networks": ["techulus-standalone"]}]
    fp.register(["podman", "ps", fp.any()], stdout=json.dumps(ps))
    fp.register(["podman", "container", "inspect", "--format", "json", CID],
                stdout=json.dumps([{"Id": CID, "Name": "hello-hello-1", "Config": {"Labels": labels}}]))
    fp.register(["podman", "rm", "--force", fp.any()])
    fp.register(["podman", "container", "inspect", "--format", "json", CID], returncode=125,
                stderr="Error: no such container " + CID)
    if not network_exists:
        fp.register(["podman", "network", "inspect", "--", "techulus-standalone"], returncode=125,
                    stderr="Error: network not found\n")
        return
    network = [{"name": "techulus-standalone", "labels": {"techulus.owner": standalone_owner(data_dir)}}]
    fp.register(["podman", "network", "inspect", "--", "techulus-standalone"], stdout=json.dumps(network))
    fp.register(["podman", "network", "rm", "--", "techulus-standalone"], **network_rm)


def test_standalone_down_removes_our_containers_and_network_and_with_purge_the_data_dir(run_cli, tmp_path, fp, caplog):
    caplog.set_level("INFO")
    state = tmp_path / "state.toml"
    state.write_text("subnetId = 1\n")
    data = tmp_path / "data"
    (data / "volumes").mkdir(parents=True)
    fake_down(fp, data, {"stdout": "techulus-standalone\n"})
    code, output = run_cli("standalone", "--down", str(state), "--data-dir", str(data))
    assert code == 0, output
    assert "removed container hello-hello-1" in output and "removed podman network techulus-standalone" in output
    assert data.exists() and "add --purge" in output
    assert fp.call_count(["podman", "rm", "--force", fp.any()]) == 1

    fake_down(fp, data, {}, network_exists=False)
    code, output = run_cli("standalone", "--down", str(state), "--data-dir", str(data), "--purge")
    assert code == 0, output
    assert "network techulus-standalone not removed (it does not exist" in output and not data.exists()


def test_standalone_down_refuses_while_an_agent_runs_and_names_a_busy_network(run_cli, tmp_path, fp):
    from agent.runtime import hold_lock

    state = tmp_path / "state.toml"
    state.write_text("subnetId = 1\n")
    running = hold_lock(tmp_path / "data")
    try:
        code, output = run_cli("standalone", "--down", str(state), "--data-dir", str(tmp_path / "data"))
    finally:
        running.close()
    assert code == 1 and "already running" in output and "Traceback" not in output
    fake_down(fp, tmp_path / "data", {"returncode": 2, "stderr": "Error: network techulus-standalone has associated containers with it\n"})
    code, output = run_cli("standalone", "--down", str(state), "--data-dir", str(tmp_path / "data"))
    assert code == 1 and "cannot remove podman network techulus-standalone: Error: network techulus-standalone has associated" in output
