"""`agent standalone --down FILE`: removes what a standalone agent created on this host.

A newcomer who stops the example must be able to undo it with one command: the agent's
containers, its podman network, its dnsmasq files and Caddy routes (when its state file
listed any) and, with `--purge`, its data dir. It goes through the
Podman adapter, so it touches exactly what the agent itself would consider its own (labels,
scope and owner marks), and it refuses while an agent runs with the same data dir (that
agent would re-create everything on its next tick).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import IO

from agent.host.images import LEDGER_FILE, ImageLedger
from agent.host.podman import Podman
from agent.identity import AgentConfig, DataDir, IdentityError
from agent.model import ModelError
from agent.runtime import hold_lock, podman_options, remove_standalone_config, standalone_config
from agent.settings import Settings

log = logging.getLogger(__name__)


def standalone_down(settings: Settings, purge: bool = False) -> int:
    """Remove the standalone agent's containers and network (and data dir if `purge`).
    Raises AlreadyRunning while an agent holds the data dir, PodmanError when podman
    refuses (e.g. a container that is not ours still uses the network)."""
    data_dir = settings.data_dir
    lock: IO[str] | None = hold_lock(data_dir) if data_dir.exists() else None
    try:
        config = _config(settings)
        podman = Podman(podman_options(settings, config, ()))
        containers = podman.list_containers()
        for container in containers:
            podman.force_remove(container.id)
            log.info("removed container %s (%s)", container.name, container.id[:12])
        network = podman.options.network
        if not podman.remove_network():
            log.info("podman network %s not removed (it does not exist or is not this agent's)", network)
        podman.remove_stale_env_files(older_than=0)
        remove_standalone_config(settings, config)  # its dnsmasq files and Caddy routes
        if purge and data_dir.exists():
            _remove_images(podman, data_dir)
            shutil.rmtree(data_dir)
            log.info("removed data dir %s", data_dir)
        elif data_dir.exists():
            log.info("kept data dir %s (volumes, cursors); add --purge to remove it too", data_dir)
    finally:
        if lock is not None:
            lock.close()
    log.info("down: removed %d container(s); nothing of this standalone agent runs any more", len(containers))
    return 0


def _remove_images(podman: Podman, data_dir: Path) -> None:
    """The images the agent's ledger owns (it pulled them; an image it only ran, e.g. the
    operator's own build, is not its to remove); podman keeps one another container uses."""
    ledger = ImageLedger(data_dir / LEDGER_FILE)
    for reference in sorted(ledger.pulled()):
        if podman.remove_image(reference):
            log.info("removed image %s", reference)


def _config(settings: Settings) -> AgentConfig:
    """The state file's identity; an unreadable file must not keep its containers alive.
    A registered agent's (`agent purge`, agent/uninstall.py) is its own config.json."""
    if not settings.standalone:
        return DataDir(settings.data_dir).load().config
    try:
        return standalone_config(settings)
    except (ModelError, IdentityError) as exc:
        log.warning("%s; removing the containers anyway", exc)
        return AgentConfig("standalone", 1, "127.0.0.1")
