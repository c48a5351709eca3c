"""What the listener (:mod:`socksd.proxy.listener`) hands each session it
builds: its settings, its counters, and where the session's record goes."""

from __future__ import annotations

from typing import Any, Protocol

from socksd.auth.methods import Method
from socksd.ident.registry import ProxiedConnections
from socksd.proxy.limits import Limits
from socksd.proxy.record import SessionRecord
from socksd.proxy.socks4 import Socks4Policy
from socksd.rules import RuleSet


class SessionHost(Protocol):
    """The listener, as its sessions see it."""

    reactor: Any
    limits: Limits
    rules: RuleSet
    socks4: Socks4Policy
    registry: ProxiedConnections | None
    worker: int | None
    sessions: int               # open now (max_sessions)
    proxy_health_checks: int

    def choose_method(self, offered: bytes) -> Method | None: ...

    def count_client(self, key: str, delta: int) -> int: ...

    def trusts_proxy(self, address: Any) -> bool: ...

    def untrusted_proxy(self, address: Any) -> None: ...

    def record(self, record: SessionRecord) -> None: ...
