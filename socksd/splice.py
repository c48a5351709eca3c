"""The relay's fast path: socket -> pipe -> socket with splice(2).

For a session whose two ends are plain TCP sockets (no TLS, no PROXY-header
wrapper, no GSS-API encapsulation) the bytes need never enter Python: the
kernel moves them between the sockets through a pipe. Readiness still comes
from the reactor, so the session stays one of many in the event loop.

Twisted has no splice support, hence this module. Each direction keeps its
flow control: when the destination socket is full, the pipe holds what was
read and the source is not read again until the pipe drains, so memory per
direction is one pipe (``PIPE_SIZE``) however the peers behave. Pipes are
only held while data is in flight; idle sessions hold none.

A rate limit stays kernel-only too: a direction whose reading side has a
budget (:mod:`socksd.throttle`) asks it how many bytes the next splice may
move, and when it is spent, stops reading until the budget resumes it. The
source is read again only when neither a full pipe nor the budget holds it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor, IWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from socksd.relay import RelayEnd, RelaySession, buffer_empty
from socksd.stream import PLAIN_TCP
from socksd.throttle import Meter

AVAILABLE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")
PIPE_SIZE = 1 << 18
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)

# Sessions that used the fast path, and bytes it moved: proof that it runs.
stats = {"sessions": 0, "bytes": 0}

_pool: list[tuple[int, int]] = []
_POOL_MAX = 64


def _take_pipe() -> tuple[int, int]:
    if _pool:
        return _pool.pop()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # over the user's pipe quota: the default size still works
    return r, w


def _give_pipe(pipe: tuple[int, int], empty: bool) -> None:
    if empty and len(_pool) < _POOL_MAX:
        _pool.append(pipe)
    else:
        os.close(pipe[0])
        os.close(pipe[1])


def plain_tcp(a: object, b: object) -> bool:
    """Are both transports bare TCP sockets (no TLS, no PROXY wrapper)?"""
    return AVAILABLE and type(a) in PLAIN_TCP and type(b) in PLAIN_TCP


def eligible(a: object, b: object) -> bool:
    """Can the sessions' transports ``a`` and ``b`` be spliced now?"""
    if not plain_tcp(a, b):
        return False
    for t in (a, b):
        assert isinstance(t, tcp.Connection)   # plain_tcp said so
        if t.disconnecting or not t.connected:
            return False
        if not buffer_empty(t):
            t.doWrite()  # flush the SOCKS reply / early data now, in order
            if not buffer_empty(t):
                return False
    return True


class _Direction:
    """Bytes from one socket to the other."""

    __slots__ = ("relay", "src", "dst", "pipe", "pending", "eof", "done", "moved", "meter",
                 "held")

    def __init__(self, relay: SpliceRelay, src: _Socket, dst: _Socket,
                 meter: Meter | None) -> None:
        self.relay = relay
        self.src, self.dst = src, dst
        self.pipe: tuple[int, int] | None = None
        self.pending = 0      # bytes in the pipe, not yet in dst
        self.eof = False      # src sent EOF
        self.done = False     # EOF passed on to dst
        self.moved = 0
        self.meter = meter    # src's rate budget (None: no limit)
        self.held = False     # src's reading held by that budget
        if meter is not None:
            meter.holder = self   # the budget now holds and resumes this direction
            self.held = meter.waiting

    def readable(self) -> None:
        if self.relay.finished:
            return  # aborted by the other half of this same epoll event
        meter, size = self.meter, PIPE_SIZE
        if meter is not None:
            size = meter.grant(PIPE_SIZE)
            if not size:
                return   # held (throttle_hold): the budget resumes this direction
        if self.pipe is None:
            try:
                self.pipe = _take_pipe()
            except OSError as e:   # EMFILE/ENFILE: out of descriptors
                self.relay.abort(f"no pipe for the relay: {e.strerror}")
                return
        try:
            n = os.splice(self.src.fd, self.pipe[1], size, flags=_FLAGS)
        except OSError as e:
            if meter is not None:
                meter.refund(size)
            if e.errno in _AGAIN:
                self._release_if_empty()
                return
            self.relay.abort(e.strerror)
            return
        if meter is not None and n < size:
            meter.refund(size - n)
        if n == 0:
            self.eof = True
            self.relay.reactor.removeReader(self.src)
            self.src.reading = False
            self._leave_budget()
            self._release_if_empty()
            if self.pending == 0:
                self._finish()
            return
        self.pending += n
        self.moved += n
        self.relay.activity()
        self.flush()

    def flush(self) -> None:
        relay = self.relay
        if relay.finished:
            return  # aborted by the read half of this same epoll event
        try:
            while self.pending:
                assert self.pipe is not None   # pending bytes are in a pipe
                n = os.splice(self.pipe[0], self.dst.fd, self.pending, flags=_FLAGS)
                self.pending -= n
        except OSError as e:
            if e.errno not in _AGAIN:
                relay.abort(e.strerror)
                return
        if self.pending:
            # dst is full: stop reading src until it takes what we hold.
            if not self.dst.writing and relay.session is not None:
                relay.session.relay_blocked()
            if self.src.reading:
                relay.reactor.removeReader(self.src)
                self.src.reading = False
            if not self.dst.writing:
                relay.reactor.addWriter(self.dst)
                self.dst.writing = True
            return
        self._release_if_empty()
        if self.dst.writing:
            relay.reactor.removeWriter(self.dst)
            self.dst.writing = False
            if relay.session is not None:
                relay.session.relay_drained()
        if self.eof:
            self._finish()
        elif not self.src.reading and not self.held:
            relay.reactor.addReader(self.src)
            self.src.reading = True

    # The holder of a throttle.Meter: src's reading held while the budget is spent.
    def throttle_hold(self) -> None:
        self.held = True
        if self.src.reading:
            self.relay.reactor.removeReader(self.src)
            self.src.reading = False

    def throttle_resume(self) -> None:
        self.held = False
        relay = self.relay
        if relay.finished or self.eof:
            return
        relay.activity()   # held by its budget is not idle
        # With bytes still in the pipe, flush() reads again once they are out.
        if not self.pending and not self.src.reading:
            relay.reactor.addReader(self.src)
            self.src.reading = True

    def _leave_budget(self) -> None:
        meter, self.meter = self.meter, None
        if meter is not None:
            meter.detach()

    def _release_if_empty(self) -> None:
        if self.pipe is not None and self.pending == 0:
            _give_pipe(self.pipe, True)
            self.pipe = None

    def _finish(self) -> None:
        """Pass the EOF on (a half-close), as the Twisted relay does."""
        self.done = True
        try:
            self.dst.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.relay.direction_done()

    def close(self) -> None:
        self._leave_budget()
        if self.pipe is not None:
            _give_pipe(self.pipe, self.pending == 0)
            self.pipe = None


