"""Podman, driven through its CLI (PROTOCOL.md §9.1, §9.2, §9.6, §9.10).

JSON and container ids are read from stdout only (podman prints warnings on stderr, which
broke the original's parsing, §17.16). Only containers that carry our labels are listed or
touched: every operation on an id checks the labels first, and a container with our name
but without our labels is refused, never replaced. Secrets reach the container through a
0600 env file that is deleted right after `podman run`, never through argv (§17.4). Every
value that comes from outside is bound to its option (`--name=…`) and the image follows
`--`, so nothing can be read as an extra option.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.drift import LABEL_DEPLOYMENT_ID, LABEL_SERVICE_ID, LABEL_SERVICE_NAME, ContainerInfo
from agent.host.run import CommandError, CommandNotFound, CommandTimeout, Result, run
from agent.model import ExpectedContainer, canonical_image

log = logging.getLogger(__name__)

NOT_FOUND_MARKERS = ("no such container", "no container with name or id", "no such object")
# netavark: "IPAM error: requested ip address 10.200.1.2 is already allocated to container ID <64 hex>"
NAME_IN_USE = "is already in use"
IMAGE_UNKNOWN = "image not known"
IPAM_CONFLICT = re.compile(r"already allocated(?: to container ID ([0-9a-f]{12,64}))?", re.IGNORECASE)
CONTAINER_ID = re.compile(r"[0-9a-f]{64}")
# What podman accepts as a container name or id; anything else never reaches an argv.
CONTAINER_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}")
REGISTRY_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:]+\](:[0-9]{1,5})?")
NETWORK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

# Capabilities a typical web workload needs; everything else is dropped (PROTOCOL.md §17.6).
DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID", "NET_BIND_SERVICE", "NET_RAW", "SETPCAP")

# Podman reads env files with Go's bufio.Scanner: a longer line fails the whole run.
MAX_ENV_LINE = 60 * 1024
# Env values shorter than this are not masked in podman's output: masking "1" or "abc"
# would garble container ids and error messages, and such values are not secrets.
MIN_SECRET_LEN = 4
# Env files left behind by a crash (the agent killed between write and delete) are removed
# once older than this; a live deploy deletes its own within seconds.
STALE_ENV_SECONDS = 300.0

STOPPED_STATES = frozenset({"exited", "stopped", "dead", "paused"})


class PodmanError(RuntimeError):
    """Anything the Podman adapter could not do; the message says what and why."""


class PodmanCommandError(PodmanError, CommandError):
    """A podman command failed. Both a PodmanError and the CommandError `run` raised, so
    callers may catch either; `not_found` and `timed_out` classify it."""

    def __init__(self, error: CommandError) -> None:
        CommandError.__init__(self, error.argv, error.returncode, error.stdout, error.stderr, error.reason)
        self.timed_out = isinstance(error, CommandTimeout)
        self.not_found = is_not_found(error)

    __str__ = CommandError.__str__


class PodmanNotInstalled(PodmanCommandError):
    """The podman binary cannot be started at all."""

    def __str__(self) -> str:
        return f"podman is not installed or not on PATH (tried {self.argv[0]!r}; set the `podman` setting or install podman)"


def is_not_found(error: CommandError) -> bool:
    text = error.output.lower()
    return any(marker in text for marker in NOT_FOUND_MARKERS)


@dataclass(frozen=True)
class PodmanOptions:
    binary: str = "podman"
    network: str = "techulus"
    # Extra `key=value` label put on, and required of, every container we manage (tests).
    scope_label: str = ""
    timeout: float = 60.0
    pull_timeout: float = 600.0
    # Grace period between SIGTERM and SIGKILL for stop/restart/remove.
    stop_timeout: int = 10
    # Registries (`host` or `host:port`) pulled from with TLS verification off; no other.
    insecure_registries: tuple[str, ...] = ()
    dns_servers: tuple[str, ...] = ()
    # Address that legacy port publishing (no static IP) binds to; loopback when empty.
    publish_address: str = ""
    # Where the short-lived env files live (0700); a tmpfs in production.
    run_dir: Path = Path("/run/techulus-agent")
    # How long a started container may take to be seen running (PROTOCOL.md §14: 30 s).
    verify_timeout: float = 30.0
    # A started container must still run (without a restart) this long after: catches
    # programs that exit at once, yet keeps a deploy close to the cost of `podman run`.
    settle_time: float = 0.05
    # `always`: podman-restart.service brings containers back after a reboot even while
    # the control plane is down (§17.26). Podman 4 restarts without backoff, so crash loops
    # are detected here (RestartCount) and stopped.
    restart_policy: str = "always"
    # Per-container log file cap (k8s-file driver); `podman logs` only sees what is left.
    log_max_size: str = "50mb"
    # `podman image prune --all --filter until=…` (§17.29: not only dangling images).
    prune_until: str = "168h"
    # Run a tiny init as PID 1 (forwards SIGTERM); off because some images must be PID 1.
    init: bool = False

    def __post_init__(self) -> None:
        if not self.binary:
            raise PodmanError("podman binary must not be empty")
        if not NETWORK_NAME.fullmatch(self.network):
            raise PodmanError(f"podman network name {self.network!r} is not a valid name")
        if self.scope_label:
            key, sep, value = self.scope_label.partition("=")
            if not sep or not key or not value or any(c in self.scope_label for c in "\n\r\x00"):
                raise PodmanError(f"scope label must look like key=value, got {self.scope_label!r}")
        for registry in self.insecure_registries:
            if not REGISTRY_HOST.fullmatch(registry):
                raise PodmanError(f"insecure registry {registry!r} must be a host or host:port (no scheme, no path)")
        for server in self.dns_servers:
            try:
                ipaddress.ip_address(server)
            except ValueError as exc:
                raise PodmanError(f"DNS server {server!r} is not an IP address") from exc
        if self.publish_address:
            try:
                ipaddress.ip_address(self.publish_address)
            except ValueError as exc:
                raise PodmanError(f"publish address {self.publish_address!r} is not an IP address") from exc
        if self.stop_timeout < 0 or self.timeout <= 0 or self.pull_timeout <= 0 or self.verify_timeout <= 0:
            raise PodmanError("podman timeouts must be positive")
        if not re.fullmatch(r"no|always|unless-stopped|on-failure(:[0-9]+)?", self.restart_policy):
            raise PodmanError(f"restart policy {self.restart_policy!r} is not one podman knows")
        if not re.fullmatch(r"[0-9]+([kmg]b?|b)?", self.log_max_size, re.IGNORECASE):
            raise PodmanError(f"container log max size {self.log_max_size!r} must look like 50mb")


class Podman:
    def __init__(self, options: PodmanOptions, sleep: Callable[[float], None] = time.sleep) -> None:
        self.options = options
        self._sleep = sleep

    # --- low level --------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float | None = None, check: bool = True, secrets: Sequence[str] = ()) -> Result:
        try:
            return run(
                [self.options.binary, *args],
                timeout=self.options.timeout if timeout is None else timeout,
                check=check,
                secrets=secrets,
            )
        except CommandNotFound as exc:
            raise PodmanNotInstalled(exc) from exc
        except CommandError as exc:
            raise PodmanCommandError(exc) from exc

    def _label_filters(self) -> list[str]:
        filters = ["--filter", f"label={LABEL_SERVICE_ID}"]
        if self.options.scope_label:
            filters += ["--filter", f"label={self.options.scope_label}"]
        return filters

    def _stop_time(self) -> str:
        return str(self.options.stop_timeout)

    # --- reading ----------------------------------------------------------------------------

    def list_containers(self) -> list[ContainerInfo]:
        """Every container with our service label (and scope label, if set), any state."""
        result = self._run("ps", "--all", *self._label_filters(), "--format", "json")
        # Filtered again here: podman's label filters are the first line, not the only one.
        return [c for c in parse_ps(result.stdout) if _is_ours(c.labels, self.options.scope_label)]

    def inspect(self, ref: str) -> dict[str, Any] | None:
        """`podman container inspect` of one container; None when it does not exist."""
        ref = _checked_ref(ref)
        try:
            result = self._run("container", "inspect", "--format", "json", ref)
        except PodmanCommandError as exc:
            if exc.not_found:
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
        """Health of many containers in one call: ref -> none|starting|healthy|unhealthy.

        A container that is not running, has no health check, or vanished is `none`
        (PROTOCOL.md §6.2); the status report decides what that means for the CP.
        """
        return {ref: health for ref, (health, _restarts) in self.health_and_restarts(ids).items()}

    def health_and_restarts(self, ids: Sequence[str]) -> dict[str, tuple[str, int]]:
        """Health and RestartCount of many containers in one inspect. The restart count
        shows a crash loop that `--restart=always` otherwise hides behind "running".
        Raises when podman answers nothing at all (the caller keeps what it knew)."""
        refs = [_checked_ref(ref) for ref in ids]
        if not refs:
            return {}
        result = self._run(
            "container", "inspect", "--format",
            "{{.Id}} {{.Name}} {{.State.Status}} {{.RestartCount}} {{.State.Health.Status}}",
            *refs, check=False,
        )
        if result.returncode != 0 and not result.stdout.strip():
            raise PodmanError(f"podman health read failed: {(result.stderr.strip() or 'no output')[-500:]}")
        found = {ref: ("none", 0) for ref in refs}
        for line in result.stdout.splitlines():
            fields = line.split()
            if len(fields) < 4:
                continue
            full_id, name, state = fields[0], fields[1], fields[2]
            restarts = int(fields[3]) if fields[3].isdigit() else 0
            status = fields[4] if len(fields) > 4 else ""
            if state != "running" or status not in ("starting", "healthy", "unhealthy"):
                status = "none"
            for ref in refs:
                if ref == name or (len(ref) >= 12 and full_id.startswith(ref)):
                    found[ref] = (status, restarts)
        return found

    def healthcheck_run(self, ref: str, timeout: float | None = None) -> bool:
        """Run a container's health check once (`podman healthcheck run`), for hosts where
        podman's systemd timers cannot. Podman records the outcome in the container's health
        state itself (start period, retries). True when the check passed, False when it
        failed; raises when podman could not run it (no such container, no health check)."""
        result = self._run("healthcheck", "run", _checked_ref(ref), timeout=timeout, check=False)
        if result.returncode in (0, 1):
            return result.returncode == 0
        raise PodmanError(f"podman healthcheck run {ref}: {(result.stderr.strip() or 'no output')[-300:]}")

    def logs_tail(self, ref: str, lines: int = 50) -> str:
        result = self._run("logs", "--tail", str(lines), _checked_ref(ref), check=False)
        return (result.stdout + result.stderr).strip()

    # --- network ----------------------------------------------------------------------------

    def ensure_network(self, subnet: str, gateway: str) -> bool:
        """Create our bridge with `subnet` unless it exists (PROTOCOL.md §9.10).

        Returns True when the network has that subnet. An existing network with another
        subnet is left alone (containers use it) and logged as an error: static IPs from
        the control plane will not fit it.
        """
        try:
            network = ipaddress.IPv4Network(subnet)
            gateway_ip = ipaddress.IPv4Address(gateway)
        except ValueError as exc:
            raise PodmanError(f"container subnet {subnet!r} / gateway {gateway!r}: {exc}") from exc
        if gateway_ip not in network:
            raise PodmanError(f"gateway {gateway} is outside the container subnet {subnet}")
        name = self.options.network
        result = self._run("network", "inspect", "--", name, check=False)
        if result.returncode == 0:
            return _check_network(name, result.stdout, str(network))
        if "not found" not in result.stderr.lower() and "no such network" not in result.stderr.lower():
            raise PodmanError(f"cannot inspect podman network {name}: {result.stderr.strip()[-500:]}")
        try:
            self._run(
                "network", "create", "--driver", "bridge", f"--subnet={network}", f"--gateway={gateway_ip}",
                "--disable-dns", "--", name,
            )
        except PodmanCommandError as exc:
            if "already exists" not in exc.output:
                raise
            # Someone created it between our inspect and create: check what they made.
            again = self._run("network", "inspect", "--", name)
            return _check_network(name, again.stdout, str(network))
        log.info("created podman network %s (%s)", name, network)
        return True

    # --- changes ----------------------------------------------------------------------------

    def pull(self, image: str, timeout: float | None = None) -> None:
        """Pull with a timeout (`pull_timeout` unless a shorter one is given); TLS
        verification is off only for listed insecure registries."""
        limit = self.options.pull_timeout if timeout is None else min(timeout, self.options.pull_timeout)
        reference = canonical_image(_checked_image(image))
        args = ["pull", "--quiet"]
        if registry_of(reference) in self.options.insecure_registries:
            # Only for registries the operator listed (e.g. the cluster's own plain-HTTP
            # registry on the mesh); every other pull verifies TLS (PROTOCOL.md §17.5).
            args.append("--tls-verify=false")
        started = time.monotonic()
        try:
            self._run(*args, "--", reference, timeout=limit)
        except PodmanCommandError as exc:
            if exc.timed_out:
                raise PodmanError(f"pull of {reference} took longer than {limit:g}s and was stopped") from exc
            raise
        log.info("pulled %s in %.1fs", reference, time.monotonic() - started)

    def image_exists(self, image: str) -> bool:
        result = self._run("image", "exists", "--", canonical_image(_checked_image(image)), check=False)
        return result.returncode == 0

    def run_container(self, spec: ExpectedContainer, env: Mapping[str, str], volumes_dir: Path) -> str:
        """Create and start the container for `spec`; returns its id once it runs.

        The happy path is one `podman run` and one inspect. Only when the run fails are
        the obstacles looked at, once each: a container with our name (removed if it is
        ours and a leftover, refused if it is not ours), a missing image (pulled; the
        caller pulls to refresh tags, `podman run` itself never pulls), an IP held by
        another container (§9.6.2 IPAM recovery, see `_free_ip`).
        """
        _checked_ref(spec.name)
        _checked_image(spec.image)
        for volume in spec.volumes:
            _make_volume_dir(volumes_dir, spec.volume_host_path(volumes_dir, volume))
        self.remove_stale_env_files()
        env_dir = self._env_file(env) if env else None
        try:
            argv = self._run_argv(spec, volumes_dir, env_dir / "env" if env_dir else None)
            result = self._run_resolving_obstacles(spec, argv, [v for v in env.values() if len(v) >= MIN_SECRET_LEN])
        finally:
            if env_dir is not None:
                shutil.rmtree(env_dir, ignore_errors=True)
        container_id = _container_id(result.stdout)
        if not container_id:
            info = self.inspect(spec.name) or {}
            container_id = str(info.get("Id") or spec.name)
        if not self.wait_running(container_id, baseline_restarts=0):
            tail = self.logs_tail(container_id)
            # Under restart=always podman 4 respins a crashing container at once, forever,
            # and a `podman stop` only sticks if it lands while the process runs. Removal
            # is certain; the log tail travels in the error.
            self._remove_ours(container_id, grace=0)
            raise PodmanError(f"container {spec.name} did not stay running (removed it); last log lines:\n{tail}")
        log.info("container %s (%s) runs %s", spec.name, container_id[:12], spec.image)
        return container_id

    def _run_resolving_obstacles(self, spec: ExpectedContainer, argv: list[str], secrets: list[str]) -> Result:
        handled: set[str] = set()
        while True:
            try:
                return self._run(*argv, secrets=secrets)
            except PodmanCommandError as exc:
                output = exc.output
                if NAME_IN_USE in output and "name" not in handled:
                    handled.add("name")
                    existing = self.inspect(spec.name)
                    if existing is not None and not _is_ours(_labels_of(existing), self.options.scope_label):
                        raise PodmanError(
                            f"a container named {spec.name} exists that the agent does not manage; not replacing it"
                        ) from exc
                    if existing is not None:
                        log.info("removing leftover container %s before deploying it again", spec.name)
                        self._remove_ours(spec.name, grace=self.options.stop_timeout)
                    continue
                # A failed run can leave a `created` container of ours behind.
                self._remove_failed_run(spec.name)
                if IMAGE_UNKNOWN in output and "image" not in handled:
                    handled.add("image")
                    self.pull(spec.image)
                    continue
                conflict = IPAM_CONFLICT.search(output)
                if conflict is not None and spec.ip_address and "ip" not in handled:
                    handled.add("ip")
                    self._free_ip(spec, conflict.group(1) or "")
                    continue
                raise

    def _run_argv(self, spec: ExpectedContainer, volumes_dir: Path, env_file: Path | None) -> list[str]:
        opts = self.options
        argv = [
            "run", "--detach",
            f"--name={spec.name}",
            f"--restart={opts.restart_policy}",
            "--pull=never",
            "--security-opt=no-new-privileges",
            "--cap-drop=ALL",
        ]
        argv += [f"--cap-add={cap}" for cap in DEFAULT_CAPS]
        if opts.init:
            argv.append("--init")
        # k8s-file is the driver whose size cap podman 4.3 honours (journald ignores it).
        argv += ["--log-driver=k8s-file", f"--log-opt=max-size={opts.log_max_size}"]
        argv += [
            f"--label={LABEL_SERVICE_ID}={spec.service_id}",
            f"--label={LABEL_SERVICE_NAME}={spec.service_name}",
            f"--label={LABEL_DEPLOYMENT_ID}={spec.deployment_id}",
        ]
        if opts.scope_label:
            argv.append(f"--label={opts.scope_label}")
        if spec.ip_address:
            argv += [f"--network={opts.network}", f"--ip={spec.ip_address}", f"--mac-address={stable_mac(spec.ip_address)}"]
            argv += [f"--dns={server}" for server in opts.dns_servers]
        else:
            # Legacy port publishing: bind to the private address only, never all interfaces (§17.7).
            bind = opts.publish_address or "127.0.0.1"
            if ":" in bind:
                bind = f"[{bind}]"
            argv += [f"--publish={bind}:{m.host_port}:{m.container_port}" for m in spec.ports]
        if spec.health_check is not None and spec.health_check.cmd:
            hc = spec.health_check
            argv += [
                f"--health-cmd={hc.cmd}",
                f"--health-interval={hc.interval}s",
                f"--health-timeout={hc.timeout}s",
                f"--health-retries={hc.retries}",
                f"--health-start-period={hc.start_period}s",
            ]
        argv += [f"--volume={spec.volume_host_path(volumes_dir, v)}:{v.container_path}" for v in spec.volumes]
        if env_file is not None:
            argv.append(f"--env-file={env_file}")
        argv += ["--", canonical_image(spec.image)]
        return argv

    def _env_file(self, env: Mapping[str, str]) -> Path:
        """Write the secrets to a 0600 file in a fresh 0700 dir; the caller removes the dir."""
        lines = []
        for key, value in env.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise PodmanError(f"environment variable name {key!r} is not valid")
            if "\n" in value or "\r" in value or "\x00" in value:
                raise PodmanError(f"environment variable {key} contains a line break or NUL, which an env file cannot carry")
            line = f"{key}={value}\n"
            if len(line.encode()) > MAX_ENV_LINE:
                raise PodmanError(f"environment variable {key} is longer than podman's env-file limit ({MAX_ENV_LINE} bytes)")
            lines.append(line)
        run_dir = self.options.run_dir
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(run_dir, 0o700)
        directory = Path(tempfile.mkdtemp(prefix="env-", dir=run_dir))
        path = directory / "env"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.writelines(lines)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return directory

    def remove_stale_env_files(self, older_than: float = STALE_ENV_SECONDS) -> None:
        """Env files a crashed agent left behind hold secrets: remove them. At start-up no
        deploy is running, so the agent removes them all (`older_than=0`)."""
        try:
            entries = list(self.options.run_dir.glob("env-*"))
        except OSError:
            return
        now = time.time()
        for entry in entries:
            try:
                if now - entry.lstat().st_mtime >= older_than:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                continue

    def _remove_failed_run(self, name: str) -> None:
        """A failed `podman run` can leave a `created` container of ours behind: remove it."""
        info = self.inspect(name)
        if info is not None and _is_ours(_labels_of(info), self.options.scope_label):
            self._remove_ours(name, grace=0)

    def _free_ip(self, spec: ExpectedContainer, holder_id: str) -> None:
        """IPAM says the IP is taken. Remove the holder only if it is ours and stale: not
        running, or an older copy of this same deployment. Anything else is an error."""
        holder = self.inspect(holder_id) if holder_id else self._holder_of(spec.ip_address)
        if holder is None:
            raise PodmanError(
                f"IP {spec.ip_address} is already allocated (holder {holder_id[:12] or 'unknown'}), "
                "but no container holding it can be found"
            )
        holder_name = str(holder.get("Name") or holder_id[:12])
        labels = _labels_of(holder)
        if not _is_ours(labels, self.options.scope_label):
            raise PodmanError(
                f"IP {spec.ip_address} is held by container {holder_name}, which the agent does not manage; "
                "not touching it (free the IP or remove that container)"
            )
        running = bool((holder.get("State") or {}).get("Running"))
        if running and labels.get(LABEL_DEPLOYMENT_ID) != spec.deployment_id:
            raise PodmanError(
                f"IP {spec.ip_address} is held by running container {holder_name} of deployment "
                f"{labels.get(LABEL_DEPLOYMENT_ID) or '(none)'}; it must be removed first"
            )
        log.warning("IP %s is held by stale container %s; removing it", spec.ip_address, holder_name)
        self._remove_ours(str(holder.get("Id") or holder_id), grace=0)

    def _holder_of(self, ip: str) -> dict[str, Any] | None:
        """Older podman does not name the holder: look through our containers."""
        for container in self.list_containers():
            info = self.inspect(container.id) or {}
            networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
            if any(isinstance(n, dict) and n.get("IPAddress") == ip for n in networks.values()):
                return info
        return None

    def wait_running(self, ref: str, baseline_restarts: int | None = None) -> bool:
        """True once the container runs `settle_time` after it was started and has not
        restarted since (`baseline_restarts`: its RestartCount before; read now if None).
        False as soon as it is seen exited or restarted (a crash loop under
        restart=always), or after `verify_timeout`. A container that starts at once
        costs one sleep of `settle_time` and one inspect."""
        ref = _checked_ref(ref)
        deadline = time.monotonic() + self.options.verify_timeout
        if baseline_restarts is None:
            info = self.inspect(ref)
            baseline_restarts = _int(info.get("RestartCount")) if info else 0
        wait = self.options.settle_time
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("container %s was not running after %gs", ref, self.options.verify_timeout)
                return False
            self._sleep(min(wait, remaining))
            info = self.inspect(ref)
            if info is None:
                log.warning("container %s vanished while waiting for it to run", ref)
                return False
            state = info.get("State") or {}
            restarts = _int(info.get("RestartCount"))
            status = str(state.get("Status") or "").lower()
            if restarts > baseline_restarts:
                log.warning("container %s restarted %d time(s) while starting", ref, restarts - baseline_restarts)
                return False
            if state.get("Running"):
                return True
            if status in STOPPED_STATES:
                log.warning("container %s is %s (exit code %s)", ref, status, state.get("ExitCode"))
                return False
            # created/initialized/stopping: podman is still on it; look again soon.
            wait = min(max(wait * 2, 0.1), 1.0)

    def _halt(self, ref: str, attempts: int = 3) -> None:
        """Stop an existing container that failed to (re)start so restart=always does not
        respin it forever (podman 4 restarts at once, without backoff). A `podman stop`
        that lands while the container is between two restarts does not stick, so try a
        few times and keep it stopped (its logs stay readable), or else remove it."""
        for _ in range(attempts):
            self._run("stop", "--time", "0", ref, check=False)
            before = self.inspect(ref)
            self._sleep(0.25)
            after = self.inspect(ref)
            if before is None or after is None:
                return
            count = _int(after.get("RestartCount"))
            if count == _int(before.get("RestartCount")) and not (after.get("State") or {}).get("Running"):
                log.info("stopped failing container %s after %d restart(s)", ref, count)
                return
        log.warning("container %s keeps restarting; removing it", ref)
        self._remove_ours(ref, grace=0)

    def _require_ours(self, ref: str) -> dict[str, Any] | None:
        info = self.inspect(ref)
        if info is not None and not _is_ours(_labels_of(info), self.options.scope_label):
            raise PodmanError(f"container {ref} is not managed by the agent; not touching it")
        return info

    def start(self, ref: str) -> None:
        info = self._require_ours(ref)
        if info is None:
            raise PodmanError(f"cannot start container {ref}: it does not exist")
        self._run("start", ref)
        if not self.wait_running(ref, baseline_restarts=_int(info.get("RestartCount"))):
            tail = self.logs_tail(ref)
            self._halt(ref)
            raise PodmanError(f"container {ref} did not stay running after start: {tail}")

    def restart(self, ref: str) -> None:
        info = self._require_ours(ref)
        if info is None:
            raise PodmanError(f"cannot restart container {ref}: it does not exist")
        self._run("restart", "--time", self._stop_time(), ref, timeout=self.options.timeout + self.options.stop_timeout)
        # `podman restart` and `start` leave RestartCount alone: only crashes raise it.
        if not self.wait_running(ref, baseline_restarts=_int(info.get("RestartCount"))):
            tail = self.logs_tail(ref)
            self._halt(ref)
            raise PodmanError(f"container {ref} did not stay running after restart: {tail}")

    def stop_and_remove(self, ref: str) -> None:
        """Stop (grace period `stop_timeout`), remove, and verify it is gone (§9.6.3)."""
        if self._require_ours(ref) is None:
            return
        try:
            self._run("stop", "--time", self._stop_time(), ref, timeout=self.options.timeout + self.options.stop_timeout)
        except PodmanCommandError as exc:
            if exc.not_found:
                return
            raise
        self._remove_ours(ref, grace=0)

    def force_remove(self, ref: str) -> None:
        """Remove whatever state it is in (§9.6.5); gone already counts as success."""
        if self._require_ours(ref) is None:
            return
        self._remove_ours(ref, grace=self.options.stop_timeout)

    def _remove_ours(self, ref: str, grace: int, attempts: int = 3) -> None:
        """`podman rm --force` until the container is gone; the caller checked it is ours."""
        last = ""
        for attempt in range(attempts):
            try:
                self._run("rm", "--force", "--time", str(grace), ref, timeout=self.options.timeout + grace)
            except PodmanCommandError as exc:
                if exc.not_found:
                    return
                last = str(exc)
            if self.inspect(ref) is None:
                return
            if attempt + 1 < attempts:
                self._sleep(0.5 * 2**attempt)
        raise PodmanError(f"container {ref} still exists after podman rm" + (f": {last}" if last else ""))

    def prune_images(self) -> None:
        """Remove images no container uses, if older than `prune_until` (§17.29)."""
        args = ["image", "prune", "--all", "--force"]
        if self.options.prune_until:
            args.append(f"--filter=until={self.options.prune_until}")
        result = self._run(*args, timeout=300, check=False)
        if result.returncode != 0:
            log.warning("podman image prune failed: %s", result.stderr.strip()[-500:])


def stable_mac(ip: str) -> str:
    """02:42:<ip octets>: the same static IP always gets the same MAC, so peers' ARP stays valid."""
    octets = ipaddress.IPv4Address(ip).packed
    return "02:42:" + ":".join(f"{b:02x}" for b in octets)


