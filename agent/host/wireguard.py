"""The WireGuard full mesh (PROTOCOL.md §9.9): wg0.conf for reboots, the live interface for drift.

Differences from the original agent, on purpose (§17 items 11, 12, 20):
* peers change with `wg syncconf` plus a route diff, so existing tunnels keep running;
* the interface is brought up at agent start when it is missing or down (after a reboot),
  with the same wireguard-go fallback as wg-quick when the kernel has no WireGuard module;
* drift is computed from the live interface (`wg show <if> dump`, link state, address,
  routes), with endpoints and the literal AllowedIPs strings taken from the file;
* MTU 1420 is set; IP forwarding and the FORWARD rule towards the containers are checked
  and reported (the agent adds no firewall rules);
* every peer is validated (key, CIDRs inside the mesh ranges and outside this server's own
  subnets, no overlap, endpoint) before anything is touched; a bad peer is skipped with one
  line (counted, not repeated every poll) and the others apply, so one bad peer cannot keep
  a new server out of the mesh;
* the rendered file is read back, strictly and the way wg-quick reads it, and written only
  when it holds exactly the intended interface and peers: no value can become a line;
* only what is ours is touched: the file carries an OWNER_HEADER line, and a wg0.conf or a live
  interface that is somebody else's (another private key, no header) is refused, never taken
  over. A file of the original agent (no header, but our key) is adopted: the upgrade path.

The wg0.conf written here stays wg-quick compatible so `wg-quick@wg0` can bring the mesh up
at boot even before the agent runs. The private key only ever travels through stdin.
"""

from __future__ import annotations

import bisect
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import validate
from agent.drift import wireguard_hash
from agent.fsutil import atomic_write, ensure_dir
from agent.host.run import CommandError, CommandNotFound, Result, run
from agent.identity import Identity
from agent.model import ExpectedState, WireGuardPeer
from agent.problems import ProblemLog
from agent.settings import Settings
from agent.validate import InvalidValue

log = logging.getLogger(__name__)

PERSISTENT_KEEPALIVE = 25
DEFAULT_ALLOWED_NETWORKS = ("10.100.0.0/16", "10.200.0.0/16")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
# First line of every wg0.conf we write: wg-quick, `wg-quick strip` and `wg syncconf` all
# skip `#` comments, and it tells our file from an administrator's.
OWNER_HEADER = "# Written by techulus-agent"
# What `wg show dump` prints for a key that was never set (wireguard-go and the kernel).
_UNSET_KEYS = frozenset({"(none)", "A" * 43 + "="})


class WireGuardError(RuntimeError):
    """The interface could not be read or brought to the expected state."""


@dataclass(frozen=True)
class LivePeer:
    public_key: str
    endpoint: str  # "" when the interface knows no endpoint for the peer
    allowed_ips: tuple[str, ...]
    keepalive: int


@dataclass(frozen=True)
class LiveInterface:
    public_key: str
    listen_port: int
    peers: tuple[LivePeer, ...]
    private_key: str = field(default="", repr=False)

    @property
    def key_unset(self) -> bool:
        return self.private_key in _UNSET_KEYS and self.public_key in _UNSET_KEYS


# --- pure parts: rendering and parsing ------------------------------------------------------


def render_quick_conf(private_key: str, address: str, port: int, mtu: int, peers: Sequence[WireGuardPeer]) -> str:
    """wg0.conf as wg-quick reads it: §9.9.1 plus `MTU` (upstream fix 10277d7)."""
    lines = [
        f"{OWNER_HEADER}; changes are overwritten.",
        "[Interface]",
        f"PrivateKey = {private_key}",
        f"Address = {address}/32",
        f"ListenPort = {port}",
        f"MTU = {mtu}",
    ]
    return "\n".join(lines) + "\n" + _render_peers(peers)


