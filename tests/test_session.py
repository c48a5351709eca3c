"""Protocol tests of the SOCKS5 session (socksd.proxy) over in-memory transports.

Every exchange is fed both one byte at a time and one message at a time; the
replies are compared byte for byte with RFC 1928 / RFC 1929.
"""

from __future__ import annotations

import errno

import pytest
from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from fakes import (
    Client,
    HalfCloseTransport,
    Outbound,
    alice_portal,
    assert_closes_at,
    assert_refused,
    failure_reply,
    make_factory,
    refused_session_line,
    relay_until_far_end_closes,
    session_lines,
    socks5_client,
)
from socksd import relay
from socksd.auth.registry import method_registry
from socksd.proxy import Limits
from socksd.rules import RuleSet, compile_rule

GREETING_NONE = b"\x05\x01\x00"
GREETING_USERPASS = b"\x05\x01\x02"
AUTH_ALICE = b"\x01\x05alice\x06secret"
AUTH_ALICE_WRONG = b"\x01\x05alice\x05wrong"
# CONNECT 93.184.216.34:80
CONNECT_IP = b"\x05\x01\x00\x01\x5d\xb8\xd8\x22\x00\x50"
# CONNECT example.com:443
CONNECT_NAME = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
# Success with BND.ADDR 10.0.0.5, BND.PORT 51000.
SUCCESS_BOUND = b"\x05\x00\x00\x01\x0a\x00\x00\x05\xc7\x38"


def userpass_methods(*names: str):
    registry = method_registry(alice_portal())
    return [registry[name] for name in names]


def connected(factory) -> tuple[Client, Outbound]:
    """A client whose CONNECT 93.184.216.34:80 the destination has accepted."""
    client = socks5_client(factory, CONNECT_IP)
    out = Outbound(factory.reactor)
    out.accept()
    return client, out


# Method selection.


def test_method_none(bytewise):
    factory, _ = make_factory()
    client = Client(factory, bytewise)
    client.send(GREETING_NONE)
    assert client.take() == b"\x05\x00"
    assert not client.closing


def test_method_none_among_several_offered(bytewise):
    factory, _ = make_factory()
    client = Client(factory, bytewise)
    client.send(b"\x05\x03\x01\x02\x00")
    assert client.take() == b"\x05\x00"
    assert not client.closing


def test_no_acceptable_method(bytewise):
    factory, _ = make_factory()
    client = Client(factory, bytewise)
    line = refused_session_line(client, [b"\x05\x02\x01\x02"], b"\x05\xff")
    assert "no acceptable method" in line
    assert "127.0.0.1:40000" in line


def test_userpass_required_but_only_none_offered(bytewise):
    factory, _ = make_factory(methods=userpass_methods("userpass"))
    client = Client(factory, bytewise)
    client.send(GREETING_NONE)
    assert_refused(client, b"\x05\xff")


def test_server_preference_order_wins(bytewise):
    factory, _ = make_factory(methods=userpass_methods("userpass", "none"))
    client = Client(factory, bytewise)
    client.send(b"\x05\x02\x00\x02")
    assert client.take() == b"\x05\x02"


@pytest.mark.parametrize("first, said", [
    (b"GET / HTTP/1.1\r\n\r\n", "not SOCKS (looks like HTTP)"),
    (b"CONNECT example.org:443 HTTP/1.1\r\n\r\n", "not SOCKS (looks like HTTP)"),
    (b"\x16\x03\x01\x02\x00\x01", "not SOCKS (looks like TLS)"),
    (b"\x07\x01", "unsupported SOCKS version 7"),
])
def test_not_socks_is_closed_without_reply_and_said_so(bytewise, first, said):
    factory, _ = make_factory()
    client = Client(factory, bytewise)
    with capturedLogs() as events:
        client.send(first)
        assert client.take() == b""
        assert client.closing
        client.lose()
    [line] = session_lines(events)
    assert line.endswith(f"bad request: {said}"), line


# RFC 1929 username/password.


