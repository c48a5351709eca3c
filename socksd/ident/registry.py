"""Connections socksd opened on behalf of SOCKS users, for the identd.

When the proxy and the identd share a process, the identd answers a query
about such a connection with the SOCKS user instead of the uid socksd runs
as: IRC networks and other ident-checking services see the real user.
"""

from __future__ import annotations

from socksd.rules import parse_ip


def _key(local_host: str, local_port: int, remote_host: str, remote_port: int):
    return (str(parse_ip(local_host)), local_port, str(parse_ip(remote_host)), remote_port)


class ProxiedConnections:
    """(local address, local port, remote address, remote port) -> SOCKS user."""

    __slots__ = ("_users",)

    def __init__(self) -> None:
        self._users: dict[tuple[str, int, str, int], str] = {}

    def __len__(self) -> int:
        return len(self._users)

    def add(self, local_host: str, local_port: int, remote_host: str, remote_port: int,
            user: str) -> tuple:
        key = _key(local_host, local_port, remote_host, remote_port)
        self._users[key] = user
        return key

    def remove(self, key: tuple) -> None:
        self._users.pop(key, None)

    def user_for(self, local_host: str, local_port: int, remote_host: str,
                 remote_port: int) -> str | None:
        try:
            key = _key(local_host, local_port, remote_host, remote_port)
        except ValueError:
            return None
        return self._users.get(key)
