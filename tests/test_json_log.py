"""``[log] format = "json"``: the formatter (one flat JSON object a line,
hostile strings escaped by the encoder) and the observer that writes text
or JSON, switchable at run time.

How twistd's options choose where it writes: tests/test_json_log_twistd.py;
the real twistd, writing to stdout and to a file, with workers, identd and
a traceback: tests/test_json_log_integration.py.
"""

from __future__ import annotations

import io
import json
import re
import syslog
from datetime import datetime, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    capturedLogs,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.failure import Failure

from socksd.auth import User
from socksd.logs import (
    FIELDS,
    ClassicText,
    FormatObserver,
    file_observer,
    json_line,
    rfc3339,
    syslog_observer,
)
from socksd.proxy.client_rules import ClientRules
from socksd.proxy.record import SessionRecord, log_record
from socksd.rules import RuleSet, compile_rule, parse_ip

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
log = Logger(namespace="socksd")

# A claimed user name a client can send: a line feed and a forged second
# record, quotes, a backslash, ESC, DEL, a line separator, a bidi override,
# and bytes that are not UTF-8 (kept as lone surrogates, as surrogateescape
# decodes them).
HOSTILE = ('mallory\n{"time":"2026-01-01T00:00:00.000Z","level":"info","event":"forged"}'
           '\r\t"quoted" back\\slash \x1b[31mred\x7f \u2028 \u202e '
           + b"\xff\xfe".decode("utf-8", "surrogateescape"))


def record(**changes) -> SessionRecord:
    fields = dict(worker=None, peer="127.0.0.1:40000", version=5, socks4a=False, user="alice",
                  verified=True,
                  method="userpass", command="connect", destination="example.org:80", up=78,
                  down=782, duration=0.0031, outcome="ok", detail="", spliced=False)
    fields.update(changes)
    return SessionRecord(**fields)


def session_event(**changes) -> dict:
    with capturedLogs() as events:
        log_record(record(**changes))
    [event] = events
    return event


def parsed(line: str | None) -> dict:
    assert line is not None
    assert "\n" not in line and "\r" not in line
    # Printable ASCII only: nothing a terminal, a line splitter or an
    # encoder could take for anything but text.
    assert all(" " <= char <= "~" for char in line), line
    value = json.loads(line)
    assert isinstance(value, dict)
    return value


# ---- the formatter ---------------------------------------------------------------------


def test_a_session_line_has_the_stable_fields():
    event = session_event()
    line = parsed(json_line(event))
    assert line == {
        "time": rfc3339(event["log_time"]), "level": "info", "event": formatEvent(event),
        "peer": "127.0.0.1:40000", "version": 5, "user": "alice", "method": "userpass",
        "command": "connect", "destination": "example.org:80", "up": 78, "down": 782,
        "duration": 0.0031, "outcome": "ok", "detail": "", "verified": True, "spliced": False}
    assert RFC3339_UTC.fullmatch(line["time"])
    assert line["event"] == "127.0.0.1:40000 socks5 user=alice method=userpass connect " \
                            "example.org:80 up=78 down=782 0.003s ok"


def test_time_is_rfc3339_utc():
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1767323045.6789) == "2026-01-02T03:04:05.678Z"
    text = rfc3339(1767323045.6789)
    assert datetime.fromisoformat(text).tzinfo == timezone.utc


def test_a_failed_session_is_a_warning_with_its_detail_and_worker():
    line = parsed(json_line(session_event(outcome="denied", detail="rule 2 (deny)", worker=3,
                                          up=0, down=0)))
    assert line["level"] == "warn"
    assert (line["outcome"], line["detail"], line["worker"]) == ("denied", "rule 2 (deny)", 3)
    assert line["event"].startswith("w3 127.0.0.1:40000 socks5")


def test_the_only_worker_has_no_worker_key():
    assert "worker" not in parsed(json_line(session_event()))


@pytest.mark.parametrize("field", ["user", "destination", "detail", "peer"])
def test_hostile_client_strings_are_one_line_and_read_back_raw(field):
    line = parsed(json_line(session_event(**{field: HOSTILE})))
    assert line[field] == HOSTILE          # the raw string, escaped only by JSON
    assert line["level"] == "info"         # nothing forged after it
    # The event text is the text line, escaped for text, and still one line.
    assert "\\n" in line["event"] and "\n" not in line["event"]


def test_hostile_strings_come_out_as_escapes():
    line = json_line(session_event(user=HOSTILE))
    assert line is not None
    for escaped in ('\\n', '\\r', '\\t', '\\"quoted\\"', 'back\\\\slash', "\\u001b[31m",
                    "\\u007f", "\\u2028", "\\u202e", "\\udcff\\udcfe"):
        assert escaped in line, escaped


@given(st.text(st.characters(exclude_categories=())))
def test_any_string_is_one_printable_line_and_reads_back(text):
    event = session_event(user=text, destination=text + ":1", detail=text)
    line = parsed(json_line(event))
    assert (line["user"], line["destination"], line["detail"]) == (text, text + ":1", text)


def test_a_rule_line_has_its_rule_and_raw_strings():
    ruleset = RuleSet([compile_rule("rule 1", "deny", destinations=["10.0.0.0/8"]),
                       compile_rule("rule 2", "allow", log=True)])
    client = parse_ip("127.0.0.1")
    rules = ClientRules(ruleset, client, None, "127.0.0.1:40000", User("bob smith\n"), 5)
    decision = rules.decide("connect", 80, None, parse_ip("192.0.2.1"))
    with capturedLogs() as events:
        rules.note(decision, "connect", "host\x1b.example", 80)
    [event] = events
    line = parsed(json_line(event))
    assert line["event"] == ("127.0.0.1:40000 bob\\x20smith\\n connect host\\x1b.example:80 "
                             "allowed by rule 2 (allow)")
    assert (line["rule"], line["user"], line["destination"], line["command"]) == (
        "rule 2 (allow)", "bob smith\n", "host\x1b.example:80", "connect")


