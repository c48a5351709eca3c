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


def parse_message(buf: bytes, expected: int | None = None) -> tuple[Message, int] | None:
    """One frame -> (Message, consumed); ``expected`` MTYP or WireError."""
    if buf and buf[0] != VERSION:
        raise wrong_version(buf, "GSS-API frame")
    if len(buf) < 2:
        return None
    mtyp = buf[1]
    if mtyp == ABORT_TYPE:
        raise WireError("GSS-API: the peer aborted")
    if expected is not None and mtyp != expected:
        raise WireError(f"GSS-API frame: message type {mtyp}, expected {expected}")
    if mtyp not in (CONTEXT, PROTECTION, ENCAPSULATION):
        raise WireError(f"GSS-API frame: unknown message type {mtyp}")
    if len(buf) < 4:
        return None
    (length,) = struct.unpack_from("!H", buf, 2)
    end = 4 + length
    if len(buf) < end:
        return None
    return Message(mtyp, bytes(buf[4:end])), end


def encode_message(mtyp: int, token: bytes) -> bytes:
    if len(token) > MAX_TOKEN:
        raise ValueError(f"GSS-API token of {len(token)} bytes is over {MAX_TOKEN}")
    return _HEAD.pack(VERSION, mtyp, len(token)) + token
