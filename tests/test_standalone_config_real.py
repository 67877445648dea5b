"""One machine serves a domain from a state file: the agent as a process in standalone mode,
real Podman, real dnsmasq and real Caddy on loopback ports.

The state file's record answers through dnsmasq, its route proxies to the container
through Caddy, its wireguard section is refused with one line while the rest applies, and
a registered agent's drop-in, records and routes on the same dnsmasq and Caddy (same route
id, even) are never touched: each agent only sees what carries its own owner mark.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.host.caddy import CaddySync
from agent.host.dns import DnsSync, lookup
from agent.identity import AgentConfig, standalone_owner
from agent.model import CaddyRoute, DnsRecord
from agent.settings import Settings
from tests import e2e
from tests.test_caddy_real import TEST_UPSTREAM_NETWORKS, CaddyProcess, Upstream
from tests.test_dns_real import free_udp_port
from tests.test_e2e_standalone import AgentProcess, by_deployment, container, http_ok
from tests.testbed import TestNetwork, podman_env, podman_net  # noqa: F401

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(shutil.which("dnsmasq") is None or shutil.which("caddy") is None,
                       reason="needs dnsmasq and caddy (scripts/install-test-deps.sh)"),
]

PAGE = "hello from techulus test"
PEER_KEY = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="


@dataclass
class Dnsmasq:
    """One real dnsmasq reading every `*.conf` of a drop-in dir, (re)started by a script the
    agents run as their `dnsmasq_restart_command`, as `systemctl restart dnsmasq` would."""

    workdir: Path
    port: int

    @property
    def conf_dir(self) -> Path:
        return self.workdir / "dnsmasq.d"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "dnsmasq.pid"

    @property
    def restart_script(self) -> Path:
        return self.workdir / "restart-dnsmasq.sh"

    def write_script(self) -> None:
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.restart_script.write_text(
            "#!/bin/sh\n"
            f'pid=$(cat {self.pid_file} 2>/dev/null)\n'
            'if [ -n "$pid" ]; then kill "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 0.02; done; fi\n'
            # dnsmasq forks and exits once it serves (or with an error when it cannot start).
            f"exec dnsmasq --conf-file=/dev/null --conf-dir={self.conf_dir},*.conf --no-hosts --user=root "
            f"--pid-file={self.pid_file} --log-facility={self.workdir / 'dnsmasq.log'} </dev/null >/dev/null 2>&1\n"
        )
        self.restart_script.chmod(0o755)

    def stop(self) -> None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def answer(self, name: str) -> list[str]:
        return lookup("127.0.0.1", self.port, name, timeout=0.5)


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Dnsmasq]:
    server = Dnsmasq(tmp_path, free_udp_port())
    server.write_script()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def caddy(tmp_path: Path) -> Iterator[CaddyProcess]:
    process = CaddyProcess(tmp_path, e2e.free_port(), e2e.free_port(), e2e.free_port())
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def registered_upstream() -> Iterator[Upstream]:
    upstream = Upstream("the registered agent's service")
    try:
        yield upstream
    finally:
        upstream.close()


def agent_env(tmp_path: Path, dnsmasq: Dnsmasq, caddy: CaddyProcess) -> dict[str, str]:
    """Every path, port and command of the DNS and Caddy settings, pointed at the test's own."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\n")  # never asked: the tests only ask for *.internal
    return {
        "TECHULUS_AGENT_DNSMASQ_CONF_DIR": str(dnsmasq.conf_dir),
        "TECHULUS_AGENT_DNS_HOSTS_DIR": str(tmp_path / "dns-hosts"),
        "TECHULUS_AGENT_DNS_PORT": str(dnsmasq.port),
        "TECHULUS_AGENT_DNSMASQ_RESTART_COMMAND": str(dnsmasq.restart_script),
        "TECHULUS_AGENT_RESOLVED_CONF_DIR": str(tmp_path / "resolved.conf.d"),
        "TECHULUS_AGENT_RESOLVED_RESTART_COMMAND": "true",
        "TECHULUS_AGENT_DNS_RESOLV_FILES": str(resolv),
        "TECHULUS_AGENT_CADDY_ADMIN_URL": caddy.admin_url,
        "TECHULUS_AGENT_CADDY_HTTPS_LISTEN": f"127.0.0.1:{caddy.https_port}",
    }


