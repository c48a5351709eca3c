"""Protocol tests of SOCKS4/4a sessions (socksd.proxy) over in-memory transports.

Every exchange is fed one byte at a time and in one piece; replies are
compared byte for byte: VN=0, CD (90 granted, 91 rejected or failed, 92 no
identd, 93 identd disagrees), DSTPORT, DSTIP. The identd the ident policy asks
is a connection the memory reactor was asked to make; the tests play it.
"""

from __future__ import annotations

import pytest
from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

import fakes
from fakes import (
    BOUND,
    assert_closes_at,
    assert_refused,
    refused_session_line,
    relay_until_far_end_closes,
    session_lines,
)
from socksd.auth import ANONYMOUS, User
from socksd.proxy import Limits, Socks4Policy
from socksd.rules import RuleSet, compile_rule

IDENT_PORT = 113

# CONNECT 93.184.216.34:80, USERID "fred".
CONNECT_FRED = b"\x04\x01\x00\x50\x5d\xb8\xd8\x22fred\x00"
CONNECT_ANON = b"\x04\x01\x00\x50\x5d\xb8\xd8\x22\x00"
# SOCKS4a CONNECT example.com:443, USERID "fred".
CONNECT_4A = b"\x04\x01\x01\xbb\x00\x00\x00\x01fred\x00example.com\x00"
# BIND 93.184.216.34:80.
BIND_FRED = b"\x04\x02\x00\x50\x5d\xb8\xd8\x22fred\x00"

# 90 with the bound address 10.0.0.5:51000.
GRANTED_BOUND = b"\x00\x5a\xc7\x38\x0a\x00\x00\x05"
REJECTED = b"\x00\x5b\x00\x00\x00\x00\x00\x00"
NO_IDENTD = b"\x00\x5c\x00\x00\x00\x00\x00\x00"
MISMATCH = b"\x00\x5d\x00\x00\x00\x00\x00\x00"

# What socksd must ask the identd on the client's host: <client port>, <socksd port>.
IDENT_QUERY = b"40000, 1080\r\n"


def ident_userid(user: str, pair: bytes = b"40000, 1080") -> bytes:
    return pair + b" : USERID : UNIX : " + user.encode() + b"\r\n"


# The client, the destination and the identd, as the memory reactor records them.


class Client(fakes.Client):
    """fakes.Client on a plain StringTransport (no half-close)."""

    transport_factory = StringTransport


def _connections(reactor, ident: bool) -> list[int]:
    return [i for i, (_h, port, *_rest) in enumerate(reactor.tcpClients)
            if (port == IDENT_PORT) == ident]


class Outbound(fakes.Outbound):
    """The far side of the CONNECT to the destination (index counts those alone)."""

    transport_factory = StringTransport

    def __init__(self, reactor: MemoryReactorClock, index: int = -1, bound=BOUND) -> None:
        super().__init__(reactor, _connections(reactor, ident=False)[index], bound)


def destinations(reactor) -> list[tuple[str, int]]:
    return [reactor.tcpClients[i][:2] for i in _connections(reactor, ident=False)]


