"""Start-up warnings about how the process runs: as root, or with secrets
that other local users can read.

None of these stops the start: each is a configuration the admin may have
chosen, but rarely on purpose.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable, Sequence

from twisted.application import service
from twisted.cred.checkers import FilePasswordDB
from twisted.logger import Logger

log = Logger(namespace="socksd")


class RootWarning(service.Service):
    """Warns when the service starts as root.

    twistd binds the ports (privilegedStartService), then switches to
    ``-u``/``--uid`` and ``-g``/``--gid`` if given, then starts the services:
    so a service that still finds uid 0 at startService was given none, and
    serves every client with every privilege.
    """

    def __init__(self, name: str) -> None:
        self.tapname = name

    def startService(self) -> None:
        super().startService()
        message = root_warning(self.tapname)
        if message is not None:
            log.warn("{message}", message=message)


def root_warning(tapname: str, uid: int | None = None, euid: int | None = None) -> str | None:
    """What to say about running as (uid, euid), default this process's; None: nothing."""
    uid = os.getuid() if uid is None else uid
    euid = os.geteuid() if euid is None else euid
    advice = (f"start it with -u/--uid and -g/--gid (twistd -u nobody -g nogroup {tapname} "
              "...): twistd binds the ports first, then switches")
    if euid == 0:
        return (f"running as root: twistd was given no -u/--uid, so every client is served "
                f"by a root process; {advice}")
    if uid == 0:
        return (f"the real uid is still root (twistd --euid): the process can become root "
                f"again; {advice}")
    return None


def readable_by_others(path: str) -> bool:
    """True when any local user can read ``path``: the file is world-readable
    and every directory above it world-searchable. (Group permissions and ACLs
    are not looked at.)"""
    try:
        if not os.stat(path).st_mode & stat.S_IROTH:
            return False
        directory = os.path.dirname(os.path.abspath(path))
        while True:
            if not os.stat(directory).st_mode & stat.S_IXOTH:
                return False
            parent = os.path.dirname(directory)
            if parent == directory:
                return True
            directory = parent
    except OSError:
        return False     # missing or unreadable: others cannot read it either


def secret_files(cfg, checkers: Iterable) -> list[tuple[str, str]]:
    """(what, path) of every file holding a secret this configuration uses:
    the GSS-API keytab, password files (file:, htpasswd:), and the config
    file itself when its checkers hold memory: passwords."""
    files = []
    # Loaded if, and only if, an htpasswd: checker was made: not imported here
    # for nothing (bcrypt, argon2).
    passwd = sys.modules.get("socksd.auth.passwd")
    gssapi = getattr(cfg, "gssapi", None)
    if gssapi is not None and gssapi.keytab and "gssapi" in cfg.methods:
        files.append(("[gssapi] keytab", gssapi.keytab))
    for checker in checkers:
        if isinstance(checker, FilePasswordDB):
            files.append(("file: password file", checker.filename))
        elif passwd is not None and isinstance(checker, passwd.HashedPasswordFile):
            files.append(("htpasswd: password file", checker.path))
    if cfg.path and any(c.startswith("memory:") for c in cfg.checkers):
        files.append(("config file (its memory: checkers hold passwords)", cfg.path))
    return files


def warn_about_secrets(cfg, checkers: Iterable, auth_strings: Sequence[str]) -> None:
    """A line for each secret other local users can read."""
    for what, path in secret_files(cfg, checkers):
        if readable_by_others(path):
            log.warn("{what} {path} is readable by every local user; "
                     "chmod o-r it (the service only needs to read it itself)",
                     what=what, path=path)
    if any(a.startswith("memory:") for a in auth_strings):
        log.warn("--auth memory:USER:PASSWORD puts the password on twistd's command line, "
                 "which every local user can read (ps); use --auth htpasswd:FILE")
