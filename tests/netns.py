"""Network namespaces as stand-in servers for real WireGuard tests (../shared/TESTBED.md).

A "LAN" namespace holds a bridge; every server namespace gets a veth into it with a
192.168.<lan>.<n>/24 "public" address. Names carry a random suffix so parallel runs on one
machine never collide, and `Lan.close()` kills whatever still runs inside (wireguard-go)
before deleting the namespaces.
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field


def netns_available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def sh(*argv: str, check: bool = True, timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=timeout, input=input)


def in_ns(
    ns: str, *argv: str, check: bool = True, timeout: float = 30, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *argv, check=check, timeout=timeout, input=input)


@dataclass
class Lan:
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    octet: int = field(default_factory=lambda: random.randint(1, 254))
    namespaces: list[str] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return f"tlan{self.tag}"

    def __post_init__(self) -> None:
        sh("ip", "netns", "add", self.hub)
        self.namespaces.append(self.hub)
        in_ns(self.hub, "ip", "link", "add", "br0", "type", "bridge")
        in_ns(self.hub, "ip", "link", "set", "br0", "up")
        in_ns(self.hub, "ip", "link", "set", "lo", "up")

    def add_server(self, index: int) -> tuple[str, str]:
        """A namespace plugged into the LAN; returns (namespace, its LAN address)."""
        ns = f"tsrv{self.tag}{index}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "link", "add", f"tv{self.tag}{index}", "netns", ns, "type", "veth", "peer", "name", f"p{index}", "netns", self.hub)
        in_ns(ns, "ip", "link", "set", f"tv{self.tag}{index}", "name", "eth0")
        address = f"192.168.{self.octet}.{index + 10}"
        in_ns(ns, "ip", "address", "add", f"{address}/24", "dev", "eth0")
        in_ns(ns, "ip", "link", "set", "eth0", "up")
        in_ns(ns, "ip", "link", "set", "lo", "up")
        in_ns(self.hub, "ip", "link", "set", f"p{index}", "master", "br0")
        in_ns(self.hub, "ip", "link", "set", f"p{index}", "up")
        return ns, address

    def close(self) -> None:
        """Stop what runs inside (SIGTERM first: wireguard-go then removes its control socket)."""
        all_pids: list[int] = []
        for ns in self.namespaces:
            for text in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                if text.isdigit():
                    all_pids.append(int(text))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in all_pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 2
            while sig == signal.SIGTERM and time.monotonic() < deadline and any(_alive(p) for p in all_pids):
                time.sleep(0.05)
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()
        for sock in glob.glob(f"/var/run/wireguard/wt{self.tag}*.sock"):
            try:
                os.unlink(sock)
            except FileNotFoundError:
                pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
