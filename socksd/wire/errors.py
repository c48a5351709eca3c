"""The one error type of the wire layer.

Every malformed input raises :class:`WireError` (or a subclass) carrying the
reply code the protocol prescribes for it, so the layer above can answer the
client properly without knowing why parsing failed.
"""


class WireError(ValueError):
    """Bytes that do not form a valid message.

    ``reply`` is the protocol's failure code to send back before closing
    (``None`` where the protocol has no failure reply for the situation).
    """

    def __init__(self, message: str, reply: int | None = None) -> None:
        super().__init__(message)
        self.reply = reply
