"""The seam between a SOCKS handshake and the session that owns it.

A handshake (SOCKS4 or SOCKS5) parses what the client sends and asks its
owner, a :class:`RequestOwner`, to carry the request out; it never touches
the session's state. :class:`Requesting` holds what both versions do once a
request is answered: the success reply, then the relay.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from socksd.auth import User
from socksd.auth.methods import Established
from socksd.proxy.bind import Incoming, Listening
from socksd.proxy.connect import ConnectFailed, Outbound, classify
from socksd.relay import RelayEnd
from socksd.rules import IPAddress


class RequestOwner(Protocol):
    """What a handshake may ask of the session it runs in."""

    transport: Any             # the client's connection
    peer: str                  # the client as logs show it
    client: IPAddress          # the client's address, as the rules see it

    @property
    def client_key(self) -> str | None:
        """The client's address as per-client bounds count it."""

    def note(self, *, method: str | None = None, command: str | None = None,
             detail: str | None = None) -> None:
        """Write down what the session line reports: the method chosen, the
        command asked for, a detail (e.g. why a USERID was taken on trust)."""

    def authenticated(self, method: str, avatar: User,
                      established: Established | None = None) -> None:
        """``established``: a GSS-API context and protection level; all that
        follows is wrapped (the owner slips the protection layer under it)."""

    def authentication_failed(self, method: str, user: str | None, reason: str) -> None: ...

    def connect(self, host: str, port: int, by_name: bool) -> Deferred[Outbound]: ...

    def bind(self, host: str, port: int, by_name: bool) -> Deferred[Listening]: ...

    def udp_associate(self, host: str, port: int) -> Deferred[tuple[str, int]]: ...

    def start_relay(self, end: RelayEnd, reply: bytes, early: bytes = b"") -> None:
        """Write the last reply, then relay, starting with ``early``."""

    def connect_failed(self, failed: ConnectFailed) -> None:
        """The request failed; its reply was written already."""

    def fail(self, outcome: str, detail: str = "", abort: bool = False) -> None:
        """End the session before the relay; any reply was written already."""


class Requesting:
    """The tail of a handshake: replies to a CONNECT or BIND, then the relay.
    A subclass says how its version encodes a success and a failure."""

    __slots__ = ("owner", "buffer")

    def __init__(self, owner: RequestOwner) -> None:
        self.owner = owner
        self.buffer = b""

    @property
    def transport(self) -> Any:
        return self.owner.transport

    def success(self, host: str, port: int) -> bytes:
        raise NotImplementedError

    def failure(self, failed: ConnectFailed) -> bytes:
        raise NotImplementedError

    def _connected(self, outbound: Outbound) -> None:
        local = outbound.transport.getHost()
        self._relay(outbound, local.host, local.port)

    def _bound(self, waiter: Listening) -> None:
        """First BIND reply: where the client's peer should connect."""
        self.transport.write(self.success(*waiter.bound))
        waiter.accepted.addCallbacks(self._bind_accepted, self._refused)

    def _bind_accepted(self, incoming: Incoming) -> None:
        """Second BIND reply: who connected (through an upstream, the peer it
        named); then relay."""
        announced = incoming.announced
        if announced is None:
            peer = incoming.transport.getPeer()
            announced = peer.host, peer.port
        self._relay(incoming, *announced)

    def _relay(self, end: RelayEnd, host: str, port: int) -> None:
        """The last reply names host:port (where we connected from, or who
        connected to us); then relay, passing on what the client sent early."""
        early, self.buffer = self.buffer, b""
        self.owner.start_relay(end, self.success(host, port), early)

    def _refused(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            return  # the client went away while we connected
        failed = classify(failure)
        self.transport.write(self.failure(failed))
        self.owner.connect_failed(failed)
