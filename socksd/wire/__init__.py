"""Bytes <-> messages: pure codecs for the SOCKS family, no I/O, no Twisted."""

from socksd.wire.errors import WireError

__all__ = ["WireError"]
