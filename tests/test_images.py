"""Unit tests of the image GC: only images this agent pulled, none a container uses, the
previous image of each service kept, only between the disk watermarks; and the podman
calls behind it (pytest-subprocess)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from agent.host.images import LEDGER_FILE, ImageGC, ImageLedger, Watermarks
from agent.host.podman import Podman, PodmanOptions
from agent.model import ExpectedContainer

ID_A, ID_B, ID_C, ID_D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


class FakeStore:
    """Podman's image side as the GC sees it; every removal frees `per_image` percent."""

    def __init__(self, images: dict[str, str], in_use: set[str], used: float, per_image: float = 5.0) -> None:
        self.images = dict(images)
        self.in_use = in_use
        self.used = used
        self.per_image = per_image
        self.removed: list[str] = []

    def storage_path(self) -> Path:
        return Path("/var/lib/containers/storage")

    def images_in_use(self) -> set[str]:
        return set(self.in_use)

    def image_id(self, reference: str) -> str | None:
        return self.images.get(reference)

    def remove_image(self, reference: str) -> bool:
        self.images.pop(reference)
        self.removed.append(reference)
        self.used -= self.per_image
        return True


def gc_for(store: FakeStore, ledger: ImageLedger, start: float = 85, stop: float = 80) -> ImageGC:
    return ImageGC(store, ledger, Watermarks(start, stop), usage=lambda _path: store.used)


def test_ledger_survives_a_restart_and_keeps_two_images_per_service(tmp_path: Path) -> None:
    ledger = ImageLedger(tmp_path / "images.json")
    ledger.note_pulled("r/app:1", ID_A, now=1)
    ledger.note_pulled("r/app:2", ID_B, now=2)
    for reference in ("r/app:1", "r/app:2", "r/app:2", "r/app:3"):
        ledger.note_deployed("svc", reference)
    again = ImageLedger(tmp_path / "images.json")
    assert again.pulled() == {"r/app:1": (ID_A, 1.0), "r/app:2": (ID_B, 2.0)}
    assert again.kept() == {"r/app:3", "r/app:2"}
    again.forget("r/app:1")
    assert set(ImageLedger(tmp_path / "images.json").pulled()) == {"r/app:2"}


def test_unreadable_ledger_starts_afresh(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "images.json").write_text("{garbled")
    with caplog.at_level(logging.WARNING):
        assert ImageLedger(tmp_path / "images.json").pulled() == {}
    assert "unreadable" in caplog.text


def test_gc_removes_only_our_unused_images_oldest_first_and_keeps_rollbacks(tmp_path: Path) -> None:
    ledger = ImageLedger(tmp_path / "images.json")
    for when, (reference, image_id) in enumerate(
        [("r/old:1", ID_A), ("r/app:1", ID_B), ("r/app:2", ID_C), ("r/used:1", ID_D), ("r/retagged:1", ID_A), ("r/gone:1", ID_A)]
    ):
        ledger.note_pulled(reference, image_id, now=when)
    ledger.note_deployed("svc", "r/app:1")
    ledger.note_deployed("svc", "r/app:2")  # r/app:1 is now the rollback image
    store = FakeStore(
        {
            "r/old:1": ID_A,
            "r/app:1": ID_B,
            "r/app:2": ID_C,
            "r/used:1": ID_D,
            "r/retagged:1": "e" * 64,  # someone pointed our tag at another image
            "someone/else:1": "f" * 64,  # never ours
        },
        in_use={ID_D},
        used=95,
        per_image=1,
    )
    assert gc_for(store, ledger).collect() == ["r/old:1"]
    assert store.removed == ["r/old:1"]
    assert "someone/else:1" in store.images and "r/used:1" in store.images and "r/app:1" in store.images
    assert set(ledger.pulled()) == {"r/app:1", "r/app:2", "r/used:1"}, "removed, re-tagged and vanished ones are forgotten"