def test_userpass_success(bytewise):
    factory, reactor = make_factory(methods=userpass_methods("userpass"))
    client = Client(factory, bytewise)
    client.send(GREETING_USERPASS)
    assert client.take() == b"\x05\x02"
    client.send(AUTH_ALICE)
    assert client.take() == b"\x01\x00"
    assert not client.closing
    assert client.session.user.name == "alice"
    assert client.session.user.verified
    client.send(CONNECT_IP)
    assert len(reactor.tcpClients) == 1


def test_userpass_failure(bytewise):
    factory, reactor = make_factory(methods=userpass_methods("userpass"))
    client = Client(factory, bytewise)
    with capturedLogs() as events:
        client.send(GREETING_USERPASS)
        assert client.take() == b"\x05\x02"
        client.send(AUTH_ALICE_WRONG)
        assert_refused(client, b"\x01\x01")
        client.send(CONNECT_IP)
        assert client.take() == b""
        assert reactor.tcpClients == []
        client.lose()
    [line] = session_lines(events)
    assert "auth failed" in line
    assert "user=alice" in line
    assert "127.0.0.1:40000" in line
    assert "method=userpass" in line
    for event in events:
        assert "wrong" not in repr(event)
        assert "wrong" not in (formatEvent(event) or "")


def test_userpass_unknown_user_logs_name_not_password(bytewise):
    factory, _ = make_factory(methods=userpass_methods("userpass"))
    client = Client(factory, bytewise)
    with capturedLogs() as events:
        client.send(GREETING_USERPASS)
        client.send(b"\x01\x03bob\x0chunter2hunter")
        assert_refused(client, b"\x05\x02\x01\x01")
        client.lose()
    [line] = session_lines(events)
    assert "user=bob" in line and "auth failed" in line
    for event in events:
        assert "hunter2" not in repr(event)


def test_userpass_bad_subnegotiation_version(bytewise):
    factory, _ = make_factory(methods=userpass_methods("userpass"))
    client = Client(factory, bytewise)
    client.send(GREETING_USERPASS)
    assert client.take() == b"\x05\x02"
    client.send(b"\x05\x05alice\x06secret")
    assert_refused(client, b"\x01\x01")


def test_userpass_success_log_line():
    factory, reactor = make_factory(methods=userpass_methods("userpass"))
    client = Client(factory, False)
    with capturedLogs() as events:
        client.send(GREETING_USERPASS + AUTH_ALICE)
        assert client.take() == b"\x05\x02\x01\x00"
        client.send(CONNECT_IP)
        out = Outbound(reactor)
        out.accept()
        assert client.take() == SUCCESS_BOUND
        out.protocol.connectionLost(Failure(error.ConnectionDone()))
        client.lose()
    [line] = session_lines(events)
    assert "user=alice" in line and "method=userpass" in line and line.endswith(" ok")
    for event in events:
        assert "secret" not in repr(event)


# CONNECT.


def test_connect_ip_reply_and_relay(bytewise):
    factory, reactor = make_factory()
    with capturedLogs() as events:
        client = socks5_client(factory, CONNECT_IP, bytewise)
        assert client.take() == b""
        assert len(reactor.tcpClients) == 1
        out = Outbound(reactor)
        assert (out.host, out.port, out.timeout, out.bind) == ("93.184.216.34", 80, 30, None)
        out.accept()
        assert client.take() == SUCCESS_BOUND
        assert not client.closing
        relay_until_far_end_closes(client, out)
        client.lose()
    [line] = session_lines(events)
    assert "127.0.0.1:40000" in line
    assert "connect 93.184.216.34:80" in line
    assert "up=5" in line and "down=6" in line
    assert line.endswith(" ok")


def test_connect_ipv6_destination_and_bound_address(bytewise):
    factory, reactor = make_factory()
    client = socks5_client(factory, b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + b"\x1f\x90",
                           bytewise)
    out = Outbound(reactor, bound=IPv6Address("TCP", "2001:db8::7", 443))
    assert (out.host, out.port) == ("::1", 8080)
    out.accept()
    assert client.take() == (b"\x05\x00\x00\x04" + b"\x20\x01\x0d\xb8" + bytes(11) + b"\x07"
                             + b"\x01\xbb")


