"""Command line: the original's four flags plus --config, and the subcommands.

    agent [run]            register if needed, then reconcile forever (default)
    agent plan             print what the next pass would change; change nothing
    agent standalone FILE  reconcile from a local state file (same as --state FILE)
    agent standalone --down FILE [--purge]
                           remove its containers and network (and data dir)
    agent doctor           check this server's prerequisites
    agent upgrade --binary URL|FILE [--sha256 HEX]
                           swap in a new build; keep it only if it proves healthy
    agent purge --yes      remove this agent's containers, network, images and data dir
    agent status [--json]  what the running agent is doing (exit 3 when none runs)
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

COMMANDS = ("run", "plan", "standalone", "doctor", "upgrade", "purge", "status")
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
    p.add_argument("--down", action="store_true", help="with `standalone FILE`: remove its containers and network, then exit")
    p.add_argument("--purge", action="store_true", help="with `standalone --down`: remove the data dir too")
    p.add_argument("--binary", help="with `upgrade`: the new agent zipapp, an https:// URL or a file")
    p.add_argument("--sha256", help="with `upgrade`: its SHA-256 (default: from SHA256SUMS beside it)")
    p.add_argument("--signature", help="with `upgrade`: its Ed25519 signature file or URL (default: BINARY.sig)")
    p.add_argument("--timeout", type=float, help="with `upgrade`: seconds the new agent has to prove healthy (default 90)")
    p.add_argument("--yes", action="store_true", help="with `purge`: yes, remove the containers and the data dir")
    p.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="default INFO")
    p.add_argument("--log-format", choices=("text", "json"), help="text (default) or one JSON object per line")
    p.add_argument("--json", action="store_true", help="with `status`: print JSON for scripts")
    p.add_argument("--version", action="version", version=version_text())
    return p


def settings_from_args(args: argparse.Namespace) -> Any:
    from agent.settings import Settings

    state = args.state
    upgrade_flags = [flag for flag in ("binary", "sha256", "signature", "timeout") if getattr(args, flag) is not None]
    if upgrade_flags and args.command != "upgrade":
        raise UsageError(f"--{upgrade_flags[0]} goes with upgrade: agent upgrade --binary URL|FILE")
    if args.command == "upgrade":
        check_upgrade_args(args)
    if args.command == "purge" and not args.yes:
        raise UsageError("purge removes this agent's containers, network, images and data dir: confirm with --yes")
    if args.down and args.command != "standalone":
        raise UsageError("--down goes with standalone: agent standalone --down FILE")
    if args.purge and not args.down:
        raise UsageError("--purge goes with --down: agent standalone --down FILE --purge")
    if args.json and args.command != "status":
        raise UsageError("--json goes with status: agent status --json")
    if args.command == "standalone":
        if not args.target and not state:
            raise UsageError("standalone needs a state file: agent standalone FILE")
        state = args.target or state
    elif args.command in ("plan", "doctor") and args.target:
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
        "log_format": args.log_format,
    }
    return Settings.load(flags, config_file=Path(args.config) if args.config else None)


class UsageError(Exception):
    pass


def check_upgrade_args(args: argparse.Namespace) -> None:
    import re

    if not args.binary:
        raise UsageError("upgrade needs the new build: agent upgrade --binary URL|FILE [--sha256 HEX]")
    if args.binary.startswith("http://"):
        raise UsageError("upgrade downloads over https:// only (TLS verified); copy the file and give its path instead")
    if args.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", args.sha256):
        raise UsageError("--sha256 must be 64 hex digits")
    if args.timeout is not None and not 5 <= args.timeout <= 3600:
        raise UsageError("--timeout must be between 5 and 3600 seconds")


def run_upgrade(args: argparse.Namespace, settings: Any) -> int:
    from agent.upgrade import HEALTH_TIMEOUT, Options
    from agent.upgrade import run_upgrade as upgrade

    options = Options(
        binary=args.binary,
        data_dir=settings.data_dir,
        sha256=args.sha256 or "",
        signature=args.signature or "",
        timeout=args.timeout if args.timeout is not None else HEALTH_TIMEOUT,
    )
    return upgrade(options)


def setup_logging(level: str, log_format: str = "text") -> None:
    from agent.logformat import configure

    configure(level, log_format)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    from agent.settings import SettingsError

    try:
        settings = settings_from_args(args)
    except (UsageError, SettingsError) as exc:
        print(f"agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # The token now lives in `settings`; no child process (git, podman, …) inherits it.
    os.environ.pop("TECHULUS_AGENT_TOKEN", None)
    warn_unknown_environment()
    if args.command == "status":
        return run_status(settings, args.json)
    setup_logging(settings.log_level, settings.log_format)
    if args.command == "doctor":
        from agent.doctor import run_doctor

        try:
            return run_doctor(settings)
        except ImportError as exc:
            print(f"agent: cannot load {exc.name or 'a module'} ({exc}); is this the build for {platform.machine()}?", file=sys.stderr)
            return EXIT_FAILURE
    if args.command not in ("upgrade", "purge") and not settings.standalone and not settings.url:
        print("agent: --url is required (or --state FILE / `agent standalone FILE` to run without a control plane)", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "upgrade":
            return run_upgrade(args, settings)
        if args.command == "purge":
            from agent.uninstall import purge

            return purge(settings)
        if args.down:
            from agent.teardown import standalone_down

            return standalone_down(settings, purge=args.purge)
        if args.command == "plan":
            return run_plan(settings)
        from agent.runtime import run_agent

        return run_agent(settings, reload=lambda: settings_from_args(args))
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


def run_status(settings: Any, as_json: bool) -> int:
    """Print what the running agent published; never waits on it or on the control plane."""
    import json

    from agent.statusview import gather, render

    code, status = gather(settings.run_dir, settings.data_dir)
    sys.stdout.write(json.dumps(status, indent=2, sort_keys=True) + "\n" if as_json else render(status))
    return code


def run_plan(settings: Any) -> int:
    """Print the changes the next pass would make, without making any."""
    from agent.api import ApiError
    from agent.identity import DataDir
    from agent.loop import ControlPlaneSource
    from agent.runtime import assemble

    if not settings.standalone and not DataDir(settings.data_dir).is_registered():
        print("agent: not registered yet; `plan` never registers (run `agent --url … --token …` first)", file=sys.stderr)
        return EXIT_FAILURE
    # The source logs invalid entries for the running agent (also while assembling, for the
    # collision check); plan prints each itself, once.
    model_log = logging.getLogger("agent.loop")
    level = model_log.level
    model_log.setLevel(logging.CRITICAL)
    try:
        components = assemble(settings, create=False)
        if isinstance(components.source, ControlPlaneSource):
            components.source.cache_path = None  # plan writes nothing, not even the cache
        expected = components.source.fetch()
    except ApiError as exc:
        print(f"agent: cannot fetch the expected state: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        model_log.setLevel(level)
    for problem in expected.problems:
        print(f"invalid: {problem}")
    if expected.problem_count > len(expected.problems):
        print(f"invalid: … and {expected.problem_count - len(expected.problems)} more entries skipped")
    reconciler = components.reconciler
    reconciler.note_fetch(expected)
    changes = reconciler.compute_plan(expected)
    survey = components.podman.survey()
    verdicts = {container.id: verdict for container, verdict in survey}
    for change in reconciler.held:
        print(f"held back: {change.describe()} ({change.held_because})")
        removal = _removal(change, verdicts)
        if removal:
            print(f"  held back: {removal}")
    if not changes and not reconciler.held:
        print("no changes: this server matches the expected state")
    for change in changes:
        print(change.describe())
        removal = _removal(change, verdicts)
        if removal:
            print(f"  {removal}")
    print(f"owner: {components.podman.options.owner} (network {components.podman.options.network})")
    for container, verdict in survey:
        if not verdict.ours:
            print(f"left alone: container {container.name or container.short_id} ({container.short_id}): {verdict.why}")
    # Non-zero so scripts and CI notice a state file (or answer) with entries it skips.
    return EXIT_USAGE if expected.problems else 0


def _removal(change: Any, verdicts: dict[str, Any]) -> str:
    """What a change removes and why the agent may: only its own containers go."""
    from agent.drift import ChangeKind

    removes = (ChangeKind.REMOVE_ORPHAN, ChangeKind.REMOVE_UNEXPECTED, ChangeKind.REDEPLOY)
    if change.kind not in removes or change.container is None:
        return ""
    container = change.container
    verdict = verdicts.get(container.id)
    why = verdict.why if verdict is not None else "listed as ours"
    return f"would remove container {container.name or container.short_id} ({container.short_id}): {change.reason}; ours because {why}"
