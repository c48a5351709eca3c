"""Everything socksd assumes of Twisted beyond its public, documented API.

The functions here lean on private attributes and modules of Twisted that
may change in any release; the two interfaces name what socksd relies on
of reactors and transports where Twisted's own annotations say less. They
live in this one module, the bottom of the layer order (it imports only
Twisted), so that a Twisted upgrade has one place to re-check:
tests/test_twisted_internals.py fails on a Twisted outside
``CHECKED_TWISTED`` and exercises each name against the real classes.
"""

from __future__ import annotations

import functools
import socket
from typing import TYPE_CHECKING, Any, Callable, TypeGuard, cast

from twisted.internet import abstract, tcp
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorCore,
    IReactorFDSet,
    IReactorProcess,
    IReactorSocket,
    IReactorSSL,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUDP,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import ServerFactory

# Twisted's public API offers only proxyEndpoint(); an adopted port (a
# worker's) needs the factory, and the wrapper it puts under a haproxy:
# listener's protocols is what tells a PROXY connection apart.
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.protocols.haproxy._info import ProxyInfo

__all__ = ["CHECKED_TWISTED", "HAProxyProtocolWrapper", "IReactor", "IStreamTransport",
           "after_each_read", "buffered", "direct_socket", "exit_cleanly", "installed_reactor",
           "is_health_check", "is_proxy_wrapper", "proxy_info", "proxy_protocol_factory",
           "tls_client"]

# The oldest and newest Twisted releases (major, minor) whose internals
# below were read and tested. Outside this range the test fails: re-check
# each function here against that release's source, then widen the range.
CHECKED_TWISTED = ((24, 3), (26, 10))


class IReactor(IReactorCore, IReactorTime, IReactorFDSet, IReactorTCP, IReactorUDP,
               IReactorProcess, IReactorSocket, IReactorThreads, IReactorSSL):
    """The reactor as socksd uses it: Twisted types the global one with
    fewer interfaces (``_IReactorCommon``) than its POSIX reactors provide.
    Make-believe, like ``_IReactorCommon``: no class declares it, so it is
    for annotations only (``providedBy`` is always false)."""


class IStreamTransport(ITCPTransport, IConsumer, IPushProducer):
    """A connected stream transport as socksd drives it (TCP or UNIX, or a
    TLS or PROXY wrapper, which takes on the interfaces of the one below):
    no one Twisted interface names all of these, nor FileDescriptor's
    ``connected``/``disconnecting`` flags. Make-believe too, for annotations
    only."""

    connected: int
    disconnecting: int


def installed_reactor() -> IReactor:
    """The global reactor, imported only now (socksd installs its own
    first), typed with every interface socksd uses of it."""
    from twisted.internet import reactor

    return cast(IReactor, reactor)


def buffered(transport: object) -> int | None:
    """Bytes Twisted holds for this transport, not yet taken by the socket
    (FileDescriptor's write buffer: ``dataBuffer`` past ``offset``, plus
    ``_tempDataLen`` not yet joined to it); None when no FileDescriptor is
    under it.

    A wrapper (haproxy:'s and TLS's ProtocolWrapper, GSS-API protection) is
    looked through to the socket's transport under it: a client behind one
    that stops reading fills that buffer, and the stall watch must see it."""
    for _ in range(8):    # wrappers stack a few deep at most
        if isinstance(transport, abstract.FileDescriptor):
            return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        # Each wrapper keeps the transport under it in its own __dict__
        # (a ProtocolWrapper's __getattr__ would hand back its own methods).
        transport = vars(transport).get("transport") if hasattr(transport, "__dict__") \
            else None
        if transport is None:
            return None
    return None