class Identd:
    """The identd on the client's host, as the connection socksd opened to it.

    The connector behaves like Twisted's real TCP connector: disconnecting it
    before the connection is made fails the attempt at once (UserError, as
    ``failIfNotConnected`` does); afterwards it closes the transport.
    """

    def __init__(self, reactor: MemoryReactorClock) -> None:
        [index] = _connections(reactor, ident=True)
        self.host, self.port, self.factory, self.timeout, self.bind = reactor.tcpClients[index]
        self.connector = reactor.connectors[index]
        self.connector.disconnect = self._disconnect
        self.disconnected = False
        self.protocol = None
        self.transport = None

    def _disconnect(self) -> None:
        self.disconnected = True
        if self.transport is None:
            self.factory.clientConnectionFailed(self.connector, Failure(error.UserError()))
        else:
            self.transport.loseConnection()

    def accept(self) -> None:
        cls = IPv6Address if ":" in self.host else IPv4Address
        self.protocol = self.factory.buildProtocol(cls("TCP", self.host, self.port))
        self.transport = StringTransport(hostAddress=cls("TCP", self.host, self.port),
                                         peerAddress=cls("TCP", self.host, 55555))
        self.protocol.makeConnection(self.transport)

    @property
    def query(self) -> bytes:
        return self.transport.value()

    def answer(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def refuse(self) -> None:
        self.factory.clientConnectionFailed(self.connector,
                                            Failure(error.ConnectionRefusedError()))

    @property
    def closed(self) -> bool:
        return self.disconnected or (self.transport is not None and self.transport.disconnecting)


def answer_identd(reactor, answer: bytes) -> Identd:
    """The identd socksd asked accepts the connection and answers ``answer``."""
    identd = Identd(reactor)
    identd.accept()
    identd.answer(answer)
    return identd


def make_factory(policy: Socks4Policy = Socks4Policy(), rules=None, limits=Limits()):
    return fakes.make_factory(rules=rules, limits=limits, socks4=policy)


IDENT = Socks4Policy(userid="ident")


def granted(client: Client, reactor) -> Outbound:
    """Accept the pending destination connection and expect 90 with its address."""
    out = Outbound(reactor)
    out.accept()
    assert client.take() == GRANTED_BOUND
    assert not client.closing
    return out


# CONNECT with the default policy (trust).


def test_connect_ip_granted_with_bound_address_and_relay(bytewise):
    factory, reactor = make_factory()
    client = Client(factory, bytewise)
    with capturedLogs() as events:
        client.send(CONNECT_FRED)
        assert client.take() == b""
        assert destinations(reactor) == [("93.184.216.34", 80)]
        out = Outbound(reactor)
        assert out.timeout == Limits().connect_timeout
        out.accept()
        assert client.take() == GRANTED_BOUND
        assert client.session.user == User("fred", verified=False)
        relay_until_far_end_closes(client, out)
        client.lose()
    [line] = session_lines(events)
    assert " socks4 " in line and "socks5" not in line
    assert "127.0.0.1:40000" in line
    assert "user=fred" in line and "method=trust" in line
    assert "connect 93.184.216.34:80" in line
    assert "up=5" in line and "down=6" in line
    assert line.endswith(" ok")


def test_granted_reply_carries_other_bound_addresses(bytewise):
    factory, reactor = make_factory()
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED)
    out = Outbound(reactor, bound=IPv4Address("TCP", "192.0.2.7", 1))
    out.accept()
    assert client.take() == b"\x00\x5a\x00\x01\xc0\x00\x02\x07"


def test_granted_over_ipv6_outbound_sends_zero_address(bytewise):
    """SOCKS4 cannot carry an IPv6 bound address: 90 with 0.0.0.0:0."""
    factory, reactor = make_factory()
    client = Client(factory, bytewise)
    client.send(CONNECT_4A)
    reactor.nameResolver.answer("2606:2800:220:1::1")
    out = Outbound(reactor, bound=IPv6Address("TCP", "2001:db8::7", 443))
    assert (out.host, out.port) == ("2606:2800:220:1::1", 443)
    out.accept()
    assert client.take() == b"\x00\x5a" + bytes(6)


def test_early_data_is_relayed_after_reply(bytewise):
    factory, reactor = make_factory()
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED + b"GET / HTTP/1.0\r\n\r\n")
    out = Outbound(reactor)
    out.accept()
    assert client.take() == GRANTED_BOUND
    assert out.transport.value() == b"GET / HTTP/1.0\r\n\r\n"


def test_empty_userid_is_anonymous(bytewise):
    factory, reactor = make_factory()
    client = Client(factory, bytewise)
    client.send(CONNECT_ANON)
    granted(client, reactor)
    assert client.session.user == ANONYMOUS


def test_an_empty_userid_allowed_under_ident_is_logged_as_checked_by_no_one(bytewise):
    factory, reactor = make_factory(Socks4Policy(userid="ident", allow_empty_userid=True))
    client = Client(factory, bytewise)
    with capturedLogs() as events:
        client.send(CONNECT_ANON)
        assert _connections(reactor, ident=True) == []     # no identd asked
        out = granted(client, reactor)
        out.protocol.connectionLost(Failure(error.ConnectionDone()))
        client.lose()
    [line] = session_lines(events)
    assert "user=- method=none connect" in line, line


@pytest.mark.parametrize("exc", [error.ConnectionRefusedError(), error.TimeoutError(),
                                 error.NoRouteError()], ids=["refused", "timeout", "no-route"])
