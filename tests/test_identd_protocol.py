"""The identd protocol (socksd.ident.server) driven over StringTransport.

The owner lookup is replaced by a fake (``socksd.ident.lookup.lookup`` is
monkeypatched) so each test says exactly who owns which connection; the
``blocking`` hook of IdentFactory either runs it inline or hands back
Deferreds the test fires in the order it chooses. Time is a
MemoryReactorClock.
"""

from __future__ import annotations

import io
import pwd
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from socksd.config import IdentdConfig
from socksd.ident import lookup as lookup_module
from socksd.ident.lookup import Connection, Owner
from socksd.ident.policy import IdentPolicy
from socksd.ident.registry import ProxiedConnections
from socksd.ident.server import (
    MAX_BAD_QUERIES,
    MAX_LINES_PER_TURN,
    MAX_PENDING,
    IdentdLimits,
    IdentFactory,
    answer_query,
)
from socksd.tap.identd import serve_stdio
from socksd.wire import WireError
from socksd.wire.ident import parse_query

LOCAL = "127.0.0.1"      # the address the ident query arrives on
REMOTE = "127.0.0.2"     # the querier
IDENT_PORT = 113
PEER_PORT = 40000

DAEMON = pwd.getpwnam("daemon")   # a named, non-root account present on Debian


def _unused_uid() -> int:
    uid = 4242424
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


NAMELESS_UID = _unused_uid()


def inline(f, *args):
    return f(*args)


class FakeLookup:
    """Stands in for socksd.ident.lookup.lookup: a table of owned connections."""

    def __init__(self) -> None:
        self.owners: dict[Connection, Owner] = {}
        self.calls: list[Connection] = []
        self.error: Exception | None = None

    def own(self, server_port: int, client_port: int, uid: int, local: str = LOCAL,
            remote: str = REMOTE) -> None:
        self.owners[Connection(local, server_port, remote, client_port)] = Owner(uid, 1000 + uid)

    def __call__(self, conn: Connection) -> Owner | None:
        self.calls.append(conn)
        if self.error is not None:
            raise self.error
        return self.owners.get(conn)


@pytest.fixture
def fake(monkeypatch):
    fake = FakeLookup()
    monkeypatch.setattr(lookup_module, "lookup", fake)
    return fake


def make_factory(policy: IdentPolicy | None = None, limits: IdentdLimits = IdentdLimits(),
                 registry: ProxiedConnections | None = None, blocking=inline,
                 clock: MemoryReactorClock | None = None) -> IdentFactory:
    return IdentFactory(policy or IdentPolicy(hash_key=b"k"), limits, registry=registry,
                        reactor=clock or MemoryReactorClock(), blocking=blocking)


def connect(factory: IdentFactory, remote: str = REMOTE, local: str = LOCAL,
            peer_port: int = PEER_PORT):
    """A protocol of ``factory`` connected from ``remote`` to ``local``:113, or
    (None, None) when the factory refuses to build one."""
    cls = IPv6Address if ":" in remote else IPv4Address
    peer = cls("TCP", remote, peer_port)
    proto = factory.buildProtocol(peer)
    if proto is None:
        return None, None
    host_cls = IPv6Address if ":" in local else IPv4Address
    transport = StringTransport(hostAddress=host_cls("TCP", local, IDENT_PORT),
                                peerAddress=peer)
    proto.makeConnection(transport)
    return proto, transport


def ask(factory: IdentFactory, data: bytes, **where) -> bytes:
    proto, transport = connect(factory, **where)
    proto.dataReceived(data)
    return transport.value()


def lines(output: bytes) -> list[bytes]:
    assert output.endswith(b"\r\n") or output == b"", output
    return output.split(b"\r\n")[:-1]


# ---- the reply format ---------------------------------------------------------------

@pytest.mark.parametrize("query", [b"6193, 23\r\n", b"6193,23\r\n", b"6193 ,23\r\n",
                                   b"  6193  ,  23  \r\n", b"6193,\t23\r\n", b"6193, 23\n"])
def test_query_with_or_without_spaces(fake, query):
    fake.own(6193, 23, DAEMON.pw_uid)
    assert ask(make_factory(), query) == b"6193, 23 : USERID : UNIX : daemon\r\n"
    # local end = the address the query came in on; remote = the querier.
    assert fake.calls == [Connection(LOCAL, 6193, REMOTE, 23)]


@pytest.mark.parametrize("query", [b"038428 , 0052295\r\n", b"0038428,52295\r\n",
                                   b"38428, 000000000052295\r\n"])
def test_leading_zeros_are_decimal(fake, query):
    """RFC 1413 ports are decimal numbers; leading zeros do not change one
    (oidentd answers these too). The reply names the ports plainly."""
    fake.own(38428, 52295, DAEMON.pw_uid)
    assert ask(make_factory(), query) == b"38428, 52295 : USERID : UNIX : daemon\r\n"


def test_no_such_connection_is_no_user(fake):
    assert ask(make_factory(), b"6193, 23\r\n") == b"6193, 23 : ERROR : NO-USER\r\n"


def test_root_is_hidden_by_default(fake):
    fake.own(6193, 23, 0)
    assert ask(make_factory(), b"6193, 23\r\n") == b"6193, 23 : ERROR : HIDDEN-USER\r\n"


def test_uid_without_a_passwd_entry_is_answered_with_the_number(fake):
    fake.own(6193, 23, NAMELESS_UID)
    assert ask(make_factory(), b"6193, 23\r\n") == \
        b"6193, 23 : USERID : UNIX : %d\r\n" % NAMELESS_UID


def test_opsys_and_charset(fake):
    fake.own(1, 65535, DAEMON.pw_uid)
    factory = make_factory(IdentPolicy(opsys="OTHER", charset="UTF-8"))
    assert ask(factory, b"1,65535\r\n") == b"1, 65535 : USERID : OTHER,UTF-8 : daemon\r\n"


def test_ipv6_query(fake):
    fake.own(6193, 23, DAEMON.pw_uid, local="::1", remote="::1")
    out = ask(make_factory(), b"6193, 23\r\n", remote="::1", local="::1")
    assert out == b"6193, 23 : USERID : UNIX : daemon\r\n"
    assert fake.calls == [Connection("::1", 6193, "::1", 23)]


def test_v4_mapped_addresses_are_looked_up_as_ipv4(fake):
    fake.own(6193, 23, DAEMON.pw_uid)
    out = ask(make_factory(), b"6193, 23\r\n", remote="::ffff:" + REMOTE,
              local="::ffff:" + LOCAL)
    assert out == b"6193, 23 : USERID : UNIX : daemon\r\n"


def test_lookup_failure_is_unknown_error(fake):
    fake.error = OSError("netlink went away")
    assert ask(make_factory(), b"6193, 23\r\n") == b"6193, 23 : ERROR : UNKNOWN-ERROR\r\n"


