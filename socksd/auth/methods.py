"""SOCKS5 authentication methods, by name and code.

A method's ``start`` returns a negotiation object that is fed the client's
bytes until it calls back the session with an avatar (or a failure). The
session never knows which method ran; GSS-API also hands up what it
established, from which the layer above starts protection.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import Portal
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from socksd.auth import ANONYMOUS, ClientUsernamePassword, IUser, User
from socksd.auth.hashing import TooManyChecks
from socksd.escape import escape
from socksd.wire import WireError, rfc1929, socks5

if TYPE_CHECKING:
    import gssapi

log = Logger(namespace="socksd")


@dataclass(frozen=True)
class Established:
    """What a GSS-API negotiation agreed on, for the layer above to protect
    the session with (socksd.protection.start). Here, not in gss.py, as
    part of the seam that hands it up (:meth:`Authenticating.authenticated`)."""

    context: gssapi.SecurityContext
    level: int                  # rfc1961.INTEGRITY or CONFIDENTIALITY
    require_sequence: bool      # CONNECT and BIND need replay and sequence detection


class Authenticating(Protocol):
    """What a method needs of the session it authenticates (read only: the
    handshake answers some of these from its session)."""

    @property
    def transport(self) -> ITransport:
        """The client's connection: the method's replies go here."""

    @property
    def client_key(self) -> str | None:
        """The client's address: per-client bounds and backoff."""

    @property
    def reactor(self) -> IReactorTime:
        """The session's reactor: its clock and timers."""

    @property
    def handshake_deadline(self) -> float:
        """When (``reactor.seconds()``) the handshake times out."""

    def authenticated(self, method: str, avatar: User, rest: bytes,
                      established: Established | None = None) -> None:
        """``established``: what a GSS-API negotiation agreed on, protecting
        all that follows, ``rest`` included."""

    def authentication_failed(self, method: str, user: str | None, reason: str) -> None: ...


class Negotiation(Protocol):
    def data_received(self, data: bytes) -> None: ...

    def cancel(self) -> None: ...


class Method:
    """Base for a SOCKS5 method: a code on the wire and a name in the config."""

    code: int
    name: str

    def start(self, session: Authenticating) -> Negotiation | None:
        """Begin sub-negotiation; ``None`` means authenticated at once."""
        raise NotImplementedError


class NoAuth(Method):
    code = socks5.NO_AUTH
    name = "none"

    def start(self, session: Authenticating) -> None:
        session.authenticated(self.name, ANONYMOUS, b"")
        return None


# Defaults of [server] auth_failure_backoff, auth_failure_backoff_max and
# auth_failure_clients.
BACKOFF = 1.0
BACKOFF_MAX = 30.0
BACKOFF_CLIENTS = 10000


class Backoff:
    """Failed logins per client address, to slow down password guessing.

    After its n-th failed login in a row, an address waits ``first * 2**(n-1)``
    seconds (at most ``longest``) before its next password is checked. A
    success forgets the address, and so do ``2 * longest`` seconds without
    a failure (a backoff ends at most ``longest`` after the last failure).
    At most ``clients`` addresses are remembered: beyond, the one whose last
    failure is oldest is forgotten first. ``first = 0`` turns it off.
    """

    def __init__(self, first: float = BACKOFF, longest: float = BACKOFF_MAX,
                 clients: int = BACKOFF_CLIENTS) -> None:
        self.first = first
        self.longest = longest
        self.clients = clients
        # client -> (failures, time of the last, end of the backoff), oldest
        # last failure first.
        self.failures: OrderedDict[str, tuple[int, float, float]] = OrderedDict()

    def wait(self, client: str | None, now: float) -> tuple[int, float]:
        """(failures in a row, seconds left of the backoff) for ``client``."""
        if client is None:
            return 0, 0.0
        entry = self.failures.get(client)
        if entry is None:
            return 0, 0.0
        count, last, until = entry
        if now >= last + 2 * self.longest:
            del self.failures[client]
            return 0, 0.0
        return count, max(0.0, until - now)

    def failed(self, client: str | None, now: float) -> tuple[int, float]:
        """Count a failed login: (failures in a row, the backoff it starts)."""
        if not self.first or client is None:
            return 0, 0.0
        count = self.wait(client, now)[0] + 1
        self.failures.pop(client, None)
        while self.failures:          # forget the stale, oldest first
            key, (_count, last, _until) = next(iter(self.failures.items()))
            if now < last + 2 * self.longest and len(self.failures) < self.clients:
                break
            del self.failures[key]
        delay = min(self.first * 2.0 ** min(count - 1, 64), self.longest)
        self.failures[client] = (count, now, now + delay)
        return count, delay

    def succeeded(self, client: str | None) -> None:
        if client is not None:
            self.failures.pop(client, None)

    def resize(self, first: float, longest: float, clients: int) -> None:
        """New settings (a reload); what is remembered stays, within the new
        bound: a reload must not forgive a password guesser."""
        self.first, self.longest, self.clients = first, longest, clients
        while len(self.failures) > clients:
            self.failures.popitem(last=False)


