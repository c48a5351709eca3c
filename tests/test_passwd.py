"""Hashed password files and the checker chain behind the Portal."""

from __future__ import annotations

import contextlib
import io
import os
import pty
import re
import select
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from unittest import mock

import argon2
import bcrypt
import pytest
from twisted.cred import error
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import UsernamePassword
from twisted.cred.portal import Portal
from twisted.trial import unittest

from conftest import require
from socksd.auth import ANONYMOUS, IUser, SOCKSRealm, User, passwd
from socksd.auth.checkers import FirstOf
from socksd.auth.passwd import HashedPasswordFile, hash_password, verify


class HashTests(unittest.SynchronousTestCase):
    def test_bcrypt_and_argon2_round_trip(self):
        for scheme in ("bcrypt", "argon2"):
            hashed = hash_password(b"secret", scheme)
            self.assertTrue(verify(b"secret", hashed))
            self.assertFalse(verify(b"wrong", hashed))

    @pytest.mark.integration
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


def passwd_main(*args: str, input: bytes = b"") -> subprocess.CompletedProcess:
    """What `python -m socksd.auth.passwd ARGS` does (passwd.main), run in this
    process: stdin a pipe (not a terminal) holding ``input``, the exit status
    and output as passwd_cli has them. The real command line is
    test_documented_uses' and the terminal tests'."""
    stdin = io.TextIOWrapper(io.BytesIO(input), encoding="utf-8", newline="\n")
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "stdin", stdin), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            status = passwd.main(list(args))
        except SystemExit as e:   # argparse's usage errors and --help
            status = e.code
    return subprocess.CompletedProcess(args, status, out.getvalue().encode(),
                                       err.getvalue().encode())


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
            out = passwd_main(flag, input=b"pw\n")
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertTrue(out.stdout.startswith(b"usage: python -m socksd.auth.passwd "),
                            out.stdout)
            self.assertIn(b"--argon2", out.stdout)
            self.assertNotIn(flag.encode() + b":$", out.stdout)

    def test_bad_command_lines_make_no_entry(self):
        for args in (["--frobnicate", "alice"], ["-x"], ["-1"], ["--", "-bob"], ["--", "--help"],
                     [""], ["a:b"], ["al\nice"], ["alice", "bob"], [],
                     ["--argon2", "--bcrypt", "alice"]):
            out = passwd_main(*args, input=b"pw\n")
            self.assertEqual((out.returncode, out.stdout), (2, b""), args)
            self.assertIn(b"usage: python -m socksd.auth.passwd", out.stderr, args)
            self.assertNotIn(b"Traceback", out.stderr, args)

    def test_empty_password_is_refused(self):
        for stdin in (b"", b"\n", b"\r\n"):
            for scheme in ([], ["--argon2"]):
                out = passwd_main(*scheme, "alice", input=stdin)
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


def posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """A system.posix_acl_access value: (tag, permissions, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


class PasswdFileTests(unittest.SynchronousTestCase):
    """``--file FILE USER`` adds or replaces USER's entry in place, ``--delete``
    removes it: a password can be changed, which ``>> FILE`` cannot do."""

    def setUp(self):
        self.folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.folder)
        self.path = os.path.join(self.folder, "users")

    def run_tool(self, *args: str, password: bytes = b"pw") -> subprocess.CompletedProcess:
        return passwd_main("--file", self.path, *args, input=password + b"\n")

    def entries(self) -> dict[bytes, bytes]:
        with open(self.path, "rb") as f:
            lines = [line.strip().split(b":", 1) for line in f if b":" in line]
        return {name: hashed for name, hashed in lines}

    def assertOnlyTheFile(self):
        self.assertEqual(os.listdir(self.folder), ["users"])   # no temporary file left

    def test_adds_to_a_new_file_of_mode_600(self):
        out = self.run_tool("alice", password=b"s3cret")
        self.assertEqual((out.returncode, out.stdout), (0, b""), out.stderr)
        self.assertEqual(out.stderr, f"python -m socksd.auth.passwd: added alice's entry to "
                                     f"{self.path}\n".encode())
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertTrue(verify(b"s3cret", self.entries()[b"alice"]))
        self.assertOnlyTheFile()

    def test_replaces_in_place_keeping_every_other_line_mode_and_owner(self):
        bob = b"bob:" + _bcrypt(b"hunter2", 4)
        with open(self.path, "wb") as f:
            f.write(b"# socksd users\r\nalice:" + _bcrypt(b"old", 4) + b"\r\n\n" + bob
                    + b"\nalice:" + _bcrypt(b"older", 4) + b"\ncarol:x")   # no final newline
        os.chmod(self.path, 0o640)
        if os.geteuid() == 0:
            os.chown(self.path, 65534, 65534)
        before = os.stat(self.path)
        with open(self.path, "rb") as reader:    # a login reading the file meanwhile
            out = self.run_tool("alice", password=b"new")
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertIn(b"replaced alice's entry in", out.stderr)
            self.assertIn(b"alice:" + _bcrypt(b"old", 4)[:7], reader.read())   # the old, whole
        after = os.stat(self.path)
        self.assertNotEqual(after.st_ino, before.st_ino)   # renamed over, never rewritten
        self.assertEqual((stat.S_IMODE(after.st_mode), after.st_uid, after.st_gid),
                         (0o640, before.st_uid, before.st_gid))
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        # Her first line's place and line ending; her second entry (never
        # read) gone; the rest as it was.
        self.assertEqual(lines[0], b"# socksd users\r")
        self.assertTrue(lines[1].startswith(b"alice:$2b$") and lines[1].endswith(b"\r"))
        self.assertEqual(lines[2:], [b"", bob, b"carol:x"])
        self.assertTrue(verify(b"new", lines[1][6:-1]))
        # The checker takes the new password only (carol's plaintext aside,
        # the file passes its start-up check).
        with open(self.path, "wb") as f:
            f.write(b"\n".join(line for line in lines if line != b"carol:x"))
        checker = HashedPasswordFile(self.path)
        self.assertEqual(checker._check(b"alice", b"new"), b"alice")
        self.assertRaises(error.UnauthorizedLogin, checker._check, b"alice", b"old")
        self.assertOnlyTheFile()

    def test_adds_a_user_at_the_end(self):
        with open(self.path, "wb") as f:
            f.write(b"bob:" + _bcrypt(b"hunter2", 4))      # no final newline
        self.assertEqual(self.run_tool("--argon2", "alice").returncode, 0)
        entries = self.entries()
        self.assertEqual(list(entries), [b"bob", b"alice"])
        self.assertTrue(entries[b"alice"].startswith(b"$argon2id$"))

    def test_delete(self):
        with open(self.path, "wb") as f:
            f.write(b"alice:" + _bcrypt(b"a", 4) + b"\nbob:" + _bcrypt(b"b", 4)
                    + b"\nalice:" + _bcrypt(b"c", 4) + b"\n")
        out = self.run_tool("--delete", "alice", password=b"")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn(b"deleted alice's entry from", out.stderr)
        self.assertEqual(list(self.entries()), [b"bob"])
        before = os.stat(self.path)
        out = self.run_tool("--delete", "alice", password=b"")
        self.assertEqual(out.returncode, 1)
        self.assertEqual(out.stderr, f"python -m socksd.auth.passwd: {self.path}: no entry for "
                                     f"'alice', nothing changed\n".encode())
        self.assertEqual(os.stat(self.path).st_ino, before.st_ino)
        self.assertOnlyTheFile()

    def test_delete_needs_a_file_and_no_scheme(self):
        for args in (["--delete", "alice"], ["--file", self.path, "--delete", "--argon2", "a"]):
            out = passwd_main(*args)
            self.assertEqual((out.returncode, out.stdout), (2, b""), args)
            self.assertIn(b"--delete", out.stderr.splitlines()[-1])
        self.assertFalse(os.path.exists(self.path))

    def test_acls_are_kept(self):
        with open(self.path, "wb") as f:
            f.write(b"alice:" + _bcrypt(b"a", 4) + b"\n")
        os.chmod(self.path, 0o600)
        # user::rw- user:65534:r-- group::--- mask::r-- other::---
        acl = posix_acl((0x01, 6, 0xFFFFFFFF), (0x02, 4, 65534), (0x04, 0, 0xFFFFFFFF),
                        (0x10, 4, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF))
        os.setxattr(self.path, "system.posix_acl_access", acl)
        os.setxattr(self.path, "user.note", b"kept")
        self.assertEqual(self.run_tool("alice").returncode, 0)
        self.assertEqual(os.getxattr(self.path, "system.posix_acl_access"), acl)
        self.assertEqual(os.getxattr(self.path, "user.note"), b"kept")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)  # the mask as group

    def test_a_symlink_is_followed(self):
        real = os.path.join(self.folder, "real")
        with open(real, "wb") as f:
            f.write(b"alice:" + _bcrypt(b"a", 4) + b"\n")
        os.symlink("real", self.path)
        self.assertEqual(self.run_tool("bob").returncode, 0)
        self.assertEqual(os.readlink(self.path), "real")
        self.assertEqual(list(self.entries()), [b"alice", b"bob"])

    def test_an_owner_it_cannot_keep_changes_nothing(self):
        with open(self.path, "wb") as f:
            f.write(b"alice:" + _bcrypt(b"a", 4) + b"\n")
        before = open(self.path, "rb").read()
        with mock.patch.object(os, "fchown", side_effect=PermissionError(1, "Not permitted")):
            out = self.run_tool("alice")
        self.assertEqual(out.returncode, 1)
        self.assertIn(b"Not permitted, nothing changed", out.stderr)
        self.assertEqual(open(self.path, "rb").read(), before)
        self.assertOnlyTheFile()

    def test_the_command_line(self):
        out = passwd_cli("--file", self.path, "alice", input=b"pw\n")
        self.assertEqual((out.returncode, out.stdout), (0, b""), out.stderr)
        self.assertTrue(verify(b"pw", self.entries()[b"alice"]))


class CheckerTests(unittest.TestCase):
    def setUp(self):
        # Not self.mktemp(): under pytest that writes into the working directory.
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        self.path = os.path.join(directory, "users")
        # Cheap costs: nothing checked here depends on them (HashTests and
        # the command tests check socksd's own hashes).
        with open(self.path, "wb") as f:
            f.write(b"# comment\n\nalice:" + _bcrypt(b"secret", 4) + b"\n"
                    b"bob:" + _argon2(b"hunter2", 64, 1) + b"\n")
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

    def test_a_user_listed_twice_fails_at_start_up_naming_both_lines(self):
        with open(self.path, "ab") as f:
            f.write(b"carol:" + _bcrypt(b"pw", 4) + b"\n  alice:" + _bcrypt(b"new", 4) + b"\n")
        with self.assertRaises(ValueError) as raised:
            HashedPasswordFile(self.path)
        self.assertEqual(str(raised.exception),
                         f"{self.path}:6: user 'alice' again, first on line 3: only that first "
                         "entry would count; keep one")

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


def _bcrypt(password: bytes, rounds: int) -> bytes:
    return bcrypt.hashpw(password, bcrypt.gensalt(rounds))


def _argon2(password: bytes, memory: int, passes: int, lanes: int = 1) -> bytes:
    return argon2.PasswordHasher(time_cost=passes, memory_cost=memory,
                                 parallelism=lanes).hash(password).encode("ascii")


def cost_of(hashed: bytes):
    """(scheme, cost...) of a well-formed hash, read here independently of
    socksd's parser; None for anything else."""
    match = re.fullmatch(rb"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}", hashed)
    if match:
        return "bcrypt", int(match[1])
    match = re.fullmatch(rb"\$(argon2(?:id|i|d))\$v=19\$m=(\d+),t=(\d+),p=(\d+)\$[^$]+\$[^$]+",
                         hashed)
    if match:
        return match[1].decode(), int(match[2]), int(match[3]), int(match[4])
    return None