def test_connect_failure_is_91(bytewise, exc):
    factory, reactor = make_factory()
    client = Client(factory, bytewise)
    line = refused_session_line(client, [CONNECT_FRED], REJECTED,
                                after_send=lambda: Outbound(reactor).refuse(exc))
    assert "socks4" in line and "connect failed" in line and "93.184.216.34:80" in line


def test_connect_timeout_is_91():
    factory, reactor = make_factory(limits=Limits(handshake_timeout=60, connect_timeout=5))
    client = Client(factory, False)
    client.send(CONNECT_4A)
    reactor.advance(5.1)
    assert_refused(client, REJECTED)


def test_denied_by_rules_is_91(bytewise):
    rules = RuleSet([compile_rule("no-web", "deny", ports=["80"]),
                     compile_rule("rest", "allow")])
    factory, reactor = make_factory(rules=rules)
    client = Client(factory, bytewise)
    line = refused_session_line(client, [CONNECT_FRED], REJECTED)
    assert reactor.tcpClients == []
    assert "socks4" in line and "denied" in line and "no-web" in line


def test_default_rules_deny_non_loopback_client(bytewise):
    factory, reactor = make_factory()
    client = Client(factory, bytewise, peer=IPv4Address("TCP", "10.1.2.3", 5555))
    client.send(CONNECT_FRED)
    assert client.take() == REJECTED
    assert reactor.tcpClients == []


@pytest.mark.parametrize("request_bytes", [b"\x04\x03\x00\x50\x5d\xb8\xd8\x22\x00",
                                           b"\x04\x00\x00\x50\x5d\xb8\xd8\x22\x00"],
                         ids=["command-3", "command-0"])
def test_unknown_commands_are_91(bytewise, request_bytes):
    factory, reactor = make_factory(IDENT)
    client = Client(factory, bytewise)
    line = refused_session_line(client, [request_bytes], REJECTED)
    assert reactor.tcpClients == []          # neither an identd nor a destination
    assert "socks4" in line and "command not supported" in line


# Malformed requests and the bounded fields.


def test_unterminated_userid_is_91_and_buffer_stops_growing(bytewise):
    factory, reactor = make_factory()
    client = Client(factory, bytewise)
    head = CONNECT_FRED[:8]
    with capturedLogs() as events:
        client.send(head + b"u" * 255)
        assert client.take() == b""
        assert not client.closing
        client.send(b"u")                       # the 256th byte without NUL
        assert_refused(client, REJECTED)
        handler = client.session.handler
        held = len(handler.buffer)
        assert held <= 8 + 256
        # A client that keeps sending is not buffered any further.
        for _ in range(64):
            client.session.dataReceived(b"u" * 4096)
        assert len(handler.buffer) == held
        assert client.take() == b""
        assert reactor.tcpClients == []
        client.lose()
    [line] = session_lines(events)
    assert "socks4" in line and "bad request" in line


def test_unterminated_userid_in_one_large_chunk_is_91():
    factory, reactor = make_factory()
    client = Client(factory, False)
    client.send(CONNECT_FRED[:8] + b"u" * 100_000)
    assert_refused(client, REJECTED)
    held = len(client.session.handler.buffer)
    client.session.dataReceived(b"u" * 100_000)
    assert len(client.session.handler.buffer) == held
    assert reactor.tcpClients == []


def test_userid_of_255_bytes_is_accepted(bytewise):
    factory, reactor = make_factory()
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED[:8] + b"u" * 255 + b"\x00")
    granted(client, reactor)
    assert client.session.user.name == "u" * 255


def test_unterminated_4a_host_name_is_91(bytewise):
    factory, reactor = make_factory()
    client = Client(factory, bytewise)
    client.send(b"\x04\x01\x00\x50\x00\x00\x00\x01fred\x00" + b"h" * 255)
    assert client.take() == b""
    assert not client.closing
    client.send(b"h")
    assert_refused(client, REJECTED)
    assert reactor.nameResolver.queries == [] and reactor.tcpClients == []


@pytest.mark.parametrize("raw_host", [b"", b".example.com", b"exa mple.com", b"\xff\xfe"],
                         ids=["empty", "leading-dot", "space", "not-utf8"])
