"""The log channel between a worker and the supervisor, in memory: what the
worker's LogChannel writes, fed to the supervisor's _WorkerLog in pieces of
any size, comes out as the same events (failures with their message), and
what is not a record is reported, not published."""

from __future__ import annotations

import io
import json

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure

from socksd.logs import FROM_WORKER, file_observer
from socksd.proxy import record as session_record
from socksd.tap.worker import (
    FINAL_REPORT_WAIT,
    LOG_BATCH_BYTES,
    LOG_BATCH_DELAY,
    LogChannel,
    log_record,
)
from socksd.tap.workers import MAX_RECORD, RECORD_SEPARATOR, _WorkerLog


def worker_bytes(*emit) -> bytes:
    """What a worker's channel sends for the events logged by ``emit``s."""
    clock = Clock()
    channel = LogChannel(0, reactor=clock)
    transport = StringTransport()
    channel.makeConnection(transport)
    log = Logger(namespace="socksd", observer=channel)
    for call in emit:
        call(log)
    clock.advance(LOG_BATCH_DELAY)
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
    clock = Clock()
    channel = LogChannel(0, reactor=clock)
    transport = StringTransport()
    channel.makeConnection(transport)
    log = Logger(namespace="socksd", observer=channel)
    log.info("{session}", session="taken before the pause")
    channel.pauseProducing()          # what Twisted does when the buffer is full
    for n in range(5):
        log.info("{session}", session=f"dropped {n}")
    clock.advance(LOG_BATCH_DELAY)
    # What the batch held when the pause came still goes: bounded by a batch.
    assert transport.value().count(RECORD_SEPARATOR) == 1
    assert b"taken before the pause" in transport.value()
    assert channel.dropped == 5


