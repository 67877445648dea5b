"""Transactional upgrade and uninstall on a real booted Debian bookworm (systemd-nspawn).

One container for every case (tests/nspawn.py, as tests/test_installer_e2e.py): install.sh
installs a build signed by build.sh (SIGNING_KEY), the agent registers with the fake control
plane (tests/fakecp.py) on the host's loopback, then:

* `techulus-agent upgrade` of a healthy build commits; of a build that exits at start, one
  that hangs before READY, one with a wrong checksum and one with a bad signature each ends
  with the previous version running;
* the same when the upgrade command itself is killed: the unit's ExecStartPre
  (installer/upgrade-guard) rolls back at the next start after the deadline;
* an install.sh re-run with a build that exits at start fails and leaves the old agent;
* `install.sh --uninstall`, then install.sh again: nothing registers twice, the data is found;
* `install.sh --uninstall --purge` refuses without --yes, and with it removes the data dir and
  the agent's podman network.

The unhealthy builds are the real zipapp with one file changed (and a new shiv build id):
`agent/runtime.py`, which only `run` imports, ends in `raise SystemExit(3)` or a sleep, so
`--version` still works and the failure happens under systemd, as it would in the field.
"Containers never restart" is checked with a long-running process in the agent unit's cgroup
(where conmon would be): podman inside nspawn cannot run containers on this VM's hybrid
cgroups. Its pid and start time must not change.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

from tests import nspawn
from tests.fakecp import FakeControlPlane
from tests.test_installer_e2e import worker

pytestmark = [pytest.mark.real, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
LIB = "/usr/local/lib/techulus-agent"
DATA = "/var/lib/techulus-agent"


def variant(source: Path, dest: Path, tag: str, runtime_tail: str = "") -> Path:
    """The zipapp `source` as another build: new build id and commit, runtime.py extended."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    buffer.write(b"#!/usr/bin/python3\n")
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as new:
        for item in old.infolist():
            data = old.read(item)
            if item.filename == "environment.json":
                env = json.loads(data)
                env["build_id"] = hashlib.sha256(env["build_id"].encode() + tag.encode()).hexdigest()
                data = json.dumps(env).encode()
            elif item.filename == "site-packages/agent/_build_info.py":
                data = data.replace(b'COMMIT = "', f'COMMIT = "{tag}-'.encode())
            elif item.filename == "site-packages/agent/runtime.py" and runtime_tail:
                data += f"\n{runtime_tail}\n".encode()
            new.writestr(item, data)
    dest.write_bytes(buffer.getvalue())
    dest.chmod(0o755)
    return dest


def sign(key: Ed25519PrivateKey, path: Path) -> None:
    Path(f"{path}.sig").write_bytes(key.sign(path.read_bytes()))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """build.sh with SIGNING_KEY: the signed zipapp, its signature and the public key."""
    out = tmp_path_factory.mktemp("release")
    key = out / "release.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True, capture_output=True)
    subprocess.run([str(REPO / "build.sh")], cwd=REPO, check=True, capture_output=True, timeout=600,
                   env=dict(os.environ, OUT=str(out / "bin"), BUILD=str(out / "build"), ARCHES="amd64",
                            SOURCE_DATE_EPOCH="1700000000", SIGNING_KEY=str(key)))
    return {"key": key, "zipapp": out / "bin" / "agent-linux-amd64", "pub": out / "bin" / "release-signing.pub",
            "install": out / "bin" / "install.sh"}


def test_build_sh_signs_with_the_given_key(release: dict[str, Path]) -> None:
    public = load_pem_public_key(release["pub"].read_bytes())
    assert isinstance(public, Ed25519PublicKey)
    public.verify(Path(f"{release['zipapp']}.sig").read_bytes(), release["zipapp"].read_bytes())  # raises if wrong
    assert release["pub"].read_text() in release["install"].read_text(), "bin/install.sh carries the public key"


