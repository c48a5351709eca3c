"""What a listen description binds, as Twisted's own parser reads it, and
the TLS options of an ``ssl:`` listener, which a reload replaces in place.

Twisted makes an endpoint from a description (an ``ssl:`` one reads its
certificate and key files then, into a ``CertificateOptions``), and the
endpoint's ``listen`` hands port, interface, backlog and those options to its
reactor's ``listenTCP`` or ``listenSSL``. An endpoint made with a reactor of
ours gives them up through public API alone, ``haproxy:`` endpoints
included: :func:`read` keeps them and binds nothing; :func:`tls_service`
and :func:`listen_tls` bind on the real reactor with the options behind a
:class:`RenewableTLS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from twisted.application import service, strports
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorCore,
    IReactorSSL,
)
from twisted.internet.protocol import ServerFactory
from zope.interface import implementer

from socksd.config import endpoint_type

if TYPE_CHECKING:
    # Not at run time: pyOpenSSL is the tls extra's, imported only for ssl:.
    from OpenSSL.SSL import Connection, Context
    from twisted.internet.ssl import CertificateOptions
    from twisted.protocols.tls import TLSMemoryBIOProtocol


@dataclass(frozen=True)
class Socket:
    """What a ``tcp:``, ``tcp6:`` or ``ssl:`` description binds (under
    ``haproxy:`` too). Two equal ones are the same socket: the same
    address, backlog and kind of connections, whatever their TLS options."""

    kind: str           # "tcp" or "ssl"
    port: int
    interface: str
    backlog: int
    serving: type       # the port's factory: ours, or haproxy:'s wrapper of it
    options: CertificateOptions | None = field(default=None, compare=False)


class _Reading:
    """A reactor that binds nothing: what an endpoint would listen with is
    kept instead."""

    socket: Socket | None = None

    def listenTCP(self, port: int, factory: IProtocolFactory, backlog: int = 50,
                  interface: str = "") -> None:
        self.socket = Socket("tcp", port, interface, backlog, type(factory))

    def listenSSL(self, port: int, factory: IProtocolFactory,
                  contextFactory: CertificateOptions, backlog: int = 50,
                  interface: str = "") -> None:
        self.socket = Socket("ssl", port, interface, backlog, type(factory), contextFactory)


def read(description: str, factory: IProtocolFactory) -> Socket | None:
    """The socket a ``tcp:``, ``tcp6:`` or ``ssl:`` description binds, its
    files read now; None for other types, whose endpoints may do more than
    ask the reactor. Raises what Twisted's parser raises."""
    if endpoint_type(description) not in ("tcp", "tcp6", "ssl"):
        return None
    reading = _Reading()
    endpoints.serverFromString(reading, description).listen(factory)
    return reading.socket


@implementer(IOpenSSLContextFactory, IOpenSSLServerConnectionCreator)
class RenewableTLS:
    """An ``ssl:`` listener's TLS options, which a reload replaces: Twisted's
    TLS factory asks for each connection's OpenSSL connection as it accepts
    it, so the connections accepted after a reload get the new certificate,
    and the open ones keep theirs. It provides what the options do, so that
    either way Twisted asks, the current ones answer."""

    def __init__(self, options: CertificateOptions) -> None:
        self.options = options

    def getContext(self) -> Context:
        return self.options.getContext()

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> Connection:
        return self.options.serverConnectionForTLS(tlsProtocol)


class _Renewing:
    """The reactor an ``ssl:`` listener's endpoint is made with: it binds on
    the real one, serving ``tls`` (the options already read) in place of
    those the endpoint read again."""

    def __init__(self, reactor: IReactorSSL, tls: RenewableTLS) -> None:
        self.reactor = reactor
        self.tls = tls

    def listenSSL(self, port: int, factory: ServerFactory[Any],
                  contextFactory: CertificateOptions, backlog: int = 50,
                  interface: str = "") -> IListeningPort:
        return self.reactor.listenSSL(port, factory, self.tls, backlog, interface)


def tls_service(description: str, reactor: IReactorSSL, tls: RenewableTLS,
              factory: IProtocolFactory) -> service.IService:
    """A service that binds an ``ssl:`` description at start (as
    ``strports.service``, in privilegedStartService), serving ``tls``."""
    # strports.service hands its reactor to serverFromString only, and an
    # ssl: endpoint asks it for listenSSL alone.
    return strports.service(description, factory, cast(IReactorCore, _Renewing(reactor, tls)))


def listen_tls(description: str, reactor: IReactorSSL, tls: RenewableTLS,
                     factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
    """Bind an ``ssl:`` description now, serving ``tls``."""
    listening: defer.Deferred[IListeningPort] = endpoints.serverFromString(
        _Renewing(reactor, tls), description).listen(factory)
    return listening

