"""install.sh end to end on a real booted Debian bookworm (systemd-nspawn).

What is real: systemd, apt and the Debian packages (from the machine's mirror), install.sh,
the units, the agent zipapp from build.sh, its registration with a signed-request fake
control plane (tests/fakecp.py) on the host's loopback, `techulus-agent doctor`.
What is fake: the BuildKit and Railpack release tarballs (scripts that print a version),
served with their checksums from a loopback HTTP server, like every other download.

Limitations, because the container shares the host's network namespace (that is how it
reaches the loopback fixtures and the mirror): Caddy is skipped (its :80/:443 would bind on
the host; the real Cloudflare build needs Go modules from the internet), the agent does not
manage WireGuard or DNS, dnsmasq is told to serve no port, and the BuildKit daemon cannot
pull its image. "Containers survive an agent restart" is checked with a long-running process
placed in the agent unit's cgroup, where conmon would be (podman inside nspawn cannot run
containers on this VM's hybrid cgroups).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests import nspawn
from tests.fakecp import FakeControlPlane
from tests.test_installer import INSTALLER, Fixtures, STAND_IN_CADDYFILE

pytestmark = [pytest.mark.real, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


PODMAN_STORAGE_CONF = """[storage]
driver = "vfs"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
"""

LEGACY_BUILDKIT_UNIT = """[Unit]
Description=BuildKit daemon (podman container buildkit) for Techulus Cloud
[Service]
ExecStart=/usr/bin/podman run --rm --name buildkit --privileged --network host docker.io/moby/buildkit:v0.15.2
[Install]
WantedBy=multi-user.target
"""


# Holds apt's lists lock for 6 s and dpkg's frontend lock for 25 s (fcntl locks, as apt takes them).
HOLD_APT_LOCKS = """import fcntl, os, time
fds = []
for path in ("/var/lib/apt/lists/lock", "/var/lib/dpkg/lock-frontend"):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    fds.append(fd)
open("/run/e2e-apt-locks-held", "w").close()
time.sleep(6)
os.close(fds[0])
time.sleep(19)
"""


def fake_tool(name: str, version: str) -> bytes:
    return f"#!/bin/sh\n# fake {name} for the installer test\necho '{name} {version} (fake)'\n".encode()


def tarball(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def build_agent(out: Path, epoch: str) -> Path:
    subprocess.run([str(REPO / "build.sh")], cwd=REPO, check=True, capture_output=True, timeout=600,
                   env=dict(os.environ, OUT=str(out), BUILD=str(out / "build"), ARCHES="amd64", SOURCE_DATE_EPOCH=epoch))
    return out / "agent-linux-amd64"


@contextmanager
def worker(share: Path) -> Iterator[nspawn.Machine]:
    """A booted bookworm with install.sh and installer/ (plus whatever else `share` holds,
    copied here first) at /opt/e2e, ready for an install in the host's network namespace."""
    missing = nspawn.missing_tools()
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (scripts/install-test-deps.sh installs them)")
    nspawn.ensure_base_root()
    shutil.copy(REPO / "install.sh", share / "install.sh")
    shutil.copytree(INSTALLER, share / "installer", dirs_exist_ok=True)
    if not (share / "installer" / "Caddyfile").exists():
        (share / "installer" / "Caddyfile").write_text(STAND_IN_CADDYFILE)
    box = nspawn.Machine(binds={share: "/opt/e2e"})
    try:
        # dnsmasq is installed for real; in the host's network namespace it must not take port 53.
        box.write("/etc/dnsmasq.d/00-e2e-test.conf", "port=0\n")
        # The container's root is an overlayfs (--volatile=overlay), on which podman's overlay
        # storage driver cannot run: even `podman ps` would fail, and the agent would never
        # report status. vfs works anywhere (nothing here stores images).
        box.write("/etc/containers/storage.conf", PODMAN_STORAGE_CONF)
        yield box
    finally:
        box.stop()


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[nspawn.Machine]:
    with worker(tmp_path_factory.mktemp("share")) as box:
        yield box


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fixtures, dict[str, str]]]:
    root = tmp_path_factory.mktemp("www")
    served = Fixtures(root)
    env: dict[str, str] = {}
    artefacts = {
        "BUILDKIT": ("buildkit.tar.gz", tarball({"bin/buildctl": fake_tool("buildctl", "v0.15.2"),
                                                 "bin/buildkitd": fake_tool("buildkitd", "v0.15.2")})),
        "RAILPACK": ("railpack.tar.gz", tarball({"railpack": fake_tool("railpack", "0.15.4")})),
    }
    for key, (name, data) in artefacts.items():
        (root / name).write_bytes(data)
        env[f"TECHULUS_{key}_URL"] = f"{served.url}/{name}"
        env[f"TECHULUS_{key}_SHA256"] = hashlib.sha256(data).hexdigest()
    yield served, env
    served.close()


