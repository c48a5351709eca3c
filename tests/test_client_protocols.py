"""The client handshakes in memory, the proxy's side played by hand over a
StringTransport: HTTP CONNECT's request, its status mapping and its bound on
the response header; the bytes that come with an answer; BIND's two replies
in one read; half-closes after the hand-over; and fed a byte at a time."""

from __future__ import annotations

import base64

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from socksd.client import DestinationFailed, SOCKS5Auth, SOCKSError, http, socks4, socks5
from socksd.wire import socks4 as wire4
from socksd.wire import socks5 as wire5

# The handshakes' timeouts run here, not on the global reactor: a test
# that leaves one unanswered leaves no timer behind.
CLOCK = task.Clock()


class HandPlayedProxy:
    """An endpoint whose one connection is a StringTransport that delivers
    to ``transport.protocol``, as a socket does."""

    def __init__(self) -> None:
        self.transport: StringTransport | None = None

    def connect(self, factory):
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 1080))
        self.transport.protocol = factory.buildProtocol(self.transport.getPeer())
        self.transport.protocol.makeConnection(self.transport)
        return defer.succeed(self.transport.protocol)

    def receive(self, data: bytes, bytewise: bool = False) -> None:
        assert self.transport is not None
        pieces = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
        for piece in pieces:
            self.transport.protocol.dataReceived(piece)

    def take(self) -> bytes:
        assert self.transport is not None
        value = self.transport.value()
        self.transport.clear()
        return value


@implementer(IHalfCloseableProtocol)
class App(Protocol):
    """Notes what it is told, and what it had read when its Deferred fired."""

    def __init__(self) -> None:
        self.received = b""
        self.eof = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.eof = True

    def writeConnectionLost(self) -> None:
        pass


def failure_of(d: defer.Deferred) -> Exception:
    failures: list = []
    d.addErrback(failures.append)
    assert failures, f"not failed: {d!r}"
    return failures[0].value


def fired(d: defer.Deferred):
    results: list = []
    d.addCallback(results.append)
    assert results, f"not fired: {d!r}"
    return results[0]


# HTTP CONNECT.


def test_http_request_with_basic_credentials():
    assert http.encode_request("example.com", 443, "user", "pa:ss") == (
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"
        b"Proxy-Authorization: Basic " + base64.b64encode(b"user:pa:ss") + b"\r\n\r\n")
    assert http.encode_request("2001:db8::1", 80).startswith(
        b"CONNECT [2001:db8::1]:80 HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n")


@pytest.mark.parametrize("host", ["evil\r\nX-Injected: 1", "a b", "a/b", "", "ä.example"])
def test_http_refuses_a_host_that_could_break_the_request(host):
    proxy = HandPlayedProxy()
    error = failure_of(http.connect(proxy, host, 80, Factory.forProtocol(App), 5,
                       clock=CLOCK))
    assert isinstance(error, DestinationFailed)
    assert error.reply == wire5.ADDRESS_TYPE_NOT_SUPPORTED
    assert proxy.transport is None      # never connected
    assert "\r" not in str(error) and "\n" not in str(error)


@pytest.mark.parametrize("bytewise", [False, True])
def test_http_tunnel_gets_what_followed_the_header(bytewise):
    proxy = HandPlayedProxy()
    d = http.connect(proxy, "example.com", 443, Factory.forProtocol(App), 5,
                       clock=CLOCK)
    assert proxy.take().startswith(b"CONNECT example.com:443 HTTP/1.1\r\n")
    seen: list[bytes] = []
    d.addCallback(lambda app: seen.append(app.received) or app)
    proxy.receive(b"HTTP/1.1 200 Connection established\r\nProxy-Agent: x\r\n\r\nEARLY",
                  bytewise)
    app = fired(d)
    # Told first, then given the bytes, as from a connection of its own.
    assert seen == [b""] and app.received == b"EARLY"
    app.transport.write(b"tunnelled")
    assert proxy.take() == b"tunnelled"
    proxy.receive(b" and more")
    assert app.received == b"EARLY and more"


@pytest.mark.parametrize("status, kind, reply", [
    (403, DestinationFailed, wire5.NOT_ALLOWED),
    (502, DestinationFailed, wire5.HOST_UNREACHABLE),
    (504, DestinationFailed, wire5.HOST_UNREACHABLE),
    (500, DestinationFailed, wire5.GENERAL_FAILURE),
    (407, SOCKSError, 407),
])
def test_http_statuses(status, kind, reply):
    proxy = HandPlayedProxy()
    d = http.connect(proxy, "example.com", 443, Factory.forProtocol(App), 5,
                       clock=CLOCK)
    proxy.receive(f"HTTP/1.0 {status} Some Reason\r\n\r\n<html>".encode())
    error = failure_of(d)
    assert type(error) is kind and error.reply == reply
    assert f"{status} Some Reason" in str(error)
    assert proxy.transport.disconnecting


