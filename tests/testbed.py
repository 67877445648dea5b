"""Real Podman for tests, as ../shared/TESTBED.md describes it.

Gives each test run its own containers.conf (ulimits and runc fixes for this VM), a tiny
busybox image built locally (no registry needed), a unique scope label so parallel runs
never see each other's containers, and a bridge network on a free 10.200.X.0/24 subnet.
Import the fixtures from a test module with `from tests.testbed import *  # noqa: F403`.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
[network]
network_backend = "netavark"
"""

BB_IMAGE = "localhost/techulus-test-bb:latest"
# The same image whose default command serves /www on port 80 (the model has no command field).
HTTPD_IMAGE = "localhost/techulus-test-httpd:latest"
# Prints tick-N on stdout and err-N on stderr five times a second (for log shipping).
TICKER_IMAGE = "localhost/techulus-test-ticker:latest"
TICKER_CMD = 'CMD ["sh","-c","i=0; while true; do echo tick-$i; echo err-$i >&2; i=$((i+1)); sleep 0.2; done"]'



def podman_available() -> bool:
    return shutil.which("podman") is not None and os.geteuid() == 0


requires_podman = pytest.mark.skipif(not podman_available(), reason="needs root and podman (scripts/install-test-deps.sh)")


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check, timeout=timeout)


def _build_busybox_image(workdir: Path) -> None:
    _build_rootfs(workdir)
    podman("import", "--change", 'CMD ["/bin/sh"]', str(_image_tar(workdir)), BB_IMAGE)


def _build_rootfs(workdir: Path) -> None:
    rootfs = workdir / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    for sub in ("www", "tmp", "etc", "data"):
        (rootfs / sub).mkdir()
    shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "www" / "index.html").write_text("hello from techulus test\n")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")


def _image_tar(workdir: Path) -> Path:
    tar_path = workdir / "bb.tar"
    if not tar_path.exists():
        if not (workdir / "rootfs").exists():
            _build_rootfs(workdir)
        with tarfile.open(tar_path, "w") as tar:
            tar.add(workdir / "rootfs", arcname=".")
    return tar_path


def prepare_podman(workdir: Path) -> Path:
    """Write the containers.conf, point CONTAINERS_CONF at it, build the test images."""
    conf = workdir / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    os.environ["CONTAINERS_CONF"] = str(conf)
    if podman("image", "exists", BB_IMAGE, check=False).returncode != 0:
        _build_busybox_image(workdir)
    if podman("image", "exists", HTTPD_IMAGE, check=False).returncode != 0:
        podman("import", "--change", 'CMD ["httpd","-f","-p","80","-h","/www"]', str(_image_tar(workdir)), HTTPD_IMAGE)
    if podman("image", "exists", TICKER_IMAGE, check=False).returncode != 0:
        podman("import", "--change", TICKER_CMD, str(_image_tar(workdir)), TICKER_IMAGE)
    return conf


@pytest.fixture(scope="session")
def podman_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Points podman (and every child, the agent included) at the test containers.conf."""
    if not podman_available():
        pytest.skip("needs root and podman (scripts/install-test-deps.sh)")
    old = os.environ.get("CONTAINERS_CONF")
    conf = prepare_podman(tmp_path_factory.mktemp("podman"))
    yield conf
    if old is None:
        os.environ.pop("CONTAINERS_CONF", None)
    else:
        os.environ["CONTAINERS_CONF"] = old


@dataclass(frozen=True)
class TestNetwork:
    __test__ = False  # not a test class, despite the name

    name: str
    subnet_id: int
    scope_label: str

    @property
    def subnet(self) -> str:
        return f"10.200.{self.subnet_id}.0/24"

    @property
    def gateway(self) -> str:
        return f"10.200.{self.subnet_id}.1"

    def ip(self, host: int) -> str:
        return f"10.200.{self.subnet_id}.{host}"


def cleanup_scope(scope_label: str) -> None:
    ids = podman("ps", "-aq", "--filter", f"label={scope_label}", check=False).stdout.split()
    if ids:
        podman("rm", "-f", "-t", "0", *ids, check=False)


def create_network(owner: str = "") -> TestNetwork:
    """A fresh bridge on a free 10.200.X.0/24 with a unique scope label (and `owner`'s
    techulus.owner mark, as the agent makes its own)."""
    mark = [f"--label=techulus.owner={owner}"] if owner else []
    scope = f"techulus.test.scope={uuid.uuid4().hex[:12]}"
    candidates = list(range(100, 250))
    random.shuffle(candidates)
    for subnet_id in candidates:
        name = f"tt{uuid.uuid4().hex[:10]}"
        result = podman(
            "network", "create", "--driver", "bridge", "--subnet", f"10.200.{subnet_id}.0/24",
            "--gateway", f"10.200.{subnet_id}.1", "--disable-dns", *mark, name, check=False,
        )
        if result.returncode == 0:
            break
    else:  # pragma: no cover
        raise RuntimeError("no free 10.200.X.0/24 subnet for a test network")
    return TestNetwork(name, subnet_id, scope)


def remove_network(net: TestNetwork) -> None:
    cleanup_scope(net.scope_label)
    podman("network", "rm", "-f", net.name, check=False)


@pytest.fixture
def podman_net(podman_env: Path) -> Iterator[TestNetwork]:
    """A fresh bridge on a free 10.200.X.0/24 and a scope label; both removed afterwards."""
    net = create_network()
    try:
        yield net
    finally:
        remove_network(net)


# Rollout images (tests/test_e2e_rollout.py, bench/bench_rollout.py): busybox httpd writing its
# own page at start. ROLLOUT_HEALTH_CMD fetches /health: v1 and v2 pass it; "broken" serves
# nothing (404 everywhere, as the broken image of issue 9 did) and fails it.
ROLLOUT_V1 = "localhost/techulus-rollout:v1"
ROLLOUT_V2 = "localhost/techulus-rollout:v2"
ROLLOUT_BROKEN = "localhost/techulus-rollout:broken"
ROLLOUT_HEALTH_CMD = "wget -q -O /dev/null http://127.0.0.1/health"
_SERVE = "mkdir -p /tmp/www && {setup} exec httpd -f -p 80 -h /tmp/www"
ROLLOUT_SCRIPTS = {
    ROLLOUT_V1: _SERVE.format(setup="echo v1 > /tmp/www/index.html && echo ok > /tmp/www/health &&"),
    ROLLOUT_V2: _SERVE.format(setup="echo v2 > /tmp/www/index.html && echo ok > /tmp/www/health &&"),
    ROLLOUT_BROKEN: _SERVE.format(setup=""),
}


def prepare_rollout_images(workdir: Path) -> None:
    """The three rollout images, each built once per machine (after prepare_podman/podman_env)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for image, script in ROLLOUT_SCRIPTS.items():
        if podman("image", "exists", image, check=False).returncode != 0:
            podman("import", "--change", f'CMD ["sh","-c","{script}"]', str(_image_tar(workdir)), image)
