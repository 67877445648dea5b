"""Reproductions of what the review of the merged issue 8/9 fixes still found broken.

Each test states the behaviour the agent should have and is marked xfail(strict=True) with
the reason, so that it turns into a failure (and gets its mark removed) once fixed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.drift import LABEL_DEPLOYMENT_ID, LABEL_SERVICE_ID, LABEL_SERVICE_NAME
from agent.host.podman import Podman, PodmanError, PodmanOptions, judge, podman_reads
from tests.test_podman import CID, CID2, IN_USE, NAME, inspect_json, ours, register_inspect, spec


def test_name_clash_never_removes_a_running_container_of_another_deployment(fp: Any, tmp_path: Path) -> None:
    # Two listed deployments whose names clash (the control plane names a container
    # `<serviceId>-<depId[:8]>`: ids `deploy-1` and `deploy-10` share the name). Deployment
    # "deploy-10"'s run finds the name held by the running container of "deploy-1".
    podman = Podman(PodmanOptions(scope_label="techulus.test.scope=unit", run_dir=tmp_path / "run",
                                  stop_timeout=3, settle_time=0.01), sleep=lambda _s: None)
    fp.register(["podman", "run", fp.any()], returncode=125, stderr=IN_USE.format(NAME, CID2))
    register_inspect(fp, NAME, inspect_json(CID2, labels=ours(deployment="deploy-1"), running=True))
    fp.register(["podman", "rm", fp.any()], stdout=NAME + "\n")
    register_inspect(fp, NAME, missing=True)
    fp.register(["podman", "run", fp.any()], stdout=CID + "\n")
    register_inspect(fp, NAME, inspect_json(CID))
    fp.keep_last_process(True)
    with pytest.raises(PodmanError):
        podman.run_container(spec(deployment_id="deploy-10"), {}, tmp_path)
    assert fp.call_count(["podman", "rm", fp.any()]) == 0


@pytest.mark.parametrize("networks", [[], ["host"], ["none"]])
def test_unmarked_container_on_host_or_no_network_is_not_adopted(networks: list[str]) -> None:
    # `podman ps --format json` reports `Networks: []` for --network=host and --network=none
    # (checked with podman 4.3.1); the adoption rule meant only podman's default network.
    options = PodmanOptions(owner="server-1", adopt_legacy=True, network="techulus")
    labels = {LABEL_SERVICE_ID: "svc", LABEL_SERVICE_NAME: "x", LABEL_DEPLOYMENT_ID: "dep"}
    verdict = judge(labels, networks, options)
    if networks == ["host"] or networks == ["none"]:
        assert not verdict.ours
    assert not judge(labels, [], options).ours


@pytest.mark.parametrize("name", ["NETAVARK_FW", "NETAVARK_DNS_PORT", "AARDVARK_BINARY", "RUST_LOG",
                                  "REGISTRIES_CONFIG_PATH", "ZONEINFO", "INVOCATION_ID"])
def test_names_podmans_helpers_read_never_ride_in_podmans_environment(name: str) -> None:
    # Real podman 4.3.1 + netavark 1.4: `NETAVARK_FW=firewalld podman run --network N ...` fails in
    # netavark ("Error retrieving dbus connection for requested firewall backend"), and
    # `NETAVARK_DNS_PORT=xyz` fails with "Invalid NETAVARK_DNS_PORT": a service's env var
    # reaches root's netavark, which programs the host firewall.
    assert podman_reads(name)


def test_a_pull_of_an_image_already_present_does_not_claim_it(fp: Any, tmp_path: Path) -> None:
    from agent.host.images import ImageLedger

    image_id = "c" * 64
    ledger = ImageLedger(tmp_path / "images.json")
    podman = Podman(PodmanOptions(run_dir=tmp_path / "run"), sleep=lambda _s: None, images=ledger)
    # The operator pulled nginx:1.27 before the agent ever ran it: the image is there already.
    fp.register(["podman", "image", fp.any()], stdout=image_id + "\n", occurrences=10)
    fp.register(["podman", "pull", "--quiet", "--", "docker.io/library/nginx:1.27"], stdout=image_id + "\n")
    podman.pull("nginx:1.27")
    # Under disk pressure the GC would untag (and so delete) the operator's image.
    assert "docker.io/library/nginx:1.27" not in ledger.pulled()


@pytest.mark.parametrize("upstream", ["10.200.1.1:22", "10.200.7.1:2019", "10.200.1.0:80", "10.200.1.255:80"])
def test_upstream_on_a_gateway_or_network_address_is_refused(upstream: str) -> None:
    # 10.200.X.1 is the host's own address on its podman bridge: any host service listening on
    # 0.0.0.0 (sshd, an exporter, the agent's helpers) would be published on a public domain,
    # the same class as the loopback upstream the module already refuses.
    from agent.host.caddy import check_upstream, parse_upstream_networks, DEFAULT_UPSTREAM_NETWORKS
    from agent.validate import InvalidValue

    with pytest.raises(InvalidValue):
        check_upstream(upstream, parse_upstream_networks(DEFAULT_UPSTREAM_NETWORKS))


def test_an_agent_restart_after_a_rolled_back_rollout_keeps_the_old_deployment_on_its_image() -> None:
    from agent.model import ExpectedState
    from tests.fakes import FakePodman, ListSource
    from tests.test_loop import make, spec as loop_spec

    podman = FakePodman()
    d1 = podman.add("d1", image="localhost/app:v1")
    broken_d1 = loop_spec("d1", "localhost/app:broken")
    source = ListSource(ExpectedState(containers=(broken_d1, loop_spec("d2", "localhost/app:broken"))))
    reconciler, podman, _ = make(source, podman)
    reconciler.tick()
    # Rolled back: the control plane lists D1 alone with the failed image, for as long as
    # nobody deploys again (ROLLOUT.md: the service's image is not reverted).
    source.items = [ExpectedState(containers=(broken_d1,))]
    reconciler.tick()
    assert podman.containers[d1.id].image == "localhost/app:v1"
    # The agent restarts (an upgrade, a crash, a reboot): a new Reconciler, same host.
    restarted, podman, _ = make(ListSource(ExpectedState(containers=(broken_d1,))), podman)
    restarted.tick()
    assert any(c.image == "localhost/app:v1" and c.deployment_id == "d1" for c in podman.containers.values())


def test_a_rollout_whose_new_deployment_runs_on_another_server_leaves_the_old_one_alone() -> None:
    # ROLLOUT.md: the expected state lists *this server's* rows, each with the service's current
    # image. Service svc has D1 here; the redeploy (or a placement change) puts D2 on server B.
    # This server then sees D1 alone with image v2 from `pending` on, long before D2 is healthy;
    # with a broken v2, D1 goes down too and the rollout has nothing to roll back to.
    from agent.model import ExpectedState
    from tests.fakes import FakePodman, ListSource
    from tests.test_loop import make, spec as loop_spec

    podman = FakePodman()
    d1 = podman.add("d1", image="localhost/app:v1")
    reconciler, podman, _ = make(ListSource(ExpectedState(containers=(loop_spec("d1", "localhost/app:v2"),))), podman)
    reconciler.tick()
    assert podman.containers.get(d1.id) is not None and podman.containers[d1.id].image == "localhost/app:v1"


def test_standalone_down_never_removes_a_network_it_did_not_create(fp: Any, tmp_path: Path) -> None:
    # ensure_network uses an existing unmarked network "as it is" (an operator's, with
    # network_name pointing at it); `agent standalone --down` then removes it.
    import json

    podman = Podman(PodmanOptions(owner="standalone-0123abcd", network="operators-net", run_dir=tmp_path / "run"),
                    sleep=lambda _s: None)
    unmarked = [{"name": "operators-net", "driver": "bridge", "labels": {},
                 "subnets": [{"subnet": "10.200.1.0/24", "gateway": "10.200.1.1"}]}]
    fp.register(["podman", "network", "inspect", "--", "operators-net"], stdout=json.dumps(unmarked), occurrences=3)
    fp.register(["podman", "network", "rm", "--", "operators-net"], stdout="operators-net\n")
    try:
        podman.remove_network()
    except PodmanError:
        pass
    assert fp.call_count(["podman", "network", "rm", fp.any()]) == 0


@pytest.mark.parametrize("bad", [{"id": None, "type": "restart"}, {"id": "x\n", "type": "stop"}, "not an object", {"id": ""}])
def test_unacknowledgeable_work_items_are_logged_once_then_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                     bad: Any) -> None:
    # Such an item is never acknowledged, so the control plane serves it on every poll
    # (every few seconds): 1,000 of them wrote 1,000 ERROR lines per poll.
    import logging

    from tests.test_workqueue import Harness

    h = Harness(tmp_path, items=[bad] * 1000)
    caplog.set_level(logging.INFO, logger="agent.workqueue")
    for _ in range(3):
        h.queue.poll_once()
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) <= 2, f"{len(lines)} lines, first: {lines[0].getMessage()}"


@pytest.mark.parametrize("section,doc", [
    # A control-plane format slip in every entry: a space after the comma of allowedIps...
    ("wireguard", {"wireguard": {"peers": [
        {"publicKey": "A" * 43 + "=", "allowedIps": "10.100.2.0/24, 10.200.2.0/24", "endpoint": "192.0.2.2:51820"},
        {"publicKey": "B" * 43 + "=", "allowedIps": "10.100.3.0/24, 10.200.3.0/24", "endpoint": "192.0.2.3:51820"},
    ]}}),
    # ...or upstreams sent as one string instead of a list.
    ("caddy", {"caddy": {"routes": [{"id": "r1", "domain": "a.example.com", "upstreams": "10.200.1.2:80"}]}}),
])
def test_a_section_whose_every_entry_is_garbled_is_never_emptied(section: str, doc: dict[str, Any]) -> None:
    # The adapters refuse "listed, none usable" (nothing is changed), but parse_expected_state
    # already dropped the entries, so the adapter sees an empty list; the loop's sudden-empty
    # guard waits one poll, then the second poll "confirms" and every peer / route is removed.
    import ipaddress

    from agent.drift import caddy_hash, wireguard_hash
    from agent.model import parse_expected_state
    from tests.fakes import ListSource
    from tests.test_loop import make

    live_hash = "live-non-empty"

    class Sync:
        name = section

        def __init__(self) -> None:
            self.applied: list[Any] = []
            self.live = live_hash

        def prepare(self) -> None:
            pass

        def expected_hash(self, state: Any) -> str:
            return wireguard_hash(state.wireguard_peers) if section == "wireguard" else caddy_hash(state.caddy_routes)

        def actual_hash(self) -> str:
            return self.live

        def apply(self, state: Any) -> None:
            self.applied.append(state)
            self.live = self.expected_hash(state)

    state = parse_expected_state(doc, ipaddress.IPv4Network("10.200.1.0/24"))
    assert state.problem_count >= 1  # every entry was dropped by the model
    sync = Sync()
    reconciler, _, _ = make(ListSource(state, state, state), syncs=[sync])
    for _ in range(3):
        reconciler.tick()
    assert sync.applied == [], "every entry was garbled: nothing may be removed"


def test_the_doctor_probes_service_id_is_refused_on_the_wire() -> None:
    # list_containers() hides every container of service `techulus-doctor` (the probe). A
    # deployment of a service with that id would be deployed on every pass: its run meets its
    # own name in use, removes "the leftover" (its running container) and runs it again.
    import ipaddress

    from agent.host.podman import DOCTOR_PROBE_SERVICE
    from agent.model import parse_expected_state

    state = parse_expected_state({"containers": [{
        "deploymentId": "d1", "serviceId": DOCTOR_PROBE_SERVICE, "serviceName": "x", "name": "c1",
        "image": "nginx", "ipAddress": "10.200.1.5"}]}, ipaddress.IPv4Network("10.200.1.0/24"))
    assert state.containers == () and "d1" in state.protected_deployments
