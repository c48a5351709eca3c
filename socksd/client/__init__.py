"""SOCKS and HTTP CONNECT clients, for upstream chaining and for tests.

:mod:`socksd.client.upstream` is what the proxy layer uses (its docstring
states the interface); the protocol modules below it (socks5, socks4, http)
take any endpoint to the proxy."""

from socksd.client.errors import DestinationFailed, SOCKSError, UpstreamFailed
from socksd.client.handshake import Accepted, Bound
from socksd.client.socks5 import Association, SOCKS5Auth, SOCKS5ClientEndpoint
from socksd.client.upstream import Upstream, parse_upstream

__all__ = ["Accepted", "Association", "Bound", "DestinationFailed", "SOCKS5Auth",
           "SOCKS5ClientEndpoint", "SOCKSError", "Upstream", "UpstreamFailed",
           "parse_upstream"]
