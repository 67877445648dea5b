"""`*.internal` DNS for the host and its containers (PROTOCOL.md §9.7), served by dnsmasq.

Differences from the original agent, on purpose (§17 items 20, 22):
* records live in a hosts file inside a dnsmasq `hostsdir`, which dnsmasq re-reads by
  inotify: applying records never restarts dnsmasq;
* our settings are a drop-in in `dnsmasq_conf_dir`; `/etc/dnsmasq.conf` is left alone;
* dnsmasq listens on 127.0.0.1 and on the container gateway 10.200.X.1 (`bind-dynamic`, so it
  starts before the bridge exists), and containers get the gateway as resolver;
* `local=/internal/`: unknown `*.internal` names get NXDOMAIN and are never forwarded (no
  wildcard answer); other names go to real upstream servers, never to a loopback stub,
  so systemd-resolved (which sends `~internal` to dnsmasq) and dnsmasq cannot loop;
* duplicate names are merged on both sides of the hash; names must end in `.internal`;
* each agent owns its own files: the registered agent (and the original one) `techulus.conf`
  and `records`; a standalone agent `techulus-<owner>.conf` and `records-<owner>` (its owner
  mark, see `agent.identity.standalone_owner`), so one beside a registered agent never
  rewrites the other's; dnsmasq refuses a repeated `port=`, so a standalone drop-in leaves
  the port to another drop-in that already sets the same one (and refuses a different one);
* a bad record (outside `.internal`, not canonical) is skipped with one line (counted, not
  repeated every poll) and the others are served;
* every file is read back before it is written and written only when it holds exactly the
  intended lines and records: no value from the wire can become a line of its own.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from agent import validate
from agent.drift import dns_hash, merge_dns_records
from agent.fsutil import atomic_write, ensure_dir
from agent.host.run import CommandError, run
from agent.identity import AgentConfig
from agent.model import DnsRecord, ExpectedState
from agent.problems import ProblemLog
from agent.settings import Settings
from agent.validate import InvalidValue

log = logging.getLogger(__name__)

DROP_IN_NAME = "techulus.conf"
HOSTS_FILE_NAME = "records"
RESOLVED_DROP_IN_NAME = "techulus-internal.conf"
DEFAULT_RESOLV_FILES = (Path("/run/systemd/resolve/resolv.conf"), Path("/etc/resolv.conf"))
HEADER = "# Written by techulus-agent; changes are overwritten.\n"

TYPE_A = 1
TYPE_AAAA = 28


class DnsError(RuntimeError):
    """dnsmasq could not be configured, or does not serve what we wrote."""


# --- pure parts --------------------------------------------------------------------------------


def sort_records(records: Sequence[DnsRecord], domain: str = "internal") -> tuple[list[DnsRecord], list[str]]:
    """(the records safe to write into a hosts file, one problem per skipped record)."""
    usable: list[DnsRecord] = []
    problems: list[str] = []
    suffix = "." + domain
    for index, record in enumerate(records):
        label = f"dns record #{index}"
        try:
            name = validate.hostname(record.name, "dns name")
            label = f"dns record {name}"
            if name != record.name:
                raise InvalidValue(f"name {record.name!r} must be lower case without a trailing dot")
            if not name.endswith(suffix) or name == suffix[1:]:
                raise InvalidValue(f"only names under .{domain} are served here")
            if not record.ips:
                raise InvalidValue("has no ips")
            for ip in record.ips:
                if validate.ip_address(ip, "ip") != ip:
                    raise InvalidValue(f"ip {ip!r} is not in canonical form")
        except InvalidValue as exc:
            problems.append(f"{label}: {exc}; skipped")
            continue
        usable.append(record)
    return usable, problems


def validate_records(records: Sequence[DnsRecord], domain: str = "internal") -> list[str]:
    """Every problem with the records (empty when all are safe to write into a hosts file)."""
    return sort_records(records, domain)[1]


def render_hosts(records: Iterable[DnsRecord]) -> str:
    lines = [f"{ip} {record.name}" for record in records for ip in record.ips]
    return HEADER + "".join(line + "\n" for line in lines)


def check_hosts(text: str, records: Sequence[DnsRecord]) -> None:
    """Refuse (DnsError) unless a rendered hosts file holds exactly one `ip name` line per
    address of `records` and reads back (as dnsmasq groups it) as exactly those records."""
    wanted = [f"{ip} {record.name}" for record in records for ip in record.ips]
    _check_lines(text, "the dnsmasq hosts file", [HEADER.rstrip("\n"), *wanted])
    for line in wanted:
        fields = line.split()
        if len(fields) != 2 or "#" in line:
            raise DnsError(f"the dnsmasq hosts file line {line[:80]!r} is not one address and one name; nothing was written")
    if parse_hosts(text) != list(records):
        raise DnsError("the dnsmasq hosts file does not read back as the intended records; nothing was written")


def _check_lines(text: str, what: str, wanted: Sequence[str]) -> None:
    """Refuse unless `text` is exactly the lines `wanted`, each one line for every reader."""
    try:
        lines = validate.one_line_text(text, what)
    except InvalidValue as exc:
        raise DnsError(f"{exc}; nothing was written") from None
    if lines != list(wanted):
        raise DnsError(f"{what} does not read back as the intended lines; nothing was written")


def parse_hosts(text: str) -> list[DnsRecord]:
    """What dnsmasq serves from a hosts file, grouped by name (first-seen order)."""
    grouped: dict[str, list[str]] = {}
    for raw in text.splitlines():
        fields = raw.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            ip = str(ipaddress.ip_address(fields[0]))
        except ValueError:
            continue
        for name in fields[1:]:
            ips = grouped.setdefault(name.lower(), [])
            if ip not in ips:
                ips.append(ip)
    return [DnsRecord(name, tuple(ips)) for name, ips in grouped.items()]


def render_dnsmasq_conf(
    port: int | None, listen: Sequence[str], hosts_dir: Path, upstreams: Sequence[str], domain: str = "internal"
) -> str:
    return "\n".join([HEADER.rstrip("\n"), *dnsmasq_conf_lines(port, listen, hosts_dir, upstreams, domain)]) + "\n"


def dnsmasq_conf_lines(
    port: int | None, listen: Sequence[str], hosts_dir: Path, upstreams: Sequence[str], domain: str = "internal"
) -> list[str]:
    """The settings of our drop-in, one per line; `port` None leaves the port to another
    drop-in (dnsmasq refuses a second `port=` line)."""
    lines = [f"port={port}"] if port is not None else []
    lines += [
        f"listen-address={','.join(listen)}",
        # bind-dynamic: start even before the container bridge (10.200.X.1) exists.
        "bind-dynamic",
        "no-resolv",
        "domain-needed",
        f"local=/{domain}/",
        f"hostsdir={hosts_dir}",
    ]
    lines += [f"server={server}" for server in upstreams]
    return lines


def port_set_elsewhere(conf_dir: Path, ours: Path) -> tuple[Path, int] | None:
    """(the file, the port) of the first other `*.conf` drop-in in `conf_dir` that sets
    dnsmasq's `port=`; None when none does (or the directory cannot be read)."""
    try:
        others = sorted(path for path in Path(conf_dir).glob("*.conf") if path.name != ours.name)
    except OSError:
        return None
    for path in others:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and key.strip() == "port" and value.strip().isdigit():
                return path, int(value.strip())
    return None