def render_wg_conf(private_key: str, port: int, peers: Sequence[WireGuardPeer]) -> str:
    """The same content in `wg setconf/syncconf` syntax (no wg-quick-only keys)."""
    return f"[Interface]\nPrivateKey = {private_key}\nListenPort = {port}\n" + _render_peers(peers)


def _render_peers(peers: Sequence[WireGuardPeer]) -> str:
    blocks = []
    for peer in peers:
        lines = ["", "[Peer]", f"PublicKey = {peer.public_key}", f"AllowedIPs = {peer.allowed_ips}"]
        if peer.endpoint:
            lines.append(f"Endpoint = {peer.endpoint}")
        lines.append(f"PersistentKeepalive = {PERSISTENT_KEEPALIVE}")
        blocks.append("\n".join(lines) + "\n")
    return "".join(blocks)


def parse_conf_peers(text: str) -> list[WireGuardPeer]:
    """Peers of a wg0.conf (§9.9.3), tolerant of spacing and key case like wg-quick itself."""
    peers: list[WireGuardPeer] = []
    current: dict[str, str] | None = None

    def flush() -> None:
        if current is not None and current.get("publickey"):
            peers.append(WireGuardPeer(current["publickey"], current.get("allowedips", ""), current.get("endpoint", "")))

    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            flush()
            current = {} if line.lower() == "[peer]" else None
            continue
        if current is None or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().lower()
        value = value.strip()
        if key == "allowedips" and "allowedips" in current:
            # wg-quick accepts the key repeated; the values add up.
            value = current["allowedips"] + "," + value
        current[key] = value.replace(" ", "") if key == "allowedips" else value
    flush()
    return peers


def has_owner_header(text: str) -> bool:
    """Was this wg0.conf written by this agent (a comment line starting with OWNER_HEADER)?"""
    return any(line.strip().startswith(OWNER_HEADER) for line in text.splitlines())


def parse_conf_private_key(text: str) -> str | None:
    """The `[Interface]` PrivateKey of a wg0.conf (None when there is none)."""
    section = ""
    key = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("["):
            section = line.lower()
        elif section == "[interface]" and "=" in line:
            name, _, value = line.partition("=")
            if name.strip().lower() == "privatekey":
                key = value.strip()
    return key


