"""`agent doctor`: tells an operator, one line per check, whether this server can run the agent.

Each line is `OK`, `WARN` or `FAIL`, what was found, and for anything not OK how to fix it.
The exit status is non-zero when a required check fails; optional parts (the build tools,
or Caddy/DNS/WireGuard when the settings turn their management off) only warn.
install.sh ends with it, so it changes nothing the agent has not made itself: it reads and
asks, and runs one throwaway container of ours on the agent's network (agent/host/probe.py;
the network is created if missing, as the agent would at start) which it removes again.
"""

from __future__ import annotations

import dataclasses

import logging
import os
import shutil
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import urllib3

from agent import __version__, healthcheck
from agent.host.run import CommandError, run
from agent.identity import AgentConfig
from agent.settings import Settings, SettingsError

log = logging.getLogger(__name__)

OK, WARN, FAIL = "OK", "WARN", "FAIL"
#: Signed requests are refused when the clocks differ by more than this (PROTOCOL.md §5.2).
MAX_SKEW = 60.0
SKEW_WARN = 10.0
PROBE_TIMEOUT = 5.0
REQUIRED_CADDY_MODULES = ("dns.providers.cloudflare", "http.handlers.vars", "http.handlers.log_append")
#: Where install.sh writes agent.env and caddy.env (its CONF_DIR).
CONF_DIR = Path("/etc/techulus-agent")


@dataclass(frozen=True)
class Check:
    status: str
    name: str
    detail: str
    hint: str = ""

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name}: {self.detail}"
        if self.hint and self.status != OK:
            text += f" -- fix: {self.hint}"
        return text


@dataclass(frozen=True)
class Tool:
    name: str
    version_argv: tuple[str, ...]
    required: bool
    hint: str


def tools(settings: Settings) -> list[Tool]:
    """The programs the agent runs (PROTOCOL.md §1.3), and whether this server needs each."""
    reinstall = "re-run install.sh"
    podman = Tool("podman", ("podman", "--version"), True, "apt-get install podman")
    if settings.standalone:
        return [podman]  # standalone runs containers and nothing else
    return [
        podman,
        Tool("wg", ("wg", "--version"), settings.manage_wireguard, "apt-get install wireguard-tools"),
        Tool("wg-quick", (), settings.manage_wireguard, "apt-get install wireguard-tools"),
        Tool("dnsmasq", ("dnsmasq", "--version"), settings.manage_dns, "apt-get install dnsmasq"),
        Tool("caddy", ("caddy", "version"), settings.manage_caddy, reinstall + " (without --skip-caddy)"),
        Tool("git", ("git", "--version"), False, "apt-get install git (needed for builds)"),
        Tool("buildctl", ("buildctl", "--version"), False, reinstall + " without --skip-build-tools (needed for builds)"),
        Tool("railpack", ("railpack", "--version"), False, reinstall + " without --skip-build-tools (needed for builds)"),
    ]


def check_tool(tool: Tool, which: Callable[[str], str | None]) -> Check:
    missing = FAIL if tool.required else WARN
    path = which(tool.name)
    if path is None:
        return Check(missing, tool.name, "not found on PATH", tool.hint)
    if not tool.version_argv:
        return Check(OK, tool.name, path)
    try:
        result = run([path, *tool.version_argv[1:]], timeout=PROBE_TIMEOUT, check=False)
    except CommandError as exc:
        return Check(missing, tool.name, f"{path} does not run: {exc}", tool.hint)
    output = (result.stdout.strip() or result.stderr.strip()).splitlines()
    first = output[0][:120] if output else ""
    if result.returncode != 0:
        return Check(missing, tool.name, f"{path} exited with {result.returncode}: {first}", tool.hint)
    return Check(OK, tool.name, f"{path} ({first})" if first else path)


def check_caddy_modules(settings: Settings, which: Callable[[str], str | None]) -> Check | None:
    path = which("caddy")
    if path is None or not settings.manage_caddy:
        return None
    try:
        result = run([path, "list-modules"], timeout=PROBE_TIMEOUT, check=False)
    except CommandError as exc:
        return Check(FAIL, "caddy modules", str(exc), "re-run install.sh")
    present = {line.strip() for line in result.stdout.splitlines()}
    missing = [name for name in REQUIRED_CADDY_MODULES if name not in present]
    if missing:
        return Check(
            FAIL, "caddy modules", f"{path} lacks {', '.join(missing)}",
            "use the Caddy install.sh builds with xcaddy (Cloudflare DNS module, Caddy >= 2.8)",
        )
    return Check(OK, "caddy modules", ", ".join(REQUIRED_CADDY_MODULES))


