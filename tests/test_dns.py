"""DNS unit tests: config rendering, hosts parsing, upstream choice, restarts (subprocess faked)."""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from agent.drift import dns_hash
from agent.host.dns import (
    TYPE_A,
    TYPE_AAAA,
    DnsError,
    DnsSync,
    build_query,
    check_hosts,
    check_upstream,
    parse_answer,
    parse_hosts,
    render_dnsmasq_conf,
    render_hosts,
    upstream_servers,
    validate_records,
)
from agent.identity import AgentConfig
from agent.model import DnsRecord, ExpectedState
from agent.settings import Settings


def make(tmp_path: Path, owner: str = "", **extra: object) -> DnsSync:
    settings = replace(Settings(), dnsmasq_conf_dir=tmp_path / "d", dns_hosts_dir=tmp_path / "h", data_dir=tmp_path)
    values = {"resolved_conf_dir": tmp_path / "resolved.conf.d", "dns_resolv_files": (tmp_path / "resolv.conf",)}
    values.update(extra)
    settings = replace(settings, **values)
    return DnsSync(settings, AgentConfig("s", 3, "10.100.3.1"), owner=owner)


def test_conf_rendering() -> None:
    text = render_dnsmasq_conf(53, ["127.0.0.1", "10.200.3.1"], Path("/etc/techulus/dns-hosts"), ["192.0.2.53", "192.0.2.54"])
    lines = text.splitlines()
    assert lines[1:] == [
        "port=53",
        "listen-address=127.0.0.1,10.200.3.1",
        "bind-dynamic",
        "no-resolv",
        "domain-needed",
        "local=/internal/",
        "hostsdir=/etc/techulus/dns-hosts",
        "server=192.0.2.53",
        "server=192.0.2.54",
    ]
    assert "address=/internal/" not in text  # no wildcard answer for unknown names


def test_hosts_round_trip_and_merge() -> None:
    records = [DnsRecord("a.internal", ("10.200.1.2", "10.200.2.2")), DnsRecord("b.internal", ("fd00::1",))]
    text = render_hosts(records)
    assert text.splitlines()[1:] == ["10.200.1.2 a.internal", "10.200.2.2 a.internal", "fd00::1 b.internal"]
    assert parse_hosts(text) == records
    assert parse_hosts("10.0.0.1 x.internal\n10.0.0.1 x.internal\n# c\nbad line\n10.0.0.2 X.internal y.internal\n") == [
        DnsRecord("x.internal", ("10.0.0.1", "10.0.0.2")), DnsRecord("y.internal", ("10.0.0.2",))
    ]


def test_duplicate_names_do_not_drift(tmp_path: Path, fp) -> None:  # type: ignore[no-untyped-def]
    dns = make(tmp_path, dnsmasq_restart_command=(), resolved_restart_command=(), dns_upstream_servers=("192.0.2.53",))
    dns.prepare()
    state = ExpectedState(dns_records=(DnsRecord("a.internal", ("10.200.1.2",)), DnsRecord("a.internal", ("10.200.2.2",))))
    dns.hosts_path.write_text(render_hosts([DnsRecord("a.internal", ("10.200.1.2", "10.200.2.2"))]))
    assert dns.actual_hash() == dns.expected_hash(state)
    assert dns.expected_hash(state) != dns_hash(state.dns_records)  # the unmerged (upstream) hash would drift


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        (DnsRecord("a\n.internal", ("10.0.0.1",)), "not a valid host name"),
        (DnsRecord("a/b.internal", ("10.0.0.1",)), "not a valid host name"),
        (DnsRecord("A.internal", ("10.0.0.1",)), "lower case"),
        (DnsRecord("example.com", ("10.0.0.1",)), "only names under .internal"),
        (DnsRecord("internal", ("10.0.0.1",)), "only names under .internal"),
        (DnsRecord("a.internal", ()), "has no ips"),
        (DnsRecord("a.internal", ("10.0.0.1 b.internal",)), "not an IPv4 address"),
        (DnsRecord("a.internal", ("010.0.0.1",)), "not an IPv4 address"),
    ],
)
def test_bad_records(record: DnsRecord, problem: str) -> None:
    problems = validate_records([record])
    assert problems and problem in problems[0], problems


