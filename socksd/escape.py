"""Client-supplied text, made safe for a line of log text.

A user name, a SOCKS4 USERID, a GSS-API principal, a destination name or an
identd reply is whatever the client sent. Written raw, a line feed forges a
log record (``--syslog`` splits on it), an escape sequence drives the
terminal of whoever reads the log, and a bidi override or an invisible
character makes one name look like another. :func:`escape` is applied where
a text line is formatted, never to the value kept in a session (rules match
the raw name; a JSON or metrics encoder escapes it its own way).

The escaped form uses Python's string-literal escapes, so it reads back
unambiguously:

* ``\\`` becomes ``\\\\`` (so an escape in the output was made by us);
* line feed, carriage return and tab become ``\\n``, ``\\r``, ``\\t``;
* any other character that is not printable (``str.isprintable``: C0 and C1
  controls, DEL, format characters such as U+202E and U+200B, U+2028/U+2029,
  space separators other than the ASCII space, surrogates, private-use and
  unassigned code points) becomes ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``;
* so do the default-ignorable code points Python counts as printable (Hangul
  fillers, the combining grapheme joiner, variation selectors): they render
  as nothing;
* with ``spaces=True`` (a value in a space-separated ``key=value`` field,
  such as ``user=``) the ASCII space becomes ``\\x20`` too.

Everything else, non-ASCII letters included, is kept as it is.
"""

from __future__ import annotations

import re

_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}

# Default_Ignorable_Code_Point (Unicode DerivedCoreProperties) minus what
# str.isprintable() already refuses (Cf, Cn): letters and marks drawn as nothing.
_INVISIBLE = re.compile("[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180d\u180f\u3164"
                        "\ufe00-\ufe0f\uffa0\U000e0100-\U000e01ef]")


def _escape_char(char: str, spaces: bool) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    if (char.isprintable() and not (spaces and char == " ")
            and not (char >= "\u034f" and _INVISIBLE.match(char))):
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(text: str, *, spaces: bool = False) -> str:
    """``text`` with every character that could forge, hide or restyle log
    text written as an escape (see the module docstring); injective."""
    # The common case, a plain name, costs three C-level scans.
    if (text.isprintable() and "\\" not in text and not (spaces and " " in text)
            and (text.isascii() or _INVISIBLE.search(text) is None)):
        return text
    return "".join([_escape_char(char, spaces) for char in text])