def test_gc_runs_only_above_the_start_mark_and_stops_below_the_stop_mark(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ledger = ImageLedger(tmp_path / "images.json")
    references = [f"r/img:{n}" for n in range(5)]
    for when, reference in enumerate(references):
        ledger.note_pulled(reference, f"{when}" * 64, now=when)
    store = FakeStore({r: f"{n}" * 64 for n, r in enumerate(references)}, in_use=set(), used=85)
    gc = gc_for(store, ledger)
    assert gc.collect() == [] and store.removed == []  # 85 % is not above 85 %
    store.used = 91
    with caplog.at_level(logging.INFO):
        assert gc.collect() == ["r/img:0", "r/img:1", "r/img:2"]  # 91 -> 86 -> 81 -> 76 < 80
    assert "disk pressure: /var/lib/containers/storage is 91% used" in caplog.text
    assert "disk pressure cleared: /var/lib/containers/storage is 76% used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert gc.collect() == []
    assert caplog.text == "" and store.removed == ["r/img:0", "r/img:1", "r/img:2"]


def test_gc_under_pressure_with_nothing_of_ours_says_so_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = FakeStore({"someone/else:1": ID_A}, in_use=set(), used=97)
    gc = gc_for(store, ImageLedger(tmp_path / "images.json"))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert gc.collect() == []
    assert caplog.text.count("disk pressure") == 1 and caplog.text.count("no more unused images") == 1
    assert store.removed == []


# --- the podman side ---------------------------------------------------------------------------


@pytest.fixture
def podman(tmp_path: Path) -> Podman:
    return Podman(PodmanOptions(run_dir=tmp_path / "run", settle_time=0.01), sleep=lambda _s: None,
                  images=ImageLedger(tmp_path / "images.json"))


NGINX = "docker.io/library/nginx:1.27"


def register_image_id(fp: Any, reference: str, image_id: str | None) -> None:
    argv = ["podman", "image", "inspect", "--format", "{{.Id}}", "--", reference]
    if image_id is None:
        fp.register(argv, returncode=125, stderr="Error: no such image\n")
    else:
        fp.register(argv, stdout=f"{image_id}\n")


def test_pull_and_run_are_recorded(fp: Any, podman: Podman, tmp_path: Path) -> None:
    register_image_id(fp, NGINX, None)  # not on the host before: the agent brings it
    fp.register(["podman", "pull", "--quiet", "--", "docker.io/library/nginx:1.27"], stdout=f"{ID_A}\n", stderr="Copying blob\n")
    podman.pull("nginx:1.27")
    fp.register(["podman", "run", fp.any()], stdout=ID_B + "\n")
    inspect = [{"Id": ID_B, "Name": "web", "RestartCount": 0, "State": {"Status": "running", "Running": True},
                "Config": {"Labels": {}}}]
    fp.register(["podman", "container", "inspect", "--format", "json", ID_B], stdout=json.dumps(inspect))
    spec = ExpectedContainer(deployment_id="dep-1", service_id="svc1", service_name="web", name="web", image="nginx:1.27",
                             ip_address="")
    podman.run_container(spec, {}, tmp_path / "volumes")
    assert {ref: image_id for ref, (image_id, _when) in podman.images.pulled().items()} == {"docker.io/library/nginx:1.27": ID_A}
    assert podman.images.kept() == {"docker.io/library/nginx:1.27"}


def test_a_pull_claims_only_what_it_brought(fp: Any, podman: Podman) -> None:
    # The operator's nginx:1.27 was there before: a pull that finds the same image claims nothing.
    register_image_id(fp, NGINX, ID_A)
    fp.register(["podman", "pull", "--quiet", "--", NGINX], stdout=f"{ID_A}\n")
    podman.pull("nginx:1.27")
    assert podman.images.pulled() == {}
    # The tag moved upstream: the pull brought a new image, which is the agent's.
    register_image_id(fp, NGINX, ID_A)
    fp.register(["podman", "pull", "--quiet", "--", NGINX], stdout=f"{ID_B}\n")
    podman.pull("nginx:1.27")
    assert {ref: image_id for ref, (image_id, _when) in podman.images.pulled().items()} == {NGINX: ID_B}
    # A refresh of a reference the agent owns stays the agent's, unchanged or not.
    register_image_id(fp, NGINX, ID_B)
    fp.register(["podman", "pull", "--quiet", "--", NGINX], stdout=f"{ID_B}\n")
    podman.pull("nginx:1.27")
    assert {ref: image_id for ref, (image_id, _when) in podman.images.pulled().items()} == {NGINX: ID_B}


def test_down_purge_removes_only_ledger_owned_images(fp: Any, tmp_path: Path) -> None:
    # A service ran the operator's localhost/app:1 (never pulled by the agent): --down keeps it.
    from agent.teardown import _remove_images

    data = tmp_path / "data"
    data.mkdir()
    ledger = ImageLedger(data / LEDGER_FILE)
    ledger.note_pulled(NGINX, ID_A)
    ledger.note_deployed("svc1", "localhost/app:1")
    ledger.note_deployed("svc2", NGINX)
    fp.register(["podman", "image", "rm", "--", NGINX], stdout=f"Untagged: {NGINX}\n")
    _remove_images(Podman(PodmanOptions(run_dir=tmp_path / "run")), data)
    assert [list(call) for call in fp.calls] == [["podman", "image", "rm", "--", NGINX]]


def test_podman_image_calls(fp: Any, podman: Podman) -> None:
    fp.register(["podman", "info", "--format", "{{.Store.GraphRoot}}"], stdout="/var/lib/containers/storage\n",
                stderr='time="x" level=warning msg="cni"\n')
    assert podman.storage_path() == Path("/var/lib/containers/storage")
    fp.register(["podman", "ps", "--all", "--format", "json"],
                stdout=json.dumps([{"Id": "1" * 64, "ImageID": ID_A, "Image": "r/x:1"}, {"Id": "2" * 64}]))
    assert podman.images_in_use() == {ID_A, "r/x:1"}
    fp.register(["podman", "image", "inspect", "--format", "{{.Id}}", "--", "r/x:1"], stdout=f"{ID_A}\n")
    fp.register(["podman", "image", "inspect", "--format", "{{.Id}}", "--", "r/y:1"], returncode=125, stderr="Error: no such image\n")
    assert podman.image_id("r/x:1") == ID_A and podman.image_id("r/y:1") is None
    fp.register(["podman", "image", "rm", "--", "r/x:1"], stdout="Untagged: r/x:1\n")
    fp.register(["podman", "image", "rm", "--", "r/y:1"], returncode=2, stderr="Error: image used by container\n")
    assert podman.remove_image("r/x:1") and not podman.remove_image("r/y:1")
    assert not any("--force" in list(call) or "prune" in list(call) for call in fp.calls)
