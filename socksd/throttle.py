"""Rate limits: token buckets that both relay paths obey (issue 17).

A :class:`Budget` is one direction's allowance, ``rate`` bytes per second,
shared by every relay end that draws on it: one session's, or all of a
user's, a client's or a rule's sessions (which sessions share is the
caller's choice: make one Budget per sharing group and direction). The
bucket holds at most ``burst_seconds`` of budget and starts full.

How the session uses it (``rate`` in bytes per second)::

    up = throttle.Budget(reactor, rate)      # what the client sends
    down = throttle.Budget(reactor, rate)    # what the destination sends back
    relaying.start(idle_timeout, splice_allowed, up=up, down=down)

:class:`~socksd.proxy.relaying.Relaying` attaches the reading side of each
direction (``end.meter = budget.meter(end)``: the client's end meters "up",
the outbound end "down"); the splice relay takes the meters over when the
session moves there. Each side leaves its budget (:meth:`Meter.detach`) as
soon as it reads no more: at its EOF, when either connection closes, when
the splice relay stops. Nothing of a finished session stays queued or
timed. UDP datagrams ask :meth:`Budget.admit` per payload: dropped (and
counted) when over budget, never queued.

The two paths use the bucket the way each can:

* Twisted's path learns a chunk's size only once it is read (up to a read's
  worth, 64 KiB): :meth:`Meter.spent` charges it, and what the bucket does
  not cover is that end's own debt (a negative ``credit``): it is held until
  its turns have paid it back. The debt is bounded by one read per end, and
  the average rate holds.
* The splice path asks first (:meth:`Meter.grant`): the budget decides how
  many bytes the next ``splice`` may move, so the bytes stay in the kernel
  and nothing is moved on credit.

An end that finds the bucket short is *held*: its reader leaves the reactor
(no wakeups from a readable socket) and it joins the budget's queue. One
timer per budget, set for when the bucket has refilled to ``low`` bytes,
gives the queue's head a share of what refilled (deficit round robin): it
resumes once its credit is positive, else goes to the tail; an end that is
running while others wait joins the tail after its chunk. So ends sharing a
budget get equal bytes, whichever path each is on; a held end costs its
budget's one timer and nothing else; and a budget nobody waits on has no
timer at all: a generous rate costs a clock reading and a little arithmetic
per chunk.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

# The least an end is woken with (unless the whole burst is smaller): a
# wake per few bytes would be a busy loop by another name. The splice
# pipe's size: the most one splice moves anyway.
MOST_PER_WAKE = 1 << 18
# What a wake waits for, as a fraction of the burst: a quarter keeps a small
# rate's bytes coming in several pieces per burst rather than one.
WAKE_FRACTION = 0.25


class Holder(Protocol):
    """The reading side a meter holds and resumes: a RelayEnd on Twisted's
    path, a splice direction on the kernel's."""

    def throttle_hold(self) -> None:
        """Stop reading: the budget is spent."""

    def throttle_resume(self) -> None:
        """Read again (unless something else holds the reader)."""


