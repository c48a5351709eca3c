"""A password file of bcrypt or argon2 hashes, as a twisted.cred checker.

Twisted's ``file:`` checker compares plaintext. This one reads the format of
Apache's ``htpasswd -B`` (``user:$2y$...``) and argon2 PHC strings
(``user:$argon2id$...``), re-reading the file on each login so edits apply at
once. Hashing is deliberately slow, so it runs off the reactor, in the
bounded pool of :mod:`socksd.auth.hashing`.

Add or change an entry with ``python -m socksd.auth.passwd --file users
alice`` (prompts) or ``htpasswd -B users alice``.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
import threading
from collections import Counter
from typing import Iterable, Iterator

import argon2
import bcrypt
from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.logger import Logger
from zope.interface import implementer

from socksd.auth import files, hashing
from socksd.escape import escape

log = Logger(namespace="socksd")

_BCRYPT = (b"$2a$", b"$2b$", b"$2y$")
_ARGON2 = (b"$argon2id$", b"$argon2i$", b"$argon2d$")
_argon2 = argon2.PasswordHasher()
_BCRYPT_HASH = re.compile(rb"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_ARGON2_HASH = re.compile(
    rb"\$argon2(?:id|i|d)\$(?:v=\d+\$)?m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+")
# bcrypt uses a password's first 72 bytes: Apache's htpasswd -B cuts it there,
# bcrypt < 5 did so silently, bcrypt 5 raises instead (which refused such a
# user's every login, and quickly).
BCRYPT_MAX_PASSWORD = 72
# What an unknown user's password is checked against when the file has no
# well-formed hash: what `python -m socksd.auth.passwd` makes.
DEFAULT_COST = ("bcrypt", (12,))
_DUMMY_PASSWORD = b"socksd-dummy"

Cost = tuple[str, tuple[int, ...]]


def hash_password(password: bytes, scheme: str = "bcrypt") -> bytes:
    if scheme == "bcrypt":
        return bcrypt.hashpw(password[:BCRYPT_MAX_PASSWORD], bcrypt.gensalt())
    if scheme == "argon2":
        return _argon2.hash(password).encode("ascii")
    raise ValueError(f"unknown scheme {scheme!r}: use bcrypt or argon2")


def verify(password: bytes, hashed: bytes) -> bool:
    """True when ``password`` matches a bcrypt or argon2 hash."""
    if hashed.startswith(_BCRYPT):
        try:
            return bcrypt.checkpw(password[:BCRYPT_MAX_PASSWORD], hashed)
        except ValueError:
            return False
    if hashed.startswith(_ARGON2):
        try:
            return _argon2.verify(hashed.decode("ascii"), password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError,
                UnicodeDecodeError):
            return False
    raise ValueError("not a bcrypt or argon2 hash")


def hash_cost(hashed: bytes) -> Cost | None:
    """The (scheme, cost) of a well-formed hash, e.g. ``("bcrypt", (12,))``
    (rounds) or ``("argon2id", (65536, 3, 4))`` (KiB, passes, lanes); None
    for anything a check would reject at once, without hashing."""
    match = _BCRYPT_HASH.fullmatch(hashed)
    if match:
        rounds = int(match[1])
        return ("bcrypt", (rounds,)) if 4 <= rounds <= 31 else None
    if _ARGON2_HASH.fullmatch(hashed):
        try:
            p = argon2.extract_parameters(hashed.decode("ascii"))
        except (argon2.exceptions.InvalidHashError, ValueError):
            return None
        return f"argon2{p.type.name.lower()}", (p.memory_cost, p.time_cost, p.parallelism)
    return None


def _work(cost: Cost) -> float:
    """A rough CPU cost in one unit for both schemes, only to break ties:
    argon2's KiB x passes; each of bcrypt's 2**rounds iterations costs
    about as much as 48 of those."""
    scheme, params = cost
    if scheme == "bcrypt":
        return 48.0 * 2 ** params[0]
    return float(params[0] * params[1])


def common_cost(hashes: Iterable[bytes]) -> tuple[Cost | None, bytes | None]:
    """The most common (scheme, cost) among well-formed ``hashes``, on a tie
    the costliest, and the first hash of it; (None, None) if there is none."""
    counts: Counter[Cost] = Counter()
    examples: dict[Cost, bytes] = {}
    for hashed in hashes:
        cost = hash_cost(hashed)
        if cost is not None:
            counts[cost] += 1
            examples.setdefault(cost, hashed)
    if not counts:
        return None, None
    best = max(counts, key=lambda cost: (counts[cost], _work(cost), cost))
    return best, examples[best]


def dummy_hash(cost: Cost, example: bytes | None = None) -> bytes:
    """A new hash of a password nobody has, of ``cost`` (argon2: shaped like
    ``example``, a hash of that cost)."""
    scheme, params = cost
    if scheme == "bcrypt":
        return bcrypt.hashpw(_DUMMY_PASSWORD, bcrypt.gensalt(rounds=params[0]))
    if example is None:
        raise ValueError("an argon2 dummy hash needs an example hash to take its shape from")
    hasher = argon2.PasswordHasher.from_parameters(
        argon2.extract_parameters(example.decode("ascii")))
    return hasher.hash(_DUMMY_PASSWORD).encode("ascii")


def _parse(lines: Iterable[bytes]) -> Iterator[tuple[int, bytes, bytes | None]]:
    """(line number, name, hash or None when the line has no ':') of each
    entry; blank lines and # comments are skipped."""
    for number, line in enumerate(lines, 1):
        parsed = files.entry(line)
        if parsed is not None:
            yield number, *parsed