@implementer(IReadDescriptor, IWriteDescriptor)
class _Socket:
    """What the reactor watches for one of the two sockets while spliced."""

    __slots__ = ("sock", "fd", "outgoing", "incoming", "reading", "writing")

    # Set by SpliceRelay, which makes the directions after the sockets.
    outgoing: _Direction   # this socket -> the other
    incoming: _Direction   # the other -> this socket

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.reading = False
        self.writing = False

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        self.outgoing.readable()

    def doWrite(self) -> None:
        self.incoming.flush()

    def connectionLost(self, reason: Failure) -> None:
        self.outgoing.relay.abort(reason.getErrorMessage())

    def logPrefix(self) -> str:
        return "splice"


class SpliceRelay:
    """Relays two RelayEnds' TCP sockets in the kernel until both directions
    end, then hands the transports back to Twisted to close them."""

    __slots__ = ("reactor", "ends", "transports", "sockets", "directions", "session",
                 "finished")

    def __init__(self, reactor: IReactorFDSet, a: RelayEnd, b: RelayEnd,
                 session: RelaySession | None) -> None:
        self.reactor = reactor
        self.ends = (a, b)
        self.session = session
        ta, tb = a.transport, b.transport
        assert isinstance(ta, tcp.Connection) and isinstance(tb, tcp.Connection)  # eligible()
        self.transports = (ta, tb)
        sa, sb = _Socket(ta.socket), _Socket(tb.socket)
        self.sockets = (sa, sb)
        ab, ba = _Direction(self, sa, sb, a.meter), _Direction(self, sb, sa, b.meter)
        sa.outgoing, sa.incoming, sb.outgoing, sb.incoming = ab, ba, ba, ab
        self.directions = (ab, ba)
        self.finished = False

    def start(self) -> None:
        for transport, sock in zip(self.transports, self.sockets, strict=True):
            transport.stopReading()
            transport.stopWriting()
            if not sock.outgoing.held:   # else its budget adds it when it refills
                self.reactor.addReader(sock)
                sock.reading = True
        stats["sessions"] += 1

    def activity(self) -> None:
        # join() set both ends' watch_activity for the session.
        if self.session is not None and self.ends[0].watch_activity:
            self.session.relay_activity()

    def direction_done(self) -> None:
        if all(d.done for d in self.directions):
            self._stop()
            for end in self.ends:
                end.read_eof = True   # as the Twisted relay would have it: both ended
                end.transport.loseConnection()

    def pending(self) -> tuple[int, int]:
        """Bytes held in each direction's pipe for its receiver."""
        ab, ba = self.directions
        return ab.pending, ba.pending

    def abort(self, why: str | None = None) -> None:
        """An error on either socket (``why``), or the session's idle timeout."""
        if why is not None and self.session is not None:
            self.session.relay_lost(why)
        if self._stop():
            for end in self.ends:
                end.transport.abortConnection()

    def _stop(self) -> bool:
        if self.finished:
            return False
        self.finished = True
        for sock in self.sockets:
            if sock.reading:
                self.reactor.removeReader(sock)
            if sock.writing:
                self.reactor.removeWriter(sock)
            sock.reading = sock.writing = False
        (a, b), (ab, ba) = self.ends, self.directions
        a.received += ab.moved
        b.received += ba.moved
        stats["bytes"] += ab.moved + ba.moved
        for direction in self.directions:
            direction.close()
        return True
