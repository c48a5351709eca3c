"""The access rules as one client asks them: bound to its address, user and
SOCKS version once the handshake is over. CONNECT, BIND (its listener) and
UDP ASSOCIATE (each datagram) ask through it."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from socksd.auth import User
from socksd.escape import escape
from socksd.proxy import connect
from socksd.proxy.quotas import Lease, Quotas, Ticket, describe
from socksd.rules import Decision, IPAddress, Rule, RuleSet, parse_ip
from socksd.stats import STATS

log = Logger(namespace="socksd")


class ClientRules:
    """One client's view of the rule set; also who the client is, for the
    lines its rules write and the bounds its lookups count against."""

    __slots__ = ("rules", "client", "client_key", "peer", "user", "version", "quotas",
                 "governing", "ticket", "lease")

    def __init__(self, rules: RuleSet, client: IPAddress, client_key: str | None, peer: str,
                 user: User, version: int, quotas: Quotas | None = None) -> None:
        self.rules = rules
        self.client = client
        self.client_key = client_key
        self.peer = peer
        self.user = user
        self.version = version
        self.quotas = quotas      # where a rule's max_sessions is counted (None: nowhere)
        self.governing: Rule | None = None    # the rule that allowed the request
        self.ticket: Ticket | None = None     # its place under that rule's cap
        self.lease: Lease | None = None       # its rate budgets, once relaying

    def admit(self) -> defer.Deferred[None] | None:
        """The request is allowed by ``governing``: the session takes its
        place under that rule's cap. None: admitted (no cap, the common
        case); else a Deferred that fails with a ConnectFailed (REP 0x02,
        SOCKS4 91) when the cap is reached, as it may once a worker has
        asked the supervisor."""
        rule = self.governing
        limits = rule.limits if rule is not None else None
        if limits is None or limits.max_sessions is None or self.quotas is None:
            return None
        taken = self.quotas.take(limits, self.proven_name(), self.client_key)
        if isinstance(taken, defer.Deferred):
            return taken.addCallback(self._placed, describe(limits))
        try:
            self._placed(taken, describe(limits))
        except connect.ConnectFailed as e:
            return defer.fail(e)
        return None

    def _placed(self, ticket: Ticket | None, refusal: str) -> None:
        if ticket is None:
            STATS.refused["rule_max_sessions"] += 1
            raise connect.ConnectFailed(connect.DENIED, refusal)
        if self.ticket is _RELEASED:
            ticket.release()          # the session ended while the supervisor was asked
        else:
            self.ticket = ticket

    def budgets(self, reactor: Any) -> Lease | None:
        """The rate budgets the relay draws on (the governing rule's
        ``rate``), or None: no rate."""
        rule = self.governing
        limits = rule.limits if rule is not None else None
        if limits is None or limits.rate is None or self.quotas is None:
            return None
        self.lease = lease = self.quotas.budgets.lease(reactor, limits, self.proven_name(),
                                                       self.client_key)
        return lease

    def proven_name(self) -> str | None:
        """The user a per-user cap or budget counts: a proven one only."""
        user = self.user
        return user.name if user.verified else None

    def release(self) -> None:
        """The session has ended: its place under a cap and its share of a
        rate budget are given back."""
        ticket, self.ticket = self.ticket, _RELEASED
        if ticket is not None:
            ticket.release()
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.release()

    def decide(self, command: str, port: int, name: str | None,
               address: IPAddress | None) -> Decision:
        return self.rules.decide(self.client, self.user.name, command, port, name, address,
                                 version=self.version, verified=self.user.verified)

    def decide_name(self, command: str, port: int, name: str) -> Decision | None:
        """The decision the name alone settles, or None (its addresses decide)."""
        return self.rules.decide_name(self.client, self.user.name, command, port, name,
                                      version=self.version, verified=self.user.verified)

    def name_upstream(self, command: str, port: int, name: str) -> Decision | None:
        """The decision for a name a rule sends upstream unresolved, if one does."""
        return self.rules.name_upstream(self.client, self.user.name, command, port, name,
                                        version=self.version, verified=self.user.verified)

    def could_allow(self, command: str) -> Rule | None:
        """The first rule that could allow ``command`` somewhere (UDP)."""
        return self.rules.could_allow(self.client, self.user.name, command,
                                      version=self.version, verified=self.user.verified)

    def note(self, decision: Decision, command: str, host: str, port: int) -> None:
        """One line for an allow by a rule with ``log = true``: the request,
        or (for BIND and UDP) the peer or datagram address it was about."""
        if decision.rule is not None and decision.rule.log:
            # The line shows the escaped strings; the fields a JSON line
            # takes (peer, user, destination) stay raw, as a session's do.
            user = self.user.name or "-"
            destination = connect.host_port(host, port)
            log.info("{peer_text} {user_text} {command} {destination_text} allowed by {rule}",
                     peer_text=escape(self.peer, spaces=True),
                     user_text=escape(user, spaces=True),
                     destination_text=escape(destination, spaces=True),
                     peer=self.peer, user=user, command=command, destination=destination,
                     rule=decision.reason)

    def refuse_address(self, command: str, host: str, port: int) -> connect.ConnectFailed | None:
        """Why the rules deny ``command`` to the address host:port, or None."""
        decision = self.decide(command, port, None, parse_ip(host))
        if not decision.allowed:
            return connect.ConnectFailed(connect.DENIED, decision.reason)
        self.governing = decision.rule
        self.note(decision, command, host, port)
        return None

    def destinations(self, reactor, command: str, host: str, port: int, by_name: bool,
                     timeout: float) -> defer.Deferred[list[str]]:
        """The addresses of host that the rules allow for this command,
        once the session is admitted under the rule that allows them (see
        :meth:`admit`); a name the rules deny outright is not looked up,
        nor one a rule sends upstream unresolved (no addresses: the name
        goes as it is)."""
        if not by_name:
            denied = self.refuse_address(command, host, port)
            return defer.fail(denied) if denied else self._admitted([host])
        decision = self.decide_name(command, port, host)
        if decision is not None and not decision.allowed:
            return defer.fail(connect.ConnectFailed(connect.DENIED, decision.reason))
        if decision is None:
            # Its addresses decide, unless the name goes upstream unresolved
            # (see RuleSet.name_upstream).
            decision = self.name_upstream(command, port, host)
            if decision is None:
                d = connect.resolve(reactor, host, port, timeout, self.client_key)
                return d.addCallback(self._allowed_addresses, command, host, port)
        self.governing = rule = decision.rule
        self.note(decision, command, host, port)
        if rule is not None and rule.via and not rule.via_local:
            return self._admitted([])    # the upstream gets the name: no lookup here
        # Admitted before the lookup, which a refused session never costs.
        waiting = self.admit()
        if waiting is not None:
            return waiting.addCallback(
                lambda _: connect.resolve(reactor, host, port, timeout, self.client_key))
        return connect.resolve(reactor, host, port, timeout, self.client_key)

    def _admitted(self, hosts: list[str]) -> defer.Deferred[list[str]]:
        """``hosts``, once the session is admitted (:meth:`admit`)."""
        waiting = self.admit()
        return defer.succeed(hosts) if waiting is None else \
            waiting.addCallback(lambda _: hosts)

    def _allowed_addresses(self, hosts: list[str], command: str, name: str,
                           port: int) -> defer.Deferred[list[str]]:
        """The addresses the rules allow, under one governing rule: the one
        that allowed the first. An address another rule allows is tried too
        when neither rule binds its sessions (Rule.governs); one allowed
        only by a rule with other limits is not: a session has one rate and
        one cap."""
        allowed: list[str] = []
        first_denial: Decision | None = None
        governs: tuple | None = None
        for host in hosts:
            decision = self.decide(command, port, name, parse_ip(host))
            if decision.allowed:
                rule = decision.rule
                assert rule is not None     # an allow is always a rule's
                if not allowed:
                    self.governing, governs = rule, rule.governs
                    self.note(decision, command, name, port)
                elif rule.governs != governs:
                    continue
                allowed.append(host)
            elif first_denial is None:
                first_denial = decision
        if not allowed:
            assert first_denial is not None   # resolve() fails rather than find nothing
            raise connect.ConnectFailed(connect.DENIED, f"{first_denial.reason} for {hosts[0]}")
        return self._admitted(allowed)


# A ticket given back already: one granted later goes straight back.
_RELEASED = Ticket(lambda key: None, ("", "", ""))