# ---- INVALID-PORT and garbage -------------------------------------------------------

@pytest.mark.parametrize("query,echo", [
    (b"0, 23", b"0, 23"),
    (b"23, 0", b"23, 0"),
    (b"65536, 23", b"65536, 23"),
    (b"23, 65536", b"23, 65536"),
    (b"99999, 1", b"99999, 1"),
    (b"abc, 23", b"abc, 23"),
    (b"6193", b"6193"),
    (b"-1, 23", b"-1, 23"),
    (b"6193, 23, 5", b"6193, 23, 5"),
    (b"0x10, 23", b"0x10, 23"),
])
def test_invalid_port(fake, query, echo):
    out = ask(make_factory(), query + b"\r\n")
    assert out == echo + b" : ERROR : INVALID-PORT\r\n"
    assert fake.calls == []


@pytest.mark.parametrize("garbage", [b"", b"\x00\xff\xfe", b":::", b"GET / HTTP/1.0",
                                     b"\x1b[31m:1,2:", b"\t \t", "é, ü".encode()])
def test_garbage_gets_one_error_line_and_the_connection_stays_usable(fake, garbage):
    fake.own(6193, 23, DAEMON.pw_uid)
    proto, transport = connect(make_factory())
    proto.dataReceived(garbage + b"\r\n")
    first = lines(transport.value())
    assert len(first) == 1
    pair, kind, token = first[0].split(b" : ")
    assert (kind, token) == (b"ERROR", b"INVALID-PORT")
    assert all(0x20 <= c < 0x7F for c in pair)
    assert not transport.disconnecting
    proto.dataReceived(b"6193, 23\r\n")
    assert lines(transport.value())[1] == b"6193, 23 : USERID : UNIX : daemon"


def test_garbage_on_one_connection_does_not_block_another(fake):
    fake.own(6193, 23, DAEMON.pw_uid)
    factory = make_factory()
    bad, bad_transport = connect(factory, peer_port=1)
    good, good_transport = connect(factory, peer_port=2)
    bad.dataReceived(b"\xff" * 50)                # no EOL: still being read
    good.dataReceived(b"6193, 23\r\n")
    assert good_transport.value() == b"6193, 23 : USERID : UNIX : daemon\r\n"
    assert bad_transport.value() == b""


# ---- order of replies ---------------------------------------------------------------

class DeferredLookups:
    """A ``blocking`` hook that returns Deferreds the test fires when it likes."""

    def __init__(self) -> None:
        self.waiting: list[tuple[defer.Deferred, object, tuple]] = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.waiting.append((d, f, args))
        return d

    def fire_newest_first(self) -> int:
        """Fire every waiting lookup, the most recently started first (an
        identd that looks up several queries at once sees them complete in
        reverse order); repeat until none waits. Returns how many fired."""
        fired = 0
        while self.waiting:
            d, f, args = self.waiting.pop()
            d.callback(f(*args))
            fired += 1
        return fired


def test_several_queries_answered_in_order_when_lookups_finish_in_reverse(fake):
    for port, uid in ((1001, DAEMON.pw_uid), (1002, 0), (1003, NAMELESS_UID)):
        fake.own(port, 23, uid)
    lookups = DeferredLookups()
    proto, transport = connect(make_factory(blocking=lookups))
    proto.dataReceived(b"1001, 23\r\n1002, 23\r\n1003,23\r\n1004 , 23\r\nxyz\r\n")
    assert transport.value() == b""        # nothing before the first lookup is done
    assert lookups.fire_newest_first() == 4
    assert lines(transport.value()) == [
        b"1001, 23 : USERID : UNIX : daemon",
        b"1002, 23 : ERROR : HIDDEN-USER",
        b"1003, 23 : USERID : UNIX : %d" % NAMELESS_UID,
        b"1004, 23 : ERROR : NO-USER",
        b"xyz : ERROR : INVALID-PORT",
    ]


def test_an_immediate_answer_waits_behind_a_pending_lookup(fake):
    """A proxied-user or INVALID-PORT answer needs no lookup, but a query
    before it does: the replies still come in query order."""
    fake.own(1001, 23, DAEMON.pw_uid)
    registry = ProxiedConnections()
    registry.add(LOCAL, 1002, REMOTE, 23, "alice")
    lookups = DeferredLookups()
    proto, transport = connect(make_factory(registry=registry, blocking=lookups))
    proto.dataReceived(b"1001, 23\r\n1002, 23\r\n0, 0\r\n")
    assert transport.value() == b""
    lookups.fire_newest_first()
    assert lines(transport.value()) == [
        b"1001, 23 : USERID : UNIX : daemon",
        b"1002, 23 : USERID : UNIX : alice",
        b"0, 0 : ERROR : INVALID-PORT",
    ]


def test_queries_split_across_reads(fake):
    fake.own(6193, 23, DAEMON.pw_uid)
    proto, transport = connect(make_factory())
    for byte in b"6193, 2":
        proto.dataReceived(bytes([byte]))
    assert transport.value() == b""
    proto.dataReceived(b"3\r")
    assert transport.value() == b""
    proto.dataReceived(b"\n6193, 24\r\n")
    assert lines(transport.value()) == [b"6193, 23 : USERID : UNIX : daemon",
                                        b"6193, 24 : ERROR : NO-USER"]


def test_many_pipelined_queries_pause_reading_then_all_are_answered(fake):
    lookups = DeferredLookups()
    proto, transport = connect(make_factory(blocking=lookups))
    count = MAX_PENDING * 3
    proto.dataReceived(b"".join(b"%d, 23\r\n" % (1000 + i) for i in range(count)))
    assert transport.producerState == "paused"
    lookups.fire_newest_first()
    assert lines(transport.value()) == [b"%d, 23 : ERROR : NO-USER" % (1000 + i)
                                        for i in range(count)]
    assert transport.producerState == "producing"


def test_reply_after_the_client_left_is_dropped(fake):
    lookups = DeferredLookups()
    proto, transport = connect(make_factory(blocking=lookups))
    proto.dataReceived(b"6193, 23\r\n6194, 23\r\n")
    proto.connectionLost(Failure(ConnectionError("gone")))
    lookups.fire_newest_first()
    assert transport.value() == b""


# ---- a client that half-closes after its queries (nc -N, shutdown(SHUT_WR)) -------------

def test_a_query_then_eof_is_answered_when_its_lookup_ends_then_closed(fake):
    fake.own(6193, 23, DAEMON.pw_uid)
    lookups = DeferredLookups()
    proto, transport = connect(make_factory(blocking=lookups))
    proto.dataReceived(b"6193, 23\r\n")
    proto.readConnectionLost()
    assert transport.value() == b"" and not transport.disconnecting
    lookups.fire_newest_first()
    assert lines(transport.value()) == [b"6193, 23 : USERID : UNIX : daemon"]
    assert transport.disconnecting


