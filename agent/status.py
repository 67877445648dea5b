"""What the agent reports to the control plane (PROTOCOL.md §6.2, §11): resources,
public IP, and each managed container's state and health.

Health semantics fix §17.18: a container that is not running is never reported as
`none` (which the control plane counts as healthy). A settled non-running container
(exited, dead, stopped) is `unhealthy`, one that is in transition (created, stopping…)
is `starting`, so a crash-looping deployment cannot pass a rollout.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import urllib3

from agent.drift import ContainerInfo

log = logging.getLogger(__name__)

TRANSITIONAL = frozenset({"created", "configured", "initialized", "stopping", "restarting", "paused", "removing"})


def resources(root: str = "/") -> dict[str, int]:
    """cpuCores, memoryMb (floor MiB of RAM) and diskGb (floor GiB of the filesystem at /)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    memory_mb = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    memory_mb = int(line.split()[1]) // 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        stat = os.statvfs(root)
        disk_gb = stat.f_blocks * stat.f_frsize // (1024**3)
    except OSError:
        disk_gb = 0
    return {"cpuCores": cores, "memoryMb": memory_mb, "diskGb": disk_gb}


def container_entries(containers: Sequence[ContainerInfo], health: Mapping[str, str]) -> list[dict[str, str]]:
    """One entry per managed container that has a deployment id (orphans included, as the CP expects)."""
    entries = []
    for container in containers:
        if not container.service_id or not container.deployment_id:
            continue
        if container.running:
            status, health_status = "running", health.get(container.id, "none")
        elif container.state in TRANSITIONAL:
            status, health_status = "stopped", "starting"
        else:
            status, health_status = "stopped", "unhealthy"
        entries.append(
            {
                "deploymentId": container.deployment_id,
                "containerId": container.id,
                "status": status,
                "healthStatus": health_status,
            }
        )
    return entries


def build_report(
    containers: Sequence[ContainerInfo],
    health: Mapping[str, str],
    public_ip: str,
    include_resources: bool,
) -> dict[str, Any]:
    """The body of POST /status, in the Go field order; `containers` is always present."""
    report: dict[str, Any] = {}
    if include_resources:
        report["resources"] = resources()
    if public_ip:
        report["publicIp"] = public_ip
    report["containers"] = container_entries(containers, health)
    return report


def detect_public_ip(url: str, timeout: float = 5.0) -> str:
    """Ask `url` for this server's public address; "" if that fails or the answer is not an IP."""
    if not url:
        return ""
    try:
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=timeout, read=timeout), retries=False)
        response = http.request("GET", url, preload_content=False)
        body = response.read(64, decode_content=True)
        response.release_conn()
    except urllib3.exceptions.HTTPError as exc:
        log.warning("public IP lookup at %s failed: %s", url, exc)
        return ""
    if response.status != 200:
        log.warning("public IP lookup at %s answered %s", url, response.status)
        return ""
    text = body.decode("ascii", errors="replace").strip()
    try:
        # IPv4 only: peers reach each other at `<publicIp>:51820` over an IPv4 mesh.
        address = ipaddress.IPv4Address(text)
    except ValueError:
        log.warning("public IP lookup at %s returned something that is not an IPv4 address: %r", url, text[:40])
        return ""
    return str(address)


class PublicIp:
    """This server's public address, looked up again every `refresh` seconds (PROTOCOL.md
    §17.28: the original asked once at start). A failed lookup keeps the last good answer.
    Calling it never waits on the network once a first answer is known: `run()` refreshes
    it on its own thread, so a slow lookup cannot delay a status report."""

    def __init__(self, fixed: str, url: str, refresh: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.fixed = fixed
        self.url = url
        self.refresh = refresh
        self._clock = clock
        self._value = ""
        self._checked_at: float | None = None

    def __call__(self) -> str:
        if self.fixed:
            return self.fixed
        if self._checked_at is None:
            self.lookup()  # first use (registration): no answer to fall back on yet
        return self._value

    def lookup(self) -> None:
        self._checked_at = self._clock()
        found = detect_public_ip(self.url)
        if found:
            if self._value and found != self._value:
                log.info("public IP changed from %s to %s", self._value, found)
            self._value = found

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if not self.fixed and (self._checked_at is None or self._clock() - self._checked_at >= self.refresh):
                self.lookup()
            stop.wait(min(self.refresh, 60.0))
