"""A worker's registrations, carried to the supervisor's identd (``workers = N``).

They travel on the worker's control channel to the supervisor
(socksd.channel), apart from its log channel: the log channel drops records
when the supervisor falls behind, by design, and a lost retraction would
leave a stale entry (the next connection on that port answered with the old
session's user). The control channel never drops: when the supervisor reads
slowly, the worker holds what it has not sent yet (back-pressure, not loss).

The messages (JSON arrays in the channel's frames)::

    ["add", ID, LOCAL_HOST, LOCAL_PORT, REMOTE_HOST, REMOTE_PORT, USER]
    ["remove", ID]

The supervisor keeps each worker's entries by their ID, so a worker that
ends (its channel closes) takes exactly its own entries with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from socksd.channel import Channel, Malformed, decode, frame
from socksd.escape import escape
from socksd.ident.registry import Entry, ProxiedConnections
from socksd.rules import parse_ip

__all__ = ["MAX_FRAME", "MAX_USER", "Malformed", "RegistrationReceiver", "RegistrationSender",
           "parse_frame", "parse_message"]

log = Logger(namespace="socksd")

# RFC 1413 caps a user id at 512 octets: a longer name could not be answered
# anyway, so it is not registered (the identd answers for that connection as
# for any other socket of socksd's).
MAX_USER = 512
# The largest frame of a channel that carries registrations only: an add
# with two IPv6 addresses (with scopes) and a MAX_USER name JSON-escaped
# (\udcxx: 6 bytes a byte) fits with room.
MAX_FRAME = 4096


def _user_fits(user: str) -> bool:
    # surrogatepass: any str has a length this way (a name read with
    # surrogateescape, or any lone surrogate a hostile frame carries).
    return 0 < len(user.encode("utf-8", "surrogatepass")) <= MAX_USER


class RegistrationSender(Channel):
    """The worker's end: what its sessions register with (a
    :class:`~socksd.ident.registry.Registrar`, like ProxiedConnections), sent
    to the supervisor.

    Back-pressure (see :class:`~socksd.channel.Channel`): memory stays
    bounded by the sessions, not by how long the supervisor stalls: a queued
    add whose session ends meanwhile is taken back with its remove (neither
    is sent), so the queue holds at most an add per live session and a
    remove per entry the supervisor holds, and the transport's buffer about
    its bufferSize.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ids: Iterator[int] = iter(range(1 << 62))

    def add(self, local_host: str, local_port: int, remote_host: str, remote_port: int,
            user: str) -> int | None:
        if self.closed or not _user_fits(user):
            return None
        ident = next(self.ids)
        self.send(ident, "add", frame(["add", ident, local_host, local_port, remote_host,
                                       remote_port, user]))
        return ident

    def remove(self, entry: int | None) -> None:
        if entry is None or self.closed:
            return
        if self.take_back(entry) == "add":
            return    # never sent: the supervisor never hears of it
        self.send(entry, "remove", frame(["remove", entry]))


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise Malformed(f"port {value!r}")
    return value


def _host(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 64:
        raise Malformed(f"address {value!r:.70}")
    try:
        parse_ip(value)
    except ValueError:
        raise Malformed(f"address {value!r}") from None
    return value


def _ident(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise Malformed(f"id {value!r:.30}")
    return value


def parse_message(message: list[Any]
                  ) -> tuple[str, int, tuple[str, int, str, int, str] | None]:
    """("add", id, (local host, local port, remote host, remote port, user))
    or ("remove", id, None) from a decoded message; Malformed for anything
    else."""
    kind = message[0]
    if kind == "add" and len(message) == 7:
        user = message[6]
        if not isinstance(user, str) or not _user_fits(user):
            raise Malformed("user name empty, too long or not a string")
        return "add", _ident(message[1]), (_host(message[2]), _port(message[3]),
                                           _host(message[4]), _port(message[5]), user)
    if kind == "remove" and len(message) == 2:
        return "remove", _ident(message[1]), None
    raise Malformed(f"unknown message {str(kind)[:20]!r} of {len(message)} items")


def parse_frame(payload: bytes) -> tuple[str, int, tuple[str, int, str, int, str] | None]:
    """:func:`parse_message` of a frame's payload."""
    return parse_message(decode(payload))


class RegistrationReceiver(Channel):
    """The supervisor's end of worker ``index``'s channel: its entries in
    the identd's registry, by the worker's ids.

    A malformed frame closes the channel and clears the worker's entries,
    with one log line: after a broken frame nothing it says can be trusted,
    and dropping just that frame could drop a retraction, leaving an entry
    that names the ended session's user for the next connection on its
    ports (what this channel exists to prevent).
    """

    MAX_LENGTH = MAX_FRAME
    # What else follows a malformed frame, for its line (the workers' end
    # stops the worker too).
    after_malformed = ""

    def __init__(self, registry: ProxiedConnections, index: int) -> None:
        super().__init__()
        self.registry = registry
        self.index = index
        self.entries: dict[int, Entry] = {}
        self.registering = True     # False once the worker ended: its adds count for nothing

    def message_received(self, message: list[Any]) -> None:
        if message[0] not in ("add", "remove"):
            super().message_received(message)
            return
        kind, ident, fields = parse_message(message)
        if not self.registering:
            return
        if kind == "add":
            assert fields is not None
            if ident in self.entries:
                raise Malformed(f"id {ident} added twice")
            self.entries[ident] = self.registry.add(*fields)
        else:
            entry = self.entries.pop(ident, None)
            if entry is None:
                raise Malformed(f"id {ident} removed but never added")
            self.registry.remove(entry)

    def malformed(self, why: str) -> None:
        if self.broken:
            return
        super().malformed(why)
        count = self.clear()
        log.error("worker {index}: malformed frame on its channel ({why}); channel closed, "
                  "{count} identd entr{ies} cleared{after}", index=self.index,
                  why=escape(why), count=count, ies="y" if count == 1 else "ies",
                  after=self.after_malformed)

    def worker_ended(self) -> None:
        """The worker process is gone, and so are its sockets: its entries
        go now, and registrations still on their way from it (read after
        this) count for nothing."""
        self.registering = False
        self.clear()

    def clear(self) -> int:
        """Forget every entry of this worker (it ended, or broke the
        channel); how many there were."""
        entries, self.entries = self.entries, {}
        for entry in entries.values():
            self.registry.remove(entry)
        return len(entries)

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        self.broken = True
        self.registering = False
        self.clear()
