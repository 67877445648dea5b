"""The build-and-push stage: BuildKit (`buildctl`) with the checkout's Dockerfile, or a
Railpack plan (PROTOCOL.md §13.4) written into a directory of the agent's, never the
tenant's checkout; the argv builders are pure so the tests can pin them."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.builds.claim import CONTROL_CHARS, BuildError
from agent.builds.context import BuildContext, StepRunner, require_tool
from agent.host.run import CommandError, run

log = logging.getLogger(__name__)

#: The BuildKit frontend of §13.4 and the railpack CLI release it belongs to: one railpack
#: release makes both, and a plan from another CLI release may not mean the same to this
#: frontend. What the agent relies on in the CLI (0.15.4): `prepare DIR --plan-out FILE`
#: (creates FILE's directory, writes JSON) and `--env NAME`, which takes NAME's value from
#: railpack's own environment. A different installed CLI gets a warning in the build log.
RAILPACK_VERSION = "0.15.4"
RAILPACK_FRONTEND = f"ghcr.io/railwayapp/railpack-frontend:v{RAILPACK_VERSION}"
PLAN_FILE = "railpack-plan.json"
PLAN_DIR_PREFIX = ".plan-"
_VERSION = re.compile(r"\bv?(\d+\.\d+\.\d+)\b")


def secrets_hash(secrets: Mapping[str, str]) -> str:
    """§13.4: sha256 over `K=V\\n` for the keys in ascending order."""
    text = "".join(f"{key}={secrets[key]}\n" for key in sorted(secrets))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def buildkit_output(image: str, insecure: bool) -> str:
    return f"type=image,name={image},push=true" + (",registry.insecure=true" if insecure else "")


def dockerfile_argv(addr: str, output: str, secret_names: list[str], buildctl: str = "buildctl") -> list[str]:
    argv = [buildctl, "--addr", addr, "build", "--frontend", "dockerfile.v0",
            "--local", "context=.", "--local", "dockerfile=.", "--output", output]
    for name in secret_names:
        argv += ["--secret", f"id={name},env={name}"]
    return argv


def railpack_prepare_argv(secret_names: list[str], plan_dir: str, railpack: str = "railpack") -> list[str]:
    # Deviation from §13.4 (`--plan-out railpack-plan.json`, inside the checkout): railpack
    # runs as root and writes the plan with a plain open-and-truncate that follows symlinks,
    # so a committed `railpack-plan.json -> /etc/passwd` would overwrite a host file. The
    # plan goes to a directory the agent owns instead.
    argv = [railpack, "prepare", ".", "--plan-out", os.path.join(plan_dir, PLAN_FILE)]
    for name in secret_names:
        argv += ["--env", name]  # bare name: railpack reads the value from its environment
    return argv


def railpack_build_argv(
    addr: str,
    output: str,
    secrets: Mapping[str, str],
    plan_dir: str,
    buildctl: str = "buildctl",
    frontend: str = RAILPACK_FRONTEND,
) -> list[str]:
    # As §13.4 except `--local dockerfile=<plan_dir>` (not `.`): the plan is read from the
    # agent's own directory, never from the tenant's checkout (see railpack_prepare_argv).
    argv = [buildctl, "--addr", addr, "build", "--frontend", "gateway.v0", "--opt", f"source={frontend}",
            "--local", "context=.", "--local", f"dockerfile={plan_dir}", "--opt", f"filename={PLAN_FILE}", "--output", output]
    if secrets:
        argv += ["--opt", f"build-arg:secrets-hash={secrets_hash(secrets)}"]
    for name in sorted(secrets):
        argv += ["--secret", f"id={name},env={name}"]
    return argv


def _remove_no_follow(path: Path) -> bool:
    """Remove `path` itself (a link is unlinked, never followed); True when something was there."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path)  # rmtree does not follow links inside it either
    else:
        os.unlink(path)
    return True


def plan_dir(builds_dir: str | Path, build_id: str) -> Path:
    """Where railpack writes the plan: the agent's, beside (not inside) the checkout.
    The leading dot keeps it from ever being a build id (those start with a letter or digit)."""
    return Path(builds_dir) / f"{PLAN_DIR_PREFIX}{build_id}"


def build_and_push(ctx: BuildContext, settings: Any, plaintext: Mapping[str, str], step: StepRunner) -> None:
    """Build the checkout (its Dockerfile, else a Railpack plan) and push the image."""
    build = ctx.build
    addr = settings.buildkit_host
    if not addr or addr.startswith("-") or CONTROL_CHARS.search(addr):
        raise BuildError(f"BUILDKIT_HOST {addr!r} is not a usable address")
    output = buildkit_output(build.image_uri, settings.registry_insecure_push)
    names = sorted(plaintext)
    env = dict(plaintext)
    dockerfile = ctx.workdir / "Dockerfile"
    if dockerfile.is_file() and not dockerfile.is_symlink():
        ctx.logs.line("Using existing Dockerfile")
        ctx.logs.line(f"Building and pushing {build.image_uri}")
        step(ctx, dockerfile_argv(addr, output, names), "buildctl build", env=env, watch_push=True)
        return
    ctx.logs.line("No Dockerfile found, using Railpack...")
    require_tool("railpack")
    try:
        if _remove_no_follow(ctx.workdir / PLAN_FILE):
            ctx.logs.line(f"Ignoring the {PLAN_FILE} committed in the repository: Railpack writes its own plan")
    except OSError as exc:
        raise BuildError(f"cannot remove {PLAN_FILE} from the checkout: {exc.strerror}") from exc
    check_railpack_version(ctx)
    plan = plan_dir(settings.builds_dir, build.id)
    shutil.rmtree(plan, ignore_errors=True)
    os.mkdir(plan, 0o700)
    step(ctx, railpack_prepare_argv(names, str(plan)), "railpack prepare", env=env)
    plan_file = plan / PLAN_FILE
    if not plan_file.is_file() or plan_file.is_symlink():
        raise BuildError("railpack prepare wrote no build plan")
    ctx.logs.line(f"Building and pushing {build.image_uri}")
    step(ctx, railpack_build_argv(addr, output, plaintext, str(plan), frontend=settings.railpack_frontend or RAILPACK_FRONTEND), "buildctl build", env=env, watch_push=True)


def check_railpack_version(ctx: BuildContext) -> None:
    """Say so in the build log when the installed CLI is not the frontend's release."""
    try:
        result = run(["railpack", "--version"], timeout=max(1.0, min(30.0, ctx.deadline - time.monotonic())), check=False)
    except CommandError as exc:
        log.debug("cannot ask railpack for its version: %s", exc)
        return
    found = _VERSION.search(result.stdout or result.stderr)
    if found is None:
        log.debug("railpack --version printed no version: %r", (result.stdout or result.stderr)[:200])
        return
    if found.group(1) != RAILPACK_VERSION:
        message = (f"Warning: the installed railpack CLI is {found.group(1)}, but builds use the {RAILPACK_VERSION} "
                   "BuildKit frontend; their build plans may not agree (reinstall the agent's build tools)")
        ctx.logs.line(message)
        log.warning("build %s: %s", ctx.build.id, message)

