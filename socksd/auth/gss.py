"""GSS-API (RFC 1961): Kerberos authentication for SOCKS5.

The acceptor side runs on python-gssapi (MIT krb5). The negotiation ends by
handing up what it established (:class:`~socksd.auth.methods.Established`);
the protection that wraps everything after it (integrity or confidentiality)
is :mod:`socksd.protection`, a layer above this one, which the proxy starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gssapi
from gssapi.exceptions import GSSError
from twisted.logger import Logger

from socksd.auth import User
from socksd.auth.methods import Authenticating, Established, Method
from socksd.escape import escape
from socksd.wire import WireError, rfc1961, socks5

log = Logger(namespace="socksd")

LEVEL_NAMES = {"clear": rfc1961.CLEAR, "integrity": rfc1961.INTEGRITY,
               "confidentiality": rfc1961.CONFIDENTIALITY}


def split_principal(principal: str) -> tuple[str, str | None]:
    """``alice@REALM`` -> ("alice", "REALM"). In krb5's display form an @
    inside a name component is escaped (``a\\@b@REALM``), so the realm
    follows the first unescaped @."""
    escaped = False
    for index, char in enumerate(principal):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "@":
            return principal[:index], principal[index + 1:]
    return principal, None


def default_realm() -> str | None:
    """krb5's default realm (krb5.conf's ``default_realm``), or None when
    it names none: a principal name without a realm gets this one."""
    try:
        name = gssapi.Name("socksd", gssapi.NameType.kerberos_principal)
        canonical = name.canonicalize(gssapi.MechType.kerberos)
    except GSSError:
        return None
    return split_principal(str(canonical))[1] or None


def default_local_realms() -> frozenset[str]:
    realm = default_realm()
    return frozenset({realm}) if realm else frozenset()


@dataclass(frozen=True)
class GSSAPISettings:
    """The config's ``[gssapi]`` table."""

    keytab: str | None = None        # None: KRB5_KTNAME, or the system's default keytab
    service: str = "rcmd"            # accept any key of this service (rcmd/<any host>)
    principal: str | None = None     # ... or only this principal (rcmd/proxy.example@REALM)
    levels: tuple[int, ...] = (rfc1961.INTEGRITY, rfc1961.CONFIDENTIALITY)
    nec_compat: bool = False         # protection octet sent unwrapped (NEC's client)
    principal_map: str = "strip-realm"   # or "keep": how alice@REALM becomes a user name
    principals: dict[str, str] = field(default_factory=dict)   # principal -> local name, first
    require_sequence: bool = True    # CONNECT and BIND need replay + sequence detection
    # The realms strip-realm strips; by default krb5's default realm, read at start.
    local_realms: frozenset[str] = field(default_factory=default_local_realms)
    allow_anonymous: bool = False    # accept contexts with GSS_C_ANON_FLAG

    def acceptor_credentials(self) -> gssapi.Credentials:
        """Credentials from the keytab; raises GSSError if it is unusable."""
        if self.principal:
            name = gssapi.Name(self.principal, gssapi.NameType.kerberos_principal)
        else:
            # "service@" with no host: this service on any of our host names.
            name = gssapi.Name(f"{self.service}@", gssapi.NameType.hostbased_service)
        # As gssapi annotates it: a dict is invariant, a dict[str, str] would not do.
        store: dict[bytes | str, bytes | str] | None = (
            {"keytab": self.keytab} if self.keytab else None)
        return gssapi.Credentials(name=name, usage="accept", store=store)

    def local_name(self, principal: str) -> str:
        """The user name rules and logs see. strip-realm strips only a local
        realm: alice@EVIL.EXAMPLE (a realm that trusts ours, or ours trusts)
        is not the alice of our realm, so she keeps hers."""
        if principal in self.principals:
            return self.principals[principal]
        if self.principal_map == "strip-realm":
            name, realm = split_principal(principal)
            if realm is not None and realm in self.local_realms:
                return name
        return principal

    def choose_level(self, asked: int) -> int | None:
        """The asked level if accepted, else the closest stronger accepted one.
        Selective protection (3) is refused, as Dante refuses it."""
        if asked == rfc1961.SELECTIVE:
            return None
        for level in sorted(self.levels):
            if level >= asked:
                return level
        return None


