"""Ed25519, X25519 and AES-256-GCM through the libcrypto that `ssl` already mapped, via ctypes.

Why: the `cryptography` package costs ~7 MB of RSS in every agent for three small operations,
while OpenSSL's libcrypto is in the process anyway (Python's `ssl` links it). `load()` finds the
mapped library in /proc/self/maps (ctypes.util.find_library would start processes), binds the
few functions the protocol needs and checks them against RFC 8032, RFC 7748 and an AES-GCM
vector; when anything is missing or wrong it returns None with the reason, and agent.crypto
falls back to `cryptography`. Every EVP object is freed before a call returns.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_EVP_PKEY_X25519 = 1034
_EVP_PKEY_ED25519 = 1087
_EVP_CTRL_GCM_SET_IVLEN = 0x9
_EVP_CTRL_GCM_SET_TAG = 0x11
# EVP_DecryptUpdate takes an int length; secrets are far smaller (responses are bounded anyway).
_MAX_CIPHERTEXT = 1 << 30

_c_void_p, _c_char_p, _c_int, _c_size_t = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "EVP_PKEY_new_raw_private_key": (_c_void_p, [_c_int, _c_void_p, _c_char_p, _c_size_t]),
    "EVP_PKEY_get_raw_public_key": (_c_int, [_c_void_p, _c_char_p, ctypes.POINTER(_c_size_t)]),
    "EVP_PKEY_free": (None, [_c_void_p]),
    "EVP_MD_CTX_new": (_c_void_p, []),
    "EVP_MD_CTX_free": (None, [_c_void_p]),
    "EVP_DigestSignInit": (_c_int, [_c_void_p, _c_void_p, _c_void_p, _c_void_p, _c_void_p]),
    "EVP_DigestSign": (_c_int, [_c_void_p, _c_char_p, ctypes.POINTER(_c_size_t), _c_char_p, _c_size_t]),
    "EVP_CIPHER_CTX_new": (_c_void_p, []),
    "EVP_CIPHER_CTX_free": (None, [_c_void_p]),
    "EVP_CIPHER_CTX_ctrl": (_c_int, [_c_void_p, _c_int, _c_int, _c_char_p]),
    "EVP_aes_256_gcm": (_c_void_p, []),
    "EVP_DecryptInit_ex": (_c_int, [_c_void_p, _c_void_p, _c_void_p, _c_char_p, _c_char_p]),
    "EVP_DecryptUpdate": (_c_int, [_c_void_p, _c_char_p, ctypes.POINTER(_c_int), _c_char_p, _c_int]),
    "EVP_DecryptFinal_ex": (_c_int, [_c_void_p, _c_char_p, ctypes.POINTER(_c_int)]),
    "ERR_clear_error": (None, []),
}


class LibCryptoError(RuntimeError):
    """libcrypto refused an operation that cannot fail on good input (e.g. out of memory)."""


def mapped_libcrypto(maps: str) -> str:
    """The path of the libcrypto mapped into this process (/proc/self/maps text), or ''."""
    for line in maps.splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and not fields[5].endswith("(deleted)"):
            path = fields[5].strip()
            if os.path.basename(path).startswith("libcrypto.so"):
                return path
    return ""


class LibCrypto:
    """The protocol's three primitives over one libcrypto handle; thread-safe (no shared EVP state)."""

    def __init__(self, lib: Any) -> None:
        for name, (restype, argtypes) in _SIGNATURES.items():
            function = getattr(lib, name)  # AttributeError: an OpenSSL too old for raw keys
            function.restype = restype
            function.argtypes = argtypes
        self._lib = lib

    def _fail(self, what: str) -> LibCryptoError:
        self._lib.ERR_clear_error()  # a stale error would confuse the next user of this thread's queue
        return LibCryptoError(f"libcrypto: {what} failed")

    def _raw_public(self, kind: int, private: bytes) -> bytes:
        lib = self._lib
        pkey = lib.EVP_PKEY_new_raw_private_key(kind, None, private, len(private))
        if not pkey:
            raise self._fail("loading a raw private key")
        try:
            out = ctypes.create_string_buffer(32)
            size = _c_size_t(32)
            if lib.EVP_PKEY_get_raw_public_key(pkey, out, ctypes.byref(size)) != 1 or size.value != 32:
                raise self._fail("deriving the public key")
            return out.raw
        finally:
            lib.EVP_PKEY_free(pkey)

    def ed25519_public(self, seed: bytes) -> bytes:
        return self._raw_public(_EVP_PKEY_ED25519, seed)

    def x25519_public(self, private: bytes) -> bytes:
        return self._raw_public(_EVP_PKEY_X25519, private)

    def ed25519_sign(self, seed: bytes, message: bytes) -> bytes:
        lib = self._lib
        pkey = lib.EVP_PKEY_new_raw_private_key(_EVP_PKEY_ED25519, None, seed, len(seed))
        if not pkey:
            raise self._fail("loading the Ed25519 seed")
        try:
            ctx = lib.EVP_MD_CTX_new()
            if not ctx:
                raise self._fail("EVP_MD_CTX_new")
            try:
                signature = ctypes.create_string_buffer(64)
                size = _c_size_t(64)
                if (
                    lib.EVP_DigestSignInit(ctx, None, None, None, pkey) != 1
                    or lib.EVP_DigestSign(ctx, signature, ctypes.byref(size), message, len(message)) != 1
                    or size.value != 64
                ):
                    raise self._fail("Ed25519 signing")
                return signature.raw
            finally:
                lib.EVP_MD_CTX_free(ctx)
        finally:
            lib.EVP_PKEY_free(pkey)

    def aes256gcm_decrypt(self, key: bytes, iv: bytes, ciphertext: bytes, tag: bytes) -> bytes | None:
        """The plaintext, or None when the tag does not match (wrong key or tampered data)."""
        if len(key) != 32 or len(tag) != 16 or not iv or len(ciphertext) > _MAX_CIPHERTEXT:
            raise ValueError("AES-256-GCM needs a 32-byte key, a nonce, a 16-byte tag and under 1 GiB")
        lib = self._lib
        ctx = lib.EVP_CIPHER_CTX_new()
        if not ctx:
            raise self._fail("EVP_CIPHER_CTX_new")
        try:
            out = ctypes.create_string_buffer(len(ciphertext) + 16)
            written = _c_int(0)
            if (
                lib.EVP_DecryptInit_ex(ctx, lib.EVP_aes_256_gcm(), None, None, None) != 1
                or lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_SET_IVLEN, len(iv), None) != 1
                or lib.EVP_DecryptInit_ex(ctx, None, None, key, iv) != 1
                or (ciphertext and lib.EVP_DecryptUpdate(ctx, out, ctypes.byref(written), ciphertext, len(ciphertext)) != 1)
                or lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_SET_TAG, 16, tag) != 1
            ):
                raise self._fail("AES-256-GCM setup")
            # GCM is a stream mode: Final writes nothing, it only checks the tag.
            final = ctypes.create_string_buffer(16)
            final_written = _c_int(0)
            if lib.EVP_DecryptFinal_ex(ctx, final, ctypes.byref(final_written)) != 1:
                lib.ERR_clear_error()
                return None
            return out.raw[: written.value]
        finally:
            lib.EVP_CIPHER_CTX_free(ctx)