def test_connect_early_data_is_relayed_after_reply(bytewise):
    factory, reactor = make_factory()
    client = socks5_client(factory, CONNECT_IP + b"early", bytewise)
    out = Outbound(reactor)
    out.accept()
    assert client.take() == SUCCESS_BOUND
    assert out.transport.value() == b"early"


def test_greeting_and_request_pipelined_with_method_none():
    """A client may send its request without waiting for the method selection."""
    factory, reactor = make_factory()
    client = Client(factory, False)
    client.send(GREETING_NONE + CONNECT_IP)
    assert client.take() == b"\x05\x00"
    assert len(reactor.tcpClients) == 1, "the pipelined request was dropped"
    out = Outbound(reactor)
    out.accept()
    assert client.take() == SUCCESS_BOUND


def test_greeting_auth_and_request_pipelined_with_userpass():
    factory, reactor = make_factory(methods=userpass_methods("userpass"))
    client = Client(factory, False)
    client.send(GREETING_USERPASS + AUTH_ALICE + CONNECT_IP)
    assert client.take() == b"\x05\x02\x01\x00"
    assert len(reactor.tcpClients) == 1
    out = Outbound(reactor)
    out.accept()
    assert client.take() == SUCCESS_BOUND


@pytest.mark.parametrize("exc, code", [
    (error.ConnectionRefusedError(), 0x05),
    (error.NoRouteError(), 0x03),
    (error.ConnectError(osError=errno.EHOSTUNREACH), 0x04),
    (error.ConnectError(osError=errno.ENETUNREACH), 0x03),
    (error.TimeoutError(), 0x06),
    (error.TCPTimedOutError(), 0x06),
    (error.ConnectError(osError=errno.EPERM), 0x01),
], ids=["refused", "no-route", "host-unreachable", "net-unreachable", "timeout",
        "tcp-timeout", "other"])
def test_connect_failure_reply_codes(bytewise, exc, code):
    factory, reactor = make_factory()
    client = Client(factory, bytewise)
    line = refused_session_line(client, [GREETING_NONE, CONNECT_IP],
                                b"\x05\x00" + failure_reply(code),
                                after_send=lambda: Outbound(reactor).refuse(exc))
    assert "connect failed" in line and "93.184.216.34:80" in line


def test_denied_request(bytewise):
    rules = RuleSet([compile_rule("no-web", "deny", ports=["80"]),
                     compile_rule("rest", "allow")])
    factory, reactor = make_factory(rules=rules)
    client = Client(factory, bytewise)
    line = refused_session_line(client, [GREETING_NONE, CONNECT_IP],
                                b"\x05\x00" + failure_reply(0x02))
    assert reactor.tcpClients == []
    assert line.endswith(" denied: no-web (deny)"), line   # the word once


def test_default_rules_deny_non_loopback_client(bytewise):
    factory, reactor = make_factory()
    client = socks5_client(factory, CONNECT_IP, bytewise,
                           peer=IPv4Address("TCP", "10.1.2.3", 5555))
    assert client.take() == failure_reply(0x02)
    assert reactor.tcpClients == []


def test_client_leaves_while_connecting_abandons_attempt():
    factory, reactor = make_factory()
    client = socks5_client(factory, CONNECT_IP)
    out = Outbound(reactor)
    client.take()
    client.lose()
    assert out.connector._disconnected
    assert client.take() == b""
    assert factory.sessions == 0


# Unsupported commands and malformed requests.


# Each malformed request gets its reply code (commands other than CONNECT,
# BIND and UDP ASSOCIATE 0x07; RSV not 0 or a bad version 0x01; an unknown
# ATYP 0x08), then the close, and nothing is connected.
BAD_REQUESTS = [
    *(pytest.param(bytes((5, command)) + CONNECT_IP[2:], 0x07, id=f"command-{command:#04x}")
      for command in (0x00, 0x04, 0x09, 0xFF)),
    pytest.param(b"\x05\x01\x01" + CONNECT_IP[3:], 0x01, id="rsv-not-zero"),
    *(pytest.param(bytes((5, 1, 0, atyp)) + CONNECT_IP[4:], 0x08, id=f"atyp-{atyp:#04x}")
      for atyp in (0x00, 0x02, 0x05, 0xFF)),
    pytest.param(b"\x04" + CONNECT_IP[1:], 0x01, id="request-version-4"),
]


