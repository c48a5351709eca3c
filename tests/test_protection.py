"""The GSS-API protection wrapper (socksd.protection) on its own: slipped
under a protocol over an in-memory transport, with a real Kerberos context
pair from the `kerberos` fixture (the far end's frames come from a second
SecurityLayer, on the initiator's context); then both ends over real
loopback sockets."""

from __future__ import annotations

import hashlib
import os
import random
import struct

import gssapi
import pytest
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IProtocol,
    IPushProducer,
    ITCPTransport,
    ITransport,
)
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from fakes import HalfCloseTransport
from socksd import protection, relay, splice
from socksd.wire import WireError

# A real GSS-API context pair needs the KDC fixture.
pytestmark = pytest.mark.integration

Flags = gssapi.RequirementFlag
FLAGS = (Flags.mutual_authentication | Flags.replay_detection
         | Flags.out_of_sequence_detection | Flags.integrity | Flags.confidentiality)


def context_pair(kerberos) -> tuple[gssapi.SecurityContext, gssapi.SecurityContext]:
    """(initiator, acceptor), established against the fixture's KDC."""
    service = gssapi.Name(f"rcmd@{kerberos.realm.hostname}", gssapi.NameType.hostbased_service)
    initiator = gssapi.SecurityContext(name=service, usage="initiate", flags=FLAGS)
    credentials = gssapi.Credentials(
        name=gssapi.Name(kerberos.service_principal, gssapi.NameType.kerberos_principal),
        usage="accept", store={"keytab": kerberos.keytab})
    acceptor = gssapi.SecurityContext(creds=credentials, usage="accept")
    answer = acceptor.step(initiator.step())
    if answer:
        initiator.step(answer)
    assert initiator.complete and acceptor.complete
    return initiator, acceptor


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """RFC 1961 frames, split here independently of socksd.wire."""
    out = []
    while data:
        _version, mtyp, length = struct.unpack_from("!BBH", data)
        out.append((mtyp, data[4:4 + length]))
        data = data[4 + length:]
    return out


