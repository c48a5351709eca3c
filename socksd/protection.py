"""GSS-API protection (RFC 1961 encapsulation) slipped under a protocol.

Once a GSS-API negotiation has agreed on integrity or confidentiality,
:func:`start` puts a :class:`ProtectionWrapper` between the protocol and its
transport, as ``twisted.internet._newtls.startTLS`` puts
``TLSMemoryBIOProtocol`` under one: the protocol goes on writing and reading
plain bytes, the socket carries MTYP 3 frames. The server's session and the
client endpoint share it; UDP datagrams go through the same
:class:`SecurityLayer`.

Layering: above auth (which hands up the context and level it established),
below client and proxy (which start it). It imports nothing of either.
"""

from __future__ import annotations

from typing import Any, Iterable, cast

import gssapi
import gssapi.raw
from gssapi.exceptions import GSSError
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHalfCloseableProtocol,
    IProducer,
    IProtocol,
    IPushProducer,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from socksd.twisted_internals import IStreamTransport
from socksd.wire import WireError, rfc1961


class ProtectionFailed(WireError):
    """A frame the layer refused (malformed, tampered, replayed, weaker than
    agreed). The wrapper aborts the connection and hands this to the
    protocol's ``connectionLost`` as the reason, as TLS hands up its errors."""


# What a stream of wrapped frames needs from the context, and how a log line
# names each flag (RFC 2744's names, as krb5's own messages use them).
SEQUENCE_FLAGS = ((gssapi.RequirementFlag.replay_detection, "GSS_C_REPLAY_FLAG"),
                  (gssapi.RequirementFlag.out_of_sequence_detection, "GSS_C_SEQUENCE_FLAG"))


