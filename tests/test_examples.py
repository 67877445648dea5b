"""The shipped example state files are valid: a newcomer's first run must not fail on them."""

import ipaddress
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
