"""A whole rollout rig on one machine: the fake control plane (with its rollout stage machine),
real Caddy on loopback, a Podman test network, the agent as a process, and two observers.

Why: tests/test_e2e_rollout.py and bench/bench_rollout.py need the same setup and the same
measurements (when rows reach `running`, which containers existed with which image, how long
the public route had no live upstream); they differ only in what they assert or print.

* `RouteProber` asks Caddy's admin API every ~50 ms for our route's upstreams and fetches each
  upstream directly; the route is live when at least one answers 200. It records every dead
  stretch after the route was first live.
* `ContainerWatcher` lists our containers every ~0.25 s: which container ids each deployment
  had, with which image and creation time.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agent.model import canonical_image
from tests.fakecp import FakeControlPlane
from tests.test_caddy_real import CaddyProcess, free_port
from tests.e2e import stop_process
from tests.testbed import (
    ROLLOUT_HEALTH_CMD,
    ROLLOUT_V1,
    TestNetwork,
    create_network,
    podman,
    remove_network,
)

REPO = Path(__file__).resolve().parents[1]
PROBE_INTERVAL = 0.05
FAST_HEALTH: dict[str, int | None] = {"interval": 1, "timeout": 2, "retries": 2, "startPeriod": 0}
WATCH_INTERVAL = 0.25


class RigError(RuntimeError):
    """Something the rig waited for did not happen; the message carries the agent's log tail."""


@dataclass
class ProbeSample:
    time: float  # monotonic
    upstreams: tuple[str, ...]
    live: tuple[str, ...]
    pages: tuple[str, ...]


S = TypeVar("S", bound="Sampler")


class Sampler:
    """A daemon thread calling `sample()` every `interval` seconds until `stop()`."""

    interval = 0.25
    name = "sampler"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        raise NotImplementedError

    def start(self: S) -> S:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.sample()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))


class RouteProber(Sampler):
    """Is the route's upstream list answering? Every PROBE_INTERVAL, until stopped."""

    interval = PROBE_INTERVAL
    name = "route-prober"

    def __init__(self, caddy_admin: str, route_id: str) -> None:
        super().__init__()
        self.caddy_admin = caddy_admin
        self.route_id = route_id
        self.samples: list[ProbeSample] = []

    def sample(self) -> None:
        started = time.monotonic()
        upstreams = self._upstreams()
        answers = {dial: _fetch(f"http://{dial}/", 0.3) for dial in upstreams}
        live = tuple(d for d, (status, _) in answers.items() if status == 200)
        pages = tuple(answers[d][1].strip() for d in live)
        self.samples.append(ProbeSample(started, upstreams, live, pages))

    def _upstreams(self) -> tuple[str, ...]:
        status, body = _fetch(f"{self.caddy_admin}/id/{self.route_id}", 1.0)
        if status != 200:
            return ()
        try:
            route = json.loads(body)
        except ValueError:
            return ()
        dials = []
        for handler in route.get("handle", []) if isinstance(route, dict) else []:
            for upstream in handler.get("upstreams", []) if isinstance(handler, dict) else []:
                if isinstance(upstream, dict) and isinstance(upstream.get("dial"), str):
                    dials.append(upstream["dial"])
        return tuple(dials)

    def dead_intervals(self) -> list[tuple[float, float]]:
        """(start, seconds) of each stretch with no live upstream, after the route was first live;
        a stretch still open at the end is measured to the last sample."""
        stretches: list[tuple[float, float]] = []
        armed, dead_since = False, None
        for sample in list(self.samples):
            if sample.live:
                if dead_since is not None:
                    stretches.append((dead_since, sample.time - dead_since))
                armed, dead_since = True, None
            elif armed and dead_since is None:
                dead_since = sample.time
        if dead_since is not None and self.samples:
            stretches.append((dead_since, self.samples[-1].time - dead_since))
        return stretches

    def longest_dead(self) -> float:
        return max((seconds for _, seconds in self.dead_intervals()), default=0.0)

    def dead_samples(self) -> int:
        armed, count = False, 0
        for sample in list(self.samples):
            armed = armed or bool(sample.live)
            count += armed and not sample.live
        return count


