"""GSS-API protection (RFC 1961 encapsulation) slipped under a protocol.

Once a GSS-API negotiation has agreed on integrity or confidentiality,
:func:`start` puts a :class:`ProtectionWrapper` between the protocol and its
transport, as ``twisted.internet._newtls.startTLS`` puts
``TLSMemoryBIOProtocol`` under one: the protocol goes on writing and reading
plain bytes, the socket carries MTYP 3 frames. The server's session and the
client endpoint share it; UDP datagrams go through the same
:class:`SecurityLayer`.

A bulk stream's wrapping and unwrapping runs in :class:`CryptoThreads`
(python-gssapi releases the GIL in gss_wrap and gss_unwrap), so that the
reactor's thread reads, writes and relays on one core while the crypto runs
on another; small reads and writes are done at once, as before.

Layering: above auth (which hands up the context and level it established),
below client and proxy (which start it). It imports nothing of either.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from typing import Any, Callable, Iterable, cast

import gssapi
import gssapi.raw
from gssapi.exceptions import GSSError
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHalfCloseableProtocol,
    IProducer,
    IProtocol,
    IPushProducer,
    IReactorThreads,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from socksd.twisted_internals import IReactor, IStreamTransport
from socksd.wire import WireError, rfc1961

log = Logger()


class ProtectionFailed(WireError):
    """A frame the layer refused (malformed, tampered, replayed, weaker than
    agreed) or could not make. The wrapper aborts the connection and hands this to the
    protocol's ``connectionLost`` as the reason, as TLS hands up its errors."""


# What a stream of wrapped frames needs from the context, and how a log line
# names each flag (RFC 2744's names, as krb5's own messages use them).
SEQUENCE_FLAGS = ((gssapi.RequirementFlag.replay_detection, "GSS_C_REPLAY_FLAG"),
                  (gssapi.RequirementFlag.out_of_sequence_detection, "GSS_C_SEQUENCE_FLAG"))