def resolved_conf_lines(port: int, domain: str = "internal") -> list[str]:
    server = "127.0.0.1" if port == 53 else f"127.0.0.1:{port}"
    return [HEADER.rstrip("\n"), "[Resolve]", f"DNS={server}", f"Domains=~{domain}"]


def render_resolved_conf(port: int, domain: str = "internal") -> str:
    return "\n".join(resolved_conf_lines(port, domain)) + "\n"


def upstream_servers(resolv_files: Sequence[Path], exclude: Iterable[str]) -> list[str]:
    """Real upstream resolvers: the first resolv file listing a non-loopback nameserver.

    Loopback entries (systemd-resolved's 127.0.0.53 stub, our own 127.0.0.1) are skipped:
    forwarding there is exactly the loop that §17 item 22 describes.
    """
    excluded = set(exclude)
    for path in resolv_files:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError:
            continue
        found = []
        for line in text.splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "nameserver":
                try:
                    # A zone id (fe80::1%eth0) cannot go into a server= line: dropped.
                    address = validate.ip_address(fields[1].split("%", 1)[0], "nameserver")
                except InvalidValue:
                    continue
                if ipaddress.ip_address(address).is_loopback or address in excluded or address in found:
                    continue
                found.append(address)
        if found:
            return found
    return []


def check_upstream(value: str) -> str:
    """`ip` or `ip#port`, as dnsmasq's server= takes it."""
    address, _, port = value.partition("#")
    validate.ip_address(address, "dns upstream server")
    if port:
        validate.port(int(port) if port.isascii() and port.isdigit() else -1, "dns upstream server port")
    return value


