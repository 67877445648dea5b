"""The contract between the reconcile loop and the three config adapters (DNS, Caddy, WireGuard).

Each adapter reads the live state back and hashes it exactly as the expected side is
hashed (PROTOCOL.md §9.3.3-9.3.5), so drift is seen whenever the two differ, including
after a restart of the tool that lost our configuration.
"""

from __future__ import annotations

from typing import Protocol

from agent.model import ExpectedState


class ConfigSync(Protocol):
    #: "dns", "caddy" or "wireguard": names the drift kind and log lines.
    name: str

    def prepare(self) -> None:
        """Once at start and after registration: bring the service to a usable state
        (e.g. bring wg0 up after a reboot). Raises on failure; the caller logs it."""

    def expected_hash(self, state: ExpectedState) -> str:
        """Hash of what `state` asks for."""

    def actual_hash(self) -> str:
        """Hash of what is live now. Raises when the live state cannot be read."""

    def apply(self, state: ExpectedState) -> None:
        """Make the live state match `state`, verify it, raise with a clear message if not."""