class SecurityLayer:
    """RFC 1961 encapsulation for one session: unwraps what arrives, wraps
    what is sent (conf=False for integrity, True for confidentiality)."""

    __slots__ = ("context", "level", "encrypt", "head", "token", "filled", "max_plain",
                 "require_sequence", "lock")

    def __init__(self, context: gssapi.SecurityContext, level: int,
                 require_sequence: bool = True) -> None:
        self.context = context
        self.level = level
        self.encrypt = level == rfc1961.CONFIDENTIALITY
        self.require_sequence = require_sequence
        # A frame cut by the end of a read: its head, while that is shorter
        # than four bytes; then its token, filled in place as it comes.
        self.head = b""
        self.token: bytearray | None = None
        self.filled = 0
        # Plaintext per frame such that no wrapped token exceeds 65535 bytes.
        self.max_plain = context.get_wrap_size_limit(rfc1961.MAX_TOKEN, self.encrypt)
        # Held while the context wraps or unwraps: a stream's steps may run
        # in a crypto thread while the reactor's thread wraps a datagram of
        # the same session, and a krb5 context is not safe to share.
        self.lock = threading.Lock()

    def refusal(self, command: str) -> str | None:
        """Why ``command`` may not run under this context, or None.

        Kerberos checks wrapped tokens for replay and order only when the
        initiator asked for it; without that a replayed frame of a TCP stream
        would be relayed twice, so CONNECT and BIND need both flags. UDP
        ASSOCIATE does not: datagrams are lost and reordered by nature, and a
        client cannot ask for ordering there (Dante's does not). The flags are
        fixed when the context is made, before the command is known, so this
        is asked at the request.
        """
        if not self.require_sequence or command == "udp":
            return None
        with self.lock:
            flags = self.context.actual_flags
        missing = [name for flag, name in SEQUENCE_FLAGS if flag not in flags]
        if not missing:
            return None
        return (f"gssapi: {command} needs replay and sequence detection, the client's "
                f"context lacks {' and '.join(missing)} ([gssapi] require_sequence)")

    def decode(self, data: bytes) -> bytes:
        """Whole frames received so far -> their plaintext; raises WireError
        (malformed frame, tampering, replay, wrong protection).

        Each token is copied once, out of the read it came in, or into a
        buffer of its size when reads cut it: the bytes of a bulk stream
        are not moved through a growing buffer frame after frame."""
        with self.lock:
            return self._decode(data)

    def _decode(self, data: bytes) -> bytes:
        out: list[bytes] = []
        pos, size = 0, len(data)
        token = self.token
        if token is not None:
            # The rest of a token begun in an earlier read.
            take = min(len(token) - self.filled, size)
            token[self.filled:self.filled + take] = memoryview(data)[:take]
            self.filled += take
            if self.filled < len(token):
                return b""
            self.token, pos = None, take
            out.append(self._unwrap(token))
        elif self.head:
            # A head cut short (at most three bytes): rare enough to join.
            data, self.head = self.head + data, b""
            size = len(data)
        while pos < size:
            length = rfc1961.token_length(data, pos, rfc1961.ENCAPSULATION)
            if length is None:
                self.head = data[pos:]
                break
            start = pos + 4
            pos = start + length
            if pos > size:
                token = self.token = bytearray(length)
                self.filled = size - start
                token[:self.filled] = memoryview(data)[start:]
                break
            out.append(self._unwrap(data[start:pos]))
        return b"".join(out)

    def _unwrap(self, token: bytes | bytearray) -> bytes:
        try:
            # The stubs say bytes; the binding takes any buffer that converts
            # to a char * (bytes and bytearray), and a token filled in place
            # goes in as it is.
            result = gssapi.raw.unwrap(self.context, cast(bytes, token))
        except GSSError as e:
            raise WireError(f"GSS-API unwrap failed: {e.gen_message()}") from None
        if self.encrypt and not result.encrypted:
            raise WireError("GSS-API: unencrypted frame in a confidential session")
        return result.message

    def unwrap_datagram(self, datagram: bytes) -> bytes:
        """A UDP datagram is one whole MTYP 3 frame (RFC 1961 section 6)."""
        parsed = rfc1961.parse_message(datagram, rfc1961.ENCAPSULATION)
        if parsed is None or parsed[1] != len(datagram):
            raise WireError("UDP datagram is not one whole GSS-API frame")
        try:
            with self.lock:
                result = gssapi.raw.unwrap(self.context, parsed[0].token)
        except GSSError as e:
            raise WireError(f"GSS-API unwrap failed: {e.gen_message()}") from None
        if self.encrypt and not result.encrypted:
            raise WireError("GSS-API: unencrypted datagram in a confidential session")
        return result.message

    def wrap_datagram(self, data: bytes) -> bytes:
        """Raises ValueError when the wrapped datagram would not fit a frame."""
        with self.lock:
            token = gssapi.raw.wrap(self.context, data, self.encrypt).message
        return rfc1961.encode_message(rfc1961.ENCAPSULATION, token)

    def encode(self, data: bytes) -> bytes:
        """``data`` in frames of at most ``max_plain`` bytes of plaintext,
        heads and tokens joined once; WireError if the context cannot wrap
        (an expired or deleted one)."""
        try:
            with self.lock:
                return self._encode(data)
        except GSSError as e:
            raise WireError(f"GSS-API wrap failed: {e.gen_message()}") from None

    def _encode(self, data: bytes) -> bytes:
        wrap, context, encrypt, limit = gssapi.raw.wrap, self.context, self.encrypt, self.max_plain
        head = rfc1961.encode_head
        if len(data) <= limit:
            token = wrap(context, data, encrypt).message
            return head(rfc1961.ENCAPSULATION, len(token)) + token
        parts: list[bytes] = []
        for start in range(0, len(data), limit):
            token = wrap(context, data[start:start + limit], encrypt).message
            parts += (head(rfc1961.ENCAPSULATION, len(token)), token)
        return b"".join(parts)


# Wrapping and unwrapping off the reactor's thread. python-gssapi lets go of
# the GIL inside gss_wrap and gss_unwrap, so while a thread wraps or unwraps
# a bulk stream's chunk the reactor goes on reading, writing and relaying on
# another core. Smaller reads and writes (handshake replies, interactive
# traffic) are done at once, as a hand-over would cost them more than the
# crypto, unless something is in flight ahead of them. Only confidentiality
# is worth it (see ProtectionWrapper._attach).
OFFLOAD_MIN = 16 * 1024
# Bytes a session may have waiting for or in the crypto threads, each way,
# before its source is paused (the peer's socket, or the producer writing to
# it): enough for a chunk in the works and the next ones ready behind it.
BACKLOG = 4 * 65536
RESUME_BELOW = BACKLOG // 2
# Steps a crypto thread does for one connection before it takes the next
# connection's turn.
TURN = 8


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:      # not Linux
        return os.cpu_count() or 1


