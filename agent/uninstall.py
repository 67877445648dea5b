"""`agent purge --yes`: removes what a registered agent made on this host, for `install.sh --uninstall --purge`.

An operator who retires a worker must be able to take the agent's workloads off it with one
command, and nothing else's. It takes the same path as `agent standalone --down --purge`
(agent/teardown.py): the Podman adapter with this server's owner mark, so only containers,
the network and pulled images that the agent itself would consider its own go; then the
data dir (keys, volumes). It refuses while the agent runs (stop the unit first).
"""

from __future__ import annotations

import logging
import shutil

from agent.identity import DataDir, IdentityError
from agent.runtime import hold_lock
from agent.settings import Settings
from agent.teardown import standalone_down

log = logging.getLogger(__name__)


def purge(settings: Settings) -> int:
    data_dir = DataDir(settings.data_dir)
    try:
        registered = data_dir.is_registered() and bool(data_dir.load())
    except IdentityError as exc:
        log.warning("%s; without the server id no container can be proven ours: only the data dir goes", exc)
        registered = False
    if registered:
        return standalone_down(settings, purge=True)  # with the registered identity (its _config)
    # Never registered (or its identity is unreadable): without our server id nothing on
    # podman can be proven ours, and before registration the agent creates nothing there.
    if settings.data_dir.exists():
        lock = hold_lock(settings.data_dir)
        try:
            shutil.rmtree(settings.data_dir)
        finally:
            lock.close()
        log.info("removed data dir %s (not registered: no container, network or image is this agent's)", settings.data_dir)
    return 0
