"""A SOCKS5 client: CONNECT, BIND and UDP ASSOCIATE through a proxy
reached by any endpoint, with no authentication, RFC 1929
username/password or RFC 1961 GSS-API (integrity, confidentiality, NEC
mode, or clear).

:class:`SOCKS5ClientEndpoint` is CONNECT as an IStreamClientEndpoint:
``connect(factory)`` fires with the application's protocol once the proxy
has connected it. :func:`connect`, :func:`bind` and :func:`udp_associate`
take the proxy's endpoint and a :class:`SOCKS5Auth`. GSS-API protection
(:mod:`socksd.protection`) sits under the handshake as TLS would: neither
it nor the application sees a frame; UDP datagrams are each one protected
frame (RFC 1961 section 6), wrapped with the same context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import gssapi
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IReactorUDP,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from socksd import protection
from socksd.client.errors import DestinationFailed, SOCKSError
from socksd.client.handshake import Accepted, Bound, Handshake, dial
from socksd.wire import WireError, rfc1929, rfc1961, socks5

__all__ = ["Association", "SOCKS5Auth", "SOCKS5ClientEndpoint", "SOCKSError", "bind",
           "connect", "udp_associate"]


@dataclass(frozen=True)
class SOCKS5Auth:
    """How we authenticate to the proxy: the methods offered follow from it.

    ``gssapi_service``: the proxy's host-based service name, e.g.
    "rcmd@proxy.example" (offering GSS-API, with the process's default
    initiator credentials: its ccache, or a client keytab);
    ``gssapi_level``: 0 clear, 1 integrity, 2 confidentiality, the least we
    accept; ``username``/``password``: RFC 1929 (offered alongside)."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    gssapi_service: str | None = None
    gssapi_level: int = rfc1961.CONFIDENTIALITY
    nec: bool = False

    def methods(self) -> bytes:
        offered = []
        if self.gssapi_service:
            offered.append(socks5.GSSAPI)
        if self.username is not None:
            offered.append(socks5.USERPASS)
        offered.append(socks5.NO_AUTH)
        return bytes(offered)


