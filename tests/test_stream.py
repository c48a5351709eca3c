"""socksd.stream: the direct paths of a plain TCP transport, on real sockets.
(Twisted's own TCP suites run against it too: tests/test_reactor.py.)"""

from __future__ import annotations

import socket

from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.trial import unittest
from zope.interface import implementer

from socksd.stream import Stream, connected


class Recorder(Protocol):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.events.append(f"data {data!r}")

    def connectionLost(self, reason=None) -> None:
        self.events.append("lost")
        self.lost.callback(None)


@implementer(IHalfCloseableProtocol)
class HalfCloseRecorder(Recorder):
    def readConnectionLost(self) -> None:
        self.events.append("read lost")

    def writeConnectionLost(self) -> None:
        self.events.append("write lost")


def pair(test: unittest.TestCase, protocol: Protocol) -> tuple[Stream, socket.socket]:
    """A Stream on one end of a connected TCP pair on 127.0.0.1; the other end."""
    listener = socket.socket()
    test.addCleanup(listener.close)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    ours = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    ours.connect_ex(listener.getsockname())
    theirs, _ = listener.accept()
    test.addCleanup(theirs.close)
    theirs.settimeout(5)
    stream = connected(ours, listener.getsockname(), protocol, reactor)
    test.addCleanup(lambda: stream.connected and stream.abortConnection())
    return stream, theirs


def queued(stream: Stream) -> int:
    return len(stream.dataBuffer) - stream.offset + stream._tempDataLen


class StreamTests(unittest.TestCase):
    def test_write_sends_at_once(self):
        stream, theirs = pair(self, Recorder())
        stream.write(b"hello")
        # Sent before the reactor ran: nothing queued, and the peer has it.
        self.assertEqual(queued(stream), 0)
        self.assertEqual(theirs.recv(5), b"hello")

    @defer.inlineCallbacks
    def test_what_the_socket_does_not_take_is_queued_in_order(self):
        stream, theirs = pair(self, Recorder())
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = bytes(range(256)) * 4096      # 1 MiB: more than the kernel takes at once
        stream.write(big)
        self.assertGreater(queued(stream), 0)
        stream.write(b"tail")               # behind the queue, not before it
        got = b""
        theirs.setblocking(False)
        for _ in range(2000):
            try:
                got += theirs.recv(1 << 20)
            except BlockingIOError:
                yield task.deferLater(reactor, 0.001, lambda: None)
            if len(got) == len(big) + 4:
                break
        self.assertEqual(got, big + b"tail")

    def test_half_close_at_once(self):
        protocol = HalfCloseRecorder()
        stream, theirs = pair(self, protocol)
        stream.write(b"bye")
        stream.loseWriteConnection()
        self.assertEqual(protocol.events, ["write lost"])
        self.assertEqual(theirs.recv(10), b"bye")
        self.assertEqual(theirs.recv(10), b"")          # our FIN, already
        theirs.sendall(b"still open")                   # the other direction is
        return task.deferLater(reactor, 0.05, lambda: self.assertEqual(
            protocol.events, ["write lost", "data b'still open'"]))

    @defer.inlineCallbacks
    def test_close_on_the_next_turn(self):
        protocol = Recorder()
        stream, theirs = pair(self, protocol)
        stream.write(b"last")
        stream.loseConnection()
        self.assertEqual(protocol.events, [])           # not from inside the call
        yield protocol.lost
        self.assertEqual(theirs.recv(10), b"last")
        self.assertEqual(theirs.recv(10), b"")

    @defer.inlineCallbacks
    def test_close_waits_for_the_queue(self):
        protocol = Recorder()
        stream, theirs = pair(self, protocol)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = b"x" * (1 << 20)
        stream.write(big)
        stream.loseConnection()
        got = b""
        theirs.setblocking(False)
        while not protocol.lost.called or len(got) < len(big):
            try:
                chunk = theirs.recv(1 << 20)
            except BlockingIOError:
                yield task.deferLater(reactor, 0.001, lambda: None)
                continue
            if not chunk:
                break
            got += chunk
        self.assertEqual(len(got), len(big))

    def test_writes_after_an_abort_are_dropped(self):
        stream, theirs = pair(self, Recorder())
        stream.abortConnection()
        stream.write(b"never")
        theirs.setblocking(False)
        self.assertRaises(BlockingIOError, theirs.recv, 10)

    def test_ipv6_peer(self):
        listener = socket.socket(socket.AF_INET6)
        self.addCleanup(listener.close)
        listener.bind(("::1", 0))
        listener.listen(1)
        ours = socket.socket(socket.AF_INET6, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        ours.connect_ex(listener.getsockname()[:2])
        theirs, _ = listener.accept()
        self.addCleanup(theirs.close)
        stream = connected(ours, ("::1", listener.getsockname()[1]), Recorder(), reactor)
        self.addCleanup(stream.abortConnection)
        peer = stream.getPeer()
        self.assertEqual((peer.type, peer.host, peer.port),
                         ("TCP", "::1", listener.getsockname()[1]))
        self.assertEqual(stream.getHost().port, theirs.getpeername()[1])
