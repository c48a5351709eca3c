"""Plain TCP connections with less work per connection than Twisted's own.

A short SOCKS session is a few small reads and writes on two sockets and
two closes, and on Twisted's ``tcp.Server`` each of them goes the long way:
a write only queues, and the bytes leave on the reactor's next pass after
registering for writability (two ``epoll_ctl`` calls and a wake-up); a
half-close and a close are queued the same way, and the close sends an
empty ``send`` first; every connection formats two strings for logs and
``repr`` it may never show; an outgoing socket connected by socksd is
duplicated and asked its addresses again to be adopted.

:class:`Stream` is ``tcp.Server`` with those paths made direct. Everything
else, and every case that is not the simple one (bytes already queued, a
paused producer, TLS started on it, an abort under way), is Twisted's code
unchanged, so the order of bytes and events is what Twisted promises:
Twisted's own reactor test suites run against it (tests/test_reactor.py,
through socksd's reactor, whose ``listenTCP`` and adoptions make these).

What differs, and why it is safe:

* ``write`` sends at once when nothing is queued, the rest is queued as
  Twisted queues it.
* ``loseWriteConnection`` acts at once when nothing is queued and no
  paused producer waits to be resumed, as Twisted's ``doWrite`` would on
  its next pass (``writeConnectionLost`` is called before it returns; the
  wrapping protocols, TLS's and PROXY's, do not take that call).
* ``loseConnection`` then closes on the reactor's next turn, without
  waking for writability and sending nothing first.
* No ``shutdown(2)`` before ``close``: the descriptor is this process's
  alone (close-on-exec, never duplicated), so ``close`` sends the FIN
  (:class:`AdoptedStream`, on a duplicate, shuts down as Twisted does).

Like :mod:`socksd.twisted_internals`, this leans on FileDescriptor's
private state (``dataBuffer``, ``offset``, ``_tempDataLen``,
``_writeDisconnected``, ``_aborting``, ``_shouldShutdown``), checked for the
Twisted releases in ``CHECKED_TWISTED``.
"""

from __future__ import annotations

import errno
import socket
from typing import Any, cast

from twisted.internet import abstract, address, error, main, tcp
from twisted.internet.interfaces import IProtocol
from twisted.python.failure import Failure

__all__ = ["PLAIN_TCP", "AdoptedStream", "Stream", "StreamPort", "connected"]

# One Failure for every orderly close, as Twisted's reactor keeps one
# (posixbase's _FAILURE_DICT): a protocol reads it and never changes it.
_DONE = Failure(main.CONNECTION_DONE)
_TRY_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EINTR)