def test_bad_records_touch_nothing(tmp_path: Path, fp) -> None:  # type: ignore[no-untyped-def]
    dns = make(tmp_path)
    with pytest.raises(Exception, match="nothing was changed"):
        dns.apply(ExpectedState(dns_records=(DnsRecord("evil.com", ("10.0.0.1",)),)))
    assert not dns.conf_path.exists() and not dns.hosts_path.exists()


def test_one_bad_record_is_skipped_once_and_the_rest_hashed(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    dns = make(tmp_path)
    good = DnsRecord("api.internal", ("10.200.1.2",))
    state = ExpectedState(dns_records=(DnsRecord("www.google.com", ("6.6.6.6",)), good))
    with caplog.at_level("INFO"):
        for _ in range(3):
            assert dns.expected_hash(state) == dns_hash([good])
    assert len([r for r in caplog.records if "only names under .internal" in r.getMessage()]) == 1


@pytest.mark.parametrize(
    "records",
    [
        [DnsRecord("a.internal", ("10.0.0.1\n6.6.6.6 www.google.com",))],
        [DnsRecord("a.internal", ("fe80::1%x\n6.6.6.6 www.google.com",))],
        [DnsRecord("a.internal\n6.6.6.6 www.google.com", ("10.0.0.1",))],
        [DnsRecord("a.internal www.google.com", ("10.0.0.1",))],
        [DnsRecord("a.internal", ("10.0.0.1\u2028x",))],
        [DnsRecord("a.internal#x", ("10.0.0.1",))],
    ],
)
def test_a_hosts_file_that_would_not_read_back_is_refused(records: list[DnsRecord]) -> None:
    with pytest.raises(DnsError, match="nothing was written"):
        check_hosts(render_hosts(records), records)


def test_bad_records_never_reach_the_hosts_file(tmp_path: Path, fp) -> None:  # type: ignore[no-untyped-def]
    dns = make(tmp_path)
    # Bypassing the model (a DnsRecord built by hand) still writes nothing.
    with pytest.raises(DnsError, match="nothing was changed"):
        dns.apply_records([DnsRecord("a.internal", ("fe80::1%x\n6.6.6.6 www.google.com",))])
    assert not dns.hosts_path.exists()


def test_drop_in_with_a_line_break_in_a_setting_is_refused(tmp_path: Path) -> None:
    dns = make(tmp_path, dns_upstream_servers=("192.0.2.53",), dns_hosts_dir=Path("/x\nserver=6.6.6.6"))
    with pytest.raises(DnsError, match="nothing was written"):
        dns.render_conf()


def test_upstreams_skip_loopback_stubs(tmp_path: Path) -> None:
    stub = tmp_path / "stub"
    stub.write_text("nameserver 127.0.0.53\noptions edns0\n")
    real = tmp_path / "real"
    real.write_text("# resolved\nnameserver 127.0.0.1\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nnameserver 10.200.3.1\n")
    assert upstream_servers([stub, real], ["10.200.3.1"]) == ["192.0.2.53", "fe80::1"]
    assert upstream_servers([stub, tmp_path / "missing"], []) == []
    assert check_upstream("127.0.0.1#5353") == "127.0.0.1#5353"
    for bad in ("1.2.3.4#x", "nope", "1.2.3.4#70000", "1.2.3.4\nserver=9.9.9.9", "1.2.3.4#５３", "fe80::1%eth0"):
        with pytest.raises(ValueError):
            check_upstream(bad)


def test_restart_only_when_the_drop_in_changes(tmp_path: Path, fp) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "resolv.conf").write_text("nameserver 192.0.2.53\n")
    dns = make(tmp_path)
    fp.register(["systemctl", "restart", "dnsmasq"])
    fp.register(["systemctl", "try-restart", "systemd-resolved"], returncode=1, stderr="not booted with systemd")
    dns.prepare()
    dns.prepare()
    assert fp.call_count(["systemctl", "restart", "dnsmasq"]) == 1
    assert "server=192.0.2.53" in dns.conf_path.read_text()
    assert (tmp_path / "resolved.conf.d" / "techulus-internal.conf").read_text().endswith("DNS=127.0.0.1\nDomains=~internal\n")
    # The upstream changed (DHCP): the drop-in is stale, which is drift, and apply restarts once.
    (tmp_path / "resolv.conf").write_text("nameserver 192.0.2.99\n")
    with pytest.raises(Exception, match="differs"):
        dns.actual_hash()


