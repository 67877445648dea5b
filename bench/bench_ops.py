"""Operability figures (issue 12): `agent status` latency (cold zipapp start included), the
cost of one metrics scrape to the agent, and the agent's RSS with metrics on and off.

Builds the zipapp for this machine (or takes --zipapp), runs it as `agent standalone` with
one busybox container on a test network (real Podman), and measures from outside. Needs
root and podman.

    .venv/bin/python bench/bench_ops.py [--zipapp bin/agent] [--scrapes 200] [--runs 10]

Prints figures only; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e import free_port  # noqa: E402
from tests.testbed import HTTPD_IMAGE, create_network, podman_available, prepare_podman, remove_network  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
#: The zipapp's own shebang: how servers run it.
PYTHON = "/usr/bin/python3"


def build_zipapp(out: Path) -> Path:
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    version = subprocess.run([PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True, check=True).stdout.strip()
    env = {**os.environ, "OUT": str(out), "ARCHES": arch, "PY_VERSIONS": version, "BUILD": str(out / "build")}
    subprocess.run([str(ROOT / "build.sh")], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return out / f"agent-linux-{arch}"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Agent:
    def __init__(self, zipapp: Path, work: Path, net, metrics_port: int | None) -> None:
        self.data_dir = work / "data"
        self.state_file = work / "state.json"
        self.state_file.write_text(json.dumps({"subnetId": net.subnet_id, "containers": [{
            "deploymentId": "bench-1", "serviceId": "svc-bench", "serviceName": "bench", "name": "bench-1",
            "image": HTTPD_IMAGE, "ipAddress": net.ip(2), "ports": [], "env": {}, "healthCheck": None, "volumes": [],
        }]}))
        self.env = {
            **os.environ,
            "TECHULUS_AGENT_NETWORK_NAME": net.name,
            "TECHULUS_AGENT_SCOPE_LABEL": net.scope_label,
            "TECHULUS_AGENT_RUN_DIR": str(work / "run"),
            "TECHULUS_AGENT_MANAGE_DNS": "false",
            "TECHULUS_AGENT_MANAGE_CADDY": "false",
            "TECHULUS_AGENT_HEARTBEAT_INTERVAL": "2",
            "SHIV_ROOT": str(work / "shiv"),
        }
        if metrics_port:
            self.env["TECHULUS_AGENT_METRICS_LISTEN"] = f"127.0.0.1:{metrics_port}"
        self.zipapp = zipapp
        self.log = open(work / "agent.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [PYTHON, str(zipapp), "standalone", str(self.state_file), "--data-dir", str(self.data_dir)],
            env=self.env, stdout=self.log, stderr=self.log,
        )

    def status(self) -> tuple[float, int, dict]:
        started = time.perf_counter()
        done = subprocess.run(
            [PYTHON, str(self.zipapp), "status", "--json", "--data-dir", str(self.data_dir)],
            env=self.env, capture_output=True, text=True,
        )
        return time.perf_counter() - started, done.returncode, json.loads(done.stdout or "{}")

    def wait_listed(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, code, shown = self.status()
            if code == 0 and any(c.get("state") == "running" for c in shown.get("containers", [])):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise SystemExit(f"the agent never listed its container; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def measure_scrapes(agent: Agent, port: int, count: int) -> tuple[list[float], float]:
    url = f"http://127.0.0.1:{port}/metrics"
    urllib.request.urlopen(url, timeout=5).read()  # first scrape: imports and registry warm-up
    before = cpu_seconds(agent.proc.pid)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        urllib.request.urlopen(url, timeout=5).read()
        times.append(time.perf_counter() - started)
    # The agent's own CPU per scrape (its idle work over this short window is included).
    return times, (cpu_seconds(agent.proc.pid) - before) / count


def settled_rss(agent: Agent, seconds: float) -> float:
    time.sleep(seconds)
    return rss_mb(agent.proc.pid)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zipapp", type=Path, help="an agent zipapp (default: build one for this machine)")
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--runs", type=int, default=10, help="`agent status` runs to time")
    parser.add_argument("--settle", type=float, default=8.0, help="seconds before reading RSS")
    args = parser.parse_args()
    if not podman_available():
        print("needs root and podman", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-ops-"))
    prepare_podman(work)
    zipapp = args.zipapp or build_zipapp(work / "bin")
    net = create_network()
    try:
        figures = {}
        for label, port in (("off", None), ("on", free_port())):
            run = work / f"metrics-{label}"
            run.mkdir()
            agent = Agent(zipapp, run, net, port)
            try:
                first, code, _ = agent.status()  # a fresh SHIV_ROOT: the very first run extracts the zipapp
                agent.wait_listed()
                if port:
                    times, cpu = measure_scrapes(agent, port, args.scrapes)
                    figures["scrape_ms"] = (statistics.median(times) * 1000, max(times) * 1000, cpu * 1000)
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
                figures[f"rss_{label}"] = settled_rss(agent, args.settle)
                latencies = [agent.status()[0] for _ in range(args.runs)]
                figures[f"status_{label}"] = (first, statistics.median(latencies), max(latencies))
            finally:
                agent.stop()
            remove_network_containers(net)
        latency_after = agent.status()  # the agent is gone: answers "no agent running", non-zero
        print(f"zipapp: {zipapp} (run by {PYTHON})")
        for label in ("off", "on"):
            first, median, worst = figures[f"status_{label}"]
            print(f"agent status --json (metrics {label}): first run {first * 1000:.0f} ms (extracts the zipapp), "
                  f"then median {median * 1000:.0f} ms, max {worst * 1000:.0f} ms over {args.runs} cold starts")
        print(f"agent status with no agent running: {latency_after[0] * 1000:.0f} ms, exit {latency_after[1]}")
        median, worst, cpu = figures["scrape_ms"]
        print(f"metrics scrape over loopback HTTP: median {median:.2f} ms, max {worst:.2f} ms; "
              f"agent CPU per scrape {cpu:.2f} ms (over {args.scrapes} scrapes)")
        print(f"agent RSS after {args.settle:.0f}s with one container: metrics off {figures['rss_off']:.1f} MB, "
              f"on {figures['rss_on']:.1f} MB (+{figures['rss_on'] - figures['rss_off']:.1f} MB)")
    finally:
        remove_network(net)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def remove_network_containers(net) -> None:
    from tests.testbed import cleanup_scope

    cleanup_scope(net.scope_label)


if __name__ == "__main__":
    sys.exit(main())
