"""Assembles the running agent: identity, adapters, threads and the reconcile loop.

Threads: the reconcile loop (main thread), the heartbeat, the work queue, builds, log
shipping and the image GC. They share one `host_lock` so that a work item, a reconcile
step and an image removal never change the host at the same time; the heartbeat only
reads and never takes it.
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

from agent import __version__, malloc, sdnotify, status
from agent.api import ControlPlane, Signer
from agent.configsync import ConfigSync
from agent.heartbeat import Heartbeat
from agent.host.images import LEDGER_FILE, ImageGC, ImageLedger, Watermarks
from agent.host.podman import Podman, PodmanError, PodmanOptions
from agent.identity import AgentConfig, DataDir, Identity, standalone_owner
from agent.loop import RESTORE_KINDS, ControlPlaneSource, FileSource, Reconciler, StateSource, load_state_file
from agent.model import WireGuardPeer
from agent.observe import ObservedPodman, Observer, Publisher
from agent.ondemand import OnDemand
from agent.registration import ensure_registered
from agent.settings import Settings
from agent.statusview import status_path

log = logging.getLogger(__name__)

HEARTBEAT_PODMAN_TIMEOUT = 8.0
#: At start, how long to try for a fresh expected state before restoring the cached one.
RESTORE_DEADLINE = 12.0
#: Settings a SIGHUP applies to the running agent; a change of any other needs a restart.
RELOADABLE = ("log_level",)


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
    image_gc: ImageGC | None = None
    # What `agent status` and the metrics show (agent/observe.py).
    observer: Observer = field(default_factory=Observer)


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
    """Registered: owner = the server id, and the original agent's unmarked containers on
    our network are adopted. Standalone: owner derived from the data dir, adopts nothing."""
    return PodmanOptions(
        binary=settings.podman,
        network=settings.container_network,
        scope_label=settings.scope_label,
        owner=standalone_owner(settings.data_dir) if settings.standalone else config.server_id,
        adopt_legacy=not settings.standalone,
        timeout=settings.podman_timeout,
        pull_timeout=settings.pull_timeout,
        stop_timeout=settings.stop_timeout,
        insecure_registries=settings.insecure_registries,
        dns_servers=dns_servers,
        publish_address=config.wireguard_ip,
        run_dir=settings.run_dir,
        log_max_size=settings.container_log_max_size,
    )


def config_syncs(
    settings: Settings, config: AgentConfig, identity: Identity | None, on_dns_active: Callable[[], None] | None = None
) -> list[ConfigSync]:
    """The DNS, Caddy and WireGuard adapters this server manages, in the order of §9.5.

    Standalone (no `identity`): DNS and Caddy only, under the agent's owner mark (its own
    drop-in, hosts file and route ids) and dormant until the state file lists a record or
    a route (agent/ondemand.py); `on_dns_active` runs when DNS wakes up. No WireGuard: one
    host has no mesh (the state file's section is refused, see FileSource). An adapter
    whose settings are unusable is left out with an error line; the rest runs on."""
    owner = standalone_owner(settings.data_dir) if identity is None else ""
    wanted: list[Callable[[], ConfigSync]] = []
    if settings.manage_dns:
        from agent.host.dns import DnsSync

        if identity is None:
            wanted.append(lambda: OnDemand(DnsSync(settings, config, owner=owner), on_dns_active))
        else:
            wanted.append(lambda: DnsSync(settings, config))
    if settings.manage_caddy:
        from agent.host.caddy import CaddySync

        if identity is None:
            wanted.append(lambda: OnDemand(CaddySync(settings, owner=owner)))
        else:
            wanted.append(lambda: CaddySync(settings))
    if settings.manage_wireguard and identity is not None:
        from agent.host.wireguard import WireGuardSync

        registered = identity
        wanted.append(lambda: WireGuardSync(settings, registered))
    syncs: list[ConfigSync] = []
    for build in wanted:
        try:
            syncs.append(build())
        except Exception as exc:  # noqa: BLE001 - a bad setting disables that part only
            log.error("not managing this part of the configuration: %s", exc)
    return syncs


def remove_standalone_config(settings: Settings, config: AgentConfig) -> None:
    """`standalone --down`: remove the dnsmasq files and Caddy routes under this standalone
    agent's owner mark (nobody else's). A tool that cannot be reached is named, not fatal:
    the containers are gone either way."""
    for sync in config_syncs(settings, config, None):
        if not isinstance(sync, OnDemand):
            continue
        try:
            if sync.remove_own():
                log.info("%s: removed this agent's configuration", sync.name)
        except Exception as exc:  # noqa: BLE001 - one tool's failure must not stop the rest
            log.warning("%s: could not remove this agent's configuration: %s", sync.name, exc)


def container_dns(settings: Settings, config: AgentConfig, dns_active: bool = True) -> tuple[str, ...]:
    """`podman run --dns` servers: `container_dns`, else the gateway where our dnsmasq
    listens while DNS is ours and active (a standalone agent's DNS sleeps until its state
    file lists a record: until then its containers keep podman's default resolvers)."""
    if settings.container_dns:
        return (settings.container_dns,)
    if not settings.manage_dns or not dns_active:
        return ()
    from agent.host.dns import container_dns_servers

    return tuple(container_dns_servers(settings, config))


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
    source: StateSource
    if settings.standalone:
        assert settings.state_file is not None
        source = FileSource(settings.state_file, subnet)
    else:
        source = ControlPlaneSource(client, subnet, settings.data_dir / "expected-state.json")

    def dns_woke_up() -> None:
        # Containers deployed from now on resolve *.internal; running ones keep theirs.
        podman.options = dataclasses.replace(podman.options, dns_servers=container_dns(settings, config))

    syncs = config_syncs(settings, config, identity, dns_woke_up)
    dns_active = not any(isinstance(sync, OnDemand) and sync.name == "dns" for sync in syncs)
    observer = Publisher(status_path(settings.run_dir, settings.data_dir), published_info(settings, config))
    options = podman_options(settings, config, container_dns(settings, config, dns_active))
    # Only a running agent ticks: a one-shot look (`agent plan`) has no listing to keep.
    podman = ObservedPodman(
        dataclasses.replace(options, watch_state=settings.podman_watch_state and create),
        images=ImageLedger(settings.data_dir / LEDGER_FILE),
    )
    podman.observer = observer
    log.info("owner mark %s on network %s", podman.options.owner, podman.options.network)
    if isinstance(source, FileSource):
        assert settings.state_file is not None
        refuse_collisions(podman, config, source, settings.state_file)
    # The heartbeat reads podman with a short timeout: a stuck podman must not silence it.
    # It shares the listing: one `podman ps` per tick serves the reconciler and the reports.
    reader = ObservedPodman(dataclasses.replace(podman.options, timeout=HEARTBEAT_PODMAN_TIMEOUT), listing=podman.listing)
    reader.observer = observer
    send = None if client is None else report_sender(client, observer)
    heartbeat = Heartbeat(
        send,
        reader,
        settings.heartbeat_interval,
        public_ip=public_ip,
        on_beat=lambda: sdnotify.notify("WATCHDOG=1"),
    )
    heartbeat.observer = observer
    host_lock = threading.Lock()
    reconciler = Reconciler(settings, podman, source, syncs, config.encryption_key, heartbeat, host_lock)
    reconciler.observer = observer
    image_gc = ImageGC(
        podman,
        podman.images,
        Watermarks(settings.image_gc_start_percent, settings.image_gc_stop_percent),
        settings.image_gc_interval,
        host_lock,
    )
    return Components(
        settings, config, podman, source, syncs, reconciler, heartbeat, client, identity, host_lock, initial_peers, public_ip,
        image_gc, observer,
    )


def published_info(settings: Settings, config: AgentConfig) -> dict[str, Any]:
    """The fixed part of what `agent status` shows."""
    return {
        "version": __version__,
        "mode": f"standalone from {settings.state_file}" if settings.standalone else f"registered with {settings.url}",
        "serverId": "" if settings.standalone else config.server_id,
        "dataDir": str(settings.data_dir),
    }


def report_sender(client: ControlPlane, observer: Observer) -> Callable[[dict[str, Any]], None]:
    """The heartbeat's way to send a report; each outcome goes to the observer."""

    def send(report: dict[str, Any]) -> None:
        try:
            # No retry: the next beat, due within the interval, is the retry.
            client.report_status(report, retries=0)
        except Exception as exc:
            observer.report(exc)
            raise
        observer.report(None)

    return send


def refuse_collisions(podman: Podman, config: AgentConfig, source: FileSource, state_file: Path) -> None:
    """A standalone agent refuses to start, with one message, when its network, subnet,
    IPs or container names would collide with another agent's on this host: two agents
    reconciling one set of containers destroy each other's work. The check needs the
    state file's container names, so an unreadable file at start-up is an error too
    (its message says why); later, a garbled file only pauses reconciling."""
    # read(), not fetch(): the error raised here is the one line; fetch() would log it too.
    problems = podman.collisions(config.container_subnet, source.read().containers)
    if problems:
        raise PodmanError(
            f"standalone agent refuses to start: it would collide with another agent on this host: {'; '.join(problems)}. "
            f"Choose another subnetId in {state_file} or another network_name, or stop the other agent"
        )


def prepare_host(components: Components) -> None:
    """Start-up work whose failure is logged, not fatal: the network, the config services."""
    config = components.config
    components.podman.remove_stale_env_files(older_than=0)
    try:
        components.podman.ensure_network(config.container_subnet, config.container_gateway)
    except Exception as exc:  # noqa: BLE001
        log.warning("cannot ensure podman network %s: %s", components.podman.options.network, exc)
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
    observer = components.observer
    if isinstance(observer, Publisher):
        tasks.append(("status", observer.run))
        if any(sync.name == "wireguard" for sync in components.syncs):
            observer.watch_wireguard(settings)
        if settings.metrics_address is not None:
            from agent.metrics import MetricsServer

            tasks.append(("metrics", MetricsServer(settings.metrics_address, observer).run))
    if components.image_gc is not None:
        tasks.append(("images", components.image_gc.run))
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
        queue.observer = observer
        components.reconciler.stopped_deployments = queue.stopped_deployments
        tasks.append(("workqueue", queue.run))
        from agent.builds import BuildWorker

        assert components.identity is not None
        worker = BuildWorker(settings, components.client, components.identity.config.encryption_key)
        worker.observer = observer
        tasks.append(("builds", worker.run))
    if settings.logs_endpoint:
        from agent.logship.shipper import LogShipper

        shipper = LogShipper(settings, components.podman)
        observer.watch_logs(shipper)
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


def run_agent(
    settings: Settings, stop: threading.Event | None = None, reload: Callable[[], Settings] | None = None
) -> int:
    """Run until `stop` (SIGTERM/SIGINT). `reload` re-reads the configuration on SIGHUP
    (`--config`, environment and flags, as at start)."""
    stop = stop or threading.Event()
    malloc.limit_arenas()  # before any thread starts: see agent/malloc.py
    lock = hold_lock(settings.data_dir)
    previous = install_signal_handlers(stop, Reloader(settings, reload))
    try:
        return _run(settings, stop)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        lock.close()


def _run(settings: Settings, stop: threading.Event) -> int:
    public_ip = status.PublicIp(settings.public_ip, "" if settings.standalone else settings.public_ip_url)
    components = assemble(settings, public_ip)
    if isinstance(components.source, ControlPlaneSource):
        components.source.deadline = settings.poll_deadline
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
    from agent.upgrade import HealthMarker

    # `agent upgrade` commits a new build once this marker names the unit's main process.
    marker = HealthMarker(settings.data_dir, components.reconciler)
    trim = malloc.Trimmer()

    def after_tick() -> None:
        marker()
        trim()  # the pass's podman JSON is garbage by now: its heap pages go back (agent/malloc.py)

    components.reconciler.run(stop, on_tick=after_tick)
    sdnotify.notify("STOPPING=1")
    for thread in threads:
        thread.join(timeout=15)
    log.info("agent stopped; containers keep running")
    return 0


def restore_from_cache(components: Components, stop: threading.Event, deadline: float = RESTORE_DEADLINE) -> None:
    """Unless a fresh expected state can be had within `deadline` seconds of start, bring
    back the workloads the cached one lists (start or create only, never remove). Any
    failure counts: unreachable, hanging, 5xx, a 401 from a clock that is off after a
    reboot, a 404, an answer that is not a valid document."""
    source = components.source
    if not isinstance(source, ControlPlaneSource) or components.client is None:
        return
    try:
        source.fetch(deadline=min(deadline, source.deadline or deadline), keep=True)  # also the first tick's
        return
    except Exception as exc:  # noqa: BLE001 - whatever the reason, the workloads come back
        reason = exc
    cached = source.cached()
    if cached is None:
        log.warning("no expected state at start (%s) and none cached; waiting for the control plane", reason)
        return
    log.warning("no expected state at start (%s); restoring workloads from the cached expected state", reason)
    components.reconciler.last_good = cached
    components.reconciler.process(cached, stop, only=RESTORE_KINDS)


class Reloader:
    """SIGHUP: re-read the configuration, apply what can change at run time (RELOADABLE),
    name what needs a restart. A configuration that cannot be read keeps the old settings."""

    def __init__(self, settings: Settings, reload: Callable[[], Settings] | None) -> None:
        self.settings = settings
        self.reload = reload
        self._lock = threading.Lock()  # two quick SIGHUPs run one after the other

    def __call__(self) -> None:
        with self._lock:
            self._reload()

    def _reload(self) -> None:
        if self.reload is None:
            log.info("SIGHUP: no configuration to re-read; nothing changed")
            return
        try:
            fresh = self.reload()
        except Exception as exc:  # noqa: BLE001 - a bad file must not stop the agent
            log.error("SIGHUP: keeping the current settings; the configuration cannot be used: %s", exc)
            return
        changed = [
            f.name
            for f in dataclasses.fields(Settings)
            # Secrets are compared by nobody: the token left the environment after start.
            if f.repr and getattr(fresh, f.name) != getattr(self.settings, f.name)
        ]
        applied = [name for name in changed if name in RELOADABLE]
        later = [name for name in changed if name not in RELOADABLE]
        if "log_level" in applied:
            logging.getLogger().setLevel(getattr(logging, fresh.log_level.upper(), logging.INFO))
        self.settings = dataclasses.replace(self.settings, **{name: getattr(fresh, name) for name in applied})
        if not changed:
            log.info("SIGHUP: configuration re-read; nothing changed")
            return
        log.info(
            "SIGHUP: configuration re-read; applied: %s; needs a restart: %s",
            ", ".join(f"{name}={getattr(fresh, name)!r}" for name in applied) or "nothing",
            ", ".join(later) or "nothing",
        )


def install_signal_handlers(stop: threading.Event, reloader: Callable[[], None] | None = None) -> dict[int, Any]:
    """SIGTERM/SIGINT end the loop after the current step; SIGHUP re-reads the
    configuration (`reloader`) and never ends the agent. Returns the handlers replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, _frame: Any) -> None:
        log.info("received %s; finishing the current step and stopping", signal.Signals(signum).name)
        stop.set()

    def hangup(_signum: int, _frame: Any) -> None:
        # On a thread: the main thread may be anywhere (holding a lock, mid-write).
        threading.Thread(target=reloader or (lambda: None), name="sighup", daemon=True).start()

    previous: dict[int, Any] = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, handler)
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, hangup)
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

