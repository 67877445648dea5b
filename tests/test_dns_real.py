"""Real dnsmasq serving our drop-in: records change without a restart; containers resolve them."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.host.dns import DnsError, DnsSync, container_dns_servers, lookup
from agent.identity import AgentConfig
from agent.model import DnsRecord, ExpectedState
from agent.settings import Settings
from tests.testbed import *  # noqa: F403
from tests.testbed import BB_IMAGE, TestNetwork, podman

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="needs dnsmasq (scripts/install-test-deps.sh)"),
]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_dnsmasq(conf: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["dnsmasq", "--keep-in-foreground", f"--conf-file={conf}", "--no-hosts", "--pid-file", "--user=root",
         "--log-facility=-"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_answer(host: str, port: int, name: str, timeout: float = 5) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = lookup(host, port, name, timeout=0.5)
            if answer or time.monotonic() > deadline:
                return answer
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.02)


@pytest.fixture
def fake_upstream(tmp_path: Path) -> Iterator[int]:
    """A second dnsmasq standing in for the internet's resolvers: knows public.example."""
    port = free_udp_port()
    conf = tmp_path / "upstream.conf"
    conf.write_text(f"port={port}\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\naddress=/public.example/192.0.2.10\n")
    proc = start_dnsmasq(conf)
    try:
        assert wait_answer("127.0.0.1", port, "public.example") == ["192.0.2.10"]
        yield port
    finally:
        stop(proc)


def make_sync(tmp_path: Path, subnet_id: int, port: int, listen: str, upstream_port: int) -> DnsSync:
    settings = replace(
        Settings(), dnsmasq_conf_dir=tmp_path / "dnsmasq.d", dns_hosts_dir=tmp_path / "dns-hosts", dns_port=port,
        data_dir=tmp_path / "data",
    )
    settings = replace(
        settings,
        dns_listen_host=listen,
        dnsmasq_restart_command=(),  # the test runs dnsmasq itself
        resolved_conf_dir=tmp_path / "resolved.conf.d",
        resolved_restart_command=(),
        dns_upstream_servers=(f"127.0.0.1#{upstream_port}",),
        dns_verify_timeout=1.0,
    )
    return DnsSync(settings, AgentConfig("s", subnet_id, f"10.100.{subnet_id}.1"))


def test_records_change_without_restart(tmp_path: Path, fake_upstream: int) -> None:
    port = free_udp_port()
    dns = make_sync(tmp_path, 7, port, "127.0.0.1", fake_upstream)
    dns.prepare()
    assert (tmp_path / "resolved.conf.d" / "techulus-internal.conf").read_text().endswith(
        f"[Resolve]\nDNS=127.0.0.1:{port}\nDomains=~internal\n"
    )
    proc = start_dnsmasq(dns.conf_path)
    try:
        assert wait_answer("127.0.0.1", port, "public.example") == ["192.0.2.10"]
        # Duplicate names (two services slugifying alike) merge, and the hash then agrees.
        state = ExpectedState(dns_records=(
            DnsRecord("api.internal", ("10.200.7.2",)),
            DnsRecord("web.internal", ("10.200.7.3", "10.200.1.4")),
            DnsRecord("api.internal", ("10.200.2.9",)),
        ))
        dns.apply(state)  # verifies within dns_verify_timeout = 1 s
        # Immediately after apply() returns, dnsmasq answers the new records.
        assert lookup("127.0.0.1", port, "api.internal") == ["10.200.2.9", "10.200.7.2"]
        assert lookup("127.0.0.1", port, "web.internal") == ["10.200.1.4", "10.200.7.3"]
        assert dns.actual_hash() == dns.expected_hash(state)

        changed = ExpectedState(dns_records=(DnsRecord("api.internal", ("10.200.7.5", "fd00::5")),))
        assert dns.actual_hash() != dns.expected_hash(changed)
        dns.apply(changed)
        assert lookup("127.0.0.1", port, "api.internal") == ["10.200.7.5", "fd00::5"]
        assert lookup("127.0.0.1", port, "web.internal") == []  # gone, and no wildcard answer
        assert lookup("127.0.0.1", port, "nothing.internal") == []
        assert dns.actual_hash() == dns.expected_hash(changed)

        dns.apply(ExpectedState())
        assert lookup("127.0.0.1", port, "api.internal") == []
        assert proc.poll() is None, "dnsmasq was restarted or died"

        # Hostile names are rejected; the served file stays as it was.
        dns.apply(changed)
        before = dns.hosts_path.read_text()
        for bad in ("evil.internal\naddress=/#/1.2.3.4", "a/b.internal", "google.com", "internal", "x..internal", "-x.internal"):
            with pytest.raises(DnsError, match="nothing was changed"):
                dns.apply(ExpectedState(dns_records=(DnsRecord(bad, ("10.200.7.9",)),)))
        with pytest.raises(DnsError, match="nothing was changed"):
            dns.apply(ExpectedState(dns_records=(DnsRecord("ok.internal", ("10.200.7.9 evil.internal",)),)))
        assert dns.hosts_path.read_text() == before
        assert lookup("127.0.0.1", port, "api.internal") == ["10.200.7.5", "fd00::5"]
    finally:
        stop(proc)


