"""Podman, driven through its CLI (PROTOCOL.md §9.1, §9.6, §9.10).

JSON is parsed from stdout only (podman prints warnings on stderr). Only containers that
carry our labels are listed or touched: every operation on an id that came from outside
the list (work items) checks the labels first. Secrets reach the container through a
0600 env file that is deleted right after `podman run`, never through argv.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.drift import LABEL_DEPLOYMENT_ID, LABEL_SERVICE_ID, LABEL_SERVICE_NAME, ContainerInfo, canonical_image
from agent.host.run import CommandError, Result, run
from agent.model import ExpectedContainer

log = logging.getLogger(__name__)

NOT_FOUND_MARKERS = ("no such container", "no container with name or id", "no such object")
IPAM_CONFLICT = "already allocated"

# Capabilities a typical web workload needs; everything else is dropped (PROTOCOL.md §17.6).
DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID", "NET_BIND_SERVICE", "NET_RAW", "SETPCAP")


class PodmanError(RuntimeError):
    pass


def is_not_found(error: CommandError) -> bool:
    text = error.output.lower()
    return any(marker in text for marker in NOT_FOUND_MARKERS)


@dataclass(frozen=True)
class PodmanOptions:
    binary: str = "podman"
    network: str = "techulus"
    scope_label: str = ""
    timeout: float = 60.0
    pull_timeout: float = 600.0
    stop_timeout: int = 10
    insecure_registries: tuple[str, ...] = ()
    dns_servers: tuple[str, ...] = ()
    publish_address: str = ""
    run_dir: Path = Path("/run/techulus-agent")
    verify_timeout: float = 30.0


class Podman:
    def __init__(self, options: PodmanOptions, sleep: Callable[[float], None] = time.sleep) -> None:
        self.options = options
        self._sleep = sleep

    # --- low level --------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float | None = None, check: bool = True, secrets: Sequence[str] = ()) -> Result:
        return run(
            [self.options.binary, *args],
            timeout=self.options.timeout if timeout is None else timeout,
            check=check,
            secrets=secrets,
        )

    def _label_filters(self) -> list[str]:
        filters = ["--filter", f"label={LABEL_SERVICE_ID}"]
        if self.options.scope_label:
            filters += ["--filter", f"label={self.options.scope_label}"]
        return filters

    # --- reading ----------------------------------------------------------------------------

    def list_containers(self) -> list[ContainerInfo]:
        """Every container with our service label (and scope label, if set), any state."""
        result = self._run("ps", "-a", *self._label_filters(), "--format", "json")
        return parse_ps(result.stdout)

    def inspect(self, ref: str) -> dict[str, Any] | None:
        """`podman container inspect` of one container; None when it does not exist."""
        try:
            result = self._run("container", "inspect", "--format", "json", ref)
        except CommandError as exc:
            if is_not_found(exc):
                return None
            raise
        data = _loads(result.stdout, "podman container inspect")
        if not isinstance(data, list) or not data:
            return None
        first = data[0]
        return first if isinstance(first, dict) else None

    def is_managed(self, ref: str) -> bool:
        info = self.inspect(ref)
        return info is not None and _is_ours(_labels_of(info), self.options.scope_label)

    def is_running(self, ref: str) -> bool:
        info = self.inspect(ref)
        return bool(info and (info.get("State") or {}).get("Running"))

    def health(self, ids: Sequence[str]) -> dict[str, str]:
        """Health of running containers in one call: id -> none|starting|healthy|unhealthy."""
        if not ids:
            return {}
        result = self._run(
            "container", "inspect", "--format", "{{.Id}} {{.State.Health.Status}}", *ids, check=False
        )
        health = {cid: "none" for cid in ids}
        for line in result.stdout.splitlines():
            cid, _, status = line.strip().partition(" ")
            status = status.strip()
            if cid in health and status in ("starting", "healthy", "unhealthy"):
                health[cid] = status
        return health

    def logs_tail(self, ref: str, lines: int = 50) -> str:
        result = self._run("logs", "--tail", str(lines), ref, check=False)
        return (result.stdout + result.stderr).strip()

    # --- network ----------------------------------------------------------------------------

    def ensure_network(self, subnet: str, gateway: str) -> None:
        """Create the bridge with our subnet if it does not exist; warn if it differs."""
        name = self.options.network
        try:
            result = self._run("network", "inspect", name)
        except CommandError:
            pass
        else:
            _check_network(name, result.stdout, subnet)
            return
        try:
            self._run(
                "network", "create", "--driver", "bridge", "--subnet", subnet, "--gateway", gateway, "--disable-dns", name
            )
            log.info("created podman network %s (%s)", name, subnet)
        except CommandError as exc:
            if "already exists" not in exc.output:
                raise

    # --- changes ----------------------------------------------------------------------------

    def pull(self, image: str) -> None:
        reference = canonical_image(image)
        args = ["pull", "--quiet"]
        host = reference.split("/", 1)[0]
        if host in self.options.insecure_registries:
            args.append("--tls-verify=false")
        started = time.monotonic()
        self._run(*args, reference, timeout=self.options.pull_timeout)
        log.info("pulled %s in %.1fs", reference, time.monotonic() - started)

    def image_exists(self, image: str) -> bool:
        result = self._run("image", "exists", canonical_image(image), check=False)
        return result.returncode == 0

    def run_container(self, spec: ExpectedContainer, env: Mapping[str, str], volumes_dir: Path) -> str:
        """Create and start the container for `spec`; returns its id once it runs."""
        existing = self.inspect(spec.name)
        if existing is not None and not _is_ours(_labels_of(existing), self.options.scope_label):
            raise PodmanError(f"a container named {spec.name} exists that the agent does not manage; not replacing it")
        for volume in spec.volumes:
            spec.volume_host_path(volumes_dir, volume).mkdir(mode=0o755, parents=True, exist_ok=True)
        argv_head, env_file_dir = self._run_argv(spec, env, volumes_dir)
        try:
            try:
                result = self._run(*argv_head, timeout=self.options.timeout, secrets=list(env.values()))
            except CommandError as exc:
                if IPAM_CONFLICT in exc.output and spec.ip_address and self._free_ip(spec):
                    result = self._run(*argv_head, timeout=self.options.timeout, secrets=list(env.values()))
                else:
                    raise
        finally:
            if env_file_dir is not None:
                shutil.rmtree(env_file_dir, ignore_errors=True)
        container_id = result.stdout.strip().splitlines()[-1].strip() if result.stdout.strip() else spec.name
        if not self.wait_running(container_id):
            tail = self.logs_tail(container_id)
            raise PodmanError(f"container {spec.name} did not stay running; last log lines:\n{tail}")
        return container_id

    def _run_argv(self, spec: ExpectedContainer, env: Mapping[str, str], volumes_dir: Path) -> tuple[list[str], Path | None]:
        opts = self.options
        argv = [
            "run", "-d",
            "--name", spec.name,
            "--replace",
            "--restart", "always",
            "--security-opt", "no-new-privileges",
            "--cap-drop", "ALL",
        ]
        for cap in DEFAULT_CAPS:
            argv += ["--cap-add", cap]
        argv += ["--log-opt", "max-size=10mb"]
        argv += ["--label", f"{LABEL_SERVICE_ID}={spec.service_id}"]
        argv += ["--label", f"{LABEL_SERVICE_NAME}={spec.service_name}"]
        argv += ["--label", f"{LABEL_DEPLOYMENT_ID}={spec.deployment_id}"]
        if opts.scope_label:
            argv += ["--label", opts.scope_label]
        if spec.ip_address:
            argv += ["--network", opts.network, "--ip", spec.ip_address, "--mac-address", stable_mac(spec.ip_address)]
            for server in opts.dns_servers:
                argv += ["--dns", server]
        else:
            # Legacy port-publishing mode: bind to the private address only, never all interfaces.
            bind = opts.publish_address or "127.0.0.1"
            for mapping in spec.ports:
                argv += ["-p", f"{bind}:{mapping.host_port}:{mapping.container_port}"]
        if spec.health_check is not None:
            hc = spec.health_check
            argv += [
                "--health-cmd", hc.cmd,
                "--health-interval", f"{hc.interval}s",
                "--health-timeout", f"{hc.timeout}s",
                "--health-retries", str(hc.retries),
                "--health-start-period", f"{hc.start_period}s",
            ]
        for volume in spec.volumes:
            argv += ["-v", f"{spec.volume_host_path(volumes_dir, volume)}:{volume.container_path}"]
        env_dir = None
        if env:
            env_dir, env_args = self._env_file(env)
            argv += env_args
        argv.append(canonical_image(spec.image))
        return argv, env_dir

    def _env_file(self, env: Mapping[str, str]) -> tuple[Path, list[str]]:
        """Write the secrets to a 0600 file in a 0700 dir; the caller removes the dir."""
        self.options.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory = Path(tempfile.mkdtemp(prefix="env-", dir=self.options.run_dir))
        path = directory / "env"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        lines = []
        for key, value in env.items():
            if "\n" in value or "\r" in value or "\x00" in value:
                raise PodmanError(f"environment variable {key} contains a line break, which an env file cannot carry")
            lines.append(f"{key}={value}\n")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.writelines(lines)
        return directory, ["--env-file", str(path)]

    def _free_ip(self, spec: ExpectedContainer) -> bool:
        """IPAM says the IP is taken: remove the holder if it is a stale container of ours."""
        for container in self.list_containers():
            if container.running and container.deployment_id != spec.deployment_id:
                continue
            info = self.inspect(container.id) or {}
            networks = ((info.get("NetworkSettings") or {}).get("Networks")) or {}
            ips = {n.get("IPAddress") for n in networks.values() if isinstance(n, dict)}
            if spec.ip_address in ips:
                log.warning("IP %s is held by stale container %s; removing it", spec.ip_address, container.short_id)
                self.force_remove(container.id)
                return True
        return False

    def wait_running(self, ref: str) -> bool:
        deadline = time.monotonic() + self.options.verify_timeout
        delay = 0.2
        stable = 0
        while True:
            running = self.is_running(ref)
            # Two consecutive positive checks: a container that crashes at once is not "running".
            stable = stable + 1 if running else 0
            if stable >= 2:
                return True
            if time.monotonic() >= deadline:
                return False
            self._sleep(delay)
            delay = min(delay * 1.5, 2.0)

    def start(self, ref: str) -> None:
        self._run("start", ref)
        if not self.wait_running(ref):
            raise PodmanError(f"container {ref} did not stay running after start: {self.logs_tail(ref)}")

    def restart(self, ref: str) -> None:
        self._run("restart", "--time", str(self.options.stop_timeout), ref, timeout=self.options.timeout + self.options.stop_timeout)
        if not self.wait_running(ref):
            raise PodmanError(f"container {ref} did not stay running after restart: {self.logs_tail(ref)}")

    def stop_and_remove(self, ref: str) -> None:
        """Stop (grace period `stop_timeout`), remove, and verify it is gone."""
        timeout = self.options.timeout + self.options.stop_timeout
        try:
            self._run("stop", "--time", str(self.options.stop_timeout), ref, timeout=timeout)
        except CommandError as exc:
            if is_not_found(exc):
                return
            raise
        self.force_remove(ref)

    def force_remove(self, ref: str) -> None:
        try:
            self._run("rm", "--force", "--time", "0", ref)
        except CommandError as exc:
            if not is_not_found(exc):
                raise
        if self.inspect(ref) is not None:
            raise PodmanError(f"container {ref} still exists after podman rm")

    def prune_images(self) -> None:
        self._run("image", "prune", "--force", timeout=300, check=False)


def stable_mac(ip: str) -> str:
    """02:42:<ip octets>: the same static IP always gets the same MAC, so peers' ARP stays valid."""
    octets = ipaddress.IPv4Address(ip).packed
    return "02:42:" + ":".join(f"{b:02x}" for b in octets)


