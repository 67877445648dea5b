"""One Settings object for the whole agent: flags > environment > TOML file > defaults.

Every tunable lives here so that tests (and unusual servers) can move ports, paths and
intervals without touching the code. Environment variables are `TECHULUS_AGENT_<NAME>`
(upper case), TOML keys are the field names (`data_dir` or `data-dir`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import sys
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def toml_parser() -> Any:
    """tomllib (tomli on 3.10), imported on first use: an installed agent is configured by its
    environment file, so most agents never parse TOML and need not carry the parser."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python 3.10 only
        import tomli as tomllib
    return tomllib


ENV_PREFIX = "TECHULUS_AGENT_"
DEFAULT_DATA_DIR = Path("/var/lib/techulus-agent")


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names it."""


@dataclass(frozen=True)
class Settings:
    # The original's four flags (PROTOCOL.md §1.1).
    url: str = ""
    token: str = field(default="", repr=False)
    data_dir: Path = DEFAULT_DATA_DIR
    logs_endpoint: str = ""

    # Where the token may come from instead of argv.
    token_file: Path | None = None

    # Standalone mode: reconcile from this file instead of a control plane.
    state_file: Path | None = None

    # Timers (seconds). The heartbeat must stay well under the CP's 30 s offline threshold.
    tick_interval: float = 10.0
    heartbeat_interval: float = 10.0
    workqueue_interval: float = 5.0
    build_poll_interval: float = 30.0
    processing_timeout: float = 300.0
    # Following a rollout (loop.py's docstring has the timing model). Triggered status reports
    # are at least `report_coalesce` apart (triggers in between make one report).
    report_coalesce: float = 0.25
    # While a rollout moves: health (and the report it would give) is re-read this often,
    # the expected state is polled after each report and at least every `fast_poll_interval`,
    # until nothing has moved for `fast_follow_timeout`; then back to `tick_interval`.
    health_poll_interval: float = 0.5
    fast_poll_interval: float = 1.0
    fast_follow_timeout: float = 30.0
    # Longest time a dropped deployment still named by a Caddy route is kept running (drain).
    drain_timeout: float = 60.0
    # How long a drained container is kept after no route here names it any more: other
    # servers' Caddy may route to it until their next poll. Negative = `tick_interval`; never
    # more than `drain_timeout` (see `drain_grace_seconds`).
    drain_grace: float = -1.0
    # Who runs container health checks: "podman" (its systemd timers), "agent" (the agent runs
    # `podman healthcheck run`), "auto" (agent when systemd is not PID 1).
    health_runner: str = "auto"
    # While a container is `starting` within its start period, check it this often (a failure
    # there does not count, a success makes it healthy at once); 0 = only on its interval.
    health_start_interval: float = 1.0

    # Control-plane HTTP client.
    http_connect_timeout: float = 10.0
    http_read_timeout: float = 30.0
    http_retries: int = 3
    max_response_bytes: int = 16 * 1024 * 1024
    public_ip: str = ""
    public_ip_url: str = "https://api.ipify.org"

    # Podman.
    podman: str = "podman"
    # The podman network for containers; "" = `techulus` for a registered agent and
    # `standalone_network_name` for a standalone one, so the two never share a network.
    network_name: str = ""
    standalone_network_name: str = "techulus-standalone"
    pull_timeout: float = 600.0
    stop_timeout: int = 10
    podman_timeout: float = 60.0
    insecure_registries: tuple[str, ...] = ()
    # Extra `key=value` label put on, and required of, every container we manage. Empty in
    # production (so containers of the original agent are adopted); tests set it so that
    # parallel runs on one machine never see each other's containers.
    scope_label: str = ""
    # Podman's per-container log file cap. At 10k lines/s a 10 MB file holds ~8 s, less than
    # the log shipper may lag behind; lines beyond the cap are lost before they are shipped.
    container_log_max_size: str = "50mb"
    # Skip the idle tick's `podman ps` while podman's container database is unchanged
    # (agent/host/listing.py); false = list every tick.
    podman_watch_state: bool = True
    # Image GC (agent/host/images.py): removes only images this agent pulled, and only
    # while the disk holding podman's storage is more than `start` % used, until under `stop` %.
    image_gc_start_percent: float = 85.0
    image_gc_stop_percent: float = 80.0
    image_gc_interval: float = 600.0
    # Short-lived secret files (env files for `podman run`): a tmpfs, so none survives a reboot.
    run_dir: Path = Path("/run/techulus-agent")
    # A container DNS resolver to pass to `podman run --dns` ("" = gateway when DNS is managed).
    container_dns: str = ""

    # Networking (issue 3 parts).
    manage_wireguard: bool = True
    manage_dns: bool = True
    manage_caddy: bool = True
    wireguard_interface: str = "wg0"
    wireguard_port: int = 51820
    wireguard_mtu: int = 1420
    wireguard_config_dir: Path = Path("/etc/wireguard")
    dnsmasq_conf_dir: Path = Path("/etc/dnsmasq.d")
    dns_hosts_dir: Path = Path("/etc/techulus/dns-hosts")
    dns_port: int = 53
    caddy_admin_url: str = "http://localhost:2019"
    caddy_https_listen: str = ":443"
    caddy_access_log: Path = Path("/var/log/caddy/techulus.log")
    caddy_timeout: float = 10.0
    # Where Caddy upstreams may point; empty = 10.200.0.0/16 (deployment IPs of every server).
    caddy_upstream_networks: tuple[str, ...] = ()
    # "auto" adds the log_append handler only when this Caddy build has it.
    caddy_log_append: str = "auto"
    # Run wg/ip inside this network namespace (tests, unusual hosts); "" = this one.
    wireguard_netns: str = ""
    # WG_QUICK_USERSPACE_IMPLEMENTATION in the environment wins over this.
    wireguard_go: str = "wireguard-go"
    wireguard_allowed_networks: tuple[str, ...] = ("10.100.0.0/16", "10.200.0.0/16")
    wireguard_timeout: float = 30.0
    dns_listen_host: str = "127.0.0.1"
    dns_domain: str = "internal"
    dns_verify_timeout: float = 10.0
    # Upstream resolvers for non-internal names, each `ip` or `ip#port`; empty = from the resolv files.
    dns_upstream_servers: tuple[str, ...] = ()
    dns_resolv_files: tuple[str, ...] = ("/run/systemd/resolve/resolv.conf", "/etc/resolv.conf")
    # Empty = never restart dnsmasq (it only runs when our drop-in changes).
    dnsmasq_restart_command: tuple[str, ...] = ("systemctl", "restart", "dnsmasq")
    resolved_conf_dir: Path | None = Path("/etc/systemd/resolved.conf.d")
    resolved_restart_command: tuple[str, ...] = ("systemctl", "try-restart", "systemd-resolved")

    # Builds.
    buildkit_host: str = "tcp://127.0.0.1:1234"
    # The Railpack BuildKit frontend image; "" = the version the agent was made for. Set it to
    # pin a digest (…:v0.15.4@sha256:…).
    railpack_frontend: str = ""
    build_timeout: float = 1800.0
    registry_insecure_push: bool = True

    log_level: str = "INFO"
    # "text" (under systemd: journald priorities, no second timestamp) or "json" (one object a line).
    log_format: str = "text"

    # The metrics endpoint: "" = off; "127.0.0.1:9464", "[::1]:9464" or a unix socket path
    # ("/run/techulus-agent/metrics.sock" or "unix:PATH"). Loopback only unless allowed below.
    metrics_listen: str = ""
    metrics_allow_remote: bool = False

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def volumes_dir(self) -> Path:
        return self.data_dir / "volumes"

    @property
    def builds_dir(self) -> Path:
        return self.data_dir / "builds"

    @property
    def poll_deadline(self) -> float:
        """Seconds one expected-state poll may take in all (connect, retries, body): less
        than a tick, so a hanging control plane cannot stall reconciliation, but never so
        short that a loaded machine misses a healthy answer."""
        return max(2.0, min(self.tick_interval * 0.8, self.http_connect_timeout + self.http_read_timeout))

    @property
    def metrics_address(self) -> tuple[Any, ...] | None:
        """("tcp", host, port), ("unix", path), or None when metrics are off."""
        return listen_address(self.metrics_listen, self.metrics_allow_remote) if self.metrics_listen else None

    @property
    def standalone(self) -> bool:
        return self.state_file is not None

    @property
    def container_network(self) -> str:
        """The podman network this agent's containers use (see `network_name`)."""
        if self.network_name:
            return self.network_name
        return self.standalone_network_name if self.standalone else "techulus"

    @property
    def drain_grace_seconds(self) -> float:
        """`drain_grace` resolved: `tick_interval` by default, bounded by `drain_timeout`."""
        grace = self.tick_interval if self.drain_grace < 0 else self.drain_grace
        return min(grace, self.drain_timeout)

    def resolved_token(self) -> str:
        """The registration token from the flag, environment or token file (trimmed)."""
        if self.token:
            return self.token.strip()
        if self.token_file is not None:
            try:
                return self.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise SettingsError(f"token_file {self.token_file}: {exc.strerror}") from exc
        return ""

    @classmethod
    def load(
        cls,
        flags: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        config_file: Path | None = None,
    ) -> Settings:
        """Merge the sources; unknown keys and bad values raise SettingsError naming them."""
        environ = os.environ if environ is None else environ
        merged: dict[str, Any] = {}
        if config_file is not None:
            merged.update(_from_toml(config_file))
        merged.update(_from_environ(environ))
        if "BUILDKIT_HOST" in environ and environ["BUILDKIT_HOST"] and "buildkit_host" not in merged:
            merged["buildkit_host"] = environ["BUILDKIT_HOST"]
        merged.update({k: v for k, v in (flags or {}).items() if v is not None})
        return cls.from_mapping(merged, source="settings")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "settings") -> Settings:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        converted: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = raw_key.replace("-", "_")
            if key not in fields:
                raise SettingsError(f"{source}: unknown setting {raw_key!r}")
            converted[key] = _coerce(key, fields[key].type, value, source)
        settings = cls(**converted)
        settings.validate()
        return settings

    def validate(self) -> None:
        for name in (
            "tick_interval", "heartbeat_interval", "workqueue_interval", "processing_timeout",
            "health_poll_interval", "fast_poll_interval", "drain_timeout",
        ):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive")
        for name in ("report_coalesce", "fast_follow_timeout", "health_start_interval"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must not be negative")
        if self.health_runner not in ("auto", "podman", "agent"):
            raise SettingsError(f"health_runner must be auto, podman or agent, got {self.health_runner!r}")
        if self.heartbeat_interval > 25:
            raise SettingsError("heartbeat_interval must stay under the control plane's 30 s offline threshold")
        for flag, value in (("--url", self.url), ("--logs-endpoint", self.logs_endpoint), ("caddy_admin_url", self.caddy_admin_url)):
            if value and not _is_http_url(value):
                raise SettingsError(f"{flag} must be an http:// or https:// URL with a host, got {value!r}")
        if self.railpack_frontend and (self.railpack_frontend.startswith("-") or any(c.isspace() for c in self.railpack_frontend)):
            raise SettingsError(f"railpack_frontend must be an image reference, got {self.railpack_frontend!r}")
        if not 0 <= self.image_gc_stop_percent <= self.image_gc_start_percent <= 100:
            raise SettingsError("image GC watermarks need 0 <= image_gc_stop_percent <= image_gc_start_percent <= 100")
        if self.image_gc_interval <= 0:
            raise SettingsError("image_gc_interval must be positive")
        if self.scope_label and "=" not in self.scope_label:
            raise SettingsError("scope_label must look like key=value")
        if self.log_format not in LOG_FORMATS:
            raise SettingsError(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        self.metrics_address  # noqa: B018 - raises SettingsError for an unusable address


LOG_FORMATS = ("text", "json")


def listen_address(value: str, allow_remote: bool = False) -> tuple[Any, ...]:
    """Parse `metrics_listen`. A unix socket is an absolute path (or `unix:PATH`); anything
    else is `host:port` with an IP literal or `localhost`, refused off loopback unless
    `allow_remote` (metrics tell anyone who can read them what runs on this server)."""
    if value.startswith("unix:") or value.startswith("/"):
        path = value.removeprefix("unix:")
        if not path.startswith("/") or "\x00" in path:
            raise SettingsError(f"metrics_listen: a unix socket needs an absolute path, got {value!r}")
        return ("unix", path)
    host, sep, port_text = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise SettingsError(f"metrics_listen must be HOST:PORT (e.g. 127.0.0.1:9464) or a unix socket path, got {value!r}")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise SettingsError(f"metrics_listen: {host!r} is not an IP address (or localhost)") from None
    if not address.is_loopback and not allow_remote:
        raise SettingsError(
            f"metrics_listen {value!r} is not a loopback address; set metrics_allow_remote = true to expose metrics beyond this host"
        )
    return ("tcp", str(address), int(port_text))


def _is_http_url(value: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not any(c.isspace() for c in value)


def _from_toml(path: Path) -> dict[str, Any]:
    tomllib = toml_parser()
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError as exc:
        raise SettingsError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise SettingsError(f"config file {path}: {exc.strerror}") from exc
    section = data.get("agent", data)
    if not isinstance(section, dict):
        raise SettingsError(f"config file {path}: [agent] must be a table")
    return dict(section)


def _from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(Settings)}
    found: dict[str, Any] = {}
    for name in names:
        value = environ.get(ENV_PREFIX + name.upper())
        if value is not None and value != "":
            found[name] = value
    return found


def _coerce(name: str, annotation: Any, value: Any, source: str) -> Any:
    kind = str(annotation)
    try:
        if "tuple" in kind:
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
                return tuple(value)
            raise TypeError("expected a list of strings")
        if "Path" in kind:
            if value is None or value == "":
                return None if "None" in kind else Path(".")
            if not isinstance(value, str | os.PathLike):
                raise TypeError("expected a path")
            return Path(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise TypeError("expected true or false")
        if kind == "int":
            if isinstance(value, bool):
                raise TypeError("expected an integer")
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError("expected a number")
            return float(value)
        if kind == "str":
            if not isinstance(value, str):
                raise TypeError("expected a string")
            return value
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{source}: {name}: {exc}") from exc
    return value
