"""What a listen description binds, as Twisted's own parser reads it, and
the TLS options of an ``ssl:`` listener, which a reload replaces in place;
whether it can be bound, and the one line that says why not.

Twisted makes an endpoint from a description (an ``ssl:`` one reads its
certificate and key files then, into a ``CertificateOptions``), and the
endpoint's ``listen`` hands port, interface, backlog and those options to its
reactor's ``listenTCP`` or ``listenSSL``. An endpoint made with a reactor of
ours gives them up through public API alone, ``haproxy:`` endpoints
included: :func:`read` keeps them and binds nothing; :func:`tls_endpoint`
binds on the real reactor with the options behind a :class:`RenewableTLS`.

A listener that cannot be bound stops start-up with one line
(:func:`cannot_listen`), found before twistd forks (:func:`check_binding`)
where it can be, as it binds (:class:`CannotListen`) where it cannot.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet import endpoints
from twisted.internet.abstract import isIPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorSSL,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import ServerFactory
from zope.interface import implementer

from socksd.config import ConfigError, endpoint_type

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


def tls_endpoint(description: str, reactor: IReactorSSL,
                 tls: RenewableTLS) -> IStreamServerEndpoint:
    """The endpoint of an ``ssl:`` description, binding on ``reactor`` and
    serving ``tls``."""
    # An ssl: endpoint asks its reactor for listenSSL alone.
    return endpoints.serverFromString(_Renewing(reactor, tls), description)


def why_not(error: object) -> str:
    """Why a listener could not be bound, in its errno's words: "address
    already in use", "permission denied" (a port below 1024 without root),
    "cannot assign requested address" (an interface not on this host),
    rather than Twisted's "Couldn't listen on 127.0.0.1:1080: [Errno 98]
    Address already in use."."""
    # A CannotListenError's is the OSError, or Twisted's own words for a
    # unix: lock file it could not take.
    reason = error.socketError if isinstance(error, CannotListenError) else error
    text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
    return text[:1].lower() + text[1:]


def cannot_listen(description: str, error: object) -> str:
    """The line for a listener that could not be bound:
    ``cannot listen on tcp:1080:interface=127.0.0.1: address already in use``."""
    return f"cannot listen on {description}: {why_not(error)}"


def bind_now(description: str) -> socket.socket | None:
    """A socket bound and listening where ``description`` binds, as
    Twisted's tcp.Port binds it (an IPv6 socket for an IPv6 interface,
    SO_REUSEADDR); None for the types :func:`read` leaves alone."""
    where = read(description, ServerFactory())
    if where is None:
        return None
    family = socket.AF_INET6 if isIPv6Address(where.interface) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # As Twisted's _resolveIPv6: a %scope becomes its scope id.
            address = socket.getaddrinfo(where.interface, where.port, family, 0, 0,
                                         socket.AI_NUMERICHOST)[0][4]
        else:
            address = (where.interface, where.port)
        sock.bind(address)
        sock.listen(where.backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def check_binding(binding: Iterable[tuple[str, Callable[[str], socket.socket | None]]]) -> None:
    """Bind every (description, bind) now, as ``bind`` will at start, then
    close them all: a ConfigError (:func:`cannot_listen`) for the first that
    cannot be. Each is held until the last is bound, so two that would take
    the same port are found too.

    For the plugins' postOptions, which run before twistd starts its log
    and forks: an error there is one line on twistd's own stderr (sys.exit,
    as for a bad file), with ``-n`` or without. At the bind itself, in
    privilegedStartService, twistd's log has taken stderr over (with ``-l
    FILE`` nothing reaches the terminal), and a daemon has forked: its
    stderr is /dev/null, and the process that launched it prints only what
    it reads from their status pipe, as ``An error has occurred: b'...'``
    cut at 100 bytes (UnixApplicationRunner._waitForStart). So what can be
    bound here first is; the rest (a ``unix:`` socket, whose path --rundir
    and --chroot change; a plugin's endpoint; a port taken since) fails as
    twistd binds it (:class:`CannotListen`)."""
    with ExitStack() as held:
        for description, bind in binding:
            try:
                sock = bind(description)
            except OSError as e:
                raise ConfigError(cannot_listen(description, e)) from None
            if sock is not None:
                held.enter_context(sock)


class CannotListen(SystemExit, Exception):
    """A listener that could not be bound as twistd started it, in
    privilegedStartService: the process ends with one line, its message
    (``socksd: cannot listen on ...``), and no traceback.

    Both a SystemExit and an Exception, for twistd. Its
    UnixApplicationRunner.postApplication catches Exception around
    startApplication: it removes the pid file and, in a daemon, writes the
    exception to the status pipe the launching process waits on (which then
    exits 1, quoting it); a SystemExit alone it lets pass, and the launching
    process, which holds the pipe's other end open itself, waits for ever.
    Raised on, it ends the process as a SystemExit does: its message
    printed (into twistd's log, by then), no traceback."""

    def __init__(self, program: str, description: str, error: object) -> None:
        super().__init__(f"{program}: {cannot_listen(description, error)}")