class CryptoThreads:
    """The threads one reactor's protected connections wrap and unwrap in:
    as many as the process has cores, each taking the next call from one
    queue; a connection has at most one call in the queue or running."""

    def __init__(self, reactor: IReactor, threads: int) -> None:
        self.reactor = reactor
        self.stopped = False
        self.calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        # Daemon threads: one left waiting for work when the reactor was
        # never shut down must not hang the process's exit.
        self.threads = [threading.Thread(target=self._work, name=f"socksd-gssapi-{n}",
                                         daemon=True) for n in range(threads)]
        for thread in self.threads:
            thread.start()
        reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def _work(self) -> None:
        calls = self.calls
        while (call := calls.get()) is not None:
            try:
                call()
            except Exception:     # a thread left dead would strand its connections
                log.failure("GSS-API crypto thread")

    def run(self, call: Callable[[], None]) -> None:
        if not self.stopped:    # else the reactor is stopping: nothing will be relayed
            self.calls.put(call)

    def stop(self) -> None:
        """At the reactor's shutdown: each thread ends after its call."""
        self.stopped = True
        self._of.pop(id(self.reactor), None)
        for _ in self.threads:
            self.calls.put(None)

    _of: dict[int, CryptoThreads] = {}     # by id() of the reactor

    @classmethod
    def of(cls, transport: object) -> CryptoThreads | None:
        """The threads for a connection, on its reactor; None where a
        thread would not help (one core) or cannot call back (no reactor
        that takes calls from threads: an in-memory transport's)."""
        reactor = getattr(transport, "reactor", None)
        if not IReactorThreads.providedBy(reactor):
            return None
        threads = cls._of.get(id(reactor))
        if threads is None or threads.reactor is not reactor:
            cores = _cores()
            if cores < 2:
                return None
            threads = cls._of[id(reactor)] = cls(cast(IReactor, reactor), cores)
        return threads


# What a step of a wrapper's queue is.
_WRAP, _UNWRAP, _READ_EOF, _HALF_CLOSE, _CLOSE, _LOST = range(6)


class _Step:
    """One thing a wrapper does in its turn: wrap a write or unwrap a read
    (in a crypto thread; ``done`` when it is back), or pass on an EOF, a
    close or the connection's loss once all before it are done."""

    __slots__ = ("kind", "data", "size", "result", "done")

    def __init__(self, kind: int, data: Any = None) -> None:
        self.kind = kind
        self.data = data          # chunks to wrap or unwrap; or the loss's reason
        self.size = sum(map(len, data)) if kind <= _UNWRAP else 0
        self.result: Any = None          # bytes per chunk, or the error that stopped it
        self.done = kind > _UNWRAP


@implementer(IPushProducer)
class _WriteGate:
    """The streaming producer the protocol above registered, as the
    transport below sees it: paused while the transport's buffer is full
    (as ever) or the wrapper's writes waiting to be wrapped are."""

    __slots__ = ("producer", "below", "backlog")

    def __init__(self, producer: IPushProducer) -> None:
        self.producer = producer
        self.below = False        # the transport below paused it
        self.backlog = False      # the wrapper's own queue did

    def pauseProducing(self) -> None:
        if not (self.below or self.backlog):
            self.producer.pauseProducing()
        self.below = True

    def resumeProducing(self) -> None:
        self.below = False
        if not self.backlog:
            self.producer.resumeProducing()

    def stopProducing(self) -> None:
        self.producer.stopProducing()

    def hold(self) -> None:
        if not (self.below or self.backlog):
            self.producer.pauseProducing()
        self.backlog = True

    def release(self) -> None:
        self.backlog = False
        if not self.below:
            self.producer.resumeProducing()