def test_a_traceback_is_one_event_with_a_traceback_field():
    def explode():
        raise ValueError("the checker broke\nover two lines")

    with capturedLogs() as events:
        try:
            explode()
        except ValueError:
            log.failure("checker failed for {user_text}", user_text="alice", user="alice")
    line = parsed(json_line(events[0]))
    assert line["level"] == "critical"
    assert line["event"] == "checker failed for alice"
    assert line["user"] == "alice"
    assert "in explode" in line["traceback"]
    assert line["traceback"].rstrip().endswith(
        "ValueError: the checker broke\nover two lines")


def test_a_failure_without_a_message_still_says_what_it_was():
    event = {"log_level": LogLevel.error, "log_time": 0.0, "log_namespace": "socksd",
             "log_failure": Failure(KeyError("k"))}
    line = parsed(json_line(event))
    assert line["event"] == "KeyError: 'k'" and "KeyError" in line["traceback"]


def test_twisteds_own_fields_are_not_taken_for_ours():
    """twistd's start-up line has a "version" (Twisted's); only socksd's
    events give the schema's keys."""
    event = {"log_format": "twistd {version} starting up.", "version": "26.10.0",
             "log_namespace": "twisted.application.app.AppLogger", "log_level": LogLevel.info,
             "log_time": 1.0}
    assert parsed(json_line(event)) == {"time": "1970-01-01T00:00:01.000Z", "level": "info",
                                        "event": "twistd 26.10.0 starting up."}


def test_an_event_with_nothing_to_say_is_no_line():
    assert json_line({"log_level": LogLevel.info, "log_time": 0.0}) is None


def test_odd_values_are_written_as_text():
    event = {"log_format": "x", "log_namespace": "socksd", "log_time": 0.0,
             "log_level": LogLevel.info, "duration": float("inf"), "up": 2 ** 70,
             "peer": object.__new__(type("Peer", (), {"__str__": lambda self: "a peer"}))}
    line = parsed(json_line(event))
    assert (line["duration"], line["up"], line["peer"]) == ("inf", 2 ** 70, "a peer")


def test_the_schema_is_the_issues():
    assert FIELDS == ("peer", "version", "user", "method", "command", "destination", "up",
                      "down", "duration", "outcome", "detail", "rule", "worker", "verified",
                      "spliced", "via")


# ---- the observer ----------------------------------------------------------------------


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_EVENTS = st.fixed_dictionaries(
    {"log_format": st.one_of(st.just("{session}"), _TEXT)},
    optional={
        "session": st.one_of(_TEXT, st.integers()),
        "log_time": st.one_of(st.none(), st.floats(0, 4e9)),
        "log_level": st.sampled_from(list(LogLevel.iterconstants())),
        "log_namespace": _TEXT,
        "log_system": _TEXT,
        "log_failure": st.just(Failure(ValueError("boom"))),
    })


@given(_EVENTS, st.lists(st.floats(-2, 2), max_size=3))
def test_text_lines_are_twisteds_to_the_character(event, earlier):
    # ClassicText caches the time text by the second: lines at other
    # moments first must not change the next one.
    ours, theirs = io.StringIO(), io.StringIO()
    observer = ClassicText(ours)
    for delta in earlier:
        when = event.get("log_time")
        observer.time(None if when is None else max(0.0, when + delta))
    observer(event)
    textFileLogObserver(theirs)(event)
    assert ours.getvalue() == theirs.getvalue()


def test_text_lines_to_a_binary_file_are_utf8():
    event = session_event(user="j\u00fcrgen")
    ours, theirs = io.BytesIO(), io.BytesIO()
    ClassicText(ours)(event)
    textFileLogObserver(theirs)(event)
    assert ours.getvalue() == theirs.getvalue()


def test_text_is_twisteds_own_line_and_the_format_can_be_switched():
    event = session_event()
    ours, theirs = io.StringIO(), io.StringIO()
    observer = file_observer(ours, "text")
    assert ILogObserver.providedBy(observer)
    observer(event)
    textFileLogObserver(theirs)(event)
    assert ours.getvalue() == theirs.getvalue()
    assert "[socksd#info] 127.0.0.1:40000 socks5 user=alice" in ours.getvalue()

    observer.format = "json"            # what a reload would do
    observer(event)
    text_line, json_text = ours.getvalue().splitlines()
    assert parsed(json_text)["user"] == "alice"
    observer.format = "text"
    observer(event)
    assert ours.getvalue().splitlines()[2] == text_line


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="'xml' is not a log format"):
        FormatObserver("xml", textFileLogObserver(io.StringIO()), lambda line, level: None)


def test_syslog_gets_the_json_line_alone_at_its_levels_priority():
    sent: list[tuple[int, str]] = []
    observer = syslog_observer("socksd-test", "json", send=lambda p, m: sent.append((p, m)))
    observer(session_event())
    observer(session_event(outcome="denied"))
    observer({"log_format": "bad", "log_level": LogLevel.error, "log_time": 0.0})
    assert [priority for priority, _ in sent] == [syslog.LOG_INFO, syslog.LOG_WARNING,
                                                  syslog.LOG_ERR]
    assert [parsed(message)["level"] for _, message in sent] == ["info", "warn", "error"]
