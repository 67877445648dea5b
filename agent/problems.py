"""Report a lasting problem once, then count it: bad input must not flood the log.

The agent looks at the same input every few seconds (the expected state every tick, the
same peers and records on every drift check), so a problem that lasts would be logged
again on every look: a 15 MB document of invalid entries wrote a gigabyte of log from one
poll. A ProblemLog belongs to whoever reports (a state source, a config sync); it holds no
global state. Per report it logs each problem it has not logged yet (at most `detail`
lines) and one summary line when there are more, repeats the lot at most every `repeat`
seconds while it lasts, and logs one line when it clears.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

REPEAT_SECONDS = 600.0
DETAIL_LINES = 5


class ProblemLog:
    def __init__(
        self,
        logger: logging.Logger,
        subject: str,
        *,
        cleared: str = "is valid again",
        repeat: float = REPEAT_SECONDS,
        detail: int = DETAIL_LINES,
        level: int = logging.ERROR,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.subject = subject
        self.cleared = cleared
        self.repeat = repeat
        self.detail = detail
        self.level = level
        self.clock = clock
        # The problems of the last report, and when they were last logged (None: never).
        self._current: frozenset[str] = frozenset()
        self._logged_at: float | None = None

    @property
    def active(self) -> bool:
        return self._logged_at is not None

    def report(self, problems: Sequence[str], total: int | None = None) -> None:
        """The problems found by one look (`total` counts them all when `problems` holds only
        the first few); an empty report after problems logs that they cleared."""
        count = len(problems) if total is None else max(total, len(problems))
        if count == 0:
            if self._logged_at is not None:
                self.logger.info("%s %s", self.subject, self.cleared)
            self._current = frozenset()
            self._logged_at = None
            return
        now = self.clock()
        new = [problem for problem in problems if problem not in self._current]
        due = self._logged_at is None or now - self._logged_at >= self.repeat
        self._current = frozenset(problems)
        if not new and not due:
            return
        repeated = not new
        shown = list(problems[: self.detail]) if due else new[: self.detail]
        for problem in shown:
            self.logger.log(self.level, "%s: %s", self.subject, problem)
        if count > len(shown) or repeated:
            self.logger.log(
                self.level,
                "%s: %s%s problem(s) in all, %d named above; the same problems are logged again in %d minutes if they last",
                self.subject, "still " if repeated else "", f"{count:,}", len(shown), round(self.repeat / 60),
            )
        self._logged_at = now


class FailureStreak:
    """A repeated failure of one operation (a poll), logged once when it starts, then at
    most every `repeat` seconds with a count, and once when it ends. Unlike ProblemLog the
    text may differ from one failure to the next (a timeout, then a 502): the streak, not
    the wording, is the problem."""

    def __init__(
        self,
        logger: logging.Logger,
        subject: str,
        *,
        repeat: float = REPEAT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.subject = subject
        self.repeat = repeat
        self.clock = clock
        self.failures = 0
        self._logged_at: float | None = None

    def failed(self, error: object, consequence: str, level: int = logging.ERROR) -> None:
        self.failures += 1
        now = self.clock()
        if self._logged_at is not None and now - self._logged_at < self.repeat:
            return
        self._logged_at = now
        if self.failures == 1:
            self.logger.log(level, "%s: %s; %s", self.subject, error, consequence)
        else:
            self.logger.log(
                level, "%s: still failing, %d times in a row (last: %s); %s",
                self.subject, self.failures, error, consequence,
            )

    def succeeded(self) -> None:
        if self.failures:
            self.logger.info("%s: works again after %d failure(s)", self.subject, self.failures)
        self.failures = 0
        self._logged_at = None
