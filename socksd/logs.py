"""Log helpers: lines a stranger can repeat at will, and the log's two formats.

A refusal for a connection limit, or a knock on a BIND port, is one line
each: a flood of connections would be a flood of log. ``RateLimitedLine``
logs the first, counts the rest and sums them up in one line a second
later.

``[log] format = "json"`` writes each event as one JSON object a line
(:func:`json_line`); :class:`FormatObserver` is the observer twistd is given,
writing text or JSON where twistd would have written text.

This module imports nothing of ours, so every layer may use it.
"""

from __future__ import annotations

import json
import math
import syslog
import time
from collections.abc import Callable
from datetime import datetime, timezone
from string import Formatter
from typing import IO, Any, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    Logger,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python.compat import ioType
from twisted.python.failure import Failure
from twisted.python.log import ILogObserver as LegacyILogObserver
from zope.interface import implementer


class RateLimitedLine:
    """The first line is logged as it comes; the ones after it, until
    ``period`` seconds have passed, are counted, then ``summary`` says how
    many (if any) with ``count`` and those fields of that first line it names
    (not its peer: the count is of many). The next line after that is logged
    in full again.
    """

    __slots__ = ("reactor", "log", "summary", "summary_fields", "period", "quiet", "fields",
                 "call")

    def __init__(self, reactor: IReactorTime, log: Logger, summary: str,
                 period: float = 1.0) -> None:
        self.reactor = reactor
        self.log = log
        self.summary = summary
        self.summary_fields = {name for _text, name, _spec, _conversion
                               in Formatter().parse(summary) if name}
        self.period = period
        self.quiet: int | None = None    # lines since the last one logged; None: none logged
        self.fields: dict[str, Any] = {}
        self.call: IDelayedCall | None = None

    def emit(self, format: str, **fields: Any) -> None:
        if self.quiet is not None:
            self.quiet += 1
            return
        self.quiet = 0
        self.fields = {k: v for k, v in fields.items() if k in self.summary_fields}
        self.log.warn(format, **fields)
        self.call = self.reactor.callLater(self.period, self._counted)

    def _counted(self) -> None:
        self.call = None
        count, self.quiet = self.quiet, None
        fields, self.fields = self.fields, {}
        if count:
            self.log.warn(self.summary, count=count, **fields)

    def flush(self) -> None:
        """Sum up now and leave no timer behind (what the lines were about,
        a listener, is going away)."""
        if self.call is not None and self.call.active():
            self.call.cancel()
            self._counted()


# The log's formats. "text" is Twisted's own line (textFileLogObserver's);
# "json" is one JSON object a line.
FORMATS = ("text", "json")

# The keys of a JSON line besides time, level, event and traceback: the
# session line's structured fields and the rule a rule line names. A key is
# there when one of socksd's events has that field (and it is not None):
# Twisted's events have fields of their own under these names (twistd's
# start-up line has a "version", Twisted's). These names are the schema
# operators' shippers and queries are written against: add to them, never
# rename.
# "verified": whether "user" was proven (a password, Kerberos, the client's
# identd) or only claimed; "spliced": relayed in the kernel; "via": the
# upstream proxy the session went through.
FIELDS = ("peer", "version", "user", "method", "command", "destination", "up", "down",
          "duration", "outcome", "detail", "rule", "worker", "verified", "spliced", "via")
# The event key the supervisor of workers = N sets on each event a worker
# sends it (Twisted's own included): the JSON line's "worker".
FROM_WORKER = "socksd_worker"


def rfc3339(seconds: float) -> str:
    """A POSIX time as RFC 3339 in UTC, to the millisecond: 2026-01-02T03:04:05.678Z."""
    moment = datetime.fromtimestamp(seconds, timezone.utc)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


def _plain(value: Any) -> str | int | float | bool:
    """A field's value as JSON can carry it: numbers and strings as they
    are (client strings raw: the encoder escapes them), anything else as
    its str(); a float that JSON cannot write (inf, nan) as its str() too."""
    if isinstance(value, (str, int)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _traceback(failure: Failure) -> str:
    try:
        return failure.getTraceback()
    except Exception:
        return f"<unprintable traceback of {failure!r}>"


def json_line(event: LogEvent) -> str | None:
    """One JSON object for an event, without the newline; None for an event
    with nothing to say (as Twisted's text observer writes nothing for it).

    Not Twisted's eventAsJSON (jsonFileLogObserver's format): that is a
    serialisation of the event for Twisted to read back (``log_*`` keys,
    every field whatever its name, RS-separated records), which a log
    shipper would have to know Twisted to read. This is a flat object with a
    stable schema: ``time`` (RFC 3339, UTC), ``level``, ``event`` (the
    message as the text line words it), the :data:`FIELDS` the event has,
    and ``traceback`` for a logged failure.

    ``ensure_ascii``: the line is printable ASCII whatever the strings held.
    Line feeds and other controls become escapes (``\\n``, ``\\u001b``), so
    one event is one line; so do non-ASCII characters, and a client's bytes
    that were not UTF-8 (kept as lone surrogates, U+DC80-U+DCFF) come out as
    ``\\udcXX``, which reads back to the same string. The writer never
    meets a character its encoding cannot write.
    """
    text = formatEvent(event)
    failure = event.get("log_failure")
    if not text:
        if failure is None:
            return None
        text = f"{getattr(failure.type, '__name__', failure.type)}: " \
               f"{failure.getErrorMessage()}"
    level = getattr(event.get("log_level"), "name", None)
    record: dict[str, Any] = {
        "time": rfc3339(event.get("log_time") or time.time()),
        "level": level if isinstance(level, str) else "info",
        "event": text,
    }
    namespace = event.get("log_namespace")
    if isinstance(namespace, str) and (namespace == "socksd" or namespace.startswith("socksd.")):
        for name in FIELDS:
            value = event.get(name)
            if value is not None:
                record[name] = _plain(value)
    if event.get(FROM_WORKER) is not None:
        record["worker"] = _plain(event[FROM_WORKER])
    if failure is not None:
        record["traceback"] = _traceback(failure)
    # DEL is the one ASCII control json.dumps leaves as it is.
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")).replace(
        "\x7f", "\\u007f")


