"""Files read after twistd's -u/-g, checked at start as that user
(socksd.tap.privileges): a forked child becomes the user and opens them, so
modes, groups, ACLs and folders all count as the kernel counts them.

Needs root (to become another user); fails, never skips, without it.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import struct
import tempfile
from pathlib import Path

import pytest

from helpers import system_user
from socksd import config
from socksd.ident.policy import IdentPolicy
from socksd.tap import socks as tap
from socksd.tap.privileges import (
    Account,
    after_switch,
    keytab_file,
    unreadable,
    user_file_warnings,
)

NOBODY = pwd.getpwnam("nobody")
FILES_USER = "socksd-files-test"


@pytest.fixture(autouse=True)
def as_root():
    assert os.geteuid() == 0, "these tests become another user: run them as root (CI does)"


@pytest.fixture
def folder():
    """A folder every user may enter (tmp_path's parents are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="socksd-privileges-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def nobody(*groups: int) -> Account:
    return Account("nobody", NOBODY.pw_uid, NOBODY.pw_gid, (NOBODY.pw_gid, *groups))


def a_file(path: Path, mode: int, group: int = 0) -> str:
    path.write_text("alice:x\n")
    os.chown(path, 0, group)
    path.chmod(mode)
    return str(path)


def posix_acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


# Who twistd switches to.


def test_no_switch_no_account():
    assert after_switch(None) is None                       # not under twistd
    assert after_switch({"uid": None, "gid": 65534}) is None  # -g alone: still root
    assert after_switch({"uid": 0, "gid": None}) is None


def test_the_account_twistd_switches_to():
    account = after_switch({"uid": NOBODY.pw_uid, "gid": None})
    # Without -g, the user's own group, as twistd does; the groups initgroups sets.
    assert account == Account("nobody", NOBODY.pw_uid, NOBODY.pw_gid,
                              tuple(os.getgrouplist("nobody", NOBODY.pw_gid)))
    assert str(account) == (f"nobody:{grp.getgrgid(NOBODY.pw_gid).gr_name} "
                            f"(uid {NOBODY.pw_uid}, gid {NOBODY.pw_gid})")
    assert after_switch({"uid": NOBODY.pw_uid, "gid": 0}).gid == 0


def test_a_uid_without_a_user_is_an_error():
    free = next(uid for uid in range(54321, 60000) if not _has_user(uid))
    with pytest.raises(config.ConfigError, match=f"twistd -u {free}: no user has uid {free}"):
        after_switch({"uid": free, "gid": None})


def _has_user(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


# What that user can read, as the kernel decides.


def test_modes_groups_folders_and_acls(folder):
    group = 4242     # a group nobody is not in
    files = {
        "private": a_file(folder / "private", 0o600),
        "world": a_file(folder / "world", 0o644),
        "group": a_file(folder / "group", 0o640, group),
        "missing": str(folder / "missing"),
    }
    closed = folder / "closed"
    closed.mkdir(mode=0o700)
    files["closed"] = a_file(closed / "world", 0o644)       # readable, in a folder it cannot enter
    acl = folder / "acl"
    files["acl"] = a_file(acl, 0o600)
    # user::rw- user:nobody:r-- group::--- mask::r-- other::---
    os.setxattr(acl, "system.posix_acl_access",
                posix_acl((0x01, 6, 0xFFFFFFFF), (0x02, 4, NOBODY.pw_uid),
                          (0x04, 0, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)))
    paths = list(files.values())
    assert unreadable(nobody(), paths) == {
        files["private"]: "Permission denied", files["group"]: "Permission denied",
        files["closed"]: "Permission denied", files["missing"]: "No such file or directory"}
    # A supplementary group counts (initgroups gives the user its groups).
    assert files["group"] not in unreadable(nobody(group), paths)
    # Root itself reads them all; os.access, which asks for the real uid, says so too.
    assert all(os.access(path, os.R_OK) for path in paths if path != files["missing"])


def test_a_fifo_does_not_hang_the_check(folder):
    fifo = folder / "fifo"
    os.mkfifo(fifo, 0o644)
    assert unreadable(nobody(), [str(fifo)]) == {}


def test_nothing_to_check_forks_nothing(monkeypatch):
    monkeypatch.setattr(os, "fork", lambda: pytest.fail("forked"))
    assert unreadable(nobody(), []) == {}


# At start-up: a stop for password files and keytabs, named with the user.


def test_build_stops_on_a_password_file_the_user_cannot_read(folder):
    users = a_file(folder / "users", 0o600)
    path = folder / "socksd.toml"
    path.write_text('[server]\ncheckers = ["file:users"]\n')
    with pytest.raises(config.ConfigError) as raised:
        tap.build(str(path), [], [], account=nobody())
    assert str(raised.value) == (
        f"{path}:2: server.checkers[0]: 'file:{users}': {users} cannot be read as "
        f"{nobody()}, whom twistd -u/-g runs socksd as (Permission denied): every login "
        "would fail; make it readable by that user or group")
    # Readable by its group, which the user is given: it starts.
    os.chown(users, 0, NOBODY.pw_gid)
    os.chmod(users, 0o640)
    tap.build(str(path), [], [], account=nobody())


def test_build_checks_auth_checkers_too(folder):
    from twisted.cred import strcred

    users = a_file(folder / "users", 0o600)
    with pytest.raises(config.ConfigError, match=rf"^--auth: {users} cannot be read as nobody"):
        tap.build(None, [], [strcred.makeChecker(f"file:{users}")], account=nobody())


def test_build_stops_on_a_keytab_the_user_cannot_read(folder, monkeypatch):
    keytab = a_file(folder / "socksd.keytab", 0o600)
    path = folder / "socksd.toml"
    path.write_text('[server]\nmethods = ["gssapi"]\n[gssapi]\nkeytab = "socksd.keytab"\n'
                    'local_realms = ["EXAMPLE.COM"]\n')
    # Only the files are checked here: not whether krb5 can use the keytab.
    monkeypatch.setattr("socksd.auth.gss.GSSAPISettings.acceptor_credentials", lambda self: None)
    with pytest.raises(config.ConfigError, match=rf"^{path}:4: gssapi.keytab: {keytab} cannot be "
                                                 "read as nobody"):
        tap.build(str(path), [], [], account=nobody())
    tap.build(str(path), [], [])     # as root (no -u): nothing to check


@pytest.mark.parametrize("name, file", [
    (None, None), ("FILE:/etc/socksd.keytab", "/etc/socksd.keytab"),
    ("/etc/socksd.keytab", "/etc/socksd.keytab"), ("socksd.keytab", "socksd.keytab"),
    ("MEMORY:x", None), ("KEYRING:persistent:0", None),
])
def test_keytab_files(monkeypatch, name, file):
    monkeypatch.delenv("KRB5_KTNAME", raising=False)
    assert keytab_file(name) == file
    monkeypatch.setenv("KRB5_KTNAME", name or "")
    assert keytab_file(None) == file


# The identd's user files: a warning each, never a stop.


@pytest.fixture
def files_user(folder):
    """A throwaway user whose home is a folder of ours, with its reply file."""
    entry = system_user(FILES_USER)
    home = folder / "home"
    (home / ".config").mkdir(parents=True)
    for directory in (home, home / ".config"):
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    reply = home / ".config" / "socksd-ident"
    reply.write_text("fixed:ircnick\n")
    os.chown(reply, entry.pw_uid, entry.pw_gid)
    reply.chmod(0o600)
    return pwd.struct_passwd((*entry[:5], str(home), entry[6])), reply


def test_an_unreadable_user_file_is_a_warning(files_user, monkeypatch):
    entry, reply = files_user
    monkeypatch.setattr(pwd, "getpwnam", lambda name: entry if name == FILES_USER else
                        pytest.fail(name))
    policy = IdentPolicy(user_files=frozenset({FILES_USER}))
    assert user_file_warnings(nobody(), policy) == [
        f"identd: {reply}, {FILES_USER}'s reply mode, cannot be read as {nobody()}, whom "
        "twistd -u/-g runs the identd as (Permission denied): it is ignored"]
    reply.chmod(0o644)
    assert user_file_warnings(nobody(), policy) == []
    # Not the user's own: the identd ignores it anyway, so it is not checked.
    reply.chmod(0o600)
    os.chown(reply, 0, 0)
    assert user_file_warnings(nobody(), policy) == []
    assert user_file_warnings(None, policy) == []             # no -u: nothing to say


def test_every_user_is_looked_at_for_a_star(files_user, monkeypatch):
    entry, reply = files_user
    monkeypatch.setattr(pwd, "getpwall", lambda: [NOBODY, entry])
    warnings = user_file_warnings(nobody(), IdentPolicy(user_files=frozenset({"*"})))
    assert len(warnings) == 1 and str(reply) in warnings[0]
