"""The code stays Python 3.10 compatible and lint-clean (TESTBED.md: target servers run
3.10-3.12; the machine here has 3.11, so a 3.11-only construct would pass every other test)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.real


def tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return found


def test_ruff_with_python_310_target():
    result = subprocess.run([tool("ruff"), "check", "agent", "tests", "bench"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_as_python_310():
    result = subprocess.run(
        [tool("mypy"), "--python-version", "3.10", "agent"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