LineWriter = Callable[[str, LogLevel], None]   # a JSON line (no newline) and its level


@implementer(ILogObserver)
class FormatObserver:
    """The observer twistd logs through: each event as Twisted's text
    (``text``, the very observer twistd would have made) or as a JSON line
    (``write``, to the same file or syslog).

    ``format`` is read at each event, so a reload may switch it by setting
    the attribute; nothing else holds the choice.
    """

    def __init__(self, format: str, text: ILogObserver, write: LineWriter) -> None:
        if format not in FORMATS:
            raise ValueError(f"{format!r} is not a log format ({', '.join(FORMATS)})")
        self.format = format
        self.text = text
        self.write = write

    def __call__(self, event: LogEvent) -> None:
        if self.format != "json":
            self.text(event)
            return
        try:
            line = json_line(event)
        except Exception as e:
            # An observer that raises is dropped by Twisted, and every line
            # after it lost: say what could not be written instead.
            line = json.dumps({"time": rfc3339(time.time()), "level": "error",
                               "event": f"a log event could not be written as JSON: {e!r}"})
        if line is not None:
            self.write(line, event.get("log_level", LogLevel.info))


def file_observer(out: IO[str], format: str) -> FormatObserver:
    """For twistd's ``-l FILE`` and ``-l -`` (stdout)."""

    def write(line: str, level: LogLevel) -> None:
        out.write(line + "\n")
        out.flush()

    return FormatObserver(format, ClassicText(out), write)


@implementer(ILogObserver)
class ClassicText:
    """Twisted's text observer (``textFileLogObserver``: ``TIME
    [namespace#level] text``), line for line, with less work per line:
    the time is formatted once a second, not once an event (a
    ``strftime`` and two datetimes each), and a session line, whose
    text is made already (the format ``{session}``), is written as it is
    rather than rendered by Twisted's formatter. Any other event is
    Twisted's own, with the cached time."""

    def __init__(self, out: IO[Any]) -> None:
        self.second: float | None = None
        self.stamp = "-"
        self.twisted = FileLogObserver(
            out, lambda event: formatEventAsClassicLogText(event, formatTime=self.time))
        self.out = out
        self.encoding = "utf-8" if ioType(out) is not str else None

    def time(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = math.floor(when)
        if second != self.second:
            # The same text for every moment of one second (the format has
            # no fraction, and a UTC offset changes on a whole second).
            self.stamp, self.second = formatTime(when), second
        return self.stamp

    def __call__(self, event: LogEvent) -> None:
        text = event.get("session") if event.get("log_format") == "{session}" else None
        if type(text) is not str or not text or "log_failure" in event or \
                "log_system" in event:
            self.twisted(event)
            return
        level = event.get("log_level")
        line = (f"{self.time(event.get('log_time'))} [{event.get('log_namespace', '-')}#"
                f"{'-' if level is None else level.name}] {text}\n")
        if "\n" in text:    # as formatEventAsClassicLogText indents a line's own lines
            line = line[:-1].replace("\n", "\n\t") + "\n"
        self.out.write(line if self.encoding is None else line.encode(self.encoding))
        self.out.flush()


# What a JSON line's level is to syslog. (Twisted's text observer says
# LOG_ALERT for any error and LOG_INFO for everything else.)
SYSLOG_PRIORITIES = {
    LogLevel.debug: syslog.LOG_DEBUG, LogLevel.info: syslog.LOG_INFO,
    LogLevel.warn: syslog.LOG_WARNING, LogLevel.error: syslog.LOG_ERR,
    LogLevel.critical: syslog.LOG_CRIT,
}


def syslog_observer(prefix: str, format: str,
                    send: Callable[[int, str], None] | None = None) -> FormatObserver:
    """For twistd's ``--syslog --prefix PREFIX``. Its text is Twisted's
    SyslogObserver, which opens the log (openlog) as twistd does; a JSON line
    is sent as the whole message, nothing before it, with a priority that
    follows its level. ``send``: syslog.syslog, unless a test listens."""
    from twisted.python.syslog import SyslogObserver

    text = SyslogObserver(prefix)
    send = send or syslog.syslog

    def write(line: str, level: LogLevel) -> None:
        send(SYSLOG_PRIORITIES.get(level, syslog.LOG_INFO), line)

    # What twistd does with it too: a legacy observer (a function of an
    # old-style event dict), wrapped for twisted.logger.
    legacy = cast(LegacyILogObserver, text.emit)
    return FormatObserver(format, LegacyLogObserverWrapper(legacy), write)
