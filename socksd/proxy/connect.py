"""Outgoing connections and name lookups for every request (CONNECT; BIND's
and UDP's names): resolve, connect with a timeout, and say why it failed in
words every SOCKS version can turn into its reply."""

from __future__ import annotations

import errno
import os
import socket
from weakref import WeakKeyDictionary

from twisted.internet import defer, error
from twisted.internet.interfaces import IResolutionReceiver, IWriteDescriptor
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from socksd.inflight import PER_CLIENT, TOTAL, InFlight
from socksd.relay import RelayEnd
from socksd.rules import parse_ip

# Why a CONNECT failed, independent of the SOCKS version that reports it.
DENIED = "denied"
NETWORK_UNREACHABLE = "network unreachable"
HOST_UNREACHABLE = "host unreachable"
REFUSED = "connection refused"
TIMEOUT = "timed out"
FAILED = "general failure"


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets, as logs and errors show it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(text: str) -> tuple[str, int]:
    """:func:`host_port` read back."""
    host, _, port = text.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def is_address(host: str) -> bool:
    """Is ``host`` an IP address (not a name)?"""
    try:
        parse_ip(host)
    except ValueError:
        return False
    return True


def address_text(addr) -> str:
    """A Twisted address as logs show it: ``host:port``, a UNIX socket's path."""
    host = getattr(addr, "host", None)
    if host is None:
        return str(getattr(addr, "name", None) or "unix")
    return host_port(host, addr.port)


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
    if isinstance(value, error.ConnectError):
        code = value.osError
        if code in _HOST_ERRNOS:
            return ConnectFailed(HOST_UNREACHABLE, detail)
        if code in _NETWORK_ERRNOS:
            return ConnectFailed(NETWORK_UNREACHABLE, detail)
    return ConnectFailed(FAILED, detail)


# Name lookups in flight. The default resolver runs getaddrinfo in the
# reactor's thread pool (10 threads) and a running or queued getaddrinfo
# cannot be cancelled: a lookup the session stopped waiting for (timed out,
# client gone) still holds a thread or a place in the pool's unbounded queue
# until it returns. So a lookup counts until it really ends, and a lookup
# over these bounds fails at once, as a failed lookup does.
THREAD_POOL_SIZE = 64        # twistd sizes the reactor's pool so (Twisted's default: 10)
MAX_LOOKUPS = 48             # in total: the rest is for other threaded work (not
                             # password hashing: socksd.auth.hashing has its own)
MAX_LOOKUPS_PER_CLIENT = 16  # per client address: no client takes them all


class TooManyLookups(ConnectFailed):
    """A lookup refused before it started; reported as a failed lookup."""

    def __init__(self, detail: str) -> None:
        super().__init__(HOST_UNREACHABLE, detail)


class Lookups(InFlight):
    """Counts the lookups in flight on one reactor, in total and per client."""

    def __init__(self, limit: int = MAX_LOOKUPS,
                 per_client: int = MAX_LOOKUPS_PER_CLIENT) -> None:
        super().__init__(limit, per_client)

    def begin(self, client: str | None, name: str) -> None:
        """Count one more lookup for client, or raise TooManyLookups."""
        bound = self.full(client)
        if bound == PER_CLIENT:
            raise TooManyLookups(f"{name}: too many name lookups in flight for this client "
                                 f"({self.per_client})")
        if bound == TOTAL:
            raise TooManyLookups(f"{name}: too many name lookups in flight ({self.limit})")
        self.add(client)

    end = InFlight.remove     # the resolver really finished with it


_lookups: WeakKeyDictionary = WeakKeyDictionary()


def lookups(reactor) -> Lookups:
    """The lookup counts of ``reactor`` (whose thread pool the lookups share)."""
    counts = _lookups.get(reactor)
    if counts is None:
        counts = _lookups[reactor] = Lookups()
    return counts


