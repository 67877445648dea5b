"""Issue 2's figures with real Podman; prints them, asserts nothing.

    .venv/bin/python bench/bench_core.py [--containers 100] [--deployments 20]

1. Convergence: N new deployments applied by one reconciler pass, against the summed
   wall time of the `podman run` calls inside it (target: well under 2x).
2. Agent CPU per idle tick (no drift) with M managed containers, children excluded
   (target: under 20 ms), including the status report's podman reads.
3. Idle RSS of the running agent process (target: under 40 MB).
4. Warm start of `bin/agent --version` (target: under 0.3 s), or `python -m agent` when
   bin/agent has not been built.
Needs root and Podman (scripts/install-test-deps.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.heartbeat import Heartbeat  # noqa: E402
from agent.host import run as run_module  # noqa: E402
from agent.host.podman import Podman, PodmanOptions  # noqa: E402
from agent.loop import Reconciler  # noqa: E402
from agent.model import parse_expected_state  # noqa: E402
from agent.settings import Settings  # noqa: E402
from tests.testbed import HTTPD_IMAGE, create_network, prepare_podman, remove_network  # noqa: E402


class StaticSource:
    def __init__(self, document: dict, subnet) -> None:
        self.document, self.subnet = document, subnet

    def fetch(self):
        return parse_expected_state(self.document, self.subnet)


def containers_doc(net, count: int, offset: int = 0) -> list[dict]:
    return [
        {
            "deploymentId": f"bench-{offset + i}",
            "serviceId": f"bsvc-{offset + i}",
            "serviceName": f"bench {offset + i}",
            "name": f"bench-{offset + i}",
            "image": HTTPD_IMAGE,
            "ipAddress": net.ip(2 + offset + i),
        }
        for i in range(count)
    ]


def timed_runs() -> list[float]:
    """Wall time of every `podman run` the agent starts, recorded at the choke point."""
    durations: list[float] = []
    original = run_module.run

    def recording(argv, **kwargs):
        started = time.monotonic()
        try:
            return original(argv, **kwargs)
        finally:
            if len(argv) > 1 and argv[1] == "run":
                durations.append(time.monotonic() - started)

    run_module.run = recording
    import agent.host.podman as podman_module

    podman_module.run = recording
    return durations


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deployments", type=int, default=20)
    parser.add_argument("--containers", type=int, default=100)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-core-"))
    prepare_podman(workdir)
    net = create_network()
    import ipaddress

    subnet = ipaddress.IPv4Network(net.subnet)
    settings = Settings.load(
        {"data_dir": str(workdir / "data"), "network_name": net.name, "scope_label": net.scope_label, "stop_timeout": 1},
        environ={},
    )
    podman_adapter = Podman(
        PodmanOptions(network=net.name, scope_label=net.scope_label, stop_timeout=1, run_dir=workdir / "run")
    )
    heartbeat = Heartbeat(None, podman_adapter, 10)
    try:
        durations = timed_runs()
        source = StaticSource({"subnetId": net.subnet_id, "containers": containers_doc(net, args.deployments)}, subnet)
        reconciler = Reconciler(settings, podman_adapter, source, [], "", heartbeat, threading.Lock())
        started = time.monotonic()
        reconciler.tick()
        converge = time.monotonic() - started
        running = [c for c in podman_adapter.list_containers() if c.running]
        print(f"converge: {args.deployments} deployments in {converge:.2f}s; "
              f"sum of podman run calls {sum(durations):.2f}s; ratio {converge / max(sum(durations), 1e-9):.2f}x; "
              f"running {len(running)}/{args.deployments}")

        # Grow to M containers for the idle-tick figure.
        extra = args.containers - args.deployments
        if extra > 0:
            source.document["containers"] += containers_doc(net, extra, offset=args.deployments)
            reconciler.tick()
        total = len(podman_adapter.list_containers())
        samples = []
        for _ in range(10):
            cpu = time.process_time()
            reconciler.tick()
            heartbeat.send_once()
            samples.append((time.process_time() - cpu) * 1000)
        assert not reconciler.last_plan, "the idle ticks must see no drift"
        print(f"idle tick: agent CPU per tick with {total} containers: median {statistics.median(samples):.1f} ms, "
              f"max {max(samples):.1f} ms (children excluded; includes the status report)")

        state_file = workdir / "state.json"
        state_file.write_text(json.dumps(source.document))
        env = dict(os.environ, TECHULUS_AGENT_NETWORK_NAME=net.name, TECHULUS_AGENT_SCOPE_LABEL=net.scope_label,
                   PYTHONPATH=str(REPO))
        proc = subprocess.Popen([sys.executable, "-m", "agent", "standalone", str(state_file), "--data-dir",
                                 str(workdir / "data")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(25)
        rss = 0
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) // 1024
        proc.terminate()
        proc.wait(timeout=30)
        print(f"idle RSS of the agent process with {total} containers: {rss} MB")
    finally:
        remove_network(net)

    binary = REPO / "bin" / "agent"
    command = [str(binary), "--version"] if binary.exists() else [sys.executable, "-m", "agent", "--version"]
    subprocess.run(command, capture_output=True, check=True, cwd=REPO)
    starts = []
    for _ in range(5):
        started = time.monotonic()
        subprocess.run(command, capture_output=True, check=True, cwd=REPO)
        starts.append(time.monotonic() - started)
    print(f"warm start of `{' '.join(command[-2:]) if binary.exists() else 'python -m agent --version'}`: "
          f"median {statistics.median(starts):.3f}s")
    print(f"(bench process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB)")


if __name__ == "__main__":
    main()