@pytest.fixture(scope="module")
def box(release: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[nspawn.Machine, Path]]:
    share = tmp_path_factory.mktemp("share")
    (share / "installer").mkdir()
    shutil.copy(release["pub"], share / "installer" / "release-signing.pub")  # a signed release
    (share / "builds").mkdir()
    with worker(share) as machine:
        yield machine, share


class Workload:
    """A stand-in container: a process in the agent unit's cgroup, where conmon lives."""

    def __init__(self, machine: nspawn.Machine) -> None:
        self.machine = machine
        self.pid = machine.run("sh", "-c", "setsid sleep 100000 >/dev/null 2>&1 & echo $!").stdout.strip()
        cgroup = machine.run("systemctl", "show", "-p", "ControlGroup", "--value", "techulus-agent").stdout.strip()
        moved = machine.run("sh", "-c", f'for d in /sys/fs/cgroup/unified{cgroup} /sys/fs/cgroup/systemd{cgroup} /sys/fs/cgroup{cgroup}; do '
                                        f'[ -w "$d/cgroup.procs" ] && echo {self.pid} >"$d/cgroup.procs" && echo "$d"; done; true')
        assert moved.stdout.strip(), f"could not move the workload into {cgroup}"
        self.identity = self.current()

    def current(self) -> str:
        """pid and start time (clock ticks since boot): a restarted process differs in both."""
        stat = self.machine.run("cat", f"/proc/{self.pid}/stat", check=False)
        return f"{self.pid}:{stat.stdout.split()[21]}" if stat.returncode == 0 else "gone"


def main_pid(machine: nspawn.Machine) -> str:
    return machine.run("systemctl", "show", "-p", "MainPID", "--value", "techulus-agent").stdout.strip()


def upgrade_state(machine: nspawn.Machine) -> dict[str, object]:
    return json.loads(machine.run("cat", f"{DATA}/upgrade-state.json").stdout)


def installed(machine: nspawn.Machine, name: str = "agent.pyz") -> str:
    return machine.run("sha256sum", f"{LIB}/{name}").stdout.split()[0]


