"""Property and example tests for the RFC 1413 line codec in socksd.wire.ident.

Query:    <port-on-server> , <port-on-client>
Response: <port-pair> : USERID : <opsys>[,<charset>] : <user-id>
          <port-pair> : ERROR : <token>
"""

from __future__ import annotations

import codecs

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socksd.wire import WireError, ident

# Strategies.

ports = st.integers(min_value=1, max_value=65535)
blanks = st.text(alphabet=" \t", max_size=3)
# opsys: printable ASCII token without ":" or "," (the encoder refuses those).
opsys_names = st.one_of(
    st.sampled_from(["UNIX", "OTHER", "WIN32", "MACOS", "OS/2"]),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                   exclude_characters=":,"), min_size=1, max_size=20),
)
# User ids: anything but CR, LF and NUL; colons and inner spaces are part of it.
# Leading blanks separate the id from the colon, so ids do not start with one.
user_ids = st.one_of(
    st.sampled_from(["root", "stjohns", "john smith", "a:b:c", "user : with : colons ",
                     "dölf", "x"]),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"),
            min_size=1, max_size=80).filter(lambda u: u[0] not in " \t"),
)
error_tokens = st.one_of(
    st.sampled_from(sorted(ident.ERROR_TOKENS)),
    st.from_regex(r"\AX-[A-Z0-9-]{1,20}\Z"),
)


def _line(encoded: bytes) -> bytes:
    """What a line reader hands the parser: the line without its LF."""
    assert encoded.endswith(b"\r\n")
    return encoded[:-1]


# Queries.


@given(ports, ports)
def test_query_round_trip(server, client):
    encoded = ident.encode_query(server, client)
    assert encoded == f"{server}, {client}\r\n".encode()
    assert ident.parse_query(_line(encoded)) == ident.Query(server, client)
    assert ident.parse_query(encoded[:-2]) == ident.Query(server, client)


@given(ports, ports, blanks, blanks, blanks, blanks)
def test_query_spaces_are_optional(server, client, b1, b2, b3, b4):
    line = f"{b1}{server}{b2},{b3}{client}{b4}".encode()
    assert ident.parse_query(line) == (server, client)
    assert ident.parse_query(line + b"\r") == (server, client)


@pytest.mark.parametrize("line, expected", [
    (b"6191, 23", (6191, 23)),
    (b"6191,23", (6191, 23)),
    (b"  6191 ,\t23  ", (6191, 23)),
    (b"6191, 23\r", (6191, 23)),
    (b"65535, 1", (65535, 1)),
])
def test_query_examples(line, expected):
    assert ident.parse_query(line) == expected


@pytest.mark.parametrize("line", [
    b"", b"6191", b"6191,", b",23", b"0, 23", b"23, 0", b"65536, 23", b"23, 99999",
    b"123456, 23", b"-1, 23", b"abc, 23", b"6191 23", b"6191; 23", b"6191, 23, 1",
    b"6191, 23 : USERID : UNIX : x", b"\xff\xfe", b"0x10, 23", b"1e3, 23",
])
def test_bad_queries_are_invalid_port(line):
    with pytest.raises(WireError) as caught:
        ident.parse_query(line)
    assert caught.value.reply == ident.INVALID_PORT == "INVALID-PORT"


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_parse_query_arbitrary_bytes(data):
    try:
        server, client = ident.parse_query(data)
    except WireError as e:
        assert e.reply == ident.INVALID_PORT
        return
    assert 1 <= server <= 65535 and 1 <= client <= 65535


@settings(max_examples=300)
@given(st.text(alphabet="0123456789 \t,\r-", max_size=30))
def test_parse_query_near_misses(text):
    try:
        ident.parse_query(text.encode())
    except WireError as e:
        assert e.reply == ident.INVALID_PORT


# Responses.


@given(ports, ports, user_ids, opsys_names, st.sampled_from([None, "UTF-8"]))
def test_userid_round_trip(server, client, user, opsys, charset):
    encoded = ident.encode_userid(server, client, user, opsys, charset)
    assert ident.parse_response(_line(encoded)) == \
        ident.UserID(server, client, opsys, charset, user)
    assert ident.parse_response(encoded[:-2]) == \
        ident.UserID(server, client, opsys, charset, user)


@given(ports, ports, error_tokens)
def test_error_round_trip(server, client, token):
    encoded = ident.encode_error(server, client, token)
    assert encoded == f"{server}, {client} : ERROR : {token}\r\n".encode()
    assert ident.parse_response(_line(encoded)) == ident.Error(server, client, token)


