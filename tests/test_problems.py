"""ProblemLog: a lasting problem is logged once, counted, repeated every 10 minutes, and its
end is said once."""

from __future__ import annotations

import logging

from agent.problems import ProblemLog

log = logging.getLogger("test.problems")


def _messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "test.problems"]


def test_once_then_counted_then_repeated_then_cleared(caplog):
    now = [0.0]
    problems = ProblemLog(log, "expected state", clock=lambda: now[0])
    with caplog.at_level(logging.INFO):
        for _ in range(100):
            problems.report(["entry #1 is bad"])
            now[0] += 5  # a poll every 5 s for 500 s
        assert _messages(caplog) == ["expected state: entry #1 is bad"]
        now[0] += 100
        problems.report(["entry #1 is bad"])
        assert len(_messages(caplog)) == 3 and "still 1 problem(s)" in _messages(caplog)[-1]
        problems.report([])
        problems.report([])
    assert _messages(caplog)[-1] == "expected state is valid again"
    assert len(_messages(caplog)) == 4


def test_many_problems_cost_a_few_lines(caplog):
    problems = ProblemLog(log, "expected state", clock=lambda: 0.0)
    texts = [f"entry #{i} is bad" for i in range(100)]
    with caplog.at_level(logging.INFO):
        problems.report(texts, total=4999)
        problems.report(texts, total=4999)
    messages = _messages(caplog)
    assert len(messages) == 6
    assert "4,999 problem(s) in all" in messages[-1]


def test_a_new_problem_is_named_while_old_ones_stay_quiet(caplog):
    problems = ProblemLog(log, "dns", clock=lambda: 0.0)
    with caplog.at_level(logging.INFO):
        problems.report(["a"])
        problems.report(["a", "b"])
        problems.report(["a", "b"])
    assert _messages(caplog) == ["dns: a", "dns: b", "dns: 2 problem(s) in all, 1 named above; the same problems are logged again in 10 minutes if they last"]


def test_nothing_is_said_when_there_never_was_a_problem(caplog):
    with caplog.at_level(logging.DEBUG):
        ProblemLog(log, "dns").report([])
    assert _messages(caplog) == []
