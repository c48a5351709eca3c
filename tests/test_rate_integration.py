"""Rate limits measured on real loopback sockets, in-process (as
test_splice.py runs the relay): a 4 MiB transfer under 1 MiB/s takes 3.9 s
± 10% in both directions, on Twisted's path and on the splice path; two
sessions sharing one budget each get 40-60% of it; a held reader is out of
the reactor (no reads while held); and sessions that end leave their budget
with nothing queued and no timer.

The budgets are attached where the session will attach them, at
``Relaying.start``: the config keys that choose them are not this module's
subject. Marked ``integration``: these are wall-clock measurements of several
seconds each, not the quick unit run.
"""

from __future__ import annotations

import struct

import pytest
from twisted.internet import defer, protocol, reactor, task, tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.trial import unittest
from zope.interface import implementer

from socksd import splice, throttle
from socksd.auth.registry import method_registry
from socksd.proxy import Limits, SOCKSServerFactory
from socksd.proxy.relaying import Relaying
from socksd.rules import default_rules

pytestmark = pytest.mark.integration

MiB = 1 << 20
RATE = MiB
SIZE = 4 * MiB
# The bucket starts full with 0.1 s of budget: the rest takes 3.9 s.
EXPECTED = (SIZE - 0.1 * RATE) / RATE
TOLERANCE = 0.10
DEADLINE = 30.0      # every wait has a timeout


class Sink(protocol.Protocol):
    """Counts what arrives; fires ``full`` when ``target`` bytes are in."""

    def __init__(self, target: int = 0) -> None:
        self.count = 0
        self.target = target
        self.full: defer.Deferred[float] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        if self.target and self.count >= self.target and not self.full.called:
            self.full.callback(reactor.seconds())


class Source(protocol.Protocol):
    """Sends SIZE bytes as soon as it is connected, then closes."""

    def connectionMade(self) -> None:
        self.transport.write(b"d" * SIZE)
        self.transport.loseConnection()


class Destination(protocol.Factory):
    """A listener whose protocols are kept, to look at."""

    def __init__(self, make) -> None:
        self.make = make
        self.built: list[protocol.Protocol] = []

    def buildProtocol(self, addr):
        p = self.make()
        p.factory = self
        self.built.append(p)
        return p


@implementer(IHalfCloseableProtocol)
class SocksClient(protocol.Protocol):
    """SOCKS5 CONNECT to 127.0.0.1:``port``, then sends ``send`` bytes (and
    half-closes) and counts what comes back; ``relaying`` fires with the
    time of the reply, ``received`` once ``expect`` bytes came back."""

    def __init__(self, port: int, send: int = 0, expect: int = 0) -> None:
        self.port = port
        self.send = send
        self.expect = expect
        self.buffer = b""
        self.state = 0
        self.count = 0
        self.relaying: defer.Deferred[float] = defer.Deferred()
        self.received: defer.Deferred[float] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"\x05\x01\x00")

    def dataReceived(self, data: bytes) -> None:
        if self.state == 2:
            self._count(len(data))
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
            self.relaying.callback(reactor.seconds())
            if self.send:
                self.transport.write(b"u" * self.send)
                self.transport.loseWriteConnection()
            if rest:
                self._count(len(rest))

    def _count(self, n: int) -> None:
        self.count += n
        if self.expect and self.count >= self.expect and not self.received.called:
            self.received.callback(reactor.seconds())

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


def within(deferred: defer.Deferred, what: str, timeout: float = DEADLINE) -> defer.Deferred:
    def late(d, _timeout):
        raise AssertionError(f"no {what} within {timeout:g} s")
    return deferred.addTimeout(timeout, reactor, onTimeoutCancel=late)


async def until(check, what: str, timeout: float = DEADLINE) -> None:
    """Wait (on the running reactor) until ``check()`` is true."""
    deadline = reactor.seconds() + timeout
    while not check():
        if reactor.seconds() > deadline:
            raise AssertionError(f"not {what} within {timeout:g} s")
        await task.deferLater(reactor, 0.01, lambda: None)


class RateTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.relayings: list[Relaying] = []
        self.budgets: list[tuple[throttle.Budget | None, throttle.Budget | None]] = []
        # What the next session's relay gets: a function of nothing that
        # returns its (up, down) budgets.
        self.next_budgets = lambda: (None, None)
        original = Relaying.start

        def start(relaying, idle_timeout, splice_allowed, up=None, down=None):
            up, down = self.next_budgets()
            self.relayings.append(relaying)
            self.budgets.append((up, down))
            original(relaying, idle_timeout, splice_allowed, up, down)

        self.patch(Relaying, "start", start)

    def listen(self, factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def proxy(self, use_splice: bool) -> int:
        return self.listen(SOCKSServerFactory(list(method_registry(None).values()),
                                              default_rules(), Limits(splice=use_splice)))

    async def connect(self, proxy_port: int, client: SocksClient) -> SocksClient:
        creator = protocol.ClientCreator(reactor, lambda: client)
        await within(creator.connectTCP("127.0.0.1", proxy_port), "connection to the proxy")
        self.addCleanup(lambda: client.transport.abortConnection()
                        if client.transport.connected else None)
        return client

    def assert_rate(self, elapsed: float) -> None:
        low, high = EXPECTED * (1 - TOLERANCE), EXPECTED * (1 + TOLERANCE)
        self.assertTrue(low <= elapsed <= high,
                        f"{SIZE} bytes at {RATE} B/s took {elapsed:.3f} s, "
                        f"not {EXPECTED:.2f} s +- {TOLERANCE:.0%}")

    async def ended(self) -> None:
        """Every session ended, and left its budgets with nothing queued,
        no timer and nobody attached."""
        await until(lambda: all(r.client.partner is None for r in self.relayings),
                    "every session ended")
        for pair in self.budgets:
            for budget in pair:
                if budget is not None:
                    self.assertEqual((len(budget.waiting), budget.timer, budget.attached),
                                     (0, None, 0))

    async def transfer_up(self, use_splice: bool) -> float:
        sink = Destination(lambda: Sink(SIZE))
        self.next_budgets = lambda: (throttle.Budget(reactor, RATE), None)
        client = await self.connect(self.proxy(use_splice), SocksClient(self.listen(sink),
                                                                        send=SIZE))
        start = await within(client.relaying, "reply")
        done = await within(sink.built[0].full, "upload")
        return done - start

    async def transfer_down(self, use_splice: bool) -> float:
        source = Destination(Source)
        self.next_budgets = lambda: (None, throttle.Budget(reactor, RATE))
        client = await self.connect(self.proxy(use_splice), SocksClient(self.listen(source),
                                                                        expect=SIZE))
        start = await within(client.relaying, "reply")
        done = await within(client.received, "download")
        return done - start

    async def test_twisted_path_up(self):
        self.assert_rate(await self.transfer_up(use_splice=False))
        self.assertIsNone(self.relayings[0].splicer)
        await self.ended()

    async def test_twisted_path_down(self):
        self.assert_rate(await self.transfer_down(use_splice=False))
        self.assertIsNone(self.relayings[0].splicer)
        await self.ended()

    async def test_splice_path_up(self):
        self.assert_rate(await self.transfer_up(use_splice=True))
        self.assert_spliced()
        await self.ended()

    async def test_splice_path_down(self):
        self.assert_rate(await self.transfer_down(use_splice=True))
        self.assert_spliced()
        await self.ended()

    def assert_spliced(self) -> None:
        if not splice.AVAILABLE:
            self.fail("os.splice is not available: the fast path cannot run here")
        [relaying] = self.relayings
        self.assertIsNotNone(relaying.splicer, "the session never moved to splice")

    async def shared(self, use_splice: bool, window: float = 3.0) -> None:
        """Two sessions sending as fast as they can through one up budget:
        each gets 40-60% of the bytes over ``window`` seconds; both leave
        the budget when they end."""
        budget = throttle.Budget(reactor, RATE)
        self.next_budgets = lambda: (budget, None)
        proxy_port = self.proxy(use_splice)
        sinks = [Destination(Sink), Destination(Sink)]
        clients = [await self.connect(proxy_port, SocksClient(self.listen(sink), send=8 * MiB))
                   for sink in sinks]
        for client in clients:
            await within(client.relaying, "reply")
        await until(lambda: all(s.built for s in sinks), "both destinations connected")
        # Measured once both run, past the starting burst.
        await task.deferLater(reactor, 0.5, lambda: None)
        before = [s.built[0].count for s in sinks]
        await task.deferLater(reactor, window, lambda: None)
        moved = [s.built[0].count - b for s, b in zip(sinks, before, strict=True)]
        total = sum(moved)
        self.assertTrue(0.85 * RATE * window <= total <= 1.15 * RATE * window,
                        f"{total} bytes in {window} s through a {RATE} B/s budget")
        for n in moved:
            self.assertTrue(0.4 <= n / total <= 0.6, f"shares {moved}: not 40-60% each")
        if use_splice:
            self.assertTrue(all(r.splicer is not None for r in self.relayings))
        for client in clients:
            client.transport.abortConnection()
        await self.ended()

    async def test_shared_budget_is_split_fairly_on_twisted_path(self):
        await self.shared(use_splice=False)

    async def test_shared_budget_is_split_fairly_on_splice_path(self):
        await self.shared(use_splice=True)

    async def held_reader_is_not_read(self, use_splice: bool) -> None:
        """A session held by a small budget: over a second, its reader is
        never read while held (it is out of the reactor), it is held most
        of the time, and its budget has just its one timer."""
        budget = throttle.Budget(reactor, 16384)     # 1.6 KiB bursts: held ~4 s per 64 KiB
        self.next_budgets = lambda: (budget, None)
        sink = Destination(Sink)
        client = await self.connect(self.proxy(use_splice),
                                    SocksClient(self.listen(sink), send=4 * MiB))
        await within(client.relaying, "reply")
        if use_splice:
            # Past the Twisted part (SPLICE_AFTER bytes) before watching.
            await until(lambda: self.relayings[0].splicer is not None, "spliced", 20)
        reads_while_held = []
        held_samples = []
        if use_splice:
            original_read = splice._Socket.doRead

            def counting_read(sock):
                if sock.outgoing.held:
                    reads_while_held.append(sock)
                return original_read(sock)

            self.patch(splice._Socket, "doRead", counting_read)
        else:
            original_read = tcp.Server.doRead

            def counting_read(transport):
                meter = getattr(transport.protocol, "meter", None)
                if meter is not None and meter.waiting:
                    reads_while_held.append(transport)
                return original_read(transport)

            self.patch(tcp.Server, "doRead", counting_read)
        for _ in range(100):
            await task.deferLater(reactor, 0.01, lambda: None)
            meter = budget.waiting[0] if budget.waiting else None
            held_samples.append(meter is not None)
            if meter is not None:
                self.assertTrue(budget.timer is not None and budget.timer.active())
                holder = meter.holder
                reader = holder.src if use_splice else holder.transport
                self.assertNotIn(reader, reactor.getReaders())
        self.assertEqual(reads_while_held, [])
        self.assertGreater(sum(held_samples), 80, "the small budget hardly held the reader")
        client.transport.abortConnection()
        await self.ended()

    async def test_a_held_reader_is_out_of_the_reactor_on_twisted_path(self):
        await self.held_reader_is_not_read(use_splice=False)

    async def test_a_held_reader_is_out_of_the_reactor_on_splice_path(self):
        await self.held_reader_is_not_read(use_splice=True)
