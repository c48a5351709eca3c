"""Protocol tests of BIND (SOCKS4 and SOCKS5) and UDP ASSOCIATE (SOCKS5) over
in-memory transports.

The memory reactor records the BIND listener (``listenTCP``) and the UDP
relay socket (``listenUDP``); the tests play the peer that connects to the
listener (by driving the recorded factory) and the datagrams that reach the
relay (by calling the recorded protocol's ``datagramReceived``). Requests
are fed one byte at a time and whole; replies are compared byte for byte.
"""

from __future__ import annotations

import contextlib
import errno
import socket

import pytest
from twisted.internet import defer, error, udp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

import fakes
from fakes import (
    LISTEN,
    Client,
    HalfCloseTransport,
    assert_refused,
    failure_reply,
    fake_reactor,
    refused_session_line,
    session_lines,
    socks5_client,
)
from socksd.proxy import Limits
from socksd.rules import RuleSet, compile_rule
from socksd.wire import socks5

GREETING = b"\x05\x01\x00"
# SOCKS5 BIND, expecting a connection from 127.0.0.1 (port 21: the FTP
# control connection's port, which BIND does not check).
BIND5 = b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x15"
# SOCKS4 BIND, the same, USERID "fred".
BIND4 = b"\x04\x02\x00\x15\x7f\x00\x00\x01fred\x00"
# UDP ASSOCIATE, the client's sending address unknown (0.0.0.0:0).
UDP_ANY = b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00"

REJECTED4 = b"\x00\x5b\x00\x00\x00\x00\x00\x00"
FIRST_PORT = 50000    # the fake reactor's first "free" port


def reply5(host: str, port: int) -> bytes:
    """A SOCKS5 success reply naming host:port."""
    if ":" in host:
        return b"\x05\x00\x00\x04" + socket.inet_pton(socket.AF_INET6, host) + \
            port.to_bytes(2, "big")
    return b"\x05\x00\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big")


def reply4(host: str, port: int) -> bytes:
    return b"\x00\x5a" + port.to_bytes(2, "big") + socket.inet_aton(host)


# The memory reactor, with listeners that remember being stopped, ports
# actually allocated, and listenUDP (which MemoryReactor lacks).


class FakeTCPPort:
    def __init__(self, address) -> None:
        self.address = address
        self.stopped = False

    def getHost(self):
        return self.address

    def stopListening(self):
        self.stopped = True
        return defer.succeed(None)


class FakeUDPPort:
    """The relay's transport: records what it writes and whether it was closed."""

    def __init__(self, protocol, address) -> None:
        self.protocol = protocol
        self.address = address
        self.written: list[tuple[bytes, tuple[str, int]]] = []
        self.stopped = False

    def write(self, data: bytes, addr) -> None:
        assert not self.stopped, "write on a closed UDP port"
        self.written.append((data, addr))

    def getHost(self):
        return self.address

    def stopListening(self):
        if not self.stopped:
            self.stopped = True
            self.protocol.doStop()
        return defer.succeed(None)

    def take(self) -> list[tuple[bytes, tuple[str, int]]]:
        written, self.written = self.written, []
        return written


class Reactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[FakeTCPPort] = []
        self.udpPorts: list[tuple[int, object, str, int]] = []
        self.udp_listeners: list[FakeUDPPort] = []
        self.busy: set[int] | None = set()    # None: every port is busy
        self.tried: list[int] = []
        self._next = FIRST_PORT
        self.real_udp = False

    def _allocate(self, port: int, interface: str) -> int:
        self.tried.append(port)
        if self.busy is None or port in self.busy:
            raise error.CannotListenError(interface, port,
                                          OSError(errno.EADDRINUSE, "in use"))
        if port == 0:
            port, self._next = self._next, self._next + 1
        return port

    def listenTCP(self, port, factory, backlog=50, interface=""):
        actual = self._allocate(port, interface)
        self.tcpServers.append((port, factory, backlog, interface))
        cls = IPv6Address if ":" in interface else IPv4Address
        listener = FakeTCPPort(cls("TCP", interface or "0.0.0.0", actual))
        self.listeners.append(listener)
        return listener

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        actual = self._allocate(port, interface)
        self.udpPorts.append((port, protocol, interface, maxPacketSize))
        if self.real_udp:
            real = udp.Port(0, protocol, interface, maxPacketSize, reactor=self)
            real.startListening()
            self.udp_listeners.append(real)
            return real
        cls = IPv6Address if ":" in interface else IPv4Address
        transport = FakeUDPPort(protocol, cls("UDP", interface or "0.0.0.0", actual))
        self.udp_listeners.append(transport)
        protocol.makeConnection(transport)
        return transport


class Incoming:
    """A connection arriving at the BIND listener the reactor recorded."""

    def __init__(self, reactor: Reactor, host: str, port: int, index: int = -1) -> None:
        _requested, self.factory, self.backlog, self.interface = reactor.tcpServers[index]
        self.listener = reactor.listeners[index]
        cls = IPv6Address if ":" in host else IPv4Address
        self.address = cls("TCP", host, port)
        self.protocol = self.factory.buildProtocol(self.address)
        self.transport: HalfCloseTransport | None = None

    @property
    def refused(self) -> bool:
        return self.protocol is None

    def connect(self) -> Incoming:
        assert self.protocol is not None, "the listener refused the connection"
        self.transport = HalfCloseTransport(hostAddress=self.listener.getHost(),
                                            peerAddress=self.address)
        self.protocol.makeConnection(self.transport)
        return self


def make_factory(rules=None, limits=Limits()):
    return fakes.make_factory(rules=rules, limits=limits, reactor=fake_reactor(Reactor))


def texts(events) -> list[str]:
    return [formatEvent(e) or "" for e in events]