def registered_agent(tmp_path: Path, env: dict[str, str], upstream: Upstream) -> tuple[DnsSync, CaddySync]:
    """The adapters of a registered agent on the same host (its own subnet, no owner mark),
    with one record and one route of its own already live. Its route id is the standalone
    file's route id too: Caddy wants @ids unique, the owner mark keeps them apart."""
    settings = Settings.load({"data_dir": str(tmp_path / "registered-data")}, environ=env)
    dns = DnsSync(settings, AgentConfig("server-registered", 250, "10.100.250.1"))
    dns.prepare()  # writes techulus.conf (port=…) and starts dnsmasq through the script
    dns.apply_records([DnsRecord("registered.internal", ("10.200.250.9",))])
    routes = CaddySync(settings, upstream_networks=TEST_UPSTREAM_NETWORKS)
    routes.apply_routes([CaddyRoute("web", "registered.example.test", (upstream.address,), "reg")])
    return dns, routes


STATE = """\
subnetId = {subnet}

[[containers]]
deploymentId = "dep-1"
serviceId = "svc-1"
serviceName = "Service 1"
name = "svc-1-dep-1"
image = "{image}"
ipAddress = "{ip}"
{config}
"""

CONFIG = """
[[dns.records]]
name = "web.internal"
ips = ["{ip}"]

[[caddy.routes]]
id = "web"
domain = "web.example.test"
upstreams = ["{ip}:80"]
serviceId = "svc-1"

[[wireguard.peers]]
publicKey = "{key}"
allowedIps = "10.100.9.0/24"
endpoint = "192.0.2.9:51820"
"""


def write_state(path: Path, net: TestNetwork, with_config: bool) -> None:
    spec = container(net, 1)
    config = CONFIG.format(ip=spec["ipAddress"], key=PEER_KEY) if with_config else ""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(STATE.format(subnet=net.subnet_id, image=spec["image"], ip=spec["ipAddress"], config=config))
    tmp.replace(path)


def page(caddy: CaddyProcess, host: str) -> str:
    try:
        return caddy.get(host)[1]
    except OSError:
        return ""


