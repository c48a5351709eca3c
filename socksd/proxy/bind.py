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
        peer = parse_ip(addr.host)
        decision = rules.decide("bindreply", addr.port, None, peer)
        named = (decision.rule is not None and decision.rule.commands is not None
                 and "bindreply" in decision.rule.commands)
        if not decision.allowed or (peer != self.expected and not self.expected.is_unspecified
                                    and not named):
            self.knocks.emit("{peer} bind: refused incoming connection from {source}: {why}",
                             peer=escape(rules.peer, spaces=True),
                             source=escape(addr.host),
                             why=decision.reason if not decision.allowed
                             else "not the expected peer")
            return None
        rules.note(decision, "bindreply", addr.host, addr.port)
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
