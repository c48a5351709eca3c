"""The identd: RFC 1413 over any Twisted endpoint.

Each query line is answered in order. The owner lookup (sock_diag netlink,
or /proc/net/tcp*) and the policy (which may read a user's file) run in the
reactor's thread pool, so a slow disk or a big socket table never stalls
other clients. Twisted's own ``twisted.protocols.ident`` is IPv4-only and
has no limits, hence this one.
"""

from __future__ import annotations

import pwd
from collections import deque
from dataclasses import dataclass

from twisted.internet import defer, threads
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from socksd.ident import lookup
from socksd.ident.policy import Answer, IdentPolicy
from socksd.ident.registry import ProxiedConnections
from socksd.rules import parse_ip
from socksd.wire import WireError, ident

log = Logger(namespace="socksd.identd")

# Queries waiting behind the one being looked up; past this, stop reading.
MAX_PENDING = 32


@dataclass(frozen=True)
class IdentdLimits:
    idle_timeout: float = 60.0
    max_line: int = ident.MAX_LINE
    max_connections: int = 1000
    max_connections_per_client: int = 16


def _owner(policy: IdentPolicy, conn: lookup.Connection) -> Answer:
    """Blocking part of a query: the kernel lookup, the passwd entry, the policy."""
    owner = lookup.lookup(conn)
    if owner is None:
        return policy.error(ident.NO_USER, "no such connection")
    try:
        entry = pwd.getpwuid(owner.uid)
    except KeyError:
        return policy.answer(None, owner.uid, None)
    return policy.answer(entry.pw_name, owner.uid, entry.pw_dir)


def answer_query(policy: IdentPolicy, registry: ProxiedConnections | None, line: bytes,
                 local_host: str, remote_host: str, blocking=None,
                 notes: list[str] | None = None) -> defer.Deferred[bytes]:
    """The reply line for one query made to ``local_host`` from ``remote_host``.

    ``blocking`` runs the owner lookup (default: in a thread). ``notes`` gets
    how the answer was chosen ("random for alice"), for the log: that is how
    an admin maps a random or hashed reply back to the user.
    """
    notes = notes if notes is not None else []
    try:
        server_port, client_port = ident.parse_query(line)
    except WireError:
        ports = _echo_ports(line)
        answer = policy.error(ident.INVALID_PORT, "bad query")
        return defer.succeed(_encode(policy, ports, answer, notes))
    ports = (server_port, client_port)
    if registry is not None and policy.proxied_users:
        user = registry.user_for(local_host, server_port, remote_host, client_port)
        if user is not None:
            answer = policy.apply(policy.proxied_reply, user, None, "SOCKS user")
            return defer.succeed(_encode(policy, ports, answer, notes))
    conn = lookup.Connection(local_host, server_port, remote_host, client_port)
    run = blocking or threads.deferToThread
    d = defer.maybeDeferred(run, _owner, policy, conn)

    def failed(failure):
        log.failure("identd: lookup of {conn} failed", failure, conn=conn)
        return policy.error(ident.UNKNOWN_ERROR, "lookup failed")

    d.addErrback(failed)
    d.addCallback(lambda answer: _encode(policy, ports, answer, notes))
    return d


def _echo_ports(line: bytes) -> bytes:
    """What to echo as the port pair of an unparseable query: its printable
    text, bounded, without the colons that would break the reply's syntax."""
    text = bytes(c for c in line[:40] if 0x20 <= c < 0x7F and c != 0x3A).strip()
    return text or b"0, 0"


def _encode(policy: IdentPolicy, ports, answer: Answer, notes: list[str]) -> bytes:
    notes.append(answer.note)
    if isinstance(ports, bytes):
        return ports + b" : ERROR : " + answer.error.encode("ascii") + b"\r\n"
    if answer.error is not None:
        return ident.encode_error(ports[0], ports[1], answer.error)
    try:
        return ident.encode_userid(ports[0], ports[1], answer.user, policy.opsys,
                                   policy.charset)
    except (ValueError, UnicodeError):
        # A SOCKS user name is any bytes: one the charset cannot carry (or
        # with CR/LF) gets an error reply, not a broken connection.
        notes[-1] += f"; {answer.user!r} cannot be sent in {policy.charset or 'UTF-8'}"
        return ident.encode_error(ports[0], ports[1], ident.UNKNOWN_ERROR)


