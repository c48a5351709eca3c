"""SOCKS4 and its 4a extension: one request, one reply, no negotiation.

Request: VN=4 CD DSTPORT DSTIP USERID NUL, and for 4a (DSTIP 0.0.0.x, x != 0)
a host name and NUL after the USERID. Both strings are bounded: a field that
has no NUL within its limit is refused (reply 91) without buffering further.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

from socksd.wire.errors import WireError, wrong_version
from socksd.wire.socks5 import decode_domain

VERSION = 4
REPLY_VERSION = 0

CONNECT = 1
BIND = 2

GRANTED = 90
REJECTED = 91
NO_IDENTD = 92
IDENT_MISMATCH = 93

MAX_FIELD = 255
_HEAD = struct.Struct("!BBH4s")


class Request(NamedTuple):
    """``host`` is the DSTIP as text, or the 4a host name (``by_name``)."""

    command: int
    host: str
    port: int
    userid: str
    by_name: bool


class Reply(NamedTuple):
    """A server's reply: code (GRANTED, ...) and the bound address (BIND)."""

    code: int
    host: str
    port: int


def _field(buf: bytes, start: int, what: str) -> tuple[bytes, int] | None:
    """A NUL-terminated field at ``start`` -> (value, index after the NUL)."""
    end = buf.find(b"\x00", start, start + MAX_FIELD + 1)
    if end < 0:
        if len(buf) - start > MAX_FIELD:
            raise WireError(f"{what} longer than {MAX_FIELD} bytes", REJECTED)
        return None
    return bytes(buf[start:end]), end + 1


def parse_request(buf: bytes) -> tuple[Request, int] | None:
    if buf and buf[0] != VERSION:
        raise wrong_version(buf, "not SOCKS4", REJECTED)
    if len(buf) < 8:
        return None
    _vn, command, port, raw_ip = _HEAD.unpack_from(buf)
    userid = _field(buf, 8, "USERID")
    if userid is None:
        return None
    raw_userid, end = userid
    # USERIDs have no defined encoding; surrogateescape keeps every byte.
    name = raw_userid.decode("utf-8", "surrogateescape")
    if raw_ip[:3] == b"\x00\x00\x00" and raw_ip[3] != 0:
        hostname = _field(buf, end, "host name")
        if hostname is None:
            return None
        raw_host, end = hostname
        host = decode_domain(raw_host, "SOCKS4a host name", REJECTED)
        return Request(command, host, port, name, True), end
    return Request(command, socket.inet_ntoa(raw_ip), port, name, False), end


def encode_request(command: int, host: str, port: int, userid: str = "",
                   by_name: bool = False) -> bytes:
    raw_userid = userid.encode("utf-8", "surrogateescape")
    if b"\x00" in raw_userid or len(raw_userid) > MAX_FIELD:
        raise ValueError("USERID must be at most 255 bytes without NUL")
    if by_name:
        raw_host = host.encode("utf-8")
        if not raw_host or b"\x00" in raw_host or len(raw_host) > MAX_FIELD:
            raise ValueError("host name must be 1..255 bytes without NUL")
        return (_HEAD.pack(VERSION, command, port, b"\x00\x00\x00\x01") + raw_userid
                + b"\x00" + raw_host + b"\x00")
    raw_ip = socket.inet_aton(host)
    if raw_ip[:3] == b"\x00\x00\x00" and raw_ip[3] != 0:
        raise ValueError(f"{host} is how SOCKS4a marks a request by name")
    return _HEAD.pack(VERSION, command, port, raw_ip) + raw_userid + b"\x00"


def encode_reply(code: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """VN=0 CD DSTPORT DSTIP; an address that is not IPv4 is sent as 0.0.0.0."""
    try:
        raw = socket.inet_pton(socket.AF_INET, host)
    except OSError:
        raw, port = b"\x00\x00\x00\x00", 0
    return _HEAD.pack(REPLY_VERSION, code, port, raw)


def parse_reply(buf: bytes) -> tuple[Reply, int] | None:
    if len(buf) < 8:
        return None
    if buf[0] != REPLY_VERSION:
        raise wrong_version(buf, "SOCKS4 reply")
    _vn, code, port, raw = _HEAD.unpack_from(buf)
    return Reply(code, socket.inet_ntoa(raw), port), 8
