"""Identification Protocol (RFC 1413) lines: queries and responses.

One line each, without its CR LF. The identd and the ident client read lines
with a length bound (RFC 1413 suggests 1000 octets) and parse them here.
"""

from __future__ import annotations

import codecs
import re
from typing import NamedTuple

from socksd.wire.errors import WireError

PORT = 113
MAX_LINE = 1000

INVALID_PORT = "INVALID-PORT"
NO_USER = "NO-USER"
HIDDEN_USER = "HIDDEN-USER"
UNKNOWN_ERROR = "UNKNOWN-ERROR"
ERROR_TOKENS = frozenset({INVALID_PORT, NO_USER, HIDDEN_USER, UNKNOWN_ERROR})

# Leading zeros are decimal too ("038428 , 0052295"; oidentd answers it).
_PORTS = re.compile(rb"^[ \t]*0*(\d{1,5})[ \t]*,[ \t]*0*(\d{1,5})[ \t]*$")
_TOKEN = re.compile(r"^[\x21-\x7e]+$")
_CHARSETS = frozenset({"utf-8", "ascii", "latin-1", "utf-16", "utf-16-le", "utf-16-be",
                       "koi8-r", "koi8-u", "euc_jp", "shift_jis", "gb2312", "gbk", "big5"})


class Query(NamedTuple):
    server_port: int
    client_port: int


class UserID(NamedTuple):
    server_port: int
    client_port: int
    opsys: str
    charset: str | None
    user: str


class Error(NamedTuple):
    server_port: int
    client_port: int
    token: str


def _ports(raw: bytes) -> tuple[int, int]:
    match = _PORTS.match(raw)
    if match is None:
        raise WireError(f"not a port pair: {raw[:40]!r}", INVALID_PORT)
    server, client = int(match.group(1)), int(match.group(2))
    if not (1 <= server <= 65535 and 1 <= client <= 65535):
        raise WireError(f"port out of range: {server}, {client}", INVALID_PORT)
    return server, client


def parse_query(line: bytes) -> Query:
    """``<port-on-server> , <port-on-client>`` -> the two ports. A line
    comes whole (the reader frames it), so no count is returned."""
    return Query(*_ports(line.rstrip(b"\r")))


def encode_query(server_port: int, client_port: int) -> bytes:
    return b"%d, %d\r\n" % (server_port, client_port)


def parse_response(line: bytes) -> UserID | Error:
    """A response line -> UserID or Error; malformed lines raise WireError."""
    line = line.rstrip(b"\r")
    parts = line.split(b":", 3)
    if len(parts) < 3:
        raise WireError(f"not an ident response: {line[:60]!r}")
    server, client = _ports(parts[0])
    kind = parts[1].strip()
    if kind == b"ERROR":
        token = parts[2].strip().decode("ascii", "replace")
        if len(parts) != 3 or not _TOKEN.match(token or " "):
            raise WireError(f"malformed ERROR response: {line[:60]!r}")
        return Error(server, client, token)
    if kind != b"USERID" or len(parts) != 4:
        raise WireError(f"unknown response type: {line[:60]!r}")
    opsys, _, charset = parts[2].partition(b",")
    opsys_text = opsys.strip().decode("ascii", "replace")
    if not opsys_text:
        raise WireError("USERID response without an operating system")
    charset = charset.strip()
    charset_text = charset.decode("ascii", "replace") or None
    # A character set's name is a token (RFC 1413, from RFC 1340's list):
    # a NUL, a blank or a non-ASCII byte in it is no name at all.
    if charset_text is not None and not _TOKEN.fullmatch(charset_text):
        raise WireError(f"USERID response with a malformed charset: {charset[:40]!r}")
    # The user id is the rest of the line, colons included; leading blanks
    # separate it from the colon and are not part of it.
    raw_user = parts[3].lstrip(b" \t")
    if not raw_user or b"\x00" in raw_user or b"\n" in raw_user:
        raise WireError("USERID response with an empty or invalid user id")
    user = _decode_user(raw_user, charset_text)
    return UserID(server, client, opsys_text, charset_text, user)


def _decode_user(raw: bytes, charset: str | None) -> str:
    """Decode a user id in the charset the identd named, if it is a plain
    character set: the peer must not pick Python codecs such as
    unicode_escape. A name Python does not know, or a codec that is not a
    plain character set, is taken byte for byte (latin-1). A user id that is
    not valid in the plain character set named is a malformed reply, and so
    is any other failure: this parser raises nothing but WireError."""
    if charset is None:
        # No charset: RFC 1413 means US-ASCII; UTF-8 is its superset in
        # practice, and old identds send their names byte for byte.
        try:
            return raw.decode("utf-8")
        except UnicodeError:
            return raw.decode("latin-1")
    try:
        codec = codecs.lookup(charset).name
    except LookupError:
        codec = "latin-1"
    except Exception as e:  # noqa: BLE001 - a codec search function is any code
        raise WireError(f"USERID response with an unusable charset: {charset[:40]!r} "
                        f"({type(e).__name__})") from None
    if not (codec in _CHARSETS or codec.startswith(("iso8859-", "cp125"))):
        codec = "latin-1"
    try:
        return raw.decode(codec)
    except Exception:  # noqa: BLE001 - UnicodeError, or whatever a codec raises
        raise WireError(f"USERID response with a user id that is not valid {charset[:40]}"
                        ) from None


def encode_userid(server_port: int, client_port: int, user: str, opsys: str = "UNIX",
                  charset: str | None = None) -> bytes:
    if any(c in user for c in "\r\n\x00") or not user:
        raise ValueError("a user id is non-empty and has no CR, LF or NUL")
    if not _TOKEN.match(opsys) or ":" in opsys or "," in opsys:
        raise ValueError(f"bad opsys {opsys!r}")
    field = opsys if charset is None else f"{opsys},{charset}"
    raw = user.encode("utf-8" if charset is None or charset.upper() in ("UTF-8", "UTF8")
                      else charset)
    return b"%d, %d : USERID : %s : %s\r\n" % (server_port, client_port, field.encode("ascii"),
                                                raw)


def encode_error(server_port: int, client_port: int, token: str) -> bytes:
    if not _TOKEN.match(token) or ":" in token:
        raise ValueError(f"bad error token {token!r}")
    return b"%d, %d : ERROR : %s\r\n" % (server_port, client_port, token.encode("ascii"))
