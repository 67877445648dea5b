"""The standalone state file: its dns and caddy sections, a refused wireguard section, and a
file that breaks and is fixed again (each said once)."""

from __future__ import annotations

import ipaddress
import logging
import threading
from pathlib import Path

import pytest

from agent.loop import FileSource, Reconciler, StateFileUnusable
from agent.model import CaddyRoute, DnsRecord
from agent.settings import Settings
from tests.fakes import FakePodman, RecordingReporter

SUBNET = ipaddress.IPv4Network("10.200.4.0/24")

GOOD = """
subnetId = 4

[[containers]]
deploymentId = "web-1"
serviceId = "web"
serviceName = "Web"
name = "web-web-1"
image = "localhost/app:v1"
ipAddress = "10.200.4.2"

[[dns.records]]
name = "web.internal"
ips = ["10.200.4.2"]

[[caddy.routes]]
id = "web"
domain = "web.example.test"
upstreams = ["10.200.4.2:80"]
serviceId = "web"
"""

WIREGUARD = """
[[wireguard.peers]]
publicKey = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
allowedIps = "10.100.9.0/24"
endpoint = "192.0.2.9:51820"
"""


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_dns_and_caddy_sections_are_read_and_wireguard_is_refused_with_one_line(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "state.toml"
    path.write_text(GOOD + WIREGUARD)
    source = FileSource(path, SUBNET)
    for _ in range(3):
        state = source.fetch()
    assert state.dns_records == (DnsRecord("web.internal", ("10.200.4.2",)),)
    assert state.caddy_routes == (CaddyRoute("web", "web.example.test", ("10.200.4.2:80",), "web"),)
    assert [c.deployment_id for c in state.containers] == ["web-1"]
    # Refused: nothing of it is used, and the section is not "present" for the loop.
    assert state.wireguard_peers == () and "wireguard" not in state.sections
    assert {"containers", "dns", "caddy"} <= state.sections
    refused = lines(caplog, "wireguard section is refused")
    assert len(refused) == 1, refused
    assert "the rest of the file applies" in refused[0] and str(path) in refused[0]
    assert not state.problems


def test_typos_in_the_dns_and_caddy_sections_are_named(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "state.toml"
    path.write_text('[dns]\nrecord = []\n[[caddy.routes]]\nid = "a"\ndomain = "a.example.test"\nupstream = ["10.200.4.2:80"]\n')
    FileSource(path, SUBNET).fetch()
    assert "unknown key 'record' in dns (did you mean records?)" in caplog.text
    assert "unknown key 'upstream' in caddy.routes[0] (did you mean upstreams?)" in caplog.text


def test_a_broken_file_is_reported_once_and_its_repair_once(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO)
    path = tmp_path / "state.toml"
    path.write_text(GOOD)
    source = FileSource(path, SUBNET)
    podman = FakePodman()
    reconciler = Reconciler(
        Settings.load({"data_dir": str(tmp_path / "data")}, environ={}), podman, source, [], "", RecordingReporter(),
        threading.Lock(),
    )
    reconciler.tick()
    running = dict(podman.containers)
    assert [c.name for c in running.values()] == ["web-web-1"]
    path.write_text(GOOD + "\n[[containers]\n")  # a bracket lost while editing
    for _ in range(5):
        reconciler.tick()
    with pytest.raises(StateFileUnusable):
        source.fetch()
    broken = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(broken) == 1, [r.getMessage() for r in broken]
    assert broken[0].getMessage().startswith(f"state file {path}: not valid TOML: ")
    assert broken[0].getMessage().endswith("; nothing changes until it is fixed")
    assert podman.containers == running, "a broken file changes nothing"

    path.write_text(GOOD)
    reconciler.tick()
    reconciler.tick()
    assert lines(caplog, "is valid again") == [f"state file {path} is valid again"]

    # The same for a file that parses but holds an invalid entry.
    path.write_text(GOOD.replace('ipAddress = "10.200.4.2"', 'ipAddress = "10.200.9.2"'))
    reconciler.tick()
    path.write_text(GOOD)
    reconciler.tick()
    reconciler.tick()
    assert len(lines(caplog, "is valid again")) == 2


def test_the_domain_example_has_both_sections_and_reads_without_a_warning(caplog) -> None:  # type: ignore[no-untyped-def]
    path = Path(__file__).resolve().parents[1] / "examples" / "domain.toml"
    state = FileSource(path, ipaddress.IPv4Network("10.200.1.0/24")).fetch()
    assert [r.name for r in state.dns_records] == ["hello.internal"]
    assert [(r.domain, r.upstreams) for r in state.caddy_routes] == [("hello.example.com", ("10.200.1.2:80",))]
    assert not state.problems and not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_missing_file_is_named_once(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "state.toml"
    source = FileSource(path, SUBNET)
    for _ in range(3):
        with pytest.raises(StateFileUnusable, match="cannot read state file"):
            source.fetch()
    assert [r.getMessage() for r in caplog.records] == [
        f"state file {path}: cannot be read: No such file or directory; nothing changes until it is fixed"
    ]
