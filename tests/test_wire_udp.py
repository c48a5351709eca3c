"""Property and example tests for the SOCKS5 UDP request header (RFC 1928
section 7) in socksd.wire.socks5: parse_udp, encode_udp, Datagram.

    +----+------+------+----------+----------+----------+
    |RSV | FRAG | ATYP | DST.ADDR | DST.PORT |   DATA   |
    +----+------+------+----------+----------+----------+
    | 2  |  1   |  1   | Variable |    2     | Variable |
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import domain_names, ipv4_hosts, ipv6_hosts, ports
from socksd.wire import WireError, socks5
from socksd.wire.names import normalize_name

# Strategies.

frags = st.integers(min_value=0, max_value=255)
payloads = st.binary(max_size=2048)


# Round trips.


@given(ipv4_hosts, ports, payloads, frags)
@example("0.0.0.0", 0, b"", 0)
@example("255.255.255.255", 65535, b"\x00" * 512, 0x80)
def test_round_trip_ipv4(host, port, data, frag):
    encoded = socks5.encode_udp(host, port, data, frag)
    assert encoded == (b"\x00\x00" + bytes((frag,)) + b"\x01" + socket.inet_aton(host)
                       + port.to_bytes(2, "big") + data)
    parsed = socks5.parse_udp(encoded)
    assert parsed == socks5.Datagram(frag, host, port, socks5.ATYP_IPV4, data)
    assert isinstance(parsed.data, bytes)


@given(ipv6_hosts, ports, payloads, frags)
@example("::", 0, b"", 0)
@example("::ffff:127.0.0.1", 53, b"q", 1)
@example("2001:db8::1", 443, b"quic", 0)
def test_round_trip_ipv6(host, port, data, frag):
    encoded = socks5.encode_udp(host, port, data, frag)
    assert encoded[:4] == b"\x00\x00" + bytes((frag,)) + b"\x04"
    assert encoded[4:20] == ipaddress.IPv6Address(host).packed
    assert encoded[20:22] == port.to_bytes(2, "big")
    assert encoded[22:] == data
    parsed = socks5.parse_udp(encoded)
    assert (parsed.frag, parsed.port, parsed.atyp, parsed.data) == (
        frag, port, socks5.ATYP_IPV6, data)
    assert ipaddress.IPv6Address(parsed.host) == ipaddress.IPv6Address(host)


@given(domain_names, ports, payloads, frags)
@example("localhost", 53, b"", 0)
@example(("a" * 63 + ".") * 3 + "a" * 61, 65535, b"x", 0)     # 253 octets
@example("bücher.example", 8080, b"\xff" * 3, 0x7f)
def test_round_trip_domain(name, port, data, frag):
    raw = name.encode("utf-8")
    encoded = socks5.encode_udp(name, port, data, frag)
    assert encoded == (b"\x00\x00" + bytes((frag, 3, len(raw))) + raw
                       + port.to_bytes(2, "big") + data)
    assert socks5.parse_udp(encoded) == socks5.Datagram(frag, normalize_name(name), port,
                                                        socks5.ATYP_DOMAIN, data)


@given(st.one_of(ipv4_hosts, ipv6_hosts, domain_names), ports, payloads, frags)
def test_parse_uses_the_whole_datagram(host, port, data, frag):
    """Everything after DST.PORT is payload, whatever it looks like (even
    another header): datagrams are not a stream."""
    inner = socks5.encode_udp("192.0.2.1", 7, b"inner")
    parsed = socks5.parse_udp(socks5.encode_udp(host, port, inner + data, frag))
    assert parsed.data == inner + data


def test_domain_longer_than_255_bytes_cannot_be_encoded():
    with pytest.raises(ValueError):
        socks5.encode_udp("a" * 256, 53, b"")


def test_default_frag_is_zero():
    assert socks5.encode_udp("127.0.0.1", 53, b"q")[2] == 0


# Arbitrary bytes raise only WireError.


def _parse_or_wire_error(data: bytes):
    try:
        result = socks5.parse_udp(data)
    except WireError:
        return None
    assert isinstance(result, socks5.Datagram)
    return result


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_arbitrary_bytes_raise_only_wire_error(data):
    _parse_or_wire_error(data)


@given(frags, st.integers(min_value=0, max_value=255), st.binary(max_size=300))
@settings(max_examples=500)
def test_plausible_headers_raise_only_wire_error(frag, atyp, rest):
    """A valid RSV, so the fuzzing reaches the address parsing."""
    parsed = _parse_or_wire_error(b"\x00\x00" + bytes((frag, atyp)) + rest)
    if parsed is not None:
        assert parsed.atyp == atyp in (1, 3, 4)
        assert parsed.frag == frag


@given(st.one_of(ipv4_hosts, ipv6_hosts, domain_names), ports, payloads, st.data())
def test_every_truncated_header_is_a_wire_error(host, port, data, draw):
    """A datagram cut anywhere inside its header is malformed, never "wait
    for more" (None) and never an IndexError or struct.error."""
    encoded = socks5.encode_udp(host, port, data)
    header = len(encoded) - len(data)
    cut = draw.draw(st.integers(min_value=0, max_value=header - 1))
    with pytest.raises(WireError):
        socks5.parse_udp(encoded[:cut])


