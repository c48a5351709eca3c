"""Password files as lists of entries, one user to a line, whatever the
entries hold: Twisted's plaintext ``file:`` and socksd's ``htpasswd:``.

A checker takes the first entry for a name and never looks further, so a
second entry for the same user (``passwd alice >> users`` to change her
password) would be ignored without a word, and the old password would
keep working: such a file is refused at start-up instead.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from twisted.cred.checkers import FilePasswordDB


def duplicate(entries: Iterable[tuple[int, bytes]]) -> tuple[bytes, int, int] | None:
    """The first name of (line number, name) ``entries`` that comes twice,
    and the two line numbers; None when every name comes once."""
    first: dict[bytes, int] = {}
    for number, name in entries:
        if name in first:
            return name, first[name], number
        first[name] = number
    return None


def check_unique(path: str, entries: Iterable[tuple[int, bytes]]) -> None:
    """ValueError naming both lines of the first user listed twice."""
    found = duplicate(entries)
    if found is not None:
        name, first, second = found
        raise ValueError(f"{path}:{second}: user {name.decode('utf-8', 'replace')!r} again, "
                         f"first on line {first}: only that first entry would count; "
                         "keep one")


def plain_entries(checker: FilePasswordDB) -> Iterator[tuple[int, bytes]]:
    """(line number, name) of each entry ``checker`` reads from its file, as
    FilePasswordDB reads them: every line with enough fields, no comments."""
    with open(checker.filename, "rb") as f:
        for number, line in enumerate(f, 1):
            parts = line.rstrip().split(checker.delim)
            if checker.ufield < len(parts) and checker.pfield < len(parts):
                name = parts[checker.ufield]
                yield number, name if checker.caseSensitive else name.lower()


def check_plain_file(checker: FilePasswordDB) -> None:
    """ValueError when a ``file:`` checker's file lists a user twice;
    OSError when it cannot be read."""
    check_unique(checker.filename, plain_entries(checker))
