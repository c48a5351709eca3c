"""No way around a loopback deny rule: the unspecified address (0.0.0.0, ::),
which Linux delivers to the local host, and the host's own addresses
("self"), against a real `twistd socks` and a service listening on
127.0.0.1 and ::1 that must never be reached. Traffic stays on loopback."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from conftest import recv_exact

pytestmark = pytest.mark.integration

DENY_LOOPBACK = """
[[rules]]
action = "deny"
to = ["127.0.0.0/8", "::1/128", "localhost"]
[[rules]]
action = "allow"
"""


class LocalService:
    """A TCP listener on 127.0.0.1 and on ::1 (same port) and a UDP socket on
    127.0.0.1, recording whoever reaches them."""

    def __init__(self) -> None:
        for _attempt in range(20):
            self.tcp4 = socket.create_server(("127.0.0.1", 0))
            self.port = self.tcp4.getsockname()[1]
            try:
                self.tcp6 = socket.create_server(("::1", self.port), family=socket.AF_INET6)
                break
            except OSError:
                self.tcp4.close()
        else:
            raise AssertionError("no port free on both 127.0.0.1 and ::1")
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp_port = self.udp.getsockname()[1]
        for sock in (self.tcp4, self.tcp6, self.udp):
            sock.setblocking(False)

    def reached(self) -> list[str]:
        """Who got through (after a moment for anything in flight)."""
        time.sleep(0.3)
        seen = []
        for name, sock in (("tcp 127.0.0.1", self.tcp4), ("tcp ::1", self.tcp6)):
            try:
                conn, _ = sock.accept()
                conn.close()
                seen.append(name)
            except BlockingIOError:
                pass
        try:
            self.udp.recvfrom(100)
            seen.append("udp 127.0.0.1")
        except BlockingIOError:
            pass
        return seen

    def close(self) -> None:
        for sock in (self.tcp4, self.tcp6, self.udp):
            sock.close()


@pytest.fixture
def service():
    s = LocalService()
    yield s
    s.close()


def socks5(server, request: bytes) -> int:
    with socket.create_connection(server.address, timeout=10) as s:
        s.sendall(b"\x05\x01\x00")
        assert recv_exact(s, 2) == b"\x05\x00"
        s.sendall(request)
        return recv_exact(s, 2)[1]


def socks4(server, request: bytes) -> int:
    with socket.create_connection(server.address, timeout=10) as s:
        s.sendall(request)
        return recv_exact(s, 8)[1]


def v4(host: str, port: int) -> bytes:
    return b"\x01" + socket.inet_aton(host) + struct.pack("!H", port)


def v6(host: str, port: int) -> bytes:
    return b"\x04" + socket.inet_pton(socket.AF_INET6, host) + struct.pack("!H", port)


def name(host: str, port: int) -> bytes:
    raw = host.encode("utf-8")
    return b"\x03" + bytes((len(raw),)) + raw + struct.pack("!H", port)


@pytest.mark.parametrize("address", [
    lambda p: v4("0.0.0.0", p), lambda p: v6("::", p), lambda p: v6("::ffff:0.0.0.0", p),
    lambda p: v4("0.1.2.3", p), lambda p: name("0", p), lambda p: name("0.0.0.0", p),
], ids=["0.0.0.0", "::", "::ffff:0.0.0.0", "0.1.2.3", "name 0", "name 0.0.0.0"])
def test_socks5_connect_to_the_unspecified_address_is_refused(socks_server, service,
                                                              address):
    server = socks_server(DENY_LOOPBACK)
    assert socks5(server, b"\x05\x01\x00" + address(service.port)) == 0x02
    assert service.reached() == []
    server.wait_for_log(r"socks5 .* connect \S+ .*denied: the unspecified address "
                        r"\(0\.0\.0\.0/8, ::\) is refused as a destination")


@pytest.mark.parametrize("request_", [
    lambda p: b"\x04\x01" + struct.pack("!H", p) + socket.inet_aton("0.0.0.0") + b"\x00",
    lambda p: b"\x04\x01" + struct.pack("!H", p) + b"\x00\x00\x00\x01\x00" + b"0\x00",
], ids=["DSTIP 0.0.0.0", "SOCKS4a name 0"])
def test_socks4_connect_to_the_unspecified_address_is_refused(socks_server, service,
                                                              request_):
    server = socks_server(DENY_LOOPBACK)
    assert socks4(server, request_(service.port)) == 91
    assert service.reached() == []


def test_udp_datagram_to_the_unspecified_address_is_dropped(socks_server, service):
    server = socks_server(DENY_LOOPBACK)
    with socket.create_connection(server.address, timeout=10) as control, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        control.sendall(b"\x05\x01\x00")
        assert recv_exact(control, 2) == b"\x05\x00"
        control.sendall(b"\x05\x03\x00" + v4("0.0.0.0", 0))
        reply = recv_exact(control, 10)
        assert reply[1] == 0
        relay = (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0])
        client.bind(("127.0.0.1", 0))
        for header in (v4("0.0.0.0", service.udp_port), name("0", service.udp_port)):
            client.sendto(b"\x00\x00\x00" + header + b"knock", relay)
        assert service.reached() == []


def test_self_covers_the_hosts_own_addresses(socks_server, service):
    """deny to = ["self"]: loopback is one of this host's addresses (the
    others, which reach local services just the same, are covered at the
    rules layer in test_rules.py; tests send nothing off loopback)."""
    server = socks_server('[[rules]]\naction = "deny"\nto = ["self"]\n'
                          '[[rules]]\naction = "allow"\n')
    assert socks5(server, b"\x05\x01\x00" + v4("127.0.0.1", service.port)) == 0x02
    assert socks5(server, b"\x05\x01\x00" + v6("::1", service.port)) == 0x02
    assert service.reached() == []
    server.wait_for_log(r"connect 127\.0\.0\.1:\d+ .*denied: rule 1 \(deny\)")


# Names: matched in the form the resolver looks them up in.


def test_a_fullwidth_name_meets_the_rule_for_its_normal_form(socks_server, service):
    """getaddrinfo maps "ｌｏｃａｌｈｏｓｔ" to localhost; the rules must see it so."""
    server = socks_server(DENY_LOOPBACK.replace('"localhost"', '"LocalHost."'))
    assert socks5(server, b"\x05\x01\x00" + name("ｌｏｃａｌｈｏｓｔ", service.port)) == 0x02
    request4a = (b"\x04\x01" + struct.pack("!H", service.port) + b"\x00\x00\x00\x01\x00"
                 + "ＬＯＣＡＬＨＯＳＴ".encode() + b"\x00")
    assert socks4(server, request4a) == 91
    assert service.reached() == []
    server.wait_for_log(r"socks5 user=- method=none connect localhost:\d+ .*denied: rule 1")


@pytest.mark.parametrize("bad", ["a" * 255, "a" * 64 + ".example", "a..example"])
def test_a_name_no_resolver_takes_is_refused_at_once(socks_server, bad):
    """A 255-octet label used to reach Twisted's resolver, raise UnicodeError
    in an unhandled Deferred, and leave the client without an answer until
    handshake_timeout."""
    server = socks_server()
    assert socks5(server, b"\x05\x01\x00" + name(bad, 80)) == 0x04
    server.wait_for_log(r"socks5 .* bad request: request: bad domain name: ")
    assert "Unhandled" not in server.log() and "Traceback" not in server.log()
