"""An RFC 1413 client: ask a host's identd who owns a TCP connection.

``query`` returns a Deferred that fires with :class:`Identity` or fails with
an :class:`IdentError` (the identd's ERROR token) or :class:`IdentUnavailable`
(no identd, no answer in time, a reply too long or malformed). Cancelling the
Deferred closes the query connection.
"""

from __future__ import annotations

from typing import NamedTuple

from twisted.internet import defer
from twisted.internet.interfaces import IConnector
from twisted.internet.protocol import ClientFactory
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from socksd.twisted_internals import IReactor, IStreamTransport
from socksd.wire import WireError, ident


class Identity(NamedTuple):
    opsys: str
    user: str
    charset: str | None = None


class IdentUnavailable(Exception):
    """The identd could not be reached, did not answer in time, or answered
    something that is not RFC 1413."""


class IdentError(Exception):
    """The identd answered ERROR; ``token`` is its error token."""

    token = ident.UNKNOWN_ERROR

    def __init__(self, token: str | None = None) -> None:
        if token is not None:
            self.token = token
        super().__init__(self.token)


class InvalidPort(IdentError):
    token = ident.INVALID_PORT


class NoUser(IdentError):
    token = ident.NO_USER


class HiddenUser(IdentError):
    token = ident.HIDDEN_USER


class UnknownError(IdentError):
    token = ident.UNKNOWN_ERROR


_ERRORS = {cls.token: cls for cls in (InvalidPort, NoUser, HiddenUser, UnknownError)}


def error_for(token: str) -> IdentError:
    """The typed error for a token; X-tokens and others are plain IdentError."""
    cls = _ERRORS.get(token)
    return cls() if cls is not None else IdentError(token)


class _IdentQuery(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = ident.MAX_LINE
    transport: IStreamTransport

    def connectionMade(self) -> None:
        self.transport.write(ident.encode_query(self.factory.server_port,
                                                self.factory.client_port))

    def lineReceived(self, line: bytes) -> None:
        factory = self.factory
        try:
            response = ident.parse_response(line)
        except WireError as e:
            factory.finish(Failure(IdentUnavailable(f"malformed reply: {e}")))
        else:
            if (response.server_port, response.client_port) != (factory.server_port,
                                                                 factory.client_port):
                factory.finish(Failure(IdentUnavailable("reply is for other ports")))
            elif isinstance(response, ident.Error):
                factory.finish(Failure(error_for(response.token)))
            else:
                factory.finish(Identity(response.opsys, response.user, response.charset))
        self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.factory.finish(Failure(IdentUnavailable(
            f"reply longer than {self.MAX_LENGTH} bytes without end of line")))
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        # RFC 1413: a close before the end of line means UNKNOWN-ERROR.
        self.factory.finish(Failure(IdentUnavailable("connection closed before a reply")))


class _IdentFactory(ClientFactory):
    noisy = False
    protocol = _IdentQuery

    def __init__(self, server_port: int, client_port: int) -> None:
        self.server_port = server_port
        self.client_port = client_port
        self.deferred: defer.Deferred[Identity] = defer.Deferred(self._cancel)
        self.connector: IConnector | None = None
        self.cancelling = False

    def finish(self, result: Identity | Failure) -> None:
        """The first result counts; later ones (a close after the reply) don't."""
        if self.deferred.called or self.cancelling:
            return
        if isinstance(result, Failure):
            self.deferred.errback(result)
        else:
            self.deferred.callback(result)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.finish(Failure(IdentUnavailable(f"no identd: {reason.getErrorMessage()}")))

    def _cancel(self, _deferred: defer.Deferred[Identity]) -> None:
        # Closing the connection reports a failure of its own: the
        # Deferred must fail with CancelledError instead.
        self.cancelling = True
        if self.connector is not None:
            self.connector.disconnect()


def query(reactor: IReactor, host: str, server_port: int, client_port: int, *,
          port: int = ident.PORT, timeout: float = 10.0,
          bind_host: str | None = None) -> defer.Deferred[Identity]:
    """Ask the identd at ``host:port`` who owns the connection between its
    ``server_port`` and our ``client_port``.

    ``bind_host`` should be our address of that connection: the identd looks
    the connection up by the query's source address.
    """
    factory = _IdentFactory(server_port, client_port)
    bind = (bind_host, 0) if bind_host else None
    factory.connector = reactor.connectTCP(host, port, factory, timeout=timeout,
                                           bindAddress=bind)

    def timed_out(result: Identity | Failure, _timeout: float) -> Identity | Failure:
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            return Failure(IdentUnavailable(f"no answer in {timeout:g} s"))
        return result

    factory.deferred.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)
    return factory.deferred
