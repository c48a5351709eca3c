"""What the identd answers about a connection's owner: the admin's policy
(globally and per user) and, where allowed, the user's own reply file."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
from dataclasses import dataclass, field

from socksd.wire import ident

USER_FILE = os.path.join(".config", "socksd-ident")
MAX_USER_FILE = 4096
_FIXED = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
MODES = ("name", "uid", "hidden", "random", "hashed")


def parse_mode(text: str) -> str:
    """Validate a reply mode: name, uid, hidden, random, hashed or fixed:TEXT."""
    text = text.strip()
    if text in MODES:
        return text
    if text.startswith("fixed:") and _FIXED.match(text[6:]):
        return text
    raise ValueError(f"{text!r} is not a reply mode ({', '.join(MODES)}, or fixed:TEXT with "
                     "TEXT of 1-32 letters, digits, '.', '_' or '-')")


@dataclass(frozen=True)
class Answer:
    """A USERID reply (``user``) or an ERROR reply (``error``)."""

    user: str | None = None
    error: str | None = None
    note: str = ""          # for the log: how the reply was chosen


@dataclass(frozen=True)
class IdentPolicy:
    """The ``[identd]`` table's answering rules."""

    reply: str = "name"
    hide: frozenset[str] = frozenset({"root"})
    users: dict[str, str] = field(default_factory=dict)       # user -> mode
    user_files: frozenset[str] = frozenset()                  # may set their own; "*" = all
    opsys: str = "UNIX"
    charset: str | None = None
    unknown_error_only: bool = False
    hash_key: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    proxied_users: bool = True
    proxied_reply: str = "name"

    def error(self, token: str, note: str = "") -> Answer:
        return Answer(error=ident.UNKNOWN_ERROR if self.unknown_error_only else token,
                      note=note)

    def answer(self, name: str | None, uid: int, home: str | None) -> Answer:
        """The answer for a connection owned by ``uid`` (called ``name``)."""
        label = name if name is not None else str(uid)
        if name is not None and name in self.hide:
            return self.error(ident.HIDDEN_USER, "hidden by config")
        mode = self.users.get(label, self.reply)
        note = "config"
        if home is not None and name is not None and (
                "*" in self.user_files or name in self.user_files):
            own = read_user_file(home, uid)
            if own is not None:
                mode, note = own, "user file"
        return self.apply(mode, label, uid, note)

    def answer_proxied(self, user: str) -> Answer:
        """The answer for a connection socksd opened for SOCKS user ``user``.
        ``hide`` holds for them as for local users: a SOCKS user may be
        called ``root`` (a password file's entry, root@REALM in Kerberos)."""
        if user in self.hide:
            return self.error(ident.HIDDEN_USER, "hidden by config (SOCKS user)")
        return self.apply(self.proxied_reply, user, None, "SOCKS user")

    def apply(self, mode: str, label: str, uid: int | None, note: str) -> Answer:
        if mode == "hidden":
            return self.error(ident.HIDDEN_USER, f"hidden by {note}")
        if mode == "uid" and uid is not None:
            return Answer(user=str(uid), note=f"uid by {note}")
        if mode == "random":
            return Answer(user="u" + secrets.token_hex(5), note=f"random for {label}")
        if mode == "hashed":
            digest = hmac.new(self.hash_key, label.encode("utf-8"), hashlib.sha256)
            return Answer(user="h" + digest.hexdigest()[:10], note=f"hashed for {label}")
        if mode.startswith("fixed:"):
            return Answer(user=mode[6:], note=f"fixed by {note} for {label}")
        return Answer(user=label, note=note)


def read_user_file(home: str, uid: int) -> str | None:
    """The reply mode in ``~/.config/socksd-ident``, if the user wrote a valid one.

    Opened without following symlinks and only if the user owns it, so a
    user cannot make the identd (often root) read somebody else's file.
    """
    path = os.path.join(home, USER_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != uid:
            return None
        data = os.read(fd, MAX_USER_FILE)
    except OSError:
        return None
    finally:
        os.close(fd)
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            return parse_mode(line)
        except ValueError:
            return None
    return None
