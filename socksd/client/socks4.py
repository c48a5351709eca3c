"""A SOCKS4a client: CONNECT and BIND through a proxy reached by any
endpoint. Names go unresolved, as SOCKS4a requests (the proxy resolves
them); IPv4 addresses as plain SOCKS4; IPv6 has no form in SOCKS4.

SOCKS4 has one failure reply for everything the proxy refuses or fails
(91): it is reported as SOCKS5's general failure. 92 and 93 (the proxy's
identd check of our USERID) refuse us, not the destination.
"""

from __future__ import annotations

import socket

from twisted.internet import defer
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)

from socksd.client.errors import DestinationFailed, SOCKSError
from socksd.client.handshake import Accepted, Bound, Handshake, dial
from socksd.wire import socks4, socks5

__all__ = ["bind", "connect", "encode_request"]


def encode_request(command: int, host: str, port: int, userid: str = "") -> bytes:
    """The request for host:port, by name (4a) unless host is an IPv4
    address; DestinationFailed (address type not supported) for what
    SOCKS4 cannot carry."""
    try:
        socket.inet_pton(socket.AF_INET, host)
        by_name = False
    except OSError:
        by_name = True
        if ":" in host:
            raise DestinationFailed(f"SOCKS4 cannot carry the IPv6 address {host}",
                                    socks5.ADDRESS_TYPE_NOT_SUPPORTED) from None
    try:
        return socks4.encode_request(command, host, port, userid, by_name=by_name)
    except ValueError as e:
        raise DestinationFailed(f"SOCKS4 cannot carry {host!r}: {e}",
                                socks5.ADDRESS_TYPE_NOT_SUPPORTED) from None


def _check(reply: socks4.Reply, which: str) -> None:
    if reply.code == socks4.GRANTED:
        return
    if reply.code == socks4.REJECTED:
        raise DestinationFailed(f"the proxy's {which}reply is {reply.code} "
                                "(rejected or failed)", socks5.GENERAL_FAILURE)
    if reply.code in (socks4.NO_IDENTD, socks4.IDENT_MISMATCH):
        raise SOCKSError(f"the proxy refused our USERID ({reply.code}: its identd check)",
                         reply.code)
    raise SOCKSError(f"the proxy's {which}reply is {reply.code}, not a SOCKS4 reply code",
                     reply.code)


class _Socks4(Handshake):
    what = "SOCKS4"

    def __init__(self, request: bytes, factory: IProtocolFactory, timeout: float,
                 pending: defer.Deferred, accept_timeout: float | None = None) -> None:
        super().__init__(timeout, pending)
        self.request = request
        self.factory_ = factory
        # None for CONNECT; BIND waits this long for its second reply.
        self.accept_timeout = accept_timeout
        self.second = False

    def start(self) -> None:
        self.transport.write(self.request)

    def step(self) -> bool:
        replied = socks4.parse_reply(self.buffer)
        if replied is None:
            return False
        reply, used = replied
        rest, self.buffer = self.buffer[used:], b""
        _check(reply, "second " if self.second else "")
        if self.accept_timeout is not None and not self.second:
            self.second = True
            self.buffer = rest
            self.setTimeout(self.accept_timeout)
            accepted: defer.Deferred[Accepted] = defer.Deferred(lambda _d: self.cancel())
            host = reply.host
            if host == "0.0.0.0":
                # "Any address": the proxy's own, where we reached it.
                host = getattr(self.transport.getPeer(), "host", host)
            self.fire(Bound(host, reply.port, accepted))
            self.pending = accepted
            return True
        app = self.hand_over(self.factory_)
        if app is not None:
            self.fire(Accepted(reply.host, reply.port, app) if self.second else app)
            self.deliver(rest)
        return True

    def timeoutConnection(self) -> None:
        if not self.second:
            super().timeoutConnection()
            return
        # The peer did not come: the destination's failure, as the
        # upstream's own BIND timeout would answer it (TTL expired), not the
        # upstream's, which served the first reply.
        self.fail(DestinationFailed(f"no connection to the bound address in {self.timeOut:g} s",
                                    socks5.TTL_EXPIRED))
        self.transport.abortConnection()


def connect(proxy: IStreamClientEndpoint, host: str, port: int, factory: IProtocolFactory,
            timeout: float = 30.0, userid: str = "",
            clock: IReactorTime | None = None) -> defer.Deferred[IProtocol]:
    """CONNECT: the application's protocol, connected through the proxy
    (``clock``: what the timeout runs on, by default the global reactor)."""
    try:
        request = encode_request(socks4.CONNECT, host, port, userid)
    except DestinationFailed:
        return defer.fail()
    return dial(proxy, lambda pending: _Socks4(request, factory, timeout, pending), clock)


def bind(proxy: IStreamClientEndpoint, host: str, port: int, factory: IProtocolFactory,
         timeout: float = 30.0, accept_timeout: float = 60.0,
         userid: str = "", clock: IReactorTime | None = None) -> defer.Deferred[Bound]:
    """BIND, expecting a connection from host:port."""
    try:
        request = encode_request(socks4.BIND, host, port, userid)
    except DestinationFailed:
        return defer.fail()
    return dial(proxy, lambda pending: _Socks4(request, factory, timeout, pending,
                                               accept_timeout), clock)
