"""What an allowing rule's limits (:class:`~socksd.rules.RuleLimits`) hold
its sessions to: ``max_sessions`` open at once, per rule, user or client.

The counts are the process's, kept across reloads (in
:class:`~socksd.proxy.host.Counts`), and keyed by the rule's name (its
position when it has none), what it counts per, and who: a reload that
inserts a rule leaves a named rule's counts as they were. With ``workers``
the supervisor keeps them for every worker (:class:`Asker`).
"""

from __future__ import annotations

from typing import Callable, Protocol

from twisted.internet import defer

from socksd import throttle
from socksd.channel import Malformed
from socksd.rules import RuleLimits

# Who a key counts: the rule's key, what it counts per, and who that is.
Key = tuple[str, str, str]
ANONYMOUS = "-"    # per user: no proven user, counted per client address as "- CLIENT"


def _who(per: str, user: str | None, client: str | None) -> str:
    """Who shares a count or budget. Per user, only a proven name is one
    (``user``: None for anonymous and unproven ones, whose names cost
    nothing to change): those sessions count per client address."""
    if per == "rule":
        return ""
    if per == "user" and user:
        return user
    return f"{ANONYMOUS} {client or ''}" if per == "user" else (client or "")


def cap_key(limits: RuleLimits, user: str | None, client: str | None) -> Key:
    """The count a session admitted under ``limits`` goes into."""
    per = limits.max_sessions_per
    return limits.key, per, _who(per, user, client)


def describe(limits: RuleLimits) -> str:
    """The refusal's detail: which rule, which cap."""
    per = "" if limits.max_sessions_per == "rule" else f" per {limits.max_sessions_per}"
    return f"rule {limits.key}: max_sessions ({limits.max_sessions}{per}) reached"


