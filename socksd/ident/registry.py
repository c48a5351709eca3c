"""Connections socksd opened on behalf of SOCKS users, for the identd.

The identd answers a query about such a connection with the SOCKS user
instead of the uid socksd runs as: IRC networks and other ident-checking
services see the real user. With ``workers = 1`` the sessions register here
directly; with workers, each worker tells the supervisor's registry over a
channel of its own (socksd.ident.channel).

Bounded: one entry per live session (a session registers its one outgoing
connection, and removes it when it ends), and one waiting query per identd
connection (the identd's max_connections bounds those).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from twisted.internet import defer

from socksd.rules import parse_ip

Key = tuple[str, int, str, int]


def _key(local_host: str, local_port: int, remote_host: str, remote_port: int) -> Key:
    return (str(parse_ip(local_host)), local_port, str(parse_ip(remote_host)), remote_port)


class Registrar(Protocol):
    """Where a session registers who owns its outgoing connection: the
    registry itself (the identd in the same process), or a worker's channel
    to the supervisor's registry."""

    def add(self, local_host: str, local_port: int, remote_host: str, remote_port: int,
            user: str) -> Any:
        """Register; returns the handle ``remove`` takes."""

    def remove(self, entry: Any) -> None:
        """Retract what ``add`` registered."""


class Entry(NamedTuple):
    """One registration: its connection, and which of the registrations of
    that connection it is."""

    key: Key
    serial: int


class ProxiedConnections:
    """(local address, local port, remote address, remote port) -> SOCKS user.

    A connection may briefly have two entries: with workers, one worker's
    retraction of an ended session can arrive after another worker has
    registered a new connection with the same ports (the channels are not
    ordered with each other). Each entry is removed by its own handle, and
    the newest answers.
    """

    __slots__ = ("_users", "_waiting", "_serial", "_count")

    def __init__(self) -> None:
        self._users: dict[Key, dict[int, str]] = {}
        self._waiting: dict[Key, list[defer.Deferred[str]]] = {}
        self._serial = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, local_host: str, local_port: int, remote_host: str, remote_port: int,
            user: str) -> Entry:
        key = _key(local_host, local_port, remote_host, remote_port)
        self._serial += 1
        self._users.setdefault(key, {})[self._serial] = user
        self._count += 1
        for waiting in self._waiting.pop(key, ()):
            waiting.callback(user)
        return Entry(key, self._serial)

    def remove(self, entry: Entry) -> None:
        users = self._users.get(entry.key)
        if users is None or users.pop(entry.serial, None) is None:
            return
        self._count -= 1
        if not users:
            del self._users[entry.key]

    def user_for(self, local_host: str, local_port: int, remote_host: str,
                 remote_port: int) -> str | None:
        try:
            key = _key(local_host, local_port, remote_host, remote_port)
        except ValueError:
            return None
        return self._newest(key)

    def _newest(self, key: Key) -> str | None:
        users = self._users.get(key)
        return next(reversed(users.values())) if users else None

    def wait_for(self, local_host: str, local_port: int, remote_host: str,
                 remote_port: int) -> defer.Deferred[str]:
        """The user of that connection: now if registered, else when it is.
        Cancel it to stop waiting (it never times out by itself).
        ValueError for an address that is not one."""
        key = _key(local_host, local_port, remote_host, remote_port)
        user = self._newest(key)
        if user is not None:
            return defer.succeed(user)

        def forget(d: defer.Deferred[str]) -> None:
            waiting = self._waiting.get(key, [])
            if d in waiting:
                waiting.remove(d)
                if not waiting:
                    del self._waiting[key]

        d: defer.Deferred[str] = defer.Deferred(forget)
        self._waiting.setdefault(key, []).append(d)
        return d

    def waiting(self) -> int:
        """Queries waiting for a registration (for tests and bounds)."""
        return sum(len(w) for w in self._waiting.values())
