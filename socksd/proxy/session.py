"""A client's session: handshake (per SOCKS version), CONNECT, relay, and the
one log line at its end. The listener's factory enforces the session limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from twisted.internet import defer, tcp
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

# Twisted's public API offers only proxyEndpoint(); the wrapper it puts under
# a haproxy: listener's protocols is what tells a PROXY connection apart.
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from socksd import relay, splice
from socksd.auth import ANONYMOUS, User, hashing
from socksd.auth import methods as auth_methods
from socksd.auth.methods import Method
from socksd.escape import escape
from socksd.ident.registry import ProxiedConnections
from socksd.logs import RateLimitedLine
from socksd.proxy import connect
from socksd.proxy.bind import BindWaiter
from socksd.proxy.socks4 import Socks4Handshake, Socks4Policy
from socksd.proxy.socks5 import Socks5Handshake
from socksd.proxy.udp import UDPRelay
from socksd.rules import IPAddress, IPNetwork, RuleSet, client_key, parse_ip
from socksd.wire import WireError, socks4, socks5

log = Logger(namespace="socksd")

# A session moves to the splice fast path once either direction has relayed
# this much: short exchanges never pay for setting it up, bulk ones soon do.
SPLICE_AFTER = 32768

# More than this many bytes before the relay starts and we stop reading:
# every handshake message is a few hundred bytes, so only a client pipelining
# data ahead of the reply gets here, and it waits for the relay's flow control.
MAX_HANDSHAKE_BUFFER = 65536


@dataclass(frozen=True)
class Limits:
    """Every wait has a timeout and every count a limit; idle_timeout 0 = never."""

    handshake_timeout: float = 30.0
    connect_timeout: float = 30.0
    idle_timeout: float = 0.0
    max_sessions: int = 10000
    max_sessions_per_client: int = 256
    splice: bool = True       # kernel fast path for plain TCP sessions (Linux)
    bind_timeout: float = 60.0                  # BIND: wait for the incoming connection
    udp_idle_timeout: float = 300.0             # UDP ASSOCIATE: end after this quiet time
    bind_ports: tuple[tuple[int, int], ...] = ((0, 0),)   # (0, 0): any free port
    udp_ports: tuple[tuple[int, int], ...] = ((0, 0),)
    max_datagram: int = 65507                   # largest UDP payload relayed
    stall_timeout: float = 300.0    # a receiver may take nothing for this long; 0 = never
    ipv6_client_prefix: int = 64    # per-client limits count an IPv6 client per /64
    # Password checks (RFC 1929 logins): threads, checks waiting or running
    # (in all, per client address), and the backoff after a failed login.
    auth_threads: int = hashing.THREADS
    auth_in_flight: int = hashing.IN_FLIGHT
    auth_in_flight_per_client: int = hashing.IN_FLIGHT_PER_CLIENT
    auth_failure_backoff: float = auth_methods.BACKOFF      # 0 = none
    auth_failure_backoff_max: float = auth_methods.BACKOFF_MAX
    auth_failure_clients: int = auth_methods.BACKOFF_CLIENTS   # addresses remembered


class SOCKSServerFactory(ServerFactory):
    """Builds a :class:`Session` per client, within the configured limits.

    The limits are counted here rather than with ``policies.WrappingFactory``
    subclasses: those wrap every protocol in another, adding a call to every
    chunk relayed, and cannot count per client behind ``haproxy:`` endpoints,
    where the real client is only known after the PROXY header.
    """

    noisy = False

    def __init__(self, methods: Sequence[Method], rules: RuleSet, limits: Limits = Limits(),
                 reactor=None, socks4: Socks4Policy = Socks4Policy(),
                 registry: ProxiedConnections | None = None,
                 trusted_proxies: Sequence[IPNetwork] = ()) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.methods = tuple(methods)
        self.rules = rules
        self.limits = limits
        self.socks4 = socks4
        self.registry = registry      # tell a same-process identd who owns outbound sockets
        self.sessions = 0
        self.per_client: dict[str, int] = {}
        self.refusals = RateLimitedLine(
            reactor, log, "{worker}refused {count} more in the last second: max_sessions "
                          "({limit}) reached")
        # Peers whose PROXY header is believed (haproxy: listeners), and what
        # was closed without a session line: PROXY LOCAL (a balancer's health
        # check) and connections from peers that are not trusted.
        self.trusted_proxies = tuple(trusted_proxies)
        self.proxy_health_checks = 0
        self.untrusted_proxies = 0
        self.untrusted = RateLimitedLine(
            reactor, log, "{worker}closed {count} more in the last second: PROXY listener, "
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
        self.refusals.emit("{worker}refused {peer}: max_sessions ({limit}) reached",
                           worker="" if WORKER is None else f"w{WORKER} ",
                           peer=escape(_address(addr), spaces=True), limit=self.limits.max_sessions)

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
        self.untrusted.emit("{worker}closed {peer}: a PROXY listener, and the peer is not in "
                            "trusted_proxies", worker="" if WORKER is None else f"w{WORKER} ",
                            peer=escape(_address(addr), spaces=True))

    def count_client(self, key: str, delta: int) -> int:
        count = self.per_client.get(key, 0) + delta
        if count > 0:
            self.per_client[key] = count
        else:
            self.per_client.pop(key, None)
        return count


def _address(addr) -> str:
    host = getattr(addr, "host", None)
    if host is None:
        return str(getattr(addr, "name", None) or "unix")
    return connect.host_port(host, addr.port)


_LOCAL = parse_ip("127.0.0.1")

# Which of `workers = N` processes this is (None: the only one), for logs.
WORKER: int | None = None


class Session(relay.RelayEnd, relay.RelaySession, TimeoutMixin):
    """The client's side of a session, from first byte to the last log line."""

    # Per-session state starts as these class defaults; an instance stores
    # only what a session changes, which keeps idle sessions small.
    handler: Socks4Handshake | Socks5Handshake | None = None
    version = 5
    outbound: connect.Outbound | None = None
    pending: defer.Deferred | None = None
    client: IPAddress = _LOCAL
    client_key: str | None = None
    peer = "-"
    user: User = ANONYMOUS
    claimed_user: str | None = None
    method = "-"
    command = "-"
    destination = "-"
    outcome: str | None = None
    detail = ""
    buffered = 0
    eof_pending = False
    registered = None
    splicer: splice.SpliceRelay | None = None
    udp: UDPRelay | None = None
    layer = None        # GSS-API protection under the session (its SecurityLayer; UDP uses it)
    ended = False
    counted = True     # in server.sessions (max_sessions)
    stall_check = None  # the pending check that a blocked receiver is draining
    drains = 0          # times a blocked receiver took all it held
    proxied: HAProxyProtocolWrapper | None = None   # under a haproxy: listener
    quiet = False       # ends without a session line (said otherwise, or counted)

    def __init__(self, server: SOCKSServerFactory) -> None:
        self.server = server
        self.started = server.reactor.seconds()

    def callLater(self, period, func):
        return self.server.reactor.callLater(period, func)

    # Connection life.

    def connectionMade(self) -> None:
        self.server.sessions += 1
        if isinstance(self.transport, HAProxyProtocolWrapper):
            # The real client is known once the PROXY header is read (the
            # first data): counting the balancer as the client now would
            # refuse a burst through it for max_sessions_per_client.
            self.proxied = self.transport
            balancer = self.transport.transport.getPeer()
            self.peer = _address(balancer)
            if not self.server.trusts_proxy(balancer):
                self.server.untrusted_proxy(balancer)
                self.quiet = True
                self.fail("untrusted proxy", abort=True)
                return
            # The wrapper passes on only what follows the header, so a header
            # alone (a health check's PROXY LOCAL) would reach us as nothing:
            # look after each of its reads.
            wrapper_read = self.transport.dataReceived

            def read(data: bytes) -> None:
                wrapper_read(data)
                if self.handler is None and self.outcome is None and self._health_check():
                    self._health_checked()

            self.transport.dataReceived = read
        else:
            self._identify_client()
        if self.outcome is None:
            self.setTimeout(self.server.limits.handshake_timeout or None)

    def _health_checked(self) -> None:
        """Closed without a session line: the factory counts these."""
        self.quiet = True
        self.server.proxy_health_checks += 1
        self.fail("health check")

    def _health_check(self) -> bool:
        """A PROXY header without a client (v2 LOCAL, v1 UNKNOWN): the
        balancer checking that we are up. Its info is private in Twisted."""
        info = getattr(self.proxied, "_proxyInfo", None)
        return info is not None and info.source is None

    def _identify_client(self) -> None:
        """Who the client is, for rules, limits and logs (called again once
        data arrives, because a PROXY header may have changed the peer)."""
        address = self.transport.getPeer()
        peer = _address(address)
        if peer == self.peer:
            return
        self.peer = peer
        host = getattr(address, "host", None)
        try:
            # UNIX-socket clients are local; rules see them as 127.0.0.1.
            self.client = parse_ip(host) if host is not None else _LOCAL
        except ValueError:
            # Twisted's PROXY v1 parser takes any word for an address.
            self.fail("bad request", "PROXY header: the source is not an IP address")
            return
        key = client_key(self.client, self.server.limits.ipv6_client_prefix)
        if self.client_key is not None:
            self.server.count_client(self.client_key, -1)
        self.client_key = key
        limit = self.server.limits.max_sessions_per_client
        if self.server.count_client(key, +1) > limit:
            # Refused: no longer one of max_sessions while it closes, or a
            # burst from one client would turn others away for that limit.
            self.server.sessions -= 1
            self.counted = False
            self.fail("refused", f"max_sessions_per_client ({limit}) reached")

    def dataReceived(self, data: bytes) -> None:
        if self.outbound is not None:
            self.relay_data(data)
            return
        if self.outcome is not None or self.udp is not None:
            return  # failed already and closing, or a UDP association's control
                    # connection, which carries nothing
        if self.handler is None:
            if self.proxied is not None and self._health_check():
                self._health_checked()
                return
            if type(self.transport) is not tcp.Server:
                # A wrapper (haproxy:) may only now know the real client; a
                # plain socket's peer was final at connectionMade.
                self._identify_client()
                if self.outcome is not None:
                    return
            if data[0] == socks5.VERSION:
                self.handler = Socks5Handshake(self)
            elif data[0] == socks4.VERSION:
                self.version = 4
                if not self.server.socks4.enabled:
                    self.transport.write(socks4.encode_reply(socks4.REJECTED))
                    self.fail("bad request", "SOCKS4 is disabled ([socks4] enabled = false)")
                    return
                self.handler = Socks4Handshake(self)
            else:
                self.fail("bad request", f"unsupported SOCKS version {data[0]}")
                return
        self.buffered += len(data)
        if self.buffered > MAX_HANDSHAKE_BUFFER:
            self.transport.pauseProducing()
        self.handler.data_received(data)

    def readConnectionLost(self) -> None:
        if self.outbound is None and self.pending is not None:
            # EOF right after the request: pass it on once connected.
            self.eof_pending = True
            return
        relay.RelayEnd.readConnectionLost(self)

    def connectionLost(self, reason=None) -> None:
        if self.layer is not None and self.outcome is None and reason is not None and \
                reason.check(WireError):
            # The protection under the session refused a frame and aborted
            # (socksd.protection.ProtectionFailed).
            self.outcome, self.detail = "gssapi", reason.getErrorMessage()
        if self.outbound is not None:
            relay.RelayEnd.connectionLost(self, reason)
            return
        self.closed = True
        if self.outcome is None and self.udp is None:
            self.outcome = "client closed"
            self.detail = ("while waiting for the BIND connection"
                           if self.command == "bind" else "during handshake")
        self._cancel()
        self.relay_ended()

    def _cancel(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.cancel()
        if self.udp is not None:
            self.udp.stop()
        if self.handler is not None:
            self.handler.cancel()

    def timeoutConnection(self) -> None:
        if self.udp is not None:
            self.outcome, self.detail = "udp idle timeout", f"{self.timeOut:g} s"
            self.udp.stop()
            self.transport.loseConnection()
            return
        if self.outbound is not None:
            self._abort_relay("idle timeout", f"{self.timeOut:g} s")
            return
        # A graceful close: what _cancel() says (a GSS-API abort) must be
        # sent, and a handshake leaves little to flush.
        self.outcome, self.detail = "handshake timeout", f"{self.timeOut:g} s"
        self._cancel()
        self.transport.loseConnection()

    def _abort_relay(self, outcome: str, detail: str) -> None:
        """End a relaying session now: the splice relay, or both transports."""
        if self.outcome is None:
            self.outcome, self.detail = outcome, detail
        if self.splicer is not None and not self.splicer.finished:
            self.splicer.abort()
        else:
            self.outbound.transport.abortConnection()
            self.transport.abortConnection()

    def fail(self, outcome: str, detail: str = "", abort: bool = False) -> None:
        """End the session before the relay; any reply was written already."""
        if self.outcome is None:
            self.outcome, self.detail = outcome, detail
        self._cancel()
        self.setTimeout(None)
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    # Called by the version's handshake.

    def authenticated(self, method: str, avatar: User, established=None) -> None:
        self.method = method
        self.user = avatar
        if established is not None:
            # GSS-API integrity/confidentiality: a wrapper slipped under the
            # session wraps what it writes and unwraps what it reads. (Imported
            # here: gssapi is loaded only where it is configured.)
            from socksd import protection

            self.layer = protection.start(self, established.context, established.level,
                                          established.require_sequence).layer

    def authentication_failed(self, method: str, user: str | None, reason: str) -> None:
        self.method = method
        self.claimed_user = user
        self.fail("auth failed", reason)

    def connect(self, host: str, port: int, by_name: bool) -> defer.Deferred:
        """Check the rules for CONNECT to host:port and open the connection."""
        self._request("connect", host, port)
        refused = self._protection_refuses("connect")
        if refused is not None:
            return defer.fail(refused)
        timeout = self.server.limits.connect_timeout
        deadline = self.server.reactor.seconds() + timeout
        if by_name:
            d = self._destinations("connect", host, port, by_name, timeout)
            d.addCallback(self._connect_first, port, deadline)
        else:
            # An address: decided and connected at once, the common case.
            denied = self._decide_address("connect", host, port)
            d = defer.fail(denied) if denied else self._connect_first([host], port, deadline)
        d.addErrback(self._classify)
        self.pending = d
        return d

    def bind(self, host: str, port: int, by_name: bool) -> defer.Deferred:
        """BIND: check the rules, listen for the one connection expected from
        host (port is not checked: an FTP server connects from port 20).
        Fires with a BindWaiter once listening."""
        self._request("bind", host, port)
        refused = self._protection_refuses("bind")
        if refused is not None:
            return defer.fail(refused)
        server = self.server
        d = self._destinations("bind", host, port, by_name, server.limits.connect_timeout)

        def listen(hosts: list[str]) -> BindWaiter:
            peers = [parse_ip(h) for h in hosts]
            if self.version == 4:
                # A SOCKS4 reply can only name an IPv4 listener.
                peers = [p for p in peers if p.version == 4]
                if not peers:
                    raise connect.ConnectFailed(connect.HOST_UNREACHABLE,
                                                f"{host} has no IPv4 address for SOCKS4")
            waiter = BindWaiter(self, peers[0])
            waiter.listen(self._socket_host(), server.limits.bind_ports)
            self.pending = waiter.accepted
            return waiter

        # pending first: listen() may run at once and replace it with the wait.
        self.pending = d
        d.addCallback(listen)
        d.addErrback(self._classify)
        return d

    def udp_associate(self, host: str, port: int) -> defer.Deferred:
        """UDP ASSOCIATE: a relay socket on the address the client reached us
        on. ``host:port`` is where the client will send from (0s: unknown)."""
        self._request("udp", host, port)
        server = self.server
        rules = server.rules
        if not rules.could_allow(self.client, self.user.name, "udp", version=self.version,
                                 verified=self.user.verified):
            return defer.fail(connect.ConnectFailed(connect.DENIED, "no rule allows udp"))
        try:
            self.udp = UDPRelay(self, host, port)
            bound = self.udp.listen(self._socket_host(), server.limits.udp_ports)
        except connect.ConnectFailed as e:
            self.udp = None
            return defer.fail(e)
        self.setTimeout(server.limits.udp_idle_timeout or None)
        return defer.succeed(bound)

    def _socket_host(self):
        """This end of the client's connection as the socket has it. Behind a
        PROXY header getHost() is the header's destination, which a client
        of the balancer does not choose and we never bind on."""
        if self.proxied is not None:
            return self.proxied.transport.getHost()
        return self.transport.getHost()

    def _request(self, command: str, host: str, port: int) -> None:
        self.command = command
        self.destination = connect.host_port(host, port)
        # The handshake is over; from here the command's own timeouts bound
        # the wait, so the client gets the proper failure reply.
        self.setTimeout(None)

    def _protection_refuses(self, command: str) -> connect.ConnectFailed | None:
        """A command the security layer's context is too weak for (REP 0x02)."""
        why = self.layer.refusal(command) if self.layer is not None else None
        return None if why is None else connect.ConnectFailed(connect.DENIED, why)

    def _destinations(self, command: str, host: str, port: int, by_name: bool,
                      timeout: float) -> defer.Deferred:
        """The addresses of host that the rules allow for this command."""
        server = self.server
        if not by_name:
            denied = self._decide_address(command, host, port)
            return defer.fail(denied) if denied else defer.succeed([host])
        decision = self.decide_name(command, port, host)
        if decision is not None and not decision.allowed:
            return defer.fail(connect.ConnectFailed(connect.DENIED, decision.reason))
        if decision is not None:
            self.note_rule(decision)
        d = connect.resolve(server.reactor, host, port, timeout, self.client_key)
        d.addCallback(self._allowed_addresses, command, host, port, decision is not None)
        return d

    def _decide_address(self, command: str, host: str, port: int) -> connect.ConnectFailed | None:
        """Why the rules deny ``command`` to the address host:port, or None."""
        decision = self.decide(command, port, None, parse_ip(host))
        if not decision.allowed:
            return connect.ConnectFailed(connect.DENIED, decision.reason)
        self.note_rule(decision)
        return None

    # The rules, asked for this session's client and user.

    def decide(self, command: str, port: int, name: str | None, address):
        return self.server.rules.decide(self.client, self.user.name, command, port, name,
                                        address, version=self.version,
                                        verified=self.user.verified)

    def decide_name(self, command: str, port: int, name: str):
        """The decision the name alone settles, or None (its addresses decide)."""
        return self.server.rules.decide_name(self.client, self.user.name, command, port, name,
                                             version=self.version, verified=self.user.verified)

    def note_rule(self, decision, command: str | None = None,
                  destination: str | None = None) -> None:
        """One line for an allow by a rule with ``log = true``: this request,
        or (for BIND and UDP) the peer or datagram address it was about."""
        if decision.rule is not None and decision.rule.log:
            log.info("{peer} {user} {command} {destination} allowed by {rule}",
                     peer=escape(self.peer, spaces=True),
                     user=escape(self.user.name or "-", spaces=True),
                     command=command or self.command,
                     destination=escape(destination or self.destination, spaces=True),
                     rule=decision.reason)

    def _allowed_addresses(self, hosts: list[str], command: str, name: str, port: int,
                           decided: bool) -> list[str]:
        if decided:
            return hosts
        allowed, first_denial = [], None
        for host in hosts:
            decision = self.decide(command, port, name, parse_ip(host))
            if decision.allowed:
                if not allowed:
                    self.note_rule(decision)
                allowed.append(host)
            elif first_denial is None:
                first_denial = decision
        if not allowed:
            raise connect.ConnectFailed(connect.DENIED, f"{first_denial.reason} for {hosts[0]}")
        return allowed

    def _connect_first(self, hosts: list[str], port: int, deadline: float,
                       last: Failure | None = None):
        """Try the addresses in resolver order until one connects."""
        remaining = deadline - self.server.reactor.seconds()
        if not hosts or remaining <= 0:
            return defer.fail(last if last is not None else
                              connect.ConnectFailed(connect.TIMEOUT, "no time left to connect"))
        d = connect.connect_tcp(self.server.reactor, hosts[0], port, remaining)

        def next_address(failure: Failure):
            if failure.check(defer.CancelledError):
                return failure
            return self._connect_first(hosts[1:], port, deadline, failure)

        return d.addErrback(next_address)

    @staticmethod
    def _classify(failure: Failure):
        if failure.check(defer.CancelledError, connect.ConnectFailed):
            return failure
        return Failure(connect.classify(failure))

    def connect_failed(self, failed: connect.ConnectFailed) -> None:
        if failed.reason == connect.DENIED:
            self.fail("denied", failed.detail)   # "rule 2 (deny)": the outcome says denied
        else:
            self.fail(f"{self.command} failed", str(failed))

    def start_relay(self, outbound: connect.Outbound, reply: bytes, early: bytes = b"") -> None:
        """Write the handshake's last reply; from then on bytes flow both
        ways, starting with ``early`` (what the client sent before it)."""
        relay.send(self.transport, reply)
        self.pending = None
        self.handler = None
        self.outbound = outbound
        idle = self.server.limits.idle_timeout
        self.setTimeout(idle or None)
        if early:
            self.received += len(early)
            relay.send(outbound.transport, early)
        relay.join(self, outbound, self, watch_activity=idle > 0)
        if self.server.limits.splice and splice.plain_tcp(self.transport, outbound.transport):
            self.splice_after = self.received + SPLICE_AFTER
            outbound.splice_after = outbound.received + SPLICE_AFTER
        registry = self.server.registry
        # Only a user who proved who they are (password, Kerberos, a client
        # identd that confirmed the USERID): the identd vouches for this name
        # to the world, so a SOCKS4 USERID taken on trust must not reach it.
        if registry is not None and self.user.verified:
            local, remote = outbound.transport.getHost(), outbound.transport.getPeer()
            self.registered = registry.add(local.host, local.port, remote.host, remote.port,
                                           self.user.name)
        if self.eof_pending:
            relay.RelayEnd.readConnectionLost(self)
        elif self.buffered > MAX_HANDSHAKE_BUFFER:
            self.transport.resumeProducing()

    # RelaySession

    def relay_activity(self) -> None:
        self.resetTimeout()

    def relay_bulk(self) -> None:
        """Move this session's bytes to the kernel (splice), if both write
        buffers can be flushed now; else look again after more bytes."""
        outbound = self.outbound
        if self.read_eof or outbound.read_eof or not splice.eligible(self.transport,
                                                                     outbound.transport):
            self.splice_after = self.received + SPLICE_AFTER
            outbound.splice_after = outbound.received + SPLICE_AFTER
            return
        self.splice_after = outbound.splice_after = 0
        self.transport.unregisterProducer()
        outbound.transport.unregisterProducer()
        self.splicer = splice.SpliceRelay(self.server.reactor, self, outbound, self)
        self.splicer.start()
        self.drains += 1   # a stall check compares pipes now, not Twisted's buffers

    def relay_blocked(self) -> None:
        timeout = self.server.limits.stall_timeout
        if timeout and self.stall_check is None and not self.ended:
            self.stall_check = self.server.reactor.callLater(
                timeout, self._check_stall, self.drains, self._held())

    def _held(self) -> tuple[int | None, ...]:
        """Bytes waiting for each receiver (None: cannot tell)."""
        if self.splicer is not None and not self.splicer.finished:
            return self.splicer.pending()
        outbound = self.outbound
        return (relay.buffered(self.transport),
                relay.buffered(outbound.transport) if outbound is not None else 0)

    def relay_drained(self) -> None:
        self.drains += 1

    def _check_stall(self, drains: int, before: tuple[int | None, ...]) -> None:
        """Every wait has a timeout: a receiver that took nothing of what it
        was sent for stall_timeout seconds (a client that stopped reading, a
        destination with a zero window) ends the session, even when
        idle_timeout is 0. One that drains, however slowly, does not."""
        self.stall_check = None
        if self.ended:
            return
        now = self._held()
        stuck = self.drains == drains and any(
            held and was is not None and held >= was
            for held, was in zip(now, before, strict=True) if held is not None)
        if stuck:
            timeout = self.server.limits.stall_timeout
            self._abort_relay("stalled", f"a receiver took nothing for {timeout:g} s")
        elif any(now):
            self.relay_blocked()   # still draining: look again later

    def relay_lost(self, why: str) -> None:
        if self.outcome is None:
            self.outcome, self.detail = "connection lost", why

    def relay_ended(self) -> None:
        if self.ended:
            return
        self.ended = True
        self.setTimeout(None)
        if self.stall_check is not None and self.stall_check.active():
            self.stall_check.cancel()
        self.stall_check = None
        server = self.server
        if self.counted:
            server.sessions -= 1
        if self.client_key is not None:
            server.count_client(self.client_key, -1)
        if self.registered is not None:
            server.registry.remove(self.registered)
        outcome = self.outcome or "ok"
        user = self.user.name or self.claimed_user or "-"
        down = 0
        outbound = self.outbound
        if outbound is not None:
            down = outbound.received
            # Break the session's reference cycles so it is freed at once,
            # not at the garbage collector's next pass.
            outbound.partner = outbound.session = outbound.factory = None
            self.partner = self.session = None
            if self.splicer is not None:
                self.splicer.session = None
        duration = server.reactor.seconds() - self.started
        if self.udp is not None:
            counts = self.udp.counts
            self.received, down = counts["bytes_up"], counts["bytes_down"]
            self.detail = (f"{self.detail}; " if self.detail else "") + (
                f"datagrams up={counts['up']} down={counts['down']} "
                f"dropped={counts['dropped']} fragments={counts['fragments']}")
        # The text is built here with one f-string and logged as a single
        # field: twisted.logger's str.format-style rendering of a dozen fields
        # was a quarter of the cost of a short session. Observers still get
        # every field for structured output, raw: what a client sent is
        # escaped in the text only.
        if self.quiet:
            return     # said otherwise, or only counted
        text = (f"{'' if WORKER is None else f'w{WORKER} '}"
                f"{escape(self.peer, spaces=True)} socks{self.version} "
                f"user={escape(user, spaces=True)} method={self.method} "
                f"{self.command} {escape(self.destination, spaces=True)} up={self.received} "
                f"down={down} {duration:.3f}s {outcome}{': ' if self.detail else ''}"
                f"{escape(self.detail)}"
                f"{' [splice]' if self.splicer is not None else ''}")
        emit = log.info if outcome == "ok" else log.warn
        emit("{session}", session=text, peer=self.peer, version=self.version, user=user,
             method=self.method, command=self.command, destination=self.destination,
             up=self.received, down=down, duration=duration, outcome=outcome,
             detail=self.detail, verified=self.user.verified,
             spliced=self.splicer is not None, worker=WORKER)
