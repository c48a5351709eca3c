"""Moving bytes between the two transports of a session.

Each side is a :class:`RelayEnd`. Joining two ends registers each transport
as the other's streaming producer, so when one side's write buffer fills
(Twisted's ``bufferSize``), the other side stops reading: memory stays at a
buffer's worth however fast one side sends and however slowly the other
reads. EOF in one direction is passed on as a half-close; the session ends
when both directions are done or either side drops.

A rate limit (:mod:`socksd.throttle`) pauses an end's reading too: it reads
again only when neither the partner's full buffer nor its budget holds it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from twisted.internet import error
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from socksd.twisted_internals import IStreamTransport, buffered, direct_socket

if TYPE_CHECKING:
    from socksd.throttle import Meter


def buffer_empty(transport: object) -> bool:
    """Has Twisted sent everything written to this transport? (anything but
    a FileDescriptor counts as "no")"""
    return buffered(transport) == 0


def send(transport: IStreamTransport, data: bytes) -> None:
    """``transport.write(data)``, sent at once when nothing is queued before it.

    Twisted's ``write`` only queues: the bytes leave on the reactor's next
    pass, after registering for and waking on writability (two epoll_ctl calls
    and an event per write). A SOCKS session's writes are small and its
    socket's buffer is nearly always empty, so trying ``send`` first saves
    that round trip on every reply and relayed chunk: the writes a short
    session is made of. Order is kept (only when Twisted's buffer is
    empty); an aborted or TLS transport, whatever the socket does not take,
    and any error go the normal way.
    """
    sock = direct_socket(transport)
    if sock is not None:
        try:
            sent = sock.send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error the normal path reports
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


class RelaySession:
    """What the relay reports to: the session owning both ends."""

    __slots__ = ()   # a subclass may be all slots: one per relayed session

    def relay_activity(self) -> None:
        """Bytes moved (for the idle timeout)."""

    def relay_ended(self) -> None:
        """Both ends are closed."""

    def relay_lost(self, why: str) -> None:
        """An end failed (reset, error) rather than closing: ``why``."""

    def relay_blocked(self) -> None:
        """A receiver stopped taking bytes (its buffer is full): from now on
        the session watches that it drains."""

    def relay_drained(self) -> None:
        """A blocked receiver took everything it was holding."""

    def relay_bulk(self) -> None:
        """An end passed its ``splice_after`` mark: time for a fast path."""


@implementer(IHalfCloseableProtocol, IPushProducer)
class RelayEnd(Protocol):
    """One side of a relayed session."""

    transport: IStreamTransport
    partner: RelayEnd | None = None
    session: RelaySession | None = None
    received = 0            # bytes read from this side
    read_eof = False        # this side sent EOF
    closed = False          # this side's connection is gone
    watch_activity = False  # call session.relay_activity() per chunk
    splice_after = 0        # tell session.relay_bulk() past this many bytes (0: never)
    meter: Meter | None = None   # the rate budget this side's reading draws on (None: no limit)
    flow_paused = False     # reading paused by flow control: the partner's receiver is full

    def relay_data(self, data: bytes) -> None:
        partner, session = self.partner, self.session
        assert partner is not None and session is not None, "relay_data before join()"
        self.received += len(data)
        send(partner.transport, data)
        if self.meter is not None:   # the one test an unlimited session pays per chunk
            self.meter.spent(len(data))
        if self.watch_activity:
            session.relay_activity()
        if self.splice_after and self.received >= self.splice_after:
            session.relay_bulk()

    dataReceived = relay_data

    def readConnectionLost(self) -> None:
        if self.read_eof:
            return
        self.read_eof = True
        # Nothing more to read: what the budget handed this side goes back
        # to the ends sharing it.
        self.leave_budget()
        partner = self.partner
        if partner is None or partner.closed:
            self.transport.loseConnection()
            return
        # Nothing more will come from this side: it no longer needs pausing.
        partner.transport.unregisterProducer()
        if partner.read_eof:
            self.transport.loseConnection()
            partner.transport.loseConnection()
        else:
            partner.transport.loseWriteConnection()

    # The producer registered with the partner's transport: its reading is
    # paused while the partner's receiver is full, and the session is told.
    def pauseProducing(self) -> None:
        self.flow_paused = True
        self.transport.pauseProducing()
        if self.session is not None:
            self.session.relay_blocked()

    def resumeProducing(self) -> None:
        self.flow_paused = False
        if self.meter is None or not self.meter.waiting:   # else the budget resumes it
            self.transport.resumeProducing()
        if self.session is not None:
            self.session.relay_drained()

    # The holder of a throttle.Meter: reading paused while the budget is spent.
    def throttle_hold(self) -> None:
        self.transport.pauseProducing()

    def throttle_resume(self) -> None:
        if self.flow_paused or self.read_eof or self.closed:
            return   # flow control resumes it; or there is nothing left to read
        self.transport.resumeProducing()
        if self.watch_activity and self.session is not None:
            # Held by its budget is not idle: the idle timeout starts again.
            self.session.relay_activity()

    def leave_budget(self) -> None:
        """This side reads no more: it leaves its rate budget (if any)."""
        meter, self.meter = self.meter, None
        if meter is not None:
            meter.detach()

    def stopProducing(self) -> None:
        self.transport.stopProducing()

    def writeConnectionLost(self) -> None:
        """Our half-close reached the peer; the other direction may go on."""

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        self.leave_budget()
        partner = self.partner
        finished = self.read_eof and (partner is None or partner.read_eof)
        if reason is not None and self.session is not None and not finished and \
                not reason.check(error.ConnectionDone, error.ConnectionAborted):
            # A reset or error before both directions ended. (After that, a
            # peer's reset on the last close loses nothing.)
            self.session.relay_lost(reason.getErrorMessage())
        if partner is not None and not partner.closed:
            # Deliver what is buffered for the partner, then close it.
            partner.transport.loseConnection()
            partner.leave_budget()    # closing, it reads no more: out of its budget's queue
        elif self.session is not None:
            self.session.relay_ended()


def join(a: RelayEnd, b: RelayEnd, session: RelaySession, watch_activity: bool = False,
         flow_control: bool = True) -> None:
    """Make ``a`` and ``b`` relay to each other with flow control (which the
    splice fast path does itself, with ``flow_control=False``)."""
    a.partner, b.partner = b, a
    a.session = b.session = session
    a.watch_activity = b.watch_activity = watch_activity
    if flow_control:
        a.transport.registerProducer(b, True)
        b.transport.registerProducer(a, True)


class StallWatch:
    """Every wait has a timeout, a blocked receiver's too: once a receiver
    stops taking bytes, look again after ``timeout`` seconds; if it took
    nothing of what it held and never drained meanwhile, call ``stalled``
    (even with no idle timeout). One that drains, however slowly, is left
    alone. Serves both relay paths: ``held`` says what each receiver holds,
    in Twisted's buffers or in the splice pipes."""

    __slots__ = ("reactor", "timeout", "held", "stalled", "check", "drains")

    def __init__(self, reactor, timeout: float,
                 held: Callable[[], tuple[int | None, ...]],
                 stalled: Callable[[], None]) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.held = held          # bytes waiting for each receiver (None: cannot tell)
        self.stalled = stalled
        self.check = None         # the pending look
        self.drains = 0           # times a blocked receiver took all it held

    def blocked(self) -> None:
        """A receiver's buffer is full."""
        if self.check is None:
            self.check = self.reactor.callLater(self.timeout, self._look, self.drains,
                                                self.held())

    def drained(self) -> None:
        """A blocked receiver took all it held (or the bytes moved elsewhere,
        as into splice pipes: the next look compares anew)."""
        self.drains += 1

    def stop(self) -> None:
        check, self.check = self.check, None
        if check is not None and check.active():
            check.cancel()

    def _look(self, drains: int, before: tuple[int | None, ...]) -> None:
        self.check = None
        now = self.held()
        stuck = self.drains == drains and any(
            held and was is not None and held >= was
            for held, was in zip(now, before, strict=True) if held is not None)
        if stuck:
            self.stalled()
        elif any(now):
            self.blocked()   # still draining: look again later
