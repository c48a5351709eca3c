"""Property and example tests for the SOCKS5 codecs in socksd.wire.socks5 (RFC 1928)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import domain_names, ipv4_hosts, ipv6_hosts, only_wire_errors, ports
from socksd.wire import WireError, socks5
from socksd.wire.names import normalize_name

# Strategies.

method_lists = st.binary(min_size=1, max_size=255)
commands = st.integers(min_value=0, max_value=255)
codes = st.integers(min_value=0, max_value=255)
hosts = st.one_of(ipv4_hosts, ipv6_hosts, domain_names)


def _same_host(sent: str, parsed: str, atyp: int) -> bool:
    if atyp == socks5.ATYP_DOMAIN:
        return normalize_name(sent) == parsed
    return ipaddress.ip_address(sent) == ipaddress.ip_address(parsed)


def _expected_atyp(host: str) -> int:
    try:
        return {4: socks5.ATYP_IPV4, 6: socks5.ATYP_IPV6}[ipaddress.ip_address(host).version]
    except ValueError:
        return socks5.ATYP_DOMAIN


# Round trips.


@given(method_lists)
def test_greeting_round_trip(methods):
    encoded = socks5.encode_greeting(methods)
    assert encoded == bytes((5, len(methods))) + methods
    assert socks5.parse_greeting(encoded) == (socks5.Greeting(methods), len(encoded))


@given(st.integers(min_value=0, max_value=255))
def test_method_selection_round_trip(method):
    encoded = socks5.method_selection(method)
    assert encoded == bytes((5, method))
    assert socks5.parse_method_selection(encoded) == (socks5.MethodSelection(method), 2)


@given(commands, hosts, ports)
def test_request_round_trip(command, host, port):
    encoded = socks5.encode_request(command, host, port)
    parsed = socks5.parse_request(encoded)
    assert parsed is not None
    request, used = parsed
    assert used == len(encoded)
    assert request.command == command
    assert request.port == port
    assert request.atyp == _expected_atyp(host)
    assert _same_host(host, request.host, request.atyp)


@given(codes, hosts, ports)
def test_reply_round_trip(code, host, port):
    encoded = socks5.encode_reply(code, host, port)
    parsed = socks5.parse_reply(encoded)
    assert parsed is not None
    reply, used = parsed
    assert used == len(encoded)
    assert reply.code == code
    assert reply.port == port
    assert reply.atyp == _expected_atyp(host)
    assert _same_host(host, reply.host, reply.atyp)


@given(ipv4_hosts, ports)
def test_ipv4_address_layout(host, port):
    encoded = socks5.encode_address(host, port)
    assert encoded == b"\x01" + ipaddress.IPv4Address(host).packed + port.to_bytes(2, "big")


@given(ipv6_hosts, ports)
def test_ipv6_address_layout(host, port):
    encoded = socks5.encode_address(host, port)
    assert encoded == b"\x04" + ipaddress.IPv6Address(host).packed + port.to_bytes(2, "big")


@given(domain_names, ports)
def test_domain_address_layout(name, port):
    raw = name.encode("utf-8")
    encoded = socks5.encode_address(name, port)
    assert encoded == b"\x03" + bytes((len(raw),)) + raw + port.to_bytes(2, "big")


def test_encode_refuses_what_cannot_be_sent():
    with pytest.raises(ValueError):
        socks5.encode_greeting(b"")
    with pytest.raises(ValueError):
        socks5.encode_greeting(bytes(256))
    with pytest.raises(ValueError):
        socks5.encode_address("a" * 256, 80)
    with pytest.raises(ValueError):
        socks5.encode_address("", 80)


# Incremental parsing: every proper prefix is incomplete; trailing bytes stay.

messages = st.one_of(
    method_lists.map(lambda m: ("greeting", socks5.encode_greeting(m))),
    st.builds(lambda c, h, p: ("request", socks5.encode_request(c, h, p)),
              commands, hosts, ports),
    st.builds(lambda c, h, p: ("reply", socks5.encode_reply(c, h, p)), codes, hosts, ports),
    st.integers(0, 255).map(lambda m: ("method_selection", socks5.method_selection(m))),
)

PARSERS = {
    "greeting": socks5.parse_greeting,
    "request": socks5.parse_request,
    "reply": socks5.parse_reply,
    "method_selection": socks5.parse_method_selection,
}


@settings(max_examples=200)
@given(messages)
def test_every_proper_prefix_is_incomplete(message):
    kind, encoded = message
    parse = PARSERS[kind]
    for end in range(len(encoded)):
        assert parse(encoded[:end]) is None, (kind, encoded[:end])


@settings(max_examples=200)
@given(messages, st.binary(max_size=64))
def test_trailing_bytes_are_left_over(message, trailing):
    kind, encoded = message
    parse = PARSERS[kind]
    alone = parse(encoded)
    with_rest = parse(encoded + trailing)
    assert with_rest is not None
    assert with_rest[1] == len(encoded)
    assert with_rest == alone
    assert (encoded + trailing)[with_rest[1]:] == trailing


# Arbitrary bytes: None, a message, or WireError; nothing else.


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_parse_greeting_arbitrary_bytes(data):
    only_wire_errors(socks5.parse_greeting, data)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_parse_method_selection_arbitrary_bytes(data):
    only_wire_errors(socks5.parse_method_selection, data)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_parse_request_arbitrary_bytes(data):
    only_wire_errors(socks5.parse_request, data)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_parse_reply_arbitrary_bytes(data):
    only_wire_errors(socks5.parse_reply, data)


# Arbitrary bytes that look like the start of a message reach deeper branches.


@settings(max_examples=300)
@given(st.sampled_from([0, 1, 2, 3]), st.sampled_from([1, 3, 4, 0, 2, 5, 255]),
       st.binary(max_size=300))
def test_parse_request_arbitrary_address(command, atyp, tail):
    data = bytes((5, command, 0, atyp)) + tail
    only_wire_errors(socks5.parse_request, data)
    only_wire_errors(socks5.parse_reply, data)


@settings(max_examples=300)
@given(st.integers(0, 255), st.binary(max_size=255), ports)
def test_parse_request_arbitrary_domain_bytes(length, raw, port):
    data = bytes((5, 1, 0, 3, length)) + raw + port.to_bytes(2, "big")
    only_wire_errors(socks5.parse_request, data)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_decode_domain_arbitrary_bytes(raw):
    try:
        name = socks5.decode_domain(raw)
    except WireError as e:
        assert e.reply == socks5.HOST_UNREACHABLE     # a name no resolver takes
        return
    assert isinstance(name, str) and name == normalize_name(name)


# Examples with exact bytes from RFC 1928.


def test_greeting_example():
    # VER=5, NMETHODS=2, METHODS=00 02
    assert socks5.parse_greeting(b"\x05\x02\x00\x02") == (socks5.Greeting(b"\x00\x02"), 4)
    assert socks5.parse_greeting(b"\x05\x02\x00") is None
    assert socks5.parse_greeting(b"\x05") is None
    assert socks5.parse_greeting(b"") is None


@pytest.mark.parametrize("data", [b"\x04", b"\x04\x01\x00", b"\x00\x01\x00", b"GET / HTTP/1.1\r\n"])
def test_greeting_bad_version(data):
    with pytest.raises(WireError):
        socks5.parse_greeting(data)


def test_method_selection_examples():
    assert socks5.method_selection(socks5.NO_AUTH) == b"\x05\x00"
    assert socks5.method_selection(socks5.NO_ACCEPTABLE) == b"\x05\xff"
    assert socks5.method_selection(socks5.USERPASS) == b"\x05\x02"
    assert socks5.parse_method_selection(b"\x05\xff") == (socks5.MethodSelection(0xFF), 2)
    assert socks5.parse_method_selection(b"\x05") is None
    with pytest.raises(WireError):
        socks5.parse_method_selection(b"\x04\x00")


def test_request_ipv4_example():
    data = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"
    assert socks5.parse_request(data) == (
        socks5.Request(socks5.CONNECT, "127.0.0.1", 80, socks5.ATYP_IPV4), 10)
    assert socks5.encode_request(socks5.CONNECT, "127.0.0.1", 80) == data


def test_request_ipv6_example():
    data = b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01" + b"\x01\xbb"
    assert socks5.parse_request(data) == (
        socks5.Request(socks5.CONNECT, "::1", 443, socks5.ATYP_IPV6), 22)
    assert socks5.encode_request(socks5.CONNECT, "::1", 443) == data


def test_request_domain_example():
    data = b"\x05\x01\x00\x03\x0bexample.com\x00\x50"
    assert socks5.parse_request(data) == (
        socks5.Request(socks5.CONNECT, "example.com", 80, socks5.ATYP_DOMAIN), len(data))
    assert socks5.encode_request(socks5.CONNECT, "example.com", 80) == data


def test_request_rsv_not_zero_is_general_failure():
    with pytest.raises(WireError) as caught:
        socks5.parse_request(b"\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50")
    assert caught.value.reply == socks5.GENERAL_FAILURE == 0x01


@pytest.mark.parametrize("atyp", [0x00, 0x02, 0x05, 0xFF])
def test_request_unknown_atyp_is_address_type_not_supported(atyp):
    with pytest.raises(WireError) as caught:
        socks5.parse_request(bytes((5, 1, 0, atyp)) + b"\x7f\x00\x00\x01\x00\x50")
    assert caught.value.reply == socks5.ADDRESS_TYPE_NOT_SUPPORTED == 0x08


@pytest.mark.parametrize("data", [b"\x04", b"\x04\x01\x00",
                                  b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50"])
def test_request_bad_version(data):
    with pytest.raises(WireError) as caught:
        socks5.parse_request(data)
    assert caught.value.reply == socks5.GENERAL_FAILURE


@pytest.mark.parametrize("raw", [b"", b"exa mple.com", b"a\x00b", b"\xff\xfe", b"a\nb",
                                 b"a" * 255, b"a" * 64 + b".example", b"a..b", b".example",
                                 (b"a" * 63 + b".") * 3 + b"a" * 62, b"\xe2\x80\xae.example"])
def test_request_bad_domain(raw):
    """A name no resolver takes is refused at once with 0x04 (host
    unreachable): a 255-octet label used to reach the resolver, whose
    UnicodeError left the client waiting for handshake_timeout."""
    data = b"\x05\x01\x00\x03" + bytes((len(raw),)) + raw + b"\x00\x50"
    with pytest.raises(WireError) as caught:
        socks5.parse_request(data)
    assert caught.value.reply == socks5.HOST_UNREACHABLE


@pytest.mark.parametrize("sent,normal", [
    ("WWW.Example.COM.", "www.example.com"), ("ｌｏｃａｌｈｏｓｔ", "localhost"),
    ("Bücher.Example", "xn--bcher-kva.example"), ("_dmarc.example.com", "_dmarc.example.com"),
    ("my_host.example", "my_host.example"), ("ＬＯＣＡＬＨＯＳＴ．", "localhost"),
    ("127.0.0.1", "127.0.0.1"), ("::FFFF:1.2.3.4", "::ffff:102:304"),
    (("a" * 63 + ".") * 3 + "a" * 61, ("a" * 63 + ".") * 3 + "a" * 61),
])
def test_request_domain_in_its_normal_form(sent, normal):
    """The form rules match and the resolver looks up: getaddrinfo maps
    fullwidth letters, so a rule about localhost must see localhost."""
    raw = sent.encode("utf-8")
    data = b"\x05\x01\x00\x03" + bytes((len(raw),)) + raw + b"\x00\x50"
    request, _used = socks5.parse_request(data)
    assert request.host == normal


def test_reply_examples():
    assert socks5.encode_reply(socks5.SUCCEEDED, "10.0.0.5", 51000) == \
        b"\x05\x00\x00\x01\x0a\x00\x00\x05\xc7\x38"
    assert socks5.encode_reply(socks5.COMMAND_NOT_SUPPORTED) == \
        b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00"
    assert socks5.parse_reply(b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00") == (
        socks5.Reply(socks5.CONNECTION_REFUSED, "0.0.0.0", 0, socks5.ATYP_IPV4), 10)
    with pytest.raises(WireError):
        socks5.parse_reply(b"\x04\x00\x00\x01\x00\x00\x00\x00\x00\x00")
    with pytest.raises(WireError):
        socks5.parse_reply(b"\x05\x00\x01\x01\x00\x00\x00\x00\x00\x00")
    with pytest.raises(WireError):
        socks5.parse_reply(b"\x05\x00\x00\x09\x00\x00\x00\x00\x00\x00")


def test_reply_codes_are_rfc_1928_values():
    assert (socks5.SUCCEEDED, socks5.GENERAL_FAILURE, socks5.NOT_ALLOWED,
            socks5.NETWORK_UNREACHABLE, socks5.HOST_UNREACHABLE, socks5.CONNECTION_REFUSED,
            socks5.TTL_EXPIRED, socks5.COMMAND_NOT_SUPPORTED,
            socks5.ADDRESS_TYPE_NOT_SUPPORTED) == tuple(range(9))
    assert (socks5.CONNECT, socks5.BIND, socks5.UDP_ASSOCIATE) == (1, 2, 3)
    assert (socks5.ATYP_IPV4, socks5.ATYP_DOMAIN, socks5.ATYP_IPV6) == (1, 3, 4)
    assert (socks5.NO_AUTH, socks5.GSSAPI, socks5.USERPASS, socks5.NO_ACCEPTABLE) == \
        (0, 1, 2, 0xFF)


# The version check every parser shares (socksd.wire.errors.wrong_version).


@pytest.mark.parametrize("parse, what, reply", [
    (socks5.parse_greeting, "not SOCKS5", None),
    (socks5.parse_request, "request", socks5.GENERAL_FAILURE),
])
@pytest.mark.parametrize("version", [0, 4, 6, 0xFF])
def test_wrong_version_is_refused_from_the_first_byte(parse, what, reply, version):
    with pytest.raises(WireError, match=f"^{what}: version {version}$") as caught:
        parse(bytes((version,)))
    assert caught.value.reply == reply
    assert parse(b"") is None
