"""The claim answer of a build, validated (PROTOCOL.md §6.6): one place decides what a
build may ask for, so the stages after it only see a ClaimedBuild they can trust."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from agent import validate

log = logging.getLogger(__name__)

_SHA = re.compile(r"[0-9a-fA-F]{7,40}\Z")
_BRANCH = re.compile(r"[A-Za-z0-9._/+-]{1,255}\Z")
#: Spaces and control characters: never valid in a URL or address the tools are given.
CONTROL_CHARS = re.compile(r"[\x00-\x20\x7f]")


# Secret names that would change how the build tools themselves behave if they landed in
# their environment (the values are put there verbatim): refused with a build-log line.
_RESERVED_ENV = frozenset({
    "PATH", "HOME", "SHELL", "USER", "LOGNAME", "PWD", "IFS", "ENV", "BASH_ENV", "TMPDIR", "TERM",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy", "all_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "GODEBUG", "GOMAXPROCS", "GOTRACEBACK", "GOGC", "TZ",
})
_RESERVED_PREFIXES = ("LD_", "GIT_", "BUILDKIT_", "BUILDCTL_", "DOCKER_", "XDG_", "TECHULUS_", "GCONV_", "MALLOC_")


class BuildError(Exception):
    """A build failed; the message is safe to show (no credentials) and goes to the CP."""


class BuildAborted(BuildError):
    """Cancelled in the UI, timed out or interrupted by agent shutdown."""


@dataclass(frozen=True)
class Credentials:
    username: str = field(repr=False, default="")
    password: str = field(repr=False, default="")

    def __bool__(self) -> bool:
        return bool(self.username or self.password)


@dataclass(frozen=True)
class ClaimedBuild:
    id: str
    commit_sha: str
    branch: str
    service_id: str
    project_id: str
    clone_url: str  # without credentials
    credentials: Credentials
    image_uri: str
    secrets: Mapping[str, str] = field(repr=False, default_factory=dict)  # still encrypted


def split_credentials(url: Any) -> tuple[str, Credentials]:
    """`https://user:token@host/x.git` -> (`https://host/x.git`, credentials); only http(s)."""
    if not isinstance(url, str) or not url or CONTROL_CHARS.search(url):
        raise BuildError("cloneUrl is missing or contains spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise BuildError(f"cloneUrl must be an http(s) URL, not {parts.scheme or 'a bare path'}://…")
    host = parts.hostname
    if not host:
        raise BuildError("cloneUrl has no host")
    try:
        port = parts.port
    except ValueError as exc:
        raise BuildError("cloneUrl has an invalid port") from exc
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    creds = Credentials(unquote(parts.username or ""), unquote(parts.password or ""))
    if creds and parts.scheme != "https":
        # Anyone on the path would read the installation token off the wire.
        raise BuildError("cloneUrl carries credentials over plain http://; refusing to send them unencrypted (use https://)")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")), creds


def parse_claim(answer: Any, build_id: str) -> ClaimedBuild:
    """Validate the claim answer (§6.6); raises BuildError naming the bad field."""
    if not isinstance(answer, dict) or not isinstance(answer.get("build"), dict):
        raise BuildError("claim answer has no build object")
    build = answer["build"]
    if build.get("id") not in (None, build_id):
        raise BuildError("claim answer is for a different build")
    sha = build.get("commitSha") or "HEAD"
    if not isinstance(sha, str) or (sha != "HEAD" and not _SHA.match(sha)):
        raise BuildError(f"commitSha {str(sha)[:50]!r} is neither HEAD nor a hex commit id")
    branch = build.get("branch") or "main"
    if not isinstance(branch, str) or not valid_branch(branch):
        raise BuildError(f"branch {str(branch)[:80]!r} is not a valid git branch name")
    try:
        service_id = validate.identifier(build.get("serviceId"), "serviceId")
        project_id = validate.identifier(build.get("projectId"), "projectId")
        image = validate.image_reference(answer.get("imageUri"))
    except ValueError as exc:
        raise BuildError(str(exc)) from exc
    if image.startswith("-") or "," in image:
        raise BuildError("imageUri is not a valid image reference")
    url, creds = split_credentials(answer.get("cloneUrl"))
    raw_secrets = answer.get("secrets") or {}
    if not isinstance(raw_secrets, dict):
        raise BuildError("secrets must be an object")
    secrets: dict[str, str] = {}
    for key, value in raw_secrets.items():
        if isinstance(key, str) and isinstance(value, str):
            secrets[key] = value
    return ClaimedBuild(build_id, sha.lower() if sha != "HEAD" else sha, branch, service_id, project_id, url, creds, image, secrets)


def valid_branch(name: str) -> bool:
    """A safe subset of git's ref-name rules; nothing that could read as an option."""
    return bool(
        _BRANCH.match(name)
        and not name.startswith(("-", "/", "."))
        and not name.endswith(("/", ".", ".lock"))
        and ".." not in name
        and "//" not in name
        and "/." not in name
    )


def reserved_env_name(name: str) -> bool:
    return name in _RESERVED_ENV or name.startswith(_RESERVED_PREFIXES)
