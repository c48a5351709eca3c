"""Test doubles shared by the in-memory protocol tests (test_session,
test_socks4_session, test_bind_udp_session, test_gssapi_session).

A plain module, imported by the tests (``from fakes import ...``): a resolver
answered by hand, a transport that records half-closes, the client side of a
session fed bytewise or whole, the far side of a CONNECT the memory reactor
was asked to make, the checked exchanges the protocol tests share (a refusal
and its log line, a SOCKS5 client past method selection, a relay, a timeout),
and a server factory on a memory reactor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from socksd.auth import SOCKSRealm
from socksd.auth.checkers import FirstOf
from socksd.auth.registry import method_registry
from socksd.proxy import Limits, SOCKSServerFactory
from socksd.rules import default_rules

PEER = IPv4Address("TCP", "127.0.0.1", 40000)
LISTEN = IPv4Address("TCP", "127.0.0.1", 1080)
BOUND = IPv4Address("TCP", "10.0.0.5", 51000)


def failure_reply(code: int) -> bytes:
    """A SOCKS5 failure reply with REP=code and an all-zero IPv4 BND address."""
    return bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))


def session_lines(events) -> list[str]:
    """The formatted one-line-per-session log lines among captured events."""
    return [formatEvent(e) for e in events
            if e.get("log_namespace") == "socksd" and "outcome" in e and "up" in e]


# The resolver.


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@implementer(IHostnameResolver)
class FakeResolver:
    """A resolver the test answers by hand: nothing resolves until it says so."""

    def __init__(self) -> None:
        self.queries: list[tuple[object, str, int]] = []

    def resolveHostName(self, resolutionReceiver, hostName, portNumber=0,
                        addressTypes=None, transportSemantics="TCP"):
        resolution = _Resolution(hostName)
        self.queries.append((resolutionReceiver, hostName, portNumber))
        resolutionReceiver.resolutionBegan(resolution)
        return resolution

    def answer(self, *hosts: str, index: int = -1) -> None:
        receiver, _name, port = self.queries[index]
        for host in hosts:
            cls = IPv6Address if ":" in host else IPv4Address
            receiver.addressResolved(cls("TCP", host, port))
        receiver.resolutionComplete()

    @property
    def names(self) -> list[str]:
        return [name for _r, name, _p in self.queries]


# Transports and the two ends of a session.


class FakeProcess:
    """A worker's process transport (IProcessTransport's signals only)."""

    pid = 4242

    def __init__(self) -> None:
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class HalfCloseTransport(StringTransport):
    """A StringTransport that records half-closes (TCP shutdown of writing)."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class Client:
    """One client connection to the server factory, fed bytewise or whole.

    ``transport_factory`` makes the session's transport (a subclass may use a
    plain StringTransport). A factory that refuses the connection leaves
    ``session`` None. As a socket does, the transport delivers to its
    ``protocol``: the session, until something (GSS-API protection) is
    slipped under it.
    """

    transport_factory = HalfCloseTransport

    def __init__(self, factory: SOCKSServerFactory, bytewise: bool = False, peer=PEER,
                 listen=LISTEN) -> None:
        self.session = factory.buildProtocol(peer)
        self.transport = self.transport_factory(hostAddress=listen, peerAddress=peer)
        self.bytewise = bytewise
        if self.session is not None:
            self.transport.protocol = self.session
            self.session.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        # Looked up per read: what delivers may change between two bytes.
        if self.bytewise:
            for i in range(len(data)):
                self.transport.protocol.dataReceived(data[i:i + 1])
        else:
            self.transport.protocol.dataReceived(data)

    def take(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    @property
    def closing(self) -> bool:
        return self.transport.disconnecting

    def lose(self) -> None:
        self.transport.protocol.connectionLost(Failure(error.ConnectionDone()))


class Outbound:
    """The far side of a CONNECT that the memory reactor was asked to make
    (``reactor.tcpClients[index]``), seen from ``bound`` once accepted."""

    transport_factory = HalfCloseTransport

    def __init__(self, reactor: MemoryReactorClock, index: int = -1, bound=BOUND) -> None:
        self.host, self.port, self.factory, self.timeout, self.bind = reactor.tcpClients[index]
        self.connector = reactor.connectors[index]
        self.bound = bound

    def accept(self) -> None:
        cls = IPv6Address if ":" in self.host else IPv4Address
        peer = cls("TCP", self.host, self.port)
        self.protocol = self.factory.buildProtocol(peer)
        self.transport = self.transport_factory(hostAddress=self.bound, peerAddress=peer)
        self.protocol.makeConnection(self.transport)

    def refuse(self, exc: Exception) -> None:
        self.factory.clientConnectionFailed(self.connector, Failure(exc))

    def take(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value


# The checked exchanges. pytest rewrites the asserts of test modules only, so
# these say themselves what they got.


def assert_refused(client: Client, reply: bytes) -> None:
    """The client got exactly ``reply``, and its connection is closing."""
    got = client.take()
    assert got == reply, f"the client got {got!r}, not {reply!r}"
    assert client.closing, "the client's connection stays open"


def refused_session_line(client: Client, messages: Sequence[bytes], reply: bytes,
                         after_send: Callable[[], object] | None = None) -> str:
    """Send ``messages`` in turn, then run ``after_send`` (the far end's part,
    such as a refused connection); expect exactly ``reply`` and the close. The
    connection then ends: returns the session's one log line."""
    with capturedLogs() as events:
        for message in messages:
            client.send(message)
        if after_send is not None:
            after_send()
        assert_refused(client, reply)
        client.lose()
    [line] = session_lines(events)
    return line


def socks5_client(factory: SOCKSServerFactory, request: bytes, bytewise: bool = False,
                  **options) -> Client:
    """A new client (options as for Client) that offers method "none", gets
    it (the reply is checked) and then sends ``request``."""
    client = Client(factory, bytewise, **options)
    client.send(b"\x05\x01\x00")
    got = client.take()
    assert got == b"\x05\x00", f"method selection {got!r}, not method none"
    client.send(request)
    return client


def relay_until_far_end_closes(client: Client, out: Outbound) -> None:
    """The relay carries b"hello" out (5 bytes up) and b"world!" back (6
    bytes down); when the destination closes, the client's connection closes."""
    client.send(b"hello")
    sent = out.transport.value()
    assert sent == b"hello", f"the destination got {sent!r}"
    out.protocol.dataReceived(b"world!")
    got = client.take()
    assert got == b"world!", f"the client got {got!r}"
    out.protocol.connectionLost(Failure(error.ConnectionDone()))
    assert client.closing, "the client's connection stays open after the destination closed"


def assert_closes_at(client: Client, reactor: MemoryReactorClock, timeout: float) -> None:
    """The client's connection is still open 0.1 s before ``timeout`` seconds
    from now and closing 0.1 s after."""
    reactor.advance(timeout - 0.1)
    assert not client.closing, f"closed before {timeout} s"
    reactor.advance(0.2)
    assert client.closing, f"still open after {timeout} s"


# The server.


def fake_reactor(cls=MemoryReactorClock):
    """A memory reactor (of class cls) whose names a FakeResolver answers."""
    reactor = cls()
    reactor.nameResolver = FakeResolver()
    return reactor


def make_factory(methods=None, rules=None, limits=Limits(), *, reactor=None, **options):
    """A SOCKSServerFactory and its reactor (by default fake_reactor()).

    methods defaults to the "none" method alone, rules to default_rules();
    options go to the factory as they are (socks4=...).
    """
    if reactor is None:
        reactor = fake_reactor()
    if methods is None:
        methods = [method_registry(None)["none"]]
    factory = SOCKSServerFactory(methods, rules if rules is not None else default_rules(),
                                 limits, reactor=reactor, **options)
    return factory, reactor


def alice_portal() -> Portal:
    """A portal that knows one user: alice, password secret."""
    return Portal(SOCKSRealm(), [FirstOf([InMemoryUsernamePasswordDatabaseDontUse(
        alice=b"secret")])])