@implementer(IHalfCloseableProtocol)
class Recorder(protocol.Protocol):
    """The protocol above: records what reaches it."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.read_eof = self.write_eof = False
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def readConnectionLost(self) -> None:
        self.read_eof = True

    def writeConnectionLost(self) -> None:
        self.write_eof = True

    def connectionLost(self, reason=None) -> None:
        self.lost = reason


class Stack:
    """A protocol over a HalfCloseTransport that delivers to
    ``transport.protocol``, as a socket does, with protection started."""

    def __init__(self, kerberos, level: int = 2, above=None) -> None:
        initiator, acceptor = context_pair(kerberos)
        self.above = above if above is not None else Recorder()
        self.below = HalfCloseTransport()
        self.above.makeConnection(self.below)
        self.below.protocol = self.above
        self.wrapper = protection.start(self.above, acceptor, level)
        # The far end: the same codec on the other context.
        self.peer = protection.SecurityLayer(initiator, level)

    def receive(self, data: bytes) -> None:
        """Bytes read from the socket, handed to whatever it delivers to."""
        self.below.protocol.dataReceived(data)

    def sent(self) -> bytes:
        """What the far end got, unwrapped."""
        value = self.below.value()
        self.below.clear()
        return self.peer.decode(value)


@pytest.fixture(params=[1, 2], ids=["integrity", "confidentiality"])
def stack(kerberos, request) -> Stack:
    return Stack(kerberos, request.param)


# Where it sits, and what it declares.


def test_slipped_between_protocol_and_transport(stack):
    assert stack.above.transport is stack.wrapper
    assert stack.below.protocol is stack.wrapper
    assert stack.wrapper.transport is stack.below
    assert stack.wrapper.protocol is stack.above


def test_declares_transport_producer_consumer_and_protocol(stack):
    for interface in (ITransport, IPushProducer, IConsumer, IProtocol, IHalfCloseableProtocol):
        assert verifyObject(interface, stack.wrapper)
    # Only what the transport below is: a StringTransport is no TCP one.
    assert not ITCPTransport.providedBy(stack.wrapper)


def test_half_closeable_only_when_the_protocol_is(kerberos):
    assert not IHalfCloseableProtocol.providedBy(Stack(kerberos, 2, protocol.Protocol()).wrapper)


def test_clear_level_has_no_wrapper(kerberos):
    _initiator, acceptor = context_pair(kerberos)
    above = Recorder()
    above.makeConnection(StringTransport())
    with pytest.raises(ValueError):
        protection.start(above, acceptor, 0)


# Down: what the protocol writes leaves wrapped.


def test_writes_leave_wrapped(stack):
    stack.above.transport.write(b"hello, ")
    stack.above.transport.writeSequence([b"wor", b"ld"])
    stack.above.transport.write(b"")
    raw = stack.below.value()
    assert [mtyp for mtyp, _token in frames(raw)] == [3, 3]
    if stack.peer.level == 2:
        assert b"hello" not in raw
    assert stack.sent() == b"hello, world"


def test_a_large_write_leaves_in_frames_of_at_most_65535(stack):
    data = os.urandom(2 * stack.wrapper.layer.max_plain + 1)
    stack.above.transport.write(data)
    parts = frames(stack.below.value())
    assert len(parts) == 3 and all(len(token) <= 65535 for _mtyp, token in parts)
    assert stack.sent() == data


# Up: frames cut anywhere arrive unwrapped.


@pytest.mark.parametrize("cuts", ["bytewise", "whole", 0, 1, 2, 3])
def test_frames_cut_anywhere_arrive_unwrapped(stack, cuts):
    chunks = [b"GET / HTTP/1.0\r\n\r\n", os.urandom(70000), b"x", os.urandom(300)]
    stream = b"".join(stack.peer.encode(chunk) for chunk in chunks)
    if cuts == "bytewise":
        pieces = [stream[i:i + 1] for i in range(len(stream))]
    elif cuts == "whole":
        pieces = [stream]
    else:
        rng = random.Random(cuts)
        points = sorted(rng.sample(range(1, len(stream)), 40))
        pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    for piece in pieces:
        stack.receive(piece)
    assert b"".join(stack.above.received) == b"".join(chunks)
    assert all(stack.above.received), "an empty read was passed up"


def test_bytes_read_before_start_go_in_beneath(stack):
    """What followed the negotiation in the same read: handed to the
    wrapper's dataReceived, it arrives unwrapped like the rest."""
    stack.wrapper.dataReceived(stack.peer.encode(b"early"))
    stack.receive(stack.peer.encode(b" and late"))
    assert b"".join(stack.above.received) == b"early and late"


# A frame the layer refuses: the connection is aborted, the protocol told why.


def _refused(stack, bad, reason: str) -> None:
    """``bad()`` makes the refused bytes (after the good frame before it,
    which takes the sequence number before theirs)."""
    # A read is unwrapped whole or not at all: the good frame before the
    # refused one in the same read goes nowhere either.
    before = stack.peer.encode(b"before")
    stack.receive(before + bad())
    assert stack.above.received == []
    assert stack.below.disconnected and stack.below.disconnecting, "not aborted"
    # Nothing more goes up while the connection closes.
    stack.receive(stack.peer.encode(b"after"))
    stack.below.protocol.readConnectionLost()
    assert stack.above.received == [] and not stack.above.read_eof
    assert stack.above.lost is None
    stack.below.protocol.connectionLost(Failure(error.ConnectionDone()))
    lost = stack.above.lost
    assert lost is not None and lost.check(protection.ProtectionFailed)
    assert isinstance(lost.value, WireError)
    assert reason in lost.getErrorMessage(), lost.getErrorMessage()