def test_bad_4a_host_name_is_91(bytewise, raw_host):
    factory, reactor = make_factory()
    client = Client(factory, bytewise)
    client.send(b"\x04\x01\x00\x50\x00\x00\x00\x01fred\x00" + raw_host + b"\x00")
    assert_refused(client, REJECTED)
    assert reactor.nameResolver.queries == [] and reactor.tcpClients == []


def test_socks4_disabled_is_91_without_connecting(bytewise):
    factory, reactor = make_factory(Socks4Policy(enabled=False))
    client = Client(factory, bytewise)
    line = refused_session_line(client, [CONNECT_FRED], REJECTED)
    assert reactor.tcpClients == []
    assert " socks4 " in line and line.endswith(
        "bad request: SOCKS4 is disabled ([socks4] enabled = false)"), line


def test_handshake_timeout_on_partial_request():
    factory, reactor = make_factory(limits=Limits(handshake_timeout=10))
    client = Client(factory, True)
    client.send(CONNECT_FRED[:10])
    assert_closes_at(client, reactor, 10)


# SOCKS4a: the host name is resolved through the reactor's resolver.


def test_4a_resolves_through_reactor_resolver(bytewise):
    factory, reactor = make_factory()
    resolver = reactor.nameResolver
    client = Client(factory, bytewise)
    with capturedLogs() as events:
        client.send(CONNECT_4A)
        assert [(name, port) for _r, name, port in resolver.queries] == [("example.com", 443)]
        assert reactor.tcpClients == []
        assert client.take() == b""
        resolver.answer("93.184.216.34", "2606:2800:220:1::1")
        assert destinations(reactor) == [("93.184.216.34", 443)]
        out = granted(client, reactor)
        out.protocol.connectionLost(Failure(error.ConnectionDone()))
        client.lose()
    [line] = session_lines(events)
    assert " socks4a " in line and "connect example.com:443" in line and "user=fred" in line


def test_4a_with_other_marker_address(bytewise):
    factory, reactor = make_factory()
    client = Client(factory, bytewise)
    client.send(b"\x04\x01\x00\x50\x00\x00\x00\xffbob\x00localhost\x00")
    assert [name for _r, name, _p in reactor.nameResolver.queries] == ["localhost"]
    reactor.nameResolver.answer("127.0.0.1")
    granted(client, reactor)


def test_4a_name_without_addresses_is_91(bytewise):
    factory, reactor = make_factory()
    client = Client(factory, bytewise)
    client.send(CONNECT_4A)
    reactor.nameResolver.answer()
    assert_refused(client, REJECTED)
    assert reactor.tcpClients == []


def assert_4a_denied_before_resolution(rules: RuleSet, bytewise: bool) -> None:
    """CONNECT_4A gets 91 with the name neither resolved nor connected to."""
    factory, reactor = make_factory(rules=rules)
    client = Client(factory, bytewise)
    client.send(CONNECT_4A)
    assert client.take() == REJECTED
    assert reactor.nameResolver.queries == [] and reactor.tcpClients == []


def test_4a_denied_by_name_before_resolution(bytewise):
    rules = RuleSet([compile_rule("no-example", "deny", destinations=[".example.com"]),
                     compile_rule("rest", "allow")])
    assert_4a_denied_before_resolution(rules, bytewise)


def test_4a_denied_by_resolved_address(bytewise):
    rules = RuleSet([compile_rule("no-private", "deny", destinations=["10.0.0.0/8"]),
                     compile_rule("rest", "allow")])
    factory, reactor = make_factory(rules=rules)
    client = Client(factory, bytewise)
    client.send(CONNECT_4A)
    reactor.nameResolver.answer("10.9.9.9")
    assert client.take() == REJECTED
    assert reactor.tcpClients == []


# Whitelist.

WHITELIST = Socks4Policy(userid="whitelist", whitelist=frozenset({"fred", "wilma"}))


def test_whitelist_listed_userid_passes(bytewise):
    factory, reactor = make_factory(WHITELIST)
    client = Client(factory, bytewise)
    with capturedLogs() as events:
        client.send(CONNECT_FRED)
        out = granted(client, reactor)
        assert client.session.user == User("fred", verified=False)
        out.protocol.connectionLost(Failure(error.ConnectionDone()))
        client.lose()
    [line] = session_lines(events)
    assert "socks4" in line and "user=fred" in line and "method=whitelist" in line


