"""The one error type of the wire layer.

Every malformed input raises :class:`WireError` (or a subclass) carrying the
reply the protocol prescribes for it, so the layer above can answer the
client properly without knowing why parsing failed.
"""


class WireError(ValueError):
    """Bytes that do not form a valid message.

    ``reply`` is the protocol's failure reply to send back before closing: a
    code (SOCKS, RFC 1929), an error token (RFC 1413's ``INVALID-PORT``), or
    ``None`` where the protocol has no failure reply for the situation.
    """

    def __init__(self, message: str, reply: int | str | None = None) -> None:
        super().__init__(message)
        self.reply = reply


def wrong_version(buf: bytes, what: str, reply: int | None = None) -> WireError:
    """The error for a message whose first byte is not the version expected.
    Each parser tests that byte itself, as soon as it is in (``if buf and
    buf[0] != VERSION``), and an empty buffer passes (the caller answers
    "need more"): the parsers run for every message, a GSS-API frame for
    every chunk relayed, and a call there is paid by every one."""
    return WireError(f"{what}: version {buf[0]}", reply)