def route_source(ip: str, fallback: str) -> str:
    """What the kernel says our address towards ip is (as `ip route get`)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((ip, 9))
            return probe.getsockname()[0]
    except OSError:
        return fallback


def bind5(factory, bytewise: bool, request: bytes = BIND5, **kwargs) -> Client:
    return socks5_client(factory, request, bytewise, **kwargs)


# SOCKS5 BIND.


def test_bind5_replies_and_relay(bytewise):
    factory, reactor = make_factory()
    with capturedLogs() as events:
        client = bind5(factory, bytewise)
        # Listening on our address towards the expected peer, one connection
        # at a time, on a port the reactor chose.
        [(requested, waiter, backlog, interface)] = reactor.tcpServers
        assert (requested, backlog, interface) == (0, 1, "127.0.0.1")
        assert client.take() == reply5("127.0.0.1", FIRST_PORT)
        assert not client.closing
        assert reactor.getDelayedCalls(), "no BIND timeout is running"

        # The FTP server's data connection, from port 20.
        incoming = Incoming(reactor, "127.0.0.1", 20).connect()
        assert client.take() == reply5("127.0.0.1", 20)
        assert reactor.listeners[0].stopped, "the listener stays open after the accept"
        assert not reactor.getDelayedCalls(), "the BIND timeout still runs after the accept"

        client.send(b"RETR")
        assert incoming.transport.value() == b"RETR"
        incoming.protocol.dataReceived(b"file contents")
        assert client.take() == b"file contents"
        # EOF is passed on, both ways.
        incoming.protocol.readConnectionLost()
        assert client.transport.write_closed and not client.closing
        client.session.readConnectionLost()
        assert client.closing and incoming.transport.disconnecting
        incoming.protocol.connectionLost(Failure(error.ConnectionDone()))
        client.lose()
    [line] = session_lines(events)
    assert "127.0.0.1:40000 socks5" in line
    assert "bind 127.0.0.1:21" in line
    assert "up=4" in line and "down=13" in line
    assert line.endswith(" ok")
    assert factory.sessions == 0


def test_bind5_pipelined_with_greeting():
    factory, reactor = make_factory()
    client = Client(factory, False)
    client.send(GREETING + BIND5)
    assert client.take() == b"\x05\x00" + reply5("127.0.0.1", FIRST_PORT)
    Incoming(reactor, "127.0.0.1", 20).connect()
    assert client.take() == reply5("127.0.0.1", 20)


def test_bind5_early_data_is_relayed_after_second_reply(bytewise):
    factory, reactor = make_factory()
    client = bind5(factory, bytewise)
    client.take()
    client.send(b"early")
    assert client.take() == b""
    incoming = Incoming(reactor, "127.0.0.1", 20).connect()
    assert client.take() == reply5("127.0.0.1", 20)
    assert incoming.transport.value() == b"early"


def test_bind5_ipv6_peer_listens_on_ipv6(bytewise):
    factory, reactor = make_factory()
    client = bind5(factory, bytewise, b"\x05\x02\x00\x04" + bytes(15) + b"\x01\x00\x15")
    [(_port, _f, _b, interface)] = reactor.tcpServers
    assert interface == "::1"
    assert client.take() == reply5("::1", FIRST_PORT)
    Incoming(reactor, "::1", 2020).connect()
    assert client.take() == reply5("::1", 2020)


def test_bind5_listens_on_the_address_towards_the_peer(bytewise):
    """Not the address the client reached us on: the one on the route to
    DST.ADDR, which is where the peer can reach us."""
    factory, reactor = make_factory()
    client = bind5(factory, bytewise, b"\x05\x02\x00\x01\xc0\x00\x02\x01\x00\x15")
    expected = route_source("192.0.2.1", LISTEN.host)
    [(_port, _f, _b, interface)] = reactor.tcpServers
    assert interface == expected
    assert client.take() == reply5(expected, FIRST_PORT)
    Incoming(reactor, "192.0.2.1", 20).connect()
    assert client.take() == reply5("192.0.2.1", 20)


def test_bind5_unspecified_peer_accepts_anyone(bytewise):
    """DST.ADDR 0.0.0.0: no expected peer; the listener is on the address
    the client reached us on."""
    factory, reactor = make_factory()
    client = bind5(factory, bytewise, b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00")
    assert reactor.tcpServers[0][3] == "127.0.0.1"
    assert client.take() == reply5("127.0.0.1", FIRST_PORT)
    Incoming(reactor, "127.0.0.9", 3333).connect()
    assert client.take() == reply5("127.0.0.9", 3333)


def test_bind5_by_name(bytewise):
    factory, reactor = make_factory()
    client = bind5(factory, bytewise, b"\x05\x02\x00\x03\x09localhost\x00\x15")
    assert reactor.nameResolver.names == ["localhost"]
    assert reactor.tcpServers == [] and client.take() == b""
    reactor.nameResolver.answer("127.0.0.1")
    assert client.take() == reply5("127.0.0.1", FIRST_PORT)
    Incoming(reactor, "127.0.0.1", 20).connect()
    assert client.take() == reply5("127.0.0.1", 20)


def test_bind5_port_range(bytewise):
    factory, reactor = make_factory(limits=Limits(bind_ports=((40000, 40009),)))
    reactor.busy = set(range(40000, 40005))    # 40005-40009 are free
    client = bind5(factory, bytewise)
    assert reactor.tried and all(40000 <= p <= 40009 for p in reactor.tried)
    [(port, _f, _b, _i)] = reactor.tcpServers
    assert 40005 <= port <= 40009
    assert client.take() == reply5("127.0.0.1", port)


def test_bind5_no_free_port_is_general_failure(bytewise):
    factory, reactor = make_factory(limits=Limits(bind_ports=((40000, 40009),)))
    reactor.busy = None
    with capturedLogs() as events:
        client = bind5(factory, bytewise)
        assert_refused(client, failure_reply(0x01))
        client.lose()
    assert reactor.tried and reactor.tcpServers == []
    assert not reactor.getDelayedCalls()
    [line] = session_lines(events)
    assert "bind failed" in line and "bind_ports" in line


def test_bind5_denied_by_rules(bytewise):
    rules = RuleSet([compile_rule("no-bind", "deny", commands=["bind"]),
                     compile_rule("rest", "allow")])
    factory, reactor = make_factory(rules=rules)
    with capturedLogs() as events:
        client = bind5(factory, bytewise)
        assert_refused(client, failure_reply(0x02))
        client.lose()
    assert reactor.tcpServers == []
    [line] = session_lines(events)
    assert "denied" in line and "no-bind" in line and "bind 127.0.0.1:21" in line


def test_bind5_connect_only_rule_denies_bind(bytewise):
    rules = RuleSet([compile_rule("connect-only", "allow", commands=["connect"])])
    factory, reactor = make_factory(rules=rules)
    client = bind5(factory, bytewise)
    assert_refused(client, failure_reply(0x02))
    assert reactor.tcpServers == []


def test_bind5_by_name_denied_before_resolution(bytewise):
    rules = RuleSet([compile_rule("no-example", "deny", destinations=[".example.com"],
                                  commands=["bind"]),
                     compile_rule("rest", "allow")])
    factory, reactor = make_factory(rules=rules)
    client = bind5(factory, bytewise, b"\x05\x02\x00\x03\x0bexample.com\x00\x15")
    assert client.take() == failure_reply(0x02)
    assert reactor.nameResolver.queries == [] and reactor.tcpServers == []


def test_bind5_timeout(bytewise):
    factory, reactor = make_factory(limits=Limits(bind_timeout=10))
    with capturedLogs() as events:
        client = bind5(factory, bytewise)
        assert client.take() == reply5("127.0.0.1", FIRST_PORT)
        reactor.advance(9.9)
        assert client.take() == b"" and not client.closing
        assert not reactor.listeners[0].stopped
        reactor.advance(0.2)
        assert_refused(client, failure_reply(0x06))
        assert reactor.listeners[0].stopped, "the listener outlives the BIND timeout"
        client.lose()
    assert not reactor.getDelayedCalls()
    [line] = session_lines(events)
    assert "bind failed" in line and "10 s" in line


def test_bind5_handshake_timeout_does_not_cut_the_wait():
    """While waiting for the incoming connection only bind_timeout applies."""
    factory, reactor = make_factory(limits=Limits(handshake_timeout=5, bind_timeout=20))
    client = bind5(factory, False)
    client.take()
    reactor.advance(19)
    assert not client.closing and client.take() == b""
    Incoming(reactor, "127.0.0.1", 20).connect()
    assert client.take() == reply5("127.0.0.1", 20)


def test_bind5_wrong_peer_refused_right_peer_accepted(bytewise):
    factory, reactor = make_factory()
    with capturedLogs() as events:
        client = bind5(factory, bytewise)
        client.take()
        stranger = Incoming(reactor, "127.0.0.2", 20)
        assert stranger.refused
        assert client.take() == b"" and not client.closing
        assert not reactor.listeners[0].stopped, "a stranger closed the listener"
        Incoming(reactor, "127.0.0.1", 20).connect()
        assert client.take() == reply5("127.0.0.1", 20)
    assert any("127.0.0.2" in t and "not the expected peer" in t for t in texts(events))


def test_strangers_knocking_on_the_bind_port_are_a_line_then_a_count():
    """Each stranger's connection was a line of its own: anyone could fill
    the log by knocking on a waiting BIND port."""
    factory, reactor = make_factory()
    with capturedLogs() as events:
        client = bind5(factory, False)
        client.take()
        for port in range(1000, 1100):
            assert Incoming(reactor, "127.0.0.2", port).refused
        reactor.advance(1.0)
        assert Incoming(reactor, "127.0.0.3", 20).refused
        assert Incoming(reactor, "127.0.0.3", 21).refused
        # The BIND is accepted: the count is logged now, no timer stays behind.
        Incoming(reactor, "127.0.0.1", 20).connect()
        assert client.take() == reply5("127.0.0.1", 20)
    knocks = [t for t in texts(events) if " bind: " in t]
    peer = client.session.peer
    assert knocks == [
        f"{peer} bind: refused incoming connection from 127.0.0.2: not the expected peer",
        f"{peer} bind: refused 99 more incoming connections in the last second",
        f"{peer} bind: refused incoming connection from 127.0.0.3: not the expected peer",
        f"{peer} bind: refused 1 more incoming connections in the last second"]
    assert not [call for call in reactor.getDelayedCalls() if "_counted" in repr(call.func)]


def test_knocks_before_the_client_leaves_are_counted_and_no_timer_is_left():
    factory, reactor = make_factory()
    with capturedLogs() as events:
        client = Client(factory, False)
        client.send(BIND4)
        client.take()
        for port in range(1000, 1010):
            assert Incoming(reactor, "10.0.0.1", port).refused
        client.lose()
    assert any("refused 9 more incoming connections" in t for t in texts(events))
    assert not reactor.getDelayedCalls()


def test_bind5_only_one_connection_is_accepted():
    factory, reactor = make_factory()
    client = bind5(factory, False)
    client.take()
    Incoming(reactor, "127.0.0.1", 20).connect()
    client.take()
    # One more that was already queued on the socket when it was accepted.
    assert Incoming(reactor, "127.0.0.1", 21).refused


@pytest.mark.parametrize("bindreply_rule, refused, accepted", [
    # A rule that allows without naming "bindreply" (the loopback one) does
    # not relax the check: only the bindreply rule lets 127.0.0.2 in.
    pytest.param(compile_rule("helpers", "allow", commands=["bindreply"],
                              destinations=["127.0.0.2"]),
                 ("127.0.0.3", 20), ("127.0.0.2", 4444), id="allows-another-peer"),
    pytest.param(compile_rule("no-low-ports", "deny", commands=["bindreply"],
                              ports=["1-1023"]),
                 ("127.0.0.1", 20), ("127.0.0.1", 2020), id="can-refuse-the-expected-peer"),
])
def test_bindreply_rule(bytewise, bindreply_rule, refused, accepted):
    rules = RuleSet([bindreply_rule,
                     compile_rule("loopback", "allow", sources=["127.0.0.0/8"])])
    factory, reactor = make_factory(rules=rules)
    client = bind5(factory, bytewise)
    client.take()
    assert Incoming(reactor, *refused).refused
    Incoming(reactor, *accepted).connect()
    assert client.take() == reply5(*accepted)


def allowed_lines(events) -> list[str]:
    return [formatEvent(e) for e in events if "allowed by" in (formatEvent(e) or "")]


def test_bindreply_rule_with_log_logs_the_peer_it_lets_in(bytewise):
    rules = RuleSet([compile_rule("helpers", "allow", commands=["bindreply"],
                                  destinations=["127.0.0.2"], log=True),
                     compile_rule("loopback", "allow", sources=["127.0.0.0/8"])])
    factory, reactor = make_factory(rules=rules)
    with capturedLogs() as events:
        client = bind5(factory, bytewise)
        client.take()
        Incoming(reactor, "127.0.0.2", 4444).connect()
    assert allowed_lines(events) == [
        "127.0.0.1:40000 - bindreply 127.0.0.2:4444 allowed by helpers (allow)"]


def test_bind5_client_leaves_while_waiting_closes_listener():
    factory, reactor = make_factory(limits=Limits(bind_timeout=10))
    with capturedLogs() as events:
        client = bind5(factory, False)
        client.take()
        client.lose()
        assert reactor.listeners[0].stopped, "the BIND listener stays open after the client left"
        assert not reactor.getDelayedCalls(), "the BIND timer still runs after the client left"
        reactor.advance(10)
        assert client.take() == b""
    assert factory.sessions == 0
    [line] = session_lines(events)
    assert "bind 127.0.0.1:21" in line and "client closed" in line


def test_bind5_by_name_client_leaves_while_waiting_closes_listener():
    factory, reactor = make_factory(limits=Limits(bind_timeout=10))
    client = bind5(factory, False, b"\x05\x02\x00\x03\x09localhost\x00\x15")
    reactor.nameResolver.answer("127.0.0.1")
    client.take()
    client.lose()
    assert reactor.listeners[0].stopped
    assert not reactor.getDelayedCalls()


def test_bind5_client_leaves_while_resolving():
    factory, reactor = make_factory()
    client = bind5(factory, False, b"\x05\x02\x00\x03\x09localhost\x00\x15")
    client.lose()
    reactor.nameResolver.answer("127.0.0.1")
    assert reactor.tcpServers == [] or reactor.listeners[0].stopped
    assert client.take() == b""


def test_bind5_client_leaves_after_accept_closes_incoming():
    factory, reactor = make_factory()
    client = bind5(factory, False)
    client.take()
    incoming = Incoming(reactor, "127.0.0.1", 20).connect()
    client.take()
    client.lose()
    assert incoming.transport.disconnecting


def test_bind5_peer_leaves_after_accept_closes_client():
    factory, reactor = make_factory()
    with capturedLogs() as events:
        client = bind5(factory, False)
        client.take()
        incoming = Incoming(reactor, "127.0.0.1", 20).connect()
        incoming.protocol.dataReceived(b"x" * 7)
        incoming.protocol.connectionLost(Failure(error.ConnectionDone()))
        assert client.closing
        client.lose()
    [line] = session_lines(events)
    assert "down=7" in line and line.endswith(" ok")


# SOCKS4 BIND.


def test_bind4_replies_and_relay(bytewise):
    factory, reactor = make_factory()
    client = Client(factory, bytewise)
    with capturedLogs() as events:
        client.send(BIND4)
        [(requested, _f, backlog, interface)] = reactor.tcpServers
        assert (requested, backlog, interface) == (0, 1, "127.0.0.1")
        assert client.take() == reply4("127.0.0.1", FIRST_PORT)
        incoming = Incoming(reactor, "127.0.0.1", 20).connect()
        assert client.take() == reply4("127.0.0.1", 20)
        assert reactor.listeners[0].stopped
        client.send(b"up")
        assert incoming.transport.value() == b"up"
        incoming.protocol.dataReceived(b"down!")
        assert client.take() == b"down!"
        incoming.protocol.connectionLost(Failure(error.ConnectionDone()))
        client.lose()
    [line] = session_lines(events)
    assert "socks4 user=fred" in line and "bind 127.0.0.1:21" in line
    assert "up=2" in line and "down=5" in line and line.endswith(" ok")


def test_bind4_exact_bytes_other_port():
    factory, reactor = make_factory()
    client = Client(factory, False)
    client.send(BIND4)
    assert client.take() == b"\x00\x5a\xc3\x50\x7f\x00\x00\x01"
    Incoming(reactor, "127.0.0.1", 0x1234).connect()
    assert client.take() == b"\x00\x5a\x12\x34\x7f\x00\x00\x01"


def test_bind4a_by_name(bytewise):
    factory, reactor = make_factory()
    client = Client(factory, bytewise)
    client.send(b"\x04\x02\x00\x15\x00\x00\x00\x01fred\x00localhost\x00")
    assert reactor.nameResolver.names == ["localhost"]
    reactor.nameResolver.answer("127.0.0.1")
    assert client.take() == reply4("127.0.0.1", FIRST_PORT)
    Incoming(reactor, "127.0.0.1", 20).connect()
    assert client.take() == reply4("127.0.0.1", 20)


def test_bind4a_name_with_ipv6_first_still_gets_a_usable_reply():
    """SOCKS4 replies carry only an IPv4 address: a name that resolves to
    ::1 and 127.0.0.1 (localhost on Debian) must not leave the client with
    90 and 0.0.0.0:0, a listener it cannot be told about."""
    factory, reactor = make_factory()
    client = Client(factory, False)
    client.send(b"\x04\x02\x00\x15\x00\x00\x00\x01fred\x00localhost\x00")
    reactor.nameResolver.answer("::1", "127.0.0.1")
    reply = client.take()
    if reply != REJECTED4:
        assert reply[:2] == b"\x00\x5a"
        assert reply[2:4] != b"\x00\x00" and reply[4:] != bytes(4), (
            f"SOCKS4 BIND granted with no usable address: {reply.hex()} "
            f"(listening on {reactor.tcpServers[-1][3]})")


def test_bind4_denied_is_91(bytewise):
    rules = RuleSet([compile_rule("no-bind", "deny", commands=["bind"]),
                     compile_rule("rest", "allow")])
    factory, reactor = make_factory(rules=rules)
    client = Client(factory, bytewise)
    client.send(BIND4)
    assert_refused(client, REJECTED4)
    assert reactor.tcpServers == []


def test_bind4_timeout_is_91():
    factory, reactor = make_factory(limits=Limits(bind_timeout=3))
    client = Client(factory, False)
    client.send(BIND4)
    assert client.take() == reply4("127.0.0.1", FIRST_PORT)
    reactor.advance(3)
    assert_refused(client, REJECTED4)
    assert reactor.listeners[0].stopped


def test_bind4_wrong_peer_refused():
    factory, reactor = make_factory()
    client = Client(factory, False)
    client.send(BIND4)
    client.take()
    assert Incoming(reactor, "10.0.0.1", 20).refused
    assert client.take() == b""
    Incoming(reactor, "127.0.0.1", 20).connect()
    assert client.take() == reply4("127.0.0.1", 20)


def test_bind4_client_leaves_while_waiting_closes_listener():
    factory, reactor = make_factory()
    client = Client(factory, False)
    client.send(BIND4)
    client.take()
    client.lose()
    assert reactor.listeners[0].stopped
    assert not reactor.getDelayedCalls()


# UDP ASSOCIATE: the request and the association's life.


def associate(factory, bytewise: bool = False, request: bytes = UDP_ANY, **kwargs):
    """A client with an association; returns (client, relay, its port)."""
    client = socks5_client(factory, request, bytewise, **kwargs)
    reactor = factory.reactor
    [(_port, relay, _interface, _size)] = reactor.udpPorts
    return client, relay, reactor.udp_listeners[0]


def test_udp_associate_reply(bytewise):
    factory, reactor = make_factory()
    client, relay, port = associate(factory, bytewise)
    [(requested, protocol, interface, size)] = reactor.udpPorts
    assert (requested, interface) == (0, "127.0.0.1")
    # The largest header (a 255-byte name) is 262 bytes; one more byte shows
    # a datagram recvfrom() cut to fit, which must be dropped, not relayed.
    assert size >= Limits().max_datagram + 263
    assert client.take() == reply5("127.0.0.1", FIRST_PORT)
    assert not client.closing
    assert port.protocol is relay


def test_udp_associate_pipelined_with_greeting():
    factory, reactor = make_factory()
    client = Client(factory, False)
    client.send(GREETING + UDP_ANY)
    assert client.take() == b"\x05\x00" + reply5("127.0.0.1", FIRST_PORT)


def test_udp_associate_over_ipv6(bytewise):
    peer = IPv6Address("TCP", "::1", 40000)
    factory, reactor = make_factory()
    client, relay, port = associate(factory, bytewise, peer=peer,
                                    listen=IPv6Address("TCP", "::1", 1080))
    assert reactor.udpPorts[0][2] == "::1"
    assert client.take() == reply5("::1", FIRST_PORT)
    relay.datagramReceived(socks5.encode_udp("::1", 53, b"q"), ("::1", 6000))
    assert port.take() == [(b"q", ("::1", 53))]


def test_udp_associate_with_domain_in_request(bytewise):
    """DST.ADDR as a name says nothing about where the client sends from."""
    factory, reactor = make_factory()
    client, relay, port = associate(factory, bytewise,
                                    request=b"\x05\x03\x00\x03\x09localhost\x00\x00")
    assert client.take() == reply5("127.0.0.1", FIRST_PORT)
    assert reactor.nameResolver.queries == []


def test_udp_port_range(bytewise):
    factory, reactor = make_factory(limits=Limits(udp_ports=((41000, 41001),)))
    reactor.busy = {41000}
    client, relay, port = associate(factory, bytewise)
    assert reactor.udpPorts[0][0] == 41001
    assert client.take() == reply5("127.0.0.1", 41001)


def test_udp_no_free_port_is_general_failure(bytewise):
    factory, reactor = make_factory()
    reactor.busy = None
    client = Client(factory, bytewise)
    client.send(GREETING + UDP_ANY)
    assert_refused(client, b"\x05\x00" + failure_reply(0x01))
    assert reactor.udpPorts == []


@pytest.mark.parametrize("rules", [
    [compile_rule("connect-only", "allow", commands=["connect"])],
    [compile_rule("no-udp", "deny", commands=["udp"]), compile_rule("rest", "allow")],
    [compile_rule("other-clients", "allow", sources=["10.0.0.0/8"])],
    [],
], ids=["connect-only", "deny-udp", "other-clients", "no-rules"])
def test_udp_denied_when_no_rule_allows_udp(bytewise, rules):
    factory, reactor = make_factory(rules=RuleSet(rules))
    client = Client(factory, bytewise)
    line = refused_session_line(client, [GREETING, UDP_ANY], b"\x05\x00" + failure_reply(0x02))
    assert reactor.udpPorts == []
    assert "denied" in line and "udp 0.0.0.0:0" in line


def test_udp_allowed_by_a_rule_for_some_destinations(bytewise):
    rules = RuleSet([compile_rule("dns", "allow", commands=["udp"], ports=["53"]),
                     compile_rule("connect", "allow", commands=["connect"])])
    factory, reactor = make_factory(rules=rules)
    client, relay, port = associate(factory, bytewise)
    assert client.take() == reply5("127.0.0.1", FIRST_PORT)
    relay.datagramReceived(socks5.encode_udp("192.0.2.53", 53, b"q"), ("127.0.0.1", 6000))
    relay.datagramReceived(socks5.encode_udp("192.0.2.53", 54, b"q"), ("127.0.0.1", 6000))
    assert port.take() == [(b"q", ("192.0.2.53", 53))]
    assert relay.counts["dropped"] == 1


def test_udp_rule_with_log_logs_each_new_address_once(bytewise):
    rules = RuleSet([compile_rule("dns", "allow", commands=["udp", "udpreply"], ports=["53"],
                                  log=True),
                     compile_rule("connect", "allow", commands=["connect"])])
    factory, reactor = make_factory(rules=rules)
    with capturedLogs() as events:
        client, relay, port = associate(factory, bytewise)
        for _ in range(3):
            relay.datagramReceived(socks5.encode_udp("192.0.2.53", 53, b"q"),
                                   ("127.0.0.1", 6000))
            relay.datagramReceived(b"a", ("192.0.2.53", 53))
        relay.datagramReceived(socks5.encode_udp("192.0.2.54", 53, b"q"), ("127.0.0.1", 6000))
    assert allowed_lines(events) == [
        f"127.0.0.1:40000 - {command} {address}:53 allowed by dns (allow)"
        for command, address in (("udp", "192.0.2.53"), ("udpreply", "192.0.2.53"),
                                 ("udp", "192.0.2.54"))]


def test_udp_ends_with_control_connection_and_logs_counts():
    factory, reactor = make_factory()
    with capturedLogs() as events:
        client, relay, port = associate(factory)
        client.take()
        relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"query"),
                               ("127.0.0.1", 6000))
        relay.datagramReceived(b"answer!", ("192.0.2.1", 53))
        relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"x"), ("10.9.9.9", 6000))
        relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"x", frag=1),
                               ("127.0.0.1", 6000))
        client.lose()
        assert port.stopped, "the relay socket stays open after the control connection closed"
        relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"late"),
                               ("127.0.0.1", 6000))
    assert factory.sessions == 0 and factory.per_client == {}
    [line] = session_lines(events)
    assert "socks5" in line and "udp 0.0.0.0:0" in line
    assert "up=5 down=7" in line
    assert line.endswith("datagrams up=1 down=1 dropped=1 fragments=1"), line


def test_udp_idle_timeout_ends_the_association():
    factory, reactor = make_factory(limits=Limits(udp_idle_timeout=30))
    with capturedLogs() as events:
        client, relay, port = associate(factory)
        client.take()
        reactor.advance(29)
        relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"q"), ("127.0.0.1", 6000))
        reactor.advance(29)
        relay.datagramReceived(b"a", ("192.0.2.1", 53))
        reactor.advance(29)
        assert not client.closing and not port.stopped
        reactor.advance(1.1)
        assert client.closing
        assert port.stopped
        client.lose()
    [line] = session_lines(events)
    assert "udp idle timeout" in line and "30 s" in line
    assert line.endswith("datagrams up=1 down=1 dropped=0 fragments=0"), line


def test_udp_idle_timeout_without_any_datagram():
    factory, reactor = make_factory(limits=Limits(udp_idle_timeout=5))
    client, relay, port = associate(factory)
    reactor.advance(5.1)
    assert client.closing and port.stopped


def test_udp_handshake_timeout_does_not_end_the_association():
    factory, reactor = make_factory(limits=Limits(handshake_timeout=5, udp_idle_timeout=60))
    client, relay, port = associate(factory)
    reactor.advance(30)
    assert not client.closing and not port.stopped


def test_udp_control_connection_data_is_discarded(bytewise):
    factory, reactor = make_factory()
    client, relay, port = associate(factory, bytewise)
    client.take()
    buffered = client.session.buffered
    junk = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50" + b"j" * 200_000
    client.session.dataReceived(junk)
    client.send(b"more junk")
    assert client.take() == b""
    assert not client.closing
    assert client.transport.producerState == "producing"
    assert client.session.buffered == buffered
    handler = client.session.handler
    assert handler is None or len(handler.buffer) == 0
    assert reactor.tcpClients == [] and port.written == []


# The UDP relay's datagram handling.


def test_relay_sends_client_datagrams_to_their_destination():
    factory, reactor = make_factory()
    client, relay, port = associate(factory)
    relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"\x12\x34query"),
                           ("127.0.0.1", 6000))
    relay.datagramReceived(socks5.encode_udp("2001:db8::1", 443, b"quic"),
                           ("127.0.0.1", 6000))
    relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b""), ("127.0.0.1", 6000))
    assert port.take() == [(b"\x12\x34query", ("192.0.2.1", 53)),
                           (b"quic", ("2001:db8::1", 443)),
                           (b"", ("192.0.2.1", 53))]
    assert relay.counts["up"] == 3 and relay.counts["bytes_up"] == 11


def test_relay_wraps_answers_with_their_source():
    factory, reactor = make_factory()
    client, relay, port = associate(factory)
    relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"q"), ("127.0.0.1", 6000))
    port.take()
    relay.datagramReceived(b"answer", ("192.0.2.1", 53))
    assert port.take() == [(b"\x00\x00\x00\x01\xc0\x00\x02\x01\x00\x35answer",
                            ("127.0.0.1", 6000))]
    relay.datagramReceived(socks5.encode_udp("2001:db8::1", 443, b"q"), ("127.0.0.1", 6000))
    port.take()
    relay.datagramReceived(b"v6", ("2001:db8::1", 443))
    assert port.take() == [(b"\x00\x00\x00\x04\x20\x01\x0d\xb8" + bytes(11) + b"\x01\x01\xbb"
                            + b"v6", ("127.0.0.1", 6000))]
    assert relay.counts["down"] == 2 and relay.counts["bytes_down"] == 8


def test_relay_answers_only_from_destinations_the_client_used():
    factory, reactor = make_factory()
    client, relay, port = associate(factory)
    relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"q"), ("127.0.0.1", 6000))
    port.take()
    relay.datagramReceived(b"spoof", ("192.0.2.1", 54))      # same host, other port
    relay.datagramReceived(b"spoof", ("192.0.2.2", 53))      # other host
    assert port.take() == []
    assert relay.counts["dropped"] == 2 and relay.counts["down"] == 0


def test_relay_drops_strangers():
    factory, reactor = make_factory()
    client, relay, port = associate(factory)
    relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"q"), ("10.0.0.1", 6000))
    relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"q"), ("127.0.0.2", 6000))
    assert port.take() == []
    assert relay.counts["dropped"] == 2 and relay.counts["up"] == 0
    # The client's first datagram fixes its port: others on its IP are strangers.
    relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"q"), ("127.0.0.1", 6000))
    relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"x"), ("127.0.0.1", 6001))
    assert port.take() == [(b"q", ("192.0.2.1", 53))]
    assert relay.counts["dropped"] == 3
    # ...and answers go to the client's port, not to a stranger's.
    relay.datagramReceived(b"a", ("192.0.2.1", 53))
    assert port.take() == [(socks5.encode_udp("192.0.2.1", 53, b"a"), ("127.0.0.1", 6000))]


def test_relay_takes_only_the_port_the_request_named():
    factory, reactor = make_factory()
    client, relay, port = associate(
        factory, request=b"\x05\x03\x00\x01\x7f\x00\x00\x01\x17\x70")   # 127.0.0.1:6000
    relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"x"), ("127.0.0.1", 6001))
    relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"q"), ("127.0.0.1", 6000))
    assert port.take() == [(b"q", ("192.0.2.1", 53))]
    assert relay.counts["dropped"] == 1


def test_relay_request_naming_another_address_is_logged_not_refused():
    factory, reactor = make_factory()
    with capturedLogs() as events:
        client, relay, port = associate(
            factory, request=b"\x05\x03\x00\x01\xc0\x00\x02\x63\x00\x00")   # 192.0.2.99:0
        assert client.take() == reply5("127.0.0.1", FIRST_PORT)
    assert not client.closing
    assert any("192.0.2.99" in t and "client" in t for t in texts(events))
    relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"q"), ("127.0.0.1", 6000))
    assert port.take() == [(b"q", ("192.0.2.1", 53))]


def test_relay_accepts_v4_mapped_client_address():
    factory, reactor = make_factory()
    client, relay, port = associate(factory)
    relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"q"),
                           ("::ffff:127.0.0.1", 6000, 0, 0))
    assert port.take() == [(b"q", ("192.0.2.1", 53))]


def test_relay_drops_fragments():
    factory, reactor = make_factory()
    client, relay, port = associate(factory)
    for frag in (1, 2, 0x81):
        relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"part", frag),
                               ("127.0.0.1", 6000))
    assert port.take() == []
    assert relay.counts["fragments"] == 3 and relay.counts["up"] == 0


@pytest.mark.parametrize("datagram", [
    b"",
    b"\x00\x00\x00",
    b"\x00\x01\x00\x01\xc0\x00\x02\x01\x00\x35q",     # RSV != 0
    b"\x00\x00\x00\x05\xc0\x00\x02\x01\x00\x35q",     # unknown ATYP
    b"\x00\x00\x00\x01\xc0\x00\x02",                   # short
    b"\x00\x00\x00\x03\x00\x00\x35q",                  # empty name
], ids=["empty", "3-bytes", "rsv", "atyp", "short", "empty-name"])
def test_relay_drops_malformed_datagrams(datagram):
    factory, reactor = make_factory()
    with capturedLogs() as events:
        client, relay, port = associate(factory)
        relay.datagramReceived(datagram, ("127.0.0.1", 6000))
    assert port.take() == []
    assert relay.counts["dropped"] == 1
    assert not any("Traceback" in t for t in texts(events))
    assert not client.closing


def test_relay_drops_port_zero_destination():
    factory, reactor = make_factory()
    client, relay, port = associate(factory)
    relay.datagramReceived(socks5.encode_udp("192.0.2.1", 0, b"q"), ("127.0.0.1", 6000))
    assert port.take() == [] and relay.counts["dropped"] == 1


def test_relay_drops_oversize_datagrams():
    factory, reactor = make_factory(limits=Limits(max_datagram=100))
    client, relay, port = associate(factory)
    relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"a" * 101), ("127.0.0.1", 6000))
    relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"b" * 100), ("127.0.0.1", 6000))
    assert port.take() == [(b"b" * 100, ("192.0.2.1", 53))]
    assert relay.counts["dropped"] == 1
    relay.datagramReceived(b"c" * 101, ("192.0.2.1", 53))
    relay.datagramReceived(b"d" * 100, ("192.0.2.1", 53))
    assert port.take() == [(socks5.encode_udp("192.0.2.1", 53, b"d" * 100),
                            ("127.0.0.1", 6000))]
    assert relay.counts["dropped"] == 2


@contextlib.contextmanager
def real_udp(factory, reactor):
    """An association whose relay socket is Twisted's real UDP port (a real
    socket on 127.0.0.1, driven by the memory reactor), so that write()
    behaves as in production."""
    reactor.real_udp = True
    client, relay, port = associate(factory)
    try:
        yield client, relay, port
    finally:
        client.lose()
        reactor.advance(0)
        assert getattr(port, "socket", None) is None, "the relay socket was not closed"


def test_relay_never_sends_more_than_a_udp_datagram_can_hold():
    """An answer near the maximum grows by its SOCKS header; what cannot be
    sent is dropped and counted, not an exception out of the protocol."""
    factory, reactor = make_factory()
    with real_udp(factory, reactor) as (client, relay, port), \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        client_addr = receiver.getsockname()
        relay.datagramReceived(socks5.encode_udp("127.0.0.1", 9, b"q"), client_addr)
        # 65500 bytes fit in a UDP datagram; with the 10-byte header they do not.
        relay.datagramReceived(b"z" * 65500, ("127.0.0.1", 9))
        assert relay.counts["down"] == 0
        assert relay.counts["dropped"] == 1
        # The relay goes on working.
        relay.datagramReceived(b"small", ("127.0.0.1", 9))
        receiver.settimeout(5)
        assert receiver.recv(65535) == socks5.encode_udp("127.0.0.1", 9, b"small")


def test_relay_ipv6_destination_on_ipv4_socket_is_dropped():
    """The relay socket is IPv4 (the client came over IPv4); an IPv6
    destination cannot be reached from it: dropped and counted, and the
    relay goes on working."""
    factory, reactor = make_factory()
    with real_udp(factory, reactor) as (client, relay, port), \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as destination:
        destination.bind(("127.0.0.1", 0))
        destination.settimeout(5)
        relay.datagramReceived(socks5.encode_udp("2001:db8::1", 53, b"q"),
                               ("127.0.0.1", 6000))
        assert relay.counts["dropped"] == 1 and relay.counts["up"] == 0
        relay.datagramReceived(socks5.encode_udp(*destination.getsockname(), b"v4"),
                               ("127.0.0.1", 6000))
        assert destination.recv(100) == b"v4"


def test_relay_sends_a_name_to_its_first_address_of_the_relay_family():
    """localhost is ::1 and 127.0.0.1 on Debian, ::1 first: an IPv4 relay
    sends to 127.0.0.1 (it cannot reach ::1), every time, and a name with
    no address of its family is dropped."""
    factory, reactor = make_factory()
    with real_udp(factory, reactor) as (client, relay, port), \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as destination:
        destination.bind(("127.0.0.1", 0))
        destination.settimeout(5)
        target = destination.getsockname()[1]
        for payload in (b"first", b"cached"):
            relay.datagramReceived(socks5.encode_udp("localhost", target, payload),
                                   ("127.0.0.1", 6000))
            if payload == b"first":
                reactor.nameResolver.answer("::1", "127.0.0.1")
            assert destination.recv(100) == payload
        relay.datagramReceived(socks5.encode_udp("v6only.example", target, b"no"),
                               ("127.0.0.1", 6000))
        reactor.nameResolver.answer("::1")
        assert relay.counts["up"] == 2 and relay.counts["dropped"] == 1


@pytest.mark.parametrize("garbage", [b"", b"\x00", b"\x00\x00\x00\x09junk",
                                     b"\x05\x01\x00\x01" + bytes(6)])
def test_a_datagram_that_does_not_parse_does_not_pin_the_association(garbage):
    """DST 0.0.0.0:0: the client's first datagram fixes its port. Garbage from
    another socket on the client's host must not take the association."""
    factory, reactor = make_factory()
    client, relay, port = associate(factory)
    relay.datagramReceived(garbage, ("127.0.0.1", 7000))
    assert relay.client_addr is None and relay.counts["dropped"] == 1
    relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"real"), ("127.0.0.1", 6000))
    assert port.take() == [(b"real", ("192.0.2.1", 53))]
    relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"late"), ("127.0.0.1", 7000))
    assert port.take() == [] and relay.client_addr == ("127.0.0.1", 6000)


