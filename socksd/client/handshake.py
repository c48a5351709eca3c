"""What every client handshake (SOCKS5, SOCKS4, HTTP CONNECT) shares: a
protocol that talks to the proxy under a timeout and a byte bound, then
hands the connection over to the application's protocol, with whatever
bytes came after the proxy's answer; and how one is dialled so that
cancelling its Deferred cancels the connection attempt or the handshake.

The handshake stays the transport's protocol after the hand-over and
passes everything on, half-closes included, so the application sees the
connection as if it had made it itself.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, TypeVar

from gssapi.exceptions import GSSError
from twisted.internet import defer
from twisted.internet.error import NoProtocol
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from socksd import protection
from socksd.client.errors import SOCKSError
from socksd.twisted_internals import IStreamTransport
from socksd.wire import WireError

T = TypeVar("T")

# What the proxy may send before its answer is complete: one RFC 1961 frame
# (a 65535-byte token and its header) and a reply fit; an HTTP proxy's
# response header is bounded much lower (socksd.client.http).
MAX_HANDSHAKE = 65535 + 4 + 512


class Accepted(NamedTuple):
    """BIND's second reply: the peer the proxy accepted, and the protocol
    (built by the caller's factory) now connected to it through the proxy."""

    host: str
    port: int
    protocol: IProtocol


class Bound(NamedTuple):
    """BIND's first reply: where the proxy listens for the peer (the
    proxy's address where it answered 0.0.0.0), and what fires once the
    peer has connected (or fails: timeout, refused, the proxy closed)."""

    host: str
    port: int
    accepted: defer.Deferred[Accepted]


@implementer(IHalfCloseableProtocol)
class Handshake(Protocol, TimeoutMixin):
    """Speaks to the proxy until ``hand_over``, then carries the
    application's bytes. Subclasses write in ``start`` and parse
    ``self.buffer`` in ``step``; they raise SOCKSError (or WireError) to
    fail, and ``pending`` is the Deferred the caller waits on now."""

    # The proxy's connection; under GSS-API protection, the wrapper over it.
    transport: IStreamTransport
    limit = MAX_HANDSHAKE
    what = "SOCKS"        # for messages: what the proxy speaks
    clock: IReactorTime | None = None     # what timeouts run on (None: the global reactor)

    def __init__(self, timeout: float, pending: defer.Deferred) -> None:
        self.timeout = timeout
        # None once fired, failed or cancelled: nothing is told twice.
        self.pending: defer.Deferred | None = pending
        self.buffer = b""
        self.app: IProtocol | None = None
        self.done = False     # handed over, or failed: no more parsing

    # The subclass's part.

    def start(self) -> None:
        raise NotImplementedError

    def step(self) -> bool:
        """Handle one message from the buffer; False when more bytes are needed."""
        raise NotImplementedError

    def failing(self) -> None:
        """About to fail: tell the proxy why, if its protocol can."""

    # The shared part.

    def callLater(self, period, func):
        """TimeoutMixin's timer, on our clock (tests give theirs)."""
        if self.clock is None:
            return super().callLater(period, func)
        return self.clock.callLater(period, func)

    def connectionMade(self) -> None:
        self.setTimeout(self.timeout)
        try:
            self.start()
        except (WireError, SOCKSError, ValueError) as e:
            self.fail(e if isinstance(e, SOCKSError) else SOCKSError(str(e)))

    def timeoutConnection(self) -> None:
        self.fail(SOCKSError(f"no {self.what} answer from the proxy in {self.timeOut:g} s"))
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.app is not None:
            self.app.dataReceived(data)
            return
        if self.done:
            return
        self.buffer += data
        try:
            while self.app is None and not self.done and self.step():
                pass
            if self.app is None and not self.done and len(self.buffer) > self.limit:
                raise SOCKSError(f"more than {self.limit} bytes from the proxy "
                                 "without a complete answer")
        except (WireError, SOCKSError) as e:
            self.fail(e if isinstance(e, SOCKSError) else SOCKSError(str(e)))
        except GSSError as e:   # no ticket, expired, or the proxy's error token
            self.fail(SOCKSError(f"GSS-API: {e.gen_message()}"))

    def fire(self, value: object) -> None:
        """The Deferred waited on now succeeds; parsing goes on."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.callback(value)

    def hand_over(self, factory: IProtocolFactory) -> IProtocol | None:
        """The connection is the application's from now on: its protocol,
        built by ``factory``, connected (None if the factory built none: the
        handshake has failed). The caller fires its Deferred, then hands
        ``rest``, what followed the proxy's answer, to ``deliver``: the
        application learns of its connection before it reads from it."""
        self.setTimeout(None)
        app = factory.buildProtocol(self.transport.getPeer())
        if app is None:
            # A factory that builds nothing refuses the connection, as it
            # does behind Twisted's own endpoints.
            self.fail(NoProtocol())
            return None
        self.done = True
        self.buffer = b""
        self.app = app
        app.makeConnection(self.transport)
        return app

    def deliver(self, rest: bytes) -> None:
        """After the caller has been told of the hand-over: the bytes that
        came with the answer."""
        if rest and self.app is not None:
            self.app.dataReceived(rest)

    def fail(self, error: Exception) -> None:
        if self.done:
            return
        self.failing()
        self.setTimeout(None)
        self.done = True
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.errback(error)
        self.transport.loseConnection()

    def cancel(self) -> None:
        """The caller gave up (its Deferred was cancelled): drop the proxy."""
        self.pending = None
        if not self.done:
            self.done = True
            self.setTimeout(None)
            self.transport.abortConnection()

    # IHalfCloseableProtocol: after the hand-over, the application's own
    # way with a half-close; before it, the proxy's EOF ends the handshake.

    def readConnectionLost(self) -> None:
        app = self.app
        if app is None:
            self.fail(SOCKSError("the proxy closed the connection during the handshake"))
            return
        half = IHalfCloseableProtocol(app, None)
        if half is not None:
            half.readConnectionLost()
        else:
            # What Twisted does under a protocol that cannot half-close.
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        half = IHalfCloseableProtocol(self.app, None) if self.app is not None else None
        if half is not None:
            half.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        self.done = True
        self.lost(reason)
        if self.app is not None:
            self.app.connectionLost(reason)
            return
        pending, self.pending = self.pending, None
        if pending is None:
            return
        if reason.check(protection.ProtectionFailed):
            # The layer refused a frame and aborted: say why.
            pending.errback(SOCKSError(reason.getErrorMessage()))
            return
        pending.errback(SOCKSError(f"the proxy closed the connection: "
                                   f"{reason.getErrorMessage()}"))

    def lost(self, reason: Failure) -> None:
        """The connection is gone (a subclass's hook, called first)."""


def dial(proxy: IStreamClientEndpoint, build: Callable[[defer.Deferred[T]], Handshake],
         clock: IReactorTime | None = None) -> defer.Deferred[T]:
    """Connect to the proxy and run the handshake ``build(pending)`` makes
    on the connection; the result is ``pending``. Cancelling it cancels
    the connection attempt, or aborts the handshake under way. The
    handshake's timeouts run on ``clock`` (by default the global reactor)."""
    made: list[Handshake] = []
    connecting: list[defer.Deferred] = []

    def cancel(_d: defer.Deferred[T]) -> None:
        if made:
            made[0].cancel()
        elif connecting:
            connecting[0].cancel()

    pending: defer.Deferred[T] = defer.Deferred(cancel)

    def protocol() -> Handshake:
        handshake = build(pending)
        handshake.clock = clock      # before connectionMade starts the timeout
        made.append(handshake)
        return handshake

    def failed(failure: Failure) -> None:
        if not pending.called:
            pending.errback(failure)

    attempt = proxy.connect(Factory.forProtocol(protocol))
    connecting.append(attempt)
    attempt.addErrback(failed)
    return pending
