"""Issue 17's rows of ``make bench``: what a generous rate costs, and what a
chained session moves, as ratios to plain socksd in the same run.

Every proxy is a real ``twistd socks`` with its own config file:

* ``none``: one rule allowing loopback clients;
* ``generous``: the same rule with ``rate = "100GiB"`` (far above loopback:
  its bucket never runs dry), for the "at most 5%" line;
* ``chained``: the same rule with ``via`` an upstream, itself a ``none``
  socksd (client -> socksd -> upstream socksd -> target);
* with ``splice = false`` a second ``none`` and ``generous`` pair, for
  Twisted's relay path.

Workloads, by loadgen.c: one bulk stream up and one down, and closed-loop
SOCKS5 sessions (16-byte echo). Rounds are interleaved, alternating which
proxy goes first. Prints medians, min-max and each ratio to ``none``; exits 0
whatever the ratios (numbers to compare, not a test).

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
    cpu_delta,
    cpu_times,
    free_port,
    run_main,
    start_c_server,
    wait_for_proxy,
)

SERVER = """
[server]
max_sessions = 100000
max_sessions_per_client = 100000
splice = {splice}
"""
RULE = """
[[rules]]
name = "bench"
action = "allow"
from = ["127.0.0.0/8"]
"""
GENEROUS = 'rate = "100GiB"\n'
UPSTREAM = """
[[upstreams]]
name = "up"
url = "socks5://127.0.0.1:{port}"
"""
VIA = 'via = ["up"]\n'


def start_socksd(twistd: str, tmp: Path, tag: str, text: str, echo_port: int,
                 stack: contextlib.ExitStack) -> tuple[int, Server]:
    config = tmp / f"{tag}.toml"
    config.write_text(text)
    for _ in range(3):      # a port can be taken between free_port() and bind
        port = free_port()
        srv = Server(f"socksd {tag}", [twistd, "-n", "--pidfile=", "-l",
                                       str(tmp / f"{tag}.log"), "socks", "--config",
                                       str(config), "--listen",
                                       f"tcp:{port}:interface=127.0.0.1"], cwd=tmp)
        try:
            wait_for_proxy(srv, port, echo_port)
        except BenchError:
            srv.stop()
            continue
        stack.callback(srv.stop)
        return port, srv
    raise BenchError(f"socksd {tag} did not start: see {tmp / f'{tag}.log'}")


def loadgen(binary: Path, argv: list[str], seconds: float) -> list[float]:
    proc = subprocess.run([str(binary), *argv], capture_output=True, text=True,
                          timeout=seconds + 60)
    if proc.returncode != 0:
        raise BenchError(f"loadgen {' '.join(argv)} failed: {proc.stderr.strip()}")
    return [float(v) for v in proc.stdout.split()]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="per transfer or sessions run")
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--twistd", default=str(Path(sys.executable).parent / "twistd"))
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

        servers: dict[tuple[str, str], list[Server]] = {}

        def socksd(key: tuple[str, str], text: str, *also: Server) -> int:
            port, srv = start_socksd(args.twistd, tmp, "-".join(key), text, echo_port, stack)
            servers[key] = [srv, *also]
            return port

        spliced = SERVER.format(splice="true")
        twisted = SERVER.format(splice="false")
        proxies = {
            ("splice", "none"): socksd(("splice", "none"), spliced + RULE),
            ("splice", "generous"): socksd(("splice", "generous"), spliced + RULE + GENEROUS),
            ("twisted", "none"): socksd(("twisted", "none"), twisted + RULE),
            ("twisted", "generous"): socksd(("twisted", "generous"), twisted + RULE + GENEROUS),
        }
        upstream, upstream_srv = start_socksd(args.twistd, tmp, "upstream", spliced + RULE,
                                              echo_port, stack)
        # A chained session's CPU is both proxies'.
        proxies["splice", "chained"] = socksd(
            ("splice", "chained"), spliced + UPSTREAM.format(port=upstream) + RULE + VIA,
            upstream_srv)
        per_cpu: dict[tuple[str, str], list[float]] = {}
        workloads = [(f"bulk {d}, {path}", path,
                      lambda secs, d=d: ["bulk", d, f"{secs}", "1", str(bulk_port)], "MiB/s")
                     for path in ("splice", "twisted") for d in ("up", "down")]
        workloads.append(("sessions", "splice",
                          lambda secs: ["sessions", f"{secs}", "0", str(args.concurrency),
                                        "eof", str(echo_port)], "sessions/s"))
        for name, path, make, unit in workloads:
            modes = [mode for (p_, mode) in proxies if p_ == path]
            for mode in modes:     # warm-up
                loadgen(binary, [*make(0.3), str(proxies[path, mode])], 1)
            for r in range(args.rounds):
                for mode in (modes if r % 2 == 0 else modes[::-1]):
                    pids = [pid for srv in servers[path, mode] for pid in srv.pids()]
                    before = cpu_times(pids)
                    out = loadgen(binary, [*make(args.seconds), str(proxies[path, mode])],
                                  args.seconds)
                    cpu = cpu_delta(before, cpu_times(pids))
                    amount = out[0] / (1 << 20) if unit == "MiB/s" else out[0]
                    value = amount / out[1]
                    results.setdefault((name, mode), []).append(value)
                    if cpu > 0:
                        per_cpu.setdefault((name, mode), []).append(amount / cpu)
                    print(f"  {name:18} {mode:8} round {r + 1}/{args.rounds}: "
                          f"{value:10.1f} {unit}", flush=True)
        print(f"\nIssue 17, medians of {args.rounds} (min-max); ratios to socksd with no "
              "rate and no upstream, same run. Per proxy CPU-second: what the work cost "
              "the proxies (both, chained), steadier than the rate on a busy machine.")
        print(f"  {'workload':18} {'mode':9} {'value':>22}  ratio   {'per proxy CPU-s':>16}"
              "  ratio")
        for name, path, _make, unit in workloads:
            none = statistics.median(results[name, "none"])
            none_cpu = statistics.median(per_cpu.get((name, "none"), [0.0])) or None
            for mode in [m for (p_, m) in proxies if p_ == path]:
                values = results[name, mode]
                cell = f"{statistics.median(values):9.1f} ({min(values):.0f}-{max(values):.0f})"
                ratio = statistics.median(values) / none
                spent = statistics.median(per_cpu.get((name, mode), [0.0]))
                cpu_ratio = f"{spent / none_cpu:5.3f}" if none_cpu and spent else "    -"
                print(f"  {name:18} {mode:9} {cell:>22}  {ratio:5.3f}  {spent:16.1f}  "
                      f"{cpu_ratio}  {unit.split('/')[0]}")
        print("  (target: generous/none >= 0.95 for bulk and sessions; chained: the cost of "
              "a second proxy hop)")
    return 0


if __name__ == "__main__":
    run_main("rate_cost.py", main, sys.argv[1:])
