"""Outgoing source addresses ([server] source, source_select): the choice
itself, the config's checks, and, in-process on the real reactor over real
loopback sockets (Linux routes all of 127/8 on lo), what a destination sees
as its peer for CONNECT and for UDP ASSOCIATE."""

from __future__ import annotations

import socket
import struct

import pytest
from twisted.internet import defer, reactor, task, threads
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.logger import capturedLogs
from twisted.trial import unittest

from conftest import recv_exact
from fakes import session_lines
from socksd import config
from socksd.auth.registry import method_registry
from socksd.proxy import Limits, SOCKSServerFactory, connect
from socksd.proxy.source import Sources
from socksd.rules import default_rules

V4, V6 = socket.AF_INET, socket.AF_INET6


# The choice.


def test_first_takes_the_first_address_of_the_family():
    sources = Sources(["2001:db8::7", "192.0.2.7", "192.0.2.8"])
    assert [sources.choose(V4) for _ in range(3)] == ["192.0.2.7"] * 3
    assert sources.choose(V6) == "2001:db8::7"


def test_round_robin_takes_turns_within_each_family():
    sources = Sources(["192.0.2.7", "2001:db8::7", "192.0.2.8", "2001:db8::8"], "round-robin")
    # Alternating families do not skew the turns of either.
    chosen = [sources.choose(family) for family in (V4, V6) * 3]
    assert chosen == ["192.0.2.7", "2001:db8::7", "192.0.2.8", "2001:db8::8",
                      "192.0.2.7", "2001:db8::7"]


def test_no_address_of_the_family_says_why():
    sources = Sources(["192.0.2.7"])
    with pytest.raises(connect.NoSource) as caught:
        sources.choose(V6)
    assert caught.value.reason == connect.HOST_UNREACHABLE
    assert str(caught.value.detail) == \
        "no source address of IPv6 family: [server] source = ['192.0.2.7']"


def test_same_as_listener_leaves_from_the_address_the_client_reached():
    sources = Sources([], "same-as-listener")
    choice = sources.for_session(IPv4Address("TCP", "192.0.2.9", 1080))
    assert choice(V4) == "192.0.2.9"
    with pytest.raises(connect.NoSource) as caught:
        choice(V6)
    assert "the client reached 192.0.2.9" in caught.value.detail
    # A dual-stack listener reached over IPv4 reports a v4-mapped address.
    mapped = sources.for_session(IPv6Address("TCP", "::ffff:192.0.2.9", 1080))
    assert mapped(V4) == "192.0.2.9"


def test_same_as_listener_takes_the_other_family_from_source():
    sources = Sources(["2001:db8::7"], "same-as-listener")
    choice = sources.for_session(IPv4Address("TCP", "192.0.2.9", 1080))
    assert (choice(V4), choice(V6)) == ("192.0.2.9", "2001:db8::7")
    # A UNIX socket's listener has no address to leave from: the list decides.
    unix = sources.for_session(UNIXAddress("/run/socksd.sock"))
    assert unix(V6) == "2001:db8::7"


def test_nothing_configured_costs_nothing():
    assert Sources([]).for_session(IPv4Address("TCP", "192.0.2.9", 1080)) is None


def test_a_udp_relay_sends_from_a_source_of_its_family_else_the_other():
    assert Sources(["192.0.2.7", "2001:db8::7"]).for_relay("192.0.2.1") == "192.0.2.7"
    assert Sources(["2001:db8::7"]).for_relay("192.0.2.1") == "2001:db8::7"
    assert Sources(["192.0.2.1"]).for_relay("192.0.2.1") is None     # the relay socket
    assert Sources([], "same-as-listener").for_relay("192.0.2.1") is None
    assert Sources([]).for_relay("192.0.2.1") is None


# The config.


def load(tmp_path, server: str) -> config.Config:
    path = tmp_path / "socksd.toml"
    path.write_text(f"[server]\n{server}\n")
    return config.load(str(path))


def test_config_reads_source_and_source_select(tmp_path):
    cfg = load(tmp_path, 'source = ["127.0.0.2", "::1"]\nsource_select = "round-robin"')
    assert cfg.limits.source == ("127.0.0.2", "::1")
    assert cfg.limits.source_select == "round-robin"
    assert config.load_text("", "x.toml").limits.source == ()
    assert config.load_text("", "x.toml").limits.source_select == "first"


