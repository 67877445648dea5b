"""WireGuard unit tests: rendering, parsing, validation and the commands run (subprocess faked)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from agent import crypto
from agent.drift import wireguard_hash
from agent.host.wireguard import (
    LiveInterface,
    LivePeer,
    WireGuardError,
    WireGuardSync,
    combine_live_and_file,
    has_owner_header,
    parse_conf_peers,
    parse_conf_private_key,
    parse_dump,
    parse_forward_rules,
    render_quick_conf,
    check_rendered,
    render_wg_conf,
    validate_peers,
)
from agent.identity import AgentConfig, Identity
from agent.model import ExpectedState, WireGuardPeer
from agent.settings import Settings

PRIV = crypto.new_wireguard_private_key()
PUB = crypto.wireguard_public_key(PRIV)
K2 = crypto.wireguard_public_key(crypto.new_wireguard_private_key())
K3 = crypto.wireguard_public_key(crypto.new_wireguard_private_key())
P2 = WireGuardPeer(K2, "10.100.2.0/24,10.200.2.0/24", "198.51.100.4:51820")
P3 = WireGuardPeer(K3, "10.100.3.0/24,10.200.3.0/24", "")


def identity() -> Identity:
    return Identity(crypto.new_signing_key(), PRIV, AgentConfig("s1", 1, "10.100.1.1"))


def sync(tmp_path: Path, **extra: object) -> WireGuardSync:
    settings = replace(Settings(), wireguard_config_dir=tmp_path / "wg", data_dir=tmp_path / "data")
    settings = replace(settings, **extra)
    return WireGuardSync(settings, identity())


def test_quick_conf_format_is_wg_quick_compatible_and_round_trips() -> None:
    text = render_quick_conf(PRIV, "10.100.1.1", 51820, 1420, [P2, P3])
    assert text == (
        f"# Written by techulus-agent; changes are overwritten.\n"
        f"[Interface]\nPrivateKey = {PRIV}\nAddress = 10.100.1.1/32\nListenPort = 51820\nMTU = 1420\n"
        f"\n[Peer]\nPublicKey = {K2}\nAllowedIPs = 10.100.2.0/24,10.200.2.0/24\nEndpoint = 198.51.100.4:51820\n"
        f"PersistentKeepalive = 25\n"
        f"\n[Peer]\nPublicKey = {K3}\nAllowedIPs = 10.100.3.0/24,10.200.3.0/24\nPersistentKeepalive = 25\n"
    )
    assert parse_conf_peers(text) == [P2, P3]
    wg = render_wg_conf(PRIV, 51820, [P2])
    assert "Address" not in wg and "MTU" not in wg and f"PublicKey = {K2}" in wg


def test_parse_conf_of_the_original_agent_and_hand_edits() -> None:
    original = f"[Interface]\nPrivateKey = {PRIV}\nAddress = 10.100.1.1/32\nListenPort = 51820\n\n[Peer]\nPublicKey = {K2}\nAllowedIPs = 10.100.2.0/24,10.200.2.0/24\nEndpoint = 198.51.100.4:51820\nPersistentKeepalive = 25\n"
    assert parse_conf_peers(original) == [P2]
    edited = f"[peer]\npublickey={K2}  # comment\nAllowedIPs = 10.100.2.0/24, 10.200.2.0/24\nendpoint = 198.51.100.4:51820\n"
    assert parse_conf_peers(edited) == [P2]
    assert parse_conf_peers("") == []


def test_parse_dump_and_combine_with_file() -> None:
    dump = (
        f"{PRIV}\t{PUB}\t51820\toff\n"
        f"{K2}\t(none)\t203.0.113.9:40000\t10.200.2.0/24,10.100.2.0/24\t1700000000\t10\t20\t25\n"
        f"{K3}\t(none)\t(none)\t10.100.3.0/24,10.200.3.0/24\t0\t0\t0\toff\n"
    )
    live = parse_dump(dump)
    assert live.public_key == PUB and live.listen_port == 51820
    assert live.peers[0] == LivePeer(K2, "203.0.113.9:40000", ("10.200.2.0/24", "10.100.2.0/24"), 25)
    assert live.peers[1].endpoint == "" and live.peers[1].keepalive == 0
    # The kernel reorders CIDRs and the peer roamed to another port: still the same peer.
    assert combine_live_and_file(live, [P2, P3]) == [P2, P3]
    assert wireguard_hash(combine_live_and_file(live, [P2, P3])) == wireguard_hash([P3, P2])
    # Live AllowedIPs differ from the file: the live value shows, so the hash differs.
    changed = LiveInterface(PUB, 51820, (LivePeer(K2, "1.2.3.4:5", ("10.100.2.0/24",), 25),))
    assert combine_live_and_file(changed, [P2])[0].allowed_ips == "10.100.2.0/24"
    # The file names an endpoint the interface does not have: not configured.
    lost = LiveInterface(PUB, 51820, (LivePeer(K2, "", ("10.100.2.0/24", "10.200.2.0/24"), 25),))
    assert combine_live_and_file(lost, [P2])[0].endpoint == ""
    # A peer only on the interface shows up with its live values.
    assert combine_live_and_file(changed, [])[0] == WireGuardPeer(K2, "10.100.2.0/24", "1.2.3.4:5")
    with pytest.raises(WireGuardError):
        parse_dump("")
    with pytest.raises(WireGuardError):
        parse_dump(f"{PRIV}\t{PUB}\t51820\toff\ngarbage\n")


def test_forward_rule_check() -> None:
    assert parse_forward_rules("-P FORWARD ACCEPT\n", "wg0", "10.200.1.0/24") is None
    assert "policy is DROP" in (parse_forward_rules("-P FORWARD DROP\n-A FORWARD -i docker0 -j ACCEPT\n", "wg0", "10.200.1.0/24") or "")
    assert parse_forward_rules("-P FORWARD DROP\n-A FORWARD -d 10.200.1.0/24 -i wg0 -j ACCEPT\n", "wg0", "10.200.1.0/24") is None
    assert parse_forward_rules("-P FORWARD DROP\n-A FORWARD -i wg0 -j ACCEPT\n", "wg0", "10.200.1.0/24") is None
    assert parse_forward_rules("-P FORWARD DROP\n-A FORWARD -i wg0 -p tcp -j ACCEPT\n", "wg0", "10.200.1.0/24")


@pytest.mark.parametrize(
    ("peer", "problem"),
    [
        (WireGuardPeer(K2 + "\nPostUp = id", "10.100.2.0/24"), "44-character"),
        (WireGuardPeer("A" * 44, "10.100.2.0/24"), "44-character"),
        (WireGuardPeer(K2, "0.0.0.0/0"), "outside the mesh"),
        (WireGuardPeer(K2, "10.100.2.0/24 ,10.200.2.0/24"), "spaces"),
        (WireGuardPeer(K2, "10.100.2.0/24\n"), "allowedIps"),
        (WireGuardPeer(K2, "10.100.2.0/33"), "invalid CIDR"),
        (WireGuardPeer(K2, "10.100.2.0/24", "fe80::1%x\n[Interface]\nPreUp = cd; touch pwned:51820"), "endpoint"),
        (WireGuardPeer(K2, "10.200.1.0/24"), "overlaps this server's own"),
        (WireGuardPeer(K2, "10.100.0.0/16"), "overlaps this server's own"),
        (WireGuardPeer(K2, "10.100.2.0/24", "1.2.3.4"), "host:port"),
        (WireGuardPeer(K2, "10.100.2.0/24", "1.2.3.4:51820\nPostUp=id"), "endpoint"),
        (WireGuardPeer(K2, "10.100.2.0/24", "1.2.3.4:99999"), "port"),
        (WireGuardPeer(PUB, "10.100.2.0/24"), "own key"),
    ],
)
def test_hostile_peers_are_named(peer: WireGuardPeer, problem: str) -> None:
    problems = validate_peers([peer], PUB, ("10.100.1.0/24", "10.200.1.0/24"))
    assert problems and problem in problems[0], problems


def test_duplicate_and_overlapping_peers() -> None:
    own = ("10.100.1.0/24", "10.200.1.0/24")
    assert validate_peers([P2, P3], PUB, own) == []
    assert "listed twice" in " ".join(validate_peers([P2, replace(P2, allowed_ips="10.100.9.0/24")], PUB, own))
    assert "overlaps" in " ".join(validate_peers([P2, replace(P3, allowed_ips="10.100.2.128/25")], PUB, own))


def test_a_list_of_only_bad_peers_runs_no_command_and_writes_no_file(tmp_path: Path, fp: object) -> None:
    wg = sync(tmp_path)
    with pytest.raises(WireGuardError, match="nothing was changed"):
        wg.apply(ExpectedState(wireguard_peers=(WireGuardPeer(K2, "10.200.1.0/24"), WireGuardPeer(K3, "0.0.0.0/0"))))
    assert not wg.conf_path.exists()


@pytest.mark.parametrize(
    "bad",
    [WireGuardPeer(K3, "0.0.0.0/0"), WireGuardPeer(K3, "10.200.1.0/24"), WireGuardPeer(K3, "10.100.2.128/25"),
     WireGuardPeer(PUB, "10.100.9.0/24"), WireGuardPeer(K2, "10.100.9.0/24"),
     WireGuardPeer(K3, "10.100.3.0/24", "fe80::1%x\n[Interface]\nPreUp = cd; touch pwned:51820")],
)
def test_one_bad_peer_is_skipped_and_the_rest_applies(tmp_path: Path, fp, caplog, bad: WireGuardPeer) -> None:  # type: ignore[no-untyped-def]
    wg = sync(tmp_path)
    state = ExpectedState(wireguard_peers=(P2, bad))
    with caplog.at_level("INFO"):
        for _ in range(3):
            assert wg.expected_hash(state) == wireguard_hash([P2])
    # One clear line for the skipped peer, not one per poll.
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == 1
    assert wg.usable(state.wireguard_peers) == [P2]


def test_rendered_conf_reads_back_or_is_refused() -> None:
    interface = {"PrivateKey": PRIV, "Address": "10.100.1.1/32", "ListenPort": "51820", "MTU": "1420"}
    check_rendered(render_quick_conf(PRIV, "10.100.1.1", 51820, 1420, [P2, P3]), "wg0.conf", interface, [P2, P3])
    evil = [
        WireGuardPeer(K2, "10.100.2.0/24", "1.2.3.4:1\n[Interface]\nPreUp = touch /tmp/pwned"),
        WireGuardPeer(K2, "10.100.2.0/24", "fe80::1%x\rPostUp = id:1"),
        WireGuardPeer(K2, "10.100.2.0/24", "host#x:1"),
        WireGuardPeer(K2 + "\nPostUp = id", "10.100.2.0/24"),
        WireGuardPeer(K2, "10.100.2.0/24\u2028PostUp = id"),
    ]
    for peer in evil:
        with pytest.raises(WireGuardError):
            check_rendered(render_quick_conf(PRIV, "10.100.1.1", 51820, 1420, [peer]), "wg0.conf", interface, [peer])
    with pytest.raises(WireGuardError) as caught:
        check_rendered(render_quick_conf(PRIV, "10.100.1.1", 51820, 1420, [P2]) + f"PrivateKey = {PRIV}\n", "wg0.conf", interface, [P2])
    assert PRIV not in str(caught.value)


def test_a_peer_that_would_not_read_back_writes_nothing(tmp_path: Path, fp) -> None:  # type: ignore[no-untyped-def]
    wg = sync(tmp_path)
    # Bypasses the model on purpose: the renderer's read-back is the last line of defence.
    with pytest.raises(WireGuardError, match="line"):
        wg._write_file([WireGuardPeer(K2, "10.100.2.0/24", "1.2.3.4:1\n[Interface]\nPreUp = touch /tmp/pwned")])
    assert not wg.conf_path.exists()


def _dump(private: str = PRIV, public: str = PUB, port: int = 51820) -> str:
    return f"{private}\t{public}\t{port}\toff\n"


def _link(up: bool = True, address: str | None = "10.100.1.1", mtu: int = 1420) -> str:
    info = [{"family": "inet", "local": address, "prefixlen": 32}] if address else []
    return json.dumps([{"ifname": "wg0", "flags": ["POINTOPOINT", "NOARP"] + (["UP"] if up else []), "mtu": mtu, "addr_info": info}])


def test_prepare_after_reboot_falls_back_to_wireguard_go(tmp_path: Path, fp, caplog) -> None:  # type: ignore[no-untyped-def]
    wg = sync(tmp_path)
    wg.conf_path.parent.mkdir(mode=0o700)
    wg.conf_path.write_text(render_quick_conf(PRIV, "10.100.1.1", 51820, 1420, [P2]))
    fp.register(["ip", "-j", "address", "show", "dev", "wg0"], stderr='Device "wg0" does not exist.\n', returncode=1, occurrences=2)
    fp.register(["ip", "link", "add", "dev", "wg0", "type", "wireguard"], stderr="Error: Unknown device type.\n", returncode=2)
    fp.register(["wireguard-go", "wg0"])
    fp.register(["ip", "-j", "address", "show", "dev", "wg0"], stdout=_link(up=False, address=None, mtu=1420))
    fp.register(["ip", "-j", "address", "show", "dev", "wg0"], stdout=_link(up=False, address=None, mtu=1420))
    fp.register(["wg", "syncconf", "wg0", "/dev/stdin"])
    fp.register(["ip", "-4", "address", "replace", "10.100.1.1/32", "dev", "wg0"])
    fp.register(["ip", "link", "set", "dev", "wg0", "mtu", "1420", "up"])
    fp.register(["ip", "-j", "-4", "route", "show", "dev", "wg0"], stdout="[]")
    fp.register(["ip", "-batch", "-"])
    fp.register(["sysctl", "-n", "net.ipv4.ip_forward"], stdout="0\n")
    fp.register(["iptables", "-S", "FORWARD"], stdout="-P FORWARD DROP\n")
    wg.prepare()
    assert fp.call_count(["wireguard-go", "wg0"]) == 1
    assert fp.call_count(["ip", "-batch", "-"]) == 1
    # Forwarding problems are reported, not raised.
    assert "ip_forward is not 1" in caplog.text and "policy is DROP" in caplog.text
    assert wg.conf_path.stat().st_mode & 0o777 == 0o600


def test_private_key_never_in_argv(tmp_path: Path, fp) -> None:  # type: ignore[no-untyped-def]
    wg = sync(tmp_path)
    fp.register(["ip", "-j", "address", "show", "dev", "wg0"], stdout=_link(), occurrences=3)
    fp.register(["wg", "show", "wg0", "dump"], stdout=_dump())
    fp.register(["wg", "syncconf", "wg0", "/dev/stdin"])
    fp.register(["ip", "-4", "address", "replace", "10.100.1.1/32", "dev", "wg0"])
    fp.register(["ip", "link", "set", "dev", "wg0", "mtu", "1420", "up"])
    fp.register(["ip", "-j", "-4", "route", "show", "dev", "wg0"], stdout="[]")
    fp.register(["ip", "-batch", "-"])
    fp.register(["ip", "-j", "-4", "route", "show", "dev", "wg0"], stdout=json.dumps(
        [{"dst": "10.100.2.0/24", "dev": "wg0"}, {"dst": "10.200.2.0/24", "dev": "wg0"}]))
    fp.register(["wg", "show", "wg0", "dump"], stdout=(
        f"{PRIV}\t{PUB}\t51820\toff\n{K2}\t(none)\t198.51.100.4:51820\t10.100.2.0/24,10.200.2.0/24\t0\t0\t0\t25\n"))
    fp.register(["ip", "-j", "-4", "route", "show", "dev", "wg0"], stdout=json.dumps(
        [{"dst": "10.100.2.0/24", "dev": "wg0"}, {"dst": "10.200.2.0/24", "dev": "wg0"}]))
    wg.apply_peers([P2])
    for call in fp.calls:
        assert PRIV not in " ".join(map(str, call))


@pytest.mark.parametrize(
    ("link", "message"),
    [(_link(up=False), "is down"), (_link(address=None), "does not have its address"), (_link(mtu=1500), "MTU 1500")],
)
def test_actual_hash_raises_when_interface_unusable(tmp_path: Path, fp, link: str, message: str) -> None:  # type: ignore[no-untyped-def]
    wg = sync(tmp_path)
    fp.register(["ip", "-j", "address", "show", "dev", "wg0"], stdout=link)
    fp.register(["wg", "show", "wg0", "dump"], stdout=_dump())
    with pytest.raises(WireGuardError, match=message):
        wg.actual_hash()


def test_netns_prefix_and_interface_name(tmp_path: Path, fp) -> None:  # type: ignore[no-untyped-def]
    wg = sync(tmp_path, wireguard_netns="ns1")
    fp.register(["ip", "netns", "exec", "ns1", "ip", "-j", "address", "show", "dev", "wg0"], stderr='Device "wg0" does not exist.', returncode=1)
    with pytest.raises(WireGuardError, match="does not exist"):
        wg.actual_hash()
    with pytest.raises(WireGuardError, match="interface name"):
        WireGuardSync(replace(Settings(), wireguard_interface="-wg0 x"), identity())


def test_prepare_keeps_a_file_with_invalid_peers(tmp_path: Path, fp) -> None:  # type: ignore[no-untyped-def]
    wg = sync(tmp_path)
    wg.conf_path.parent.mkdir(mode=0o700)
    bad = render_quick_conf(PRIV, "10.100.1.1", 51820, 1420, [WireGuardPeer(K2, "0.0.0.0/0")])
    wg.conf_path.write_text(bad)
    fp.register(["ip", "-j", "address", "show", "dev", "wg0"], stdout=_link(), occurrences=2)
    fp.register(["wg", "show", "wg0", "dump"], stdout=_dump())
    fp.register(["wg", "syncconf", "wg0", "/dev/stdin"])
    fp.register(["ip", "-4", "address", "replace", "10.100.1.1/32", "dev", "wg0"])
    fp.register(["ip", "link", "set", "dev", "wg0", "mtu", "1420", "up"])
    fp.register(["ip", "-j", "-4", "route", "show", "dev", "wg0"], stdout="[]")
    fp.register(["sysctl", "-n", "net.ipv4.ip_forward"], stdout="1\n")
    fp.register(["iptables", "-S", "FORWARD"], stdout="-P FORWARD ACCEPT\n")
    wg.prepare()
    assert wg.conf_path.read_text() == bad
    assert fp.call_count(["ip", "-batch", "-"]) == 0  # no route towards 0.0.0.0/0


# --- ownership: only what this agent wrote or created is touched ------------------------------

OTHER_PRIV = crypto.new_wireguard_private_key()
OTHER_PUB = crypto.wireguard_public_key(OTHER_PRIV)
ADMIN_CONF = (
    f"# my own VPN\n[Interface]\nPrivateKey = {OTHER_PRIV}\nAddress = 192.168.77.1/24\nListenPort = 51820\n"
    f"PostUp = echo up\n\n[Peer]\nPublicKey = {K2}\nAllowedIPs = 192.168.77.0/24\n"
)


def _bring_up_calls(fp, link: str) -> None:  # type: ignore[no-untyped-def]
    """What prepare() runs on an interface it may manage (after the ownership check)."""
    fp.register(["ip", "-j", "address", "show", "dev", "wg0"], stdout=link)
    fp.register(["wg", "syncconf", "wg0", "/dev/stdin"])
    fp.register(["ip", "-4", "address", "replace", "10.100.1.1/32", "dev", "wg0"])
    fp.register(["ip", "link", "set", "dev", "wg0", "mtu", "1420", "up"])
    fp.register(["ip", "-j", "-4", "route", "show", "dev", "wg0"], stdout="[]")
    fp.register(["ip", "-batch", "-"])
    fp.register(["sysctl", "-n", "net.ipv4.ip_forward"], stdout="1\n")
    fp.register(["iptables", "-S", "FORWARD"], stdout="-P FORWARD ACCEPT\n")


def test_a_foreign_wg0_conf_is_refused_and_left_alone(tmp_path: Path, fp) -> None:  # type: ignore[no-untyped-def]
    wg = sync(tmp_path)
    wg.conf_path.parent.mkdir(mode=0o700)
    wg.conf_path.write_text(ADMIN_CONF)
    # No command is registered: any `wg`/`ip` call would fail the test with another error.
    for action in (wg.prepare, wg.actual_hash, lambda: wg.apply(ExpectedState(wireguard_peers=(P2,))),
                   lambda: wg.apply_peers([P2])):
        with pytest.raises(WireGuardError, match=r"not written by techulus-agent .*refusing to manage wg0 \(nothing was changed\)"):
            action()
    assert wg.conf_path.read_text() == ADMIN_CONF
    assert OTHER_PRIV not in str(pytest.raises(WireGuardError, wg.prepare).value)
    assert not fp.calls


def test_a_foreign_live_interface_is_refused_and_left_alone(tmp_path: Path, fp) -> None:  # type: ignore[no-untyped-def]
    wg = sync(tmp_path)
    fp.register(["ip", "-j", "address", "show", "dev", "wg0"], stdout=_link(address="192.168.77.1"), occurrences=4)
    fp.register(["wg", "show", "wg0", "dump"], stdout=_dump(OTHER_PRIV, OTHER_PUB, 51820)
                + f"{K2}\t(none)\t(none)\t192.168.77.0/24\t0\t0\t0\toff\n", occurrences=4)
    for action in (wg.prepare, wg.actual_hash, lambda: wg.apply(ExpectedState(wireguard_peers=(P2,))),
                   lambda: wg.apply_peers([P2])):
        with pytest.raises(WireGuardError, match=rf"wg0 already runs with another key \(public key {re.escape(OTHER_PUB)}\)"):
            action()
    assert not wg.conf_path.exists()
    # Only reads happened: no syncconf, no address or route change.
    assert {tuple(call[:3]) for call in fp.calls} == {("ip", "-j", "address"), ("wg", "show", "wg0")}


def test_an_interface_that_is_not_wireguard_is_refused(tmp_path: Path, fp) -> None:  # type: ignore[no-untyped-def]
    wg = sync(tmp_path)
    fp.register(["ip", "-j", "address", "show", "dev", "wg0"], stdout=_link(), occurrences=2)
    fp.register(["wg", "show", "wg0", "dump"], stderr="Unable to access interface: Protocol not supported\n",
                returncode=1, occurrences=2)
    for action in (wg.prepare, wg.actual_hash):
        with pytest.raises(WireGuardError, match="cannot read it as a WireGuard interface .*Protocol not supported"):
            action()
    assert not wg.conf_path.exists()


def test_the_original_agents_wg0_conf_is_adopted(tmp_path: Path, fp) -> None:  # type: ignore[no-untyped-def]
    # The Go agent's file (§9.9.1): no header, no MTU, but our private key -> ours; rewritten with the header.
    wg = sync(tmp_path)
    wg.conf_path.parent.mkdir(mode=0o700)
    original = (f"[Interface]\nPrivateKey = {PRIV}\nAddress = 10.100.1.1/32\nListenPort = 51820\n\n[Peer]\n"
                f"PublicKey = {K2}\nAllowedIPs = 10.100.2.0/24,10.200.2.0/24\nEndpoint = 198.51.100.4:51820\n"
                f"PersistentKeepalive = 25\n")
    wg.conf_path.write_text(original)
    fp.register(["ip", "-j", "address", "show", "dev", "wg0"], stdout=_link(mtu=1420))
    fp.register(["wg", "show", "wg0", "dump"], stdout=_dump())  # brought up by the Go agent's wg-quick
    _bring_up_calls(fp, _link())
    wg.prepare()
    assert wg.conf_path.read_text() == render_quick_conf(PRIV, "10.100.1.1", 51820, 1420, [P2])
    assert wg.conf_path.read_text().startswith("# Written by techulus-agent")
    assert fp.call_count(["wg", "syncconf", "wg0", "/dev/stdin"]) == 1


@pytest.mark.parametrize("unset", ["(none)", "A" * 43 + "="])
def test_an_interface_without_a_key_is_adopted(tmp_path: Path, fp, unset: str) -> None:  # type: ignore[no-untyped-def]
    # Created but never configured (by us before a crash, or by `ip link add`): nothing to lose.
    wg = sync(tmp_path)
    fp.register(["ip", "-j", "address", "show", "dev", "wg0"], stdout=_link(up=False, address=None))
    fp.register(["wg", "show", "wg0", "dump"], stdout=_dump(unset, "(none)", 60202))
    _bring_up_calls(fp, _link(up=False, address=None))
    wg.prepare()
    assert fp.call_count(["wg", "syncconf", "wg0", "/dev/stdin"]) == 1
    assert wg.conf_path.read_text().startswith("# Written by techulus-agent")


def test_an_interface_brought_up_from_our_own_file_is_ours(tmp_path: Path, fp) -> None:  # type: ignore[no-untyped-def]
    # Our header file with an older key (the data dir was registered anew) and wg0 running
    # it: both ours, so the new key replaces the old one. Without our header it is refused.
    wg = sync(tmp_path)
    wg.conf_path.parent.mkdir(mode=0o700)
    wg.conf_path.write_text(render_quick_conf(OTHER_PRIV, "10.100.1.1", 51820, 1420, [P2]))
    fp.register(["ip", "-j", "address", "show", "dev", "wg0"], stdout=_link())
    fp.register(["wg", "show", "wg0", "dump"], stdout=_dump(OTHER_PRIV, OTHER_PUB))
    _bring_up_calls(fp, _link())
    wg.prepare()
    assert parse_conf_private_key(wg.conf_path.read_text()) == PRIV
    assert fp.call_count(["wg", "syncconf", "wg0", "/dev/stdin"]) == 1


def test_ownership_helpers() -> None:
    ours = render_quick_conf(PRIV, "10.100.1.1", 51820, 1420, [P2])
    assert has_owner_header(ours) and not has_owner_header(ADMIN_CONF)
    assert parse_conf_private_key(ours) == PRIV
    assert parse_conf_private_key(ADMIN_CONF) == OTHER_PRIV
    assert parse_conf_private_key(f"[Peer]\nPrivateKey = {PRIV}\n") is None  # only [Interface] counts
    assert parse_conf_private_key(f"[interface]\nprivatekey={PRIV} # c\n") == PRIV
    assert parse_dump("(none)\t(none)\t0\toff\n").key_unset
    assert not parse_dump(_dump()).key_unset
