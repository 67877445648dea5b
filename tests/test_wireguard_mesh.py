"""Real WireGuard mesh: network namespaces as servers, wireguard-go driven by WireGuardSync."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from agent import crypto
from agent.drift import wireguard_hash
from agent.host.wireguard import WireGuardError, WireGuardSync
from agent.identity import AgentConfig, Identity
from agent.model import ExpectedState, WireGuardPeer
from agent.settings import Settings
from tests.netns import Lan, in_ns, netns_available, sh

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not netns_available(), reason="needs root and iproute2"),
    pytest.mark.skipif(
        shutil.which("wg") is None or shutil.which("wireguard-go") is None,
        reason="needs wireguard-tools and wireguard-go (scripts/install-test-deps.sh)",
    ),
]


@dataclass
class Server:
    ns: str
    lan_ip: str
    subnet_id: int
    sync: WireGuardSync

    @property
    def wg_ip(self) -> str:
        return f"10.100.{self.subnet_id}.1"

    def as_peer(self) -> WireGuardPeer:
        return WireGuardPeer(
            self.sync.identity.wireguard_public_key,
            f"10.100.{self.subnet_id}.0/24,10.200.{self.subnet_id}.0/24",
            f"{self.lan_ip}:51820",
        )


def make_server(lan: Lan, index: int, tmp: Path) -> Server:
    ns, lan_ip = lan.add_server(index)
    subnet_id = index + 1
    key = crypto.new_wireguard_private_key()
    identity = Identity(crypto.new_signing_key(), key, AgentConfig(f"srv{index}", subnet_id, f"10.100.{subnet_id}.1"))
    settings = Settings()
    settings = replace(
        settings,
        data_dir=tmp / f"data{index}",
        wireguard_interface=f"wt{lan.tag}{index}",
        wireguard_config_dir=tmp / f"wg{index}",
    )
    settings = replace(settings, wireguard_netns=ns)
    return Server(ns, lan_ip, subnet_id, WireGuardSync(settings, identity))


def mesh_state(servers: list[Server], me: Server) -> ExpectedState:
    return ExpectedState(wireguard_peers=tuple(s.as_peer() for s in servers if s is not me))


def ping(src: Server, dst: Server, count: int = 3, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = in_ns(src.ns, "ping", "-c", "1", "-W", "1", dst.wg_ip, check=False)
        if result.returncode == 0:
            return in_ns(src.ns, "ping", "-c", str(count), "-i", "0.05", "-W", "1", dst.wg_ip, check=False).returncode == 0
    return False


@pytest.fixture
def lan() -> Iterator[Lan]:
    network = Lan()
    try:
        yield network
    finally:
        network.close()


def test_mesh_comes_up_survives_peer_changes_and_heals(lan: Lan, tmp_path: Path) -> None:
    servers = [make_server(lan, i, tmp_path) for i in range(3)]
    for server in servers:
        server.sync.prepare()  # no file yet: the interface comes up without peers
        server.sync.apply(mesh_state(servers, server))
        assert server.sync.actual_hash() == server.sync.expected_hash(mesh_state(servers, server))
        conf = server.sync.conf_path
        assert conf.stat().st_mode & 0o777 == 0o600
        assert "MTU = 1420" in conf.read_text()
    for src in servers:
        for dst in servers:
            if src is not dst:
                assert ping(src, dst), f"{src.ns} cannot ping {dst.wg_ip}"

    # A fourth server joins while a ping runs between the first two: not one packet lost.
    a, b = servers[0], servers[1]
    pinger = subprocess.Popen(
        # -W 3: a reply that a loaded CI machine delays (userspace WireGuard) is late, not
        # lost; a packet the change really drops never arrives however long we wait.
        ["ip", "netns", "exec", a.ns, "ping", "-c", "150", "-i", "0.01", "-W", "3", b.wg_ip],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    time.sleep(0.3)
    fourth = make_server(lan, 3, tmp_path)
    servers.append(fourth)
    before = [wireguard_hash(mesh_state(servers[:3], s).wireguard_peers) for s in servers[:3]]
    for server in servers[:3]:
        server.sync.apply(mesh_state(servers, server))
    fourth.sync.prepare()
    fourth.sync.apply(mesh_state(servers, fourth))
    assert pinger.poll() is None, "the ping ended before the change was applied; the check proves nothing"
    output, _ = pinger.communicate(timeout=30)
    match = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    assert match, output
    assert match.group(1) == match.group(2) == "150", output
    assert before != [s.sync.actual_hash() for s in servers[:3]]
    assert ping(fourth, a) and ping(b, fourth)

    # "Reboot": the interface disappears (wireguard-go exits with it). Drift is seen from
    # the live state although the file still matches, and prepare() brings it back.
    c = servers[2]
    in_ns(c.ns, "ip", "link", "del", c.sync.interface)
    with pytest.raises(WireGuardError, match="does not exist"):
        c.sync.actual_hash()
    c.sync.prepare()
    assert c.sync.actual_hash() == c.sync.expected_hash(mesh_state(servers, c))
    assert ping(a, c)

    # Link set down: seen as drift, healed by apply().
    in_ns(c.ns, "ip", "link", "set", c.sync.interface, "down")
    with pytest.raises(WireGuardError, match="is down"):
        c.sync.actual_hash()
    c.sync.apply(mesh_state(servers, c))
    assert ping(c, b)

    # A peer changed behind our back (wg set): the live hash differs although the file is right.
    in_ns(c.ns, "wg", "set", c.sync.interface, "peer", a.sync.identity.wireguard_public_key, "remove")
    assert c.sync.actual_hash() != c.sync.expected_hash(mesh_state(servers, c))
    c.sync.apply(mesh_state(servers, c))
    assert c.sync.actual_hash() == c.sync.expected_hash(mesh_state(servers, c))

    # Removing a peer removes its routes too.
    c.sync.apply_peers([s.as_peer() for s in servers if s not in (c, fourth)])
    routes = in_ns(c.ns, "ip", "-4", "route", "show", "dev", c.sync.interface).stdout
    assert f"10.100.{fourth.subnet_id}.0/24" not in routes
    assert f"10.100.{a.subnet_id}.0/24" in routes


def test_hostile_peers_leave_the_running_interface_alone(lan: Lan, tmp_path: Path) -> None:
    server = make_server(lan, 0, tmp_path)
    other = make_server(lan, 1, tmp_path)
    server.sync.apply_peers([other.as_peer()])
    good_hash = server.sync.actual_hash()
    conf_before = server.sync.conf_path.read_text()
    valid_key = other.sync.identity.wireguard_public_key
    hostile = [
        WireGuardPeer(valid_key + "\nPostUp = rm -rf /", "10.100.9.0/24"),
        WireGuardPeer(valid_key, "0.0.0.0/0"),
        WireGuardPeer(valid_key, "10.200.1.0/24"),  # this server's own container subnet
        WireGuardPeer(valid_key, "10.100.2.0/24\nEndpoint = 1.2.3.4:1"),
        WireGuardPeer(valid_key, "10.100.2.0/24", "1.2.3.4:51820\nPostUp = id"),
        WireGuardPeer(server.sync.identity.wireguard_public_key, "10.100.7.0/24"),
    ]
    for peer in hostile:
        with pytest.raises(WireGuardError, match="nothing was changed"):
            server.sync.apply_peers([peer])
    # Beside a good peer, a bad one is skipped and the good one stays: nothing else changes.
    overlapping = [other.as_peer(), WireGuardPeer(crypto.wireguard_public_key(crypto.new_wireguard_private_key()), "10.100.2.0/23")]
    server.sync.apply_peers(overlapping)
    assert server.sync.actual_hash() == good_hash
    assert server.sync.conf_path.read_text() == conf_before


def test_one_bad_peer_does_not_keep_a_new_server_out_of_the_mesh(lan: Lan, tmp_path: Path) -> None:
    servers = [make_server(lan, i, tmp_path) for i in range(3)]
    a, b, c = servers
    stranger = crypto.wireguard_public_key(crypto.new_wireguard_private_key())
    for server in servers:
        bad = [
            WireGuardPeer(stranger, "0.0.0.0/0"),
            WireGuardPeer(stranger, f"10.200.{server.subnet_id}.0/24"),  # this server's own container subnet
            WireGuardPeer(stranger, "10.100.9.0/24", "fe80::1%x\n[Interface]\nPreUp = cd; touch pwned:51820"),
        ]
        server.sync.prepare()
        state = ExpectedState(wireguard_peers=(*bad, *mesh_state(servers, server).wireguard_peers))
        server.sync.apply(state)
        assert server.sync.actual_hash() == server.sync.expected_hash(state)
        text = server.sync.conf_path.read_text()
        assert "PreUp" not in text
        assert "0.0.0.0/0" not in text
        assert stranger not in text
    # The new server (c) joined everyone's mesh although each list held bad peers.
    assert ping(a, c) and ping(c, b)


def snapshot(ns: str, interface: str) -> tuple[str, str, str]:
    """Everything an administrator's interface is made of: keys and peers, addresses, routes."""
    return (
        in_ns(ns, "wg", "show", interface, "dump").stdout,
        in_ns(ns, "ip", "-4", "address", "show", "dev", interface).stdout,
        in_ns(ns, "ip", "-4", "route", "show", "dev", interface).stdout,
    )


