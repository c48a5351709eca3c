"""The SOCKS listener: the factory that builds a :class:`Session` per client
within the configured limits, and receives each session's record at its end."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from socksd.auth.methods import Method
from socksd.client.upstream import Upstream
from socksd.escape import escape
from socksd.ident.registry import Registrar
from socksd.logs import RateLimitedLine
from socksd.proxy.connect import address_text
from socksd.proxy.host import Counts
from socksd.proxy.limits import Limits
from socksd.proxy.record import SessionRecord, log_record
from socksd.proxy.session import Session
from socksd.proxy.socks4 import Socks4Policy
from socksd.proxy.source import Sources
from socksd.rules import IPNetwork, RuleSet, parse_ip
from socksd.stats import STATS

__all__ = ["Limits", "SOCKSServerFactory", "Serving"]

log = Logger(namespace="socksd")


class Serving:
    """One configuration as its sessions see it (a
    :class:`~socksd.proxy.host.SessionHost`): made once, never changed. A
    reload serves a new one; a session keeps the one it started under."""

    __slots__ = ("listener", "reactor", "methods", "rules", "limits", "socks4", "registry",
                 "trusted_proxies", "worker", "counts", "recheck_on_reload", "sources",
                 "upstreams")

    def __init__(self, listener: SOCKSServerFactory, methods: Sequence[Method], rules: RuleSet,
                 limits: Limits, socks4: Socks4Policy, registry: Registrar | None,
                 trusted_proxies: Sequence[IPNetwork], recheck_on_reload: bool = False,
                 upstreams: Mapping[str, Upstream] | None = None) -> None:
        self.listener = listener
        self.upstreams: Mapping[str, Upstream] = upstreams or {}   # what rules' via name
        self.recheck_on_reload = recheck_on_reload
        self.reactor = listener.reactor
        self.worker = listener.worker
        self.counts = listener.counts
        self.methods = tuple(methods)
        self.rules = rules
        self.limits = limits
        # Shared by this configuration's sessions: round-robin takes turns here.
        self.sources = Sources(limits.source, limits.source_select) \
            if limits.source or limits.source_select == "same-as-listener" else None
        self.socks4 = socks4
        self.registry = registry      # tell the identd who owns outbound sockets
        self.trusted_proxies = tuple(trusted_proxies)   # whose PROXY header is believed

    def current(self) -> Serving:
        return self.listener.serving

    def choose_method(self, offered: bytes) -> Method | None:
        """The first of our methods, in our preference order, that the client offers."""
        for method in self.methods:
            if method.code in offered:
                return method
        return None

    def trusts_proxy(self, address) -> bool:
        host = getattr(address, "host", None)
        if host is None:
            return False
        ip = parse_ip(host)
        return any(ip in network for network in self.trusted_proxies)

    def untrusted_proxy(self, address) -> None:
        self.listener.untrusted_proxy(address)

    def record(self, record: SessionRecord) -> None:
        """A session ended: its line, and its counts."""
        log_record(record)
        STATS.session_ended(record.version, record.command, record.outcome, record.user,
                            record.verified, record.method, record.up, record.down,
                            record.spliced)


class SOCKSServerFactory(ServerFactory):
    """Builds a :class:`Session` per client, within the configured limits,
    under the configuration it serves now (:meth:`serve` replaces it).

    The limits are counted here rather than with ``policies.WrappingFactory``
    subclasses: those wrap every protocol in another, adding a call to every
    chunk relayed, and cannot count per client behind ``haproxy:`` endpoints,
    where the real client is only known after the PROXY header.
    """

    noisy = False

    def __init__(self, methods: Sequence[Method], rules: RuleSet, limits: Limits = Limits(),
                 reactor: Any = None, socks4: Socks4Policy = Socks4Policy(),
                 registry: Registrar | None = None,
                 trusted_proxies: Sequence[IPNetwork] = (), worker: int | None = None,
                 recheck_on_reload: bool = False,
                 upstreams: Mapping[str, Upstream] | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.worker = worker          # which of `workers = N` processes (None: the only one)
        self.prefix = "" if worker is None else f"w{worker} "    # of this process's lines
        self.counts = Counts()
        self.refusals = RateLimitedLine(
            reactor, log, "{prefix}refused {count} more in the last second: max_sessions "
                          "({limit}) reached")
        # Closed without a session line: connections to a haproxy: listener
        # from peers not in trusted_proxies.
        self.untrusted = RateLimitedLine(
            reactor, log, "{prefix}closed {count} more in the last second: PROXY listener, "
                          "peers not in trusted_proxies")
        self.serving = Serving(self, methods, rules, limits, socks4, registry, trusted_proxies,
                               recheck_on_reload, upstreams)

    def serve(self, methods: Sequence[Method], rules: RuleSet, limits: Limits,
              socks4: Socks4Policy, registry: Registrar | None,
              trusted_proxies: Sequence[IPNetwork], recheck_on_reload: bool = False,
              upstreams: Mapping[str, Upstream] | None = None) -> Serving:
        """New sessions are served under this configuration from now on;
        the sessions open now keep theirs. Returns the one replaced."""
        old = self.serving
        self.serving = Serving(self, methods, rules, limits, socks4, registry, trusted_proxies,
                               recheck_on_reload, upstreams)
        return old

    # The configuration served now, and the counts, for those who look.

    @property
    def methods(self) -> tuple[Method, ...]:
        return self.serving.methods

    @property
    def limits(self) -> Limits:
        return self.serving.limits

    @property
    def rules(self) -> RuleSet:
        return self.serving.rules

    @property
    def sessions(self) -> int:
        return self.counts.sessions

    @property
    def per_client(self) -> dict[str, int]:
        return self.counts.per_client

    def recheck(self) -> None:
        """Judge every open session again under the configuration served
        now (``recheck_on_reload``); those it denies are closed."""
        for session in list(self.counts.live):
            try:
                session.recheck(self.serving)
            except Exception:
                log.failure("{prefix}judging a session again after the reload failed",
                            prefix=self.prefix)

    def drained(self) -> Deferred[None]:
        """Fires once no session is open (at once if none is): what a stop
        waits for. Fired on the reactor's next turn after the last one
        ended, once that one has written its record and been counted."""
        ended: Deferred[None] = Deferred()
        if not self.counts.live:
            ended.callback(None)
        else:
            self.counts.when_empty.append(lambda: self.reactor.callLater(0, ended.callback, None))
        return ended

    def shut_down(self, why: str) -> None:
        """Close every open session now, with outcome ``shutdown``: the
        process stops and waits for them no longer."""
        for session in list(self.counts.live):
            try:
                session.shut_down(why)
            except Exception:
                log.failure("{prefix}closing a session at the stop failed", prefix=self.prefix)

    def buildProtocol(self, addr):
        serving = self.serving
        if self.counts.sessions >= serving.limits.max_sessions:
            self._refused(addr, serving.limits.max_sessions)
            return None
        return Session(serving)

    def _refused(self, addr, limit: int) -> None:
        """One line for the first refusal, then at most one a second counting
        the rest: a flood of connections must not become a flood of log.
        (Refused before a byte is read: behind haproxy: the peer is the
        balancer, as the PROXY header is never looked at.)"""
        STATS.refused["max_sessions"] += 1
        self.refusals.emit("{prefix}refused {peer}: max_sessions ({limit}) reached",
                           prefix=self.prefix, worker=self.worker,
                           peer=escape(address_text(addr), spaces=True), limit=limit)

    def untrusted_proxy(self, addr) -> None:
        """A haproxy: listener reached by a peer whose header is not
        believed: one line, then at most one a second counting the rest."""
        STATS.refused["trusted_proxies"] += 1
        self.untrusted.emit("{prefix}closed {peer}: a PROXY listener, and the peer is not in "
                            "trusted_proxies", prefix=self.prefix, worker=self.worker,
                            peer=escape(address_text(addr), spaces=True))