def test_http_reason_is_escaped():
    proxy = HandPlayedProxy()
    d = http.connect(proxy, "example.com", 443, Factory.forProtocol(App), 5,
                       clock=CLOCK)
    proxy.receive(b"HTTP/1.1 403 \x1b[31mred\x1b[0m\r\n\r\n")
    assert "\x1b" not in str(failure_of(d))


def test_http_response_header_is_bounded():
    """A header that never ends is refused once past MAX_HEADER: what is
    held never grows past that and one read."""
    proxy = HandPlayedProxy()
    d = http.connect(proxy, "example.com", 443, Factory.forProtocol(App), 5,
                       clock=CLOCK)
    proxy.receive(b"HTTP/1.1 200 OK\r\n")
    handshake = proxy.transport.protocol
    chunk = b"X-Padding: " + b"y" * 1000 + b"\r\n"
    sent = 0
    while not d.called:
        proxy.receive(chunk)
        sent += len(chunk)
        assert len(handshake.buffer) <= http.MAX_HEADER + len(chunk)
        assert sent < 2 * http.MAX_HEADER, "never refused"
    error = failure_of(d)
    assert isinstance(error, SOCKSError) and f"more than {http.MAX_HEADER} bytes" in str(error)
    assert proxy.transport.disconnecting
    proxy.receive(b"\r\n\r\n" + chunk)      # whatever comes after is not kept
    assert len(handshake.buffer) <= http.MAX_HEADER + len(chunk)


