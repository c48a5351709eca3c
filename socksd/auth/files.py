"""Password files as lists of entries, one user to a line, whatever the
entries hold: Twisted's plaintext ``file:`` and socksd's ``htpasswd:``.

A checker takes the first entry for a name and never looks further, so a
second entry for the same user (``passwd alice >> users`` to change her
password) would be ignored without a word, and the old password would
keep working: such a file is refused at start-up instead.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from typing import Iterable, Iterator

from twisted.cred.checkers import FilePasswordDB


def entry(line: bytes) -> tuple[bytes, bytes | None] | None:
    """An ``htpasswd:`` line's (name, hash), the hash None when the line has
    no ':'; None for a blank line or a # comment."""
    line = line.strip()
    if not line or line.startswith(b"#"):
        return None
    name, sep, hashed = line.partition(b":")
    return name, hashed if sep else None


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


def replace_entry(path: str, name: bytes, line: bytes | None) -> str:
    """Makes ``line`` the only entry for ``name`` in the ``htpasswd:`` file
    at ``path`` (None: removes its entries), every other line kept as it
    is, and says what it did: "added", "replaced" or "deleted".
    LookupError when there is nothing to delete.

    The new text is written to a temporary file in the same folder, which
    is then renamed over the old: a login that reads the file meanwhile
    reads the old one or the new one, never half of one. The new file
    gets the old one's owner, group, mode and ACLs (mkstemp's 0600 for a
    file that did not exist); a symbolic link is followed and the file it
    names replaced."""
    path = os.path.realpath(path)
    try:
        with open(path, "rb") as f:
            old: os.stat_result | None = os.fstat(f.fileno())
            lines = f.read().splitlines(keepends=True)
    except FileNotFoundError:
        old, lines = None, []
    kept: list[bytes] = []
    found = False
    for text in lines:
        parsed = entry(text)
        if parsed is None or parsed[0] != name:
            kept.append(text)
            continue
        if not found and line is not None:
            # In the place of the first one, with its line ending.
            kept.append(line + (text[len(text.rstrip(b"\r\n")):] or b"\n"))
        found = True    # and any later one, which was never read, goes
    if line is None and not found:
        raise LookupError(f"{path}: no entry for {name.decode('utf-8', 'replace')!r}")
    if line is not None and not found:
        if kept and not kept[-1].endswith((b"\n", b"\r")):
            kept[-1] += b"\n"
        kept.append(line + b"\n")
    _write_over(path, b"".join(kept), old)
    return "deleted" if line is None else "replaced" if found else "added"


def _write_over(path: str, data: bytes, old: os.stat_result | None) -> None:
    folder, base = os.path.split(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{base}.", dir=folder)
    try:
        if old is not None:
            # Owner first: chown clears set-id bits, and the mode sets them back.
            os.fchown(fd, old.st_uid, old.st_gid)
            os.fchmod(fd, stat.S_IMODE(old.st_mode))
            _copy_xattrs(path, fd)
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(temporary, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(temporary)
        raise
    # The rename itself, on disk.
    directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _copy_xattrs(path: str, fd: int) -> None:
    """The old file's extended attributes on the new one: its POSIX ACLs
    (``system.posix_acl_access``, by which a group such as socksd's may
    read it) and its security labels. As shutil.copystat does, an
    attribute the file system or our privileges do not allow is skipped."""
    try:
        names = os.listxattr(path)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENODATA, errno.EINVAL):
            return
        raise
    for attribute in names:
        try:
            os.setxattr(fd, attribute, os.getxattr(path, attribute))
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.ENODATA, errno.EINVAL):
                raise