def parse_dump(text: str) -> LiveInterface:
    """`wg show <if> dump`: one interface line, then one tab-separated line per peer."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise WireGuardError("`wg show dump` printed nothing")
    head = lines[0].split("\t")
    if len(head) < 3:
        raise WireGuardError(f"unexpected interface line in `wg show dump`: {lines[0][:200]!r}")
    try:
        listen_port = int(head[2])
    except ValueError:
        listen_port = 0
    peers = []
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) < 8:
            raise WireGuardError(f"unexpected peer line in `wg show dump`: {line[:200]!r}")
        endpoint = "" if fields[2] == "(none)" else fields[2]
        allowed = () if fields[3] in ("(none)", "") else tuple(fields[3].split(","))
        keepalive = 0 if fields[7] in ("off", "") else int(fields[7]) if fields[7].isdigit() else 0
        peers.append(LivePeer(fields[0], endpoint, allowed, keepalive))
    return LiveInterface(head[1], listen_port, tuple(peers), head[0])


def _networks(allowed_ips: Iterable[str]) -> frozenset[str]:
    result = set()
    for cidr in allowed_ips:
        cidr = cidr.strip()
        if cidr:
            result.add(str(ipaddress.ip_network(cidr, strict=False)))
    return frozenset(result)


def combine_live_and_file(live: LiveInterface, file_peers: Sequence[WireGuardPeer]) -> list[WireGuardPeer]:
    """What the interface really does, spelt like the expected state so the hashes compare.

    Keys and AllowedIPs come from the live interface. Where they agree with the file, the
    file's literal AllowedIPs string is used (the hash compares strings, and the kernel
    reorders and normalises CIDRs). Endpoints come from the file because a live endpoint
    roams (NAT, a peer that connected to us); a peer with no live endpoint at all while
    the file has one counts as not configured.
    """
    by_key = {peer.public_key: peer for peer in file_peers}
    combined = []
    for peer in live.peers:
        wanted = by_key.get(peer.public_key)
        allowed = ",".join(peer.allowed_ips)
        endpoint = peer.endpoint
        if wanted is not None:
            try:
                same = _networks(peer.allowed_ips) == _networks(wanted.allowed_ips.split(","))
            except ValueError:
                same = False
            if same:
                allowed = wanted.allowed_ips
            endpoint = wanted.endpoint if peer.endpoint else ""
        combined.append(WireGuardPeer(peer.public_key, allowed, endpoint))
    return combined


def parse_forward_rules(iptables_s: str, interface: str, subnet: str) -> str | None:
    """Problem text when `iptables -S FORWARD` output would drop peer traffic to the containers."""
    policy = "ACCEPT"
    accepted = False
    for line in iptables_s.splitlines():
        parts = line.split()
        if parts[:2] == ["-P", "FORWARD"] and len(parts) >= 3:
            policy = parts[2]
        elif parts[:2] == ["-A", "FORWARD"] and "-j" in parts and parts[parts.index("-j") + 1 : parts.index("-j") + 2] == ["ACCEPT"]:
            in_if = parts[parts.index("-i") + 1] if "-i" in parts and parts.index("-i") + 1 < len(parts) else ""
            dest = parts[parts.index("-d") + 1] if "-d" in parts and parts.index("-d") + 1 < len(parts) else ""
            if in_if == interface and dest in ("", subnet) and "-s" not in parts and "-p" not in parts:
                accepted = True
    if policy == "ACCEPT" or accepted:
        return None
    return (
        f"the FORWARD chain policy is {policy} and no rule accepts {interface} -> {subnet}: other servers cannot "
        f"reach this server's containers (fix: iptables -I FORWARD -i {interface} -d {subnet} -j ACCEPT)"
    )


def sort_peers(
    peers: Sequence[WireGuardPeer],
    own_public_key: str,
    own_networks: Sequence[str],
    allowed_networks: Sequence[str] = DEFAULT_ALLOWED_NETWORKS,
) -> tuple[list[WireGuardPeer], list[str]]:
    """(the peers safe to apply, one problem per skipped peer), in the listed order.

    Beyond the per-field checks, a peer's AllowedIPs must lie inside the mesh ranges and
    outside this server's own subnets: `0.0.0.0/0` or our own 10.200.X.0/24 would send this
    server's traffic (or its containers') into someone else's tunnel. Of two peers with the
    same key or overlapping AllowedIPs, the one listed first is kept.
    """
    problems: list[str] = []
    usable: list[WireGuardPeer] = []
    mesh = [ipaddress.ip_network(n) for n in allowed_networks]
    own = [ipaddress.ip_network(n) for n in own_networks]
    seen_keys: set[str] = set()
    claimed = _Claims()
    for index, peer in enumerate(peers):
        try:
            key = validate.wireguard_key(peer.public_key)
        except InvalidValue as exc:
            problems.append(f"wireguard peer #{index}: {exc}; skipped")
            continue
        label = f"wireguard peer {key}"
        try:
            if key == own_public_key:
                raise InvalidValue("is this server's own key")
            if key in seen_keys:
                raise InvalidValue("is listed twice")
            validate.cidr_list(peer.allowed_ips)
            networks = [ipaddress.ip_network(part, strict=False) for part in peer.allowed_ips.split(",")]
            for network in networks:
                if not any(network.version == m.version and network.subnet_of(m) for m in mesh):  # type: ignore[arg-type]
                    raise InvalidValue(f"allowedIps {network} is outside the mesh ranges {', '.join(allowed_networks)}")
                for mine in own:
                    if network.overlaps(mine):
                        raise InvalidValue(f"allowedIps {network} overlaps this server's own {mine}")
            if peer.endpoint:
                validate.host_port(peer.endpoint, "endpoint")
            clash = claimed.overlap(networks)
            if clash is not None:
                raise InvalidValue(f"allowedIps {clash[0]} overlaps {clash[1]} of peer {clash[2]}")
        except InvalidValue as exc:
            problems.append(f"{label}: {exc}; skipped")
            continue
        seen_keys.add(key)
        claimed.add(networks, key)
        usable.append(peer)
    return usable, problems


def validate_peers(
    peers: Sequence[WireGuardPeer],
    own_public_key: str,
    own_networks: Sequence[str],
    allowed_networks: Sequence[str] = DEFAULT_ALLOWED_NETWORKS,
) -> list[str]:
    """Every problem with the peer list (empty when all of it is safe to apply)."""
    return sort_peers(peers, own_public_key, own_networks, allowed_networks)[1]


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Claims:
    """The AllowedIPs of the peers kept so far: disjoint ranges sorted by start address, so
    checking a new peer costs O(log n) per CIDR (a 250-peer mesh has 500 CIDRs)."""

    def __init__(self) -> None:
        self._starts: list[tuple[int, int]] = []
        self._ranges: list[tuple[int, int, int, Network, str]] = []

    def overlap(self, networks: Sequence[Network]) -> tuple[Network, Network, str] | None:
        for network in networks:
            start, end = int(network.network_address), int(network.broadcast_address)
            position = bisect.bisect_right(self._starts, (network.version, start))
            for neighbour in self._ranges[max(0, position - 1) : position + 1]:
                version, other_start, other_end, other, key = neighbour
                if version == network.version and other_start <= end and start <= other_end:
                    return network, other, key
        return None

    def add(self, networks: Sequence[Network], key: str) -> None:
        # A peer's own CIDRs may overlap each other (WireGuard merges them): collapse first,
        # so that the ranges kept stay disjoint.
        for version in (4, 6):
            mine = [n for n in networks if n.version == version]
            for network in ipaddress.collapse_addresses(mine):  # type: ignore[type-var]
                item = (version, int(network.network_address), int(network.broadcast_address), network, key)
                position = bisect.bisect_right(self._starts, item[:2])
                self._starts.insert(position, item[:2])
                self._ranges.insert(position, item)


def read_back(text: str, what: str) -> tuple[dict[str, str], list[WireGuardPeer]]:
    """A config we rendered, parsed strictly: each line blank, a `#` comment, a section
    header or `Key = Value`, no key twice in a section, every peer with our keepalive.
    Raises WireGuardError for anything else (a value that smuggled in a line, say)."""
    try:
        lines = validate.one_line_text(text, what)
    except InvalidValue as exc:
        raise WireGuardError(str(exc)) from None
    interface: dict[str, str] | None = None
    peers: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    for number, line in enumerate(lines, 1):
        if not line or line.startswith("#"):
            continue
        if line == "[Interface]" and interface is None and not peers:
            current = interface = {}
        elif line == "[Peer]":
            current = {}
            peers.append(current)
        elif current is not None and " = " in line:
            key, _, value = line.partition(" = ")
            allowed = _PEER_KEYS if current is not interface else _INTERFACE_KEYS
            if key not in allowed or key in current or "#" in value:
                raise WireGuardError(f"{what} line {number} is not what was meant to be written: {_shown(line)}")
            current[key] = value
        else:
            raise WireGuardError(f"{what} line {number} is not what was meant to be written: {_shown(line)}")
    result = []
    for peer in peers:
        if peer.get("PersistentKeepalive") != str(PERSISTENT_KEEPALIVE) or "PublicKey" not in peer:
            raise WireGuardError(f"{what} holds a peer that was not meant to be written: {peer!r:.200}")
        result.append(WireGuardPeer(peer["PublicKey"], peer.get("AllowedIPs", ""), peer.get("Endpoint", "")))
    return interface or {}, result


def _shown(line: str) -> str:
    """A line in an error message: up to its `=` only, since the line may hold the private key."""
    return repr(line.split("=", 1)[0][:60])


_INTERFACE_KEYS = frozenset({"PrivateKey", "Address", "ListenPort", "MTU"})
_PEER_KEYS = frozenset({"PublicKey", "AllowedIPs", "Endpoint", "PersistentKeepalive"})


def check_rendered(text: str, what: str, interface: dict[str, str], peers: Sequence[WireGuardPeer]) -> None:
    """Refuse (WireGuardError) unless `text` reads back as exactly `interface` and `peers`,
    both strictly and the way wg-quick reads it (comments stripped, keys case-insensitive)."""
    got_interface, got_peers = read_back(text, what)
    if got_interface != interface or got_peers != list(peers) or parse_conf_peers(text) != list(peers):
        raise WireGuardError(f"{what} does not read back as the intended peers; nothing was written")


# --- the adapter -------------------------------------------------------------------------------


class WireGuardSync:
    """ConfigSync for the mesh; also applies `update_wireguard` work items (`apply_peers`)."""

    name = "wireguard"

    def __init__(self, settings: Settings, identity: Identity) -> None:
        self.settings = settings
        self.identity = identity
        self.interface = settings.wireguard_interface
        if not _IFNAME.fullmatch(self.interface) or self.interface in (".", ".."):
            raise WireGuardError(f"wireguard_interface {self.interface!r} is not a valid interface name")
        self.address = str(validate.ipv4(identity.config.wireguard_ip, "wireguardIp in config.json"))
        subnet_id = identity.config.subnet_id
        self.own_networks = (f"10.100.{subnet_id}.0/24", identity.config.container_subnet)
        self.allowed_networks: tuple[str, ...] = tuple(
            settings.wireguard_allowed_networks or DEFAULT_ALLOWED_NETWORKS
        )
        # Tests (and unusual hosts) run the mesh inside a network namespace.
        netns = settings.wireguard_netns or ""
        self._prefix: tuple[str, ...] = ("ip", "netns", "exec", netns) if netns else ()
        self.timeout = float(settings.wireguard_timeout)
        self.userspace = (
            os.environ.get("WG_QUICK_USERSPACE_IMPLEMENTATION") or settings.wireguard_go or "wireguard-go"
        )
        self.problems = ProblemLog(log, "wireguard", cleared="peers are all valid again")

    @property
    def conf_path(self) -> Path:
        return Path(self.settings.wireguard_config_dir) / f"{self.interface}.conf"

    # ConfigSync ---------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Bring the interface up with the peers of the file when it is missing or down.

        Runs at agent start, so a reboot without `wg-quick@wg0` heals before the first poll.
        Peers of the file that no longer validate are left out; the first reconcile decides.
        An interface or file that is not ours is refused before anything is touched.
        """
        self.check_ownership()
        peers = self.file_peers(missing_ok=True)
        usable, problems = self.sort(peers)
        if problems:
            # Keep the file as it is (it is evidence, and bad input destroys nothing); the
            # first reconcile writes the expected peers.
            log.warning("%s holds peers that do not validate (%s); bringing %s up without them",
                        self.conf_path, "; ".join(problems[:5]), self.interface)
        else:
            self._write_file(peers)
        self._bring_up(usable)
        for problem in self.forwarding_problems():
            log.warning("wireguard: %s", problem)

    def expected_hash(self, state: ExpectedState) -> str:
        return wireguard_hash(self.usable(state.wireguard_peers))

    def actual_hash(self) -> str:
        return wireguard_hash(self.actual_peers())

    def apply(self, state: ExpectedState) -> None:
        self.apply_peers(state.wireguard_peers)

    def apply_peers(self, peers: Sequence[WireGuardPeer]) -> None:
        """Skip the bad peers, write the file, sync the live interface without a reload, verify.

        When every listed peer is bad nothing is changed: that is a broken list (or a broken
        setting here), not a request to leave the mesh."""
        listed = list(peers)
        peers = self.usable(listed)
        if listed and not peers:
            raise WireGuardError(f"refusing to apply WireGuard peers: none of the {len(listed)} listed is valid (nothing was changed)")
        self.check_ownership()
        self._write_file(peers)
        self._bring_up(peers)
        expected = wireguard_hash(peers)
        actual = self.actual_hash()
        if actual != expected:
            raise WireGuardError(
                f"{self.interface} does not match the expected peers after applying them "
                f"(live: {self.actual_peers()!r})"
            )
        log.info("wireguard: %s has %d peers", self.interface, len(peers))

    # Ownership ----------------------------------------------------------------------------------

    def check_ownership(self) -> None:
        """Raise (having changed nothing) when the file or the live interface is somebody else's."""
        self._check_file_ownership()
        link = self._link()
        if link is not None:
            self._check_live_ownership(self._dump())

    def _check_file_ownership(self) -> None:
        """Ours: no file, an empty one, our OWNER_HEADER, or our private key (the original agent's file)."""
        try:
            text = self.conf_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            raise WireGuardError(f"cannot read {self.conf_path}: {exc}; refusing to manage {self.interface}") from exc
        if not text.strip() or has_owner_header(text):
            return
        if parse_conf_private_key(text) == self.identity.wireguard_private_key:
            return
        raise WireGuardError(
            f"{self.conf_path} was not written by techulus-agent (no {OWNER_HEADER!r} line) and holds another "
            f"private key than {self.settings.data_dir}/wireguard.key: refusing to manage {self.interface} "
            f"(nothing was changed); move that file away or set wireguard_interface to another name"
        )

    def _check_live_ownership(self, live: LiveInterface) -> None:
        """Ours: our key, no key at all (just created, by us or by an interrupted start), or
        the key of a wg0.conf we wrote (brought up from our file, before a re-registration)."""
        ours = self.identity
        if live.private_key == ours.wireguard_private_key or live.public_key == ours.wireguard_public_key:
            return
        if live.key_unset:
            return
        if live.private_key and live.private_key == self._own_file_key():
            return
        raise WireGuardError(
            f"{self.interface} already runs with another key (public key {live.public_key}), not the one in "
            f"{self.settings.data_dir}/wireguard.key: refusing to manage it (nothing was changed); remove it "
            f"or set wireguard_interface to another name"
        )

    def _own_file_key(self) -> str | None:
        """The PrivateKey of our wg0.conf when the file carries our header."""
        try:
            text = self.conf_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        return parse_conf_private_key(text) if has_owner_header(text) else None

    def _dump(self) -> LiveInterface:
        # check=False: a failure here means "not a WireGuard interface", said below in those words.
        key = self.identity.wireguard_private_key
        result = self._run(["wg", "show", self.interface, "dump"], secrets=(key,), check=False)
        if result.returncode != 0:
            raise WireGuardError(
                f"{self.interface} exists but `wg show` cannot read it as a WireGuard interface "
                f"({result.stderr.strip()[:300]}): refusing to manage it (nothing was changed)"
            )
        return parse_dump(result.stdout)

    # Reading the live state -------------------------------------------------------------------

    def sort(self, peers: Sequence[WireGuardPeer]) -> tuple[list[WireGuardPeer], list[str]]:
        return sort_peers(peers, self.identity.wireguard_public_key, self.own_networks, self.allowed_networks)

    def usable(self, peers: Sequence[WireGuardPeer]) -> list[WireGuardPeer]:
        """The peers that apply; the skipped ones are reported once (then counted)."""
        usable, problems = self.sort(peers)
        self.problems.report(problems)
        return usable

    def file_peers(self, missing_ok: bool = False) -> list[WireGuardPeer]:
        try:
            text = self.conf_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if missing_ok:
                return []
            raise WireGuardError(f"{self.conf_path} is missing") from None
        except OSError as exc:
            raise WireGuardError(f"cannot read {self.conf_path}: {exc.strerror}") from exc
        return parse_conf_peers(text)

    def actual_peers(self) -> list[WireGuardPeer]:
        """The peers as the live interface applies them; raises when the interface is not usable
        (or not ours: then `apply` refuses too)."""
        self._check_file_ownership()
        link = self._link()
        if link is None:
            raise WireGuardError(f"{self.interface} does not exist (not brought up since boot?)")
        live = self._dump()
        self._check_live_ownership(live)
        flags = link.get("flags") or []
        if "UP" not in flags:
            raise WireGuardError(f"{self.interface} is down")
        if link.get("mtu") != self.settings.wireguard_mtu:
            raise WireGuardError(f"{self.interface} has MTU {link.get('mtu')}, not {self.settings.wireguard_mtu}")
        addresses = {a.get("local") for a in link.get("addr_info") or [] if a.get("family") == "inet"}
        if self.address not in addresses:
            raise WireGuardError(f"{self.interface} does not have its address {self.address}")
        if live.public_key != self.identity.wireguard_public_key:
            raise WireGuardError(f"{self.interface} does not run with the key in {self.settings.data_dir}/wireguard.key yet")
        if live.listen_port != self.settings.wireguard_port:
            raise WireGuardError(f"{self.interface} listens on port {live.listen_port}, not {self.settings.wireguard_port}")
        missing_routes = self._wanted_routes([WireGuardPeer(p.public_key, ",".join(p.allowed_ips)) for p in live.peers]) - self._routes()
        if missing_routes:
            raise WireGuardError(f"{self.interface} lacks routes for {', '.join(sorted(missing_routes))}")
        return combine_live_and_file(live, self.file_peers())

    def forwarding_problems(self) -> list[str]:
        """What would keep other servers from reaching this server's containers (reported, not fixed)."""
        problems = []
        try:
            forward = self._run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
            if forward != "1":
                problems.append("net.ipv4.ip_forward is not 1: traffic from the mesh cannot reach the containers")
        except CommandError as exc:
            problems.append(f"cannot read net.ipv4.ip_forward: {exc}")
        try:
            rules = self._run(["iptables", "-S", "FORWARD"]).stdout
            problem = parse_forward_rules(rules, self.interface, self.identity.config.container_subnet)
            if problem:
                problems.append(problem)
        except CommandNotFound:
            log.debug("iptables is not installed; FORWARD rule not checked")
        except CommandError as exc:
            problems.append(f"cannot read the FORWARD chain: {exc}")
        return problems

    # Changing the live state ------------------------------------------------------------------

    def _write_file(self, peers: Sequence[WireGuardPeer]) -> None:
        key, port, mtu = self.identity.wireguard_private_key, self.settings.wireguard_port, self.settings.wireguard_mtu
        text = render_quick_conf(key, self.address, port, mtu, peers)
        interface = {"PrivateKey": key, "Address": f"{self.address}/32", "ListenPort": str(port), "MTU": str(mtu)}
        check_rendered(text, str(self.conf_path), interface, peers)
        ensure_dir(self.conf_path.parent, 0o700)
        try:
            if self.conf_path.read_text(encoding="utf-8") == text and (self.conf_path.stat().st_mode & 0o777) == 0o600:
                return
        except OSError:
            pass
        atomic_write(self.conf_path, text, 0o600)

    def _bring_up(self, peers: Sequence[WireGuardPeer]) -> None:
        key = self.identity.wireguard_private_key
        conf = render_wg_conf(key, self.settings.wireguard_port, peers)
        check_rendered(conf, "the `wg syncconf` input", {"PrivateKey": key, "ListenPort": str(self.settings.wireguard_port)}, peers)
        link = self._link()
        if link is None:
            self._create()
            link = self._link()
            if link is None:
                raise WireGuardError(f"{self.interface} did not appear after creating it")
        # /dev/stdin keeps the private key out of argv and off the disk a second time.
        self._run(["wg", "syncconf", self.interface, "/dev/stdin"], input=conf, secrets=(key,))
        for info in link.get("addr_info") or []:
            if info.get("family") == "inet" and info.get("local") != self.address:
                self._run(["ip", "-4", "address", "del", f"{info.get('local')}/{info.get('prefixlen')}", "dev", self.interface])
        self._run(["ip", "-4", "address", "replace", f"{self.address}/32", "dev", self.interface])
        self._run(["ip", "link", "set", "dev", self.interface, "mtu", str(self.settings.wireguard_mtu), "up"])
        self._sync_routes(peers)

    def _create(self) -> None:
        try:
            self._run(["ip", "link", "add", "dev", self.interface, "type", "wireguard"])
            log.info("wireguard: created %s (kernel module)", self.interface)
            return
        except CommandError as exc:
            # Same fallback as wg-quick: no kernel module -> the userspace implementation.
            log.info("wireguard: kernel WireGuard unavailable (%s); starting %s", exc.stderr.strip()[:200], self.userspace)
        self._run([self.userspace, self.interface])
        deadline = time.monotonic() + 5
        while self._link() is None:
            if time.monotonic() > deadline:
                raise WireGuardError(f"{self.userspace} did not create {self.interface}")
            time.sleep(0.05)
        log.info("wireguard: created %s with %s", self.interface, self.userspace)

    def _wanted_routes(self, peers: Sequence[WireGuardPeer]) -> set[str]:
        wanted = set()
        for peer in peers:
            for network in _networks(peer.allowed_ips.split(",")):
                if ipaddress.ip_network(network).version == 4:
                    wanted.add(network)
        return wanted

    def _routes(self) -> set[str]:
        text = self._run(["ip", "-j", "-4", "route", "show", "dev", self.interface]).stdout
        routes = set()
        for route in _json_list(text, "ip route"):
            if route.get("protocol") == "kernel" or route.get("table") not in (None, "main"):
                continue
            dst = route.get("dst", "")
            if dst and dst != "default":
                try:
                    routes.add(str(ipaddress.ip_network(dst, strict=False)))
                except ValueError:
                    continue
        return routes

    def _sync_routes(self, peers: Sequence[WireGuardPeer]) -> None:
        """Routes for every peer CIDR via the interface; one `ip -batch` for the whole diff."""
        wanted = self._wanted_routes(peers)
        present = self._routes()
        commands = [f"route replace {net} dev {self.interface}" for net in sorted(wanted - present)]
        commands += [f"route del {net} dev {self.interface}" for net in sorted(present - wanted)]
        if commands:
            self._run(["ip", "-batch", "-"], input="\n".join(commands) + "\n")

    def _link(self) -> dict[str, Any] | None:
        result = self._run(["ip", "-j", "address", "show", "dev", self.interface], check=False)
        if result.returncode != 0:
            if "does not exist" in result.stderr or "Cannot find device" in result.stderr:
                return None
            raise WireGuardError(f"cannot read {self.interface}: {result.stderr.strip()[:300]}")
        links = _json_list(result.stdout, "ip address")
        return links[0] if links else None

    def _run(self, argv: Sequence[str], *, input: str | None = None, secrets: Sequence[str] = (), check: bool = True) -> Result:
        return run([*self._prefix, *argv], timeout=self.timeout, input=input, secrets=secrets, check=check)


def _json_list(text: str, what: str) -> list[dict[str, Any]]:
    try:
        value = json.loads(text or "[]")
    except json.JSONDecodeError as exc:
        raise WireGuardError(f"`{what}` did not print JSON: {exc}") from exc
    if not isinstance(value, list):
        raise WireGuardError(f"`{what}` printed {type(value).__name__}, expected a list")
    return [item for item in value if isinstance(item, dict)]