def test_http_not_http():
    proxy = HandPlayedProxy()
    d = http.connect(proxy, "example.com", 443, Factory.forProtocol(App), 5,
                       clock=CLOCK)
    proxy.receive(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    assert "not an HTTP response: SSH-2.0-OpenSSH_9.2" in str(failure_of(d))


# SOCKS5.


@pytest.mark.parametrize("bytewise", [False, True])
def test_socks5_bind_replies_and_data_in_one_read(bytewise):
    proxy = HandPlayedProxy()
    d = socks5.bind(proxy, SOCKS5Auth(), "198.51.100.9", 0, Factory.forProtocol(App), 5, 5,
                    clock=CLOCK)
    assert proxy.take() == b"\x05\x01\x00"
    proxy.receive(b"\x05\x00", bytewise)
    assert proxy.take() == wire5.encode_request(wire5.BIND, "198.51.100.9", 0)
    # "Any address": we are told the proxy's own, where we reached it.
    proxy.receive(wire5.encode_reply(wire5.SUCCEEDED, "0.0.0.0", 40001)
                  + wire5.encode_reply(wire5.SUCCEEDED, "198.51.100.9", 5555) + b"hello",
                  bytewise)
    bound = fired(d)
    assert (bound.host, bound.port) == ("192.0.2.7", 40001)
    accepted = fired(bound.accepted)
    assert (accepted.host, accepted.port) == ("198.51.100.9", 5555)
    assert accepted.protocol.received == b"hello"


def test_socks5_second_bind_reply_failure():
    proxy = HandPlayedProxy()
    d = socks5.bind(proxy, SOCKS5Auth(), "198.51.100.9", 0, Factory.forProtocol(App), 5, 5,
                    clock=CLOCK)
    proxy.receive(b"\x05\x00" + wire5.encode_reply(wire5.SUCCEEDED, "192.0.2.7", 40001))
    bound = fired(d)
    proxy.receive(wire5.encode_reply(wire5.TTL_EXPIRED))
    error = failure_of(bound.accepted)
    assert isinstance(error, DestinationFailed) and error.reply == wire5.TTL_EXPIRED


def test_socks5_credentials_are_the_auths_only():
    proxy = HandPlayedProxy()
    socks5.connect(proxy, SOCKS5Auth("svc", "pw"), "example.com", 80,
                   Factory.forProtocol(App), 5,
                       clock=CLOCK)
    assert proxy.take() == b"\x05\x02\x02\x00"
    proxy.receive(b"\x05\x02")
    assert proxy.take() == b"\x01\x03svc\x02pw"


def test_half_close_after_the_hand_over():
    proxy = HandPlayedProxy()
    d = socks5.connect(proxy, SOCKS5Auth(), "example.com", 80, Factory.forProtocol(App), 5,
                       clock=CLOCK)
    proxy.receive(b"\x05\x00" + wire5.encode_reply(wire5.SUCCEEDED))
    app = fired(d)
    proxy.transport.protocol.readConnectionLost()
    assert app.eof and not proxy.transport.disconnecting
    # A protocol that cannot half-close gets what Twisted would do: the close.
    proxy = HandPlayedProxy()
    d = socks5.connect(proxy, SOCKS5Auth(), "example.com", 80, Factory.forProtocol(Protocol), 5,
                       clock=CLOCK)
    proxy.receive(b"\x05\x00" + wire5.encode_reply(wire5.SUCCEEDED))
    fired(d)
    proxy.transport.protocol.readConnectionLost()
    assert proxy.transport.disconnecting


def test_eof_during_the_handshake_fails_it():
    proxy = HandPlayedProxy()
    d = socks5.connect(proxy, SOCKS5Auth(), "example.com", 80, Factory.forProtocol(App), 5,
                       clock=CLOCK)
    proxy.receive(b"\x05")
    proxy.transport.protocol.readConnectionLost()
    assert "closed the connection during the handshake" in str(failure_of(d))


# SOCKS4a.


def test_socks4_sends_names_as_4a_and_addresses_as_4():
    assert socks4.encode_request(wire4.CONNECT, "example.com", 80, "bob") == \
        wire4.encode_request(wire4.CONNECT, "example.com", 80, "bob", by_name=True)
    assert socks4.encode_request(wire4.CONNECT, "192.0.2.1", 80) == \
        b"\x04\x01\x00\x50\xc0\x00\x02\x01\x00"


@pytest.mark.parametrize("code, kind", [(91, DestinationFailed), (92, SOCKSError),
                                        (93, SOCKSError)])
def test_socks4_failures(code, kind):
    proxy = HandPlayedProxy()
    d = socks4.connect(proxy, "example.com", 80, Factory.forProtocol(App), 5,
                       clock=CLOCK)
    proxy.receive(wire4.encode_reply(code))
    error = failure_of(d)
    assert type(error) is kind
    if kind is DestinationFailed:
        assert error.reply == wire5.GENERAL_FAILURE


@pytest.mark.parametrize("bytewise", [False, True])
def test_socks4_bind(bytewise):
    proxy = HandPlayedProxy()
    d = socks4.bind(proxy, "198.51.100.9", 0, Factory.forProtocol(App), 5, 5,
                    clock=CLOCK)
    proxy.receive(wire4.encode_reply(wire4.GRANTED, "0.0.0.0", 40002), bytewise)
    bound = fired(d)
    assert (bound.host, bound.port) == ("192.0.2.7", 40002)
    proxy.receive(wire4.encode_reply(wire4.GRANTED, "198.51.100.9", 5556) + b"hi", bytewise)
    accepted = fired(bound.accepted)
    assert (accepted.host, accepted.port, accepted.protocol.received) == \
        ("198.51.100.9", 5556, b"hi")


# Timeouts, on a clock of the test's.


def test_an_unanswered_handshake_times_out():
    clock = task.Clock()
    proxy = HandPlayedProxy()
    d = socks5.connect(proxy, SOCKS5Auth(), "example.com", 80, Factory.forProtocol(App), 5,
                       clock=clock)
    proxy.receive(b"\x05\x00")
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.2)
    assert str(failure_of(d)) == "no SOCKS answer from the proxy in 5 s"
    assert proxy.transport.disconnected          # aborted
    assert clock.getDelayedCalls() == []


def test_bind_waits_for_the_peer_as_long_as_told():
    clock = task.Clock()
    proxy = HandPlayedProxy()
    d = socks4.bind(proxy, "198.51.100.9", 0, Factory.forProtocol(App), 5, 60, clock=clock)
    proxy.receive(wire4.encode_reply(wire4.GRANTED, "192.0.2.7", 40002))
    bound = fired(d)
    clock.advance(59)
    assert not bound.accepted.called
    clock.advance(2)
    assert str(failure_of(bound.accepted)) == "no connection to the bound address in 60 s"
    assert clock.getDelayedCalls() == []


def test_http_timeout_names_http():
    clock = task.Clock()
    proxy = HandPlayedProxy()
    d = http.connect(proxy, "example.com", 443, Factory.forProtocol(App), 2, clock=clock)
    proxy.receive(b"HTTP/1.1 200 OK\r\n")
    clock.advance(3)
    assert str(failure_of(d)) == "no HTTP answer from the proxy in 2 s"
