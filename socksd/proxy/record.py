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
    :meth:`format` escapes them for the text line."""

    worker: int | None      # which of ``workers = N`` processes (None: the only one)
    peer: str
    version: int
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

    def format(self) -> str:
        # One f-string: twisted.logger's str.format-style rendering of a
        # dozen fields costs more than the rest of a short session's line.
        return (f"{'' if self.worker is None else f'w{self.worker} '}"
                f"{escape(self.peer, spaces=True)} socks{self.version} "
                f"user={escape(self.user, spaces=True)} method={self.method} "
                f"{self.command} {escape(self.destination, spaces=True)} up={self.up} "
                f"down={self.down} {self.duration:.3f}s {self.outcome}"
                f"{': ' if self.detail else ''}{escape(self.detail)}"
                f"{' [splice]' if self.spliced else ''}")


def log_record(record: SessionRecord) -> None:
    """The session line, logged as one field; observers still get every
    field for structured output, raw."""
    emit = log.info if record.outcome == "ok" else log.warn
    emit("{session}", session=record.format(), peer=record.peer, version=record.version,
         user=record.user, method=record.method, command=record.command,
         destination=record.destination, up=record.up, down=record.down,
         duration=record.duration, outcome=record.outcome, detail=record.detail,
         verified=record.verified, spliced=record.spliced, worker=record.worker)
