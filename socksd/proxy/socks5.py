"""The SOCKS5 handshake (RFC 1928): method selection, the method's
sub-negotiation, the request and its reply. Drives :mod:`socksd.wire.socks5`
and hands the session its avatar and destination."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import CancelledError

from socksd.auth import User
from socksd.proxy import connect
from socksd.relay import send
from socksd.wire import WireError, socks5

if TYPE_CHECKING:
    from socksd.proxy.session import Session

REPLY_FOR = {
    connect.DENIED: socks5.NOT_ALLOWED,
    connect.NETWORK_UNREACHABLE: socks5.NETWORK_UNREACHABLE,
    connect.HOST_UNREACHABLE: socks5.HOST_UNREACHABLE,
    connect.REFUSED: socks5.CONNECTION_REFUSED,
    connect.TIMEOUT: socks5.TTL_EXPIRED,
    connect.FAILED: socks5.GENERAL_FAILURE,
}

_GREETING, _AUTH, _REQUEST, _WAITING = range(4)


class Socks5Handshake:
    """One client's handshake; dropped once the relay starts."""

    __slots__ = ("session", "state", "buffer", "negotiation")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.state = _GREETING
        self.buffer = b""
        self.negotiation = None

    @property
    def transport(self):
        return self.session.transport

    @property
    def peer(self) -> str:
        return self.session.peer

    # What a method needs besides (socksd.auth.methods.Authenticating).

    @property
    def client_key(self) -> str | None:
        return self.session.client_key

    @property
    def reactor(self):
        return self.session.server.reactor

    @property
    def handshake_deadline(self) -> float:
        return self.session.started + self.session.server.limits.handshake_timeout

    def data_received(self, data: bytes) -> None:
        if self.state == _AUTH:
            self.negotiation.data_received(data)
            return
        if self.state == _WAITING:
            # Sent before our reply (optimistic data): relayed once connected.
            # The session pauses reading when the handshake buffers too much.
            self.buffer += data
            return
        self.buffer = self.buffer + data if self.buffer else data
        try:
            if self.state == _GREETING:
                self._greeting()
            if self.state == _REQUEST:
                self._request()
        except WireError as e:
            if e.reply is not None and self.state == _REQUEST:
                self.transport.write(socks5.encode_reply(e.reply))
            self.session.fail("bad request", str(e))

    def _greeting(self) -> None:
        parsed = socks5.parse_greeting(self.buffer)
        if parsed is None:
            return
        offered, used = parsed
        self.buffer = self.buffer[used:]
        method = self.session.server.choose_method(offered)
        if method is None:
            self.transport.write(socks5.method_selection(socks5.NO_ACCEPTABLE))
            self.session.fail("no acceptable method",
                              "offered " + (",".join(str(m) for m in offered) or "nothing"))
            return
        send(self.transport, socks5.method_selection(method.code))
        self.session.method = method.name   # logged even if the client leaves now
        self.state = _AUTH
        negotiation = method.start(self)
        if self.state == _AUTH:
            # A sub-negotiation: it gets what followed the greeting. (A method
            # that authenticated at once left it in the buffer as the request.)
            self.negotiation = negotiation
            rest, self.buffer = self.buffer, b""
            if rest:
                negotiation.data_received(rest)

    # Called back by the method (see socksd.auth.methods.Authenticating).

    def authenticated(self, method: str, avatar: User, rest: bytes, established=None) -> None:
        self.session.authenticated(method, avatar, established)
        self.negotiation = None
        self.state = _REQUEST
        if rest:
            # Under GSS-API protection the rest is wrapped: it goes in beneath
            # the session, to the wrapper now its transport.
            if established is not None:
                self.session.transport.dataReceived(rest)
            else:
                self.data_received(rest)

    def authentication_failed(self, method: str, user: str | None, reason: str) -> None:
        self.negotiation = None
        self.session.authentication_failed(method, user, reason)

    def _request(self) -> None:
        parsed = socks5.parse_request(self.buffer)
        if parsed is None:
            return
        request, used = parsed
        self.buffer = self.buffer[used:]
        self.state = _WAITING
        by_name = request.atyp == socks5.ATYP_DOMAIN
        if request.command == socks5.CONNECT:
            d = self.session.connect(request.host, request.port, by_name)
            d.addCallbacks(self._connected, self._refused)
        elif request.command == socks5.BIND:
            d = self.session.bind(request.host, request.port, by_name)
            d.addCallbacks(self._bound, self._refused)
        elif request.command == socks5.UDP_ASSOCIATE:
            # DST is where the client will send from; a name there says nothing.
            d = self.session.udp_associate("0.0.0.0" if by_name else request.host,
                                           request.port)
            d.addCallbacks(self._associated, self._refused)
        else:
            self.session.command = f"0x{request.command:02x}"
            self.transport.write(socks5.encode_reply(socks5.COMMAND_NOT_SUPPORTED))
            self.session.fail("command not supported", self.session.command)

    def _connected(self, outbound) -> None:
        self._relay(outbound, outbound.transport.getHost())

    def _bound(self, waiter) -> None:
        """First BIND reply: where the client's peer should connect."""
        self.transport.write(socks5.encode_reply(socks5.SUCCEEDED, *waiter.bound))
        waiter.accepted.addCallbacks(self._bind_accepted, self._refused)

    def _bind_accepted(self, incoming) -> None:
        """Second BIND reply: who connected; then relay."""
        self._relay(incoming, incoming.transport.getPeer())

    def _relay(self, end, address) -> None:
        """The last reply names ``address`` (where we connected from, or who
        connected to us); then relay, passing on what the client sent early."""
        early, self.buffer = self.buffer, b""
        self.session.start_relay(
            end, socks5.encode_reply(socks5.SUCCEEDED, address.host, address.port), early)

    def _associated(self, bound) -> None:
        self.buffer = b""
        self.transport.write(socks5.encode_reply(socks5.SUCCEEDED, *bound))

    def _refused(self, failure) -> None:
        if failure.check(CancelledError):
            return  # the client went away while we connected
        failed = failure.value
        if not isinstance(failed, connect.ConnectFailed):
            failed = connect.classify(failure)
        self.transport.write(socks5.encode_reply(REPLY_FOR[failed.reason]))
        self.session.connect_failed(failed)

    def cancel(self) -> None:
        if self.negotiation is not None:
            self.negotiation.cancel()
            self.negotiation = None
