"""The SOCKS listener: the factory that builds a :class:`Session` per client
within the configured limits, and receives each session's record at its end."""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from socksd.auth.methods import Method
from socksd.escape import escape
from socksd.ident.registry import ProxiedConnections
from socksd.logs import RateLimitedLine
from socksd.proxy.connect import address_text
from socksd.proxy.limits import Limits
from socksd.proxy.record import SessionRecord, log_record
from socksd.proxy.session import Session
from socksd.proxy.socks4 import Socks4Policy
from socksd.rules import IPNetwork, RuleSet, parse_ip

__all__ = ["Limits", "SOCKSServerFactory"]

log = Logger(namespace="socksd")


class SOCKSServerFactory(ServerFactory):
    """Builds a :class:`Session` per client, within the configured limits.

    The limits are counted here rather than with ``policies.WrappingFactory``
    subclasses: those wrap every protocol in another, adding a call to every
    chunk relayed, and cannot count per client behind ``haproxy:`` endpoints,
    where the real client is only known after the PROXY header.
    """

    noisy = False

    def __init__(self, methods: Sequence[Method], rules: RuleSet, limits: Limits = Limits(),
                 reactor: Any = None, socks4: Socks4Policy = Socks4Policy(),
                 registry: ProxiedConnections | None = None,
                 trusted_proxies: Sequence[IPNetwork] = (), worker: int | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.methods = tuple(methods)
        self.rules = rules
        self.limits = limits
        self.socks4 = socks4
        self.registry = registry      # tell a same-process identd who owns outbound sockets
        self.worker = worker          # which of `workers = N` processes (None: the only one)
        self.prefix = "" if worker is None else f"w{worker} "    # of this process's lines
        self.sessions = 0
        self.per_client: dict[str, int] = {}
        self.refusals = RateLimitedLine(
            reactor, log, "{prefix}refused {count} more in the last second: max_sessions "
                          "({limit}) reached")
        # Peers whose PROXY header is believed (haproxy: listeners), and what
        # was closed without a session line: PROXY LOCAL (a balancer's health
        # check) and connections from peers that are not trusted.
        self.trusted_proxies = tuple(trusted_proxies)
        self.proxy_health_checks = 0
        self.untrusted_proxies = 0
        self.untrusted = RateLimitedLine(
            reactor, log, "{prefix}closed {count} more in the last second: PROXY listener, "
                          "peers not in trusted_proxies")

    def choose_method(self, offered: bytes) -> Method | None:
        """The first of our methods, in our preference order, that the client offers."""
        for method in self.methods:
            if method.code in offered:
                return method
        return None

    def buildProtocol(self, addr):
        if self.sessions >= self.limits.max_sessions:
            self._refused(addr)
            return None
        return Session(self)

    def _refused(self, addr) -> None:
        """One line for the first refusal, then at most one a second counting
        the rest: a flood of connections must not become a flood of log.
        (Refused before a byte is read: behind haproxy: the peer is the
        balancer, as the PROXY header is never looked at.)"""
        self.refusals.emit("{prefix}refused {peer}: max_sessions ({limit}) reached",
                           prefix=self.prefix, worker=self.worker,
                           peer=escape(address_text(addr), spaces=True),
                           limit=self.limits.max_sessions)

    def trusts_proxy(self, address) -> bool:
        host = getattr(address, "host", None)
        if host is None:
            return False
        ip = parse_ip(host)
        return any(ip in network for network in self.trusted_proxies)

    def untrusted_proxy(self, addr) -> None:
        """A haproxy: listener reached by a peer whose header is not
        believed: one line, then at most one a second counting the rest."""
        self.untrusted_proxies += 1
        self.untrusted.emit("{prefix}closed {peer}: a PROXY listener, and the peer is not in "
                            "trusted_proxies", prefix=self.prefix, worker=self.worker,
                            peer=escape(address_text(addr), spaces=True))

    def count_client(self, key: str, delta: int) -> int:
        count = self.per_client.get(key, 0) + delta
        if count > 0:
            self.per_client[key] = count
        else:
            self.per_client.pop(key, None)
        return count

    def record(self, record: SessionRecord) -> None:
        """A session ended: its line."""
        log_record(record)
