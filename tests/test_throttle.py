"""socksd.throttle's token buckets on a Clock: the rate they keep, the burst,
the queue of held ends and its one timer, fairness between ends sharing a
budget, leaving a budget, and datagrams. The relay paths' use of them is in
test_throttle_relay.py (unit) and test_rate_integration.py (real sockets)."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from socksd import throttle

MiB = 1 << 20
CHUNK = 65536      # what Twisted reads at most per doRead


class Reader:
    """A reading side as the budget sees it: records holds and resumes."""

    def __init__(self) -> None:
        self.held = False
        self.holds = 0
        self.resumes = 0

    def throttle_hold(self) -> None:
        assert not self.held, "held twice"
        self.held = True
        self.holds += 1

    def throttle_resume(self) -> None:
        self.held = False
        self.resumes += 1


def budget(rate: float = MiB, burst: float = 0.1):
    clock = Clock()
    return throttle.Budget(clock, rate, burst), clock


def test_a_rate_and_burst_must_be_positive():
    clock = Clock()
    for rate, burst in ((0, 0.1), (-1, 0.1), (MiB, 0), (float("nan"), 0.1)):
        with pytest.raises(ValueError):
            throttle.Budget(clock, rate, burst)


def test_starts_full_and_refills_up_to_the_burst_only():
    b, clock = budget()
    assert b.capacity == pytest.approx(0.1 * MiB)
    assert b.refill() == pytest.approx(0.1 * MiB)
    b.tokens = 0.0
    clock.advance(0.05)
    assert b.refill() == pytest.approx(0.05 * MiB)
    clock.advance(60)      # a long idle time banks no more than the burst
    assert b.refill() == pytest.approx(0.1 * MiB)


def test_within_budget_nothing_holds_and_nothing_is_timed():
    b, clock = budget()
    reader = Reader()
    meter = b.meter(reader)
    meter.spent(CHUNK)
    assert not reader.held and not meter.waiting
    assert clock.getDelayedCalls() == []


def test_debt_holds_the_reader_with_one_timer_until_the_bucket_refills():
    b, clock = budget()
    reader = Reader()
    meter = b.meter(reader)
    meter.spent(CHUNK)
    meter.spent(CHUNK)   # 128 KiB read against a 102.4 KiB bucket: in debt
    assert reader.held and meter.waiting and list(b.waiting) == [meter]
    [timer] = clock.getDelayedCalls()
    debt = 2 * CHUNK - 0.1 * MiB       # this end's own, not the bucket's
    assert meter.credit == pytest.approx(-debt) and b.tokens == 0
    assert timer.getTime() == pytest.approx(max(b.low, debt + 1) / MiB)
    clock.advance(timer.getTime() - 0.001)
    assert reader.held
    clock.advance(0.002)
    assert not reader.held and reader.resumes == 1 and not meter.waiting
    assert clock.getDelayedCalls() == []     # nobody waits: no timer


def greedy_twisted(clock: Clock, meters, readers, seconds: float, step: float = 0.001):
    """Each unheld reader reads a full chunk per reactor turn (``step``),
    as a bulk sender's socket gives it; returns the bytes each read."""
    read = [0] * len(meters)
    for _ in range(round(seconds / step)):
        for i, (meter, reader) in enumerate(zip(meters, readers, strict=True)):
            if not reader.held:
                read[i] += CHUNK
                meter.spent(CHUNK)
        clock.advance(step)
    return read


def greedy_splice(clock: Clock, meters, readers, seconds: float, step: float = 0.001):
    """Each unheld reader splices what it is granted, a pipe's worth at
    most, per turn; checks the bucket never goes below zero."""
    read = [0] * len(meters)
    for _ in range(round(seconds / step)):
        for i, (meter, reader) in enumerate(zip(meters, readers, strict=True)):
            if not reader.held:
                n = meter.grant(1 << 18)
                assert n >= 0 and meter.budget.tokens >= 0
                assert (n == 0) == reader.held
                read[i] += n
        clock.advance(step)
    return read


@pytest.mark.parametrize("greedy", [greedy_twisted, greedy_splice])
def test_the_rate_holds_over_time(greedy):
    b, clock = budget()
    reader = Reader()
    [read] = greedy(clock, [b.meter(reader)], [reader], 10.0)
    # The burst, then the rate: give or take a chunk of debt or a wake's share.
    assert abs(read - (0.1 * MiB + 10 * MiB)) <= CHUNK
    # One wake per share, not a busy loop: at most 4 per burst of time.
    assert reader.resumes <= 10 / 0.1 * 4 + 1


@pytest.mark.parametrize("greedy", [greedy_twisted, greedy_splice])
def test_a_small_rate_holds_too(greedy):
    b, clock = budget(rate=20000)
    reader = Reader()
    [read] = greedy(clock, [b.meter(reader)], [reader], 30.0, step=0.01)
    assert abs(read - (2000 + 30 * 20000)) <= CHUNK


@pytest.mark.parametrize("greedy", [greedy_twisted, greedy_splice])
def test_ends_sharing_a_budget_take_turns(greedy):
    b, clock = budget()
    readers = [Reader() for _ in range(3)]
    meters = [b.meter(r) for r in readers]
    read = greedy(clock, meters, readers, 10.0)
    total = sum(read)
    assert abs(total - (0.1 * MiB + 10 * MiB)) <= 3 * CHUNK
    for share in read:
        assert share == pytest.approx(total / 3, rel=0.05)