def check_caddy_admin(settings: Settings, http: urllib3.PoolManager) -> Check | None:
    if not settings.manage_caddy:
        return None
    url = settings.caddy_admin_url.rstrip("/") + "/config/"
    try:
        response = http.request("GET", url, retries=False, timeout=PROBE_TIMEOUT)
    except urllib3.exceptions.HTTPError as exc:
        return Check(FAIL, "caddy admin API", f"{url}: {_reason(exc)}", "systemctl status caddy; journalctl -u caddy")
    if response.status != 200:
        return Check(FAIL, "caddy admin API", f"{url} answered {response.status}", "systemctl restart caddy")
    return Check(OK, "caddy admin API", f"{url} answers")


def check_dnsmasq(settings: Settings, proc: Path) -> Check | None:
    if not settings.manage_dns:
        return None
    if _process_running("dnsmasq", proc):
        return Check(OK, "dnsmasq", "running")
    return Check(FAIL, "dnsmasq", "not running", "systemctl enable --now dnsmasq; journalctl -u dnsmasq")


def check_buildkit(settings: Settings) -> Check:
    address = settings.buildkit_host
    parts = urlsplit(address)
    if parts.scheme != "tcp" or not parts.hostname or not parts.port:
        return Check(WARN, "buildkit", f"cannot probe {address} (only tcp://HOST:PORT is checked)")
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=PROBE_TIMEOUT):
            pass
    except OSError as exc:
        return Check(
            WARN, "buildkit", f"{address}: {exc.strerror or exc} (builds will fail)",
            "systemctl status buildkit; journalctl -u buildkit (podman container techulus-buildkit)",
        )
    return Check(OK, "buildkit", f"{address} accepts connections")


def check_forwarding(proc: Path, required: bool = True) -> Check:
    """Required on a worker (the mesh routes to containers); standalone, this host reaches
    its containers over the bridge without it."""
    try:
        value = (proc / "sys/net/ipv4/ip_forward").read_text().strip()
    except OSError as exc:
        return Check(WARN, "ip forwarding", f"cannot read: {exc.strerror}")
    if value == "1":
        return Check(OK, "ip forwarding", "enabled")
    return Check(
        FAIL if required else WARN, "ip forwarding", "disabled: containers are unreachable from other servers",
        "sysctl -w net.ipv4.ip_forward=1 (install.sh makes it permanent)",
    )


def check_data_dir(settings: Settings) -> list[Check]:
    root = settings.data_dir
    try:
        info = root.stat()
    except FileNotFoundError:
        return [Check(WARN, "data dir", f"{root} does not exist yet (created 0700 on first start)")]
    except OSError as exc:
        return [Check(FAIL, "data dir", f"{root}: {exc.strerror}", "run as root")]
    checks: list[Check] = []
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISDIR(info.st_mode):
        return [Check(FAIL, "data dir", f"{root} is not a directory", f"move {root} away")]
    if info.st_uid != os.geteuid() or mode & 0o077:
        checks.append(Check(
            FAIL, "data dir", f"{root} is mode {mode:04o}, owner uid {info.st_uid}: the keys must be private",
            f"chown root: {root} && chmod 700 {root}",
        ))
    else:
        checks.append(Check(OK, "data dir", f"{root} (mode {mode:04o})"))
    return checks


def secret_files(settings: Settings, conf_dir: Path) -> list[tuple[str, Path]]:
    """The files that hold a secret, each with what it holds (all optional: any may be absent)."""
    from agent.identity import DataDir

    data_dir = DataDir(settings.data_dir)
    return [
        ("signing key", data_dir.private_key),
        ("wireguard key", data_dir.wireguard_key),
        ("agent config (encryption key)", data_dir.config),
        ("wireguard config", settings.wireguard_config_dir / f"{settings.wireguard_interface}.conf"),
        ("agent env file (registration token)", conf_dir / "agent.env"),
        ("caddy env file (Cloudflare API token)", conf_dir / "caddy.env"),
    ]


def check_secret_files(settings: Settings, conf_dir: Path) -> list[Check]:
    """FAIL for each secret file that group or others can access; one OK line when none can.

    Missing files are skipped: before registration there are no keys, and --skip-caddy or
    manage_wireguard=false leave the others out. stat() follows symlinks, so a link to an
    open file is caught too.
    """
    private: list[str] = []
    problems: list[Check] = []
    for what, path in secret_files(settings, conf_dir):
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(Check(FAIL, what, f"{path}: {exc.strerror}", "run doctor as root"))
            continue
        if mode & 0o077:
            problems.append(Check(
                FAIL, what, f"{path} is mode {mode:04o}: group/others can read a secret", f"chmod 600 {path}",
            ))
        else:
            private.append(str(path))
    if problems or not private:
        return problems
    return [Check(OK, "secret files", f"{len(private)} private (no group/other access): {', '.join(private)}")]


