"""The checkout stage of a build: git clone of the claimed commit with the token handed over
by GIT_ASKPASS only (never argv, disk or a redirect's host), then the symlink check that keeps
root-run tools inside the tenant's tree."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from agent import fsutil
from agent.builds.claim import BuildAborted, BuildError, Credentials
from agent.builds.context import BuildContext, StepRunner, require_tool
from agent.host.run import CommandError, run

log = logging.getLogger(__name__)

# Answers git's credential prompts from the environment (nothing secret is in this file),
# and only for the clone URL's own origin: git's prompt is `Password for
# 'https://user@host:port': `, and a prompt for any other origin (a redirect, a submodule)
# gets no answer, so git fails instead of handing the token to someone else.
ASKPASS_SCRIPT = """#!/bin/sh
url=${1#*\\'}
url=${url%\\'*}
rest=${url#*://}
origin="${url%%://*}://${rest##*@}"
[ "$origin" = "$TECHULUS_GIT_ORIGIN" ] || exit 1
case "$1" in
  Username*) printf '%s\\n' "$TECHULUS_GIT_USERNAME" ;;
  Password*) printf '%s\\n' "$TECHULUS_GIT_PASSWORD" ;;
  *) exit 1 ;;
esac
"""


def askpass_origin(clone_url: str) -> str:
    """`scheme://host[:port]` of a credential-free clone URL, as git names it in its prompts."""
    parts = urlsplit(clone_url)
    return f"{parts.scheme}://{parts.netloc}"


def check_symlinks(root: Path) -> None:
    """Refuse a checkout with a symlink that is absolute or resolves outside it.

    railpack (and anything else we run as root over the tree) reads and writes files by
    name and follows links: `.nvmrc -> /var/lib/techulus-agent/config.json` would copy the
    encryption key into the tenant-visible build log. Links inside the tree are fine.
    The top-level `.git` is git's own, written by us, and not walked.
    """
    top = str(root)
    real_root = os.path.realpath(top)

    def fail(error: OSError) -> None:
        raise BuildError(f"cannot inspect the checkout: {error.strerror or error}")

    for dirpath, dirnames, filenames in os.walk(top, onerror=fail, followlinks=False):
        if dirpath == top and ".git" in dirnames and not os.path.islink(os.path.join(top, ".git")):
            dirnames.remove(".git")
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                continue
            rel = os.path.relpath(path, top)
            try:
                target = os.readlink(path)
            except OSError as exc:
                raise BuildError(f"cannot read the symbolic link {rel!r} in the repository: {exc.strerror}") from exc
            resolved = os.path.realpath(path)
            inside = resolved == real_root or resolved.startswith(real_root.rstrip(os.sep) + os.sep)
            if os.path.isabs(target) or not inside:
                raise BuildError(
                    f"the repository contains a symbolic link that points outside it: {rel[:200]!r} -> {target[:200]!r}; "
                    "builds refuse such links (replace it with a copy of the file or a link inside the repository)"
                )


def clone(ctx: BuildContext, step: StepRunner) -> None:
    """Clone the claimed commit into ctx.workdir with the token kept out of argv and disk."""
    build = ctx.build
    require_tool("git")
    shutil.rmtree(ctx.workdir, ignore_errors=True)
    fsutil.ensure_dir(ctx.workdir.parent, 0o700)
    askpass_dir = Path(tempfile.mkdtemp(prefix=".git-auth-", dir=ctx.workdir.parent))  # 0700
    try:
        env = git_env(askpass_dir, build.credentials, build.clone_url)
        target = f"commit {build.commit_sha}" if build.commit_sha != "HEAD" else "latest commit"
        ctx.logs.line(f"Cloning {build.clone_url} (branch {build.branch}, {target})")
        step(ctx, ["git", "clone", "--depth", "1", "--branch", build.branch, "--", build.clone_url, str(ctx.workdir)], "git clone", env=env)
        if build.commit_sha != "HEAD":
            try:
                step(ctx, ["git", "-C", str(ctx.workdir), "fetch", "--depth", "1", "origin", build.commit_sha], "git fetch", env=env)
            except BuildAborted:
                raise
            except BuildError as exc:
                ctx.logs.line(f"Fetching the commit directly failed ({exc}); fetching the branch history instead")
                step(ctx, ["git", "-C", str(ctx.workdir), "fetch", "--unshallow", "origin", build.branch], "git fetch --unshallow", env=env)
            try:
                step(ctx, ["git", "-C", str(ctx.workdir), "-c", "advice.detachedHead=false", "checkout", "--detach", build.commit_sha, "--"], "git checkout", env=env)
            except BuildAborted:
                raise
            except BuildError as exc:
                raise BuildError(f"commit {build.commit_sha} not found in {build.clone_url} (branch {build.branch})") from exc
        head = git_head(ctx, env)
        if build.commit_sha != "HEAD" and not head.startswith(build.commit_sha):
            raise BuildError(f"checked out {head} but the build asked for {build.commit_sha}")
        # Before any tool reads the tree, in both build modes (§17 item 4's cousin: root
        # tools following tenant symlinks).
        check_symlinks(ctx.workdir)
        ctx.logs.line(f"Clone completed at commit {head}")
    finally:
        shutil.rmtree(askpass_dir, ignore_errors=True)


def git_env(private_dir: Path, creds: Credentials, clone_url: str) -> dict[str, str]:
    env = {
        "HOME": str(private_dir),  # no ~/.gitconfig, no credential store of root's
        "XDG_CONFIG_HOME": str(private_dir),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ALLOW_PROTOCOL": "http:https",
        "GIT_LFS_SKIP_SMUDGE": "1",
        # An empty helper clears any configured one: git keeps the token nowhere.
        "GIT_CONFIG_COUNT": "2",
        "GIT_CONFIG_KEY_0": "credential.helper",
        "GIT_CONFIG_VALUE_0": "",
        # No redirect is followed, not even git's default "initial" one: the token
        # must only ever go to the host the control plane named.
        "GIT_CONFIG_KEY_1": "http.followRedirects",
        "GIT_CONFIG_VALUE_1": "false",
        "GIT_ASKPASS": "",
        "SSH_ASKPASS": "",
    }
    if creds:
        script = private_dir / "askpass"
        fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "w") as handle:
            handle.write(ASKPASS_SCRIPT)
        env.update({
            "GIT_ASKPASS": str(script),
            "TECHULUS_GIT_USERNAME": creds.username or "x-access-token",
            "TECHULUS_GIT_PASSWORD": creds.password,
            "TECHULUS_GIT_ORIGIN": askpass_origin(clone_url),
        })
    return env


def git_head(ctx: BuildContext, env: Mapping[str, str]) -> str:
    remaining = max(1.0, ctx.deadline - time.monotonic())
    try:
        result = run(["git", "-C", str(ctx.workdir), "rev-parse", "HEAD"], timeout=min(60.0, remaining), env=env)
    except CommandError as exc:
        raise BuildError(f"cannot read the checked-out commit: {ctx.redact(str(exc))}") from exc
    return result.stdout.strip().lower()