@implementer(IResolutionReceiver)
class _Addresses:
    __slots__ = ("name", "hosts", "deferred", "done")

    def __init__(self, name: str, done) -> None:
        self.name = name
        self.hosts: list[str] = []
        self.deferred: defer.Deferred[list[str]] = defer.Deferred()
        self.done = done     # called once, when the resolver really finishes

    def resolutionBegan(self, resolution) -> None:
        pass

    def addressResolved(self, address) -> None:
        if address.host not in self.hosts:
            self.hosts.append(address.host)

    def resolutionComplete(self) -> None:
        done, self.done = self.done, None
        if done is not None:
            done()
        if self.deferred.called:
            return
        if self.hosts:
            self.deferred.callback(self.hosts)
        else:
            self.deferred.errback(error.DNSLookupError(f"{self.name}: name not found"))


def resolve(reactor, name: str, port: int, timeout: float,
            client: str | None = None) -> defer.Deferred[list[str]]:
    """All addresses (IPv4 and IPv6) of ``name``, via the reactor's resolver.

    The default resolver runs getaddrinfo in the reactor's thread pool, so the
    reactor never blocks on DNS; a lookup slower than ``timeout`` fails. The
    lookup counts against ``client``'s and the total bound until the resolver
    is really done with it, even after the timeout (see MAX_LOOKUPS).
    """
    counts = lookups(reactor)
    try:
        counts.begin(client, name)
    except TooManyLookups as e:
        return defer.fail(e)
    receiver = _Addresses(name, lambda: counts.end(client))
    try:
        reactor.nameResolver.resolveHostName(receiver, name, port)
    except Exception:
        if receiver.done is not None:
            receiver.done = None
            counts.end(client)
        return defer.fail()
    if timeout > 0:
        receiver.deferred.addTimeout(timeout, reactor,
                                     onTimeoutCancel=_resolution_timed_out(name, timeout))
    return receiver.deferred


def _resolution_timed_out(name: str, timeout: float):
    def convert(result, _timeout):
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            return Failure(error.DNSLookupError(f"{name}: no answer in {timeout:.3g} s"))
        return result
    return convert


class Outbound(RelayEnd):
    """The proxy's side of an outgoing connection."""

    def connectionMade(self) -> None:
        d, self.factory.deferred = self.factory.deferred, None
        if d is not None:
            d.callback(self)


class _ConnectFactory(ClientFactory):
    """Builds the Outbound of one connection attempt and fires its Deferred."""

    noisy = False
    protocol = Outbound

    def __init__(self, deferred: defer.Deferred[Outbound]) -> None:
        self.deferred: defer.Deferred[Outbound] | None = deferred

    def clientConnectionFailed(self, connector, reason) -> None:
        d, self.deferred = self.deferred, None
        if d is not None:
            d.errback(reason)


def connect_tcp(reactor, host: str, port: int, timeout: float) -> defer.Deferred[Outbound]:
    """Connect to an IP literal; cancelling the Deferred abandons the attempt.

    On a reactor that watches real file descriptors (every POSIX one) the
    socket is connected by :class:`_Connecting` and then adopted; any other
    reactor (and the tests' memory reactor) gets ``connectTCP``.
    """
    if isinstance(reactor, PosixReactorBase):
        return _Connecting(reactor, host, port, timeout).deferred
    connector = None

    def cancel(d):
        factory.deferred = None
        if connector is not None:
            connector.disconnect()

    d: defer.Deferred[Outbound] = defer.Deferred(cancel)
    factory = _ConnectFactory(d)
    connector = reactor.connectTCP(host, port, factory, timeout=timeout)
    return d


# connect(2)'s errors, as Twisted's connectTCP would report them (classify()).
def connect_first(hosts: list[str], reactor, port: int, deadline: float,
                  last: Failure | None = None) -> defer.Deferred[Outbound]:
    """Try the addresses in resolver order until one connects by ``deadline``
    (reactor.seconds()); fails as the last one did (``last``: the failure
    of the address before these)."""
    remaining = deadline - reactor.seconds()
    if not hosts or remaining <= 0:
        return defer.fail(last if last is not None else
                          ConnectFailed(TIMEOUT, "no time left to connect"))
    d = connect_tcp(reactor, hosts[0], port, remaining)
    return d.addErrback(_next_address, hosts[1:], reactor, port, deadline)


