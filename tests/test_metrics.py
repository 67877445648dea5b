"""The metrics endpoint: opt-in, loopback or unix socket only, and what it exposes."""

from __future__ import annotations

import http.client
import socket
import threading
import time

import pytest

from agent.drift import Change, ChangeKind, ContainerInfo
from agent.metrics import MetricsServer, registry_for, scrape
from agent.observe import Publisher
from agent.settings import Settings, SettingsError, listen_address


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("127.0.0.1:9464", ("tcp", "127.0.0.1", 9464)),
        ("localhost:9464", ("tcp", "127.0.0.1", 9464)),
        ("[::1]:9464", ("tcp", "::1", 9464)),
        ("127.0.0.2:80", ("tcp", "127.0.0.2", 80)),
        ("/run/techulus-agent/metrics.sock", ("unix", "/run/techulus-agent/metrics.sock")),
        ("unix:/tmp/m.sock", ("unix", "/tmp/m.sock")),
    ],
)
def test_loopback_addresses_and_unix_sockets_are_accepted(value, address):
    assert listen_address(value) == address


@pytest.mark.parametrize("value", ["0.0.0.0:9464", "10.0.0.5:9464", "[::]:9464", "[2001:db8::1]:9464"])
def test_addresses_beyond_this_host_need_a_second_setting(value):
    with pytest.raises(SettingsError, match="metrics_allow_remote"):
        listen_address(value)
    assert listen_address(value, allow_remote=True)[0] == "tcp"
    with pytest.raises(SettingsError, match="not a loopback address"):
        Settings.load({"metrics_listen": value}, environ={})
    assert Settings.load({"metrics_listen": value, "metrics_allow_remote": True}, environ={}).metrics_address


@pytest.mark.parametrize("value", ["9464", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "example.com:9464", "unix:rel.sock"])
def test_unusable_addresses_are_refused_with_one_line(value):
    with pytest.raises(SettingsError, match="metrics_listen"):
        listen_address(value)


def test_metrics_are_off_by_default():
    assert Settings().metrics_address is None


def busy_publisher(tmp_path) -> Publisher:
    pub = Publisher(tmp_path / "status.json", {})
    pub.poll(None)
    pub.poll(TimeoutError("slow"))
    pub.state("PROCESSING")
    pub.change(Change(ChangeKind.DEPLOY, "missing"), "applied")
    pub.state("IDLE")
    pub.podman_call("run", 0.25, True)
    pub.report(None)
    pub.work_done("restart", "completed")
    labels = {"techulus.deployment.id": "d", "techulus.service.id": "s"}
    pub.containers([ContainerInfo("a" * 64, "web", "img", "running", labels)], {"a" * 64: "healthy"})
    return pub


def test_the_exposition_names_every_figure_the_issue_asks_for(tmp_path):
    body, content_type = scrape(registry_for(busy_publisher(tmp_path)))
    text = body.decode()
    assert content_type.startswith("text/plain")
    for line in (
        'techulus_agent_polls_total{result="ok"} 1.0',
        'techulus_agent_poll_failures_total{kind="TimeoutError"} 1.0',
        'techulus_agent_changes_total{kind="deploy",result="applied"} 1.0',
        "techulus_agent_pass_duration_seconds_count 1.0",
        'techulus_agent_podman_call_duration_seconds_count{verb="run"} 1.0',
        'techulus_agent_podman_call_duration_seconds_sum{verb="run"} 0.25',
        'techulus_agent_status_reports_total{result="sent"} 1.0',
        'techulus_agent_work_items_total{result="completed",type="restart"} 1.0',
        'techulus_agent_containers{health="healthy",state="running"} 1.0',
    ):
        assert line in text, line
    assert "techulus_agent_last_successful_poll_timestamp_seconds 1." in text
    assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text


def test_openmetrics_when_the_scraper_asks_for_it(tmp_path):
    body, content_type = scrape(registry_for(busy_publisher(tmp_path)), "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.decode().endswith("# EOF\n")


def serve(server: MetricsServer):
    stop = threading.Event()
    thread = threading.Thread(target=server.run, args=(stop,), daemon=True)
    thread.start()
    for _ in range(200):
        if server.server is not None:
            break
        time.sleep(0.01)
    return stop, thread


def test_served_on_loopback_tcp(tmp_path):
    server = MetricsServer(("tcp", "127.0.0.1", 0), busy_publisher(tmp_path))
    stop, thread = serve(server)
    try:
        port = server.server.server_address[1]  # type: ignore[union-attr]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        assert response.status == 200 and b"techulus_agent_polls_total" in response.read()
        connection.request("GET", "/other")
        assert connection.getresponse().status == 404
    finally:
        stop.set()
        thread.join(5)


def test_served_on_a_unix_socket_which_is_removed_at_the_end(tmp_path):
    path = tmp_path / "m" / "metrics.sock"
    server = MetricsServer(("unix", str(path)), busy_publisher(tmp_path))
    stop, thread = serve(server)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.0 200") and b"techulus_agent_changes_total" in answer
    finally:
        stop.set()
        thread.join(5)
    assert not path.exists()


def test_a_port_in_use_turns_metrics_off_with_one_line(tmp_path, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = MetricsServer(("tcp", "127.0.0.1", taken.getsockname()[1]), busy_publisher(tmp_path))
        server.run(threading.Event())  # returns at once: nothing to serve
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"metrics endpoint off: cannot listen on http://127.0.0.1:{server.address[2]}/metrics: Address already in use"
    ]