@pytest.mark.parametrize("request_bytes, reply", BAD_REQUESTS)
def test_bad_request_gets_its_reply(bytewise, request_bytes, reply):
    factory, reactor = make_factory()
    client = socks5_client(factory, request_bytes, bytewise)
    assert_refused(client, failure_reply(reply))
    assert reactor.tcpClients == []


# Timeouts and limits.


def test_handshake_timeout_closes():
    factory, reactor = make_factory(limits=Limits(handshake_timeout=10))
    client = Client(factory, True)
    with capturedLogs() as events:
        client.send(GREETING_NONE)
        client.send(CONNECT_IP[:4])
        assert_closes_at(client, reactor, 10)
        client.lose()
    [line] = session_lines(events)
    assert "handshake timeout" in line and "127.0.0.1:40000" in line


def test_handshake_timeout_without_any_bytes():
    factory, reactor = make_factory()
    client = Client(factory, True)
    reactor.advance(30)
    assert client.closing
    assert client.take() == b""


def test_no_handshake_timeout_after_relay_starts():
    factory, reactor = make_factory(limits=Limits(handshake_timeout=10))
    client, _out = connected(factory)
    reactor.advance(100)
    assert not client.closing


@pytest.mark.parametrize("worker, prefix", [(None, ""), (3, "w3 ")])
def test_max_sessions_refusal_line(worker, prefix):
    """Over max_sessions a connection is refused before anything is read (no
    Session at all), with one line saying so; a closed session frees a place."""
    factory, _ = make_factory(limits=Limits(max_sessions=2), worker=worker)
    first, second = Client(factory), Client(factory)
    with capturedLogs() as events:
        third = Client(factory, peer=IPv4Address("TCP", "127.0.0.9", 40009))
    assert third.session is None
    [line] = [formatEvent(e) for e in events]
    assert line == f"{prefix}refused 127.0.0.9:40009: max_sessions (2) reached"
    assert not first.closing and not second.closing
    first.lose()
    assert Client(factory).session is not None


def test_a_flood_of_max_sessions_refusals_is_not_a_flood_of_log():
    factory, reactor = make_factory(limits=Limits(max_sessions=1))
    Client(factory)
    with capturedLogs() as events:
        for port in range(40000, 40100):
            assert Client(factory, peer=IPv4Address("TCP", "127.0.0.9", port)).session is None
        reactor.advance(1.0)
        assert Client(factory, peer=IPv4Address("TCP", "127.0.0.9", 41000)).session is None
        reactor.advance(1.0)
    assert [formatEvent(e) for e in events] == [
        "refused 127.0.0.9:40000: max_sessions (1) reached",
        "refused 99 more in the last second: max_sessions (1) reached",
        "refused 127.0.0.9:41000: max_sessions (1) reached"]
    # The first client's handshake timeout is left, nothing of the refusals.
    assert factory.refusals._counted not in [call.func for call in reactor.getDelayedCalls()]


def test_refusals_for_one_client_do_not_use_up_max_sessions():
    """Connections refused for max_sessions_per_client, still closing, do
    not count against max_sessions: another client still gets in."""
    factory, _ = make_factory(limits=Limits(max_sessions=3, max_sessions_per_client=1))
    first = Client(factory)
    refused = [Client(factory) for _ in range(5)]
    assert all(client.closing for client in refused)
    other = Client(factory, peer=IPv4Address("TCP", "127.0.0.2", 40001))
    assert other.session is not None and not other.closing
    assert factory.sessions == 2
    for client in refused:
        client.lose()
    first.lose()
    other.lose()
    assert factory.sessions == 0 and factory.per_client == {}


