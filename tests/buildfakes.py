"""Test doubles for the build worker (no tests here): a token-protected smart-HTTP git server on loopback
(`git http-backend` behind http.server), fake `buildctl`/`railpack` and a recording `git`
wrapper put first on PATH, and a minimal in-memory control plane."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from agent.api import Rejected, Unavailable

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "HOME": "/nonexistent", "GIT_CONFIG_NOSYSTEM": "1"}


def git(*args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


class Link(str):
    """A file content that make_repo commits as a symbolic link to this target."""


def make_repo(root: Path, files_by_commit: list[dict[str, str]], name: str = "app.git") -> tuple[Path, list[str]]:
    """A bare repo served from `root/name` with one commit per dict on branch main
    (a `Link` value becomes a committed symlink)."""
    work = root / (name + "-work")
    work.mkdir(parents=True)
    git("init", "-q", "-b", "main", str(work))
    shas = []
    for files in files_by_commit:
        for rel, content in files.items():
            path = work / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Link):
                os.symlink(content, path)
            else:
                path.write_text(content)
        git("add", "-A", cwd=work)
        git("commit", "-q", "-m", f"commit {len(shas)}", cwd=work)
        shas.append(git("rev-parse", "HEAD", cwd=work))
    bare = root / name
    git("clone", "-q", "--bare", str(work), str(bare))
    git("config", "uploadpack.allowAnySHA1InWant", "true", cwd=bare)
    return bare, shas


def make_tls_files(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (cert, key); git trusts it via GIT_SSL_CAINFO."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


class GitHttpServer:
    """Smart HTTP (so shallow clones and fetch-by-sha work) that demands Basic auth, over
    TLS when given a (cert, key); `redirects` maps a repo name to a URL base it 302s to."""

    def __init__(self, project_root: Path, username: str = "x-access-token", token: str | None = None,
                 tls: tuple[Path, Path] | None = None, redirects: dict[str, str] | None = None) -> None:
        self.project_root = project_root
        self.expected_auth = None
        if token is not None:
            self.expected_auth = "Basic " + base64.b64encode(f"{username}:{token}".encode()).decode()
        self.authorized = 0
        self.refused = 0
        self.requests: list[str] = []
        self.seen_auth: list[str] = []
        self.redirects = dict(redirects or {})
        self.scheme = "https" if tls else "http"
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self._serve(b"")

            def do_POST(self) -> None:  # noqa: N802
                self._serve(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

            def _serve(self, body: bytes) -> None:
                server.requests.append(self.path)
                if self.headers.get("Authorization"):
                    server.seen_auth.append(self.headers["Authorization"])
                repo, _, rest = self.path.lstrip("/").partition("/")
                if repo in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", f"{server.redirects[repo]}/{rest}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if server.expected_auth is not None:
                    if self.headers.get("Authorization") != server.expected_auth:
                        server.refused += 1
                        self.send_response(401)
                        self.send_header("WWW-Authenticate", 'Basic realm="git"')
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    server.authorized += 1
                path, _, query = self.path.partition("?")
                env = {
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "GIT_PROJECT_ROOT": str(server.project_root), "GIT_HTTP_EXPORT_ALL": "1",
                    "REQUEST_METHOD": self.command, "PATH_INFO": path, "QUERY_STRING": query,
                    "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
                    "REMOTE_ADDR": "127.0.0.1", "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
                    "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
                }
                result = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, check=False)
                head, _, payload = result.stdout.partition(b"\r\n\r\n")
                status = 200
                headers = []
                for line in head.decode("latin-1").split("\r\n"):
                    key, _, value = line.partition(":")
                    if key.lower() == "status":
                        status = int(value.strip().split()[0])
                    elif key:
                        headers.append((key, value.strip()))
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def url(self, name: str = "app.git", userinfo: str = "") -> str:
        return f"{self.scheme}://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


# A fake tool: records argv, cwd, selected env and what /proc says about everyone's argv.
FAKE_TOOL = r'''#!{python}
import json, os, signal, subprocess, sys, time
name = os.path.basename(sys.argv[0])
control = json.load(open({control!r}))
secret_words = control.get("secret_words", [])
if name == "railpack" and sys.argv[1:] == ["--version"]:
    print(control.get("railpack_version", "railpack version 0.15.4"))
    sys.exit(0)
cmdlines = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            cmdlines.append(open(f"/proc/{{pid}}/cmdline", "rb").read().decode("utf-8", "replace"))
        except OSError:
            pass
leaks = [w for w in secret_words if any(w in c for c in cmdlines)]
record = {{"tool": name, "argv": sys.argv[1:], "cwd": os.getcwd(), "pid": os.getpid(), "leaks": leaks,
          "env": {{k: v for k, v in os.environ.items() if k in control.get("env_keys", [])}}}}
if name == "buildctl" and os.path.exists("version.txt"):
    record["version"] = open("version.txt").read()
if name == "railpack":
    record["plan_in_checkout"] = os.path.lexists("railpack-plan.json")
if name == "buildctl":
    for arg in sys.argv:
        if arg.startswith("dockerfile=") and os.path.isfile(os.path.join(arg[11:], "railpack-plan.json")):
            record["plan"] = open(os.path.join(arg[11:], "railpack-plan.json")).read()
mode = control.get(name, "ok")
if mode == "sleep":
    child = subprocess.Popen(["sleep", "300"])
    record["child"] = child.pid
with open({records!r}, "a") as f:
    f.write(json.dumps(record) + "\n")
if name == "git":
    os.execv("/usr/bin/git", ["git"] + sys.argv[1:])
print(f"{{name}}: starting")
sys.stdout.flush()
if mode == "sleep":
    time.sleep(300)
if mode == "selfkill":
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "fail":
    print("error: failed to solve: something broke", file=sys.stderr)
    sys.exit(1)
if name == "railpack":
    # Like the real one: reads version files by name and prints what it found, then writes
    # --plan-out with a plain open-and-truncate (both follow symlinks).
    for version_file in (".nvmrc", ".python-version"):
        if os.path.exists(version_file):
            print(f"Detected version from {{version_file}}: {{open(version_file).read().strip()}}")
    plan_out = sys.argv[sys.argv.index("--plan-out") + 1]
    open(plan_out, "w").write('{{"steps": []}}')
if name == "buildctl":
    print("#1 [internal] load build definition")
    print("")
    print("#9 exporting to image")
    print("#9 pushing layers 0.1s done")
sys.exit(0)
'''


class FakeTools:
    def __init__(self, directory: Path, tools: tuple[str, ...] = ("git", "buildctl", "railpack")) -> None:
        self.bin = directory / "bin"
        self.bin.mkdir(parents=True)
        self.records_path = directory / "tool-records.jsonl"
        self.control_path = directory / "tool-control.json"
        self.control: dict[str, Any] = {"env_keys": [], "secret_words": []}
        self.save()
        for tool in tools:
            self.add(tool)

    def add(self, tool: str) -> None:
        path = self.bin / tool
        path.write_text(FAKE_TOOL.format(python=sys.executable, control=str(self.control_path), records=str(self.records_path)))
        path.chmod(0o755)

    def remove(self, tool: str) -> None:
        (self.bin / tool).unlink()

    def save(self) -> None:
        self.control_path.write_text(json.dumps(self.control))

    def set(self, **values: Any) -> None:
        self.control.update(values)
        self.save()

    def records(self, tool: str | None = None) -> list[dict[str, Any]]:
        if not self.records_path.exists():
            return []
        rows = [json.loads(line) for line in self.records_path.read_text().splitlines()]
        return [r for r in rows if tool is None or r["tool"] == tool]


class StubControlPlane:
    """Just the four build endpoints, in memory, with the real client's error types."""

    def __init__(self) -> None:
        self.builds: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.status: dict[str, str] = {}
        self.updates: list[tuple[str, str, str]] = []
        self.lost_race: set[str] = set()
        self.unreachable = False
        self.pending_calls = 0
        self.lock = threading.Lock()

    def add(self, build_id: str, claim: dict[str, Any]) -> None:
        self.builds[build_id] = claim
        self.order.append(build_id)
        self.status[build_id] = "pending"

    def _check(self) -> None:
        if self.unreachable:
            raise Unavailable("cannot reach the control plane")

    def pending_build(self) -> dict[str, Any] | None:
        self._check()
        with self.lock:
            self.pending_calls += 1
            for build_id in self.order:
                if self.status[build_id] == "pending":
                    return {"id": build_id, "commitSha": "HEAD", "branch": "main", "serviceId": "svc"}
        return None

    def claim_build(self, build_id: str) -> dict[str, Any] | None:
        self._check()
        with self.lock:
            if build_id in self.lost_race or self.status.get(build_id) != "pending":
                self.status[build_id] = "claimed"
                return None
            self.status[build_id] = "claimed"
            return self.builds[build_id]

    def build_status(self, build_id: str, status: str, error: str = "") -> dict[str, Any]:
        self._check()
        with self.lock:
            if build_id not in self.status:
                raise Rejected("POST builds status: 404 Build not found or not claimed by this agent", 404)
            self.updates.append((build_id, status, error))
            if self.status[build_id] == "cancelled":
                return {"ok": True, "cancelled": True}
            self.status[build_id] = status
        return {"ok": True}

    def get_build_status(self, build_id: str) -> str:
        self._check()
        return self.status.get(build_id, "")

    def statuses(self, build_id: str) -> list[str]:
        return [s for b, s, _ in self.updates if b == build_id]

    def final(self, build_id: str) -> tuple[str, str]:
        rows = [(s, e) for b, s, e in self.updates if b == build_id]
        return rows[-1]
