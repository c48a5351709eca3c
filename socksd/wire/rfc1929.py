"""Username/Password Authentication for SOCKS V5 (RFC 1929) messages."""

from __future__ import annotations

from socksd.wire.errors import WireError

VERSION = 0x01
SUCCESS = 0x00
FAILURE = 0x01


def parse_request(buf: bytes) -> tuple[bytes, bytes, int] | None:
    """VER ULEN UNAME PLEN PASSWD -> (username, password, consumed).

    Both fields are 1..255 bytes; they stay bytes because RFC 1929 gives them
    no encoding, and the checker decides how to compare them.
    """
    if not buf:
        return None
    if buf[0] != VERSION:
        raise WireError(f"username/password: version {buf[0]}", FAILURE)
    if len(buf) < 2:
        return None
    ulen = buf[1]
    if ulen == 0:
        raise WireError("username/password: empty username", FAILURE)
    pstart = 2 + ulen
    if len(buf) < pstart + 1:
        return None
    plen = buf[pstart]
    end = pstart + 1 + plen
    if len(buf) < end:
        return None
    return bytes(buf[2:pstart]), bytes(buf[pstart + 1:end]), end


def encode_request(username: bytes, password: bytes) -> bytes:
    if not 1 <= len(username) <= 255 or len(password) > 255:
        raise ValueError("username is 1..255 bytes, password 0..255")
    return bytes((VERSION, len(username))) + username + bytes((len(password),)) + password


def encode_response(status: int) -> bytes:
    return bytes((VERSION, status))


def parse_response(buf: bytes) -> tuple[int, int] | None:
    if len(buf) < 2:
        return None
    if buf[0] != VERSION:
        raise WireError(f"username/password response: version {buf[0]}")
    return buf[1], 2