def test_max_sessions_per_client(bytewise):
    factory, _ = make_factory(limits=Limits(max_sessions_per_client=2))
    first = Client(factory, bytewise)
    second = Client(factory, bytewise)
    with capturedLogs() as events:
        third = Client(factory, bytewise)
        assert third.closing
        third.send(GREETING_NONE)
        assert third.take() == b""
        third.lose()
    [line] = session_lines(events)
    assert "refused" in line and "max_sessions_per_client" in line
    for client in (first, second):
        assert not client.closing
        client.send(GREETING_NONE)
        assert client.take() == b"\x05\x00"
    other = Client(factory, bytewise, peer=IPv4Address("TCP", "127.0.0.2", 40001))
    assert not other.closing
    # A closed session frees its place.
    first.lose()
    fourth = Client(factory, bytewise)
    assert not fourth.closing


def test_max_sessions():
    factory, _ = make_factory(limits=Limits(max_sessions=2))
    first = Client(factory, False)
    Client(factory, False, peer=IPv4Address("TCP", "127.0.0.2", 1))
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.3", 2)) is None
    first.lose()
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.3", 2)) is not None


def test_idle_timeout_after_relay():
    factory, reactor = make_factory(limits=Limits(idle_timeout=5))
    client, out = connected(factory)
    with capturedLogs() as events:
        reactor.advance(4)
        client.send(b"ping")
        reactor.advance(4)
        out.protocol.dataReceived(b"pong")
        reactor.advance(4)
        assert not client.closing and not out.transport.disconnecting
        reactor.advance(1.1)
        assert client.closing and out.transport.disconnecting
        out.protocol.connectionLost(Failure(error.ConnectionLost()))
        client.lose()
    [line] = session_lines(events)
    assert "idle timeout" in line and "up=4" in line and "down=4" in line


@pytest.mark.parametrize("side", ["client", "destination"])
def test_a_reset_during_the_relay_is_one_connection_lost_line(side):
    """A reset (not a clean close) ends the session with one line saying so,
    and no traceback; the kernel's splice path is in test_clients."""
    factory, reactor = make_factory()
    client, out = connected(factory)
    client.take()
    reset = Failure(error.ConnectionLost())
    with capturedLogs() as events:
        client.send(b"request")
        out.protocol.dataReceived(b"reply")
        if side == "client":
            client.session.connectionLost(reset)
            assert out.transport.disconnecting
            out.protocol.connectionLost(Failure(error.ConnectionDone()))
        else:
            out.protocol.connectionLost(reset)
            assert client.closing
            client.lose()
    [line] = session_lines(events)
    assert f" connection lost: {reset.getErrorMessage()}" in line, line
    assert "up=7 down=5" in line, line
    assert not [e for e in events if "log_failure" in e], events


# Stalls: a receiver that takes nothing ends the session at stall_timeout, even
# with idle_timeout 0; one that drains, however slowly, does not. The kernel's
# part (real buffers, the splice path) is in test_clients (integration).


class HoldingTransport(HalfCloseTransport):
    """A send buffer that holds what the test says, reported by
    socksd.relay.buffered as Twisted's FileDescriptor's is (see held_bytes);
    like FileDescriptor, it pauses its streaming producer when full and
    resumes it once empty."""

    held = 0

    def fill(self, n: int = 65536) -> None:
        self.held += n
        self.producer.pauseProducing()

    def drain(self, n: int | None = None) -> None:
        self.held -= self.held if n is None else n
        if self.held == 0:
            self.producer.resumeProducing()


@pytest.fixture(autouse=True)
def held_bytes(monkeypatch):
    """relay.buffered reads a FileDescriptor's private buffer (checked against
    the real one in test_twisted_internals); a HoldingTransport says its own."""
    real = relay.buffered
    monkeypatch.setattr(relay, "buffered", lambda transport: transport.held if isinstance(
        transport, HoldingTransport) else real(transport))


class HoldingClient(Client):
    transport_factory = HoldingTransport


class HoldingOutbound(Outbound):
    transport_factory = HoldingTransport


