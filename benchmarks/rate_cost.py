"""The cost of a generous rate limit (issue 17): the same proxy with no budget
against budgets far above the link, in the same run, rounds interleaved.

Issue 17 asks that a rule with a generous rate cost at most 5% of bulk
throughput and of sessions per second. The config key that sets a rule's rate
is not read here: each proxy is this script's ``serve`` mode, socksd's own
SOCKSServerFactory on the epoll reactor, with ``Relaying.start`` handed one
up and one down :class:`socksd.throttle.Budget` per session (``generous``) or
none (``none``): exactly what a session does when its rule names a rate.
(``make bench`` measures the configured row through twistd once the key
exists.) Workloads, by loadgen.c: one bulk stream up and down on the splice
path and on Twisted's path (``splice = false``), and closed-loop SOCKS5
sessions (16-byte echo). Prints medians, min-max and generous/none ratios;
exits 0 whatever the ratios (numbers to compare, not a test).

    .venv/bin/python benchmarks/rate_cost.py [--rounds 3] [--seconds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import (
    BenchError,
    Server,
    build_loadgen,
    free_port,
    run_main,
    start_c_server,
    wait_for_proxy,
)

# Far above any loopback link: the bucket (0.1 s of it) never runs dry.
GENEROUS = 100 * (1 << 30)
MODES = ("none", "generous")


def serve(port: int, mode: str, use_splice: bool) -> None:
    """A proxy on 127.0.0.1:``port``; every session's relay gets generous
    budgets (one per direction, its own), or none."""
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor

    from socksd import throttle
    from socksd.auth.registry import method_registry
    from socksd.proxy import Limits, SOCKSServerFactory
    from socksd.proxy.relaying import Relaying
    from socksd.rules import default_rules

    if mode == "generous":
        start = Relaying.start

        def budgeted(relaying, idle_timeout, splice_allowed, up=None, down=None):
            start(relaying, idle_timeout, splice_allowed, throttle.Budget(reactor, GENEROUS),
                  throttle.Budget(reactor, GENEROUS))

        Relaying.start = budgeted  # type: ignore[method-assign]
    limits = Limits(splice=use_splice, max_sessions=100000, max_sessions_per_client=100000)
    factory = SOCKSServerFactory([method_registry(None)["none"]], default_rules(), limits,
                                 reactor=reactor)
    reactor.listenTCP(port, factory, interface="127.0.0.1", backlog=1024)
    reactor.run()


def loadgen(binary: Path, argv: list[str], seconds: float) -> list[float]:
    proc = subprocess.run([str(binary), *argv], capture_output=True, text=True,
                          timeout=seconds + 60)
    if proc.returncode != 0:
        raise BenchError(f"loadgen {' '.join(argv)} failed: {proc.stderr.strip()}")
    return [float(v) for v in proc.stdout.split()]


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        serve(int(argv[1]), argv[2], argv[3] == "splice")
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="per transfer or sessions run")
    p.add_argument("--concurrency", type=int, default=50)
    args = p.parse_args(argv)
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="socksd-rate-") as tmp_name, \
            contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        binary = build_loadgen(tmp)
        bulkd, bulk_port = start_c_server(binary, ["bulkd"], tmp)
        stack.callback(bulkd.stop)
        echo, echo_port = start_c_server(binary, ["echo", "16"], tmp)
        stack.callback(echo.stop)
        proxies: dict[tuple[str, str], int] = {}
        for path in ("splice", "twisted"):
            for mode in MODES:
                port = free_port()
                srv = Server(f"proxy {mode} {path}", [sys.executable, __file__, "serve",
                                                      str(port), mode, path], cwd=tmp)
                stack.callback(srv.stop)
                wait_for_proxy(srv, port, echo_port)
                proxies[path, mode] = port
        workloads = [(f"bulk {d}, {path}",
                      lambda secs, d=d: ["bulk", d, f"{secs}", "1", str(bulk_port)], path, "MiB/s")
                     for d in ("up", "down") for path in ("splice", "twisted")]
        workloads.append(("sessions", lambda secs: ["sessions", f"{secs}", "0",
                                                    str(args.concurrency), "eof", str(echo_port)],
                          "splice", "sessions/s"))
        for name, make, path, unit in workloads:
            for mode in MODES:     # warm-up
                loadgen(binary, [*make(0.3), str(proxies[path, mode])], 1)
            for r in range(args.rounds):
                for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                    out = loadgen(binary, [*make(args.seconds), str(proxies[path, mode])],
                                  args.seconds)
                    value = out[0] / out[1] / (1 << 20) if unit == "MiB/s" else out[0] / out[1]
                    results.setdefault((name, mode), []).append(value)
                    print(f"  {name:18} {mode:8} round {r + 1}/{args.rounds}: "
                          f"{value:10.1f} {unit}", flush=True)
        print(f"\nGenerous rate ({GENEROUS >> 30} GiB/s per direction) against none, "
              f"medians of {args.rounds}:")
        print(f"  {'workload':18} {'none':>20} {'generous':>20}  generous/none")
        for name, _make, _path, unit in workloads:
            none, generous = results[name, "none"], results[name, "generous"]
            cells = [f"{statistics.median(v):8.1f} ({min(v):.0f}-{max(v):.0f})"
                     for v in (none, generous)]
            ratio = statistics.median(generous) / statistics.median(none)
            print(f"  {name:18} {cells[0]:>20} {cells[1]:>20}  {ratio:6.3f}  {unit}")
    return 0


if __name__ == "__main__":
    run_main("rate_cost.py", main, sys.argv[1:])