# RFC 8032 §7.1 TEST 2, RFC 7748 §6.1 (Alice), and PROTOCOL.md §3.4's secret vector.
_ED_SEED = bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
_ED_PUBLIC = bytes.fromhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
_ED_MESSAGE = bytes.fromhex("72")
_ED_SIGNATURE = bytes.fromhex(
    "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
    "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
)
_X_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
_X_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
_GCM_KEY = bytes(range(32))
_GCM_IV = bytes(range(12))
_GCM_TAG = bytes.fromhex("c0f93837207187d2bc090659885073d8")
_GCM_CIPHERTEXT = bytes.fromhex("3431b569f691ef6dec2de2ee")
_GCM_PLAIN = b"s3cr3t-value"


def self_test(binding: LibCrypto) -> str:
    """'' when the binding reproduces the published vectors and refuses a wrong tag, else why not."""
    checks: list[tuple[str, Callable[[], object], object]] = [
        ("Ed25519 public key (RFC 8032)", lambda: binding.ed25519_public(_ED_SEED), _ED_PUBLIC),
        ("Ed25519 signature (RFC 8032)", lambda: binding.ed25519_sign(_ED_SEED, _ED_MESSAGE), _ED_SIGNATURE),
        ("X25519 public key (RFC 7748)", lambda: binding.x25519_public(_X_PRIVATE), _X_PUBLIC),
        ("AES-256-GCM decryption", lambda: binding.aes256gcm_decrypt(_GCM_KEY, _GCM_IV, _GCM_CIPHERTEXT, _GCM_TAG), _GCM_PLAIN),
        (
            "AES-256-GCM tag check",
            lambda: binding.aes256gcm_decrypt(_GCM_KEY, _GCM_IV, _GCM_CIPHERTEXT, bytes([_GCM_TAG[0] ^ 1]) + _GCM_TAG[1:]),
            None,
        ),
    ]
    for name, run, expected in checks:
        try:
            got = run()
        except (LibCryptoError, ValueError, OSError, ctypes.ArgumentError) as exc:
            return f"{name}: {exc}"
        if got != expected:
            return f"{name} does not match the published vector"
    return ""


def load(maps_path: str = "/proc/self/maps") -> tuple[LibCrypto | None, str]:
    """(binding, '') when the mapped libcrypto works, else (None, why not)."""
    import ssl  # noqa: F401 - maps libcrypto (urllib3 has already imported it in the agent)

    try:
        with open(maps_path, encoding="utf-8", errors="replace") as maps:
            path = mapped_libcrypto(maps.read())
    except OSError as exc:
        return None, f"cannot read {maps_path}: {exc.strerror}"
    if not path:
        return None, "no libcrypto is mapped into this process (ssl is linked statically?)"
    try:
        binding = LibCrypto(ctypes.CDLL(path))
    except (OSError, AttributeError) as exc:
        return None, f"{path}: {exc}"
    failure = self_test(binding)
    if failure:
        return None, f"{path} fails its self-test: {failure}"
    return binding, ""
