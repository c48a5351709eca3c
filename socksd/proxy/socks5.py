"""The SOCKS5 handshake (RFC 1928): method selection, the method's
sub-negotiation, the request and its reply. Drives :mod:`socksd.wire.socks5`
and asks its owner (:class:`~socksd.proxy.handshake.RequestOwner`) to carry
the request out."""

from __future__ import annotations

from typing import Any, Callable

from socksd.auth import User
from socksd.auth.methods import Established, Method, Negotiation
from socksd.proxy import connect
from socksd.proxy.handshake import Requesting, RequestOwner
from socksd.relay import send
from socksd.wire import WireError, socks5

REPLY_FOR = {
    connect.DENIED: socks5.NOT_ALLOWED,
    connect.NETWORK_UNREACHABLE: socks5.NETWORK_UNREACHABLE,
    connect.HOST_UNREACHABLE: socks5.HOST_UNREACHABLE,
    connect.REFUSED: socks5.CONNECTION_REFUSED,
    connect.TIMEOUT: socks5.TTL_EXPIRED,
    connect.FAILED: socks5.GENERAL_FAILURE,
}

_GREETING, _AUTH, _REQUEST, _WAITING = range(4)


class Socks5Handshake(Requesting):
    """One client's handshake; dropped once the relay starts. It is also
    what a method authenticates (:class:`~socksd.auth.methods.Authenticating`)."""

    __slots__ = ("choose_method", "reactor", "handshake_deadline", "state", "negotiation")

    def __init__(self, owner: RequestOwner, choose_method: Callable[[bytes], Method | None],
                 reactor: Any, handshake_deadline: float) -> None:
        super().__init__(owner)
        self.choose_method = choose_method
        self.reactor = reactor                        # the method's clock and timers
        self.handshake_deadline = handshake_deadline  # reactor.seconds() of the timeout
        self.state = _GREETING
        self.negotiation: Negotiation | None = None

    @property
    def client_key(self) -> str | None:
        return self.owner.client_key

    @property
    def peer(self) -> str:
        return self.owner.peer

    def data_received(self, data: bytes) -> None:
        if self.state == _AUTH:
            assert self.negotiation is not None   # _AUTH: a method is negotiating
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
            if isinstance(e.reply, int) and self.state == _REQUEST:
                self.transport.write(socks5.encode_reply(e.reply))
            self.owner.fail("bad request", str(e))

    def _greeting(self) -> None:
        parsed = socks5.parse_greeting(self.buffer)
        if parsed is None:
            return
        greeting, used = parsed
        offered = greeting.methods
        self.buffer = self.buffer[used:]
        method = self.choose_method(offered)
        if method is None:
            self.transport.write(socks5.method_selection(socks5.NO_ACCEPTABLE))
            self.owner.fail("no acceptable method",
                            "offered " + (",".join(str(m) for m in offered) or "nothing"))
            return
        send(self.owner.transport, socks5.method_selection(method.code))
        self.owner.note(method=method.name)   # logged even if the client leaves now
        self.state = _AUTH
        negotiation = method.start(self)
        if self.state == _AUTH and negotiation is not None:
            # A sub-negotiation: it gets what followed the greeting. (A method
            # that authenticated at once left it in the buffer as the request.)
            self.negotiation = negotiation
            rest, self.buffer = self.buffer, b""
            if rest:
                negotiation.data_received(rest)

    # Called back by the method (see socksd.auth.methods.Authenticating).

    def authenticated(self, method: str, avatar: User, rest: bytes,
                      established: Established | None = None) -> None:
        self.owner.authenticated(method, avatar, established)
        self.negotiation = None
        self.state = _REQUEST
        if rest:
            # Under GSS-API protection the rest is wrapped: it goes in beneath
            # the owner, to the wrapper that is now its transport.
            if established is not None:
                self.transport.dataReceived(rest)
            else:
                self.data_received(rest)

    def authentication_failed(self, method: str, user: str | None, reason: str) -> None:
        self.negotiation = None
        self.owner.authentication_failed(method, user, reason)

    def _request(self) -> None:
        parsed = socks5.parse_request(self.buffer)
        if parsed is None:
            return
        request, used = parsed
        self.buffer = self.buffer[used:]
        self.state = _WAITING
        by_name = request.atyp == socks5.ATYP_DOMAIN
        owner = self.owner
        if request.command == socks5.CONNECT:
            owner.connect(request.host, request.port, by_name).addCallbacks(
                self._connected, self._refused)
        elif request.command == socks5.BIND:
            owner.bind(request.host, request.port, by_name).addCallbacks(
                self._bound, self._refused)
        elif request.command == socks5.UDP_ASSOCIATE:
            # DST is where the client will send from; a name there says nothing.
            owner.udp_associate("0.0.0.0" if by_name else request.host,
                                request.port).addCallbacks(self._associated, self._refused)
        else:
            command = f"0x{request.command:02x}"
            owner.note(command=command)
            self.transport.write(socks5.encode_reply(socks5.COMMAND_NOT_SUPPORTED))
            owner.fail("command not supported", command)

    def success(self, host: str, port: int) -> bytes:
        return socks5.encode_reply(socks5.SUCCEEDED, host, port)

    def failure(self, failed: connect.ConnectFailed) -> bytes:
        return socks5.encode_reply(REPLY_FOR[failed.reason])

    def _associated(self, bound: tuple[str, int]) -> None:
        self.buffer = b""
        self.transport.write(self.success(*bound))

    def cancel(self) -> None:
        if self.negotiation is not None:
            self.negotiation.cancel()
            self.negotiation = None
