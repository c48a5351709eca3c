"""A password file of bcrypt or argon2 hashes, as a twisted.cred checker.

Twisted's ``file:`` checker compares plaintext. This one reads the format of
Apache's ``htpasswd -B`` (``user:$2y$...``) and argon2 PHC strings
(``user:$argon2id$...``), re-reading the file on each login so edits apply at
once. Hashing is deliberately slow, so it runs in a thread, off the reactor.

Make an entry with ``python -m socksd.auth.passwd alice >> users`` (prompts)
or ``htpasswd -B -c users alice``.
"""

from __future__ import annotations

import argparse
import getpass
import sys

import argon2
import bcrypt
from zope.interface import implementer

from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import threads
from twisted.logger import Logger

from socksd.escape import escape

log = Logger()

_BCRYPT = (b"$2a$", b"$2b$", b"$2y$")
_ARGON2 = (b"$argon2id$", b"$argon2i$", b"$argon2d$")
_argon2 = argon2.PasswordHasher()
# Verified against when the user does not exist, so that a missing user
# costs as much time as a wrong password and names cannot be probed.
_DUMMY = bcrypt.hashpw(b"socksd-dummy", bcrypt.gensalt(rounds=10))


def hash_password(password: bytes, scheme: str = "bcrypt") -> bytes:
    if scheme == "bcrypt":
        return bcrypt.hashpw(password, bcrypt.gensalt())
    if scheme == "argon2":
        return _argon2.hash(password).encode("ascii")
    raise ValueError(f"unknown scheme {scheme!r}: use bcrypt or argon2")


def verify(password: bytes, hashed: bytes) -> bool:
    """True when ``password`` matches a bcrypt or argon2 hash."""
    if hashed.startswith(_BCRYPT):
        try:
            return bcrypt.checkpw(password, hashed)
        except ValueError:
            return False
    if hashed.startswith(_ARGON2):
        try:
            return _argon2.verify(hashed.decode("ascii"), password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError,
                UnicodeDecodeError):
            return False
    raise ValueError("not a bcrypt or argon2 hash")


def _entries(path: str):
    """(line number, name, hash or None when the line has no ':') of each
    entry; blank lines and # comments are skipped."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if line and not line.startswith(b"#"):
                name, sep, hashed = line.partition(b":")
                yield number, name, hashed if sep else None


def read_entry(path: str, username: bytes) -> bytes | None:
    """The stored hash for ``username`` in an htpasswd-style file."""
    for number, name, hashed in _entries(path):
        if hashed is None:
            log.warn("{path}:{line}: no ':' in entry, ignored", path=path, line=number)
        elif name == username:
            return hashed
    return None


def check_file(path: str) -> None:
    """ValueError naming the first line that is not ``user:hash`` with a
    bcrypt or argon2 hash: a plaintext password there is a mistake to catch
    at start-up, not at the user's first login."""
    for number, name, hashed in _entries(path):
        user = name.decode("utf-8", "replace")
        if hashed is None:
            raise ValueError(f"{path}:{number}: no ':' in the entry")
        if not hashed.startswith(_BCRYPT + _ARGON2):
            raise ValueError(f"{path}:{number}: the entry for {user!r} is not a bcrypt or "
                             "argon2 hash (python -m socksd.auth.passwd makes one)")


@implementer(ICredentialsChecker)
class HashedPasswordFile:
    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, path: str) -> None:
        self.path = path
        # Fail at start-up, not at the first login, when the file is
        # unreadable or holds something other than hashes. It is read again
        # at each login, so later edits apply (and are checked) then.
        check_file(path)

    def _check(self, username: bytes, password: bytes) -> bytes:
        hashed = read_entry(self.path, username)
        if hashed is None:
            verify(password, _DUMMY)
            raise error.UnauthorizedLogin("no such user")
        try:
            ok = verify(password, hashed)
        except ValueError:
            log.warn("{path}: entry for {user} is not a bcrypt or argon2 hash",
                     path=self.path, user=escape(username.decode("utf-8", "replace")))
            ok = False
        if not ok:
            raise error.UnauthorizedLogin("bad password")
        return username

    def requestAvatarId(self, credentials):
        username = credentials.username
        password = credentials.password
        if isinstance(username, str):
            username = username.encode("utf-8")
        if isinstance(password, str):
            password = password.encode("utf-8")
        return threads.deferToThread(self._check, username, password)


def main(argv: list[str] | None = None) -> int:
    """``python -m socksd.auth.passwd [--argon2|--bcrypt] USER``: print a file entry."""
    parser = argparse.ArgumentParser(
        prog="python -m socksd.auth.passwd",
        description="Print USER:HASH, a line for an htpasswd: file. The password is asked "
                    "twice on a terminal, else read from the first line of stdin.")
    schemes = parser.add_mutually_exclusive_group()
    schemes.add_argument("--bcrypt", dest="scheme", action="store_const", const="bcrypt",
                         help="a bcrypt hash ($2b$, the default)")
    schemes.add_argument("--argon2", dest="scheme", action="store_const", const="argon2",
                         help="an argon2id hash ($argon2id$)")
    parser.add_argument("user", metavar="USER")
    parser.set_defaults(scheme="bcrypt")
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
    print(f"{user}:{hash_password(password.encode('utf-8'), args.scheme).decode('ascii')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
