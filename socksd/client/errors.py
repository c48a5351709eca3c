"""The client's errors: one base, and the two kinds a chaining proxy must
tell apart (try the next upstream, or report the upstream's answer)."""

from __future__ import annotations


class SOCKSError(Exception):
    """The proxy refused or failed; ``reply`` is its SOCKS5 reply or status.

    Raised as such by the low-level endpoints (their callers, our tests,
    read the message); :class:`socksd.client.upstream.Upstream` turns every
    failure into one of the two subclasses below.
    """

    def __init__(self, message: str, reply: int | None = None) -> None:
        super().__init__(message)
        self.reply = reply


class UpstreamFailed(SOCKSError):
    """The upstream itself could not serve us: unreachable, refused the
    connection, failed TLS or authentication, spoke nonsense, said nothing
    in time, or does not do the command. Another upstream may do better.

    ``reply`` is the SOCKS5 reply to give the client if none does
    (general failure, or command not supported)."""


class DestinationFailed(SOCKSError):
    """The upstream answered our request with a failure of its own: its
    rules refused, or the destination is unreachable, refused, timed out.

    ``reply`` is that answer as a SOCKS5 reply code (a SOCKS5 upstream's
    own; SOCKS4's and HTTP's mapped), to be reported to the client."""
