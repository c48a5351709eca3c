"""socksd: a SOCKS4/4a/5 proxy server and RFC 1413 identd on Twisted."""

__version__ = "0.1.0"