def _entries(path: str):
    with open(path, "rb") as f:
        yield from _parse(f)


def check_file(path: str) -> None:
    """ValueError naming the first line that is not ``user:hash`` with a
    bcrypt or argon2 hash, or the two lines of a user listed twice: a
    plaintext password there, or a second entry that would be ignored, is a
    mistake to catch at start-up, not at the user's first login."""
    names = []
    for number, name, hashed in _entries(path):
        user = name.decode("utf-8", "replace")
        if hashed is None:
            raise ValueError(f"{path}:{number}: no ':' in the entry")
        if not hashed.startswith(_BCRYPT + _ARGON2):
            raise ValueError(f"{path}:{number}: the entry for {user!r} is not a bcrypt or "
                             "argon2 hash (python -m socksd.auth.passwd makes one)")
        names.append((number, name))
    files.check_unique(path, names)


@implementer(ICredentialsChecker)
class HashedPasswordFile:
    """The ``htpasswd:`` checker.

    A name that is not in the file, or whose entry is malformed, is checked
    against a dummy hash of the file's most common (scheme, cost), so that
    it takes as long as most wrong passwords and names cannot be told apart
    by timing (a fixed dummy of its own cost told them from every user
    whose hash costs more or less). The dummy is made again when the file
    changes.
    """

    credentialInterfaces = (IUsernamePassword,)
    # The server's bounded pool for the slow part (socksd.auth.hashing);
    # None: the process-wide default one.
    hash_pool: hashing.HashPool | None = None

    def __init__(self, path: str) -> None:
        self.path = path
        # Fail at start-up, not at the first login, when the file is
        # unreadable or holds something other than hashes. It is read again
        # at each login, so later edits apply (and are checked) then.
        check_file(path)
        self._lock = threading.Lock()
        self._dummy: tuple[tuple[int, ...], Cost, bytes] | None = None  # version, cost, hash

    def _read(self) -> tuple[tuple[int, ...], list[tuple[int, bytes, bytes | None]]]:
        """The file's entries and its version (which changes when it does)."""
        with open(self.path, "rb") as f:
            st = os.fstat(f.fileno())
            entries = list(_parse(f.read().splitlines()))
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns), entries

    def _dummy_for(self, version: tuple[int, ...], entries) -> bytes:
        with self._lock:   # checks run in several threads
            if self._dummy is None or self._dummy[0] != version:
                cost, example = common_cost(hashed for _n, _name, hashed in entries
                                            if hashed is not None)
                cost = cost or DEFAULT_COST
                if self._dummy is not None and self._dummy[1] == cost:
                    dummy = self._dummy[2]
                else:
                    dummy = dummy_hash(cost, example)
                self._dummy = (version, cost, dummy)
            return self._dummy[2]

    def dummy(self) -> bytes:
        """The hash an unknown user's password is checked against now."""
        return self._dummy_for(*self._read())

    def _check(self, username: bytes, password: bytes) -> bytes:
        version, entries = self._read()
        # Kept current at every login, so that no particular login pays for
        # making it after the file changed.
        dummy = self._dummy_for(version, entries)
        hashed = None
        for number, name, entry in entries:
            if entry is None:
                log.warn("{path}:{line}: no ':' in entry, ignored", path=self.path, line=number)
            elif name == username:
                hashed = entry
                break
        if hashed is None:
            verify(password, dummy)
            raise error.UnauthorizedLogin("no such user")
        if hash_cost(hashed) is None:
            log.warn("{path}: entry for {user} is not a bcrypt or argon2 hash",
                     path=self.path, user=escape(username.decode("utf-8", "replace")))
            verify(password, dummy)
            raise error.UnauthorizedLogin("malformed entry")
        if not verify(password, hashed):
            raise error.UnauthorizedLogin("bad password")
        return username

    def requestAvatarId(self, credentials):
        username = credentials.username
        password = credentials.password
        if isinstance(username, str):
            username = username.encode("utf-8")
        if isinstance(password, str):
            password = password.encode("utf-8")
        pool = self.hash_pool if self.hash_pool is not None else hashing.default_pool()
        return pool.run(getattr(credentials, "client", None), self._check, username, password)


