"""Outgoing connections and name lookups for every request (CONNECT; BIND's
and UDP's names): resolve, connect with a timeout, and say why it failed in
words every SOCKS version can turn into its reply."""

from __future__ import annotations

import errno
import os
import socket
from typing import Callable
from weakref import WeakKeyDictionary

from twisted.internet import defer, error
from twisted.internet.interfaces import IResolutionReceiver, IWriteDescriptor
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from socksd import stream
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
        # The factory is let go: an idle session need not hold it.
        factory, self.factory = self.factory, None
        d, factory.deferred = factory.deferred, None
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


def connect_tcp(reactor, host: str, port: int, timeout: float,
                source: str | None = None) -> defer.Deferred[Outbound]:
    """Connect to an IP literal, from the address ``source`` if given (else
    the kernel's choice); cancelling the Deferred abandons the attempt.

    On a reactor that watches real file descriptors (every POSIX one) the
    socket is connected by :class:`_Connecting` and then adopted; any other
    reactor (and the tests' memory reactor) gets ``connectTCP``.
    """
    if isinstance(reactor, PosixReactorBase):
        return _Connecting(reactor, host, port, timeout, source).deferred
    connector = None

    def cancel(d):
        factory.deferred = None
        if connector is not None:
            connector.disconnect()

    d: defer.Deferred[Outbound] = defer.Deferred(cancel)
    factory = _ConnectFactory(d)
    connector = reactor.connectTCP(host, port, factory, timeout=timeout,
                                   bindAddress=None if source is None else (source, 0))
    return d


# Where an outgoing connection leaves from, per address family
# (socket.AF_INET, AF_INET6): an address, or None for the kernel's choice;
# raises ConnectFailed when no configured address fits the family.
SourceChoice = Callable[[int], "str | None"]


