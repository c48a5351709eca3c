"""BIND: listen for the one connection a client expects (FTP active mode),
on the address this host would use to reach the expected peer."""

from __future__ import annotations

import random
import socket
from typing import Any, Protocol

from twisted.internet import defer, error
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from socksd.escape import escape
from socksd.logs import RateLimitedLine
from socksd.proxy import connect
from socksd.proxy.client_rules import ClientRules
from socksd.proxy.limits import Limits
from socksd.relay import RelayEnd
from socksd.rules import IPAddress, parse_ip

log = Logger(namespace="socksd")

# Ports tried from a configured range before giving up.
MAX_PORT_TRIES = 64


def route_source(peer: IPAddress, fallback: str) -> str:
    """Our address on the route to ``peer`` (no packet is sent: a UDP
    socket's connect() only asks the kernel's routing table)."""
    if peer.is_unspecified:
        return fallback
    family = socket.AF_INET6 if peer.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((str(peer), 9))
            return probe.getsockname()[0]
    except OSError:
        return fallback


def candidate_ports(ranges: tuple[tuple[int, int], ...]):
    """Ports to try: 0 (any) for the range 0-0, else random ones in range."""
    for _ in range(MAX_PORT_TRIES):
        lo, hi = random.choice(ranges)
        yield 0 if hi == 0 else random.randint(max(lo, 1), hi)


def refused_peer(rules: ClientRules, expected: IPAddress | None, host: str,
                 port: int) -> str | None:
    """Why the connection from host:port that a BIND's listener (here, or an
    upstream's) accepted is refused, or None (an allow is noted). Only the
    peer the BIND named (``expected``; None or unspecified: any) is let in,
    or one a rule listing "bindreply" names."""
    peer = parse_ip(host)
    decision = rules.decide("bindreply", port, None, peer)
    if not decision.allowed:
        return decision.reason
    named = (decision.rule is not None and decision.rule.commands is not None
             and "bindreply" in decision.rule.commands)
    if expected is not None and not expected.is_unspecified and peer != expected and \
            not named:
        return "not the expected peer"
    rules.note(decision, "bindreply", host, port)
    return None


class Listening(Protocol):
    """A BIND the handshake answers: where the peer should connect (the
    first reply), and the connection once it has (the second). Here, a
    :class:`BindWaiter`; through an upstream, socksd.proxy.chain's."""

    bound: tuple[str, int]
    accepted: defer.Deferred[Incoming]


class Incoming(RelayEnd):
    """The connection that arrived at a BIND listener."""

    # Through an upstream: the peer it named (the transport's is the upstream).
    announced: tuple[str, int] | None = None

    def connectionMade(self) -> None:
        waiter, self.factory = self.factory, None
        waiter.connected(self)


class BindWaiter(ServerFactory):
    """One BIND: the listener, its timeout, and the connection it accepts."""

    noisy = False

    def __init__(self, reactor: Any, limits: Limits, rules: ClientRules,
                 expected: IPAddress) -> None:
        self.reactor = reactor
        self.limits = limits
        self.rules = rules
        self.expected = expected
        self.port: IListeningPort | None = None
        self.bound: tuple[str, int] = ("0.0.0.0", 0)
        self.timer = None
        self.taken = False
        self.accepted: defer.Deferred[Incoming] = defer.Deferred(lambda d: self.close())
        # Anyone may knock on the port while it waits: a line, then a count a second.
        self.knocks = RateLimitedLine(
            reactor, log,
            "{peer} bind: refused {count} more incoming connections in the last second")

    def listen(self, local, ranges) -> None:
        interface = route_source(self.expected, getattr(local, "host", "127.0.0.1"))
        for port in candidate_ports(ranges):
            try:
                listening = self.reactor.listenTCP(port, self, backlog=1,
                                                   interface=interface)
                break
            except error.CannotListenError:
                continue
        else:
            raise connect.ConnectFailed(connect.FAILED, "no free port in bind_ports")
        self.port = listening
        self.bound = (interface, listening.getHost().port)
        timeout = self.limits.bind_timeout
        self.timer = self.reactor.callLater(timeout, self._timed_out, timeout)

    def buildProtocol(self, addr):
        """Accept exactly one connection, from the expected peer (or one a
        "bindreply" rule names), that the rules allow."""
        if self.taken:
            return None
        rules = self.rules
        why = refused_peer(rules, self.expected, addr.host, addr.port)
        if why is not None:
            self.knocks.emit("{peer} bind: refused incoming connection from {source}: {why}",
                             peer=escape(rules.peer, spaces=True),
                             source=escape(addr.host), why=why)
            return None
        self.taken = True
        protocol = Incoming()
        protocol.factory = self
        self._stop_listening()
        return protocol

    def connected(self, incoming: Incoming) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if not self.accepted.called:
            self.accepted.callback(incoming)
        else:
            incoming.transport.abortConnection()

    def _timed_out(self, timeout: float) -> None:
        self.timer = None
        self._stop_listening()
        if not self.accepted.called:
            self.accepted.errback(connect.ConnectFailed(
                connect.TIMEOUT, f"no connection to the BIND port in {timeout:g} s"))

    def _stop_listening(self) -> None:
        self.knocks.flush()
        port, self.port = self.port, None
        if port is not None:
            port.stopListening()

    def close(self) -> None:
        """The client went away, or the BIND failed: nothing stays listening."""
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self._stop_listening()
