"""A SOCKS5 client endpoint (IStreamClientEndpoint): CONNECT through a proxy
reached by any endpoint, with no authentication, RFC 1929 username/password
or RFC 1961 GSS-API (integrity, confidentiality, NEC mode, or clear).

``connect(factory)`` fires with the application's protocol once the proxy
has connected it. GSS-API protection (:mod:`socksd.protection`) sits under
the handshake as TLS would: neither it nor the application sees a frame.
"""

from __future__ import annotations

from gssapi.exceptions import GSSError
from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from socksd import protection
from socksd.wire import WireError, rfc1929, rfc1961, socks5


class SOCKSError(Exception):
    """The proxy refused or failed; ``reply`` is its SOCKS5 reply or status."""

    def __init__(self, message: str, reply: int | None = None) -> None:
        super().__init__(message)
        self.reply = reply


@implementer(IStreamClientEndpoint)
class SOCKS5ClientEndpoint:
    def __init__(self, host: str, port: int, proxy: IStreamClientEndpoint, *,
                 username: str | None = None, password: str | None = None,
                 gssapi_service: str | None = None, gssapi_level: int = 2,
                 nec: bool = False, timeout: float = 30.0) -> None:
        """``gssapi_service``: the proxy's service name, e.g. "rcmd@proxy.example"
        (offering GSS-API); ``gssapi_level``: 0 clear, 1 integrity, 2 confidentiality;
        ``timeout``: seconds for the whole SOCKS handshake once connected."""
        self.host, self.port = host, port
        self.proxy = proxy
        self.username, self.password = username, password
        self.gssapi_service = gssapi_service
        self.gssapi_level = gssapi_level
        self.nec = nec
        self.timeout = timeout

    def methods(self) -> bytes:
        offered = []
        if self.gssapi_service:
            offered.append(socks5.GSSAPI)
        if self.username is not None:
            offered.append(socks5.USERPASS)
        offered.append(socks5.NO_AUTH)
        return bytes(offered)

    def connect(self, protocolFactory: Factory) -> defer.Deferred:
        ready: defer.Deferred = defer.Deferred()
        factory = Factory.forProtocol(lambda: _Handshake(self, protocolFactory, ready))
        d = self.proxy.connect(factory)
        d.addErrback(ready.errback)
        return ready