class Caps:
    """The sessions open now under each capped key of this process."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open: dict[Key, int] = {}

    def take(self, key: Key, limit: int) -> bool:
        """One more session under ``key``, unless ``limit`` are open."""
        count = self.open.get(key, 0)
        if count >= limit:
            return False
        self.open[key] = count + 1
        return True

    def give_back(self, key: Key) -> None:
        count = self.open.get(key, 0) - 1
        if count > 0:
            self.open[key] = count
        else:
            self.open.pop(key, None)


def rate_key(limits: RuleLimits, user: str | None, client: str | None) -> Key | None:
    """The budget a session admitted under ``limits`` draws on, if shared
    (None: ``rate_per = "session"``, a budget of its own)."""
    per = limits.rate_per
    if per == "session":
        return None
    return limits.key, per, _who(per, user, client)


class Sharing(Protocol):
    """A worker's shared budgets are split by the supervisor
    (:class:`RateShares`): it hears when a session joins or leaves one."""

    def joined(self, key: Key) -> None: ...

    def left(self, key: Key) -> None: ...


class Lease:
    """One session's pair of budgets (what the client sends, what comes
    back), given back once when it ends."""

    __slots__ = ("up", "down", "budgets", "key")

    def __init__(self, up: throttle.Budget, down: throttle.Budget,
                 budgets: Budgets | None = None, key: Key | None = None) -> None:
        self.up, self.down = up, down
        self.budgets = budgets      # shared: whose count of it goes down at the end
        self.key = key

    def release(self) -> None:
        budgets, self.budgets = self.budgets, None
        if budgets is not None and self.key is not None:
            budgets.give_back(self.key)


# Budgets no session uses are looked at again for dropping once there are
# this many: one that has not refilled yet holds its debt until it has.
PRUNE_AT = 1024


def _full(entry: list) -> bool:
    up, down = entry[0], entry[1]
    return up.refill() >= up.capacity and down.refill() >= down.capacity


class Budgets:
    """The rate budgets of this process's sessions: a pair of its own for a
    session under ``rate_per = "session"``; else the pair of its key, made
    with its first session and dropped once its last has ended and it has
    refilled. With workers, a shared pair's rate is the worker's share, set
    by the supervisor."""

    __slots__ = ("shared", "workers", "sharing", "prune_at")

    def __init__(self) -> None:
        self.shared: dict[Key, list] = {}   # key -> [up, down, sessions]
        self.workers = 1
        self.sharing: Sharing | None = None    # set in a worker
        self.prune_at = PRUNE_AT

    def lease(self, reactor: object, limits: RuleLimits, user: str | None,
              client: str | None) -> Lease:
        rate = limits.rate
        assert rate is not None
        key = rate_key(limits, user, client)
        if key is None:
            return Lease(throttle.Budget(reactor, rate), throttle.Budget(reactor, rate))
        entry = self.shared.get(key)
        if entry is None:
            if len(self.shared) >= self.prune_at:
                self._prune()
            first = rate / self.workers if self.sharing is not None else rate
            entry = self.shared[key] = [throttle.Budget(reactor, first),
                                        throttle.Budget(reactor, first), 0]
        elif self.sharing is None and entry[0].rate != rate:
            # A reload changed the rule's rate: its sessions move on at the new one.
            self.set_rate(key, rate)
        entry[2] += 1
        if self.sharing is not None:
            self.sharing.joined(key)     # the supervisor knows the rule's rate
        return Lease(entry[0], entry[1], self, key)

    def give_back(self, key: Key) -> None:
        entry = self.shared.get(key)
        if entry is None:
            return
        entry[2] -= 1
        if entry[2] <= 0 and _full(entry):
            del self.shared[key]
        # Else kept: what its sessions overdrew (a read is charged once
        # made) is owed by the next session under the key, or a rate would
        # be escaped by sessions that end one after another.
        if self.sharing is not None:
            self.sharing.left(key)

    def _prune(self) -> None:
        """Drop the budgets no session uses that have refilled."""
        for key in [key for key, entry in self.shared.items() if entry[2] <= 0 and _full(entry)]:
            del self.shared[key]
        # Looked at again once as many more have come: a scan per new key
        # would cost every session the count of budgets in use.
        self.prune_at = max(PRUNE_AT, 2 * len(self.shared))

    def set_rate(self, key: Key, rate: float) -> None:
        """The supervisor's share for this worker (or a reload's new rate)."""
        entry = self.shared.get(key)
        if entry is not None and rate > 0:
            entry[0].set_rate(rate)
            entry[1].set_rate(rate)


class Asker(Protocol):
    """Where a worker's caps are kept: the supervisor, over the channel.
    ``ask`` fires True when the session may open (the supervisor counted
    it), False when the cap is reached; ``give_back`` tells it one ended."""

    def ask(self, key: Key, limit: int) -> defer.Deferred[bool]: ...

    def give_back(self, key: Key) -> None: ...


class Quotas:
    """The caps a process's sessions take: counted here, or (a worker's)
    asked of the supervisor before the session opens."""

    __slots__ = ("caps", "asker", "budgets")

    def __init__(self) -> None:
        self.caps = Caps()
        self.asker: Asker | None = None     # set in a worker
        self.budgets = Budgets()

    def take(self, limits: RuleLimits, user: str | None,
             client: str | None) -> Ticket | None | defer.Deferred[Ticket | None]:
        """A ticket for one more session under ``limits`` (give it back when
        the session ends), or None when its cap is reached; a Deferred of
        either when the supervisor must be asked."""
        limit = limits.max_sessions
        assert limit is not None
        key = cap_key(limits, user, client)
        asker = self.asker
        if asker is None:
            return Ticket(self.caps.give_back, key) if self.caps.take(key, limit) else None
        return asker.ask(key, limit).addCallback(
            lambda granted: Ticket(asker.give_back, key) if granted else None)


class Ticket:
    """One session's place under a cap, given back once."""

    __slots__ = ("give_back", "key")

    def __init__(self, give_back: Callable[[Key], None], key: Key) -> None:
        self.give_back: Callable[[Key], None] | None = give_back
        self.key = key

    def release(self) -> None:
        give_back, self.give_back = self.give_back, None
        if give_back is not None:
            give_back(self.key)


# The longest string of a key on the workers' channel: a rule's key is at
# most 64 characters, a user name at most 255 bytes (each as \udcXX when
# not UTF-8), a client key an address and prefix.
MAX_KEY_ITEM = 1024


