"""Work in flight, bounded in total and per client.

Name lookups (socksd.proxy.connect) and password checks (socksd.auth.hashing)
run in threads that cannot be stopped: work a client started counts until its
thread really returns, even after the client stopped waiting. Both bound what
one client, and all of them, may have running or queued, with this counter.
It imports nothing of ours, so every layer may use it.
"""

from __future__ import annotations

PER_CLIENT = "per client"
TOTAL = "in total"


class InFlight:
    """Counts work in flight, in ``total`` and per client (``clients``);
    ``None`` as a client counts in the total only."""

    def __init__(self, limit: int, per_client: int) -> None:
        self.limit = limit
        self.per_client = per_client
        self.total = 0
        self.clients: dict[str | None, int] = {}

    def full(self, client: str | None) -> str | None:
        """Which bound one more piece of work for ``client`` would pass
        (PER_CLIENT, TOTAL), or None: it may start."""
        if client is not None and self.clients.get(client, 0) >= self.per_client:
            return PER_CLIENT
        if self.total >= self.limit:
            return TOTAL
        return None

    def add(self, client: str | None) -> None:
        self.total += 1
        self.clients[client] = self.clients.get(client, 0) + 1

    def remove(self, client: str | None) -> None:
        self.total -= 1
        count = self.clients[client] - 1
        if count:
            self.clients[client] = count
        else:
            del self.clients[client]