@implementer(IProtocol, ITransport, IPushProducer, IConsumer)
class ProtectionWrapper:
    """The transport's protocol (it unwraps what arrives) and the protocol's
    transport (it wraps what is written).

    A small read or write is unwrapped or wrapped at once, as it comes. A
    large one, or any behind something in flight, goes to a crypto thread
    (see :class:`CryptoThreads`); everything then happens in its turn, in
    one queue: plaintext goes up and frames go down in the order they came,
    and an EOF, a close or the connection's loss is passed on only after
    all before it. Each way, at most ``BACKLOG`` bytes wait: past that the
    peer's socket (reading) or the producer writing here (writing) is paused
    until half of them are done."""

    # The transport below, from :func:`start` or makeConnection, before which
    # neither it nor the protocol above calls the wrapper.
    transport: IStreamTransport

    def __init__(self, protocol: IProtocol, layer: SecurityLayer) -> None:
        # None once the connection is lost (see connectionLost).
        self.protocol: IProtocol | None = protocol
        self.layer = layer
        self.failure: Failure | None = None    # set once a frame was refused
        self.aborted = False                   # the protocol above aborted
        self.closing = False                   # a close waits in the queue
        self.lost = False                      # the connection's loss waits in it
        self.threads: CryptoThreads | None = None
        self.steps: deque[_Step] = deque()     # in order; the first not done
        # The crypto thread's side: steps to run, and whether a thread is on them.
        self.todo: deque[_Step] = deque()
        self.lock = threading.Lock()
        self.running = False
        self.unwrapping = 0       # bytes of reads in the queue
        self.wrapping = 0         # bytes of writes in the queue
        self.held = False         # reading paused for the queue
        self.paused = False       # reading paused by the protocol above
        self.gate: _WriteGate | None = None
        if IHalfCloseableProtocol.providedBy(protocol):
            # A transport half-closes only a protocol that says it can.
            alsoProvides(self, IHalfCloseableProtocol)

    def _attach(self, transport: IStreamTransport) -> None:
        self.transport = transport
        # Only to encrypt: integrity's checksums cost a fraction of AES, too
        # little for a thread to win back the hand-overs it costs.
        self.threads = CryptoThreads.of(transport) if self.layer.encrypt else None
        if ITCPTransport.providedBy(transport):
            alsoProvides(self, ITCPTransport)   # the rest of it via __getattr__

    def _above(self) -> IProtocol:
        # The transport calls nothing after connectionLost, which drops it.
        assert self.protocol is not None, "called after connectionLost"
        return self.protocol

    # IProtocol, to the transport below.

    def makeConnection(self, transport: ITransport) -> None:
        """For a wrapper in place from the start; :func:`start` slips one
        under a protocol already connected instead."""
        self._attach(_stream(transport))
        self._above().makeConnection(self)

    def connectionMade(self) -> None:
        """The protocol above was told by its own makeConnection."""

    def dataReceived(self, data: bytes) -> None:
        if self.failure is not None or self.aborted:
            return       # aborting: nothing more reaches the protocol
        if self.steps or (len(data) >= OFFLOAD_MIN and self.threads is not None):
            self._queue(_UNWRAP, data)
            self.unwrapping += len(data)
            if self.unwrapping > BACKLOG and not self.held:
                self.held = True
                if not self.paused:
                    self.transport.pauseProducing()
            return
        try:
            plain = self.layer.decode(data)
        except WireError as e:
            self._refuse(e)
            return
        if plain:
            self._above().dataReceived(plain)

    # IHalfCloseableProtocol: the transport calls these only when the wrapper
    # provides it, which it does only over a protocol that does.

    def readConnectionLost(self) -> None:
        if self.steps:
            self.steps.append(_Step(_READ_EOF))
        elif self.failure is None and not self.aborted:
            IHalfCloseableProtocol(self._above()).readConnectionLost()

    def writeConnectionLost(self) -> None:
        IHalfCloseableProtocol(self._above()).writeConnectionLost()

    def connectionLost(self, reason: Failure) -> None:
        if self.steps:
            # What was read before goes up first; what waits to be written
            # goes nowhere.
            self.lost = True
            self.steps.append(_Step(_LOST, reason))
            return
        # Dropped, as Twisted's own connections drop theirs, so the two
        # protocols are freed at once, not at the next collection.
        protocol, self.protocol = self._above(), None
        protocol.connectionLost(self.failure if self.failure is not None else reason)

    # ITransport and IConsumer, to the protocol above.

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.steps or (len(data) >= OFFLOAD_MIN and self.threads is not None):
            if self.lost:
                return   # the connection is gone: written nowhere, as by Twisted's
            self._queue(_WRAP, data)
            self.wrapping += len(data)
            if self.wrapping > BACKLOG and self.gate is not None and not self.gate.backlog:
                self.gate.hold()
            return
        try:
            frames = self.layer.encode(data)
        except WireError as e:
            self._refuse(e)
            return
        self.transport.write(frames)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.steps and not self.lost:
            self.closing = True
            self.steps.append(_Step(_CLOSE))
        else:
            self.transport.loseConnection()

    def abortConnection(self) -> None:
        self.aborted = True      # what is in flight goes nowhere
        self.transport.abortConnection()

    def loseWriteConnection(self) -> None:
        if self.steps and not self.lost:
            self.steps.append(_Step(_HALF_CLOSE))
        else:
            self.transport.loseWriteConnection()

    @property
    def disconnecting(self) -> bool:
        return self.closing or bool(self.transport.disconnecting)

    def getPeer(self) -> IAddress:
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        return self.transport.getHost()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if streaming and self.threads is not None:
            # Paused by the transport below or by this wrapper's queue.
            gate = _WriteGate(cast(IPushProducer, producer))
            self.transport.registerProducer(gate, True)
            self.gate = gate
            if self.wrapping > BACKLOG:
                gate.hold()
        else:
            # Nothing queued here without threads. A pull producer is asked
            # for more only once the transport below has sent all it had,
            # which bounds this queue already.
            self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.gate = None
        self.transport.unregisterProducer()

    # IPushProducer: the protocol pauses reading from its peer.

    def pauseProducing(self) -> None:
        self.paused = True
        if not self.held:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if not self.held:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        if self.steps and not self.lost:
            # A connection's stopProducing is its loseConnection, which
            # sends what was written first: here, once it is wrapped.
            self.loseConnection()
        else:
            self.transport.stopProducing()

    # The queue.

    def _refuse(self, error: Exception) -> None:
        """A frame refused (or one that could not be made): the connection
        is aborted, and the protocol above told why when it is lost."""
        if isinstance(error, WireError):
            self.failure = Failure(ProtectionFailed(str(error)))
        else:
            # Not the peer's doing: a fault of the crypto thread's, shown whole.
            self.failure = Failure(error, type(error), error.__traceback__)
            log.failure("GSS-API protection of {peer}", self.failure, peer=self.transport.getPeer())
        self.transport.abortConnection()

    def _queue(self, kind: int, data: bytes) -> None:
        """A read to unwrap or a write to wrap, in a crypto thread. One that
        comes while the last of its kind still waits for a thread, with
        nothing queued behind that, joins it: the busier the thread, the
        larger its steps, and the fewer hand-overs per byte."""
        with self.lock:
            todo, steps = self.todo, self.steps
            if todo and steps[-1] is todo[-1] and todo[-1].kind == kind:
                last = todo[-1]
                last.data.append(data)
                last.size += len(data)
                return
            step = _Step(kind, [data])
            todo.append(step)
            steps.append(step)
            if self.running:
                return
            self.running = True
        assert self.threads is not None, "a crypto step with no thread to run it"
        self.threads.run(self._run)

    def _run(self) -> None:
        """In a crypto thread: this connection's steps, in order, each sent
        back to the reactor's thread as it is done. After ``TURN`` of them
        the thread is given back, so that a connection that never runs dry
        does not keep it from the others."""
        threads = self.threads
        assert threads is not None
        for _ in range(TURN):
            with self.lock:
                if not self.todo:
                    self.running = False
                    return
                step = self.todo.popleft()
            chunks, step.data = step.data, None
            # Chunk by chunk, never joined: a buffer past glibc's mmap
            # threshold (128 KiB) would be mapped and faulted in anew each
            # time. Unwrapped all or nothing, as a read at once.
            code = self.layer.encode if step.kind == _WRAP else self.layer.decode
            try:
                step.result = [code(chunk) for chunk in chunks]
            except Exception as e:     # taken to the reactor's thread, as any result
                step.result = e
            threads.reactor.callFromThread(self._done, step)
        threads.run(self._run)      # still running: back of the queue

    def _done(self, step: _Step) -> None:
        step.done = True
        steps = self.steps
        while steps and steps[0].done:
            try:
                self._apply(steps.popleft())
            except Exception:
                # The protocol above raised: dropped, as Twisted drops a
                # connection whose protocol raises, and the queue goes on.
                failure = Failure()
                log.failure("GSS-API protection of {peer}", failure, peer=self.transport.getPeer())
                if self.failure is None:
                    self.failure = failure
                self.transport.abortConnection()

    def _apply(self, step: _Step) -> None:
        kind, result = step.kind, step.result
        gone = self.failure is not None or self.aborted
        if kind == _UNWRAP:
            self.unwrapping -= step.size
            if self.held and self.unwrapping <= RESUME_BELOW:
                self.held = False
                if not self.paused and not gone:
                    self.transport.resumeProducing()
            if gone:
                return
            if isinstance(result, Exception):
                self._refuse(result)
                return
            for plain in result:
                if plain and self.failure is None and not self.aborted:
                    self._above().dataReceived(plain)
        elif kind == _WRAP:
            self.wrapping -= step.size
            gate = self.gate
            if gate is not None and gate.backlog and self.wrapping <= RESUME_BELOW:
                gate.release()
            if gone:
                return
            if isinstance(result, Exception):
                self._refuse(result)
                return
            for frames in result:
                self.transport.write(frames)
        elif kind == _LOST:
            protocol, self.protocol = self._above(), None
            protocol.connectionLost(self.failure if self.failure is not None else step.data)
        elif gone:
            return
        elif kind == _READ_EOF:
            IHalfCloseableProtocol(self._above()).readConnectionLost()
        elif kind == _HALF_CLOSE:
            self.transport.loseWriteConnection()
        else:
            self.transport.loseConnection()

    def __getattr__(self, name: str) -> Any:
        # The rest of the transport (TCP options, ...) is the one below.
        # Before it is attached there is none: looked up in the instance's
        # own attributes, "transport" cannot recurse here.
        below = self.__dict__.get("transport")
        if below is None:
            raise AttributeError(name)
        return getattr(below, name)


