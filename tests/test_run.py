"""The subprocess choke point with real processes: timeouts hold even when a descendant
keeps the pipes open, output is bounded while it is read, secrets are masked, and a
missing binary is a clear error."""

import sys
import time

import pytest

from agent.host.run import CommandError, CommandNotFound, CommandTimeout, popen, run

pytestmark = pytest.mark.real


def test_a_finished_command_returns_although_a_descendant_holds_its_pipes():
    started = time.monotonic()
    result = run(["sh", "-c", "setsid sleep 8 & echo done"], timeout=5)
    assert result.returncode == 0 and result.stdout.strip() == "done"
    assert time.monotonic() - started < 4


def test_timeout_holds_with_a_descendant_holding_the_pipes():
    started = time.monotonic()
    with pytest.raises(CommandTimeout, match="timed out after 1s"):
        run(["sh", "-c", "setsid sleep 30 & sleep 30"], timeout=1)
    assert time.monotonic() - started < 5


def test_output_is_bounded_while_reading():
    script = "import sys; sys.stdout.write('x' * 5_000_000); sys.stderr.write('e' * 10)"
    result = run([sys.executable, "-c", script], timeout=30, max_output=1000)
    assert len(result.stdout) == 1000 and result.stderr == "e" * 10


def test_input_reaches_the_child_and_secrets_are_masked():
    with pytest.raises(CommandError) as info:
        run(["sh", "-c", "cat; echo hunter2 >&2; exit 3", "arg-hunter2"], timeout=5, input="in-hunter2", secrets=["hunter2"])
    error = info.value
    assert error.returncode == 3 and error.stdout == "in-***" and "hunter2" not in str(error)
    assert "arg-***" in " ".join(error.argv)


def test_a_child_that_ignores_its_input_does_not_block():
    result = run(["sh", "-c", "exit 0"], timeout=5, input=b"x" * 1_000_000)
    assert result.returncode == 0


def test_missing_binary_and_shell_strings():
    with pytest.raises(CommandNotFound, match="not installed or not on PATH"):
        run(["no-such-binary-techulus"], timeout=5)
    with pytest.raises(TypeError):
        run("echo hi", timeout=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        popen("echo hi")  # type: ignore[arg-type]


def test_only_the_passed_descriptors_reach_the_child():
    import os

    passed = os.memfd_create("passed", os.MFD_CLOEXEC)
    kept = os.memfd_create("kept", 0)  # inheritable, yet not passed: the child must not see it
    try:
        os.write(passed, b"K=from-memory\n")
        os.write(kept, b"private\n")
        result = run(["sh", "-c", f"cat /dev/fd/{passed}; cat /dev/fd/{kept} 2>/dev/null || echo closed"], timeout=5, pass_fds=[passed])
        assert result.stdout == "K=from-memory\nclosed\n"
    finally:
        os.close(passed)
        os.close(kept)


def test_a_child_with_its_own_environment_sees_nothing_of_the_agents(monkeypatch):
    monkeypatch.setenv("TECHULUS_AGENT_TOKEN", "agent-token-hunter2")
    value = "line one\nline 'two' = \"x\"\n\u2028 ✓"
    # cat's /proc/self/environ is exactly the environment execve handed it.
    own = run(["cat", "/proc/self/environ"], timeout=10, env={"SECRET": value, "EMPTY": ""}, inherit_env=False)
    assert own.stdout == f"SECRET={value}\0EMPTY=\0"
    # The default adds to the agent's environment (the token itself is dropped at start, cli.py).
    inherited = run(["cat", "/proc/self/environ"], timeout=10, env={"SECRET": "s"}).stdout.split("\0")
    assert "TECHULUS_AGENT_TOKEN=agent-token-hunter2" in inherited and "SECRET=s" in inherited


def test_an_environment_beyond_the_kernels_limit_is_a_clear_error():
    with pytest.raises(CommandError, match="cannot start: Argument list too long") as info:
        run(["true"], timeout=5, env={"PATH": "/usr/bin:/bin", "K": "hunter2" + "x" * 200_000}, inherit_env=False)
    assert "hunter2" not in str(info.value) and info.value.returncode is None
    with pytest.raises(CommandError, match="cannot start: embedded null byte"):
        run(["true"], timeout=5, env={"K": "a\x00b"}, inherit_env=False)