@pytest.mark.parametrize("line, expected", [
    # RFC 1413's own examples.
    (b"6193, 23 : USERID : UNIX : stjohns", ident.UserID(6193, 23, "UNIX", None, "stjohns")),
    (b"6195, 23 : ERROR : NO-USER", ident.Error(6195, 23, "NO-USER")),
    # oidentd writes no blanks.
    (b"54174,53197:USERID:UNIX:root", ident.UserID(54174, 53197, "UNIX", None, "root")),
    (b"1, 2 : USERID : UNIX , UTF-8 : r\xc3\xa9my", ident.UserID(1, 2, "UNIX", "UTF-8", "rémy")),
    (b"1,2:USERID:OTHER:a:b:c", ident.UserID(1, 2, "OTHER", None, "a:b:c")),
    (b"1,2:USERID:UNIX:  john smith", ident.UserID(1, 2, "UNIX", None, "john smith")),
    (b"1,2:USERID:UNIX: x : y ", ident.UserID(1, 2, "UNIX", None, "x : y ")),
    (b"1,2:USERID:UNIX:root\r", ident.UserID(1, 2, "UNIX", None, "root")),
    (b"1,2:ERROR:INVALID-PORT", ident.Error(1, 2, "INVALID-PORT")),
    (b"1,2 : ERROR : HIDDEN-USER ", ident.Error(1, 2, "HIDDEN-USER")),
    (b"1,2:ERROR:UNKNOWN-ERROR\r", ident.Error(1, 2, "UNKNOWN-ERROR")),
    (b"1,2:ERROR:X-NOT-TODAY", ident.Error(1, 2, "X-NOT-TODAY")),
])
def test_response_examples(line, expected):
    assert ident.parse_response(line) == expected


def test_response_in_latin1_charset():
    line = b"1, 2 : USERID : UNIX, ISO-8859-1 : r\xe9my"
    assert ident.parse_response(line) == ident.UserID(1, 2, "UNIX", "ISO-8859-1", "rémy")
    encoded = ident.encode_userid(1, 2, "rémy", "UNIX", "ISO-8859-1")
    assert encoded == b"1, 2 : USERID : UNIX,ISO-8859-1 : r\xe9my\r\n"
    assert ident.parse_response(encoded[:-2]) == ident.parse_response(line)


@pytest.mark.parametrize("line", [
    b"", b"garbage", b"1, 2", b"1, 2 : USERID", b"1, 2 : USERID : UNIX", b"1, 2 : ERROR",
    b"1, 2 : USERID : UNIX : ", b"1, 2 : USERID :  : root", b"1, 2 : WHAT : UNIX : root",
    b"1, 2 : ERROR : NO-USER : extra", b"1, 2 : ERROR : ", b"1, 2 : ERROR : NO USER",
    b"0, 2 : USERID : UNIX : root", b"1, 70000 : USERID : UNIX : root",
    b"a, b : USERID : UNIX : root", b"1, 2 : USERID : UNIX : a\x00b",
])
def test_malformed_responses(line):
    with pytest.raises(WireError):
        ident.parse_response(line)


# Arbitrary bytes never raise anything but WireError.


def _parse_response_or_wire_error(data: bytes) -> None:
    try:
        result = ident.parse_response(data)
    except WireError:
        return
    assert isinstance(result, (ident.UserID, ident.Error))


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_parse_response_arbitrary_bytes(data):
    _parse_response_or_wire_error(data)


# Lines shaped like responses, with noise in every field, reach deeper branches:
# the charset is a name Python knows (or does not), the user id any bytes.
CHARSETS = ["", "UTF-8", "US-ASCII", "latin-1", "utf-16", "utf-32", "idna", "punycode",
            "undefined", "unicode_escape", "utf-7", "cp1252", "hex", "rot13", "base64",
            "zlib", "no-such-charset", "UTF-8\xff"]


@settings(max_examples=1000)
@given(st.sampled_from([b"1, 2", b"1,2", b"65535, 65535", b"x, 2", b"0, 1"]),
       st.sampled_from([b"USERID", b"ERROR", b" USERID ", b"userid", b""]),
       st.sampled_from([b"UNIX", b"OTHER", b"", b" "]),
       st.sampled_from(CHARSETS).map(lambda c: c.encode("utf-8", "surrogateescape")),
       st.binary(max_size=40))
def test_parse_response_structured_noise(pair, kind, opsys, charset, user):
    field = opsys + (b"," + charset if charset else b"")
    _parse_response_or_wire_error(b"%s : %s : %s : %s" % (pair, kind, field, user))
    _parse_response_or_wire_error(b"%s:%s:%s" % (pair, kind, user))


@pytest.mark.parametrize("charset, user", [
    (b"undefined", b"root"),
    (b"punycode", b"\xff-"),
    (b"punycode", b"abc-9"),
])
def test_undecodable_user_in_named_charset_is_a_wire_error_or_parsed(charset, user):
    """An identd naming a codec Python has but that cannot decode the id must
    not make the parser raise anything but WireError (or fall back)."""
    _parse_response_or_wire_error(b"1, 2 : USERID : UNIX, %s : %s" % (charset, user))


# The charset field: any bytes there give a UserID or a WireError, nothing else.


