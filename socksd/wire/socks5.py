"""SOCKS Protocol Version 5 (RFC 1928) messages.

Incremental parsers take the bytes buffered so far and return ``None`` while a
message is incomplete, or the message and the number of bytes it used.
Written by hand because the one well-kept sans-I/O SOCKS library (socksio)
only implements the client side; the server side parses the other direction.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

from socksd.wire.errors import WireError, wrong_version
from socksd.wire.names import normalize_name

VERSION = 5

# Authentication methods (RFC 1928 section 3).
NO_AUTH = 0x00
GSSAPI = 0x01
USERPASS = 0x02
NO_ACCEPTABLE = 0xFF

# Commands.
CONNECT = 0x01
BIND = 0x02
UDP_ASSOCIATE = 0x03

# Address types.
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

# Reply codes (RFC 1928 section 6).
SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
TTL_EXPIRED = 0x06
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08

_PORT = struct.Struct("!H")


class Greeting(NamedTuple):
    """A client's version identifier/method selection message."""

    methods: bytes     # the method codes it offers, in its order


class MethodSelection(NamedTuple):
    """The server's choice among the offered methods (NO_ACCEPTABLE: none)."""

    method: int


class Request(NamedTuple):
    """A client's request: command, destination and how it was addressed."""

    command: int
    host: str
    port: int
    atyp: int


class Reply(NamedTuple):
    """A server's reply: code and the bound (or peer) address."""

    code: int
    host: str
    port: int
    atyp: int


def parse_greeting(buf: bytes) -> tuple[Greeting, int] | None:
    """Version identifier/method selection message -> (Greeting, consumed)."""
    if buf and buf[0] != VERSION:
        raise wrong_version(buf, "not SOCKS5")
    if len(buf) < 2:
        return None
    end = 2 + buf[1]
    if len(buf) < end:
        return None
    return Greeting(bytes(buf[2:end])), end


def encode_greeting(methods: bytes) -> bytes:
    if not 1 <= len(methods) <= 255:
        raise ValueError("a greeting offers 1 to 255 methods")
    return bytes((VERSION, len(methods))) + bytes(methods)


def method_selection(method: int) -> bytes:
    return bytes((VERSION, method))


def parse_method_selection(buf: bytes) -> tuple[MethodSelection, int] | None:
    if len(buf) < 2:
        return None
    if buf[0] != VERSION:
        raise wrong_version(buf, "not SOCKS5")
    return MethodSelection(buf[1]), 2


def _parse_address(buf: bytes, offset: int, what: str) -> tuple[int, str, int, int] | None:
    """ATYP, DST.ADDR, DST.PORT at ``offset`` -> (atyp, host, port, end)."""
    if len(buf) <= offset:
        return None
    atyp = buf[offset]
    start = offset + 1
    if atyp == ATYP_IPV4:
        end = start + 4
        if len(buf) < end + 2:
            return None
        host = socket.inet_ntoa(bytes(buf[start:end]))
    elif atyp == ATYP_IPV6:
        end = start + 16
        if len(buf) < end + 2:
            return None
        host = socket.inet_ntop(socket.AF_INET6, bytes(buf[start:end]))
    elif atyp == ATYP_DOMAIN:
        if len(buf) <= start:
            return None
        length = buf[start]
        start += 1
        end = start + length
        if len(buf) < end + 2:
            return None
        host = decode_domain(bytes(buf[start:end]), what)
    else:
        raise WireError(f"{what}: unknown address type {atyp}", ADDRESS_TYPE_NOT_SUPPORTED)
    (port,) = _PORT.unpack_from(buf, end)
    return atyp, host, port, end + 2


def decode_domain(raw: bytes, what: str = "address", reply: int = HOST_UNREACHABLE) -> str:
    """A domain name as sent on the wire -> its normal form (see
    :mod:`socksd.wire.names`), the one rules match and the resolver looks up;
    refuses what no resolver takes.

    ``reply`` is the protocol's failure code for a name that cannot be
    resolved (SOCKS5: host unreachable; SOCKS4: rejected).
    """
    if not raw:
        raise WireError(f"{what}: empty domain name", reply)
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"{what}: domain name is not UTF-8", reply) from None
    try:
        return normalize_name(name)
    except ValueError as e:
        raise WireError(f"{what}: bad domain name: {e}", reply) from None


def parse_request(buf: bytes) -> tuple[Request, int] | None:
    """A request (VER CMD RSV ATYP DST.ADDR DST.PORT) -> (Request, consumed)."""
    if buf and buf[0] != VERSION:
        raise wrong_version(buf, "request", GENERAL_FAILURE)
    if len(buf) < 4:
        return None
    if buf[2] != 0:
        raise WireError(f"request: reserved byte is {buf[2]}, not 0", GENERAL_FAILURE)
    parsed = _parse_address(buf, 3, "request")
    if parsed is None:
        return None
    atyp, host, port, end = parsed
    return Request(buf[1], host, port, atyp), end


def encode_address(host: str, port: int) -> bytes:
    """ATYP + ADDR + PORT for an IP literal or a domain name."""
    try:
        packed = socket.inet_pton(socket.AF_INET, host)
        return b"\x01" + packed + _PORT.pack(port)
    except OSError:
        pass
    try:
        packed = socket.inet_pton(socket.AF_INET6, host)
        return b"\x04" + packed + _PORT.pack(port)
    except OSError:
        pass
    raw = host.encode("utf-8")
    if not 1 <= len(raw) <= 255:
        raise ValueError(f"domain name of {len(raw)} bytes cannot be sent")
    return b"\x03" + bytes((len(raw),)) + raw + _PORT.pack(port)


def encode_request(command: int, host: str, port: int) -> bytes:
    return bytes((VERSION, command, 0)) + encode_address(host, port)


def encode_reply(code: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    return bytes((VERSION, code, 0)) + encode_address(host, port)


def parse_reply(buf: bytes) -> tuple[Reply, int] | None:
    if len(buf) < 4:
        return None
    if buf[0] != VERSION:
        raise wrong_version(buf, "reply")
    if buf[2] != 0:
        raise WireError(f"reply: reserved byte is {buf[2]}, not 0")
    parsed = _parse_address(buf, 3, "reply")
    if parsed is None:
        return None
    atyp, host, port, end = parsed
    return Reply(buf[1], host, port, atyp), end


class Datagram(NamedTuple):
    """A UDP ASSOCIATE datagram: header fields and the payload."""

    frag: int
    host: str
    port: int
    atyp: int
    data: bytes


def parse_udp(datagram: bytes) -> Datagram:
    """RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA; datagrams come whole, so an
    incomplete header is malformed rather than "not yet", and the whole
    datagram is used (no count is returned)."""
    if len(datagram) < 4:
        raise WireError("UDP datagram shorter than its header")
    if datagram[0] or datagram[1]:
        raise WireError("UDP header: reserved bytes are not 0")
    parsed = _parse_address(datagram, 3, "UDP header")
    if parsed is None:
        raise WireError("UDP datagram shorter than its header")
    atyp, host, port, end = parsed
    return Datagram(datagram[2], host, port, atyp, bytes(datagram[end:]))


def encode_udp(host: str, port: int, data: bytes, frag: int = 0) -> bytes:
    return bytes((0, 0, frag)) + encode_address(host, port) + data