@pytest.mark.parametrize("last", [b"6193, 23", b"6193, 23\r", b"xyz"])
def test_a_last_line_ended_by_eof_is_answered(fake, last):
    fake.own(6193, 23, DAEMON.pw_uid)
    lookups = DeferredLookups()
    proto, transport = connect(make_factory(blocking=lookups))
    proto.dataReceived(b"6194, 23\r\n" + last)
    proto.readConnectionLost()
    lookups.fire_newest_first()
    expected = (b"xyz : ERROR : INVALID-PORT" if last == b"xyz"
                else b"6193, 23 : USERID : UNIX : daemon")
    assert lines(transport.value()) == [b"6194, 23 : ERROR : NO-USER", expected]
    assert transport.disconnecting


def test_malformed_queries_before_eof_are_answered(fake):
    proto, transport = connect(make_factory())
    proto.dataReceived(b"abc, def\r\n0, 23\r\n")
    proto.readConnectionLost()
    assert lines(transport.value()) == [b"abc, def : ERROR : INVALID-PORT",
                                        b"0, 23 : ERROR : INVALID-PORT"]
    assert transport.disconnecting


def test_eof_with_nothing_to_answer_closes_at_once():
    proto, transport = connect(make_factory())
    proto.readConnectionLost()
    assert transport.value() == b"" and transport.disconnecting


def test_a_long_last_line_ended_by_eof_is_refused_like_any_other():
    proto, transport = connect(make_factory(limits=IdentdLimits(max_line=20)))
    proto.dataReceived(b"1" * 21)
    proto.readConnectionLost()
    assert transport.value() == b"" and transport.disconnecting


def test_after_eof_reading_is_never_resumed(fake, registry):
    """The reactor stops reading at EOF; resuming the transport would read
    the socket again. A packet answered over several turns ends closed, all
    of it answered, the transport never resumed."""
    clock = MemoryReactorClock()
    proto, transport = connect(make_factory(registry=registry, clock=clock))
    count = MAX_LINES_PER_TURN * 2 + 1
    proto.dataReceived(b"6193, 23\r\n" * count)
    proto.readConnectionLost()
    assert transport.producerState == "paused"
    for _ in range(2):
        clock.advance(0)
    assert lines(transport.value()) == [b"6193, 23 : USERID : UNIX : alice"] * count
    assert transport.producerState == "paused"
    assert transport.disconnecting


# ---- flooding: back-pressure and bounds --------------------------------------------

