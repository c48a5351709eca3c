"""Property and example tests for the SOCKS4/4a codec in socksd.wire.socks4.

SOCKS4: VN=4 CD DSTPORT DSTIP USERID NUL; SOCKS4a adds a host name and NUL
after the USERID when DSTIP is 0.0.0.x with x != 0. Replies: VN=0 CD DSTPORT
DSTIP, with CD 90 granted, 91 rejected or failed, 92 no identd, 93 mismatch.
"""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import normalizes, only_wire_errors
from socksd.wire import WireError, socks4
from socksd.wire.names import normalize_name

# Strategies.

ports = st.integers(min_value=0, max_value=65535)
commands = st.integers(min_value=0, max_value=255)
codes = st.integers(min_value=0, max_value=255)


def _not_4a_marker(host: str) -> bool:
    """0.0.0.x (x != 0) means "host name follows": it cannot be sent as an IP."""
    raw = socket.inet_aton(host)
    return not (raw[:3] == b"\x00\x00\x00" and raw[3] != 0)


ipv4_hosts = st.ip_addresses(v=4).map(str).filter(_not_4a_marker)

# USERIDs have no defined encoding: any bytes but NUL, up to 255 of them, kept
# through surrogateescape (so b"\xff" survives as "\udcff").
userid_bytes = st.binary(max_size=socks4.MAX_FIELD).map(lambda b: b.replace(b"\x00", b""))
userids = userid_bytes.map(lambda b: b.decode("utf-8", "surrogateescape"))


def _acceptable_name(name: str) -> bool:
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return (1 <= len(raw) <= socks4.MAX_FIELD and name.isprintable() and " " not in name
            and not name.startswith(".") and normalizes(name))


host_names = st.one_of(
    st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}\.){0,5}[a-z]{2,10}\Z"),
    # Upper case, "_", trailing dots, fullwidth forms and non-ASCII letters:
    # the parser hands on their normal form (socksd.wire.names).
    st.text(alphabet="abcXYZ09-_.üßÄｌｏ．", min_size=1, max_size=80),
    st.text(alphabet="abc.-", min_size=200, max_size=253),
).filter(_acceptable_name)


def _ip_request(command, host, port, userid):
    return socks4.encode_request(command, host, port, userid)


def _name_request(command, host, port, userid):
    return socks4.encode_request(command, host, port, userid, by_name=True)


requests = st.one_of(
    st.builds(lambda c, h, p, u: ((c, h, p, u, False), _ip_request(c, h, p, u)),
              commands, ipv4_hosts, ports, userids),
    st.builds(lambda c, h, p, u: ((c, h, p, u, True), _name_request(c, h, p, u)),
              commands, host_names, ports, userids),
)


# Round trips.


@given(commands, ipv4_hosts, ports, userid_bytes)
def test_ip_request_round_trip(command, host, port, raw_userid):
    userid = raw_userid.decode("utf-8", "surrogateescape")
    encoded = socks4.encode_request(command, host, port, userid)
    assert encoded == (bytes((4, command)) + port.to_bytes(2, "big") + socket.inet_aton(host)
                       + raw_userid + b"\x00")
    assert socks4.parse_request(encoded) == (
        socks4.Request(command, host, port, userid, False), len(encoded))


@given(commands, host_names, ports, userid_bytes)
def test_4a_request_round_trip(command, name, port, raw_userid):
    userid = raw_userid.decode("utf-8", "surrogateescape")
    encoded = socks4.encode_request(command, name, port, userid, by_name=True)
    assert encoded == (bytes((4, command)) + port.to_bytes(2, "big") + b"\x00\x00\x00\x01"
                       + raw_userid + b"\x00" + name.encode("utf-8") + b"\x00")
    assert socks4.parse_request(encoded) == (
        socks4.Request(command, normalize_name(name), port, userid, True), len(encoded))


