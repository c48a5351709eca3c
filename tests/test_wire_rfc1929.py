"""Property and example tests for the RFC 1929 codecs in socksd.wire.rfc1929."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import only_wire_errors
from socksd.wire import WireError, rfc1929

usernames = st.binary(min_size=1, max_size=255)
passwords = st.binary(min_size=0, max_size=255)
statuses = st.integers(min_value=0, max_value=255)


@given(usernames, passwords)
def test_request_round_trip(username, password):
    encoded = rfc1929.encode_request(username, password)
    assert encoded == bytes((1, len(username))) + username + bytes((len(password),)) + password
    assert rfc1929.parse_request(encoded) == (rfc1929.Request(username, password), len(encoded))


@given(statuses)
def test_response_round_trip(status):
    encoded = rfc1929.encode_response(status)
    assert encoded == bytes((1, status))
    assert rfc1929.parse_response(encoded) == (rfc1929.Response(status), 2)


@settings(max_examples=200)
@given(usernames, passwords)
def test_request_every_proper_prefix_is_incomplete(username, password):
    encoded = rfc1929.encode_request(username, password)
    for end in range(len(encoded)):
        assert rfc1929.parse_request(encoded[:end]) is None, encoded[:end]


@given(statuses)
def test_response_every_proper_prefix_is_incomplete(status):
    encoded = rfc1929.encode_response(status)
    for end in range(len(encoded)):
        assert rfc1929.parse_response(encoded[:end]) is None


@settings(max_examples=200)
@given(usernames, passwords, st.binary(max_size=64))
def test_request_trailing_bytes_are_left_over(username, password, trailing):
    encoded = rfc1929.encode_request(username, password)
    parsed = rfc1929.parse_request(encoded + trailing)
    assert parsed == (rfc1929.Request(username, password), len(encoded))
    assert (encoded + trailing)[parsed[1]:] == trailing


@given(statuses, st.binary(max_size=64))
def test_response_trailing_bytes_are_left_over(status, trailing):
    data = rfc1929.encode_response(status) + trailing
    assert rfc1929.parse_response(data) == (rfc1929.Response(status), 2)
    assert data[2:] == trailing


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_parse_request_arbitrary_bytes(data):
    only_wire_errors(rfc1929.parse_request, data)


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_parse_request_arbitrary_bytes_after_version(data):
    only_wire_errors(rfc1929.parse_request, b"\x01" + data)


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_parse_response_arbitrary_bytes(data):
    only_wire_errors(rfc1929.parse_response, data)


# Examples with exact bytes from RFC 1929.


def test_request_example():
    data = b"\x01\x05alice\x06secret"
    assert rfc1929.parse_request(data) == (rfc1929.Request(b"alice", b"secret"), 14)
    assert rfc1929.encode_request(b"alice", b"secret") == data
    assert rfc1929.parse_request(data + b"\x05\x01") == (rfc1929.Request(b"alice", b"secret"), 14)


def test_request_fields_stay_bytes():
    data = b"\x01\x02\xc3\xa9\x02\xff\x00"
    assert rfc1929.parse_request(data) == (rfc1929.Request(b"\xc3\xa9", b"\xff\x00"), 7)


@pytest.mark.parametrize("data", [b"\x05", b"\x05\x05alice\x06secret", b"\x00\x01a\x01b",
                                  b"\x02"])
def test_request_bad_version(data):
    with pytest.raises(WireError) as caught:
        rfc1929.parse_request(data)
    assert caught.value.reply == rfc1929.FAILURE == 0x01


def test_request_empty_username():
    with pytest.raises(WireError) as caught:
        rfc1929.parse_request(b"\x01\x00\x06secret")
    assert caught.value.reply == rfc1929.FAILURE


def test_response_examples():
    assert rfc1929.encode_response(rfc1929.SUCCESS) == b"\x01\x00"
    assert rfc1929.encode_response(rfc1929.FAILURE) == b"\x01\x01"
    assert rfc1929.parse_response(b"\x01\x00") == (rfc1929.Response(0), 2)
    assert rfc1929.parse_response(b"\x01\x01") == (rfc1929.Response(1), 2)
    assert rfc1929.parse_response(b"\x01") is None
    with pytest.raises(WireError):
        rfc1929.parse_response(b"\x05\x00")


def test_encode_request_limits():
    with pytest.raises(ValueError):
        rfc1929.encode_request(b"", b"secret")
    with pytest.raises(ValueError):
        rfc1929.encode_request(b"a" * 256, b"secret")
    with pytest.raises(ValueError):
        rfc1929.encode_request(b"alice", b"p" * 256)
    assert rfc1929.encode_request(b"a" * 255, b"p" * 255)[1] == 255


def test_request_bad_version_is_refused_from_the_first_byte():
    with pytest.raises(WireError, match="^username/password: version 5$") as caught:
        rfc1929.parse_request(b"\x05")
    assert caught.value.reply == rfc1929.FAILURE
