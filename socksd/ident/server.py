"""The identd: RFC 1413 over any Twisted endpoint.

Each query line is answered in order. The owner lookup (sock_diag netlink,
or /proc/net/tcp*) and the policy (which may read a user's file) run in the
reactor's thread pool, so a slow disk or a big socket table never stalls
other clients. Twisted's own ``twisted.protocols.ident`` is IPv4-only and
has no limits, hence this one.

Embedded in ``twistd socks``, the identd answers for a connection socksd
opened on a SOCKS user's behalf with that user (the registry). A server may
ask at once when it accepts the connection, before the session has
registered it (with workers, the registration crosses a process boundary):
a query about a socket of socksd's own that is not registered yet waits up
to ``proxied_wait`` seconds for it before being answered as any other.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass, replace
from typing import Any, Callable

from twisted.internet import defer, threads
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from socksd.escape import escape
from socksd.ident import lookup
from socksd.ident.policy import Answer, IdentPolicy
from socksd.ident.registry import ProxiedConnections
from socksd.logs import RateLimitedLine
from socksd.rules import client_key, parse_ip
from socksd.stats import STATS
from socksd.twisted_internals import IStreamTransport, installed_reactor
from socksd.wire import WireError, ident

# Runs the blocking owner lookup: f(*args), or a Deferred firing with it.
Blocking = Callable[..., Any]

log = Logger(namespace="socksd.identd")

# Queries waiting behind the one being looked up; past this, stop reading.
MAX_PENDING = 32

# Malformed queries (INVALID-PORT, or UNKNOWN-ERROR under unknown_error_only,
# for a line that is not "port , port") a connection may send before it is
# closed. A real RFC 1413 client never sends one; a human at telnet may
# mistype once or twice, so the first answers still teach the syntax, but
# a connection that keeps sending garbage is not a client: answering (and
# logging) every line of a 64 KiB packet of "\n" cost seconds of reactor time.
MAX_BAD_QUERIES = 3

# Lines answered in one go before the reactor gets to run other connections:
# answers that need no lookup (proxied users, bad queries) are synchronous,
# so without this one packet of queries could hold the reactor for a while.
MAX_LINES_PER_TURN = 32


@dataclass(frozen=True)
class IdentdLimits:
    idle_timeout: float = 60.0
    max_line: int = ident.MAX_LINE
    max_connections: int = 1000
    max_connections_per_client: int = 16
    ipv6_client_prefix: int = 64     # per-client limits count an IPv6 client per /64
    proxied_wait: float = 0.5        # seconds a query about socksd's own socket waits for
    #                                  its registration (proxied_users)


@dataclass(frozen=True)
class ProxiedWait:
    """How a query about one of socksd's own sockets waits for its
    registration: which sockets are socksd's (their owner's uid), how long,
    on which clock."""

    reactor: IReactorTime
    seconds: float
    uid: int


def _owner(policy: IdentPolicy, conn: lookup.Connection) -> tuple[Answer, int | None]:
    """Blocking part of a query: the kernel lookup, the passwd entry, the
    policy. Returns the answer and the socket owner's uid (None: no socket)."""
    owner = lookup.lookup(conn)
    if owner is None:
        return policy.error(ident.NO_USER, "no such connection"), None
    try:
        entry = pwd.getpwuid(owner.uid)
    except KeyError:
        return policy.answer(None, owner.uid, None), owner.uid
    return policy.answer(entry.pw_name, owner.uid, entry.pw_dir), owner.uid


