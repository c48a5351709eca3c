"""Log lines a stranger can repeat at will.

A refusal for a connection limit, or a knock on a BIND port, is one line
each: a flood of connections would be a flood of log. ``RateLimitedLine``
logs the first, counts the rest and sums them up in one line a second
later. It imports nothing of ours, so every layer may use it.
"""

from __future__ import annotations

from string import Formatter
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger


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