class GSSAPIMethod(Method):
    code = socks5.GSSAPI
    name = "gssapi"

    def __init__(self, settings: GSSAPISettings) -> None:
        self.settings = settings
        self.credentials = settings.acceptor_credentials()

    def start(self, session: Authenticating) -> _Negotiation:
        return _Negotiation(self, session)


class _Negotiation:
    """Context establishment (MTYP 1) then protection level (MTYP 2)."""

    __slots__ = ("method", "session", "buffer", "context", "state")

    def __init__(self, method: GSSAPIMethod, session: Authenticating) -> None:
        self.method = method
        self.session = session
        self.buffer = b""
        self.context = gssapi.SecurityContext(creds=method.credentials, usage="accept")
        self.state: int | None = rfc1961.CONTEXT    # the MTYP expected; None once done

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.state is not None:
            try:
                parsed = rfc1961.parse_message(self.buffer, self.state)
            except WireError as e:
                self._abort(str(e))
                return
            if parsed is None:
                return
            (_mtyp, token), used = parsed
            self.buffer = self.buffer[used:]
            try:
                if self.state == rfc1961.CONTEXT:
                    self._context(token)
                else:
                    self._protection(token)
            except GSSError as e:
                self._abort(f"GSS-API: {e.gen_message()}")
                return

    def _context(self, token: bytes) -> None:
        out = self.context.step(token)
        # An output token goes back whatever the state. When the context
        # completes with none, the client's own context is complete too (it
        # asked for no mutual authentication) and reads no token: sending an
        # empty one would be taken for the protection-level reply (curl).
        if out:
            self.session.transport.write(rfc1961.encode_message(rfc1961.CONTEXT, out))
        if self.context.complete:
            if (gssapi.RequirementFlag.anonymity in self.context.actual_flags
                    and not self.method.settings.allow_anonymous):
                # Anonymous PKINIT: the KDC vouches for no one, yet a rule
                # that allows any authenticated user would let it in.
                self._abort("anonymous GSS-API context (GSS_C_ANON_FLAG) refused "
                            "([gssapi] allow_anonymous)")
                return
            self.state = rfc1961.PROTECTION

    def _protection(self, token: bytes) -> None:
        settings = self.method.settings
        nec = settings.nec_compat and len(token) == 1
        if nec:
            octet = token
        else:
            unwrapped = self.context.unwrap(token)
            octet = unwrapped.message
        if len(octet) != 1:
            self._abort(f"protection level message of {len(octet)} bytes")
            return
        level = settings.choose_level(octet[0])
        if level is None:
            self._abort(f"protection level {octet[0]} not accepted")
            return
        answer = bytes((level,)) if nec else self.context.wrap(bytes((level,)), False).message
        self.session.transport.write(rfc1961.encode_message(rfc1961.PROTECTION, answer))
        self.state = None
        principal = str(self.context.initiator_name)
        rest, self.buffer = self.buffer, b""
        established = (Established(self.context, level, settings.require_sequence)
                       if level != rfc1961.CLEAR else None)
        name = settings.local_name(principal)
        # user (a JSON line's field) raw, as a session's; the line escapes it.
        log.info("{peer} gssapi: {principal} as {user_text}, protection {protection}",
                 peer=escape(getattr(self.session, "peer", "-"), spaces=True),
                 principal=escape(principal, spaces=True),
                 user_text=escape(name, spaces=True), user=name, protection=level)
        self.session.authenticated(GSSAPIMethod.name, User(name), rest, established)

    def _abort(self, reason: str) -> None:
        self.state = None
        self.session.transport.write(rfc1961.ABORT)
        self.session.authentication_failed(GSSAPIMethod.name, None, reason)

    def cancel(self) -> None:
        """The session ends (timeout, client gone) mid-negotiation: abort."""
        if self.state is not None:
            self.state = None
            self.session.transport.write(rfc1961.ABORT)