def test_relay_resolves_names_and_caches_them():
    factory, reactor = make_factory()
    client, relay, port = associate(factory)
    resolver = reactor.nameResolver
    relay.datagramReceived(socks5.encode_udp("dns.example", 53, b"one"), ("127.0.0.1", 6000))
    assert resolver.names == ["dns.example"]
    assert port.written == []      # not sent before the answer, nothing blocks
    resolver.answer("192.0.2.53")
    assert port.take() == [(b"one", ("192.0.2.53", 53))]
    relay.datagramReceived(socks5.encode_udp("dns.example", 53, b"two"), ("127.0.0.1", 6000))
    assert port.take() == [(b"two", ("192.0.2.53", 53))]
    assert resolver.names == ["dns.example"], "the name was resolved again at once"
    # The answer comes back wrapped with the address it came from.
    relay.datagramReceived(b"ans", ("192.0.2.53", 53))
    assert port.take() == [(socks5.encode_udp("192.0.2.53", 53, b"ans"), ("127.0.0.1", 6000))]
    # The cache does not keep a name forever (a minute, less than the idle timeout).
    reactor.advance(61)
    relay.datagramReceived(socks5.encode_udp("dns.example", 53, b"three"),
                           ("127.0.0.1", 6000))
    assert resolver.names == ["dns.example", "dns.example"]