@pytest.mark.parametrize("server,message", [
    ('source = ["localhost"]', "server.source: 'localhost' is not an IP address"),
    ('source = ["0.0.0.0"]', "server.source: '0.0.0.0' is the unspecified address"),
    # TEST-NET-1: no host has it.
    ('source = ["192.0.2.1"]', "server.source: '192.0.2.1': cannot bind it "
                               "(Cannot assign requested address): not an address of this host"),
    ('source = ["127.0.0.2", "127.0.0.2"]', "server.source: lists an address twice"),
    ('source = "127.0.0.2"', "server.source: must be a list of strings"),
    ('source_select = "random"', "server.source_select: 'random' is not \"first\", "
                                 "\"round-robin\" or \"same-as-listener\""),
    ('udp_advertise = "example.com"', "server.udp_advertise: 'example.com' is not an IP"),
    ('udp_advertise = "::"', "server.udp_advertise: '::' is the unspecified address"),
])
def test_config_refuses(tmp_path, server, message):
    with pytest.raises(config.ConfigError) as caught:
        load(tmp_path, f"max_sessions = 5\n{server}")
    assert f"socksd.toml:3: {message}" in str(caught.value)


def test_config_reads_udp_advertise(tmp_path):
    local = load(tmp_path, 'udp_advertise = "127.0.0.7"').limits
    assert (local.udp_advertise, local.udp_advertise_local) == ("127.0.0.7", True)
    # Behind NAT the public address is not this host's: the relay stays on
    # the listener's address, where the NAT forwards.
    nat = load(tmp_path, 'udp_advertise = "203.0.113.5"').limits
    assert (nat.udp_advertise, nat.udp_advertise_local) == ("203.0.113.5", False)
    assert load(tmp_path, 'udp_advertise = ""').limits.udp_advertise is None


# What the destination sees, over real sockets.


class Recorder(Protocol):
    def connectionMade(self):
        self.factory.peers.append(self.transport.getPeer().host)
        self.transport.write(b"hi")


class UDPEcho(DatagramProtocol):
    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []

    def datagramReceived(self, data, addr):
        self.peers.append(addr)
        self.transport.write(b"echo " + data, addr)


def socks5_connect(proxy: tuple[str, int], host: str, port: int) -> tuple[int, bytes]:
    """A blocking SOCKS5 CONNECT to an address (run in a thread): the reply
    code and the destination's first bytes."""
    family = V6 if ":" in host else V4
    with socket.create_connection(proxy, timeout=10) as s:
        s.sendall(b"\x05\x01\x00")
        assert recv_exact(s, 2) == b"\x05\x00"
        atyp = b"\x04" if family == V6 else b"\x01"
        s.sendall(b"\x05\x01\x00" + atyp + socket.inet_pton(family, host)
                  + struct.pack("!H", port))
        reply = recv_exact(s, 4)
        recv_exact(s, 16 + 2 if reply[3] == 4 else 4 + 2)
        return reply[1], (recv_exact(s, 2) if reply[1] == 0 else b"")


def udp_exchange(proxy: tuple[str, int], echo_port: int,
                 stranger_to_relay_peer: bool = False) -> tuple[int, bytes, bytes | None]:
    """A blocking UDP ASSOCIATE and one datagram to the echo on 127.0.0.1
    (run in a thread): the reply code, the answer, and, if asked, what the
    client got after a stranger wrote to the address the echo saw."""
    with socket.create_connection(proxy, timeout=10) as control, \
            socket.socket(V4, socket.SOCK_DGRAM) as client:
        control.sendall(b"\x05\x01\x00")
        assert recv_exact(control, 2) == b"\x05\x00"
        control.sendall(b"\x05\x03\x00\x01" + bytes(6))
        reply = recv_exact(control, 10)
        if reply[1] != 0:
            return reply[1], b"", None
        relay = (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0])
        client.bind(("127.0.0.1", 0))
        client.settimeout(5)
        header = b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H",
                                                                                 echo_port)
        client.sendto(header + b"ping", relay)
        answer, came_from = client.recvfrom(1000)
        assert came_from == relay, (came_from, relay)
        return 0, answer, None