class SmallBufferTransport(StringTransport):
    """A StringTransport with a write buffer of ``size`` bytes that, like a
    FileDescriptor, pauses its streaming producer when the buffer is over it
    and resumes it when the peer has read everything (``drain``)."""

    def __init__(self, size: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.size = size
        self.producer_paused = False
        self.read_by_peer = b""

    def write(self, data: bytes) -> None:
        super().write(data)
        if (self.producer is not None and self.streaming and not self.producer_paused
                and len(self.value()) > self.size):
            self.producer_paused = True
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.read_by_peer += self.value()
        self.clear()
        if self.producer is not None and self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()


def connect_small(factory: IdentFactory, size: int):
    peer = IPv4Address("TCP", REMOTE, PEER_PORT)
    proto = factory.buildProtocol(peer)
    transport = SmallBufferTransport(size, hostAddress=IPv4Address("TCP", LOCAL, IDENT_PORT),
                                     peerAddress=peer)
    proto.makeConnection(transport)
    return proto, transport


def identd_lines(events: list[dict]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == "socksd.identd"]


def test_the_protocol_is_the_streaming_producer_of_its_transport():
    proto, transport = connect(make_factory())
    assert transport.producer is proto
    assert transport.streaming


def test_a_client_that_does_not_read_replies_stops_being_read(fake):
    """Replies are not buffered without bound: once the write buffer is full
    no more lines are answered (and the transport stops reading) until the
    client reads; then the rest is answered, in order."""
    clock = MemoryReactorClock()
    proto, transport = connect_small(make_factory(clock=clock), size=200)
    count = 500
    proto.dataReceived(b"".join(b"%d, 23\r\n" % (1000 + i) for i in range(count)))
    clock.advance(0)
    answered = lines(transport.value())
    assert 0 < len(answered) < 10                  # ~200 bytes of replies, not 500 replies
    assert transport.producerState == "paused"     # reading stopped
    clock.advance(0)
    assert lines(transport.value()) == answered    # and stays stopped until the client reads
    for _ in range(count):
        transport.drain()
        clock.advance(0)
    assert lines(transport.read_by_peer) == [b"%d, 23 : ERROR : NO-USER" % (1000 + i)
                                             for i in range(count)]
    assert transport.producerState == "producing"
    assert not transport.disconnecting


def test_one_packet_of_queries_is_answered_over_several_reactor_turns(fake, registry):
    """Proxied-user answers need no lookup: a packet of them is answered
    MAX_LINES_PER_TURN at a time, reading paused in between."""
    clock = MemoryReactorClock()
    proto, transport = connect(make_factory(registry=registry, clock=clock))
    count = MAX_LINES_PER_TURN * 3 + 1
    proto.dataReceived(b"6193, 23\r\n" * count)
    assert len(lines(transport.value())) == MAX_LINES_PER_TURN
    assert transport.producerState == "paused"
    for _ in range(3):
        clock.advance(0)
    assert lines(transport.value()) == [b"6193, 23 : USERID : UNIX : alice"] * count
    assert transport.producerState == "producing"
    assert len(clock.getDelayedCalls()) == 1           # only the idle timer


def test_a_client_that_never_reads_is_closed_by_the_idle_timeout(fake):
    """Paused for writes, nothing more is answered, so nothing restarts the
    idle timer: the connection does not live on however much it sent."""
    clock = MemoryReactorClock()
    proto, transport = connect_small(make_factory(limits=IdentdLimits(idle_timeout=10),
                                                  clock=clock), size=200)
    proto.dataReceived(b"1, 2\r\n" * 5000)
    clock.advance(0)
    assert transport.producerState == "paused"
    clock.advance(11)
    assert transport.disconnecting


def test_no_turn_left_after_close(fake, registry):
    clock = MemoryReactorClock()
    proto, transport = connect(make_factory(registry=registry, clock=clock))
    proto.dataReceived(b"6193, 23\r\n" * (MAX_LINES_PER_TURN * 2))
    proto.connectionLost(Failure(ConnectionError("bye")))
    assert [c for c in clock.getDelayedCalls() if c.active()] == []


@pytest.mark.parametrize("unknown_error_only", [False, True])
@pytest.mark.parametrize("flood", [b"\n" * 65536, b"A" * 40 + b"\n" * 2000,
                                   (b"A" * 40 + b"\n") * 1600])
def test_a_flood_of_bad_queries_is_closed_with_one_log_line(fake, log_events, flood,
                                                            unknown_error_only):
    policy = IdentPolicy(hash_key=b"k", unknown_error_only=unknown_error_only)
    proto, transport = connect(make_factory(policy))
    proto.dataReceived(flood)
    replies = lines(transport.value())
    token = b"UNKNOWN-ERROR" if unknown_error_only else b"INVALID-PORT"
    assert len(replies) == MAX_BAD_QUERIES
    assert all(r.endswith(b" : ERROR : " + token) for r in replies), replies
    assert transport.disconnecting
    assert transport.producer is None      # or a FileDescriptor would never close
    proto.connectionLost(Failure(ConnectionError("closed")))
    logged = identd_lines(log_events)
    assert len(logged) == 1, logged
    assert f"{REMOTE}:{PEER_PORT}" in logged[0] and "malformed" in logged[0], logged
    assert fake.calls == []


def test_a_few_bad_queries_are_answered_and_logged_once_at_the_end(fake, log_events):
    fake.own(6193, 23, DAEMON.pw_uid)
    proto, transport = connect(make_factory())
    proto.dataReceived(b"\r\nhello\r\n" * (MAX_BAD_QUERIES // 2) + b"6193, 23\r\n")
    assert lines(transport.value())[-1] == b"6193, 23 : USERID : UNIX : daemon"
    assert not transport.disconnecting
    proto.connectionLost(Failure(ConnectionError("closed")))
    logged = identd_lines(log_events)
    assert len(logged) == 2, logged       # the good query, and one line for the bad ones
    assert f"{REMOTE}:{PEER_PORT}" in logged[1] and "malformed" in logged[1], logged


def test_bad_queries_behind_a_lookup_are_answered_in_order_then_closed(fake):
    lookups = DeferredLookups()
    proto, transport = connect(make_factory(blocking=lookups))
    proto.dataReceived(b"6193, 23\r\n" + b"x\r\n" * 100)
    assert transport.value() == b""
    lookups.fire_newest_first()
    assert lines(transport.value()) == [b"6193, 23 : ERROR : NO-USER"] + \
        [b"x : ERROR : INVALID-PORT"] * MAX_BAD_QUERIES
    assert transport.disconnecting


# ---- line length --------------------------------------------------------------------

def test_line_over_max_line_closes():
    proto, transport = connect(make_factory(limits=IdentdLimits(max_line=20)))
    proto.dataReceived(b"1" * 30 + b"\r\n")
    assert transport.disconnecting
    assert transport.value() == b""


def test_unterminated_data_over_max_line_closes():
    proto, transport = connect(make_factory(limits=IdentdLimits(max_line=20)))
    proto.dataReceived(b"1, " + b" " * 10)
    assert not transport.disconnecting
    proto.dataReceived(b" " * 20)
    assert transport.disconnecting


def test_default_max_line_is_1000():
    proto, transport = connect(make_factory())
    proto.dataReceived(b" " * 1001)
    assert transport.disconnecting


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
def test_a_line_of_exactly_max_line_bytes_is_answered(fake, eol):
    """The limit is on the line; its end-of-line (LF or CR LF) is not part of it."""
    max_line = 40
    query = b"6193, 23".ljust(max_line)
    assert len(query) == max_line
    proto, transport = connect(make_factory(limits=IdentdLimits(max_line=max_line)))
    proto.dataReceived(query + eol)
    assert not transport.disconnecting
    assert transport.value() == b"6193, 23 : ERROR : NO-USER\r\n"
    proto.dataReceived(b"6193, 23".ljust(max_line + 1) + eol)
    assert transport.disconnecting


def test_long_line_after_good_ones_closes_after_their_answers(fake):
    proto, transport = connect(make_factory(limits=IdentdLimits(max_line=50)))
    proto.dataReceived(b"6193, 23\r\n" + b"9" * 60 + b"\r\n6193, 24\r\n")
    assert transport.value() == b"6193, 23 : ERROR : NO-USER\r\n"
    assert transport.disconnecting


# ---- idle timeout -------------------------------------------------------------------

def test_idle_timeout_closes():
    clock = MemoryReactorClock()
    proto, transport = connect(make_factory(limits=IdentdLimits(idle_timeout=60),
                                            clock=clock))
    clock.advance(59.5)
    assert not transport.disconnecting
    with capturedLogs() as events:
        clock.advance(1)
    assert transport.disconnecting
    assert [formatEvent(e) for e in events] == [f"identd: {proto.peer} idle for 60 s; closing"]


def test_default_idle_timeout_is_60_seconds():
    clock = MemoryReactorClock()
    proto, transport = connect(make_factory(clock=clock))
    clock.advance(59)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting


def test_a_partial_line_does_not_keep_the_connection_alive():
    clock = MemoryReactorClock()
    proto, transport = connect(make_factory(limits=IdentdLimits(idle_timeout=10),
                                            clock=clock))
    for _ in range(12):                      # a byte a second, never an EOL
        proto.dataReceived(b" ")
        clock.advance(1)
    assert transport.disconnecting


def test_each_answered_query_restarts_the_idle_timer(fake):
    clock = MemoryReactorClock()
    proto, transport = connect(make_factory(limits=IdentdLimits(idle_timeout=10),
                                            clock=clock))
    for i in range(5):
        clock.advance(8)
        proto.dataReceived(b"6193, %d\r\n" % (23 + i))
    assert not transport.disconnecting
    assert len(lines(transport.value())) == 5
    clock.advance(10.5)
    assert transport.disconnecting


def test_no_timer_left_after_close():
    clock = MemoryReactorClock()
    proto, transport = connect(make_factory(limits=IdentdLimits(idle_timeout=10),
                                            clock=clock))
    proto.connectionLost(Failure(ConnectionError("bye")))
    assert [c for c in clock.getDelayedCalls() if c.active()] == []


# ---- connection limits --------------------------------------------------------------

def test_per_client_limit():
    factory = make_factory(limits=IdentdLimits(max_connections_per_client=2))
    a, ta = connect(factory, peer_port=1)
    b, tb = connect(factory, peer_port=2)
    assert not ta.disconnecting and not tb.disconnecting
    c, tc = connect(factory, peer_port=3)
    assert tc is None or tc.disconnecting, "a third connection from one address is refused"
    if c is not None:
        c.connectionLost(Failure(ConnectionError("refused")))
    # Another client is not affected.
    d, td = connect(factory, remote="127.0.0.9", peer_port=4)
    assert td is not None and not td.disconnecting
    # When one of the first two leaves, the address may connect again.
    a.connectionLost(Failure(ConnectionError("bye")))
    e, te = connect(factory, peer_port=5)
    assert te is not None and not te.disconnecting


def test_per_client_limit_counts_v4_mapped_as_the_same_address():
    factory = make_factory(limits=IdentdLimits(max_connections_per_client=1))
    connect(factory, remote=REMOTE, peer_port=1)
    c, tc = connect(factory, remote="::ffff:" + REMOTE, peer_port=2, local="::ffff:" + LOCAL)
    assert tc is None or tc.disconnecting


@pytest.mark.parametrize("prefix,refused", [(64, True), (128, False)])
def test_per_client_limit_counts_an_ipv6_client_per_prefix(prefix, refused):
    factory = make_factory(limits=IdentdLimits(max_connections_per_client=1,
                                               ipv6_client_prefix=prefix))
    connect(factory, remote="2001:db8::1", local="2001:db8::100", peer_port=1)
    c, tc = connect(factory, remote="2001:db8::2", local="2001:db8::100", peer_port=2)
    assert (tc is None or tc.disconnecting) == refused


def test_refused_client_is_not_answered(fake):
    fake.own(6193, 23, DAEMON.pw_uid)
    factory = make_factory(limits=IdentdLimits(max_connections_per_client=1))
    connect(factory, peer_port=1)
    c, tc = connect(factory, peer_port=2)
    if c is not None:
        c.dataReceived(b"6193, 23\r\n")
        assert tc.value() == b""
        assert tc.disconnecting


def test_total_limit():
    factory = make_factory(limits=IdentdLimits(max_connections=3,
                                               max_connections_per_client=100))
    protos = [connect(factory, remote=f"127.0.0.{i}", peer_port=i)[0] for i in (1, 2, 3)]
    assert all(p is not None for p in protos)
    fourth, t4 = connect(factory, remote="127.0.0.4", peer_port=4)
    assert t4 is None or t4.disconnecting
    if fourth is not None:
        fourth.connectionLost(Failure(ConnectionError("refused")))
    protos[0].connectionLost(Failure(ConnectionError("bye")))
    again, ta = connect(factory, remote="127.0.0.4", peer_port=5)
    assert ta is not None and not ta.disconnecting


def test_counters_return_to_zero():
    factory = make_factory(limits=IdentdLimits(max_connections=2,
                                               max_connections_per_client=1))
    made = [connect(factory, peer_port=i) for i in range(1, 5)]
    for proto, _ in made:
        if proto is not None:
            proto.connectionLost(Failure(ConnectionError("bye")))
    assert factory.connections == 0
    assert factory.per_client == {}


def test_a_flood_over_the_per_client_limit_is_a_line_then_a_count(log_events):
    """Each refused connection was a line: a client holding its 16 and
    knocking on was thousands of lines a second."""
    clock = MemoryReactorClock()
    factory = make_factory(limits=IdentdLimits(max_connections_per_client=1), clock=clock)
    connect(factory, peer_port=1)
    for port in range(2, 102):
        proto, transport = connect(factory, peer_port=port)
        assert transport.disconnecting
        proto.connectionLost(Failure(ConnectionError("refused")))
    clock.advance(1.0)
    connect(factory, peer_port=200)[0].connectionLost(Failure(ConnectionError("refused")))
    clock.advance(1.0)
    assert identd_lines(log_events) == [
        f"identd: refused {REMOTE}:2: max_connections_per_client (1)",
        "identd: refused 99 more in the last second: max_connections_per_client (1)",
        f"identd: refused {REMOTE}:200: max_connections_per_client (1)"]


def test_a_flood_over_the_total_limit_is_a_line_then_a_count(log_events):
    clock = MemoryReactorClock()
    factory = make_factory(limits=IdentdLimits(max_connections=1), clock=clock)
    connect(factory, peer_port=1)
    for n in range(2, 52):
        assert connect(factory, remote=f"127.0.1.{n}", peer_port=n) == (None, None)
    clock.advance(1.0)
    assert identd_lines(log_events) == [
        "identd: refused 127.0.1.2: max_connections (1)",
        "identd: refused 49 more in the last second: max_connections (1)"]


def test_stopping_the_identd_sums_up_the_refusals_at_once(log_events):
    clock = MemoryReactorClock()
    factory = make_factory(limits=IdentdLimits(max_connections=1), clock=clock)
    factory.doStart()
    connect(factory, peer_port=1)
    for n in range(2, 5):
        connect(factory, remote=f"127.0.1.{n}", peer_port=n)
    factory.doStop()
    assert identd_lines(log_events)[-1] == \
        "identd: refused 2 more in the last second: max_connections (1)"
    # The first connection's idle timer is left, nothing of the refusals.
    assert factory.refused._counted not in [call.func for call in clock.getDelayedCalls()]


# ---- unknown_error_only -------------------------------------------------------------

def test_unknown_error_only_maps_every_error(fake):
    fake.own(1002, 23, 0)
    fake.own(1003, 23, DAEMON.pw_uid)
    factory = make_factory(IdentPolicy(unknown_error_only=True,
                                       users={"daemon": "hidden"}))
    out = ask(factory, b"0, 23\r\nfoo\r\n1001, 23\r\n1002, 23\r\n1003, 23\r\n")
    assert lines(out) == [
        b"0, 23 : ERROR : UNKNOWN-ERROR",
        b"foo : ERROR : UNKNOWN-ERROR",
        b"1001, 23 : ERROR : UNKNOWN-ERROR",     # NO-USER
        b"1002, 23 : ERROR : UNKNOWN-ERROR",     # HIDDEN-USER (root)
        b"1003, 23 : ERROR : UNKNOWN-ERROR",     # HIDDEN-USER (per-user mode)
    ]


def test_unknown_error_only_still_answers_users(fake):
    fake.own(1003, 23, DAEMON.pw_uid)
    factory = make_factory(IdentPolicy(unknown_error_only=True))
    assert ask(factory, b"1003, 23\r\n") == b"1003, 23 : USERID : UNIX : daemon\r\n"


# ---- proxied users ------------------------------------------------------------------

@pytest.fixture
def registry():
    registry = ProxiedConnections()
    registry.add(LOCAL, 6193, REMOTE, 23, "alice")
    return registry


def test_proxied_connection_is_answered_with_the_socks_user(fake, registry):
    fake.own(6193, 23, 0)   # the proxy runs as root: the kernel would say root
    out = ask(make_factory(registry=registry), b"6193 , 23\r\n")
    assert out == b"6193, 23 : USERID : UNIX : alice\r\n"
    assert fake.calls == []


# Sockets of uid 0 (the proxy's, as the tests run as root) not registered
# are answered at once here: proxied_wait = 0 (the wait has tests of its own).
NO_WAIT = IdentdLimits(proxied_wait=0)


def test_proxied_user_only_for_that_exact_connection(fake, registry):
    fake.own(6193, 23, 0)
    fake.own(6193, 23, 0, remote="127.0.0.3")
    fake.own(6194, 23, 0)
    factory = make_factory(registry=registry, limits=NO_WAIT)
    assert ask(factory, b"6193, 24\r\n") == b"6193, 24 : ERROR : NO-USER\r\n"
    assert ask(factory, b"6194, 23\r\n") == b"6194, 23 : ERROR : HIDDEN-USER\r\n"
    # The same ports asked by another host are another connection.
    assert ask(factory, b"6193, 23\r\n", remote="127.0.0.3") == \
        b"6193, 23 : ERROR : HIDDEN-USER\r\n"


def test_proxied_user_over_v4_mapped_addresses(fake, registry):
    out = ask(make_factory(registry=registry), b"6193, 23\r\n",
              remote="::ffff:" + REMOTE, local="::ffff:" + LOCAL)
    assert out == b"6193, 23 : USERID : UNIX : alice\r\n"


def test_proxied_user_over_ipv6(fake):
    registry = ProxiedConnections()
    registry.add("::1", 6193, "::1", 23, "alice")
    out = ask(make_factory(registry=registry), b"6193, 23\r\n", remote="::1", local="::1")
    assert out == b"6193, 23 : USERID : UNIX : alice\r\n"


def test_proxied_users_false_ignores_the_registry(fake, registry):
    fake.own(6193, 23, 0)
    factory = make_factory(IdentPolicy(proxied_users=False), registry=registry)
    assert ask(factory, b"6193, 23\r\n") == b"6193, 23 : ERROR : HIDDEN-USER\r\n"
    fake.own(6193, 23, DAEMON.pw_uid)
    assert ask(factory, b"6193, 23\r\n") == b"6193, 23 : USERID : UNIX : daemon\r\n"


def test_removed_registration_falls_back_to_the_kernel(fake):
    fake.own(6193, 23, 0)
    registry = ProxiedConnections()
    key = registry.add(LOCAL, 6193, REMOTE, 23, "alice")
    factory = make_factory(registry=registry, limits=NO_WAIT)
    assert ask(factory, b"6193, 23\r\n") == b"6193, 23 : USERID : UNIX : alice\r\n"
    registry.remove(key)
    assert ask(factory, b"6193, 23\r\n") == b"6193, 23 : ERROR : HIDDEN-USER\r\n"


@pytest.mark.parametrize("mode,expected", [
    ("name", b"USERID : UNIX : alice"),
    ("hidden", b"ERROR : HIDDEN-USER"),
    ("fixed:socks-user", b"USERID : UNIX : socks-user"),
])
def test_proxied_reply_modes(fake, registry, mode, expected):
    factory = make_factory(IdentPolicy(proxied_reply=mode), registry=registry)
    assert ask(factory, b"6193, 23\r\n") == b"6193, 23 : " + expected + b"\r\n"


def test_proxied_reply_hashed_is_stable_per_key(fake, registry):
    def reply(key: bytes) -> bytes:
        factory = make_factory(IdentPolicy(proxied_reply="hashed", hash_key=key),
                               registry=registry)
        return ask(factory, b"6193, 23\r\n")

    first = reply(b"key one")
    assert re.fullmatch(rb"6193, 23 : USERID : UNIX : h[0-9a-f]{10}\r\n", first), first
    assert b"alice" not in first
    assert reply(b"key one") == first
    assert reply(b"key two") != first


def test_proxied_reply_random_hides_the_name(fake, registry):
    factory = make_factory(IdentPolicy(proxied_reply="random"), registry=registry)
    first, second = ask(factory, b"6193, 23\r\n"), ask(factory, b"6193, 23\r\n")
    for out in (first, second):
        assert re.fullmatch(rb"6193, 23 : USERID : UNIX : u[0-9a-f]{10}\r\n", out), out
    assert first != second


def test_a_proxied_user_on_the_hide_list_is_hidden(fake):
    """A SOCKS user called root was answered as root: hide holds for
    proxied users as for local ones, whatever proxied_reply says."""
    registry = ProxiedConnections()
    registry.add(LOCAL, 6193, REMOTE, 23, "root")
    registry.add(LOCAL, 6194, REMOTE, 23, "alice")
    assert ask(make_factory(registry=registry), b"6193, 23\r\n") == \
        b"6193, 23 : ERROR : HIDDEN-USER\r\n"
    for mode in ("name", "hashed", "random", "fixed:socks-user", "uid"):
        factory = make_factory(IdentPolicy(hide=frozenset({"alice"}), proxied_reply=mode),
                               registry=registry)
        assert ask(factory, b"6194, 23\r\n") == b"6194, 23 : ERROR : HIDDEN-USER\r\n", mode
        assert b"USERID" in ask(factory, b"6193, 23\r\n"), mode   # root is not hidden here
    assert fake.calls == []
    factory = make_factory(IdentPolicy(unknown_error_only=True), registry=registry)
    assert ask(factory, b"6193, 23\r\n") == b"6193, 23 : ERROR : UNKNOWN-ERROR\r\n"


def test_a_hidden_proxied_user_is_logged_as_such(fake, log_events):
    registry = ProxiedConnections()
    registry.add(LOCAL, 6193, REMOTE, 23, "root")
    ask(make_factory(registry=registry), b"6193, 23\r\n")
    [line] = identd_lines(log_events)
    assert "HIDDEN-USER" in line and "hidden by config (SOCKS user)" in line, line


def test_proxied_users_with_unknown_error_only(fake, registry):
    factory = make_factory(IdentPolicy(proxied_reply="hidden", unknown_error_only=True),
                           registry=registry)
    assert ask(factory, b"6193, 23\r\n") == b"6193, 23 : ERROR : UNKNOWN-ERROR\r\n"


# ---- proxied_wait: a socket of socksd's own, not registered yet ---------------------------
#
# A server asks as it accepts the connection, which may be before the session
# (a worker's, with workers) has registered it. Here socksd runs as "daemon":
# its sockets are daemon's, and the kernel would answer "daemon".

def waiting_factory(registry: ProxiedConnections, clock: MemoryReactorClock,
                    wait: float = 0.5, blocking=inline, **policy) -> IdentFactory:
    return IdentFactory(IdentPolicy(hash_key=b"k", **policy), IdentdLimits(proxied_wait=wait),
                        registry=registry, reactor=clock, blocking=blocking,
                        socksd_uid=DAEMON.pw_uid)


def test_a_query_waits_for_the_registration_and_is_answered_when_it_arrives(fake, log_events):
    fake.own(6193, 23, DAEMON.pw_uid)
    registry, clock = ProxiedConnections(), MemoryReactorClock()
    proto, transport = connect(waiting_factory(registry, clock))
    proto.dataReceived(b"6193, 23\r\n")
    assert transport.value() == b"" and registry.waiting() == 1
    clock.advance(0.4)
    registry.add(LOCAL, 6193, REMOTE, 24, "bob")       # another connection: still waiting
    assert transport.value() == b""
    registry.add(LOCAL, 6193, REMOTE, 23, "alice")
    assert transport.value() == b"6193, 23 : USERID : UNIX : alice\r\n"   # at once
    assert registry.waiting() == 0
    clock.advance(1)     # the timeout was cancelled: nothing more is written
    assert transport.value() == b"6193, 23 : USERID : UNIX : alice\r\n"
    assert not transport.disconnecting
    [line] = identd_lines(log_events)
    assert line.endswith("(SOCKS user; registered after 0.400 s)"), line


def test_after_the_wait_it_is_answered_as_any_other_socket(fake, log_events):
    fake.own(6193, 23, DAEMON.pw_uid)
    registry, clock = ProxiedConnections(), MemoryReactorClock()
    proto, transport = connect(waiting_factory(registry, clock, wait=0.5))
    proto.dataReceived(b"6193, 23\r\n6194, 23\r\n")
    clock.advance(0.49)
    assert transport.value() == b""
    clock.advance(0.01)
    # 6194 has no socket at all: no wait for it.
    assert lines(transport.value()) == [b"6193, 23 : USERID : UNIX : daemon",
                                        b"6194, 23 : ERROR : NO-USER"]
    assert registry.waiting() == 0
    assert "socksd's socket, not registered within 0.5 s" in identd_lines(log_events)[0]
    registry.add(LOCAL, 6193, REMOTE, 23, "alice")     # too late: answered already
    assert len(lines(transport.value())) == 2


def test_a_client_leaving_cancels_its_wait(fake):
    fake.own(6193, 23, DAEMON.pw_uid)
    registry, clock = ProxiedConnections(), MemoryReactorClock()
    factory = waiting_factory(registry, clock)
    proto, transport = connect(factory)
    proto.dataReceived(b"6193, 23\r\n")
    assert registry.waiting() == 1
    proto.connectionLost(Failure(ConnectionError("gone")))
    assert registry.waiting() == 0
    assert clock.getDelayedCalls() == []       # neither the wait's timeout nor the idle one
    assert factory.connections == 0
    registry.add(LOCAL, 6193, REMOTE, 23, "alice")
    clock.advance(1)
    assert transport.value() == b""


def test_only_socksd_s_own_sockets_wait(fake):
    fake.own(6193, 23, NAMELESS_UID)        # someone else's
    fake.own(6194, 23, DAEMON.pw_uid)
    registry, clock = ProxiedConnections(), MemoryReactorClock()
    proto, transport = connect(waiting_factory(registry, clock))
    proto.dataReceived(b"6193, 23\r\n")
    assert transport.value() == b"6193, 23 : USERID : UNIX : %d\r\n" % NAMELESS_UID
    # Without proxied_users, or with proxied_wait = 0, nothing waits.
    for factory in (waiting_factory(registry, clock, proxied_users=False),
                    waiting_factory(registry, clock, wait=0)):
        assert ask(factory, b"6194, 23\r\n") == b"6194, 23 : USERID : UNIX : daemon\r\n"
    assert registry.waiting() == 0 and clock.getDelayedCalls() != []   # (idle timeouts)


def test_a_registration_during_the_lookup_is_not_waited_for(fake):
    """The lookup runs in a thread: a registration that arrives meanwhile
    answers as soon as the lookup returns, without any wait."""
    fake.own(6193, 23, DAEMON.pw_uid)
    registry, clock, lookups = ProxiedConnections(), MemoryReactorClock(), DeferredLookups()
    proto, transport = connect(waiting_factory(registry, clock, blocking=lookups))
    proto.dataReceived(b"6193, 23\r\n")
    registry.add(LOCAL, 6193, REMOTE, 23, "alice")
    lookups.fire_newest_first()
    assert transport.value() == b"6193, 23 : USERID : UNIX : alice\r\n"
    assert registry.waiting() == 0


def test_a_client_leaving_during_the_lookup_gets_nothing_and_logs_no_failure(fake, log_events):
    fake.own(6193, 23, DAEMON.pw_uid)
    registry, clock, lookups = ProxiedConnections(), MemoryReactorClock(), DeferredLookups()
    proto, transport = connect(waiting_factory(registry, clock, blocking=lookups))
    proto.dataReceived(b"6193, 23\r\n")
    proto.connectionLost(Failure(ConnectionError("gone")))
    lookups.fire_newest_first()
    assert transport.value() == b"" and registry.waiting() == 0
    assert not [e for e in log_events if e.get("log_failure") is not None]


def test_waiting_queries_answer_in_order_and_hold_the_ones_behind(fake):
    fake.own(6193, 23, DAEMON.pw_uid)
    fake.own(6194, 23, DAEMON.pw_uid)
    registry, clock = ProxiedConnections(), MemoryReactorClock()
    proto, transport = connect(waiting_factory(registry, clock))
    proto.dataReceived(b"6193, 23\r\n6194, 23\r\n")
    registry.add(LOCAL, 6194, REMOTE, 23, "bob")       # the second's: it waits its turn
    assert transport.value() == b""
    registry.add(LOCAL, 6193, REMOTE, 23, "alice")
    assert lines(transport.value()) == [b"6193, 23 : USERID : UNIX : alice",
                                        b"6194, 23 : USERID : UNIX : bob"]


def test_waiting_queries_are_bounded_by_max_connections(fake):
    """One query in flight a connection: max_connections bounds the waits."""
    fake.own(6193, 23, DAEMON.pw_uid)
    registry, clock = ProxiedConnections(), MemoryReactorClock()
    factory = IdentFactory(IdentPolicy(), IdentdLimits(max_connections=3,
                                                       max_connections_per_client=100),
                           registry=registry, reactor=clock, blocking=inline,
                           socksd_uid=DAEMON.pw_uid)
    for _ in range(5):
        proto, transport = connect(factory)
        if proto is not None:
            proto.dataReceived(b"6193, 23\r\n" * 10)
    assert registry.waiting() == 3


# ---- logging --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["random", "hashed"])
def test_random_and_hashed_tokens_are_logged_with_the_real_user(fake, log_events, mode):
    """Issue 4: a random or hashed token replaces the name, "logged so an admin
    can map it back": some log line names both the token and the user."""
    fake.own(6193, 23, DAEMON.pw_uid)
    out = ask(make_factory(IdentPolicy(reply=mode)), b"6193, 23\r\n")
    token = out.rstrip(b"\r\n").rsplit(b" : ", 1)[1].decode()
    assert token != "daemon"
    texts = [formatEvent(e) for e in log_events]
    assert any(token in text and "daemon" in text for text in texts), texts


def test_each_answer_is_logged_with_peer_and_reply(fake, log_events):
    fake.own(6193, 23, DAEMON.pw_uid)
    ask(make_factory(), b"6193, 23\r\n")
    texts = [formatEvent(e) for e in log_events]
    assert any(REMOTE in t and "6193, 23 : USERID : UNIX : daemon" in t for t in texts), texts


def test_bad_input_logs_no_traceback(fake, log_events):
    proto, transport = connect(make_factory(limits=IdentdLimits(max_line=10)))
    proto.dataReceived(b"\xff\xfe, x\r\n" + b"z" * 20)
    assert transport.disconnecting
    assert not [e for e in log_events if e.get("log_failure") is not None]


# ---- property: arbitrary bytes ------------------------------------------------------

_REPLY = re.compile(rb"[\x20-\x7e]* : (ERROR : [A-Z-]+|USERID : UNIX : [^\r\n]+)")


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"\n", b"\r\n", b"\r", b",", b" ", b"113, 6193", b"0,0", b"65535,1"]),
    st.builds(lambda a, b: b"%d,%d\r\n" % (a, b), st.integers(-5, 70000),
              st.integers(-5, 70000)),
), max_size=25))
def test_arbitrary_bytes_never_raise_and_every_line_gets_one_reply(fake, chunks):
    """Every line gets one reply, up to the MAX_BAD_QUERIES-th malformed one,
    which is answered and then closes the connection."""
    fake.owners.clear()
    fake.own(113, 6193, DAEMON.pw_uid)
    fake.own(65535, 1, 0)
    clock = MemoryReactorClock()
    proto, transport = connect(make_factory(limits=IdentdLimits(max_line=1000), clock=clock))
    for chunk in chunks:
        proto.dataReceived(chunk)
        clock.advance(0)
    data = b"".join(chunks)
    assert len(data) < 1000              # no line can be over the limit here
    expected = bad = 0
    for line in data.split(b"\n")[:-1]:
        expected += 1
        try:
            parse_query(line[:-1] if line.endswith(b"\r") else line)
        except WireError:
            bad += 1
            if bad == MAX_BAD_QUERIES:
                break
    assert transport.disconnecting == (bad == MAX_BAD_QUERIES)
    replies = lines(transport.value())
    assert len(replies) == expected
    for reply in replies:
        assert _REPLY.fullmatch(reply), reply


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=300))
def test_arbitrary_bytes_over_the_limit_close_without_raising(fake, data):
    proto, transport = connect(make_factory(limits=IdentdLimits(max_line=16)))
    proto.dataReceived(data)
    longest = max(len(part.rstrip(b"\r")) for part in data.split(b"\n"))
    if longest > 17:   # over the limit even if a CR were allowed
        assert transport.disconnecting
    for reply in lines(transport.value()):
        assert _REPLY.fullmatch(reply), reply


