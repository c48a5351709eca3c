"""The relay's two paths under a rate budget, on a Clock: Twisted's path
pauses and resumes the reading transport, the splice path bounds each splice
and takes its socket out of the reactor; a throttle hold and flow control
compose; half-close and close still work while held, and a closed end leaves
its budget. Real sockets where the path needs one (splice), memory
transports where Twisted's own behaviour is the subject."""

from __future__ import annotations

import socket

import pytest
from twisted.internet import error, tcp
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from fakes import HalfCloseTransport
from socksd import relay, splice, throttle

MiB = 1 << 20
CHUNK = 65536


class Session(relay.RelaySession):
    __slots__ = ("ended", "activity", "lost")

    def __init__(self) -> None:
        self.ended = False
        self.activity = 0
        self.lost: list[str] = []

    def relay_activity(self) -> None:
        self.activity += 1

    def relay_ended(self) -> None:
        self.ended = True

    def relay_lost(self, why: str) -> None:
        self.lost.append(why)


def memory_pair(watch_activity=False):
    """Two joined RelayEnds on memory transports, and their session."""
    a, b = relay.RelayEnd(), relay.RelayEnd()
    a.makeConnection(HalfCloseTransport())
    b.makeConnection(HalfCloseTransport())
    session = Session()
    relay.join(a, b, session, watch_activity=watch_activity)
    return a, b, session


def over_budget(end: relay.RelayEnd) -> None:
    """Two full reads: more than a 1 MiB/s budget's 0.1 s burst."""
    end.dataReceived(b"x" * CHUNK)
    end.dataReceived(b"y" * CHUNK)


def paused(end: relay.RelayEnd) -> bool:
    return end.transport.producerState == "paused"


@pytest.fixture
def clock():
    return MemoryReactorClock()


def wake(clock: MemoryReactorClock) -> None:
    """Run the budget's one pending timer."""
    [timer] = clock.getDelayedCalls()
    clock.advance(timer.getTime() - clock.seconds())


# Twisted's path.


def test_over_budget_the_reader_pauses_until_the_budget_resumes_it(clock):
    a, b, session = memory_pair(watch_activity=True)
    budget = throttle.Budget(clock, MiB)
    a.meter = budget.meter(a)
    over_budget(a)
    assert paused(a) and not paused(b)
    assert b.transport.value() == b"x" * CHUNK + b"y" * CHUNK   # what was read is passed on
    activity = session.activity
    wake(clock)
    assert not paused(a)
    assert session.activity == activity + 1   # held by its budget is not idle
    assert clock.getDelayedCalls() == []


def test_flow_control_held_longer_than_the_budget_keeps_the_reader_paused(clock):
    a, b, _ = memory_pair()
    budget = throttle.Budget(clock, MiB)
    a.meter = budget.meter(a)
    over_budget(a)
    a.pauseProducing()        # and b's receiver is full
    wake(clock)
    assert paused(a), "the budget resumed a reader that flow control holds"
    a.resumeProducing()
    assert not paused(a)


def test_a_budget_held_longer_than_flow_control_keeps_the_reader_paused(clock):
    a, b, _ = memory_pair()
    budget = throttle.Budget(clock, MiB)
    a.meter = budget.meter(a)
    a.pauseProducing()        # b's receiver is full ...
    over_budget(a)            # ... after a read that spent the budget
    a.resumeProducing()
    assert paused(a), "flow control resumed a reader that its budget holds"
    wake(clock)
    assert not paused(a)


def test_half_close_while_held(clock):
    a, b, session = memory_pair()
    budget = throttle.Budget(clock, MiB)
    a.meter = budget.meter(a)
    over_budget(a)
    b.readConnectionLost()             # the far side is done sending
    assert a.transport.write_closed    # passed on at once, held or not
    assert paused(a)
    wake(clock)
    assert not paused(a)
    a.dataReceived(b"last")
    a.readConnectionLost()             # and now this side: both directions ended
    assert b.transport.value().endswith(b"last")
    assert a.transport.disconnecting and b.transport.disconnecting
    assert a.meter is None and budget.attached == 0


def test_a_held_end_that_closes_leaves_its_budget(clock):
    a, b, session = memory_pair()
    up, down = throttle.Budget(clock, MiB), throttle.Budget(clock, MiB)
    a.meter, b.meter = up.meter(a), down.meter(b)
    over_budget(a)
    over_budget(b)
    assert len(clock.getDelayedCalls()) == 2
    a.connectionLost(Failure(error.ConnectionLost()))
    # Both leave: a is gone, and b reads no more once it is closing.
    assert b.transport.disconnecting
    assert not up.waiting and not down.waiting
    assert up.attached == down.attached == 0
    assert clock.getDelayedCalls() == []
    b.connectionLost(Failure(error.ConnectionDone()))
    assert session.ended and session.lost == ["Connection to the other side was lost in a "
                                              "non-clean fashion."]


