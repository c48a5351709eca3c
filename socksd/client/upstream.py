"""Upstream proxies: a session's connections made through another proxy.

One ``[[upstreams]]`` entry is one :class:`Upstream`, parsed from its URL
by :func:`parse_upstream` (a ValueError names what is wrong; the config
layer adds "file:line key:"). The forms::

    socks5://HOST:PORT                 SOCKS5, no authentication
    socks5://USER:PASS@HOST:PORT       SOCKS5, RFC 1929 (USER, PASS percent-decoded)
    socks5+gssapi://HOST:PORT          SOCKS5, RFC 1961 GSS-API with this process's own
                                       credentials (default ccache, or client keytab:
                                       KRB5_CLIENT_KTNAME); service "rcmd@HOST", or
                                       ?service=NAME ("NAME@HOST"; a NAME with "@" is whole)
    socks5+tls://[USER:PASS@]HOST:PORT SOCKS5 inside TLS, the certificate verified for
                                       HOST (service-identity); ?ca=PATH: a PEM file of the
                                       CA to trust instead of the system's (needs pyOpenSSL:
                                       the socksd[tls] extra)
    socks4://[USERID@]HOST:PORT        SOCKS4a (names sent unresolved); CONNECT and BIND
    http://[USER:PASS@]HOST:PORT       HTTP CONNECT, optional Basic Proxy-Authorization

HOST is a name or an address ([...] for IPv6); the port is required.

What the proxy layer calls (it asks for "a connection to X" and does not
care whether it is direct or chained)::

    upstream.connect(reactor, host, port, factory, timeout) -> Deferred[protocol]
    upstream.endpoint(reactor, host, port, timeout)         -> IStreamClientEndpoint
    upstream.bind(reactor, host, port, factory, timeout, accept_timeout) -> Deferred[Bound]
    upstream.udp_associate(reactor, received, timeout)      -> Deferred[Association]
    upstream.commands      # frozenset of "connect", "bind", "udp" it can do
    upstream.name, upstream.url_text (password shown as ***), scheme, host, port

* ``connect``: CONNECT to host:port through the upstream; host may be a name
  (sent unresolved: the upstream resolves it) or an address. Fires with the
  protocol ``factory`` built, connected to the upstream's transport after
  the handshake; bytes that came with the upstream's reply are delivered to
  it right after the Deferred fires. Half-closes reach it as they would on a
  direct connection.
* ``bind``: fires with :class:`~socksd.client.handshake.Bound` at the first
  reply: ``.host``/``.port`` are where the *upstream* listens (tell the
  client these), ``.accepted`` fires with ``Accepted(host, port, protocol)``
  at the second reply (the peer, and ``factory``'s protocol connected to it)
  or fails (``accept_timeout``, the upstream's failure reply, it closed).
* ``udp_associate``: SOCKS5 only. Holds the control TCP connection; fires
  with an :class:`~socksd.client.socks5.Association`: ``.relay_address``,
  ``.send(payload, host, port) -> bool``, ``.close()``, and ``.closed``, a
  Deferred that fires (with the reason) when the association ends, by
  ``close()`` or because the upstream closed the control connection.
  ``received(src_host, src_port, payload)`` is called for each datagram
  coming back. Under socks5+gssapi each datagram is a protected RFC 1961
  frame; under socks5+tls only the control connection is in TLS (SOCKS5
  has no TLS for datagrams).

Every call is bounded by ``timeout`` seconds (connecting, TLS, the
handshake: all of it) and fails with exactly one of two errors:

* :class:`UpstreamFailed`: the upstream could not serve us (unreachable,
  refused, TLS or authentication failed, malformed answer, timeout, a
  command it does not do): try the next upstream; ``reply`` is what to tell
  the client if none works (general failure, or command not supported).
* :class:`DestinationFailed`: the upstream answered our request with a
  failure (its rules, or the destination unreachable/refused): ``reply`` is
  that answer as a SOCKS5 reply code, for the client.

Cancelling the Deferred (the client left) cancels the attempt; that
CancelledError passes through as it is.

The upstream only ever gets the credentials in its URL: nothing of the
client (its user name, password, USERID or Kerberos identity) is sent.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote, urlsplit

from twisted.internet import defer
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from socksd.client import http, socks4, socks5
from socksd.client.errors import DestinationFailed, SOCKSError, UpstreamFailed
from socksd.client.handshake import Bound
from socksd.client.socks5 import Association, SOCKS5Auth
from socksd.twisted_internals import tls_client
from socksd.wire import rfc1961
from socksd.wire import socks5 as wire5
from socksd.wire.names import normalize_name

__all__ = ["DestinationFailed", "SCHEMES", "Upstream", "UpstreamFailed", "parse_upstream"]

# Scheme -> what it can do.
SCHEMES: dict[str, frozenset[str]] = {
    "socks5": frozenset({"connect", "bind", "udp"}),
    "socks5+gssapi": frozenset({"connect", "bind", "udp"}),
    "socks5+tls": frozenset({"connect", "bind", "udp"}),
    "socks4": frozenset({"connect", "bind"}),
    "http": frozenset({"connect"}),
}
# Query options each scheme takes.
_OPTIONS = {"socks5+gssapi": ("service",), "socks5+tls": ("ca",)}
TLS_NEEDS = "socks5+tls: upstreams need pyOpenSSL: pip install 'socksd[tls]'"
MAX_CREDENTIAL = 255     # RFC 1929's and SOCKS4's field limits, in bytes


@dataclass(frozen=True)
class Upstream:
    """One upstream proxy (see the module docstring for its use)."""

    name: str
    scheme: str
    host: str
    port: int
    url_text: str                       # the URL with the password as ***
    username: str | None = None         # RFC 1929 / Basic user, or the SOCKS4 USERID
    password: str | None = field(default=None, repr=False)
    gssapi_service: str | None = None   # socks5+gssapi: "service@host"
    ca: str | None = None               # socks5+tls: the CA file, if not the system's
    # socks5+tls: pyOpenSSL's connection creator (made at parsing, which
    # reads the CA file: a bad file is a config error, not a failed session)
    tls: Any = field(default=None, repr=False, compare=False)
    # A name is resolved here (bounded, each address checked by the rules)
    # and the upstream is sent the address; else it gets the name as given.
    resolve_locally: bool = False

    @property
    def commands(self) -> frozenset[str]:
        return SCHEMES[self.scheme]

    def __str__(self) -> str:
        return f"upstream {self.name}"

    # What the proxy layer calls.

    def connect(self, reactor: Any, host: str, port: int, factory: IProtocolFactory,
                timeout: float) -> defer.Deferred[IProtocol]:
        proxy = self._proxy(reactor, timeout)
        if self.scheme == "http":
            d = http.connect(proxy, host, port, factory, timeout, self.username, self.password,
                             clock=reactor)
        elif self.scheme == "socks4":
            d = socks4.connect(proxy, host, port, factory, timeout, self.username or "",
                               clock=reactor)
        else:
            d = socks5.connect(proxy, self._auth(), host, port, factory, timeout,
                               clock=reactor)
        return self._bounded(d, reactor, timeout)

    def endpoint(self, reactor: Any, host: str, port: int,
                 timeout: float) -> IStreamClientEndpoint:
        """host:port through this upstream, as a client endpoint."""
        return _Through(self, reactor, host, port, timeout)

    def bind(self, reactor: Any, host: str, port: int, factory: IProtocolFactory,
             timeout: float, accept_timeout: float) -> defer.Deferred[Bound]:
        if "bind" not in self.commands:
            return self._unsupported("bind")
        proxy = self._proxy(reactor, timeout)
        if self.scheme == "socks4":
            d = socks4.bind(proxy, host, port, factory, timeout, accept_timeout,
                            self.username or "", clock=reactor)
        else:
            d = socks5.bind(proxy, self._auth(), host, port, factory, timeout, accept_timeout,
                            clock=reactor)

        def bound(result: Bound) -> Bound:
            result.accepted.addErrback(self._classify, accept_timeout)
            return result

        return self._bounded(d, reactor, timeout).addCallback(bound)

    def udp_associate(self, reactor: Any, received: Callable[[str, int, bytes], None],
                      timeout: float) -> defer.Deferred[Association]:
        if "udp" not in self.commands:
            return self._unsupported("udp")
        d = socks5.udp_associate(self._proxy(reactor, timeout), self._auth(), reactor,
                                 received, timeout)
        return self._bounded(d, reactor, timeout)

    # The parts.

    def _proxy(self, reactor: Any, timeout: float) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint
        if ":" in self.host:
            endpoint = TCP6ClientEndpoint(reactor, self.host, self.port, timeout=timeout)
        elif _is_ipv4(self.host):
            # An address: no lookup (HostnameEndpoint's goes through a thread).
            endpoint = TCP4ClientEndpoint(reactor, self.host, self.port, timeout=timeout)
        else:
            endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if self.tls is not None:
            # TLS that passes a relay's half-close on as close_notify.
            endpoint = tls_client(self.tls, endpoint)
        return endpoint

    def _auth(self) -> SOCKS5Auth:
        return SOCKS5Auth(username=self.username, password=self.password,
                          gssapi_service=self.gssapi_service,
                          gssapi_level=rfc1961.CONFIDENTIALITY)

    def _unsupported(self, command: str) -> defer.Deferred:
        return defer.fail(UpstreamFailed(f"{self}: {self.scheme} does not do {command}",
                                         wire5.COMMAND_NOT_SUPPORTED))

    def _bounded(self, d: defer.Deferred, reactor: Any, timeout: float) -> defer.Deferred:
        d.addTimeout(timeout, reactor)
        return d.addErrback(self._classify, timeout)

    def _classify(self, failure: Failure, timeout: float) -> Failure:
        """Every failure as UpstreamFailed or DestinationFailed, naming us."""
        error = failure.value
        if failure.check(defer.CancelledError):
            return failure            # our caller's own doing
        if isinstance(error, DestinationFailed):
            raised: SOCKSError = DestinationFailed(f"{self}: {error}", error.reply)
        elif isinstance(error, UpstreamFailed):
            return failure
        elif failure.check(defer.TimeoutError):
            raised = UpstreamFailed(f"{self}: no answer in {timeout:g} s",
                                    wire5.GENERAL_FAILURE)
        else:
            raised = UpstreamFailed(f"{self}: {failure.getErrorMessage()}",
                                    wire5.GENERAL_FAILURE)
        raised.__cause__ = error
        return Failure(raised)


@implementer(IStreamClientEndpoint)
class _Through:
    """host:port through an upstream, as a client endpoint."""

    def __init__(self, upstream: Upstream, reactor: Any, host: str, port: int,
                 timeout: float) -> None:
        self.upstream, self.reactor = upstream, reactor
        self.host, self.port, self.timeout = host, port, timeout

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        return self.upstream.connect(self.reactor, self.host, self.port, protocolFactory,
                                     self.timeout)


# Parsing.


def parse_upstream(url: str, name: str | None = None, ca: str | None = None) -> Upstream:
    """One upstream from its URL (module docstring); ``name`` defaults to
    the URL as logged; ``ca`` is the CA file as ``?ca=`` would give it.
    ValueError says what is wrong, never with the password."""
    if not isinstance(url, str):
        raise ValueError(f"an upstream URL is a string, not {type(url).__name__}")
    scheme, sep, _rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"not a URL (SCHEME://HOST:PORT): {_redact_raw(url)!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r} (one of: {', '.join(SCHEMES)})")
    shown = _redact_raw(url)
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ValueError(f"{shown}: {e}") from None
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError(f"{shown}: a proxy URL has no path or fragment")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{shown}: the port must be a number from 1 to 65535") from None
    if port is None or port == 0:
        raise ValueError(f"{shown}: no port ({scheme}://HOST:PORT)")
    host = _host(parts.hostname or "", shown)
    options = _options(scheme, parts.query, shown)
    username, password = _credentials(scheme, parts, shown)
    display_host = f"[{host}]" if ":" in host else host
    userinfo = ""
    if username is not None:
        userinfo = parts.username or ""
        userinfo += ":***@" if password is not None else "@"
    url_text = f"{scheme}://{userinfo}{display_host}:{port}"
    if parts.query:
        url_text += f"?{parts.query}"
    service = None
    if scheme == "socks5+gssapi":
        given = options.get("service", "rcmd")
        if not given:
            raise ValueError(f"{shown}: service= names the GSS-API service (e.g. rcmd)")
        service = given if "@" in given else f"{given}@{host}"
    if ca is not None:
        if scheme != "socks5+tls":
            raise ValueError(f"{shown}: a ca is for socks5+tls upstreams")
        if "ca" in options:
            raise ValueError(f"{shown}: the CA is given twice (ca, and ?ca= in the URL)")
        options["ca"] = ca
    ca = options.get("ca")
    tls = _tls_creator(host, ca, shown) if scheme == "socks5+tls" else None
    return Upstream(name=name or url_text, scheme=scheme, host=host, port=port,
                    url_text=url_text, username=username, password=password,
                    gssapi_service=service, ca=ca, tls=tls)


def _is_ipv4(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return False


def _redact_raw(url: str) -> str:
    """The URL as given, its password (if any) as *** (for messages). The
    last "@" ends the user information: a password is never shown, even one
    with an unencoded "/", "?" or "#", at the price of hiding more of a URL
    with "@" in its query (socks5+gssapi's service= excepted: it takes no
    password)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        # Not a URL at all ("user:pass@host:1080", "socks5:/..."): whatever
        # comes before the last "@" may hold a password.
        scheme, rest = "", url
    searched = rest.split("?", 1)[0] if scheme.lower() == "socks5+gssapi" else rest
    at = searched.rfind("@")
    if at < 0:
        return url
    userinfo, after = rest[:at], rest[at + 1:]
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    elif not sep:
        userinfo = "***"
    return f"{scheme}{sep}{userinfo}@{after}"


