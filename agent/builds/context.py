"""What every stage of one build shares: its context (claim, log stream, deadline, checkout,
redaction, cancel flags) and the shape of the step runner the worker hands to the stages,
so the clone and build stages run commands without knowing how the worker supervises them."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.builds.claim import BuildError, ClaimedBuild
from agent.logship.buildlogs import BuildLogStream

log = logging.getLogger(__name__)


@dataclass
class BuildContext:
    build: ClaimedBuild
    logs: BuildLogStream
    deadline: float
    workdir: Path
    redact: Callable[[str], str]
    cancelled: threading.Event = field(default_factory=threading.Event)
    pushing_seen: threading.Event = field(default_factory=threading.Event)
    pushing_reported: bool = False


class StepRunner(Protocol):
    """Runs one command of the build in its own process group, streaming its output."""

    def __call__(
        self, ctx: BuildContext, argv: list[str], what: str, *, env: Mapping[str, str], watch_push: bool = False
    ) -> None: ...


def require_tool(name: str) -> None:
    if shutil.which(name) is None:
        raise BuildError(f"{name} is not installed on this server (not found on PATH); builds need {name}")