@given(st.integers(1, 255), ports, userid_bytes, host_names)
def test_any_4a_marker_address_means_by_name(x, port, raw_userid, name):
    """Every DSTIP 0.0.0.x with x != 0 announces a host name, not only 0.0.0.1."""
    data = (b"\x04\x01" + port.to_bytes(2, "big") + bytes((0, 0, 0, x)) + raw_userid + b"\x00"
            + name.encode("utf-8") + b"\x00")
    request, used = socks4.parse_request(data)
    assert used == len(data)
    assert request.by_name and request.host == normalize_name(name) and request.port == port
    assert request.userid.encode("utf-8", "surrogateescape") == raw_userid


@given(st.binary(min_size=1, max_size=255).filter(lambda b: b"\x00" not in b))
def test_non_utf8_userid_bytes_survive(raw):
    data = b"\x04\x01\x00\x50\x7f\x00\x00\x01" + raw + b"\x00"
    request, used = socks4.parse_request(data)
    assert used == len(data)
    assert request.userid.encode("utf-8", "surrogateescape") == raw
    assert socks4.encode_request(1, "127.0.0.1", 80, request.userid) == data


@given(codes, ipv4_hosts, ports)
def test_reply_round_trip(code, host, port):
    encoded = socks4.encode_reply(code, host, port)
    assert encoded == bytes((0, code)) + port.to_bytes(2, "big") + socket.inet_aton(host)
    assert socks4.parse_reply(encoded) == (socks4.Reply(code, host, port), 8)


@given(codes, st.ip_addresses(v=6).map(str), ports)
def test_reply_with_ipv6_address_is_sent_as_zeros(code, host, port):
    """SOCKS4 has no room for IPv6: the bound address becomes 0.0.0.0:0."""
    assert socks4.encode_reply(code, host, port) == bytes((0, code)) + bytes(6)


# Incremental parsing: every proper prefix is incomplete; trailing bytes stay.


@settings(max_examples=200)
@given(requests)
def test_every_proper_prefix_of_a_request_is_incomplete(request):
    _fields, encoded = request
    for end in range(len(encoded)):
        assert socks4.parse_request(encoded[:end]) is None, encoded[:end]


@settings(max_examples=200)
@given(requests, st.binary(max_size=64))
def test_request_trailing_bytes_are_left_over(request, trailing):
    _fields, encoded = request
    parsed = socks4.parse_request(encoded + trailing)
    assert parsed is not None
    assert parsed == socks4.parse_request(encoded)
    assert parsed[1] == len(encoded)


@given(codes, ipv4_hosts, ports, st.binary(max_size=32))
def test_every_proper_prefix_of_a_reply_is_incomplete(code, host, port, trailing):
    encoded = socks4.encode_reply(code, host, port)
    for end in range(len(encoded)):
        assert socks4.parse_reply(encoded[:end]) is None
    assert socks4.parse_reply(encoded + trailing) == (socks4.Reply(code, host, port), 8)


# Arbitrary bytes: None, a message, or WireError; nothing else.


@settings(max_examples=500)
@given(st.binary(max_size=600))
def test_parse_request_arbitrary_bytes(data):
    only_wire_errors(socks4.parse_request, data)


@settings(max_examples=500)
@given(commands, ports, st.sampled_from([b"\x00\x00\x00\x01", b"\x00\x00\x00\xff",
                                         b"\x7f\x00\x00\x01", b"\x00\x00\x00\x00"]),
       st.binary(max_size=600))
def test_parse_request_arbitrary_fields(command, port, dstip, tail):
    """Past the fixed header, so USERID and host name parsing see the noise."""
    data = bytes((4, command)) + port.to_bytes(2, "big") + dstip + tail
    only_wire_errors(socks4.parse_request, data)


@settings(max_examples=500)
@given(userid_bytes, st.binary(max_size=300))
def test_parse_request_arbitrary_host_name_bytes(raw_userid, raw_host):
    data = b"\x04\x01\x00\x50\x00\x00\x00\x01" + raw_userid + b"\x00" + raw_host + b"\x00"
    only_wire_errors(socks4.parse_request, data)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_parse_reply_arbitrary_bytes(data):
    only_wire_errors(socks4.parse_reply, data)