class UnknownUserCostTests(unittest.TestCase):
    """An unknown user, or a malformed entry, is checked against a dummy hash
    of the file's most common (scheme, cost): no timing tells names apart
    (issue 13). Observed by which hash the check verifies against."""

    def setUp(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        self.path = os.path.join(directory, "users")
        self.verified: list[bytes] = []
        real = passwd.verify

        def spy(password: bytes, hashed: bytes) -> bool:
            self.verified.append(hashed)
            return real(password, hashed)

        self.patch(passwd, "verify", spy)

    def write(self, *hashes: bytes, extra: bytes = b"") -> None:
        with open(self.path, "wb") as f:
            for number, hashed in enumerate(hashes):
                f.write(b"user%d:%s\n" % (number, hashed))
            f.write(extra)

    async def checked_against(self, checker, user: bytes = b"nobody") -> bytes:
        """The one hash a failing login of ``user`` was verified against."""
        self.verified.clear()
        with self.assertRaises(error.UnauthorizedLogin):
            await checker.requestAvatarId(UsernamePassword(user, b"guess"))
        self.assertEqual(len(self.verified), 1, self.verified)
        return self.verified[0]

    async def test_bcrypt_file(self):
        self.write(_bcrypt(b"a", 5), _bcrypt(b"b", 4), _bcrypt(b"c", 5))
        self.assertEqual(cost_of(await self.checked_against(HashedPasswordFile(self.path))),
                         ("bcrypt", 5))

    async def test_argon2_file(self):
        self.write(_argon2(b"a", 8192, 1), _argon2(b"b", 16384, 2), _argon2(b"c", 8192, 1))
        self.assertEqual(cost_of(await self.checked_against(HashedPasswordFile(self.path))),
                         ("argon2id", 8192, 1, 1))

    async def test_a_tie_takes_the_costliest(self):
        self.write(_bcrypt(b"a", 4), _bcrypt(b"b", 6))
        checker = HashedPasswordFile(self.path)
        self.assertEqual(cost_of(await self.checked_against(checker)), ("bcrypt", 6))
        # Across schemes by estimated work: argon2 8 MiB x 1 pass is about
        # 170 bcrypt iterations' worth, more than cost 4 (16 of them).
        self.write(_bcrypt(b"a", 4), _argon2(b"b", 8192, 1))
        self.assertEqual(cost_of(await self.checked_against(checker)),
                         ("argon2id", 8192, 1, 1))

    async def test_follows_the_file_when_it_changes(self):
        self.write(_bcrypt(b"a", 4), _bcrypt(b"b", 4), _bcrypt(b"c", 5))
        checker = HashedPasswordFile(self.path)
        self.assertEqual(cost_of(await self.checked_against(checker)), ("bcrypt", 4))
        self.assertEqual(checker.dummy(), checker.dummy())     # made once per change
        self.write(_bcrypt(b"a", 4), _bcrypt(b"b", 5), _bcrypt(b"c", 5), _bcrypt(b"d", 5))
        self.assertEqual(cost_of(await self.checked_against(checker)), ("bcrypt", 5))
        self.write(_argon2(b"a", 8192, 1))
        self.assertEqual(cost_of(await self.checked_against(checker)),
                         ("argon2id", 8192, 1, 1))

    async def test_malformed_entries_cost_the_same(self):
        self.write(_bcrypt(b"a", 5), _bcrypt(b"b", 5), extra=b"carol:$2b$04$tooshort\n")
        checker = HashedPasswordFile(self.path)
        dummy = await self.checked_against(checker)
        self.assertEqual(cost_of(dummy), ("bcrypt", 5))
        self.assertEqual(await self.checked_against(checker, b"carol"), dummy)
        # A plaintext entry written after start-up, and an argon2 string
        # whose parameters do not parse, alike.
        with open(self.path, "ab") as f:
            f.write(b"dave:hunter2\n" b"erin:$argon2id$v=19$m=x,t=1,p=1$c2FsdA$aGFzaA\n")
        dummy = await self.checked_against(checker)
        self.assertEqual(cost_of(dummy), ("bcrypt", 5))
        self.assertEqual(await self.checked_against(checker, b"dave"), dummy)
        self.assertEqual(await self.checked_against(checker, b"erin"), dummy)

    async def test_a_file_without_hashes_uses_the_helpers_default(self):
        self.write()
        self.assertEqual(cost_of(await self.checked_against(HashedPasswordFile(self.path))),
                         ("bcrypt", 12))


class LongPasswordTests(unittest.TestCase):
    """bcrypt reads a password's first 72 bytes; Apache's htpasswd -B cuts it
    there, and bcrypt 5 raises for longer ones (which failed such a login
    at once, whatever the password)."""

    @pytest.mark.integration
    async def test_htpasswd_entry_with_a_long_password(self):
        htpasswd = require("htpasswd")
        password = b"x" * 60 + b"y" * 40
        out = subprocess.run([htpasswd, "-nbB", "alice", password.decode()],
                             capture_output=True, check=True, timeout=30).stdout.strip()
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "users")
        with open(path, "wb") as f:
            f.write(out + b"\n")
        checker = HashedPasswordFile(path)
        self.assertEqual(await checker.requestAvatarId(UsernamePassword(b"alice", password)),
                         b"alice")
        with self.assertRaises(error.UnauthorizedLogin):
            await checker.requestAvatarId(UsernamePassword(b"alice", b"x" * 60))

    def test_socksd_hashes_long_passwords_like_htpasswd(self):
        hashed = hash_password(b"z" * 100)
        self.assertTrue(verify(b"z" * 100, hashed))
        self.assertTrue(verify(b"z" * 72, hashed))
        self.assertFalse(verify(b"z" * 71, hashed))


class PlainFileTests(unittest.SynchronousTestCase):
    """Twisted's file: checker's file, read as FilePasswordDB reads it."""

    def test_a_user_listed_twice_is_named_with_both_lines(self):
        from twisted.cred.checkers import FilePasswordDB

        from socksd.auth.files import check_plain_file

        with tempfile.NamedTemporaryFile() as f:
            # FilePasswordDB has no comments and keeps leading blanks: "#x:y"
            # is user "#x", " bob" is not "bob".
            f.write(b"#x:y\nalice:1\n\nnofield\n bob:2\nbob:3\nAlice:4\n")
            f.flush()
            check_plain_file(FilePasswordDB(f.name))
            f.write(b"bob:5\n")
            f.flush()
            with self.assertRaises(ValueError) as raised:
                check_plain_file(FilePasswordDB(f.name))
            self.assertIn(f"{f.name}:8: user 'bob' again, first on line 6", str(raised.exception))
            with self.assertRaises(ValueError) as raised:
                check_plain_file(FilePasswordDB(f.name, caseSensitive=False))
            self.assertIn(f"{f.name}:7: user 'alice' again, first on line 2",
                          str(raised.exception))
