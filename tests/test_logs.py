"""socksd.logs.RateLimitedLine: a line a stranger can repeat is logged once,
then counted, at most one counting line a period. Time is a MemoryReactorClock."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, capturedLogs, formatEvent

from socksd.logs import RateLimitedLine

log = Logger(namespace="socksd.test")


def make() -> tuple[RateLimitedLine, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    return RateLimitedLine(reactor, log, "{where}: {count} more"), reactor


def test_first_line_then_a_count_a_second_then_a_line_again():
    line, reactor = make()
    with capturedLogs() as events:
        for n in range(50):
            line.emit("{where}: knock from {peer}", where="bind", peer=f"10.0.0.{n}")
        reactor.advance(0.5)
        line.emit("{where}: knock from {peer}", where="bind", peer="10.0.0.99")
        reactor.advance(0.5)
        line.emit("{where}: knock from {peer}", where="bind", peer="10.0.0.100")
        reactor.advance(1.0)
    assert [formatEvent(e) for e in events] == [
        "bind: knock from 10.0.0.0", "bind: 50 more", "bind: knock from 10.0.0.100"]
    assert all(e["log_level"].name == "warn" for e in events)
    assert reactor.getDelayedCalls() == []


def test_one_line_alone_gets_no_count():
    line, reactor = make()
    with capturedLogs() as events:
        line.emit("{where}: knock from {peer}", where="bind", peer="10.0.0.1")
        reactor.advance(1.0)
    assert [formatEvent(e) for e in events] == ["bind: knock from 10.0.0.1"]


def test_the_count_carries_only_the_fields_it_names():
    """The count is of many lines: the first line's peer is not one of its
    fields (a JSON observer would take it for the peer of all of them)."""
    line, reactor = make()
    with capturedLogs() as events:
        line.emit("{where}: knock from {peer}", where="bind", peer="10.0.0.1")
        line.emit("{where}: knock from {peer}", where="bind", peer="10.0.0.2")
        reactor.advance(1.0)
    assert "peer" not in events[1] and events[1]["count"] == 1 and events[1]["where"] == "bind"


def test_flush_sums_up_at_once_and_leaves_no_timer():
    line, reactor = make()
    with capturedLogs() as events:
        line.emit("{where}: knock from {peer}", where="bind", peer="10.0.0.1")
        line.emit("{where}: knock from {peer}", where="bind", peer="10.0.0.2")
        line.flush()
        assert reactor.getDelayedCalls() == []
        line.flush()
        line.emit("{where}: knock from {peer}", where="bind", peer="10.0.0.3")
        line.flush()
    assert [formatEvent(e) for e in events] == [
        "bind: knock from 10.0.0.1", "bind: 1 more", "bind: knock from 10.0.0.3"]