class SourceTests(unittest.TestCase):

    def setUp(self):
        self.destination = Factory.forProtocol(Recorder)
        self.destination.peers = []
        self.tcp = reactor.listenTCP(0, self.destination, interface="127.0.0.1")
        self.addCleanup(self.tcp.stopListening)
        self.echo = UDPEcho()
        self.udp = reactor.listenUDP(0, self.echo, interface="127.0.0.1")
        self.addCleanup(self.udp.stopListening)

    def proxy(self, listen_on: str = "127.0.0.1", **limits) -> tuple[str, int]:
        factory = SOCKSServerFactory([method_registry(None)["none"]], default_rules(),
                                     Limits(**limits))
        port = reactor.listenTCP(0, factory, interface=listen_on)
        self.addCleanup(port.stopListening)
        return (listen_on, port.getHost().port)

    @defer.inlineCallbacks
    def connects(self, proxy, times: int = 1, host: str = "127.0.0.1"):
        codes = []
        for _ in range(times):
            code, greeting = yield threads.deferToThread(
                socks5_connect, proxy, host, self.tcp.getHost().port)
            codes.append(code)
            if code == 0:
                self.assertEqual(greeting, b"hi")
        return codes

    @defer.inlineCallbacks
    def test_first(self):
        proxy = self.proxy(source=("127.0.0.2", "127.0.0.3"))
        self.assertEqual((yield self.connects(proxy, 2)), [0, 0])
        self.assertEqual(self.destination.peers, ["127.0.0.2", "127.0.0.2"])

    @defer.inlineCallbacks
    def test_round_robin(self):
        proxy = self.proxy(source=("127.0.0.2", "127.0.0.3"), source_select="round-robin")
        self.assertEqual((yield self.connects(proxy, 3)), [0, 0, 0])
        self.assertEqual(self.destination.peers, ["127.0.0.2", "127.0.0.3", "127.0.0.2"])

    @defer.inlineCallbacks
    def test_same_as_listener(self):
        for listener in ("127.0.0.3", "127.0.0.4"):
            proxy = self.proxy(listener, source_select="same-as-listener")
            self.assertEqual((yield self.connects(proxy)), [0])
        self.assertEqual(self.destination.peers, ["127.0.0.3", "127.0.0.4"])

    @defer.inlineCallbacks
    def test_a_source_of_the_other_family_is_skipped(self):
        proxy = self.proxy(source=("::1", "127.0.0.2"), source_select="round-robin")
        self.assertEqual((yield self.connects(proxy, 2)), [0, 0])
        self.assertEqual(self.destination.peers, ["127.0.0.2", "127.0.0.2"])

    @defer.inlineCallbacks
    def test_each_family_leaves_from_its_own_source(self):
        v6 = reactor.listenTCP(0, self.destination, interface="::1")
        self.addCleanup(v6.stopListening)
        proxy = self.proxy(source=("::1", "127.0.0.2"))
        for host, port in (("::1", v6.getHost().port), ("127.0.0.1", self.tcp.getHost().port)):
            code, greeting = yield threads.deferToThread(socks5_connect, proxy, host, port)
            self.assertEqual((code, greeting), (0, b"hi"))
        self.assertEqual(self.destination.peers, ["::1", "127.0.0.2"])

    @defer.inlineCallbacks
    def test_no_source_of_the_family_is_host_unreachable(self):
        proxy = self.proxy(source=("::1",))
        with capturedLogs() as events:
            self.assertEqual((yield self.connects(proxy)), [0x04])
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.destination.peers, [])
        [line] = session_lines(events)
        self.assertIn("no source address of IPv4 family: [server] source = ['::1']", line)

    @defer.inlineCallbacks
    def test_udp_leaves_from_the_source_and_answers_come_back(self):
        proxy = self.proxy(source=("127.0.0.2",))
        code, answer, _ = yield threads.deferToThread(udp_exchange, proxy,
                                                      self.udp.getHost().port)
        self.assertEqual(code, 0)
        # The answer, wrapped, came back through the relay socket.
        self.assertEqual(answer[-9:], b"echo ping")
        [(peer, _port)] = self.echo.peers
        self.assertEqual(peer, "127.0.0.2")

    @defer.inlineCallbacks
    def test_udp_without_source_keeps_one_socket(self):
        proxy = self.proxy()
        code, answer, _ = yield threads.deferToThread(udp_exchange, proxy,
                                                      self.udp.getHost().port)
        self.assertEqual((code, answer[-9:]), (0, b"echo ping"))
        [(peer, _port)] = self.echo.peers
        self.assertEqual(peer, "127.0.0.1")


@pytest.mark.integration
def test_twistd_reads_source_from_its_config(socks_server):
    """The file's keys reach the listener: a real `twistd socks`."""
    with socket.create_server(("127.0.0.1", 0)) as destination:
        destination.settimeout(10)
        port = destination.getsockname()[1]
        server = socks_server('[server]\nsource = ["127.0.0.2", "127.0.0.3"]\n'
                              'source_select = "round-robin"\n')
        peers = []
        for _ in range(3):
            code, peer = socks5_connect_with_accept(server.address, destination, port)
            assert code == 0
            peers.append(peer)
        assert peers == ["127.0.0.2", "127.0.0.3", "127.0.0.2"]


def socks5_connect_with_accept(proxy, destination: socket.socket, port: int) -> tuple[int, str]:
    """A SOCKS5 CONNECT to 127.0.0.1:port whose listener (``destination``)
    this thread accepts: the reply code and the peer address it saw."""
    with socket.create_connection(proxy, timeout=10) as s:
        s.sendall(b"\x05\x01\x00")
        assert recv_exact(s, 2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port))
        code = recv_exact(s, 10)[1]
        if code != 0:
            return code, ""
        accepted, peer = destination.accept()
        accepted.close()
        return code, peer[0]
