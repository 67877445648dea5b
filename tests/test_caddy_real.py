"""Real Caddy with its admin API on loopback: routes, foreign routes, restarts, errors."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from agent.host import caddy as caddy_module
from agent.host.caddy import DEFAULT_UPSTREAM_NETWORKS, CaddyError, CaddySync, find_server
from agent.model import CaddyRoute, ExpectedState
from agent.settings import Settings

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(shutil.which("caddy") is None, reason="needs caddy (scripts/install-test-deps.sh)"),
]

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class CaddyProcess:
    workdir: Path
    admin_port: int
    https_port: int
    redirect_port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def initial_config(self) -> dict[str, Any]:
        off = {"disable": True}
        return {
            "admin": {"listen": f"127.0.0.1:{self.admin_port}"},
            "apps": {"http": {"servers": {
                # srv0 is NOT the HTTPS server here: the agent must find it by listen address.
                "srv0": {"listen": [f"127.0.0.1:{self.redirect_port}"], "automatic_https": off,
                         "routes": [{"handle": [{"handler": "static_response", "status_code": 301}]}]},
                "srv1": {"listen": [f"127.0.0.1:{self.https_port}"], "automatic_https": off, "routes": [
                    {"match": [{"path": ["/__caddy_health__"]}], "handle": [{"handler": "static_response", "body": "ok"}]},
                    {"@id": "someone-else", "match": [{"host": ["other.test"]}],
                     "handle": [{"handler": "static_response", "body": "foreign"}]},
                ]},
            }}},
        }

    def start(self) -> None:
        config = self.workdir / "init.json"
        config.write_text(json.dumps(self.initial_config()))
        env = dict(os.environ, XDG_DATA_HOME=str(self.workdir / "data"), XDG_CONFIG_HOME=str(self.workdir / "config"),
                   HOME=str(self.workdir))
        self.proc = subprocess.Popen(["caddy", "run", "--config", str(config)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=(self.workdir / "caddy.log").open("ab"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.admin_url + "/config/", timeout=1).read()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("caddy did not start: " + (self.workdir / "caddy.log").read_text()[-2000:])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def get(self, host: str, path: str = "/") -> tuple[int, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.https_port}{path}", headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def routes(self) -> list[dict[str, Any]]:
        # Caddy restarts its admin listener around config loads: a reset here is retried.
        for attempt in range(3):
            try:
                with urllib.request.urlopen(f"{self.admin_url}/config/apps/http/servers/srv1/routes", timeout=5) as response:
                    return json.loads(response.read())
            except ConnectionError:
                if attempt == 2:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")


class Upstream:
    """A real HTTP server standing in for a container: answers with its own name."""

    def __init__(self, name: str) -> None:
        body = name.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def caddy(tmp_path: Path) -> Iterator[CaddyProcess]:
    process = CaddyProcess(tmp_path, free_port(), free_port(), free_port())
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def upstreams() -> Iterator[tuple[Upstream, Upstream]]:
    a, b = Upstream("upstream-a"), Upstream("upstream-b")
    try:
        yield a, b
    finally:
        a.close()
        b.close()


# The upstreams here are local HTTP servers: loopback is allowed explicitly, as nowhere else.
TEST_UPSTREAM_NETWORKS = (*DEFAULT_UPSTREAM_NETWORKS, "127.0.0.0/8")


def make_sync(caddy: CaddyProcess, networks: tuple[str, ...] | None = TEST_UPSTREAM_NETWORKS, **extra: object) -> CaddySync:
    settings = replace(Settings(), caddy_admin_url=caddy.admin_url, caddy_https_listen=f"127.0.0.1:{caddy.https_port}")
    settings = replace(settings, **extra)
    return CaddySync(settings, upstream_networks=networks)


def test_routes_reach_upstreams_keep_foreign_routes_and_heal_after_restart(
    caddy: CaddyProcess, upstreams: tuple[Upstream, Upstream]
) -> None:
    a, b = upstreams
    sync = make_sync(caddy)
    sync.prepare()
    state = ExpectedState(caddy_routes=(
        CaddyRoute("app.example.com", "app.example.com", (a.address,), "svc-1"),
        CaddyRoute("api.example.com", "api.example.com", (b.address,), "svc-2"),
        CaddyRoute("idle.example.com", "idle.example.com", (), "svc-3"),  # no upstream: not written, not drift
    ))
    assert sync.actual_hash() != sync.expected_hash(state)
    sync.apply(state)
    assert sync.actual_hash() == sync.expected_hash(state)
    assert caddy.get("app.example.com") == (200, "upstream-a")
    assert caddy.get("api.example.com") == (200, "upstream-b")
    assert caddy.get("app.example.com", "/__caddy_health__") == (200, "ok")
    assert caddy.get("other.test") == (200, "foreign")
    ids = [route.get("@id") for route in caddy.routes()]
    assert ids == [None, "someone-else", "app.example.com", "api.example.com"]

    # An upstream change is visible to requests as soon as apply() returns.
    moved = ExpectedState(caddy_routes=(CaddyRoute("app.example.com", "app.example.com", (b.address,), "svc-1"),))
    sync.apply(moved)
    assert caddy.get("app.example.com") == (200, "upstream-b")
    assert caddy.get("api.example.com") == (200, "")  # route removed: Caddy's empty default answer

    # Caddy restarts and loses the API-pushed routes: the next poll sees it (no cached hash).
    caddy.stop()
    with pytest.raises(CaddyError, match="unreachable"):
        sync.actual_hash()
    caddy.start()
    assert caddy.get("app.example.com") == (200, "")
    assert sync.actual_hash() != sync.expected_hash(moved)
    sync.apply(moved)
    assert caddy.get("app.example.com") == (200, "upstream-b")

    # No routes expected: an empty managed list is written (never `null`), foreign ones stay.
    sync.apply(ExpectedState())
    assert [route.get("@id") for route in caddy.routes()] == [None, "someone-else"]
    assert sync.actual_hash() == sync.expected_hash(ExpectedState())


def test_caddy_errors_surface_and_keep_the_running_config(
    caddy: CaddyProcess, upstreams: tuple[Upstream, Upstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = upstreams
    sync = make_sync(caddy)
    good = ExpectedState(caddy_routes=(CaddyRoute("app.example.com", "app.example.com", (a.address,), "svc-1"),))
    sync.apply(good)
    before = caddy.routes()

    # A route body Caddy cannot decode: its error status (400, or 500 from Caddy 2.6) and
    # its message reach the caller.
    real_render = caddy_module.render_route

    def broken(route: CaddyRoute, log_append: bool, owner: str = "") -> dict[str, Any]:
        rendered = real_render(route, log_append, owner)
        rendered["handle"][-1]["upstreams"] = "not-a-list"
        return rendered

    monkeypatch.setattr(caddy_module, "render_route", broken)
    # Our own read-back refuses such a body before it is sent...
    with pytest.raises(CaddyError, match="do not read back"):
        sync.apply(ExpectedState(caddy_routes=(CaddyRoute("new.example.com", "new.example.com", (a.address,), "svc-2"),)))
    # ...and without it Caddy's own refusal surfaces.
    monkeypatch.setattr(caddy_module, "check_body", lambda *args: None)
    with pytest.raises(CaddyError, match=r"\((400|500)\): .*cannot unmarshal string into Go struct field Handler.upstreams"):
        sync.apply(ExpectedState(caddy_routes=(CaddyRoute("new.example.com", "new.example.com", (a.address,), "svc-2"),)))
    monkeypatch.undo()
    assert caddy.routes() == before
    assert caddy.get("app.example.com") == (200, "upstream-a")

    # Hostile input never reaches Caddy.
    for bad in (
        CaddyRoute("x", "evil.com\n", (a.address,), "svc"),
        CaddyRoute("x", "evil.com", ("10.200.1.2",), "svc"),
        CaddyRoute("x", "evil.com", ("10.200.1.2:3000\n",), "svc"),
        CaddyRoute("x", "evil.com", ("-x:80",), "svc"),
        CaddyRoute("x", "evil/../com", (a.address,), "svc"),
        CaddyRoute("x\n", "evil.com", (a.address,), "svc"),
        CaddyRoute("x", "evil.com", (a.address,), "../svc"),
    ):
        with pytest.raises(CaddyError, match="nothing was changed"):
            sync.apply(ExpectedState(caddy_routes=(bad,)))
    # Our id may not take over a route someone else owns.
    with pytest.raises(CaddyError, match="someone-else"):
        sync.apply(ExpectedState(caddy_routes=(CaddyRoute("someone-else", "x.example.com", (a.address,), "s"),)))
    assert caddy.routes() == before

    # A Caddy without log_append: forcing it on gives Caddy's own error; auto mode falls back.
    forced = make_sync(caddy, caddy_log_append="true")
    if "http.handlers.log_append" not in subprocess.run(["caddy", "list-modules"], capture_output=True, text=True).stdout:
        with pytest.raises(CaddyError, match="log_append"):
            forced.apply(good)
        assert caddy.routes() == before


def test_upstreams_outside_the_deployment_networks_never_reach_caddy(caddy: CaddyProcess) -> None:
    # With the production defaults, Caddy's own admin API, cloud metadata or a host name as
    # an upstream would publish them on a public domain: refused before Caddy is asked.
    sync = make_sync(caddy, networks=None)
    assert [str(n) for n in sync.upstream_networks] == ["10.200.0.0/16"]
    before = caddy.routes()
    for upstream in (f"127.0.0.1:{caddy.admin_port}", "169.254.169.254:80", "localhost:1234", "0.0.0.0:80", "192.0.2.1:80",
                     "10.200.3.1:22", "10.100.3.1:80"):
        with pytest.raises(CaddyError, match=r"nothing was changed.*upstream"):
            sync.apply(ExpectedState(caddy_routes=(CaddyRoute("x", "app.example.com", (upstream,), "svc"),)))
    assert caddy.routes() == before
    # A deployment address is accepted (nothing listens there: the route is only written).
    sync.apply(ExpectedState(caddy_routes=(CaddyRoute("x", "app.example.com", ("10.200.3.2:3000",), "svc"),)))
    assert [route.get("@id") for route in caddy.routes()] == [None, "someone-else", "x"]


def test_one_bad_route_is_skipped_and_the_rest_is_written(caddy: CaddyProcess) -> None:
    sync = make_sync(caddy, networks=None)
    good = CaddyRoute("good", "good.example.com", ("10.200.3.2:3000",), "svc")
    state = ExpectedState(caddy_routes=(CaddyRoute("bad", "bad.example.com", ("169.254.169.254:80",), "svc"), good))
    sync.apply(state)
    assert "good" in [route.get("@id") for route in caddy.routes()]
    assert "bad" not in [route.get("@id") for route in caddy.routes()]
    # The skipped route is not drift.
    assert sync.actual_hash() == sync.expected_hash(state)


def add_route_behind_our_back(caddy: CaddyProcess, route_id: str) -> None:
    """Another admin client appends a route (POST to a list appends)."""
    route = {"@id": route_id, "match": [{"host": [f"{route_id}.test"]}], "handle": [{"handler": "static_response", "body": route_id}]}
    request = urllib.request.Request(
        f"{caddy.admin_url}/config/apps/http/servers/srv1/routes", data=json.dumps(route).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    for attempt in range(3):  # the admin listener restarts around config loads
        try:
            urllib.request.urlopen(request, timeout=5).read()
            return
        except ConnectionError:
            if attempt == 2:
                raise
            time.sleep(0.1)


def interleave(monkeypatch: pytest.MonkeyPatch, sync: CaddySync, caddy: CaddyProcess, times: int) -> list[str]:
    """After each of our next `times` reads of the routes, somebody else adds a route."""
    added: list[str] = []
    real_get = sync._get_for_update

    def racing_get(path: str, config_path: str) -> tuple[Any, bytes, str | None]:
        result = real_get(path, config_path)
        if len(added) < times:
            added.append(f"race{len(added)}")
            add_route_behind_our_back(caddy, added[-1])
        return result

    monkeypatch.setattr(sync, "_get_for_update", racing_get)
    return added


def test_a_route_added_between_our_read_and_write_is_kept(
    caddy: CaddyProcess, upstreams: tuple[Upstream, Upstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = upstreams
    sync = make_sync(caddy)
    state = ExpectedState(caddy_routes=(CaddyRoute("app.example.com", "app.example.com", (a.address,), "svc-1"),))
    added = interleave(monkeypatch, sync, caddy, times=2)
    sync.apply(state)  # two 412s (Caddy 2.6 checks If-Match), then a write on fresh data
    assert added == ["race0", "race1"]
    assert [route.get("@id") for route in caddy.routes()] == [None, "someone-else", "race0", "race1", "app.example.com"]
    assert caddy.get("race0.test") == (200, "race0") and caddy.get("app.example.com") == (200, "upstream-a")

    # Somebody who never stops changing the routes: bounded, and nothing of ours is written.
    before = caddy.routes()
    monkeypatch.undo()
    added = interleave(monkeypatch, sync, caddy, times=100)
    with pytest.raises(CaddyError, match=r"changed under every one of 5 writes; nothing was changed"):
        sync.apply(ExpectedState())
    assert len(added) == 5
    assert [route.get("@id") for route in caddy.routes()] == [route.get("@id") for route in before] + added


def test_a_caddy_with_other_etags_is_written_unconditionally(
    caddy: CaddyProcess, upstreams: tuple[Upstream, Upstream], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Should a Caddy hash its config differently, an If-Match that can never match must
    # not block every write forever.
    a, _ = upstreams
    sync = make_sync(caddy)
    monkeypatch.setattr(caddy_module, "config_etag", lambda path, body: f'"{path} 00000000"')
    state = ExpectedState(caddy_routes=(CaddyRoute("app.example.com", "app.example.com", (a.address,), "svc-1"),))
    sync.apply(state)
    assert caddy.get("app.example.com") == (200, "upstream-a")
    assert "writing without it" in caplog.text


def test_wrong_listen_address_is_a_clear_error(caddy: CaddyProcess) -> None:
    sync = make_sync(caddy)
    sync.listen = "127.0.0.1:1"
    with pytest.raises(CaddyError, match=r"no Caddy server listens on 127.0.0.1:1 \(servers: srv0"):
        sync.prepare()


def test_installer_caddyfile_adapts_and_its_https_server_is_found(tmp_path: Path) -> None:
    # Debian's Caddy lacks the Cloudflare module the real install builds in: adapt without that line.
    text = (REPO / "installer" / "Caddyfile").read_text()
    assert "dns cloudflare {$CF_API_TOKEN}" in text
    stripped = tmp_path / "Caddyfile"
    stripped.write_text("\n".join(line for line in text.splitlines() if "dns cloudflare" not in line) + "\n")
    result = subprocess.run(["caddy", "adapt", "--config", str(stripped)], capture_output=True, text=True,
                            env=dict(os.environ, CONTROL_PLANE_URL="https://cp.example"), timeout=30)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["admin"]["listen"] == "localhost:2019"
    assert config["apps"]["tls"]["automation"]["on_demand"]["ask"] == "https://cp.example/api/v1/caddy/check"
    servers = config["apps"]["http"]["servers"]
    name = find_server(servers, ":443")
    routes = servers[name]["routes"]
    assert all("@id" not in route for route in routes)  # the health responder is foreign: kept
    assert not any(route.get("terminal") for route in routes)  # our routes after it are reachable
    log_writer = config["logging"]["logs"][servers[name]["logs"]["default_logger_name"]]
    assert log_writer["writer"]["filename"] == "/var/log/caddy/techulus.log"
    assert log_writer["encoder"]["format"] == "json"
