"""PROTOCOL.md §3.4 test vectors and the key formats of §2/§3."""

import base64

import pytest

from agent import crypto

SEED = bytes(range(32))
PRIVATE_FILE = SEED + bytes.fromhex("03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8")


def test_signing_public_key_from_go_key_file():
    key = crypto.signing_key_from_file_bytes(PRIVATE_FILE)
    assert crypto.public_key_b64(key) == "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
    assert crypto.signing_key_file_bytes(key) == PRIVATE_FILE


def test_signature_over_empty_body():
    key = crypto.signing_key_from_file_bytes(PRIVATE_FILE)
    assert crypto.sign(key, b"1767312000000:") == (
        "pkaS44OshTUHMER8v3a6v3p8nTx8Di4uTrZqRQhbPf9ZrXR2TvR90Y0iw3RsX5+Wi9Hsi+OFksXLx++VLiMiAw=="
    )


def test_signature_over_json_body():
    key = crypto.signing_key_from_file_bytes(PRIVATE_FILE)
    message = b'1767312000000:{"id":"w1","status":"completed"}'
    assert crypto.sign(key, message) == (
        "E6jM28u4fqCmTK0ZYKXzjacr5x4iTZlmqLJy35jIB6WyzU+iRBsUPaFhFgSkgGa9NOOsUEoA+eEB4fdaYQjQBA=="
    )


def test_inconsistent_key_file_is_rejected():
    with pytest.raises(ValueError, match="inconsistent"):
        crypto.signing_key_from_file_bytes(SEED + bytes(32))
    with pytest.raises(ValueError, match="64 raw bytes"):
        crypto.signing_key_from_file_bytes(b"short")


def test_secret_vector_decrypts():
    blob = "AAECAwQFBgcICQoLwPk4NyBxh9K8CQZZiFBz2DQxtWn2ke9t7C3i7g=="
    assert crypto.decrypt_secret(SEED.hex(), blob) == "s3cr3t-value"
    assert crypto.encrypt_secret(SEED.hex(), "s3cr3t-value", iv=bytes(range(12))) == blob


@pytest.mark.parametrize(
    ("key", "blob", "message"),
    [
        ("00" * 16, "AAAA", "32 bytes"),
        ("zz" * 32, "AAAA", "not hex"),
        (SEED.hex(), "not base64!!", "base64"),
        (SEED.hex(), base64.b64encode(b"x" * 27).decode(), "too short"),
        ("11" * 32, "AAECAwQFBgcICQoLwPk4NyBxh9K8CQZZiFBz2DQxtWn2ke9t7C3i7g==", "does not decrypt"),
    ],
)
def test_bad_secrets_raise_clear_errors(key, blob, message):
    with pytest.raises(crypto.SecretError, match=message):
        crypto.decrypt_secret(key, blob)


def test_wireguard_public_key_vector():
    assert crypto.wireguard_public_key("AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=") == (
        "pOCSkrZRwni5dyxWn1+puxPZBrRqtoyd+dwrRAn4ogk="
    )


def test_generated_wireguard_key_is_clamped_and_round_trips():
    private = crypto.new_wireguard_private_key()
    raw = base64.b64decode(private)
    assert len(private) == 44 and raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40
    assert len(crypto.wireguard_public_key(private)) == 44


@pytest.mark.real
def test_generated_wireguard_key_matches_wg_pubkey():
    import shutil
    import subprocess

    if not shutil.which("wg"):
        pytest.skip("wireguard-tools not installed")
    private = crypto.new_wireguard_private_key()
    out = subprocess.run(["wg", "pubkey"], input=private.encode(), capture_output=True, check=True).stdout
    assert out.decode().strip() == crypto.wireguard_public_key(private)
