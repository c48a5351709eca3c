"""A worker's registrations, carried to the supervisor's identd (``workers = N``).

Each worker has a socket pair of its own to the supervisor for this, apart
from its log channel: the log channel drops records when the supervisor
falls behind, by design, and a lost retraction would leave a stale entry
(the next connection on that port answered with the old session's user).
This channel never drops: when the supervisor reads slowly, the worker
holds what it has not sent yet (back-pressure, not loss).

Frames are Twisted's Int32StringReceiver framing (a 4-byte big-endian
length, then that many bytes) around a JSON array::

    ["add", ID, LOCAL_HOST, LOCAL_PORT, REMOTE_HOST, REMOTE_PORT, USER]
    ["remove", ID]

The supervisor keeps each worker's entries by their ID, so a worker that
ends (its channel closes) takes exactly its own entries with it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

from twisted.internet import protocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from socksd.escape import escape
from socksd.ident.registry import Entry, ProxiedConnections
from socksd.rules import parse_ip
from socksd.twisted_internals import IStreamTransport

log = Logger(namespace="socksd")

# RFC 1413 caps a user id at 512 octets: a longer name could not be answered
# anyway, so it is not registered (the identd answers for that connection as
# for any other socket of socksd's).
MAX_USER = 512
# The largest frame: an add with two IPv6 addresses (with scopes) and a
# MAX_USER name JSON-escaped (\udcxx: 6 bytes a byte) fits with room.
MAX_FRAME = 4096

_LENGTH = struct.Struct(Int32StringReceiver.structFormat)


def _frame(message: list[Any]) -> bytes:
    payload = json.dumps(message, separators=(",", ":")).encode("ascii")
    return _LENGTH.pack(len(payload)) + payload


def _user_fits(user: str) -> bool:
    # surrogatepass: any str has a length this way (a name read with
    # surrogateescape, or any lone surrogate a hostile frame carries).
    return 0 < len(user.encode("utf-8", "surrogatepass")) <= MAX_USER


@implementer(IPushProducer)
class RegistrationSender(protocol.Protocol):
    """The worker's end: what its sessions register with (a
    :class:`~socksd.ident.registry.Registrar`, like ProxiedConnections), sent
    to the supervisor.

    Back-pressure: frames are written while the transport takes them; once
    Twisted's write buffer is full (it pauses us, its producer) they wait in
    ``queue``, in order, until it drains. Memory stays bounded by the
    sessions, not by how long the supervisor stalls: a queued add whose
    session ends meanwhile is taken back with its remove (neither is sent),
    so the queue holds at most an add per live session and a remove per
    entry the supervisor holds, and the transport's buffer about its
    bufferSize.
    """

    transport: IStreamTransport

    def __init__(self) -> None:
        self.ids: Iterator[int] = iter(range(1 << 62))
        self.queue: dict[int, tuple[str, bytes]] = {}   # id -> ("add"|"remove", frame)
        self.held = False
        self.closed = False

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)

    def add(self, local_host: str, local_port: int, remote_host: str, remote_port: int,
            user: str) -> int | None:
        if self.closed or not _user_fits(user):
            return None
        ident = next(self.ids)
        self._send(ident, "add", _frame(["add", ident, local_host, local_port, remote_host,
                                         remote_port, user]))
        return ident

    def remove(self, entry: int | None) -> None:
        if entry is None or self.closed:
            return
        queued = self.queue.get(entry)
        if queued is not None and queued[0] == "add":
            del self.queue[entry]    # never sent: the supervisor never hears of it
            return
        self._send(entry, "remove", _frame(["remove", entry]))

    def _send(self, ident: int, kind: str, frame: bytes) -> None:
        if self.held or self.queue:
            self.queue[ident] = (kind, frame)
        else:
            self.transport.write(frame)

    # IPushProducer: the transport pauses us while its write buffer is full.
    def pauseProducing(self) -> None:
        self.held = True

    def resumeProducing(self) -> None:
        self.held = False
        while self.queue and not self.held and not self.closed:
            ident = next(iter(self.queue))
            _kind, frame = self.queue.pop(ident)
            self.transport.write(frame)     # may pause us again

    def stopProducing(self) -> None:
        self.closed = True

    def connectionLost(self, reason: Failure | None = None) -> None:
        # The supervisor is gone (the worker stops: see its log channel), or
        # it closed this channel: the sessions go on, unregistered.
        self.closed = True
        self.queue.clear()


class Malformed(ValueError):
    """A frame that is not what RegistrationSender sends."""


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


def parse_frame(frame: bytes) -> tuple[str, int, tuple[str, int, str, int, str] | None]:
    """("add", id, (local host, local port, remote host, remote port, user))
    or ("remove", id, None); Malformed for anything else."""
    try:
        message = json.loads(frame)
    except (ValueError, RecursionError):
        raise Malformed("not JSON") from None
    if not isinstance(message, list) or not message:
        raise Malformed("not a JSON array")
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


class RegistrationReceiver(Int32StringReceiver):
    """The supervisor's end of worker ``index``'s channel: its entries in
    the identd's registry, by the worker's ids. A malformed frame closes
    the channel and clears the worker's entries, with one log line: after
    a broken frame nothing it says can be trusted."""

    MAX_LENGTH = MAX_FRAME

    def __init__(self, registry: ProxiedConnections, index: int) -> None:
        self.registry = registry
        self.index = index
        self.entries: dict[int, Entry] = {}
        self.broken = False

    def stringReceived(self, frame: bytes) -> None:
        if self.broken:
            return
        try:
            kind, ident, fields = parse_frame(frame)
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
        except Malformed as e:
            self._malformed(str(e))

    def lengthLimitExceeded(self, length: int) -> None:
        self._malformed(f"a frame of {length} bytes (at most {self.MAX_LENGTH})")

    def _malformed(self, why: str) -> None:
        if self.broken:
            return
        self.broken = True
        count = self.clear()
        log.error("worker {index}: malformed identd registration ({why}); channel closed, "
                  "{count} entr{ies} cleared", index=self.index, why=escape(why), count=count,
                  ies="y" if count == 1 else "ies")
        if self.transport is not None:
            self.transport.loseConnection()

    def worker_ended(self) -> None:
        """The worker process is gone, and so are its sockets: its entries
        go now, and frames still on their way from it (read after this)
        count for nothing."""
        self.broken = True
        self.clear()
        if self.transport is not None:
            self.transport.loseConnection()

    def clear(self) -> int:
        """Forget every entry of this worker (it ended, or broke the
        channel); how many there were."""
        entries, self.entries = self.entries, {}
        for entry in entries.values():
            self.registry.remove(entry)
        return len(entries)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.broken = True
        self.clear()
