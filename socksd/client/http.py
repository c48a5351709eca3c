"""An HTTP CONNECT client (RFC 9110 section 9.3.6): a tunnel through an
HTTP proxy reached by any endpoint, with optional Basic
Proxy-Authorization (RFC 7617).

The proxy's response header is read up to :data:`MAX_HEADER` bytes and no
further; a 2xx status opens the tunnel, and what followed the header is the
tunnel's first bytes. Statuses are mapped to SOCKS5 replies for the client:
403 not allowed, 502/504 host unreachable (the proxy's gateway errors: it
could not reach or hear from the destination), other failures general;
407 (and 401) mean our credentials, not the destination, failed.
"""

from __future__ import annotations

import base64
import ipaddress
import re

from twisted.internet import defer
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)

from socksd.client.errors import DestinationFailed, SOCKSError
from socksd.client.handshake import Handshake, dial
from socksd.escape import escape
from socksd.wire import socks5

__all__ = ["MAX_HEADER", "connect", "encode_request"]

MAX_HEADER = 16 * 1024

# What goes between "CONNECT " and the port: a host name's letters, digits,
# dots, hyphens and underscores; anything else could end the line early.
_NAME = re.compile(r"[A-Za-z0-9._-]{1,253}\Z")
_STATUS = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([^\r\n]*))?\r?\n")
_END = re.compile(rb"\r?\n\r?\n")

_REPLIES = {403: socks5.NOT_ALLOWED, 502: socks5.HOST_UNREACHABLE,
            504: socks5.HOST_UNREACHABLE}


def encode_request(host: str, port: int, username: str | None = None,
                   password: str | None = None) -> bytes:
    """The CONNECT request; DestinationFailed (address type not supported)
    for a host that is neither an IP address nor a plain host name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not _NAME.match(host):
            raise DestinationFailed(f"HTTP CONNECT cannot carry the host {escape(host)}",
                                    socks5.ADDRESS_TYPE_NOT_SUPPORTED) from None
        authority = f"{host}:{port}"
    else:
        authority = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if username is not None:
        token = base64.b64encode(f"{username}:{password or ''}".encode()).decode("ascii")
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class _Connect(Handshake):
    what = "HTTP"
    limit = MAX_HEADER

    def __init__(self, request: bytes, factory: IProtocolFactory, timeout: float,
                 pending: defer.Deferred[IProtocol]) -> None:
        super().__init__(timeout, pending)
        self.request = request
        self.factory_ = factory

    def start(self) -> None:
        self.transport.write(self.request)

    def step(self) -> bool:
        # The header must end within the limit (the base class stops a
        # buffer past it); look only there.
        end = _END.search(self.buffer, 0, self.limit)
        if end is None:
            return False
        header, rest = self.buffer[:end.end()], self.buffer[end.end():]
        self.buffer = b""
        status = _STATUS.match(header)
        if status is None:
            first = header.split(b"\n", 1)[0][:80].decode("latin-1")
            raise SOCKSError(f"not an HTTP response: {escape(first)}")
        code = int(status.group(1))
        reason = escape((status.group(2) or b"").decode("latin-1"))
        if 200 <= code < 300:
            app = self.hand_over(self.factory_)
            if app is not None:
                self.fire(app)
                self.deliver(rest)
            return True
        if code in (401, 407):
            raise SOCKSError(f"the proxy refused our credentials: {code} {reason}", code)
        raise DestinationFailed(f"the proxy answered {code} {reason}",
                                _REPLIES.get(code, socks5.GENERAL_FAILURE))


def connect(proxy: IStreamClientEndpoint, host: str, port: int, factory: IProtocolFactory,
            timeout: float = 30.0, username: str | None = None,
            password: str | None = None,
            clock: IReactorTime | None = None) -> defer.Deferred[IProtocol]:
    """A tunnel to host:port: the application's protocol, connected
    (``clock``: what the timeout runs on, by default the global reactor)."""
    try:
        request = encode_request(host, port, username, password)
    except DestinationFailed:
        return defer.fail()
    return dial(proxy, lambda pending: _Connect(request, factory, timeout, pending), clock)
