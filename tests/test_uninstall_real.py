"""`agent purge --yes` (install.sh --uninstall --purge) with real Podman: only what this agent owns goes."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from agent import cli
from agent.host.images import LEDGER_FILE, ImageLedger
from agent.identity import AgentConfig, DataDir, PendingKeys
from agent.runtime import hold_lock
from tests.test_ownership_real import build_image, run_foreign
from tests.testbed import (  # noqa: F401 - fixtures
    create_network,
    podman,
    podman_env,
    remove_network,
)

SERVER_ID = "purge" + uuid.uuid4().hex[:19]


def started_at(container: str) -> str:
    return podman("inspect", "--format", "{{.State.StartedAt}}", container).stdout.strip()


@pytest.mark.real
def test_purge_removes_our_containers_network_images_and_data_dir_and_nothing_else(
    podman_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    uid = uuid.uuid4().hex[:8]
    ours_image, other_image = f"localhost/techulus-purge-ours-{uid}:1", f"localhost/techulus-purge-other-{uid}:1"
    build_image(ours_image, f"ours-{uid}", tmp_path / "ours")
    build_image(other_image, f"other-{uid}", tmp_path / "other")
    # The agent's own network carries its owner mark (an unmarked one it only used stays).
    net = create_network(owner=SERVER_ID)
    elsewhere = create_network()
    try:
        data = tmp_path / "data"
        DataDir(data).commit_registration(PendingKeys.generate(), AgentConfig(SERVER_ID, net.subnet_id, "10.100.7.1"))
        (data / "volumes" / "svc").mkdir(parents=True)
        ImageLedger(data / LEDGER_FILE).note_pulled(ours_image, "unused-id")
        ours = run_foreign("purge-ours-" + uid, net, net.scope_label, 10, SERVER_ID, "dep-ours")
        foreign = run_foreign("purge-foreign-" + uid, elsewhere, net.scope_label, 11, "another-server", "dep-foreign")
        foreign_started = started_at(foreign)
        monkeypatch.setenv("TECHULUS_AGENT_NETWORK_NAME", net.name)
        monkeypatch.setenv("TECHULUS_AGENT_SCOPE_LABEL", net.scope_label)
        argv = ["purge", "--yes", "--data-dir", str(data)]

        running = hold_lock(data)
        try:
            assert cli.main(argv) == cli.EXIT_FAILURE, "refused while the agent runs"
        finally:
            running.close()
        assert podman("container", "exists", ours, check=False).returncode == 0 and data.exists()

        assert cli.main(argv) == 0
        assert podman("container", "exists", ours, check=False).returncode == 1
        assert podman("network", "exists", net.name, check=False).returncode == 1
        assert podman("image", "exists", ours_image, check=False).returncode == 1
        assert not data.exists()
        # Not ours: another owner's container (same start, still running), an image it never pulled.
        assert podman("image", "exists", other_image, check=False).returncode == 0
        state = json.loads(podman("inspect", foreign).stdout)[0]["State"]
        assert state["Running"] and started_at(foreign) == foreign_started
    finally:
        remove_network(elsewhere)
        remove_network(net)
        podman("rmi", "--ignore", ours_image, other_image, check=False)


def test_purge_needs_yes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["purge", "--data-dir", str(tmp_path)]) == cli.EXIT_USAGE
    assert "confirm with --yes" in capsys.readouterr().err


def test_purge_of_an_unregistered_agent_removes_only_its_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "shiv").mkdir(parents=True)
    assert cli.main(["purge", "--yes", "--data-dir", str(data)]) == 0  # no podman call (fp would fail it)
    assert not data.exists()
