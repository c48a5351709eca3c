"""socksd benchmarks, against direct loopback and Dante, in one run.

(a) bulk throughput of one CONNECT stream, upload and download;
(b) bulk throughput of 8 parallel streams, aggregate (socksd workers = 2);
(c) SOCKS5 sessions per second with 50 concurrent clients, their latency and
    the proxy's CPU per session (socksd with workers = 1 and workers = 2);
(c4) the same in SOCKS4, against Dante and Twisted's SOCKSv4 example;
(d) memory per idle relayed session (2,000 of them): socksd and Dante holding
    SOCKS5 sessions, socksd and Twisted's example holding SOCKS4 ones;
(e) soak: socksd's RSS before and after 100,000 sessions;
(f) iperf3 through Dante's socksify, -P 1 and -P 8, both directions;
(m) the cost of metrics (issue 15): socksd with a [metrics] endpoint scraped
    every second against socksd without, in (a) and (c)'s rounds;
then summaries of issue 7's and issue 18's targets, met or missed.

Each number is the median of several rounds; baselines (direct loopback,
Dante) are measured in the same run, rounds interleaved, and the tables give
ratios. See benchmarks/README.rst. Run from the repository root:

    .venv/bin/python benchmarks/run.py [--quick] [--no-dante] [--no-iperf3]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.metadata
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from harness import (
    BenchError,
    Memory,
    Server,
    build_loadgen,
    children_cpu,
    cpu_delta,
    cpu_times,
    descendants,
    find_binary,
    free_port,
    machine_busy,
    memory,
    raise_nofile_limit,
    read_line,
    run_main,
    start_c_server,
    wait_for_proxy,
    wait_listening,
)

WORKLOADS = ["bulk", "parallel", "sessions", "sessions4", "memory", "soak", "iperf3", "metrics"]
# "metrics" alone: the on/off comparison by itself. By default (no --only) it is
# not a workload of its own: (a) and (c) carry the socksd metrics row instead.
DEFAULT_WORKLOADS = [w for w in WORKLOADS if w != "metrics"]

SOCKSD_CONFIG = """\
# Written by benchmarks/run.py: limits high enough for the idle-session test.
[server]
max_sessions = 100000
max_sessions_per_client = 100000
workers = {workers}
"""
# socksd metrics: the same plus a /metrics endpoint (workers = 1: the cost of the counting
# itself, in the one process that serves).
METRICS_CONFIG = """
[metrics]
listen = ["tcp:{port}:interface=127.0.0.1"]
"""
METRICS = "socksd metrics"   # the via's name, and Bench.proxy()'s kind is "metrics"
SCRAPE_INTERVAL = 1.0        # seconds between GETs of /metrics while a measurement runs
SCRAPE_TIMEOUT = 5.0
SCRAPE_SERIES = b"socksd_sessions_active"  # a scrape must carry this series

DANTE_CONFIG = """\
# Written by benchmarks/run.py.
logoutput: {log}
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0
}}
socks pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0{session_log}
}}
"""
DANTE_SESSION_LOG = "\n    log: disconnect"  # one line per session at its end, like socksd

# Dante's client library (libdsocks, preloaded by socksify), sending every
# TCP connection through the proxy. See dante.conf(5) in dante-client.
SOCKS_CONF = """\
# Written by benchmarks/run.py for socksify (SOCKS_CONF).
route {{
    from: 0.0.0.0/0 to: 0.0.0.0/0 via: 127.0.0.1 port = {port}
    proxyprotocol: socks_v5
    method: none
}}
"""

GEN_BUSY = 80.0     # % of a core: above this a generator may be the bottleneck
OTHERS_BUSY = 30.0  # % of a core used by processes not in the benchmark: noisy
ROUTED_CPU = 1.0    # % of a core: a proxy relaying iperf3 uses more than this
SOAK_CHECKPOINTS = 4
SOAK_SETTLE = 2.0   # seconds between the last session and a memory reading
SOAK_TOLERANCE_KIB = 2048

# Issue 7's targets (socksd against Dante and direct, same run).
BULK_VS_DANTE, BULK_VS_DIRECT, PARALLEL_VS_DANTE = 1.5, 0.5, 1.5
SESSIONS_VS_DANTE = 1.6
IDLE_KIB_PER_SESSION = 3.5
# Issue 15's: metrics on against off, same run.
METRICS_VS_OFF = 0.97
# Issue 18's (same run): SOCKS5 sessions per proxy CPU-second against Dante
# (socksd workers = 1), SOCKS4 against Twisted's example, the SOCKS5 rate
# against Dante, idle SOCKS4 memory against Twisted's example, and workers = 2
# against workers = 1 (rate, and p99 at most 10% worse).
CPU_VS_DANTE = 1.3
CPU4_VS_TWISTED = 1.0        # strictly more
RATE_VS_DANTE = 1.0
IDLE4_VS_TWISTED = 1.0       # strictly less
WORKERS_RATE, WORKERS_P99 = 1.0, 1.10


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- settings -------------------------------------------------------------------

QUICK = {"rounds": 1, "bulk_seconds": 1.0, "session_seconds": 1.0, "idle_sessions": 500,
         "soak_sessions": 10_000, "soak_warmup": 1000, "iperf3_seconds": 1}
FULL = {"rounds": 3, "bulk_seconds": 2.0, "session_seconds": 2.0, "idle_sessions": 2000,
        "soak_sessions": 100_000, "soak_warmup": 5000, "iperf3_seconds": 3}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark socksd against direct loopback and Dante (danted).")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round, 1 s transfers, session runs and iperf3 tests, "
                        "500 idle sessions, a 10,000-session soak")
    p.add_argument("--no-dante", action="store_true", help="skip Dante (danted)")
    p.add_argument("--no-metrics", action="store_true",
                   help="no socksd metrics row in (a) and (c): for a --twistd of a socksd "
                        "older than [metrics]")
    p.add_argument("--dante-quiet", action="store_true",
                   help="Dante logs errors only, not one line per session as by default "
                        "(and as socksd does)")
    p.add_argument("--no-iperf3", action="store_true",
                   help="skip the iperf3 workload (needs iperf3 and dante-client's socksify)")
    p.add_argument("--danted", help="danted binary (default: on PATH, else /usr/sbin/danted)")
    p.add_argument("--iperf3", help="iperf3 binary (default: on PATH, else /usr/bin/iperf3)")
    p.add_argument("--socksify", help="socksify script (default: on PATH, else /usr/bin/socksify)")
    p.add_argument("--twistd", help="twistd running socksd (default: next to this Python)")
    p.add_argument("--workers", default="2",
                   help='[server] workers of the multi-process socksd (8 streams, sessions, '
                        'iperf3 -P 8): a number or "auto" = the CPU count (default 2; issue '
                        "18's target compares workers = 2 with workers = 1)")
    p.add_argument("--rounds", type=int, help="rounds per measurement, median reported (default 3)")
    p.add_argument("--bulk-seconds", type=float, help="seconds per bulk transfer (default 2)")
    p.add_argument("--streams", type=int, default=8,
                   help="parallel streams in the parallel bulk workload (default 8)")
    p.add_argument("--session-seconds", type=float, help="seconds per sessions round (default 2)")
    p.add_argument("--concurrency", type=int, default=50,
                   help="concurrent clients in the sessions and soak workloads (default 50)")
    p.add_argument("--client-closes", action="store_true",
                   help="sessions: the client closes right after reading the echo, instead of "
                        "the echo server closing first (TIME_WAIT then piles up on ephemeral "
                        "ports; see README.rst)")
    p.add_argument("--idle-sessions", type=int,
                   help="sessions held open in the memory workload (default 2000)")
    p.add_argument("--soak-sessions", type=int,
                   help="sessions through socksd in the soak, after the warm-up (default 100000)")
    p.add_argument("--soak-warmup", type=int,
                   help="soak warm-up sessions before the baseline reading (default 5000)")
    p.add_argument("--iperf3-seconds", type=int, help="iperf3 -t per test (default 3)")
    p.add_argument("--only", action="append", choices=WORKLOADS,
                   help="run only this workload (repeatable); metrics = just socksd against "
                        "socksd with /metrics scraped every second: sessions and 1-stream "
                        "bulk (by default that row is part of bulk and sessions)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (configs, proxy logs) and print its path")
    args = p.parse_args(argv)
    if args.workers != "auto" and not args.workers.isdigit():
        p.error('--workers takes a number or "auto"')
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    checks = [("rounds", 1, 50), ("bulk_seconds", 0.1, 60), ("session_seconds", 0.1, 60),
              ("streams", 1, 256), ("concurrency", 1, 5000), ("idle_sessions", 1, 50_000),
              ("soak_sessions", SOAK_CHECKPOINTS, 10_000_000), ("soak_warmup", 1, 1_000_000),
              ("iperf3_seconds", 1, 60)]
    for name, lo, hi in checks:
        if not lo <= getattr(args, name) <= hi:
            p.error(f"--{name.replace('_', '-')} must be {lo:g}..{hi:g}")
    args.only = [w for w in WORKLOADS if w in (args.only or DEFAULT_WORKLOADS)]
    if args.no_iperf3 and "iperf3" in args.only:
        args.only.remove("iperf3")
    return args


# ---- the proxies -------------------------------------------------------------------

@dataclass
class Via:
    """A way to reach the targets: directly, or through a proxy."""
    name: str
    port: int | None = None          # SOCKS port; None = direct
    server: Server | None = None
    workers: int = 0                 # socksd's worker processes (1: the twistd process)
    metrics_port: int | None = None  # socksd's /metrics port: scraped while measured

    def pids(self) -> list[int]:
        return self.server.pids() if self.server else []


def find_twistd(args) -> str:
    twistd = args.twistd or str(Path(sys.executable).parent / "twistd")
    if not os.access(twistd, os.X_OK):
        raise BenchError(f"{twistd} not found: run `make install` (or pass --twistd)")
    return twistd


def socksd_name(workers: str) -> str:
    return "socksd" if workers == "1" else f"socksd workers={workers}"


def start_socksd(twistd: str, tmp: Path, echo_port: int, tag: str, workers: str = "1",
                 metrics: bool = False) -> Via:
    """A fresh twistd socks; cwd is the temp dir so the *installed* socksd runs.
    With ``metrics``, it serves /metrics too (and ``workers`` must be "1")."""
    config = tmp / f"socksd-{tag}.toml"
    logfile = tmp / f"socksd-{tag}.log"
    last: BenchError | None = None
    for _ in range(3):  # a port can be taken between free_port() and bind
        text = SOCKSD_CONFIG.format(workers=workers if workers.isdigit() else '"auto"')
        metrics_port = free_port() if metrics else None
        if metrics_port:
            text += METRICS_CONFIG.format(port=metrics_port)
        config.write_text(text)
        port = free_port()
        # Workers (workers > 1) log through twistd, into the same file.
        srv = Server("socksd", [twistd, "-n", "--pidfile=", "-l", str(logfile),
                                "socks", "--config", str(config),
                                "--listen", f"tcp:{port}:interface=127.0.0.1"], cwd=tmp)
        try:
            wait_for_proxy(srv, port, echo_port)
            if metrics_port:
                wait_listening(srv, metrics_port)
                first = Scrapes()
                scrape(metrics_port, first)
                if first.failed:
                    raise BenchError(f"socksd's /metrics on port {metrics_port}: "
                                     f"{first.failed[0]}")
            return Via(METRICS if metrics else socksd_name(workers), port, srv,
                       wait_for_workers(srv, logfile), metrics_port)
        except BenchError as exc:
            srv.stop()
            last = exc
    raise BenchError(f"{last}; see {logfile} (use --keep)")


def wait_for_workers(srv: Server, logfile: Path, timeout: float = 20.0) -> int:
    """How many processes serve: with workers > 1 twistd's start-up line
    says "(port P, N workers)" and it supervises N children; wait until all
    N are there."""
    found = re.search(r" (\d+) workers\): ", logfile.read_text())
    if not found:
        return 1
    n = int(found.group(1))
    deadline = time.monotonic() + timeout
    while len(descendants(srv.pid)) < n:
        if time.monotonic() > deadline:
            raise BenchError(f"socksd logged {n} workers but {len(descendants(srv.pid))} "
                             f"are running after {timeout:g} s")
        time.sleep(0.1)
    return n


TWISTED_EXAMPLE = "Twisted SOCKSv4"
SOCKSD4 = "socksd (SOCKS4)"
# The rows of (d): row -> (proxy kind for Bench.start_proxy, held in SOCKS4).
# Twisted's example speaks SOCKS4 only, so socksd holds SOCKS4 sessions too
# for the row it is compared with.
MEMORY_ROWS = {"socksd": ("1", False), "Dante": ("Dante", False),
               SOCKSD4: ("1", True), TWISTED_EXAMPLE: (TWISTED_EXAMPLE, True)}


def start_twisted_example(twistd: str, tmp: Path, echo_port: int) -> Via:
    """Twisted's own SOCKSv4 example server (twisted.tap.socks, renamed
    ``twistd twisted-socks`` by socksd's plugin): the relay any Twisted
    program gets for free, with Twisted's transports and nothing of socksd's
    (no rules, limits, timeouts; one legacy log line per session)."""
    logfile = tmp / "twisted-socks.log"
    last: BenchError | None = None
    for _ in range(3):
        port = free_port()
        srv = Server("twisted-socks", [twistd, "-n", "--pidfile=", "-l", str(logfile),
                                       "twisted-socks", "-i", "127.0.0.1", "-p", str(port)],
                     cwd=tmp)
        try:
            wait_for_proxy(srv, port, echo_port, version=4)
            return Via(TWISTED_EXAMPLE, port, srv)
        except BenchError as exc:
            srv.stop()
            last = exc
    raise BenchError(f"{last}; see {logfile} (use --keep)")


def start_dante(danted: str, tmp: Path, echo_port: int, tag: str, quiet: bool) -> Via:
    last: BenchError | None = None
    logfile = tmp / f"danted-{tag}.log"
    for _ in range(3):
        port = free_port()
        conf = tmp / f"danted-{tag}.conf"
        conf.write_text(DANTE_CONFIG.format(log=logfile, port=port,
                                            session_log="" if quiet else DANTE_SESSION_LOG))
        check = subprocess.run([danted, "-V", "-f", str(conf)], capture_output=True, text=True,
                               timeout=30)
        if check.returncode != 0:
            raise BenchError(f"danted -V rejects {conf}:\n{check.stdout}{check.stderr}"
                             f"{logfile.read_text() if logfile.exists() else ''}")
        srv = Server("danted", [danted, "-f", str(conf), "-p", str(tmp / f"danted-{tag}.pid")],
                     cwd=tmp)
        try:
            wait_for_proxy(srv, port, echo_port)
            return Via("Dante", port, srv)
        except BenchError as exc:
            srv.stop()
            last = exc
    tail = logfile.read_text()[-2000:] if logfile.exists() else ""
    raise BenchError(f"{last}\n{tail}")


# ---- scraping /metrics ----------------------------------------------------------

@dataclass
class Scrapes:
    """The GETs of /metrics during one measurement."""
    nbytes: list[int] = field(default_factory=list)     # of each good scrape's body
    seconds: list[float] = field(default_factory=list)  # request to body read
    failed: list[str] = field(default_factory=list)     # what went wrong, per bad scrape

    @property
    def ok(self) -> int:
        return len(self.nbytes)


def scrape(port: int, into: Scrapes) -> None:
    """One GET of /metrics, as Prometheus would (a new connection each time
    here, where Prometheus keeps one: a little more work for socksd, not less);
    good if 200 with a body carrying socksd's series."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=SCRAPE_TIMEOUT)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        into.failed.append(f"GET /metrics: {type(exc).__name__}: {exc}")
        return
    finally:
        conn.close()
    if resp.status != 200 or SCRAPE_SERIES not in body:
        into.failed.append(f"GET /metrics: status {resp.status}, {len(body)} bytes"
                           f"{'' if SCRAPE_SERIES in body else ' without socksd_sessions_active'}")
        return
    into.nbytes.append(len(body))
    into.seconds.append(time.monotonic() - t0)


