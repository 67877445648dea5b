"""Log lines: journald priorities without a second timestamp under systemd, or JSON."""

from __future__ import annotations

import io
import json
import logging
import os
import sys

import pytest

from agent.drift import Change, ChangeKind, ContainerInfo
from agent.logformat import JournalFormatter, JsonFormatter, change_fields, formatter, priority, under_journal
from agent.settings import Settings, SettingsError


def record(level: int, msg: str, *args, exc_info=None, **extra) -> logging.LogRecord:
    rec = logging.getLogger("agent.loop").makeRecord("agent.loop", level, __file__, 1, msg, args, exc_info, extra=extra)
    rec.created = 1_700_000_000.123
    return rec


@pytest.fixture
def stream(tmp_path):
    with open(tmp_path / "journal", "w") as handle:
        yield handle


def journal_of(handle) -> dict[str, str]:
    st = os.fstat(handle.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_the_journal_is_recognised_only_on_its_own_stream(stream, tmp_path):
    assert under_journal(stream, journal_of(stream))
    assert not under_journal(stream, {})
    assert not under_journal(stream, {"JOURNAL_STREAM": "garbage"})
    with open(tmp_path / "other", "w") as other:
        # Inherited by a child whose stderr went elsewhere: not the journal.
        assert not under_journal(other, journal_of(stream))
    assert not under_journal(io.StringIO(), journal_of(stream))


def test_under_journald_a_line_has_a_priority_and_no_timestamp(stream):
    chosen = formatter("text", stream, journal_of(stream))
    assert isinstance(chosen, JournalFormatter)
    assert chosen.format(record(logging.WARNING, "drift: %s", "x")) == "<4>agent.loop: drift: x"
    assert chosen.format(record(logging.INFO, "applied")) == "<6>agent.loop: applied"
    assert chosen.format(record(logging.ERROR, "failed")).startswith("<3>")
    assert chosen.format(record(logging.DEBUG, "ran")).startswith("<7>")


def test_every_line_of_a_traceback_keeps_the_priority(stream):
    try:
        raise ValueError("bad")
    except ValueError:
        rec = record(logging.ERROR, "crashed", exc_info=sys.exc_info())
    lines = formatter("text", stream, journal_of(stream)).format(rec).splitlines()
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines)


def test_outside_systemd_the_text_format_keeps_its_timestamp(stream):
    text = formatter("text", stream, {}).format(record(logging.INFO, "hello"))
    assert text.endswith(" INFO agent.loop: hello") and text[:4].isdigit()


def test_json_has_stable_keys_and_the_context_the_line_names(stream):
    chosen = formatter("json", stream, {})
    line = chosen.format(record(logging.INFO, "applied: %s", "deploy web", deployment="dep-1", service="svc-1", change="deploy"))
    assert list(json.loads(line)) == ["ts", "level", "logger", "msg", "deployment", "service", "change"]
    assert json.loads(line) == {
        "ts": "2023-11-14T22:13:20.123Z", "level": "INFO", "logger": "agent.loop", "msg": "applied: deploy web",
        "deployment": "dep-1", "service": "svc-1", "change": "deploy",
    }
    assert json.loads(chosen.format(record(logging.WARNING, "item", work_item="w-1")))["work_item"] == "w-1"


def test_json_under_journald_is_prefixed_for_journald_to_strip(stream):
    chosen = formatter("json", stream, journal_of(stream))
    assert isinstance(chosen, JsonFormatter)
    line = chosen.format(record(logging.ERROR, "failed\nsecond line"))
    assert line.startswith("<3>{") and "\n" not in line
    assert json.loads(line[3:])["msg"] == "failed\nsecond line"


def test_json_carries_a_traceback_in_one_line():
    try:
        raise ValueError("bad")
    except ValueError:
        rec = record(logging.ERROR, "crashed", exc_info=sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line and "ValueError: bad" in json.loads(line)["exc"]


def test_priorities_follow_sd_daemon():
    assert [priority(n) for n in (5, 10, 20, 25, 30, 40, 50)] == [7, 7, 6, 6, 4, 3, 2]


def test_change_fields_name_the_deployment_service_and_kind():
    labels = {"techulus.deployment.id": "dep-9", "techulus.service.id": "svc-9"}
    removal = Change(ChangeKind.REMOVE_ORPHAN, "orphan", container=ContainerInfo("c", "n", "i", "running", labels))
    assert change_fields(removal) == {"change": "remove-orphan", "deployment": "dep-9", "service": "svc-9"}
    assert change_fields(Change(ChangeKind.UPDATE_DNS, "drift")) == {"change": "update-dns"}


def test_log_format_is_a_setting_with_two_values():
    assert Settings.load({}, environ={"TECHULUS_AGENT_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(SettingsError, match="log_format must be one of text, json"):
        Settings.load({"log_format": "xml"}, environ={})