@settings(max_examples=200)
@given(st.binary(max_size=600))
def test_request_errors_carry_reply_91(data):
    """Whatever is wrong with a SOCKS4 request, the answer is 91 (the only
    failure code for a malformed request)."""
    try:
        socks4.parse_request(b"\x04" + data)
    except WireError as e:
        assert e.reply == socks4.REJECTED


# Examples with exact bytes.


def test_reply_codes():
    assert (socks4.GRANTED, socks4.REJECTED, socks4.NO_IDENTD, socks4.IDENT_MISMATCH) == \
        (90, 91, 92, 93)
    assert (socks4.CONNECT, socks4.BIND) == (1, 2)
    assert socks4.MAX_FIELD == 255


def test_connect_example():
    # CONNECT 1.2.3.4:80 as "fred"
    data = b"\x04\x01\x00\x50\x01\x02\x03\x04fred\x00"
    assert socks4.parse_request(data) == (
        socks4.Request(socks4.CONNECT, "1.2.3.4", 80, "fred", False), 13)
    assert socks4.encode_request(socks4.CONNECT, "1.2.3.4", 80, "fred") == data


def test_connect_empty_userid_example():
    data = b"\x04\x01\x1f\x90\x7f\x00\x00\x01\x00"
    assert socks4.parse_request(data) == (
        socks4.Request(socks4.CONNECT, "127.0.0.1", 8080, "", False), 9)
    assert socks4.encode_request(socks4.CONNECT, "127.0.0.1", 8080) == data


def test_socks4a_example():
    data = b"\x04\x01\x01\xbb\x00\x00\x00\x01fred\x00example.com\x00"
    assert socks4.parse_request(data) == (
        socks4.Request(socks4.CONNECT, "example.com", 443, "fred", True), len(data))
    assert socks4.encode_request(socks4.CONNECT, "example.com", 443, "fred",
                                 by_name=True) == data


def test_socks4a_waits_for_host_name():
    head = b"\x04\x01\x01\xbb\x00\x00\x00\x07fred\x00"
    assert socks4.parse_request(head) is None
    assert socks4.parse_request(head + b"example.") is None
    assert socks4.parse_request(head + b"example.com\x00")[0].host == "example.com"


def test_dstip_zero_is_not_socks4a():
    data = b"\x04\x01\x00\x50\x00\x00\x00\x00\x00"
    assert socks4.parse_request(data) == (
        socks4.Request(socks4.CONNECT, "0.0.0.0", 80, "", False), 9)


def test_bind_example():
    data = b"\x04\x02\x00\x15\xc0\x00\x02\x01bob\x00"
    assert socks4.parse_request(data) == (
        socks4.Request(socks4.BIND, "192.0.2.1", 21, "bob", False), 12)


def test_userid_255_bytes_without_nul_yet_is_incomplete():
    head = b"\x04\x01\x00\x50\x7f\x00\x00\x01"
    assert socks4.parse_request(head + b"u" * 255) is None
    request, used = socks4.parse_request(head + b"u" * 255 + b"\x00")
    assert request.userid == "u" * 255 and used == 8 + 256


def test_userid_256_bytes_without_nul_is_rejected():
    head = b"\x04\x01\x00\x50\x7f\x00\x00\x01"
    with pytest.raises(WireError) as caught:
        socks4.parse_request(head + b"u" * 256)
    assert caught.value.reply == socks4.REJECTED == 91
    # A NUL past the limit does not rescue it.
    with pytest.raises(WireError) as caught:
        socks4.parse_request(head + b"u" * 256 + b"\x00")
    assert caught.value.reply == 91
    with pytest.raises(WireError):
        socks4.parse_request(head + b"u" * 5000)