class SecurityLayer:
    """RFC 1961 encapsulation for one session: unwraps what arrives, wraps
    what is sent (conf=False for integrity, True for confidentiality)."""

    __slots__ = ("context", "level", "encrypt", "head", "token", "filled", "max_plain",
                 "require_sequence")

    def __init__(self, context: gssapi.SecurityContext, level: int,
                 require_sequence: bool = True) -> None:
        self.context = context
        self.level = level
        self.encrypt = level == rfc1961.CONFIDENTIALITY
        self.require_sequence = require_sequence
        # A frame cut by the end of a read: its head, while that is shorter
        # than four bytes; then its token, filled in place as it comes.
        self.head = b""
        self.token: bytearray | None = None
        self.filled = 0
        # Plaintext per frame such that no wrapped token exceeds 65535 bytes.
        self.max_plain = context.get_wrap_size_limit(rfc1961.MAX_TOKEN, self.encrypt)

    def refusal(self, command: str) -> str | None:
        """Why ``command`` may not run under this context, or None.

        Kerberos checks wrapped tokens for replay and order only when the
        initiator asked for it; without that a replayed frame of a TCP stream
        would be relayed twice, so CONNECT and BIND need both flags. UDP
        ASSOCIATE does not: datagrams are lost and reordered by nature, and a
        client cannot ask for ordering there (Dante's does not). The flags are
        fixed when the context is made, before the command is known, so this
        is asked at the request.
        """
        if not self.require_sequence or command == "udp":
            return None
        flags = self.context.actual_flags
        missing = [name for flag, name in SEQUENCE_FLAGS if flag not in flags]
        if not missing:
            return None
        return (f"gssapi: {command} needs replay and sequence detection, the client's "
                f"context lacks {' and '.join(missing)} ([gssapi] require_sequence)")

    def decode(self, data: bytes) -> bytes:
        """Whole frames received so far -> their plaintext; raises WireError
        (malformed frame, tampering, replay, wrong protection).

        Each token is copied once, out of the read it came in, or into a
        buffer of its size when reads cut it: the bytes of a bulk stream
        are not moved through a growing buffer frame after frame."""
        out: list[bytes] = []
        pos, size = 0, len(data)
        token = self.token
        if token is not None:
            # The rest of a token begun in an earlier read.
            take = min(len(token) - self.filled, size)
            token[self.filled:self.filled + take] = memoryview(data)[:take]
            self.filled += take
            if self.filled < len(token):
                return b""
            self.token, pos = None, take
            out.append(self._unwrap(token))
        elif self.head:
            # A head cut short (at most three bytes): rare enough to join.
            data, self.head = self.head + data, b""
            size = len(data)
        while pos < size:
            length = rfc1961.token_length(data, pos, rfc1961.ENCAPSULATION)
            if length is None:
                self.head = data[pos:]
                break
            start = pos + 4
            pos = start + length
            if pos > size:
                token = self.token = bytearray(length)
                self.filled = size - start
                token[:self.filled] = memoryview(data)[start:]
                break
            out.append(self._unwrap(data[start:pos]))
        return b"".join(out)

    def _unwrap(self, token: bytes | bytearray) -> bytes:
        try:
            # The stubs say bytes; the binding takes any buffer that converts
            # to a char * (bytes and bytearray), and a token filled in place
            # goes in as it is.
            result = gssapi.raw.unwrap(self.context, cast(bytes, token))
        except GSSError as e:
            raise WireError(f"GSS-API unwrap failed: {e.gen_message()}") from None
        if self.encrypt and not result.encrypted:
            raise WireError("GSS-API: unencrypted frame in a confidential session")
        return result.message

    def unwrap_datagram(self, datagram: bytes) -> bytes:
        """A UDP datagram is one whole MTYP 3 frame (RFC 1961 section 6)."""
        parsed = rfc1961.parse_message(datagram, rfc1961.ENCAPSULATION)
        if parsed is None or parsed[1] != len(datagram):
            raise WireError("UDP datagram is not one whole GSS-API frame")
        try:
            result = gssapi.raw.unwrap(self.context, parsed[0].token)
        except GSSError as e:
            raise WireError(f"GSS-API unwrap failed: {e.gen_message()}") from None
        if self.encrypt and not result.encrypted:
            raise WireError("GSS-API: unencrypted datagram in a confidential session")
        return result.message

    def wrap_datagram(self, data: bytes) -> bytes:
        """Raises ValueError when the wrapped datagram would not fit a frame."""
        token = gssapi.raw.wrap(self.context, data, self.encrypt).message
        return rfc1961.encode_message(rfc1961.ENCAPSULATION, token)

    def encode(self, data: bytes) -> bytes:
        """``data`` in frames of at most ``max_plain`` bytes of plaintext;
        heads and tokens joined once."""
        wrap, context, encrypt, limit = gssapi.raw.wrap, self.context, self.encrypt, self.max_plain
        head = rfc1961.encode_head
        if len(data) <= limit:
            token = wrap(context, data, encrypt).message
            return head(rfc1961.ENCAPSULATION, len(token)) + token
        parts: list[bytes] = []
        for start in range(0, len(data), limit):
            token = wrap(context, data[start:start + limit], encrypt).message
            parts += (head(rfc1961.ENCAPSULATION, len(token)), token)
        return b"".join(parts)


