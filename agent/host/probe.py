"""The doctor's throwaway container: proves this host can run what the agent runs.

`agent doctor` used to pass on a host where every `podman run` failed (a CNI backend
without its plugins). So it runs a real container, through the same Podman adapter and
`podman run` options as a deployment, on the agent's network: create and start it, fetch
a page from its IP, remove it. The image is built locally from a static busybox (no
registry needed). When a step fails, `cause` turns podman's error into what is wrong and
how to fix it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import io
import json
import logging
import secrets
import tarfile
import time
import urllib.request
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from agent.host.podman import DOCTOR_PROBE_SERVICE, Podman, PodmanError
from agent.host.run import CommandError, run
from agent.model import ExpectedContainer

log = logging.getLogger(__name__)

PROBE_IMAGE = "localhost/techulus-doctor-probe:latest"
PROBE_SERVICE = DOCTOR_PROBE_SERVICE
BUSYBOX = Path("/bin/busybox")
REACH_TIMEOUT = 10.0
#: podman's error text -> (what is wrong, how to fix it); the first match wins.
CAUSES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    # First: netavark's words for it ("... is already used on the host or by another config")
    # contain "config", and another network's subnet is not a storage or runtime fault.
    (("is already used on the host",), "another podman network (or a host interface) already uses this subnet",
     "give this agent another subnet (subnetId in the state file; EXAMPLE_SUBNET=N for scripts/run-example.sh), "
     "or remove the other network if nothing uses it (`podman network ls`, `podman network rm NAME`)"),
    (("rlimit", "ulimit"), "the OCI runtime cannot apply podman's default ulimits (above this host's hard limits)",
     'set default_ulimits = ["nofile=N:N", "nproc=N:N"] under [containers] in /etc/containers/containers.conf, '
     "N at most `ulimit -Hn` / `ulimit -Hu`"),
    (("cgroup",), "the OCI runtime cannot set up the container's cgroups",
     'set runtime = "runc" and cgroup_manager = "cgroupfs" under [engine] in /etc/containers/containers.conf'),
    (("failed to find plugin", "network not found", "cni"),
     "podman's network backend cannot create the container's network (CNI without its plugins?)",
     "apt-get install netavark aardvark-dns and set network_backend = \"netavark\" under [network] in "
     "/etc/containers/containers.conf (or apt-get install containernetworking-plugins)"),
    (("no space left",), "the disk holding podman's storage is full", "free space under /var/lib/containers"),
    (("storage", "overlay", "graph driver", "database"), "podman's storage is broken or misconfigured",
     "check `podman info` (store section) and /etc/containers/storage.conf"),
    (("oci runtime", "crun", "runc"), "the OCI runtime fails to start containers",
     "apt-get install runc and set runtime = \"runc\" under [engine] in /etc/containers/containers.conf"),
)


class ProbeFailed(Exception):
    """A probe step failed; `step` says which, the message says why (podman's words)."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(detail)
        self.step = step


class ProbeSkipped(ProbeFailed):
    """The probe cannot run here for a reason that says nothing about podman (no busybox)."""


@dataclass(frozen=True)
class ProbeResult:
    name: str
    ip: str
    seconds: float


def cause(text: str) -> tuple[str, str]:
    """What podman's error means and how to fix it; ("", "") when it is not recognised."""
    lowered = text.lower()
    for markers, what, fix in CAUSES:
        if any(marker in lowered for marker in markers):
            return what, fix
    return "", ""


def is_static(binary: Path) -> bool:
    """A dynamically linked binary names its loader (PT_INTERP) near the start of the file."""
    try:
        with binary.open("rb") as handle:
            head = handle.read(8192)
    except OSError:
        return False
    return head.startswith(b"\x7fELF") and b"ld-linux" not in head and b"ld-musl" not in head


def probe_image_tar(busybox: Path, page: str) -> bytes:
    """A rootfs with busybox and one page; busybox's httpd serves it on port 80."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in ("bin", "www", "tmp", "etc"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(str(busybox), arcname="bin/busybox")
        for name, text in (("www/index.html", page), ("etc/passwd", "root:x:0:0:root:/:/bin/sh\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def ensure_image(podman: Podman, workdir: Path, busybox: Path = BUSYBOX) -> None:
    """Build the probe image unless it exists (once per host; a few MB)."""
    if podman.image_exists(PROBE_IMAGE):
        return
    if not is_static(busybox):
        raise ProbeSkipped("image", f"no probe image and no static {busybox} to build one (apt-get install busybox-static)")
    tar_path = workdir / "probe.tar"
    tar_path.write_bytes(probe_image_tar(busybox, "techulus doctor probe\n"))
    command = json.dumps(["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/www"])
    try:
        run([podman.options.binary, "import", "--change", f"CMD {command}", str(tar_path), PROBE_IMAGE],
            timeout=podman.options.timeout)
    except CommandError as exc:
        raise ProbeFailed("image", f"podman import failed: {exc}") from exc


def probe_ip(subnet: str, taken: Collection[str]) -> str:
    """The highest host address of the subnet that the expected state does not use: the
    control plane hands out addresses from the bottom."""
    network = ipaddress.IPv4Network(subnet)
    for address in reversed(list(network.hosts())):
        if str(address) not in taken:
            return str(address)
    raise ProbeFailed("network", f"no free address in {subnet} for the probe")


def run_probe(
    podman: Podman,
    subnet: str,
    gateway: str,
    workdir: Path,
    taken: Collection[str] = (),
    fetch: Callable[[str, float], str] | None = None,
    busybox: Path = BUSYBOX,
) -> ProbeResult:
    """Create → start → reach → remove one container on the agent's network, through the
    adapter (so it carries the agent's labels and ownership marks). Raises ProbeFailed
    naming the step; the container is removed whatever happened."""
    # Its own copy: no grace period (busybox as PID 1 ignores SIGTERM), no respawning.
    podman = Podman(dataclasses.replace(podman.options, stop_timeout=0, restart_policy="no"))
    started = time.monotonic()
    ensure_image(podman, workdir, busybox)  # first: a skipped probe creates nothing
    try:
        podman.ensure_network(subnet, gateway)
    except PodmanError as exc:
        raise ProbeFailed("network", str(exc)) from exc
    token = secrets.token_hex(4)
    spec = ExpectedContainer(
        deployment_id=f"doctor-probe-{token}",
        service_id=PROBE_SERVICE,
        service_name="agent doctor probe",
        name=f"techulus-doctor-probe-{token}",
        image=PROBE_IMAGE,
        ip_address=probe_ip(subnet, taken),
    )
    try:
        podman.run_container(spec, {}, workdir / "volumes")
        reach(spec.ip_address, fetch or http_get)
    except BaseException as exc:
        try:
            podman.force_remove(spec.name)
        except PodmanError as removal:
            log.warning("could not remove the doctor's probe container %s: %s", spec.name, removal)
        if isinstance(exc, PodmanError):
            raise ProbeFailed("start", str(exc)) from exc
        raise
    try:
        podman.force_remove(spec.name)
    except PodmanError as exc:
        raise ProbeFailed("remove", str(exc)) from exc
    return ProbeResult(spec.name, spec.ip_address, time.monotonic() - started)


def reach(ip: str, fetch: Callable[[str, float], str], timeout: float = REACH_TIMEOUT) -> None:
    """The host fetches the probe's page from its IP, as Caddy and the mesh would."""
    url = f"http://{ip}/"
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            if "techulus doctor probe" in fetch(url, 2.0):
                return
            last = "it answered with another page (is another host using that address?)"
        except OSError as exc:
            last = str(getattr(exc, "reason", None) or exc)
        time.sleep(0.2)
    raise ProbeFailed("reach", f"{url} did not answer within {timeout:g}s: {last}")


def http_get(url: str, timeout: float) -> str:
    # No proxy: the probe's address is on this host's bridge, never behind a proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        return str(response.read(4096).decode(errors="replace"))
