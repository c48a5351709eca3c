"""GSS-API Authentication Method for SOCKS Version 5 (RFC 1961) frames.

``VER=1 | MTYP | LEN(2) | TOKEN`` for context establishment (MTYP 1),
protection-level negotiation (MTYP 2) and encapsulated data (MTYP 3);
``VER=1 | MTYP=0xFF`` aborts.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from socksd.wire.errors import WireError, wrong_version

VERSION = 1
CONTEXT = 1
PROTECTION = 2
ENCAPSULATION = 3
ABORT_TYPE = 0xFF
ABORT = bytes((VERSION, ABORT_TYPE))
MAX_TOKEN = 65535

# Protection levels (the octet negotiated with MTYP 2).
CLEAR = 0            # not in RFC 1961; old curl asks for it
INTEGRITY = 1
CONFIDENTIALITY = 2
SELECTIVE = 3

_HEAD = struct.Struct("!BBH")


class Message(NamedTuple):
    """One frame: its message type and its (GSS-API) token."""

    mtyp: int
    token: bytes


def token_length(buf: bytes, offset: int = 0,
                 expected: int | None = None) -> int | None:
    """The length of the token of the frame that begins at ``offset``, or
    None while its four-byte head is incomplete; WireError as
    :func:`parse_message`. For a stream of frames read in place, without
    cutting each off the front of a buffer."""
    have = len(buf) - offset
    if have > 0 and buf[offset] != VERSION:
        raise wrong_version(buf[offset:offset + 1], "GSS-API frame")
    if have < 2:
        return None
    mtyp = buf[offset + 1]
    if mtyp == ABORT_TYPE:
        raise WireError("GSS-API: the peer aborted")
    if expected is not None and mtyp != expected:
        raise WireError(f"GSS-API frame: message type {mtyp}, expected {expected}")
    if mtyp not in (CONTEXT, PROTECTION, ENCAPSULATION):
        raise WireError(f"GSS-API frame: unknown message type {mtyp}")
    if have < 4:
        return None
    return (buf[offset + 2] << 8) | buf[offset + 3]


def parse_message(buf: bytes, expected: int | None = None) -> tuple[Message, int] | None:
    """One frame -> (Message, consumed); ``expected`` MTYP or WireError."""
    length = token_length(buf, 0, expected)
    if length is None:
        return None
    end = 4 + length
    if len(buf) < end:
        return None
    return Message(buf[1], bytes(buf[4:end])), end


def encode_head(mtyp: int, length: int) -> bytes:
    """The four octets before a token of ``length`` bytes: a caller that
    sends many frames joins heads and tokens once, not each frame apart."""
    if length > MAX_TOKEN:
        raise ValueError(f"GSS-API token of {length} bytes is over {MAX_TOKEN}")
    return _HEAD.pack(VERSION, mtyp, length)


def encode_message(mtyp: int, token: bytes) -> bytes:
    return encode_head(mtyp, len(token)) + token
