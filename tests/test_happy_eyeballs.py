"""CONNECT to a name with several addresses: RFC 8305 (Happy Eyeballs) over
the addresses already resolved and allowed. Timing, winners, cancellation
and the deadline on a memory reactor's clock (no sleeps); then, on the real
reactor and real loopback sockets, a black-holed first address that must
not hold the session up."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
from twisted.internet import defer, error, reactor, task, threads
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from conftest import recv_exact
from fakes import Outbound
from socksd.auth.registry import method_registry
from socksd.proxy import Limits, SOCKSServerFactory, connect
from socksd.rules import default_rules

V4A, V4B, V4C = "192.0.2.1", "192.0.2.2", "192.0.2.3"
V6A, V6B = "2001:db8::1", "2001:db8::2"


@pytest.mark.parametrize("given,raced", [
    ([V4A, V4B, V6A, V6B], [V4A, V6A, V4B, V6B]),
    ([V6A, V6B, V4A], [V6A, V4A, V6B]),
    ([V4A, V6A, V4B, V4C], [V4A, V6A, V4B, V4C]),
    ([V4A, V4B, V4C], [V4A, V4B, V4C]),
])
def test_addresses_alternate_by_family_starting_with_the_first(given, raced):
    assert connect.interleave(given) == raced


class Race:
    """connect_first over a memory reactor whose clock the test moves."""

    def __init__(self, hosts, timeout: float = 30.0, source=None) -> None:
        self.reactor = MemoryReactorClock()
        self.d = connect.connect_first(hosts, self.reactor, 443,
                                       self.reactor.seconds() + timeout, source)
        self.result: list = []
        self.d.addBoth(self.result.append)

    def started(self) -> list[str]:
        return [host for host, *_ in self.reactor.tcpClients]

    def attempt(self, index: int) -> Outbound:
        # An attempt after a failure starts on the reactor's next turn.
        self.reactor.advance(0)
        return Outbound(self.reactor, index)

    def cancelled(self) -> list[bool]:
        """Per attempt started: was it abandoned (its connector disconnected)?"""
        return [c._disconnected for c in self.reactor.connectors]

    def failure(self) -> connect.ConnectFailed:
        self.reactor.advance(0)
        [result] = self.result
        assert isinstance(result, Failure), result
        return result.value

    def timers(self) -> list:
        return [c for c in self.reactor.getDelayedCalls() if c.active()]


def test_the_next_attempt_starts_250_ms_after_the_previous_one_started():
    race = Race([V4A, V4B, V6A])
    assert race.started() == [V4A]
    race.reactor.advance(0.249)
    assert race.started() == [V4A]
    race.reactor.advance(0.001)
    assert race.started() == [V4A, V6A]      # interleaved: the other family next
    race.reactor.advance(0.25)
    assert race.started() == [V4A, V6A, V4B]
    race.reactor.advance(5)
    assert len(race.started()) == 3 and race.result == []


def test_a_failed_attempt_starts_the_next_at_once_and_the_delay_runs_from_there():
    race = Race([V4A, V4B, V4C])
    race.reactor.advance(0.1)
    race.attempt(0).refuse(error.ConnectionRefusedError())
    race.reactor.advance(0)          # at once: on the reactor's next turn
    assert race.started() == [V4A, V4B]
    race.reactor.advance(0.249)
    assert race.started() == [V4A, V4B]
    race.reactor.advance(0.001)
    assert race.started() == [V4A, V4B, V4C]


def test_the_first_to_connect_wins_and_the_others_are_abandoned():
    race = Race([V4A, V6A, V4B, V6B])
    race.reactor.pump([0.25, 0.25])
    assert race.started() == [V4A, V6A, V4B]
    winner = race.attempt(1)
    winner.accept()
    assert race.result == [winner.protocol]
    assert race.cancelled() == [True, False, True]
    # No attempt starts later, and no timer is left behind.
    assert race.timers() == []
    race.reactor.advance(60)
    assert race.started() == [V4A, V6A, V4B]


def test_cancelling_abandons_every_attempt_in_flight():
    race = Race([V4A, V6A, V4B])
    race.reactor.advance(0.3)
    race.d.cancel()
    assert race.cancelled() == [True, True]
    assert isinstance(race.failure(), defer.CancelledError)
    assert race.timers() == []
    race.reactor.advance(60)
    assert race.started() == [V4A, V6A]


def test_the_deadline_bounds_the_race():
    race = Race([V4A, V4B, V4C, V6A, V6B], timeout=0.6)
    race.reactor.pump([0.25, 0.25, 0.099])
    assert race.result == [] and len(race.started()) == 3
    race.reactor.advance(0.001)
    failed = race.failure()
    assert failed.reason == connect.TIMEOUT and "no connection in 0.6 s" in failed.detail
    assert race.cancelled() == [True, True, True]
    assert race.timers() == []
    # Each attempt was given only the time left to the deadline.
    assert [timeout for *_, timeout, _bind in race.reactor.tcpClients] == \
        pytest.approx([0.6, 0.35, 0.1])


def test_when_all_fail_a_refusal_says_more_than_a_timeout():
    for first, second in ((error.TimeoutError(), error.ConnectionRefusedError()),
                          (error.ConnectionRefusedError(), error.TimeoutError())):
        race = Race([V4A, V4B])
        race.attempt(0).refuse(first)
        race.attempt(1).refuse(second)
        assert race.failure().reason == connect.REFUSED
        assert race.timers() == []


def test_when_all_fail_the_latest_of_the_same_kind_is_reported():
    race = Race([V4A, V4B])
    race.attempt(0).refuse(error.ConnectionRefusedError("first"))
    race.attempt(1).refuse(error.ConnectionRefusedError("second"))
    assert "second" in race.failure().detail


def test_all_timed_out_reports_a_timeout():
    race = Race([V4A, V6A])
    race.reactor.advance(0.25)
    race.attempt(0).refuse(error.TimeoutError())
    race.attempt(1).refuse(error.TimeoutError())
    assert race.failure().reason == connect.TIMEOUT


def test_one_address_is_one_attempt_with_no_timer():
    race = Race([V4A], timeout=7)
    assert race.started() == [V4A] and race.timers() == []
    [(_host, _port, _factory, timeout, bind)] = race.reactor.tcpClients
    assert timeout == 7 and bind is None


def test_no_time_left_fails_at_once():
    reactor = MemoryReactorClock()
    reactor.advance(10)
    d = connect.connect_first([V4A, V4B], reactor, 443, 9.0)
    failed = []
    d.addErrback(failed.append)
    assert failed[0].value.reason == connect.TIMEOUT and reactor.tcpClients == []


def test_each_attempt_leaves_from_the_source_its_family_gets():
    def source(family):
        if family == socket.AF_INET6:
            raise connect.NoSource("no source address of IPv6 family")
        return "198.51.100.7"

    race = Race([V6A, V4A, V6B, V4B], source=source)
    # The IPv6 attempts fail at once, without waiting for their turn.
    race.reactor.advance(0)
    assert race.started() == [V4A]
    race.attempt(0).refuse(error.ConnectionRefusedError())
    race.reactor.advance(0)
    race.reactor.advance(0)
    assert race.started() == [V4A, V4B]
    assert [bind for *_, bind in race.reactor.tcpClients] == [("198.51.100.7", 0)] * 2
    race.attempt(1).refuse(error.ConnectionRefusedError())
    assert race.failure().reason == connect.REFUSED


def test_no_source_for_any_address_is_host_unreachable():
    def source(family):
        raise connect.NoSource(f"no source address of family {family}")

    race = Race([V6A, V6B], source=source)
    failed = race.failure()
    assert isinstance(failed, connect.NoSource) and failed.reason == connect.HOST_UNREACHABLE
    assert race.started() == [] and race.timers() == []


# On the real reactor: a black hole first, then an answering server.


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class StaticResolver:
    """Answers the names it knows with fixed addresses, in order, on the
    reactor's next turn (as a resolver would); others fall to ``other``."""

    def __init__(self, known: dict[str, list[str]], other) -> None:
        self.known = known
        self.other = other

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None,
                        transportSemantics="TCP"):
        if hostName not in self.known:
            return self.other.resolveHostName(receiver, hostName, portNumber, addressTypes,
                                              transportSemantics)
        resolution = _Resolution(hostName)
        receiver.resolutionBegan(resolution)

        def answer():
            for host in self.known[hostName]:
                cls = IPv6Address if ":" in host else IPv4Address
                receiver.addressResolved(cls("TCP", host, portNumber))
            receiver.resolutionComplete()

        reactor.callLater(0, answer)
        return resolution