def test_whitelist_unlisted_userid_is_91(bytewise):
    factory, reactor = make_factory(WHITELIST)
    client = Client(factory, bytewise)
    line = refused_session_line(client, [b"\x04\x01\x00\x50\x5d\xb8\xd8\x22barney\x00"],
                                REJECTED)
    assert reactor.tcpClients == []
    assert "socks4" in line and "user=barney" in line and "auth failed" in line


def test_whitelist_comparison_is_exact(bytewise):
    factory, reactor = make_factory(WHITELIST)
    client = Client(factory, bytewise)
    client.send(b"\x04\x01\x00\x50\x5d\xb8\xd8\x22Fred\x00")
    assert client.take() == REJECTED


def test_whitelist_empty_userid_allowed(bytewise):
    factory, reactor = make_factory(WHITELIST)
    client = Client(factory, bytewise)
    client.send(CONNECT_ANON)
    granted(client, reactor)
    assert client.session.user == ANONYMOUS


def test_whitelist_empty_userid_refused(bytewise):
    policy = Socks4Policy(userid="whitelist", whitelist=frozenset({"fred"}),
                          allow_empty_userid=False)
    factory, reactor = make_factory(policy)
    client = Client(factory, bytewise)
    client.send(CONNECT_ANON)
    assert_refused(client, REJECTED)
    assert reactor.tcpClients == []


@pytest.mark.parametrize("userid", ["trust", "ident"])
def test_empty_userid_refused(bytewise, userid):
    factory, reactor = make_factory(Socks4Policy(userid=userid, allow_empty_userid=False))
    client = Client(factory, bytewise)
    client.send(CONNECT_ANON)
    assert client.take() == REJECTED
    assert reactor.tcpClients == []


# Ident (RFC 1413).


def test_ident_match_is_granted_and_verified(bytewise):
    factory, reactor = make_factory(IDENT)
    client = Client(factory, bytewise)
    with capturedLogs() as events:
        client.send(CONNECT_FRED)
        assert client.take() == b""
        # socksd asks the identd on the client's host, and nothing else yet.
        identd = Identd(reactor)
        assert (identd.host, identd.port) == ("127.0.0.1", IDENT_PORT)
        assert identd.timeout == IDENT.ident_timeout
        assert destinations(reactor) == []
        identd.accept()
        assert identd.query == IDENT_QUERY
        identd.answer(ident_userid("fred"))
        assert destinations(reactor) == [("93.184.216.34", 80)]
        out = granted(client, reactor)
        assert client.session.user == User("fred", verified=True)
        assert identd.closed
        out.protocol.connectionLost(Failure(error.ConnectionDone()))
        client.lose()
    [line] = session_lines(events)
    assert "socks4" in line and "user=fred" in line and "method=ident" in line
    assert line.endswith(" ok")


def test_ident_answer_in_pieces_and_without_blanks(bytewise):
    factory, reactor = make_factory(IDENT)
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED)
    identd = Identd(reactor)
    identd.accept()
    for byte in b"40000,1080:USERID:UNIX:fred\r\n":
        identd.answer(bytes((byte,)))
    granted(client, reactor)
    assert client.session.user.verified


def test_ident_query_goes_to_the_clients_address_and_port():
    rules = RuleSet([compile_rule("v4-verified-from-10", "allow", sources=["10.0.0.0/8"],
                                  versions=[4], verified=True)])
    policy = Socks4Policy(userid="ident", ident_port=1113, ident_timeout=3)
    factory, reactor = make_factory(policy, rules)
    client = Client(factory, False, peer=IPv4Address("TCP", "10.1.2.3", 5555),
                    listen=IPv4Address("TCP", "10.0.0.1", 1081))
    client.send(CONNECT_FRED)
    [(host, port, ident_factory, timeout, _bind)] = reactor.tcpClients
    assert (host, port, timeout) == ("10.1.2.3", 1113, 3)
    protocol = ident_factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert transport.value() == b"5555, 1081\r\n"
    protocol.dataReceived(b"5555, 1081 : USERID : UNIX : fred\r\n")
    out = Outbound(reactor)
    assert (out.host, out.port) == ("93.184.216.34", 80)
    out.accept()
    assert client.take() == GRANTED_BOUND


