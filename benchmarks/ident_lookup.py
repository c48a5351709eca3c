#!/usr/bin/env python3
"""identd owner lookup: latency with few and with many open sockets.

The identd answers "who owns this connection?" with socksd.ident.lookup.
Netlink sock_diag asks the kernel for one socket by its 4-tuple (a hash
lookup), so its latency must not grow with the number of sockets; the
/proc/net/tcp fallback reads the whole table and does grow.

"N sockets" means N established TCP sockets held open by this benchmark
(N file descriptors). Every connection is over loopback and both of its ends
are ours (server ends in this process, client ends in a forked helper), so
N sockets = N/2 connections: the default 100 and 20,000 sockets are 50 and
10,000 connections. Note that /proc/net/tcp (and so lookup_proc)
also lists every other socket in this network namespace, TIME_WAIT included;
the table prints the kernel's counts next to ours.

For each round: hold SMALL sockets, time both methods on the middle
connection; grow to LARGE, time again; shrink back. Rounds interleave the two
sizes; each cell is the median over rounds of the median single-call latency.
Exits 1 if the netlink ratio LARGE/SMALL exceeds --max-ratio (2.0), 2 if the
benchmark cannot run. Run with the installed package, from the repository root:

    .venv/bin/python benchmarks/ident_lookup.py [--small 100] [--large 20000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import statistics
import struct
import sys
import time

from socksd.ident.lookup import Connection, Owner, lookup_netlink, lookup_proc, netlink_available

FD_MARGIN = 256  # descriptors beyond our sockets: the interpreter, netlink, /proc
SETUP_DEADLINE = 120.0  # seconds to open all connections, then give up


class BenchError(Exception):
    """The benchmark cannot run; the message says why."""


def raise_nofile_limit(needed: int) -> int:
    """Soft RLIMIT_NOFILE to the hard limit; as root, the hard limit up to
    ``needed`` too (capped by fs.nr_open). Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                nr_open = int(f.read())
        except OSError:
            nr_open = needed
        with contextlib.suppress(ValueError, OSError):  # not root: keep the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, nr_open),) * 2)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def kernel_tcp_counts() -> str:
    """TCP sockets in this namespace, from /proc/net/sockstat{,6}."""
    counts = {}
    for path, prefix in (("/proc/net/sockstat", "TCP:"), ("/proc/net/sockstat6", "TCP6:")):
        with contextlib.suppress(OSError), open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    fields = line.split()[1:]
                    for key, value in zip(fields[::2], fields[1::2], strict=True):
                        counts[prefix + key] = int(value)
    return (f"inuse {counts.get('TCP:inuse', 0) + counts.get('TCP6:inuse', 0)}, "
            f"time-wait {counts.get('TCP:tw', 0)}")


