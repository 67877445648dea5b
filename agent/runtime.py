"""Assembles the running agent: identity, adapters, threads and the reconcile loop.

Threads: the reconcile loop (main thread), the heartbeat, the work queue, builds and
log shipping. They share one `host_lock` so that a work item and a reconcile step never
change containers at the same time; the heartbeat only reads and never takes it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import ipaddress
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from agent import sdnotify, status
from agent.api import ControlPlane, Signer, Unavailable
from agent.configsync import ConfigSync
from agent.heartbeat import Heartbeat
from agent.host.podman import Podman, PodmanOptions
from agent.identity import AgentConfig, DataDir, Identity
from agent.loop import RESTORE_KINDS, ControlPlaneSource, FileSource, Reconciler, StateSource, load_state_file
from agent.model import WireGuardPeer
from agent.registration import ensure_registered
from agent.settings import Settings

log = logging.getLogger(__name__)

HEARTBEAT_PODMAN_TIMEOUT = 8.0


@dataclass
class Components:
    settings: Settings
    config: AgentConfig
    podman: Podman
    source: StateSource
    syncs: list[ConfigSync]
    reconciler: Reconciler
    heartbeat: Heartbeat
    client: ControlPlane | None = None
    identity: Identity | None = None
    host_lock: threading.Lock = field(default_factory=threading.Lock)
    # Peers from a registration that just happened (None when already registered).
    initial_peers: tuple[WireGuardPeer, ...] | None = None
    public_ip: Callable[[], str] = lambda: ""


def make_client(settings: Settings, identity: Identity | None) -> ControlPlane:
    signer = Signer(identity.config.server_id, identity.signing_key) if identity else None
    return ControlPlane(
        settings.url,
        signer,
        connect_timeout=settings.http_connect_timeout,
        read_timeout=settings.http_read_timeout,
        retries=settings.http_retries,
        max_response_bytes=settings.max_response_bytes,
    )


def standalone_config(settings: Settings) -> AgentConfig:
    """The identity a state file gives: subnetId (default 1), wireguardIp, encryptionKey."""
    assert settings.state_file is not None
    data = load_state_file(settings.state_file)
    return AgentConfig.from_json(
        {
            "serverId": "standalone",
            "subnetId": data.get("subnetId", 1),
            "wireguardIp": data.get("wireguardIp") or "127.0.0.1",
            "encryptionKey": data.get("encryptionKey") or "",
        },
        str(settings.state_file),
    )


def podman_options(settings: Settings, config: AgentConfig, dns_servers: tuple[str, ...]) -> PodmanOptions:
    return PodmanOptions(
        binary=settings.podman,
        network=settings.network_name,
        scope_label=settings.scope_label,
        timeout=settings.podman_timeout,
        pull_timeout=settings.pull_timeout,
        stop_timeout=settings.stop_timeout,
        insecure_registries=settings.insecure_registries,
        dns_servers=dns_servers,
        publish_address=config.wireguard_ip,
        run_dir=settings.run_dir,
        log_max_size=settings.container_log_max_size,
    )


def config_syncs(settings: Settings, identity: Identity | None) -> list[ConfigSync]:
    """The DNS, Caddy and WireGuard adapters this server manages, in the order of §9.5
    (none in standalone mode). An adapter whose settings are unusable is left out with an
    error line; the rest of the agent runs on."""
    if identity is None:
        return []
    wanted: list[Callable[[], ConfigSync]] = []
    if settings.manage_dns:
        from agent.host.dns import DnsSync

        wanted.append(lambda: DnsSync(settings, identity))
    if settings.manage_caddy:
        from agent.host.caddy import CaddySync

        wanted.append(lambda: CaddySync(settings, identity))
    if settings.manage_wireguard:
        from agent.host.wireguard import WireGuardSync

        wanted.append(lambda: WireGuardSync(settings, identity))
    syncs: list[ConfigSync] = []
    for build in wanted:
        try:
            syncs.append(build())
        except Exception as exc:  # noqa: BLE001 - a bad setting disables that part only
            log.error("not managing this part of the configuration: %s", exc)
    return syncs


def container_dns(settings: Settings, identity: Identity | None) -> tuple[str, ...]:
    if settings.container_dns:
        return (settings.container_dns,)
    if identity is None or not settings.manage_dns:
        return ()
    from agent.host.dns import container_dns_servers

    return tuple(container_dns_servers(settings, identity))


def assemble(settings: Settings, public_ip: Callable[[], str] = lambda: "", create: bool = True) -> Components:
    """Everything needed to run, registering first if needed. Raises with a clear message.
    `create=False` (for `plan`) leaves the disk alone."""
    data_dir = DataDir(settings.data_dir)
    if create:
        data_dir.ensure()
    identity: Identity | None = None
    client: ControlPlane | None = None
    initial_peers: tuple[WireGuardPeer, ...] | None = None
    if settings.standalone:
        config = standalone_config(settings)
    else:
        registration = ensure_registered(settings, data_dir, make_client(settings, None), public_ip)
        identity = registration.identity
        initial_peers = registration.initial_peers
        config = identity.config
        client = make_client(settings, identity)
    subnet = ipaddress.IPv4Network(config.container_subnet)
    dns_servers = container_dns(settings, identity)
    podman = Podman(podman_options(settings, config, dns_servers))
    syncs = config_syncs(settings, identity)
    source: StateSource
    if settings.standalone:
        assert settings.state_file is not None
        source = FileSource(settings.state_file, subnet)
    else:
        source = ControlPlaneSource(client, subnet, settings.data_dir / "expected-state.json")
    # The heartbeat reads podman with a short timeout: a stuck podman must not silence it.
    reader = Podman(dataclasses.replace(podman.options, timeout=HEARTBEAT_PODMAN_TIMEOUT))
    send: Callable[[dict[str, Any]], None] | None = None
    if client is not None:
        reporting_client = client

        def send(report: dict[str, Any]) -> None:
            # No retry: the next beat, due within the interval, is the retry.
            reporting_client.report_status(report, retries=0)

    heartbeat = Heartbeat(
        send,
        reader,
        settings.heartbeat_interval,
        public_ip=public_ip,
        on_beat=lambda: sdnotify.notify("WATCHDOG=1"),
    )
    host_lock = threading.Lock()
    reconciler = Reconciler(settings, podman, source, syncs, config.encryption_key, heartbeat, host_lock)
    return Components(
        settings, config, podman, source, syncs, reconciler, heartbeat, client, identity, host_lock, initial_peers, public_ip
    )


def prepare_host(components: Components) -> None:
    """Start-up work whose failure is logged, not fatal: the network, the config services."""
    config = components.config
    components.podman.remove_stale_env_files(older_than=0)
    try:
        components.podman.ensure_network(config.container_subnet, config.container_gateway)
    except Exception as exc:  # noqa: BLE001
        log.warning("cannot ensure podman network %s: %s", components.settings.network_name, exc)
    for sync in components.syncs:
        try:
            sync.prepare()
        except Exception as exc:  # noqa: BLE001
            log.warning("%s: preparation failed: %s", sync.name, exc)
    peers = components.initial_peers
    if peers:
        wireguard = next((s for s in components.syncs if s.name == "wireguard"), None)
        if wireguard is not None:
            try:
                wireguard.apply_peers(peers)  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001
                log.warning("wireguard: cannot apply the peers from registration: %s", exc)


def background_tasks(components: Components) -> list[tuple[str, Callable[[threading.Event], None]]]:
    settings = components.settings
    tasks: list[tuple[str, Callable[[threading.Event], None]]] = [("heartbeat", components.heartbeat.run)]
    if isinstance(components.public_ip, status.PublicIp) and components.public_ip.url:
        tasks.append(("public-ip", components.public_ip.run))
    if components.client is not None:
        from agent.workqueue import WorkQueue

        wireguard = next((s for s in components.syncs if s.name == "wireguard"), None)

        def item_changed_containers() -> None:
            components.reconciler.note_host_change()
            components.heartbeat.trigger()
            components.reconciler.wake()  # e.g. a `deploy` item: a rollout starts, follow it

        queue = WorkQueue(
            components.client,
            components.podman,
            settings,
            components.host_lock,
            getattr(wireguard, "apply_peers", None),
            on_change=item_changed_containers,
        )
        components.reconciler.stopped_deployments = queue.stopped_deployments
        tasks.append(("workqueue", queue.run))
        from agent.builds import BuildWorker

        assert components.identity is not None
        worker = BuildWorker(settings, components.client, components.identity.config.encryption_key)
        tasks.append(("builds", worker.run))
    if settings.logs_endpoint:
        from agent.logship import LogShipper

        shipper = LogShipper(settings, components.podman)
        tasks.append(("logs", shipper.run))
    from agent import healthcheck

    components.reconciler.couple(components.heartbeat)  # drains, fast follow (loop.py)
    health_runner = healthcheck.runner_task(settings, components.podman, components.heartbeat.trigger)
    if health_runner is not None:
        components.heartbeat.on_trigger = health_runner.wake
        tasks.append(("healthcheck", health_runner.run))
    return tasks


class AlreadyRunning(RuntimeError):
    pass


def hold_lock(data_dir: Path) -> IO[str]:
    """One agent per data dir: two would reconcile the same containers against each other.
    The lock is released by the kernel when the process ends, however it ends."""
    DataDir(data_dir).ensure()
    handle = open(data_dir / "agent.lock", "a+", encoding="ascii")  # noqa: SIM115 - held for the process' life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise AlreadyRunning(f"another agent (pid {holder}) is already running with data dir {data_dir}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def run_agent(settings: Settings, stop: threading.Event | None = None) -> int:
    stop = stop or threading.Event()
    lock = hold_lock(settings.data_dir)
    previous = install_signal_handlers(stop)
    try:
        return _run(settings, stop)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        lock.close()


def _run(settings: Settings, stop: threading.Event) -> int:
    public_ip = status.PublicIp(settings.public_ip, "" if settings.standalone else settings.public_ip_url)
    components = assemble(settings, public_ip)
    prepare_host(components)
    threads = []
    for name, task in background_tasks(components):
        thread = threading.Thread(target=_guarded(name, task, stop), name=name, daemon=True)
        thread.start()
        threads.append(thread)
    sdnotify.notify("READY=1")
    log.info(
        "agent running (%s); tick %.0fs, heartbeat %.0fs",
        f"standalone from {settings.state_file}" if settings.standalone else f"control plane {settings.url}",
        settings.tick_interval,
        settings.heartbeat_interval,
    )
    restore_from_cache(components, stop)
    components.reconciler.run(stop)
    sdnotify.notify("STOPPING=1")
    for thread in threads:
        thread.join(timeout=15)
    log.info("agent stopped; containers keep running")
    return 0


def restore_from_cache(components: Components, stop: threading.Event) -> None:
    """If the control plane is unreachable at start, bring back the workloads it last asked for."""
    source = components.source
    if not isinstance(source, ControlPlaneSource) or components.client is None:
        return
    try:
        components.client.expected_state()
        return
    except Unavailable as exc:
        cached = source.cached()
        if cached is None:
            return
        log.warning("control plane unreachable at start (%s); restoring workloads from the cached expected state", exc)
    except Exception:  # noqa: BLE001 - the regular loop will report it
        return
    components.reconciler.process(cached, stop, only=RESTORE_KINDS)


def install_signal_handlers(stop: threading.Event) -> dict[int, Any]:
    """SIGTERM/SIGINT end the loop after the current step; returns the handlers replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, _frame: Any) -> None:
        log.info("received %s; finishing the current step and stopping", signal.Signals(signum).name)
        stop.set()

    previous: dict[int, Any] = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, handler)
    return previous


def _guarded(name: str, task: Callable[[threading.Event], None], stop: threading.Event) -> Callable[[], None]:
    def body() -> None:
        while not stop.is_set():
            try:
                task(stop)
                return
            except Exception:  # noqa: BLE001 - a crashed thread restarts instead of going silent
                log.exception("%s thread crashed; restarting it in 5s", name)
                stop.wait(5)

    return body