def test_relay_unresolvable_name_is_dropped():
    factory, reactor = make_factory()
    client, relay, port = associate(factory)
    relay.datagramReceived(socks5.encode_udp("nx.example", 53, b"q"), ("127.0.0.1", 6000))
    reactor.nameResolver.answer()
    assert port.take() == [] and relay.counts["dropped"] == 1


def test_relay_name_resolved_after_association_ended_is_not_sent():
    factory, reactor = make_factory()
    client, relay, port = associate(factory)
    relay.datagramReceived(socks5.encode_udp("dns.example", 53, b"q"), ("127.0.0.1", 6000))
    client.lose()
    reactor.nameResolver.answer("192.0.2.53")
    assert port.written == []


def test_relay_rules_per_datagram():
    rules = RuleSet([compile_rule("no-private", "deny", commands=["udp"],
                                  destinations=["10.0.0.0/8", "blocked.example"]),
                     compile_rule("rest", "allow", sources=["127.0.0.0/8"])])
    factory, reactor = make_factory(rules=rules)
    client, relay, port = associate(factory)
    relay.datagramReceived(socks5.encode_udp("10.1.1.1", 53, b"no"), ("127.0.0.1", 6000))
    relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"yes"), ("127.0.0.1", 6000))
    relay.datagramReceived(socks5.encode_udp("blocked.example", 53, b"no"), ("127.0.0.1", 6000))
    if reactor.nameResolver.queries:
        reactor.nameResolver.answer("192.0.2.77")
    relay.datagramReceived(socks5.encode_udp("sneaky.example", 53, b"no"), ("127.0.0.1", 6000))
    reactor.nameResolver.answer("10.0.0.53")
    assert port.take() == [(b"yes", ("192.0.2.1", 53))]
    assert relay.counts["dropped"] == 3 and relay.counts["up"] == 1