def test_host_name_255_bytes_without_nul_yet_is_incomplete():
    head = b"\x04\x01\x00\x50\x00\x00\x00\x01fred\x00"
    name = (b"h" * 63 + b".") * 3 + b"h" * 61 + b".."    # 253 octets, a dot, and one more
    assert socks4.parse_request(head + name) is None
    with pytest.raises(WireError) as caught:     # complete, and no name (an empty label)
        socks4.parse_request(head + name + b"\x00")
    assert caught.value.reply == 91
    request, used = socks4.parse_request(head + name[:-1] + b"\x00")
    assert request.host == name[:-2].decode() and request.by_name
    assert used == len(head) + 255


def test_host_name_256_bytes_without_nul_is_rejected():
    head = b"\x04\x01\x00\x50\x00\x00\x00\x01fred\x00"
    with pytest.raises(WireError) as caught:
        socks4.parse_request(head + b"h" * 256)
    assert caught.value.reply == 91


@pytest.mark.parametrize("data", [b"\x05", b"\x05\x01\x00", b"\x00\x01\x00\x50\x01\x02\x03\x04\x00",
                                  b"GET / HTTP/1.1\r\n"])
def test_not_socks4_is_rejected(data):
    with pytest.raises(WireError) as caught:
        socks4.parse_request(data)
    assert caught.value.reply == 91


@pytest.mark.parametrize("raw_host", [b"", b".example.com", b"exa mple.com", b"\xff\xfe",
                                      b"a\nb"], ids=["empty", "leading-dot", "space",
                                                     "not-utf8", "control"])
def test_bad_4a_host_name_is_rejected_with_91(raw_host):
    data = b"\x04\x01\x00\x50\x00\x00\x00\x01fred\x00" + raw_host + b"\x00"
    with pytest.raises(WireError) as caught:
        socks4.parse_request(data)
    assert caught.value.reply == socks4.REJECTED


def test_short_inputs_are_incomplete():
    assert socks4.parse_request(b"") is None
    assert socks4.parse_request(b"\x04") is None
    assert socks4.parse_request(b"\x04\x01\x00\x50\x7f\x00\x00") is None
    assert socks4.parse_request(b"\x04\x01\x00\x50\x7f\x00\x00\x01") is None
    assert socks4.parse_request(b"\x04\x01\x00\x50\x7f\x00\x00\x01fred") is None


def test_reply_examples():
    assert socks4.encode_reply(socks4.GRANTED, "10.0.0.5", 51000) == \
        b"\x00\x5a\xc7\x38\x0a\x00\x00\x05"
    assert socks4.encode_reply(socks4.REJECTED) == b"\x00\x5b" + bytes(6)
    assert socks4.encode_reply(socks4.NO_IDENTD) == b"\x00\x5c" + bytes(6)
    assert socks4.encode_reply(socks4.IDENT_MISMATCH) == b"\x00\x5d" + bytes(6)
    assert socks4.encode_reply(socks4.GRANTED, "2001:db8::1", 443) == b"\x00\x5a" + bytes(6)
    assert socks4.parse_reply(b"\x00\x5a\x00\x50\x7f\x00\x00\x01") == (
        socks4.Reply(90, "127.0.0.1", 80), 8)
    assert socks4.parse_reply(b"\x00\x5a\x00\x50\x7f\x00\x00") is None
    with pytest.raises(WireError):
        socks4.parse_reply(b"\x04\x5a\x00\x50\x7f\x00\x00\x01")


@pytest.mark.parametrize("kwargs", [
    dict(host="1.2.3.4", userid="a\x00b"),
    dict(host="1.2.3.4", userid="u" * 256),
    dict(host="1.2.3.4", userid="é" * 128),          # 256 bytes in UTF-8
    dict(host="", by_name=True),
    dict(host="h" * 256, by_name=True),
    dict(host="a\x00b", by_name=True),
], ids=["nul-userid", "long-userid", "long-utf8-userid", "empty-name", "long-name", "nul-name"])
def test_encode_request_refuses_what_cannot_be_sent(kwargs):
    with pytest.raises(ValueError):
        socks4.encode_request(socks4.CONNECT, port=80, **kwargs)