def test_one_machine_serves_a_domain_from_a_state_file_beside_a_registered_agent(
    tmp_path: Path, podman_net: TestNetwork, dnsmasq: Dnsmasq, caddy: CaddyProcess,  # noqa: F811
    registered_upstream: Upstream,
) -> None:
    env = agent_env(tmp_path, dnsmasq, caddy)
    their_dns, their_routes = registered_agent(tmp_path, env, registered_upstream)
    their_drop_in = their_dns.conf_path.read_bytes()
    assert dnsmasq.answer("registered.internal") == ["10.200.250.9"]
    assert page(caddy, "registered.example.test") == "the registered agent's service"

    state_file = tmp_path / "state.toml"
    write_state(state_file, podman_net, with_config=True)
    agent = AgentProcess(state_file, tmp_path / "data", podman_net, tmp_path / "agent.log", extra_env=env)
    agent.start()
    try:
        ip = podman_net.ip(2)
        e2e.wait_for(lambda: http_ok(ip), 30, "the container to serve", agent.log_path, agent.proc)
        e2e.wait_for(lambda: dnsmasq.answer("web.internal") == [ip], 30, "web.internal from dnsmasq", agent.log_path, agent.proc)
        e2e.wait_for(lambda: PAGE in page(caddy, "web.example.test"), 30, "the route through Caddy", agent.log_path, agent.proc)

        # The wireguard section: one clear line, and the rest of the file applied (above).
        refused = [line for line in agent.log().splitlines() if "wireguard section is refused" in line]
        assert len(refused) == 1, agent.log()
        assert "standalone" in refused[0] and "the rest of the file applies" in refused[0]

        # Its own files and route ids, under its owner mark; the registered agent's untouched.
        owner = standalone_owner(tmp_path / "data")
        ours = dnsmasq.conf_dir / f"techulus-{owner}.conf"
        assert ours.exists() and "port=" not in ours.read_text(), "the registered drop-in sets the port"
        assert their_dns.conf_path.read_bytes() == their_drop_in
        assert (tmp_path / "dns-hosts" / f"records-{owner}").read_text().splitlines()[1:] == [f"{ip} web.internal"]
        ids = [route.get("@id") for route in caddy.routes()]
        assert f"{owner}-web" in ids and "web" in ids and "someone-else" in ids
        # Neither agent sees drift in the other's work, so neither undoes it.
        assert their_dns.served_records() == [DnsRecord("registered.internal", ("10.200.250.9",))]
        assert their_routes.live_routes() == [
            CaddyRoute("web", "registered.example.test", (registered_upstream.address,), "reg")
        ]
        their_routes.apply_routes(their_routes.live_routes())  # the registered agent's next pass
        assert PAGE in page(caddy, "web.example.test")
        assert dnsmasq.answer("registered.internal") == ["10.200.250.9"]
        assert page(caddy, "registered.example.test") == "the registered agent's service"

        # Records and routes dropped from the file: removed (after the second poll confirms),
        # the container stays, the registered agent's record and route stay.
        before = by_deployment(podman_net)["dep-1"]["Id"]
        write_state(state_file, podman_net, with_config=False)
        e2e.wait_for(lambda: dnsmasq.answer("web.internal") == [], 30, "web.internal to go", agent.log_path, agent.proc)
        e2e.wait_for(lambda: f"{owner}-web" not in [r.get("@id") for r in caddy.routes()], 30, "the route to go",
                     agent.log_path, agent.proc)
        assert PAGE not in page(caddy, "web.example.test")
        assert by_deployment(podman_net)["dep-1"]["Id"] == before
        assert dnsmasq.answer("registered.internal") == ["10.200.250.9"]
        assert page(caddy, "registered.example.test") == "the registered agent's service"
        assert their_dns.conf_path.read_bytes() == their_drop_in

        # Back in the file, then `agent standalone --down`: its drop-in, hosts file and route
        # go with its container; the registered agent's stay and dnsmasq still serves them.
        write_state(state_file, podman_net, with_config=True)
        e2e.wait_for(lambda: PAGE in page(caddy, "web.example.test"), 30, "the route again", agent.log_path, agent.proc)
    finally:
        agent.stop()
    assert agent.proc is not None and agent.proc.returncode == 0
    assert "Traceback" not in agent.log()
    down = subprocess.run(
        [sys.executable, "-m", "agent", "standalone", "--down", str(state_file), "--data-dir", str(tmp_path / "data")],
        env=agent.environment(), cwd=agent.cwd, capture_output=True, text=True, timeout=120, check=False,
    )
    assert down.returncode == 0, down.stdout + down.stderr
    assert "dns: removed this agent's configuration" in down.stderr and "caddy: removed this agent's configuration" in down.stderr
    assert sorted(p.name for p in dnsmasq.conf_dir.iterdir()) == ["techulus.conf"]
    assert sorted(p.name for p in (tmp_path / "dns-hosts").iterdir()) == ["records"]
    assert [r.get("@id") for r in caddy.routes() if str(r.get("@id", "")).startswith(owner)] == []
    assert by_deployment(podman_net) == {}
    assert dnsmasq.answer("registered.internal") == ["10.200.250.9"] and dnsmasq.answer("web.internal") == []
    assert page(caddy, "registered.example.test") == "the registered agent's service"
    assert PAGE not in page(caddy, "web.example.test")


def test_a_file_without_records_or_routes_touches_neither_dnsmasq_nor_caddy(
    tmp_path: Path, podman_net: TestNetwork, dnsmasq: Dnsmasq, caddy: CaddyProcess,  # noqa: F811
) -> None:
    env = agent_env(tmp_path, dnsmasq, caddy)
    routes_before = caddy.routes()
    state_file = tmp_path / "state.toml"
    write_state(state_file, podman_net, with_config=False)
    agent = AgentProcess(state_file, tmp_path / "data", podman_net, tmp_path / "agent.log", extra_env=env)
    agent.start()
    try:
        e2e.wait_for(lambda: http_ok(podman_net.ip(2)), 30, "the container to serve", agent.log_path, agent.proc)
        time.sleep(2)  # a few more ticks
    finally:
        agent.stop()
    assert list(dnsmasq.conf_dir.iterdir()) == [], "no drop-in written"
    assert not dnsmasq.pid_file.exists(), "dnsmasq never (re)started"
    assert caddy.routes() == routes_before
    assert "dns:" not in agent.log() and "caddy:" not in agent.log(), agent.log()

