"""Command line: the original's four flags plus --config, and the subcommands.

    agent [run]            register if needed, then reconcile forever (default)
    agent plan             print what the next pass would change; change nothing
    agent standalone FILE  reconcile from a local state file (same as --state FILE)
    agent doctor           check this server's prerequisites
    agent --version

Usage and configuration errors exit non-zero with one clear line, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent import __version__

log = logging.getLogger(__name__)

COMMANDS = ("run", "plan", "standalone", "doctor")
EXIT_USAGE = 2
EXIT_FAILURE = 1


def version_text() -> str:
    try:
        from agent import _build_info  # type: ignore[attr-defined]

        return f"techulus-agent {__version__} ({_build_info.COMMIT}, built {_build_info.BUILT})"
    except ImportError:
        return f"techulus-agent {__version__}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agent",
        allow_abbrev=False,
        description="Techulus Cloud worker agent: keeps this server matching the control plane's expected state.",
    )
    p.add_argument("command", nargs="?", default="run", choices=COMMANDS, help="what to do (default: run)")
    p.add_argument("target", nargs="?", help="the state file, for `standalone` (and `plan` in standalone mode)")
    p.add_argument("--url", help="control plane base URL, e.g. https://cp.example.com")
    p.add_argument("--token", help="one-time registration token (prefer --token-file or TECHULUS_AGENT_TOKEN)")
    p.add_argument("--token-file", help="file holding the registration token")
    p.add_argument("--data-dir", help="state directory (default /var/lib/techulus-agent)")
    p.add_argument("--logs-endpoint", help="VictoriaLogs base URL; empty disables log shipping")
    p.add_argument("--config", help="TOML file with settings (flags win)")
    p.add_argument("--state", help="standalone mode: reconcile from this TOML/JSON state file, no control plane")
    p.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="default INFO")
    p.add_argument("--version", action="version", version=version_text())
    return p


def settings_from_args(args: argparse.Namespace) -> Any:
    from agent.settings import Settings

    state = args.state
    if args.command == "standalone":
        if not args.target and not state:
            raise UsageError("standalone needs a state file: agent standalone FILE")
        state = args.target or state
    elif args.command == "plan" and args.target:
        state = args.target
    elif args.target:
        raise UsageError(f"unexpected argument {args.target!r}")
    flags = {
        "url": args.url,
        "token": args.token,
        "token_file": args.token_file,
        "data_dir": args.data_dir,
        "logs_endpoint": args.logs_endpoint,
        "state_file": state,
        "log_level": args.log_level,
    }
    return Settings.load(flags, config_file=Path(args.config) if args.config else None)


class UsageError(Exception):
    pass


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # urllib3 logs every retry at WARNING with the full URL; our own lines say it better.
    logging.getLogger("urllib3").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from agent.settings import SettingsError

    try:
        settings = settings_from_args(args)
    except (UsageError, SettingsError) as exc:
        print(f"agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # The token now lives in `settings`; no child process (git, podman, …) inherits it.
    os.environ.pop("TECHULUS_AGENT_TOKEN", None)
    warn_unknown_environment()
    setup_logging(settings.log_level)
    if args.command == "doctor":
        from agent.doctor import run_doctor

        try:
            return run_doctor(settings)
        except ImportError as exc:
            print(f"agent: cannot load {exc.name or 'a module'} ({exc}); is this the build for {platform.machine()}?", file=sys.stderr)
            return EXIT_FAILURE
    if not settings.standalone and not settings.url:
        print("agent: --url is required (or --state FILE / `agent standalone FILE` to run without a control plane)", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "plan":
            return run_plan(settings)
        from agent.runtime import run_agent

        return run_agent(settings)
    except KeyboardInterrupt:
        return 130
    except ImportError as exc:
        # Almost always a zipapp built for another CPU (its native code cannot load).
        print(
            f"agent: cannot load {exc.name or 'a module'} ({exc}); is this the build for this machine "
            f"({platform.machine()})? Use bin/agent-linux-{'arm64' if platform.machine() in ('aarch64', 'arm64') else 'amd64'}.",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except OSError as exc:
        # Permissions, a data dir that cannot be created, a full disk: say which and stop.
        print(f"agent: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - the known failures carry clear messages
        from agent.api import ApiError
        from agent.host.podman import PodmanError
        from agent.identity import IdentityError
        from agent.model import ModelError
        from agent.registration import RegistrationError
        from agent.runtime import AlreadyRunning

        if isinstance(
            exc, ApiError | IdentityError | ModelError | RegistrationError | SettingsError | PodmanError | AlreadyRunning
        ):
            log.error("%s", exc)
            return EXIT_FAILURE
        raise


def warn_unknown_environment() -> None:
    """A mistyped TECHULUS_AGENT_* variable would otherwise be ignored without a word."""
    import difflib

    from agent.settings import ENV_PREFIX, Settings

    known = {ENV_PREFIX + f.upper() for f in Settings.__dataclass_fields__}
    for name in sorted(os.environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            print(f"agent: ignoring unknown environment variable {name}{hint}", file=sys.stderr)


def run_plan(settings: Any) -> int:
    """Print the changes the next pass would make, without making any."""
    from agent.api import ApiError
    from agent.identity import DataDir
    from agent.loop import ControlPlaneSource
    from agent.runtime import assemble

    if not settings.standalone and not DataDir(settings.data_dir).is_registered():
        print("agent: not registered yet; `plan` never registers (run `agent --url … --token …` first)", file=sys.stderr)
        return EXIT_FAILURE
    components = assemble(settings, create=False)
    if isinstance(components.source, ControlPlaneSource):
        components.source.cache_path = None  # plan writes nothing, not even the cache
    try:
        expected = components.source.fetch()
    except ApiError as exc:
        print(f"agent: cannot fetch the expected state: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    for problem in expected.problems:
        print(f"invalid: {problem}")
    reconciler = components.reconciler
    reconciler.note_fetch(expected)
    changes = reconciler.compute_plan(expected)
    for change in reconciler.held:
        print(f"held back: {change.describe()} ({change.held_because})")
    if not changes and not reconciler.held:
        print("no changes: this server matches the expected state")
    for change in changes:
        print(change.describe())
    return 0