@pytest.mark.parametrize("charset", [
    b"\x00", b"UTF-8\x00", b"\x00UTF-8", b"UTF 8", b"UTF-8\xff", b"\xc3\xa9", b"\x1b[31m",
    b"utf\t8",
])
def test_charset_that_is_not_a_token_is_malformed(charset):
    """A charset names a character set: a NUL (codecs.lookup raised
    ValueError for it, out of the parser), a blank, a control or a non-ASCII
    byte is a malformed reply."""
    with pytest.raises(WireError) as caught:
        ident.parse_response(b"1, 2 : USERID : UNIX," + charset + b" : eve")
    assert "charset" in str(caught.value)


@pytest.mark.parametrize("charset, user", [
    (b"US-ASCII", b"r\xc3\xa9my"),
    (b"UTF-8", b"r\xe9my"),
    (b"UTF-16", b"abc"),                  # an odd number of bytes
    (b"Shift_JIS", b"\x81"),
])
def test_user_id_invalid_in_the_charset_named_is_malformed(charset, user):
    with pytest.raises(WireError):
        ident.parse_response(b"1, 2 : USERID : UNIX, " + charset + b" : " + user)


def test_without_a_charset_non_utf8_ids_are_still_taken_byte_for_byte():
    assert ident.parse_response(b"1, 2 : USERID : UNIX : r\xe9my").user == "r\u00e9my"


def test_a_codec_search_function_that_raises_is_a_wire_error():
    """codecs.lookup runs every search function registered in the process:
    whatever one raises for a name an identd sent is a malformed reply."""
    def search(name):
        if name == "socksd_test_broken":
            raise RuntimeError("broken codec registry")
        return None

    codecs.register(search)
    try:
        with pytest.raises(WireError):
            ident.parse_response(b"1, 2 : USERID : UNIX,socksd_test_broken : eve")
    finally:
        codecs.unregister(search)


charset_fields = st.one_of(
    st.binary(max_size=40),
    st.text(st.characters(min_codepoint=0x00, max_codepoint=0x7F), max_size=20).map(
        lambda t: t.encode("ascii")),
    st.tuples(st.sampled_from(CHARSETS), st.binary(max_size=3), st.booleans()).map(
        lambda t: (t[1] + t[0].encode("utf-8", "surrogateescape")) if t[2]
        else (t[0].encode("utf-8", "surrogateescape") + t[1])),
)


@settings(max_examples=1000)
@given(charset_fields, st.sampled_from([b"eve", b"r\xc3\xa9my", b"\xff\xfe", b"a:b", b"\x80"]))
def test_arbitrary_bytes_in_the_charset_field(charset, user):
    """Whatever the charset field holds, the parser returns a UserID or raises
    WireError (the ident client turns only that into "malformed reply")."""
    _parse_response_or_wire_error(b"1, 2 : USERID : UNIX," + charset + b" : " + user)
    _parse_response_or_wire_error(b"1,2:USERID:UNIX," + charset + b":" + user)


# Encoders refuse what cannot be sent.


@pytest.mark.parametrize("call", [
    lambda: ident.encode_userid(1, 2, ""),
    lambda: ident.encode_userid(1, 2, "a\r\nb"),
    lambda: ident.encode_userid(1, 2, "a\x00b"),
    lambda: ident.encode_userid(1, 2, "root", opsys="UN IX"),
    lambda: ident.encode_userid(1, 2, "root", opsys="UNIX:1"),
    lambda: ident.encode_userid(1, 2, "root", opsys="UNIX,UTF-8"),
    lambda: ident.encode_error(1, 2, "NO USER"),
    lambda: ident.encode_error(1, 2, "X:Y"),
    lambda: ident.encode_error(1, 2, ""),
], ids=["empty-user", "crlf-user", "nul-user", "blank-opsys", "colon-opsys", "comma-opsys",
        "blank-token", "colon-token", "empty-token"])
def test_encoders_refuse_unsendable(call):
    with pytest.raises(ValueError):
        call()


def test_constants():
    assert ident.PORT == 113
    assert ident.MAX_LINE == 1000
    assert ident.ERROR_TOKENS == {"INVALID-PORT", "NO-USER", "HIDDEN-USER", "UNKNOWN-ERROR"}
    assert ident.encode_query(6191, 23) == b"6191, 23\r\n"
    assert ident.encode_userid(6193, 23, "stjohns") == b"6193, 23 : USERID : UNIX : stjohns\r\n"
    assert ident.encode_error(6195, 23, "NO-USER") == b"6195, 23 : ERROR : NO-USER\r\n"


def test_peer_cannot_pick_a_python_codec():
    """The charset field names a character set, not any Python codec: a
    user id in 'unicode_escape' is taken byte for byte, not unescaped."""
    response = ident.parse_response(b"1, 2 : USERID : UNIX,unicode_escape : a\\x41")
    assert response.user == "a\\x41"
    assert ident.parse_response(b"1, 2 : USERID : UNIX,ISO-8859-1 : b\xf6b").user == "b\u00f6b"