def parse_ps(stdout: str) -> list[ContainerInfo]:
    data = _loads(stdout, "podman ps")
    if data is None:
        return []
    if not isinstance(data, list):
        raise PodmanError("podman ps: expected a JSON array")
    containers = []
    for item in data:
        if not isinstance(item, dict):
            continue
        names = item.get("Names") or []
        labels = item.get("Labels") or {}
        if not isinstance(labels, dict):
            labels = {}
        containers.append(
            ContainerInfo(
                id=str(item.get("Id") or ""),
                name=str(names[0]) if isinstance(names, list) and names else "",
                image=str(item.get("Image") or ""),
                state=str(item.get("State") or "unknown").lower(),
                labels={str(k): str(v) for k, v in labels.items()},
                created=item.get("Created") if isinstance(item.get("Created"), int) else 0,
            )
        )
    return [c for c in containers if c.id]


def _loads(text: str, what: str) -> Any:
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PodmanError(f"{what}: output is not JSON ({exc})") from exc


def _labels_of(info: Mapping[str, Any]) -> Mapping[str, str]:
    labels = (info.get("Config") or {}).get("Labels") or {}
    return labels if isinstance(labels, dict) else {}


def _is_ours(labels: Mapping[str, str], scope_label: str) -> bool:
    if not labels.get(LABEL_SERVICE_ID):
        return False
    if scope_label:
        key, _, value = scope_label.partition("=")
        return labels.get(key) == value
    return True


def _check_network(name: str, inspect_stdout: str, subnet: str) -> None:
    try:
        data = json.loads(inspect_stdout)
        subnets = {s.get("subnet") for s in data[0].get("subnets") or []}
    except (json.JSONDecodeError, IndexError, AttributeError, TypeError):
        return
    if subnets and subnet not in subnets:
        log.error("podman network %s has subnet(s) %s, expected %s: containers may not get their IPs", name, ", ".join(sorted(filter(None, subnets))), subnet)
