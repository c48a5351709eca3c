"""socksd benchmarks, against direct loopback and Dante, in one run.

(a) bulk throughput of one CONNECT stream, upload and download;
(b) SOCKS5 sessions per second with 50 concurrent clients, and their latency;
(c) memory per idle relayed session (2,000 of them).

Each number is the median of several rounds; baselines (direct loopback,
Dante) are measured in the same run, rounds interleaved, and the table gives
ratios. See benchmarks/README.rst. Run from the repository root:

    .venv/bin/python benchmarks/run.py [--quick] [--no-dante]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import (BenchError, Memory, Server, build_loadgen, cpu_delta, cpu_times,
                     free_port, machine_busy, memory, raise_nofile_limit, read_line,
                     start_c_server, wait_for_proxy)

WORKERS = "1"

SOCKSD_CONFIG = """\
# Written by benchmarks/run.py: limits high enough for the idle-session test.
[server]
max_sessions = 100000
max_sessions_per_client = 100000
workers = {workers}
"""

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
    from: 127.0.0.0/8 to: 0.0.0.0/0
}}
"""

GEN_BUSY = 80.0     # % of a core: above this a generator may be the bottleneck
OTHERS_BUSY = 30.0  # % of a core used by processes not in the benchmark: noisy


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- settings -------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark socksd against direct loopback and Dante (danted).")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round, 1 s transfers and session runs, 500 idle sessions")
    p.add_argument("--no-dante", action="store_true", help="skip Dante (danted)")
    p.add_argument("--danted", help="danted binary (default: on PATH, else /usr/sbin/danted)")
    p.add_argument("--twistd", help="twistd running socksd (default: next to this Python)")
    p.add_argument("--workers", default="1",
                   help='socksd [server] workers: a number or "auto" (default 1)')
    p.add_argument("--rounds", type=int, help="rounds per measurement, median reported (default 3)")
    p.add_argument("--bulk-seconds", type=float, help="seconds per bulk transfer (default 3)")
    p.add_argument("--session-seconds", type=float, help="seconds per sessions round (default 3)")
    p.add_argument("--concurrency", type=int, default=50,
                   help="concurrent clients in the sessions workload (default 50)")
    p.add_argument("--client-closes", action="store_true",
                   help="sessions: the client closes right after reading the echo, instead of "
                        "the echo server closing first (TIME_WAIT then piles up on ephemeral "
                        "ports; see README.rst)")
    p.add_argument("--idle-sessions", type=int,
                   help="sessions held open in the memory workload (default 2000)")
    p.add_argument("--only", action="append", choices=["bulk", "sessions", "memory"],
                   help="run only this workload (repeatable)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (configs, proxy logs) and print its path")
    args = p.parse_args(argv)
    global WORKERS
    if args.workers != "auto" and not args.workers.isdigit():
        p.error('--workers takes a number or "auto"')
    WORKERS = args.workers if args.workers.isdigit() else '"auto"'
    quick = args.quick
    if args.rounds is None:
        args.rounds = 1 if quick else 3
    if args.bulk_seconds is None:
        args.bulk_seconds = 1.0 if quick else 3.0
    if args.session_seconds is None:
        args.session_seconds = 1.0 if quick else 3.0
    if args.idle_sessions is None:
        args.idle_sessions = 500 if quick else 2000
    if args.rounds < 1 or args.rounds > 50:
        p.error("--rounds must be 1..50")
    for name in ("bulk_seconds", "session_seconds"):
        if not 0.1 <= getattr(args, name) <= 60:
            p.error(f"--{name.replace('_', '-')} must be 0.1..60")
    if not 1 <= args.concurrency <= 5000:
        p.error("--concurrency must be 1..5000")
    if not 1 <= args.idle_sessions <= 50000:
        p.error("--idle-sessions must be 1..50000")
    args.only = set(args.only or ["bulk", "sessions", "memory"])
    return args


# ---- the proxies -------------------------------------------------------------------

@dataclass
class Via:
    """A way to reach the targets: directly, or through a proxy."""
    name: str
    port: int | None = None          # SOCKS port; None = direct
    server: Server | None = None

    def pids(self) -> list[int]:
        return self.server.pids() if self.server else []


def find_twistd(args) -> str:
    twistd = args.twistd or str(Path(sys.executable).parent / "twistd")
    if not os.access(twistd, os.X_OK):
        raise BenchError(f"{twistd} not found: run `make install` (or pass --twistd)")
    return twistd