def test_ident_over_ipv6(bytewise):
    factory, reactor = make_factory(IDENT)
    client = Client(factory, bytewise, peer=IPv6Address("TCP", "::1", 40000),
                    listen=IPv6Address("TCP", "::1", 1080))
    client.send(CONNECT_FRED)
    identd = Identd(reactor)
    assert identd.host == "::1"
    identd.accept()
    assert identd.query == IDENT_QUERY
    identd.answer(ident_userid("fred"))
    granted(client, reactor)


def test_ident_other_user_is_93(bytewise):
    factory, reactor = make_factory(IDENT)
    client = Client(factory, bytewise)
    line = refused_session_line(client, [CONNECT_FRED], MISMATCH,
                                after_send=lambda: answer_identd(reactor, ident_userid("barney")))
    assert destinations(reactor) == []
    assert "socks4" in line and "user=fred" in line and "auth failed" in line
    assert "barney" in line


def test_ident_comparison_is_exact_by_default(bytewise):
    factory, reactor = make_factory(IDENT)
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED)
    answer_identd(reactor, ident_userid("FRED"))
    assert client.take() == MISMATCH


def test_ident_case_insensitive(bytewise):
    factory, reactor = make_factory(Socks4Policy(userid="ident", ident_case_insensitive=True))
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED)
    answer_identd(reactor, ident_userid("FRED"))
    granted(client, reactor)
    assert client.session.user == User("fred", verified=True)


def test_ident_case_insensitive_still_refuses_other_users(bytewise):
    factory, reactor = make_factory(Socks4Policy(userid="ident", ident_case_insensitive=True))
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED)
    answer_identd(reactor, ident_userid("FREDDY"))
    assert client.take() == MISMATCH


@pytest.mark.parametrize("token", [b"NO-USER", b"HIDDEN-USER", b"INVALID-PORT",
                                   b"UNKNOWN-ERROR", b"X-GO-AWAY"])
def test_ident_error_is_92(bytewise, token):
    factory, reactor = make_factory(IDENT)
    client = Client(factory, bytewise)
    error_answer = b"40000, 1080 : ERROR : " + token + b"\r\n"
    line = refused_session_line(client, [CONNECT_FRED], NO_IDENTD,
                                after_send=lambda: answer_identd(reactor, error_answer))
    assert destinations(reactor) == []
    assert "socks4" in line and "auth failed" in line and "user=fred" in line


def test_ident_refused_is_92(bytewise):
    factory, reactor = make_factory(IDENT)
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED)
    Identd(reactor).refuse()
    assert_refused(client, NO_IDENTD)
    assert destinations(reactor) == []


def test_ident_closed_without_answer_is_92(bytewise):
    factory, reactor = make_factory(IDENT)
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED)
    identd = Identd(reactor)
    identd.accept()
    identd.protocol.connectionLost(Failure(error.ConnectionDone()))
    assert client.take() == NO_IDENTD


@pytest.mark.parametrize("answer", [ident_userid("fred", b"40001, 1080"),
                                    ident_userid("fred", b"1080, 40000"),
                                    b"40000, 1080 : garbage\r\n",
                                    b"u" * 1001],
                         ids=["other-client-port", "swapped-ports", "garbage", "too-long"])
def test_ident_unusable_answer_is_92(bytewise, answer):
    factory, reactor = make_factory(IDENT)
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED)
    identd = answer_identd(reactor, answer)
    assert_refused(client, NO_IDENTD)
    assert identd.closed
    assert destinations(reactor) == []


def test_ident_no_answer_until_timeout_is_92(bytewise):
    factory, reactor = make_factory(Socks4Policy(userid="ident", ident_timeout=5))
    client = Client(factory, bytewise)
    with capturedLogs() as events:
        client.send(CONNECT_FRED)
        identd = Identd(reactor)
        identd.accept()
        assert identd.query == IDENT_QUERY
        reactor.advance(4.9)
        assert client.take() == b""
        assert not client.closing
        reactor.advance(0.1)
        assert_refused(client, NO_IDENTD)
        assert identd.closed                # the query connection is not left open
        assert destinations(reactor) == []
        # A late answer changes nothing.
        identd.answer(ident_userid("fred"))
        assert client.take() == b"" and destinations(reactor) == []
        client.lose()
    [line] = session_lines(events)
    assert "socks4" in line and "auth failed" in line