# ---- answer_query and stdio ------------------------------------------------------------

def test_answer_query_directly(fake):
    fake.own(6193, 23, DAEMON.pw_uid)
    results = []
    answer_query(IdentPolicy(), None, b"6193, 23", LOCAL, REMOTE,
                 blocking=inline).addCallback(results.append)
    assert results == [b"6193, 23 : USERID : UNIX : daemon\r\n"]


def test_stdio_answers_one_query(fake):
    fake.own(6193, 23, DAEMON.pw_uid)
    out = io.BytesIO()
    status = serve_stdio(IdentdConfig(), LOCAL, REMOTE, stdin=io.BytesIO(b"6193, 23\r\n"),
                         stdout=out)
    assert status == 0
    assert out.getvalue() == b"6193, 23 : USERID : UNIX : daemon\r\n"
    assert fake.calls == [Connection(LOCAL, 6193, REMOTE, 23)]


@pytest.mark.parametrize("query", [b"6193, 23", b"6193, 23\r", b"06193 , 023"])
def test_stdio_answers_a_query_ended_by_eof(fake, query):
    fake.own(6193, 23, DAEMON.pw_uid)
    out = io.BytesIO()
    status = serve_stdio(IdentdConfig(), LOCAL, REMOTE, stdin=io.BytesIO(query), stdout=out)
    assert (status, out.getvalue()) == (0, b"6193, 23 : USERID : UNIX : daemon\r\n")