def answer_query(policy: IdentPolicy, registry: ProxiedConnections | None, line: bytes,
                 local_host: str, remote_host: str, blocking: Blocking | None = None,
                 notes: list[str] | None = None,
                 wait: ProxiedWait | None = None) -> defer.Deferred[bytes]:
    """The reply line for one query made to ``local_host`` from ``remote_host``.

    ``blocking`` runs the owner lookup (default: in a thread). ``notes`` gets
    how the answer was chosen ("random for alice"), for the log: that is how
    an admin maps a random or hashed reply back to the user. ``wait``: a
    socket of socksd's own not registered (yet) waits for its registration
    (see the module docstring). Cancelling the Deferred stops the wait (the
    client left); it then fails with CancelledError.
    """
    notes = notes if notes is not None else []
    try:
        server_port, client_port = ident.parse_query(line)
    except WireError:
        answer = policy.error(ident.INVALID_PORT, "bad query")
        return defer.succeed(_encode(policy, _echo_ports(line), answer, notes))
    ports = (server_port, client_port)
    if registry is not None and policy.proxied_users:
        user = registry.user_for(local_host, server_port, remote_host, client_port)
        if user is not None:
            answer = policy.answer_proxied(user)
            return defer.succeed(_encode(policy, ports, answer, notes))
    conn = lookup.Connection(local_host, server_port, remote_host, client_port)
    run = blocking or threads.deferToThread
    d = defer.maybeDeferred(run, _owner, policy, conn)

    def failed(failure: Failure) -> tuple[Answer, int | None] | Failure:
        if failure.check(defer.CancelledError):
            return failure
        log.failure("identd: lookup of {conn} failed", failure, conn=conn)
        return policy.error(ident.UNKNOWN_ERROR, "lookup failed"), None

    def registered(owned: tuple[Answer, int | None]) -> Answer | defer.Deferred[Answer]:
        answer, uid = owned
        if (wait is None or registry is None or not policy.proxied_users
                or wait.seconds <= 0 or uid is None or uid != wait.uid):
            return answer
        user = registry.user_for(local_host, server_port, remote_host, client_port)
        if user is not None:
            return policy.answer_proxied(user)     # registered during the lookup
        try:
            waiting = registry.wait_for(local_host, server_port, remote_host, client_port)
        except ValueError:
            return answer
        started = wait.reactor.seconds()
        waiting.addTimeout(wait.seconds, wait.reactor)

        def arrived(user: str) -> Answer:
            proxied = policy.answer_proxied(user)
            return replace(proxied, note=f"{proxied.note}; registered after "
                                         f"{wait.reactor.seconds() - started:.3f} s")

        def late(failure: Failure) -> Answer | Failure:
            if failure.check(defer.TimeoutError):
                # Not a SOCKS user's after all (or not yet): as any other.
                return replace(answer, note=f"{answer.note}; socksd's socket, not "
                                            f"registered within {wait.seconds:g} s")
            return failure

        return waiting.addCallbacks(arrived, late)

    d.addErrback(failed)
    d.addCallback(registered)
    d.addCallback(lambda answer: _encode(policy, ports, answer, notes))
    return d


def _echo_ports(line: bytes) -> bytes:
    """What to echo as the port pair of an unparseable query: its printable
    text, bounded, without the colons that would break the reply's syntax."""
    text = bytes(c for c in line[:40] if 0x20 <= c < 0x7F and c != 0x3A).strip()
    return text or b"0, 0"


def _encode(policy: IdentPolicy, ports: bytes | tuple[int, int], answer: Answer,
            notes: list[str]) -> bytes:
    """The reply line; ``ports`` are an unparseable query's echo (bytes), which
    only ever gets an error."""
    notes.append(answer.note)
    if answer.error is not None:
        STATS.identd_queries[answer.error.lower()] += 1
        if isinstance(ports, bytes):
            return ports + b" : ERROR : " + answer.error.encode("ascii") + b"\r\n"
        return ident.encode_error(ports[0], ports[1], answer.error)
    assert answer.user is not None and not isinstance(ports, bytes), "a user or an error"
    try:
        line = ident.encode_userid(ports[0], ports[1], answer.user, policy.opsys,
                                   policy.charset)
    except (ValueError, UnicodeError):
        # A SOCKS user name is any bytes: one the charset cannot carry (or
        # with CR/LF) gets an error reply, not a broken connection.
        notes[-1] += f"; '{answer.user}' cannot be sent in {policy.charset or 'UTF-8'}"
        STATS.identd_queries[ident.UNKNOWN_ERROR.lower()] += 1
        return ident.encode_error(ports[0], ports[1], ident.UNKNOWN_ERROR)
    STATS.identd_queries["userid"] += 1
    return line


