"""Hashed password files and the checker chain behind the Portal."""

from __future__ import annotations

import os
import pty
import select
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


def passwd_cli(*args: str, input: bytes | None = b"") -> subprocess.CompletedProcess:
    """`python -m socksd.auth.passwd ARGS` as README shows it, run outside the
    checkout so that the installed socksd answers, not ./socksd."""
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-m", "socksd.auth.passwd", *args], input=input,
                              capture_output=True, timeout=30, cwd=cwd)


def passwd_on_a_terminal(user: str, typed: list[bytes]) -> tuple[int, bytes, bytes]:
    """The helper with a terminal (a pty) as stdin and stdout redirected, as in
    README's ``... alice >> users``: (exit status, what it printed, what the
    terminal showed). ``typed`` is answered to each prompt in turn."""
    out_r, out_w = os.pipe()
    cwd = tempfile.mkdtemp()
    pid, master = pty.fork()
    if pid == 0:  # child: a new session whose controlling terminal is the pty
        try:
            os.dup2(out_w, 1)
            os.chdir(cwd)
            os.execv(sys.executable, [sys.executable, "-m", "socksd.auth.passwd", user])
        finally:
            os._exit(127)
    os.close(out_w)
    screen = b""
    try:
        typed = list(typed)
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            assert ready, f"no prompt: {screen!r}"
            try:
                chunk = os.read(master, 1000)
            except OSError:     # EIO: the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
            if typed and screen.rstrip().endswith(b":"):
                os.write(master, typed.pop(0) + b"\n")
                screen += b"|"      # answered: the next prompt ends in ':' again
        printed = b""
        while chunk := os.read(out_r, 1000):
            printed += chunk
    finally:
        os.close(master)
        os.close(out_r)
        _, status = os.waitpid(pid, 0)
        shutil.rmtree(cwd)
    return os.waitstatus_to_exitcode(status), printed, screen


class PasswdCommandTests(unittest.SynchronousTestCase):
    """`python -m socksd.auth.passwd`, the README's way to make an entry."""

    def assertEntry(self, out: bytes, user: bytes, password: bytes, prefix: bytes):
        self.assertEqual(out.count(b"\n"), 1, out)
        name, _, hashed = out.rstrip(b"\n").partition(b":")
        self.assertEqual(name, user)
        self.assertTrue(hashed.startswith(prefix), hashed)
        self.assertTrue(verify(password, hashed))

    def test_documented_uses(self):
        for args, prefix in [(["alice"], b"$2b$"), (["--argon2", "bob"], b"$argon2id$"),
                             (["--bcrypt", "carol"], b"$2b$")]:
            out = passwd_cli(*args, input=b"pw\n")
            self.assertEqual((out.returncode, out.stderr), (0, b""), args)
            self.assertEntry(out.stdout, args[-1].encode(), b"pw", prefix)

    def test_help_is_usage_not_a_user(self):
        for flag in ("--help", "-h"):
            out = passwd_cli(flag, input=b"pw\n")
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertTrue(out.stdout.startswith(b"usage: python -m socksd.auth.passwd "),
                            out.stdout)
            self.assertIn(b"--argon2", out.stdout)
            self.assertNotIn(flag.encode() + b":$", out.stdout)

    def test_bad_command_lines_make_no_entry(self):
        for args in (["--frobnicate", "alice"], ["-x"], ["-1"], ["--", "-bob"], ["--", "--help"],
                     [""], ["a:b"], ["al\nice"], ["alice", "bob"], [],
                     ["--argon2", "--bcrypt", "alice"]):
            out = passwd_cli(*args, input=b"pw\n")
            self.assertEqual((out.returncode, out.stdout), (2, b""), args)
            self.assertIn(b"usage: python -m socksd.auth.passwd", out.stderr, args)
            self.assertNotIn(b"Traceback", out.stderr, args)

    def test_empty_password_is_refused(self):
        for stdin in (b"", b"\n", b"\r\n"):
            for scheme in ([], ["--argon2"]):
                out = passwd_cli(*scheme, "alice", input=stdin)
                self.assertEqual((out.returncode, out.stdout), (1, b""), (stdin, scheme))
                self.assertEqual(out.stderr, b"python -m socksd.auth.passwd: empty password, "
                                             b"no entry made\n")

    def test_terminal_prompts_twice(self):
        status, printed, screen = passwd_on_a_terminal("alice", [b"s3cret", b"s3cret"])
        self.assertEqual(status, 0, screen)
        self.assertIn(b"password for alice:", screen)
        self.assertIn(b"again:", screen)
        self.assertNotIn(b"s3cret", screen)
        self.assertEntry(printed, b"alice", b"s3cret", b"$2b$")

    def test_terminal_empty_password_is_refused(self):
        status, printed, screen = passwd_on_a_terminal("alice", [b""])
        self.assertEqual((status, printed), (1, b""), screen)
        self.assertIn(b"empty password", screen)
        self.assertNotIn(b"again:", screen)


class CheckerTests(unittest.TestCase):
    def setUp(self):
        # Not self.mktemp(): under pytest that writes into the working directory.
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        self.path = os.path.join(directory, "users")
        with open(self.path, "wb") as f:
            f.write(b"# comment\n\nalice:" + hash_password(b"secret") + b"\n"
                    b"bob:" + hash_password(b"hunter2", "argon2") + b"\n")
        self.checker = HashedPasswordFile(self.path)

    async def test_accepts_and_refuses(self):
        self.assertEqual(await self.checker.requestAvatarId(
            UsernamePassword(b"alice", b"secret")), b"alice")
        self.assertEqual(await self.checker.requestAvatarId(
            UsernamePassword(b"bob", b"hunter2")), b"bob")
        # Added after start-up: read at login, and a plaintext entry never matches.
        with open(self.path, "ab") as f:
            f.write(b"carol:plaintext\n")
        for user, password in [(b"alice", b"wrong"), (b"nobody", b"secret"),
                               (b"carol", b"plaintext")]:
            with self.assertRaises(error.UnauthorizedLogin):
                await self.checker.requestAvatarId(UsernamePassword(user, password))

    def test_missing_file_fails_at_start_up(self):
        self.assertRaises(OSError, HashedPasswordFile, self.path + ".missing")

    def test_entries_that_are_not_hashes_fail_at_start_up(self):
        for line, problem in [(b"carol:plaintext", "the entry for 'carol' is not a bcrypt or "
                                                   "argon2 hash"),
                              (b"dave", "no ':' in the entry")]:
            with open(self.path, "ab") as f:
                f.write(line + b"\n")
            with self.assertRaises(ValueError) as raised:
                HashedPasswordFile(self.path)
            self.assertIn(f"{self.path}:5: {problem}", str(raised.exception))
            with open(self.path, "rb") as f:
                kept = f.readlines()[:-1]
            with open(self.path, "wb") as f:
                f.writelines(kept)

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
