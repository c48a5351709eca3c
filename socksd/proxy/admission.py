"""Who a session's client is, and whether it is let in: the address rules,
limits and logs see (behind a trusted ``haproxy:`` listener, the PROXY
header's), the balancer's health checks, and the count of sessions per
client and in all."""

from __future__ import annotations

import sys
from typing import Any

from socksd.proxy.connect import address_text
from socksd.proxy.host import SessionHost
from socksd.rules import IPAddress, client_key, parse_ip
from socksd.stats import STATS
from socksd.stream import PLAIN_TCP
from socksd.twisted_internals import (
    HAProxyProtocolWrapper,
    after_each_read,
    is_health_check,
    is_proxy_wrapper,
)

_LOCAL = parse_ip("127.0.0.1")


class Admission:
    """The client side of a session before its handshake: a base of
    :class:`~socksd.proxy.session.Session`, which provides ``fail`` and the
    handshake state checked here. State starts as class defaults, so an
    idle session stores only what changed."""

    server: SessionHost
    transport: Any
    handler: Any          # the handshake, once the first SOCKS byte came
    outcome: str | None

    client: IPAddress = _LOCAL
    # The client as per-client limits count it (an IPv6 client per
    # ipv6_client_prefix), once known. Interned: the sessions of one client
    # share one string.
    client_key: str | None = None
    peer = "-"
    proxied: HAProxyProtocolWrapper | None = None   # under a haproxy: listener
    counted = True     # in server.sessions (max_sessions)
    quiet = False       # ends without a session line (said otherwise, or counted)

    def fail(self, outcome: str, detail: str = "", abort: bool = False) -> None:
        raise NotImplementedError

    def admit(self) -> None:
        """The connection is made: counted, and the client known unless a
        PROXY header is still to come."""
        counts = self.server.counts
        counts.sessions += 1
        counts.live.add(self)
        if type(self.transport) in PLAIN_TCP or not is_proxy_wrapper(self.transport):
            self.identify_client()
            return
        # The real client is known once the PROXY header is read (the first
        # data): counting the balancer as the client now would refuse a
        # burst through it for max_sessions_per_client.
        self.proxied = wrapper = self.transport
        balancer = _below(wrapper).getPeer()
        self.peer = address_text(balancer)
        if not self.server.trusts_proxy(balancer):
            self.server.untrusted_proxy(balancer)
            self.quiet = True
            self.fail("untrusted proxy", abort=True)
            return
        # The wrapper passes on only what follows the header, so a header
        # alone (a health check's PROXY LOCAL) would reach us as nothing:
        # look after each of its reads.
        after_each_read(wrapper, self.after_header)

    def after_header(self) -> None:
        """A PROXY header without a client (v2 LOCAL, v1 UNKNOWN) is the
        balancer checking that we are up: closed without a session line,
        counted by the listener."""
        if self.proxied is not None and self.handler is None and self.outcome is None and \
                is_health_check(self.proxied):
            self.quiet = True
            self.server.counts.proxy_health_checks += 1
            self.fail("health check")

    def known(self) -> bool:
        """The first SOCKS bytes came through a wrapper (haproxy:, ssl:):
        by now a PROXY header has been read, and may have named another
        client than connectionMade saw (a plain socket's peer is final
        then). False: the session ends here."""
        if self.proxied is not None:
            self.after_header()
        if self.outcome is None:
            self.identify_client()
        return self.outcome is None

    def identify_client(self) -> None:
        """Who the client is, for rules, limits and logs (called again once
        data arrives, because a PROXY header may have changed the peer)."""
        address = self.transport.getPeer()
        peer = address_text(address)
        if peer == self.peer:
            return
        self.peer = peer
        host = getattr(address, "host", None)
        try:
            # UNIX-socket clients are local; rules see them as 127.0.0.1.
            client = parse_ip(host) if host is not None else _LOCAL
        except ValueError:
            # Twisted's PROXY v1 parser takes any word for an address.
            self.fail("bad request", "PROXY header: the source is not an IP address")
            return
        counts = self.server.counts
        counted = self.client_key
        if counted is not None:
            counts.count_client(counted, -1)
        key = sys.intern(client_key(client, self.server.limits.ipv6_client_prefix))
        self.client, self.client_key = client, key
        limit = self.server.limits.max_sessions_per_client
        if counts.count_client(key, +1) > limit:
            # Refused: no longer one of max_sessions while it closes, or a
            # burst from one client would turn others away for that limit.
            counts.sessions -= 1
            self.counted = False
            STATS.refused["max_sessions_per_client"] += 1
            self.fail("refused", f"max_sessions_per_client ({limit}) reached")

    def release(self) -> None:
        """The session has ended: it no longer counts."""
        counts = self.server.counts
        live = counts.live
        live.discard(self)
        if not live and counts.when_empty:    # a stop waits for the last one
            counts.drained()
        if self.counted:
            counts.sessions -= 1
        key = self.client_key
        if key is not None:
            counts.count_client(key, -1)

    def socket_host(self) -> Any:
        """This end of the client's connection as the socket has it. Behind a
        PROXY header getHost() is the header's destination, which a client
        of the balancer does not choose and we never bind on."""
        if self.proxied is not None:
            return _below(self.proxied).getHost()
        return self.transport.getHost()


def _below(wrapper: HAProxyProtocolWrapper) -> Any:
    """The connection under a PROXY wrapper: the balancer's, not the client's."""
    below = wrapper.transport
    assert below is not None   # a wrapper is connected before its protocol
    return below
