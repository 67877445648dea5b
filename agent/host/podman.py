"""Podman, driven through its CLI (PROTOCOL.md §9.1, §9.2, §9.6, §9.10).

JSON and container ids are read from stdout only (podman prints warnings on stderr, which
broke the original's parsing, §17.16). Only containers this agent owns are listed or
touched: every operation on an id checks ownership first (`judge`), and a container with
our name that is not ours is refused, never replaced.

Ownership: every container and network the agent creates carries `techulus.owner=<owner>`
(the registered server id, or `standalone-<hash of the data dir>`). A container is ours
when it has the §9.1 labels, the `scope_label` if one is set, and our owner mark. A
container with another owner's mark is never touched, whatever else it carries. A
container with the §9.1 labels and NO owner mark was made by the original Go agent (or
this agent before owner marks): only a registered agent (`adopt_legacy`) adopts it, and
only when it sits on that agent's network (or only on podman's default network, where
the Go agent put port-publishing containers); a standalone agent never does.

Secrets (§17.4) never reach an argv or a file on disk. `podman run` gets each variable as
`--env=NAME` and takes the value from its own environment, which holds nothing else but the
few variables podman needs from the agent's: any value arrives byte for byte (line breaks,
quotes, `=`, any Unicode, up to Linux's 128 KiB per variable). A variable whose name podman,
its helpers, the Go runtime or the dynamic linker read themselves (PATH, HOME, LD_*, ...;
`podman_reads`) cannot ride there: it goes in an env file that exists only in memory (a
sealed memfd `podman run` reads as /dev/fd/N), which carries one line per variable, so such
a value with a line break or a leading quote is refused with a clear error. Every
value that comes from outside is bound to its option (`--name=…`) and the image follows
`--`, so nothing can be read as an extra option.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import fcntl
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import validate
from agent.drift import LABEL_DEPLOYMENT_ID, LABEL_SERVICE_ID, LABEL_SERVICE_NAME, ContainerInfo
from agent.host.listing import Listing, StateWatch
from agent.host.images import ImageLedger
from agent.host.run import CommandError, CommandNotFound, CommandTimeout, Result, run
from agent.model import DOCTOR_PROBE_SERVICE, ExpectedContainer, canonical_image

log = logging.getLogger(__name__)

NOT_FOUND_MARKERS = ("no such container", "no container with name or id", "no such object")
# netavark: "IPAM error: requested ip address 10.200.1.2 is already allocated to container ID <64 hex>"
NAME_IN_USE = "is already in use"
IMAGE_UNKNOWN = "image not known"
# podman run on a network that was removed: "unable to find network with name or ID X: network not found"
NETWORK_GONE = "network not found"
IPAM_CONFLICT = re.compile(r"already allocated(?: to container ID ([0-9a-f]{12,64}))?", re.IGNORECASE)
CONTAINER_ID = re.compile(r"[0-9a-f]{64}")
# The health suffix of `podman ps`'s human status: "Up 3 minutes (healthy)".
PS_HEALTH = re.compile(r"\((starting|healthy|unhealthy)\)\s*$")
# What podman accepts as a container name or id; anything else never reaches an argv.
CONTAINER_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}")
REGISTRY_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:]+\](:[0-9]{1,5})?")
NETWORK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

# Capabilities a typical web workload needs; everything else is dropped (PROTOCOL.md §17.6).
DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID", "NET_BIND_SERVICE", "NET_RAW", "SETPCAP")

# Podman reads env files with Go's bufio.Scanner: a longer line fails the whole run.
MAX_ENV_LINE = 60 * 1024
# All of a container's variables together (`KEY=VALUE` and NUL each): well inside execve's
# ARG_MAX (a quarter of the 8 MiB stack limit), which podman's environment and then the
# container's first process must both fit in.
MAX_ENV_TOTAL = 1024 * 1024
# Env values shorter than this are not masked in podman's output: masking "1" or "abc"
# would garble container ids and error messages, and such values are not secrets.
MIN_SECRET_LEN = 4
# Names podman, conmon, the OCI runtime, netavark, aardvark-dns, the Go and Rust runtimes,
# glibc or the dynamic linker read from their own environment (`strings` on podman 4.3,
# netavark 1.4, aardvark-dns, conmon, catatonit; NETAVARK_FW=firewalld or an invalid
# NETAVARK_DNS_PORT make netavark fail, and root's netavark programs the host firewall). A deployment's variable with such a name would
# change how podman runs (PATH, LD_PRELOAD, CONTAINER_HOST, ...) if it sat in podman's
# environment: it goes through the env file. The agent's own variables with these names are
# the only ones of the agent's environment `podman run` sees (the others, tokens included,
# never reach it), so that it runs as every other podman command does.
PODMAN_ENV_NAMES = frozenset({
    "PATH", "HOME", "TMPDIR", "TMP", "TEMP", "USER", "LOGNAME", "SHELL", "TERM", "TZ", "TZDIR",
    "LANG", "LANGUAGE", "NLSPATH", "LOCPATH", "GCONV_PATH", "GLIBC_TUNABLES", "HOSTALIASES",
    "LOCALDOMAIN", "RES_OPTIONS",
    "HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY",
    "http_proxy", "https_proxy", "ftp_proxy", "no_proxy", "all_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REGISTRY_AUTH_FILE",
    "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID",
    "REGISTRIES_CONFIG_PATH", "ZONEINFO", "INVOCATION_ID", "BUILD_REGISTRY_SOURCES",
    "NO_COLOR", "COLUMNS",
})
PODMAN_ENV_PREFIXES = (
    "LD_", "MALLOC_", "LC_", "XDG_", "CONTAINERS_", "CONTAINER_", "PODMAN_", "BUILDAH_", "DOCKER_",
    "DBUS_", "SYSTEMD_", "_", "NETAVARK_", "AARDVARK_", "RUST_", "CNI_", "OCICRYPT_", "CONMON_", "STORAGE_",
    "GOLANG_",
)
# The Go runtime's own settings (GODEBUG, GOGC, GOMAXPROCS, GOMEMLIMIT, GOTRACEBACK, GOROOT,
# GOAMD64, ...): GO and capitals, no underscore, so GOOGLE_API_KEY stays a plain variable.
GO_RUNTIME_NAME = re.compile(r"GO[A-Z0-9]*")
# Set by systemd for the agent itself: podman would hand the agent's notify socket and
# socket-activated descriptors on to the container.
SERVICE_MANAGER_ENV = frozenset({"NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID"})

STOPPED_STATES = frozenset({"exited", "stopped", "dead", "paused"})
# How many inspects of freshly started containers `config_of` keeps for the health runner.
STARTED_KEPT = 256
# How long killed leftovers of a removed container get to disappear before we say so.
REAP_WAIT = 5.0

# The owner mark on every container and network the agent creates.
LABEL_OWNER = "techulus.owner"
# Podman's default network: the Go agent ran port-publishing (no static IP) containers on it.
DEFAULT_PODMAN_NETWORK = "podman"
OWNER_VALUE = re.compile(r"[!-~]{1,256}")


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


class PodmanRunFailed(PodmanCommandError):
    """`podman run` failed. str() is one line, the container and podman's own words; the
    whole command (secrets redacted) is logged at DEBUG where it fails, because a run's
    argv is dozens of options long and hid the reason in every error line."""

    def __init__(self, error: PodmanCommandError, container: str) -> None:
        self.container = container  # before __init__: CommandError's init calls str(self)
        super().__init__(error)
        self.timed_out, self.not_found = error.timed_out, error.not_found

    def __str__(self) -> str:
        code = f" (exit {self.returncode})" if self.returncode is not None else ""
        return f"podman run of container {self.container} failed{code}: {podman_says(self)}"


def podman_says(error: CommandError, limit: int = 500) -> str:
    """Podman's own words about a failure, on one line: its last `Error:` line (it ends with
    the cause), else the last line it printed; or why the command did not finish."""
    if error.reason:
        return error.reason
    lines = [line.strip() for line in error.detail.splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("Error:")] or lines
    return said[-1][:limit] if said else "no output"


def is_not_found(error: CommandError) -> bool:
    text = error.output.lower()
    return any(marker in text for marker in NOT_FOUND_MARKERS)


@dataclass(frozen=True)
class HealthReading:
    """What one inspect says about a container's health (`Podman.read_health`)."""

    status: str  # none | starting | healthy | unhealthy
    restarts: int  # podman's RestartCount
    checked: bool  # a health check is configured


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
    # Where agents before the in-memory env files wrote them: swept at start-up.
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
    # Who we are: the value of the `techulus.owner` label on what we create, and required
    # of what we touch. "" (library use, unit tests) marks nothing and claims only
    # unmarked containers, never a container with anyone's owner mark.
    owner: str = ""
    # Adopt unmarked containers with the §9.1 labels on our network (the original Go
    # agent's): registered agents only, never a standalone one.
    adopt_legacy: bool = False
    # Run a tiny init as PID 1 (forwards SIGTERM); off because some images must be PID 1.
    init: bool = False
    # Skip the `ps` while podman's container database is unchanged (agent/host/listing.py).
    watch_state: bool = False

    def __post_init__(self) -> None:
        if not self.binary:
            raise PodmanError("podman binary must not be empty")
        if not NETWORK_NAME.fullmatch(self.network):
            raise PodmanError(f"podman network name {self.network!r} is not a valid name")
        if self.owner and not OWNER_VALUE.fullmatch(self.owner):
            raise PodmanError(f"owner {self.owner[:40]!r} must be printable ASCII without spaces (at most 256 characters)")
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
    def __init__(
        self, options: PodmanOptions, sleep: Callable[[float], None] = time.sleep, images: ImageLedger | None = None,
        listing: Listing | None = None,
    ) -> None:
        self.options = options
        self._sleep = sleep
        # What this agent pulled and ran, for the image GC (agent/host/images.py).
        self.images = images or ImageLedger(None)
        self.listing = listing or Listing()
        # Images seen to exist (pulled, or `image exists` said so): a deploy of a pinned image
        # does not ask podman again. Forgotten when removed or when a run says it is unknown.
        self._known_images: set[str] = set()
        # (subnet, gateway) of our network once `ensure_network` made sure of it: a run that
        # finds it gone re-creates it the same way.
        self._network_spec: tuple[str, str] | None = None
        # Container id -> its inspect when this adapter saw it start (`config_of`), bounded.
        self._started: dict[str, dict[str, Any]] = {}
        self._started_lock = threading.Lock()

    # --- low level --------------------------------------------------------------------------

    def _run(
        self, *args: str, timeout: float | None = None, check: bool = True, secrets: Sequence[str] = (),
        pass_fds: Sequence[int] = (), env: Mapping[str, str] | None = None,
    ) -> Result:
        """Run podman; with `env`, that is its whole environment (`run_container`'s secrets)."""
        try:
            return run(
                [self.options.binary, *args],
                timeout=self.options.timeout if timeout is None else timeout,
                check=check,
                secrets=secrets,
                pass_fds=pass_fds,
                env=env,
                inherit_env=env is None,
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

    def list_containers(self, max_age: float = 0.0) -> list[ContainerInfo]:
        """Every container this agent owns (see `judge`), any state, except `agent doctor`'s
        probe: it lives for a second beside a running agent, which must neither remove it as
        unexpected nor report it to the control plane. With `max_age`, the shared listing
        (`Listing`) when it is at most that old, instead of running podman; with
        `watch_state`, also when podman's database did not change since it was taken
        (agent/host/listing.py)."""
        return self.list_containers_aged(max_age)[0]

    def list_containers_aged(self, max_age: float = 0.0) -> tuple[list[ContainerInfo], float]:
        """`list_containers`, and how old that listing is in seconds (0 when it was taken
        now, or is verified as still true), told together: a listing another thread takes
        meanwhile cannot be mistaken for this one."""
        if max_age > 0:
            cached = self.listing.get_aged(max_age)
            if cached is not None:
                return cached
        watch = self._state_watch()
        stamp = watch.stamp() if watch is not None else None
        if watch is not None:
            self.listing.see(stamp)
            verified = self.listing.unchanged(stamp)
            if verified is not None:
                return verified, 0.0
        quiet = self.listing.quiet(stamp)
        generation = self.listing.begin()
        began = self.listing.now()
        containers = [
            container for container, verdict in self.survey()
            if verdict.ours and container.service_id != DOCTOR_PROBE_SERVICE
        ]
        # A stamp that moved during the ps says nothing about it; verified only if it was quiet before.
        unmoved = watch is not None and watch.stamp() == stamp
        self.listing.put(containers, generation, began, stamp if unmoved else None, verify=quiet)
        return containers, 0.0

    def _state_watch(self) -> StateWatch | None:
        """The watch on podman's database (found once, through its graph root), when enabled."""
        if not self.options.watch_state or not self.listing.watching:
            return None
        if self.listing.watch is None:
            try:
                self.listing.watch = StateWatch.under(self.storage_path())
            except PodmanError as exc:
                log.warning("cannot find podman's database (%s); listing containers every tick", exc)
                self.listing.watching = False
                return None
        return self.listing.watch

    def survey(self) -> list[tuple[ContainerInfo, Ownership]]:
        """Every container with the §9.1 service label (and scope label, if set), ours or
        not, each with the verdict of `judge` (for `agent plan`: what is left alone, why)."""
        result = self._run("ps", "--all", *self._label_filters(), "--format", "json")
        # Judged here, not by podman's label filters: those are the first line, not the only one.
        return [(c, self.judge(c.labels, networks)) for c, networks in parse_ps_networks(result.stdout)]

    def judge(self, labels: Mapping[str, str], networks: Sequence[str]) -> Ownership:
        """Whether this agent may touch a container with these labels, on these networks."""
        return judge(labels, networks, self.options)

    def _owns(self, info: Mapping[str, Any]) -> bool:
        return self.judge(_labels_of(info), _networks_of(info)).ours

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

    def config_of(self, ref: str) -> dict[str, Any] | None:
        """A container's inspect, for what does not change after it is created (its config,
        its health check): the one `wait_running` took when this adapter started it, once,
        else a fresh inspect. Spares the health runner an inspect of every new container."""
        with self._started_lock:
            info = self._started.pop(ref, None)
        return info if info is not None else self.inspect(ref)

    def _note_started(self, info: dict[str, Any]) -> None:
        with self._started_lock:
            self._started[str(info.get("Id") or "")] = info
            while len(self._started) > STARTED_KEPT:
                del self._started[next(iter(self._started))]

    def is_managed(self, ref: str) -> bool:
        """True when the container exists and this agent owns it (`judge`)."""
        info = self.inspect(ref)
        return info is not None and self._owns(info)

    def is_running(self, ref: str) -> bool:
        info = self.inspect(ref)
        return bool(info and (info.get("State") or {}).get("Running"))

    def health(self, ids: Sequence[str]) -> dict[str, str]:
        """Health of many containers in one call: ref -> none|starting|healthy|unhealthy.

        A container that is not running, has no health check, or vanished is `none`
        (PROTOCOL.md §6.2); the status report decides what that means for the CP.
        """
        return {ref: reading.status for ref, reading in self.read_health(ids).items()}

    def read_health(self, ids: Sequence[str]) -> dict[str, HealthReading]:
        """Health, RestartCount and whether a health check is configured, for many containers
        in one inspect. The restart count shows a crash loop that `--restart=always`
        otherwise hides behind "running". Raises when podman answers nothing at all (the
        caller keeps what it knew)."""
        refs = [_checked_ref(ref) for ref in ids]
        if not refs:
            return {}
        result = self._run(
            "container", "inspect", "--format",
            "{{.Id}} {{.Name}} {{.State.Status}} {{.RestartCount}} "
            "{{if .Config.Healthcheck}}check{{else}}-{{end}} {{if .State.Health}}{{.State.Health.Status}}{{end}}",
            *refs, check=False,
        )
        if result.returncode != 0 and not result.stdout.strip():
            raise PodmanError(f"podman health read failed: {(result.stderr.strip() or 'no output')[-500:]}")
        found = {ref: HealthReading("none", 0, False) for ref in refs}
        # Refs are matched by full id or name through a dict; only short ids (rare: callers
        # pass the ids `ps` gave) need a prefix scan. Linear in the number of containers.
        short = [ref for ref in refs if len(ref) < 64 and CONTAINER_ID.fullmatch(ref.ljust(64, "0"))]
        for line in result.stdout.splitlines():
            fields = line.split()
            if len(fields) < 5:
                continue
            full_id, name, state = fields[0], fields[1], fields[2]
            restarts = int(fields[3]) if fields[3].isdigit() else 0
            status = fields[5] if len(fields) > 5 else ""
            if state != "running" or status not in ("starting", "healthy", "unhealthy"):
                status = "none"
            matched = [ref for ref in (full_id, name) if ref in found]
            matched += [ref for ref in short if len(ref) >= 12 and full_id.startswith(ref)]
            for ref in matched:
                found[ref] = HealthReading(status, restarts, fields[4] == "check")
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
        """Create our bridge with `subnet` unless it exists (PROTOCOL.md §9.10), labelled
        with our owner mark.

        Returns True when the network has that subnet and is not another agent's. An
        existing network with another subnet is left alone (containers use it) and logged
        as an error: static IPs from the control plane will not fit it. A network with
        another owner's mark is never changed; the agent never removes or recreates one.
        An existing unmarked network (the Go agent's, or one an operator made) is used
        as it is: podman cannot add a label to it.
        """
        try:
            network = ipaddress.IPv4Network(subnet)
            gateway_ip = ipaddress.IPv4Address(gateway)
        except ValueError as exc:
            raise PodmanError(f"container subnet {subnet!r} / gateway {gateway!r}: {exc}") from exc
        if gateway_ip not in network:
            raise PodmanError(f"gateway {gateway} is outside the container subnet {subnet}")
        name = self.options.network
        self._network_spec = (subnet, gateway)
        result = self._run("network", "inspect", "--", name, check=False)
        if result.returncode == 0:
            return self._check_network_owner(name, result.stdout) and _check_network(name, result.stdout, str(network))
        if "not found" not in result.stderr.lower() and "no such network" not in result.stderr.lower():
            raise PodmanError(f"cannot inspect podman network {name}: {result.stderr.strip()[-500:]}")
        try:
            owner = [f"--label={LABEL_OWNER}={self.options.owner}"] if self.options.owner else []
            self._run(
                "network", "create", "--driver", "bridge", f"--subnet={network}", f"--gateway={gateway_ip}",
                "--disable-dns", *owner, "--", name,
            )
        except PodmanCommandError as exc:
            if "already exists" not in exc.output:
                raise
            # Someone created it between our inspect and create: check what they made.
            again = self._run("network", "inspect", "--", name)
            return self._check_network_owner(name, again.stdout) and _check_network(name, again.stdout, str(network))
        log.info("created podman network %s (%s)", name, network)
        return True

    def _check_network_owner(self, name: str, inspect_stdout: str) -> bool:
        owner = _network_owner(_first(_loads(inspect_stdout, "podman network inspect")))
        if owner and owner != self.options.owner:
            log.error(
                "podman network %s belongs to another agent (%s=%s); not using or changing it "
                "(set network_name to a network of this agent's own)", name, LABEL_OWNER, owner,
            )
            return False
        return True

    def collisions(self, subnet: str, expected: Sequence[ExpectedContainer]) -> list[str]:
        """Why this agent's state would collide with another owner's on this host; [] if
        it would not. Checked by a standalone agent before it starts (it refuses rather
        than fight): our network name carrying another owner's mark, another network
        whose subnet overlaps ours, a container of another owner (or an unmarked one of
        the original agent) on our network (it holds an IP of our subnet), and a container
        of another owner with the name of one of ours."""
        ours = ipaddress.IPv4Network(subnet)
        problems: list[str] = []
        listed = _loads(self._run("network", "ls", "--format", "json").stdout, "podman network ls")
        for network in listed if isinstance(listed, list) else []:
            if not isinstance(network, dict):
                continue
            name = str(network.get("name") or "")
            owner = _network_owner(network)
            if name == self.options.network:
                if owner and owner != self.options.owner:
                    problems.append(f"network {name} belongs to another agent ({LABEL_OWNER}={owner})")
                continue
            for item in network.get("subnets") or []:
                try:
                    other = ipaddress.ip_network(str((item or {}).get("subnet")), strict=False)
                except (ValueError, AttributeError):
                    continue
                if other.version == 4 and other.overlaps(ours):
                    problems.append(f"network {name} (subnet {other}) overlaps our container subnet {ours}")
        names = {spec.name for spec in expected}
        everything = self._run("ps", "--all", "--format", "json").stdout
        for container, networks in parse_ps_networks(everything):
            if self.judge(container.labels, networks).ours:
                continue
            label = container.name or container.short_id
            whose = container.labels.get(LABEL_OWNER) or "no owner mark"
            if self.options.network in networks:
                problems.append(f"container {label} ({whose}) is on our network {self.options.network}")
            elif container.name in names:
                problems.append(f"container {label} ({whose}) has the name of one of our containers")
        return problems

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
        # The ledger claims only images the agent brought: a reference that already named
        # an image not in the ledger is the operator's (or another agent's), and the GC
        # and --down must leave it.
        before = self.image_id(reference) if self.images.records else None
        claimed = before is None or reference in self.images.pulled()
        started = time.monotonic()
        try:
            result = self._run(*args, "--", reference, timeout=limit)
        except PodmanCommandError as exc:
            if exc.timed_out:
                raise PodmanError(f"pull of {reference} took longer than {limit:g}s and was stopped") from exc
            raise
        # `pull --quiet` prints the image id: recorded so that the GC removes only what we pulled.
        pulled_id = _container_id(result.stdout)
        if claimed or pulled_id != before:
            self.images.note_pulled(reference, pulled_id)
        else:
            log.debug("%s was on this host before the agent pulled it: not the agent's to remove", reference)
        self._known_images.add(reference)
        log.info("pulled %s in %.1fs", reference, time.monotonic() - started)

    def image_exists(self, image: str) -> bool:
        """Whether the image is here; an image seen here before is not asked about again (a
        run that finds it gone says so, and forgets it: `run_container`)."""
        reference = canonical_image(_checked_image(image))
        if reference in self._known_images:
            return True
        result = self._run("image", "exists", "--", reference, check=False)
        if result.returncode == 0:
            self._known_images.add(reference)
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
        by_name, in_file = split_env(env)
        env_fd = self._env_file(in_file) if in_file else None
        try:
            argv = self._run_argv(spec, volumes_dir, list(by_name), Path(f"/dev/fd/{env_fd}") if env_fd is not None else None)
            result = self._run_resolving_obstacles(
                spec, argv, [v for v in env.values() if len(v) >= MIN_SECRET_LEN], () if env_fd is None else (env_fd,),
                {**podman_environment(), **by_name},
            )
        finally:
            if env_fd is not None:
                os.close(env_fd)
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
        self.images.note_deployed(spec.service_id, canonical_image(spec.image))
        self._known_images.add(canonical_image(spec.image))
        if CONTAINER_ID.fullmatch(container_id):
            self.listing.add(ContainerInfo(
                id=container_id, name=spec.name, image=canonical_image(spec.image), state="running",
                labels=self._labels(spec), created=int(time.time()), restarts=0,
            ))
        return container_id

    def _labels(self, spec: ExpectedContainer) -> dict[str, str]:
        """The labels `_run_argv` gives a container of `spec`."""
        labels = {LABEL_SERVICE_ID: spec.service_id, LABEL_SERVICE_NAME: spec.service_name,
                  LABEL_DEPLOYMENT_ID: spec.deployment_id}
        if self.options.scope_label:
            key, _, value = self.options.scope_label.partition("=")
            labels[key] = value
        if self.options.owner:
            labels[LABEL_OWNER] = self.options.owner
        return labels

    def _run_resolving_obstacles(
        self, spec: ExpectedContainer, argv: list[str], secrets: list[str], pass_fds: Sequence[int] = (),
        env: Mapping[str, str] | None = None,
    ) -> Result:
        handled: set[str] = set()
        while True:
            try:
                return self._run(*argv, secrets=secrets, pass_fds=pass_fds, env=env)
            except PodmanCommandError as exc:
                output = exc.output
                if NAME_IN_USE in output and "name" not in handled:
                    handled.add("name")
                    existing = self.inspect(spec.name)
                    if existing is not None and not self._owns(existing):
                        raise PodmanError(
                            f"a container named {spec.name} exists that the agent does not manage; not replacing it"
                        ) from exc
                    blocker = _running_other_deployment(existing, spec) if existing is not None else None
                    if blocker is not None:
                        # `<service>-<deployment[:8]>` of two listed deployments can clash.
                        raise PodmanError(
                            f"the name {spec.name} is held by a running container of deployment {blocker}; "
                            f"not replacing it (the names of deployments {blocker} and {spec.deployment_id} clash)"
                        ) from exc
                    if existing is not None:
                        log.info("removing leftover container %s before deploying it again", spec.name)
                        self._remove_ours(spec.name, grace=self.options.stop_timeout, info=existing)
                    continue
                # A failed run can leave a `created` container of ours behind.
                self._remove_failed_run(spec.name)
                if IMAGE_UNKNOWN in output and "image" not in handled:
                    handled.add("image")
                    self._known_images.discard(canonical_image(spec.image))
                    self.pull(spec.image)
                    continue
                if NETWORK_GONE in output.lower() and self._network_spec is not None and "network" not in handled:
                    handled.add("network")
                    log.warning("podman network %s is gone; re-creating it", self.options.network)
                    if not self.ensure_network(*self._network_spec):
                        raise PodmanRunFailed(exc, spec.name) from exc
                    continue
                conflict = IPAM_CONFLICT.search(output)
                if conflict is not None and spec.ip_address and "ip" not in handled:
                    handled.add("ip")
                    self._free_ip(spec, conflict.group(1) or "")
                    continue
                log.debug("podman run of %s failed: %s", spec.name, CommandError.__str__(exc))
                raise PodmanRunFailed(exc, spec.name) from exc

    def _run_argv(
        self, spec: ExpectedContainer, volumes_dir: Path, env_names: Sequence[str] = (), env_file: Path | None = None
    ) -> list[str]:
        """`podman run`'s argv; the variables appear by name only (`--env=NAME`: podman takes
        the value from its environment) or as the env file's path, never with a value."""
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
        if opts.owner:
            argv.append(f"--label={LABEL_OWNER}={opts.owner}")
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
        argv += [f"--env={name}" for name in env_names]
        argv += ["--", canonical_image(spec.image)]
        # The spec is the model's, but nothing may reach argv unchecked: a spec built
        # elsewhere (a test, a cache) goes through the same grammars.
        try:
            validate.identifier(spec.deployment_id, "deploymentId")
            validate.identifier(spec.service_id, "serviceId")
            validate.free_text(spec.service_name, "serviceName")
            validate.image_reference(spec.image)
            for name in env_names:
                validate.env_key(name)
            validate.argv(argv, f"podman run of {spec.name}")
        except validate.InvalidValue as exc:
            raise PodmanError(f"refusing to run container {spec.name}: {exc}") from None
        return argv

    def _env_file(self, env: Mapping[str, str]) -> int:
        """The variables podman itself reads (`podman_reads`) as an env file that exists
        only in memory: a sealed memfd, which `podman run` reads as `/dev/fd/N` (it inherits
        the descriptor). Nothing reaches a disk, so a kill -9 or a power cut leaves no
        secret behind. The caller closes it."""
        data = _env_file_text(env).encode("utf-8")
        try:
            fd = os.memfd_create("techulus-env", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except (AttributeError, OSError) as exc:
            raise PodmanError(f"cannot create an in-memory env file (memfd_create): {exc}") from exc
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            # Sealed: nothing (not even a process that could reach the descriptor) can change it.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def remove_stale_env_files(self, older_than: float = 0.0) -> None:
        """Env files that agents before the in-memory ones left in the run dir (a kill -9
        between write and delete) hold secrets: remove them (at start-up and on teardown;
        this agent writes none)."""
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
        if info is not None and self._owns(info):
            self._remove_ours(name, grace=0, info=info)

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
        if not self._owns(holder):
            raise PodmanError(
                f"IP {spec.ip_address} is held by container {holder_name}, which the agent does not manage; "
                "not touching it (free the IP or remove that container)"
            )
        blocker = _running_other_deployment(holder, spec)
        if blocker is not None:
            raise PodmanError(
                f"IP {spec.ip_address} is held by running container {holder_name} of deployment "
                f"{blocker}; it must be removed first"
            )
        log.warning("IP %s is held by stale container %s; removing it", spec.ip_address, holder_name)
        self._remove_ours(str(holder.get("Id") or holder_id), grace=0, info=holder)

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
                self._note_started(info)
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
        after: dict[str, Any] | None = None
        self.listing.invalidate()
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
        self._remove_ours(ref, grace=0, info=after)

    def _require_ours(self, ref: str) -> dict[str, Any] | None:
        info = self.inspect(ref)
        if info is not None and not self._owns(info):
            verdict = self.judge(_labels_of(info), _networks_of(info))
            raise PodmanError(f"container {ref} is not managed by this agent ({verdict.why}); not touching it")
        return info

    def start(self, ref: str) -> None:
        info = self._require_ours(ref)
        if info is None:
            raise PodmanError(f"cannot start container {ref}: it does not exist")
        self.listing.invalidate()
        self._run("start", ref)
        if not self.wait_running(ref, baseline_restarts=_int(info.get("RestartCount"))):
            tail = self.logs_tail(ref)
            self._halt(ref)
            raise PodmanError(f"container {ref} did not stay running after start: {tail}")

    def restart(self, ref: str) -> None:
        info = self._require_ours(ref)
        if info is None:
            raise PodmanError(f"cannot restart container {ref}: it does not exist")
        self.listing.invalidate()
        self._run("restart", "--time", self._stop_time(), ref, timeout=self.options.timeout + self.options.stop_timeout)
        # `podman restart` and `start` leave RestartCount alone: only crashes raise it.
        if not self.wait_running(ref, baseline_restarts=_int(info.get("RestartCount"))):
            tail = self.logs_tail(ref)
            self._halt(ref)
            raise PodmanError(f"container {ref} did not stay running after restart: {tail}")

    def stop_and_remove(self, ref: str) -> None:
        """Stop (grace period `stop_timeout`), remove, and verify it is gone (§9.6.3).
        `podman stop` also finishes a stop that a killed podman left `stopping`."""
        info = self._require_ours(ref)
        if info is None:
            self._reap(ref)  # gone for Podman; its process may not be
            return
        if _status(info) == "removing":
            info = self._wait_while_removing(ref, info)
            if info is None:
                return
        try:
            self._run("stop", "--time", self._stop_time(), ref, timeout=self.options.timeout + self.options.stop_timeout)
        except PodmanCommandError as exc:
            if exc.not_found:
                self._reap(str(info.get("Id") or ""))
                return
            raise
        self._remove_ours(ref, grace=0, info=dict(info, State={"Status": "exited"}))

    def force_remove(self, ref: str) -> None:
        """Remove whatever state it is in (§9.6.5); gone already counts as success."""
        info = self._require_ours(ref)
        if info is None:
            self._reap(ref)  # gone for Podman; its process may not be
            return
        self._remove_ours(ref, grace=self.options.stop_timeout, info=info)

    def _remove_ours(
        self, ref: str, grace: int, attempts: int = 3, info: Mapping[str, Any] | None = None
    ) -> None:
        """`podman rm --force` until the container is gone; the caller checked it is ours.

        `info` (its inspect, when the caller has one) names the container's full id and
        state. A container left `stopping` by a `podman stop` that was killed (kill -9 of
        the agent) is stopped first, and one being removed is waited for (bounded): `podman
        rm --force` on either answers 0 while the container's process runs on, unknown to
        Podman. After the removal no process of the container may be left (see `_reap`)."""
        container_id = str((info or {}).get("Id") or "") or (ref if CONTAINER_ID.fullmatch(ref) else "")
        status = _status(info)
        if status == "stopping":
            log.info("container %s is still `stopping` (a stop was interrupted); stopping it again", ref)
            self._run("stop", "--time", str(grace), ref, check=False, timeout=self.options.timeout + grace)
        elif status == "removing" and info is not None:
            if self._wait_while_removing(ref, info) is None:
                self._reap(container_id)
                return
        last = ""
        for attempt in range(attempts):
            try:
                self._run("rm", "--force", "--time", str(grace), ref, timeout=self.options.timeout + grace)
            except PodmanCommandError as exc:
                if exc.not_found:
                    self.listing.drop(container_id or ref)
                    self._reap(container_id)
                    return
                last = str(exc)
            if self.inspect(ref) is None:
                self.listing.drop(container_id or ref)
                self._reap(container_id)
                return
            if attempt + 1 < attempts:
                self._sleep(0.5 * 2**attempt)
        raise PodmanError(f"container {ref} still exists after podman rm" + (f": {last}" if last else ""))

    def _wait_while_removing(self, ref: str, info: Mapping[str, Any]) -> dict[str, Any] | None:
        """Wait (at most the podman timeout) while another podman removes the container;
        its inspect once it is in another state, or None once it is gone."""
        deadline = time.monotonic() + self.options.timeout
        current: dict[str, Any] | None = dict(info)
        while current is not None and _status(current) == "removing" and time.monotonic() < deadline:
            self._sleep(0.5)
            current = self.inspect(ref)
        return current

    def _reap(self, container_id: str) -> None:
        """Kill what is left of a removed container: its processes (found by the cgroup that
        carries its id) and its conmon. Podman forgets a container whose stop was cut short
        and says the removal succeeded, while the workload keeps running and holding its
        IP, ports and volumes."""
        if not CONTAINER_ID.fullmatch(container_id):
            return
        left = leftover_processes(container_id)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue
        deadline = time.monotonic() + REAP_WAIT
        while leftover_processes(container_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        still = leftover_processes(container_id)
        log.warning(
            "container %s was removed but %d of its processes still ran (pid %s); killed them%s",
            container_id[:12], len(left), ", ".join(map(str, left)), f" (pid {', '.join(map(str, still))} survived)" if still else "",
        )

    # --- images (for agent/host/images.py) ------------------------------------------------

    def storage_path(self) -> Path:
        """Where podman keeps images (its graph root): the disk the GC watches."""
        result = self._run("info", "--format", "{{.Store.GraphRoot}}")
        lines = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("/")]
        if not lines:
            raise PodmanError(f"podman info gave no storage path: {result.stdout.strip()[:200]!r}")
        return Path(lines[-1])

    def images_in_use(self) -> set[str]:
        """Image ids and names of every container on the host, whoever owns it."""
        data = _loads(self._run("ps", "--all", "--format", "json").stdout, "podman ps")
        used: set[str] = set()
        for item in data if isinstance(data, list) else []:
            if isinstance(item, dict):
                used.update(str(item[key]) for key in ("ImageID", "Image") if item.get(key))
        return used

    def image_id(self, reference: str) -> str | None:
        """The full id `reference` names now; None when there is no such image."""
        result = self._run("image", "inspect", "--format", "{{.Id}}", "--", _checked_image(reference), check=False)
        found = _container_id(result.stdout)
        return found if result.returncode == 0 and found else None

    def remove_image(self, reference: str) -> bool:
        """Untag `reference` (no --force: an image in use, or tagged by others, stays)."""
        self._known_images.discard(canonical_image(_checked_image(reference)))
        result = self._run("image", "rm", "--", _checked_image(reference), check=False)
        if result.returncode != 0:
            log.info("image %s stays: %s", reference, result.stderr.strip()[-300:])
            return False
        return True

    def remove_network(self) -> bool:
        """Remove our network (`agent standalone --down`); False when it does not exist or
        lacks our owner mark (a network the agent used but did not create).

        Never forced: podman refuses while any container, ours or not, is attached, and
        that refusal is raised with its reason.
        """
        name = self.options.network
        found = self._run("network", "inspect", "--", name, check=False)
        if found.returncode != 0:
            return False
        if not self._check_network_owner(name, found.stdout):
            raise PodmanError(f"podman network {name} belongs to another agent; not removing it")
        if not self.options.owner or _network_owner(_first(_loads(found.stdout, "podman network inspect"))) != self.options.owner:
            # ensure_network uses an unmarked network as it is (the original agent's, an
            # operator's): the agent only used it, so it is not the agent's to remove.
            log.info("podman network %s carries no %s=%s mark: this agent did not create it; leaving it",
                     name, LABEL_OWNER, self.options.owner or "(none)")
            return False
        result = self._run("network", "rm", "--", name, check=False)
        if result.returncode == 0:
            log.info("removed podman network %s", name)
            return True
        reason = result.stderr.strip()
        if "not found" in reason.lower() or "no such network" in reason.lower():
            return False
        raise PodmanError(f"cannot remove podman network {name}: {reason[-500:] or f'exit {result.returncode}'}")


def podman_reads(name: str) -> bool:
    """Whether podman or a program it starts reads `name` from its own environment."""
    return (name in PODMAN_ENV_NAMES or name.startswith(PODMAN_ENV_PREFIXES)
            or GO_RUNTIME_NAME.fullmatch(name) is not None)


def podman_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What `podman run` gets of the agent's environment: the variables podman reads (its
    config files, PATH, proxies), not the agent's settings or anything a service manager
    meant for the agent alone."""
    source = os.environ if environ is None else environ
    return {k: v for k, v in source.items() if podman_reads(k) and k not in SERVICE_MANAGER_ENV}


def check_env(env: Mapping[str, str]) -> None:
    """Raise PodmanError unless every variable can reach the container exactly: callers
    check before they stop the container that a refused value would replace."""
    _env_file_text(split_env(env)[1])


def _env_file_text(env: Mapping[str, str]) -> str:
    """The env file for the variables podman reads itself, once it reads back exactly."""
    text = "".join(f"{key}={value}\n" for key, value in env.items())
    try:
        validate.check_env_file(text, env)  # read back as every podman reads it, or refuse
    except validate.InvalidValue as exc:
        raise PodmanError(f"{exc}; podman reads this name itself, so it can only travel in an env file") from None
    for key, value in env.items():
        if len(f"{key}={value}\n".encode()) > MAX_ENV_LINE:
            raise PodmanError(
                f"environment variable {key} is longer than podman's env-file limit ({MAX_ENV_LINE} bytes); "
                "podman reads this name itself, so it can only travel in an env file"
            )
    return text


def split_env(env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """A container's variables as (passed by name through podman's environment, written to
    the in-memory env file); raises PodmanError for a value neither can carry exactly."""
    by_name: dict[str, str] = {}
    in_file: dict[str, str] = {}
    total = 0
    for key, value in env.items():
        try:
            validate.env_value(key, value)
        except validate.InvalidValue as exc:
            raise PodmanError(str(exc)) from None
        total += len(key) + 2 + len(value.encode("utf-8"))
        (in_file if podman_reads(key) else by_name)[key] = value
    if total > MAX_ENV_TOTAL:
        raise PodmanError(
            f"the environment variables add up to {total // 1024} KiB; at most {MAX_ENV_TOTAL // 1024} KiB fit "
            "in a container's environment"
        )
    return by_name, in_file


def stable_mac(ip: str) -> str:
    """02:42:<ip octets>: the same static IP always gets the same MAC, so peers' ARP stays valid."""
    octets = ipaddress.IPv4Address(ip).packed
    return "02:42:" + ":".join(f"{b:02x}" for b in octets)