class Budget:
    """``rate`` bytes per second for the ends that draw on it, in bursts of
    at most ``burst_seconds`` of budget."""

    __slots__ = ("reactor", "rate", "capacity", "low", "tokens", "stamp", "waiting",
                 "timer", "attached", "dropped", "dropped_bytes")

    def __init__(self, reactor: Any, rate: float, burst_seconds: float = 0.1) -> None:
        if not rate > 0 or not burst_seconds > 0:
            raise ValueError(f"a budget needs a positive rate and burst, not {rate!r}, "
                             f"{burst_seconds!r}")
        self.reactor = reactor
        self.rate = float(rate)
        self.capacity = self.rate * burst_seconds
        self.low = max(1.0, min(self.capacity * WAKE_FRACTION, MOST_PER_WAKE))
        self.tokens = self.capacity      # bytes that may move now (< 0: in debt)
        self.stamp = reactor.seconds()   # when tokens was last brought up to date
        self.waiting: deque[Meter] = deque()   # held ends, in the order they ran out
        self.timer: Any = None           # the one pending wake (IDelayedCall)
        self.attached = 0                # meters drawing on this budget
        self.dropped = 0                 # datagrams refused by admit()
        self.dropped_bytes = 0

    def set_rate(self, rate: float) -> None:
        """Refill at ``rate`` from now on, with as many seconds of burst (a
        reload's new rate; a worker's share of a budget the workers share)."""
        if not rate > 0:
            raise ValueError(f"a budget needs a positive rate, not {rate!r}")
        tokens = self.refill()
        burst_seconds = self.capacity / self.rate
        self.rate = float(rate)
        self.capacity = self.rate * burst_seconds
        self.low = max(1.0, min(self.capacity * WAKE_FRACTION, MOST_PER_WAKE))
        self.tokens = min(tokens, self.capacity)
        timer, self.timer = self.timer, None
        if timer is not None:          # what the queue waits for came sooner or later
            if timer.active():
                timer.cancel()
            self._schedule()

    def meter(self, holder: Holder) -> Meter:
        """Attach a reading side for the relay's life (detach it at the end)."""
        self.attached += 1
        return Meter(self, holder)

    def refill(self) -> float:
        """Bring the bucket up to now; returns the tokens. The burst bounds
        what an idle budget banks; what refills while ends wait is theirs
        (else a wake a little late would lose some of their turn)."""
        now = self.reactor.seconds()
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.capacity and not self.waiting:
            tokens = self.capacity
        self.tokens, self.stamp = tokens, now
        return tokens

    def admit(self, n: int) -> bool:
        """May a datagram of ``n`` payload bytes pass? Takes the tokens if so;
        if not, counts the drop and takes nothing: datagrams over budget are
        dropped, never queued. (One larger than the whole burst passes when
        the bucket is full, and the debt is paid back before the next: else
        a small rate would never pass it at all.)"""
        tokens = self.refill()
        if tokens >= n or tokens >= self.capacity:
            self.tokens -= n
            return True
        self.dropped += 1
        self.dropped_bytes += n
        return False

    def _need(self) -> float:
        """The tokens the next wake waits for: a share; or, for an end
        alone in the queue, its whole debt (one wake, not one a share)."""
        waiting = self.waiting
        if len(waiting) == 1 and 1 - waiting[0].credit > self.low:
            return 1 - waiting[0].credit
        return self.low

    def _schedule(self) -> None:
        if self.timer is None and self.waiting:
            delay = (self._need() - self.tokens) / self.rate
            self.timer = self.reactor.callLater(delay if delay > 0 else 0, self._wake)

    def _wake(self) -> None:
        """The bucket has refilled: hand the queue's head ends a share each,
        as many as there is a ``low`` share for (one, when on time), so the
        first to read cannot take the others' part. One whose credit is then
        positive resumes; one still in debt waits at the tail."""
        self.timer = None
        tokens = self.refill()
        waiting = self.waiting
        if tokens + 1 < self._need():   # woken early (a clock's rounding): wait on
            self._schedule()
            return
        k = min(len(waiting), max(1, int(tokens // self.low)))
        share = tokens / k
        self.tokens = 0.0
        resumed = []
        for _ in range(k):
            meter = waiting.popleft()
            meter.credit += share
            if meter.credit >= 1:
                meter.waiting = False
                resumed.append(meter)
            else:
                waiting.append(meter)
        for meter in resumed:
            if meter.holder is not None:
                meter.holder.throttle_resume()
        self._schedule()

    def _release(self, meter: Meter) -> None:
        self.attached -= 1
        if meter.waiting:
            meter.waiting = False
            self.waiting.remove(meter)
        if meter.credit:
            # An unused share goes back; a debt stays with the budget, or a
            # client could read a chunk over budget per session it opens.
            tokens = self.refill() + meter.credit
            self.tokens = tokens if self.waiting or tokens < self.capacity else self.capacity
            meter.credit = 0.0
        if self.timer is not None:   # the queue, or what it waits for, changed
            if self.timer.active():
                self.timer.cancel()
            self.timer = None
            self._schedule()


class Meter:
    """One reading side's draw on a budget."""

    __slots__ = ("budget", "holder", "waiting", "credit")

    def __init__(self, budget: Budget, holder: Holder) -> None:
        self.budget = budget
        self.holder: Holder | None = holder   # moves to the splice direction with the bytes
        self.waiting = False    # held, in the budget's queue
        self.credit = 0.0       # tokens this end alone holds: a wake's share, or < 0 its debt

    def spent(self, n: int) -> None:
        """``n`` bytes were read (Twisted's path): charge them to this end's
        credit, then to the bucket; hold the reader while this end is in
        debt, or while other ends wait their turn."""
        credit = self.credit - n
        if credit >= 0:
            self.credit = credit
            return
        budget = self.budget
        tokens = budget.refill()
        if tokens > 0 and not budget.waiting:
            take = tokens if tokens < -credit else -credit
            budget.tokens = tokens - take
            credit += take
        self.credit = credit
        if credit < 0 or budget.waiting:
            self._hold()

    def grant(self, most: int) -> int:
        """How many bytes the next read may move, at most ``most`` (the
        splice path); what it does not move goes back with :meth:`refund`.
        0: the reader is held until the budget resumes it."""
        credit = self.credit
        if credit < 1:
            budget = self.budget
            tokens = budget.refill()
            if budget.waiting or tokens + credit < budget.low:
                # Not worth a splice, nor the wakeup: wait for a share.
                self._hold()
                return 0
            move = tokens if tokens < most - credit else most - credit
            budget.tokens = tokens - move
            credit += move
        take = int(credit) if credit < most else most
        self.credit = credit - take
        return take

    def refund(self, n: int) -> None:
        """``n`` granted bytes were not moved."""
        if n > 0:
            budget = self.budget
            budget.tokens = min(budget.capacity, budget.refill() + n)

    def first_turn(self) -> None:
        """Before this end's first read: when the budget is in debt, or
        other ends wait their turn, it waits too. A new session must not
        read on a budget its predecessors overdrew (one read each, then
        closed: a rate escaped by sessions that end one after another)."""
        budget = self.budget
        if budget.waiting or (budget.tokens < 0 and budget.refill() < 0):
            self._hold()

    def detach(self) -> None:
        """This side reads no more: leave the queue, give back what was handed
        to it, and stop the budget's timer if nobody else waits. Idempotent."""
        if self.holder is not None:
            self.holder = None
            self.budget._release(self)

    def _hold(self) -> None:
        if self.waiting or self.holder is None:
            return
        self.waiting = True
        budget = self.budget
        budget.waiting.append(self)
        self.holder.throttle_hold()
        budget._schedule()
