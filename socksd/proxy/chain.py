"""A session's request carried out through its rule's upstreams (``via``):
CONNECT and BIND through socksd's own client (:mod:`socksd.client.upstream`),
tried in order until one serves. An upstream that cannot serve us
(unreachable, refused, its authentication failed, no answer in time) makes
way for the next; one that answers with a failure for the destination (its
rules, the destination unreachable) ends the request with that answer, as
a direct attempt's failure would.

The client's credentials never go upstream: each upstream gets only those
in its URL."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure

from socksd.client.errors import DestinationFailed, UpstreamFailed
from socksd.client.handshake import Accepted, Bound
from socksd.client.socks5 import Association
from socksd.client.upstream import Upstream
from socksd.proxy import connect
from socksd.proxy.bind import Incoming, Listening, refused_peer
from socksd.proxy.client_rules import ClientRules
from socksd.relay import RelayEnd
from socksd.rules import parse_ip
from socksd.wire import socks5

# An upstream's failure answer (a SOCKS5 reply code) as the reason we give.
_REASONS = {socks5.NOT_ALLOWED: connect.DENIED,
            socks5.NETWORK_UNREACHABLE: connect.NETWORK_UNREACHABLE,
            socks5.HOST_UNREACHABLE: connect.HOST_UNREACHABLE,
            socks5.CONNECTION_REFUSED: connect.REFUSED,
            socks5.TTL_EXPIRED: connect.TIMEOUT}


class Chained(connect.Outbound):
    """The proxy's side of a connection through an upstream."""

    via: str | None = None      # its name, for the session's line

    def connectionMade(self) -> None:
        pass     # the upstream's handshake is over: its Deferred says so


class _Factory(ClientFactory):
    noisy = False

    def __init__(self, protocol: type[RelayEnd]) -> None:
        self.protocol = protocol


def upstreams_for(names: Sequence[str], known: Mapping[str, Upstream],
                  command: str) -> list[Upstream]:
    """The rule's upstreams that do ``command``, in order (a reload may
    have dropped one the rule's config named: it is skipped)."""
    return [known[name] for name in names if name in known and command in known[name].commands]


def target(upstream: Upstream, host: str, addresses: list[str]) -> str:
    """What ``upstream`` is asked for: the name as the client gave it, or
    (``resolve = "local"``) the first address the rules allowed."""
    return addresses[0] if upstream.resolve_locally and addresses else host


def connect_via(reactor: Any, upstreams: list[Upstream], host: str, addresses: list[str],
                port: int, deadline: float) -> defer.Deferred[connect.Outbound]:
    """CONNECT to host:port through the first of ``upstreams`` that serves
    by ``deadline`` (``addresses``: host's, allowed, if it was looked up)."""
    def attempt(upstream: Upstream, timeout: float) -> defer.Deferred[Any]:
        factory = _Factory(Chained)
        return upstream.connect(reactor, target(upstream, host, addresses), port, factory,
                                timeout).addCallback(_named, upstream)
    return _in_turn(reactor, upstreams, deadline, attempt)


def _named(protocol: Any, upstream: Upstream) -> Chained:
    assert isinstance(protocol, Chained)     # what _Factory(Chained) builds
    protocol.via = upstream.name
    return protocol


class UpstreamBind:
    """A BIND through an upstream, as the handshake sees a
    :class:`~socksd.proxy.bind.BindWaiter`: ``bound`` is where the
    upstream listens (the first reply), ``accepted`` fires with the
    connection once the upstream's second reply names the peer, which the
    rules judge as a "bindreply" as they would here."""

    def __init__(self, bound: Bound, upstream: Upstream, rules: ClientRules,
                 expected: str) -> None:
        self.bound = (bound.host, bound.port)
        self.via = upstream.name
        self.rules = rules
        self.expected = parse_ip(expected) if connect.is_address(expected) else None
        self.accepted: defer.Deferred[Incoming] = bound.accepted.addCallbacks(
            self._judged, _classified)

    def _judged(self, accepted: Accepted) -> Incoming:
        protocol = accepted.protocol
        assert isinstance(protocol, _Announced)     # what _Factory(_Announced) builds
        why = refused_peer(self.rules, self.expected, accepted.host, accepted.port)
        if why is not None:
            protocol.transport.abortConnection()
            raise connect.ConnectFailed(connect.DENIED,
                                        f"the peer {accepted.host} (via {self.via}): {why}")
        protocol.announced = (accepted.host, accepted.port)
        protocol.via = self.via
        return protocol


