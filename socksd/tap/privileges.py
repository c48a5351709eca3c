"""Files read after twistd drops privileges, checked before it does.

twistd parses the options and makes the service as root, then switches to
``-u``/``-g`` and only then serves. A password file or keytab that root
alone can read passes every check made before the switch, and then fails
every login: so each file the service reads while serving is opened, at
start, by a process that has become that user.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from socksd import config as configuration
from socksd.ident.policy import USER_FILE, IdentPolicy


@dataclass(frozen=True)
class Account:
    """Who twistd's ``-u``/``-g`` make the process: a uid, its gid and the
    supplementary groups twistd sets (initgroups)."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    def __str__(self) -> str:
        try:
            group = grp.getgrgid(self.gid).gr_name
        except KeyError:
            group = str(self.gid)
        return f"{self.name}:{group} (uid {self.uid}, gid {self.gid})"


def after_switch(twistd: Mapping[str, Any] | None) -> Account | None:
    """The account twistd (its options, ``twistd``) switches to before
    serving, when that changes what files can be read: None without
    ``-u``, when not root (twistd then cannot switch), or for ``-u root``.
    ``--euid`` switches the effective ids only, by which files are opened,
    so it counts the same."""
    if twistd is None or twistd.get("uid") is None or os.geteuid() != 0:
        return None
    uid = twistd["uid"]
    if uid == 0:
        return None
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        # twistd's initgroups() would end in a KeyError traceback.
        raise configuration.ConfigError(
            f"twistd -u {uid}: no user has uid {uid}, and twistd sets the groups of the "
            "user it switches to: give a user of the password database") from None
    gid = twistd.get("gid")
    gid = entry.pw_gid if gid is None else gid
    return Account(entry.pw_name, uid, gid, tuple(os.getgrouplist(entry.pw_name, gid)))


def unreadable(account: Account, paths: Sequence[str]) -> dict[str, str]:
    """Those of ``paths`` that ``account`` cannot open for reading, each
    with the reason (strerror). A forked child becomes ``account`` and opens
    them, so the kernel's own check decides: owner, group and supplementary
    groups, ACLs, search permission on every folder above, and whatever a
    security module says. (os.access asks for the real uid, root's here.)"""
    if not paths:
        return {}
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: system calls only, and never back into the caller
        try:
            os.close(read_end)
            try:
                os.setgroups(list(account.groups))
                os.setgid(account.gid)
                os.setuid(account.uid)
            except OSError as e:
                os.write(write_end, b"switch %d\n" % (e.errno or 0))
                os._exit(1)
            for path in paths:
                try:
                    # O_NONBLOCK: a FIFO put there must not hang start-up.
                    os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY))
                    error = 0
                except OSError as e:
                    error = e.errno or -1
                os.write(write_end, b"%d\n" % error)
            os._exit(0)
        finally:
            os._exit(2)
    os.close(write_end)
    chunks = []
    with open(read_end, "rb") as report:
        while chunk := report.read():
            chunks.append(chunk)
    os.waitpid(pid, 0)
    lines = b"".join(chunks).splitlines()
    if lines and lines[0].startswith(b"switch "):
        raise configuration.ConfigError(
            f"cannot become {account} to check the files it will read: "
            f"{os.strerror(int(lines[0].split()[1]))}")
    if len(lines) != len(paths):
        raise configuration.ConfigError(
            f"the check of the files {account} will read ended early")
    return {path: os.strerror(int(line)) for path, line in zip(paths, lines, strict=True)
            if int(line) != 0}


def keytab_file(keytab: str | None) -> str | None:
    """The file a keytab name (else KRB5_KTNAME) names, as krb5 reads it: no
    TYPE: prefix, a FILE: one, or a path from /; None for another type
    (MEMORY:) or for krb5's own default, which krb5.conf may name."""
    name = keytab or os.environ.get("KRB5_KTNAME")
    if not name:
        return None
    if name.startswith("FILE:"):
        return name[len("FILE:"):]
    return name if name.startswith("/") or ":" not in name else None


def check_readable(account: Account, files: Sequence[tuple[str, str]]) -> None:
    """ConfigError naming the first of ``files`` (where named, path) that
    ``account`` cannot read: read at every login, it would fail each one."""
    cannot = unreadable(account, [path for _origin, path in files])
    for origin, path in files:
        if path in cannot:
            raise configuration.ConfigError(
                f"{origin}: {path} cannot be read as {account}, whom twistd -u/-g runs "
                f"socksd as ({cannot[path]}): every login would fail; make it readable by "
                "that user or group")


def user_files(policy: IdentPolicy) -> list[tuple[str, str]]:
    """(user, path) of each ``~/.config/socksd-ident`` the identd would read
    now: those of the users ``user_files`` names (every account in the
    password database for ``*``) that exist and are their user's own
    (the identd ignores any other)."""
    if "*" in policy.user_files:
        entries = pwd.getpwall()
    else:
        entries = []
        for name in sorted(policy.user_files):
            try:
                entries.append(pwd.getpwnam(name))
            except KeyError:
                pass
    found = []
    for entry in entries:
        path = os.path.join(entry.pw_dir, USER_FILE)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and info.st_uid == entry.pw_uid:
            found.append((entry.pw_name, path))
    return found


def user_file_warnings(account: Account | None, policy: IdentPolicy | None) -> list[str]:
    """A line for each identd user file ``account`` will not be able to
    read. Not a stop: the files are optional, many, and their users' own."""
    if account is None or policy is None or not policy.user_files:
        return []
    files = user_files(policy)
    cannot = unreadable(account, [path for _user, path in files])
    return [f"identd: {path}, {user}'s reply mode, cannot be read as {account}, whom twistd "
            f"-u/-g runs the identd as ({cannot[path]}): it is ignored"
            for user, path in files if path in cannot]