def test_ident_never_connecting_times_out_with_92():
    factory, reactor = make_factory(Socks4Policy(userid="ident", ident_timeout=5))
    client = Client(factory, False)
    client.send(CONNECT_FRED)
    identd = Identd(reactor)
    reactor.advance(5)
    assert client.take() == NO_IDENTD
    assert identd.disconnected


def test_ident_fallback_trust_grants_unverified(bytewise):
    policy = Socks4Policy(userid="ident", ident_fallback="trust", ident_timeout=5)
    factory, reactor = make_factory(policy)
    client = Client(factory, bytewise)
    with capturedLogs() as events:
        client.send(CONNECT_FRED)
        identd = Identd(reactor)
        identd.accept()
        reactor.advance(5)
        out = granted(client, reactor)
        assert client.session.user == User("fred", verified=False)
        out.protocol.connectionLost(Failure(error.ConnectionDone()))
        client.lose()
    [line] = session_lines(events)
    assert "socks4" in line and "user=fred" in line and "identd" in line


def test_ident_fallback_trust_on_error_token(bytewise):
    factory, reactor = make_factory(Socks4Policy(userid="ident", ident_fallback="trust"))
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED)
    answer_identd(reactor, b"40000, 1080 : ERROR : HIDDEN-USER\r\n")
    granted(client, reactor)
    assert client.session.user == User("fred", verified=False)


def test_ident_fallback_trust_does_not_override_mismatch(bytewise):
    factory, reactor = make_factory(Socks4Policy(userid="ident", ident_fallback="trust"))
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED)
    answer_identd(reactor, ident_userid("barney"))
    assert client.take() == MISMATCH


def test_ident_empty_userid_allowed_skips_ident(bytewise):
    factory, reactor = make_factory(IDENT)
    client = Client(factory, bytewise)
    client.send(CONNECT_ANON)
    assert _connections(reactor, ident=True) == []
    granted(client, reactor)
    assert client.session.user == ANONYMOUS


def test_ident_4a(bytewise):
    factory, reactor = make_factory(IDENT)
    client = Client(factory, bytewise)
    client.send(CONNECT_4A)
    assert reactor.nameResolver.queries == []   # not before the USERID is verified
    answer_identd(reactor, ident_userid("fred"))
    reactor.nameResolver.answer("93.184.216.34")
    granted(client, reactor)


def test_ident_early_data_is_relayed_after_reply(bytewise):
    factory, reactor = make_factory(IDENT)
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED + b"early")
    identd = Identd(reactor)
    identd.accept()
    client.send(b" and more")
    identd.answer(ident_userid("fred"))
    out = granted(client, reactor)
    assert out.transport.value() == b"early and more"


def test_early_data_while_waiting_for_identd_is_bounded():
    """A client pipelining lots of data behind its request is paused, not
    buffered without end, while socksd waits for its identd."""
    factory, reactor = make_factory(IDENT)
    client = Client(factory, False)
    client.send(CONNECT_FRED)
    identd = Identd(reactor)
    identd.accept()
    assert client.transport.producerState == "producing"
    client.send(b"x" * 70_000)
    assert client.transport.producerState == "paused"
    identd.answer(ident_userid("fred"))
    out = granted(client, reactor)
    assert out.transport.value() == b"x" * 70_000
    assert client.transport.producerState == "producing"


def test_client_leaves_during_ident_query():
    factory, reactor = make_factory(IDENT)
    client = Client(factory, False)
    client.send(CONNECT_FRED)
    identd = Identd(reactor)
    identd.accept()
    client.lose()
    assert identd.closed
    identd.answer(ident_userid("fred"))
    assert destinations(reactor) == []
    assert client.take() == b""
    assert factory.sessions == 0 and factory.per_client == {}


@pytest.mark.parametrize("fallback", ["refuse", "trust"])
def test_client_leaves_while_identd_connection_is_pending(fallback):
    """The client goes away before socksd reached its identd: the lookup is
    abandoned, and nothing is connected or written on the client's behalf."""
    factory, reactor = make_factory(Socks4Policy(userid="ident", ident_fallback=fallback))
    client = Client(factory, False)
    client.send(CONNECT_FRED)
    identd = Identd(reactor)
    client.lose()
    assert identd.disconnected
    assert destinations(reactor) == [], "connected to the destination for a client that left"
    assert client.take() == b""
    assert factory.sessions == 0 and factory.per_client == {}