class _Handshake(Protocol, TimeoutMixin):
    """Speaks SOCKS5 to the proxy, then carries the application's bytes."""

    def __init__(self, endpoint: SOCKS5ClientEndpoint, factory: Factory,
                 ready: defer.Deferred) -> None:
        self.endpoint = endpoint
        self.factory_ = factory
        self.ready = ready
        self.buffer = b""
        self.state = "method"
        self.context = None
        self.app: Protocol | None = None

    def connectionMade(self) -> None:
        self.setTimeout(self.endpoint.timeout)
        self.transport.write(socks5.encode_greeting(self.endpoint.methods()))

    def timeoutConnection(self) -> None:
        self._fail(SOCKSError(f"no SOCKS answer from the proxy in {self.timeOut:g} s"))
        self.transport.abortConnection()

    def _abort_gss(self) -> None:
        if self.state in ("gss-context", "gss-protection"):
            self.transport.write(rfc1961.ABORT)

    def dataReceived(self, data: bytes) -> None:
        if self.app is not None:
            self.app.dataReceived(data)
            return
        self.buffer += data
        try:
            while self.app is None and self.state is not None and self._step():
                pass
        except (WireError, SOCKSError) as e:
            self._fail(e if isinstance(e, SOCKSError) else SOCKSError(str(e)))
        except GSSError as e:   # no ticket, expired, or the proxy's error token
            self._fail(SOCKSError(f"GSS-API: {e.gen_message()}"))

    def _step(self) -> bool:
        """Handle one message from the buffer; False when more bytes are needed."""
        if self.state == "method":
            parsed = socks5.parse_method_selection(self.buffer)
            if parsed is None:
                return False
            selection, used = parsed
            method = selection.method
            self.buffer = self.buffer[used:]
            if method == socks5.NO_AUTH:
                self._request()
            elif method == socks5.USERPASS and self.endpoint.username is not None:
                self.state = "userpass"
                self.transport.write(rfc1929.encode_request(
                    self.endpoint.username.encode(), (self.endpoint.password or "").encode()))
            elif method == socks5.GSSAPI and self.endpoint.gssapi_service:
                self._gss_start()
            else:
                raise SOCKSError(f"the proxy accepts none of our methods ({method:#x})", method)
            return True
        if self.state == "userpass":
            parsed = rfc1929.parse_response(self.buffer)
            if parsed is None:
                return False
            response, used = parsed
            status = response.status
            self.buffer = self.buffer[used:]
            if status != rfc1929.SUCCESS:
                raise SOCKSError("username/password refused", status)
            self._request()
            return True
        if self.state in ("gss-context", "gss-protection"):
            expected = rfc1961.CONTEXT if self.state == "gss-context" else rfc1961.PROTECTION
            parsed = rfc1961.parse_message(self.buffer, expected)
            if parsed is None:
                return False
            (_mtyp, token), used = parsed
            self.buffer = self.buffer[used:]
            if self.state == "gss-context":
                self._gss_context(token)
            else:
                self._gss_protection(token)
            return True
        if self.state == "reply":
            buffer = self.buffer
            parsed = socks5.parse_reply(buffer)
            if parsed is None:
                return False
            reply, used = parsed
            rest, self.buffer = buffer[used:], b""
            if reply.code != socks5.SUCCEEDED:
                raise SOCKSError(f"the proxy replied {reply.code:#x}", reply.code)
            self._connected(rest)
            return True
        return False

    def _gss_start(self) -> None:
        import gssapi

        self.context = gssapi.SecurityContext(
            name=gssapi.Name(self.endpoint.gssapi_service, gssapi.NameType.hostbased_service),
            usage="initiate",
            flags=gssapi.RequirementFlag.mutual_authentication |
            gssapi.RequirementFlag.replay_detection |
            gssapi.RequirementFlag.out_of_sequence_detection |
            gssapi.RequirementFlag.integrity | gssapi.RequirementFlag.confidentiality)
        self.state = "gss-context"
        self._gss_send(self.context.step())

    def _gss_send(self, token: bytes | None) -> None:
        if token:
            self.transport.write(rfc1961.encode_message(rfc1961.CONTEXT, token))
        if self.context.complete:
            self.state = "gss-protection"
            octet = bytes((self.endpoint.gssapi_level,))
            message = octet if self.endpoint.nec else self.context.wrap(octet, False).message
            self.transport.write(rfc1961.encode_message(rfc1961.PROTECTION, message))

    def _gss_context(self, token: bytes) -> None:
        self._gss_send(self.context.step(token))

    def _gss_protection(self, token: bytes) -> None:
        octet = token if self.endpoint.nec else self.context.unwrap(token).message
        if len(octet) != 1:
            raise SOCKSError("malformed protection level answer")
        level = octet[0]
        if level < self.endpoint.gssapi_level:
            raise SOCKSError(f"the proxy offers protection {level}, "
                             f"weaker than {self.endpoint.gssapi_level}")
        rest = b""
        if level in (rfc1961.INTEGRITY, rfc1961.CONFIDENTIALITY):
            # What followed the answer was read from below the new layer.
            rest, self.buffer = self.buffer, b""
            protection.start(self, self.context, level)
        self._request()
        if rest:
            # Back in through the layer: its plaintext reaches dataReceived
            # (this one, re-entered), which reads the reply from it.
            self.transport.dataReceived(rest)

    def _request(self) -> None:
        self.state = "reply"
        self.transport.write(socks5.encode_request(socks5.CONNECT, self.endpoint.host,
                                                   self.endpoint.port))

    def _connected(self, rest: bytes) -> None:
        self.setTimeout(None)
        self.state = None
        transport = self.transport
        self.app = self.factory_.buildProtocol(transport.getPeer())
        self.app.makeConnection(transport)
        ready, self.ready = self.ready, None
        ready.callback(self.app)
        if rest:
            self.app.dataReceived(rest)

    def _fail(self, error: Exception) -> None:
        self._abort_gss()   # RFC 1961: tell the proxy why we stop
        self.setTimeout(None)
        self.state = None
        if self.ready is not None:
            ready, self.ready = self.ready, None
            ready.errback(error)
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.setTimeout(None)
        if self.app is not None:
            self.app.connectionLost(reason)
        elif self.ready is not None:
            ready, self.ready = self.ready, None
            if reason is not None and reason.check(protection.ProtectionFailed):
                # The layer refused a frame and aborted: say why, as before.
                ready.errback(SOCKSError(reason.getErrorMessage()))
                return
            ready.errback(SOCKSError(f"the proxy closed the connection: "
                                     f"{reason.getErrorMessage() if reason else ''}"))