def family_of(host: str) -> int:
    """The address family of an IP literal."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _connect_from(reactor, host: str, port: int, timeout: float,
                  source: SourceChoice | None) -> defer.Deferred[Outbound]:
    if source is None:
        return connect_tcp(reactor, host, port, timeout)
    try:
        address = source(family_of(host))
    except ConnectFailed as e:
        return defer.fail(e)
    return connect_tcp(reactor, host, port, timeout, address)


def connect_first(hosts: list[str], reactor, port: int, deadline: float,
                  source: SourceChoice | None = None) -> defer.Deferred[Outbound]:
    """The first of ``hosts`` to connect by ``deadline`` (reactor.seconds()),
    raced as RFC 8305 (Happy Eyeballs) says: see :class:`_Race`. ``source``
    says where each attempt leaves from (None: the kernel's choice)."""
    remaining = deadline - reactor.seconds()
    if remaining <= 0:
        return defer.fail(ConnectFailed(TIMEOUT, "no time left to connect"))
    if len(hosts) == 1:
        # An address CONNECT, or a name with one address: no race, no timer.
        if source is None:
            return connect_tcp(reactor, hosts[0], port, remaining)
        return _connect_from(reactor, hosts[0], port, remaining, source)
    return _Race(reactor, interleave(hosts), port, deadline, source).deferred


def interleave(hosts: list[str]) -> list[str]:
    """RFC 8305 section 4: the resolver's order, the families alternating,
    starting with the first address's."""
    first = ":" in hosts[0]
    same = [h for h in hosts if (":" in h) == first]
    other = [h for h in hosts if (":" in h) != first]
    if not other:
        return hosts
    mixed: list[str] = []
    for i in range(max(len(same), len(other))):
        mixed.extend(h[i] for h in (same, other) if i < len(h))
    return mixed


# RFC 8305 section 5's recommended Connection Attempt Delay.
ATTEMPT_DELAY = 0.25


class _Race:
    """RFC 8305 connection attempts over addresses already resolved (and
    checked by the rules, which is why Twisted's HostnameEndpoint, which
    resolves again, is not used). An attempt starts ATTEMPT_DELAY after the
    previous one started, or at once when the previous one fails; the first
    to connect wins and every other is cancelled; at the deadline those still
    trying are cancelled.

    The failure reported when all fail is the latest one that says most: a
    refusal or an unreachable network over a missing source address, and
    either over a timeout (a black-holed address says least)."""

    __slots__ = ("reactor", "hosts", "port", "deadline", "source", "deferred", "attempts",
                 "delay", "expiry", "failure", "rank", "over")

    def __init__(self, reactor, hosts: list[str], port: int, deadline: float,
                 source: SourceChoice | None) -> None:
        self.reactor = reactor
        self.hosts = hosts[::-1]     # popped from the end: the next is last
        self.port = port
        self.deadline = deadline
        self.source = source
        self.deferred: defer.Deferred[Outbound] = defer.Deferred(self._cancel)
        self.attempts: list[defer.Deferred[Outbound]] = []
        self.failure: Failure | None = None
        self.rank = -1
        self.over = False
        self.delay = None            # the wait before the next attempt starts
        total = deadline - reactor.seconds()
        self.expiry = reactor.callLater(total, self._expired, total)
        self._start()

    def _start(self) -> None:
        """Start the next attempt, and the delay before the one after."""
        self._cancel_delay()
        host = self.hosts.pop()
        d = _connect_from(self.reactor, host, self.port, self.deadline - self.reactor.seconds(),
                          self.source)
        self.attempts.append(d)
        d.addCallbacks(self._won, self._lost, errbackArgs=(d,))
        # (An attempt that failed at once, such as one with no source address
        # of its family, has started the next already.)
        if self.hosts and not self.over and self.delay is None:
            self.delay = self.reactor.callLater(ATTEMPT_DELAY, self._delayed)

    def _delayed(self) -> None:
        self.delay = None
        if self.reactor.seconds() < self.deadline:   # else the expiry, due now, ends it
            self._start()

    def _won(self, outbound: Outbound) -> None:
        if self.over:
            # Cancelling the others as one wins closes them; kept so that a
            # connection is never left open whatever the order.
            outbound.transport.abortConnection()
            return
        self._stop()
        self.deferred.callback(outbound)

    def _lost(self, failure: Failure, d: defer.Deferred) -> None:
        if self.over:
            return   # cancelled by the race's end
        self.attempts.remove(d)
        failed = classify(failure)
        rank = 0 if failed.reason == TIMEOUT else 1 if isinstance(failed, NoSource) else 2
        if rank >= self.rank:
            self.failure, self.rank = Failure(failed), rank
        if self.hosts and self.reactor.seconds() < self.deadline:
            # The next at once, but on the reactor's next turn: attempts
            # that fail at once (no route, no source of the family) would
            # otherwise nest a call deeper per address, and a name may have
            # hundreds.
            self._cancel_delay()
            self.delay = self.reactor.callLater(0, self._delayed)
        elif not self.attempts:
            self._stop()
            self.deferred.errback(self.failure)

    def _expired(self, total: float) -> None:
        self.expiry = None
        self._stop()
        if self.rank < 1:
            self.failure = Failure(ConnectFailed(TIMEOUT, f"no connection in {total:.3g} s"))
        self.deferred.errback(self.failure)

    def _cancel_delay(self) -> None:
        delay, self.delay = self.delay, None
        if delay is not None and delay.active():
            delay.cancel()

    def _stop(self) -> None:
        """The race is over: no more attempts, no timers, those in flight cancelled."""
        self.over = True
        self.hosts.clear()
        self._cancel_delay()
        expiry, self.expiry = self.expiry, None
        if expiry is not None and expiry.active():
            expiry.cancel()
        attempts, self.attempts = self.attempts, []
        for d in attempts:
            d.cancel()

    def _cancel(self, _d) -> None:
        self._stop()


class NoSource(ConnectFailed):
    """No configured source address has the destination's family."""

    def __init__(self, detail: str) -> None:
        super().__init__(HOST_UNREACHABLE, detail)


# Linux's IP_BIND_ADDRESS_NO_PORT (include/uapi/linux/in.h), which Python's
# socket module names only from 3.12 on.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

_ERRNO_REASONS = {errno.ECONNREFUSED: REFUSED, errno.ETIMEDOUT: TIMEOUT,
                  **{code: HOST_UNREACHABLE for code in _HOST_ERRNOS},
                  **{code: NETWORK_UNREACHABLE for code in _NETWORK_ERRNOS}}


@implementer(IWriteDescriptor)
class _Connecting:
    """One non-blocking connect(2), watched by the reactor until it completes.

    What ``reactor.connectTCP`` does, without what a SOCKS CONNECT does not
    use: its Connector (retries, factory start/stop), a reactor turn before
    connecting, and re-registering the socket three times once connected,
    work every CONNECT would pay for nothing. The connected socket becomes a
    :class:`socksd.stream.Stream`, a Twisted TCP transport.
    """

    __slots__ = ("reactor", "sock", "address", "deferred", "timer")

    def __init__(self, reactor, host: str, port: int, timeout: float,
                 source: str | None = None) -> None:
        self.reactor = reactor
        self.deferred: defer.Deferred[Outbound] = defer.Deferred(self._cancel)
        self.timer = None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.address = (host, port)
        self.sock: socket.socket | None = None   # ours until connected or failed
        try:
            sock = self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            if source is not None:
                # Without this, bind() picks the port before connect() knows
                # the destination, so each source address could hold only
                # one ephemeral range of connections in all, not one per
                # destination as the kernel's own choice does.
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((source, 0))
        except OSError as e:
            self._fail(e.errno, f"{e.strerror} (source address {source})" if source
                       else e.strerror)
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
        # The socket itself becomes the transport (no duplicate, no asking
        # it for the peer's address, which is the one we connected to).
        outbound = _ConnectFactory(self.deferred).buildProtocol(None)
        assert outbound is not None   # Factory.buildProtocol always builds
        stream.connected(sock, self.address, outbound, self.reactor)

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


