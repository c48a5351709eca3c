"""Username/Password Authentication for SOCKS V5 (RFC 1929) messages."""

from __future__ import annotations

from typing import NamedTuple

from socksd.wire.errors import WireError, wrong_version

VERSION = 0x01
SUCCESS = 0x00
FAILURE = 0x01


class Request(NamedTuple):
    """A client's username and password; bytes, as RFC 1929 gives them no
    encoding, and the checker decides how to compare them."""

    username: bytes
    password: bytes


class Response(NamedTuple):
    """The server's verdict: SUCCESS, or any other status for failure."""

    status: int


def parse_request(buf: bytes) -> tuple[Request, int] | None:
    """VER ULEN UNAME PLEN PASSWD -> (Request, consumed); the username is
    1..255 bytes, the password 0..255."""
    if buf and buf[0] != VERSION:
        raise wrong_version(buf, "username/password", FAILURE)
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
    return Request(bytes(buf[2:pstart]), bytes(buf[pstart + 1:end])), end


def encode_request(username: bytes, password: bytes) -> bytes:
    if not 1 <= len(username) <= 255 or len(password) > 255:
        raise ValueError("username is 1..255 bytes, password 0..255")
    return bytes((VERSION, len(username))) + username + bytes((len(password),)) + password


def encode_response(status: int) -> bytes:
    return bytes((VERSION, status))


def parse_response(buf: bytes) -> tuple[Response, int] | None:
    if len(buf) < 2:
        return None
    if buf[0] != VERSION:
        raise wrong_version(buf, "username/password response")
    return Response(buf[1]), 2