def registry_of(reference: str) -> str:
    """The registry host[:port] of a canonical image reference."""
    return reference.split("/", 1)[0] if "/" in reference else ""


def parse_ps(stdout: str) -> list[ContainerInfo]:
    """`podman ps --format json` (stdout only) -> ContainerInfo; odd entries are skipped."""
    data = _loads(stdout, "podman ps")
    if data is None:
        return []
    if not isinstance(data, list):
        raise PodmanError("podman ps: expected a JSON array")
    containers = []
    for item in data:
        if not isinstance(item, dict):
            continue
        cid = item.get("Id")
        if not isinstance(cid, str) or not cid:
            continue
        names = item.get("Names")
        name = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else ""
        labels = item.get("Labels")
        if not isinstance(labels, dict):
            labels = {}
        created = item.get("Created")
        containers.append(
            ContainerInfo(
                id=cid,
                name=name,
                image=str(item.get("Image") or ""),
                state=str(item.get("State") or "unknown").lower(),
                labels={str(k): str(v) for k, v in labels.items() if v is not None},
                created=created if isinstance(created, int) and not isinstance(created, bool) else 0,
            )
        )
    return containers


def _loads(text: str, what: str) -> Any:
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PodmanError(f"{what}: output is not JSON ({exc})") from exc


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _container_id(stdout: str) -> str:
    """The id `podman run -d` prints: the last stdout line that is 64 hex digits."""
    for line in reversed(stdout.splitlines()):
        if CONTAINER_ID.fullmatch(line.strip()):
            return line.strip()
    return ""


