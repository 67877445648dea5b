"""The build worker against a real git server on loopback (token required), fake
buildctl/railpack on PATH that record argv, environment and every process's command line,
a fake VictoriaLogs, and an in-memory control plane (plus one run against tests/fakecp.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent import crypto
from agent.builds import (
    ASKPASS_SCRIPT,
    RAILPACK_FRONTEND,
    RAILPACK_VERSION,
    STATE_FILE,
    BuildError,
    BuildWorker,
    askpass_origin,
    parse_claim,
    railpack_build_argv,
    secrets_hash,
    split_credentials,
    valid_branch,
)
from agent.settings import Settings
from tests.fakevlogs import FakeVictoriaLogs
from tests.buildfakes import FakeTools, GitHttpServer, Link, StubControlPlane, make_repo, make_tls_files

KEY = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
TOKEN = "ghs_TopSecretInstallationToken123"
IMAGE = "registry.internal:5000/proj/svc:latest"


# --- pure parts ------------------------------------------------------------------------------


def test_secrets_hash_matches_the_protocol_example():
    assert secrets_hash({"B": "two", "A": "1"}) == "28157a931cc9b13330e0af19684af988feab9bc118553beedb136b5452341887"


def test_split_credentials_keeps_the_token_out_of_the_url():
    url, creds = split_credentials(f"https://x-access-token:{TOKEN}@github.com/owner/repo.git")
    assert url == "https://github.com/owner/repo.git"
    assert (creds.username, creds.password) == ("x-access-token", TOKEN)
    assert TOKEN not in repr(creds)
    assert split_credentials("http://127.0.0.1:8080/a.git")[0] == "http://127.0.0.1:8080/a.git"
    assert not split_credentials("https://github.com/o/r.git")[1]


def test_credentials_are_refused_over_plain_http():
    for url in (f"http://x-access-token:{TOKEN}@github.com/o/r.git", "http://user@host/r.git", "HTTP://u:p@host/r.git"):
        with pytest.raises(BuildError, match=r"plain http://.*use https://") as caught:
            split_credentials(url)
        assert TOKEN not in str(caught.value)
    assert split_credentials("http://host/public.git")[0] == "http://host/public.git"  # nothing to leak


def run_askpass(tmp_path: Path, prompt: str, origin: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "askpass"
    script.write_text(ASKPASS_SCRIPT)
    script.chmod(0o700)
    env = {"PATH": os.environ["PATH"], "TECHULUS_GIT_USERNAME": "x-access-token", "TECHULUS_GIT_PASSWORD": TOKEN,
           "TECHULUS_GIT_ORIGIN": origin}
    return subprocess.run([str(script), prompt], env=env, capture_output=True, text=True, check=False, timeout=10)


@pytest.mark.real  # runs the helper script with /bin/sh
def test_askpass_answers_only_prompts_for_the_clone_urls_origin(tmp_path):
    origin = askpass_origin(split_credentials(f"https://x-access-token:{TOKEN}@GitHub.com:8443/o/r.git")[0])
    assert origin == "https://github.com:8443"
    ok = run_askpass(tmp_path, "Password for 'https://x-access-token@github.com:8443': ", origin)
    assert (ok.returncode, ok.stdout) == (0, TOKEN + "\n")
    user = run_askpass(tmp_path, "Username for 'https://github.com:8443': ", origin)
    assert (user.returncode, user.stdout) == (0, "x-access-token\n")
    for prompt in (
        "Password for 'https://x-access-token@evil.example': ",  # a redirect elsewhere
        "Password for 'https://x-access-token@github.com': ",  # same host, other port
        "Password for 'http://x-access-token@github.com:8443': ",  # downgraded scheme
        "Password for 'https://github.com:8443@evil.example': ",  # user part dressed as the host
        "Password for 'https://x-access-token@github.com:8443.evil.example': ",
        "Enter passphrase for key '/root/.ssh/id_rsa': ",
        "",
    ):
        refused = run_askpass(tmp_path, prompt, origin)
        assert refused.returncode != 0 and refused.stdout == "", prompt


@pytest.mark.parametrize("bad", ["ext::sh -c touch% /tmp/pwned", "file:///etc", "/srv/repo.git", "git@github.com:o/r.git",
                                 "ssh://github.com/o/r.git", "https://", "https://host/a b", "https://host:99999/x", None, 5])
def test_split_credentials_refuses_other_transports_and_garbage(bad):
    with pytest.raises(BuildError):
        split_credentials(bad)


def claim(build_id: str = "b-1", *, url: str = "https://github.com/o/r.git", sha: str = "HEAD", branch: str = "main",
          image: str = IMAGE, secrets: dict | None = None) -> dict:
    return {
        "build": {"id": build_id, "commitSha": sha, "commitMessage": None, "branch": branch, "serviceId": "svc", "projectId": "proj"},
        "cloneUrl": url, "imageUri": image, "secrets": secrets or {},
    }


@pytest.mark.parametrize(("change", "message"), [
    ({"branch": "--upload-pack=touch /tmp/x"}, "branch"),
    ({"branch": "a..b"}, "branch"),
    ({"sha": "zzz"}, "commitSha"),
    ({"sha": "--help"}, "commitSha"),
    ({"image": "-evil"}, "image"),
    ({"image": "reg/x:1,push=false"}, "image"),
    ({"url": "file:///var/lib"}, "http"),
])
def test_parse_claim_rejects_bad_fields(change, message):
    with pytest.raises(BuildError, match=message):
        parse_claim(claim(**change), "b-1")


def test_parse_claim_defaults_and_validation():
    build = parse_claim({**claim(), "build": {**claim()["build"], "branch": None, "commitSha": None}}, "b-1")
    assert (build.branch, build.commit_sha) == ("main", "HEAD")
    with pytest.raises(BuildError, match="different build"):
        parse_claim(claim("other"), "b-1")
    with pytest.raises(BuildError, match="secrets"):
        parse_claim({**claim(), "secrets": ["x"]}, "b-1")
    assert valid_branch("feature/new-ui") and not valid_branch("-x") and not valid_branch("x.lock")


def test_railpack_argv_puts_no_secret_value_on_the_command_line():
    argv = railpack_build_argv("tcp://bk:1234", "type=image,name=x,push=true", {"NPM_TOKEN": "s3cr3t", "A": "1"}, "/data/builds/.plan-b")
    assert "s3cr3t" not in " ".join(argv)
    assert argv[-4:] == ["--secret", "id=A,env=A", "--secret", "id=NPM_TOKEN,env=NPM_TOKEN"]


def test_cleanup_removes_only_stale_build_dirs_and_prunes_no_images(tmp_path, fp):
    settings = Settings(data_dir=tmp_path)
    builds = settings.builds_dir
    for name in ("old", "fresh", "running"):
        (builds / name / "src").mkdir(parents=True)
    (builds / "old-file").write_text("x")
    os.symlink("/etc", builds / "old-link")
    old = time.time() - 7200
    for name in ("old", "running", "old-file"):
        os.utime(builds / name, (old, old))
    os.utime(builds / "old-link", (old, old), follow_symlinks=False)
    # No podman call is faked: a host-wide `podman image prune` would fail this test.
    worker = BuildWorker(settings, StubControlPlane(), KEY)
    worker._current = "running"
    assert sorted(worker.cleanup_once()) == ["old", "old-file", "old-link"]
    assert sorted(p.name for p in builds.iterdir()) == ["fresh", "running"]
    assert Path("/etc/hostname").exists() or Path("/etc").is_dir()  # the symlink's target is untouched
    assert not fp.calls


# --- real git, fake build tools ---------------------------------------------------------------------


class Env:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp_path
        self.repos = tmp_path / "repos"
        self.repos.mkdir()
        self.bare, self.shas = make_repo(self.repos, [
            {"Dockerfile": "FROM scratch\n", "version.txt": "one"},
            {"version.txt": "two"},
        ])
        self.railpack_repo, self.railpack_shas = make_repo(self.repos, [{"package.json": "{}", "version.txt": "rp"}], "rp.git")
        # HTTPS: a token is never sent over plain http:// (git trusts this cert through GIT_SSL_CAINFO).
        self.tls = make_tls_files(tmp_path / "tls")
        monkeypatch.setenv("GIT_SSL_CAINFO", str(self.tls[0]))
        self.git_server = GitHttpServer(self.repos, token=TOKEN, tls=self.tls)
        self.tools = FakeTools(tmp_path / "tools")
        self.tools.set(secret_words=[TOKEN, "s3cr3t-npm-value"], env_keys=["NPM_TOKEN", "A", "TECHULUS_GIT_PASSWORD", "GIT_ASKPASS", "HOME"])
        monkeypatch.setenv("PATH", f"{self.tools.bin}:{os.environ['PATH']}")
        self.vlogs = FakeVictoriaLogs()
        self.settings = Settings(data_dir=tmp_path / "data", logs_endpoint=self.vlogs.url, build_timeout=60, build_poll_interval=0.05,
                                 buildkit_host="tcp://127.0.0.1:1234")
        self.cp = StubControlPlane()

    def worker(self, **settings_changes) -> BuildWorker:
        settings = dataclasses.replace(self.settings, **settings_changes) if settings_changes else self.settings
        return BuildWorker(settings, self.cp, KEY, cancel_poll_interval=0.2)

    def url(self, name: str = "app.git") -> str:
        return self.git_server.url(name, userinfo=f"x-access-token:{TOKEN}")

    def close(self) -> None:
        self.git_server.close()
        self.vlogs.down()

    def everything_said(self) -> str:
        return json.dumps(self.tools.records()) + json.dumps(self.vlogs.entries) + json.dumps(self.cp.updates)


@pytest.fixture
def env(tmp_path, monkeypatch):
    environment = Env(tmp_path, monkeypatch)
    yield environment
    environment.close()


def assert_no_token_anywhere(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    for record in env.tools.records():
        assert TOKEN not in " ".join(record["argv"]), record
        assert record["leaks"] == [], f"{record['tool']} saw a secret in some process's command line"
    assert TOKEN not in json.dumps(env.vlogs.entries)
    assert TOKEN not in json.dumps(env.cp.updates)
    assert TOKEN not in caplog.text


@pytest.mark.real
def test_dockerfile_build_of_an_exact_commit_with_a_token(env, caplog):
    caplog.set_level(logging.DEBUG)
    env.cp.add("b-1", claim(url=env.url(), sha=env.shas[0]))
    worker = env.worker()
    assert worker.poll_once() is True
    assert env.cp.statuses("b-1") == ["cloning", "building", "pushing", "completed"], env.cp.updates
    buildctl = env.tools.records("buildctl")
    assert len(buildctl) == 1
    assert buildctl[0]["argv"] == [
        "--addr", "tcp://127.0.0.1:1234", "build", "--frontend", "dockerfile.v0", "--local", "context=.",
        "--local", "dockerfile=.", "--output", f"type=image,name={IMAGE},push=true,registry.insecure=true",
    ]
    assert buildctl[0]["version"] == "one", "the commit asked for, not the branch head"
    assert buildctl[0]["cwd"] == str(env.settings.builds_dir / "b-1")
    gits = env.tools.records("git")
    assert gits and all(r["env"].get("TECHULUS_GIT_PASSWORD") == TOKEN for r in gits if r["argv"][0] in ("clone", "fetch") or "fetch" in r["argv"])
    assert env.git_server.authorized > 0 and env.git_server.refused > 0  # git was challenged, then answered
    assert_no_token_anywhere(env, caplog)
    messages = env.vlogs.messages("build")
    assert messages[0].startswith(f"Cloning https://127.0.0.1:{env.git_server.port}/app.git")
    assert f"Clone completed at commit {env.shas[0]}" in messages
    assert "Using existing Dockerfile" in messages and "#9 pushing layers 0.1s done" in messages
    assert "" not in messages and env.vlogs.problems == []
    entry = env.vlogs.of_type("build")[0]
    assert (entry["build_id"], entry["service_id"], entry["project_id"]) == ("b-1", "svc", "proj")
    # Nothing is left behind: checkout, askpass helper, the in-progress record.
    assert list(env.settings.builds_dir.iterdir()) == []
    assert not (env.settings.data_dir / STATE_FILE).exists()
    assert worker.poll_once() is False  # nothing pending any more


@pytest.mark.real
def test_railpack_build_gets_secrets_through_the_environment_only(env, caplog):
    secrets = {"NPM_TOKEN": "s3cr3t-npm-value", "A": "1", "PATH": "/evil", "LD_PRELOAD": "/evil.so",
               "BROKEN": "not-a-blob", "bad-name": crypto.encrypt_secret(KEY, "x")}
    sealed = {k: crypto.encrypt_secret(KEY, v) if k not in ("BROKEN", "bad-name") else v for k, v in secrets.items()}
    env.cp.add("b-2", claim("b-2", url=env.url("rp.git"), secrets=sealed))
    env.worker().poll_once()
    assert env.cp.final("b-2") == ("completed", "")
    railpack = env.tools.records("railpack")[0]
    plan_dir = str(env.settings.builds_dir / ".plan-b-2")  # the agent's, not inside the checkout
    assert railpack["argv"] == ["prepare", ".", "--plan-out", f"{plan_dir}/railpack-plan.json", "--env", "A", "--env", "NPM_TOKEN"]
    assert railpack["env"]["NPM_TOKEN"] == "s3cr3t-npm-value" and railpack["env"]["A"] == "1"
    buildctl = env.tools.records("buildctl")[0]
    assert buildctl["plan"] == '{"steps": []}'
    assert buildctl["argv"] == [
        "--addr", "tcp://127.0.0.1:1234", "build", "--frontend", "gateway.v0",
        "--opt", "source=ghcr.io/railwayapp/railpack-frontend:v0.15.4", "--local", "context=.", "--local", f"dockerfile={plan_dir}",
        "--opt", "filename=railpack-plan.json", "--output", f"type=image,name={IMAGE},push=true,registry.insecure=true",
        "--opt", f"build-arg:secrets-hash={secrets_hash({'A': '1', 'NPM_TOKEN': 's3cr3t-npm-value'})}",
        "--secret", "id=A,env=A", "--secret", "id=NPM_TOKEN,env=NPM_TOKEN",
    ]
    assert buildctl["env"]["NPM_TOKEN"] == "s3cr3t-npm-value"
    assert "s3cr3t-npm-value" not in json.dumps([r["argv"] for r in env.tools.records()])
    messages = " | ".join(env.vlogs.messages("build"))
    assert "No Dockerfile found, using Railpack..." in messages
    assert "railpack CLI" not in messages  # the fake says it is 0.15.4, the frontend's release
    assert "Skipping secret PATH" in messages and "Skipping secret LD_PRELOAD" in messages
    assert "Skipping secret BROKEN" in messages and "Skipping secret 'bad-name'" in messages
    assert "s3cr3t-npm-value" not in messages
    assert_no_token_anywhere(env, caplog)
    assert list(env.settings.builds_dir.iterdir()) == []  # checkout and plan directory both gone


def test_the_frontend_is_the_protocols_and_matches_the_cli_release():
    assert RAILPACK_FRONTEND == "ghcr.io/railwayapp/railpack-frontend:v0.15.4"
    assert RAILPACK_FRONTEND.endswith(":v" + RAILPACK_VERSION)


@pytest.mark.real
def test_a_railpack_cli_of_another_release_is_named_in_the_build_log(env):
    env.tools.set(railpack_version="railpack version 0.14.0")
    env.cp.add("b-rp", claim("b-rp", url=env.url("rp.git")))
    env.worker().poll_once()
    assert env.cp.final("b-rp") == ("completed", "")  # a warning, not a failure
    assert any("railpack CLI is 0.14.0, but builds use the 0.15.4 BuildKit frontend" in m for m in env.vlogs.messages("build"))


@pytest.mark.real
def test_symlinks_out_of_the_checkout_are_refused_before_any_tool_runs(env, caplog):
    """railpack runs as root and follows links: a committed `railpack-plan.json -> <host
    file>` would be overwritten by its --plan-out, and `.nvmrc -> <secret>` would print the
    secret into the build log. Both are refused by name; nothing outside is touched."""
    victim = env.tmp / "victim"
    victim.write_text("original host file\n")
    secret = env.tmp / "secret"
    secret.write_text("ENCRYPTION-KEY-0123456789abcdef\n")
    make_repo(env.repos, [{"package.json": "{}", "railpack-plan.json": Link(str(victim))}], "plan-link.git")
    make_repo(env.repos, [{"package.json": "{}", "sub/.nvmrc": Link("../../../../secret")}], "nvmrc-link.git")
    make_repo(env.repos, [{"package.json": "{}", ".nvmrc": Link(str(secret))}], "nvmrc-abs.git")
    make_repo(env.repos, [{"Dockerfile": "FROM scratch\n", "etc": Link("/etc")}], "docker-link.git")
    for build_id, repo in (("s-1", "plan-link.git"), ("s-2", "nvmrc-link.git"), ("s-3", "nvmrc-abs.git"), ("s-4", "docker-link.git")):
        env.cp.add(build_id, claim(build_id, url=env.url(repo)))
    worker = env.worker()
    for _ in range(4):
        worker.poll_once()
    assert victim.read_text() == "original host file\n"
    for build_id, name in (("s-1", "'railpack-plan.json'"), ("s-2", "'sub/.nvmrc'"), ("s-3", "'.nvmrc'"), ("s-4", "'etc'")):
        status, error = env.cp.final(build_id)
        assert status == "failed" and "symbolic link that points outside" in error and name in error, (build_id, error)
    assert env.tools.records("railpack") == [] and env.tools.records("buildctl") == []
    assert "ENCRYPTION-KEY" not in env.everything_said() and "ENCRYPTION-KEY" not in caplog.text
    assert list(env.settings.builds_dir.iterdir()) == []


@pytest.mark.real
def test_links_inside_the_checkout_are_fine_and_a_committed_plan_is_not_used(env):
    make_repo(env.repos, [{
        "package.json": "{}", "app/.nvmrc": "20\n", ".nvmrc": Link("app/.nvmrc"), "lib": Link("app"),
        "railpack-plan.json": Link("package.json"),  # inside, but still never written through
    }], "inside.git")
    env.cp.add("s-5", claim("s-5", url=env.url("inside.git")))
    env.worker().poll_once()
    assert env.cp.final("s-5") == ("completed", "")
    assert env.tools.records("railpack")[0]["plan_in_checkout"] is False
    messages = env.vlogs.messages("build")
    assert "Detected version from .nvmrc: 20" in messages
    assert "Ignoring the railpack-plan.json committed in the repository: Railpack writes its own plan" in messages
    assert env.tools.records("buildctl")[0]["plan"] == '{"steps": []}'


@pytest.mark.real
def test_wrong_token_and_unknown_commit_fail_with_clear_errors(env, caplog):
    env.cp.add("b-3", claim("b-3", url=env.git_server.url(userinfo="x-access-token:ghs_wrong"), sha=env.shas[0]))
    env.cp.add("b-4", claim("b-4", url=env.url(), sha="0123456789abcdef0123456789abcdef01234567"))
    worker = env.worker()
    worker.poll_once()
    worker.poll_once()
    status, error = env.cp.final("b-3")
    assert status == "failed" and "git clone exited with code 128" in error and "ghs_wrong" not in error
    status, error = env.cp.final("b-4")
    assert status == "failed" and "commit 0123456789abcdef0123456789abcdef01234567 not found" in error
    assert env.tools.records("buildctl") == []
    assert_no_token_anywhere(env, caplog)


@pytest.mark.real
def test_invalid_claim_data_fails_the_build_before_running_anything(env):
    env.cp.add("b-5", claim("b-5", url="ext::sh%20-c%20touch%20/tmp/pwned"))
    env.cp.add("b-6", claim("b-6", url=env.url(), branch="--upload-pack=touch /tmp/pwned"))
    env.cp.add("b-6h", claim("b-6h", url=env.url().replace("https://", "http://")))
    worker = env.worker()
    for _ in range(3):
        worker.poll_once()
    assert env.cp.final("b-5")[0] == "failed" and "http(s) URL" in env.cp.final("b-5")[1]
    assert env.cp.final("b-6")[0] == "failed" and "branch" in env.cp.final("b-6")[1]
    assert env.cp.final("b-6h")[0] == "failed" and "over plain http://" in env.cp.final("b-6h")[1]
    assert TOKEN not in json.dumps(env.cp.updates)
    assert env.tools.records() == []


@pytest.mark.real
def test_git_follows_no_redirect_with_the_token(env, caplog):
    """A redirect (here to another server that would accept any token) is not followed:
    the token never leaves for a host the control plane did not name."""
    elsewhere = GitHttpServer(env.repos, token="anything", tls=env.tls)
    moved = GitHttpServer(env.repos, token=TOKEN, tls=env.tls, redirects={"moved.git": elsewhere.url("app.git")})
    try:
        env.cp.add("b-redir", claim("b-redir", url=moved.url("moved.git", userinfo=f"x-access-token:{TOKEN}")))
        env.worker().poll_once()
    finally:
        moved.close()
        elsewhere.close()
    status, error = env.cp.final("b-redir")
    assert status == "failed" and "git clone exited with code 128" in error
    assert moved.requests and elsewhere.requests == [] and elsewhere.seen_auth == []
    assert env.tools.records("buildctl") == []
    assert_no_token_anywhere(env, caplog)


@pytest.mark.real
def test_claim_race_409_moves_on_quietly(env, caplog):
    caplog.set_level(logging.INFO)
    env.cp.add("b-lost", claim("b-lost", url=env.url()))
    env.cp.lost_race.add("b-lost")
    worker = env.worker()
    assert worker.poll_once() is False
    assert env.cp.updates == [] and env.tools.records() == []
    assert not (env.settings.data_dir / STATE_FILE).exists()
    assert "claimed by another server" in caplog.text and "ERROR" not in caplog.text


@pytest.mark.real
def test_timeout_kills_the_whole_process_group(env):
    env.tools.set(buildctl="sleep")
    env.cp.add("b-7", claim("b-7", url=env.url()))
    started = time.monotonic()
    env.worker(build_timeout=3).poll_once()
    assert time.monotonic() - started < 20
    status, error = env.cp.final("b-7")
    assert status == "failed" and "timed out after 3s (during buildctl build)" in error
    record = env.tools.records("buildctl")[0]
    assert_dead(record["pid"]) and assert_dead(record["child"])


def assert_dead(pid: int) -> bool:
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    raise AssertionError(f"process {pid} survived the build")


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


@pytest.mark.real
def test_cancelling_in_the_ui_kills_the_running_build(env):
    env.tools.set(buildctl="sleep")
    env.cp.add("b-8", claim("b-8", url=env.url()))
    worker = env.worker()
    thread = threading.Thread(target=worker.poll_once)
    thread.start()
    wait_for(lambda: env.tools.records("buildctl"))
    # Meanwhile a second poll finds the lock taken and does not even ask the CP.
    calls = env.cp.pending_calls
    assert worker.poll_once() is False and env.cp.pending_calls == calls
    env.cp.status["b-8"] = "cancelled"
    thread.join(15)
    assert not thread.is_alive()
    assert env.cp.final("b-8") == ("failed", "build cancelled")
    record = env.tools.records("buildctl")[0]
    assert_dead(record["pid"]) and assert_dead(record["child"])


@pytest.mark.real
def test_agent_shutdown_mid_build_kills_it_and_reports_it(env):
    env.tools.set(buildctl="sleep")
    env.cp.add("b-9", claim("b-9", url=env.url()))
    stop = threading.Event()
    worker = env.worker()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    wait_for(lambda: env.tools.records("buildctl"))
    stop.set()
    thread.join(15)
    assert not thread.is_alive()
    status, error = env.cp.final("b-9")
    assert status == "failed" and "shutting down" in error
    assert_dead(env.tools.records("buildctl")[0]["child"])


@pytest.mark.real
def test_a_build_tool_killed_mid_way_fails_the_build(env):
    env.tools.set(buildctl="selfkill")
    env.cp.add("b-10", claim("b-10", url=env.url()))
    env.worker().poll_once()
    status, error = env.cp.final("b-10")
    assert status == "failed" and "buildctl build killed by signal SIGKILL" in error
    env.tools.set(buildctl="fail")
    env.cp.add("b-11", claim("b-11", url=env.url()))
    env.worker().poll_once()
    status, error = env.cp.final("b-11")
    assert status == "failed" and "exited with code 1" in error and "failed to solve" in error


@pytest.mark.real
def test_missing_tools_fail_the_build_by_name_and_the_worker_carries_on(env):
    env.tools.remove("buildctl")
    env.tools.remove("railpack")
    monkey_path = os.environ["PATH"]
    os.environ["PATH"] = f"{env.tools.bin}:/nonexistent"
    try:
        env.cp.add("b-12", claim("b-12", url=env.url()))
        worker = env.worker()
        worker.poll_once()
    finally:
        os.environ["PATH"] = monkey_path
    status, error = env.cp.final("b-12")
    assert status == "failed" and "buildctl is not installed" in error
    env.tools.add("buildctl")
    env.cp.add("b-13", claim("b-13", url=env.url("rp.git")))
    worker.poll_once()
    status, error = env.cp.final("b-13")
    assert status == "failed" and "railpack is not installed" in error
    env.cp.add("b-14", claim("b-14", url=env.url()))  # a Dockerfile build needs no railpack
    worker.poll_once()
    assert env.cp.final("b-14") == ("completed", "")


@pytest.mark.real
def test_restart_reports_the_interrupted_build_failed(env):
    state = env.settings.data_dir / STATE_FILE
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"buildId": "b-old", "phase": "running", "status": "", "error": ""}))
    (env.settings.builds_dir / "b-old").mkdir(parents=True)
    env.cp.status["b-old"] = "cloning"
    env.cp.add("b-new", claim("b-new", url=env.url()))
    env.cp.unreachable = True
    worker = env.worker()
    assert worker.poll_once() is False  # cannot report yet: keeps the record, claims nothing
    assert state.exists() and env.cp.status["b-new"] == "pending"
    env.cp.unreachable = False
    assert worker.poll_once() is True
    status, error = env.cp.final("b-old")
    assert status == "failed" and "interrupted" in error
    assert not (env.settings.builds_dir / "b-old").exists()
    assert env.cp.final("b-new") == ("completed", "")
    # A final status the CP never received is re-sent on the next start.
    state.write_text(json.dumps({"buildId": "b-new", "phase": "finished", "status": "completed", "error": ""}))
    env.worker().poll_once()
    assert env.cp.updates[-1] == ("b-new", "completed", "")
    # A record of a build the CP does not know (404) is dropped; a corrupt one too.
    state.write_text(json.dumps({"buildId": "b-unknown", "phase": "claiming"}))
    env.worker().poll_once()
    assert not state.exists()
    state.write_text("{garbage")
    env.worker().poll_once()
    assert not state.exists()


@pytest.mark.real
def test_against_the_fake_control_plane_with_a_lost_claim_race(env, caplog):
    fakecp = pytest.importorskip("tests.fakecp", reason="tests/fakecp.py (the fake control plane) is not in this checkout")
    from agent.api import ControlPlane, Signer

    key = crypto.new_signing_key()
    with fakecp.FakeControlPlane(encryption_key=KEY) as cp:
        server = cp.add_server(crypto.public_key_b64(key))
        won = cp.add_build(clone_url=env.url(), image_uri=IMAGE, secrets={"NPM_TOKEN": "s3cr3t-npm-value"})
        client = ControlPlane(cp.url, Signer(server.id, key), retries=0)

        class RacingClient(ControlPlane):
            def pending_build(self):  # another server claims between our poll and our claim
                found = super().pending_build()
                if found:
                    cp.set_build_status(found["id"], "claimed")
                return found

        worker = BuildWorker(env.settings, client, KEY)
        assert worker.poll_once() is True
        assert [u.status for u in cp.build_updates] == ["cloning", "building", "pushing", "completed"]
        assert cp.build(won).status == "completed"
        assert env.tools.records("buildctl")[0]["env"]["NPM_TOKEN"] == "s3cr3t-npm-value"
        lost = cp.add_build(clone_url=env.url(), image_uri=IMAGE)
        racing = RacingClient(cp.url, Signer(server.id, key), retries=0)
        updates = len(cp.build_updates)
        assert BuildWorker(env.settings, racing, KEY).poll_once() is False
        assert len(cp.build_updates) == updates and cp.build(lost).status == "claimed"
    assert_no_token_anywhere(env, caplog)


WORKER_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from agent.builds import BuildWorker
from agent.settings import Settings
from tests.buildfakes import StubControlPlane
cp = StubControlPlane()
cp.add({build_id!r}, json.loads({claim!r}))
settings = Settings(data_dir=Path({data!r}), logs_endpoint={logs!r}, build_timeout=60, buildkit_host="tcp://127.0.0.1:1234")
BuildWorker(settings, cp, {key!r}).poll_once()
"""