@contextlib.contextmanager
def scraping(port: int, interval: float = SCRAPE_INTERVAL):
    """GET /metrics at once and then every ``interval`` seconds, in a thread,
    until the block ends; yields the Scrapes (complete once the block has
    ended: the thread is stopped and joined)."""
    scrapes, stop = Scrapes(), threading.Event()

    def loop() -> None:
        due = time.monotonic()
        while not stop.is_set():
            scrape(port, scrapes)
            due = max(due + interval, time.monotonic())  # late: no catching up
            stop.wait(due - time.monotonic())

    thread = threading.Thread(target=loop, name=f"scrape-{port}", daemon=True)
    thread.start()
    try:
        yield scrapes
    finally:
        stop.set()
        thread.join(timeout=SCRAPE_TIMEOUT + 5)
        if thread.is_alive():
            scrapes.failed.append("the scraper thread did not stop")


# ---- measuring ------------------------------------------------------------------

@dataclass
class Sample:
    value: dict[str, float]
    proxy_cpu: float | None  # % of one core, None when direct
    gen_cpu: float
    target_cpu: float
    others_cpu: float        # machine CPU not used by proxy, generator or target
    scrapes: Scrapes | None = None  # GETs of /metrics while measured (socksd metrics)


@dataclass
class Series:
    samples: list[Sample] = field(default_factory=list)

    def med(self, key: str) -> float:
        return statistics.median(s.value[key] for s in self.samples)

    def lo(self, key: str) -> float:
        return min(s.value[key] for s in self.samples)

    def hi(self, key: str) -> float:
        return max(s.value[key] for s in self.samples)

    def total(self, key: str) -> float:
        return sum(s.value[key] for s in self.samples)

    def per_cpu(self, key: str) -> float | None:
        """Median of value per proxy CPU-second (a proxy may use several cores)."""
        if self.samples[0].proxy_cpu is None:
            return None
        return statistics.median(s.value[key] / max(s.proxy_cpu / 100.0, 1e-9)
                                 for s in self.samples)

    def cpu(self, attr: str) -> float | None:
        vals = [getattr(s, attr) for s in self.samples]
        return None if vals[0] is None else statistics.median(vals)


