"""A standalone agent's DNS and Caddy adapters sleep until the state file lists an entry."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.drift import EMPTY_HASH, dns_hash
from agent.model import DnsRecord, ExpectedState
from agent.ondemand import OnDemand


@dataclass
class Recorder:
    """An adapter that records what is asked of it (the tool it would drive is not there)."""

    owned: bool = False
    fail_prepare: bool = False
    calls: list[str] = field(default_factory=list)
    name: str = "dns"

    def owns_configuration(self) -> bool:
        self.calls.append("owns")
        return self.owned

    def prepare(self) -> None:
        self.calls.append("prepare")
        if self.fail_prepare:
            raise RuntimeError("dnsmasq did not restart")

    def expected_hash(self, state: ExpectedState) -> str:
        return dns_hash(state.dns_records)

    def actual_hash(self) -> str:
        self.calls.append("actual")
        return "live"

    def apply(self, state: ExpectedState) -> None:
        self.calls.append("apply")


RECORDS = ExpectedState(dns_records=(DnsRecord("a.internal", ("10.200.1.2",)),))


def test_dormant_until_the_state_lists_an_entry_and_the_tool_is_never_touched_before() -> None:
    inner = Recorder()
    woke: list[bool] = []
    sync = OnDemand(inner, lambda: woke.append(True))
    sync.prepare()
    for _ in range(3):
        assert sync.actual_hash() == EMPTY_HASH
        assert sync.expected_hash(ExpectedState()) == EMPTY_HASH
    assert inner.calls == ["owns"], "no prepare, no read of the live configuration while dormant"
    assert not sync.active and woke == []

    assert sync.expected_hash(RECORDS) == dns_hash(RECORDS.dns_records)
    assert sync.active and woke == [True]
    # Nothing of ours was there at start: until the first apply the live side is empty,
    # without a read that would only report our missing drop-in.
    assert sync.actual_hash() == EMPTY_HASH and "actual" not in inner.calls
    sync.apply(RECORDS)
    sync.apply(RECORDS)
    assert inner.calls == ["owns", "prepare", "apply", "apply"], "prepared once, just before the first apply"
    assert sync.actual_hash() == "live"
    # Once awake it stays awake: an emptied file now removes what was written.
    assert sync.expected_hash(ExpectedState()) == EMPTY_HASH and sync.actual_hash() == "live"
    assert woke == [True]


def test_configuration_left_by_an_earlier_run_wakes_it_at_start(caplog) -> None:  # type: ignore[no-untyped-def]
    inner = Recorder(owned=True, fail_prepare=True)
    sync = OnDemand(inner)
    sync.prepare()  # a failing preparation is logged, not raised (as at start)
    assert sync.active and inner.calls == ["owns", "prepare"]
    assert "dns: preparation failed: dnsmasq did not restart" in caplog.text
    assert sync.actual_hash() == "live"
    sync.apply(ExpectedState())
    assert inner.calls == ["owns", "prepare", "actual", "apply"]


def test_plan_without_prepare_reads_what_an_earlier_run_left_and_nothing_else() -> None:
    left = Recorder(owned=True)
    sync = OnDemand(left)
    assert sync.actual_hash() == "live" and sync.expected_hash(RECORDS)
    assert left.calls == ["owns", "actual"], "read only: nothing prepared, nothing applied"
    nothing = Recorder()
    sync = OnDemand(nothing)
    assert sync.actual_hash() == EMPTY_HASH and sync.actual_hash() == EMPTY_HASH
    assert nothing.calls == ["owns"], "looked once"


def test_standalone_gets_dormant_dns_and_caddy_under_its_owner_mark_and_the_settings_still_rule(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from agent import crypto
    from agent.host.caddy import CaddySync
    from agent.host.dns import DnsSync
    from agent.identity import AgentConfig, Identity, standalone_owner
    from agent.runtime import config_syncs, container_dns
    from agent.settings import Settings

    settings = replace(Settings(), data_dir=tmp_path / "data", state_file=tmp_path / "state.toml")
    config = AgentConfig("standalone", 7, "127.0.0.1")
    syncs = config_syncs(settings, config, None)
    assert [s.name for s in syncs] == ["dns", "caddy"], "no wireguard in standalone, whatever manage_wireguard says"
    assert all(isinstance(s, OnDemand) and not s.active for s in syncs)
    dns, caddy = (s.inner for s in syncs)  # type: ignore[attr-defined]
    assert isinstance(dns, DnsSync) and isinstance(caddy, CaddySync)
    assert dns.owner == caddy.owner == standalone_owner(tmp_path / "data") and dns.gateway == "10.200.7.1"
    assert [s.name for s in config_syncs(replace(settings, manage_dns=False), config, None)] == ["caddy"]
    assert config_syncs(replace(settings, manage_dns=False, manage_caddy=False), config, None) == []
    # Containers get the gateway as resolver only once DNS is awake (and never when not ours).
    assert container_dns(settings, config, dns_active=False) == ()
    assert container_dns(settings, config) == ("10.200.7.1",)
    assert container_dns(replace(settings, manage_dns=False), config) == ()

    identity = Identity(crypto.new_signing_key(), crypto.new_wireguard_private_key(), AgentConfig("server-1", 3, "10.100.3.1"))
    registered = config_syncs(replace(settings, state_file=None, manage_wireguard=False), identity.config, identity)
    assert [type(s).__name__ for s in registered] == ["DnsSync", "CaddySync"]
    assert all(s.owner == "" for s in registered), "a registered agent's files and routes stay unmarked"  # type: ignore[attr-defined]
