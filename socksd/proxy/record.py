"""What one session did, written down once at its end: the one line in the
log now; JSON lines and metrics read the same record."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.logger import Logger

from socksd.escape import escape

log = Logger(namespace="socksd")


@dataclass(slots=True)
class SessionRecord:
    """A session's outcome. Fields are raw (what a client sent, unescaped):
    :func:`log_record` escapes them for the text line."""

    worker: int | None      # which of ``workers = N`` processes (None: the only one)
    peer: str
    version: int
    socks4a: bool           # version 4, the destination named (SOCKS4a)
    user: str               # the authenticated name, else the one claimed, else "-"
    verified: bool
    method: str
    command: str
    destination: str
    up: int
    down: int
    duration: float
    outcome: str
    detail: str
    spliced: bool
    via: str | None = None  # the upstream it went through (a rule's via)


def log_record(record: SessionRecord) -> None:
    """The session line, logged as one field; observers still get every
    field for structured output, raw."""
    emit = log.info if record.outcome == "ok" else log.warn
    # One f-string, made here: twisted.logger's str.format-style rendering
    # of a dozen fields costs more than the rest of a short session's line.
    worker, detail = record.worker, record.detail
    line = (f"{'' if worker is None else f'w{worker} '}"
            f"{escape(record.peer, spaces=True)} socks{record.version}"
            f"{'a ' if record.socks4a else ' '}"
            f"user={escape(record.user, spaces=True)} method={record.method} "
            f"{record.command} {escape(record.destination, spaces=True)} "
            f"{'' if record.via is None else f'via={record.via} '}up={record.up} "
            f"down={record.down} {record.duration:.3f}s {record.outcome}"
            f"{': ' if detail else ''}{escape(detail)}"
            f"{' [splice]' if record.spliced else ''}")
    emit("{session}", session=line, peer=record.peer, version=record.version,
         user=record.user, method=record.method, command=record.command,
         destination=record.destination, up=record.up, down=record.down,
         duration=record.duration, outcome=record.outcome, detail=detail,
         verified=record.verified, spliced=record.spliced, worker=worker, via=record.via)
