"""Issue 11's figures, measured on the shipped agent end to end; prints them, asserts nothing.

    ./build.sh && .venv/bin/python bench/bench_core.py [--runs 3] [--converge 20,250]
                  [--idle 0,20,100,250] [--idle-seconds 30] [--agent bin/agent] [--baseline OLD]
                  [--soak MINUTES [--soak-containers 100] [--soak-every 60]]

Each run starts `bin/agent` (or `python -m agent` with `--agent module`) as a process with its
default timers, registered against the fake control plane (tests/fakecp.py) over HTTP on
loopback, with real Podman (DNS, Caddy and WireGuard not managed): the status thread, the
work-queue and build polls all run as they do on a server.

1. Convergence: the control plane starts listing N new deployments; from the first poll that
   returns them to the first status report listing all N `running`, against the summed wall
   time of the agent's own `podman run` calls in that window (timed by a wrapper around
   podman that logs each call; the wrapper is used for this figure only).
2. Idle cost per 10 s with M containers (grown 0 -> 20 -> 100 -> 250 in one agent process,
   no wrapper): the agent's own CPU (utime+stime) and that of its reaped children (podman:
   cutime+cstime), from /proc/PID/stat over --idle-seconds once the agent has settled.
3. VmRSS of the agent process at each M, beside the import floor (a bare python3 importing
   what every agent needs to run: urllib3, whose ssl maps the libcrypto that signs, and ctypes).
4. With `--soak`, one agent with `--soak-containers` for that many minutes: VmRSS and CPU
   sampled every `--soak-every` seconds (is memory flat over an hour?).
Extra, labelled `micro (in-process)`: report building from a listing of M containers.
With `--baseline OLD` (another build, e.g. main's), both agents are measured in turn in every run.
Needs root and Podman (scripts/install-test-deps.sh). Prints the load average with each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fakecp import FakeControlPlane  # noqa: E402
from tests.e2e import stop_process  # noqa: E402
from tests.testbed import HTTPD_IMAGE, TestNetwork, create_network, prepare_podman, remove_network  # noqa: E402

API = "/api/v1/agent"
# After the last deployment runs: past the rollout-follow window (polls back to one per tick)
# and past the one beat that may fall between two ticks until the heartbeat lines up with them.
SETTLE = 25.0
TICKS = os.sysconf("SC_CLK_TCK")
IMPORT_FLOOR = (
    "import urllib3, json, logging, threading, subprocess, ctypes; "
    "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS:')))"
)
WRAPPER = """#!/bin/bash
s=$EPOCHREALTIME
{podman} "$@"
rc=$?
echo "$s $EPOCHREALTIME $1 $2" >> {log}
exit $rc
"""


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def proc_cpu(pid: int) -> tuple[float, float]:
    """(own, reaped children) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / TICKS, (cutime + cstime) / TICKS


def vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Rig:
    """The fake control plane, a test network and the agent as a process."""

    def __init__(self, workdir: Path, command: list[str], wrapper: bool) -> None:
        self.workdir = workdir
        self.command = command
        self.cp = FakeControlPlane().start()
        self.net: TestNetwork = create_network()
        self.calls = workdir / "podman-calls.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.server_id = ""
        self.wrapper = wrapper

    def up(self) -> Rig:
        for subnet in range(1, 256):  # registration takes the lowest free subnet: the network's
            if subnet != self.net.subnet_id:
                self.cp.add_server("placeholder", subnet_id=subnet, status="offline")
        env = dict(os.environ)
        if self.command[0] == sys.executable:
            env["PYTHONPATH"] = str(REPO)
        else:
            # The zipapp runs its own bundled code (PYTHONPATH would put the checkout first) and,
            # as under systemd, may cache bytecode.
            env.pop("PYTHONPATH", None)
            env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update({
            "TECHULUS_AGENT_MANAGE_DNS": "false",
            "TECHULUS_AGENT_MANAGE_WIREGUARD": "false",
            "TECHULUS_AGENT_MANAGE_CADDY": "false",
            "TECHULUS_AGENT_STOP_TIMEOUT": "1",
            "TECHULUS_AGENT_RUN_DIR": str(self.workdir / "run"),
            "TECHULUS_AGENT_NETWORK_NAME": self.net.name,
            "TECHULUS_AGENT_SCOPE_LABEL": self.net.scope_label,
            "TECHULUS_AGENT_TOKEN": self.cp.add_token(),
        })
        if self.wrapper:
            script = self.workdir / "podman-timed"
            real = subprocess.run(["sh", "-c", "command -v podman"], capture_output=True, text=True).stdout.strip()
            script.write_text(WRAPPER.format(podman=shlex.quote(real), log=shlex.quote(str(self.calls))))
            script.chmod(0o755)
            env["TECHULUS_AGENT_PODMAN"] = str(script)
        argv = [*self.command, "--url", self.cp.url, "--data-dir", str(self.workdir / "data")]
        with (self.workdir / "agent.log").open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        config = self.workdir / "data" / "config.json"
        self.wait(config.exists, 60, "registration")
        self.server_id = json.loads(config.read_text())["serverId"]
        self.wait(lambda: self.reports_since(0), 60, "a first status report")
        return self

    def down(self) -> None:
        stop_process(self.proc)
        self.cp.stop()
        remove_network(self.net)

    def set_containers(self, count: int) -> int:
        """List `count` deployments from now on; returns the time (ms) it was set."""
        containers = [
            {
                "deploymentId": f"bench-{i}", "serviceId": f"bsvc-{i}", "serviceName": f"bench {i}",
                "name": f"bench-{self.net.subnet_id}-{i}", "image": HTTPD_IMAGE, "ipAddress": self.net.ip(2 + i),
                "ports": [], "env": {}, "healthCheck": None, "volumes": [],
            }
            for i in range(count)
        ]
        document = {"containers": containers, "dns": {"records": []}, "caddy": {"routes": []}, "wireguard": {"peers": []}}
        at = self.cp.now_ms()
        self.cp.set_expected_state(self.server_id, document)
        return at

    def reports_since(self, ms: int) -> list:
        return [r for r in self.cp.status_reports if r.time_ms >= ms and r.server_id == self.server_id]

    def all_running(self, count: int, since: int) -> int | None:
        """Time (ms) of the first report since `since` listing exactly `count` running deployments."""
        for report in self.reports_since(since):
            entries = report.report.get("containers") or []
            if len(entries) == count and all(e.get("status") == "running" for e in entries):
                return report.time_ms
        return None

    def first_poll_after(self, ms: int) -> int:
        polls = [r.time_ms for r in self.cp.requests_to(f"{API}/expected-state", "GET") if r.time_ms >= ms]
        return min(polls) if polls else ms

    def podman_runs_between(self, start_ms: int, end_ms: int) -> tuple[float, Counter[str]]:
        """Summed wall seconds of `podman run` calls, and every call by subcommand, in the window."""
        total, counts = 0.0, Counter[str]()
        if not self.calls.exists():
            return total, counts
        for line in self.calls.read_text().splitlines():
            fields = line.split()
            if len(fields) < 3:
                continue
            begin, end = float(fields[0].replace(",", ".")), float(fields[1].replace(",", "."))
            if begin * 1000 < start_ms or end * 1000 > end_ms + 1:
                continue
            kind = " ".join(fields[2:4]) if fields[2] in ("container", "image", "network") else fields[2]
            counts[kind] += 1
            if fields[2] == "run":
                total += end - begin
        return total, counts

    def wait(self, predicate, timeout: float, what: str):  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"agent exited while waiting for {what}: {self.log_tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"timed out waiting for {what}: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.workdir / "agent.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def converge(command: list[str], count: int, timeout: float) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-core-"))
    rig = Rig(workdir, command, wrapper=True)
    try:
        rig.up()
        time.sleep(2)
        set_at = rig.set_containers(count)
        done = rig.wait(lambda: rig.all_running(count, set_at), timeout, f"{count} deployments running")
        start = rig.first_poll_after(set_at)
        seconds = (done - start) / 1000
        run_sum, calls = rig.podman_runs_between(start, done)
        return {"seconds": seconds, "runs": run_sum, "ratio": seconds / max(run_sum, 1e-9), "calls": calls}
    finally:
        rig.down()