class Connections:
    """Loopback connections through one listener. We keep the server ends;
    a forked helper keeps the client ends, so each process needs only half
    the descriptors (the hard RLIMIT_NOFILE may not be raisable, even by root
    without CAP_SYS_RESOURCE)."""

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4096)
        self.address = self.listener.getsockname()
        self.servers: dict[int, socket.socket] = {}  # client port -> our end
        self.control, theirs = socket.socketpair()
        self.pid = os.fork()
        if self.pid == 0:  # the helper: never returns
            status = 1
            try:
                self.control.close()
                self.listener.close()
                _client_helper(theirs, self.address)
                status = 0
            finally:
                os._exit(status)
        theirs.close()
        self.control.settimeout(SETUP_DEADLINE)
        self.replies = self.control.makefile("rb")

    @property
    def sockets(self) -> int:
        return 2 * len(self.servers)

    def _ask(self, command: str) -> list[str]:
        self.control.sendall(command.encode() + b"\n")
        reply = self.replies.readline().decode().split()
        if not reply or reply[0] != "ok":
            raise BenchError(f"client helper: {' '.join(reply) or 'exited'}")
        return reply[1:]

    def resize(self, sockets: int) -> None:
        target = sockets // 2
        deadline = time.monotonic() + SETUP_DEADLINE
        while len(self.servers) < target:  # bounded: target, and a deadline
            if time.monotonic() > deadline:
                raise BenchError(f"opened only {len(self.servers)} of {target} connections "
                                 f"in {SETUP_DEADLINE:.0f}s")
            batch = min(256, target - len(self.servers))  # well under the backlog
            self._ask(f"open {batch}")
            for _ in range(batch):
                server, (_host, port) = self.listener.accept()
                self.servers[port] = server
        if len(self.servers) > target:
            for port in self._ask(f"close {len(self.servers) - target}"):
                self.servers.pop(int(port)).close()

    def middle(self) -> tuple[Connection, Owner]:
        """The middle connection, from the server end's point of view."""
        ports = list(self.servers)
        client_port = ports[len(ports) // 2]
        server = self.servers[client_port]
        query = Connection("127.0.0.1", server.getsockname()[1], "127.0.0.1", client_port)
        return query, Owner(os.getuid(), os.fstat(server.fileno()).st_ino)

    def close(self) -> None:
        with contextlib.suppress(OSError, BenchError):
            self.resize(0)
        self.replies.close()
        self.control.close()  # the helper sees EOF, closes the rest and exits
        os.waitpid(self.pid, 0)
        for server in self.servers.values():
            server.close()
        self.listener.close()


def _client_helper(control: socket.socket, address: tuple[str, int]) -> None:
    """Open and close client connections when told ("open N", "close N")."""
    clients: list[socket.socket] = []
    linger = struct.pack("ii", 1, 0)
    with control, control.makefile("rb") as commands:
        for line in commands:
            command, count = line.split()
            if command == b"open":
                reply = "ok"
                for _ in range(int(count)):
                    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    try:
                        client.connect(address)
                    except OSError as e:
                        client.close()
                        reply = (f"error connect #{len(clients)}: {e} "
                                 "(out of loopback ports or descriptors?)")
                        break
                    clients.append(client)
            else:
                ports = []
                for _ in range(int(count)):
                    client = clients.pop()
                    ports.append(str(client.getsockname()[1]))
                    # Reset instead of FIN: no TIME_WAIT entries left behind.
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    client.close()
                reply = " ".join(["ok", *ports])
            control.sendall(reply.encode() + b"\n")
    for client in clients:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        client.close()


def median_latency(method, query: Connection, expected: Owner, repeat: int) -> float:
    """Median single-call latency in microseconds; checks every answer."""
    for _ in range(min(10, repeat)):
        method(query)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        owner = method(query)
        samples.append(time.perf_counter_ns() - start)
        if owner != expected:
            raise BenchError(f"{method.__name__}{tuple(query)} gave {owner}, expected {expected}")
    return statistics.median(samples) / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=100, help="sockets for the baseline")
    parser.add_argument("--large", type=int, default=20_000, help="sockets for the big table")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--netlink-repeat", type=int, default=2000)
    parser.add_argument("--proc-repeat", type=int, default=30)
    parser.add_argument("--max-ratio", type=float, default=2.0)
    args = parser.parse_args()
    if not 2 <= args.small < args.large:
        parser.error("need 2 <= --small < --large")

    needed = args.large // 2 + FD_MARGIN  # per process: we and the helper hold half each
    limit = raise_nofile_limit(needed)
    if limit < needed:
        raise BenchError(f"RLIMIT_NOFILE is {limit}; {args.large} sockets need {needed} "
                         "per process (raise the hard limit)")
    if not netlink_available():
        raise BenchError("netlink sock_diag is not available here: nothing to measure")

    methods = {"netlink": (lookup_netlink, args.netlink_repeat),
               "proc": (lookup_proc, args.proc_repeat)}
    results = {(name, size): [] for name in methods for size in (args.small, args.large)}
    tables = {}
    conns = Connections()
    try:
        for round_ in range(args.rounds):
            for size in (args.small, args.large):
                conns.resize(size)
                query, expected = conns.middle()
                tables[size] = kernel_tcp_counts()
                for name, (method, repeat) in methods.items():
                    results[name, size].append(median_latency(method, query, expected, repeat))
            print(f"round {round_ + 1}/{args.rounds}: "
                  + ", ".join(f"{name}@{size} {results[name, size][-1]:.1f}us"
                              for name in methods for size in (args.small, args.large)),
                  file=sys.stderr)
    finally:
        conns.close()

    print(f"\nidentd owner lookup, median single-call latency "
          f"({args.rounds} rounds; sockets = our established loopback sockets, "
          f"2 per connection)")
    print(f"  kernel TCP table at {args.small:>6} sockets: {tables[args.small]}")
    print(f"  kernel TCP table at {args.large:>6} sockets: {tables[args.large]}\n")
    head = f"{'method':<8} {f'{args.small} sockets':>14} {f'{args.large} sockets':>16} {'ratio':>8}"
    print(head)
    print("-" * len(head))
    ratios = {}
    for name in methods:
        small = statistics.median(results[name, args.small])
        large = statistics.median(results[name, args.large])
        ratios[name] = large / small
        print(f"{name:<8} {small:>11.1f} us {large:>13.1f} us {ratios[name]:>7.2f}x")
    ok = ratios["netlink"] <= args.max_ratio
    print(f"\nnetlink ratio {ratios['netlink']:.2f}x "
          f"{'<=' if ok else 'EXCEEDS'} {args.max_ratio:.1f}x: {'ok' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"ident_lookup: {e}", file=sys.stderr)
        sys.exit(2)