class Stream(tcp.Server):
    """A connected TCP socket as a Twisted transport, taking the direct
    path where nothing is queued (see the module's docstring)."""

    _shouldShutdown = False    # close() alone: see the module's docstring
    # FileDescriptor's queue of writes not yet joined, made with the first
    # write that must wait: an idle connection holds no list of its own.
    # (Read as empty until then; every path that appends makes it first.)
    _tempDataBuffer: list[bytes] = cast(list[bytes], ())
    _tempDataLen = 0

    def __init__(self, sock: socket.socket, protocol: IProtocol, client: tuple[Any, ...],
                 server: Any, sessionno: int, reactor: Any) -> None:
        # tcp.Server.__init__, less what an idle connection need not hold:
        # the log prefix and repr strings (made when asked for), the write
        # queue's list, ``fileno`` as a bound method of its own (a method
        # here); and no ioctl for a socket made non-blocking already.
        self.reactor = reactor
        self.socket = sock
        if sock.gettimeout() != 0.0:
            sock.setblocking(False)
        self.protocol = protocol
        if len(client) != 2:
            self._addressType = address.IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        self.startReading()
        self.connected = 1

    def fileno(self) -> int:
        return self.socket.fileno()    # -1 once closed, as Twisted's after a close

    # What tcp.Server formats at once for each connection.

    @property
    def logstr(self) -> str:
        text = self.__dict__.get("_logstr")
        if text is None:
            protocol = self.__dict__.get("protocol")
            text = f"{self._getLogPrefix(protocol)},{self.sessionno},{self.hostname}"
        return text

    @logstr.setter
    def logstr(self, text: str) -> None:
        self.__dict__["_logstr"] = text

    def __repr__(self) -> str:
        text = self.__dict__.get("repstr")    # _fromConnectedSocket sets one
        if text is None:
            port = self.server._realPortNumber if self.server is not None else "?"
            protocol = self.__dict__.get("protocol")
            text = f"<{type(protocol).__name__} #{self.sessionno} on {port}>"
        return text

    # The direct paths.

    def doRead(self):
        try:
            data = self.socket.recv(self.bufferSize)
        except OSError as e:
            return None if e.errno == errno.EWOULDBLOCK else main.CONNECTION_LOST
        if data:
            self.protocol.dataReceived(data)
            return None
        return main.CONNECTION_DONE

    def _flushed(self) -> bool:
        """Nothing queued, and nothing for the queue's end to resume first."""
        return not self._tempDataLen and self.offset == len(self.dataBuffer) and \
            (self.producer is None or (self.streamingProducer and not self.producerPaused))

    def _queue(self) -> None:
        if "_tempDataBuffer" not in self.__dict__:
            self._tempDataBuffer = []

    def writeSequence(self, iovec) -> None:
        self._queue()
        super().writeSequence(iovec)

    def startTLS(self, ctx, normal=True):
        self._queue()     # TLS writes straight to FileDescriptor.write
        return super().startTLS(ctx, normal)

    def write(self, data: bytes) -> None:
        if self.TLS or self._aborting or not self.connected or self._writeDisconnected or \
                self._tempDataLen or self.offset != len(self.dataBuffer) or \
                not isinstance(data, bytes) or not data:
            self._queue()
            super().write(data)     # queued behind what is there, or refused, as Twisted does
            return
        try:
            sent = self.socket.send(data)
        except OSError as e:
            # Not taken now: queued, and a real error is then found and
            # reported by Twisted's own doWrite.
            if e.errno not in _TRY_AGAIN:
                self.startWriting()
            sent = 0
        if sent != len(data):
            self._queue()
            super().write(data[sent:])

    def loseWriteConnection(self) -> None:
        if self.TLS or not self.connected or self.disconnecting or \
                self._writeDisconnecting or not self._flushed():
            super().loseWriteConnection()
            return
        # doWrite's half-close, now rather than on the next pass.
        self._writeDisconnecting = True
        self._writeDisconnected = True
        self._closeWriteConnection()

    def loseConnection(self) -> None:
        if self.TLS or not self.connected or self.disconnecting or self._aborting or \
                not self._flushed():
            super().loseConnection()
            return
        # doWrite's close (its _postLoseConnection), on the reactor's next
        # turn rather than after waking for writability: protocols (TLS's,
        # for one) go on using their state after asking for the close.
        self.disconnecting = 1
        self.stopReading()
        reactor: Any = self.reactor     # a whole reactor, not just its IReactorFDSet
        soon = getattr(reactor, "soon", None)     # socksd's: no timer for it
        if soon is not None:
            soon(self._closed)
        else:
            reactor.callLater(0, self._closed)

    def _closed(self) -> None:
        if self.connected:    # not lost meanwhile (an abort, a reset)
            self.connectionLost(_DONE)

    def connectionLost(self, reason: Failure) -> None:
        # tcp.Connection's, keeping the (closed) socket: fileno() reads -1
        # from it from now on.
        if self.disconnected:
            return
        abstract.FileDescriptor.connectionLost(self, reason)
        self._closeSocket(not isinstance(reason.value, error.ConnectionAborted))
        protocol = self.protocol
        del self.protocol
        protocol.connectionLost(reason)


class AdoptedStream(Stream):
    """A Stream on a duplicate of a descriptor the caller may keep open
    (``adoptStreamConnection``)."""

    _shouldShutdown = True     # the FIN even while the caller's copy is open


class StreamPort(tcp.Port):
    """A listening TCP port whose connections are :class:`Stream`s."""

    transport = Stream


def connected(sock: socket.socket, peer: tuple[str, int], protocol: IProtocol,
              reactor: Any) -> Stream:
    """A socket this process connected (non-blocking, close-on-exec) as a
    transport of ``protocol``, which is then told it is connected: what
    ``adoptStreamConnection`` does, without duplicating the descriptor and
    asking it for the addresses the caller knows."""
    host, port = peer
    client: tuple[Any, ...] = (host, port, 0, 0) if ":" in host else peer
    stream = Stream(sock, protocol, client, None, port, reactor)
    protocol.makeConnection(stream)
    return stream


# Transports with a socket of their own and nothing between it and the
# protocol: what the relay may send on directly and splice between.
PLAIN_TCP = (Stream, AdoptedStream, tcp.Server, tcp.Client)
