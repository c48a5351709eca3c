"""The SOCKS4/4a handshake: one request carrying a USERID, checked by the
configured policy (trust, whitelist, or RFC 1413 ident), then CONNECT."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.internet.defer import CancelledError

from socksd.auth import ANONYMOUS, User
from socksd.ident import client as ident_client
from socksd.wire import WireError, socks4

if TYPE_CHECKING:
    from socksd.proxy.session import Session

TRUST, WHITELIST, IDENT = "trust", "whitelist", "ident"
REFUSE = "refuse"


@dataclass(frozen=True)
class Socks4Policy:
    """How SOCKS4 USERIDs are treated (the config's ``[socks4]`` table)."""

    enabled: bool = True
    userid: str = TRUST
    whitelist: frozenset[str] = frozenset()
    allow_empty_userid: bool = True
    ident_port: int = 113
    ident_timeout: float = 10.0
    ident_fallback: str = REFUSE          # identd unusable: "refuse" (92) or "trust"
    ident_case_insensitive: bool = False


class UseridRefused(Exception):
    """The USERID did not pass; ``reply`` is the SOCKS4 code to send."""

    def __init__(self, reply: int, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply


class Socks4Handshake:
    __slots__ = ("session", "buffer", "waiting", "userid_check")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.buffer = b""
        self.waiting = False
        self.userid_check: defer.Deferred | None = None

    @property
    def transport(self):
        return self.session.transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiting:
            return  # early data, relayed once connected (the session bounds it)
        try:
            parsed = socks4.parse_request(self.buffer)
        except WireError as e:
            self.transport.write(socks4.encode_reply(socks4.REJECTED))
            self.session.fail("bad request", str(e))
            return
        if parsed is None:
            return
        request, used = parsed
        self.buffer = self.buffer[used:]
        self.waiting = True
        session = self.session
        policy = session.server.socks4
        session.method = "ident" if policy.userid == IDENT else policy.userid
        if request.command not in (socks4.CONNECT, socks4.BIND):
            session.command = f"0x{request.command:02x}"
            self.transport.write(socks4.encode_reply(socks4.REJECTED))
            session.fail("command not supported", session.command)
            return
        d = self.userid_check = self._check_userid(policy, request.userid)
        d.addCallback(self._authenticated, request)
        d.addErrback(self._refused, request.userid)

    def _check_userid(self, policy: Socks4Policy, userid: str) -> defer.Deferred:
        if not userid:
            if policy.allow_empty_userid:
                return defer.succeed(ANONYMOUS)
            return defer.fail(UseridRefused(socks4.REJECTED, "empty USERID not allowed"))
        if policy.userid == TRUST:
            return defer.succeed(User(userid, verified=False))
        if policy.userid == WHITELIST:
            if userid in policy.whitelist:
                return defer.succeed(User(userid, verified=False))
            return defer.fail(UseridRefused(socks4.REJECTED, "USERID not in whitelist"))
        return self._ask_identd(policy, userid)

    def _ask_identd(self, policy: Socks4Policy, userid: str) -> defer.Deferred:
        session = self.session
        peer = self.transport.getPeer()
        host = self.transport.getHost()
        if getattr(peer, "host", None) is None:
            return defer.fail(UseridRefused(socks4.NO_IDENTD, "client has no IP address"))
        # No bindAddress: behind a PROXY-protocol balancer getHost() is the
        # balancer's address, not ours; the route to the client picks the
        # same source address the client reached us on in every other case.
        d = ident_client.query(session.server.reactor, str(session.client), peer.port,
                               host.port, port=policy.ident_port,
                               timeout=policy.ident_timeout)

        def answered(identity: ident_client.Identity) -> User:
            said = identity.user
            same = (said.casefold() == userid.casefold() if policy.ident_case_insensitive
                    else said == userid)
            if not same:
                # Raw: the session's log line escapes its detail.
                raise UseridRefused(socks4.IDENT_MISMATCH, f"identd says '{said}'")
            return User(userid, verified=True)

        def unusable(failure):
            failure.trap(ident_client.IdentUnavailable, ident_client.IdentError)
            reason = f"identd: {failure.getErrorMessage()}"
            if policy.ident_fallback == TRUST:
                session.detail = reason
                return User(userid, verified=False)
            raise UseridRefused(socks4.NO_IDENTD, reason)

        return d.addCallbacks(answered, unusable)

    def _authenticated(self, user: User, request: socks4.Request) -> None:
        self.userid_check = None
        self.session.authenticated(self.session.method, user)
        if request.command == socks4.BIND:
            d = self.session.bind(request.host, request.port, request.by_name)
            d.addCallbacks(self._bound, self._connect_failed)
        else:
            d = self.session.connect(request.host, request.port, request.by_name)
            d.addCallbacks(self._connected, self._connect_failed)

    def _refused(self, failure, userid: str) -> None:
        self.userid_check = None
        if failure.check(CancelledError):
            return
        if not failure.check(UseridRefused):
            return failure
        self.transport.write(socks4.encode_reply(failure.value.reply))
        self.session.authentication_failed(self.session.method, userid or None,
                                           str(failure.value))

    def _connected(self, outbound) -> None:
        self._relay(outbound, outbound.transport.getHost())

    def _bound(self, waiter) -> None:
        self.transport.write(socks4.encode_reply(socks4.GRANTED, *waiter.bound))
        waiter.accepted.addCallbacks(self._bind_accepted, self._connect_failed)

    def _bind_accepted(self, incoming) -> None:
        self._relay(incoming, incoming.transport.getPeer())

    def _relay(self, end, address) -> None:
        """The last reply names ``address``; then relay, passing on what the
        client sent early."""
        early, self.buffer = self.buffer, b""
        self.session.start_relay(
            end, socks4.encode_reply(socks4.GRANTED, address.host, address.port), early)

    def _connect_failed(self, failure) -> None:
        if failure.check(CancelledError):
            return
        self.transport.write(socks4.encode_reply(socks4.REJECTED))
        self.session.connect_failed(failure.value)

    def cancel(self) -> None:
        check, self.userid_check = self.userid_check, None
        if check is not None:
            check.cancel()