def registry_of(reference: str) -> str:
    """The registry host[:port] of a canonical image reference."""
    return reference.split("/", 1)[0] if "/" in reference else ""


def parse_ps(stdout: str) -> list[ContainerInfo]:
    """`podman ps --format json` (stdout only) -> ContainerInfo; odd entries are skipped."""
    return [container for container, _networks in parse_ps_networks(stdout)]


def parse_ps_networks(stdout: str) -> list[tuple[ContainerInfo, list[str]]]:
    """`parse_ps`, each container with the names of the networks it is attached to."""
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
        networks = item.get("Networks")
        status = item.get("Status")
        health = PS_HEALTH.search(status) if isinstance(status, str) else None
        restarts = item.get("Restarts")
        container = ContainerInfo(
            id=cid,
            name=name,
            image=str(item.get("Image") or ""),
            state=str(item.get("State") or "unknown").lower(),
            labels={str(k): str(v) for k, v in labels.items() if v is not None},
            created=_whole(item.get("Created")),
            health=health.group(1) if health else "",
            started_at=_whole(item.get("StartedAt")),
            restarts=_whole(restarts) if isinstance(restarts, int) else -1,
            pid=_whole(item.get("Pid")),
        )
        containers.append((container, [str(n) for n in networks] if isinstance(networks, list) else []))
    return containers


