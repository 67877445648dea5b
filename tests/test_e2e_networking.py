"""The agent as a real process managing DNS (real dnsmasq), Caddy (real Caddy) and
WireGuard (wireguard-go in a network namespace), all driven by the fake control plane's
expected state and an `update_wireguard` work item; configured through a TOML file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import crypto
from agent.host.dns import lookup
from tests.e2e import wait_for
from tests.fakecp import FakeControlPlane
from tests.netns import Lan, in_ns, netns_available
from tests.test_caddy_real import CaddyProcess, Upstream, free_port
from tests.test_dns_real import free_udp_port
from tests.testbed import podman, podman_env  # noqa: F401

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(
        not (netns_available() and shutil.which("dnsmasq") and shutil.which("caddy") and shutil.which("wireguard-go")),
        reason="needs root, dnsmasq, caddy and wireguard-go (scripts/install-test-deps.sh)",
    ),
]

REPO = Path(__file__).resolve().parents[1]


def test_dns_caddy_and_wireguard_follow_the_expected_state(tmp_path, podman_env):  # noqa: F811
    lan = Lan()
    ns, _ = lan.add_server(1)
    caddy = CaddyProcess(tmp_path / "caddy", free_port(), free_port(), free_port())
    (tmp_path / "caddy").mkdir()
    caddy.start()
    upstream_a, upstream_b = Upstream("upstream-a"), Upstream("upstream-b")
    dns_port = free_udp_port()
    dnsmasq_dir = tmp_path / "dnsmasq.d"
    dnsmasq_dir.mkdir()
    pid_file = tmp_path / "dnsmasq.pid"
    # Stands in for `systemctl restart dnsmasq`: the agent runs it when its drop-in changes.
    restart = tmp_path / "restart-dnsmasq"
    restart.write_text(
        "#!/bin/sh\n"
        f'[ -f {pid_file} ] && kill "$(cat {pid_file})" 2>/dev/null && sleep 0.2\n'
        f"exec dnsmasq --conf-file=/dev/null --conf-dir={dnsmasq_dir} --pid-file={pid_file} --user=root --no-hosts\n"
    )
    restart.chmod(0o755)
    network = f"tn{os.urandom(4).hex()}"
    interface = f"wa{lan.tag}"
    log_path = tmp_path / "agent.log"
    agent: subprocess.Popen[bytes] | None = None
    with FakeControlPlane() as cp:
        try:
            subnet = 100 + int.from_bytes(os.urandom(1), "big") % 150
            for other in range(1, 256):
                if other != subnet:
                    cp.add_server("placeholder", subnet_id=other, status="offline")
            config = tmp_path / "agent.toml"
            config.write_text(
                "\n".join(
                    [
                        f'url = "{cp.url}"',
                        f'data_dir = "{tmp_path / "data"}"',
                        "tick_interval = 1",
                        "heartbeat_interval = 2",
                        "workqueue_interval = 1",
                        f'network_name = "{network}"',
                        # Never see (let alone remove) containers of other tests on this machine.
                        f'scope_label = "techulus.test.scope={network}"',
                        f'dnsmasq_conf_dir = "{dnsmasq_dir}"',
                        f'dns_hosts_dir = "{tmp_path / "dns-hosts"}"',
                        f"dns_port = {dns_port}",
                        'dns_upstream_servers = ["127.0.0.1#9"]',
                        f'dnsmasq_restart_command = ["{restart}"]',
                        f'resolved_conf_dir = "{tmp_path / "resolved.conf.d"}"',
                        'resolved_restart_command = ["true"]',
                        f'caddy_admin_url = "{caddy.admin_url}"',
                        f'caddy_https_listen = "127.0.0.1:{caddy.https_port}"',
                        f'wireguard_netns = "{ns}"',
                        f'wireguard_interface = "{interface}"',
                        f'wireguard_config_dir = "{tmp_path / "wg"}"',
                        "wireguard_port = 51821",
                        # The test's upstreams are local HTTP servers on loopback.
                        'caddy_upstream_networks = ["10.200.0.0/16", "127.0.0.0/8"]',
                    ]
                )
                + "\n"
            )
            token = cp.add_token()
            env = dict(os.environ, PYTHONPATH=str(REPO), TECHULUS_AGENT_TOKEN=token)
            agent = subprocess.Popen(
                [sys.executable, "-m", "agent", "--config", str(config)],
                stdout=log_path.open("ab"), stderr=subprocess.STDOUT, env=env, cwd=REPO,
            )
            config_json = tmp_path / "data" / "config.json"
            wait_for(config_json.exists, 20, "registration", log_path)
            server_id = json.loads(config_json.read_text())["serverId"]
            gateway = f"10.200.{subnet}.1"

            peer_a = crypto.wireguard_public_key(crypto.new_wireguard_private_key())
            peer_b = crypto.wireguard_public_key(crypto.new_wireguard_private_key())
            state = {
                "containers": [],
                "dns": {"records": [
                    {"name": "web-app.internal", "ips": [f"10.200.{subnet}.2"]},
                    # The same name twice: merged, and no perpetual rewrite.
                    {"name": "web-app.internal", "ips": ["10.200.7.2"]},
                ]},
                "caddy": {"routes": [
                    {"id": "app.test", "domain": "app.test", "upstreams": [upstream_a.address], "serviceId": "svc-1"},
                ]},
                "wireguard": {"peers": [
                    {"publicKey": peer_a, "allowedIps": "10.100.7.0/24,10.200.7.0/24", "endpoint": None},
                ]},
            }
            cp.set_expected_state(server_id, state)

            wait_for(lambda: sorted(lookup("127.0.0.1", dns_port, "web-app.internal", timeout=0.5)) == sorted(
                [f"10.200.{subnet}.2", "10.200.7.2"]), 30, "the DNS record", log_path)
            wait_for(lambda: caddy.get("app.test") == (200, "upstream-a"), 30, "the Caddy route", log_path)
            wait_for(lambda: peer_a in in_ns(ns, "wg", "show", interface, "peers", check=False).stdout, 30,
                     "the WireGuard peer", log_path)
            assert caddy.get("other.test") == (200, "foreign"), "a route we did not create survives"
            assert in_ns(ns, "ip", "-o", "addr", "show", interface).stdout.count(f"10.100.{subnet}.1") == 1
            assert gateway  # dnsmasq also listens on the container gateway once the bridge exists

            # Settled: a no-drift report (with resources) arrives, and nothing is rewritten again.
            wait_for(lambda: any("resources" in r.report for r in cp.status_reports[-3:]), 20, "a no-drift report", log_path)
            dnsmasq_pid = pid_file.read_text().strip()
            hosts_mtime = max(p.stat().st_mtime_ns for p in (tmp_path / "dns-hosts").iterdir())

            # A DNS change is served without restarting dnsmasq.
            state["dns"]["records"][0]["ips"] = [f"10.200.{subnet}.3"]
            cp.set_expected_state(server_id, state)
            wait_for(lambda: f"10.200.{subnet}.3" in lookup("127.0.0.1", dns_port, "web-app.internal", timeout=0.5), 30,
                     "the changed DNS record", log_path)
            assert pid_file.read_text().strip() == dnsmasq_pid, "dnsmasq must not be restarted for a record change"
            assert max(p.stat().st_mtime_ns for p in (tmp_path / "dns-hosts").iterdir()) > hosts_mtime

            # Caddy restarts and loses our routes: the next poll puts them back.
            applied_before = log_path.read_text().count("applied: update-caddy")
            caddy.stop()
            caddy.start()
            wait_for(lambda: caddy.get("app.test") == (200, "upstream-a"), 30, "the route after a Caddy restart", log_path)
            assert log_path.read_text().count("applied: update-caddy") > applied_before, "healed by the agent"

            # An upstream change is followed.
            state["caddy"]["routes"][0]["upstreams"] = [upstream_b.address]
            cp.set_expected_state(server_id, state)
            wait_for(lambda: caddy.get("app.test") == (200, "upstream-b"), 30, "the new upstream", log_path)

            # update_wireguard adds a peer at once and is acknowledged. (Polls of the expected
            # state fail meanwhile, or the next tick would put back the peers it lists.)
            cp.fail_next(10_000, path="/api/v1/agent/expected-state")
            item = cp.add_work_item(server_id, "update_wireguard", {"peers": state["wireguard"]["peers"] + [
                {"publicKey": peer_b, "allowedIps": "10.100.8.0/24,10.200.8.0/24", "endpoint": "192.0.2.8:51820"}]})
            wait_for(lambda: any(c.id == item and c.status == "completed" for c in cp.completions), 20,
                     "the update_wireguard completion", log_path)
            assert peer_b in in_ns(ns, "wg", "show", interface, "peers").stdout
            cp.clear_faults()

            # The interface goes away (as after a reboot): the agent brings it back.
            in_ns(ns, "ip", "link", "del", interface)
            wait_for(lambda: peer_a in in_ns(ns, "wg", "show", interface, "peers", check=False).stdout, 30,
                     "the interface to come back", log_path)

            # A hostile route is rejected with a clear line; the live routes stay.
            state["caddy"]["routes"].append({"id": "x", "domain": "bad domain!", "upstreams": ["10.0.0.1:80"], "serviceId": "s"})
            cp.set_expected_state(server_id, state)
            time.sleep(3)
            assert caddy.get("app.test") == (200, "upstream-b")
            assert "caddy domain is not a valid host name" in log_path.read_text()
        finally:
            if agent is not None and agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
                try:
                    agent.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    agent.kill()
            if pid_file.exists():
                subprocess.run(["kill", pid_file.read_text().strip()], check=False)
            caddy.stop()
            upstream_a.close()
            upstream_b.close()
            lan.close()
            podman("network", "rm", "-f", network, check=False)
