"""`agent upgrade` as a transaction: verify, swap, watch, commit or roll back (agent/upgrade.py).

systemd is a fake unit that behaves like the new build would (healthy, exits at start, hangs
before READY, READY without a poll); `--version` of the zipapps is faked with pytest-subprocess.
The booted-systemd version of these cases is tests/test_upgrade_e2e.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import os
import signal
import socket
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent import cli, sdnotify, upgrade
from agent.upgrade import HealthMarker, Options, Systemd, UnitState, Upgrade, UpgradeRefused


def zipapp(build: str, behaviour: str = "good") -> bytes:
    buffer = io.BytesIO()
    buffer.write(b"#!/usr/bin/python3\n")
    # A fixed timestamp: the same build must give the same bytes whenever it is made (the
    # tests compare an installed build with a fresh copy; a second boundary broke that).
    stamp = (2026, 1, 1, 0, 0, 0)
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo("environment.json", stamp), json.dumps({"build_id": build}))
        archive.writestr(zipfile.ZipInfo("behaviour", stamp), behaviour)
    return buffer.getvalue()


def behaviour_of(path: Path) -> str:
    with zipfile.ZipFile(path) as archive:
        return archive.read("behaviour").decode()


class FakeUnit:
    """techulus-agent.service: the installed zipapp's `behaviour` decides what a (re)start does."""

    def __init__(self, install_dir: Path, data_dir: Path, interrupt_after: int = 0) -> None:
        self.install_dir = install_dir
        self.data_dir = data_dir
        self.pid = 100
        self.mode = "good"
        self.restarts = 0
        self.polled = True
        self.interrupt_after = interrupt_after
        self.states = 0

    def restart(self) -> None:
        self.restarts += 1
        self.pid += 1
        self.mode = behaviour_of(self.install_dir / "agent.pyz")
        self.polled = False

    def state(self) -> UnitState:
        self.states += 1
        if self.interrupt_after and self.states == self.interrupt_after:
            os.kill(os.getpid(), signal.SIGINT)
        if self.mode == "exits":
            return UnitState("activating", "auto-restart", 0, "3")
        if self.mode == "hangs":
            return UnitState("activating", "start", self.pid, "")
        if self.mode == "good" and not self.polled:
            # The agent's first successful tick: HealthMarker writes this.
            (self.data_dir / "health.json").write_text(json.dumps({"pid": self.pid}))
            self.polled = True
        return UnitState("active", "running", self.pid, "")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def box(tmp_path: Path, fp: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    install = tmp_path / "lib"
    data = tmp_path / "data"
    install.mkdir()
    data.mkdir()
    (install / "agent.pyz").write_bytes(zipapp("old"))
    journal: list[tuple[str, int, str]] = []
    monkeypatch.setattr(sdnotify, "journal", lambda message, priority=6, unit="": journal.append((message, priority, unit)))

    for path, version in ((install / "agent.pyz", "techulus-agent 0.1.0 (old)"), (install / ".staging" / "agent.pyz", "techulus-agent 0.2.0 (new)")):
        fp.register([sys.executable, str(path), "--version"], stdout=version + "\n", occurrences=100)
    yield {"install": install, "data": data, "journal": journal, "tmp": tmp_path}


def new_build(box: dict[str, Any], behaviour: str = "good", name: str = "agent-linux-amd64") -> tuple[Path, str]:
    path = box["tmp"] / "release" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(zipapp(f"new-{behaviour}", behaviour))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def attempt(box: dict[str, Any], binary: Path, sha: str = "", unit: FakeUnit | None = None, **extra: Any) -> tuple[upgrade.Record, FakeUnit]:
    unit = unit or FakeUnit(box["install"], box["data"])
    clock = Clock()
    options = Options(binary=str(binary), data_dir=box["data"], sha256=sha, install_dir=box["install"],
                      public_key=box["tmp"] / "release-signing.pub", timeout=30, **extra)
    record = Upgrade(options, systemd=unit, clock=clock, sleep=clock.sleep).run()  # type: ignore[arg-type]
    return record, unit


def state(box: dict[str, Any]) -> dict[str, Any]:
    return json.loads((box["data"] / "upgrade-state.json").read_text())


def test_a_healthy_build_is_committed_and_the_old_one_kept_as_previous(box: dict[str, Any]) -> None:
    binary, sha = new_build(box)
    record, unit = attempt(box, binary, sha)
    assert record.outcome == "committed", record
    assert (box["install"] / "agent.pyz").read_bytes() == binary.read_bytes()
    assert (box["install"] / "agent.pyz.previous").read_bytes() == zipapp("old")
    assert unit.restarts == 1
    saved = state(box)
    assert saved["outcome"] == "committed" and saved["to_sha256"] == sha
    assert saved["from_version"] == "techulus-agent 0.1.0 (old)" and saved["to_version"] == "techulus-agent 0.2.0 (new)"
    assert saved["started_at"] and saved["finished_at"] and "healthy after" in saved["reason"]
    assert box["journal"] and box["journal"][-1][0].startswith("upgrade committed") and box["journal"][-1][2] == "techulus-agent.service"
    assert not (box["install"] / ".staging").exists()


@pytest.mark.parametrize(
    ("behaviour", "why"),
    [
        ("exits", "the new agent exited at start (status 3)"),
        ("hangs", "not healthy within 30s: it never sent READY (unit activating/start)"),
        ("no-poll", "not healthy within 30s: it sent READY but completed no successful poll"),
    ],
)
def test_an_unhealthy_build_is_rolled_back(box: dict[str, Any], behaviour: str, why: str) -> None:
    binary, sha = new_build(box, behaviour)
    record, unit = attempt(box, binary, sha)
    assert record.outcome == "rolled_back"
    assert why in record.reason and record.reason.endswith("the previous version runs again")
    assert (box["install"] / "agent.pyz").read_bytes() == zipapp("old")
    assert unit.restarts == 2 and unit.mode == "good"
    assert state(box)["outcome"] == "rolled_back" and why in state(box)["reason"]
    assert box["journal"][-1][1] == 3 and "upgrade rolled_back" in box["journal"][-1][0]


def test_sigint_during_the_watch_rolls_back(box: dict[str, Any]) -> None:
    binary, sha = new_build(box, "hangs")
    unit = FakeUnit(box["install"], box["data"], interrupt_after=3)
    record, _ = attempt(box, binary, sha, unit=unit)
    assert record.outcome == "rolled_back" and "interrupted (SIGINT)" in record.reason
    assert (box["install"] / "agent.pyz").read_bytes() == zipapp("old")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_wrong_checksum_changes_nothing(box: dict[str, Any]) -> None:
    binary, _ = new_build(box)
    record, unit = attempt(box, binary, "0" * 64)
    assert record.outcome == "refused" and "checksum mismatch" in record.reason
    assert (box["install"] / "agent.pyz").read_bytes() == zipapp("old")
    assert not (box["install"] / "agent.pyz.previous").exists()
    assert unit.restarts == 0 and unit.states == 0
    assert state(box)["outcome"] == "refused"


def test_the_checksum_comes_from_SHA256SUMS_beside_the_binary(box: dict[str, Any]) -> None:
    binary, sha = new_build(box)
    (binary.parent / "SHA256SUMS").write_text(f"{'1' * 64}  other\n{sha}  {binary.name}\n")
    assert attempt(box, binary)[0].outcome == "committed"


def test_without_any_checksum_nothing_is_installed(box: dict[str, Any]) -> None:
    binary, _ = new_build(box)
    record, unit = attempt(box, binary)
    assert record.outcome == "refused" and "give --sha256 or publish" in record.reason
    assert unit.restarts == 0 and (box["install"] / "agent.pyz").read_bytes() == zipapp("old")


def test_a_file_that_is_not_a_zipapp_is_refused(box: dict[str, Any]) -> None:
    binary = box["tmp"] / "garbage"
    binary.write_bytes(b"#!/bin/sh\nexit 0\n")
    record, unit = attempt(box, binary, hashlib.sha256(binary.read_bytes()).hexdigest())
    assert record.outcome == "refused" and "not an agent zipapp" in record.reason and unit.restarts == 0


def test_the_same_build_again_is_left_alone(box: dict[str, Any]) -> None:
    binary = box["tmp"] / "same"
    binary.write_bytes(zipapp("old"))
    record, unit = attempt(box, binary, hashlib.sha256(binary.read_bytes()).hexdigest())
    assert record.outcome == "unchanged" and unit.restarts == 0


def signing_key(box: dict[str, Any]) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    (box["tmp"] / "release-signing.pub").write_bytes(
        key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    return key


def test_a_signed_build_is_verified_against_the_installed_key(box: dict[str, Any]) -> None:
    key = signing_key(box)
    binary, sha = new_build(box)
    Path(f"{binary}.sig").write_bytes(key.sign(binary.read_bytes()))
    assert attempt(box, binary, sha)[0].outcome == "committed"


@pytest.mark.parametrize("signature", ["other key", "missing", "truncated"])
def test_a_bad_or_missing_signature_changes_nothing(box: dict[str, Any], signature: str) -> None:
    key = signing_key(box)
    binary, sha = new_build(box)
    sig = Path(f"{binary}.sig")
    if signature == "other key":
        sig.write_bytes(Ed25519PrivateKey.generate().sign(binary.read_bytes()))
    elif signature == "truncated":
        sig.write_bytes(key.sign(binary.read_bytes())[:40])
    record, unit = attempt(box, binary, sha)
    assert record.outcome == "refused", record
    assert {"other key": "does not match the installed release key", "missing": "no signature",
            "truncated": "40 bytes, not 64"}[signature] in record.reason
    assert unit.restarts == 0 and (box["install"] / "agent.pyz").read_bytes() == zipapp("old")


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def test_a_build_is_downloaded_with_the_checksums_published_beside_it(box: dict[str, Any], web: tuple[str, Path]) -> None:
    url, root = web
    data = zipapp("from-the-web")
    (root / "agent-linux-amd64").write_bytes(data)
    (root / "SHA256SUMS").write_text(f"{hashlib.sha256(data).hexdigest()}  agent-linux-amd64\n")
    record, _ = attempt(box, f"{url}/agent-linux-amd64")  # type: ignore[arg-type]
    assert record.outcome == "committed" and (box["install"] / "agent.pyz").read_bytes() == data


def test_downloads_are_bounded(tmp_path: Path, web: tuple[str, Path]) -> None:
    url, root = web
    (root / "big").write_bytes(b"x" * 5000)
    with pytest.raises(UpgradeRefused, match="larger than the 4096 bytes"):
        upgrade.fetch(f"{url}/big", tmp_path / "out", limit=4096)
    with pytest.raises(UpgradeRefused, match="HTTP 404"):
        upgrade.fetch(f"{url}/missing", tmp_path / "out")
    with pytest.raises(UpgradeRefused, match="more than the 4096 allowed"):
        upgrade.fetch(str(root / "big"), tmp_path / "out", limit=4096)


def test_a_second_upgrade_at_the_same_time_is_refused(box: dict[str, Any]) -> None:
    import fcntl

    binary, sha = new_build(box)
    with open(box["install"] / ".upgrade.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UpgradeRefused, match="another upgrade is running"):
            attempt(box, binary, sha)
    assert (box["install"] / "agent.pyz").read_bytes() == zipapp("old")


class Holder:
    last_good: object = None


def test_the_health_marker_is_written_once_after_the_first_successful_poll(tmp_path: Path) -> None:
    reconciler = Holder()
    reconciler.last_good = cached = object()  # restored from the cache at start: not a poll
    marker = HealthMarker(tmp_path, reconciler)
    marker()  # a tick whose poll failed leaves last_good as it was
    assert not (tmp_path / "health.json").exists()
    reconciler.last_good = object()
    marker()
    written = json.loads((tmp_path / "health.json").read_text())
    assert written["pid"] == os.getpid() and written["at"]
    (tmp_path / "health.json").unlink()
    reconciler.last_good = cached
    marker()
    assert not (tmp_path / "health.json").exists(), "written once per process"


def test_systemd_restarts_without_blocking_and_reads_the_unit(fp: Any) -> None:
    fp.register(["systemctl", "restart", "--no-block", "techulus-agent.service"])
    fp.register(["systemctl", "show", "-p", "ActiveState,SubState,MainPID,ExecMainStatus", "techulus-agent.service"],
                stdout="ActiveState=active\nSubState=running\nMainPID=4242\nExecMainStatus=0\n")
    unit = Systemd("techulus-agent.service")
    unit.restart()
    assert unit.state() == UnitState("active", "running", 4242, "0")


def test_journal_entries_name_the_agent_unit(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        assert sdnotify.journal("upgrade rolled_back: why\nsecond line", 3, "techulus-agent.service", socket_path=path)
        payload = server.recv(65536)
    assert b"PRIORITY=3\n" in payload and b"OBJECT_SYSTEMD_UNIT=techulus-agent.service\n" in payload
    assert b"MESSAGE\n" + len(b"upgrade rolled_back: why\nsecond line").to_bytes(8, "little") in payload
    assert not sdnotify.journal("nobody listens", socket_path=str(tmp_path / "absent"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["upgrade"], "upgrade needs the new build"),
        (["upgrade", "--binary", "http://example.test/agent"], "https:// only"),
        (["upgrade", "--binary", "/tmp/a", "--sha256", "abc"], "--sha256 must be 64 hex digits"),
        (["upgrade", "--binary", "/tmp/a", "--timeout", "1"], "--timeout must be between"),
        (["run", "--binary", "/tmp/a"], "--binary goes with upgrade"),
    ],
)
def test_upgrade_usage_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_upgrade_returns_non_zero_when_refused(box: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary, _ = new_build(box)
    options: list[Options] = []
    real = upgrade.Upgrade

    class Probe(real):  # type: ignore[misc, valid-type]
        def __init__(self, opts: Options, *args: Any, **kwargs: Any) -> None:
            options.append(opts)
            opts = Options(**{**opts.__dict__, "install_dir": box["install"], "public_key": tmp_path / "none"})
            super().__init__(opts, *args, **kwargs)

    monkeypatch.setattr(upgrade, "Upgrade", Probe)
    code = cli.main(["upgrade", "--binary", str(binary), "--sha256", "f" * 64, "--data-dir", str(box["data"])])
    assert code == 1 and options[0].sha256 == "f" * 64 and options[0].data_dir == box["data"]
    assert state(box)["outcome"] == "refused"


class BrokenSystemctl(FakeUnit):
    """systemctl fails the first restart (e.g. the unit file is broken)."""

    def restart(self) -> None:
        if self.restarts == 0:
            self.restarts += 1
            from agent.host.run import CommandError

            raise CommandError(("systemctl", "restart", "--no-block", "techulus-agent.service"), 1, "", "Unit not found.")
        super().restart()


def test_a_failing_systemctl_rolls_back_too(box: dict[str, Any]) -> None:
    binary, sha = new_build(box)
    record, unit = attempt(box, binary, sha, unit=BrokenSystemctl(box["install"], box["data"]))
    assert record.outcome == "rolled_back" and "cannot restart or watch techulus-agent.service" in record.reason
    assert "Unit not found." in record.reason and record.reason.endswith("the previous version runs again")
    assert (box["install"] / "agent.pyz").read_bytes() == zipapp("old")


def test_a_build_that_does_not_start_here_is_refused(tmp_path: Path, fp: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdnotify, "journal", lambda *args, **kwargs: False)
    install, data = tmp_path / "lib", tmp_path / "data"
    install.mkdir()
    (install / "agent.pyz").write_bytes(zipapp("old"))
    binary = tmp_path / "agent-linux-arm64"
    binary.write_bytes(zipapp("arm"))
    fp.register([sys.executable, str(install / "agent.pyz"), "--version"], stdout="techulus-agent 0.1.0\n")
    fp.register([sys.executable, str(install / ".staging" / "agent.pyz"), "--version"], returncode=1,
                stderr="agent: cannot load _cffi_backend; is this the build for x86_64?\n")
    unit = FakeUnit(install, data)
    options = Options(binary=str(binary), data_dir=data, sha256=hashlib.sha256(binary.read_bytes()).hexdigest(),
                      install_dir=install, public_key=tmp_path / "none")
    record = Upgrade(options, systemd=unit).run()  # type: ignore[arg-type]
    assert record.outcome == "refused" and "does not start here" in record.reason and unit.restarts == 0
    assert (install / "agent.pyz").read_bytes() == zipapp("old")


@pytest.mark.parametrize(("behaviour", "kept"), [("good", {"old", "new-good"}), ("exits", {"old"})])
def test_extraction_dirs_of_builds_neither_current_nor_previous_are_pruned(
    box: dict[str, Any], monkeypatch: pytest.MonkeyPatch, behaviour: str, kept: set[str]
) -> None:
    root = box["tmp"] / "shiv"
    for build in ("old", "new-good", "new-exits", "older"):
        (root / f"agent.pyz_{build}").mkdir(parents=True)
        (root / f".agent.pyz_{build}_lock").touch()
    monkeypatch.setenv("SHIV_ROOT", str(root))
    binary, sha = new_build(box, behaviour)
    attempt(box, binary, sha)
    assert {p.name.split("_", 1)[1] for p in root.glob("agent.pyz_*")} == kept
    assert {p.name for p in root.glob(".*_lock")} == {f".agent.pyz_{build}_lock" for build in kept}


def test_agent_status_reads_the_last_outcome(box: dict[str, Any]) -> None:
    assert upgrade.last_outcome(box["data"]) is None
    binary, sha = new_build(box, "exits")
    attempt(box, binary, sha)
    outcome = upgrade.last_outcome(box["data"])
    assert outcome is not None and outcome["outcome"] == "rolled_back" and outcome["deadline_epoch"] > 0
    assert set(outcome) == {field.name for field in dataclasses.fields(upgrade.Record)}
    (box["data"] / "upgrade-state.json").write_text("{not json")
    assert upgrade.last_outcome(box["data"]) is None
