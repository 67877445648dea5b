"""The data dir: Go-compatible formats, atomic registration that can be retried."""

import json
import stat

import pytest

from agent import crypto
from agent.api import Rejected, Unavailable
from agent.identity import AgentConfig, DataDir, IdentityError
from agent.registration import RegistrationError, ensure_registered
from agent.settings import Settings

SEED = bytes(range(32))
GO_PRIVATE = SEED + bytes.fromhex("03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8")
WG_PRIVATE = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
GO_CONFIG = (
    '{\n  "serverId": "5f0c2a1e9b7d4c3a2b1e0f9d",\n  "subnetId": 3,\n  "wireguardIp": "10.100.3.1",\n'
    '  "encryptionKey": "' + "ab" * 32 + '"\n}'
)


def write_go_data_dir(root):
    (root / "keys").mkdir(parents=True, mode=0o700)
    (root / "keys" / "private.key").write_bytes(GO_PRIVATE)
    (root / "keys" / "public.key").write_bytes(GO_PRIVATE[32:])
    (root / "wireguard.key").write_text(WG_PRIVATE)
    (root / "config.json").write_text(GO_CONFIG)


def test_go_data_dir_loads_unchanged(tmp_path):
    write_go_data_dir(tmp_path)
    identity = DataDir(tmp_path).load()
    assert crypto.public_key_b64(identity.signing_key) == "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
    assert identity.config == AgentConfig("5f0c2a1e9b7d4c3a2b1e0f9d", 3, "10.100.3.1", "ab" * 32)
    assert identity.wireguard_public_key == "pOCSkrZRwni5dyxWn1+puxPZBrRqtoyd+dwrRAn4ogk="
    assert identity.config.to_json() == GO_CONFIG


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: (r / "config.json").unlink(), "register again"),
        (lambda r: (r / "config.json").write_text("{"), "not valid JSON"),
        (lambda r: (r / "config.json").write_text('{"serverId":"x","subnetId":0}'), "subnetId"),
        (lambda r: (r / "config.json").write_text('{"serverId":"a b\\n","subnetId":1}'), "printable ASCII"),
        (lambda r: (r / "keys" / "private.key").write_bytes(b"x" * 10), "64 raw bytes"),
        (lambda r: (r / "wireguard.key").write_text("nope"), "wireguard.key"),
    ],
)
def test_broken_data_dir_gives_clear_errors(tmp_path, mutate, message):
    write_go_data_dir(tmp_path)
    mutate(tmp_path)
    with pytest.raises(IdentityError, match=message):
        DataDir(tmp_path).load()


class FakeRegisterClient:
    def __init__(self, answer=None, error=None):
        self.answer, self.error, self.bodies = answer, error, []

    def register(self, body):
        self.bodies.append(body)
        if self.error:
            raise self.error
        return self.answer


ANSWER = {
    "serverId": "3c632d3cf9e34ea9db49b5a6",
    "subnetId": 1,
    "wireguardIp": "10.100.1.1",
    "peers": [{"publicKey": "11RXTfrcyoZt2d7lU9xvoix87aedvwyjV7HsIbFkikg=", "allowedIps": "10.100.2.0/24,10.200.2.0/24", "endpoint": None}],
    "encryptionKey": "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
}


def test_registration_commits_everything_after_200(tmp_path):
    settings = Settings.load({"token": "tok", "data_dir": str(tmp_path)}, environ={})
    client = FakeRegisterClient(ANSWER)
    result = ensure_registered(settings, DataDir(tmp_path), client, "203.0.113.10")
    body = client.bodies[0]
    assert list(body) == ["token", "wireguardPublicKey", "signingPublicKey", "publicIp"]
    assert body["signingPublicKey"] == crypto.public_key_b64(result.identity.signing_key)
    assert result.initial_peers[0].endpoint == ""
    assert stat.S_IMODE((tmp_path / "keys" / "private.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "config.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "wireguard.key").stat().st_mode) == 0o600
    assert len((tmp_path / "keys" / "private.key").read_bytes()) == 64
    assert not (tmp_path / "wireguard.key").read_text().endswith("\n")
    assert json.loads((tmp_path / "config.json").read_text())["serverId"] == "3c632d3cf9e34ea9db49b5a6"
    # Registered now: a second start loads, never registers again.
    again = ensure_registered(settings, DataDir(tmp_path), FakeRegisterClient(error=AssertionError("no")), "")
    assert again.identity.config == result.identity.config and again.initial_peers is None


def test_public_ip_is_omitted_when_unknown(tmp_path):
    client = FakeRegisterClient(ANSWER)
    ensure_registered(Settings.load({"token": "tok"}, environ={}), DataDir(tmp_path), client, "")
    assert "publicIp" not in client.bodies[0]


@pytest.mark.parametrize(
    "error",
    [
        Rejected("POST /register: 401 Invalid, expired, or already used token", 401),
        Unavailable("cannot reach the control plane"),
    ],
)
def test_failed_registration_writes_nothing_and_can_be_retried(tmp_path, error):
    settings = Settings.load({"token": "tok"}, environ={})
    with pytest.raises(RegistrationError, match="nothing was written"):
        ensure_registered(settings, DataDir(tmp_path), FakeRegisterClient(error=error), "")
    assert list(tmp_path.iterdir()) == []
    ensure_registered(settings, DataDir(tmp_path), FakeRegisterClient(ANSWER), "")
    assert DataDir(tmp_path).is_registered()


def test_unusable_answer_writes_nothing(tmp_path):
    settings = Settings.load({"token": "tok"}, environ={})
    with pytest.raises(RegistrationError, match="unusable"):
        ensure_registered(settings, DataDir(tmp_path), FakeRegisterClient({"serverId": "x", "subnetId": 999}), "")
    assert not DataDir(tmp_path).is_registered()


def test_missing_token_is_a_clear_error(tmp_path):
    with pytest.raises(RegistrationError, match="--token"):
        ensure_registered(Settings.load({}, environ={}), DataDir(tmp_path), FakeRegisterClient(ANSWER), "")


def test_go_config_with_an_odd_encryption_key_still_loads(tmp_path):
    write_go_data_dir(tmp_path)
    (tmp_path / "config.json").write_text(GO_CONFIG.replace("ab" * 32, "not-hex"))
    assert DataDir(tmp_path).load().config.encryption_key == "not-hex"


def test_secrets_are_not_in_reprs(tmp_path):
    write_go_data_dir(tmp_path)
    identity = DataDir(tmp_path).load()
    assert "ab" * 32 not in repr(identity) and WG_PRIVATE not in repr(identity)
