"""The listener's bounds: every wait has a timeout and every count a limit
(the config's ``[server]`` table). Read by the session and by what it starts
(BIND, UDP), set by the listener."""

from __future__ import annotations

from dataclasses import dataclass

from socksd.auth import hashing
from socksd.auth import methods as auth_methods


@dataclass(frozen=True)
class Limits:
    """Every wait has a timeout and every count a limit; idle_timeout 0 = never."""

    handshake_timeout: float = 30.0
    connect_timeout: float = 30.0
    idle_timeout: float = 0.0
    max_sessions: int = 10000
    max_sessions_per_client: int = 256
    splice: bool = True       # kernel fast path for plain TCP sessions (Linux)
    bind_timeout: float = 60.0                  # BIND: wait for the incoming connection
    udp_idle_timeout: float = 300.0             # UDP ASSOCIATE: end after this quiet time
    bind_ports: tuple[tuple[int, int], ...] = ((0, 0),)   # (0, 0): any free port
    udp_ports: tuple[tuple[int, int], ...] = ((0, 0),)
    max_datagram: int = 65507                   # largest UDP payload relayed
    stall_timeout: float = 300.0    # a receiver may take nothing for this long; 0 = never
    ipv6_client_prefix: int = 64    # per-client limits count an IPv6 client per /64
    # Password checks (RFC 1929 logins): threads, checks waiting or running
    # (in all, per client address), and the backoff after a failed login.
    auth_threads: int = hashing.THREADS
    auth_in_flight: int = hashing.IN_FLIGHT
    auth_in_flight_per_client: int = hashing.IN_FLIGHT_PER_CLIENT
    auth_failure_backoff: float = auth_methods.BACKOFF      # 0 = none
    auth_failure_backoff_max: float = auth_methods.BACKOFF_MAX
    auth_failure_clients: int = auth_methods.BACKOFF_CLIENTS   # addresses remembered
    # At a stop, the open sessions may finish for this long; those left are
    # closed (outcome "shutdown"). 0: closed at once.
    drain_timeout: float = 30.0
    # Where outgoing connections and UDP destination sockets leave from
    # (none: the kernel's choice), and how one of several is picked:
    # "first", "round-robin" or "same-as-listener" (socksd.proxy.source).
    source: tuple[str, ...] = ()
    source_select: str = "first"
    # The address a UDP ASSOCIATE reply names instead of the relay socket's
    # own (behind NAT or a balancer); when it is one of this host's, the
    # relay's client side is bound to it (config.py finds out at start).
    udp_advertise: str | None = None
    udp_advertise_local: bool = False