@dataclass(frozen=True)
class Seen:
    container_id: str
    image: str
    created: str
    state: str


class ContainerWatcher(Sampler):
    """Which containers each deployment had over time (ids, images, creation), every WATCH_INTERVAL."""

    interval = WATCH_INTERVAL
    name = "container-watcher"

    def __init__(self, scope_label: str) -> None:
        super().__init__()
        self.scope_label = scope_label
        self.seen: dict[str, list[tuple[float, Seen]]] = {}

    def sample(self) -> None:
        self.look()

    def look(self) -> None:
        now = time.monotonic()
        for deployment, seen in ours(self.scope_label).items():
            self.seen.setdefault(deployment, []).append((now, seen))

    def containers_of(self, deployment_id: str) -> dict[str, set[str]]:
        """container id -> the images it was seen with."""
        result: dict[str, set[str]] = {}
        for _, seen in self.seen.get(deployment_id, []):
            result.setdefault(seen.container_id, set()).add(canonical_image(seen.image))
        return result


def ours(scope_label: str) -> dict[str, Seen]:
    out = podman("ps", "-a", "--filter", f"label={scope_label}", "--format", "json", check=False).stdout
    try:
        rows = json.loads(out or "[]")
    except ValueError:
        return {}
    found = {}
    for row in rows:
        deployment = (row.get("Labels") or {}).get("techulus.deployment.id")
        if deployment:
            found[deployment] = Seen(
                row["Id"], row.get("Image", ""), str(row.get("Created", "")), row.get("State", "")
            )
    return found