def test_stdio_empty_input_is_not_answered(fake):
    out = io.BytesIO()
    assert serve_stdio(IdentdConfig(), LOCAL, REMOTE, stdin=io.BytesIO(b""), stdout=out) != 0
    assert out.getvalue() == b""


def test_stdio_invalid_port(fake):
    out = io.BytesIO()
    status = serve_stdio(IdentdConfig(), LOCAL, REMOTE, stdin=io.BytesIO(b"0, 70000\n"),
                         stdout=out)
    assert status == 0
    assert out.getvalue() == b"0, 70000 : ERROR : INVALID-PORT\r\n"


def test_stdio_lookup_failure_is_unknown_error(fake):
    fake.error = OSError("boom")
    out = io.BytesIO()
    serve_stdio(IdentdConfig(), LOCAL, REMOTE, stdin=io.BytesIO(b"6193, 23\r\n"), stdout=out)
    assert out.getvalue() == b"6193, 23 : ERROR : UNKNOWN-ERROR\r\n"


@pytest.mark.parametrize("end", [b"\r\n", b""])
def test_stdio_over_long_line_is_not_answered(fake, end):
    out = io.BytesIO()
    status = serve_stdio(IdentdConfig(), LOCAL, REMOTE,
                         stdin=io.BytesIO(b" " * 2000 + b"1, 2" + end), stdout=out)
    assert status != 0
    assert out.getvalue() == b""


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
def test_stdio_line_of_exactly_max_line_bytes_is_answered(fake, eol):
    """Same limit as over TCP: the query line, not counting its end-of-line."""
    cfg = IdentdConfig(limits=IdentdLimits(max_line=40))
    out = io.BytesIO()
    status = serve_stdio(cfg, LOCAL, REMOTE, stdin=io.BytesIO(b"6193, 23".ljust(40) + eol),
                         stdout=out)
    assert (status, out.getvalue()) == (0, b"6193, 23 : ERROR : NO-USER\r\n")


def test_a_name_the_charset_cannot_encode_still_gets_a_reply(fake):
    """RFC 1929 user names are arbitrary bytes: a SOCKS user the configured
    charset cannot represent must get some answer (an ERROR at least), and
    the connection must go on answering, not hang until the idle timeout."""
    registry = ProxiedConnections()
    registry.add(LOCAL, 6193, REMOTE, 23, "dölf")
    fake.own(6194, 23, DAEMON.pw_uid)
    proto, transport = connect(make_factory(IdentPolicy(charset="US-ASCII"),
                                            registry=registry))
    proto.dataReceived(b"6193, 23\r\n6194, 23\r\n")
    replies = lines(transport.value())
    assert len(replies) == 2, replies
    assert replies[0].startswith(b"6193, 23 : ")
    assert replies[1] == b"6194, 23 : USERID : UNIX,US-ASCII : daemon"