def _next_address(failure: Failure, hosts: list[str], reactor, port: int,
                  deadline: float) -> defer.Deferred[Outbound]:
    if failure.check(defer.CancelledError):
        return defer.fail(failure)
    return connect_first(hosts, reactor, port, deadline, failure)


_ERRNO_REASONS = {errno.ECONNREFUSED: REFUSED, errno.ETIMEDOUT: TIMEOUT,
                  **{code: HOST_UNREACHABLE for code in _HOST_ERRNOS},
                  **{code: NETWORK_UNREACHABLE for code in _NETWORK_ERRNOS}}


@implementer(IWriteDescriptor)
class _Connecting:
    """One non-blocking connect(2), watched by the reactor until it completes.

    What ``reactor.connectTCP`` does, without what a SOCKS CONNECT does not
    use: its Connector (retries, factory start/stop), a reactor turn before
    connecting, and re-registering the socket three times once connected,
    work every CONNECT would pay for nothing. The connected socket becomes an
    ordinary Twisted TCP transport through the public
    ``adoptStreamConnection``.
    """

    __slots__ = ("reactor", "sock", "address", "deferred", "timer")

    def __init__(self, reactor, host: str, port: int, timeout: float) -> None:
        self.reactor = reactor
        self.deferred: defer.Deferred[Outbound] = defer.Deferred(self._cancel)
        self.timer = None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.address = (host, port)
        self.sock: socket.socket | None = None   # ours until connected or failed
        try:
            sock = self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:
            self._fail(e.errno, e.strerror)
            return
        code = sock.connect_ex(self.address)
        if code == 0:
            self._connected()
        elif code != errno.EINPROGRESS:
            self._fail(code)
        else:
            reactor.addWriter(self)
            if timeout > 0:
                self.timer = reactor.callLater(timeout, self._timed_out, timeout)

    def fileno(self) -> int:
        return -1 if self.sock is None else self.sock.fileno()

    def logPrefix(self) -> str:
        return "socksd.connect"

    def doWrite(self) -> None:
        self._stop()
        assert self.sock is not None   # the reactor watches only while we have one
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._fail(code)
        else:
            self._connected()

    def connectionLost(self, reason: Failure) -> None:
        """The reactor saw the socket fail (epoll reports a refused connect as
        a hang-up, not as writable), or doWrite raised."""
        self._stop()
        code = None
        if self.sock is not None:
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or None
        self._fail(code, None if code else reason.getErrorMessage())

    def _stop(self) -> None:
        self.reactor.removeWriter(self)
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _connected(self) -> None:
        sock, self.sock = self.sock, None
        assert sock is not None
        factory = _ConnectFactory(self.deferred)
        try:
            # Twisted takes a duplicate of the descriptor; ours is closed.
            self.reactor.adoptStreamConnection(sock.fileno(), sock.family, factory)
        except OSError as e:  # the peer is already gone (getpeername: ENOTCONN)
            factory.deferred = None
            self._fail(e.errno, e.strerror)
        finally:
            sock.close()

    def _fail(self, code: int | None, message: str | None = None) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        reason = FAILED if code is None else _ERRNO_REASONS.get(code, FAILED)
        message = message or (os.strerror(code) if code else "connection failed")
        self.deferred.errback(ConnectFailed(reason, f"{host_port(*self.address)}: {message}"))

    def _timed_out(self, timeout: float) -> None:
        self.timer = None
        self._stop()
        self._fail(errno.ETIMEDOUT, f"no answer in {timeout:.3g} s")

    def _cancel(self, _d) -> None:
        if self.sock is not None:
            self._stop()
            self.sock.close()
            self.sock = None