Results = dict[str, Series]  # via name -> its samples, in the order measured


@dataclass
class Soak:
    via: Via
    warmup: int
    baseline: Memory
    checkpoints: list[tuple[int, Memory]]   # (sessions so far, memory then)
    after: Memory                           # after the last session and a settle
    runs: Series                            # one sample per checkpoint chunk

    @property
    def sessions(self) -> int:
        return self.checkpoints[-1][0]

    @property
    def delta_kib(self) -> int:
        return self.after.rss_kib - self.baseline.rss_kib

    @property
    def returned(self) -> bool:
        return self.delta_kib <= SOAK_TOLERANCE_KIB


class Bench:
    def __init__(self, args, tmp: Path, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.tmp = tmp
        self.stack = stack
        self.twistd = find_twistd(args)
        self.danted = None if args.no_dante else find_binary(
            args.danted, "danted", "/usr/sbin/danted", "dante-server", "--no-dante")
        if "iperf3" in args.only:
            self.iperf3 = find_binary(args.iperf3, "iperf3", "/usr/bin/iperf3", "iperf3",
                                      "--no-iperf3")
            self.socksify = find_binary(args.socksify, "socksify", "/usr/bin/socksify",
                                        "dante-client", "--no-iperf3")
        self.loadgen = build_loadgen(tmp)
        # Plain echo for idle sessions and probes; echo-16-then-close for (c).
        self.echo, self.echo_port = self.c_server(["echo"])
        self.echo16, self.echo16_port = self.c_server(["echo", "16"])
        self.bulkd, self.bulk_port = self.c_server(["bulkd"])
        self.proxies: dict[str, Via] = {}
        self.iperf3_server: tuple[Server, int] | None = None

    def c_server(self, argv: list[str]) -> tuple[Server, int]:
        srv, port = start_c_server(self.loadgen, argv, self.tmp)
        self.stack.callback(srv.stop)
        return srv, port

    # -- the proxies
    def start_proxy(self, kind: str, tag: str) -> Via:
        """A fresh proxy: "Dante", Twisted's example, or socksd with ``kind``
        as [server] workers."""
        if kind == TWISTED_EXAMPLE:
            return start_twisted_example(self.twistd, self.tmp, self.echo_port)
        if kind == "Dante":
            return start_dante(self.danted, self.tmp, self.echo_port, tag, self.args.dante_quiet)
        if kind == "metrics":
            return start_socksd(self.twistd, self.tmp, self.echo_port, tag, "1", metrics=True)
        return start_socksd(self.twistd, self.tmp, self.echo_port, tag, kind)

    def proxy(self, kind: str) -> Via:
        """The proxy of this kind the rate workloads share, started once."""
        if kind not in self.proxies:
            via = self.start_proxy(kind, f"main-{kind}")
            self.stack.callback(via.server.stop)
            self.proxies[kind] = via
        return self.proxies[kind]

    def vias(self, *workers: str) -> list[Via]:
        """direct, socksd with each of these workers settings (or "metrics"),
        and Dante."""
        socksds = [self.proxy(w) for w in dict.fromkeys(workers)]
        return [Via("direct"), *socksds, *([self.proxy("Dante")] if self.danted else [])]

    def vias_for_streams(self, streams: int) -> list[Via]:
        """One stream is served by one process: socksd workers = 1. Several
        are spread over the workers = --workers (2) socksd's processes."""
        return self.vias("1" if streams == 1 else self.args.workers)

    def with_metrics(self) -> tuple[str, ...]:
        """("metrics",) when (a) and (c) carry the socksd metrics row: unless
        --only metrics measures it by itself."""
        if "metrics" in self.args.only or self.args.no_metrics:
            return ()
        return ("metrics",)

    # -- running and accounting
    def loadgen_run(self, argv: list[str], timeout: float) -> list[float]:
        proc = subprocess.run([str(self.loadgen), *argv], capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise BenchError(f"loadgen {' '.join(argv)} failed: {proc.stderr.strip()}")
        return [float(v) for v in proc.stdout.split()]

    def measure(self, via: Via, target: Server, run) -> Sample:
        """Run ``run()`` -> (values, generator CPU s), accounting everyone's CPU."""
        proxy_pids = via.pids()
        p0, t0 = cpu_times(proxy_pids), cpu_times([target.pid])
        m0, w0 = machine_busy(), time.monotonic()
        with (scraping(via.metrics_port) if via.metrics_port
              else contextlib.nullcontext()) as scrapes:
            value, gen = run()
        wall = time.monotonic() - w0
        if scrapes is not None and (scrapes.failed or not scrapes.ok):
            raise BenchError(f"scraping {via.name}'s /metrics (port {via.metrics_port}): "
                             f"{scrapes.ok} good, {len(scrapes.failed)} failed: "
                             f"{'; '.join(scrapes.failed[:3])}")
        proxy = cpu_delta(p0, cpu_times(via.pids())) if via.server else 0.0
        tgt = cpu_delta(t0, cpu_times([target.pid]))
        others = max(0.0, machine_busy() - m0 - proxy - tgt - gen)
        def pct(s):
            return 100.0 * s / wall
        return Sample(value, pct(proxy) if via.server else None, pct(gen), pct(tgt), pct(others),
                      scrapes)

    def interleave(self, what: str, vias: list[Via], once: Callable[[Via, float], Sample],
                   show: Callable[[Sample], str], seconds: float,
                   warmup: float | None, alternate: bool = False) -> Results:
        """A warm-up run per via (unless None), then ``--rounds`` rounds, each
        running every via once, so drifting machine load hits all alike;
        with ``alternate``, every second round in the reverse order (so
        neither of two vias always runs right after the other)."""
        if warmup is not None:
            for via in vias:
                once(via, warmup)
        results = {v.name: Series() for v in vias}
        width = max(11, *(len(v.name) for v in vias))
        for r in range(self.args.rounds):
            for via in (vias[::-1] if alternate and r % 2 else vias):
                s = once(via, seconds)
                results[via.name].samples.append(s)
                scraped = f" ({s.scrapes.ok} scrapes)" if s.scrapes else ""
                log(f"  {what} {via.name:{width}} round {r + 1}/{self.args.rounds}: "
                    f"{show(s)}{scraped}")
        return results

    # -- (a), (b) bulk
    def bulk_once(self, via: Via, direction: str, streams: int, seconds: float) -> Sample:
        argv = ["bulk", direction, f"{seconds}", str(streams), str(self.bulk_port)]
        if via.port:
            argv.append(str(via.port))

        def run():
            nbytes, secs, cpu = self.loadgen_run(argv, timeout=seconds + 60)
            return {"MiB/s": nbytes / secs / 2**20}, cpu
        return self.measure(via, self.bulkd, run)

    def bulk(self, streams: int, vias: list[Via] | None = None,
             alternate: bool = False) -> dict[str, Results]:
        """Direction ("upload", "download") -> results. One stream: with the
        socksd metrics row (workers = 1, like the socksd row it is compared with)."""
        if vias is None:
            vias = (self.vias("1", *self.with_metrics()) if streams == 1
                    else self.vias_for_streams(streams))
        return {label: self.interleave(
                    f"bulk x{streams} {label:8}", vias,
                    lambda via, secs, d=d: self.bulk_once(via, d, streams, secs),
                    lambda s: f"{s.value['MiB/s']:8.1f} MiB/s", self.args.bulk_seconds, 0.3,
                    alternate)
                for d, label in (("up", "upload"), ("down", "download"))}

    # -- (c) sessions
    def sessions_once(self, via: Via, seconds: float, count: int = 0,
                      socks4: bool = False) -> Sample:
        """Closed-loop sessions for ``seconds``, or until ``count`` (0: no bound)."""
        if self.args.client_closes:
            target, argv = self.echo, ["close", str(self.echo_port)]
        else:
            target, argv = self.echo16, ["eof", str(self.echo16_port)]
        argv = ["sessions", f"{seconds}", str(count), str(self.args.concurrency), *argv]
        if via.port:
            argv.append(f"4:{via.port}" if socks4 else str(via.port))

        def run():
            n, secs, p50, p99, errors, cpu = self.loadgen_run(argv, timeout=seconds + 60)
            return {"sessions": n, "sessions/s": n / secs, "p50": p50, "p99": p99,
                    "errors": errors}, cpu
        return self.measure(via, target, run)

    def sessions(self, vias: list[Via] | None = None, alternate: bool = False) -> Results:
        if vias is None:
            vias = self.vias("1", *self.with_metrics(), self.args.workers)
        return self.interleave("sessions", vias, self.sessions_once, show_session,
                               self.args.session_seconds, 0.5, alternate)

    # -- (m) metrics on against off
    def metrics_cost(self) -> dict[str, Results]:
        """--only metrics: sessions and 1-stream bulk, socksd against socksd
        metrics only, rounds interleaved, the pair's order reversed every
        second round. "sessions", "upload", "download"."""
        vias = [self.proxy("1"), self.proxy("metrics")]
        return {"sessions": self.sessions(vias, alternate=True),
                **self.bulk(1, vias, alternate=True)}

    def sessions4(self) -> Results:
        """SOCKS4 sessions: socksd (workers = 1), Dante and Twisted's example."""
        vias = [self.proxy("1"), *([self.proxy("Dante")] if self.danted else []),
                self.proxy(TWISTED_EXAMPLE)]
        return self.interleave(
            "sessions4", vias, lambda via, secs: self.sessions_once(via, secs, socks4=True),
            show_session, self.args.session_seconds, 0.5)

    # -- (d) memory
    @contextlib.contextmanager
    def hold(self, via: Via, n: int, socks4: bool = False):
        """``n`` sessions through ``via``, handshake (SOCKS5, or SOCKS4) done,
        16 bytes echoed, idle: the client's connection to the proxy and the
        proxy's to the echo server both open."""
        proc = subprocess.Popen([str(self.loadgen), "hold", str(n), str(self.args.concurrency),
                                 str(self.echo_port),
                                 f"4:{via.port}" if socks4 else str(via.port)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            line = read_line(proc.stdout, 180, f"loadgen hold {n}")
            _, opened, errors = line.split()
            if int(opened) != n:
                raise BenchError(f"only {opened} of {n} idle sessions opened through "
                                 f"{via.name} ({errors} failed)")
            yield
        finally:
            proc.stdin.close()  # tells loadgen to close them all
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()

    def memory_once(self, row: str, tag: str) -> tuple[Memory, Memory]:
        """A fresh proxy for a row of (d): before and after holding the idle sessions."""
        kind, socks4 = MEMORY_ROWS[row]
        via = self.start_proxy(kind, tag)
        try:
            with self.hold(via, 20, socks4):  # warm-up: first-use code paths and buffers
                pass
            time.sleep(0.5)
            before = memory(via.pids())
            with self.hold(via, self.args.idle_sessions, socks4):
                time.sleep(1.0)  # let Dante finish forking, socksd settle
                after = memory(via.pids())
            return before, after
        finally:
            via.server.stop()

    def memory(self) -> dict[str, list[tuple[Memory, Memory]]]:
        """Row of (d) -> (before, after) per round, a fresh proxy each time:
        socksd and Dante holding SOCKS5 sessions, socksd and Twisted's
        example (SOCKS4 only) holding SOCKS4 ones."""
        rows = [row for row, (kind, _) in MEMORY_ROWS.items()
                if kind != "Dante" or self.danted]
        results: dict[str, list[tuple[Memory, Memory]]] = {row: [] for row in rows}
        n = self.args.idle_sessions
        width = max(len(row) for row in rows)
        for r in range(self.args.rounds):
            for k, row in enumerate(rows):
                before, after = self.memory_once(row, f"mem{r}-{k}")
                results[row].append((before, after))
                log(f"  memory {row:{width}} round {r + 1}/{self.args.rounds}: "
                    f"{(after.pss_kib - before.pss_kib) / n:6.1f} KiB/session PSS, "
                    f"{(after.rss_kib - before.rss_kib) / n:6.1f} KiB/session RSS, "
                    f"{after.processes} processes")
        return results

    # -- (e) soak
    def soak_run(self, via: Via, count: int) -> Sample:
        """Exactly ``count`` sessions (time-bounded generously)."""
        sample = self.sessions_once(via, max(60.0, count / 200), count)
        done = sample.value["sessions"] + sample.value["errors"]
        if done < count:
            raise BenchError(f"soak: only {done:.0f} of {count} sessions ended through "
                             f"{via.name} in time")
        return sample

    def soak(self) -> Soak:
        """A fresh socksd (workers = 1): warm-up, baseline RSS, the soak in
        chunks with a reading after each, a settle, the final reading."""
        via = self.start_proxy("1", "soak")
        try:
            self.soak_run(via, self.args.soak_warmup)
            time.sleep(SOAK_SETTLE)
            baseline = memory(via.pids())
            log(f"  soak baseline after {self.args.soak_warmup} sessions: "
                f"RSS {baseline.rss_kib} KiB")
            runs, checkpoints, done = Series(), [], 0
            for k in range(SOAK_CHECKPOINTS):
                chunk = self.args.soak_sessions * (k + 1) // SOAK_CHECKPOINTS - done
                runs.samples.append(self.soak_run(via, chunk))
                done += chunk
                checkpoints.append((done, memory(via.pids())))
                log(f"  soak {done:7} sessions: {runs.samples[-1].value['sessions/s']:6.0f}/s, "
                    f"RSS {checkpoints[-1][1].rss_kib} KiB")
            time.sleep(SOAK_SETTLE)
            return Soak(via, self.args.soak_warmup, baseline, checkpoints, memory(via.pids()),
                        runs)
        finally:
            via.server.stop()

    # -- (f) iperf3 through socksify
    def iperf3_port(self) -> int:
        """``iperf3 -s`` on 127.0.0.1, started once; it serves one test at a time."""
        if self.iperf3_server is None:
            port = free_port()
            srv = Server("iperf3 -s", [self.iperf3, "-s", "-B", "127.0.0.1", "-p", str(port)],
                         cwd=self.tmp)
            self.stack.callback(srv.stop)
            wait_listening(srv, port)
            self.iperf3_server = (srv, port)
        return self.iperf3_server[1]

    def iperf3_client(self, via: Via, parallel: int, reverse: bool,
                      seconds: int) -> tuple[list[str], dict | None]:
        """argv and environment: plain iperf3 direct, under socksify via a proxy."""
        argv = [self.iperf3, "-c", "127.0.0.1", "-p", str(self.iperf3_port()), "-t",
                str(seconds), "-P", str(parallel), "-J", *(["-R"] if reverse else [])]
        if not via.port:
            return argv, None
        conf = self.tmp / f"socks-{via.name.replace(' ', '-')}.conf"
        conf.write_text(SOCKS_CONF.format(port=via.port))
        # Without SOCKS_AUTOADD_LANROUTES=no libdsocks adds "direct" routes
        # for local networks, and connections to 127.0.0.1 bypass the proxy.
        env = {**os.environ, "SOCKS_CONF": str(conf), "SOCKS_AUTOADD_LANROUTES": "no"}
        return [self.socksify, *argv], env

    def iperf3_once(self, via: Via, parallel: int, reverse: bool, seconds: int) -> Sample:
        argv, env = self.iperf3_client(via, parallel, reverse, seconds)

        def run():
            cpu0 = children_cpu()
            proc = subprocess.run(argv, capture_output=True, text=True, env=env,
                                  timeout=seconds + 60, cwd=self.tmp)
            cpu = children_cpu() - cpu0
            return {"Gbit/s": iperf3_received(proc, via.name) / 1e9}, cpu
        sample = self.measure(via, self.iperf3_server[0], run)
        if via.server and sample.proxy_cpu < ROUTED_CPU:
            raise BenchError(f"iperf3 under socksify did not go through {via.name} (it used "
                             f"{sample.proxy_cpu:.1f}% CPU): socksify does not intercept iperf3 "
                             "here; check with SOCKS_DEBUG=1, or pass --no-iperf3")
        return sample

    def iperf3_tests(self) -> dict[tuple[int, str], Results]:
        """(parallel streams, direction) -> results."""
        out = {}
        for parallel in dict.fromkeys((1, self.args.streams)):
            vias = self.vias_for_streams(parallel)
            for k, (reverse, label) in enumerate(((False, "upload"), (True, "download"))):
                out[(parallel, label)] = self.interleave(
                    f"iperf3 -P {parallel} {label:8}", vias,
                    lambda via, secs, r=reverse, p=parallel: self.iperf3_once(via, p, r, secs),
                    lambda s: f"{s.value['Gbit/s']:6.2f} Gbit/s",
                    self.args.iperf3_seconds, 1 if k == 0 else None)
        return out


def iperf3_received(proc: subprocess.CompletedProcess, where: str) -> float:
    """sum_received bits/s from ``iperf3 -J``'s output, or iperf3's own error."""
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        result = {"error": (proc.stderr or proc.stdout).strip()[-500:]}
    if proc.returncode != 0 or "error" in result:
        raise BenchError(f"iperf3 via {where} failed (status {proc.returncode}): "
                         f"{result.get('error')}")
    return result["end"]["sum_received"]["bits_per_second"]


# ---- report ----------------------------------------------------------------------

def fmt_cpu(v: float | None, limit: float | None = None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}%" + ("!" if limit is not None and v > limit else "")


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def table(rows: list[list[str]], indent: str = "  ", left: int = 2) -> str:
    """Rows of cells, the first the header; the first ``left`` columns flush left."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        cells = [c.ljust(w) if i < left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.append(indent + "  ".join(cells).rstrip())
        if k == 0:
            out.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(out)


CPU_HEADS = ["proxy CPU", "client CPU", "target CPU", "other CPU"]


def cpu_cells(s: Series) -> list[str]:
    return [fmt_cpu(s.cpu("proxy_cpu")), fmt_cpu(s.cpu("gen_cpu"), GEN_BUSY),
            fmt_cpu(s.cpu("target_cpu"), GEN_BUSY), fmt_cpu(s.cpu("others_cpu"), OTHERS_BUSY)]


def rate_cells(s: Series, key: str, digits: int = 0) -> list[str]:
    """Median, min-max range, and per proxy CPU-second of ``key``."""
    pc = s.per_cpu(key)
    return [f"{s.med(key):.{digits}f}", f"{s.lo(key):.{digits}f}-{s.hi(key):.{digits}f}",
            "-" if pc is None else f"{pc:.{digits}f}"]


def socksd_of(res: Results) -> str:
    """The socksd row of a rate workload (only one of them has several)."""
    return next(name for name in res if name.startswith("socksd"))


def med(res: Results, name: str, key: str) -> float | None:
    return res[name].med(key) if name in res else None


def ratio_line(res: Results, key: str, sd: str) -> str:
    """socksd/direct, socksd/Dante and socksd/Dante per proxy CPU-second."""
    parts = [f"{sd}/direct {ratio(med(res, sd, key), med(res, 'direct', key))}"]
    if "Dante" in res:
        parts.append(f"{sd}/Dante {ratio(med(res, sd, key), med(res, 'Dante', key))}")
        parts.append(f"per proxy CPU-s {ratio(res[sd].per_cpu(key), res['Dante'].per_cpu(key))}")
    return "   ".join(parts)


def rate_report(title: list[str], groups: dict[str, Results], key: str, digits: int) -> str:
    """A throughput table, a group of rows (direct, socksd, Dante) per label,
    and the ratio lines under it."""
    rows = [["", "via", key, "range", "per proxy CPU-s", *CPU_HEADS]]
    for label, res in groups.items():
        for name, s in res.items():
            rows.append([label, name, *rate_cells(s, key, digits), *cpu_cells(s)])
    lines = [*title, table(rows), ""]
    width = max(len(label) for label in groups)
    for label, res in groups.items():
        lines.append(f"  {label:{width}}  {ratio_line(res, key, socksd_of(res))}")
    return "\n".join(lines)


def report_bulk(args, res: dict[str, Results], streams: int) -> str:
    what = ("one CONNECT stream" if streams == 1 else
            f"{streams} parallel CONNECT streams, aggregate over all of them")
    return rate_report(
        [f"{'(a)' if streams == 1 else '(b)'} Bulk throughput, {what}, {args.bulk_seconds:g} s "
         "per transfer, 1 MiB writes/reads (MiB/s = 2^20 bytes/s)"], res, "MiB/s", 0)


def cpu_per_session(s: Series) -> float | None:
    """The proxy's CPU microseconds per session: 1e6 / (sessions per proxy CPU-second)."""
    per_cpu = s.per_cpu("sessions/s")
    return None if per_cpu is None else 1e6 / max(per_cpu, 1e-9)


def report_sessions(args, res: Results, socks4: bool = False) -> str:
    rows = [["via", "", "sessions/s", "range", "per proxy CPU-s", "proxy µs/session", "p50 ms",
             "p99 ms", "errors", *CPU_HEADS]]
    for name, s in res.items():
        us = cpu_per_session(s)
        rows.append([name, "", *rate_cells(s, "sessions/s"), "-" if us is None else f"{us:.0f}",
                     f"{s.med('p50'):.2f}", f"{s.med('p99'):.2f}", f"{s.total('errors'):.0f}",
                     *cpu_cells(s)])
    close = ("client closes right after the echo" if args.client_closes else
             "echo server closes after 16 bytes, proxy passes the EOF on, client closes")
    if socks4:
        title = [f"(c4) SOCKS4 sessions, {args.concurrency} concurrent clients, "
                 f"{args.session_seconds:g} s per round: connect + CONNECT (empty USERID) + "
                 "16-byte echo + close",
                 f"    ({close}); {TWISTED_EXAMPLE} = Twisted's example server "
                 "(twisted.tap.socks): Twisted's transports, none of socksd's work"]
    else:
        title = [f"(c) Sessions, {args.concurrency} concurrent clients, "
                 f"{args.session_seconds:g} s per round: connect + greeting (none) + CONNECT + "
                 "16-byte echo + close",
                 f"    ({close}; latency = socket() to close(); direct = the same without SOCKS)"]
    lines = [*title, table(rows), ""]
    pairs = [(sd, base) for sd in res if sd.startswith("socksd")
             for base in ("Dante", TWISTED_EXAMPLE, "direct") if base in res]
    several = multi_worker(res)
    if several:
        pairs.append((several, "socksd"))
    width = max((len(f"{sd}/{base}") for sd, base in pairs), default=0)
    for sd, base in pairs:
        lines.append(f"  {sd + '/' + base:{width}} {sessions_vs(res[sd], res[base])}")
    if several:
        each = {key: [mine.value[key] / one.value[key] for mine, one in
                      zip(res[several].samples, res["socksd"].samples, strict=True)]
                for key in ("sessions/s", "p99")}
        lines.append(f"  {several}/socksd within each round (range over {args.rounds}): "
                     + ", ".join(f"{key} {min(v):.2f}-{max(v):.2f}x" for key, v in each.items()))
    for name, s in res.items():
        if s.total("errors"):
            lines.append(f"  WARNING: {s.total('errors'):.0f} sessions failed via {name}: its "
                         "numbers are not comparable (see its log with --keep;")
            lines.append("  Dante bind()s its outgoing sockets, so TIME_WAIT left on 127.0.0.1 "
                         "ports, e.g. by --client-closes, makes it fail)")
    return "\n".join(lines)


def show_session(s: Sample) -> str:
    return (f"{s.value['sessions/s']:8.0f}/s p50 {s.value['p50']:.2f} ms "
            f"p99 {s.value['p99']:.2f} ms errors {s.value['errors']:.0f}")


def sessions_ratio(res: Results, sd: str, base: str) -> str:
    return ratio(med(res, sd, "sessions/s"), med(res, base, "sessions/s"))


def multi_worker(res: Results) -> str | None:
    """The socksd row with workers > 1 in (c), if it ran beside socksd (workers = 1)."""
    if "socksd" not in res:
        return None
    return next((name for name in res if name.startswith("socksd workers=")), None)


def sessions_vs(mine: Series, base: Series) -> str:
    """Rate, rate per proxy CPU-second and CPU per session (if base is a
    proxy), and latency ratios."""
    parts = [f"sessions/s {ratio(mine.med('sessions/s'), base.med('sessions/s'))}"]
    if base.per_cpu("sessions/s") is not None:
        parts.append("per proxy CPU-s "
                     + ratio(mine.per_cpu("sessions/s"), base.per_cpu("sessions/s")))
        parts.append(f"CPU/session {ratio(cpu_per_session(mine), cpu_per_session(base))}")
    parts += [f"{p} latency {ratio(mine.med(p), base.med(p))}" for p in ("p50", "p99")]
    return "   ".join(parts)


def idle_kib(args, pairs: list[tuple[Memory, Memory]], attr: str = "pss_kib") -> list[float]:
    return [(getattr(a, attr) - getattr(b, attr)) / args.idle_sessions for b, a in pairs]


def idle_median(args, res: dict[str, list[tuple[Memory, Memory]]], row: str) -> float | None:
    """The median KiB (PSS) per idle session of a row of (d), None if not run."""
    return statistics.median(idle_kib(args, res[row])) if row in res else None


def report_memory(args, res: dict[str, list[tuple[Memory, Memory]]]) -> str:
    rows = [["proxy", "held", "processes", "PSS before", "PSS after", "KiB/session PSS",
             "range", "KiB/session RSS"]]
    for row, pairs in res.items():
        pss = idle_kib(args, pairs)
        b, a = pairs[len(pairs) // 2]
        rows.append([row, "SOCKS4" if MEMORY_ROWS[row][1] else "SOCKS5",
                     f"{b.processes}->{a.processes}", f"{b.pss_kib / 1024:.1f} MiB",
                     f"{a.pss_kib / 1024:.1f} MiB", f"{statistics.median(pss):.1f}",
                     f"{min(pss):.1f}-{max(pss):.1f}",
                     f"{statistics.median(idle_kib(args, pairs, 'rss_kib')):.1f}"])
    lines = [f"(d) Memory per idle session: {args.idle_sessions} CONNECT sessions open "
             "(handshake done, 16 bytes relayed, idle: the client's connection and",
             "    the proxy's to the echo server); fresh proxy per round, the rows interleaved; "
             "SOCKS5 sessions (greeting, CONNECT)",
             "    through socksd and Dante, SOCKS4 (CONNECT 127.0.0.1, empty USERID) through "
             f"socksd and {TWISTED_EXAMPLE}", table(rows), ""]
    for mine, base in (("socksd", "Dante"), (SOCKSD4, TWISTED_EXAMPLE)):
        if mine in res and base in res:
            lines.append(f"  {mine}/{base}  KiB per idle session (PSS) "
                         + ratio(idle_median(args, res, mine), idle_median(args, res, base)))
    lines += [
        "  PSS = sum of /proc/PID/smaps_rollup Pss over the proxy's processes (socksd, Twisted's",
        "  example: the one twistd process; Dante: the mother and every child it forked). PSS",
        "  divides a shared page among its sharers, so the sum counts it once; the RSS column sums",
        "  Rss, which counts pages shared by Dante's forked children once per child (for one",
        "  process RSS ~ PSS).",
    ]
    return "\n".join(lines)


def report_soak(args, soak: Soak) -> str:
    rows = [["reading", "", "soak sessions", "RSS KiB", "vs baseline KiB", "PSS KiB"]]
    readings = [(f"baseline (after {SOAK_SETTLE:g} s settle)", 0, soak.baseline)]
    readings += [("checkpoint", n, m) for n, m in soak.checkpoints]
    readings.append((f"after {SOAK_SETTLE:g} s settle", soak.sessions, soak.after))
    for label, n, m in readings:
        rows.append([label, "", f"{n}", f"{m.rss_kib}",
                     f"{m.rss_kib - soak.baseline.rss_kib:+d}", f"{m.pss_kib}"])
    r = soak.runs
    errors = r.total("errors")
    verdict = "returned to baseline" if soak.returned else "did NOT return to baseline"
    return "\n".join([
        f"(e) Soak: {soak.sessions} sessions through one fresh socksd (workers = 1), "
        f"{args.concurrency} concurrent clients, after {soak.warmup} warm-up sessions",
        "    (sessions as in (c); RSS of the twistd process from /proc/PID/smaps_rollup)",
        table(rows), "",
        f"  baseline {soak.baseline.rss_kib} KiB, after {soak.after.rss_kib} KiB, "
        f"delta {soak.delta_kib:+d} KiB ({soak.delta_kib * 1024 / soak.sessions:+.1f} bytes "
        f"per session): {verdict}",
        f"  criterion: after - baseline <= {SOAK_TOLERANCE_KIB} KiB (2 MiB, "
        f"~{SOAK_TOLERANCE_KIB * 1024 / soak.sessions:.0f} bytes per session over "
        f"{soak.sessions} sessions)",
        f"  {r.med('sessions/s'):.0f} sessions/s (median of {len(r.samples)} chunks), "
        f"p99 {r.med('p99'):.2f} ms, errors {errors:.0f}, "
        f"socksd CPU {fmt_cpu(r.cpu('proxy_cpu'))}",
    ])


def report_iperf3(args, res: dict[tuple[int, str], Results]) -> str:
    groups = {f"-P {p} {d}": r for (p, d), r in res.items()}
    return rate_report(
        [f"(f) iperf3 {args.iperf3_seconds} s tests (sum_received, Gbit/s = 10^9 bits/s): "
         "iperf3 -c direct, and under Dante's socksify",
         "    (libdsocks, preloaded) through socksd and Dante; download = iperf3 -R; "
         "client CPU includes libdsocks'"], groups, "Gbit/s", 2)


METRICS_ROWS = {"sessions": ("sessions/s", "sessions/s"), "upload": ("bulk up", "MiB/s"),
                "download": ("bulk down", "MiB/s")}  # results -> (label, key)


def metrics_groups(results: dict) -> dict[str, Results]:
    """"sessions", "upload", "download" -> results holding socksd and socksd
    metrics: from --only metrics, else from (c) and (a)."""
    if "metrics" in results:
        groups = results["metrics"]
    else:
        groups = {"sessions": results.get("sessions", {}), **results.get("bulk", {})}
    return {k: res for k, res in groups.items() if METRICS in res and "socksd" in res}


def on_off(res: Results | None, key: str, per_cpu: bool = False) -> float | None:
    """socksd metrics / socksd, of the medians (or of the medians per proxy CPU-s)."""
    if res is None:
        return None
    on, off = res[METRICS], res["socksd"]
    return on.per_cpu(key) / off.per_cpu(key) if per_cpu else on.med(key) / off.med(key)


def report_metrics(args, groups: dict[str, Results], own: bool) -> str:
    """Issue 15's cost line: metrics on against off, medians of the same run."""
    rows = [["", "via", "median", "range", "per proxy CPU-s", "proxy CPU", "other CPU",
             "scrapes"]]
    for k, res in groups.items():
        label, key = METRICS_ROWS[k]
        for name in ("socksd", METRICS):
            s = res[name]
            scrapes = sum(x.scrapes.ok for x in s.samples) if s.samples[0].scrapes else None
            rows.append([label if key == label else f"{label} {key}", name, *rate_cells(s, key),
                         fmt_cpu(s.cpu("proxy_cpu")), fmt_cpu(s.cpu("others_cpu"), OTHERS_BUSY),
                         "-" if scrapes is None else str(scrapes)])
    where = ("sessions as in (c) and one bulk stream as in (a), these two proxies only, rounds "
             "interleaved,\n    the pair's order reversed every second round" if own else
             "the socksd and socksd metrics rows of (c) and (a)")
    lines = ["(m) Metrics cost (issue 15): socksd against socksd metrics (the same plus [metrics] "
             "listen,",
             f"    GET /metrics every {SCRAPE_INTERVAL:g} s while each of its measurements runs); "
             f"{where}", table(rows), ""]
    if not groups:
        return "\n".join([*lines, "  (no measurement had both rows)"])
    scrapes = [x.scrapes for res in groups.values() for x in res[METRICS].samples]
    nbytes = [b for x in scrapes for b in x.nbytes]
    ms = [1000 * t for x in scrapes for t in x.seconds]
    lines.append(f"  scrapes: {len(nbytes)} GETs of /metrics in {len(scrapes)} measured runs, "
                 "every one 200 with socksd's series,")
    lines.append(f"  {statistics.median(nbytes) / 1024:.1f} KiB and {statistics.median(ms):.1f} ms "
                 f"each (median; slowest {max(ms):.1f} ms)")
    paired = []
    for k, res in groups.items():
        label, key = METRICS_ROWS[k]
        each = [on.value[key] / off.value[key]
                for on, off in zip(res[METRICS].samples, res["socksd"].samples, strict=True)]
        paired.append(f"{label} {min(each):.2f}-{max(each):.2f}x")
    lines.append(f"  on/off within each round (range over {args.rounds}): {', '.join(paired)}")
    sess, up, down = (groups.get(k) for k in ("sessions", "upload", "download"))
    judged = {"sessions/s": on_off(sess, "sessions/s"), "bulk up": on_off(up, "MiB/s"),
              "bulk down": on_off(down, "MiB/s")}

    def r(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}x"
    lines.append(f"  metrics on/off: sessions/s {r(judged['sessions/s'])}, per proxy CPU-s "
                 f"{r(on_off(sess, 'sessions/s', per_cpu=True))}; bulk up {r(judged['bulk up'])}, "
                 f"down {r(judged['bulk down'])} (target >= {METRICS_VS_OFF:g}x)")
    missed = [f"{k} {v:.3f}x" for k, v in judged.items()
              if v is not None and v < METRICS_VS_OFF]
    unknown = [k for k, v in judged.items() if v is None]
    lines.append("  issue 15 cost target (medians): " +
                 (f"MISSED ({', '.join(missed)})" if missed else
                  f"not judged (no {', '.join(unknown)} measured)" if unknown else "met"))
    return "\n".join(lines)


# ---- the summary of issue 7's targets ------------------------------------------

@dataclass
class Target:
    line: str
    socksd: str       # socksd's own figure
    vs_dante: str
    vs_direct: str
    target: str
    met: bool | None  # None: cannot tell (no Dante) or no target


def verdict(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "-"}[met]


def at_least(a: float | None, b: float | None, factor: float) -> bool | None:
    return None if a is None or not b else a >= factor * b


def rate_target(line: str, res: Results, key: str, digits: int, vs_dante: float | None,
                vs_direct: float | None = None) -> Target:
    sd = socksd_of(res)
    mine, dante, direct = med(res, sd, key), med(res, "Dante", key), med(res, "direct", key)
    checks = ([at_least(mine, dante, vs_dante)] if vs_dante else []) + \
             ([at_least(mine, direct, vs_direct)] if vs_direct else [])
    met = None if not checks or None in checks else all(checks)
    target = ", ".join(([f">= {vs_dante:g}x Dante"] if vs_dante else []) +
                        ([f">= {vs_direct:g}x direct"] if vs_direct else [])) or "(no target)"
    return Target(f"{line} ({sd})", f"{mine:.{digits}f} {key}",
                  ratio(mine, dante), ratio(mine, direct), target, met)


def sessions_target(res: Results, sd: str) -> Target:
    rate, p99 = med(res, sd, "sessions/s"), med(res, sd, "p99")
    dante_rate, dante_p99 = med(res, "Dante", "sessions/s"), med(res, "Dante", "p99")
    met = None if dante_rate is None else bool(at_least(rate, dante_rate, SESSIONS_VS_DANTE)
                                               and p99 <= dante_p99)
    return Target(f"sessions/s ({sd})", f"{rate:.0f}/s p99 {p99:.1f} ms",
                  f"{ratio(rate, dante_rate)} (p99 {ratio(p99, dante_p99)})",
                  sessions_ratio(res, sd, "direct"),
                  f">= {SESSIONS_VS_DANTE:g}x Dante, p99 <= Dante's", met)


def targets(args, results: dict) -> list[Target]:
    out = []
    for streams, key in ((1, "bulk"), (args.streams, "parallel")):
        for label, res in results.get(key, {}).items():
            line = f"bulk {'1 stream' if streams == 1 else f'{streams} streams'} {label}"
            out.append(rate_target(line, res, "MiB/s", 0,
                                   BULK_VS_DANTE if streams == 1 else PARALLEL_VS_DANTE,
                                   BULK_VS_DIRECT if streams == 1 else None))
    if "sessions" in results:
        res = results["sessions"]
        out += [sessions_target(res, sd) for sd in res
                if sd.startswith("socksd") and sd != METRICS]
    if "sessions4" in results:
        res = results["sessions4"]
        rate = med(res, "socksd", "sessions/s")
        out.append(Target("SOCKS4 sessions/s (socksd)", f"{rate:.0f}/s",
                          sessions_ratio(res, "socksd", "Dante") if "Dante" in res else "-", "-",
                          f"(no target; {sessions_ratio(res, 'socksd', TWISTED_EXAMPLE)} "
                          "Twisted's example)", None))
    if "memory" in results:
        mem = results["memory"]
        mine = statistics.median(idle_kib(args, mem["socksd"]))
        dante = statistics.median(idle_kib(args, mem["Dante"])) if "Dante" in mem else None
        out.append(Target("idle memory per session (socksd)", f"{mine:.1f} KiB",
                          ratio(mine, dante), "-", f"<= {IDLE_KIB_PER_SESSION:g} KiB/session",
                          mine <= IDLE_KIB_PER_SESSION))
    if "soak" in results:
        soak = results["soak"]
        out.append(Target(f"soak {soak.sessions} sessions (socksd)",
                          f"{soak.delta_kib:+d} KiB RSS", "-", "-",
                          f"back to baseline (<= {SOAK_TOLERANCE_KIB // 1024} MiB over)",
                          soak.returned))
    for (parallel, label), res in results.get("iperf3", {}).items():
        out.append(rate_target(f"iperf3 -P {parallel} {label}", res, "Gbit/s", 2, None))
    return out


def report_summary(args, results: dict) -> str:
    rows = [["issue 7 target line", "socksd", "socksd/Dante", "socksd/direct", "target",
             "result"]]
    found = targets(args, results)
    rows += [[t.line, t.socksd, t.vs_dante, t.vs_direct, t.target, verdict(t.met)]
             for t in found]
    judged = [t for t in found if t.met is not None]
    missed = sum(not t.met for t in judged)
    return "\n".join([
        "Summary: issue 7's targets (medians of this run; the iperf3 and SOCKS4 lines are "
        "cross-checks with no target)", table(rows, left=len(rows[0])), "",
        f"  {len(judged) - missed} of {len(judged)} targets met" +
        ("; without Dante the ratios to Dante cannot be judged" if args.no_dante else "")])


# ---- the summary of issue 18's targets -----------------------------------------

@dataclass
class Target18:
    line: str
    socksd: str       # socksd's own figure
    base: str         # the baseline's
    ratio: str        # socksd/baseline, as judged
    target: str
    met: bool | None  # None: cannot tell (a row not measured) or judged elsewhere


def per_cpu_cell(s: Series) -> str:
    return f"{s.per_cpu('sessions/s'):.0f}/CPU-s = {cpu_per_session(s):.0f} µs/session"


def cpu_target(line: str, res: Results, base: str, factor: float, strict: bool) -> Target18:
    """socksd's sessions per proxy CPU-second against ``base``'s: at least
    ``factor`` times (more than, if ``strict``)."""
    mine, theirs = res["socksd"], res.get(base)
    if theirs is None:
        return Target18(line, per_cpu_cell(mine), f"{base} not run", "n/a",
                        f"{'>' if strict else '>='} {factor:.1f}x {base}", None)
    a, b = mine.per_cpu("sessions/s"), theirs.per_cpu("sessions/s")
    return Target18(line, per_cpu_cell(mine), f"{base} {per_cpu_cell(theirs)}",
                    f"{ratio(a, b)} (CPU/session "
                    f"{ratio(cpu_per_session(mine), cpu_per_session(theirs))})",
                    f"{'>' if strict else '>='} {factor:.1f}x {base}" +
                    ("" if strict else f" (CPU/session <= {1 / factor:.2f}x)"),
                    a > factor * b if strict else a >= factor * b)


def targets18(args, results: dict) -> list[Target18]:
    """Issue 18's lines, in its order, for what this run measured."""
    out = []
    sessions, sessions4 = results.get("sessions", {}), results.get("sessions4", {})
    if "socksd" in sessions:
        out.append(cpu_target("1. SOCKS5 sessions per proxy CPU-s (socksd, workers = 1)",
                              sessions, "Dante", CPU_VS_DANTE, strict=False))
    if "socksd" in sessions4:
        out.append(cpu_target("2. SOCKS4 sessions per proxy CPU-s (socksd)", sessions4,
                              TWISTED_EXAMPLE, CPU4_VS_TWISTED, strict=True))
    if "socksd" in sessions:
        rate, dante = med(sessions, "socksd", "sessions/s"), med(sessions, "Dante", "sessions/s")
        out.append(Target18("3. SOCKS5 sessions/s (socksd, workers = 1)", f"{rate:.0f}/s",
                            "Dante not run" if dante is None else f"Dante {dante:.0f}/s",
                            ratio(rate, dante), f">= {RATE_VS_DANTE:.1f}x Dante",
                            at_least(rate, dante, RATE_VS_DANTE)))
    mem = results.get("memory", {})
    if SOCKSD4 in mem:
        mine, theirs = idle_median(args, mem, SOCKSD4), idle_median(args, mem, TWISTED_EXAMPLE)
        out.append(Target18("4. idle memory per SOCKS4 session (socksd)", f"{mine:.1f} KiB",
                            f"{TWISTED_EXAMPLE} {theirs:.1f} KiB", ratio(mine, theirs),
                            f"< {IDLE4_VS_TWISTED:.1f}x {TWISTED_EXAMPLE}",
                            None if not theirs else mine < IDLE4_VS_TWISTED * theirs))
    several = multi_worker(sessions)
    if several:
        w, one = sessions[several], sessions["socksd"]
        rate_r = w.med("sessions/s") / one.med("sessions/s")
        p99_r = w.med("p99") / one.med("p99")
        out.append(Target18(f"5. {several} against workers = 1 (SOCKS5)",
                            f"{w.med('sessions/s'):.0f}/s p99 {w.med('p99'):.1f} ms",
                            f"{one.med('sessions/s'):.0f}/s p99 {one.med('p99'):.1f} ms",
                            f"{rate_r:.2f}x (p99 {p99_r:.2f}x)",
                            f">= {WORKERS_RATE:.1f}x, p99 <= {WORKERS_P99:.2f}x",
                            rate_r >= WORKERS_RATE and p99_r <= WORKERS_P99))
    if out:
        out.append(Target18("6. GSS-API confidentiality, up and down", "-", "Dante (GSS-API)",
                            "-", ">= 1.0x Dante: gssapi_bulk.py", None))
    return out


def report_summary18(args, results: dict) -> str:
    rows = [["issue 18 target line", "socksd", "baseline", "socksd/baseline", "target",
             "result"]]
    found = targets18(args, results)
    rows += [[t.line, t.socksd, t.base, t.ratio, t.target, verdict(t.met)] for t in found]
    judged = [t for t in found if t.met is not None]
    missed = sum(not t.met for t in judged)
    return "\n".join([
        "Summary: issue 18's targets (medians of this run; line 6 is judged by "
        "benchmarks/gssapi_bulk.py, which make bench runs next)",
        table(rows, left=len(rows[0])), "",
        f"  {len(judged) - missed} of {len(judged)} targets met here" +
        ("; without Dante the ratios to Dante cannot be judged" if args.no_dante else "")])


def environment(args, bench: Bench) -> str:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "?"
    dante = "Dante not run"
    if bench.danted:
        out = subprocess.run([bench.danted, "-v"], capture_output=True, text=True, timeout=10)
        dante = (out.stdout or out.stderr).split("Copyright")[0].strip().rstrip(".")
        dante += (", logging errors only (--dante-quiet)" if args.dante_quiet else
                  ", logging one line per session (log: disconnect)")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPUs, Linux {platform.release()}, load average {load}; "
            f"Python {platform.python_version()}, Twisted {version('twisted')}, "
            f"socksd {version('socksd')}; {dante}\n"
            f"rounds: {args.rounds} (medians; range = min-max){' [--quick]' if args.quick else ''}")


def workers_note(bench: Bench) -> str:
    """Which socksd ran with how many worker processes (counted, not assumed)."""
    parts = []
    for kind, via in bench.proxies.items():
        if kind in ("Dante", TWISTED_EXAMPLE):
            continue
        if kind == "metrics":
            parts.append(f"{via.name} = socksd plus [metrics] listen on 127.0.0.1:"
                         f"{via.metrics_port}, GET /metrics every {SCRAPE_INTERVAL:g} s while "
                         "measured: 1 process (twistd)")
            continue
        setting = kind if kind.isdigit() else f'"{kind}"'
        serving = (f"{via.workers} worker processes under the supervising twistd"
                   if via.workers > 1 else "1 process (twistd)")
        parts.append(f"{via.name} = [server] workers = {setting}: {serving}")
    return "; ".join(parts)


def notes() -> str:
    return "\n".join([
        "CPU columns: CPU seconds / wall seconds, 100% = one core, median of rounds (a proxy's",
        "includes its reaped children). 'per proxy CPU-s' = the rate divided by the proxy's CPU",
        "use: Dante forks and socksd with workers > 1 runs several processes, so both can use",
        "both cores. 'proxy µs/session' = 1e6 / (sessions per proxy CPU-s): the proxy's CPU",
        "time per session. 'other' = the machine's busy CPU minus proxy, generator and target:",
        "other processes on this shared machine, kernel threads, interrupts. '!' marks a generator",
        f"or target above {GEN_BUSY:.0f}% (it may be the bottleneck) or 'other' above "
        f"{OTHERS_BUSY:.0f}% (noise: numbers are less reliable).",
    ])


# ---- main --------------------------------------------------------------------------


def run_workloads(args, bench: Bench) -> tuple[dict, list[str]]:
    """Each selected workload: its results (for the summary) and its report."""
    steps = {
        "bulk": ("(a) bulk, one stream", lambda: bench.bulk(1),
                 lambda r: report_bulk(args, r, 1)),
        "parallel": (f"(b) bulk, {args.streams} streams", lambda: bench.bulk(args.streams),
                     lambda r: report_bulk(args, r, args.streams)),
        "sessions": ("(c) sessions", bench.sessions, lambda r: report_sessions(args, r)),
        "sessions4": ("(c4) SOCKS4 sessions", bench.sessions4,
                      lambda r: report_sessions(args, r, socks4=True)),
        "memory": ("(d) memory per idle session", bench.memory,
                   lambda r: report_memory(args, r)),
        "soak": ("(e) soak", bench.soak, lambda r: report_soak(args, r)),
        "iperf3": ("(f) iperf3 through socksify", bench.iperf3_tests,
                   lambda r: report_iperf3(args, r)),
        "metrics": ("(m) metrics on against off", bench.metrics_cost,
                    lambda r: report_metrics(args, metrics_groups({"metrics": r}), own=True)),
    }
    results, reports = {}, []
    for name in args.only:
        title, run, report = steps[name]
        log(title)
        results[name] = run()
        reports.append(report(results[name]))
    if "metrics" not in args.only and ("bulk" in args.only or "sessions" in args.only):
        reports.append(report_metrics(args, metrics_groups(results), own=False))
    return results, reports


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    nofile = raise_nofile_limit()
    need = 2 * args.idle_sessions + 200
    if "memory" in args.only and nofile < need:
        raise BenchError(f"RLIMIT_NOFILE hard limit is {nofile}; {args.idle_sessions} idle "
                         f"sessions need about {need} descriptors in the proxy")
    tmp = Path(tempfile.mkdtemp(prefix="socksd-bench-"))
    with contextlib.ExitStack() as stack:
        if args.keep:
            log(f"temporary directory (kept): {tmp}")
        else:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        t0 = time.monotonic()
        bench = Bench(args, tmp, stack)
        header = environment(args, bench)
        results, reports = run_workloads(args, bench)
        workers = workers_note(bench)
        elapsed = time.monotonic() - t0
    print(f"socksd benchmarks: {header}")
    if workers:
        print(workers)
    print()
    print("\n\n".join(reports))
    print()
    print(notes())
    if targets(args, results):  # none for --only metrics (its target line is in (m))
        print()
        print(report_summary(args, results))
    if targets18(args, results):
        print()
        print(report_summary18(args, results))
    print(f"total time {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    run_main("benchmarks/run.py", main, sys.argv[1:])