def _text(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()


def _fetch(url: str, timeout: float, host: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (OSError, ValueError):
        return 0, ""


class RolloutRig:
    """Start with `up()`, tear down with `down()` (always; it removes everything it made).

    `agent_command` is the agent's argv prefix (`[python, -m, agent]` or `[bin/agent]`);
    `agent_env` adds/overrides TECHULUS_AGENT_* settings (e.g. short intervals)."""

    def __init__(
        self, workdir: Path, agent_command: list[str], agent_env: dict[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        self.agent_command = agent_command
        self.agent_env = dict(agent_env or {})
        self.tag = uuid.uuid4().hex[:8]
        self.domain = f"app-{self.tag}.test"
        self.log_path = workdir / "agent.log"
        self.cp = FakeControlPlane()
        self.caddy = CaddyProcess(workdir / "caddy", free_port(), free_port(), free_port())
        self.net: TestNetwork | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.server_id = ""

    # --- lifecycle ----------------------------------------------------------------------------

    def up(self) -> RolloutRig:
        self.net = create_network()
        self.cp.start()
        for subnet in range(1, 256):  # registration takes the lowest free subnet: the network's
            if subnet != self.net.subnet_id:
                self.cp.add_server("placeholder", subnet_id=subnet, status="offline")
        (self.workdir / "caddy").mkdir(parents=True, exist_ok=True)
        self.caddy.start()
        self.start_agent(self.cp.add_token())
        config = self.workdir / "data" / "config.json"
        self.wait(config.exists, 30, "registration")
        self.server_id = json.loads(config.read_text())["serverId"]
        return self

    def start_agent(self, token: str = "") -> None:
        assert self.net is not None
        env = dict(os.environ)
        if self.agent_command[1:3] == ["-m", "agent"]:
            env["PYTHONPATH"] = str(REPO)  # `python -m agent` runs the checkout
        else:
            # A zipapp runs its own bundled code: the checkout on PYTHONPATH would shadow it,
            # and the bench would measure the checkout instead of the shipped agent.
            env.pop("PYTHONPATH", None)
        env.update(
            {
                "TECHULUS_AGENT_MANAGE_DNS": "false",
                "TECHULUS_AGENT_MANAGE_WIREGUARD": "false",
                "TECHULUS_AGENT_MANAGE_CADDY": "true",
                "TECHULUS_AGENT_CADDY_ADMIN_URL": self.caddy.admin_url,
                "TECHULUS_AGENT_CADDY_HTTPS_LISTEN": f"127.0.0.1:{self.caddy.https_port}",
                "TECHULUS_AGENT_STOP_TIMEOUT": "1",
                "TECHULUS_AGENT_HTTP_RETRIES": "0",
                "TECHULUS_AGENT_RUN_DIR": str(self.workdir / "run"),
                "TECHULUS_AGENT_NETWORK_NAME": self.net.name,
                "TECHULUS_AGENT_SCOPE_LABEL": self.net.scope_label,
                **self.agent_env,
            }
        )
        if token:
            env["TECHULUS_AGENT_TOKEN"] = token
        argv = [*self.agent_command, "--url", self.cp.url, "--data-dir", str(self.workdir / "data")]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def stop_agent(self) -> None:
        stop_process(self.proc)

    def down(self) -> None:
        self.stop_agent()
        self.caddy.stop()
        self.cp.stop()
        if self.net is not None:
            remove_network(self.net)

    # --- the service --------------------------------------------------------------------------

    def add_service(
        self,
        image: str = ROLLOUT_V1,
        health: bool = False,
        timing: dict[str, int | None] | None = None,
        domain: str | None = None,
    ) -> str:
        """One replica on this server, port 80 public on `domain` (default `self.domain`); with
        `health`, the rollout images' health check with `timing` (interval/timeout/retries/
        startPeriod; default every 1 s, no start period; None values get the CP's defaults)."""
        service = self.cp.add_service(
            f"web-{self.tag}-{len(self.cp.rollout.services)}",
            image,
            {self.server_id: 1},
            health_cmd=ROLLOUT_HEALTH_CMD if health else None,
            health=timing if timing is not None else FAST_HEALTH,
            ports=[(80, domain or self.domain)],
        )
        return service.id

    def rows(self, service_id: str) -> list[dict[str, Any]]:
        return self.cp.deployment_rows(service_id)

    def wait_rollout(self, rollout_id: str, timeout: float) -> str:
        """Wait until the rollout is no longer in progress; returns its final status."""
        status = self.wait(
            lambda: (s := self.cp.rollout_status(rollout_id)) != "in_progress" and s,
            timeout,
            lambda: f"rollout {rollout_id[:8]} to end; rows now: {self.cp.rollout_snapshot()['deployments']}",
        )
        return str(status)

    def rollout_seconds(self, rollout_id: str) -> float:
        """From deployService to the rollout's end, by the control plane's own timeline."""
        changes = [c for c in self.cp.rollout_snapshot()["timeline"] if c["id"] == rollout_id]
        return (changes[-1]["time"] - changes[0]["time"]) / 1000

    def serve(self, domain: str | None = None) -> tuple[int, str]:
        """GET / through Caddy for `domain` (default `self.domain`)."""
        status, body = _fetch(f"http://127.0.0.1:{self.caddy.https_port}/", 2.0, host=domain or self.domain)
        return status, body.strip()

    def prober(self, domain: str | None = None) -> RouteProber:
        return RouteProber(self.caddy.admin_url, domain or self.domain)

    def watcher(self) -> ContainerWatcher:
        assert self.net is not None
        return ContainerWatcher(self.net.scope_label)

    def containers(self) -> dict[str, Seen]:
        assert self.net is not None
        return ours(self.net.scope_label)

    # --- waiting ------------------------------------------------------------------------------

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str | Callable[[], str]) -> Any:
        """Poll `predicate` until truthy; RigError (with the agent's log tail) on timeout or
        when the agent exits. `what` may be a callable, evaluated only for the error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None:
                raise RigError(
                    f"agent exited ({self.proc.returncode}) while waiting for {_text(what)}\n{self.log_tail()}"
                )
            time.sleep(0.05)
        raise RigError(
            f"timed out after {timeout:g}s waiting for {_text(what)}\n--- agent log ---\n{self.log_tail()}"
        )

    def log_tail(self, chars: int = 5000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else "(no log)"
