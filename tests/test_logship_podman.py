"""Log shipping against real Podman containers and a fake VictoriaLogs: fields and streams,
the final lines of exited containers, and a shipper killed with SIGKILL mid-stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.host.podman import Podman, PodmanOptions
from agent.logship import LogShipper
from agent.settings import Settings
from tests.fakevlogs import FakeVictoriaLogs
from tests.testbed import *  # noqa: F403
from tests.testbed import BB_IMAGE, podman

pytestmark = pytest.mark.real
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def vlogs():
    server = FakeVictoriaLogs()
    yield server
    server.down()


def start_container(net, name: str, script: str, service: str = "svc-1", deployment: str = "dep-1") -> str:
    result = podman(
        "run", "-d", "--name", name, "--network", "none",
        "--label", f"techulus.service.id={service}", "--label", f"techulus.deployment.id={deployment}",
        "--label", net.scope_label, BB_IMAGE, "sh", "-c", script,
    )
    return result.stdout.strip()


def make_settings(tmp_path: Path, net, vlogs) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", logs_endpoint=vlogs.url, scope_label=net.scope_label,
        caddy_access_log=tmp_path / "caddy" / "techulus.log",
    )


def test_container_stdout_and_stderr_are_shipped_with_their_fields(tmp_path, podman_net, vlogs):
    name = f"ls-{podman_net.name}"
    cid = start_container(
        podman_net, name,
        "echo 'hello out'; echo 'hello err' >&2; echo; echo '   '; echo 'json {\"k\": \"v\"}'; sleep 1; echo 'last words' >&2; exit 3",
    )
    settings = make_settings(tmp_path, podman_net, vlogs)
    shipper = LogShipper(settings, Podman(PodmanOptions(scope_label=podman_net.scope_label)))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        shipper.collect_once()
        while shipper.container_sender.send_once():
            pass
        if "last words" in vlogs.messages("container"):
            break
        time.sleep(0.3)
    shipper.persist_once()
    entries = vlogs.of_type("container")
    by_msg = {e["_msg"]: e for e in entries}
    assert sorted(by_msg) == sorted(["hello out", "hello err", 'json {"k": "v"}', "last words"])
    assert len(entries) == 4, "blank lines are skipped and nothing is sent twice"
    assert by_msg["hello out"]["stream"] == "stdout" and by_msg["hello err"]["stream"] == "stderr"
    assert by_msg["last words"]["stream"] == "stderr"  # printed just before the container exited
    assert all(e["deployment_id"] == "dep-1" and e["service_id"] == "svc-1" for e in entries)
    assert vlogs.problems == []
    positions = json.loads((settings.data_dir / "log-positions.json").read_text())
    assert list(positions["positions"]) == [cid]
    # The exited container is not read again and again.
    calls_before = vlogs.requests
    shipper.collect_once()
    while shipper.container_sender.send_once():
        pass
    assert vlogs.requests == calls_before


SHIPPER_SCRIPT = textwrap.dedent("""
    import logging, signal, sys, threading
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from agent.host.podman import Podman, PodmanOptions
    from agent.logship import LogShipper
    from agent.settings import Settings
    logging.basicConfig(level=logging.INFO)
    settings = Settings(data_dir=Path({data!r}), logs_endpoint={url!r}, scope_label={scope!r},
                        caddy_access_log=Path({caddy!r}))
    shipper = LogShipper(settings, Podman(PodmanOptions(scope_label={scope!r})),
                         collect_interval=0.5, persist_interval=0.25)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    shipper.run(stop)
""")


def test_cursor_survives_kill_9_without_losing_lines(tmp_path, podman_net, vlogs):
    total = 2500
    start_container(
        podman_net, f"ls9-{podman_net.name}",
        f"i=0; while [ $i -lt {total} ]; do echo \"n $i\"; [ $((i % 3)) = 0 ] && echo \"e $i\" >&2; i=$((i+1)); usleep 1500; done",
    )
    settings = make_settings(tmp_path, podman_net, vlogs)
    script = tmp_path / "shipper.py"
    script.write_text(SHIPPER_SCRIPT.format(
        root=str(ROOT), data=str(settings.data_dir), url=vlogs.url, scope=podman_net.scope_label,
        caddy=str(settings.caddy_access_log),
    ))

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "shipper.log", "ab"))

    first = spawn()
    try:
        positions = settings.data_dir / "log-positions.json"

        def committed() -> bool:
            try:
                return bool(json.loads(positions.read_text())["positions"])
            except (OSError, ValueError, KeyError):
                return False

        assert vlogs.wait_for(lambda: len(vlogs.entries) >= 400 and committed(), 30), "first shipper committed nothing"
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        delivered_before_kill = len(vlogs.entries)
        second = spawn()
        try:
            wanted = {f"n {i}" for i in range(total)} | {f"e {i}" for i in range(0, total, 3)}
            assert vlogs.wait_for(lambda: wanted <= set(vlogs.messages("container")), 60), (
                f"missing: {sorted(wanted - set(vlogs.messages('container')))[:10]}"
            )
            time.sleep(1.5)  # anything still to come would be a duplicate
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(20)
        assert second.returncode == 0, (tmp_path / "shipper.log").read_text()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    messages = vlogs.messages("container")
    duplicates = len(messages) - len(set(messages))
    print(f"delivered before kill: {delivered_before_kill}, total: {len(messages)}, duplicates: {duplicates}")
    assert set(messages) == wanted
    # Collected every 0.5 s, saved 4 times a second: at most about a second of lines (~900)
    # comes again, never everything that was delivered before the kill.
    assert duplicates < min(1200, delivered_before_kill), duplicates
    assert vlogs.problems == []