@pytest.mark.parametrize("bad, reason", [
    (b"\x05\x01\x00", "GSS-API frame: version 5"),
    (b"\x01\x01\x00\x01x", "GSS-API frame: message type 1, expected 3"),
    (b"\x01\xff", "GSS-API: the peer aborted"),
    (b"\x02\x03\x00\x00", "GSS-API frame: version 2"),
])
def test_a_frame_that_is_no_encapsulation_aborts(stack, bad, reason):
    _refused(stack, lambda: bad, reason)


def test_a_replayed_frame_aborts(stack):
    frame = stack.peer.encode(b"pay 100")
    stack.receive(frame)
    assert stack.above.received == [b"pay 100"]
    stack.above.received.clear()
    _refused(stack, lambda: frame, "GSS-API unwrap failed")


def test_a_tampered_frame_aborts(stack):
    def tampered() -> bytes:
        frame = bytearray(stack.peer.encode(b"pay 100"))
        frame[-1] ^= 1
        return bytes(frame)

    _refused(stack, tampered, "GSS-API unwrap failed")


def test_an_unencrypted_frame_aborts_a_confidential_session(kerberos):
    stack = Stack(kerberos, 2)

    def unencrypted() -> bytes:
        token = stack.peer.context.wrap(b"plain text", False).message
        return struct.pack("!BBH", 1, 3, len(token)) + token

    _refused(stack, unencrypted, "GSS-API: unencrypted frame in a confidential session")


def test_an_encrypted_frame_is_accepted_at_integrity(kerberos):
    stack = Stack(kerberos, 1)
    token = stack.peer.context.wrap(b"secret", True).message
    stack.receive(struct.pack("!BBH", 1, 3, len(token)) + token)
    assert stack.above.received == [b"secret"]


def test_a_clean_close_passes_its_reason_and_lets_go(stack):
    reason = Failure(error.ConnectionDone())
    stack.below.protocol.connectionLost(reason)
    assert stack.above.lost is reason
    assert stack.wrapper.protocol is None     # no cycle left to the collector


# What passes straight through: closing, half-closes, pausing, producers.


def test_close_and_abort_pass_down(kerberos):
    stack = Stack(kerberos)
    assert not stack.above.transport.disconnecting
    stack.above.transport.loseConnection()
    assert stack.below.disconnecting and stack.above.transport.disconnecting
    stack = Stack(kerberos)
    stack.above.transport.abortConnection()
    assert stack.below.disconnected


def test_half_closes_pass_both_ways(stack):
    stack.above.transport.loseWriteConnection()
    assert stack.below.write_closed
    stack.below.protocol.writeConnectionLost()
    assert stack.above.write_eof
    stack.below.protocol.readConnectionLost()
    assert stack.above.read_eof


def test_pause_resume_and_stop_pass_down(stack):
    stack.above.transport.pauseProducing()
    assert stack.below.producerState == "paused"
    stack.above.transport.resumeProducing()
    assert stack.below.producerState == "producing"
    stack.above.transport.stopProducing()
    assert stack.below.producerState == "stopped"


def test_producer_registration_passes_down(stack):
    producer = Recorder()
    stack.above.transport.registerProducer(producer, True)
    assert stack.below.producer is producer and stack.below.streaming
    stack.above.transport.unregisterProducer()
    assert stack.below.producer is None


def test_addresses_are_the_transports(stack):
    assert stack.above.transport.getPeer() == stack.below.getPeer()
    assert stack.above.transport.getHost() == stack.below.getHost()


class _Session(relay.RelaySession):
    blocked = drained = 0

    def relay_blocked(self) -> None:
        self.blocked += 1

    def relay_drained(self) -> None:
        self.drained += 1