def free_port_on_both(hosts: tuple[str, ...]) -> int:
    for _attempt in range(20):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        try:
            for host in hosts:
                with socket.socket() as other:
                    other.bind((host, port))
            return port
        except OSError:
            continue
    raise AssertionError(f"no port free on all of {hosts}")


class Greeter(Protocol):
    def connectionMade(self):
        self.transport.write(b"hello from .3")


def socks5_connect_by_name(proxy_port: int, name: str, port: int) -> tuple[int, float, bytes]:
    """A blocking SOCKS5 CONNECT by name (run in a thread): the reply code,
    the seconds it took, and the destination's first bytes."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as s:
        s.sendall(b"\x05\x01\x00")
        assert recv_exact(s, 2) == b"\x05\x00"
        raw = name.encode()
        started = time.monotonic()
        s.sendall(b"\x05\x01\x00\x03" + bytes((len(raw),)) + raw + struct.pack("!H", port))
        reply = recv_exact(s, 10)
        took = time.monotonic() - started
        greeting = recv_exact(s, 13) if reply[1] == 0 else b""
        return reply[1], took, greeting


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class BlackHoleFirstTests(unittest.TestCase):

    def setUp(self):
        self.port = free_port_on_both(("127.0.0.2", "127.0.0.3"))
        # 127.0.0.2: a listener whose accept queue is full; Linux drops
        # further SYNs, so a connect() to it hangs (a black hole).
        self.hole = socket.socket()
        self.hole.bind(("127.0.0.2", self.port))
        self.hole.listen(0)
        self.addCleanup(self.hole.close)
        self.fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.2", self.port))
            self.fillers.append(filler)
        self.addCleanup(lambda: [f.close() for f in self.fillers])
        # 127.0.0.3: the same port, answering.
        self.server = reactor.listenTCP(self.port, Factory.forProtocol(Greeter),
                                        interface="127.0.0.3")
        self.addCleanup(self.server.stopListening)
        old = reactor.nameResolver
        reactor.installNameResolver(StaticResolver(
            {"dual.test": ["127.0.0.2", "127.0.0.3"], "hole.test": ["127.0.0.2"]}, old))
        self.addCleanup(reactor.installNameResolver, old)

    def proxy(self, connect_timeout: float) -> int:
        factory = SOCKSServerFactory([method_registry(None)["none"]], default_rules(),
                                     Limits(connect_timeout=connect_timeout))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def test_the_black_hole_really_swallows_the_syn(self):
        # The premise of the next test, on this kernel.
        with self.assertRaises(connect.ConnectFailed) as caught:
            yield connect.connect_tcp(reactor, "127.0.0.2", self.port, 0.5)
        self.assertEqual(caught.exception.reason, connect.TIMEOUT)

    @defer.inlineCallbacks
    def test_a_black_holed_first_address_does_not_hold_up_the_connect(self):
        proxy_port = self.proxy(connect_timeout=10)
        yield task.deferLater(reactor, 0.05, lambda: None)
        before = open_fds()
        code, took, greeting = yield threads.deferToThread(
            socks5_connect_by_name, proxy_port, "dual.test", self.port)
        self.assertEqual(code, 0)
        self.assertEqual(greeting, b"hello from .3")
        # The second address was tried 250 ms after the first started.
        self.assertLess(took, 0.8)
        self.assertGreaterEqual(took, connect.ATTEMPT_DELAY)
        # The abandoned attempt left no socket, no watched descriptor, no timer.
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(open_fds(), before)
        self.assertFalse([w for w in reactor.getWriters()
                          if isinstance(w, connect._Connecting)])
        self.assertFalse([c for c in reactor.getDelayedCalls() if c.active() and
                          getattr(c.func, "__qualname__", "").startswith(
                              ("_Connecting", "_Race"))])

    @defer.inlineCallbacks
    def test_the_black_hole_alone_fails_at_the_connect_timeout(self):
        proxy_port = self.proxy(connect_timeout=0.6)
        code, took, _greeting = yield threads.deferToThread(
            socks5_connect_by_name, proxy_port, "hole.test", self.port)
        self.assertEqual(code, 0x06)    # TTL expired: SOCKS5's word for a timeout
        self.assertGreaterEqual(took, 0.5)
        self.assertLess(took, 3)


def test_a_failure_at_the_deadline_starts_nothing_more():
    race = Race([V4A, V4B, V4C], timeout=0.25)
    race.reactor.advance(0.25 - 1e-9)
    assert race.started() == [V4A]
    race.reactor.rightNow += 1e-9     # the deadline, before its timer has run
    Outbound(race.reactor, 0).refuse(error.ConnectionRefusedError())
    assert race.started() == [V4A]
    assert race.failure().reason == connect.REFUSED and race.timers() == []


def test_hundreds_of_addresses_that_fail_at_once_do_not_nest_calls():
    """A hostile name with hundreds of addresses, each failing at once (no
    source address of its family): tried in turn, one reactor turn each,
    not a call deeper each (a RecursionError)."""
    def only_v6(family):
        raise connect.NoSource("no IPv4 source")
    hosts = [f"192.0.2.{i % 250 + 1}" for i in range(2000)]
    race = Race(hosts, source=only_v6)
    for _ in range(2001):
        race.reactor.advance(0)
    assert isinstance(race.failure(), connect.NoSource)