def wait_active_and_healthy(machine: nspawn.Machine, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        marker = machine.run("cat", f"{DATA}/health.json", check=False).stdout
        if machine.run("systemctl", "is-active", "techulus-agent", check=False).stdout.strip() == "active" and \
                marker and str(json.loads(marker)["pid"]) == main_pid(machine):
            return
        time.sleep(0.5)
    raise AssertionError("the agent did not become healthy:\n" + journal(machine))


def journal(machine: nspawn.Machine) -> str:
    return machine.run("journalctl", "-u", "techulus-agent", "--no-pager", "-n", "60", check=False).stdout


def test_upgrade_commits_or_rolls_back_and_uninstall_keeps_or_purges(
    release: dict[str, Path], box: tuple[nspawn.Machine, Path]
) -> None:
    machine, share = box
    key = load_pem_private_key(release["key"].read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    v1 = share / "builds" / "v1" / "agent-linux-amd64"
    v1.parent.mkdir()
    shutil.copy(release["zipapp"], v1)
    shutil.copy(f"{release['zipapp']}.sig", f"{v1}.sig")
    with FakeControlPlane() as cp:
        token = cp.add_token()
        install = ["bash", "/opt/e2e/install.sh", "--url", cp.url, "--skip-caddy", "--skip-build-tools",
                   "--agent-binary", "/opt/e2e/builds/v1/agent-linux-amd64", "--agent-sha256", sha256(v1),
                   "--agent-env", "TECHULUS_AGENT_MANAGE_WIREGUARD=false",
                   "--agent-env", "TECHULUS_AGENT_MANAGE_DNS=false",
                   "--agent-env", "TECHULUS_AGENT_MANAGE_CADDY=false",
                   "--agent-env", "TECHULUS_AGENT_PUBLIC_IP=203.0.113.7",
                   "--agent-env", f"TECHULUS_AGENT_NETWORK_NAME={machine.name}"]
        first = machine.run(*install, env={"TECHULUS_AGENT_TOKEN": token}, check=False, timeout=600)
        assert first.returncode == 0, first.stdout + first.stderr + journal(machine)
        assert machine.run("cat", "/etc/techulus-agent/release-signing.pub").stdout == release["pub"].read_text()
        wait_active_and_healthy(machine)
        workload = Workload(machine)

        def upgrade(build: Path, *extra: str) -> subprocess.CompletedProcess[str]:
            started = time.monotonic()
            result = machine.run("techulus-agent", "upgrade", "--binary", f"/opt/e2e/builds/{build.parent.name}/{build.name}",
                                 *extra, check=False, timeout=300)
            print(f"upgrade to {build.parent.name}: exit {result.returncode} after {time.monotonic() - started:.1f}s")
            assert workload.current() == workload.identity, "the upgrade restarted the workload"
            return result

        # A healthy build commits; the old one stays as `previous`.
        v2 = variant(v1, share / "builds" / "v2" / "agent-linux-amd64", "v2")
        sign(key, v2)
        before = main_pid(machine)
        result = upgrade(v2, "--sha256", sha256(v2), "--timeout", "60")
        assert result.returncode == 0, result.stderr + journal(machine)
        state = upgrade_state(machine)
        assert state["outcome"] == "committed" and state["to_sha256"] == sha256(v2), state
        assert "v2-" in str(state["to_version"]) and state["from_sha256"] == sha256(v1)
        assert installed(machine) == sha256(v2) and installed(machine, "agent.pyz.previous") == sha256(v1)
        assert main_pid(machine) != before
        print(f"commit took {state['seconds']}s")

        # Unhealthy builds: each ends with v2 running again, the reason in the state and the journal.
        cases = {
            "exits": ("raise SystemExit(3)", "exited at start"),
            "hangs": ("import time\ntime.sleep(100000)", "never sent READY"),
        }
        for name, (tail, why) in cases.items():
            bad = variant(v1, share / "builds" / name / "agent-linux-amd64", name, tail)
            sign(key, bad)
            result = upgrade(bad, "--sha256", sha256(bad), "--timeout", "20")
            state = upgrade_state(machine)
            assert result.returncode == 1 and state["outcome"] == "rolled_back", (state, result.stderr)
            assert why in str(state["reason"]) and str(state["reason"]).endswith("the previous version runs again")
            assert installed(machine) == sha256(v2)
            assert machine.run("systemctl", "is-active", "techulus-agent").stdout.strip() == "active"
            assert f"upgrade rolled_back: {state['from_version']}" in journal(machine)
            print(f"{name}: rolled back after {state['seconds']}s")

        # Refused before anything changes: a wrong checksum, a signature by another key.
        before = main_pid(machine)
        v3 = variant(v1, share / "builds" / "v3" / "agent-linux-amd64", "v3")
        result = upgrade(v3, "--sha256", "0" * 64)
        assert result.returncode == 1 and upgrade_state(machine)["outcome"] == "refused"
        assert "checksum mismatch" in str(upgrade_state(machine)["reason"])
        sign(Ed25519PrivateKey.generate(), v3)
        result = upgrade(v3, "--sha256", sha256(v3))
        assert "does not match the installed release key" in str(upgrade_state(machine)["reason"])
        assert main_pid(machine) == before and installed(machine) == sha256(v2)

        # The upgrade command dies (SIGKILL) while a build that exits at start crash-loops:
        # once the deadline has passed (moved into the past here), the unit's ExecStartPre
        # (upgrade-guard) rolls back at systemd's next restart.
        exits = share / "builds" / "exits" / "agent-linux-amd64"
        pid = machine.run("sh", "-c", f"setsid techulus-agent upgrade --binary /opt/e2e/builds/exits/agent-linux-amd64 "
                                      f"--sha256 {sha256(exits)} --timeout 600 >/run/e2e-upgrade.log 2>&1 & echo $!").stdout.strip()
        deadline = time.monotonic() + 60
        while '"in_progress"' not in machine.run("cat", f"{DATA}/upgrade-state.json").stdout:
            assert time.monotonic() < deadline, machine.run("cat", "/run/e2e-upgrade.log").stdout
            time.sleep(0.2)
        machine.run("sh", "-c", f"kill -9 {pid}")
        assert installed(machine) == sha256(exits)
        machine.run("sed", "-i", "s/\"deadline_epoch\": [0-9]*/\"deadline_epoch\": 1/", f"{DATA}/upgrade-state.json")
        wait_active_and_healthy(machine)
        state = upgrade_state(machine)
        assert state["outcome"] == "rolled_back" and "rolled back at start by upgrade-guard" in str(state["reason"]), state
        assert installed(machine) == sha256(v2) and workload.current() == workload.identity
        assert "the previous version starts now" in journal(machine)

        # install.sh with a build that exits at start: it fails, saying why; v2 keeps running.
        rerun = [*install[:install.index("--agent-binary")], "--agent-binary", "/opt/e2e/builds/exits/agent-linux-amd64",
                 *install[install.index("--agent-sha256") + 2:]]
        result = machine.run(*rerun, env={"TECHULUS_UPGRADE_TIMEOUT": "20"}, check=False, timeout=300)
        assert result.returncode == 1 and "the new agent was not kept (rolled_back: the new agent exited at start" in result.stderr, result.stderr
        assert installed(machine) == sha256(v2) and workload.current() == workload.identity
        wait_active_and_healthy(machine)

        # Uninstall: the agent goes, the workload and the data stay; installing again finds them.
        result = machine.run("bash", "/opt/e2e/install.sh", "--uninstall", check=False, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        for path in (LIB, "/etc/systemd/system/techulus-agent.service", "/etc/techulus-agent/agent.env",
                     "/usr/local/bin/techulus-agent", f"{DATA}/shiv"):
            assert machine.run("test", "-e", path, check=False).returncode == 1, f"{path} is still there"
        assert machine.run("systemctl", "is-active", "techulus-agent", check=False).stdout.strip() != "active"
        assert machine.run("test", "-f", f"{DATA}/keys/private.key", check=False).returncode == 0
        assert workload.current() == workload.identity, "uninstalling stopped the workload"
        again = machine.run("bash", "/opt/e2e/install.sh", "--uninstall", check=False, timeout=60)
        assert again.returncode == 0 and "Nothing to remove" in again.stdout

        reports = len(cp.status_reports)
        result = machine.run(*install, env={"TECHULUS_AGENT_TOKEN": token}, check=False, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "already registered: the registration token was not used" in result.stdout
        assert len([s for s in cp.servers if s.signing_public_key]) == 1, "registered once"
        wait_active_and_healthy(machine)
        deadline = time.monotonic() + 30
        while len(cp.status_reports) == reports and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(cp.status_reports) > reports, "the reinstalled agent reports with its old identity"

        # Purge: asks first (no terminal here: refused, nothing changed), then with --yes.
        network = machine.run("podman", "network", "exists", machine.name, check=False)
        assert network.returncode == 0, "the agent made its podman network"
        refused = machine.run("bash", "/opt/e2e/install.sh", "--uninstall", "--purge", check=False, timeout=60)
        assert refused.returncode == 1 and "add --yes" in refused.stderr
        assert machine.run("systemctl", "is-active", "techulus-agent").stdout.strip() == "active"
        result = machine.run("bash", "/opt/e2e/install.sh", "--uninstall", "--purge", "--yes", check=False, timeout=180)
        assert result.returncode == 0, result.stdout + result.stderr + machine.run(
            "tail", "-n", "30", "/var/log/techulus-agent-install.log", check=False).stdout
        assert machine.run("test", "-e", DATA, check=False).returncode == 1
        assert machine.run("podman", "network", "exists", machine.name, check=False).returncode == 1
        assert machine.run("test", "-e", "/etc/techulus-agent", check=False).returncode == 1
        assert workload.current() == workload.identity, "not a container: purge leaves other processes alone"
        machine.run("sh", "-c", f"kill {workload.pid}", check=False)