@implementer(IPushProducer, IHalfCloseableProtocol)
class IdentProtocol(Protocol, TimeoutMixin):
    """Lines end in LF or CR LF; the limit is on a line without its end.

    A client may half-close after its query (``nc -N``, ``shutdown(SHUT_WR)``):
    every complete query read is still answered, a last line ended by EOF
    rather than CR LF too, and then the connection closes, as oidentd does.

    (Not LineOnlyReceiver: its limit counts the CR of CR LF, and it cannot
    tell a partial line that may still end in CR LF from one too long.)

    Lines are answered one at a time, in order, straight from the read
    buffer. Reading stops (the protocol is the streaming producer of its own
    transport) while the replies' write buffer is full, while too many
    queries wait behind a lookup, and between turns of MAX_LINES_PER_TURN
    lines: memory stays bounded however fast a client sends and however
    slowly it reads.
    """

    transport: IStreamTransport

    def __init__(self, factory: IdentFactory) -> None:
        self.factory = factory
        self.buffer = b""
        self.offset = 0          # start of the first unanswered line in buffer
        self.busy = False        # a query is being answered
        self.working = False     # inside _work (a synchronous answer re-enters it)
        self.holds: set[str] = set()   # why reading is paused: writes, backlog, turn
        self.turn: IDelayedCall | None = None   # the call that starts the next turn
        self.bad = 0             # malformed queries so far
        self.first_bad = b""
        self.bad_logged = False
        self.gone = False
        self.read_eof = False    # the client half-closed: answer what is left, then close
        self.client_key: str | None = None
        self.query: defer.Deferred[Any] | None = None   # the query being answered

    def callLater(self, period: float, func: Callable[..., object], *args: object) -> IDelayedCall:
        return self.factory.reactor.callLater(period, func, *args)

    def connectionMade(self) -> None:
        factory = self.factory
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', 'unix')}:{getattr(peer, 'port', 0)}"
        remote = parse_ip(peer.host) if hasattr(peer, "host") else parse_ip("127.0.0.1")
        self.remote_host = str(remote)
        host = self.transport.getHost()
        self.local_host = str(parse_ip(host.host)) if hasattr(host, "host") else "127.0.0.1"
        self.client_key = client_key(remote, factory.limits.ipv6_client_prefix)
        count = factory.per_client.get(self.client_key, 0) + 1
        factory.per_client[self.client_key] = count
        factory.connections += 1
        if count > factory.limits.max_connections_per_client:
            factory.refused_per_client.emit(
                "identd: refused {peer}: max_connections_per_client ({limit})",
                peer=escape(self.peer, spaces=True),
                limit=factory.limits.max_connections_per_client)
            self.transport.loseConnection()
            return
        self.transport.registerProducer(self, True)
        self.setTimeout(factory.limits.idle_timeout or None)

    # IPushProducer: the transport pauses us while its write buffer is full.
    def pauseProducing(self) -> None:
        self._hold("writes")

    def resumeProducing(self) -> None:
        self._release("writes")

    def stopProducing(self) -> None:
        self.gone = True

    def _hold(self, why: str) -> None:
        if not self.holds and not self._reading_over():
            self.transport.pauseProducing()
        self.holds.add(why)

    def _release(self, why: str) -> None:
        if why not in self.holds:
            return
        self.holds.discard(why)
        if not self.holds and not self._reading_over():
            self.transport.resumeProducing()
        self._work()

    def _reading_over(self) -> bool:
        # After EOF the reactor no longer reads the socket: resuming would
        # start reading it again and deliver the same EOF a second time.
        return self.read_eof or self._closing()

    def _closing(self) -> bool:
        return self.gone or bool(self.transport.disconnecting)

    def _close(self) -> None:
        # A registered producer keeps a FileDescriptor open after
        # loseConnection (it waits for the producer to finish): let go first.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._closing():
            return  # refused or closing: nothing more is answered
        self.buffer += data
        self._work()

    # IHalfCloseableProtocol
    def readConnectionLost(self) -> None:
        """The client sent all it will: answer what was read, then close."""
        self.read_eof = True
        self._work()

    def writeConnectionLost(self) -> None:
        """Only after our own loseWriteConnection(), which we never call."""

    def _work(self) -> None:
        """Answer buffered lines until one needs a lookup, reading is held
        for writes or the turn, or no complete line is left."""
        if self.working:
            return  # a synchronous answer: the loop below goes on
        self.working = True
        try:
            self._answer_lines()
        finally:
            self.working = False

    def _answer_lines(self) -> None:
        limit = self.factory.limits.max_line
        done = 0
        while not (self.busy or self._closing() or "writes" in self.holds
                   or "turn" in self.holds):
            end = self.buffer.find(b"\n", self.offset)
            if end < 0:
                if not self.read_eof or self.offset >= len(self.buffer):
                    break
                end = len(self.buffer)     # the last line, ended by EOF, not CR LF
            if done == MAX_LINES_PER_TURN:
                self._hold("turn")
                self.turn = self.callLater(0, self._next_turn)
                break
            line = self.buffer[self.offset:end]
            self.offset = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > limit:
                self.lineLengthExceeded(line)
                return
            done += 1
            self.lineReceived(line)
        if self._closing():
            return
        if self.offset:
            self.buffer = self.buffer[self.offset:]
            self.offset = 0
        if self.read_eof:
            if not (self.busy or self.buffer):
                self._close()      # every query answered (the writes flush first)
            return
        partial = self.buffer
        if b"\n" not in partial:
            if len(partial) > limit and not (len(partial) == limit + 1
                                             and partial.endswith(b"\r")):
                self.lineLengthExceeded(partial)
            elif "backlog" in self.holds:
                self._release("backlog")
        elif (partial.count(b"\n") > MAX_PENDING
              or len(partial) > MAX_PENDING * (limit + 2)):
            self._hold("backlog")
        elif "backlog" in self.holds:
            self._release("backlog")

    def _next_turn(self) -> None:
        self.turn = None
        self._release("turn")

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        try:
            ident.parse_query(line)
            bad = False
        except WireError:
            bad = True
            self.bad += 1
            if self.bad == 1:
                self.first_bad = line
        self.busy = True
        factory = self.factory
        notes: list[str] = []
        wait = ProxiedWait(factory.reactor, factory.limits.proxied_wait,
                           factory.socksd_uid if factory.socksd_uid is not None
                           else os.geteuid())
        # Kept until answered: the client leaving cancels it (and a wait for
        # a registration with it). An answer ready at once clears it at once.
        self.query = query = answer_query(factory.policy, factory.registry, line,
                                          self.local_host, self.remote_host,
                                          factory.blocking, notes, wait)
        query.addCallback(self._answered, line, notes, bad)
        query.addErrback(lambda failure: failure.trap(defer.CancelledError))

    def _answered(self, reply: bytes, line: bytes, notes: list[str], bad: bool) -> None:
        self.busy = False
        self.query = None
        if self.gone:
            return
        self.transport.write(reply)
        if not bad:
            # The query is the client's; the reply and note may carry a
            # SOCKS user's name (proxied_users): all three are escaped.
            log.info("identd: {peer} asked '{query}': '{reply}' ({note})",
                     peer=escape(self.peer, spaces=True),
                     query=escape(line[:40].decode("utf-8", "surrogateescape")),
                     reply=escape(reply.rstrip(b"\r\n").decode("utf-8", "surrogateescape")),
                     note=escape(notes[0] if notes else ""))
        elif self.bad >= MAX_BAD_QUERIES:
            self._log_bad("; closing")
            self._close()
            return
        self._work()

    def _log_bad(self, closing: str = "") -> None:
        """Malformed queries get one line per connection, not one each."""
        if self.bad and not self.bad_logged:
            self.bad_logged = True
            log.warn("identd: {peer} sent {count} malformed quer{ies} (first '{query}')"
                     "{closing}", peer=escape(self.peer, spaces=True), count=self.bad,
                     ies="y" if self.bad == 1 else "ies",
                     query=escape(self.first_bad[:40].decode("utf-8", "surrogateescape")),
                     closing=closing)

    def lineLengthExceeded(self, line: bytes) -> None:
        log.warn("identd: {peer} sent a line over {limit} bytes; closing",
                 peer=escape(self.peer, spaces=True), limit=self.factory.limits.max_line)
        self._close()

    def timeoutConnection(self) -> None:
        log.info("identd: {peer} idle for {timeout:g} s; closing",
                 peer=escape(self.peer, spaces=True),
                 timeout=self.timeOut)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.gone = True
        self.setTimeout(None)
        if self.turn is not None and self.turn.active():
            self.turn.cancel()
        self.turn = None
        if self.query is not None:
            query, self.query = self.query, None
            query.cancel()
        self._log_bad()
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
                 registry: ProxiedConnections | None = None,
                 reactor: IReactorTime | None = None, blocking: Blocking | None = None,
                 socksd_uid: int | None = None) -> None:
        if reactor is None:
            reactor = installed_reactor()
        self.reactor = reactor
        self.policy = policy
        self.limits = limits
        self.registry = registry
        self.blocking = blocking
        # Whose sockets are socksd's own (proxied_wait): by default the uid
        # this process runs as when it answers (twistd -u has dropped root by then).
        self.socksd_uid = socksd_uid
        self.connections = 0
        self.per_client: dict[str, int] = {}
        # A flood of connections over the limits is a line, then a count a second.
        self.refused = RateLimitedLine(
            reactor, log, "identd: refused {count} more in the last second: "
                          "max_connections ({limit})")
        self.refused_per_client = RateLimitedLine(
            reactor, log, "identd: refused {count} more in the last second: "
                          "max_connections_per_client ({limit})")

    def buildProtocol(self, addr: IAddress | None) -> IdentProtocol | None:
        if self.connections >= self.limits.max_connections:
            self.refused.emit("identd: refused {peer}: max_connections ({limit})",
                              peer=escape(str(getattr(addr, "host", addr)), spaces=True),
                              limit=self.limits.max_connections)
            return None
        return IdentProtocol(self)

    def stopFactory(self) -> None:
        self.refused.flush()
        self.refused_per_client.flush()