@implementer(IProtocol, ITransport, IPushProducer, IConsumer)
class ProtectionWrapper:
    """The transport's protocol (it unwraps what arrives) and the protocol's
    transport (it wraps what is written). Writes go down at once, never
    buffered here, so producers, pausing and half-closes are the transport's
    own and pass straight through."""

    # The transport below, from :func:`start` or makeConnection, before which
    # neither it nor the protocol above calls the wrapper.
    transport: IStreamTransport

    def __init__(self, protocol: IProtocol, layer: SecurityLayer) -> None:
        # None once the connection is lost (see connectionLost).
        self.protocol: IProtocol | None = protocol
        self.layer = layer
        self.failure: Failure | None = None    # set once a frame was refused
        if IHalfCloseableProtocol.providedBy(protocol):
            # A transport half-closes only a protocol that says it can.
            alsoProvides(self, IHalfCloseableProtocol)

    def _attach(self, transport: IStreamTransport) -> None:
        self.transport = transport
        if ITCPTransport.providedBy(transport):
            alsoProvides(self, ITCPTransport)   # the rest of it via __getattr__

    def _above(self) -> IProtocol:
        # The transport calls nothing after connectionLost, which drops it.
        assert self.protocol is not None, "called after connectionLost"
        return self.protocol

    # IProtocol, to the transport below.

    def makeConnection(self, transport: ITransport) -> None:
        """For a wrapper in place from the start; :func:`start` slips one
        under a protocol already connected instead."""
        self._attach(_stream(transport))
        self._above().makeConnection(self)

    def connectionMade(self) -> None:
        """The protocol above was told by its own makeConnection."""

    def dataReceived(self, data: bytes) -> None:
        if self.failure is not None:
            return       # aborting: nothing more reaches the protocol
        try:
            plain = self.layer.decode(data)
        except WireError as e:
            self.failure = Failure(ProtectionFailed(str(e)))
            self.transport.abortConnection()
            return
        if plain:
            self._above().dataReceived(plain)

    # IHalfCloseableProtocol: the transport calls these only when the wrapper
    # provides it, which it does only over a protocol that does.

    def readConnectionLost(self) -> None:
        if self.failure is None:
            IHalfCloseableProtocol(self._above()).readConnectionLost()

    def writeConnectionLost(self) -> None:
        IHalfCloseableProtocol(self._above()).writeConnectionLost()

    def connectionLost(self, reason: Failure) -> None:
        # Dropped, as Twisted's own connections drop theirs, so the two
        # protocols are freed at once, not at the next collection.
        protocol, self.protocol = self._above(), None
        protocol.connectionLost(self.failure if self.failure is not None else reason)

    # ITransport and IConsumer, to the protocol above.

    def write(self, data: bytes) -> None:
        if data:
            self.transport.write(self.layer.encode(data))

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self.transport.abortConnection()

    def loseWriteConnection(self) -> None:
        self.transport.loseWriteConnection()

    def getPeer(self) -> IAddress:
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        return self.transport.getHost()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    # IPushProducer: the protocol pauses reading from its peer.

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()

    def __getattr__(self, name: str) -> Any:
        # The rest of the transport (disconnecting, TCP options, ...) is the
        # one below. Before it is attached there is none: looked up in the
        # instance's own attributes, "transport" cannot recurse here.
        below = self.__dict__.get("transport")
        if below is None:
            raise AttributeError(name)
        return getattr(below, name)


def _stream(transport: ITransport) -> IStreamTransport:
    """The transport of a protocol protection runs under: a TCP or UNIX
    connection, or a TLS or PROXY wrapper of one, which Twisted's annotations
    call an ITransport (IStreamTransport is for annotations only: no check)."""
    return cast(IStreamTransport, transport)


def start(protocol: Protocol, context: gssapi.SecurityContext, level: int,
          require_sequence: bool = True) -> ProtectionWrapper:
    """Slip protection at ``level`` (integrity or confidentiality) under
    ``protocol``, connected already: from now on what it writes goes out
    wrapped and it reads plaintext. Bytes read below before this call (past
    the negotiation) go to the wrapper's ``dataReceived``."""
    if level not in (rfc1961.INTEGRITY, rfc1961.CONFIDENTIALITY):
        raise ValueError(f"no encapsulation at protection level {level}")
    transport = protocol.transport
    if transport is None:
        raise TypeError(f"{protocol!r} is not connected: nothing to slip protection under")
    wrapper = ProtectionWrapper(protocol, SecurityLayer(context, level, require_sequence))
    _deliver_to(wrapper, transport, protocol)
    wrapper._attach(_stream(transport))
    protocol.transport = wrapper
    return wrapper


_DELIVERING = ("protocol", "wrappedProtocol", "_wrappedProtocol")


def _deliver_to(wrapper: ProtectionWrapper, transport: ITransport, protocol: Protocol) -> None:
    """Make whatever hands ``protocol`` its bytes hand them to ``wrapper``.

    Twisted has no public way to ask, so this follows the references that
    its transports keep: a connection's ``protocol`` (sockets, and what
    startTLS put there), a ProtocolWrapper's ``wrappedProtocol`` (haproxy:
    and TLS listeners) and a client endpoint's ``_wrappedProtocol``.
    """
    holder: object = transport        # transports and protocols, whatever Twisted chains
    seen: set[int] = set()
    while holder is not None and id(holder) not in seen:
        seen.add(id(holder))
        # The instance's own attributes: a ProtocolWrapper's __getattr__
        # would answer for its transport.
        attributes = getattr(holder, "__dict__", {})
        deeper: object = None
        for name in _DELIVERING:
            below = attributes.get(name)
            if below is protocol:
                setattr(holder, name, wrapper)
                return
            if deeper is None:
                deeper = below
        holder = deeper
    raise TypeError(f"cannot tell what delivers {protocol!r}'s bytes in {transport!r}")
