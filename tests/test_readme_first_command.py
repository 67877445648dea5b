"""The README's first command, exactly as written, in a fresh clone: it must serve its page.

A newcomer's first run once never served its page (no sudo, apt busy, no registry, a
broken network backend). This test runs the first command of README.md verbatim with
`bash -c` in a fresh `git clone`, offline (the demo image is built locally), waits for the
page, prints the wall time, presses Ctrl-C, runs the README's clean-up command verbatim and
checks that nothing of the example is left. Only the environment is the test's: its
podman config (CONTAINERS_CONF, tests/testbed.py), the shared venv (VENV), and names of its
own (data dir, network, scope label, a free subnet via EXAMPLE_SUBNET) so that it never
meets another test's resources or a real agent's.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.testbed import cleanup_scope, podman, podman_env  # noqa: F401

pytestmark = [pytest.mark.real, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PAGE_TIMEOUT = 300.0  # package installs on a fresh machine; seconds when all is installed
IMAGES = ("localhost/techulus-example:latest", "localhost/techulus-doctor-probe:latest")
PAGE_TEXT = "Hello from the Techulus agent"


def readme_commands() -> tuple[str, str]:
    """The first command of README.md's first code block, and that block's clean-up command."""
    block: list[str] = []
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("    ") and line.strip():
            block.append(line.strip())
        elif block:
            break
    commands = [line.split("  #", 1)[0].strip() for line in block]
    down = [c for c in commands if "--down" in c]
    assert commands and down, f"README's first code block has no run and clean-up command: {block}"
    return commands[0], down[0]


def free_subnet() -> int:
    """A 10.200.N.0/24 no podman network uses; tests/testbed.py takes 100-249, so below that."""
    names = podman("network", "ls", "--format", "{{.Name}}").stdout.split()
    used = set()
    for info in json.loads(podman("network", "inspect", *names).stdout or "[]") if names else []:
        for subnet in info.get("subnets") or []:
            used.add(str(subnet.get("subnet")))
    free = [n for n in range(20, 100) if f"10.200.{n}.0/24" not in used]
    assert free, "no free 10.200.N.0/24 for the example"
    return random.choice(free)


def fetch(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=2) as response:
        return str(response.read().decode(errors="replace"))


@pytest.mark.parametrize("podman_config", ["tests", "host"])
def test_readme_first_command_serves_its_page_offline_and_cleans_up(
    tmp_path: Path, podman_env: Path, podman_config: str  # noqa: F811
) -> None:
    """`tests`: with the suite's containers.conf; `host`: with podman's defaults on this
    machine, which on the testbed cannot run containers (CNI without plugins, ulimits), so
    the script must notice and use a containers.conf of its own."""
    run_command, down_command = readme_commands()
    clone = tmp_path / "clone"
    if shutil.which("git") and (REPO / ".git").exists():
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=120)
    else:  # a source tree without git (e.g. an exported CI checkout): a copy without local state
        shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(".venv", "build", "bin", "__pycache__", ".git"))
    subnet = free_subnet()
    token = uuid.uuid4().hex[:10]
    network, scope = f"ttreadme{token}", f"techulus.test.scope=readme-{token}"
    data_dir = tmp_path / "data"
    env = dict(os.environ)
    env.update({
        "VENV": sys.prefix,  # the suite's venv: no second pip install in CI
        "DATA_DIR": str(data_dir),
        "EXAMPLE_SUBNET": str(subnet),
        "TECHULUS_AGENT_NETWORK_NAME": network,
        "TECHULUS_AGENT_SCOPE_LABEL": scope,
        "TECHULUS_AGENT_RUN_DIR": str(tmp_path / "run"),
    })
    env.pop("PYTHONPATH", None)  # the clone's own code must run, not this checkout's
    if podman_config == "host":
        env.pop("CONTAINERS_CONF", None)
    url = f"http://10.200.{subnet}.2/"
    log_path = tmp_path / "run-example.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(["bash", "-c", run_command], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        page = ""
        while time.monotonic() - started < PAGE_TIMEOUT and proc.poll() is None:
            try:
                page = fetch(url)
                break
            except OSError:
                time.sleep(0.2)
        wall = time.monotonic() - started
        output = log_path.read_text(errors="replace")
        assert PAGE_TEXT in page, f"{run_command!r} served no page at {url} (exit {proc.poll()}):\n{output}"
        print(f"\nREADME first command {run_command!r} in a fresh clone ({podman_config} podman config): "
              f"first 200 from {url} after {wall:.1f}s")
        print("\n".join(line for line in output.splitlines() if line.startswith("run-example: ")))
        steps = [line for line in output.splitlines() if line.startswith("run-example: [")]
        assert [line.split("]")[0] for line in steps] == [f"run-example: [{i}/5" for i in range(1, 6)], output

        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0, log_path.read_text(errors="replace")
        assert "Remove everything it made: scripts/run-example.sh --down" in log_path.read_text(errors="replace")
        assert PAGE_TEXT in fetch(url), "the container keeps running after Ctrl-C"

        down_started = time.monotonic()
        down = subprocess.run(["bash", "-c", down_command], cwd=clone, env=env, capture_output=True, text=True, timeout=120)
        print(f"README clean-up command {down_command!r}: {time.monotonic() - down_started:.1f}s")
        assert down.returncode == 0, down.stdout + down.stderr
        assert podman("ps", "-aq", "--filter", f"label={scope}").stdout.split() == []
        assert podman("network", "exists", network, check=False).returncode != 0, "the network is left"
        assert not data_dir.exists(), "the data dir is left"
        for image in IMAGES:
            assert podman("image", "exists", image, check=False).returncode != 0, f"{image} is left"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        cleanup_scope(scope)
        podman("network", "rm", "-f", network, check=False)
        shutil.rmtree(data_dir, ignore_errors=True)
