"""SOCKS client endpoints, for upstream chaining and for tests."""

from socksd.client.socks5 import SOCKS5ClientEndpoint, SOCKSError

__all__ = ["SOCKS5ClientEndpoint", "SOCKSError"]
