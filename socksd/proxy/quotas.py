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

from socksd.rules import RuleLimits

# Who a key counts: the rule's key, what it counts per, and who that is.
Key = tuple[str, str, str]
ANONYMOUS = "-"    # the sessions of no user count as one user of this name


def cap_key(limits: RuleLimits, user: str | None, client: str | None) -> Key:
    """The count a session admitted under ``limits`` goes into."""
    per = limits.max_sessions_per
    who = "" if per == "rule" else (user or ANONYMOUS) if per == "user" else (client or "")
    return limits.key, per, who


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


class Asker(Protocol):
    """Where a worker's caps are kept: the supervisor, over the channel.
    ``ask`` fires True when the session may open (the supervisor counted
    it), False when the cap is reached; ``give_back`` tells it one ended."""

    def ask(self, key: Key, limit: int) -> defer.Deferred[bool]: ...

    def give_back(self, key: Key) -> None: ...


class Quotas:
    """The caps a process's sessions take: counted here, or (a worker's)
    asked of the supervisor before the session opens."""

    __slots__ = ("caps", "asker")

    def __init__(self) -> None:
        self.caps = Caps()
        self.asker: Asker | None = None     # set in a worker

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
MAX_KEY_ITEM = 2048


def key_from(items: list[object]) -> Key:
    """A key as the workers' channel carries it; ValueError if it is none."""
    if len(items) != 3 or not all(isinstance(i, str) and len(i) <= MAX_KEY_ITEM
                                  for i in items):
        raise ValueError("not a cap's key (three strings)")
    rule, per, who = items
    assert isinstance(rule, str) and isinstance(per, str) and isinstance(who, str)
    if per not in ("rule", "user", "client"):
        raise ValueError(f"a cap counted per {per[:20]!r}")
    return rule, per, who


class Holdings:
    """The supervisor's count of one worker's places under the caps (``caps``
    is every worker's): given back all at once when the worker ends, as its
    sessions did with it."""

    __slots__ = ("caps", "held")

    def __init__(self, caps: Caps) -> None:
        self.caps = caps
        self.held: dict[Key, int] = {}

    def take(self, key: Key, limit: int) -> bool:
        if not self.caps.take(key, limit):
            return False
        self.held[key] = self.held.get(key, 0) + 1
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
        self.caps.give_back(key)

    def clear(self) -> None:
        held, self.held = self.held, {}
        for key, count in held.items():
            for _ in range(count):
                self.caps.give_back(key)