def test_relay_udpreply_rules():
    rules = RuleSet([compile_rule("quiet", "deny", commands=["udpreply"],
                                  destinations=["192.0.2.1"]),
                     compile_rule("rest", "allow", sources=["127.0.0.0/8"])])
    factory, reactor = make_factory(rules=rules)
    client, relay, port = associate(factory)
    for host in ("192.0.2.1", "192.0.2.2"):
        relay.datagramReceived(socks5.encode_udp(host, 53, b"q"), ("127.0.0.1", 6000))
    port.take()
    relay.datagramReceived(b"denied", ("192.0.2.1", 53))
    relay.datagramReceived(b"allowed", ("192.0.2.2", 53))
    assert port.take() == [(socks5.encode_udp("192.0.2.2", 53, b"allowed"),
                            ("127.0.0.1", 6000))]
    assert relay.counts["dropped"] == 1 and relay.counts["down"] == 1


class CountingRules(RuleSet):
    def __init__(self, rules) -> None:
        super().__init__(rules)
        self.calls: list[str] = []

    def decide(self, client, user, command, port, name=None, address=None, **kwargs):
        self.calls.append(command)
        return super().decide(client, user, command, port, name, address, **kwargs)


def test_relay_caches_rule_decisions():
    rules = CountingRules([compile_rule("rest", "allow", sources=["127.0.0.0/8"])])
    factory, reactor = make_factory(rules=rules)
    client, relay, port = associate(factory)
    for _ in range(50):
        relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"q"), ("127.0.0.1", 6000))
        relay.datagramReceived(b"a", ("192.0.2.1", 53))
    assert len(port.take()) == 100
    assert rules.calls.count("udp") == 1 and rules.calls.count("udpreply") == 1