def main(argv: list[str] | None = None) -> int:
    """``python -m socksd.auth.passwd [--argon2|--bcrypt] [--file FILE [--delete]] USER``:
    print a file entry, or add, replace or delete it in FILE."""
    parser = argparse.ArgumentParser(
        prog="python -m socksd.auth.passwd",
        description="Print USER:HASH, a line for an htpasswd: file, or with --file add or "
                    "replace USER's entry in FILE. The password is asked twice on a "
                    "terminal, else read from the first line of stdin.")
    schemes = parser.add_mutually_exclusive_group()
    schemes.add_argument("--bcrypt", dest="scheme", action="store_const", const="bcrypt",
                         help="a bcrypt hash ($2b$, the default)")
    schemes.add_argument("--argon2", dest="scheme", action="store_const", const="argon2",
                         help="an argon2id hash ($argon2id$)")
    parser.add_argument("--file", metavar="FILE",
                        help="add USER's entry to FILE, or replace the one it has, keeping "
                             "FILE's mode and owner (FILE is made if missing, mode 600)")
    parser.add_argument("--delete", action="store_true",
                        help="with --file: remove USER's entry instead")
    parser.add_argument("user", metavar="USER")
    args = parser.parse_args(argv)
    user = args.user
    # argparse takes "-1", and anything after "--", as USER: a mistyped
    # option must not become an entry, nor a name break the file's lines.
    problem = ("is empty" if not user else
               "starts with '-' (not an option)" if user.startswith("-") else
               "contains ':'" if ":" in user else
               "contains a line break" if "\n" in user or "\r" in user else None)
    if problem:
        parser.error(f"user name {user!r} {problem}")
    if args.delete and args.file is None:
        parser.error("--delete needs --file")
    if args.delete and args.scheme is not None:
        parser.error("--delete makes no hash: no --bcrypt or --argon2")
    line = None
    if not args.delete:
        try:
            if sys.stdin.isatty():
                password = getpass.getpass(f"password for {user}: ")
                if password and getpass.getpass("again: ") != password:
                    print("passwords differ", file=sys.stderr)
                    return 1
            else:
                password = sys.stdin.readline().rstrip("\r\n")
        except EOFError:
            password = ""
        if not password:
            # An entry with an empty password is a door left open by mistake.
            print(f"{parser.prog}: empty password, no entry made", file=sys.stderr)
            return 1
        hashed = hash_password(password.encode("utf-8"), args.scheme or "bcrypt")
        if args.file is None:
            print(f"{user}:{hashed.decode('ascii')}")
            return 0
        line = os.fsencode(user) + b":" + hashed
    try:
        done = files.replace_entry(args.file, os.fsencode(user), line)
    except LookupError as e:
        print(f"{parser.prog}: {e.args[0]}, nothing changed", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{parser.prog}: {e.filename or args.file}: {e.strerror or e}, nothing changed",
              file=sys.stderr)
        return 1
    where = {"added": "to", "replaced": "in", "deleted": "from"}[done]
    print(f"{parser.prog}: {done} {user}'s entry {where} {args.file}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
