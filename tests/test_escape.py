"""socksd.escape: client-supplied text made safe for a log line.

The inverse below is the format's specification: what a reader of the log
applies to get the client's string back.
"""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from socksd.escape import escape

_ESCAPE = re.compile(r"\\(?:\\|n|r|t|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")

# Default_Ignorable_Code_Point letters and marks: printable to Python, drawn as nothing.
INVISIBLE = "\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180f\u3164\ufe00\ufe0f\uffa0" \
            "\U000e0100\U000e01ef"

# Any code point at all: surrogates too (a SOCKS4 USERID that is not UTF-8
# keeps its bytes as lone surrogates).
any_text = st.text(st.characters(exclude_categories=()))


def unescape(text: str) -> str:
    """The client's string back from its escaped form."""
    named = {"\\\\": "\\", "\\n": "\n", "\\r": "\r", "\\t": "\t"}

    def one(match: re.Match) -> str:
        token = match.group()
        return named.get(token) or chr(int(token[2:], 16))

    assert "\\" not in _ESCAPE.sub("", text), f"a stray backslash in {text!r}"
    return _ESCAPE.sub(one, text)


def assert_safe(escaped: str) -> None:
    """Nothing that ends a line, restyles a terminal, reorders or hides text."""
    for char in escaped:
        assert char.isprintable(), f"{char!r} ({unicodedata.category(char)}) in {escaped!r}"
        assert char not in INVISIBLE, f"{char!r} in {escaped!r}"
    escaped.encode("utf-8")   # no lone surrogate: every log sink can write it


@given(any_text)
@example("mallory\n2026-01-01T00:00:00+0000 [socksd#info] 127.0.0.1:1 socks5 user=admin ok")
@example("bob\r\n\x1b[31m\x7f\x85\udcff")
@example("\u202eevil\u2028\u2029\u200b\ufeff\u00a0\U000e0001")
@example("pay\u3164pal\ufe0f")
@example("\\n\\x41\\\\")
def test_escaped_text_is_safe_and_reads_back(text):
    escaped = escape(text)
    assert_safe(escaped)
    assert unescape(escaped) == text


@given(any_text)
@example("alice smith")
def test_escaped_field_has_no_space_and_reads_back(text):
    escaped = escape(text, spaces=True)
    assert_safe(escaped)
    assert " " not in escaped
    assert unescape(escaped) == text


@given(any_text, any_text)
def test_different_strings_stay_different(a, b):
    if a != b:
        assert escape(a) != escape(b)
        assert escape(a, spaces=True) != escape(b, spaces=True)


@pytest.mark.parametrize("raw, escaped", [
    ("alice", "alice"),
    ("Jürgen.Müller@EXAMPLE.ORG", "Jürgen.Müller@EXAMPLE.ORG"),   # letters stay letters
    ("alice smith", "alice smith"),
    ("mallory\n2026", "mallory\\n2026"),
    ("a\r\nb\tc", "a\\r\\nb\\tc"),
    ("\x1b[31mred", "\\x1b[31mred"),
    ("\x00\x7f\x85\xa0\xad", "\\x00\\x7f\\x85\\xa0\\xad"),
    ("\u202egnp.exe", "\\u202egnp.exe"),
    ("a\u2028b", "a\\u2028b"),
    ("pay\u3164pal", "pay\\u3164pal"),
    ("\udcff", "\\udcff"),
    ("\U000e0041", "\\U000e0041"),
    ("a\\nb", "a\\\\nb"),     # a backslash the client sent is doubled
])
def test_examples(raw, escaped):
    assert escape(raw) == escaped


def test_spaces_only_with_spaces_true():
    assert escape("alice smith", spaces=True) == "alice\\x20smith"
    assert escape("a\u3000b", spaces=True) == "a\\u3000b"