# --- a minimal DNS client for verification -----------------------------------------------------


def build_query(name: str, qtype: int, query_id: int) -> bytes:
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.rstrip(".").split(".")) + b"\0"
    return header + qname + struct.pack("!HH", qtype, 1)


def _skip_name(packet: bytes, offset: int) -> int:
    while True:
        if offset >= len(packet):
            raise ValueError("truncated name")
        length = packet[offset]
        if length & 0xC0 == 0xC0:
            return offset + 2
        if length == 0:
            return offset + 1
        offset += 1 + length


def parse_answer(packet: bytes, query_id: int, qtype: int) -> tuple[int, list[str]]:
    """(rcode, addresses of type `qtype`) of a DNS response."""
    if len(packet) < 12:
        raise ValueError("short DNS response")
    rid, flags, qdcount, ancount, _, _ = struct.unpack("!HHHHHH", packet[:12])
    if rid != query_id:
        raise ValueError("response to another query")
    offset = 12
    for _ in range(qdcount):
        offset = _skip_name(packet, offset) + 4
    addresses = []
    for _ in range(ancount):
        offset = _skip_name(packet, offset)
        rtype, _, _, length = struct.unpack("!HHIH", packet[offset : offset + 10])
        offset += 10
        data = packet[offset : offset + length]
        offset += length
        if rtype == qtype == TYPE_A and length == 4:
            addresses.append(str(ipaddress.IPv4Address(data)))
        elif rtype == qtype == TYPE_AAAA and length == 16:
            addresses.append(str(ipaddress.IPv6Address(data)))
    return flags & 0x000F, addresses


def lookup(server: str, port: int, name: str, timeout: float = 2.0) -> list[str]:
    """All A and AAAA addresses `server` answers for `name` (sorted).

    `timeout` bounds the whole lookup (both queries): a server that never answers costs
    exactly that, so callers can keep an overall deadline. Raises TimeoutError then.
    """
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    deadline = time.monotonic() + timeout
    found: list[str] = []
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(max(0.001, timeout))
        sock.connect((server, port))
        for qtype in (TYPE_A, TYPE_AAAA):
            query_id = secrets.randbelow(65536)
            sock.send(build_query(name, qtype, query_id))
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no answer from {server}:{port} for {name} within {timeout:g}s")
                sock.settimeout(remaining)
                try:
                    packet = sock.recv(4096)
                except TimeoutError:
                    raise TimeoutError(f"no answer from {server}:{port} for {name} within {timeout:g}s") from None
                try:
                    _, addresses = parse_answer(packet, query_id, qtype)
                except ValueError:
                    continue  # a late answer to an earlier query, or garbage: keep waiting
                found += addresses
                break
    return sorted(found)


# --- the adapter -------------------------------------------------------------------------------


def container_dns_servers(settings: Settings, config: AgentConfig) -> tuple[str, ...]:
    """Resolvers for `podman run --dns`: the gateway where our dnsmasq listens, when DNS is ours.

    A container's resolv.conf cannot name a port, so a dnsmasq moved off port 53 cannot serve
    containers; then they keep podman's default resolvers (and a warning is logged).
    """
    configured = settings.container_dns or ""
    if configured:
        return tuple(validate.ip_address(part.strip(), "container_dns") for part in configured.split(",") if part.strip())
    if not settings.manage_dns:
        return ()
    if settings.dns_port != 53:
        log.warning("dns_port is %d, not 53: containers cannot use the local resolver for *.internal", settings.dns_port)
        return ()
    return (config.container_gateway,)