def _stream(transport: ITransport) -> IStreamTransport:
    """The transport of a protocol protection runs under: a TCP or UNIX
    connection, or a TLS or PROXY wrapper of one, which Twisted's annotations
    call an ITransport (IStreamTransport is for annotations only: no check)."""
    return cast(IStreamTransport, transport)


def start(protocol: Protocol, context: gssapi.SecurityContext, level: int,
          require_sequence: bool = True) -> ProtectionWrapper:
    """Slip protection at ``level`` (integrity or confidentiality) under
    ``protocol``, connected already: from now on what it writes goes out
    wrapped and it reads plaintext. Bytes read below before this call (past
    the negotiation) go to the wrapper's ``dataReceived``."""
    if level not in (rfc1961.INTEGRITY, rfc1961.CONFIDENTIALITY):
        raise ValueError(f"no encapsulation at protection level {level}")
    transport = protocol.transport
    if transport is None:
        raise TypeError(f"{protocol!r} is not connected: nothing to slip protection under")
    wrapper = ProtectionWrapper(protocol, SecurityLayer(context, level, require_sequence))
    _deliver_to(wrapper, transport, protocol)
    wrapper._attach(_stream(transport))
    protocol.transport = wrapper
    return wrapper


_DELIVERING = ("protocol", "wrappedProtocol", "_wrappedProtocol")


def _deliver_to(wrapper: ProtectionWrapper, transport: ITransport, protocol: Protocol) -> None:
    """Make whatever hands ``protocol`` its bytes hand them to ``wrapper``.

    Twisted has no public way to ask, so this follows the references that
    its transports keep: a connection's ``protocol`` (sockets, and what
    startTLS put there), a ProtocolWrapper's ``wrappedProtocol`` (haproxy:
    and TLS listeners) and a client endpoint's ``_wrappedProtocol``.
    """
    holder: object = transport        # transports and protocols, whatever Twisted chains
    seen: set[int] = set()
    while holder is not None and id(holder) not in seen:
        seen.add(id(holder))
        # The instance's own attributes: a ProtocolWrapper's __getattr__
        # would answer for its transport.
        attributes = getattr(holder, "__dict__", {})
        deeper: object = None
        for name in _DELIVERING:
            below = attributes.get(name)
            if below is protocol:
                setattr(holder, name, wrapper)
                return
            if deeper is None:
                deeper = below
        holder = deeper
    raise TypeError(f"cannot tell what delivers {protocol!r}'s bytes in {transport!r}")
