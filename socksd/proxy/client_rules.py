"""The access rules as one client asks them: bound to its address, user and
SOCKS version once the handshake is over. CONNECT, BIND (its listener) and
UDP ASSOCIATE (each datagram) ask through it."""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from socksd.auth import User
from socksd.escape import escape
from socksd.proxy import connect
from socksd.rules import Decision, IPAddress, RuleSet, parse_ip

log = Logger(namespace="socksd")


class ClientRules:
    """One client's view of the rule set; also who the client is, for the
    lines its rules write and the bounds its lookups count against."""

    __slots__ = ("rules", "client", "client_key", "peer", "user", "version")

    def __init__(self, rules: RuleSet, client: IPAddress, client_key: str | None, peer: str,
                 user: User, version: int) -> None:
        self.rules = rules
        self.client = client
        self.client_key = client_key
        self.peer = peer
        self.user = user
        self.version = version

    def decide(self, command: str, port: int, name: str | None,
               address: IPAddress | None) -> Decision:
        return self.rules.decide(self.client, self.user.name, command, port, name, address,
                                 version=self.version, verified=self.user.verified)

    def decide_name(self, command: str, port: int, name: str) -> Decision | None:
        """The decision the name alone settles, or None (its addresses decide)."""
        return self.rules.decide_name(self.client, self.user.name, command, port, name,
                                      version=self.version, verified=self.user.verified)

    def could_allow(self, command: str) -> bool:
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
        self.note(decision, command, host, port)
        return None

    def destinations(self, reactor, command: str, host: str, port: int, by_name: bool,
                     timeout: float) -> defer.Deferred[list[str]]:
        """The addresses of host that the rules allow for this command; a
        name the rules deny outright is not looked up."""
        if not by_name:
            denied = self.refuse_address(command, host, port)
            return defer.fail(denied) if denied else defer.succeed([host])
        decision = self.decide_name(command, port, host)
        if decision is not None and not decision.allowed:
            return defer.fail(connect.ConnectFailed(connect.DENIED, decision.reason))
        if decision is not None:
            self.note(decision, command, host, port)
        d = connect.resolve(reactor, host, port, timeout, self.client_key)
        if decision is None:
            d.addCallback(self._allowed_addresses, command, host, port)
        return d

    def _allowed_addresses(self, hosts: list[str], command: str, name: str,
                           port: int) -> list[str]:
        allowed: list[str] = []
        first_denial: Decision | None = None
        for host in hosts:
            decision = self.decide(command, port, name, parse_ip(host))
            if decision.allowed:
                if not allowed:
                    self.note(decision, command, name, port)
                allowed.append(host)
            elif first_denial is None:
                first_denial = decision
        if not allowed:
            assert first_denial is not None   # resolve() fails rather than find nothing
            raise connect.ConnectFailed(connect.DENIED, f"{first_denial.reason} for {hosts[0]}")
        return allowed
