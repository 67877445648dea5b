"""The agent's identity in the data dir: signing keys, WireGuard key and config.json.

Layout and formats are PROTOCOL.md §2, so a data dir written by the original Go agent
loads unchanged. "Registered" means `keys/private.key` exists. Registration commits
nothing until the control plane has answered 200, and commits `keys/` last, so a failed or
interrupted attempt leaves the dir unregistered and can be retried with the same token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from agent import crypto
from agent.fsutil import atomic_write, ensure_dir

log = logging.getLogger(__name__)


class IdentityError(RuntimeError):
    """The data dir is unusable; the message says what to do."""


def standalone_owner(data_dir: Path) -> str:
    """A standalone agent's owner mark, derived from its data dir (absolute, symlinks
    resolved): the one-agent lock is per data dir, so one mark per live agent. Hashed to
    fit a label value whatever the path holds."""
    digest = hashlib.sha256(os.path.realpath(data_dir).encode()).hexdigest()
    return f"standalone-{digest[:16]}"


@dataclass(frozen=True)
class AgentConfig:
    server_id: str
    subnet_id: int
    wireguard_ip: str
    encryption_key: str = field(default="", repr=False)

    def to_json(self) -> str:
        # Go's MarshalIndent(…, "", "  "): this key order, 2-space indent, no trailing newline.
        return json.dumps(
            {
                "serverId": self.server_id,
                "subnetId": self.subnet_id,
                "wireguardIp": self.wireguard_ip,
                "encryptionKey": self.encryption_key,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, data: Any, source: str) -> AgentConfig:
        if not isinstance(data, dict):
            raise IdentityError(f"{source}: expected a JSON object")
        server_id = data.get("serverId") or ""
        subnet_id = data.get("subnetId") or 0
        wireguard_ip = data.get("wireguardIp") or ""
        encryption_key = data.get("encryptionKey") or ""
        if not isinstance(server_id, str) or not server_id:
            raise IdentityError(f"{source}: serverId is missing")
        if len(server_id) > 256 or not all("!" <= ch <= "~" for ch in server_id):
            # It is sent as the x-server-id header: printable ASCII without spaces only.
            raise IdentityError(f"{source}: serverId must be printable ASCII without spaces, got {server_id[:40]!r}")
        if isinstance(subnet_id, bool) or not isinstance(subnet_id, int) or not 1 <= subnet_id <= 255:
            raise IdentityError(f"{source}: subnetId must be an integer 1..255, got {subnet_id!r}")
        if not isinstance(wireguard_ip, str) or not isinstance(encryption_key, str):
            raise IdentityError(f"{source}: wireguardIp and encryptionKey must be strings")
        if encryption_key:
            try:
                crypto.parse_encryption_key(encryption_key)
            except crypto.SecretError as exc:
                # Kept as received (the Go agent does the same): only secrets fail, later.
                log.warning("%s: %s; encrypted environment variables will fail to decrypt", source, exc)
        return cls(server_id, subnet_id, wireguard_ip, encryption_key)

    @property
    def container_subnet(self) -> str:
        return f"10.200.{self.subnet_id}.0/24"

    @property
    def container_gateway(self) -> str:
        return f"10.200.{self.subnet_id}.1"


@dataclass(frozen=True)
class Identity:
    signing_key: crypto.SigningKey = field(repr=False)
    wireguard_private_key: str = field(repr=False)
    config: AgentConfig

    @property
    def wireguard_public_key(self) -> str:
        return crypto.wireguard_public_key(self.wireguard_private_key)


@dataclass(frozen=True)
class PendingKeys:
    """Keys generated for a registration attempt, not yet on disk."""

    signing_key: crypto.SigningKey = field(repr=False)
    wireguard_private_key: str = field(repr=False)

    @classmethod
    def generate(cls) -> PendingKeys:
        return cls(crypto.new_signing_key(), crypto.new_wireguard_private_key())

    def request_body(self, token: str, public_ip: str) -> dict[str, str]:
        body = {
            "token": token,
            "wireguardPublicKey": crypto.wireguard_public_key(self.wireguard_private_key),
            "signingPublicKey": crypto.public_key_b64(self.signing_key),
        }
        if public_ip:
            body["publicIp"] = public_ip
        return body


class DataDir:
    """Paths and reads/writes of the data dir."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def private_key(self) -> Path:
        return self.root / "keys" / "private.key"

    @property
    def public_key(self) -> Path:
        return self.root / "keys" / "public.key"

    @property
    def wireguard_key(self) -> Path:
        return self.root / "wireguard.key"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    def ensure(self) -> None:
        if not self.root.exists():
            ensure_dir(self.root, 0o700)

    def is_registered(self) -> bool:
        return self.private_key.exists()

    def load(self) -> Identity:
        try:
            key_bytes = self.private_key.read_bytes()
        except FileNotFoundError as exc:
            raise IdentityError(f"{self.private_key} is missing: this server is not registered yet (run with --token)") from exc
        except OSError as exc:
            raise IdentityError(f"cannot read {self.private_key}: {exc.strerror}") from exc
        try:
            signing_key = crypto.signing_key_from_file_bytes(key_bytes)
        except ValueError as exc:
            raise IdentityError(f"{self.private_key}: {exc}") from exc
        try:
            wireguard_private = self.wireguard_key.read_text(encoding="utf-8").strip()
            crypto.decode_wireguard_key(wireguard_private)
        except FileNotFoundError as exc:
            raise IdentityError(f"{self.wireguard_key} is missing") from exc
        except ValueError as exc:
            raise IdentityError(f"{self.wireguard_key}: {exc}") from exc
        try:
            raw = json.loads(self.config.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise IdentityError(
                f"{self.config} is missing although {self.private_key} exists; "
                f"move {self.root / 'keys'} away and register again with a new token"
            ) from exc
        except json.JSONDecodeError as exc:
            raise IdentityError(f"{self.config} is not valid JSON: {exc}") from exc
        return Identity(signing_key, wireguard_private, AgentConfig.from_json(raw, str(self.config)))

    def commit_registration(self, keys: PendingKeys, config: AgentConfig) -> Identity:
        """Write everything the control plane just accepted; `keys/` is renamed into place last."""
        self.ensure()
        atomic_write(self.wireguard_key, keys.wireguard_private_key, 0o600)
        atomic_write(self.config, config.to_json(), 0o600)
        staging = self.root / ".keys.new"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        atomic_write(staging / "private.key", crypto.signing_key_file_bytes(keys.signing_key), 0o600)
        atomic_write(staging / "public.key", crypto.public_key_bytes(keys.signing_key), 0o644)
        keys_dir = self.root / "keys"
        if keys_dir.exists():
            # Only reachable when keys/ exists without private.key (a broken earlier state).
            shutil.rmtree(keys_dir)
        os.rename(staging, keys_dir)
        log.info("registered as server %s (subnet %d, WireGuard IP %s)", config.server_id, config.subnet_id, config.wireguard_ip)
        return Identity(keys.signing_key, keys.wireguard_private_key, config)