def test_one_bad_record_is_skipped_and_the_rest_is_served(tmp_path: Path, fake_upstream: int) -> None:
    port = free_udp_port()
    dns = make_sync(tmp_path, 7, port, "127.0.0.1", fake_upstream)
    dns.prepare()
    proc = start_dnsmasq(dns.conf_path)
    try:
        assert wait_answer("127.0.0.1", port, "public.example") == ["192.0.2.10"]
        state = ExpectedState(dns_records=(
            DnsRecord("www.google.com", ("6.6.6.6",)),  # outside .internal: skipped
            DnsRecord("api.internal", ("10.200.7.2",)),
            DnsRecord("web.internal", ("10.200.7.3",)),
        ))
        dns.apply(state)
        assert lookup("127.0.0.1", port, "api.internal") == ["10.200.7.2"]
        assert lookup("127.0.0.1", port, "web.internal") == ["10.200.7.3"]
        assert "google" not in dns.hosts_path.read_text()
        # The skipped record is not drift: the next poll does not rewrite anything.
        assert dns.actual_hash() == dns.expected_hash(state)
        assert proc.poll() is None
    finally:
        stop(proc)


def test_verification_fails_clearly_when_dnsmasq_is_not_running(tmp_path: Path, fake_upstream: int) -> None:
    dns = make_sync(tmp_path, 7, free_udp_port(), "127.0.0.1", fake_upstream)
    dns.prepare()
    with pytest.raises(DnsError, match=r"does not serve the new records for api.internal"):
        dns.apply(ExpectedState(dns_records=(DnsRecord("api.internal", ("10.200.7.2",)),)))


def test_missing_drop_in_is_drift(tmp_path: Path) -> None:
    dns = make_sync(tmp_path, 7, free_udp_port(), "127.0.0.1", 5353)
    with pytest.raises(DnsError, match="is missing"):
        dns.actual_hash()
    dns.prepare()
    assert dns.actual_hash() == dns.expected_hash(ExpectedState())


def test_container_resolves_internal_and_public_names(tmp_path: Path, podman_net: TestNetwork, fake_upstream: int) -> None:
    # Port 53 (a container's resolv.conf cannot name a port) on the test bridge's gateway
    # and on a private loopback address, so parallel runs never share a socket.
    listen = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    dns = make_sync(tmp_path, podman_net.subnet_id, 53, listen, fake_upstream)
    dns.prepare()
    assert f"listen-address={listen},{podman_net.gateway}" in dns.conf_path.read_text()
    proc = start_dnsmasq(dns.conf_path)
    try:
        assert wait_answer(listen, 53, "public.example") == ["192.0.2.10"]
        dns.apply(ExpectedState(dns_records=(DnsRecord("my-api.internal", (podman_net.ip(2),)),)))
        servers = container_dns_servers(dns.settings, dns.config)
        assert servers == (podman_net.gateway,)
        argv = ["run", "--rm", "--network", podman_net.name, "--label", podman_net.scope_label]
        for server in servers:
            argv += ["--dns", server]
        # The bridge appears with the container; dnsmasq (bind-dynamic) binds it a moment later.
        script = (
            "for i in $(seq 50); do nslookup my-api.internal >/tmp/a 2>&1 && break; sleep 0.1; done; cat /tmp/a; "
            "nslookup public.example"
        )
        result = podman(*argv, BB_IMAGE, "sh", "-c", script, check=False, timeout=60)
        assert podman_net.ip(2) in result.stdout, result.stdout + result.stderr
        assert "192.0.2.10" in result.stdout, result.stdout + result.stderr
    finally:
        stop(proc)


def test_container_dns_servers_choices(tmp_path: Path) -> None:
    dns = make_sync(tmp_path, 9, 53, "127.0.0.1", 5353)
    assert container_dns_servers(dns.settings, dns.config) == ("10.200.9.1",)
    assert container_dns_servers(replace(dns.settings, manage_dns=False), dns.config) == ()
    assert container_dns_servers(replace(dns.settings, dns_port=5353), dns.config) == ()
    assert container_dns_servers(replace(dns.settings, container_dns="10.0.0.2"), dns.config) == ("10.0.0.2",)