def test_records_go_in_batches_one_write_each():
    """The supervisor wakes once for many sessions' lines: a batch goes
    LOG_BATCH_DELAY after its first record, or at once when full."""
    clock = Clock()
    channel = LogChannel(0, reactor=clock)
    transport = StringTransport()
    writes: list[bytes] = []
    write = transport.write
    transport.write = lambda data: (writes.append(data), write(data))[1]
    channel.makeConnection(transport)
    log = Logger(namespace="socksd", observer=channel)
    for n in range(10):
        log.info("{session}", session=f"session {n}")
    assert writes == []
    clock.advance(LOG_BATCH_DELAY / 2)
    assert writes == []
    clock.advance(LOG_BATCH_DELAY / 2)
    assert len(writes) == 1 and writes[0].count(RECORD_SEPARATOR) == 10
    assert not clock.getDelayedCalls()
    big = "x" * 1000
    for _ in range(LOG_BATCH_BYTES // 1000 + 1):
        log.info("{session}", session=big)
        if len(writes) == 2:
            break
    # Full: sent at once, and no timer left for it.
    assert len(writes) == 2 and len(writes[1]) >= LOG_BATCH_BYTES > len(writes[1]) - 1100
    assert not clock.getDelayedCalls()


def test_a_worker_that_ends_sends_its_batch_then_each_line_at_once():
    clock = Clock()
    channel = LogChannel(0, reactor=clock)
    transport = StringTransport()
    channel.makeConnection(transport)
    log = Logger(namespace="socksd", observer=channel)
    log.info("{session}", session="the last session")
    channel.close(clock)
    assert b"the last session" in transport.value()
    log.info("{session}", session="said while closing")
    assert b"said while closing" in transport.value()


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


# ---- what the supervisor writes for a worker's event ------------------------------------

def _emitted(emit) -> dict:
    """The event ``emit`` logs, as the worker's own observers get it."""
    events: list[dict] = []
    emit(Logger(namespace="socksd", observer=events.append))
    [event] = events
    return event


def _legacy(message: str) -> dict:
    """A twisted.python.log.msg as twisted.logger hands it on (system "-")."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        legacy_log.msg(message)
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if formatEvent(e) == message]
    return event


def _session(log: Logger) -> None:
    """A session line with every client string a log line has to survive."""
    original = session_record.log
    session_record.log = log
    try:
        session_record.log_record(session_record.SessionRecord(
            worker=1, peer="127.0.0.1:4000", version=5, socks4a=False,
            user="al{ice}\n\udcff\u00e9 x", verified=True, method="userpass",
            command="connect", destination="ex{0}ample.com:80", up=16, down=7,
            duration=0.0123, outcome="refused", detail="no {rule}\x1b[0m", spliced=True,
            via="socks5://up:1080"))
    finally:
        session_record.log = original


EVENTS = {
    "session": lambda: _emitted(_session),
    "format spec": lambda: _emitted(lambda log: log.warn(
        "w{worker} {dropped} dropped, in {delay:g} s {why!r}", worker=0, dropped=3, delay=2.0,
        why="x")),
    "legacy": lambda: _legacy("SOCKSServerFactory starting on 1080"),
    "other namespace": lambda: _emitted(lambda log: Logger(
        namespace="twisted.scripts", observer=log.observer).info(
        "twistd {version} starting up.", version="26.10.0")),
    "error": lambda: _emitted(lambda log: log.error("w0 reload failed: {error}",
                                                    error="line 2: {bad}\nnext")),
    "no text": lambda: _emitted(lambda log: log.info(None, peer="127.0.0.1:1")),
}


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("name", list(EVENTS))
def test_a_workers_line_reads_as_the_line_of_a_single_process(name, fmt):
    """The worker makes the message and sends the JSON line's fields; the
    supervisor's text and JSON lines are the very lines one process writes
    for the same event (plus, in JSON, the worker's number)."""
    event = EVENTS[name]()
    [relayed] = from_worker(log_record(event), 1 << 20)
    assert relayed[FROM_WORKER] == 3

    def line(e: dict) -> str:
        out = io.StringIO()
        file_observer(out, fmt)(e)
        return out.getvalue()

    expected = line(dict(event, **{FROM_WORKER: 3}))
    assert line(relayed) == expected
    if name == "no text":
        assert expected == ""
    else:
        assert expected.count("\n") == 1 + (fmt == "text") * expected.count("\n\t")
    if fmt == "json" and name == "session":
        assert json.loads(expected)["user"] == "al{ice}\n\udcff\u00e9 x"


@pytest.mark.parametrize("record", [
    [1.0, "info", "socksd", None, "x"],                          # an item short
    [1.0, "info", "socksd", None, "x", {}, "more"],
    [1.0, "loud", "socksd", None, "x", {}],                      # no such level
    [1.0, "info", 7, None, "x", {}],
    [1.0, "info", "socksd", ["-"], "x", {}],
    [1.0, "info", "socksd", None, None, {}],
    ["now", "info", "socksd", None, "x", {}],
    [True, "info", "socksd", None, "x", {}],
    [1.0, "info", "socksd", None, "x", []],
    # Only the fields a JSON line carries, as strings and numbers: no
    # log_* key of Twisted's, nothing an observer would take for an object.
    [1.0, "info", "socksd", None, "x", {"log_format": "{peer}"}],
    [1.0, "info", "socksd", None, "x", {"log_failure": "boom"}],
    [1.0, "info", "socksd", None, "x", {"socksd_worker": 0}],
    [1.0, "info", "socksd", None, "x", {"anything": 1}],
    [1.0, "info", "socksd", None, "x", {"peer": {"nested": 1}}],
    [1.0, "info", "socksd", None, "x", {"peer": None}],
    [1.0, "info", "socksd", None, "x", {"up": [1]}],
])
def test_a_compact_record_the_worker_never_sends_is_unreadable(record):
    data = RECORD_SEPARATOR + json.dumps(record).encode() + b"\n"
    texts = [formatEvent(e) for e in from_worker(data, 1 << 20)]
    assert len(texts) == 1 and "unreadable log record" in texts[0]


@pytest.mark.parametrize("raw", [b"[NaN, \"info\", \"socksd\", null, \"x\", {}]",
                                 b"[1, \"info\", \"socksd\", null, \"x\", {\"up\": Infinity}]",
                                 b"[" * 100_000,
                                 # Twisted's JSON of an event is for failures only ...
                                 b'{"log_format": "forged", "log_namespace": "socksd"}',
                                 # ... and a time no observer can write stops none.
                                 b'[1e300, "info", "socksd", null, "x", {}]',
                                 b'{"log_failure": {}, "log_time": 1e300}'])
def test_what_json_reads_but_a_worker_never_writes_is_unreadable(raw):
    texts = [formatEvent(e) for e in from_worker(RECORD_SEPARATOR + raw + b"\n", 1 << 20)]
    assert len(texts) == 1 and "unreadable log record" in texts[0]


def test_the_level_names_the_worker_sends_are_the_supervisors():
    for level in LogLevel.iterconstants():
        event = _emitted(lambda log, level=level: log.emit(level, "at {level_name}",
                                                           level_name=level.name))
        [relayed] = from_worker(log_record(event), 1 << 20)
        assert relayed["log_level"] is level
