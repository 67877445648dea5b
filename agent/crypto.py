"""Key material and the three pieces of cryptography the protocol uses (PROTOCOL.md §3).

Ed25519 request signatures, WireGuard (X25519) key pairs without `wg`, and AES-256-GCM
decryption of the control plane's secrets (wire format IV || TAG || CIPHERTEXT).
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_RAW = serialization.Encoding.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_NO_ENC = serialization.NoEncryption()


class SecretError(ValueError):
    """A secret could not be decrypted (wrong key, corrupt blob)."""


# --- Ed25519 signing key ---------------------------------------------------------------


def new_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signing_key_from_file_bytes(data: bytes) -> Ed25519PrivateKey:
    """Load `keys/private.key`: Go's layout is seed(32) || public(32); a bare seed also works."""
    if len(data) not in (32, 64):
        raise ValueError(f"private.key must hold 64 raw bytes (seed || public key), found {len(data)}")
    key = Ed25519PrivateKey.from_private_bytes(data[:32])
    if len(data) == 64 and public_key_bytes(key) != data[32:]:
        raise ValueError("private.key is inconsistent: its public half does not match its seed")
    return key


def signing_key_file_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(_RAW, _RAW_PRIV, _NO_ENC) + public_key_bytes(key)


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(_RAW, _RAW_PUB)


def public_key_b64(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(public_key_bytes(key)).decode()


def sign(key: Ed25519PrivateKey, message: bytes) -> str:
    """Std-base64 Ed25519 signature, as the control plane expects in `x-signature`."""
    return base64.b64encode(key.sign(message)).decode()


# --- WireGuard keys ----------------------------------------------------------------------


def new_wireguard_private_key() -> str:
    """Same format as `wg genkey`: std base64 of a clamped 32-byte Curve25519 scalar."""
    raw = bytearray(X25519PrivateKey.generate().private_bytes(_RAW, _RAW_PRIV, _NO_ENC))
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return base64.b64encode(bytes(raw)).decode()


def wireguard_public_key(private_b64: str) -> str:
    """Same as `wg pubkey`."""
    raw = decode_wireguard_key(private_b64)
    public = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes(_RAW, _RAW_PUB)
    return base64.b64encode(public).decode()


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
    try:
        plain = AESGCM(key).decrypt(iv, ciphertext + tag, None)
    except InvalidTag as exc:
        raise SecretError("encrypted value does not decrypt with this server's key") from exc
    try:
        return plain.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SecretError("decrypted value is not UTF-8 text") from exc


def encrypt_secret(hex_key: str, plaintext: str, iv: bytes | None = None) -> str:
    """The control plane's side of `decrypt_secret`; used by tests, the fake CP and examples."""
    import os

    key = parse_encryption_key(hex_key)
    nonce = iv if iv is not None else os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, plaintext.encode("utf-8"), None)
    ciphertext, tag = sealed[:-16], sealed[-16:]
    return base64.b64encode(nonce + tag + ciphertext).decode()
