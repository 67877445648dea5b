"""A real image registry on loopback for pull tests (TESTBED.md: Debian's docker-registry).

`local_registry` starts `docker-registry serve` on 127.0.0.1 with a free port and storage in
a temp dir, waits until `/v2/` answers, and stops it afterwards. It speaks plain HTTP, so a
pull from it fails unless the registry is configured as insecure, which is exactly what the
adapter's insecure-registry setting must decide. Import with
`from tests.registry import local_registry  # noqa: F401`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REGISTRY_BINARY = "docker-registry"

CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


@dataclass(frozen=True)
class LocalRegistry:
    port: int
    root: Path

    @property
    def host(self) -> str:
        """`127.0.0.1:PORT`, the registry part of image references and of the insecure list."""
        return f"127.0.0.1:{self.port}"

    def push(self, local_image: str, repository: str) -> str:
        """Push a local image as `<host>/<repository>`; returns the pushed reference."""
        reference = f"{self.host}/{repository}"
        subprocess.run(
            ["podman", "push", "--quiet", "--tls-verify=false", local_image, reference],
            capture_output=True, text=True, check=True, timeout=60,
        )
        return reference


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=0.5) as response:  # noqa: S310 - loopback
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _start(workdir: Path) -> tuple[subprocess.Popen[bytes], LocalRegistry]:
    """Start the registry on a free port; retries when another process took the port first."""
    last_output = b""
    for attempt in range(5):
        port = free_port()
        root = workdir / f"data-{attempt}"
        root.mkdir()
        config = workdir / f"config-{attempt}.yml"
        config.write_text(CONFIG.format(root=root, port=port))
        log_path = workdir / f"registry-{attempt}.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(config)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(port):
                return proc, LocalRegistry(port, root)
            time.sleep(0.05)
        _stop(proc)
        last_output = log_path.read_bytes()[-2000:]
    raise RuntimeError(f"docker-registry did not start: {last_output.decode(errors='replace')}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def local_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    if shutil.which(REGISTRY_BINARY) is None:
        pytest.skip("needs docker-registry (apt-get install docker-registry; scripts/install-test-deps.sh)")
    proc, registry = _start(tmp_path_factory.mktemp("registry"))
    try:
        yield registry
    finally:
        _stop(proc)