# Rules: versions and verified.


def test_rule_for_socks5_only_denies_socks4(bytewise):
    rules = RuleSet([compile_rule("v5", "allow", versions=[5])])
    factory, reactor = make_factory(rules=rules)
    client = Client(factory, bytewise)
    line = refused_session_line(client, [CONNECT_FRED], REJECTED)
    assert reactor.tcpClients == []
    assert "socks4" in line and "denied" in line


def test_rule_denying_socks4_before_allow_all(bytewise):
    rules = RuleSet([compile_rule("no-v4", "deny", versions=[4]),
                     compile_rule("rest", "allow")])
    assert_4a_denied_before_resolution(rules, bytewise)


def test_rule_for_socks4_allows_socks4(bytewise):
    rules = RuleSet([compile_rule("v4", "allow", versions=[4])])
    factory, reactor = make_factory(rules=rules)
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED)
    granted(client, reactor)


def test_rule_with_users_matches_userid_only_when_it_accepts_claims(bytewise):
    """A trusted USERID is a claim: a rule naming fred matches it only with
    verified = "any" (anyone can type fred)."""
    rules = RuleSet([compile_rule("fred", "allow", users=["fred"], verified="any")])
    factory, reactor = make_factory(rules=rules)
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED)
    granted(client, reactor)
    other = Client(factory, bytewise)
    other.send(b"\x04\x01\x00\x50\x5d\xb8\xd8\x22barney\x00")
    assert other.take() == REJECTED


@pytest.mark.parametrize("policy", ["trust", "whitelist"])
def test_rule_naming_a_user_does_not_match_a_claimed_userid(bytewise, policy):
    rules = RuleSet([compile_rule("fred", "allow", users=["fred"])])
    factory, reactor = make_factory(WHITELIST if policy == "whitelist" else Socks4Policy(),
                                    rules=rules)
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED)
    assert client.take() == REJECTED
    assert reactor.tcpClients == []


VERIFIED_ONLY = RuleSet([compile_rule("verified", "allow", verified=True)])


def test_verified_rule_refuses_trusted_userid(bytewise):
    factory, reactor = make_factory(rules=VERIFIED_ONLY)
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED)
    assert client.take() == REJECTED
    assert reactor.tcpClients == []


def test_verified_rule_refuses_whitelisted_userid(bytewise):
    factory, reactor = make_factory(WHITELIST, rules=VERIFIED_ONLY)
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED)
    assert client.take() == REJECTED


def test_verified_rule_allows_ident_verified_user(bytewise):
    factory, reactor = make_factory(IDENT, rules=VERIFIED_ONLY)
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED)
    answer_identd(reactor, ident_userid("fred"))
    granted(client, reactor)


def test_verified_rule_refuses_ident_fallback_trust(bytewise):
    policy = Socks4Policy(userid="ident", ident_fallback="trust")
    factory, reactor = make_factory(policy, rules=VERIFIED_ONLY)
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED)
    Identd(reactor).refuse()
    assert client.take() == REJECTED
    assert destinations(reactor) == []


def test_unverified_rule_matches_only_unverified(bytewise):
    rules = RuleSet([compile_rule("unverified", "allow", verified=False)])
    factory, reactor = make_factory(IDENT, rules=rules)
    client = Client(factory, bytewise)
    client.send(CONNECT_FRED)
    answer_identd(reactor, ident_userid("fred"))
    assert client.take() == REJECTED
    assert destinations(reactor) == []


def test_socks5_on_the_same_listener_still_works():
    factory, reactor = make_factory(IDENT)
    client = Client(factory, False)
    client.send(b"\x05\x01\x00")
    assert client.take() == b"\x05\x00"
    client.send(b"\x05\x01\x00\x01\x5d\xb8\xd8\x22\x00\x50")
    assert _connections(reactor, ident=True) == []
    Outbound(reactor).accept()
    assert client.take() == b"\x05\x00\x00\x01\x0a\x00\x00\x05\xc7\x38"