def publish_agent(fixtures: Fixtures, zipapp: Path) -> None:
    target = fixtures.root / "agent"
    target.mkdir(exist_ok=True)
    shutil.copy(zipapp, target / "agent-linux-amd64")
    digest = hashlib.sha256(zipapp.read_bytes()).hexdigest()
    (target / "SHA256SUMS").write_text(f"{digest}  agent-linux-amd64\n")


def test_install_register_rerun_restart_upgrade(machine: nspawn.Machine, downloads: tuple[Fixtures, dict[str, str]],
                                                tmp_path: Path) -> None:
    fixtures, env = downloads
    first = build_agent(tmp_path / "v1", "1700000000")
    publish_agent(fixtures, first)
    with FakeControlPlane() as cp:
        token = cp.add_token()
        args = [
            "bash", "/opt/e2e/install.sh", "--url", cp.url, "--skip-caddy", "--registry", "127.0.0.1:5000",
            "--agent-binary", f"{fixtures.url}/agent/agent-linux-amd64",
            "--agent-env", "TECHULUS_AGENT_MANAGE_WIREGUARD=false",
            "--agent-env", "TECHULUS_AGENT_MANAGE_DNS=false",
            "--agent-env", "TECHULUS_AGENT_MANAGE_CADDY=false",
            "--agent-env", "TECHULUS_AGENT_PUBLIC_IP=203.0.113.7",
            "--agent-env", f"TECHULUS_AGENT_NETWORK_NAME={machine.name}",
        ]
        install_env = dict(env, TECHULUS_AGENT_TOKEN=token)
        # A unit from an earlier install.sh, whose container was plain "buildkit".
        machine.write("/etc/systemd/system/buildkit.service", LEGACY_BUILDKIT_UNIT)

        # Like unattended-upgrades on a fresh VM: another apt run holds the locks for a while.
        machine.write("/run/e2e-hold-apt-locks.py", HOLD_APT_LOCKS)
        machine.run("sh", "-c", "setsid python3 /run/e2e-hold-apt-locks.py >/dev/null 2>&1 &")
        machine.run("sh", "-c", "for i in $(seq 100); do [ -e /run/e2e-apt-locks-held ] && exit 0; sleep 0.1; done; exit 1")

        started = time.monotonic()
        result = machine.run(*args, env=install_env, check=False, timeout=600)
        first_run = time.monotonic() - started
        print(f"\nfirst install.sh run: {first_run:.1f}s (its apt steps waited for locks held up to 25 s)\n{result.stdout}")
        assert result.returncode == 0, result.stdout + result.stderr + machine.run("journalctl", "-u", "techulus-agent", "--no-pager", "-n", "40", check=False).stdout
        assert "[1/" in result.stdout and "Done:" in result.stdout
        assert machine.run("systemctl", "is-active", "techulus-agent").stdout.strip() == "active"
        assert machine.run("test", "-f", "/var/lib/techulus-agent/keys/private.key", check=False).returncode == 0
        registered = [s for s in cp.servers if s.signing_public_key]
        assert len(registered) == 1, "the agent registered"
        deadline = time.monotonic() + 30
        while not cp.status_reports and time.monotonic() < deadline:
            time.sleep(0.5)
        assert cp.status_reports, "the agent reports no status:\n" + machine.run(
            "journalctl", "-u", "techulus-agent", "--no-pager", "-n", "60", check=False).stdout
        assert machine.run("stat", "-c", "%a", "/etc/techulus-agent/agent.env").stdout.strip() == "600"
        # Registered: the spent one-time token is gone from agent.env, the rest stays.
        agent_env = machine.run("cat", "/etc/techulus-agent/agent.env").stdout
        assert token not in agent_env and "\nTECHULUS_AGENT_TOKEN=" not in agent_env
        assert f"TECHULUS_AGENT_URL='{cp.url}'" in agent_env and "TECHULUS_AGENT_PUBLIC_IP='203.0.113.7'" in agent_env
        unit_argv = machine.run("systemctl", "show", "-p", "ExecStart", "techulus-agent").stdout
        assert token not in unit_argv
        assert machine.run("systemctl", "is-enabled", "dnsmasq").stdout.strip() == "enabled"
        assert machine.run("systemctl", "is-enabled", "buildkit").stdout.strip() == "enabled"
        log = machine.run("cat", "/var/log/techulus-agent-install.log").stdout
        assert "waiting for the apt lists lock" in log, "apt-get update should have waited for the held lists lock"
        assert "-o DPkg::Lock::Timeout=600 install" in log
        assert "+ podman rm --force --ignore buildkit" in log and "changed: removed the podman container buildkit" in log
        assert "--name techulus-buildkit " in machine.run("cat", "/etc/systemd/system/buildkit.service").stdout
        # Containers (--restart=always) come back at boot even before the agent can reach the CP.
        assert machine.run("systemctl", "is-enabled", "podman-restart").stdout.strip() == "enabled"
        machine.run("systemd-analyze", "verify", "/etc/systemd/system/techulus-agent.service",
                    "/etc/systemd/system/buildkit.service")

        # Second run: nothing to do, nothing restarted.
        main_pid = machine.run("systemctl", "show", "-p", "MainPID", "--value", "techulus-agent").stdout.strip()
        started = time.monotonic()
        again = machine.run(*args, env=install_env, check=False, timeout=600)
        second_run = time.monotonic() - started
        print(f"second install.sh run: {second_run:.1f}s\n{again.stdout}")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "Nothing changed: this server was already set up." in again.stdout
        assert "already registered: the registration token was not used" in again.stdout
        assert machine.run("cat", "/etc/techulus-agent/agent.env").stdout == agent_env
        assert machine.run("systemctl", "show", "-p", "MainPID", "--value", "techulus-agent").stdout.strip() == main_pid

        # A "container": a long-running process in the agent unit's cgroup, where conmon lives.
        workload = machine.run("sh", "-c", "setsid sleep 100000 >/dev/null 2>&1 & echo $!").stdout.strip()
        cgroup = machine.run("systemctl", "show", "-p", "ControlGroup", "--value", "techulus-agent").stdout.strip()
        moved = machine.run("sh", "-c", f'for d in /sys/fs/cgroup/unified{cgroup} /sys/fs/cgroup/systemd{cgroup} /sys/fs/cgroup{cgroup}; do '
                                        f'[ -w "$d/cgroup.procs" ] && echo {workload} >"$d/cgroup.procs" && echo "$d"; done; true')
        assert moved.stdout.strip(), f"could not move the workload into {cgroup}"
        machine.run("systemctl", "restart", "techulus-agent", timeout=200)
        assert machine.run("sh", "-c", f"kill -0 {workload}", check=False).returncode == 0, "agent restart killed the workload"
        assert machine.run("systemctl", "show", "-p", "MainPID", "--value", "techulus-agent").stdout.strip() != main_pid

        # Upgrade: a new build replaces the binary, restarts the agent, prunes the old extraction.
        old_dirs = machine.run("ls", "/var/lib/techulus-agent/shiv").stdout.split()
        second = build_agent(tmp_path / "v2", "1700000600")
        publish_agent(fixtures, second)
        # An upgrade needs no token (the server is registered).
        upgrade = machine.run(*args, env=env, check=False, timeout=600)
        assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
        assert "Nothing changed" not in upgrade.stdout
        # The previous build's extraction stays (its rollback target), nothing older would.
        new_dirs = machine.run("ls", "/var/lib/techulus-agent/shiv").stdout.split()
        assert len(new_dirs) == 2 and set(old_dirs) < set(new_dirs), (old_dirs, new_dirs)
        installed = machine.run("sha256sum", "/usr/local/lib/techulus-agent/agent.pyz").stdout.split()[0]
        assert installed == hashlib.sha256(second.read_bytes()).hexdigest()
        previous = machine.run("sha256sum", "/usr/local/lib/techulus-agent/agent.pyz.previous").stdout.split()[0]
        assert previous == hashlib.sha256(first.read_bytes()).hexdigest()
        # Through the installed agent's transactional upgrade, which saw the new one healthy.
        assert '"outcome": "committed"' in machine.run("cat", "/var/lib/techulus-agent/upgrade-state.json").stdout
        assert machine.run("sh", "-c", f"kill -0 {workload}", check=False).returncode == 0, "the upgrade killed the workload"
        assert machine.run("systemctl", "is-active", "techulus-agent").stdout.strip() == "active"

        # doctor by hand: reads agent.env through the wrapper, reports what is there and not.
        doctor = machine.run("techulus-agent", "doctor", check=False, timeout=60)
        print(doctor.stdout)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        lines = doctor.stdout
        assert "OK    registration: registered as server" in lines
        assert "OK    signed request" in lines
        assert "OK    buildctl" in lines and "OK    railpack" in lines
        assert "WARN  buildkit: tcp://127.0.0.1:1234" in lines or "OK    buildkit" in lines
        assert "OK    secret files: 4 private" in lines  # keys, config.json, agent.env (no wg, no caddy)
        assert machine.run("cat", "/etc/techulus-agent/agent.env").stdout == agent_env
        machine.run("sh", "-c", f"kill {workload}", check=False)
