"""SOCKS5 authentication methods, by name and code.

A method's ``start`` returns a negotiation object that is fed the client's
bytes until it calls back the session with an avatar (or a failure). The
session never knows which method ran; later methods (GSS-API) also hand the
session a transport wrapper.
"""

from __future__ import annotations

from typing import Protocol

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import Portal
from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from socksd.auth import ANONYMOUS, ClientUsernamePassword, IUser, User
from socksd.auth.hashing import TooManyChecks
from socksd.wire import WireError, rfc1929, socks5

log = Logger()


class Authenticating(Protocol):
    """What a method needs of the session it authenticates."""

    transport: object
    client_key: str | None     # the client's address: per-client bounds

    def authenticated(self, method: str, avatar: User, rest: bytes, layer=None) -> None:
        """``layer``: a security layer (GSS-API) that wraps all that follows."""

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


class UserPass(Method):
    """RFC 1929 username/password, checked through a twisted.cred Portal."""

    code = socks5.USERPASS
    name = "userpass"

    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    def start(self, session: Authenticating) -> "_UserPassNegotiation":
        return _UserPassNegotiation(self, session)


class _UserPassNegotiation:
    __slots__ = ("method", "session", "buffer", "pending", "name")

    # A request is at most 1 + 1 + 255 + 1 + 255 bytes.
    MAX_REQUEST = 513

    def __init__(self, method: UserPass, session: Authenticating) -> None:
        self.method = method
        self.session = session
        self.buffer = b""
        self.pending = None
        self.name = ""

    def data_received(self, data: bytes) -> None:
        if self.pending is not None:
            # Bytes after the request while the checker runs: keep them for
            # the SOCKS request, bounded by the session's handshake buffer.
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
        username, password, used = parsed
        self.buffer = self.buffer[used:]
        self.name = username.decode("utf-8", "backslashreplace")
        credentials = ClientUsernamePassword(username, password, self.session.client_key)
        self.pending = self.method.portal.login(credentials, None, IUser)
        self.pending.addCallbacks(self._succeeded, self._failed)

    def _succeeded(self, result) -> None:
        _interface, avatar, _logout = result
        rest, self.buffer = self.buffer, b""
        self.session.transport.write(rfc1929.encode_response(rfc1929.SUCCESS))
        self.session.authenticated(UserPass.name, avatar, rest)

    def _failed(self, failure) -> None:
        if failure.check(CancelledError):
            return  # the session went away while the checker ran
        if failure.check(UnauthorizedLogin, UnhandledCredentials):
            reason = "bad username or password"
        elif failure.check(TooManyChecks):
            reason = failure.getErrorMessage()   # refused unchecked
        else:
            reason = f"checker error: {failure.getErrorMessage()}"
            log.failure("checker failed for {user}", failure, user=self.name)
        self._refuse(reason)

    def _refuse(self, reason: str) -> None:
        self.session.transport.write(rfc1929.encode_response(rfc1929.FAILURE))
        self.session.authentication_failed(UserPass.name, self.name, reason)

    def cancel(self) -> None:
        if self.pending is not None and not self.pending.called:
            self.pending.cancel()


def method_registry(portal: Portal | None, gssapi_settings=None) -> dict[str, Method]:
    """Every method this configuration can offer, by config name."""
    registry: dict[str, Method] = {NoAuth.name: NoAuth()}
    if portal is not None:
        registry[UserPass.name] = UserPass(portal)
    if gssapi_settings is not None:
        from socksd.auth.gss import GSSAPIMethod

        registry[GSSAPIMethod.name] = GSSAPIMethod(gssapi_settings)
    return registry