def test_a_foreign_interface_survives_untouched(lan: Lan, tmp_path: Path) -> None:
    server = make_server(lan, 0, tmp_path)
    ns, interface = server.ns, server.sync.interface
    # An administrator's own wg0: wireguard-go, their key, their address, peer and route.
    in_ns(ns, "wireguard-go", interface)
    key_file = tmp_path / "admin.key"
    key_file.write_text(crypto.new_wireguard_private_key() + "\n")
    key_file.chmod(0o600)
    admin_peer = crypto.wireguard_public_key(crypto.new_wireguard_private_key())
    in_ns(ns, "wg", "set", interface, "private-key", str(key_file), "listen-port", "41000",
          "peer", admin_peer, "allowed-ips", "192.168.250.0/24", "endpoint", "192.0.2.7:41000")
    in_ns(ns, "ip", "address", "add", "192.168.249.1/24", "dev", interface)
    in_ns(ns, "ip", "link", "set", interface, "up")
    in_ns(ns, "ip", "route", "add", "192.168.250.0/24", "dev", interface)
    before = snapshot(ns, interface)

    with pytest.raises(WireGuardError, match="already runs with another key"):
        server.sync.prepare()
    with pytest.raises(WireGuardError, match="already runs with another key"):
        server.sync.apply(ExpectedState())
    with pytest.raises(WireGuardError, match="already runs with another key"):
        server.sync.actual_hash()
    assert snapshot(ns, interface) == before
    assert not server.sync.conf_path.exists()


def test_the_written_file_is_accepted_by_wg_quick(lan: Lan, tmp_path: Path) -> None:
    # The header comment must not break `wg-quick up` (the reboot path) nor `wg-quick strip | wg syncconf`.
    server, other = make_server(lan, 0, tmp_path), make_server(lan, 1, tmp_path)
    server.sync.apply_peers([other.as_peer()])
    text = server.sync.conf_path.read_text()
    assert text.startswith("# Written by techulus-agent")
    stripped = sh("wg-quick", "strip", str(server.sync.conf_path)).stdout
    in_ns(server.ns, "wg", "syncconf", server.sync.interface, "/dev/stdin", input=stripped)
    assert server.sync.actual_hash() == server.sync.expected_hash(mesh_state([server, other], server))
    # After a "reboot", wg-quick alone brings the same interface back from the file.
    in_ns(server.ns, "ip", "link", "del", server.sync.interface)
    env = "WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go"
    in_ns(server.ns, "env", env, "wg-quick", "up", str(server.sync.conf_path))
    assert server.sync.actual_hash() == server.sync.expected_hash(mesh_state([server, other], server))
