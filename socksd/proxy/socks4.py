"""The SOCKS4/4a handshake: one request carrying a USERID, checked by the
configured policy (trust, whitelist, or RFC 1413 ident), then CONNECT or
BIND, carried out by the handshake's owner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure

from socksd.auth import ANONYMOUS, User
from socksd.escape import escape
from socksd.ident import client as ident_client
from socksd.proxy import connect
from socksd.proxy.handshake import Requesting, RequestOwner
from socksd.rules import parse_ip
from socksd.stats import STATS
from socksd.twisted_internals import is_proxy_wrapper
from socksd.wire import WireError, socks4

log = Logger(namespace="socksd")

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


class Socks4Handshake(Requesting):
    __slots__ = ("policy", "reactor", "method", "waiting", "userid_check")

    def __init__(self, owner: RequestOwner, policy: Socks4Policy, reactor: Any) -> None:
        super().__init__(owner)
        self.policy = policy
        self.reactor = reactor
        self.method = "ident" if policy.userid == IDENT else policy.userid
        self.waiting = False
        self.userid_check: defer.Deferred | None = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiting:
            return  # early data, relayed once connected (the session bounds it)
        try:
            parsed = socks4.parse_request(self.buffer)
        except WireError as e:
            self.transport.write(socks4.encode_reply(socks4.REJECTED))
            self.owner.fail("bad request", str(e))
            return
        if parsed is None:
            return
        request, used = parsed
        self.buffer = self.buffer[used:]
        self.waiting = True
        owner = self.owner
        # The identd is not asked about an empty USERID (allowed or not):
        # the line must not say it was.
        if not request.userid and self.method == "ident":
            self.method = "none"
        owner.note(method=self.method)
        if request.command not in (socks4.CONNECT, socks4.BIND):
            command = f"0x{request.command:02x}"
            owner.note(command=command)
            self.transport.write(socks4.encode_reply(socks4.REJECTED))
            owner.fail("command not supported", command)
            return
        d = self.userid_check = self._check_userid(request.userid)
        d.addCallback(self._authenticated, request)
        d.addErrback(self._userid_refused, request.userid)

    def _check_userid(self, userid: str) -> defer.Deferred:
        policy = self.policy
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
        return self._ask_identd(userid)

    def _ask_identd(self, userid: str) -> defer.Deferred:
        policy = self.policy
        peer = self.transport.getPeer()
        host = self.transport.getHost()
        if getattr(peer, "host", None) is None:
            return defer.fail(UseridRefused(socks4.NO_IDENTD, "client has no IP address"))
        # The identd finds the connection by the query's addresses as well as
        # its ports: ask from the address the client reached, which the route
        # to the client need not leave from (another address of this host).
        # Behind a haproxy: listener that address is the balancer's (the
        # header's destination), not ours: there the route picks.
        bind_host = None if is_proxy_wrapper(self.transport) else str(parse_ip(host.host))
        d = ident_client.query(self.reactor, str(self.owner.client), peer.port,
                               host.port, port=policy.ident_port,
                               timeout=policy.ident_timeout, bind_host=bind_host)

        def answered(identity: ident_client.Identity) -> User:
            said = identity.user
            same = (said.casefold() == userid.casefold() if policy.ident_case_insensitive
                    else said == userid)
            STATS.ident_lookups["confirmed" if same else "mismatch"] += 1
            if not same:
                # Raw: the session's log line escapes its detail.
                raise UseridRefused(socks4.IDENT_MISMATCH, f"identd says '{said}'")
            return User(userid, verified=True)

        def unusable(failure):
            failure.trap(ident_client.IdentUnavailable, ident_client.IdentError)
            STATS.ident_lookups["unavailable"] += 1
            reason = f"identd: {failure.getErrorMessage()}"
            if policy.ident_fallback == TRUST:
                self.owner.note(detail=reason)
                return User(userid, verified=False)
            raise UseridRefused(socks4.NO_IDENTD, reason)

        return d.addCallbacks(answered, unusable)

    def _authenticated(self, user: User, request: socks4.Request) -> None:
        self.userid_check = None
        owner = self.owner
        owner.authenticated(self.method, user)
        if request.command == socks4.BIND:
            owner.bind(request.host, request.port, request.by_name).addCallbacks(
                self._bound, self._refused)
        else:
            owner.connect(request.host, request.port, request.by_name).addCallbacks(
                self._connected, self._refused)

    def _userid_refused(self, failure: Failure, userid: str) -> None:
        self.userid_check = None
        if failure.check(CancelledError):
            return
        refused = failure.value
        if not isinstance(refused, UseridRefused):
            # A bug, not the client's doing: it still gets its reply now,
            # not at the handshake timeout.
            log.failure("{peer} socks4: checking the USERID failed",
                        failure, peer=escape(self.owner.peer, spaces=True))
            self.transport.write(socks4.encode_reply(socks4.REJECTED))
            self.owner.fail("error", f"checking the USERID: {failure.getErrorMessage()}")
            return
        self.transport.write(socks4.encode_reply(refused.reply))
        self.owner.authentication_failed(self.method, userid or None, str(refused))

    def success(self, host: str, port: int) -> bytes:
        return socks4.encode_reply(socks4.GRANTED, host, port)

    def failure(self, failed: connect.ConnectFailed) -> bytes:
        return socks4.encode_reply(socks4.REJECTED)

    def cancel(self) -> None:
        check, self.userid_check = self.userid_check, None
        if check is not None:
            check.cancel()
