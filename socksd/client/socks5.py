"""A SOCKS5 client endpoint (IStreamClientEndpoint): CONNECT through a proxy
reached by any endpoint, with no authentication, RFC 1929 username/password
or RFC 1961 GSS-API (integrity, confidentiality, NEC mode, or clear).

``connect(factory)`` fires with the application's protocol once the proxy
has connected it. GSS-API protection (:mod:`socksd.protection`) sits under
the handshake as TLS would: neither it nor the application sees a frame.
"""

from __future__ import annotations

import gssapi
from gssapi.exceptions import GSSError
from twisted.internet import defer
from twisted.internet.error import NoProtocol
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from socksd import protection
from socksd.twisted_internals import IStreamTransport
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

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        ready: defer.Deferred[IProtocol] = defer.Deferred()
        factory = Factory.forProtocol(lambda: _Handshake(self, protocolFactory, ready))
        d = self.proxy.connect(factory)
        d.addErrback(ready.errback)
        return ready


class _Handshake(Protocol, TimeoutMixin):
    """Speaks SOCKS5 to the proxy, then carries the application's bytes."""

    # The proxy's connection; under GSS-API protection, the wrapper over it.
    transport: IStreamTransport

    def __init__(self, endpoint: SOCKS5ClientEndpoint, factory: IProtocolFactory,
                 ready: defer.Deferred[IProtocol]) -> None:
        self.endpoint = endpoint
        self.factory_ = factory
        self.ready: defer.Deferred[IProtocol] | None = ready   # None once fired
        self.buffer = b""
        # method, userpass, gss-context, gss-protection, reply; None once done
        self.state: str | None = "method"
        self.context: gssapi.SecurityContext | None = None    # from gss-context on
        self.app: IProtocol | None = None

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
            selected = socks5.parse_method_selection(self.buffer)
            if selected is None:
                return False
            selection, used = selected
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
            answered = rfc1929.parse_response(self.buffer)
            if answered is None:
                return False
            response, used = answered
            status = response.status
            self.buffer = self.buffer[used:]
            if status != rfc1929.SUCCESS:
                raise SOCKSError("username/password refused", status)
            self._request()
            return True
        if self.state in ("gss-context", "gss-protection"):
            context = self.context
            assert context is not None, "made by _gss_start, before these states"
            expected = rfc1961.CONTEXT if self.state == "gss-context" else rfc1961.PROTECTION
            message = rfc1961.parse_message(self.buffer, expected)
            if message is None:
                return False
            (_mtyp, token), used = message
            self.buffer = self.buffer[used:]
            if self.state == "gss-context":
                self._gss_send(context, context.step(token))
            else:
                self._gss_protection(context, token)
            return True
        if self.state == "reply":
            buffer = self.buffer
            replied = socks5.parse_reply(buffer)
            if replied is None:
                return False
            reply, used = replied
            rest, self.buffer = buffer[used:], b""
            if reply.code != socks5.SUCCEEDED:
                raise SOCKSError(f"the proxy replied {reply.code:#x}", reply.code)
            self._connected(rest)
            return True
        return False

    def _gss_start(self) -> None:
        self.context = context = gssapi.SecurityContext(
            name=gssapi.Name(self.endpoint.gssapi_service, gssapi.NameType.hostbased_service),
            usage="initiate",
            flags=gssapi.RequirementFlag.mutual_authentication |
            gssapi.RequirementFlag.replay_detection |
            gssapi.RequirementFlag.out_of_sequence_detection |
            gssapi.RequirementFlag.integrity | gssapi.RequirementFlag.confidentiality)
        self.state = "gss-context"
        self._gss_send(context, context.step())

    def _gss_send(self, context: gssapi.SecurityContext, token: bytes | None) -> None:
        if token:
            self.transport.write(rfc1961.encode_message(rfc1961.CONTEXT, token))
        if context.complete:
            self.state = "gss-protection"
            octet = bytes((self.endpoint.gssapi_level,))
            message = octet if self.endpoint.nec else context.wrap(octet, False).message
            self.transport.write(rfc1961.encode_message(rfc1961.PROTECTION, message))

    def _gss_protection(self, context: gssapi.SecurityContext, token: bytes) -> None:
        octet = token if self.endpoint.nec else context.unwrap(token).message
        if len(octet) != 1:
            raise SOCKSError("malformed protection level answer")
        level = octet[0]
        if level < self.endpoint.gssapi_level:
            raise SOCKSError(f"the proxy offers protection {level}, "
                             f"weaker than {self.endpoint.gssapi_level}")
        if level not in (rfc1961.INTEGRITY, rfc1961.CONFIDENTIALITY):
            self._request()
            return
        # What followed the answer was read from below the new layer.
        rest, self.buffer = self.buffer, b""
        wrapper = protection.start(self, context, level)
        self._request()
        if rest:
            # Back in through the layer: its plaintext reaches dataReceived
            # (this one, re-entered), which reads the reply from it.
            wrapper.dataReceived(rest)

    def _request(self) -> None:
        self.state = "reply"
        self.transport.write(socks5.encode_request(socks5.CONNECT, self.endpoint.host,
                                                   self.endpoint.port))

    def _connected(self, rest: bytes) -> None:
        self.setTimeout(None)
        transport = self.transport
        app = self.factory_.buildProtocol(transport.getPeer())
        if app is None:
            # A factory that builds nothing refuses the connection, as it
            # does behind Twisted's own endpoints.
            self._fail(NoProtocol())
            return
        self.state = None
        self.app = app
        app.makeConnection(transport)
        ready, self.ready = self.ready, None
        assert ready is not None, "fired only here, by _fail and by connectionLost: no reply after"
        ready.callback(app)
        if rest:
            app.dataReceived(rest)

    def _fail(self, error: Exception) -> None:
        self._abort_gss()   # RFC 1961: tell the proxy why we stop
        self.setTimeout(None)
        self.state = None
        if self.ready is not None:
            ready, self.ready = self.ready, None
            ready.errback(error)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        if self.app is not None:
            self.app.connectionLost(reason)
        elif self.ready is not None:
            ready, self.ready = self.ready, None
            if reason.check(protection.ProtectionFailed):
                # The layer refused a frame and aborted: say why, as before.
                ready.errback(SOCKSError(reason.getErrorMessage()))
                return
            ready.errback(SOCKSError(f"the proxy closed the connection: "
                                     f"{reason.getErrorMessage()}"))
