"""An example credential checker plugin for socksd: users and their scrypt
password hashes in an SQLite database (``--auth sqlite:/etc/socksd/users.db``).

A checker plugin is a module in a ``twisted/plugins/`` directory on
``sys.path`` (this file's ``examples/plugins``; no ``__init__.py`` in
``twisted/`` or ``twisted/plugins/``) that defines an object providing
``ICheckerFactory`` and ``IPlugin``. Twisted finds it by scanning those
directories, and caches what it found in ``twisted/plugins/dropin.cache``
next to it (written when the directory is writable; a stale or unwritable
cache is only slower, never wrong).

Try it from a clone of socksd::

    python3 examples/plugins/twisted/plugins/socksd_sqlite_checker.py users.db alice
    PYTHONPATH=examples/plugins .venv/bin/twistd -n socks --auth sqlite:users.db
    curl -x socks5h://alice:PASSWORD@127.0.0.1:1080 http://example.org/

Run as a program, it adds a user (or changes the password of one), asking
for the password on a terminal, else reading the first line of stdin.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import os
import sqlite3
import sys

from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.strcred import ICheckerFactory
from twisted.internet import defer, threads
from twisted.plugin import IPlugin
from zope.interface import implementer

# scrypt's cost: about 50 ms and 16 MiB a check on a current CPU.
SCRYPT = {"n": 1 << 14, "r": 8, "p": 1, "maxmem": 64 << 20}


def scrypt(password: bytes, salt: bytes) -> bytes:
    return hashlib.scrypt(password, salt=salt, **SCRYPT)


@implementer(ICredentialsChecker)
class SQLiteChecker:
    """Checks a user name and password against ``users(name, salt, hash)``.

    socksd asks a checker for ``IUsernamePassword`` credentials only, with
    the name and password as the client sent them: bytes. The avatar ID it
    returns (here the name) becomes the user of the session's log line.
    """

    credentialInterfaces = (IUsernamePassword,)
    # socksd sets this to its bounded pool of hashing threads
    # (auth_threads, auth_in_flight, auth_in_flight_per_client); None
    # outside socksd.
    hash_pool = None

    def __init__(self, path: str) -> None:
        self.path = path
        # Fail at start-up, not at the first login: the file must be a
        # database with the table.
        self._row(b"")

    def _row(self, name: bytes) -> tuple[bytes, bytes] | None:
        # Opened read-only, again at each login: users added meanwhile count.
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) as db:
            row = db.execute("SELECT salt, hash FROM users WHERE name = ?",
                             (name.decode("utf-8", "surrogateescape"),)).fetchone()
        return row

    def _check(self, name: bytes, password: bytes) -> bytes:
        row = self._row(name)
        # An unknown user costs one scrypt too, so timing does not tell
        # the names that exist.
        salt, hashed = row if row is not None else (b"\0" * 16, b"")
        if not hmac.compare_digest(scrypt(password, salt), hashed) or row is None:
            # UnauthorizedLogin: "bad user name or password" (status 0x01,
            # one log line). Any other exception is a checker error, logged
            # with its traceback; the client gets 0x01 too.
            raise error.UnauthorizedLogin("bad user name or password")
        return name

    def requestAvatarId(self, credentials: IUsernamePassword) -> defer.Deferred[bytes]:
        name, password = credentials.username, credentials.password
        if self.hash_pool is not None:
            # In its threads, within its bounds; ``credentials.client`` is
            # the client's address, counted per client.
            return self.hash_pool.run(credentials.client, self._check, name, password)
        return threads.deferToThread(self._check, name, password)


@implementer(ICheckerFactory, IPlugin)
class SQLiteCheckerFactory:
    """What ``--auth sqlite:PATH`` and ``checkers = ["sqlite:PATH"]`` find."""

    authType = "sqlite"            # the name before the first ':'
    authHelp = ("Users and scrypt password hashes in an SQLite database; add users with "
                "python3 socksd_sqlite_checker.py DATABASE USER.")
    argStringFormat = "The path of the database."    # what follows 'sqlite:'
    credentialInterfaces = (IUsernamePassword,)

    def generateChecker(self, argstring: str = "") -> SQLiteChecker:
        if not argstring:
            raise ValueError("sqlite: needs the path of the database (sqlite:PATH)")
        return SQLiteChecker(argstring)


sqlite = SQLiteCheckerFactory()


def add_user(path: str, name: str, password: bytes) -> None:
    """Add ``name``, or give it this password (the database is made if need be)."""
    salt = os.urandom(16)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE IF NOT EXISTS users "
                   "(name TEXT PRIMARY KEY, salt BLOB NOT NULL, hash BLOB NOT NULL)")
        db.execute("INSERT OR REPLACE INTO users VALUES (?, ?, ?)",
                   (name, salt, scrypt(password, salt)))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: socksd_sqlite_checker.py DATABASE USER", file=sys.stderr)
        return 2
    path, name = argv
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        print("an empty password is refused", file=sys.stderr)
        return 1
    add_user(path, name, password.encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