def test_relay_flow_control_through_the_wrapper(kerberos):
    """Relayed across the wrapper as across a plain transport: each side is
    the other's producer, registered with the transport below."""
    stack = Stack(kerberos, 2, relay.RelayEnd())
    client = stack.above
    far = relay.RelayEnd()
    far_transport = HalfCloseTransport()
    far.makeConnection(far_transport)
    session = _Session()
    relay.join(client, far, session)
    assert stack.below.producer is far and far_transport.producer is client
    stack.receive(stack.peer.encode(b"up"))
    assert far_transport.value() == b"up"
    far.dataReceived(b"down")
    assert stack.sent() == b"down"
    # The far end's buffer is full: the client is paused, below the wrapper.
    client.pauseProducing()
    assert stack.below.producerState == "paused" and session.blocked == 1
    client.resumeProducing()
    assert stack.below.producerState == "producing" and session.drained == 1
    # The client's half-close reaches the far end as one.
    stack.below.protocol.readConnectionLost()
    assert far_transport.write_closed


# Large reads and writes, wrapped and unwrapped in a crypto thread. Here a
# stand-in for the threads: a call runs when the test says, as a thread
# would take it, and its result comes back when the test says, as
# callFromThread's calls run on the reactor's next turn.


class ManualThreads:
    def __init__(self) -> None:
        self.calls: list = []    # waiting for a thread
        self.back: list = []     # done, waiting for the reactor's turn
        self.reactor = self

    def run(self, call) -> None:
        self.calls.append(call)

    def callFromThread(self, f, *args) -> None:
        self.back.append((f, args))

    def work(self) -> None:
        """Every call waiting (one may queue the next), as a thread would."""
        while self.calls:
            self.calls.pop(0)()

    def deliver(self) -> None:
        back, self.back = self.back, []
        for f, args in back:
            f(*args)

    def settle(self) -> None:
        while self.calls or self.back:
            self.work()
            self.deliver()


