"""Key material and the three pieces of cryptography the protocol uses (PROTOCOL.md §3).

Ed25519 request signatures, WireGuard (X25519) key pairs without `wg`, and AES-256-GCM
decryption of the control plane's secrets (wire format IV || TAG || CIPHERTEXT).
They run on the libcrypto that `ssl` already loaded (agent.libcrypto), so an idle agent does
not carry the `cryptography` package (~7 MB RSS); that package is the fallback when libcrypto
is unusable, and still does what only tests and the fake control plane need (encrypt_secret).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import logging
import os
from typing import Protocol

from agent import libcrypto

log = logging.getLogger(__name__)


class SecretError(ValueError):
    """A secret could not be decrypted (wrong key, corrupt blob)."""


class Backend(Protocol):
    def ed25519_public(self, seed: bytes) -> bytes: ...

    def ed25519_sign(self, seed: bytes, message: bytes) -> bytes: ...

    def x25519_public(self, private: bytes) -> bytes: ...

    def aes256gcm_decrypt(self, key: bytes, iv: bytes, ciphertext: bytes, tag: bytes) -> bytes | None: ...


class PycaBackend:
    """The same primitives through the `cryptography` package, imported only when used."""

    def ed25519_public(self, seed: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def ed25519_sign(self, seed: bytes, message: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(seed).sign(message)

    def x25519_public(self, private: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def aes256gcm_decrypt(self, key: bytes, iv: bytes, ciphertext: bytes, tag: bytes) -> bytes | None:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        try:
            return AESGCM(key).decrypt(iv, ciphertext + tag, None)
        except InvalidTag:
            return None


@functools.lru_cache(maxsize=1)
def backend() -> Backend:
    """libcrypto when it loads and passes its self-test (checked once, at first use), else pyca."""
    binding, reason = libcrypto.load()
    if binding is not None:
        return binding
    log.warning("using the cryptography package instead of libcrypto: %s", reason)
    return PycaBackend()


# --- Ed25519 signing key ---------------------------------------------------------------


class SigningKey:
    """An Ed25519 private key: the 32-byte seed and its public key (never shown in repr)."""

    __slots__ = ("_public", "_seed")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
        self._seed = bytes(seed)
        self._public = backend().ed25519_public(self._seed)

    def seed(self) -> bytes:
        return self._seed

    def public_bytes(self) -> bytes:
        return self._public

    def sign(self, message: bytes) -> bytes:
        return backend().ed25519_sign(self._seed, message)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SigningKey) and hmac.compare_digest(self._seed, other._seed)

    def __hash__(self) -> int:
        return hash(self._public)

    def __repr__(self) -> str:
        return f"SigningKey(public={base64.b64encode(self._public).decode()})"


def new_signing_key() -> SigningKey:
    # An Ed25519 private key is 32 random bytes (RFC 8032 §5.1.5), as cryptography's generate().
    return SigningKey(os.urandom(32))


def signing_key_from_file_bytes(data: bytes) -> SigningKey:
    """Load `keys/private.key`: Go's layout is seed(32) || public(32); a bare seed also works."""
    if len(data) not in (32, 64):
        raise ValueError(f"private.key must hold 64 raw bytes (seed || public key), found {len(data)}")
    key = SigningKey(data[:32])
    if len(data) == 64 and key.public_bytes() != data[32:]:
        raise ValueError("private.key is inconsistent: its public half does not match its seed")
    return key


def signing_key_file_bytes(key: SigningKey) -> bytes:
    return key.seed() + key.public_bytes()


def public_key_bytes(key: SigningKey) -> bytes:
    return key.public_bytes()


def public_key_b64(key: SigningKey) -> str:
    return base64.b64encode(key.public_bytes()).decode()


def sign(key: SigningKey, message: bytes) -> str:
    """Std-base64 Ed25519 signature, as the control plane expects in `x-signature`."""
    return base64.b64encode(key.sign(message)).decode()


# --- WireGuard keys ----------------------------------------------------------------------


def new_wireguard_private_key() -> str:
    """Same format as `wg genkey`: std base64 of a clamped 32-byte Curve25519 scalar."""
    raw = bytearray(os.urandom(32))
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return base64.b64encode(bytes(raw)).decode()


def wireguard_public_key(private_b64: str) -> str:
    """Same as `wg pubkey`."""
    raw = decode_wireguard_key(private_b64)
    return base64.b64encode(backend().x25519_public(raw)).decode()


def decode_wireguard_key(value: str) -> bytes:
    """Decode a 44-char std-base64 WireGuard key, rejecting anything else."""
    text = value.strip()
    if len(text) != 44 or not text.endswith("="):
        raise ValueError("a WireGuard key is 44 characters of standard base64")
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"a WireGuard key must be standard base64 ({exc})") from exc
    if len(raw) != 32:
        raise ValueError("a WireGuard key must decode to 32 bytes")
    return raw


# --- AES-256-GCM secrets ------------------------------------------------------------------


def parse_encryption_key(hex_key: str) -> bytes:
    try:
        key = bytes.fromhex(hex_key)
    except ValueError as exc:
        raise SecretError("the encryption key is not hex") from exc
    if len(key) != 32:
        raise SecretError(f"the encryption key must be 32 bytes (64 hex chars), got {len(key)} bytes")
    return key


def decrypt_secret(hex_key: str, blob_b64: str) -> str:
    """Decrypt one value of `env` / `secrets`: std_base64(IV[12] || TAG[16] || CT)."""
    key = parse_encryption_key(hex_key)
    try:
        blob = base64.b64decode(blob_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SecretError("encrypted value is not valid base64") from exc
    if len(blob) < 28:
        raise SecretError("encrypted value is too short (under 28 bytes)")
    iv, tag, ciphertext = blob[:12], blob[12:28], blob[28:]
    plain = backend().aes256gcm_decrypt(key, iv, ciphertext, tag)
    if plain is None:
        raise SecretError("encrypted value does not decrypt with this server's key")
    try:
        return plain.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SecretError("decrypted value is not UTF-8 text") from exc


def encrypt_secret(hex_key: str, plaintext: str, iv: bytes | None = None) -> str:
    """The control plane's side of `decrypt_secret`; used by tests, the fake CP and examples."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # not on the agent's own path

    key = parse_encryption_key(hex_key)
    nonce = iv if iv is not None else os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, plaintext.encode("utf-8"), None)
    ciphertext, tag = sealed[:-16], sealed[-16:]
    return base64.b64encode(nonce + tag + ciphertext).decode()
