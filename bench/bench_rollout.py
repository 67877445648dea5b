"""Issue 9's rollout figures with the shipped agent, real Podman and real Caddy; prints, asserts nothing.

    ./build.sh && .venv/bin/python bench/bench_rollout.py [--runs 3] [--health none,default]
                                                          [--idle-seconds 60] [--agent bin/agent]

The agent (`bin/agent`, or `python -m agent` with `--agent module`) runs as a process with its
DEFAULT timers against the fake control plane's rollout stage machine (tests/fakerollout.py,
ROLLOUT.md) over HTTP on loopback; DNS and WireGuard are not managed, Caddy is (on loopback).
Per health-check mode and run: a new service is deployed on v1 (deploy -> running), then
redeployed on v2 (redeploy -> running), each measured by the control plane's own timeline from
deployService to the rollout's end, with the agent's status reports and expected-state polls
in that window, and, during the redeploy, the longest time the public route had no upstream
answering HTTP (a prober every ~50 ms) and whether the old container was re-created.
Health modes: `none`; `default` (the CP's defaults 10/5/3/30 s); `fast` (1 s, no start period).
A rollout that does not end within --timeout is reported as such and its mode is skipped.
Finally the requests of an idle agent, over --idle-seconds, scaled to a minute.
Needs root, Podman and Caddy (scripts/install-test-deps.sh).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.model import canonical_image  # noqa: E402
from tests.rolloutrig import FAST_HEALTH, RigError, RolloutRig  # noqa: E402
from tests.testbed import ROLLOUT_V1, ROLLOUT_V2, prepare_podman, prepare_rollout_images  # noqa: E402

API = "/api/v1/agent"
HEALTH_LABELS = {
    "none": "no health check",
    "default": "health check with the CP's defaults 10/5/3/30 s",
    "fast": "health check every 1 s",
}
HEALTH_MODES: dict[str, tuple[bool, dict[str, int | None]]] = {
    "none": (False, {}),
    "default": (True, {"interval": None, "timeout": None, "retries": None, "startPeriod": None}),
    "fast": (True, FAST_HEALTH),
}


def requests_between(rig: RolloutRig, start_ms: int, end_ms: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    for request in rig.cp.requests:
        if start_ms <= request.time_ms <= end_ms:
            counts[f"{request.method} {request.path.removeprefix(API)}"] += 1
    return counts


def rollout_window(rig: RolloutRig, rollout_id: str) -> tuple[int, int]:
    changes = [c for c in rig.cp.rollout_snapshot()["timeline"] if c["id"] == rollout_id]
    return changes[0]["time"], changes[-1]["time"]


def one_rollout(rig: RolloutRig, start, timeout: float) -> dict:
    """Run `start()` (returns a rollout), wait for its end; seconds and requests of the window."""
    rollout = start()
    try:
        status = rig.wait_rollout(rollout.id, timeout)
    except RigError:
        return {"status": f"not ended within {timeout:g}s", "seconds": None}
    begin, end = rollout_window(rig, rollout.id)
    counts = requests_between(rig, begin, end)
    return {
        "status": status,
        "seconds": (end - begin) / 1000,
        "reports": counts["POST /status"],
        "polls": counts["GET /expected-state"],
        "requests": sum(counts.values()),
    }


def run_mode(rig: RolloutRig, mode: str, runs: int, timeout: float) -> None:
    health, timing = HEALTH_MODES[mode]
    deploys, redeploys = [], []
    for run in range(runs):
        domain = f"{mode}{run}-{rig.tag}.test"
        service = rig.add_service(ROLLOUT_V1, health, timing, domain)
        deploy = one_rollout(rig, lambda: rig.cp.deploy_service(service), timeout)  # noqa: B023
        deploys.append(deploy)
        print(f"  [{mode} #{run + 1}] deploy: {describe(deploy)}", flush=True)
        if deploy["seconds"] is None:
            break
        try:
            rig.wait(lambda: rig.serve(domain) == (200, "v1"), 30, "v1 served")  # noqa: B023
        except RigError:
            print(f"  [{mode} #{run + 1}] v1 never served through Caddy")
        d1 = rig.rows(service)[0]["id"]
        watcher, prober = rig.watcher(), rig.prober(domain).start()
        watcher.look()
        watcher.start()
        redeploy = one_rollout(rig, lambda: rig.cp.redeploy(service, ROLLOUT_V2), timeout)  # noqa: B023
        if redeploy["seconds"] is not None:
            try:  # the old container gone and v2 served: the end of the user-visible rollout
                rig.wait(lambda: d1 not in rig.containers() and rig.serve(domain) == (200, "v2"), 30, "v2")  # noqa: B023
            except RigError:
                print(f"  [{mode} #{run + 1}] v2 never served alone through Caddy")
        prober.stop()
        watcher.stop()
        old = watcher.containers_of(d1)
        redeploy["dead"] = prober.longest_dead()
        redeploy["recreated"] = len(old) > 1 or any(
            images != {canonical_image(ROLLOUT_V1)} for images in old.values()
        )
        redeploys.append(redeploy)
        print(f"  [{mode} #{run + 1}] redeploy: {describe(redeploy)}", flush=True)
        if redeploy["seconds"] is None:
            break
    summarise(f"deploy -> running ({HEALTH_LABELS[mode]})", deploys)
    summarise(f"redeploy -> running ({HEALTH_LABELS[mode]})", redeploys)


def describe(result: dict) -> str:
    if result["seconds"] is None:
        return result["status"]
    text = (
        f"{result['status']} in {result['seconds']:.2f}s, {result['reports']} reports, {result['polls']} polls, "
        f"{result['requests']} requests"
    )
    if "dead" in result:
        text += f", longest dead route {result['dead']:.2f}s, old container re-created: {result['recreated']}"
    return text


def summarise(label: str, results: list[dict]) -> None:
    done = [r for r in results if r["seconds"] is not None]
    if not done:
        print(f"{label}: never ended ({results[0]['status'] if results else 'not run'})")
        return
    seconds = [r["seconds"] for r in done]
    line = (
        f"{label}: min {min(seconds):.2f}s / median {statistics.median(seconds):.2f}s / max {max(seconds):.2f}s "
        f"over {len(done)} run(s); per rollout median {statistics.median(r['reports'] for r in done):g} reports, "
        f"{statistics.median(r['polls'] for r in done):g} polls, {statistics.median(r['requests'] for r in done):g} requests"
    )
    if all("dead" in r for r in done):
        line += (
            f"; longest dead-route interval {max(r['dead'] for r in done):.2f}s; "
            f"old container re-created in {sum(r['recreated'] for r in done)}/{len(done)}"
        )
    if len(done) < len(results):
        line += f" ({len(results) - len(done)} did not end)"
    print(line, flush=True)


def idle_requests(rig: RolloutRig, seconds: float) -> None:
    time.sleep(5)  # let the last rollout's follow-ups settle
    start = rig.cp.now_ms()
    time.sleep(seconds)
    counts = requests_between(rig, start, rig.cp.now_ms())
    scale = 60 / seconds
    detail = ", ".join(f"{path} {n * scale:.0f}" for path, n in sorted(counts.items()))
    note = "" if seconds == 60 else f" (measured over {seconds:g}s, scaled x{scale:.2f})"
    print(f"requests per idle minute: {sum(counts.values()) * scale:.0f}{note}: {detail}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--health", default="none,default", help="comma-separated: none, default, fast")
    parser.add_argument(
        "--timeout", type=float, default=90, help="seconds a rollout may take before giving up"
    )
    parser.add_argument("--idle-seconds", type=float, default=60)
    parser.add_argument("--agent", default=str(REPO / "bin" / "agent"), help="the agent binary, or `module`")
    args = parser.parse_args()
    modes = [m.strip() for m in args.health.split(",") if m.strip()]
    unknown = [m for m in modes if m not in HEALTH_MODES]
    if unknown:
        parser.error(f"unknown health mode(s) {unknown}; choose from {sorted(HEALTH_MODES)}")
    if args.agent == "module":
        command = [sys.executable, "-m", "agent"]
    elif Path(args.agent).exists():
        command = [args.agent]
    else:
        parser.error(f"{args.agent} does not exist: run ./build.sh, or pass --agent module")
    workdir = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    prepare_podman(workdir)
    prepare_rollout_images(workdir / "images")
    rig = RolloutRig(workdir, command)  # the agent's default timers
    print(f"agent: {' '.join(command)} (default timers), work dir {workdir}")
    try:
        rig.up()
        for mode in modes:
            run_mode(rig, mode, args.runs, args.timeout)
        idle_requests(rig, args.idle_seconds)
    finally:
        rig.down()


if __name__ == "__main__":
    main()