def direct_socket(transport: object) -> socket.socket | None:
    """The socket under a bare TCP transport (exactly tcp.Server or
    tcp.Client) when bytes sent on it directly keep their order: connected,
    not closing, not aborted (``_aborting``: it closes only on the reactor's
    next turn and meanwhile looks connected), no TLS, nothing queued in
    Twisted's write buffer. None otherwise: write through the transport."""
    if not (type(transport) is tcp.Server or type(transport) is tcp.Client):
        return None
    # The write buffer read here rather than through buffered(): the type is
    # known, and this runs for every reply and first chunk a session sends.
    if transport.connected and not transport.disconnecting and not transport.TLS and \
            not transport._aborting and not transport._tempDataLen and \
            len(transport.dataBuffer) == transport.offset:
        return transport.socket
    return None


def proxy_protocol_factory(factory: ServerFactory) -> ServerFactory:
    """``factory`` behind the PROXY protocol, for a port listened on without
    an endpoint (a worker's adopted port), as ``haproxy:`` endpoints wrap it."""
    # A WrappingFactory is a ClientFactory to Twisted's annotations, yet it is
    # what proxyEndpoint() listens with: any IProtocolFactory serves a port.
    return cast(ServerFactory, HAProxyWrappingFactory(factory))


def is_proxy_wrapper(transport: object) -> TypeGuard[HAProxyProtocolWrapper]:
    """Is this the transport of a connection under a ``haproxy:`` listener?"""
    return isinstance(transport, HAProxyProtocolWrapper)


def proxy_info(wrapper: HAProxyProtocolWrapper) -> ProxyInfo | None:
    """What the PROXY header said (``source``, ``destination``), once the
    wrapper has read it; None before."""
    return wrapper._proxyInfo


def is_health_check(wrapper: HAProxyProtocolWrapper) -> bool:
    """A PROXY header without a client (v2 LOCAL, v1 UNKNOWN) was read: the
    balancer checking that we are up. (The wrapper passes on only what
    follows the header, so the protocol above sees nothing of it.)"""
    info = proxy_info(wrapper)
    return info is not None and info.source is None


def after_each_read(wrapper: HAProxyProtocolWrapper, callback: Callable[[], None]) -> None:
    """Call ``callback()`` after each read the wrapper handles, so the protocol
    above can look at :func:`proxy_info` even when the read passed it nothing."""
    read = wrapper.dataReceived

    def watched(data: bytes) -> None:
        read(data)
        callback()

    # The transport below looks dataReceived up on each read: an instance
    # attribute takes the place of the wrapper's method.
    wrapper.dataReceived = watched  # type: ignore[method-assign]


def exit_cleanly(reactor: object) -> None:
    """The stop a signal asked for is over, done in order: exit 0. twistd
    otherwise ends by sending itself the signal the reactor stopped for
    (``_exitSignal``, which the reactor's SIGTERM and SIGINT handlers set),
    an exit status that says "killed", as if nothing had been cleaned up."""
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None  # type: ignore[attr-defined]


# TLS that half-closes. Twisted's TLS ends the whole connection at a
# close_notify, sent or received, and its loseWriteConnection is the TCP
# transport's (through ProtocolWrapper.__getattr__): a FIN under TLS with no
# close_notify, which a TLS peer takes for a truncation and answers by
# dropping the connection. A relay passes a client's half-close on, and the
# answer the destination sends after it was lost. TLS 1.3 (RFC 8446 6.1)
# has each side close its own writing with close_notify and read on.


@implementer(IStreamClientEndpoint)
class _TLSClientEndpoint:
    """``wrapClientTLS``, with connections that half-close."""

    def __init__(self, creator: Any, endpoint: IStreamClientEndpoint) -> None:
        self.creator, self.endpoint = creator, endpoint

    def connect(self, protocolFactory: IProtocolFactory) -> Any:
        factory = _half_closing_tls()(self.creator, True, protocolFactory)
        connecting: Any = self.endpoint.connect(factory)
        return connecting.addCallback(_wrapped)


def _wrapped(protocol: Any) -> Any:
    """The application's protocol, under the TLS wrapper the endpoint made."""
    return protocol.wrappedProtocol


