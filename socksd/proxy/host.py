"""What the listener (:mod:`socksd.proxy.listener`) hands each session it
builds: the configuration it serves under, the counts every session shares,
and where the session's record goes."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

from socksd.auth.methods import Method
from socksd.client.upstream import Upstream
from socksd.ident.registry import Registrar
from socksd.proxy.limits import Limits
from socksd.proxy.quotas import Quotas
from socksd.proxy.record import SessionRecord
from socksd.proxy.socks4 import Socks4Policy
from socksd.proxy.source import Sources
from socksd.rules import RuleSet


class Counts:
    """What the sessions of every configuration served so far count
    together: a reload makes a new :class:`SessionHost`, never new counts."""

    __slots__ = ("sessions", "per_client", "proxy_health_checks", "live", "when_empty",
                 "quotas")

    def __init__(self) -> None:
        self.sessions = 0               # open now (max_sessions)
        self.per_client: dict[str, int] = {}
        self.proxy_health_checks = 0
        # The sessions open now: for a reload to judge again, a stop to wait for.
        self.live: set[Any] = set()
        self.when_empty: list[Callable[[], None]] = []   # called once live empties
        self.quotas = Quotas()          # the rules' max_sessions, keyed by rule name

    def drained(self) -> None:
        """The last live session has ended: tell whoever waits for that."""
        waiting, self.when_empty = self.when_empty, []
        for call in waiting:
            call()

    def count_client(self, key: str, delta: int) -> int:
        count = self.per_client.get(key, 0) + delta
        if count > 0:
            self.per_client[key] = count
        else:
            self.per_client.pop(key, None)
        return count


class SessionHost(Protocol):
    """The listener's configuration, as a session sees it from its first
    byte to its record: a session keeps the one it started under."""

    reactor: Any
    limits: Limits
    rules: RuleSet
    sources: Sources | None     # None: outgoing sockets are the kernel's to place
    upstreams: Mapping[str, Upstream]   # [[upstreams]] by name, for the rules' via
    socks4: Socks4Policy
    registry: Registrar | None
    worker: int | None
    counts: Counts
    recheck_on_reload: bool

    def current(self) -> SessionHost:
        """The configuration new sessions get now (another after a reload)."""
        ...

    def choose_method(self, offered: bytes) -> Method | None: ...

    def trusts_proxy(self, address: Any) -> bool: ...

    def untrusted_proxy(self, address: Any) -> None: ...

    def record(self, record: SessionRecord) -> None: ...
