"""Property and example tests for the RFC 1961 frames in socksd.wire.rfc1961."""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socksd.wire import WireError, rfc1961

MTYPS = (rfc1961.CONTEXT, rfc1961.PROTECTION, rfc1961.ENCAPSULATION)

mtyps = st.sampled_from(MTYPS)
# Mostly short tokens, and some right up to the 65535-byte limit.
tokens = st.one_of(
    st.binary(max_size=300),
    st.integers(min_value=0, max_value=rfc1961.MAX_TOKEN).map(lambda n: b"\xa5" * n),
    st.just(b"\x00" * rfc1961.MAX_TOKEN),
)
unknown_mtyps = st.integers(min_value=0, max_value=255).filter(
    lambda m: m not in MTYPS and m != rfc1961.ABORT_TYPE)


def test_constants_are_rfc_1961():
    assert rfc1961.VERSION == 1
    assert (rfc1961.CONTEXT, rfc1961.PROTECTION, rfc1961.ENCAPSULATION) == (1, 2, 3)
    assert rfc1961.ABORT == b"\x01\xff"
    assert rfc1961.MAX_TOKEN == 65535
    assert (rfc1961.INTEGRITY, rfc1961.CONFIDENTIALITY, rfc1961.SELECTIVE) == (1, 2, 3)


@settings(max_examples=200)
@given(mtyps, tokens)
def test_round_trip(mtyp, token):
    encoded = rfc1961.encode_message(mtyp, token)
    assert encoded == bytes((1, mtyp)) + struct.pack("!H", len(token)) + token
    assert rfc1961.parse_message(encoded) == (rfc1961.Message(mtyp, token), len(encoded))
    assert rfc1961.parse_message(encoded, mtyp) == (rfc1961.Message(mtyp, token), len(encoded))


@pytest.mark.parametrize("mtyp", MTYPS)
@pytest.mark.parametrize("size", [0, 1, 65534, 65535])
def test_round_trip_boundaries(mtyp, size):
    token = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    encoded = rfc1961.encode_message(mtyp, token)
    assert len(encoded) == 4 + size
    assert encoded[2:4] == struct.pack("!H", size)
    assert rfc1961.parse_message(encoded, mtyp) == (rfc1961.Message(mtyp, token), 4 + size)


@pytest.mark.parametrize("mtyp", MTYPS)
def test_round_trip_from_bytearray_and_memoryview(mtyp):
    encoded = rfc1961.encode_message(mtyp, b"token")
    for buf in (bytearray(encoded), memoryview(encoded)):
        parsed = rfc1961.parse_message(buf, mtyp)
        assert parsed == (rfc1961.Message(mtyp, b"token"), 9)
        assert type(parsed[0].token) is bytes


@settings(max_examples=100)
@given(mtyps, st.binary(max_size=300))
def test_every_proper_prefix_is_incomplete(mtyp, token):
    encoded = rfc1961.encode_message(mtyp, token)
    for end in range(len(encoded)):
        assert rfc1961.parse_message(encoded[:end]) is None, encoded[:end]
        assert rfc1961.parse_message(encoded[:end], mtyp) is None, encoded[:end]


@pytest.mark.parametrize("mtyp", MTYPS)
def test_prefix_of_largest_frame_is_incomplete(mtyp):
    encoded = rfc1961.encode_message(mtyp, b"x" * rfc1961.MAX_TOKEN)
    for end in (0, 1, 2, 3, 4, 5, 1000, len(encoded) - 1):
        assert rfc1961.parse_message(encoded[:end], mtyp) is None


@settings(max_examples=100)
@given(mtyps, st.binary(max_size=300), st.binary(max_size=64))
def test_trailing_bytes_are_left_over(mtyp, token, trailing):
    encoded = rfc1961.encode_message(mtyp, token)
    data = encoded + trailing
    parsed = rfc1961.parse_message(data, mtyp)
    assert parsed == (rfc1961.Message(mtyp, token), len(encoded))
    assert data[parsed[1]:] == trailing


@settings(max_examples=50)
@given(st.lists(st.tuples(mtyps, st.binary(max_size=100)), min_size=1, max_size=8))
def test_consecutive_frames_parse_one_after_another(frames):
    data = b"".join(rfc1961.encode_message(m, t) for m, t in frames)
    for mtyp, token in frames:
        parsed = rfc1961.parse_message(data)
        assert parsed is not None
        assert parsed[0] == rfc1961.Message(mtyp, token)
        data = data[parsed[1]:]
    assert data == b""
    assert rfc1961.parse_message(data) is None


def _only_wire_errors(data: bytes, expected=None) -> None:
    try:
        result = rfc1961.parse_message(data, expected)
    except WireError:
        return
    if result is not None:
        message, used = result
        assert isinstance(message, rfc1961.Message)
        mtyp, token = message
        assert mtyp in MTYPS
        if expected is not None:
            assert mtyp == expected
        assert 4 <= used <= len(data)
        assert token == data[4:used]


