"""The shipped example state files are valid, and the helpers of the scripts that run them
(scripts/lib.sh) wait for apt locks, add python3-venv and become root as the README says."""

import ipaddress
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from agent.loop import load_state_file
from agent.model import parse_expected_state

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses_without_problems(path):
    data = load_state_file(path)
    subnet = ipaddress.IPv4Network(f"10.200.{data.get('subnetId', 1)}.0/24")
    state = parse_expected_state(data, subnet)
    assert state.containers and not state.problems


def test_there_is_an_example():
    assert EXAMPLES


# --- the scripts' shared helpers (scripts/lib.sh), with fake apt-get/id/sudo/python3 on PATH ---

REPO = Path(__file__).resolve().parents[1]
LOCKED = "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 4242 (apt-get)"


def fake_bin(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def lib(snippet: str, bin_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs `snippet` in bash with scripts/lib.sh sourced and the fakes first on PATH."""
    environment = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PROG": "t", "APT_LOCK_POLL": "0.05", **env}
    return subprocess.run(["bash", "-c", f'set -euo pipefail; . "{REPO}/scripts/lib.sh"; {snippet}'],
                          capture_output=True, text=True, env=environment, timeout=60, check=False)


def fake_apt(bin_dir: Path, lock_failures: int, other_failure: str = "") -> Path:
    """apt-get that records its argv, fails with the lock message `lock_failures` times, then works."""
    calls = bin_dir / "calls"
    fake_bin(bin_dir, "apt-get", f"""echo "$*" >>{calls}
n=$(wc -l <{calls})
if [ -n "{other_failure}" ]; then echo "{other_failure}" >&2; exit 100; fi
if [ "$n" -le {lock_failures} ]; then echo "{LOCKED}" >&2; exit 100; fi
""")
    return calls


@pytest.mark.real
def test_apt_update_waits_while_another_apt_holds_the_lock(tmp_path: Path) -> None:
    calls = fake_apt(tmp_path, lock_failures=2)
    result = lib("apt_update", tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(calls.read_text().splitlines()) == 3
    assert result.stdout.count("waiting for the apt lock") == 1


@pytest.mark.real
def test_apt_update_stops_at_once_on_another_error_and_after_the_timeout(tmp_path: Path) -> None:
    calls = fake_apt(tmp_path, lock_failures=0, other_failure="E: Failed to fetch http://deb.debian.org")
    result = lib("apt_update", tmp_path)
    assert result.returncode == 1 and "Failed to fetch" in result.stderr
    assert len(calls.read_text().splitlines()) == 1
    calls.unlink()
    fake_apt(tmp_path, lock_failures=99)
    result = lib("apt_update", tmp_path, APT_LOCK_TIMEOUT="0")
    assert result.returncode == 1 and "Could not get lock" in result.stderr


@pytest.mark.real
def test_apt_install_waits_for_the_dpkg_lock(tmp_path: Path) -> None:
    calls = fake_apt(tmp_path, lock_failures=0)
    assert lib("apt_install podman", tmp_path).returncode == 0
    assert calls.read_text().split() == ["-o", "DPkg::Lock::Timeout=600", "install", "-y", "-qq", "podman"]


@pytest.mark.real
def test_python3_venv_is_added_only_when_ensurepip_is_missing(tmp_path: Path) -> None:
    works = lib("venv_package", tmp_path)
    assert works.returncode == 0 and works.stdout == ""
    fake_bin(tmp_path, "python3", "exit 1\n")  # a minimal Debian: no ensurepip
    assert lib("venv_package", tmp_path).stdout == "python3-venv\n"


@pytest.mark.real
def test_not_root_reruns_with_sudo_keeping_the_settings_or_says_how_without_sudo(tmp_path: Path) -> None:
    fake_bin(tmp_path, "id", 'echo 1000\n')
    fake_bin(tmp_path, "sudo", f'echo "$*" >{tmp_path}/sudo-argv\n')
    result = lib('set -- --down; as_root "$@"', tmp_path, VENV="/opt/v", TECHULUS_AGENT_NETWORK_NAME="n")
    assert result.returncode == 0 and "running it again with sudo" in result.stdout
    argv = (tmp_path / "sudo-argv").read_text().split()
    assert argv[:2] == ["--", "env"] and "VENV=/opt/v" in argv and "TECHULUS_AGENT_NETWORK_NAME=n" in argv
    assert argv[-1] == "--down"
    (tmp_path / "sudo").unlink()
    no_sudo = tmp_path / "nosudo"
    no_sudo.mkdir()
    fake_bin(no_sudo, "id", "echo 1000\n")
    for tool in ("bash", "grep", "dirname"):  # a PATH with the basics but no sudo
        (no_sudo / tool).symlink_to(shutil.which(tool) or f"/bin/{tool}")
    result = lib("as_root", no_sudo, PATH=str(no_sudo))
    assert result.returncode == 1 and "there is no sudo: run it as root" in result.stderr


def test_the_example_uses_the_image_run_example_builds() -> None:
    image = load_state_file(REPO / "examples/hello.toml")["containers"][0]["image"]
    assert f"image={image}" in (REPO / "scripts/run-example.sh").read_text()


@pytest.mark.real
def test_packages_the_release_lacks_are_left_out(tmp_path: Path) -> None:
    """Ubuntu 22.04 has no netavark: asking apt for it would fail the whole install."""
    fake_bin(tmp_path, "apt-cache", """case "$2" in
  netavark) printf 'netavark:\\n  Installed: (none)\\n  Candidate: (none)\\n' ;;
  *) printf '%s:\\n  Installed: (none)\\n  Candidate: 1.0\\n' "$2" ;;
esac
""")
    result = lib("available_packages podman netavark busybox-static", tmp_path)
    assert result.returncode == 0 and result.stdout.split() == ["podman", "busybox-static"]
