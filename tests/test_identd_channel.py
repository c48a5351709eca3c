"""The channel that carries a worker's identd registrations to the
supervisor (socksd.ident.channel), in memory: what RegistrationSender writes,
fed to a RegistrationReceiver in pieces of any size, becomes entries in the
supervisor's registry; a hostile frame closes the channel and clears that
worker's entries with one log line; a slow supervisor holds the worker's
frames back (never drops them), in a queue bounded by the sessions."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure

import fakes
from socksd.config import Config
from socksd.ident.channel import (
    MAX_FRAME,
    MAX_USER,
    RegistrationReceiver,
    RegistrationSender,
    parse_frame,
)
from socksd.ident.registry import ProxiedConnections
from socksd.tap.workers import DRAIN_WAIT, WorkersService, _ChannelFactory, _Worker, config_message

LOCAL, REMOTE = "127.0.0.1", "192.0.2.7"


def errors(events: list[dict]) -> list[str]:
    return [formatEvent(e) for e in events if e["log_level"].name in ("error", "critical")]


def sender() -> tuple[RegistrationSender, StringTransport]:
    channel = RegistrationSender()
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def receiver(registry: ProxiedConnections, index: int = 0
             ) -> tuple[RegistrationReceiver, StringTransport]:
    channel = RegistrationReceiver(registry, index)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def feed(channel: RegistrationReceiver, data: bytes, piece: int) -> None:
    for i in range(0, len(data), piece):
        channel.dataReceived(data[i:i + piece])


def frame(message) -> bytes:
    payload = message if isinstance(message, bytes) else json.dumps(message).encode()
    return struct.pack("!I", len(payload)) + payload


# ---- what a worker says arrives ----------------------------------------------------------

@pytest.mark.parametrize("piece", [1, 3, 7, 100, 1 << 20])
def test_adds_and_removes_arrive_however_the_bytes_are_cut(piece):
    worker, out = sender()
    alice = worker.add(LOCAL, 40001, REMOTE, 6667, "alice")
    bob = worker.add("::1", 40002, "::1", 6667, "bob")
    registry = ProxiedConnections()
    supervisor, _ = receiver(registry)
    feed(supervisor, out.value(), piece)
    out.clear()
    assert registry.user_for(LOCAL, 40001, REMOTE, 6667) == "alice"
    assert registry.user_for("::1", 40002, "::1", 6667) == "bob"
    worker.remove(alice)
    feed(supervisor, out.value(), piece)
    assert registry.user_for(LOCAL, 40001, REMOTE, 6667) is None
    assert registry.user_for("::1", 40002, "::1", 6667) == "bob"
    assert len(registry) == 1 and list(supervisor.entries) == [bob]


def test_any_user_name_round_trips():
    """A SOCKS user name is any string (bytes read with surrogateescape,
    non-ASCII, quotes, a CR LF the identd will refuse to send): it arrives as
    it was, and only the length is bounded."""
    names = ["al\"ice\\", "\u00e9l\u00e8ve", "x\udcff\udc80y", "a\r\nb", "\u2028", "x" * MAX_USER]
    worker, out = sender()
    for port, name in enumerate(names, start=1):
        assert worker.add(LOCAL, port, REMOTE, 6667, name) is not None
    registry = ProxiedConnections()
    supervisor, transport = receiver(registry)
    supervisor.dataReceived(out.value())
    assert not transport.disconnecting
    assert [registry.user_for(LOCAL, port, REMOTE, 6667)
            for port in range(1, len(names) + 1)] == names


def test_a_name_too_long_for_ident_is_not_registered():
    worker, out = sender()
    assert worker.add(LOCAL, 1, REMOTE, 6667, "x" * (MAX_USER + 1)) is None
    assert worker.add(LOCAL, 1, REMOTE, 6667, "\u00e9" * (MAX_USER // 2 + 1)) is None
    assert worker.add(LOCAL, 1, REMOTE, 6667, "") is None
    worker.remove(None)
    assert out.value() == b""


def test_a_worker_ending_with_entries_clears_exactly_its_own():
    registry = ProxiedConnections()
    first, _ = receiver(registry, 0)
    second, _ = receiver(registry, 1)
    worker0, out0 = sender()
    worker1, out1 = sender()
    for port in (1, 2, 3):
        worker0.add(LOCAL, port, REMOTE, 6667, "alice")
    worker1.add(LOCAL, 4, REMOTE, 6667, "bob")
    first.dataReceived(out0.value())
    second.dataReceived(out1.value())
    assert len(registry) == 4
    first.connectionLost(Failure(ConnectionError("worker 0 exited")))
    assert len(registry) == 1 and registry.user_for(LOCAL, 4, REMOTE, 6667) == "bob"


def supervised(registry: ProxiedConnections, index: int = 0):
    """A worker as the supervisor sees it (socksd.tap.workers), its process
    a stand-in, its channel on a StringTransport, on a memory reactor."""
    supervisor = WorkersService(2, ("tcp:0:interface=127.0.0.1",), [],
                                reactor=MemoryReactorClock(), registry=registry)
    supervisor.spawn = lambda index: None     # no process restarted
    worker = _Worker(supervisor, index)
    worker.makeConnection(fakes.FakeProcess())
    supervisor.workers[index] = worker
    supervisor.reporting.add(worker)
    _ChannelFactory(worker, registry).buildProtocol(None).makeConnection(StringTransport())
    return supervisor, worker


def test_process_ended_clears_the_workers_entries_even_before_its_channel_closes():
    registry = ProxiedConnections()
    supervisor, worker = supervised(registry)
    channel = worker.channel
    worker_out, out = sender()
    worker_out.add(LOCAL, 1, REMOTE, 6667, "alice")
    channel.dataReceived(out.value())
    out.clear()
    worker_out.add(LOCAL, 2, REMOTE, 6667, "alice")
    in_flight = out.value()                  # its last frame, not read yet
    worker.processEnded(Failure(ConnectionError("killed")))
    assert len(registry) == 0
    channel.dataReceived(in_flight)          # read after its end: counts for nothing
    assert len(registry) == 0
    # The channel is read on, for a while, for the counts a clean stop sends
    # last; then closed.
    assert not channel.transport.disconnecting
    supervisor.reactor.advance(DRAIN_WAIT)
    assert channel.transport.disconnecting
    channel.connectionLost(Failure(ConnectionError("closed")))
    assert len(registry) == 0


def test_a_late_retraction_from_one_worker_leaves_anothers_new_entry():
    """The channels are not ordered with each other: worker 0's remove of an
    ended session can arrive after worker 1 registered a new connection on
    the same ports. The newest entry answers, and each remove takes its own."""
    registry = ProxiedConnections()
    first, _ = receiver(registry, 0)
    second, _ = receiver(registry, 1)
    worker0, out0 = sender()
    worker1, out1 = sender()
    old = worker0.add(LOCAL, 40001, REMOTE, 6667, "alice")
    first.dataReceived(out0.value())
    out0.clear()
    worker0.remove(old)                      # sent, not yet read by the supervisor
    worker1.add(LOCAL, 40001, REMOTE, 6667, "bob")
    second.dataReceived(out1.value())
    assert registry.user_for(LOCAL, 40001, REMOTE, 6667) == "bob"
    first.dataReceived(out0.value())
    assert registry.user_for(LOCAL, 40001, REMOTE, 6667) == "bob"
    assert len(registry) == 1


def test_a_registration_fires_the_queries_waiting_for_it():
    registry = ProxiedConnections()
    channel, _ = receiver(registry)
    got: list[str] = []
    registry.wait_for(LOCAL, 40001, REMOTE, 6667).addCallback(got.append)
    worker, out = sender()
    worker.add(LOCAL, 40001, REMOTE, 6667, "alice")
    channel.dataReceived(out.value())
    assert got == ["alice"] and registry.waiting() == 0


# ---- hostile frames ----------------------------------------------------------------------

GOOD = frame(["add", 1, LOCAL, 40001, REMOTE, 6667, "alice"])


@pytest.mark.parametrize("bad, why", [
    (frame(b"not json"), "not JSON"),
    (frame(b"[" * 3000), "not JSON"),
    (frame(b'{"add": 1}'), "not a JSON array"),
    (frame([]), "not a JSON array"),
    (frame(["add", 2, LOCAL, 40002, REMOTE, 6667]), "unknown message 'add' of 6 items"),
    (frame(["drop", 1]), "unknown message 'drop'"),
    (frame(["add", 2, "example.org", 40002, REMOTE, 6667, "bob"]), "address 'example.org'"),
    (frame(["add", 2, LOCAL, 70000, REMOTE, 6667, "bob"]), "port 70000"),
    (frame(["add", 2, LOCAL, True, REMOTE, 6667, "bob"]), "port True"),
    (frame(["add", 2, LOCAL, "80", REMOTE, 6667, "bob"]), "port '80'"),
    (frame(["add", -2, LOCAL, 40002, REMOTE, 6667, "bob"]), "id -2"),
    (frame(["add", False, LOCAL, 40002, REMOTE, 6667, "bob"]), "id False"),
    (frame(["add", 2, LOCAL, 40002, REMOTE, 6667, ""]), "user name empty"),
    (frame(["add", 2, LOCAL, 40002, REMOTE, 6667, 7]), "not a string"),
    (frame(["add", 2, LOCAL, 40002, REMOTE, 6667, "x" * (MAX_USER + 1)]), "too long"),
    (frame(["add", 1, LOCAL, 40002, REMOTE, 6667, "bob"]), "id 1 added twice"),
    (frame(["remove", 9]), "id 9 removed but never added"),
    (struct.pack("!I", MAX_FRAME + 1), f"a frame of {MAX_FRAME + 1} bytes"),
    (struct.pack("!I", 0xFFFFFFFF) + b"x" * 100, "a frame of 4294967295 bytes"),
])
def test_a_malformed_frame_closes_the_channel_and_clears_with_one_line(bad, why, log_events):
    registry = ProxiedConnections()
    registry.add(LOCAL, 1, REMOTE, 6667, "other worker's")
    channel, transport = receiver(registry, 3)
    # The bad frame, then more good-looking frames in the same read: none counts.
    channel.dataReceived(GOOD + bad + frame(["add", 5, LOCAL, 40005, REMOTE, 6667, "eve"]))
    assert transport.disconnecting
    assert registry.user_for(LOCAL, 40001, REMOTE, 6667) is None
    assert registry.user_for(LOCAL, 40005, REMOTE, 6667) is None
    assert len(registry) == 1        # another worker's entry stays
    [line] = errors(log_events)
    assert line.startswith("worker 3: malformed frame on its channel (") and why in line, line
    assert "channel closed, 1 identd entry cleared" in line
    channel.dataReceived(GOOD)       # whatever follows is ignored
    channel.connectionLost(Failure(ConnectionError("closed")))
    assert len(registry) == 1 and len(errors(log_events)) == 1


def test_a_malformed_frame_is_logged_escaped(log_events):
    channel, _ = receiver(ProxiedConnections())
    channel.dataReceived(frame(["\x1b[31mred\n", 1]))
    [line] = errors(log_events)
    assert "\x1b" not in line and "\n" not in line


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 50))
def test_arbitrary_bytes_never_raise(data, piece):
    registry = ProxiedConnections()
    channel, transport = receiver(registry)
    feed(channel, GOOD + data, piece)
    channel.connectionLost(Failure(ConnectionError("closed")))
    assert len(registry) == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parse_frame_raises_only_malformed(payload):
    try:
        kind, ident, fields = parse_frame(payload)
    except ValueError as e:
        assert type(e).__name__ == "Malformed"
    else:
        assert kind in ("add", "remove") and ident >= 0


# ---- back-pressure: the worker holds, never drops ----------------------------------------

def test_a_paused_channel_queues_in_order_and_flushes_on_resume():
    worker, out = sender()
    worker.pauseProducing()                      # the supervisor reads slowly
    a = worker.add(LOCAL, 1, REMOTE, 6667, "alice")
    worker.add(LOCAL, 2, REMOTE, 6667, "bob")
    assert out.value() == b"" and len(worker.queue) == 2
    worker.resumeProducing()
    registry = ProxiedConnections()
    channel, _ = receiver(registry)
    channel.dataReceived(out.value())
    assert len(registry) == 2 and not worker.queue
    out.clear()
    worker.pauseProducing()
    worker.remove(a)                             # sent: its remove must be too
    assert out.value() == b""
    worker.resumeProducing()
    channel.dataReceived(out.value())
    assert registry.user_for(LOCAL, 1, REMOTE, 6667) is None and len(registry) == 1


def test_a_session_that_ends_while_its_add_is_queued_sends_nothing():
    """The queue is bounded by the live sessions, however long the
    supervisor stalls: an add still queued is taken back by its remove."""
    worker, out = sender()
    worker.pauseProducing()
    for port in range(1, 10001):
        worker.remove(worker.add(LOCAL, port % 60000 + 1, REMOTE, 6667, "alice"))
    live = worker.add(LOCAL, 1, REMOTE, 6667, "bob")
    assert len(worker.queue) == 1 and out.value() == b""
    worker.resumeProducing()
    registry = ProxiedConnections()
    channel, transport = receiver(registry)
    channel.dataReceived(out.value())
    assert not transport.disconnecting
    assert registry.user_for(LOCAL, 1, REMOTE, 6667) == "bob" and len(registry) == 1
    assert list(channel.entries) == [live]


def test_a_transport_that_pauses_again_mid_flush_keeps_the_rest():
    worker, out = sender()
    worker.pauseProducing()
    for port in (1, 2, 3):
        worker.add(LOCAL, port, REMOTE, 6667, "alice")
    writes: list[bytes] = []

    def write(data: bytes) -> None:
        writes.append(data)
        if len(writes) == 2:
            worker.pauseProducing()              # the buffer is full again

    out.write = write
    worker.resumeProducing()
    assert len(writes) == 2 and len(worker.queue) == 1
    worker.add(LOCAL, 4, REMOTE, 6667, "bob")    # behind the queued one, not before it
    assert len(writes) == 2 and len(worker.queue) == 2
    worker.resumeProducing()
    registry = ProxiedConnections()
    channel, _ = receiver(registry)
    channel.dataReceived(b"".join(writes))
    assert [parse_frame(w[4:])[1] for w in writes] == [0, 1, 2, 3]
    assert len(registry) == 4


def test_the_sender_registers_as_a_streaming_producer():
    worker, out = sender()
    assert out.producer is worker and out.streaming


def test_a_closed_channel_drops_everything_quietly():
    worker, out = sender()
    worker.pauseProducing()
    entry = worker.add(LOCAL, 1, REMOTE, 6667, "alice")
    worker.connectionLost(Failure(ConnectionError("supervisor gone")))
    assert not worker.queue
    assert worker.add(LOCAL, 2, REMOTE, 6667, "bob") is None
    worker.remove(entry)
    worker.resumeProducing()
    assert out.value() == b""


def test_a_worker_sent_a_reload_still_clears_its_entries_when_it_ends():
    registry = ProxiedConnections()
    _supervisor, worker = supervised(registry)
    channel = worker.channel
    worker_out, out = sender()
    worker_out.add(LOCAL, 1, REMOTE, 6667, "alice")
    channel.dataReceived(out.value())
    worker.configure(config_message(Config()))
    assert channel.transport.value().endswith(b'["config",null,null]')   # the reload
    worker.processEnded(Failure(ConnectionError("killed")))
    assert len(registry) == 0