def holding_session(side: str):
    """A relaying session (stall_timeout 1 s, no idle timeout) and the
    transport of its receiving ``side`` ("client" or "destination")."""
    factory, reactor = make_factory(limits=Limits(stall_timeout=1.0))
    client = HoldingClient(factory)
    client.send(GREETING_NONE)
    client.send(CONNECT_IP)
    out = HoldingOutbound(reactor)
    out.accept()
    assert client.take() == b"\x05\x00" + SUCCESS_BOUND
    return reactor, client, out, (client.transport if side == "client" else out.transport)


def end_session(client, out) -> None:
    out.protocol.connectionLost(Failure(error.ConnectionAborted()))
    client.session.connectionLost(Failure(error.ConnectionAborted()))


@pytest.mark.parametrize("side", ["client", "destination"])
def test_a_receiver_that_takes_nothing_ends_at_stall_timeout(side):
    reactor, client, out, receiver = holding_session(side)
    with capturedLogs() as events:
        receiver.fill()
        reactor.advance(0.9)
        assert not client.closing and not out.transport.disconnecting
        reactor.advance(0.2)
        assert client.transport.disconnected and out.transport.disconnected   # aborted
        end_session(client, out)
    [line] = session_lines(events)
    assert " stalled: a receiver took nothing for 1 s" in line, line


@pytest.mark.parametrize("side", ["client", "destination"])
def test_a_slow_reader_is_not_a_stall(side):
    """It empties its buffer in bursts with pauses, and the sender fills it
    again at once; stopped, it is a stall."""
    reactor, client, out, receiver = holding_session(side)
    with capturedLogs() as events:
        receiver.fill()
        for _ in range(10):
            reactor.advance(0.4)
            receiver.drain()
            receiver.fill()
        assert not client.closing and not out.transport.disconnecting
        reactor.pump([0.1] * 21)   # two looks: the first may still see the last drain
        assert client.transport.disconnected and out.transport.disconnected   # aborted
        end_session(client, out)
    [line] = session_lines(events)
    assert " stalled: " in line, line


@pytest.mark.parametrize("side", ["client", "destination"])
def test_a_receiver_that_takes_a_little_at_a_time_is_not_a_stall(side):
    """Its buffer never empties (no resume), but it shrinks between looks."""
    reactor, client, out, receiver = holding_session(side)
    with capturedLogs() as events:
        receiver.fill()
        for _ in range(10):
            reactor.advance(0.4)
            receiver.drain(1000)
        assert not client.closing and not out.transport.disconnecting
        reactor.pump([0.1] * 21)   # two looks: the first may still see the last drain
        assert client.transport.disconnected and out.transport.disconnected   # aborted
        end_session(client, out)
    [line] = session_lines(events)
    assert " stalled: " in line, line


def test_a_drained_receiver_leaves_no_stall_check():
    """Once nothing is held, nothing is watched: an idle session stays open."""
    reactor, client, out, receiver = holding_session("client")
    receiver.fill()
    receiver.drain()
    reactor.advance(1.1)
    assert not reactor.getDelayedCalls()
    assert not client.closing and not out.transport.disconnecting


def test_relay_half_close_both_ways():
    factory, reactor = make_factory()
    client, out = connected(factory)
    client.take()
    client.send(b"request")
    client.session.readConnectionLost()
    assert out.transport.value() == b"request"
    assert out.transport.write_closed and not out.transport.disconnecting
    out.protocol.dataReceived(b"response")
    assert client.take() == b"response"
    out.protocol.readConnectionLost()
    assert client.closing and out.transport.disconnecting


def test_eof_right_after_request_is_passed_on_once_connected():
    """A client that sends request, data and EOF at once (nc -N < file) loses
    nothing: the data and the half-close reach the destination."""
    factory, reactor = make_factory()
    client = Client(factory, False)
    client.send(GREETING_NONE + CONNECT_IP + b"all of it")
    client.session.readConnectionLost()
    assert not client.closing
    out = Outbound(reactor)
    out.accept()
    assert client.take() == GREETING_NONE[:1] + b"\x00" + SUCCESS_BOUND
    assert out.transport.value() == b"all of it"
    assert out.transport.write_closed and not out.transport.disconnecting
    out.protocol.dataReceived(b"answer")
    assert client.take() == b"answer"


