"""agent.libcrypto (ctypes over the mapped libcrypto) against the `cryptography` package, byte for byte,
and agent.crypto's fallback when the binding is unusable."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import crypto, libcrypto

REPO = Path(__file__).resolve().parents[1]
BINDING, REASON = libcrypto.load()
keys32 = st.binary(min_size=32, max_size=32)


@pytest.fixture(name="binding")
def _binding() -> libcrypto.LibCrypto:
    assert BINDING is not None, REASON  # the test machine's Python links libcrypto dynamically
    return BINDING


@settings(max_examples=200, deadline=None)
@given(seed=keys32, message=st.binary(max_size=2048))
def test_ed25519_matches_cryptography(seed, message):
    assert BINDING is not None, REASON
    reference = Ed25519PrivateKey.from_private_bytes(seed)
    assert BINDING.ed25519_public(seed) == reference.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert BINDING.ed25519_sign(seed, message) == reference.sign(message)
    assert crypto.PycaBackend().ed25519_sign(seed, message) == reference.sign(message)


@settings(max_examples=200, deadline=None)
@given(private=keys32)
def test_x25519_matches_cryptography(private):
    assert BINDING is not None, REASON
    expected = X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert BINDING.x25519_public(private) == expected
    assert crypto.PycaBackend().x25519_public(private) == expected


@settings(max_examples=200, deadline=None)
@given(key=keys32, iv=st.binary(min_size=12, max_size=12), plain=st.binary(max_size=4096), flip=st.integers(0, 127))
def test_aes_gcm_matches_cryptography_and_refuses_a_wrong_tag(key, iv, plain, flip):
    assert BINDING is not None, REASON
    sealed = AESGCM(key).encrypt(iv, plain, None)
    ciphertext, tag = sealed[:-16], sealed[-16:]
    assert BINDING.aes256gcm_decrypt(key, iv, ciphertext, tag) == plain
    bad_tag = bytearray(tag)
    bad_tag[flip // 8] ^= 1 << (flip % 8)
    assert BINDING.aes256gcm_decrypt(key, iv, ciphertext, bytes(bad_tag)) is None
    assert crypto.PycaBackend().aes256gcm_decrypt(key, iv, ciphertext, bytes(bad_tag)) is None
    other_key = bytes([key[0] ^ 0x80]) + key[1:]
    assert BINDING.aes256gcm_decrypt(other_key, iv, ciphertext, tag) is None
    if ciphertext:
        tampered = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
        assert BINDING.aes256gcm_decrypt(key, iv, tampered, tag) is None


def test_bad_arguments_are_refused_before_libcrypto(binding):
    with pytest.raises(ValueError, match="32-byte key"):
        binding.aes256gcm_decrypt(b"short", bytes(12), b"", bytes(16))
    with pytest.raises(ValueError, match="16-byte tag"):
        binding.aes256gcm_decrypt(bytes(32), bytes(12), b"", bytes(15))


def test_self_test_passes_on_this_libcrypto(binding):
    assert libcrypto.self_test(binding) == ""


class _WrongSignatures(libcrypto.LibCrypto):
    def ed25519_sign(self, seed: bytes, message: bytes) -> bytes:
        return bytes(64)


class _AcceptsAnyTag(libcrypto.LibCrypto):
    def aes256gcm_decrypt(self, key, iv, ciphertext, tag):
        return b"s3cr3t-value"


class _Raises(libcrypto.LibCrypto):
    def x25519_public(self, private: bytes) -> bytes:
        raise libcrypto.LibCryptoError("libcrypto: deriving the public key failed")


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        (_WrongSignatures, "Ed25519 signature (RFC 8032) does not match"),
        (_AcceptsAnyTag, "AES-256-GCM tag check does not match"),
        (_Raises, "X25519 public key (RFC 7748): libcrypto: deriving the public key failed"),
    ],
)
def test_self_test_names_what_is_wrong(binding, broken, reason):
    assert reason in libcrypto.self_test(broken(binding._lib))


def test_mapped_libcrypto_reads_proc_maps_lines():
    maps = (
        "7f00-7f01 r--p 00000000 fe:00 1 /usr/lib/x86_64-linux-gnu/libssl.so.3\n"
        "7f02-7f03 r--p 00000000 fe:00 2 /old/libcrypto.so.1.1 (deleted)\n"
        "7f04-7f05 r-xp 000c5000 fe:00 3   /usr/lib/x86_64-linux-gnu/libcrypto.so.3\n"
        "7f06-7f07 rw-p 00000000 00:00 0 \n"
    )
    assert libcrypto.mapped_libcrypto(maps) == "/usr/lib/x86_64-linux-gnu/libcrypto.so.3"
    assert libcrypto.mapped_libcrypto(maps.replace("libcrypto.so.3", "libz.so")) == ""


def test_load_without_a_mapped_libcrypto_says_why(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r--p 00000000 fe:00 1 /usr/lib/libc.so.6\n")
    assert libcrypto.load(str(maps)) == (None, "no libcrypto is mapped into this process (ssl is linked statically?)")
    binding, reason = libcrypto.load(str(tmp_path / "missing"))
    assert binding is None and reason.startswith(f"cannot read {tmp_path / 'missing'}")


def test_load_of_a_library_without_the_functions_says_why(tmp_path):
    maps = tmp_path / "maps"
    libc = libcrypto.mapped_libcrypto(Path("/proc/self/maps").read_text()).replace("libcrypto.so", "libc.so")
    maps.write_text(f"7f00-7f01 r--p 00000000 fe:00 1 {Path(libc).parent}/libcrypto.so.0\n")
    binding, reason = libcrypto.load(str(maps))
    assert binding is None and "libcrypto.so.0" in reason


@pytest.fixture(name="fresh_backend")
def _fresh_backend():
    crypto.backend.cache_clear()
    yield
    crypto.backend.cache_clear()


def test_a_failing_binding_falls_back_to_cryptography_with_one_line(fresh_backend, monkeypatch, caplog):
    calls = []

    def refuse() -> tuple[None, str]:
        calls.append(1)
        return None, "libcrypto.so.3 fails its self-test: X25519 public key (RFC 7748) does not match the published vector"

    monkeypatch.setattr(libcrypto, "load", refuse)
    with caplog.at_level(logging.WARNING, logger="agent.crypto"):
        key = crypto.signing_key_from_file_bytes(bytes(range(32)))
        assert crypto.public_key_b64(key) == "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
        assert crypto.decrypt_secret(bytes(range(32)).hex(), "AAECAwQFBgcICQoLwPk4NyBxh9K8CQZZiFBz2DQxtWn2ke9t7C3i7g==") == "s3cr3t-value"
    assert isinstance(crypto.backend(), crypto.PycaBackend)
    assert calls == [1]
    assert [r.getMessage() for r in caplog.records] == [
        "using the cryptography package instead of libcrypto: libcrypto.so.3 fails its self-test: "
        "X25519 public key (RFC 7748) does not match the published vector"
    ]


def test_the_working_binding_is_chosen(fresh_backend):
    assert isinstance(crypto.backend(), libcrypto.LibCrypto)


def test_signing_key_hides_its_seed_and_compares_by_value():
    key = crypto.signing_key_from_file_bytes(bytes(range(32)))
    assert repr(key) == "SigningKey(public=A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=)"
    assert key == crypto.SigningKey(bytes(range(32))) and key != crypto.new_signing_key()
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.SigningKey(b"short")


@pytest.mark.real
def test_signing_and_secrets_do_not_import_the_cryptography_package():
    script = (
        "import sys, agent.runtime\n"
        "from agent import crypto\n"
        "key = crypto.new_signing_key(); crypto.sign(key, b'x')\n"
        "crypto.wireguard_public_key(crypto.new_wireguard_private_key())\n"
        "crypto.decrypt_secret(bytes(range(32)).hex(), 'AAECAwQFBgcICQoLwPk4NyBxh9K8CQZZiFBz2DQxtWn2ke9t7C3i7g==')\n"
        "print(type(crypto.backend()).__name__, sorted(m for m in sys.modules if m.startswith('cryptography')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split(" ", 1) == ["LibCrypto", "[]\n"]