def _host(host: str, shown: str) -> str:
    if not host:
        raise ValueError(f"{shown}: no host")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return normalize_name(unquote(host))
    except ValueError as e:
        raise ValueError(f"{shown}: bad host name: {e}") from None


def _options(scheme: str, query: str, shown: str) -> dict[str, str]:
    allowed = _OPTIONS.get(scheme, ())
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"{shown}: malformed query {query!r}") from None
    for key, value in pairs:
        if key not in allowed:
            takes = f"takes only {', '.join(allowed)}" if allowed else "takes no options"
            raise ValueError(f"{shown}: unknown option {key!r} ({scheme} {takes})")
        if key in options:
            raise ValueError(f"{shown}: option {key!r} given twice")
        options[key] = value
    return options


def _credentials(scheme: str, parts: Any, shown: str) -> tuple[str | None, str | None]:
    raw_user, raw_password = parts.username, parts.password
    if raw_user is None:
        return None, None
    if scheme == "socks5+gssapi":
        raise ValueError(f"{shown}: socks5+gssapi takes no user or password (it uses the "
                         "process's own Kerberos credentials)")
    try:
        user = unquote(raw_user, errors="strict")
        password = None if raw_password is None else unquote(raw_password, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"{shown}: the user or password is not UTF-8 once "
                         "percent-decoded") from None
    if scheme == "socks4":
        if password is not None:
            raise ValueError(f"{shown}: socks4 sends a USERID, no password (socks4://USERID@...)")
        raw = user.encode()
        if len(raw) > MAX_CREDENTIAL or "\0" in user:
            raise ValueError(f"{shown}: the USERID must be at most {MAX_CREDENTIAL} bytes "
                             "without NUL")
        return user, None
    if not user:
        raise ValueError(f"{shown}: empty user name")
    if password is None:
        raise ValueError(f"{shown}: a user needs a password ({scheme}://USER:PASS@HOST:PORT)")
    if scheme == "http":
        if ":" in user:
            raise ValueError(f"{shown}: Basic authentication's user name cannot hold ':'")
    elif len(user.encode()) > MAX_CREDENTIAL or len(password.encode()) > MAX_CREDENTIAL:
        raise ValueError(f"{shown}: RFC 1929 user names and passwords are at most "
                         f"{MAX_CREDENTIAL} bytes")
    return user, password


def _tls_creator(host: str, ca: str | None, shown: str) -> Any:
    try:
        from twisted.internet import ssl
    except ImportError:
        raise ValueError(TLS_NEEDS) from None
    if ca is None:
        trust = ssl.platformTrust()
    else:
        if not ca:
            raise ValueError(f"{shown}: ca= names a PEM file")
        try:
            with open(ca, "rb") as f:
                pem = f.read(1 << 20)
        except OSError as e:
            raise ValueError(f"{shown}: ca: cannot read {ca}: {e.strerror or e}") from None
        try:
            certificate = ssl.Certificate.loadPEM(pem)
        except Exception as e:   # pyOpenSSL's errors for what is not a PEM certificate
            raise ValueError(f"{shown}: ca: {ca} is not a PEM certificate ({e})") from None
        trust = ssl.trustRootFromCertificates([certificate])
    return ssl.optionsForClientTLS(host, trustRoot=trust)