def check_registration(settings: Settings) -> tuple[Check, object | None]:
    """The registration state and, when registered, the loaded identity."""
    from agent.identity import DataDir, IdentityError

    data_dir = DataDir(settings.data_dir)
    if data_dir.is_registered():
        try:
            identity = data_dir.load()
        except IdentityError as exc:
            return Check(FAIL, "registration", str(exc)), None
        return Check(OK, "registration", f"registered as server {identity.config.server_id}"), identity
    try:
        token = settings.resolved_token()
    except SettingsError as exc:
        return Check(FAIL, "registration", f"not registered, and {exc}", "fix token_file or pass --token"), None
    if token:
        return Check(WARN, "registration", "not registered yet; the agent registers with its token when it starts"), None
    return Check(
        FAIL, "registration", f"not registered ({data_dir.private_key} is missing) and no token given",
        "create a server in the control plane and re-run install.sh with --token",
    ), None


def check_control_plane(settings: Settings, identity: object | None, http: urllib3.PoolManager) -> list[Check]:
    if not settings.url:
        return [Check(FAIL, "control plane", "no URL configured", "pass --url or set TECHULUS_AGENT_URL")]
    from agent.api import ApiError, ControlPlane, Signer

    # Any HTTP answer proves reachability; its Date header gives the clock difference.
    probe = settings.url.rstrip("/") + "/api/v1/agent/expected-state"
    try:
        started = time.time()
        response = http.request("GET", probe, retries=False, timeout=PROBE_TIMEOUT, redirect=False)
    except urllib3.exceptions.HTTPError as exc:
        return [Check(FAIL, "control plane", f"{settings.url} unreachable: {_reason(exc)}", "check the URL, DNS and firewall")]
    checks = [Check(OK, "control plane", f"{settings.url} reachable (HTTP {response.status})")]
    checks.append(_skew_check(response.headers.get("Date"), started))
    if identity is not None:
        client = ControlPlane(
            settings.url,
            Signer(identity.config.server_id, identity.signing_key),  # type: ignore[attr-defined]
            connect_timeout=PROBE_TIMEOUT,
            read_timeout=PROBE_TIMEOUT,
            retries=0,
        )
        try:
            client.expected_state()
        except ApiError as exc:
            checks.append(Check(FAIL, "signed request", str(exc)))
        else:
            checks.append(Check(OK, "signed request", "the control plane accepts this server's signature"))
    return checks


def check_container(settings: Settings) -> list[Check]:
    """A real container on the agent's network: create, start, fetch its page, remove.
    The other checks all pass on a host where `podman run` fails; this one does not."""
    import tempfile

    from agent.host.podman import Podman, PodmanError
    from agent.host.probe import ProbeFailed, ProbeSkipped, cause, run_probe
    from agent.runtime import podman_options

    try:
        config, taken = probe_subnet(settings)
    except ProbeFailed as exc:
        return [Check(WARN, "container probe", f"skipped: {exc}")]
    try:
        options = podman_options(settings, config, ())
    except PodmanError as exc:
        return [Check(FAIL, "container probe", str(exc), "fix the podman settings")]
    try:
        with tempfile.TemporaryDirectory(prefix="techulus-doctor-") as workdir:
            result = run_probe(Podman(options), config.container_subnet, config.container_gateway, Path(workdir), taken)
    except ProbeSkipped as exc:
        return [Check(WARN, "container probe", f"skipped: {exc}")]
    except (ProbeFailed, PodmanError) as exc:
        step = exc.step if isinstance(exc, ProbeFailed) else "podman"
        text = str(exc)
        what, fix = cause(text)
        first = podman_words(text)
        detail = f"{step} failed on network {options.network}: {what + ' -- ' if what else ''}{first}"
        if not fix:
            fix = (f"check `ip route get {config.container_gateway}` and the firewall rules for network {options.network}"
                   if step == "reach" else "run the failing podman command by hand; see `podman info`")
        return [Check(FAIL, "container probe", detail, fix)]
    return [Check(
        OK, "container probe",
        f"created, started, reached http://{result.ip}/ and removed a container on network {options.network} "
        f"({result.seconds:.1f}s)",
    )]


def podman_words(text: str) -> str:
    """podman's own message ("Error: …") from a failed command's text, not its long argv."""
    at = text.rfind("Error:")
    words = text[at:] if at >= 0 else text
    return next((line.strip() for line in words.splitlines() if line.strip()), text)[:300]