def _checked_ref(ref: str) -> str:
    if not isinstance(ref, str) or not CONTAINER_REF.fullmatch(ref):
        raise PodmanError(f"{ref!r} is not a container name or id")
    return ref


def _checked_image(image: str) -> str:
    if not isinstance(image, str) or not image or image.startswith("-") or any(c.isspace() for c in image):
        raise PodmanError(f"{image!r} is not an image reference")
    return image


def _make_volume_dir(volumes_dir: Path, path: Path) -> None:
    """mkdir -p the volume (0755) and make sure it stays under the volumes dir."""
    root = volumes_dir.resolve()
    if root not in path.resolve().parents:
        raise PodmanError(f"volume path {path} is outside {volumes_dir}")
    if path.is_symlink():
        raise PodmanError(f"volume path {path} is a symlink; refusing to mount it")
    existed = path.is_dir()
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    if not existed:
        # mkdir's mode is cut by the umask; a fresh volume gets exactly 0755.
        os.chmod(path, 0o755)


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


def _check_network(name: str, inspect_stdout: str, subnet: str) -> bool:
    try:
        data = json.loads(inspect_stdout)
        subnets = {str(s.get("subnet")) for s in data[0].get("subnets") or [] if isinstance(s, dict)}
    except (json.JSONDecodeError, IndexError, AttributeError, TypeError, KeyError):
        log.warning("podman network %s: cannot read its subnets from `podman network inspect`", name)
        return False
    if subnet not in subnets:
        log.warning(
            "podman network %s has subnet(s) %s, expected %s: containers will not get their IPs; "
            "remove the network (podman network rm %s) once no container uses it",
            name, ", ".join(sorted(subnets)) or "none", subnet, name,
        )
        return False
    return True