class DnsSync:
    """ConfigSync for `*.internal` records.

    `config` gives the container gateway dnsmasq also listens on (registered: config.json;
    standalone: the state file's subnetId). `owner` "" is the registered agent; a standalone
    agent passes its owner mark, which names its files."""

    name = "dns"

    def __init__(self, settings: Settings, config: AgentConfig, *, owner: str = "") -> None:
        if owner:
            try:
                validate.identifier(owner, "dns owner")  # it becomes part of file names
            except InvalidValue as exc:
                raise DnsError(str(exc)) from None
        self.settings = settings
        self.config = config
        self.owner = owner
        self.domain: str = settings.dns_domain or "internal"
        self.listen_host: str = validate.ip_address(settings.dns_listen_host or "127.0.0.1", "dns_listen_host")
        self.gateway = validate.ip_address(config.container_gateway, "container gateway")
        self.verify_timeout = float(settings.dns_verify_timeout)
        self.restart_command: tuple[str, ...] = tuple(
            settings.dnsmasq_restart_command
        )
        self.resolved_dir: Path | None = settings.resolved_conf_dir
        self.resolved_restart_command: tuple[str, ...] = tuple(
            settings.resolved_restart_command
        )
        self.resolv_files: tuple[Path, ...] = tuple(Path(p) for p in settings.dns_resolv_files)
        self.explicit_upstreams: tuple[str, ...] = tuple(
            check_upstream(s) for s in settings.dns_upstream_servers or ()
        )
        self.problems = ProblemLog(log, "dns", cleared="records are all valid again")

    @property
    def conf_path(self) -> Path:
        name = f"techulus-{self.owner}.conf" if self.owner else DROP_IN_NAME
        return Path(self.settings.dnsmasq_conf_dir) / name

    @property
    def hosts_path(self) -> Path:
        return Path(self.settings.dns_hosts_dir) / (f"{HOSTS_FILE_NAME}-{self.owner}" if self.owner else HOSTS_FILE_NAME)

    @property
    def resolved_path(self) -> Path | None:
        if self.resolved_dir is None:
            return None
        name = f"techulus-internal-{self.owner}.conf" if self.owner else RESOLVED_DROP_IN_NAME
        return Path(self.resolved_dir) / name

    def owns_configuration(self) -> bool:
        """Whether our drop-in is there (from this run or an earlier one)."""
        return self.conf_path.exists()

    def remove_own(self) -> bool:
        """Remove our drop-in, hosts file and resolved drop-in (a standalone agent going
        down), restarting what read them; True when there was something to remove."""
        had_conf = self.conf_path.exists()
        resolved = self.resolved_path
        had_resolved = resolved is not None and resolved.exists()
        removed = False
        for path in (self.conf_path, self.hosts_path, resolved):
            if path is not None and path.exists():
                path.unlink()
                removed = True
                log.info("dns: removed %s", path)
        if had_conf and self.restart_command:
            try:
                run(self.restart_command, timeout=60)
            except CommandError as exc:
                raise DnsError(f"dnsmasq did not restart without {self.conf_path}: {exc}") from exc
        if had_resolved and self.resolved_restart_command:
            try:
                run(self.resolved_restart_command, timeout=60)
            except CommandError as exc:
                log.warning("dns: systemd-resolved did not restart: %s", exc)
        return removed

    def port_line(self) -> int | None:
        """The port our drop-in sets. The registered agent's drop-in always sets it (as the
        original's did); a standalone one leaves it to another drop-in that already sets the
        same port, and refuses when that one sets a different port (one dnsmasq, one port)."""
        port = int(self.settings.dns_port)
        if not self.owner:
            return port
        found = port_set_elsewhere(Path(self.settings.dnsmasq_conf_dir), self.conf_path)
        if found is None:
            return port
        path, other = found
        if other != port:
            raise DnsError(f"dnsmasq answers on port {other} (set by {path}); this agent's dns_port is {port}: set dns_port = {other}")
        return None

    def listen_addresses(self) -> list[str]:
        return list(dict.fromkeys([self.listen_host, self.gateway]))

    def render_conf(self) -> str:
        upstreams = list(self.explicit_upstreams) or upstream_servers(self.resolv_files, self.listen_addresses())
        if not upstreams:
            log.warning("dns: no upstream resolver found in %s: containers will not resolve public names",
                        ", ".join(map(str, self.resolv_files)))
        args = (self.port_line(), self.listen_addresses(), Path(self.settings.dns_hosts_dir), upstreams, self.domain)
        text = render_dnsmasq_conf(*args)
        _check_lines(text, str(self.conf_path), [HEADER.rstrip("\n"), *dnsmasq_conf_lines(*args)])
        return text

    # ConfigSync ---------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Write our drop-in (restarting dnsmasq only when it changed) and the resolved drop-in."""
        ensure_dir(self.settings.dns_hosts_dir, 0o755)
        if not self.hosts_path.exists():
            atomic_write(self.hosts_path, render_hosts([]), 0o644)
        self._ensure_conf()
        self._ensure_resolved()

    def expected_hash(self, state: ExpectedState) -> str:
        return dns_hash(merge_dns_records(self.usable(state.dns_records)))

    def usable(self, records: Sequence[DnsRecord]) -> list[DnsRecord]:
        """The records that are served; the skipped ones are reported once (then counted)."""
        usable, problems = sort_records(records, self.domain)
        self.problems.report(problems)
        return usable

    def actual_hash(self) -> str:
        """What dnsmasq serves from our files; raises when our drop-in is missing or stale."""
        try:
            conf = self.conf_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DnsError(f"{self.conf_path} is missing: dnsmasq does not serve our records") from None
        except OSError as exc:
            raise DnsError(f"cannot read {self.conf_path}: {exc.strerror}") from exc
        if conf != self.render_conf():
            raise DnsError(f"{self.conf_path} differs from what it should be")
        return dns_hash(self.served_records())

    def served_records(self) -> list[DnsRecord]:
        try:
            text = self.hosts_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise DnsError(f"cannot read {self.hosts_path}: {exc.strerror}") from exc
        return parse_hosts(text)

    def apply(self, state: ExpectedState) -> None:
        self.apply_records(state.dns_records)

    def apply_records(self, records: Sequence[DnsRecord]) -> None:
        """Skip the bad records, write the rest, verify that dnsmasq serves them.

        When every listed record is bad nothing is changed: that is a broken list (or a
        broken setting here), not a request to serve no names."""
        listed = list(records)
        usable = self.usable(listed)
        if listed and not usable:
            raise DnsError(f"refusing to write DNS records: none of the {len(listed)} listed is valid (nothing was changed)")
        merged = merge_dns_records(usable)
        text = render_hosts(merged)
        check_hosts(text, merged)
        ensure_dir(self.settings.dns_hosts_dir, 0o755)
        self._ensure_conf()
        previous = {record.name for record in self.served_records()}
        # The temp file starts with '.', which dnsmasq's inotify ignores; the rename is what it reads.
        atomic_write(self.hosts_path, text, 0o644)
        self._verify(merged, previous - {record.name for record in merged})
        log.info("dns: %d *.%s names served", len(merged), self.domain)

    # Internals ----------------------------------------------------------------------------------

    def _ensure_conf(self) -> None:
        wanted = self.render_conf()
        try:
            current = self.conf_path.read_text(encoding="utf-8")
        except OSError:
            current = None
        if current == wanted:
            return
        ensure_dir(self.conf_path.parent, 0o755)
        atomic_write(self.conf_path, wanted, 0o644)
        log.info("dns: wrote %s", self.conf_path)
        if self.restart_command:
            try:
                run(self.restart_command, timeout=60)
            except CommandError as exc:
                raise DnsError(f"dnsmasq did not restart with the new {self.conf_path}: {exc}") from exc

    def _ensure_resolved(self) -> None:
        """Send `~internal` from systemd-resolved to dnsmasq (only where resolved is installed)."""
        path = self.resolved_path
        if path is None or not path.parent.parent.is_dir():
            return
        wanted = render_resolved_conf(self.settings.dns_port, self.domain)
        _check_lines(wanted, str(path), resolved_conf_lines(self.settings.dns_port, self.domain))
        try:
            if path.read_text(encoding="utf-8") == wanted:
                return
        except OSError:
            pass
        ensure_dir(path.parent, 0o755)
        atomic_write(path, wanted, 0o644)
        if self.resolved_restart_command:
            try:
                run(self.resolved_restart_command, timeout=60)
            except CommandError as exc:
                # The host then cannot resolve *.internal, containers still can: not fatal.
                log.warning("dns: systemd-resolved did not restart: %s", exc)

    def _verify(self, records: Sequence[DnsRecord], removed: Iterable[str]) -> None:
        """Ask dnsmasq until every record answers exactly its ips and removed names answer nothing.

        The deadline is checked before every name and bounds every lookup, so a dnsmasq that
        accepts queries but never answers costs `dns_verify_timeout` in all, not a second per name.
        """
        wanted = {record.name: sorted(record.ips) for record in records}
        wanted.update({name: [] for name in removed})
        deadline = time.monotonic() + self.verify_timeout
        pending = dict(wanted)
        last_error = ""
        while pending:
            for name, ips in list(pending.items()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    if lookup(self.listen_host, self.settings.dns_port, name, timeout=min(1.0, remaining)) == ips:
                        del pending[name]
                except (OSError, ValueError) as exc:
                    last_error = f" ({exc})"
            remaining = deadline - time.monotonic()
            if not pending or remaining <= 0:
                break
            time.sleep(min(0.02, remaining))
        if pending:
            names = ", ".join(sorted(pending)[:20])
            more = f" and {len(pending) - 20} more" if len(pending) > 20 else ""
            raise DnsError(
                f"dnsmasq at {self.listen_host}:{self.settings.dns_port} does not serve the new records for "
                f"{names}{more} after {self.verify_timeout:g}s{last_error}"
            )
