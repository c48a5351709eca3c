"""UDP ASSOCIATE: a UDP relay for one SOCKS5 client.

Datagrams from the client (its address only) carry the SOCKS UDP header;
each destination is checked against the rules (command "udp"), names are
resolved off the reactor, and both are cached briefly. Answers come back
only from destinations the client has sent to, checked as "udpreply", and
are wrapped in a header naming their source.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

from twisted.internet import error
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from socksd import throttle
from socksd.client.socks5 import Association
from socksd.escape import escape
from socksd.protection import SecurityLayer
from socksd.proxy import connect
from socksd.proxy.bind import candidate_ports
from socksd.proxy.client_rules import ClientRules
from socksd.proxy.limits import Limits
from socksd.proxy.source import Sources
from socksd.rules import Decision, parse_ip
from socksd.wire import WireError, socks5

log = Logger(namespace="socksd")

CACHE_SIZE = 256
NAME_TTL = 60.0


class _Cache(OrderedDict):
    """A small LRU map."""

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > CACHE_SIZE:
            self.popitem(last=False)


class _Destinations(DatagramProtocol):
    """The socket facing the destinations when it is not the relay socket
    (a source address is configured): what arrives goes to the relay."""

    noisy = False

    def __init__(self, relay: UDPRelay) -> None:
        self.relay = relay

    def datagramReceived(self, data: bytes, addr) -> None:
        self.relay.from_destination(data, addr)


class UDPRelay(DatagramProtocol):
    noisy = False

    def __init__(self, reactor: Any, limits: Limits, rules: ClientRules, host: str, port: int,
                 activity: Callable[[], None], layer: SecurityLayer | None = None) -> None:
        self.reactor = reactor
        self.limits = limits
        self.rules = rules
        self.activity = activity    # a datagram of the association's: it is alive
        self.layer = layer          # GSS-API protection: every datagram is wrapped
        self.client_ip = str(rules.client)
        # Where the client said it will send from; 0s: not known yet.
        self.expected_port = port
        if host not in ("0.0.0.0", "::") and str(parse_ip(host)) != self.client_ip:
            log.info("{peer} udp: the request names {host}, not the client's own address; "
                     "datagrams are taken from the client's address only",
                     peer=escape(rules.peer, spaces=True), host=escape(host))
        self.client_addr: tuple[str, int] | None = None
        self.decisions: _Cache = _Cache()     # (ip, port, command) -> allowed
        self.names: _Cache = _Cache()         # name -> (expires, address we send to, or None)
        self.peers: _Cache = _Cache()         # destinations the client sent to
        self.port: IListeningPort | None = None
        # With a source address: the socket facing the destinations, and
        # the protocol whose transport sends from it; else (None) the relay
        # socket does both.
        self.outside: IListeningPort | None = None
        self.sender: _Destinations | None = None
        self.ipv6 = False     # the sending socket's family: it sends to that family only
        self.counts = {"up": 0, "down": 0, "dropped": 0, "fragments": 0, "bytes_up": 0,
                       "bytes_down": 0}
        self.stopped = False
        self.lookups_refused = False
        # The rule's rate (what the client sends, what comes back): a
        # datagram over budget is dropped, never queued.
        self.up: throttle.Budget | None = None
        self.down: throttle.Budget | None = None
        # Through an upstream (a rule's via): the association socksd holds
        # with it carries the datagrams both ways, and its name for the line.
        self.association: Association | None = None
        self.via: str | None = None
        # What binds the association (its rule's rate, upstreams, source): a
        # datagram another rule allows goes only if that rule binds alike.
        self.governs = rules.governing.governs if rules.governing is not None else None

    def listen(self, local, ranges, sources: Sources | None = None) -> tuple[str, int]:
        """Bind the relay socket (the client's side) on ``local``'s address,
        or on udp_advertise when that is one of this host's: where the reply
        sends the client. With a source address (``sources``) a second
        socket, on it, faces the destinations. Returns the relay socket's
        address; raises ConnectFailed."""
        reactor = self.reactor
        limits = self.limits
        if limits.udp_advertise is not None and limits.udp_advertise_local:
            interface = limits.udp_advertise
        else:
            interface = getattr(local, "host", "127.0.0.1")
        self.ipv6 = ":" in interface     # as Twisted's udp.Port chooses its family
        outside = None if sources is None else sources.for_relay(interface)
        for port in candidate_ports(ranges):
            try:
                # The largest header (a 255-byte name) is 262 bytes; one byte
                # more tells an oversized datagram from one recvfrom() cut.
                listening = reactor.listenUDP(port, self, interface=interface,
                                              maxPacketSize=self.max_datagram + 263)
                break
            except error.CannotListenError:
                continue
        else:
            raise connect.ConnectFailed(connect.FAILED, "no free port in udp_ports")
        self.port = listening
        if outside is not None:
            destinations = _Destinations(self)
            try:
                # One byte over max_datagram tells an oversized answer from
                # one recvfrom() cut.
                self.outside = reactor.listenUDP(0, destinations, interface=outside,
                                                 maxPacketSize=self.max_datagram + 1)
            except error.CannotListenError as e:
                self.stop()
                raise connect.ConnectFailed(
                    connect.NETWORK_UNREACHABLE,
                    f"cannot bind the source address {outside}: {e.socketError}") from None
            self.sender = destinations
            self.ipv6 = ":" in outside
        return interface, listening.getHost().port

    @property
    def max_datagram(self) -> int:
        return self.limits.max_datagram

    def denied_by(self, rules: ClientRules) -> str | None:
        """recheck_on_reload: why ``rules`` deny the association now, or None,
        and the datagrams from now on are decided by them."""
        rule = rules.could_allow("udp")
        if rule is None:
            return "no rule allows udp"
        rules.governing = rule
        self.governs = rule.governs
        self.rules = rules
        self.decisions.clear()
        self.names.clear()
        return None

    def summary(self) -> str:
        """What the association carried, for the end of the session line."""
        counts = self.counts
        return (f"datagrams up={counts['up']} down={counts['down']} "
                f"dropped={counts['dropped']} fragments={counts['fragments']}")

    def through(self, association: Association, via: str) -> None:
        """From now on datagrams go to the destinations through an
        upstream's association, and come back from it."""
        self.association, self.via = association, via

    def from_upstream(self, host: str, port: int, data: bytes) -> None:
        """A datagram the upstream relayed back to us. The upstream decides
        who may answer through it; the "udpreply" rules still apply here."""
        if self.stopped:
            return
        try:
            source = str(parse_ip(host))
        except ValueError:
            self.counts["dropped"] += 1     # answers come from addresses
            return
        self._from_peer(data, source, port)
        self.activity()

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        for port in (self.port, self.outside):
            if port is not None:
                port.stopListening()
        self.port = self.outside = None
        self.sender = None
        association, self.association = self.association, None
        if association is not None:
            association.close()

    def datagramReceived(self, data: bytes, addr) -> None:
        if self.stopped:
            return
        host, port = addr[0], addr[1]
        try:
            source = str(parse_ip(host))
        except ValueError:
            self.counts["dropped"] += 1
            return
        if source == self.client_ip and (self.client_addr is None or
                                         self.client_addr == (host, port)) and \
                (not self.expected_port or port == self.expected_port):
            self._from_client(data, (host, port))
        elif (source, port) in self.peers and self.outside is None:
            self._from_peer(data, source, port)
        else:
            self.counts["dropped"] += 1   # a stranger: does not keep the association alive
            return
        self.activity()

    def _from_client(self, data: bytes, addr) -> None:
        layer = self.layer
        try:
            if layer is not None:
                # Under GSS-API protection each datagram, header included, is
                # one encapsulated frame (RFC 1961 section 6).
                data = layer.unwrap_datagram(data)
            datagram = socks5.parse_udp(data)
        except WireError:
            self.counts["dropped"] += 1
            return
        # The client's port is fixed by its first datagram that is one: any
        # socket on the client's host could send garbage first and take the
        # association (and, under GSS-API, one that cannot unwrap is not the
        # client at all).
        self.client_addr = addr
        if datagram.frag:
            # Reassembly is optional in RFC 1928 and we don't do it.
            self.counts["fragments"] += 1
            return
        if len(datagram.data) > self.max_datagram:
            self.counts["dropped"] += 1
            return
        if self.association is not None and datagram.atyp == socks5.ATYP_DOMAIN and \
                not self.rules_resolve_here():
            self._send_name_upstream(datagram)
        elif datagram.atyp == socks5.ATYP_DOMAIN:
            self._send_to_name(datagram)
        else:
            self._send(datagram.data, datagram.host, datagram.port, None)

    def rules_resolve_here(self) -> bool:
        """Does the rule that admitted the association resolve names here
        before they go upstream (resolve = "local")?"""
        rule = self.rules.governing
        return rule is not None and rule.via_local

    def _send_name_upstream(self, datagram: socks5.Datagram) -> None:
        """A name the upstream resolves: judged by name alone (a rule that
        needs its address denies it: nothing is looked up here), then sent."""
        name, port = datagram.host, datagram.port
        key = ("udp", None, port, name)
        allowed = self.decisions.get(key)
        if allowed is None:
            decision = self.rules.decide_name("udp", port, name) or \
                self.rules.name_upstream("udp", port, name)
            allowed = decision is not None and self._governed(decision)
            if allowed and decision is not None:
                self.rules.note(decision, "udp", name, port)
            self.decisions.put(key, allowed)
        if not allowed or not port:
            self.counts["dropped"] += 1
            return
        self._upstream_send(datagram.data, name, port)

    def _upstream_send(self, data: bytes, host: str, port: int) -> None:
        association = self.association
        assert association is not None
        up = self.up
        if up is not None and not up.admit(len(data)):
            self.counts["dropped"] += 1
            return
        if not association.send(data, host, port):
            self.counts["dropped"] += 1
            return
        self.counts["up"] += 1
        self.counts["bytes_up"] += len(data)

    def _send_to_name(self, datagram: socks5.Datagram) -> None:
        reactor = self.reactor
        name, port = datagram.host, datagram.port
        cached = self.names.get(name)
        if cached is not None and cached[0] > reactor.seconds():
            self._send(datagram.data, cached[1], port, name)
            return
        if not port or not self._name_allowed(name, port):
            # Denied by name: dropped without a lookup (as for CONNECT).
            self.counts["dropped"] += 1
            return
        d = connect.resolve(reactor, name, port, self.limits.connect_timeout,
                            self.rules.client_key)

        def resolved(hosts):
            # A datagram has one try, so it goes to the first address the
            # relay socket can reach: with localhost as ::1 and 127.0.0.1,
            # an IPv4 relay sends to 127.0.0.1 whatever the resolver's order.
            usable = [host for host in hosts if (":" in host) == self.ipv6]
            first = usable[0] if usable else None
            self.names.put(name, (reactor.seconds() + NAME_TTL, first))
            if not self.stopped:
                self._send(datagram.data, first, port, name)

        def failed(failure):
            self.counts["dropped"] += 1
            if failure.check(connect.TooManyLookups) and not self.lookups_refused:
                self.lookups_refused = True   # once per association, not per datagram
                log.info("{peer} udp: {detail_text}; datagrams to names are dropped "
                         "meanwhile", peer=escape(self.rules.peer, spaces=True),
                         detail_text=escape(failure.value.detail), detail=failure.value.detail)

        d.addCallbacks(resolved, failed)

    def _name_allowed(self, name: str, port: int) -> bool:
        """False when the rules deny "udp" to name whatever its addresses."""
        key = ("udp", None, port, name)
        allowed = self.decisions.get(key)
        if allowed is None:
            decision = self.rules.decide_name("udp", port, name)
            # An allow is noted (and re-decided) per address, in _allowed().
            allowed = decision is None or self._governed(decision)
            self.decisions.put(key, allowed)
        return allowed

    def _allowed(self, command: str, ip: str, port: int, name: str | None) -> bool:
        key = (command, ip, port, name)
        allowed = self.decisions.get(key)
        if allowed is None:
            decision = self.rules.decide(command, port, name, parse_ip(ip))
            allowed = decision.allowed if command == "udpreply" else self._governed(decision)
            if allowed:   # once per address while it is remembered, not per datagram
                self.rules.note(decision, command, name or ip, port)
            self.decisions.put(key, allowed)
        return allowed

    def from_destination(self, data: bytes, addr) -> None:
        """A datagram on the destinations' socket (with a source address):
        only from a destination the client sent to."""
        if self.stopped:
            return
        try:
            source = str(parse_ip(addr[0]))
        except ValueError:
            self.counts["dropped"] += 1
            return
        if (source, addr[1]) not in self.peers:
            self.counts["dropped"] += 1   # a stranger: does not keep the association alive
            return
        self._from_peer(data, source, addr[1])
        self.activity()

    def _send(self, data: bytes, ip: str | None, port: int, name: str | None) -> None:
        sender = self.sender
        transport = self.transport if sender is None else sender.transport   # None once stopped
        if transport is None or ip is None or not port or \
                not self._allowed("udp", ip, port, name):
            self.counts["dropped"] += 1
            return
        if self.association is not None:
            self._upstream_send(data, ip, port)
            return
        up = self.up
        if up is not None and not up.admit(len(data)):
            self.counts["dropped"] += 1
            return
        try:
            transport.write(data, (ip, port))
        except (OSError, ValueError, error.MessageLengthError):
            # e.g. an IPv6 destination on an IPv4 relay socket (InvalidAddressError)
            self.counts["dropped"] += 1
            return
        self.peers.put((str(parse_ip(ip)), port), True)
        self.counts["up"] += 1
        self.counts["bytes_up"] += len(data)

    def _governed(self, decision: Decision) -> bool:
        """Allowed, by a rule that binds the datagram as the association is
        bound (its rate, upstreams, source): else its limits or its
        upstream would be escaped through another rule's association."""
        return decision.allowed and decision.rule is not None and \
            decision.rule.governs == self.governs

    def _from_peer(self, data: bytes, ip: str, port: int) -> None:
        transport = self.transport
        if transport is None or self.client_addr is None or len(data) > self.max_datagram or \
                not self._allowed("udpreply", ip, port, None):
            self.counts["dropped"] += 1
            return
        down = self.down
        if down is not None and not down.admit(len(data)):
            self.counts["dropped"] += 1
            return
        wrapped = socks5.encode_udp(ip, port, data)
        try:
            if self.layer is not None:
                wrapped = self.layer.wrap_datagram(wrapped)
            transport.write(wrapped, self.client_addr)
        except (OSError, ValueError, error.MessageLengthError):
            # With its header the answer no longer fits in one datagram.
            self.counts["dropped"] += 1
            return
        self.counts["down"] += 1
        self.counts["bytes_down"] += len(data)