class _Announced(Incoming):
    """The connection a BIND through an upstream accepted: its peer is the
    one the upstream named, not the upstream itself."""

    via: str | None = None

    def connectionMade(self) -> None:
        pass


def bind_via(reactor: Any, upstreams: list[Upstream], rules: ClientRules, host: str,
             addresses: list[str], port: int, deadline: float, accept_timeout: float,
             ipv4_only: bool = False) -> defer.Deferred[Listening]:
    """BIND through the first of ``upstreams`` that listens for us by
    ``deadline``; ``ipv4_only``: the client's reply (SOCKS4) can only name
    an IPv4 listener."""
    def attempt(upstream: Upstream, timeout: float) -> defer.Deferred[Any]:
        asked = target(upstream, host, addresses)
        return upstream.bind(reactor, asked, port, _Factory(_Announced),
                             timeout, accept_timeout).addCallback(
            _listening, upstream, rules, asked, ipv4_only)
    return _in_turn(reactor, upstreams, deadline, attempt)


def _listening(bound: Bound, upstream: Upstream, rules: ClientRules, expected: str,
               ipv4_only: bool) -> UpstreamBind:
    if ipv4_only and connect.family_of(bound.host) != connect.family_of("0.0.0.0"):
        bound.accepted.cancel()
        raise UpstreamFailed(f"{upstream}: listens on {bound.host}, which a SOCKS4 reply "
                             "cannot name", socks5.GENERAL_FAILURE)
    return UpstreamBind(bound, upstream, rules, expected)


def associate_via(reactor: Any, upstreams: list[Upstream],
                  received: Callable[[str, int, bytes], None],
                  deadline: float) -> defer.Deferred[tuple[Association, str]]:
    """UDP ASSOCIATE with the first of ``upstreams`` that serves by
    ``deadline``: the association (``received`` hears each datagram coming
    back) and the upstream's name."""
    def attempt(upstream: Upstream, timeout: float) -> defer.Deferred[Any]:
        return upstream.udp_associate(reactor, received, timeout).addCallback(
            lambda association: (association, upstream.name))
    return _in_turn(reactor, upstreams, deadline, attempt)


def _in_turn(reactor: Any, upstreams: list[Upstream], deadline: float,
             attempt: Any) -> defer.Deferred[Any]:
    """``attempt(upstream, timeout)`` for each upstream in turn, until one
    serves, one answers for the destination, or ``deadline`` passes. Each
    is given an equal share of the time left (the last one all of it): an
    upstream that says nothing must not take the whole wait from the ones
    after it, while one that fails at once leaves its share to them."""
    failures: list[str] = []
    result: defer.Deferred[Any] = defer.Deferred(lambda _d: current[0].cancel())
    current: list[defer.Deferred[Any]] = []

    def next_one(remaining: list[Upstream]) -> None:
        if not remaining or reactor.seconds() >= deadline:
            said = "; ".join(failures) or "no upstream does this command"
            if not remaining and failures:
                said = f"every upstream failed: {said}"
            result.errback(connect.ConnectFailed(connect.FAILED, said))
            return
        d = attempt(remaining[0], (deadline - reactor.seconds()) / len(remaining))
        current[:] = [d]
        d.addCallbacks(done, failed, errbackArgs=(remaining[1:],))

    def done(value: Any) -> None:
        if not result.called:
            result.callback(value)

    def failed(failure: Failure, rest: list[Upstream]) -> None:
        if result.called:
            return
        if failure.check(UpstreamFailed):
            failures.append(str(failure.value))
            next_one(rest)
            return
        result.errback(_classified(failure))

    if not upstreams:
        return defer.fail(connect.ConnectFailed(connect.FAILED, "no upstream does this command"))
    next_one(upstreams)
    return result


def _classified(failure: Failure) -> Failure:
    """An upstream's answer for the destination, as our reasons say it."""
    error = failure.value
    if isinstance(error, DestinationFailed):
        return Failure(connect.ConnectFailed(_REASONS.get(error.reply or 0, connect.FAILED),
                                             str(error)))
    if failure.check(UpstreamFailed):
        return Failure(connect.ConnectFailed(connect.FAILED, str(failure.value)))
    return failure
