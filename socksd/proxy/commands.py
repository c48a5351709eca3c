"""What a session does with the request its handshake parsed: CONNECT,
BIND or UDP ASSOCIATE (the :class:`~socksd.proxy.handshake.RequestOwner`'s
half that :mod:`socksd.proxy.requests` carries out), under the rules asked
for this client and user from then on."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from socksd.auth import User
from socksd.protection import SecurityLayer
from socksd.proxy import chain, requests
from socksd.proxy.bind import Listening
from socksd.proxy.client_rules import ClientRules
from socksd.proxy.connect import DENIED, ConnectFailed, host_port
from socksd.proxy.host import SessionHost
from socksd.proxy.quotas import Quotas
from socksd.proxy.udp import UDPRelay
from socksd.rules import IPAddress, RuleSet
from socksd.stats import STATS


class Commands:
    """A base of :class:`~socksd.proxy.session.Session`, which provides the
    state and the methods declared here (its other bases: the timeouts of
    TimeoutMixin, the socket's host of Admission)."""

    server: SessionHost
    started: float
    client: IPAddress
    client_key: str | None
    peer: str
    user: User
    version: int
    socks4a: bool
    command: str
    destination: str
    pending: defer.Deferred | None
    asked: ClientRules | None     # the request's rules: what admitted it, under which cap
    udp: UDPRelay | None
    layer: SecurityLayer | None
    via: str | None

    def fail(self, outcome: str, detail: str = "", abort: bool = False) -> None:
        raise NotImplementedError

    def setTimeout(self, period: float | None) -> Any:
        raise NotImplementedError

    def resetTimeout(self) -> None:
        raise NotImplementedError

    def socket_host(self) -> Any:
        raise NotImplementedError

    def connect(self, host: str, port: int, by_name: bool) -> defer.Deferred:
        rules = self._request("connect", host, port, by_name)
        refused = self._protection_refuses("connect")
        if refused is not None:
            return defer.fail(refused)
        server = self.server
        sources = server.sources
        source = None if sources is None else sources.for_session(self.socket_host())
        self.pending = d = requests.open_connection(server.reactor, server.limits, rules,
                                                    host, port, by_name, source,
                                                    server.upstreams)
        return d

    def bind(self, host: str, port: int, by_name: bool) -> defer.Deferred:
        rules = self._request("bind", host, port, by_name)
        refused = self._protection_refuses("bind")
        if refused is not None:
            return defer.fail(refused)
        server = self.server
        self.pending = d = requests.listen_for(server.reactor, server.limits, rules, host, port,
                                               by_name, self.socket_host(), self.version == 4,
                                               server.upstreams)

        def listening(waiter: Listening) -> Listening:
            self.pending = waiter.accepted    # now the wait for the peer
            # Through an upstream (chain.UpstreamBind): the line names it
            # from the first reply on, also when no peer comes.
            self.via = getattr(waiter, "via", None)
            return waiter

        return d.addCallback(listening)

    def udp_associate(self, host: str, port: int) -> defer.Deferred:
        rules = self._request("udp", host, port)
        waiting = requests.admit_udp(rules)
        if waiting is not None:
            self.pending = waiting
            return waiting.addCallback(lambda _: self._associate(rules, host, port))
        return self._associate(rules, host, port)

    def _associate(self, rules: ClientRules, host: str, port: int) -> defer.Deferred:
        self.pending = None
        server = self.server
        try:
            self.udp, bound = requests.associate(server.reactor, server.limits, rules, host,
                                                 port, self.socket_host(),
                                                 self.resetTimeout, self.layer,
                                                 requests.sources_for(rules.governing,
                                                                      server.sources))
        except ConnectFailed as e:
            return defer.fail(e)
        relay = self.udp
        lease = rules.budgets(server.reactor)
        if lease is not None:
            relay.up, relay.down = lease.up, lease.down
        rule = rules.governing
        if rule is not None and rule.via:
            # Through the rule's upstream: an association with it first,
            # which lives and dies with the client's.
            chosen = chain.upstreams_for(rule.via, server.upstreams, "udp")
            self.pending = d = chain.associate_via(
                server.reactor, chosen, relay.from_upstream,
                server.reactor.seconds() + server.limits.connect_timeout)
            return d.addCallback(self._associated, relay, bound)
        return defer.succeed(self._associated(None, relay, bound))

    def _associated(self, through: Any, relay: UDPRelay, bound: tuple[str, int],
                    ) -> tuple[str, int]:
        """The association is ready (``through``: the upstream's, if any):
        the client's reply is next."""
        self.pending = None
        server = self.server
        if through is not None:
            association, via = through
            relay.through(association, via)
            self.via = via
            association.closed.addCallback(self._upstream_closed, via)
        self.setTimeout(server.limits.udp_idle_timeout or None)
        STATS.handshake.observe(server.reactor.seconds() - self.started)   # the reply is next
        return bound

    def _upstream_closed(self, reason: object, via: str) -> None:
        """The upstream ended its association: so does the client's."""
        if self.udp is not None and not self.udp.stopped:
            self.fail("upstream closed", f"upstream {via} ended the UDP association")

    def connect_failed(self, failed: ConnectFailed) -> None:
        if failed.reason == DENIED:
            self.fail("denied", failed.detail)   # "rule 2 (deny)": the outcome says denied
        else:
            self.fail(f"{self.command} failed", str(failed))

    def _request(self, command: str, host: str, port: int,
                 by_name: bool = False) -> ClientRules:
        """The handshake is over: the request is written down, and the rules
        are asked for this client and user from here on."""
        if by_name and self.version == 4:
            self.socks4a = True
        self.command = command
        self.destination = host_port(host, port)
        # From here the command's own timeouts bound the wait, so the client
        # gets the proper failure reply.
        self.setTimeout(None)
        self.asked = asked = self.rules_under(self.server.rules, self.server.counts.quotas)
        return asked

    def rules_under(self, rules: RuleSet, quotas: Quotas | None = None) -> ClientRules:
        """``rules`` bound to this client, user and SOCKS version (and, for
        the request's, where its rule's caps are counted)."""
        return ClientRules(rules, self.client, self.client_key, self.peer, self.user,
                           self.version, quotas)

    def _protection_refuses(self, command: str) -> ConnectFailed | None:
        """A command the security layer's context is too weak for (REP 0x02)."""
        why = self.layer.refusal(command) if self.layer is not None else None
        return None if why is None else ConnectFailed(DENIED, why)
