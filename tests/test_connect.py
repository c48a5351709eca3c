"""connect.connect_tcp on the real reactor and real loopback sockets: what a
CONNECT gets when the destination accepts, refuses, never answers, or the
client gives up first; and that no descriptor is left behind on any path."""

from __future__ import annotations

import os
import socket

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from socksd.proxy import connect
from socksd.stream import Stream


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def spin() -> defer.Deferred:
    """Let the reactor run once (its first run opens its waker pipe)."""
    return task.deferLater(reactor, 0, lambda: None)


class ConnectTCPTests(unittest.TestCase):

    def listener(self, backlog: int = 16) -> socket.socket:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(backlog)
        self.addCleanup(s.close)
        return s

    @defer.inlineCallbacks
    def test_connected_transport_names_both_ends(self):
        server = self.listener()
        port = server.getsockname()[1]
        outbound = yield connect.connect_tcp(reactor, "127.0.0.1", port, 5)
        self.addCleanup(outbound.transport.abortConnection)
        accepted, peer = server.accept()
        self.addCleanup(accepted.close)
        # A plain TCP transport (so the splice fast path applies) whose
        # ends are the real socket's.
        self.assertIs(type(outbound.transport), Stream)
        host = outbound.transport.getHost()
        self.assertEqual((host.host, host.port), peer)
        self.assertEqual(outbound.transport.getPeer().port, port)
        outbound.transport.write(b"hello")
        yield task.deferLater(reactor, 0.05, lambda: None)
        accepted.settimeout(5)
        self.assertEqual(accepted.recv(5), b"hello")

    @defer.inlineCallbacks
    def test_ipv6(self):
        server = socket.socket(socket.AF_INET6)
        self.addCleanup(server.close)
        server.bind(("::1", 0))
        server.listen(1)
        outbound = yield connect.connect_tcp(reactor, "::1", server.getsockname()[1], 5)
        self.addCleanup(outbound.transport.abortConnection)
        self.assertEqual(outbound.transport.getPeer().host, "::1")

    @defer.inlineCallbacks
    def test_refused(self):
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: RST to a SYN
        self.addCleanup(closed.close)
        port = closed.getsockname()[1]
        yield spin()
        before = open_fds()
        with self.assertRaises(connect.ConnectFailed) as caught:
            yield connect.connect_tcp(reactor, "127.0.0.1", port, 5)
        self.assertEqual(caught.exception.reason, connect.REFUSED)
        self.assertIn(f"127.0.0.1:{port}", str(caught.exception))
        self.assertEqual(open_fds(), before)

    @defer.inlineCallbacks
    def test_times_out_when_the_syn_is_never_answered(self):
        # A listener whose accept queue is full drops further SYNs: the
        # connect stays in progress until our timeout.
        server = self.listener(backlog=0)
        port = server.getsockname()[1]
        fillers = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        self.addCleanup(lambda: [s.close() for s in fillers])
        yield task.deferLater(reactor, 0.2, lambda: None)
        before = open_fds()
        with self.assertRaises(connect.ConnectFailed) as caught:
            yield connect.connect_tcp(reactor, "127.0.0.1", port, 0.3)
        self.assertEqual(caught.exception.reason, connect.TIMEOUT)
        self.assertIn("no answer in 0.3 s", str(caught.exception))
        self.assertEqual(open_fds(), before)
        self.assertEqual(reactor.getWriters(), [w for w in reactor.getWriters()
                                                if not isinstance(w, connect._Connecting)])

    @defer.inlineCallbacks
    def test_cancel_abandons_the_attempt(self):
        server = self.listener(backlog=0)
        port = server.getsockname()[1]
        fillers = [socket.socket() for _ in range(4)]
        for s in fillers:
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
        self.addCleanup(lambda: [s.close() for s in fillers])
        yield task.deferLater(reactor, 0.2, lambda: None)
        before = open_fds()
        d = connect.connect_tcp(reactor, "127.0.0.1", port, 30)
        self.assertEqual(open_fds(), before + 1)
        d.cancel()
        with self.assertRaises(defer.CancelledError):
            yield d
        self.assertEqual(open_fds(), before)
        self.assertFalse([w for w in reactor.getWriters() if isinstance(w, connect._Connecting)])
        self.assertFalse([c for c in reactor.getDelayedCalls() if c.active()
                          and c.func.__qualname__.startswith("_Connecting")])

    @defer.inlineCallbacks
    def test_unreachable_network_fails_at_once(self):
        # An IPv6 address with no route (documentation prefix): the kernel
        # answers connect() itself, with ENETUNREACH.
        with self.assertRaises(connect.ConnectFailed) as caught:
            yield connect.connect_tcp(reactor, "2001:db8::1", 80, 5)
        self.assertIn(caught.exception.reason,
                      (connect.NETWORK_UNREACHABLE, connect.HOST_UNREACHABLE))