def probe_subnet(settings: Settings) -> tuple[AgentConfig, set[str]]:
    """The agent's container subnet (its AgentConfig) and the addresses the probe must avoid."""
    from agent.host.probe import ProbeFailed
    from agent.identity import DataDir, IdentityError

    if settings.standalone:
        from agent.loop import load_state_file
        from agent.model import ModelError
        from agent.runtime import standalone_config

        try:
            data = load_state_file(settings.state_file)  # type: ignore[arg-type]
            config = standalone_config(settings)
        except (ModelError, IdentityError, OSError) as exc:
            raise ProbeFailed("state", f"cannot read the state file: {exc}") from exc
        containers = data.get("containers")
        taken = {str(c.get("ipAddress")) for c in containers if isinstance(c, dict)} if isinstance(containers, list) else set()
        return config, taken
    data_dir = DataDir(settings.data_dir)
    if not data_dir.is_registered():
        raise ProbeFailed("state", "not registered yet (the container subnet comes with registration)")
    try:
        return data_dir.load().config, set()
    except IdentityError as exc:
        raise ProbeFailed("state", str(exc)) from exc


def _skew_check(date: str | None, now: float) -> Check:
    import email.utils

    if not date:
        return Check(WARN, "clock", "the control plane sent no Date header; clock difference unknown")
    try:
        skew = now - email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return Check(WARN, "clock", f"cannot parse the control plane's Date header {date!r}")
    text = f"{abs(skew):.0f}s {'ahead of' if skew > 0 else 'behind'} the control plane"
    if abs(skew) > MAX_SKEW:
        return Check(FAIL, "clock", f"{text}: signed requests will be refused", "timedatectl set-ntp true")
    if abs(skew) > SKEW_WARN:
        return Check(WARN, "clock", text, "timedatectl set-ntp true")
    return Check(OK, "clock", text)


def _process_running(name: str, proc: Path) -> bool:
    try:
        entries = list(proc.iterdir())
    except OSError:
        return False
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == name:
                return True
        except OSError:
            continue
    return False


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc)


def collect(
    settings: Settings,
    *,
    which: Callable[[str], str | None] = shutil.which,
    proc: Path = Path("/proc"),
    net: Path = Path("/sys/class/net"),
    conf_dir: Path = CONF_DIR,
    container_check: Callable[[Settings], list[Check]] = check_container,
) -> list[Check]:
    if settings.standalone:
        # Standalone runs containers only: no mesh, DNS, Caddy, builds or registration.
        settings = dataclasses.replace(settings, manage_wireguard=False, manage_dns=False, manage_caddy=False)
    http = urllib3.PoolManager(num_pools=2, headers={"User-Agent": f"techulus-agent-doctor/{__version__}"})
    checks: list[Check] = [Check(OK, "python", sys.version.split()[0])]
    checks.extend(check_tool(tool, which) for tool in tools(settings))
    if any(c.name == "podman" and c.status == OK for c in checks):  # it runs: can it run a container?
        checks.extend(container_check(settings))
    optional: Sequence[Check | None] = (
        check_caddy_modules(settings, which),
        check_caddy_admin(settings, http),
        check_dnsmasq(settings, proc),
    )
    checks.extend(c for c in optional if c is not None)
    checks.append(Check(OK, "health checks", healthcheck.describe(settings.health_runner)))
    if not settings.standalone:
        checks.append(check_buildkit(settings))
    checks.append(check_forwarding(proc, required=not settings.standalone))
    checks.extend(check_data_dir(settings))
    checks.extend(check_secret_files(settings, conf_dir))
    identity: object | None = None
    if not settings.standalone:
        registration, identity = check_registration(settings)
        checks.append(registration)
    if settings.manage_wireguard:
        iface = settings.wireguard_interface
        if (net / iface).exists():
            checks.append(Check(OK, "wireguard", f"interface {iface} is up"))
        else:
            status = FAIL if identity is not None else WARN
            checks.append(Check(status, "wireguard", f"interface {iface} does not exist",
                                "the agent brings it up when it starts: systemctl restart techulus-agent"))
    if not settings.standalone:
        checks.extend(check_control_plane(settings, identity, http))
    return checks


def run_doctor(
    settings: Settings,
    *,
    out: TextIO | None = None,
    which: Callable[[str], str | None] = shutil.which,
    proc: Path = Path("/proc"),
    net: Path = Path("/sys/class/net"),
    conf_dir: Path = CONF_DIR,
    container_check: Callable[[Settings], list[Check]] = check_container,
) -> int:
    """Print one line per check; 1 when a required check failed, else 0."""
    stream = out or sys.stdout
    checks = collect(settings, which=which, proc=proc, net=net, conf_dir=conf_dir, container_check=container_check)
    for check in checks:
        print(check.line(), file=stream)
    failed = [c for c in checks if c.status == FAIL]
    warned = [c for c in checks if c.status == WARN]
    summary = f"{len(checks)} checks: {len(failed)} failed, {len(warned)} warnings"
    print(summary if failed else f"{summary}; this server can run the agent", file=stream)
    return 1 if failed else 0