@implementer(IHalfCloseableProtocol)
class Ordered(Recorder):
    """A Recorder that also keeps what happened in order."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list = []

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.events.append(len(data))

    def readConnectionLost(self) -> None:
        super().readConnectionLost()
        self.events.append("eof")

    def connectionLost(self, reason=None) -> None:
        super().connectionLost(reason)
        self.events.append("lost")


def threaded(kerberos, level: int = 2) -> tuple[Stack, ManualThreads]:
    stack = Stack(kerberos, level, Ordered())
    threads = ManualThreads()
    stack.wrapper.threads = threads
    return stack, threads


BIG = protection.OFFLOAD_MIN


def test_a_large_read_is_unwrapped_in_a_thread_and_what_follows_waits_its_turn(kerberos):
    stack, threads = threaded(kerberos)
    big = os.urandom(BIG)
    stack.receive(stack.peer.encode(big))
    stack.receive(stack.peer.encode(b"small"))   # alone, it would be unwrapped at once
    assert stack.above.received == []
    threads.work()
    assert stack.above.received == []            # not before the reactor's turn
    threads.deliver()
    assert stack.above.received == [big, b"small"]
    # Nothing in flight: small reads are unwrapped at once again.
    stack.receive(stack.peer.encode(b"now"))
    assert stack.above.received[-1] == b"now" and not threads.calls


def test_a_large_write_is_wrapped_in_a_thread_and_what_follows_waits_its_turn(stack):
    threads = ManualThreads()
    stack.wrapper.threads = threads
    big = os.urandom(3 * BIG)
    stack.above.transport.write(big)
    stack.above.transport.write(b"tail")
    assert stack.below.value() == b""
    threads.settle()
    assert stack.sent() == big + b"tail"
    stack.above.transport.write(b"now")
    assert stack.sent() == b"now" and not threads.calls


def test_steps_waiting_for_the_thread_are_joined(kerberos):
    stack, threads = threaded(kerberos)
    chunks = [os.urandom(BIG + n) for n in range(3)]
    for chunk in chunks:
        stack.receive(stack.peer.encode(chunk))
    for chunk in chunks:
        stack.above.transport.write(chunk)
    # One read step and one write step, each run by one call.
    assert len(threads.calls) == 1 and len(stack.wrapper.steps) == 2
    threads.settle()
    assert stack.above.received == chunks          # each read's plaintext as it came
    assert stack.sent() == b"".join(chunks)


def test_directions_keep_their_order_across_the_queue(kerberos):
    stack, threads = threaded(kerberos)
    writes, reads = [], []
    for n in range(6):
        size = BIG * (n % 2) + 100 * n + 1
        reads.append(os.urandom(size))
        writes.append(os.urandom(size + 7))
        stack.receive(stack.peer.encode(reads[-1]))
        stack.above.transport.write(writes[-1])
        if n == 2:
            threads.work()    # a thread takes what is there, more comes meanwhile
    threads.settle()
    assert b"".join(stack.above.received) == b"".join(reads)
    assert stack.sent() == b"".join(writes)


def test_eof_and_loss_wait_for_the_reads_before_them(kerberos):
    stack, threads = threaded(kerberos)
    big = os.urandom(BIG)
    stack.receive(stack.peer.encode(big))
    stack.below.protocol.readConnectionLost()
    reason = Failure(error.ConnectionDone())
    stack.below.protocol.connectionLost(reason)
    assert stack.above.events == []
    # The connection is gone: a write now goes nowhere.
    stack.above.transport.write(os.urandom(BIG))
    threads.settle()
    assert stack.above.events == [BIG, "eof", "lost"]
    assert stack.above.lost is reason
    assert stack.wrapper.protocol is None and stack.below.value() == b""


@pytest.mark.parametrize("close", ["loseConnection", "loseWriteConnection", "stopProducing"])
def test_a_close_waits_for_the_writes_before_it(kerberos, close):
    stack, threads = threaded(kerberos)
    big = os.urandom(BIG)
    stack.above.transport.write(big)
    getattr(stack.above.transport, close)()
    assert not stack.below.disconnecting and not stack.below.write_closed
    assert bool(stack.above.transport.disconnecting) == (close != "loseWriteConnection")
    threads.settle()
    assert stack.sent() == big
    if close == "loseWriteConnection":
        assert stack.below.write_closed and not stack.below.disconnecting
    else:
        assert stack.below.disconnecting


def test_an_abort_drops_what_is_in_flight(kerberos):
    stack, threads = threaded(kerberos)
    stack.receive(stack.peer.encode(os.urandom(BIG)))
    stack.above.transport.write(os.urandom(BIG))
    stack.above.transport.loseConnection()
    stack.above.transport.abortConnection()
    threads.settle()
    assert stack.above.received == [] and stack.below.value() == b""
    reason = Failure(error.ConnectionAborted())
    stack.below.protocol.connectionLost(reason)
    assert stack.above.lost is reason


def test_a_frame_refused_in_a_thread_aborts(kerberos):
    stack, threads = threaded(kerberos)
    good = os.urandom(BIG)
    stack.receive(stack.peer.encode(good))
    threads.work()       # taken before the bad frame came: it goes up
    bad = bytearray(stack.peer.encode(os.urandom(BIG)))
    bad[-1] ^= 1
    stack.receive(bytes(bad))
    stack.receive(stack.peer.encode(b"after"))
    stack.below.protocol.readConnectionLost()
    threads.settle()
    assert stack.above.received == [good] and not stack.above.read_eof
    assert stack.below.disconnected, "not aborted"
    stack.below.protocol.connectionLost(Failure(error.ConnectionDone()))
    lost = stack.above.lost
    assert lost is not None and lost.check(protection.ProtectionFailed)
    assert "GSS-API unwrap failed" in lost.getErrorMessage()


class Raising(Ordered):
    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        raise RuntimeError("a bug above")


def test_a_protocol_that_raises_on_a_thread_s_result_is_dropped(kerberos):
    """As Twisted drops a connection whose protocol raises in dataReceived;
    the steps behind go on (a close still reaches the transport)."""
    stack = Stack(kerberos, 2, Raising())
    threads = ManualThreads()
    stack.wrapper.threads = threads
    stack.receive(stack.peer.encode(os.urandom(BIG)))
    stack.below.protocol.connectionLost(Failure(error.ConnectionDone()))
    threads.settle()
    assert stack.below.disconnected, "not aborted"
    lost = stack.above.lost
    assert lost is not None and lost.check(RuntimeError)
    assert stack.above.events == [BIG, "lost"]


def test_reading_pauses_while_the_reads_to_unwrap_pile_up(kerberos):
    stack, threads = threaded(kerberos)
    chunk = os.urandom(60000)
    frame = stack.peer.encode(chunk)
    reads = 0
    while stack.below.producerState == "producing":
        stack.receive(frame)
        frame = stack.peer.encode(chunk)
        reads += 1
    assert protection.BACKLOG < reads * len(frame) <= protection.BACKLOG + len(frame)
    # The protocol above pausing and resuming meanwhile does not resume it.
    stack.above.transport.pauseProducing()
    stack.above.transport.resumeProducing()
    assert stack.below.producerState == "paused"
    # Drained while the protocol above wants it paused: it stays paused.
    stack.above.transport.pauseProducing()
    threads.settle()
    assert stack.below.producerState == "paused"
    stack.above.transport.resumeProducing()
    assert stack.below.producerState == "producing"
    assert b"".join(stack.above.received) == chunk * reads


@implementer(IPushProducer)
class Producer:
    paused = stopped = False

    def pauseProducing(self) -> None:
        assert not self.paused, "paused twice"
        self.paused = True

    def resumeProducing(self) -> None:
        assert self.paused, "resumed, not paused"
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


def test_a_producer_pauses_while_the_writes_to_wrap_pile_up(kerberos):
    stack, threads = threaded(kerberos)
    producer = Producer()
    stack.above.transport.registerProducer(producer, True)
    gate = stack.below.producer
    assert gate is not producer and stack.below.streaming
    writes = 0
    while not producer.paused:
        stack.above.transport.write(os.urandom(60000))
        writes += 1
    assert protection.BACKLOG < writes * 60000 <= protection.BACKLOG + 60000
    # The transport below pausing and resuming meanwhile does not resume it.
    gate.pauseProducing()
    gate.resumeProducing()
    assert producer.paused
    # Drained while the transport below is full: it stays paused.
    gate.pauseProducing()
    threads.settle()
    assert producer.paused
    gate.resumeProducing()
    assert not producer.paused
    gate.stopProducing()
    assert producer.stopped
    assert len(stack.sent()) == writes * 60000
    stack.above.transport.unregisterProducer()
    assert stack.below.producer is None


@pytest.mark.parametrize("level, threaded", [(1, False), (2, True)])
def test_crypto_threads_only_for_confidentiality(kerberos, level, threaded):
    _initiator, acceptor = context_pair(kerberos)
    above = Recorder()
    below = HalfCloseTransport()
    below.reactor = reactor
    above.makeConnection(below)
    below.protocol = above
    wrapper = protection.start(above, acceptor, level)
    assert (wrapper.threads is not None) == threaded


def test_crypto_threads_only_where_a_reactor_takes_calls_from_threads():
    assert protection.CryptoThreads.of(StringTransport()) is None
    in_memory = StringTransport()
    in_memory.reactor = MemoryReactorClock()
    assert protection.CryptoThreads.of(in_memory) is None
    real = StringTransport()
    real.reactor = reactor
    threads = protection.CryptoThreads.of(real)
    assert threads is not None and threads.reactor is reactor
    assert protection.CryptoThreads.of(real) is threads   # one set per reactor


# What start() finds beneath the protocol.


def test_under_a_protocol_wrapper(kerberos):
    """haproxy: and TLS listeners put a ProtocolWrapper under the protocol:
    the protection goes between the two."""
    _initiator, acceptor = context_pair(kerberos)
    peer = protection.SecurityLayer(_initiator, 2)
    above = Recorder()
    outer = ProtocolWrapper(WrappingFactory(protocol.Factory()), above)
    outer.makeConnection(StringTransport())
    wrapper = protection.start(above, acceptor, 2)
    assert outer.wrappedProtocol is wrapper and wrapper.transport is outer
    outer.dataReceived(peer.encode(b"through"))
    assert above.received == [b"through"]
    above.transport.write(b"back")
    assert peer.decode(outer.transport.value()) == b"back"


def test_under_start_tls_on_a_connection(kerberos):
    """startTLS on a socket: the connection's protocol is TLS's wrapper,
    whose wrappedProtocol is ours."""
    _initiator, acceptor = context_pair(kerberos)
    above = Recorder()
    connection = StringTransport()
    tls = ProtocolWrapper(WrappingFactory(protocol.Factory()), above)
    connection.protocol = tls
    above.makeConnection(connection)
    wrapper = protection.start(above, acceptor, 2)
    assert tls.wrappedProtocol is wrapper and connection.protocol is tls
    assert wrapper.transport is connection


def test_a_transport_that_hides_its_protocol_is_refused(kerberos):
    _initiator, acceptor = context_pair(kerberos)
    above = Recorder()
    above.makeConnection(StringTransport())    # no .protocol: who delivers is unknown
    with pytest.raises(TypeError):
        protection.start(above, acceptor, 2)


# Both ends over real loopback sockets.


@implementer(IHalfCloseableProtocol)
class _Echo(protocol.Protocol):
    """Echoes under protection; closes when the peer half-closes."""

    def __init__(self, context) -> None:
        self.context = context

    def connectionMade(self) -> None:
        self.lower = self.transport
        protection.start(self, self.context, 2)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class _Sender(protocol.Protocol):
    """Sends a payload under protection, half-closes, hashes the echo."""

    def __init__(self, context, payload: bytes, done: defer.Deferred) -> None:
        self.context, self.payload, self.done = context, payload, done
        self.echo = hashlib.sha256()
        self.count = 0

    def connectionMade(self) -> None:
        self.lower = self.transport
        protection.start(self, self.context, 2)
        self.transport.write(self.payload)
        self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.echo.update(data)
        self.count += len(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        self.reason = reason
        self.done.callback(None)


class RealSockets(unittest.TestCase):
    """The same wrapper at both ends of a TCP connection (the client's
    under an endpoint's wrapping protocol): no splice fast path for it,
    TCP's own interfaces kept."""

    @pytest.fixture(autouse=True)
    def _kerberos(self, kerberos) -> None:
        self.kerberos = kerberos

    def test_both_ends_protected_over_tcp(self):
        return self._echo(300_000)

    def test_more_than_a_backlog_each_way(self):
        """Reads pile up past BACKLOG for the crypto threads at both ends
        (where there are two cores): reading pauses and resumes, order holds."""
        return self._echo(12 * protection.BACKLOG + 12345)

    @defer.inlineCallbacks
    def _echo(self, size: int):
        initiator, acceptor = context_pair(self.kerberos)
        payload = os.urandom(size)
        servers: list[_Echo] = []

        def build(_addr):
            server = _Echo(acceptor)
            servers.append(server)
            return server

        factory = protocol.Factory()
        factory.buildProtocol = build
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        done: defer.Deferred = defer.Deferred()
        sender = _Sender(initiator, payload, done)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
                              sender)
        [server] = servers
        for end in (server, sender):
            assert isinstance(end.transport, protection.ProtectionWrapper)
            assert verifyObject(ITCPTransport, end.transport)
        # The wrapped pair never takes the kernel fast path; the sockets
        # under it would.
        assert splice.plain_tcp(server.lower, sender.lower) == splice.AVAILABLE
        assert not splice.plain_tcp(server.transport, sender.lower)
        assert not splice.plain_tcp(sender.lower, server.transport)
        assert not splice.eligible(server.transport, sender.transport)
        yield done
        assert sender.reason.check(error.ConnectionDone)
        assert sender.count == len(payload)
        assert sender.echo.digest() == hashlib.sha256(payload).digest()
