"""A worker's control channel to the supervisor (``workers = N``): one
socket pair per worker, framed messages both ways, never dropped.

Frames are Twisted's Int32StringReceiver framing (a 4-byte big-endian
length, then that many bytes) around a JSON array whose first item names
the kind of message (the identd's registrations, a worker's counts, the
configuration it runs: see socksd.ident.channel and socksd.tap.workers).

Unlike the log, this channel never drops a message: when the other end
reads slowly, what Twisted's write buffer does not take waits here, in
order (back-pressure, not loss). What waits is bounded by keys: a message
sent under the key of one still waiting replaces it where it stands (a
newer report of the counts, a newer configuration), and one still waiting
can be taken back unsent (a registration whose session ended first).

A frame that is not what the other end sends (too long, not JSON, an
unknown kind) makes the channel ``broken``: nothing read after it counts,
and the subclass decides what that means for the process on the other end.

It imports nothing of ours but the transport's type, so the identd's
channel (socksd.ident.channel) and the workers' ends (socksd.tap) may build
on it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Hashable
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from socksd.twisted_internals import IStreamTransport

_LENGTH = struct.Struct(Int32StringReceiver.structFormat)


class Malformed(ValueError):
    """A frame, or a message in one, that is not what the other end sends."""


def frame(message: list[Any]) -> bytes:
    """A message as it goes on the channel: ASCII JSON (a name read with
    surrogateescape survives as ``\\udcxx``), its length before it."""
    payload = json.dumps(message, separators=(",", ":")).encode("ascii")
    return _LENGTH.pack(len(payload)) + payload


def decode(payload: bytes) -> list[Any]:
    """A frame's JSON array, its first item a string naming its kind;
    Malformed for anything else."""
    try:
        message = json.loads(payload)
    except (ValueError, RecursionError):
        raise Malformed("not JSON") from None
    if not isinstance(message, list) or not message:
        raise Malformed("not a JSON array")
    if not isinstance(message[0], str):
        raise Malformed(f"a message of no kind ({str(message[0])[:20]!r})")
    return message


@implementer(IPushProducer)
class Channel(Int32StringReceiver):
    """One end of a control channel: it writes frames under back-pressure
    (the transport pauses it, its producer, while its write buffer is full)
    and hands each frame it reads, decoded, to :meth:`message_received`.

    ``MAX_LENGTH`` bounds a frame read: a longer one announced breaks the
    channel before any of it is buffered.
    """

    MAX_LENGTH = 4096
    transport: IStreamTransport

    def __init__(self) -> None:
        self.queue: dict[Hashable, tuple[str, bytes]] = {}   # key -> (kind, frame), in order
        self.held = False
        self.closed = False
        self.broken = False
        self.producing = False    # registered with the transport as its producer

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.producing = True

    def _unregister(self) -> None:
        # A registered producer holds a close back until it resumes.
        if self.producing:
            self.producing = False
            self.transport.unregisterProducer()

    # ---- writing ----------------------------------------------------------------------

    def send(self, key: Hashable, kind: str, data: bytes) -> None:
        """Write ``data`` (a :func:`frame`), or queue it under ``key``: one
        queued under the same key is replaced where it stands."""
        if self.closed:
            return
        if self.held or self.queue:
            self.queue[key] = (kind, data)
        else:
            self.transport.write(data)

    def take_back(self, key: Hashable) -> str | None:
        """Take the frame queued under ``key`` back, unsent: its kind, or
        None when none is queued (it was written, or never sent)."""
        queued = self.queue.pop(key, None)
        return queued[0] if queued is not None else None

    # IPushProducer: the transport pauses us while its write buffer is full.
    def pauseProducing(self) -> None:
        self.held = True

    def resumeProducing(self) -> None:
        self.held = False
        while self.queue and not self.held and not self.closed:
            key = next(iter(self.queue))
            _kind, data = self.queue.pop(key)
            self.transport.write(data)     # may pause us again

    def stopProducing(self) -> None:
        self.closed = True

    def flush_and_close(self) -> None:
        """Write whatever waits, however full the buffer (the process is
        about to end: what waits is bounded by the keys), then close once
        Twisted has written it all."""
        if self.closed or self.transport is None:
            return
        queued, self.queue = list(self.queue.values()), {}
        for _kind, data in queued:
            self.transport.write(data)
        self._unregister()
        self.closed = True
        self.transport.loseConnection()

    # ---- reading ----------------------------------------------------------------------

    def stringReceived(self, string: bytes) -> None:
        if self.broken:
            return
        try:
            self.message_received(decode(string))
        except Malformed as e:
            self.malformed(str(e))

    def message_received(self, message: list[Any]) -> None:
        """One decoded message; Malformed when it is not one this end takes."""
        raise Malformed(f"unknown message {str(message[0])[:20]!r} of {len(message)} items")

    def lengthLimitExceeded(self, length: int) -> None:
        self.malformed(f"a frame of {length} bytes (at most {self.MAX_LENGTH})")

    def malformed(self, why: str) -> None:
        """The other end sent what it never sends: nothing after it counts,
        and the channel closes."""
        if self.broken:
            return
        self.broken = True
        self.close()

    def close(self) -> None:
        """Close at once, unsent frames dropped (the channel is over)."""
        self.closed = True
        self.queue.clear()
        if self.transport is not None and not self.transport.disconnecting:
            self._unregister()
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        self.producing = False
        self.queue.clear()
