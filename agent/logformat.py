"""How log lines look: plain text on a terminal, journald-ready under systemd, or JSON.

Under systemd (stderr is the stream named by JOURNAL_STREAM) journald stamps each line
itself, so the line carries no second timestamp, and it starts with an sd-daemon `<N>`
priority prefix, which journald turns into the entry's PRIORITY (`journalctl -p warning`
works). `log_format = "json"` gives one JSON object per line with stable keys: ts, level,
logger, msg, and deployment, service, change, work_item when the line is about one (the
code passes them with `extra=`), plus exc for a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.drift import Change

#: Fields a line may carry through `extra=`, in this order.
CONTEXT_KEYS = ("deployment", "service", "change", "work_item")

HANDLER_NAME = "techulus-agent"

#: sd-daemon(3) priorities.
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def priority(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return PRIORITIES[level]
    return PRIORITIES[logging.DEBUG]


def under_journal(stream: IO[str], environ: Mapping[str, str]) -> bool:
    """Whether `stream` is the journal stream systemd gave us (JOURNAL_STREAM is
    `device:inode` of it; a child whose stderr was redirected must not believe it)."""
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


class JournalFormatter(logging.Formatter):
    """`<N>logger: message`; every line of a multi-line message (a traceback) gets the
    prefix, since journald reads each line as its own entry."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per line, keys in a stable order."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in CONTEXT_KEYS:
            value = getattr(record, key, None)
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        line = json.dumps(entry, ensure_ascii=False)
        # journald strips the prefix: what a shipper reads from the journal is pure JSON.
        return f"<{priority(record.levelno)}>{line}" if self.journal else line


def formatter(log_format: str, stream: IO[str], environ: Mapping[str, str]) -> logging.Formatter:
    journal = under_journal(stream, environ)
    if log_format == "json":
        return JsonFormatter(journal)
    if journal:
        return JournalFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def configure(level: str, log_format: str = "text", stream: IO[str] | None = None, environ: Mapping[str, str] | None = None) -> None:
    """Set up the root logger like logging.basicConfig: a no-op when someone else (a test
    harness, an embedding program) already installed handlers; our own are replaced."""
    root = logging.getLogger()
    ours = [handler for handler in root.handlers if handler.get_name() == HANDLER_NAME]
    if len(ours) == len(root.handlers):
        stream = sys.stderr if stream is None else stream
        handler = logging.StreamHandler(stream)
        handler.set_name(HANDLER_NAME)
        handler.setFormatter(formatter(log_format, stream, os.environ if environ is None else environ))
        for old in ours:
            root.removeHandler(old)
        root.addHandler(handler)
        root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # urllib3 logs every retry at WARNING with the full URL; our own lines say it better.
    logging.getLogger("urllib3").setLevel(logging.ERROR)


def change_fields(change: Change) -> dict[str, str]:
    """`extra=` for a line about one change: its kind, deployment and service."""
    fields = {"change": change.kind.value}
    if change.expected is not None:
        fields["deployment"] = change.expected.deployment_id
        fields["service"] = change.expected.service_id
    elif change.container is not None:
        fields["deployment"] = change.container.deployment_id
        fields["service"] = change.container.service_id
    return {key: value for key, value in fields.items() if value}