def test_relay_activity_keeps_the_association_alive():
    factory, reactor = make_factory(limits=Limits(udp_idle_timeout=10))
    client, relay, port = associate(factory)
    for _ in range(5):
        reactor.advance(9)
        relay.datagramReceived(socks5.encode_udp("192.0.2.1", 53, b"q"), ("127.0.0.1", 6000))
    assert not client.closing
    reactor.advance(10.1)
    assert client.closing and port.stopped


def test_relay_name_denied_by_rule_is_not_looked_up():
    """A datagram to a name the rules deny by name is dropped before any
    lookup (CONNECT already decides on the name first)."""
    rules = RuleSet([compile_rule("no-slow", "deny", commands=["udp"],
                                  destinations=[".slow"]),
                     compile_rule("rest", "allow", sources=["127.0.0.0/8"])])
    factory, reactor = make_factory(rules=rules)
    client, relay, port = associate(factory)
    for i in range(50):
        relay.datagramReceived(socks5.encode_udp(f"n{i}.slow", 53, b"q"), ("127.0.0.1", 6000))
    assert reactor.nameResolver.names == []
    assert relay.counts["dropped"] == 50
    relay.datagramReceived(socks5.encode_udp("ok.example", 53, b"q"), ("127.0.0.1", 6000))
    assert reactor.nameResolver.names == ["ok.example"]