def leftover_processes(container_id: str, proc: Path = Path("/proc")) -> list[int]:
    """Live processes of a container: those in a cgroup named after its id (the workload)
    and its conmon (`conmon … -c <id>`); zombies and this process are not counted."""
    found = []
    try:
        entries = [entry for entry in proc.iterdir() if entry.name.isdigit()]
    except OSError:
        return []
    for entry in entries:
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            if container_id not in (entry / "cgroup").read_text(errors="replace"):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if not (argv and argv[0].endswith(b"conmon") and container_id.encode() in argv):
                    continue
            # Field 3 of stat, after the parenthesised command name: Z is a zombie.
            if (entry / "stat").read_text().rpartition(")")[2].split()[:1] == ["Z"]:
                continue
        except OSError:
            continue  # gone meanwhile
        found.append(pid)
    return found


def _status(info: Mapping[str, Any] | None) -> str:
    return str(((info or {}).get("State") or {}).get("Status") or "").lower()


def _loads(text: str, what: str) -> Any:
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PodmanError(f"{what}: output is not JSON ({exc})") from exc


def _whole(value: Any) -> int:
    """A non-negative JSON integer (not a bool), else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


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


def _networks_of(info: Mapping[str, Any]) -> list[str]:
    networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
    return [str(name) for name in networks] if isinstance(networks, dict) else []


@dataclass(frozen=True)
class Ownership:
    """Whether the agent may touch a container, and why (shown by `agent plan`)."""

    ours: bool
    why: str


def judge(labels: Mapping[str, str], networks: Sequence[str], options: PodmanOptions) -> Ownership:
    """The ownership rule of the module docstring, in order: §9.1 labels, scope label,
    owner mark (ours or not: final), then adoption of unmarked (Go agent) containers."""
    if not labels.get(LABEL_SERVICE_ID):
        return Ownership(False, f"no {LABEL_SERVICE_ID} label: not a Techulus container")
    if options.scope_label:
        key, _, value = options.scope_label.partition("=")
        if labels.get(key) != value:
            return Ownership(False, f"lacks this agent's scope label {options.scope_label}")
    owner = labels.get(LABEL_OWNER) or ""
    if owner:
        if owner == options.owner:
            return Ownership(True, f"{LABEL_OWNER}={owner} is this agent")
        return Ownership(False, f"owned by another agent ({LABEL_OWNER}={owner})")
    if not options.owner:
        return Ownership(True, "unmarked, and this agent marks nothing")
    if not options.adopt_legacy:
        return Ownership(False, f"no {LABEL_OWNER} mark (original Go agent or a registered agent); a standalone agent adopts none")
    if options.network in networks:
        return Ownership(True, f"no {LABEL_OWNER} mark, on our network {options.network}: adopted from the original agent")
    # Podman lists no network for --network=host or none: such a container was never the
    # original agent's (it ran on podman's default network or ours), so an empty list is not adopted.
    if networks and all(network == DEFAULT_PODMAN_NETWORK for network in networks):
        return Ownership(True, f"no {LABEL_OWNER} mark, port-publishing container of the original agent: adopted")
    where = ", ".join(networks) or "no network: host or none"
    return Ownership(False, f"no {LABEL_OWNER} mark and not on our network {options.network} (on {where})")


def _running_other_deployment(info: Mapping[str, Any], spec: ExpectedContainer) -> str | None:
    """The deployment of `info` when a run of `spec` may not remove it: a container of ours
    is stale (removable) when stopped or an older copy of the same deployment; a running
    one of another deployment stays."""
    running = bool((info.get("State") or {}).get("Running"))
    deployment = _labels_of(info).get(LABEL_DEPLOYMENT_ID)
    if running and deployment != spec.deployment_id:
        return deployment or "(none)"
    return None


def _first(data: Any) -> Mapping[str, Any]:
    first = data[0] if isinstance(data, list) and data else data
    return first if isinstance(first, dict) else {}


def _network_owner(network: Mapping[str, Any]) -> str:
    labels = network.get("labels") or network.get("Labels") or {}
    return str(labels.get(LABEL_OWNER) or "") if isinstance(labels, dict) else ""


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