def test_a_twisted_end_and_a_splice_end_share_fairly():
    b, clock = budget()
    readers = [Reader(), Reader()]
    twisted_meter, splice_meter = b.meter(readers[0]), b.meter(readers[1])
    read = [0, 0]
    for _ in range(10000):
        if not readers[0].held:
            read[0] += CHUNK
            twisted_meter.spent(CHUNK)
        if not readers[1].held:
            read[1] += splice_meter.grant(1 << 18)
        clock.advance(0.001)
    total = sum(read)
    assert 0.4 <= read[0] / total <= 0.6


def test_a_generous_budget_never_holds_and_never_times():
    b, clock = budget(rate=1 << 40)     # a TiB/s: far above any link
    reader = Reader()
    meter = b.meter(reader)
    for _ in range(1000):
        meter.spent(CHUNK)
        assert meter.grant(1 << 18) == 1 << 18
        clock.advance(0.0001)
    assert reader.holds == 0 and clock.getDelayedCalls() == []


def test_grant_refund_gives_back_what_was_not_moved():
    b, clock = budget()
    reader = Reader()
    meter = b.meter(reader)
    n = meter.grant(1 << 18)
    assert n == int(0.1 * MiB)
    assert b.tokens < 1
    meter.refund(n - 1000)
    assert b.tokens == pytest.approx(n - 1000, abs=1)
    meter.refund(10 * MiB)     # never above the burst
    assert b.tokens == pytest.approx(b.capacity)


def test_grant_holds_below_a_share_rather_than_trickling():
    b, clock = budget()
    reader = Reader()
    meter = b.meter(reader)
    meter.grant(1 << 18)
    clock.advance(0.001)       # a KiB back: not worth a splice, nor a wakeup
    assert meter.grant(1 << 18) == 0 and reader.held
    [timer] = clock.getDelayedCalls()
    assert timer.getTime() == pytest.approx(b.low / MiB, rel=0.01)   # from the last grant


def test_detach_leaves_the_queue_and_stops_the_timer():
    b, clock = budget()
    readers = [Reader(), Reader()]
    first, second = b.meter(readers[0]), b.meter(readers[1])
    first.spent(2 * CHUNK)
    second.spent(CHUNK)
    assert list(b.waiting) == [first, second] and len(clock.getDelayedCalls()) == 1
    first.detach()
    assert list(b.waiting) == [second] and len(clock.getDelayedCalls()) == 1
    second.detach()
    second.detach()        # idempotent
    assert not b.waiting and b.timer is None and clock.getDelayedCalls() == []
    assert b.attached == 0
    clock.advance(10)
    assert readers[0].resumes == readers[1].resumes == 0   # nobody woken after leaving


def test_detach_gives_an_unused_share_back():
    b, clock = budget()
    reader = Reader()
    meter = b.meter(reader)
    meter.grant(1 << 18)
    assert meter.grant(1 << 18) == 0 and reader.held
    [timer] = clock.getDelayedCalls()
    clock.advance(timer.getTime())    # the wake hands it a share it does not use
    assert not reader.held and meter.credit == pytest.approx(b.low, rel=1e-3)
    assert b.refill() < 1
    meter.detach()
    assert b.tokens == pytest.approx(b.low, rel=1e-3) and meter.credit == 0


def test_detach_leaves_a_debt_with_the_budget():
    b, clock = budget()
    first, second = b.meter(Reader()), b.meter(Reader())
    first.spent(2 * CHUNK)             # 25.6 KiB over the bucket: first's own debt
    assert first.credit == pytest.approx(-(2 * CHUNK - 0.1 * MiB))
    first.detach()                     # a new session must not start debt-free
    assert b.tokens == pytest.approx(-(2 * CHUNK - 0.1 * MiB))
    assert second.grant(1 << 18) == 0


def test_datagrams_pass_within_budget_and_are_dropped_over_it():
    b, clock = budget(rate=10000)      # a burst of 1000 bytes
    assert b.admit(600)
    assert not b.admit(600)            # 400 left: dropped, nothing taken, no debt
    assert b.tokens == pytest.approx(400)
    assert (b.dropped, b.dropped_bytes) == (1, 600)
    clock.advance(0.02)
    assert b.admit(600)
    assert clock.getDelayedCalls() == []      # a datagram never waits


def test_a_datagram_larger_than_the_burst_passes_on_a_full_bucket():
    b, clock = budget(rate=10000)
    assert b.admit(1400)               # else it could never pass at this rate
    assert not b.admit(10)             # and its 400 bytes of debt are paid first
    clock.advance(0.035)
    assert not b.admit(10)
    clock.advance(0.01)
    assert b.admit(10)


def test_datagrams_and_relayed_bytes_draw_on_one_budget():
    b, clock = budget()
    reader = Reader()
    meter = b.meter(reader)
    meter.spent(2 * CHUNK)             # in debt
    assert not b.admit(100)
    assert b.dropped == 1


def test_a_new_rate_applies_from_now_and_moves_the_wake():
    from twisted.internet.task import Clock

    from socksd.throttle import Budget

    clock = Clock()
    budget = Budget(clock, 1000)
    assert budget.capacity == 100
    assert budget.admit(100)              # the burst spent
    assert not budget.admit(50)
    budget.set_rate(10000)                # ten times as fast, a burst of 0.1 s still
    assert budget.capacity == 1000
    clock.advance(0.005)                  # 50 bytes at the new rate
    assert budget.admit(50)
    budget.set_rate(100)
    assert budget.capacity == 10 and budget.tokens <= 10
