"""Domain names as clients send them -> the one form that rules match and
the resolver looks up.

getaddrinfo applies IDNA (UTS #46) mapping to what it is given: the fullwidth
name "ｌｏｃａｌｈｏｓｔ" resolves to localhost. A rule that only lowercased would
never see "localhost" and let it through. So every name is normalised once,
here, and that form is both matched and resolved.
"""

from __future__ import annotations

import ipaddress
import re

import idna

MAX_NAME = 253      # octets, without the trailing dot (RFC 1035 2.3.4)
MAX_LABEL = 63

# Host names in the wild also carry "_" (_dmarc.example.com, my_host.example).
_LABEL = re.compile(r"[a-z0-9_-]{1,63}\Z")


def normalize_name(name: str) -> str:
    """Lowercase ASCII, IDNA A-labels, no trailing dot; raises ValueError
    saying what is wrong. An IPv6 address given as a name is kept (in its
    compressed form); dotted IPv4 passes as labels of digits."""
    if ":" in name:
        try:
            return str(ipaddress.IPv6Address(name))
        except ValueError:
            pass
    if not name.isascii():
        try:
            # The mapping getaddrinfo applies (fullwidth forms, case, the
            # ideographic full stop), then each non-ASCII label as an A-label.
            name = idna.uts46_remap(name, std3_rules=False, transitional=False)
            name = ".".join(label if label.isascii() else idna.alabel(label).decode("ascii")
                            for label in name.split("."))
        except (idna.IDNAError, UnicodeError, ValueError) as e:
            raise ValueError(f"not a valid internationalized name ({e})") from None
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError("empty name")
    if len(name) > MAX_NAME:
        raise ValueError(f"name of {len(name)} octets (at most {MAX_NAME})")
    for label in name.split("."):
        if not label:
            raise ValueError("empty label")
        if len(label) > MAX_LABEL:
            raise ValueError(f"label of {len(label)} octets (at most {MAX_LABEL})")
        if not _LABEL.match(label):
            raise ValueError("characters other than letters, digits, '-' and '_'")
    return name