def key_from(kind: str, items: list[object]) -> Key:
    """A key as the workers' channel carries it in a ``kind`` message;
    Malformed (the channel breaks) if it is none."""
    if len(items) != 3 or not all(isinstance(i, str) and len(i) <= MAX_KEY_ITEM
                                  for i in items):
        raise Malformed(f"{kind}: not a cap's key (three strings)")
    rule, per, who = items
    assert isinstance(rule, str) and isinstance(per, str) and isinstance(who, str)
    if per not in ("rule", "user", "client"):
        raise Malformed(f"{kind}: a cap counted per {per[:20]!r}")
    return rule, per, who


class Holdings:
    """The supervisor's count of one worker's places under the caps (``caps``
    is every worker's): given back all at once when the worker ends, as its
    sessions did with it."""

    __slots__ = ("caps", "held", "total")

    def __init__(self, caps: Caps) -> None:
        self.caps = caps
        self.held: dict[Key, int] = {}
        self.total = 0

    def take(self, key: Key, limit: int) -> bool:
        if not self.caps.take(key, limit):
            return False
        self.held[key] = self.held.get(key, 0) + 1
        self.total += 1
        return True

    def give_back(self, key: Key) -> None:
        """One of its sessions ended (a key it holds no place under: ignored)."""
        count = self.held.get(key, 0)
        if not count:
            return
        if count > 1:
            self.held[key] = count - 1
        else:
            del self.held[key]
        self.total -= 1
        self.caps.give_back(key)

    def places(self) -> int:
        """The places it holds, under every key."""
        return self.total

    def clear(self) -> None:
        held, self.held = self.held, {}
        self.total = 0
        for key, count in held.items():
            for _ in range(count):
                self.caps.give_back(key)


class RateShares:
    """The supervisor's split of each shared rate budget (``rate_per`` user,
    client or rule) between the workers whose sessions draw on it: each
    worker's budget refills at the rate times its part of the sessions, so
    the workers' budgets add up to the rule's rate. A worker says when a
    session joins or leaves a shared budget (its first session under a key
    starts at the rate divided by the number of workers until the answer
    comes); a worker whose share changed is told its new rate."""

    __slots__ = ("send", "sessions", "rates", "given", "per_worker")

    def __init__(self, send: Callable[[int, Key, float], None]) -> None:
        self.send = send                              # (worker, key, its rate)
        self.sessions: dict[Key, dict[int, int]] = {}   # key -> worker -> sessions
        self.rates: dict[Key, float] = {}             # key -> the rule's rate, last said
        self.given: dict[tuple[Key, int], float] = {}   # the rate each worker was told
        self.per_worker: dict[int, int] = {}          # worker -> its sessions, all keys

    def joined(self, worker: int, key: Key, rate: float) -> None:
        counts = self.sessions.setdefault(key, {})
        counts[worker] = counts.get(worker, 0) + 1
        self.per_worker[worker] = self.per_worker.get(worker, 0) + 1
        self.rates[key] = rate       # a reload may have changed it
        self._split(key)

    def left(self, worker: int, key: Key) -> None:
        counts = self.sessions.get(key)
        if counts is None or not counts.get(worker):
            return      # never joined (or the worker's slate was cleared)
        counts[worker] -= 1
        self.per_worker[worker] -= 1
        if not counts[worker]:
            del counts[worker]
            self.given.pop((key, worker), None)
        self._split(key)

    def held(self, worker: int) -> int:
        """The sessions ``worker`` has under the shared budgets."""
        return self.per_worker.get(worker, 0)

    def worker_ended(self, worker: int) -> None:
        """Its sessions ended with it: the others share what it had."""
        self.per_worker.pop(worker, None)
        for key in [key for key, counts in self.sessions.items() if worker in counts]:
            del self.sessions[key][worker]
            self.given.pop((key, worker), None)
            self._split(key)

    def _split(self, key: Key) -> None:
        counts = self.sessions[key]
        if not counts:
            del self.sessions[key]
            self.rates.pop(key, None)
            return
        total = sum(counts.values())
        rate = self.rates[key]
        for worker, sessions in counts.items():
            share = rate * sessions / total
            given = self.given.get((key, worker))
            # Told again only on a change worth a message (1%).
            if given is None or abs(share - given) > given / 100:
                self.given[(key, worker)] = share
                self.send(worker, key, share)