def test_a_standalone_agent_has_files_of_its_own_and_leaves_the_port_to_a_drop_in_that_sets_it(
    tmp_path: Path, fp  # type: ignore[no-untyped-def]
) -> None:
    (tmp_path / "resolv.conf").write_text("nameserver 192.0.2.53\n")
    registered = make(tmp_path, dnsmasq_restart_command=(), resolved_restart_command=())
    standalone = make(tmp_path, owner="standalone-1234", dnsmasq_restart_command=(), resolved_restart_command=())
    assert standalone.conf_path.name == "techulus-standalone-1234.conf" != registered.conf_path.name
    assert standalone.hosts_path.name == "records-standalone-1234" != registered.hosts_path.name
    assert standalone.resolved_path is not None and standalone.resolved_path.name == "techulus-internal-standalone-1234.conf"
    # Alone, the standalone drop-in sets the port itself.
    assert standalone.render_conf().splitlines()[1] == "port=53"
    registered.prepare()
    standalone.prepare()
    # Beside the registered agent's drop-in (which sets port=53) it must not: dnsmasq refuses
    # a repeated port= and would not start at all.
    assert "port=" not in standalone.conf_path.read_text()
    assert registered.conf_path.read_text().splitlines()[1] == "port=53", "the registered drop-in is unchanged"
    assert standalone.actual_hash() == registered.actual_hash(), "both read only their own hosts file"
    standalone.hosts_path.write_text(render_hosts([DnsRecord("mine.internal", ("10.200.3.2",))]))
    assert standalone.served_records() == [DnsRecord("mine.internal", ("10.200.3.2",))]
    assert registered.served_records() == []
    # Another port in the other drop-in: one dnsmasq cannot answer on two, so a clear refusal.
    other = make(tmp_path, owner="standalone-1234", dns_port=5353)
    with pytest.raises(DnsError, match=r"dnsmasq answers on port 53 \(set by .*techulus.conf\); .*dns_port is 5353"):
        other.render_conf()
    with pytest.raises(DnsError, match="dns owner"):
        make(tmp_path, owner="../etc")


def test_dns_wire_format() -> None:
    query = build_query("api.internal", TYPE_A, 0x1234)
    assert query[:2] == b"\x12\x34" and b"\x03api\x08internal\x00" in query
    answer = (
        struct.pack("!HHHHHH", 0x1234, 0x8180, 1, 2, 0, 0) + query[12:]
        + b"\xc0\x0c" + struct.pack("!HHIH", TYPE_A, 1, 0, 4) + bytes([10, 200, 1, 2])
        + b"\xc0\x0c" + struct.pack("!HHIH", TYPE_AAAA, 1, 0, 16) + bytes(16)
    )
    assert parse_answer(answer, 0x1234, TYPE_A) == (0, ["10.200.1.2"])
    with pytest.raises(ValueError):
        parse_answer(answer, 0x9999, TYPE_A)


def test_verification_against_a_silent_server_ends_at_the_timeout(tmp_path: Path, fp) -> None:  # type: ignore[no-untyped-def]
    # A hung dnsmasq: the port is bound (no ICMP refusal) but nothing ever answers. Each
    # silent name used to cost up to 2 s and the deadline was only checked after a full
    # pass, so 250 names took minutes; now the whole apply() ends at dns_verify_timeout.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        dns = make(tmp_path, dns_port=silent.getsockname()[1], dns_verify_timeout=1.0, dnsmasq_restart_command=(),
                   resolved_restart_command=(), dns_upstream_servers=("192.0.2.53",))
        records = tuple(DnsRecord(f"svc{i}.internal", (f"10.200.1.{i % 250 + 2}",)) for i in range(250))
        outcome: list[BaseException] = []

        def apply() -> None:
            try:
                dns.apply(ExpectedState(dns_records=records))
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome.append(exc)

        worker = threading.Thread(target=apply, daemon=True)
        worker.start()
        worker.join(timeout=1.0 + 3.0)  # generous slack over the 1 s timeout; the old code needed ~500 s
        assert not worker.is_alive(), "apply() is still verifying long after dns_verify_timeout"
    assert len(outcome) == 1 and isinstance(outcome[0], DnsError), outcome
    message = str(outcome[0])
    assert "does not serve the new records for svc0.internal" in message
    assert "and 230 more after 1s" in message and "no answer from 127.0.0.1" in message