def test_eof_during_greeting_closes():
    factory, reactor = make_factory()
    client = Client(factory, False)
    client.send(GREETING_NONE[:2])
    client.session.readConnectionLost()
    assert client.closing and not reactor.tcpClients


@pytest.mark.parametrize("prefix,second_refused", [(64, True), (128, False), (48, True)])
def test_an_ipv6_client_is_counted_per_prefix(prefix, second_refused):
    """One host holds a whole /64: per address it would get a fresh share of
    max_sessions_per_client (and of lookups) for every address it picks."""
    factory, _ = make_factory(limits=Limits(max_sessions_per_client=1,
                                            ipv6_client_prefix=prefix))
    first = Client(factory, False, peer=IPv6Address("TCP", "2001:db8:0:1::1", 40001))
    second = Client(factory, False, peer=IPv6Address("TCP", "2001:db8:0:1:ffff::2", 40002))
    other_net = Client(factory, False, peer=IPv6Address("TCP", "2001:db8:0:2::1", 40003))
    assert not first.closing and second.closing == second_refused
    assert other_net.closing == (prefix == 48)
    assert first.session.client_key == ("2001:db8:0:1::1" if prefix == 128 else
                                        "2001:db8:0:1::/64" if prefix == 64 else "2001:db8::/48")


def test_v4_mapped_peer_counts_as_ipv4():
    factory, _ = make_factory(limits=Limits(max_sessions_per_client=1))
    first = Client(factory, False)
    second = Client(factory, False, peer=IPv6Address("TCP", "::ffff:127.0.0.1", 40002))
    assert not first.closing
    assert second.closing


# CONNECT by name: resolution through the reactor's resolver.


def test_connect_name_resolves_through_reactor_resolver(bytewise):
    factory, reactor = make_factory()
    resolver = reactor.nameResolver
    with capturedLogs() as events:
        client = socks5_client(factory, CONNECT_NAME, bytewise)
        # Asked, not answered yet: nothing blocks, nothing is connected.
        assert [(name, port) for _r, name, port in resolver.queries] == [("example.com", 443)]
        assert reactor.tcpClients == []
        assert client.take() == b""
        resolver.answer("93.184.216.34", "2606:2800:220:1::1")
        out = Outbound(reactor)
        assert (out.host, out.port) == ("93.184.216.34", 443)
        out.accept()
        assert client.take() == SUCCESS_BOUND
        out.protocol.connectionLost(Failure(error.ConnectionDone()))
        client.lose()
    [line] = session_lines(events)
    assert "connect example.com:443" in line and line.endswith(" ok")


def test_connect_name_without_addresses(bytewise):
    factory, reactor = make_factory()
    client = socks5_client(factory, CONNECT_NAME, bytewise)
    reactor.nameResolver.answer()
    assert_refused(client, failure_reply(0x04))
    assert reactor.tcpClients == []


def test_connect_name_resolution_timeout():
    factory, reactor = make_factory(limits=Limits(handshake_timeout=60, connect_timeout=5))
    client = socks5_client(factory, CONNECT_NAME)
    reactor.advance(4.9)
    assert client.take() == b""
    reactor.advance(0.2)
    assert_refused(client, failure_reply(0x04))
    # A late answer changes nothing.
    reactor.nameResolver.answer("93.184.216.34")
    assert reactor.tcpClients == []


def test_connect_name_resolution_timeout_with_default_limits():
    """With the default limits a lookup that never answers must still get its
    failure reply (host unreachable), not a bare close by the handshake timer."""
    factory, reactor = make_factory()
    client = socks5_client(factory, CONNECT_NAME)
    reactor.advance(Limits().connect_timeout)
    assert_refused(client, failure_reply(0x04))