def test_relay_lookups_are_bounded_and_count_until_they_finish():
    """A datagram flood to distinct names starts at most the per-client
    number of lookups; those count (even past connect_timeout) until the
    resolver finishes, and the client's CONNECTs by name are refused
    meanwhile, while another client's are not."""
    from socksd.proxy import connect
    limit = connect.MAX_LOOKUPS_PER_CLIENT
    factory, reactor = make_factory(limits=Limits(connect_timeout=3))
    resolver = reactor.nameResolver
    client, relay, port = associate(factory)
    with capturedLogs() as events:
        for i in range(200):
            relay.datagramReceived(socks5.encode_udp(f"n{i}.example", 53, b"q"),
                                   ("127.0.0.1", 6000))
    assert len(resolver.queries) == limit
    assert relay.counts["dropped"] == 200 - limit
    assert sum("too many name lookups in flight for this client" in t
               for t in texts(events)) == 1
    reactor.advance(3.1)        # the relay stops waiting; the lookups go on
    name = b"www.example"
    request = b"\x05\x01\x00\x03" + bytes((len(name),)) + name + b"\x00\x50"
    same = socks5_client(factory, request)
    assert same.take() == failure_reply(0x04)
    assert len(resolver.queries) == limit
    other = socks5_client(factory, request, peer=IPv4Address("TCP", "127.0.0.2", 40000))
    assert other.take() == b"" and resolver.names[-1] == "www.example"
    # One lookup of the flood really finishes: the relay may look up again.
    resolver.answer("192.0.2.53", index=0)
    relay.datagramReceived(socks5.encode_udp("late.example", 53, b"q"), ("127.0.0.1", 6000))
    assert resolver.names[-1] == "late.example"


