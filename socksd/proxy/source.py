"""Where outgoing connections and a UDP relay's destination side leave from:
``[server] source`` and ``source_select``, for one configuration. The
round-robin turn lives here, in the object every session of a listener's
configuration shares (the settings themselves are in the frozen Limits)."""

from __future__ import annotations

import itertools
import socket
from functools import partial
from typing import Any, Sequence

from socksd.proxy.connect import NoSource, SourceChoice, family_of
from socksd.rules import parse_ip

SELECTS = ("first", "round-robin", "same-as-listener")
FAMILY_NAMES: dict[int, str] = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}


class Sources:
    """The configured source addresses by family, and how one is chosen.

    ``described`` names the setting in failure details (a rule's own source
    can name itself)."""

    __slots__ = ("addresses", "by_family", "select", "turns", "described")

    def __init__(self, addresses: Sequence[str], select: str = "first",
                 described: str = "[server] source") -> None:
        if select not in SELECTS:
            raise ValueError(f"{select!r} is not one of {', '.join(SELECTS)}")
        self.addresses = tuple(str(parse_ip(a)) for a in addresses)
        self.by_family: dict[int, list[str]] = {
            family: [a for a in self.addresses if family_of(a) == family]
            for family in FAMILY_NAMES}
        self.select = select
        self.turns: dict[int, itertools.count] = {
            family: itertools.count() for family in FAMILY_NAMES}
        self.described = described

    @property
    def same_as_listener(self) -> bool:
        return self.select == "same-as-listener"

    def for_session(self, local: Any) -> SourceChoice | None:
        """The choice for one session whose socket's own end is ``local``
        (an address object; a UNIX socket has no host); None: the kernel's."""
        if self.same_as_listener:
            host = getattr(local, "host", None)
            if host:
                return partial(self._same, str(parse_ip(host)))
        return self.choose if self.addresses else None

    def choose(self, family: int) -> str:
        """A configured address of ``family``; NoSource if none is."""
        candidates = self.by_family[family]
        if not candidates:
            raise NoSource(f"no source address of {FAMILY_NAMES[family]} family: "
                           f"{self.described} = {list(self.addresses)}")
        if self.select != "round-robin" or len(candidates) == 1:
            return candidates[0]
        return candidates[next(self.turns[family]) % len(candidates)]

    def _same(self, listener: str, family: int) -> str:
        """same-as-listener: the address the client reached; for the other
        family, the first configured address of that family."""
        if family_of(listener) == family:
            return listener
        candidates = self.by_family[family]
        if not candidates:
            raise NoSource(f"no source address of {FAMILY_NAMES[family]} family: the client "
                           f"reached {listener} (source_select = \"same-as-listener\") and "
                           f"{self.described} = {list(self.addresses)}")
        return candidates[0]

    def for_relay(self, interface: str) -> str | None:
        """Where a UDP relay on ``interface`` sends to destinations from:
        None for the relay socket itself (no source, or same-as-listener,
        which the relay socket already is), else a configured address of
        the relay's family, or failing that of the other."""
        if self.same_as_listener or not self.addresses:
            return None
        family: int = family_of(interface)
        if not self.by_family[family]:
            family = socket.AF_INET6 if family == socket.AF_INET else socket.AF_INET
        chosen = self.choose(family)
        return None if chosen == str(parse_ip(interface)) else chosen