class UserPass(Method):
    """RFC 1929 username/password, checked through a twisted.cred Portal."""

    code = socks5.USERPASS
    name = "userpass"

    def __init__(self, portal: Portal, backoff: Backoff | None = None) -> None:
        self.portal = portal
        self.backoff = backoff if backoff is not None else Backoff()

    def start(self, session: Authenticating) -> "_UserPassNegotiation":
        return _UserPassNegotiation(self, session)


# What Portal.login fires with: (interface, avatar, logout).
Login = tuple[type[Interface], object, Callable[[], None]]


class _UserPassNegotiation:
    """One RFC 1929 exchange. A login from an address in backoff waits for
    the backoff to end before its password is checked (so the answer comes
    late), or is refused at once when the backoff outlasts the handshake."""

    __slots__ = ("method", "session", "buffer", "pending", "credentials", "name", "timer")

    # A request is at most 1 + 1 + 255 + 1 + 255 bytes.
    MAX_REQUEST = 513

    def __init__(self, method: UserPass, session: Authenticating) -> None:
        self.method = method
        self.session = session
        self.buffer = b""
        self.pending: Deferred[Login] | None = None
        self.credentials: ClientUsernamePassword | None = None   # until checked
        self.name = ""
        self.timer: IDelayedCall | None = None

    def data_received(self, data: bytes) -> None:
        if self.pending is not None or self.credentials is not None:
            # Bytes after the request while it waits or the checker runs:
            # keep them for the SOCKS request, bounded by the session's
            # handshake buffer.
            self.buffer += data
            return
        self.buffer += data
        try:
            parsed = rfc1929.parse_request(self.buffer)
        except WireError as e:
            self.session.transport.write(rfc1929.encode_response(rfc1929.FAILURE))
            self.session.authentication_failed(UserPass.name, None, str(e))
            return
        if parsed is None:
            return
        (username, password), used = parsed
        self.buffer = self.buffer[used:]
        self.name = username.decode("utf-8", "backslashreplace")
        self.credentials = ClientUsernamePassword(username, password, self.session.client_key)
        self._check()

    def _check(self) -> None:
        """Check the password now, or once the client's backoff is over."""
        self.timer = None
        session = self.session
        now = session.reactor.seconds()
        failures, wait = self.method.backoff.wait(session.client_key, now)
        if wait > 0:
            if now + wait >= session.handshake_deadline:
                self._refuse(f"backoff after {failures} failed login{'s' * (failures > 1)} "
                             f"in a row from this address: {wait:.3g} s left, past the "
                             "handshake timeout")
            else:
                self.timer = session.reactor.callLater(wait, self._check)
            return
        credentials, self.credentials = self.credentials, None
        assert credentials is not None, "kept by data_received until this login"
        self.pending = self.method.portal.login(credentials, None, IUser)
        self.pending.addCallbacks(self._succeeded, self._failed)

    def _succeeded(self, result: Login) -> None:
        _interface, avatar, _logout = result
        assert isinstance(avatar, User), "the portal's realm is SOCKSRealm, for IUser"
        self.method.backoff.succeeded(self.session.client_key)
        rest, self.buffer = self.buffer, b""
        self.session.transport.write(rfc1929.encode_response(rfc1929.SUCCESS))
        self.session.authenticated(UserPass.name, avatar, rest)

    def _failed(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            return  # the session went away while the checker ran
        if failure.check(UnauthorizedLogin):
            failures, delay = self.method.backoff.failed(self.session.client_key,
                                                         self.session.reactor.seconds())
            reason = "bad username or password"
            if delay:
                reason += f" (failure {failures} in a row from this address: backoff {delay:g} s)"
        elif failure.check(UnhandledCredentials):
            reason = "bad username or password"
        elif failure.check(TooManyChecks):
            reason = failure.getErrorMessage()   # refused unchecked: not a failure
        else:
            reason = f"checker error: {failure.getErrorMessage()}"
            log.failure("checker failed for {user_text}", failure,
                        user_text=escape(self.name), user=self.name)
        self._refuse(reason)

    def _refuse(self, reason: str) -> None:
        self.session.transport.write(rfc1929.encode_response(rfc1929.FAILURE))
        self.session.authentication_failed(UserPass.name, self.name, reason)

    def cancel(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.pending is not None and not self.pending.called:
            self.pending.cancel()