def soak(command: list[str], count: int, minutes: float, every: float, timeout: float) -> list[tuple[float, float, float]]:
    """`count` containers for `minutes`: (minute, VmRSS MB, CPU ms per 10 s since the last
    sample, agent + children) every `every` seconds, printed as they come."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    rig = Rig(workdir, command, wrapper=False)
    samples: list[tuple[float, float, float]] = []
    try:
        rig.up()
        assert rig.proc is not None
        set_at = rig.set_containers(count)
        rig.wait(lambda: rig.all_running(count, set_at), timeout, f"{count} running")
        time.sleep(SETTLE)
        started = time.monotonic()
        last_cpu = sum(proc_cpu(rig.proc.pid))
        while time.monotonic() - started < minutes * 60:
            time.sleep(every)
            cpu = sum(proc_cpu(rig.proc.pid))
            sample = ((time.monotonic() - started) / 60, vm_rss_mb(rig.proc.pid), (cpu - last_cpu) * 10 / every * 1000)
            last_cpu = cpu
            samples.append(sample)
            print(f"  soak {count}: minute {sample[0]:5.1f}: VmRSS {sample[1]:.1f} MB, CPU {sample[2]:.0f} ms per 10 s "
                  f"(load {load()})", flush=True)
        return samples
    finally:
        rig.down()


def idle_series(command: list[str], counts: list[int], seconds: float, timeout: float) -> dict[int, dict]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    rig = Rig(workdir, command, wrapper=False)
    results: dict[int, dict] = {}
    try:
        rig.up()
        assert rig.proc is not None
        for count in counts:
            set_at = rig.set_containers(count)
            rig.wait(lambda: rig.all_running(count, set_at), timeout, f"{count} running")  # noqa: B023
            time.sleep(SETTLE)
            own0, kids0 = proc_cpu(rig.proc.pid)
            start_ms = rig.cp.now_ms()
            time.sleep(seconds)
            own1, kids1 = proc_cpu(rig.proc.pid)
            requests = Counter(
                f"{r.method} {r.path.removeprefix(API)}" for r in rig.cp.requests if r.time_ms >= start_ms
            )
            scale = 10 / seconds
            results[count] = {
                "own": (own1 - own0) * scale * 1000,
                "children": (kids1 - kids0) * scale * 1000,
                "rss": vm_rss_mb(rig.proc.pid),
                "requests": {k: v * scale for k, v in requests.items()},
            }
            print(f"  idle {count}: agent {results[count]['own']:.0f} ms + children {results[count]['children']:.0f} ms "
                  f"CPU per 10 s, VmRSS {results[count]['rss']:.1f} MB (load {load()})", flush=True)
        return results
    finally:
        rig.down()


def import_floor(command: list[str]) -> float:
    """VmRSS (MB) of the agent's own interpreter and bundled packages importing only IMPORT_FLOOR
    (shiv's SHIV_INTERPRETER runs a script with the zipapp's site-packages)."""
    script = Path(tempfile.mkdtemp(prefix="bench-floor-")) / "floor.py"
    script.write_text(IMPORT_FLOOR.replace("; ", "\n"))
    if command[0] == sys.executable:
        argv, env = [sys.executable, str(script)], dict(os.environ)
    else:
        argv, env = [*command, str(script)], dict(os.environ, SHIV_INTERPRETER="1")
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def micro_report(count: int) -> float:
    """Milliseconds of agent CPU to turn a listing of `count` containers into a report."""
    from agent.drift import ContainerInfo
    from agent.heartbeat import Heartbeat
    from agent.host.podman import HealthReading

    containers = [
        ContainerInfo(id=f"{i:064x}", name=f"c{i}", image=HTTPD_IMAGE, state="running",
                      labels={"techulus.service.id": f"s{i}", "techulus.deployment.id": f"d{i}"})
        for i in range(count)
    ]

    class Reader:
        def list_containers(self, max_age=0.0):  # noqa: ANN001, ANN202
            return containers

        def list_containers_aged(self, max_age=0.0):  # noqa: ANN001, ANN202
            return containers, 0.0

        def read_health(self, ids):  # noqa: ANN001, ANN202
            return {cid: HealthReading("none", 0, False) for cid in ids}

    heartbeat = Heartbeat(None, Reader(), 10)  # type: ignore[arg-type]
    started = time.process_time()
    for _ in range(20):
        heartbeat.send_once()
    return (time.process_time() - started) / 20 * 1000


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "n/a"
    return "/".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def agent_command(agent: str) -> list[str]:
    if agent == "module":
        return [sys.executable, "-m", "agent"]
    if not Path(agent).exists():
        raise SystemExit(f"{agent} does not exist: run ./build.sh, or pass --agent module")
    return [str(Path(agent).resolve())]


def main() -> None:
    # SIGTERM ends the bench like Ctrl-C: the rigs' `finally` stops the agent and removes its containers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--converge", default="20", help="comma-separated deployment counts, e.g. 20,250")
    parser.add_argument("--idle", default="0,20,100", help="comma-separated container counts, ascending")
    parser.add_argument("--idle-seconds", type=float, default=30)
    parser.add_argument("--timeout", type=float, default=400)
    parser.add_argument("--soak", type=float, default=0, help="minutes at --soak-containers, sampling VmRSS and CPU")
    parser.add_argument("--soak-containers", type=int, default=100)
    parser.add_argument("--soak-every", type=float, default=60, help="seconds between soak samples")
    parser.add_argument("--agent", default=str(REPO / "bin" / "agent"), help="the agent binary, or `module`")
    parser.add_argument("--baseline", default="", help="another agent binary, measured interleaved with --agent")
    args = parser.parse_args()
    agents = {"agent": agent_command(args.agent)}
    if args.baseline:
        agents = {"baseline": agent_command(args.baseline), **agents}
    prepare_podman(Path(tempfile.mkdtemp(prefix="bench-podman-")))
    converge_counts = [int(n) for n in args.converge.split(",") if n.strip()]
    idle_counts = [int(n) for n in args.idle.split(",") if n.strip()]
    for label, command in agents.items():
        print(f"{label}: {' '.join(command)}", flush=True)
    print(f"load average at start {load()}", flush=True)
    converged = {label: {n: [] for n in converge_counts} for label in agents}
    idle = {label: {n: [] for n in idle_counts} for label in agents}
    for run in range(args.runs):  # interleaved: each run measures every figure of every agent once
        for label, command in agents.items():
            for count in converge_counts:
                result = converge(command, count, args.timeout)
                converged[label][count].append(result)
                print(f"  [run {run + 1}, {label}] converge {count}: {result['seconds']:.2f}s, podman run sum "
                      f"{result['runs']:.2f}s, ratio {result['ratio']:.2f}x; podman calls {dict(result['calls'])} "
                      f"(load {load()})", flush=True)
            if idle_counts:
                print(f"  [run {run + 1}, {label}]", flush=True)
                for count, result in idle_series(command, idle_counts, args.idle_seconds, args.timeout).items():
                    idle[label][count].append(result)
    soaked = {}
    if args.soak:
        for label, command in agents.items():
            print(f"  [soak, {label}] {args.soak_containers} containers for {args.soak:g} min", flush=True)
            soaked[label] = soak(command, args.soak_containers, args.soak, args.soak_every, args.timeout)
    print(f"--- min/median/max over {args.runs} run(s); load average now {load()}")
    for label, command in agents.items():
        print(f"{label} ({' '.join(command)}):")
        for count, results in converged[label].items():
            print(f"  converge {count} deployments: {spread([r['seconds'] for r in results])} s end to end; "
                  f"summed podman run {spread([r['runs'] for r in results])} s; "
                  f"ratio {spread([r['ratio'] for r in results])}x")
        for count, results in idle[label].items():
            total = [r["own"] + r["children"] for r in results]
            print(f"  idle {count} containers, CPU per 10 s: agent {spread([r['own'] for r in results], '{:.0f}')} ms, "
                  f"children {spread([r['children'] for r in results], '{:.0f}')} ms, "
                  f"total {spread(total, '{:.0f}')} ms; VmRSS {spread([r['rss'] for r in results], '{:.1f}')} MB")
            if results:
                requests = ", ".join(f"{k} {v:.1f}" for k, v in sorted(results[-1]["requests"].items()))
                print(f"    requests per 10 s: {requests}")
        samples = soaked.get(label)
        if samples:
            rss = [sample[1] for sample in samples]
            half = max(1, len(rss) // 2)
            print(f"  soak {args.soak_containers} containers, {samples[-1][0]:.0f} min: VmRSS first {rss[0]:.1f}, "
                  f"min/median/max {spread(rss, '{:.1f}')} MB, last {rss[-1]:.1f} MB; median of the second half minus "
                  f"the first {statistics.median(rss[half:]) - statistics.median(rss[:half]):+.2f} MB; CPU per 10 s "
                  f"{spread([sample[2] for sample in samples], '{:.0f}')} ms")
        print(f"  import floor (python3 + urllib3 + ctypes): VmRSS {import_floor(command):.1f} MB")
    for count in idle_counts:
        print(f"micro (in-process, this checkout, not the shipped binary): one report from a listing of {count} "
              f"containers: {micro_report(count):.2f} ms CPU")


if __name__ == "__main__":
    main()
