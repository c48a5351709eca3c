"""The log channel between a worker and the supervisor, in memory: what the
worker's LogChannel writes, fed to the supervisor's _WorkerLog in pieces of
any size, comes out as the same events (failures with their message), and
what is not a record is reported, not published."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from socksd.tap.worker import FINAL_REPORT_WAIT, LogChannel
from socksd.tap.workers import MAX_RECORD, _WorkerLog


def worker_bytes(*emit) -> bytes:
    """What a worker's channel sends for the events logged by ``emit``s."""
    channel = LogChannel(0)
    transport = StringTransport()
    channel.makeConnection(transport)
    log = Logger(namespace="socksd", observer=channel)
    for call in emit:
        call(log)
    return transport.value()


def from_worker(data: bytes, piece: int) -> list[dict]:
    events = []
    receiver = _WorkerLog(3)
    receiver.makeConnection(StringTransport())
    observer = events.append
    globalLogPublisher.addObserver(observer)
    try:
        for i in range(0, len(data), piece):
            receiver.dataReceived(data[i:i + piece])
    finally:
        globalLogPublisher.removeObserver(observer)
    return events


@pytest.mark.parametrize("piece", [1, 7, 100, 1 << 20])
def test_events_arrive_whole_however_the_bytes_are_cut(piece):
    data = worker_bytes(
        lambda log: log.info("{session}", session="w1 127.0.0.1:1 socks5 ... ok", up=16),
        lambda log: log.warn("{session}", session="w1 127.0.0.1:2 socks5 ... refused"))
    events = [e for e in from_worker(data, piece) if e.get("log_namespace") == "socksd"]
    assert [formatEvent(e) for e in events] == ["w1 127.0.0.1:1 socks5 ... ok",
                                                "w1 127.0.0.1:2 socks5 ... refused"]
    assert events[0]["up"] == 16
    assert [e["log_level"].name for e in events] == ["info", "warn"]


def test_a_failure_keeps_its_message_and_frames():
    def fail(log):
        try:
            raise ValueError("the checker broke")
        except ValueError:
            log.failure("checking alice", Failure())

    [event] = [e for e in from_worker(worker_bytes(fail), 4096) if "log_failure" in e]
    text = event["log_failure"].getTraceback()
    assert "ValueError: the checker broke" in text
    assert "raise ValueError" in text          # the frame survived too
    assert "unpersistable" not in text


def test_stray_output_is_reported_not_published():
    data = b"a print() from some plugin\n" + worker_bytes(
        lambda log: log.info("{session}", session="after the noise"))
    events = from_worker(data, 5)
    texts = [formatEvent(e) for e in events]
    assert "after the noise" in texts
    assert any("not a log record" in t and "a print() from some plugin" in t for t in texts)


def test_unreadable_and_oversized_records_are_dropped_with_a_line():
    events = from_worker(b"\x1e{not json\n\x1e[1, 2]\n" + b"\x1e" + b"x" * (MAX_RECORD + 10),
                         65536)
    texts = [formatEvent(e) for e in events]
    assert sum("unreadable log record" in t for t in texts) == 2
    assert any(f"log record over {MAX_RECORD} bytes dropped" in t for t in texts)


def test_a_stalled_reader_makes_the_worker_drop_and_count():
    channel = LogChannel(0)
    transport = StringTransport()
    channel.makeConnection(transport)
    log = Logger(namespace="socksd", observer=channel)
    channel.pauseProducing()          # what Twisted does when the buffer is full
    for n in range(5):
        log.info("{session}", session=f"dropped {n}")
    assert transport.value() == b""
    assert channel.dropped == 5


# ---- the worker's end ----------------------------------------------------------------------

def test_a_worker_ends_its_log_closed_once_what_it_wrote_is_sent():
    """The reactor's end would drop what Twisted still buffers: the lines
    of the last sessions to end, written just before."""
    gone: list[str] = []
    channel = LogChannel(0, lambda: gone.append("gone"))
    transport = StringTransport()
    channel.makeConnection(transport)
    assert transport.producer is channel
    reactor = MemoryReactorClock()
    closed = channel.close(reactor)
    # No producer left to hold the close back; the buffer goes first.
    assert transport.producer is None and transport.disconnecting and not closed.called
    channel.connectionLost(Failure(ConnectionError("closed")))
    assert closed.called and gone == []        # its own end, not the supervisor's
    assert not reactor.getDelayedCalls()
    waiting = LogChannel(0, lambda: gone.append("gone"))
    waiting.makeConnection(StringTransport())
    held = waiting.close(reactor)
    reactor.advance(FINAL_REPORT_WAIT)         # the other end never closes: given up on
    assert held.called and gone == []


def test_a_worker_whose_log_closes_under_it_ends():
    gone: list[str] = []
    channel = LogChannel(0, lambda: gone.append("gone"))
    channel.makeConnection(StringTransport())
    channel.connectionLost(Failure(ConnectionError("the supervisor is gone")))
    assert gone == ["gone"]
