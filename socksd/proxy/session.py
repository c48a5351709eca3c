"""A client's session: its handshake (per SOCKS version), the request it makes
(CONNECT, BIND or UDP ASSOCIATE: :mod:`socksd.proxy.commands`), the relay,
and its record at the end. The listener that builds it
(:mod:`socksd.proxy.listener`) hands it everything it needs as a
:class:`~socksd.proxy.host.SessionHost`; who the client is and whether it
is let in is :mod:`socksd.proxy.admission`'s."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.protocols.policies import TimeoutMixin

from socksd import protection, relay
from socksd.auth import ANONYMOUS, User
from socksd.auth.methods import Established
from socksd.protection import SecurityLayer
from socksd.proxy.admission import Admission
from socksd.proxy.client_rules import ClientRules
from socksd.proxy.commands import Commands
from socksd.proxy.host import SessionHost
from socksd.proxy.record import SessionRecord
from socksd.proxy.relaying import ClientEnd, Relaying
from socksd.proxy.socks4 import Socks4Handshake
from socksd.proxy.socks5 import Socks5Handshake
from socksd.proxy.udp import UDPRelay
from socksd.stats import STATS
from socksd.stream import PLAIN_TCP
from socksd.wire import WireError, socks4, socks5

# More than this many bytes before the relay starts and we stop reading:
# every handshake message is a few hundred bytes, so only a client pipelining
# data ahead of the reply gets here, and it waits for the relay's flow control.
MAX_HANDSHAKE_BUFFER = 65536


# What a client that is not a SOCKS client tends to open with: an HTTP
# method's first letter (CONNECT, DELETE, GET, HEAD, OPTIONS, PATCH, POST,
# PUT, TRACE), a TLS record (a ClientHello).
_HTTP_FIRST = frozenset(b"CDGHOPT")
_TLS_HANDSHAKE = 0x16


def _not_socks(version: int) -> str:
    """What the session line says of a first byte that is no SOCKS version."""
    if version in _HTTP_FIRST:
        return "not SOCKS (looks like HTTP)"
    if version == _TLS_HANDSHAKE:
        return "not SOCKS (looks like TLS)"
    return f"unsupported SOCKS version {version}"


class Session(Admission, ClientEnd, TimeoutMixin, Commands):
    """The client's side of a session, from first byte to its record; the
    owner (:class:`~socksd.proxy.handshake.RequestOwner`) of its handshake."""

    # Per-session state starts as these class defaults; an instance stores
    # only what a session changes, which keeps idle sessions small.
    handler: Socks4Handshake | Socks5Handshake | None = None
    version = 5
    socks4a = False       # a SOCKS4 request that named its destination (4a)
    relaying: Relaying | None = None    # from the last reply on
    pending: defer.Deferred | None = None
    asked: ClientRules | None = None    # the request's rules, once it made one
    user: User = ANONYMOUS
    claimed_user: str | None = None
    method = "-"
    command = "-"
    destination = "-"
    outcome: str | None = None
    detail = ""
    buffered = 0
    eof_pending = False
    udp: UDPRelay | None = None
    layer: SecurityLayer | None = None   # GSS-API protection under the session (UDP uses it)
    ended = False
    via: str | None = None    # the upstream the request went through
    judge_again = False   # a recheck_on_reload came before the relay started

    def __init__(self, server: SessionHost) -> None:
        self.server = server
        self.started = server.reactor.seconds()

    def callLater(self, period, func):
        return self.server.reactor.callLater(period, func)

    @property
    def reactor(self) -> Any:
        return self.server.reactor

    @property
    def stall_timeout(self) -> float:
        return self.server.limits.stall_timeout

    # Connection life.

    def connectionMade(self) -> None:
        self.admit()
        if self.outcome is None:
            self.setTimeout(self.server.limits.handshake_timeout or None)

    def dataReceived(self, data: bytes) -> None:
        if self.relaying is not None:
            self.relay_data(data)
            return
        if self.outcome is not None or self.udp is not None:
            return  # failed already and closing, or a UDP association's control
                    # connection, which carries nothing
        if self.handler is None:
            self.handler = self._handshake(data[0])
            if self.handler is None:
                return
        self.buffered += len(data)
        if self.buffered > MAX_HANDSHAKE_BUFFER:
            self.transport.pauseProducing()
        self.handler.data_received(data)

    def _handshake(self, version: int) -> Socks4Handshake | Socks5Handshake | None:
        """The handshake for the version byte the client opened with."""
        server = self.server
        if type(self.transport) not in PLAIN_TCP and not self.known():
            return None
        if version == socks5.VERSION:
            return Socks5Handshake(self, server.choose_method, server.reactor,
                                   self.started + server.limits.handshake_timeout)
        if version == socks4.VERSION:
            self.version = 4
            if server.socks4.enabled:
                return Socks4Handshake(self, server.socks4, server.reactor)
            self.transport.write(socks4.encode_reply(socks4.REJECTED))
            self.fail("bad request", "SOCKS4 is disabled ([socks4] enabled = false)")
            return None
        self.fail("bad request", _not_socks(version))
        return None

    def readConnectionLost(self) -> None:
        if self.relaying is None and self.pending is not None:
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
        if self.relaying is not None:
            relay.RelayEnd.connectionLost(self, reason)
            return
        self.closed = True
        if self.outcome is None and self.udp is None:
            self.outcome = "client closed"
            self.detail = ("while waiting for the BIND connection"
                           if self.command == "bind" else "during handshake")
        self._cancel()
        self.relay_done()

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
        if self.relaying is not None:
            self.relaying.abort("idle timeout", f"{self.timeOut:g} s")
            return
        # A graceful close: what _cancel() says (a GSS-API abort) must be
        # sent, and a handshake leaves little to flush.
        self.outcome, self.detail = "handshake timeout", f"{self.timeOut:g} s"
        self._cancel()
        self.transport.loseConnection()

    def relay_outcome(self, outcome: str, detail: str) -> None:
        if self.outcome is None:
            self.outcome, self.detail = outcome, detail

    # RequestOwner: called by the version's handshake.

    def note(self, *, method: str | None = None, command: str | None = None,
             detail: str | None = None) -> None:
        if method is not None:
            self.method = method
        if command is not None:
            self.command = command
        if detail is not None:
            self.detail = detail

    def fail(self, outcome: str, detail: str = "", abort: bool = False) -> None:
        if self.outcome is None:
            self.outcome, self.detail = outcome, detail
        self._cancel()
        self.setTimeout(None)
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def authenticated(self, method: str, avatar: User,
                      established: Established | None = None) -> None:
        self.method = method
        self.user = avatar
        if established is not None:
            # GSS-API integrity/confidentiality: a wrapper slipped under the
            # session wraps what it writes and unwraps what it reads.
            self.layer = protection.start(self, established.context, established.level,
                                          established.require_sequence).layer

    def authentication_failed(self, method: str, user: str | None, reason: str) -> None:
        self.method = method
        self.claimed_user = user
        self.fail("auth failed", reason)

    def start_relay(self, outbound: relay.RelayEnd, reply: bytes, early: bytes = b"") -> None:
        relay.send(self.transport, reply)
        STATS.handshake.observe(self.server.reactor.seconds() - self.started)
        self.pending = None
        self.handler = None
        limits = self.server.limits
        self.setTimeout(limits.idle_timeout or None)
        if early:
            self.received += len(early)
            relay.send(outbound.transport, early)
        # Through an upstream (socksd.proxy.chain): the line names it.
        self.via = getattr(outbound, "via", None)
        self.relaying = relaying = Relaying(self, outbound)
        lease = self.asked.budgets(self.server.reactor) if self.asked is not None else None
        if lease is None:
            relaying.start(limits.idle_timeout, limits.splice)
        else:
            relaying.start(limits.idle_timeout, limits.splice, lease.up, lease.down)
            if early and self.meter is not None:
                self.meter.spent(len(early))   # sent ahead of the relay, counted now
        registry, name = self.server.registry, self.user.name
        # Only a user who proved who they are (password, Kerberos, a client
        # identd that confirmed the USERID): the identd vouches for this name
        # to the world, so a SOCKS4 USERID taken on trust must not reach it.
        # Not one through an upstream: it is the upstream's own connection
        # to us, and the upstream must not learn the client's name from us.
        if registry is not None and self.user.verified and name and self.via is None:
            relaying.register(registry, name)
        if self.judge_again:
            # A reload came during the handshake: judged as the open ones were.
            self.recheck(self.server.current())
        if self.eof_pending:
            relay.RelayEnd.readConnectionLost(self)
        elif self.buffered > MAX_HANDSHAKE_BUFFER:
            self.transport.resumeProducing()

    def moved(self) -> tuple[int, int]:
        """Bytes relayed so far, up and down: the record's at the end, and
        what a scrape of the metrics sees while the session lasts."""
        if self.udp is not None:
            return self.udp.counts["bytes_up"], self.udp.counts["bytes_down"]
        if self.relaying is None:
            return self.received, 0
        return self.relaying.moved()

    def recheck(self, serving: SessionHost) -> None:
        """``recheck_on_reload``: a session past its request is judged again
        under the rules served now, and closed if they deny it. One still in
        its handshake or request finishes under the rules it started with,
        and is judged when its relay starts. A BIND is not: its request was
        decided on the host it named, its peer as a "bindreply", and the
        relay alone cannot be decided as either."""
        if self.outcome is not None or self.command == "bind":
            return
        if self.relaying is None and self.udp is None:
            self.judge_again = True
        elif self.relaying is not None:
            self.relaying.recheck(self.rules_under(serving.rules), self.command, self.destination)
        elif self.udp is not None:
            why = self.udp.denied_by(self.rules_under(serving.rules))
            if why is not None:
                self.fail("denied after reload", why)

    def shut_down(self, why: str) -> None:
        """The process stops and waits for this session no longer: closed
        now, at whatever stage, with outcome ``shutdown`` (unless it was
        ending already for a reason of its own). Aborted, not closed
        gracefully: a client that reads nothing must not hold the stop."""
        if self.relaying is not None:
            self.relaying.abort("shutdown", why)
        elif self.udp is not None:
            self.relay_outcome("shutdown", why)
            self.udp.stop()
            self.transport.abortConnection()
        else:
            # In its handshake, its request, or waiting for the BIND peer.
            self.fail("shutdown", why, abort=True)

    def relay_done(self) -> None:
        """The end, relayed or not: the counts, and the session's record."""
        if self.ended:
            return
        self.ended = True
        self.setTimeout(None)
        self.release()
        if self.asked is not None:
            self.asked.release()
        # The relay's last reference back to us goes: the session is freed at
        # once, not at the garbage collector's next pass.
        relaying, self.relaying = self.relaying, None
        up, down = relaying.moved() if relaying is not None else self.moved()
        detail = self.detail
        if self.udp is not None:
            detail = (f"{detail}; " if detail else "") + self.udp.summary()
        if self.quiet:
            return     # said otherwise, or only counted
        server = self.server
        server.record(SessionRecord(
            server.worker, self.peer, self.version, self.socks4a,
            self.user.name or self.claimed_user or "-",
            self.user.verified, self.method, self.command, self.destination, up, down,
            server.reactor.seconds() - self.started, self.outcome or "ok", detail,
            relaying is not None and relaying.splicer is not None, self.via))

