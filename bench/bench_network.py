"""Speed figures for the networking adapters, on the real tools (run as root from the repo root).

    .venv/bin/python bench/bench_network.py

Prints: time to apply a 250-peer WireGuard mesh and the packets an existing tunnel lost
meanwhile; time to apply 1,000 Caddy routes and until a changed route answers requests;
how long a DNS change takes to be answered by dnsmasq, which is not restarted.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import crypto  # noqa: E402
from agent.host.caddy import CaddySync  # noqa: E402
from agent.fsutil import atomic_write  # noqa: E402
from agent.host.dns import DnsSync, lookup, render_hosts  # noqa: E402
from agent.host.wireguard import WireGuardSync  # noqa: E402
from agent.identity import AgentConfig, Identity  # noqa: E402
from agent.model import CaddyRoute, DnsRecord, WireGuardPeer  # noqa: E402
from agent.settings import Settings  # noqa: E402
from tests.netns import Lan, in_ns  # noqa: E402
from tests.test_caddy_real import CaddyProcess, Upstream, free_port  # noqa: E402
from tests.test_dns_real import free_udp_port, start_dnsmasq, stop  # noqa: E402


def identity(subnet_id: int) -> Identity:
    return Identity(crypto.new_signing_key(), crypto.new_wireguard_private_key(), AgentConfig("b", subnet_id, f"10.100.{subnet_id}.1"))


def with_extra(settings: Settings, **extra: object) -> Settings:
    for key, value in extra.items():
        object.__setattr__(settings, key, value)
    return settings


def bench_wireguard(tmp: Path) -> None:
    lan = Lan()
    try:
        servers = []
        for index in range(2):
            ns, lan_ip = lan.add_server(index)
            settings = with_extra(
                replace(Settings(), wireguard_interface=f"wt{lan.tag}{index}", wireguard_config_dir=tmp / f"wg{index}"),
                wireguard_netns=ns,
            )
            servers.append((ns, lan_ip, WireGuardSync(settings, identity(index + 1))))
        (ns_a, ip_a, a), (ns_b, ip_b, b) = servers

        def peer_of(sync: WireGuardSync, lan_ip: str) -> WireGuardPeer:
            sid = sync.identity.config.subnet_id
            return WireGuardPeer(sync.identity.wireguard_public_key, f"10.100.{sid}.0/24,10.200.{sid}.0/24", f"{lan_ip}:51820")

        a.apply_peers([peer_of(b, ip_b)])
        b.apply_peers([peer_of(a, ip_a)])
        deadline = time.monotonic() + 15
        while in_ns(ns_a, "ping", "-c", "1", "-W", "1", "10.100.2.1", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("tunnel did not come up")
        others = [
            WireGuardPeer(crypto.wireguard_public_key(crypto.new_wireguard_private_key()),
                          f"10.100.{y}.0/24,10.200.{y}.0/24", f"192.0.2.{y % 250 + 1}:51820")
            for y in range(3, 252)
        ]
        mesh = [peer_of(b, ip_b), *others]
        pinger = subprocess.Popen(["ip", "netns", "exec", ns_a, "ping", "-c", "300", "-i", "0.01", "-W", "1", "10.100.2.1"],
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        started = time.perf_counter()
        a.apply_peers(mesh)
        applied = time.perf_counter() - started
        still_running = pinger.poll() is None
        output, _ = pinger.communicate(timeout=30)
        match = re.search(r"(\d+) packets transmitted, (\d+) received", output)
        assert match, output
        lost = int(match.group(1)) - int(match.group(2))
        print(f"wireguard: applied a {len(mesh)}-peer mesh (validate, write, syncconf, {2 * len(mesh)} routes, verify) "
              f"in {applied * 1000:.0f} ms")
        print(f"wireguard: existing tunnel lost {lost} of {match.group(1)} pings (10 ms apart) during the change"
              + ("" if still_running else " [ping ended before the change finished]"))
        started = time.perf_counter()
        a.actual_hash()
        print(f"wireguard: reading the live drift hash of {len(mesh)} peers took {(time.perf_counter() - started) * 1000:.0f} ms")
    finally:
        lan.close()


def bench_caddy(tmp: Path) -> None:
    caddy = CaddyProcess(tmp, free_port(), free_port(), free_port())
    caddy.start()
    first, second = Upstream("first"), Upstream("second")
    try:
        settings = replace(Settings(), caddy_admin_url=caddy.admin_url, caddy_https_listen=f"127.0.0.1:{caddy.https_port}")
        # Upstreams are local HTTP servers: loopback is allowed explicitly (never in production).
        sync = CaddySync(settings, upstream_networks=("10.200.0.0/16", "127.0.0.0/8"))
        routes = [CaddyRoute(f"app{i}.example.com", f"app{i}.example.com", (first.address,), f"svc-{i}") for i in range(1000)]
        sync.apply_routes(routes[:1])  # learns whether log_append exists, outside the timing
        started = time.perf_counter()
        sync.apply_routes(routes)
        applied = time.perf_counter() - started
        print(f"caddy: applied 1,000 routes (validate, GET, PATCH, verify) in {applied * 1000:.0f} ms")
        started = time.perf_counter()
        sync.actual_hash()
        print(f"caddy: reading the live drift hash of 1,000 routes took {(time.perf_counter() - started) * 1000:.0f} ms")
        changed = [*routes[:-1], CaddyRoute(routes[-1].id, routes[-1].domain, (second.address,), routes[-1].service_id)]
        started = time.perf_counter()
        sync.apply_routes(changed)
        while True:
            request = urllib.request.Request(f"http://127.0.0.1:{caddy.https_port}/", headers={"Host": "app999.example.com"})
            if urllib.request.urlopen(request, timeout=5).read() == b"second":
                break
        print(f"caddy: one changed route among 1,000 answered requests {(time.perf_counter() - started) * 1000:.0f} ms "
              "after apply() began")
    finally:
        first.close()
        second.close()
        caddy.stop()


def bench_dns(tmp: Path) -> None:
    port = free_udp_port()
    settings = with_extra(
        replace(Settings(), dnsmasq_conf_dir=tmp / "dnsmasq.d", dns_hosts_dir=tmp / "hosts", dns_port=port),
        dnsmasq_restart_command=(), resolved_conf_dir=tmp / "resolved.conf.d", resolved_restart_command=(),
        dns_upstream_servers=("192.0.2.53",),
    )
    dns = DnsSync(settings, identity(1).config)
    dns.prepare()
    proc = start_dnsmasq(dns.conf_path)
    try:
        records = [DnsRecord(f"svc{i}.internal", (f"10.200.1.{i % 250 + 2}",)) for i in range(250)]
        dns.apply_records(records)
        times = []
        for round_ in range(5):
            changed = [*records[:-1], DnsRecord("svc249.internal", (f"10.200.9.{round_ + 2}",))]
            started = time.perf_counter()
            # Write the file without apply()'s own verification, then poll like a client would.
            atomic_write(dns.hosts_path, render_hosts(changed))
            while lookup("127.0.0.1", port, "svc249.internal") != [f"10.200.9.{round_ + 2}"]:
                time.sleep(0.001)
            times.append(time.perf_counter() - started)
        started = time.perf_counter()
        dns.apply_records(records)
        applied = time.perf_counter() - started
        print(f"dns: a changed record among 250 answered after {max(times) * 1000:.0f} ms at worst "
              f"({', '.join(f'{t * 1000:.0f}' for t in times)} ms over 5 changes), dnsmasq not restarted: "
              f"{'yes' if proc.poll() is None else 'NO'}")
        print(f"dns: apply() of 250 records including verification of every name took {applied * 1000:.0f} ms")
    finally:
        stop(proc)


def main() -> None:
    missing = [tool for tool in ("wg", "wireguard-go", "caddy", "dnsmasq", "ip") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"bench_network: missing tools: {', '.join(missing)} (scripts/install-test-deps.sh)")
    with tempfile.TemporaryDirectory(prefix="bench-network-") as tmp:
        root = Path(tmp)
        for name, bench in (("wg", bench_wireguard), ("caddy", bench_caddy), ("dns", bench_dns)):
            (root / name).mkdir()
            bench(root / name)


if __name__ == "__main__":
    main()
