"""What a running, idle agent imports: the modules its threads use, and none of what only a
build, a logs endpoint, a TOML file or another command needs (issue 11 goal 4: memory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What run_agent's threads import for a registered agent without a logs endpoint or metrics.
IDLE = "agent.cli, agent.runtime, agent.builds, agent.upgrade, agent.workqueue, agent.healthcheck"
NOT_IDLE = (
    "cryptography",
    "tomllib",
    "tomli",
    "agent.logship.shipper",
    "agent.logship.containers",
    "agent.logship.caddy",
    "agent.doctor",
    "agent.metrics",
    "agent.teardown",
    "agent.uninstall",
    "hypothesis",
)


@pytest.mark.real
def test_the_idle_agent_does_not_import_what_it_does_not_use():
    script = (
        f"import sys, {IDLE}\n"
        "from agent import crypto\n"
        "crypto.sign(crypto.new_signing_key(), b'1:{}')\n"
        f"print(' '.join(m for m in {NOT_IDLE!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.real
def test_the_lazy_names_still_resolve():
    script = (
        "import agent.logship as logship, agent.settings as settings\n"
        "assert all(getattr(logship, name) is not None for name in logship.__all__)\n"
        "print(settings.toml_parser().loads('a = 1')['a'])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