class _Negotiation(Handshake):
    """Method selection and authentication, then the request; the reply is
    the subclass's (``replied``)."""

    def __init__(self, auth: SOCKS5Auth, timeout: float, pending: defer.Deferred) -> None:
        super().__init__(timeout, pending)
        self.auth = auth
        # method, userpass, gss-context, gss-protection, reply, then the
        # subclass's own states
        self.state = "method"
        self.context: gssapi.SecurityContext | None = None    # from gss-context on
        self.layer: protection.SecurityLayer | None = None    # under protection

    def start(self) -> None:
        self.transport.write(socks5.encode_greeting(self.auth.methods()))

    def failing(self) -> None:
        if self.state in ("gss-context", "gss-protection"):
            self.transport.write(rfc1961.ABORT)   # RFC 1961: tell the proxy why we stop

    def request(self) -> bytes:
        """The request to send once authenticated."""
        raise NotImplementedError

    def replied(self, reply: socks5.Reply, rest: bytes) -> None:
        """A successful reply (and what followed it) in state ``reply``."""
        raise NotImplementedError

    def step(self) -> bool:
        if self.state == "method":
            selected = socks5.parse_method_selection(self.buffer)
            if selected is None:
                return False
            selection, used = selected
            method = selection.method
            self.buffer = self.buffer[used:]
            if method == socks5.NO_AUTH:
                self._request()
            elif method == socks5.USERPASS and self.auth.username is not None:
                self.state = "userpass"
                self.transport.write(rfc1929.encode_request(
                    self.auth.username.encode(), (self.auth.password or "").encode()))
            elif method == socks5.GSSAPI and self.auth.gssapi_service:
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
            taken = _take_reply(self, "the proxy replied")
            if taken is None:
                return False
            self.replied(*taken)
            return True
        return self.step_after()

    def step_after(self) -> bool:
        """The subclass's states after the reply."""
        return False

    def _gss_start(self) -> None:
        service = self.auth.gssapi_service
        assert service, "offered only with a service name"
        self.context = context = gssapi.SecurityContext(
            name=gssapi.Name(service, gssapi.NameType.hostbased_service),
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
            octet = bytes((self.auth.gssapi_level,))
            message = octet if self.auth.nec else context.wrap(octet, False).message
            self.transport.write(rfc1961.encode_message(rfc1961.PROTECTION, message))

    def _gss_protection(self, context: gssapi.SecurityContext, token: bytes) -> None:
        octet = token if self.auth.nec else context.unwrap(token).message
        if len(octet) != 1:
            raise SOCKSError("malformed protection level answer")
        level = octet[0]
        if level < self.auth.gssapi_level:
            raise SOCKSError(f"the proxy offers protection {level}, "
                             f"weaker than {self.auth.gssapi_level}")
        if level not in (rfc1961.INTEGRITY, rfc1961.CONFIDENTIALITY):
            self._request()
            return
        # What followed the answer was read from below the new layer.
        rest, self.buffer = self.buffer, b""
        wrapper = protection.start(self, context, level)
        self.layer = wrapper.layer
        self._request()
        if rest:
            # Back in through the layer: its plaintext reaches dataReceived
            # (this one, re-entered), which reads the reply from it.
            wrapper.dataReceived(rest)

    def _request(self) -> None:
        self.state = "reply"
        self.transport.write(self.request())


class _Connect(_Negotiation):
    def __init__(self, auth: SOCKS5Auth, host: str, port: int, factory: IProtocolFactory,
                 timeout: float, pending: defer.Deferred[IProtocol]) -> None:
        super().__init__(auth, timeout, pending)
        self.host, self.port = host, port
        self.factory_ = factory

    def request(self) -> bytes:
        return socks5.encode_request(socks5.CONNECT, self.host, self.port)

    def replied(self, reply: socks5.Reply, rest: bytes) -> None:
        app = self.hand_over(self.factory_)
        if app is not None:
            self.fire(app)
            self.deliver(rest)


class _Bind(_Negotiation):
    """Two replies: where the proxy listens, then who connected."""

    def __init__(self, auth: SOCKS5Auth, host: str, port: int, factory: IProtocolFactory,
                 timeout: float, accept_timeout: float, pending: defer.Deferred[Bound]) -> None:
        super().__init__(auth, timeout, pending)
        self.host, self.port = host, port
        self.factory_ = factory
        self.accept_timeout = accept_timeout

    def request(self) -> bytes:
        return socks5.encode_request(socks5.BIND, self.host, self.port)

    def replied(self, reply: socks5.Reply, rest: bytes) -> None:
        accepted: defer.Deferred[Accepted] = defer.Deferred(lambda _d: self.cancel())
        host = _answered_host(reply.host, self.transport.getPeer())
        self.state = "second"
        self.buffer = rest
        self.setTimeout(self.accept_timeout)
        self.fire(Bound(host, reply.port, accepted))
        self.pending = accepted
        # The second reply may have come with the first.

    def timeoutConnection(self) -> None:
        if self.state != "second":
            super().timeoutConnection()
            return
        # The peer did not come: the destination's failure, as the
        # upstream's own BIND timeout would answer it (TTL expired), not the
        # upstream's, which served the first reply.
        self.fail(DestinationFailed(f"no connection to the bound address in {self.timeOut:g} s",
                                    socks5.TTL_EXPIRED))
        self.transport.abortConnection()

    def step_after(self) -> bool:
        if self.state != "second":
            return False
        taken = _take_reply(self, "the proxy's second BIND reply is")
        if taken is None:
            return False
        reply, rest = taken
        app = self.hand_over(self.factory_)
        if app is not None:
            self.fire(Accepted(reply.host, reply.port, app))
            self.deliver(rest)
        return True


def _take_reply(handshake: Any, failed: str) -> tuple[socks5.Reply, bytes] | None:
    """A SOCKS5 reply off the front of ``handshake.buffer`` and what came
    after it (None: not all of it yet); DestinationFailed (the reply's code,
    ``failed`` saying which reply) unless it succeeded."""
    replied = socks5.parse_reply(handshake.buffer)
    if replied is None:
        return None
    reply, used = replied
    rest, handshake.buffer = handshake.buffer[used:], b""
    if reply.code != socks5.SUCCEEDED:
        raise DestinationFailed(f"{failed} {reply.code:#x}", reply.code)
    return reply, rest


def _answered_host(host: str, peer: object) -> str:
    """The proxy's BND.ADDR, or the address we reached it at where it says
    "any" (0.0.0.0, ::): proxies answer so when they listen on every address."""
    if host in ("0.0.0.0", "::"):
        peer_host = getattr(peer, "host", None)
        if isinstance(peer_host, str):
            return peer_host
    return host


# UDP ASSOCIATE.

Received = Callable[[str, int, bytes], None]
# The largest datagram UDP carries: what the relay sends is read whole.
MAX_DATAGRAM = 65535


class Association(DatagramProtocol):
    """A UDP association through the proxy: ``send`` a payload to a
    destination, and ``received(host, port, payload)`` is called for each
    datagram the relay brings back, its source being the destination that
    answered. It lives as long as the proxy's control connection: that
    closing (or ``close()``) ends it, and ``closed`` fires with the reason.

    Only datagrams from the relay's address are taken; fragments (FRAG != 0)
    and malformed or unprotected ones are dropped and counted."""

    def __init__(self, received: Received) -> None:
        self.received = received
        self.relay: tuple[str, int] = ("0.0.0.0", 0)    # the proxy's relay, from its reply
        self.layer: protection.SecurityLayer | None = None
        self.control: _Associate | None = None
        self.closed: defer.Deferred[str] = defer.Deferred()
        self.dropped = 0
        self.ended = False

    @property
    def relay_address(self) -> tuple[str, int]:
        return self.relay

    @property
    def local_address(self) -> tuple[str, int]:
        """Where our datagrams come from (what the request told the proxy)."""
        transport = self.transport
        assert transport is not None, "asked once listening"
        host = transport.getHost()
        return host.host, host.port

    def send(self, payload: bytes, host: str, port: int) -> bool:
        """One datagram to host:port through the relay; False when it
        cannot be sent (ended, too large, an address no header carries)."""
        transport = self.transport
        if self.ended or transport is None:
            return False
        try:
            datagram = socks5.encode_udp(host, port, payload)
            if self.layer is not None:
                datagram = self.layer.wrap_datagram(datagram)
            transport.write(datagram, self.relay)
        except (ValueError, OSError):
            self.dropped += 1
            return False
        return True

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        if self.ended or (addr[0], addr[1]) != self.relay:
            self.dropped += 1
            return
        try:
            if self.layer is not None:
                datagram = self.layer.unwrap_datagram(datagram)
            parsed = socks5.parse_udp(datagram)
        except WireError:
            self.dropped += 1
            return
        if parsed.frag != 0:
            self.dropped += 1     # no reassembly: RFC 1928 lets a client drop them
            return
        self.received(parsed.host, parsed.port, parsed.data)

    def close(self) -> None:
        """End the association: the control connection is closed too."""
        self._end("closed by us")

    def _end(self, why: str) -> None:
        if self.ended:
            return
        self.ended = True
        if self.transport is not None:
            self.transport.stopListening()
        control, self.control = self.control, None
        if control is not None:
            control.association = None
            control.transport.loseConnection()
        self.closed.callback(why)


class _Associate(_Negotiation):
    """UDP ASSOCIATE: the request names the UDP port we send from, opened
    on the address the control connection leaves from."""

    def __init__(self, auth: SOCKS5Auth, reactor: IReactorUDP, received: Received,
                 timeout: float, pending: defer.Deferred[Association]) -> None:
        super().__init__(auth, timeout, pending)
        self.reactor = reactor
        self.association: Association | None = Association(received)

    def request(self) -> bytes:
        association = self.association
        assert association is not None, "until the reply, only connectionLost drops it"
        local = self.transport.getHost().host
        try:
            self.reactor.listenUDP(0, association, interface=local, maxPacketSize=MAX_DATAGRAM)
        except CannotListenError as e:
            raise SOCKSError(f"cannot open a UDP port on {local}: {e.socketError}") from None
        host, port = association.local_address
        return socks5.encode_request(socks5.UDP_ASSOCIATE, host, port)

    def replied(self, reply: socks5.Reply, rest: bytes) -> None:
        association = self.association
        assert association is not None, "until the reply, only connectionLost drops it"
        self.setTimeout(None)
        self.state = "associated"
        # Nothing is expected on the control connection from now on (RFC
        # 1928 defines nothing): what comes is dropped unread, never kept.
        self.done = True
        association.relay = (_answered_host(reply.host, self.transport.getPeer()), reply.port)
        association.layer = self.layer
        association.control = self
        self.fire(association)

    def readConnectionLost(self) -> None:
        if self.state == "associated":
            self.transport.loseConnection()
            return
        super().readConnectionLost()

    def lost(self, reason: Failure) -> None:
        association, self.association = self.association, None
        if association is None:
            return
        if association.control is None:
            # Never associated: the UDP port opened for the request goes.
            if association.transport is not None:
                association.transport.stopListening()
            return
        association.control = None
        association._end(f"the proxy closed the control connection: "
                         f"{reason.getErrorMessage()}")


# The three commands over any endpoint to the proxy.


def connect(proxy: IStreamClientEndpoint, auth: SOCKS5Auth, host: str, port: int,
            factory: IProtocolFactory, timeout: float = 30.0,
            clock: IReactorTime | None = None) -> defer.Deferred[IProtocol]:
    """CONNECT: the application's protocol, connected through the proxy
    (``clock``: what the timeouts run on, by default the global reactor)."""
    return dial(proxy, lambda pending: _Connect(auth, host, port, factory, timeout, pending),
                clock)


def bind(proxy: IStreamClientEndpoint, auth: SOCKS5Auth, host: str, port: int,
         factory: IProtocolFactory, timeout: float = 30.0,
         accept_timeout: float = 60.0,
         clock: IReactorTime | None = None) -> defer.Deferred[Bound]:
    """BIND, expecting a connection from host:port (0.0.0.0:0: anyone)."""
    return dial(proxy, lambda pending: _Bind(auth, host, port, factory, timeout,
                                             accept_timeout, pending), clock)


def udp_associate(proxy: IStreamClientEndpoint, auth: SOCKS5Auth, reactor: IReactorUDP,
                  received: Received, timeout: float = 30.0) -> defer.Deferred[Association]:
    """UDP ASSOCIATE: an :class:`Association` once the proxy has replied;
    the UDP port is opened on ``reactor``, which runs the timeout too."""
    clock = reactor if IReactorTime.providedBy(reactor) else None
    return dial(proxy, lambda pending: _Associate(auth, reactor, received, timeout, pending),
                clock)


@implementer(IStreamClientEndpoint)
class SOCKS5ClientEndpoint:
    """CONNECT to host:port through the proxy at ``proxy``, as an endpoint."""

    def __init__(self, host: str, port: int, proxy: IStreamClientEndpoint, *,
                 username: str | None = None, password: str | None = None,
                 gssapi_service: str | None = None, gssapi_level: int = 2,
                 nec: bool = False, timeout: float = 30.0) -> None:
        """``gssapi_service``: the proxy's service name, e.g. "rcmd@proxy.example"
        (offering GSS-API); ``gssapi_level``: 0 clear, 1 integrity, 2 confidentiality;
        ``timeout``: seconds for the whole SOCKS handshake once connected."""
        self.host, self.port = host, port
        self.proxy = proxy
        self.auth = SOCKS5Auth(username, password, gssapi_service, gssapi_level, nec)
        self.timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        return connect(self.proxy, self.auth, self.host, self.port, protocolFactory,
                       self.timeout)

