"""Hashed password files and the checker chain behind the Portal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from twisted.cred import error
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import UsernamePassword
from twisted.cred.portal import Portal
from twisted.trial import unittest

from socksd.auth import ANONYMOUS, IUser, SOCKSRealm, User
from socksd.auth.checkers import FirstOf
from socksd.auth.passwd import HashedPasswordFile, hash_password, verify

from conftest import require


class HashTests(unittest.SynchronousTestCase):
    def test_bcrypt_and_argon2_round_trip(self):
        for scheme in ("bcrypt", "argon2"):
            hashed = hash_password(b"secret", scheme)
            self.assertTrue(verify(b"secret", hashed))
            self.assertFalse(verify(b"wrong", hashed))

    def test_apache_htpasswd_bcrypt(self):
        htpasswd = require("htpasswd")
        out = subprocess.run([htpasswd, "-nbB", "alice", "secret"], capture_output=True,
                             check=True, timeout=30).stdout.strip()
        name, _, hashed = out.partition(b":")
        self.assertEqual(name, b"alice")
        self.assertTrue(hashed.startswith(b"$2y$"))
        self.assertTrue(verify(b"secret", hashed))
        self.assertFalse(verify(b"secreT", hashed))

    def test_plaintext_is_not_a_hash(self):
        self.assertRaises(ValueError, verify, b"secret", b"secret")

    def test_cli_makes_an_entry(self):
        out = subprocess.run([sys.executable, "-m", "socksd.auth.passwd", "--argon2", "bob"],
                             input=b"pw\n", capture_output=True, check=True, timeout=30)
        name, _, hashed = out.stdout.strip().partition(b":")
        self.assertEqual(name, b"bob")
        self.assertTrue(verify(b"pw", hashed))


class CheckerTests(unittest.TestCase):
    def setUp(self):
        # Not self.mktemp(): under pytest that writes into the working directory.
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        self.path = os.path.join(directory, "users")
        with open(self.path, "wb") as f:
            f.write(b"# comment\n\nalice:" + hash_password(b"secret") + b"\n"
                    b"bob:" + hash_password(b"hunter2", "argon2") + b"\n"
                    b"carol:plaintext\n")
        self.checker = HashedPasswordFile(self.path)

    async def test_accepts_and_refuses(self):
        self.assertEqual(await self.checker.requestAvatarId(
            UsernamePassword(b"alice", b"secret")), b"alice")
        self.assertEqual(await self.checker.requestAvatarId(
            UsernamePassword(b"bob", b"hunter2")), b"bob")
        for user, password in [(b"alice", b"wrong"), (b"nobody", b"secret"),
                               (b"carol", b"plaintext")]:
            with self.assertRaises(error.UnauthorizedLogin):
                await self.checker.requestAvatarId(UsernamePassword(user, password))

    def test_missing_file_fails_at_start_up(self):
        self.assertRaises(OSError, HashedPasswordFile, self.path + ".missing")

    async def test_portal_chain_and_realm(self):
        memory = InMemoryUsernamePasswordDatabaseDontUse(dave=b"pw")
        portal = Portal(SOCKSRealm(), [FirstOf([memory, self.checker])])
        iface, avatar, _ = await portal.login(UsernamePassword(b"alice", b"secret"), None, IUser)
        self.assertIs(iface, IUser)
        self.assertEqual(avatar, User("alice"))
        _, avatar, _ = await portal.login(UsernamePassword(b"dave", b"pw"), None, IUser)
        self.assertEqual(avatar.name, "dave")
        self.assertTrue(avatar.verified)
        with self.assertRaises(error.UnauthorizedLogin):
            await portal.login(UsernamePassword(b"dave", b"secret"), None, IUser)
        self.assertFalse(ANONYMOUS.verified)