def test_connect_with_no_time_left_gets_ttl_expired():
    """A connect_timeout smaller than the clock's resolution leaves no time at
    all: the client still gets its reply (0x06), not a dropped connection."""
    factory, reactor = make_factory(limits=Limits(connect_timeout=1e-7))
    reactor.advance(1.7e9)   # now + 1e-7 == now in floating point
    client = socks5_client(factory, CONNECT_IP)
    assert_refused(client, failure_reply(0x06))
    assert reactor.tcpClients == []


def test_connect_name_tries_next_address():
    factory, reactor = make_factory()
    client = socks5_client(factory, CONNECT_NAME)
    reactor.nameResolver.answer("192.0.2.1", "192.0.2.2")
    Outbound(reactor, 0).refuse(error.ConnectionRefusedError())
    reactor.advance(0)     # the next address, on the reactor's next turn
    assert client.take() == b""
    assert len(reactor.tcpClients) == 2
    out = Outbound(reactor, 1)
    assert out.host == "192.0.2.2"
    out.accept()
    assert client.take() == SUCCESS_BOUND


def test_connect_name_all_addresses_fail_reports_last_failure():
    factory, reactor = make_factory()
    client = socks5_client(factory, CONNECT_NAME)
    reactor.nameResolver.answer("192.0.2.1", "192.0.2.2")
    Outbound(reactor, 0).refuse(error.TimeoutError())
    reactor.advance(0)
    Outbound(reactor, 1).refuse(error.ConnectionRefusedError())
    assert_refused(client, failure_reply(0x05))


def test_connect_name_denied_by_resolved_address(bytewise):
    rules = RuleSet([compile_rule("no-private", "deny", destinations=["10.0.0.0/8"]),
                     compile_rule("rest", "allow")])
    factory, reactor = make_factory(rules=rules)
    client = socks5_client(factory, CONNECT_NAME, bytewise)
    assert len(reactor.nameResolver.queries) == 1
    reactor.nameResolver.answer("10.9.9.9")
    assert_refused(client, failure_reply(0x02))
    assert reactor.tcpClients == []


def test_connect_name_denied_before_resolution(bytewise):
    rules = RuleSet([compile_rule("no-example", "deny", destinations=[".example.com"]),
                     compile_rule("rest", "allow")])
    factory, reactor = make_factory(rules=rules)
    client = socks5_client(factory, CONNECT_NAME, bytewise)
    assert client.take() == failure_reply(0x02)
    assert reactor.nameResolver.queries == []
    assert reactor.tcpClients == []


def test_client_leaves_while_resolving():
    factory, reactor = make_factory()
    client = socks5_client(factory, CONNECT_NAME)
    client.take()
    client.lose()
    reactor.nameResolver.answer("93.184.216.34")
    assert reactor.tcpClients == []
    assert client.take() == b""
    assert factory.sessions == 0 and factory.per_client == {}


def test_ipv6_peer_in_log_line():
    factory, reactor = make_factory()
    client = Client(factory, False, peer=IPv6Address("TCP", "::1", 40000))
    line = refused_session_line(client, [GREETING_NONE, b"\x05\x09\x00\x01" + bytes(6)],
                                b"\x05\x00" + failure_reply(0x07))
    assert "[::1]:40000" in line and "command not supported" in line and "0x09" in line


def test_an_ended_session_is_freed_without_the_garbage_collector():
    """No reference cycle outlives a relayed session (its relay, its ends):
    thousands of short sessions must not wait for the collector's pass."""
    import gc
    import weakref

    factory, reactor = make_factory(limits=Limits(splice=False))
    client = Client(factory)
    client.send(GREETING_NONE)
    client.send(CONNECT_IP)
    out = Outbound(reactor)
    out.accept()
    session = weakref.ref(client.session)
    gc.disable()
    try:
        out.protocol.connectionLost(Failure(error.ConnectionDone()))
        client.session.connectionLost(Failure(error.ConnectionDone()))
        # What Twisted's connections drop when they close.
        client.transport.producer = out.transport.producer = None
        client.transport.protocol = out.transport.protocol = None
        client.session = out.protocol = None
        assert session() is None, [type(r) for r in gc.get_referrers(session())]
    finally:
        gc.enable()
