"""Build images from GitHub sources with Railpack + BuildKit (PROTOCOL.md §6.5-6.8, §13).

The package splits a build by stage: claim.py (validated input), checkout.py (git,
askpass, symlinks), buildkit.py (Railpack plan, buildctl build and push), process.py (step
process groups), cleanup.py, worker.py (poll, claim, run the stages, on-disk record).

Why it is shaped like this (fixing §17 items 4, 10 and 15):

* One build at a time per server, guarded by a real lock taken before the first network
  call, not a flag set after the claim.
* The GitHub token never reaches an argv, a log line or an error: it is cut out of the
  clone URL and handed to git through `GIT_ASKPASS` (a tiny script in a 0700 directory
  that prints environment variables), with `HOME` pointed at that directory and
  credential helpers disabled so git stores it nowhere. The helper answers only prompts
  for the clone URL's own origin, git follows no redirect, and a URL that would send
  credentials over plain http:// is refused. Secret values reach `railpack`
  and `buildctl` through their environment only (`railpack prepare --env NAME` reads the
  value from the environment; `buildctl --secret id=NAME,env=NAME` likewise).
* Every command runs in its own process group under the whole-build deadline; timeout,
  cancellation in the UI (polled while the build runs) and agent shutdown kill the group.
* The tools run as root over the tenant's checkout and follow symlinks, so a checkout
  with a link that is absolute or leads outside it is refused before any tool reads it,
  and railpack writes its plan into a directory of the agent's, not into the checkout.
* A small record in the data dir says which build this server holds, so a build that an
  agent crash interrupted is reported `failed` on the next start instead of staying
  `claimed` forever, and a final status the control plane did not receive is re-sent.
  The record also names the running step's process group, so the step a killed agent
  left behind (the unit uses KillMode=process) is killed first, once proven ours.
"""

from __future__ import annotations

import logging

from agent.builds.buildkit import (
    PLAN_DIR_PREFIX,
    PLAN_FILE,
    RAILPACK_FRONTEND,
    RAILPACK_VERSION,
    buildkit_output,
    dockerfile_argv,
    railpack_build_argv,
    railpack_prepare_argv,
    secrets_hash,
)
from agent.builds.checkout import ASKPASS_SCRIPT, askpass_origin, check_symlinks
from agent.builds.claim import (
    BuildAborted,
    BuildError,
    ClaimedBuild,
    Credentials,
    parse_claim,
    reserved_env_name,
    split_credentials,
    valid_branch,
)
from agent.builds.process import BUILD_MARKER
from agent.builds.worker import MAX_ERROR, STATE_FILE, BuildWorker

log = logging.getLogger(__name__)

__all__ = [
    "ASKPASS_SCRIPT",
    "BUILD_MARKER",
    "MAX_ERROR",
    "PLAN_DIR_PREFIX",
    "PLAN_FILE",
    "RAILPACK_FRONTEND",
    "RAILPACK_VERSION",
    "STATE_FILE",
    "BuildAborted",
    "BuildError",
    "BuildWorker",
    "ClaimedBuild",
    "Credentials",
    "askpass_origin",
    "buildkit_output",
    "check_symlinks",
    "dockerfile_argv",
    "parse_claim",
    "railpack_build_argv",
    "railpack_prepare_argv",
    "reserved_env_name",
    "secrets_hash",
    "split_credentials",
    "valid_branch",
]
