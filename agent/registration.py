"""First start: register with the control plane using the one-time token (PROTOCOL.md §4).

Keys are generated in memory and committed to the data dir only after the control plane
answered 200, so a refused or interrupted attempt leaves nothing behind and the same
token can simply be used again. The token is never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from agent.api import ApiError, ControlPlane
from agent.identity import AgentConfig, DataDir, Identity, IdentityError, PendingKeys
from agent.model import ModelError, WireGuardPeer, parse_expected_state
from agent.problems import ProblemLog
from agent.settings import Settings

log = logging.getLogger(__name__)


class RegistrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Registration:
    identity: Identity
    # Peers from the registration answer; None when the agent was already registered.
    initial_peers: tuple[WireGuardPeer, ...] | None = None


def ensure_registered(
    settings: Settings, data_dir: DataDir, client: ControlPlane, public_ip: str | Callable[[], str]
) -> Registration:
    """Load the identity, or register with the token; `public_ip` may be a callable so that
    the lookup only happens when a registration is really about to be sent."""
    if data_dir.is_registered():
        return Registration(data_dir.load())
    token = settings.resolved_token()
    if not token:
        raise RegistrationError(
            f"this server is not registered yet ({data_dir.private_key} is missing): "
            "pass the one-time token with --token, --token-file or TECHULUS_AGENT_TOKEN"
        )
    keys = PendingKeys.generate()
    log.info("registering with %s", settings.url)
    address = public_ip() if callable(public_ip) else public_ip
    try:
        answer = client.register(keys.request_body(token, address))
    except ApiError as exc:
        raise RegistrationError(f"registration failed, nothing was written; fix the cause and retry: {exc}") from exc
    try:
        config = AgentConfig.from_json(
            {
                "serverId": answer.get("serverId"),
                "subnetId": answer.get("subnetId"),
                "wireguardIp": answer.get("wireguardIp"),
                "encryptionKey": answer.get("encryptionKey") or "",
            },
            "registration answer",
        )
        parsed = parse_expected_state({"wireguard": {"peers": answer.get("peers") or []}}, None)
        ProblemLog(log, "registration answer").report(parsed.problems, parsed.problem_count)
        peers = parsed.wireguard_peers
    except (IdentityError, ModelError) as exc:
        raise RegistrationError(f"the control plane's registration answer is unusable: {exc}") from exc
    data_dir.ensure()
    identity = data_dir.commit_registration(keys, config)
    return Registration(identity, tuple(peers))