def tls_client(creator: Any, endpoint: IStreamClientEndpoint) -> IStreamClientEndpoint:
    """``endpoint`` in TLS (``creator``: ``optionsForClientTLS``'s), as
    ``wrapClientTLS`` does, except that the connection half-closes both
    ways: ``loseWriteConnection`` sends close_notify and reading goes on;
    the peer's close_notify is ``readConnectionLost`` to a protocol that
    half-closes (IHalfCloseableProtocol), which may write on."""
    return _TLSClientEndpoint(creator, endpoint)


@functools.cache
def _half_closing_tls() -> Any:
    """The factory class (made on first use: pyOpenSSL is the tls extra's)."""
    from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
    from twisted.protocols.policies import ProtocolWrapper
    from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory

    @implementer(IHalfCloseableProtocol)
    class HalfClosingTLS(BufferingTLSTransport):
        # Private names of TLSMemoryBIOProtocol used: _tlsConnection,
        # _handshakeDone, _appSendBuffer, _lostTLSConnection, _aborted,
        # _flushSendBIO, _shutdownTLS, _tlsShutdownFinished, and the
        # methods overridden, _flushReceiveBIO, _checkHandshakeStatus and
        # _unbufferPendingWrites; of BufferingTLSTransport, _aggregator.
        _write_closing = False    # loseWriteConnection: close_notify once the bytes are out
        _write_closed = False     # our close_notify is sent
        _read_closed = False      # the peer's close_notify came

        def loseWriteConnection(self) -> None:
            if self.disconnecting or not self.connected or self._write_closing:
                return
            self._write_closing = True
            self._aggregator.flush()      # what was written goes before the close_notify
            self._maybe_close_notify()

        def _maybe_close_notify(self) -> None:
            """Once the handshake is over and the buffered bytes are out."""
            if self._write_closing and not self._write_closed and self._handshakeDone \
                    and not self._appSendBuffer and not self._lostTLSConnection \
                    and not self.disconnecting:
                self._close_notify()

        def _checkHandshakeStatus(self) -> None:
            super()._checkHandshakeStatus()
            self._maybe_close_notify()

        def _unbufferPendingWrites(self) -> None:
            super()._unbufferPendingWrites()
            self._maybe_close_notify()

        def _close_notify(self) -> None:
            self._write_closed = True
            if self._read_closed:
                self.loseConnection()     # both directions over: the TCP connection too
                return
            try:
                self._tlsConnection.shutdown()    # False: the peer's is still to come
            except Error:
                self._tlsShutdownFinished(Failure())
                return
            self._flushSendBIO()

        def _flushReceiveBIO(self) -> None:
            # TLSMemoryBIOProtocol's, but for ZeroReturnError (close_notify).
            while not self._lostTLSConnection and not self._read_closed:
                try:
                    data = self._tlsConnection.recv(2**15)
                except WantReadError:
                    break
                except ZeroReturnError:
                    self._peer_closed()
                except Error:
                    self._tlsShutdownFinished(Failure())
                else:
                    if not self._aborted:
                        ProtocolWrapper.dataReceived(self, data)
            self._flushSendBIO()

        def _peer_closed(self) -> None:
            half = IHalfCloseableProtocol(self.wrappedProtocol, None)
            if half is None:
                # As Twisted's TLS: the whole connection ends.
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
                return
            self._read_closed = True
            half.readConnectionLost()
            # Ours went before (loseWriteConnection, or loseConnection
            # waiting for this one): both are over.
            if (self._write_closed or self.disconnecting) and not self._lostTLSConnection:
                self._shutdownTLS()
                self._tlsShutdownFinished(None)

        # IHalfCloseableProtocol, for the TCP transport under it.
        def readConnectionLost(self) -> None:
            if self._read_closed:
                return    # after the peer's close_notify; we may still write
            # The TCP stream ended with no close_notify: a truncation, which
            # ends the connection (the reason says the connection was lost).
            assert self.transport is not None     # it read: it is connected
            self.transport.loseConnection()

        def writeConnectionLost(self) -> None:
            pass     # the TCP write side is never half-closed here

    class HalfClosingTLSFactory(TLSMemoryBIOFactory):
        protocol = HalfClosingTLS

    return HalfClosingTLSFactory