@pytest.mark.real
def test_a_restarted_agent_kills_the_build_step_an_agent_kill_left_running(env):
    """KillMode=process (or a crash) leaves the step running; the next start kills its
    process group before reporting the build failed."""
    env.tools.set(buildctl="sleep")
    build_claim = claim("b-orphan", url=env.url())
    script = env.tmp / "worker.py"
    script.write_text(WORKER_SCRIPT.format(
        root=str(Path(__file__).resolve().parents[1]), build_id="b-orphan", claim=json.dumps(build_claim),
        data=str(env.settings.data_dir), logs=env.vlogs.url, key=KEY,
    ))
    agent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: env.tools.records("buildctl") or agent.poll() is not None)
        assert agent.poll() is None, agent.stderr.read().decode() if agent.stderr else ""
        record = env.tools.records("buildctl")[0]
        state = json.loads((env.settings.data_dir / STATE_FILE).read_text())
        assert (state["pgid"], state["command"]) == (record["pid"], "buildctl")
    finally:
        agent.kill()  # SIGKILL: no cleanup of any kind runs
        agent.wait(10)
    try:
        os.kill(record["pid"], 0)  # the orphan really is still there
        os.kill(record["child"], 0)
        env.cp.status["b-orphan"] = "building"  # what the control plane knows of it
        assert env.worker().poll_once() is False
        assert_dead(record["pid"]) and assert_dead(record["child"])
    finally:
        for pid in (record["pid"], record["child"]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    status, error = env.cp.final("b-orphan")
    assert status == "failed" and "interrupted" in error
    assert not (env.settings.data_dir / STATE_FILE).exists()


@pytest.mark.real
def test_recovery_kills_nothing_that_is_not_provably_the_recorded_step(env):
    env.tools.set(buildctl="sleep")
    state = env.settings.data_dir / STATE_FILE
    state.parent.mkdir(parents=True)
    # A buildctl that is not ours (no marker for this build: e.g. a reused pid) ...
    stranger = subprocess.Popen([str(env.tools.bin / "buildctl")], start_new_session=True,
                                stdout=subprocess.DEVNULL, env={**os.environ, "TECHULUS_BUILD_ID": "another-build"})
    # ... and a process group whose leader (ours) died, leaving a marked child behind.
    marked = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; print(subprocess.Popen(['sleep', '300']).pid, flush=True)"],
        start_new_session=True, stdout=subprocess.PIPE, env={**os.environ, "TECHULUS_BUILD_ID": "b-left"})
    try:
        assert marked.stdout is not None
        marked_child = int(marked.stdout.readline())
        marked.wait(10)
        wait_for(lambda: env.tools.records("buildctl"))
        for build_id, pgid in (("b-strange", stranger.pid), ("b-left", marked.pid)):
            env.cp.status[build_id] = "building"
            state.write_text(json.dumps({"buildId": build_id, "phase": "running", "pgid": pgid, "command": "buildctl"}))
            env.worker().poll_once()
            assert env.cp.final(build_id)[0] == "failed"
        assert stranger.poll() is None, "a process without this build's marker was killed"
        assert_dead(marked_child)
        # Garbage in the record is ignored, not trusted.
        for bad in ({"pgid": 1, "command": "buildctl"}, {"pgid": stranger.pid, "command": "sleep"}, {"pgid": "x", "command": "git"}):
            state.write_text(json.dumps({"buildId": "b-strange", "phase": "running", **bad}))
            env.worker().poll_once()
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait(10)
        for row in env.tools.records("buildctl"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(row["child"], signal.SIGKILL)


def test_railpack_frontend_can_be_pinned():
    pinned = "ghcr.io/railwayapp/railpack-frontend:v0.15.4@sha256:" + "a" * 64
    argv = railpack_build_argv("tcp://bk:1234", "type=image,name=x,push=true", {}, "/p", frontend=pinned)
    assert f"source={pinned}" in argv
