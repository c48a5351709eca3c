"""A client's request carried out, once its handshake is over: the rules
asked for this client and user (:class:`ClientRules`), then the outgoing
connection (CONNECT), the listener (BIND) or the relay socket (UDP ASSOCIATE).
Every failure is a :class:`~socksd.proxy.connect.ConnectFailed`, which each
SOCKS version turns into its reply."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from twisted.internet import defer
from twisted.python.failure import Failure

from socksd.client.upstream import Upstream
from socksd.protection import SecurityLayer
from socksd.proxy import chain, connect
from socksd.proxy.bind import BindWaiter, Listening
from socksd.proxy.client_rules import ClientRules
from socksd.proxy.connect import ConnectFailed
from socksd.proxy.limits import Limits
from socksd.proxy.source import Sources
from socksd.proxy.udp import UDPRelay
from socksd.rules import Rule, parse_ip
from socksd.stats import STATS


def open_connection(reactor: Any, limits: Limits, rules: ClientRules, host: str, port: int,
                    by_name: bool, source: connect.SourceChoice | None = None,
                    upstreams: Mapping[str, Upstream] | None = None,
                    ) -> defer.Deferred[connect.Outbound]:
    """CONNECT: the first allowed address of host that connects in time,
    leaving from where ``source`` says (None: the kernel's choice); or,
    when the rule that allows it says ``via``, through its upstreams."""
    timeout = limits.connect_timeout
    requested = reactor.seconds()
    deadline = requested + timeout
    d: defer.Deferred[connect.Outbound]
    if by_name:
        d = rules.destinations(reactor, "connect", host, port, by_name, timeout).addCallback(
            _connect, rules, reactor, host, port, deadline, source, upstreams)
    else:
        # An address: decided and connected at once, the common case.
        denied = rules.refuse_address("connect", host, port)
        if denied:
            d = defer.fail(denied)
        else:
            waiting = rules.admit()
            d = _connect([host], rules, reactor, host, port, deadline, source, upstreams) \
                if waiting is None else waiting.addCallback(
                    lambda _: _connect([host], rules, reactor, host, port, deadline, source,
                                       upstreams))
    return d.addCallbacks(_connected, _classify, callbackArgs=(reactor, requested))


def _connect(hosts: list[str], rules: ClientRules, reactor: Any, host: str, port: int,
             deadline: float, source: connect.SourceChoice | None,
             upstreams: Mapping[str, Upstream] | None) -> defer.Deferred[connect.Outbound]:
    """Connect to ``hosts`` (host's allowed addresses; none when the rule's
    upstreams get the name unresolved) directly or via the rule's upstreams."""
    rule = rules.governing
    if rule is None or not rule.via:
        return connect.connect_first(hosts, reactor, port, deadline,
                                     _rule_source(rule, source))
    chosen = chain.upstreams_for(rule.via, upstreams or {}, "connect")
    return chain.connect_via(reactor, chosen, host, hosts, port, deadline)


def sources_for(rule: Rule | None, sources: Sources | None) -> Sources | None:
    """Where a UDP relay under ``rule`` sends from: the rule's own source
    before [server] source."""
    if rule is None or rule.source is None:
        return sources
    return Sources((rule.source,), described=f"{rule.label} source")


def _rule_source(rule: Rule | None, source: connect.SourceChoice | None,
                 ) -> connect.SourceChoice | None:
    """A rule's own ``source`` before [server] source."""
    own = sources_for(rule, None)
    return source if own is None else own.choose


def _connected(outbound: connect.Outbound, reactor: Any, requested: float) -> connect.Outbound:
    """The time from the request to the destination connected, counted."""
    STATS.connect.observe(reactor.seconds() - requested)
    return outbound


def listen_for(reactor: Any, limits: Limits, rules: ClientRules, host: str, port: int,
               by_name: bool, local: Any, ipv4_only: bool,
               upstreams: Mapping[str, Upstream] | None = None,
               ) -> defer.Deferred[Listening]:
    """BIND: listen (on ``local``'s address, or the route to host) for the one
    connection expected from host; port is not checked (an FTP server
    connects from port 20). Fires with the waiter once listening."""
    d = rules.destinations(reactor, "bind", host, port, by_name, limits.connect_timeout)

    def listen(hosts: list[str]) -> defer.Deferred[Listening] | Listening:
        rule = rules.governing
        if rule is not None and rule.via:
            chosen = chain.upstreams_for(rule.via, upstreams or {}, "bind")
            through: defer.Deferred[Listening] = chain.bind_via(
                reactor, chosen, rules, host, hosts, port,
                reactor.seconds() + limits.connect_timeout, limits.bind_timeout, ipv4_only)
            return through
        peers = [parse_ip(h) for h in hosts]
        if ipv4_only:
            # A SOCKS4 reply can only name an IPv4 listener.
            peers = [p for p in peers if p.version == 4]
            if not peers:
                raise ConnectFailed(connect.HOST_UNREACHABLE,
                                    f"{host} has no IPv4 address for SOCKS4")
        waiter = BindWaiter(reactor, limits, rules, peers[0])
        waiter.listen(local, limits.bind_ports)
        return waiter

    listening: defer.Deferred[Listening] = d.addCallback(listen)
    return listening.addErrback(_classify)


def admit_udp(rules: ClientRules) -> defer.Deferred[None] | None:
    """UDP ASSOCIATE's rules: some rule could allow a datagram, and the
    session is admitted under the first that could (its limits bind the
    association); as :meth:`ClientRules.admit`."""
    rule = rules.could_allow("udp")
    if rule is None:
        return defer.fail(ConnectFailed(connect.DENIED, "no rule allows udp"))
    rules.governing = rule
    return rules.admit()


def associate(reactor: Any, limits: Limits, rules: ClientRules, host: str, port: int,
              local: Any, activity: Callable[[], None],
              layer: SecurityLayer | None = None,
              sources: Sources | None = None) -> tuple[UDPRelay, tuple[str, int]]:
    """UDP ASSOCIATE, once admitted (:func:`admit_udp`): a relay socket on
    ``local``'s address (or on udp_advertise, one of this host's), for
    datagrams from host:port (0s: not known yet), sending to destinations
    from a source address if ``sources`` has one; raises ConnectFailed. The
    reply names udp_advertise if set."""
    relay = UDPRelay(reactor, limits, rules, host, port, activity, layer)
    bound = relay.listen(local, limits.udp_ports, sources)
    if limits.udp_advertise is not None:
        bound = (limits.udp_advertise, bound[1])
    return relay, bound


def _classify(failure: Failure):
    if failure.check(defer.CancelledError, ConnectFailed):
        return failure
    return Failure(connect.classify(failure))
