"""The relay's two paths, in-process over real loopback sockets: the splice
fast path and the Twisted producer/consumer path carry the same bytes, and
the fast path is really taken (counted, not timed)."""

from __future__ import annotations

import hashlib
import os
import struct

from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.trial import unittest
from zope.interface import implementer

from socksd import splice
from socksd.auth.registry import method_registry
from socksd.proxy import Limits, SOCKSServerFactory
from socksd.rules import default_rules

PAYLOAD = os.urandom(3 * (1 << 20) + 12345)


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)

    def connectionLost(self, reason=None):
        pass


@implementer(IHalfCloseableProtocol)
class HalfCloseEcho(Echo):
    """Echoes, and closes its side when the client half-closes."""

    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


@implementer(IHalfCloseableProtocol)
class SocksClient(protocol.Protocol):
    """Handshake, then the payload and a half-close; collects the echo."""

    def __init__(self, port: int, done: defer.Deferred) -> None:
        self.port = port
        self.done = done
        self.state = 0
        self.buffer = b""
        self.received = hashlib.sha256()
        self.count = 0

    def connectionMade(self):
        self.transport.write(b"\x05\x01\x00")

    def dataReceived(self, data):
        if self.state == 2:
            self.received.update(data)
            self.count += len(data)
            return
        self.buffer += data
        if self.state == 0 and len(self.buffer) >= 2:
            assert self.buffer[:2] == b"\x05\x00"
            self.buffer = self.buffer[2:]
            self.state = 1
            self.transport.write(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + struct.pack("!H", self.port))
        if self.state == 1 and len(self.buffer) >= 10:
            assert self.buffer[:2] == b"\x05\x00", self.buffer
            rest, self.buffer = self.buffer[10:], b""
            self.state = 2
            self.transport.write(PAYLOAD)
            self.transport.loseWriteConnection()
            if rest:
                self.dataReceived(rest)

    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason=None):
        self.done.callback((self.count, self.received.hexdigest()))


class RelayPathTests(unittest.TestCase):
    def setUp(self):
        echo = protocol.Factory.forProtocol(HalfCloseEcho)
        self.echo_port = reactor.listenTCP(0, echo, interface="127.0.0.1")
        self.addCleanup(self.echo_port.stopListening)

    def _proxy(self, use_splice: bool):
        factory = SOCKSServerFactory(list(method_registry(None).values()), default_rules(),
                                     Limits(splice=use_splice))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def _round_trip(self, use_splice: bool):
        proxy_port = self._proxy(use_splice)
        done = defer.Deferred()
        creator = protocol.ClientCreator(reactor, SocksClient, self.echo_port.getHost().port,
                                         done)
        await creator.connectTCP("127.0.0.1", proxy_port)
        return await done

    async def test_both_paths_carry_the_same_bytes(self):
        expected = (len(PAYLOAD), hashlib.sha256(PAYLOAD).hexdigest())
        before = dict(splice.stats)
        self.assertEqual(await self._round_trip(use_splice=False), expected)
        self.assertEqual(splice.stats, before)
        self.assertEqual(await self._round_trip(use_splice=True), expected)
        if not splice.AVAILABLE:
            self.fail("os.splice is not available: the fast path cannot run here")
        self.assertEqual(splice.stats["sessions"], before["sessions"] + 1)
        # The first few KiB go through Twisted (short sessions never splice).
        moved = splice.stats["bytes"] - before["bytes"]
        self.assertGreater(moved, 2 * len(PAYLOAD) - 4 * 65536)