def test_ends_sharing_a_budget_with_one_closing_leave_the_other_running(clock):
    a, b, _ = memory_pair()
    c, d, _ = memory_pair()
    shared = throttle.Budget(clock, MiB)
    a.meter, c.meter = shared.meter(a), shared.meter(c)
    over_budget(a)
    over_budget(c)
    assert list(shared.waiting) == [a.meter, c.meter]
    a.connectionLost(Failure(error.ConnectionDone()))
    assert list(shared.waiting) == [c.meter]
    # c read its two chunks on credit while a waited; a's own debt stays with
    # the budget when a leaves: c runs again once the rate has paid for both.
    paid = (2 * CHUNK + (2 * CHUNK - 0.1 * MiB)) / MiB
    clock.advance(paid - 0.001)
    assert paused(c)
    clock.advance(0.002)
    assert not paused(c)


# The splice path, on real loopback TCP sockets; the memory reactor records
# what the relay asks it to watch, and its clock runs the budget.


def tcp_end(reactor, listener: socket.socket):
    """A RelayEnd on a real tcp.Server, and the peer socket it talks to."""
    peer = socket.create_connection(listener.getsockname(), timeout=5)
    sock, addr = listener.accept()
    sock.setblocking(False)
    end = relay.RelayEnd()
    end.makeConnection(tcp.Server(sock, end, addr, None, 1, reactor))
    return end, peer


@pytest.fixture
def spliced(clock):
    """Two ends joined for splicing, their peers, and a 1 MiB/s budget on
    the first end's reading (set ``meter`` before starting the relay)."""
    if not splice.AVAILABLE:
        pytest.fail("os.splice is not available: the fast path cannot run here")
    listener = socket.create_server(("127.0.0.1", 0))
    (a, peer_a), (b, peer_b) = tcp_end(clock, listener), tcp_end(clock, listener)
    listener.close()
    relay.join(a, b, Session(), flow_control=False)
    budget = throttle.Budget(clock, MiB)
    a.meter = budget.meter(a)
    yield a, b, peer_a, peer_b, budget
    for s in (peer_a, peer_b, a.transport.socket, b.transport.socket):
        s.close()


def receive(sock: socket.socket, n: int) -> int:
    got = 0
    while got < n:
        chunk = sock.recv(n - got)
        assert chunk, "EOF"
        got += len(chunk)
    return got


def test_each_splice_moves_what_the_budget_grants(clock, spliced):
    a, b, peer_a, peer_b, budget = spliced
    peer_a.sendall(b"z" * 400_000)
    relay_ = splice.SpliceRelay(clock, a, b, None)
    relay_.start()
    src = relay_.sockets[0]
    assert src in clock.getReaders()
    src.doRead()        # the whole burst, and no more
    burst = int(budget.capacity)
    assert relay_.directions[0].moved == burst
    assert receive(peer_b, burst) == burst
    src.doRead()        # spent: held, out of the reactor, one timer to bring it back
    assert relay_.directions[0].moved == burst
    assert src not in clock.getReaders()
    wake(clock)
    assert src in clock.getReaders()
    src.doRead()
    assert relay_.directions[0].moved == pytest.approx(burst + budget.low, abs=1)
    relay_.abort()
    assert budget.attached == 0 and budget.timer is None and not budget.waiting


def test_a_reader_held_when_the_relay_moves_to_splice_stays_held(clock, spliced):
    a, b, peer_a, peer_b, budget = spliced
    over_budget(a)      # on Twisted's path, before the move
    assert a.transport not in clock.getReaders()
    relay_ = splice.SpliceRelay(clock, a, b, None)
    relay_.start()
    src, other = relay_.sockets
    assert src not in clock.getReaders() and other in clock.getReaders()
    wake(clock)
    assert src in clock.getReaders()
    assert a.transport not in clock.getReaders()   # the kernel's now, not Twisted's


def test_eof_on_the_splice_path_leaves_the_budget(clock, spliced):
    a, b, peer_a, peer_b, budget = spliced
    peer_a.sendall(b"end")
    peer_a.shutdown(socket.SHUT_WR)
    relay_ = splice.SpliceRelay(clock, a, b, None)
    relay_.start()
    relay_.sockets[0].doRead()
    relay_.sockets[0].doRead()
    assert relay_.directions[0].eof and budget.attached == 0
    assert receive(peer_b, 3) == 3


def test_abort_while_held_on_the_splice_path_leaves_the_budget(clock, spliced):
    a, b, peer_a, peer_b, budget = spliced
    peer_a.sendall(b"z" * 200_000)
    relay_ = splice.SpliceRelay(clock, a, b, None)
    relay_.start()
    src = relay_.sockets[0]
    src.doRead()
    src.doRead()
    assert relay_.directions[0].held and budget.waiting
    relay_.abort("idle timeout")
    assert relay_.finished and not budget.waiting and budget.timer is None
    assert budget.attached == 0
    assert src not in clock.getReaders()
