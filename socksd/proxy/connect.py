"""Outgoing connections for CONNECT: resolve, connect with a timeout, and
say why it failed in words every SOCKS version can turn into its reply."""

from __future__ import annotations

import errno

from zope.interface import implementer

from twisted.internet import defer, error
from twisted.internet.interfaces import IResolutionReceiver
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure

from socksd.relay import RelayEnd

# Why a CONNECT failed, independent of the SOCKS version that reports it.
DENIED = "denied"
NETWORK_UNREACHABLE = "network unreachable"
HOST_UNREACHABLE = "host unreachable"
REFUSED = "connection refused"
TIMEOUT = "timed out"
FAILED = "general failure"


class ConnectFailed(Exception):
    """A CONNECT that could not be carried out; ``reason`` is one of the above."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


_HOST_ERRNOS = {errno.EHOSTUNREACH, errno.EHOSTDOWN}
_NETWORK_ERRNOS = {errno.ENETUNREACH, errno.ENETDOWN, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT}


def classify(failure: Failure) -> ConnectFailed:
    """Map a Twisted connection or resolution failure to a ConnectFailed."""
    value = failure.value
    detail = failure.getErrorMessage()
    if isinstance(value, ConnectFailed):
        return value
    if failure.check(error.ConnectionRefusedError):
        return ConnectFailed(REFUSED, detail)
    if failure.check(error.NoRouteError):
        return ConnectFailed(NETWORK_UNREACHABLE, detail)
    if failure.check(error.TCPTimedOutError, error.TimeoutError, defer.TimeoutError):
        return ConnectFailed(TIMEOUT, detail)
    if failure.check(error.DNSLookupError):
        return ConnectFailed(HOST_UNREACHABLE, detail)
    if failure.check(error.ConnectError):
        code = value.osError
        if code in _HOST_ERRNOS:
            return ConnectFailed(HOST_UNREACHABLE, detail)
        if code in _NETWORK_ERRNOS:
            return ConnectFailed(NETWORK_UNREACHABLE, detail)
    return ConnectFailed(FAILED, detail)


@implementer(IResolutionReceiver)
class _Addresses:
    __slots__ = ("name", "hosts", "deferred")

    def __init__(self, name: str) -> None:
        self.name = name
        self.hosts: list[str] = []
        self.deferred: defer.Deferred[list[str]] = defer.Deferred()

    def resolutionBegan(self, resolution) -> None:
        pass

    def addressResolved(self, address) -> None:
        if address.host not in self.hosts:
            self.hosts.append(address.host)

    def resolutionComplete(self) -> None:
        if self.deferred.called:
            return
        if self.hosts:
            self.deferred.callback(self.hosts)
        else:
            self.deferred.errback(error.DNSLookupError(f"{self.name}: name not found"))


def resolve(reactor, name: str, port: int, timeout: float) -> defer.Deferred[list[str]]:
    """All addresses (IPv4 and IPv6) of ``name``, via the reactor's resolver.

    The default resolver runs getaddrinfo in the reactor's thread pool, so the
    reactor never blocks on DNS; a lookup slower than ``timeout`` fails.
    """
    receiver = _Addresses(name)
    reactor.nameResolver.resolveHostName(receiver, name, port)
    if timeout > 0:
        receiver.deferred.addTimeout(timeout, reactor,
                                     onTimeoutCancel=_resolution_timed_out(name, timeout))
    return receiver.deferred


def _resolution_timed_out(name: str, timeout: float):
    def convert(result, _timeout):
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            return Failure(error.DNSLookupError(f"{name}: no answer in {timeout:g} s"))
        return result
    return convert


class Outbound(RelayEnd):
    """The proxy's side of an outgoing connection."""

    def connectionMade(self) -> None:
        d, self.factory.deferred = self.factory.deferred, None
        if d is not None:
            d.callback(self)


class _ConnectFactory(ClientFactory):
    noisy = False
    protocol = Outbound

    def __init__(self) -> None:
        self.deferred: defer.Deferred[Outbound] | None = None

    def clientConnectionFailed(self, connector, reason) -> None:
        d, self.deferred = self.deferred, None
        if d is not None:
            d.errback(reason)


def connect_tcp(reactor, host: str, port: int, timeout: float) -> defer.Deferred[Outbound]:
    """Connect to an IP literal; cancelling the Deferred abandons the attempt."""
    factory = _ConnectFactory()
    connector = None

    def cancel(d):
        factory.deferred = None
        if connector is not None:
            connector.disconnect()

    factory.deferred = defer.Deferred(cancel)
    d = factory.deferred
    connector = reactor.connectTCP(host, port, factory, timeout=timeout)
    return d