# Exact bytes.


def test_example_ipv4_dns_query():
    datagram = b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x35" + b"\x12\x34query"
    assert socks5.parse_udp(datagram) == socks5.Datagram(
        0, "127.0.0.1", 53, socks5.ATYP_IPV4, b"\x12\x34query")


def test_example_empty_payload():
    assert socks5.parse_udp(b"\x00\x00\x00\x01\x0a\x00\x00\x01\x1f\x90") == socks5.Datagram(
        0, "10.0.0.1", 8080, socks5.ATYP_IPV4, b"")


def test_example_ipv6():
    datagram = b"\x00\x00\x00\x04" + bytes(15) + b"\x01" + b"\x00\x35" + b"dns"
    assert socks5.parse_udp(datagram) == socks5.Datagram(0, "::1", 53, socks5.ATYP_IPV6,
                                                         b"dns")
    assert socks5.encode_udp("::1", 53, b"dns") == datagram


def test_example_domain():
    datagram = b"\x00\x00\x00\x03\x09localhost\x00\x35" + b"q"
    assert socks5.parse_udp(datagram) == socks5.Datagram(0, "localhost", 53,
                                                         socks5.ATYP_DOMAIN, b"q")
    assert socks5.encode_udp("localhost", 53, b"q") == datagram


@pytest.mark.parametrize("frag", [1, 0x7f, 0x80, 0x81, 0xff])
def test_example_fragment_numbers_are_reported(frag):
    """FRAG is the parser's to report and the relay's to drop."""
    datagram = bytes((0, 0, frag)) + b"\x01\x7f\x00\x00\x01\x00\x35" + b"part"
    assert socks5.parse_udp(datagram).frag == frag
    assert socks5.encode_udp("127.0.0.1", 53, b"part", frag) == datagram


@pytest.mark.parametrize("rsv", [b"\x00\x01", b"\x01\x00", b"\xff\xff", b"\x80\x00"])
def test_reserved_bytes_not_zero(rsv):
    with pytest.raises(WireError, match="reserved"):
        socks5.parse_udp(rsv + b"\x00\x01\x7f\x00\x00\x01\x00\x35" + b"q")


@pytest.mark.parametrize("datagram", [
    b"",
    b"\x00",
    b"\x00\x00",
    b"\x00\x00\x00",
    b"\x00\x00\x00\x01",                                  # no address
    b"\x00\x00\x00\x01\x7f\x00\x00",                      # 3 of 4 address bytes
    b"\x00\x00\x00\x01\x7f\x00\x00\x01",                  # no port
    b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00",              # half a port
    b"\x00\x00\x00\x04" + bytes(15),                      # 15 of 16 address bytes
    b"\x00\x00\x00\x04" + bytes(16) + b"\x00",            # half a port
    b"\x00\x00\x00\x03",                                  # no name length
    b"\x00\x00\x00\x03\x09localhos",                      # name cut short
    b"\x00\x00\x00\x03\x09localhost\x00",                 # half a port
], ids=lambda d: d.hex() or "empty")
def test_short_header(datagram):
    with pytest.raises(WireError):
        socks5.parse_udp(datagram)


@pytest.mark.parametrize("atyp", [0x00, 0x02, 0x05, 0x06, 0x7f, 0xff])
def test_unknown_address_type(atyp):
    with pytest.raises(WireError, match="address type"):
        socks5.parse_udp(b"\x00\x00\x00" + bytes((atyp,)) + b"\x7f\x00\x00\x01\x00\x35q")


@pytest.mark.parametrize("name", [
    b"",                      # empty name
    b"\xff\xfe",              # not UTF-8
    b"local host",            # space
    b"local\x00host",         # control character
    b"\n",
], ids=["empty", "not-utf8", "space", "nul", "newline"])
def test_unusable_domain_names(name):
    with pytest.raises(WireError):
        socks5.parse_udp(b"\x00\x00\x00\x03" + bytes((len(name),)) + name + b"\x00\x35q")


def test_parse_accepts_memoryview_and_bytearray():
    datagram = socks5.encode_udp("192.0.2.7", 5353, b"mdns")
    expected = socks5.Datagram(0, "192.0.2.7", 5353, socks5.ATYP_IPV4, b"mdns")
    assert socks5.parse_udp(bytearray(datagram)) == expected
    assert socks5.parse_udp(memoryview(datagram)) == expected