def find_danted(args) -> str:
    danted = args.danted or shutil.which("danted") or "/usr/sbin/danted"
    if not os.access(danted, os.X_OK):
        raise BenchError(f"danted not found ({danted}): install it with "
                         "`apt-get install dante-server` (make bench does), or pass --no-dante")
    return danted


def start_socksd(twistd: str, tmp: Path, echo_port: int, tag: str) -> Via:
    """A fresh twistd socks; cwd is the temp dir so the *installed* socksd runs."""
    config = tmp / "socksd.toml"
    config.write_text(SOCKSD_CONFIG.format(workers=WORKERS))
    last: BenchError | None = None
    for _ in range(3):  # a port can be taken between free_port() and bind
        port = free_port()
        srv = Server("socksd", [twistd, "-n", "--pidfile=", "-l", str(tmp / f"socksd-{tag}.log"),
                                "socks", "--config", str(config),
                                "--listen", f"tcp:{port}:interface=127.0.0.1"], cwd=tmp)
        try:
            wait_for_proxy(srv, port, echo_port)
            return Via("socksd", port, srv)
        except BenchError as exc:
            srv.stop()
            last = exc
    raise BenchError(f"{last}; see {tmp / f'socksd-{tag}.log'} (use --keep)")


def start_dante(danted: str, tmp: Path, echo_port: int, tag: str) -> Via:
    last: BenchError | None = None
    logfile = tmp / f"danted-{tag}.log"
    for _ in range(3):
        port = free_port()
        conf = tmp / f"danted-{tag}.conf"
        conf.write_text(DANTE_CONFIG.format(log=logfile, port=port))
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


# ---- measuring ------------------------------------------------------------------

@dataclass
class Sample:
    value: dict[str, float]
    proxy_cpu: float | None  # % of one core, None when direct
    gen_cpu: float
    target_cpu: float
    others_cpu: float        # machine CPU not used by proxy, generator or target


@dataclass
class Series:
    samples: list[Sample] = field(default_factory=list)

    def med(self, key: str) -> float:
        return statistics.median(s.value[key] for s in self.samples)

    def lo(self, key: str) -> float:
        return min(s.value[key] for s in self.samples)

    def hi(self, key: str) -> float:
        return max(s.value[key] for s in self.samples)

    def per_cpu(self, key: str) -> float | None:
        """Median of value per proxy CPU-second (a proxy may use several cores)."""
        if self.samples[0].proxy_cpu is None:
            return None
        return statistics.median(s.value[key] / max(s.proxy_cpu / 100.0, 1e-9)
                                 for s in self.samples)

    def cpu(self, attr: str) -> float | None:
        vals = [getattr(s, attr) for s in self.samples]
        return None if vals[0] is None else statistics.median(vals)