# A source address ([server] source): a second socket faces the destinations.


def associate_from_source(source: str = "198.51.100.7", rules=None, **limits):
    """An association whose destinations are reached from ``source``:
    (client, relay, the client's side, the destinations' side)."""
    factory, reactor = make_factory(rules=rules, limits=Limits(source=(source,), **limits))
    client = socks5_client(factory, UDP_ANY)
    (_p, relay, inside, _s), (requested, _outside, interface, size) = reactor.udpPorts
    assert (inside, interface, requested) == ("127.0.0.1", source, 0)
    # One byte over max_datagram tells an oversized answer from a cut one.
    assert size == Limits().max_datagram + 1
    assert client.take() == reply5("127.0.0.1", FIRST_PORT)
    client_side, destination_side = reactor.udp_listeners
    return client, relay, client_side, destination_side


def test_with_a_source_datagrams_leave_from_it_and_answers_come_back_through_the_relay():
    client, relay, client_side, destination_side = associate_from_source()
    relay.datagramReceived(socks5.encode_udp("192.0.2.53", 53, b"q"), ("127.0.0.1", 6000))
    assert client_side.take() == []
    assert destination_side.take() == [(b"q", ("192.0.2.53", 53))]
    destination_side.protocol.datagramReceived(b"a", ("192.0.2.53", 53))
    assert client_side.take() == [(socks5.encode_udp("192.0.2.53", 53, b"a"),
                                   ("127.0.0.1", 6000))]
    assert relay.counts["up"] == relay.counts["down"] == 1


def test_with_a_source_only_destinations_the_client_sent_to_are_answered():
    client, relay, client_side, destination_side = associate_from_source()
    relay.datagramReceived(socks5.encode_udp("192.0.2.53", 53, b"q"), ("127.0.0.1", 6000))
    destination_side.take()
    destination_side.protocol.datagramReceived(b"stranger", ("192.0.2.99", 53))
    destination_side.protocol.datagramReceived(b"other port", ("192.0.2.53", 54))
    # The destination writing to the client's side is a stranger there.
    relay.datagramReceived(b"wrong socket", ("192.0.2.53", 53))
    assert client_side.take() == [] and relay.counts["dropped"] == 3


def test_with_a_source_udpreply_rules_still_decide():
    rules = RuleSet([compile_rule("no-replies", "deny", commands=["udpreply"]),
                     compile_rule("rest", "allow")])
    client, relay, client_side, destination_side = associate_from_source(rules=rules)
    relay.datagramReceived(socks5.encode_udp("192.0.2.53", 53, b"q"), ("127.0.0.1", 6000))
    destination_side.protocol.datagramReceived(b"a", ("192.0.2.53", 53))
    assert client_side.take() == [] and relay.counts["dropped"] == 1


def test_with_a_source_the_end_closes_both_sockets():
    client, relay, client_side, destination_side = associate_from_source()
    client.lose()
    assert client_side.stopped and destination_side.stopped
    destination_side.protocol.datagramReceived(b"late", ("192.0.2.53", 53))
    assert client_side.written == []


def test_a_source_that_cannot_be_bound_fails_the_association():
    factory, reactor = make_factory(limits=Limits(source=("198.51.100.7",)))
    real = reactor.listenUDP

    def refuse_the_source(port, protocol, interface="", maxPacketSize=8192):
        if interface == "198.51.100.7":
            raise error.CannotListenError(interface, port,
                                          OSError(errno.EADDRNOTAVAIL, "not this host's"))
        return real(port, protocol, interface, maxPacketSize)

    reactor.listenUDP = refuse_the_source
    client = Client(factory, False)
    client.send(GREETING + UDP_ANY)
    assert_refused(client, b"\x05\x00" + failure_reply(0x03))
    assert reactor.udp_listeners[0].stopped


def test_a_source_of_the_other_family_gives_the_relay_that_family():
    client, relay, client_side, destination_side = associate_from_source("2001:db8::7")
    relay.datagramReceived(socks5.encode_udp("2001:db8::53", 53, b"q"), ("127.0.0.1", 6000))
    assert destination_side.take() == [(b"q", ("2001:db8::53", 53))]


def test_same_as_listener_keeps_one_socket():
    factory, reactor = make_factory(limits=Limits(source_select="same-as-listener"))
    client, relay, port = associate(factory)
    assert len(reactor.udpPorts) == 1


# udp_advertise: the address the reply names.


def test_udp_advertise_is_named_in_the_reply_with_the_relay_port():
    # Behind NAT: not this host's, so the relay stays on the listener's address.
    factory, reactor = make_factory(limits=Limits(udp_advertise="203.0.113.5"))
    client, relay, port = associate(factory)
    assert reactor.udpPorts[0][2] == "127.0.0.1"
    assert client.take() == reply5("203.0.113.5", FIRST_PORT)


def test_udp_advertise_of_this_host_is_where_the_relay_is_bound():
    factory, reactor = make_factory(limits=Limits(udp_advertise="198.51.100.9",
                                                  udp_advertise_local=True))
    client, relay, port = associate(factory)
    assert reactor.udpPorts[0][2] == "198.51.100.9"
    assert client.take() == reply5("198.51.100.9", FIRST_PORT)
