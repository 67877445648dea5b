"""build.sh makes zipapps that start on every Python the target servers ship (3.10-3.12).

The host zipapp is built once per session (about 15 s) into a temp dir and run with every
CPython found on this machine: `--version` shows the stamped version and commit, and a
script run inside the zipapp signs and verifies with Ed25519 and loads that Python's own
`_cffi_backend`. The arm64 file cannot run here; its contents are checked instead.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from agent import __version__

pytestmark = [pytest.mark.real, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
TARGET_VERSIONS = ("3.10", "3.11", "3.12")
ED25519_SCRIPT = """
import sys
import _cffi_backend
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
key = Ed25519PrivateKey.generate()
key.public_key().verify(key.sign(b"techulus"), b"techulus")
import agent.crypto, agent.doctor
print("ed25519-ok", "%d.%d" % sys.version_info[:2], _cffi_backend.__file__)
"""


def interpreters() -> dict[str, str]:
    """Every CPython 3.10-3.12 on this machine: PATH, /usr/bin and pyenv's versions."""
    found: dict[str, str] = {}
    candidates = [shutil.which(f"python{v}") for v in TARGET_VERSIONS] + ["/usr/bin/python3"]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[0-2].*/bin/python3.1[0-2]")))
    for path in filter(None, candidates):
        try:
            out = subprocess.run([path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=20, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if out in TARGET_VERSIONS:
            found.setdefault(out, path)
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bin")
    result = subprocess.run(
        [str(REPO / "build.sh")], cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
        env=dict(os.environ, OUT=str(out), BUILD=str(tmp_path_factory.mktemp("build"))),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def assert_stamped(text: str) -> None:
    """The version, and a commit of this repository (others may commit while we build)."""
    match = re.search(r"\b([0-9a-f]{12})(-dirty)?\b", text)
    assert __version__ in text and match, text
    subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", match.group(1) + "^{commit}"], check=True)


def test_build_outputs(built: Path) -> None:
    for name in ("agent", "agent-linux-amd64", "agent-linux-arm64", "install.sh", "SHA256SUMS"):
        assert (built / name).is_file(), name
    for name in ("agent", "agent-linux-amd64", "agent-linux-arm64"):
        assert (built / name).read_bytes().startswith(b"#!/usr/bin/python3\n"), name
        assert os.access(built / name, os.X_OK)
    sums = (built / "SHA256SUMS").read_text()
    assert re.search(r"^[0-9a-f]{64}  agent-linux-amd64$", sums, re.M)
    assert "embedded_template() {" in (built / "install.sh").read_text()


@pytest.mark.parametrize("arch,machine", [("amd64", "x86_64"), ("arm64", "aarch64")])
def test_every_python_has_its_cffi_backend(built: Path, arch: str, machine: str) -> None:
    with zipfile.ZipFile(built / f"agent-linux-{arch}") as archive:
        names = archive.namelist()
        env = json.loads(archive.read("environment.json"))
        stamp = archive.read("site-packages/agent/_build_info.py").decode()
    for version in TARGET_VERSIONS:
        tag = version.replace(".", "")
        assert f"site-packages/_cffi_backend.cpython-{tag}-{machine}-linux-gnu.so" in names, (arch, version)
    rust = [n for n in names if n.startswith("site-packages/cryptography/") and n.endswith(".so")]
    assert rust == ["site-packages/cryptography/hazmat/bindings/_rust.abi3.so"]
    assert any(n.startswith("site-packages/tomli/") for n in names), "tomli is needed on 3.10"
    assert env["entry_point"] == "agent.cli:main"
    assert f'VERSION = "{__version__}"' in stamp
    assert_stamped(stamp)


def test_host_zipapp_runs_on_every_python(built: Path, tmp_path: Path) -> None:
    found = interpreters()
    missing = [v for v in TARGET_VERSIONS if v not in found]
    if len(found) < 1:
        pytest.skip("no CPython 3.10-3.12 on this machine")
    script = tmp_path / "ed25519_check.py"
    script.write_text(ED25519_SCRIPT)
    for version, python in sorted(found.items()):
        env = dict(os.environ, SHIV_ROOT=str(tmp_path / "shiv"))
        result = subprocess.run([python, str(built / "agent"), "--version"], capture_output=True, text=True, env=env,
                                timeout=60, check=False)
        assert result.returncode == 0, (version, result.stderr)
        assert_stamped(result.stdout)
        check = subprocess.run([python, str(built / "agent"), str(script)], capture_output=True, text=True,
                               env=dict(env, SHIV_INTERPRETER="1"), timeout=60, check=False)
        assert check.returncode == 0, (version, check.stderr)
        assert f"ed25519-ok {version}" in check.stdout
        assert f"cpython-{version.replace('.', '')}" in check.stdout
    if missing:
        pytest.skip(f"ran on {sorted(found)}; Python {', '.join(missing)} not installed here")


def test_clean_checkout_builds_reproducibly(tmp_path: Path) -> None:
    """A fresh clone builds with one command, and twice gives the same bytes."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--shared", str(REPO), str(clone)], check=True, timeout=60)
    outputs = []
    for attempt in ("one", "two"):
        out = tmp_path / attempt
        result = subprocess.run(
            [str(clone / "build.sh")], cwd=clone, capture_output=True, text=True, timeout=600, check=False,
            env=dict(os.environ, OUT=str(out), BUILD=str(tmp_path / f"build-{attempt}"), ARCHES="amd64",
                     TOOLS_VENV=str(REPO / ".venv")),
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        outputs.append((out / "agent-linux-amd64").read_bytes())
    assert outputs[0] == outputs[1]
    assert b"-dirty" not in outputs[0]