class Bench:
    def __init__(self, args, tmp: Path, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.tmp = tmp
        self.stack = stack
        self.twistd = find_twistd(args)
        self.danted = None if args.no_dante else find_danted(args)
        self.loadgen = build_loadgen(tmp)
        # Plain echo for idle sessions and probes; echo-16-then-close for (b).
        self.echo, self.echo_port = start_c_server(self.loadgen, ["echo"], tmp)
        stack.callback(self.echo.stop)
        self.echo16, self.echo16_port = start_c_server(self.loadgen, ["echo", "16"], tmp)
        stack.callback(self.echo16.stop)
        self.bulkd, self.bulk_port = start_c_server(self.loadgen, ["bulkd"], tmp)
        stack.callback(self.bulkd.stop)
        self.proxies: list[Via] = []

    def start_proxies(self) -> list[Via]:
        """socksd and Dante, kept running for the bulk and sessions workloads."""
        if not self.proxies:
            socksd = start_socksd(self.twistd, self.tmp, self.echo_port, "main")
            self.stack.callback(socksd.server.stop)
            self.proxies.append(socksd)
            if self.danted:
                dante = start_dante(self.danted, self.tmp, self.echo_port, "main")
                self.stack.callback(dante.server.stop)
                self.proxies.append(dante)
        return self.proxies

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
        value, gen = run()
        wall = time.monotonic() - w0
        proxy = cpu_delta(p0, cpu_times(via.pids())) if via.server else 0.0
        tgt = cpu_delta(t0, cpu_times([target.pid]))
        others = max(0.0, machine_busy() - m0 - proxy - tgt - gen)
        pct = lambda s: 100.0 * s / wall
        return Sample(value, pct(proxy) if via.server else None, pct(gen), pct(tgt), pct(others))

    # -- (a) bulk
    def bulk_once(self, via: Via, direction: str, seconds: float) -> Sample:
        argv = ["bulk", direction, f"{seconds}", str(self.bulk_port)]
        if via.port:
            argv.append(str(via.port))

        def run():
            nbytes, secs, cpu = self.loadgen_run(argv, timeout=seconds + 60)
            return {"MiB/s": nbytes / secs / 2**20}, cpu
        return self.measure(via, self.bulkd, run)

    def bulk(self) -> dict[tuple[str, str], Series]:
        vias = [Via("direct")] + self.start_proxies()
        results = {(d, v.name): Series() for d in ("upload", "download") for v in vias}
        for d in ("up", "down"):
            for via in vias:
                self.bulk_once(via, d, 0.3)  # warm-up
        for r in range(self.args.rounds):
            for d, label in (("up", "upload"), ("down", "download")):
                for via in vias:
                    s = self.bulk_once(via, d, self.args.bulk_seconds)
                    results[(label, via.name)].samples.append(s)
                    log(f"  bulk {label:8} {via.name:6} round {r + 1}/{self.args.rounds}: "
                        f"{s.value['MiB/s']:8.1f} MiB/s")
        return results

    # -- (b) sessions
    def sessions_once(self, via: Via, seconds: float) -> Sample:
        if self.args.client_closes:
            target, argv = self.echo, ["close", str(self.echo_port)]
        else:
            target, argv = self.echo16, ["eof", str(self.echo16_port)]
        argv = ["sessions", f"{seconds}", str(self.args.concurrency), *argv]
        if via.port:
            argv.append(str(via.port))

        def run():
            count, secs, p50, p99, errors, cpu = self.loadgen_run(argv, timeout=seconds + 60)
            return {"sessions/s": count / secs, "p50": p50, "p99": p99, "errors": errors}, cpu
        return self.measure(via, target, run)

    def sessions(self) -> dict[str, Series]:
        vias = [Via("direct")] + self.start_proxies()
        results = {v.name: Series() for v in vias}
        for via in vias:
            self.sessions_once(via, 0.5)  # warm-up
        for r in range(self.args.rounds):
            for via in vias:
                s = self.sessions_once(via, self.args.session_seconds)
                results[via.name].samples.append(s)
                log(f"  sessions {via.name:6} round {r + 1}/{self.args.rounds}: "
                    f"{s.value['sessions/s']:8.0f}/s p50 {s.value['p50']:.2f} ms "
                    f"p99 {s.value['p99']:.2f} ms errors {s.value['errors']:.0f}")
        return results

    # -- (c) memory
    @contextlib.contextmanager
    def hold(self, via: Via, n: int):
        """``n`` sessions through ``via``, handshake done, 16 bytes echoed, idle."""
        proc = subprocess.Popen([str(self.loadgen), "hold", str(n), str(self.args.concurrency),
                                 str(self.echo_port), str(via.port)],
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

    def memory_once(self, kind: str, tag: str) -> tuple[Memory, Memory]:
        start = start_socksd if kind == "socksd" else start_dante
        binary = self.twistd if kind == "socksd" else self.danted
        via = start(binary, self.tmp, self.echo_port, tag)
        try:
            with self.hold(via, 20):  # warm-up: first-use code paths and buffers
                pass
            time.sleep(0.5)
            before = memory(via.pids())
            with self.hold(via, self.args.idle_sessions):
                time.sleep(1.0)  # let Dante finish forking, socksd settle
                after = memory(via.pids())
            return before, after
        finally:
            via.server.stop()

    def memory(self) -> dict[str, list[tuple[Memory, Memory]]]:
        kinds = ["socksd"] + (["Dante"] if self.danted else [])
        results: dict[str, list[tuple[Memory, Memory]]] = {k: [] for k in kinds}
        n = self.args.idle_sessions
        for r in range(self.args.rounds):
            for kind in kinds:
                before, after = self.memory_once(kind, f"mem{r}")
                results[kind].append((before, after))
                log(f"  memory {kind:6} round {r + 1}/{self.args.rounds}: "
                    f"{(after.pss_kib - before.pss_kib) / n:6.1f} KiB/session PSS, "
                    f"{(after.rss_kib - before.rss_kib) / n:6.1f} KiB/session RSS, "
                    f"{after.processes} processes")
        return results


# ---- report ----------------------------------------------------------------------

def fmt_cpu(v: float | None, limit: float | None = None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}%" + ("!" if limit is not None and v > limit else "")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def table(rows: list[list[str]], indent: str = "  ") -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append(indent + "  ".join(cells).rstrip())
        if k == 0:
            out.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(out)


def environment(args, bench: Bench) -> str:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "?"
    dante = "not run"
    if bench.danted:
        out = subprocess.run([bench.danted, "-v"], capture_output=True, text=True, timeout=10)
        dante = (out.stdout or out.stderr).split("Copyright")[0].strip().rstrip(".")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPUs, Linux {platform.release()}, load average {load}; "
            f"Python {platform.python_version()}, Twisted {version('twisted')}, "
            f"socksd {version('socksd')}; {dante}\n"
            f"rounds: {args.rounds} (medians; range = min-max){' [--quick]' if args.quick else ''}")


def report_bulk(args, res: dict[tuple[str, str], Series], names: list[str]) -> str:
    rows = [["direction", "via", "MiB/s", "range", "per proxy CPU-s", "proxy CPU", "client CPU",
             "target CPU", "other CPU"]]
    for d in ("upload", "download"):
        for v in names:
            s = res[(d, v)]
            pc = s.per_cpu("MiB/s")
            rows.append([d, v, f"{s.med('MiB/s'):.0f}", f"{s.lo('MiB/s'):.0f}-{s.hi('MiB/s'):.0f}",
                         "-" if pc is None else f"{pc:.0f} MiB", fmt_cpu(s.cpu("proxy_cpu")), fmt_cpu(s.cpu("gen_cpu"), GEN_BUSY),
                         fmt_cpu(s.cpu("target_cpu"), GEN_BUSY),
                         fmt_cpu(s.cpu("others_cpu"), OTHERS_BUSY)])
    lines = [f"(a) Bulk throughput, one CONNECT stream, {args.bulk_seconds:g} s per transfer, "
             "1 MiB writes/reads (MiB/s = 2^20 bytes/s)", table(rows), ""]
    for d in ("upload", "download"):
        sd = res[(d, "socksd")].med("MiB/s")
        parts = [f"socksd/direct {ratio(sd, res[(d, 'direct')].med('MiB/s'))}"]
        if "Dante" in names:
            parts.append(f"socksd/Dante {ratio(sd, res[(d, 'Dante')].med('MiB/s'))}")
            parts.append("socksd/Dante per proxy CPU-s "
                         + ratio(res[(d, "socksd")].per_cpu("MiB/s"), res[(d, "Dante")].per_cpu("MiB/s")))
        lines.append(f"  {d:8}  " + "   ".join(parts))
    return "\n".join(lines)


def report_sessions(args, res: dict[str, Series], names: list[str]) -> str:
    rows = [["via", "", "sessions/s", "range", "per proxy CPU-s", "p50 ms", "p99 ms", "errors",
             "proxy CPU", "gen CPU", "echo CPU", "other CPU"]]
    for v in names:
        s = res[v]
        pc = s.per_cpu("sessions/s")
        rows.append([v, "", f"{s.med('sessions/s'):.0f}",
                     f"{s.lo('sessions/s'):.0f}-{s.hi('sessions/s'):.0f}",
                     "-" if pc is None else f"{pc:.0f}",
                     f"{s.med('p50'):.2f}", f"{s.med('p99'):.2f}",
                     f"{sum(x.value['errors'] for x in s.samples):.0f}",
                     fmt_cpu(s.cpu("proxy_cpu")), fmt_cpu(s.cpu("gen_cpu"), GEN_BUSY),
                     fmt_cpu(s.cpu("target_cpu"), GEN_BUSY),
                     fmt_cpu(s.cpu("others_cpu"), OTHERS_BUSY)])
    close = ("client closes right after the echo" if args.client_closes else
             "echo server closes after 16 bytes, proxy passes the EOF on, client closes")
    lines = [f"(b) Sessions, {args.concurrency} concurrent clients, {args.session_seconds:g} s "
             "per round: connect + greeting (none) + CONNECT + 16-byte echo + close",
             f"    ({close}; latency = socket() to close(); direct = the same without SOCKS)",
             table(rows), ""]
    sd = res["socksd"]
    if "Dante" in names:
        dn = res["Dante"]
        lines.append(f"  socksd/Dante  sessions/s {ratio(sd.med('sessions/s'), dn.med('sessions/s'))}"
                     f"   per proxy CPU-s {ratio(sd.per_cpu('sessions/s'), dn.per_cpu('sessions/s'))}"
                     f"   p50 latency {ratio(sd.med('p50'), dn.med('p50'))}"
                     f"   p99 latency {ratio(sd.med('p99'), dn.med('p99'))}")
    lines.append(f"  socksd/direct sessions/s "
                 f"{ratio(sd.med('sessions/s'), res['direct'].med('sessions/s'))}")
    for v in names:
        errors = sum(x.value["errors"] for x in res[v].samples)
        if errors:
            lines.append(f"  WARNING: {errors:.0f} sessions failed via {v}: its numbers are not "
                         "comparable (see its log with --keep;")
            lines.append("  Dante bind()s its outgoing sockets, so TIME_WAIT left on 127.0.0.1 "
                         "ports, e.g. by --client-closes, makes it fail)")
    return "\n".join(lines)


def report_memory(args, res: dict[str, list[tuple[Memory, Memory]]]) -> str:
    n = args.idle_sessions
    rows = [["proxy", "", "processes", "PSS before", "PSS after", "KiB/session PSS", "range",
             "KiB/session RSS"]]
    per = {}
    for kind, pairs in res.items():
        pss = [(a.pss_kib - b.pss_kib) / n for b, a in pairs]
        rss = [(a.rss_kib - b.rss_kib) / n for b, a in pairs]
        per[kind] = statistics.median(pss)
        b, a = pairs[len(pairs) // 2]
        rows.append([kind, "", f"{b.processes}->{a.processes}", f"{b.pss_kib / 1024:.1f} MiB",
                     f"{a.pss_kib / 1024:.1f} MiB", f"{per[kind]:.1f}",
                     f"{min(pss):.1f}-{max(pss):.1f}", f"{statistics.median(rss):.1f}"])
    lines = [f"(c) Memory per idle session: {n} CONNECT sessions open (handshake done, 16 bytes "
             "relayed, idle); fresh proxy per round", table(rows), ""]
    if "Dante" in per:
        lines.append(f"  socksd/Dante  KiB per idle session (PSS) {ratio(per['socksd'], per['Dante'])}")
    lines += [
        "  PSS = sum of /proc/PID/smaps_rollup Pss over the proxy's processes (socksd: the one",
        "  twistd process; Dante: the mother and every child it forked). PSS divides a shared",
        "  page among its sharers, so the sum counts it once; the RSS column sums Rss, which",
        "  counts pages shared by Dante's forked children once per child (for socksd RSS ~ PSS).",
    ]
    return "\n".join(lines)


def notes() -> str:
    return "\n".join([
        "CPU columns: CPU seconds / wall seconds, 100% = one core, median of rounds (a proxy's",
        "includes its reaped children). 'per proxy CPU-s' = the rate divided by the proxy's CPU",
        "use: Dante forks and can use both cores, socksd is one thread. 'other' = the",
        "machine's busy CPU minus proxy, generator and target: other processes on this shared",
        "machine, kernel threads, interrupts. '!' marks a generator or target above "
        f"{GEN_BUSY:.0f}% (it may be",
        f"the bottleneck) or 'other' above {OTHERS_BUSY:.0f}% (noise: numbers are less reliable).",
    ])


# ---- main --------------------------------------------------------------------------

class Terminated(Exception):
    """SIGTERM or SIGHUP: unwind so that every server we started is stopped."""


def _terminate(signum, frame):
    raise Terminated(signum)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    nofile = raise_nofile_limit()
    need = 2 * args.idle_sessions + 200
    if "memory" in args.only and nofile < need:
        raise BenchError(f"RLIMIT_NOFILE hard limit is {nofile}; {args.idle_sessions} idle "
                         f"sessions need about {need} descriptors in the proxy")
    tmp = Path(tempfile.mkdtemp(prefix="socksd-bench-"))
    out = []
    with contextlib.ExitStack() as stack:
        if args.keep:
            log(f"temporary directory (kept): {tmp}")
        else:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        t0 = time.monotonic()
        bench = Bench(args, tmp, stack)
        header = environment(args, bench)
        names = ["direct", "socksd"] + (["Dante"] if bench.danted else [])
        if "bulk" in args.only:
            log("(a) bulk throughput")
            out.append(report_bulk(args, bench.bulk(), names))
        if "sessions" in args.only:
            log("(b) sessions")
            out.append(report_sessions(args, bench.sessions(), names))
        if "memory" in args.only:
            log("(c) memory per idle session")
            out.append(report_memory(args, bench.memory()))
        elapsed = time.monotonic() - t0
    print(f"socksd benchmarks: {header}\n")
    print("\n\n".join(out))
    print()
    print(notes())
    print(f"total time {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as exc:
        print(f"benchmarks/run.py: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("benchmarks/run.py: interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
    except Terminated as exc:
        print(f"benchmarks/run.py: signal {exc.args[0]}; servers stopped", file=sys.stderr)
        sys.exit(128 + exc.args[0])