class IdentProtocol(Protocol, TimeoutMixin):
    """Lines end in LF or CR LF; the limit is on a line without its end.

    (Not LineOnlyReceiver: its limit counts the CR of CR LF, and it cannot
    tell a partial line that may still end in CR LF from one too long.)
    """

    def __init__(self, factory: IdentFactory) -> None:
        self.factory = factory
        self.buffer = b""
        self.pending: deque[bytes] = deque()
        self.busy = False
        self.paused = False
        self.gone = False
        self.client_key: str | None = None

    def callLater(self, period, func):
        return self.factory.reactor.callLater(period, func)

    def connectionMade(self) -> None:
        factory = self.factory
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', 'unix')}:{getattr(peer, 'port', 0)}"
        self.remote_host = str(parse_ip(peer.host)) if hasattr(peer, "host") else "127.0.0.1"
        host = self.transport.getHost()
        self.local_host = str(parse_ip(host.host)) if hasattr(host, "host") else "127.0.0.1"
        self.client_key = self.remote_host
        count = factory.per_client.get(self.client_key, 0) + 1
        factory.per_client[self.client_key] = count
        factory.connections += 1
        if count > factory.limits.max_connections_per_client:
            log.warn("identd: refused {peer}: max_connections_per_client ({limit})",
                     peer=self.peer, limit=factory.limits.max_connections_per_client)
            self.transport.loseConnection()
            return
        self.setTimeout(factory.limits.idle_timeout or None)

    def dataReceived(self, data: bytes) -> None:
        limit = self.factory.limits.max_line
        lines = (self.buffer + data).split(b"\n")
        self.buffer = lines.pop()
        for line in lines:
            if self.gone or self.transport.disconnecting:
                return  # refused or closing: nothing more is answered
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > limit:
                self.lineLengthExceeded(line)
                return
            self.lineReceived(line)
        partial = self.buffer
        if len(partial) > limit and not (len(partial) == limit + 1 and partial.endswith(b"\r")):
            self.lineLengthExceeded(partial)

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        self.pending.append(line)
        if len(self.pending) > MAX_PENDING and not self.paused:
            self.paused = True
            self.transport.pauseProducing()
        self._next()

    def _next(self) -> None:
        if self.busy or not self.pending or self.gone:
            return
        self.busy = True
        line = self.pending.popleft()
        factory = self.factory
        notes: list[str] = []
        d = answer_query(factory.policy, factory.registry, line, self.local_host,
                         self.remote_host, factory.blocking, notes)
        d.addCallback(self._answered, line, notes)

    def _answered(self, reply: bytes, line: bytes, notes: list[str]) -> None:
        self.busy = False
        if self.gone:
            return
        self.transport.write(reply)
        log.info("identd: {peer} asked {query!r}: {reply!r} ({note})", peer=self.peer,
                 query=line[:40].decode("ascii", "replace"),
                 reply=reply.rstrip(b"\r\n").decode("utf-8", "replace"),
                 note=notes[0] if notes else "")
        if self.paused and len(self.pending) <= MAX_PENDING // 2:
            self.paused = False
            self.transport.resumeProducing()
        self._next()

    def lineLengthExceeded(self, line: bytes) -> None:
        log.warn("identd: {peer} sent a line over {limit} bytes; closing",
                 peer=self.peer, limit=self.factory.limits.max_line)
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        self.transport.abortConnection()

    def connectionLost(self, reason=None) -> None:
        self.gone = True
        self.setTimeout(None)
        factory = self.factory
        factory.connections -= 1
        if self.client_key is not None:
            count = factory.per_client.get(self.client_key, 1) - 1
            if count:
                factory.per_client[self.client_key] = count
            else:
                factory.per_client.pop(self.client_key, None)


class IdentFactory(ServerFactory):
    noisy = False

    def __init__(self, policy: IdentPolicy, limits: IdentdLimits = IdentdLimits(),
                 registry: ProxiedConnections | None = None, reactor=None,
                 blocking=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.policy = policy
        self.limits = limits
        self.registry = registry
        self.blocking = blocking
        self.connections = 0
        self.per_client: dict[str, int] = {}

    def buildProtocol(self, addr):
        if self.connections >= self.limits.max_connections:
            log.warn("identd: refused {peer}: max_connections ({limit})",
                     peer=getattr(addr, "host", addr), limit=self.limits.max_connections)
            return None
        return IdentProtocol(self)
