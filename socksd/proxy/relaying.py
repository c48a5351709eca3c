"""A session's relay phase: its two ends joined with flow control, the move
to the kernel's splice once the session is bulk, the watch on a receiver that
stops taking bytes, and the identd's knowledge of who owns the outgoing
connection. It reports how the relay ended to the session, which is the
client's end (:class:`ClientEnd`)."""

from __future__ import annotations

from typing import Any, Callable

from socksd import relay, splice, throttle
from socksd.ident.registry import Registrar
from socksd.proxy.client_rules import ClientRules
from socksd.proxy.connect import is_address, split_host_port
from socksd.rules import parse_ip

# A session moves to the splice fast path once either direction has relayed
# this much: short exchanges never pay for setting it up, bulk ones soon do.
SPLICE_AFTER = 32768


class ClientEnd(relay.RelayEnd):
    """The client's end of a relay, as the relay sees it: the session, which
    also hears how the relay ended."""

    resetTimeout: Callable[[], None]    # activity: the idle timeout starts again

    @property
    def reactor(self) -> Any:
        raise NotImplementedError

    @property
    def stall_timeout(self) -> float:
        raise NotImplementedError

    def relay_outcome(self, outcome: str, detail: str) -> None:
        """How the relay ended, unless the session knows already."""
        raise NotImplementedError

    def relay_done(self) -> None:
        """Both ends are closed."""
        raise NotImplementedError


# The least a metered end reads at once: smaller reads cost more calls.
LEAST_READ = 4096


def _bounded_reads(transport: Any, budget: throttle.Budget) -> None:
    """Twisted's path learns a chunk's size only once read, and charges it
    after: a metered socket reads at most about its budget's burst at a
    time (not Twisted's 64 KiB), so that one read overdraws a small rate by
    little. Twisted's tcp.Connection reads ``bufferSize`` bytes a time; the
    same number is where its write buffer pauses the producer, which for a
    rate this small only makes the other direction's pauses come sooner."""
    size = getattr(transport, "bufferSize", None)
    if isinstance(size, int) and budget.capacity < size:
        transport.bufferSize = max(LEAST_READ, int(budget.capacity))


class Relaying(relay.RelaySession):
    """One session's relay, from the last reply to the last close."""

    __slots__ = ("client", "outbound", "splicer", "stall", "registered")

    def __init__(self, client: ClientEnd, outbound: relay.RelayEnd) -> None:
        self.client = client
        self.outbound = outbound
        self.splicer: splice.SpliceRelay | None = None
        self.stall: relay.StallWatch | None = None     # made when a receiver first blocks
        self.registered: tuple[Registrar, Any] | None = None

    def start(self, idle_timeout: float, splice_allowed: bool,
              up: throttle.Budget | None = None, down: throttle.Budget | None = None) -> None:
        """Join the ends; ``up`` and ``down`` are the rate budgets (None: no
        limit) that what the client sends and what comes back draw on, for
        the relay's life, whichever path carries the bytes. (Each end leaves
        its budget as its connection closes.)"""
        client, outbound = self.client, self.outbound
        relay.join(client, outbound, self, watch_activity=idle_timeout > 0)
        if up is not None:
            client.meter = meter = up.meter(client)
            _bounded_reads(client.transport, up)
            meter.first_turn()
        if down is not None:
            outbound.meter = meter = down.meter(outbound)
            _bounded_reads(outbound.transport, down)
            meter.first_turn()
        if splice_allowed and splice.plain_tcp(client.transport, outbound.transport):
            client.splice_after = client.received + SPLICE_AFTER
            outbound.splice_after = outbound.received + SPLICE_AFTER

    def register(self, registry: Registrar, user: str) -> None:
        """Tell the identd (here, or the supervisor's) who owns the outgoing connection."""
        local, remote = self.outbound.transport.getHost(), self.outbound.transport.getPeer()
        self.registered = (registry, registry.add(local.host, local.port, remote.host,
                                                  remote.port, user))

    def moved(self) -> tuple[int, int]:
        """Bytes relayed so far, up and down, the kernel's included."""
        up, down = self.client.received, self.outbound.received
        splicer = self.splicer
        if splicer is not None and not splicer.finished:
            client_to_outbound, outbound_to_client = splicer.directions
            up, down = up + client_to_outbound.moved, down + outbound_to_client.moved
        return up, down

    def recheck(self, rules: ClientRules, command: str, destination: str) -> None:
        """``recheck_on_reload``: the request (the name it named, its port)
        and the peer the relay is joined to, decided as a new request would
        be; the relay ends with ``denied after reload`` if ``rules`` deny it."""
        host, port = split_host_port(destination)
        peer = self.outbound.transport.getPeer()
        name = None if is_address(host) else host
        decision = rules.decide(command, port, name, parse_ip(peer.host))
        if not decision.allowed:
            self.abort("denied after reload", decision.reason)

    def abort(self, outcome: str, detail: str) -> None:
        """End the relay now: the splice relay, or both transports."""
        self.client.relay_outcome(outcome, detail)
        if self.splicer is not None and not self.splicer.finished:
            self.splicer.abort()
        else:
            self.outbound.transport.abortConnection()
            self.client.transport.abortConnection()

    # RelaySession

    def relay_activity(self) -> None:
        self.client.resetTimeout()

    def relay_bulk(self) -> None:
        """Move the bytes to the kernel (splice), if both write buffers can
        be flushed now; else look again after more bytes."""
        client, outbound = self.client, self.outbound
        if client.read_eof or outbound.read_eof or not splice.eligible(client.transport,
                                                                       outbound.transport):
            client.splice_after = client.received + SPLICE_AFTER
            outbound.splice_after = outbound.received + SPLICE_AFTER
            return
        client.splice_after = outbound.splice_after = 0
        client.transport.unregisterProducer()
        outbound.transport.unregisterProducer()
        self.splicer = splice.SpliceRelay(client.reactor, client, outbound, self)
        self.splicer.start()
        self.relay_drained()   # a stall check compares pipes now, not Twisted's buffers

    def relay_blocked(self) -> None:
        """Every wait has a timeout: a receiver that takes nothing for
        stall_timeout seconds ends the relay, even with no idle timeout."""
        if self.stall is None:
            timeout = self.client.stall_timeout
            if not timeout:
                return
            self.stall = relay.StallWatch(self.client.reactor, timeout, self._held,
                                          self._stalled)
        self.stall.blocked()

    def relay_drained(self) -> None:
        if self.stall is not None:
            self.stall.drained()

    def _held(self) -> tuple[int | None, ...]:
        """Bytes waiting for each receiver (None: cannot tell)."""
        if self.splicer is not None and not self.splicer.finished:
            return self.splicer.pending()
        return relay.buffered(self.client.transport), relay.buffered(self.outbound.transport)

    def _stalled(self) -> None:
        assert self.stall is not None
        self.abort("stalled", f"a receiver took nothing for {self.stall.timeout:g} s")

    def relay_lost(self, why: str) -> None:
        self.client.relay_outcome("connection lost", why)

    def relay_ended(self) -> None:
        if self.stall is not None:
            self.stall.stop()
        if self.registered is not None:
            registry, entry = self.registered
            registry.remove(entry)
            self.registered = None
        # Break the session's reference cycles so it is freed at once, not at
        # the garbage collector's next pass.
        client, outbound = self.client, self.outbound
        outbound.partner = outbound.session = outbound.factory = None
        client.partner = client.session = None
        self.stall = None
        if self.splicer is not None:
            self.splicer.session = None
        client.relay_done()
