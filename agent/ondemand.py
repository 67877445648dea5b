"""Standalone mode touches dnsmasq and Caddy only once its state file asks for them.

A registered agent manages DNS and Caddy from its first pass: its server was installed
with both. A standalone agent runs where neither may be installed (the README's first
command) or beside a registered agent that manages them, so for a state file that lists
no record (no route) it must write no drop-in, restart no dnsmasq and call no admin API.
`OnDemand` wraps such an adapter and keeps it dormant, its live side counting as empty,
until the state lists an entry for it, or until the adapter finds configuration of its
own owner left there by an earlier run (which the file may no longer list: then it is
removed like any other drift). Once active it stays active for the life of the agent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from agent.configsync import ConfigSync
from agent.drift import EMPTY_HASH
from agent.model import ExpectedState

log = logging.getLogger(__name__)


class OwnedConfigSync(ConfigSync, Protocol):
    def owns_configuration(self) -> bool:
        """Whether configuration of this agent's owner exists there (never raises)."""

    def remove_own(self) -> bool:
        """Remove the configuration of this agent's owner; True when there was some."""


class OnDemand:
    """A ConfigSync that is dormant until needed (see the module docstring)."""

    def __init__(self, inner: OwnedConfigSync, on_activate: Callable[[], None] | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.on_activate = on_activate
        self.active = False
        self._prepared = False
        # Whether the tool was asked for configuration of ours (None: not yet), and its answer.
        self._found: bool | None = None

    def prepare(self) -> None:
        self._found = self.inner.owns_configuration()
        if self._found:
            self._activate("configuration of this agent from an earlier run is there")
            self._prepare()
        else:
            log.debug("%s: dormant until the state file lists an entry for it", self.name)

    def expected_hash(self, state: ExpectedState) -> str:
        wanted = self.inner.expected_hash(state)
        if wanted != EMPTY_HASH:
            self._activate("the state file lists entries for it")
        return wanted

    def actual_hash(self) -> str:
        if self._found is None:
            # `agent plan` never prepares: look (reading only) whether ours is there.
            self._found = self.inner.owns_configuration()
        # Nothing of ours there and not used yet: the live side is empty, and reading it
        # would only report our missing drop-in as a problem.
        return self.inner.actual_hash() if self._prepared or self._found else EMPTY_HASH

    def apply(self, state: ExpectedState) -> None:
        self._activate("the state file lists entries for it")
        self._prepare()
        self.inner.apply(state)

    def remove_own(self) -> bool:
        return self.inner.remove_own()

    def _activate(self, why: str) -> None:
        if self.active:
            return
        self.active = True
        log.info("%s: managed from now on (%s)", self.name, why)
        if self.on_activate is not None:
            self.on_activate()

    def _prepare(self) -> None:
        """The adapter's start-up work, once, just before its first use; a failure is
        logged and the apply that follows says what is wrong."""
        if self._prepared:
            return
        self._prepared = True
        try:
            self.inner.prepare()
        except Exception as exc:  # noqa: BLE001 - as prepare_host does at start
            log.warning("%s: preparation failed: %s", self.name, exc)
