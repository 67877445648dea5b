"""The only place in the agent that starts a subprocess.

Every call takes an argv list (never a shell), a timeout, closes stdin unless input is
given, keeps stdout and stderr apart, bounds what it keeps of them, and raises a typed
error that carries the command with secrets redacted. Tests replace `subprocess.Popen`
(pytest-subprocess) and so see every command the agent would run.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import IO
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

#: What a command may print before the rest is dropped (per stream).
MAX_OUTPUT = 8 * 1024 * 1024
#: How long to keep reading a finished command's pipes (a descendant may still hold them).
PIPE_GRACE = 1.0
REDACTED = "***"


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration: float = 0.0


@dataclass
class CommandError(Exception):
    """A command failed; `str()` is a one-line explanation safe to log."""

    argv: tuple[str, ...]
    returncode: int | None
    stdout: str = ""
    stderr: str = ""
    reason: str = field(default="")

    def __post_init__(self) -> None:
        super().__init__(str(self))

    @property
    def output(self) -> str:
        return f"{self.stdout}\n{self.stderr}"

    @property
    def detail(self) -> str:
        """What the command said about its failure (the end of its stderr, else stdout)."""
        return (self.stderr.strip() or self.stdout.strip())[-2000:]

    def __str__(self) -> str:
        command = " ".join(self.argv)
        if self.reason:
            return f"`{command}` {self.reason}"
        detail = self.detail
        return f"`{command}` exited with {self.returncode}" + (f": {detail}" if detail else "")


class CommandTimeout(CommandError):
    pass


class CommandNotFound(CommandError):
    pass


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    input: bytes | str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    secrets: Iterable[str] = (),
    check: bool = True,
    max_output: int = MAX_OUTPUT,
    pass_fds: Sequence[int] = (),
    inherit_env: bool = True,
) -> Result:
    """Run `argv` to completion and return its output.

    `env`, when given, is added to (not substituted for) the agent's environment; with
    `inherit_env=False` it IS the child's whole environment (none when None): a child that
    is handed secrets gets nothing of the agent's own environment unless it is passed on
    by name.
    `secrets` are strings to mask wherever the command or its output is logged or raised.
    `pass_fds` are descriptors the child inherits (e.g. a memfd it reads as /dev/fd/N);
    every other descriptor is closed in the child.
    """
    if isinstance(argv, str):
        raise TypeError("run() takes an argv list, never a command string")
    argv = tuple(str(arg) for arg in argv)
    hidden = tuple(s for s in secrets if s)
    shown = tuple(redact(a, hidden) for a in argv)
    child_env = _child_env(env, inherit_env)
    data = input.encode() if isinstance(input, str) else input
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env,
            cwd=cwd,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError as exc:
        raise CommandNotFound(shown, None, reason=f"cannot start: {argv[0]} is not installed or not on PATH") from exc
    except (OSError, ValueError) as exc:
        # E2BIG (an environment beyond the kernel's limits), EACCES, a NUL in an argument:
        # the message names the cause, never an argument or an environment value.
        cause = str(exc)
        if isinstance(exc, OSError) and exc.strerror:
            cause = exc.strerror + (f": {argv[0]}" if exc.filename else "")
        raise CommandError(shown, None, reason=f"cannot start: {redact(cause, hidden)}") from None
    # The pipes are read by threads and the child is waited for on its own: a descendant
    # that escaped the process group and keeps a pipe open can neither turn a finished
    # command into a timeout nor block us past the deadline. What is kept is bounded
    # while reading, not afterwards.
    stdout, stderr = _Capture(proc.stdout, max_output), _Capture(proc.stderr, max_output)
    if data is not None:
        _feed(proc, data)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.wait()
        out, err = _results(stdout, stderr)
        raise CommandTimeout(
            shown, None, _text(out, max_output, hidden), _text(err, max_output, hidden),
            reason=f"timed out after {timeout:g}s and was killed",
        ) from None
    except BaseException:
        kill_group(proc)
        proc.wait()
        raise
    out, err = _results(stdout, stderr)
    duration = time.monotonic() - started
    result = Result(shown, proc.returncode, _text(out, max_output, hidden), _text(err, max_output, hidden), duration)
    log.debug("ran %s -> %s in %.3fs", " ".join(shown), proc.returncode, duration)
    if check and proc.returncode != 0:
        raise CommandError(shown, proc.returncode, result.stdout, result.stderr)
    return result


def popen(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    merge_stderr: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a long-running child (log readers, builds) in its own process group.

    The caller reads its pipes and must end it with `kill_group` or wait for it.
    """
    if isinstance(argv, str):
        raise TypeError("popen() takes an argv list, never a command string")
    child_env = _child_env(env, True)
    try:
        return subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            env=child_env,
            cwd=cwd,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise CommandNotFound(tuple(argv), None, reason=f"cannot start: {argv[0]} is not installed or not on PATH") from exc


def _child_env(env: Mapping[str, str] | None, inherit: bool) -> dict[str, str] | None:
    """The child's environment: the agent's plus `env`, or exactly `env` (None: the agent's own)."""
    if not inherit:
        return dict(env or {})
    if env is None:
        return None
    return {**os.environ, **env}


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill the child and everything it started (it leads its own session)."""
    pid = getattr(proc, "pid", 0) or 0
    if pid > 1:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
                return
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.kill()
    except (ProcessLookupError, OSError):
        pass


class _Capture:
    """Reads one pipe to its end on a daemon thread, keeping at most `limit` bytes."""

    def __init__(self, stream: IO[bytes] | None, limit: int) -> None:
        self._chunks: list[bytes] = []
        self._kept = 0
        self._limit = limit
        # An in-memory stream (a test double of Popen) is complete once the child has
        # exited and has no descriptor to wait on: it is read whole in result().
        self._memory = stream if hasattr(stream, "getvalue") else None
        self._thread = threading.Thread(target=self._read, args=(None if self._memory else stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes] | None) -> None:
        if stream is None:
            return
        try:
            read = getattr(stream, "read1", stream.read)
            while True:
                chunk = read(65536)
                if not chunk:
                    break
                room = self._limit - self._kept
                if room > 0:
                    self._chunks.append(chunk[:room])
                    self._kept += min(len(chunk), room)
                # Past the limit keep draining, or the child would block on a full pipe.
        except (OSError, ValueError):
            pass
        finally:
            try:
                stream.close()
            except (OSError, ValueError):
                pass

    def result(self, deadline: float) -> bytes:
        if self._memory is not None:
            return bytes(self._memory.getvalue())[: self._limit]  # type: ignore[attr-defined]
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return b"".join(list(self._chunks))


def _results(stdout: _Capture, stderr: _Capture) -> tuple[bytes, bytes]:
    """Both pipes' output, waiting at most PIPE_GRACE in all for them to close."""
    deadline = time.monotonic() + PIPE_GRACE
    return stdout.result(deadline), stderr.result(deadline)


def _feed(proc: subprocess.Popen[bytes], data: bytes) -> None:
    """Write stdin on a thread: a child that does not read it must not block us."""

    def write() -> None:
        try:
            assert proc.stdin is not None
            proc.stdin.write(data)
            proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass

    threading.Thread(target=write, daemon=True).start()


def _text(raw: bytes | None, limit: int, secrets: tuple[str, ...]) -> str:
    if not raw:
        return ""
    if len(raw) > limit:
        raw = raw[:limit]
    return redact(raw.decode("utf-8", errors="replace"), secrets)