@settings(max_examples=500)
@given(st.binary(max_size=600), st.sampled_from((None,) + MTYPS))
def test_arbitrary_bytes_raise_only_wire_error(data, expected):
    _only_wire_errors(data, expected)


@settings(max_examples=500)
@given(st.integers(min_value=0, max_value=255), st.binary(max_size=600),
       st.sampled_from((None,) + MTYPS))
def test_arbitrary_bytes_after_version_raise_only_wire_error(mtyp, rest, expected):
    _only_wire_errors(bytes((1, mtyp)) + rest, expected)


@pytest.mark.parametrize("expected", (None,) + MTYPS)
@pytest.mark.parametrize("trailing", [b"", b"\x00", b"\x00\x05abc"])
def test_abort_frame_is_an_error(expected, trailing):
    with pytest.raises(WireError, match="abort"):
        rfc1961.parse_message(rfc1961.ABORT + trailing, expected)


@settings(max_examples=100)
@given(st.integers(min_value=0, max_value=255).filter(lambda v: v != 1), st.binary(max_size=20),
       st.sampled_from((None,) + MTYPS))
def test_wrong_version_is_an_error(version, rest, expected):
    # Known from the first byte on: a client that sends garbage is refused at once.
    with pytest.raises(WireError, match="version"):
        rfc1961.parse_message(bytes((version,)), expected)
    with pytest.raises(WireError, match="version"):
        rfc1961.parse_message(bytes((version,)) + rest, expected)


@pytest.mark.parametrize("version", [0, 2, 5, 0xFF])
def test_wrong_version_of_a_whole_frame(version):
    frame = bytes((version,)) + rfc1961.encode_message(rfc1961.CONTEXT, b"tok")[1:]
    with pytest.raises(WireError):
        rfc1961.parse_message(frame, rfc1961.CONTEXT)


@pytest.mark.parametrize("sent", MTYPS)
@pytest.mark.parametrize("expected", MTYPS)
def test_wrong_expected_mtyp_is_an_error(sent, expected):
    frame = rfc1961.encode_message(sent, b"token")
    if sent == expected:
        assert rfc1961.parse_message(frame, expected) == (rfc1961.Message(sent, b"token"),
                                                          len(frame))
        return
    # Known as soon as the type octet is in: whole frame or just its head.
    for data in (frame, frame[:2], frame[:4]):
        with pytest.raises(WireError, match="type"):
            rfc1961.parse_message(data, expected)


@settings(max_examples=100)
@given(unknown_mtyps, st.binary(max_size=20), st.sampled_from((None,) + MTYPS))
def test_unknown_mtyp_is_an_error(mtyp, token, expected):
    frame = bytes((1, mtyp)) + struct.pack("!H", len(token)) + token
    with pytest.raises(WireError):
        rfc1961.parse_message(frame, expected)
    with pytest.raises(WireError):
        rfc1961.parse_message(frame[:2], expected)


@pytest.mark.parametrize("mtyp", MTYPS)
@pytest.mark.parametrize("size", [65536, 70000, 131072])
def test_token_over_65535_cannot_be_encoded(mtyp, size):
    with pytest.raises(ValueError):
        rfc1961.encode_message(mtyp, b"x" * size)


def test_abort_is_not_a_frame_with_a_length():
    # "VER=1 | MTYP=0xFF": two octets, no LEN; a parser never waits for more.
    assert len(rfc1961.ABORT) == 2
    with pytest.raises(WireError):
        rfc1961.parse_message(rfc1961.ABORT)


@settings(max_examples=300)
@given(st.binary(max_size=8), st.binary(max_size=40), st.sampled_from((None,) + MTYPS))
def test_token_length_in_place_agrees_with_parse_message(before, data, expected):
    """Read in place at an offset (the stream decoder's way), a frame's head
    is judged as parse_message judges the same bytes cut off the front."""
    buf = before + data
    try:
        parsed = rfc1961.parse_message(data, expected)
    except WireError as e:
        with pytest.raises(WireError, match=re.escape(str(e))):
            rfc1961.token_length(buf, len(before), expected)
        return
    length = rfc1961.token_length(bytearray(buf), len(before), expected)
    if parsed is not None:
        assert length == len(parsed[0].token)
    elif length is not None:
        assert len(data) < 4 + length      # the head is in, the token is not


@pytest.mark.parametrize("mtyp", MTYPS)
@pytest.mark.parametrize("size", [0, 1, 65535])
def test_encode_head_is_the_head_of_encode_message(mtyp, size):
    assert rfc1961.encode_head(mtyp, size) == rfc1961.encode_message(mtyp, b"x" * size)[:4]
    with pytest.raises(ValueError):
        rfc1961.encode_head(mtyp, rfc1961.MAX_TOKEN + 1)
