"""Instructions per session, socksd against another socksd tree, under callgrind.

The other benchmarks time things, and on a small shared machine their
ratios move by more than a few percent from run to run. This one counts
what the CPU is asked to do for one short session (connect, 16-byte echo,
close; SOCKS5 and SOCKS4, one client at a time), which does not depend on
the machine's load: valgrind's callgrind counts the instructions socksd
executes (Ir). Start-up and shutdown are taken out by the delta method:
(Ir at N2 sessions - Ir at N1 sessions) / (N2 - N1). It is how the issues'
"no regression" lines are checked between two commits:

    git worktree add /tmp/before <commit> && (cd /tmp/before && make install)
    .venv/bin/python benchmarks/callcount.py --against /tmp/before

Each tree runs its own ``.venv/bin/twistd``. Needs valgrind (make bench's
packages) and gcc for loadgen.c. Slow: callgrind runs Python some 50 times
slower, so the default is 500 and 2,500 sessions, about 3 minutes a tree.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import BenchError, build_loadgen, free_port, listening

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """\
[server]
max_sessions = 100000
max_sessions_per_client = 100000
workers = 1
"""


def total_ir(out: Path) -> int:
    found = re.search(r"^totals:\s+(\d+)", out.read_text(errors="replace"), re.M)
    if found is None:
        raise BenchError(f"{out}: no totals line (did callgrind finish?)")
    return int(found.group(1))


# With --rule-extra: every run's config has this rule, and one more row
# measures this tree with the extra lines added to it.
RULE = """
[[rules]]
name = "bench"
action = "allow"
from = ["127.0.0.0/8"]
"""


def run_once(tree: Path, loadgen: Path, echo_port: int, proto: int, sessions: int,
             work: Path, config: str = CONFIG) -> int:
    """Ir of one socksd process from start to SIGTERM, ``sessions`` served."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "socksd.toml").write_text(config)
    out = work / "callgrind.out"
    port = free_port()
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            str(tree / ".venv/bin/python"), str(tree / ".venv/bin/twistd"), "-n", "--pidfile=",
            "-l", str(work / "socksd.log"), "socks", "--config", str(work / "socksd.toml"),
            "--listen", f"tcp:{port}:interface=127.0.0.1"]
    # The same hash seed each run: dict and set layouts, and so the work, repeat.
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
    with open(work / "stderr.txt", "w") as err:
        server = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL,
                                  stdout=err, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 600      # Python start-up under valgrind
        while not listening(port):
            if server.poll() is not None or time.monotonic() > deadline:
                said = (work / "stderr.txt").read_text(errors="replace")[-2000:]
                raise BenchError(f"socksd of {tree} did not listen:\n{said}")
            time.sleep(0.1)
        time.sleep(1.0)
        target = f"4:{port}" if proto == 4 else str(port)
        done = subprocess.run([str(loadgen), "sessions", "3600", str(sessions), "1", "eof",
                               str(echo_port), target], capture_output=True, text=True,
                              timeout=7200)
        fields = done.stdout.split()
        if len(fields) < 5 or int(fields[0]) != sessions or float(fields[4]) != 0:
            raise BenchError(f"loadgen: {done.stdout.strip()} {done.stderr.strip()}")
        time.sleep(1.0)     # the last session's sides closed
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=600)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    return total_ir(out)


def per_session(tree: Path, loadgen: Path, echo_port: int, proto: int, n1: int, n2: int,
                work: Path, config: str = CONFIG) -> float:
    low = run_once(tree, loadgen, echo_port, proto, n1, work / f"s{proto}-n{n1}", config)
    high = run_once(tree, loadgen, echo_port, proto, n2, work / f"s{proto}-n{n2}", config)
    return (high - low) / (n2 - n1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, action="append", default=[],
                        help="another socksd tree with its own .venv (repeatable)")
    parser.add_argument("--protos", type=int, nargs="+", default=[5, 4], choices=[4, 5])
    parser.add_argument("--counts", type=int, nargs=2, default=[500, 2500],
                        metavar=("N1", "N2"))
    parser.add_argument("--rule-extra", metavar="TOML",
                        help="every config gets a rule allowing loopback clients, and one more "
                             "row runs this tree with these lines added to that rule (e.g. "
                             "'rate = \"100GiB\"')")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise BenchError("valgrind is not installed (make bench installs it)")
    trees = [ROOT, *(path.resolve() for path in args.against)]
    base = CONFIG + RULE if args.rule_extra else CONFIG
    runs = [(tree, base, str(tree)) for tree in trees]
    if args.rule_extra:
        runs.append((ROOT, base + args.rule_extra + "\n", f"{ROOT} + {args.rule_extra}"))
    for tree in trees:
        if not (tree / ".venv/bin/twistd").exists():
            raise BenchError(f"{tree}: no .venv/bin/twistd (make install there first)")
    n1, n2 = args.counts
    with tempfile.TemporaryDirectory(prefix="socksd-callcount-") as tmp:
        work = Path(tmp)
        loadgen = build_loadgen(work)
        # "echo 16": echoes 16 bytes, then closes (the sessions workload's eof mode).
        echo = subprocess.Popen([str(loadgen), "echo", "16"], stdout=subprocess.PIPE,
                                text=True)
        try:
            assert echo.stdout is not None
            echo_port = int(echo.stdout.readline())
            print(f"instructions (callgrind Ir) per session, {n2} - {n1} sessions")
            for proto in args.protos:
                results = [per_session(tree, loadgen, echo_port, proto, n1, n2,
                                       work / f"t{index}", config)
                           for index, (tree, config, _label) in enumerate(runs)]
                for (_tree, _config, label), ir in zip(runs, results, strict=True):
                    ratio = ir / results[0]
                    print(f"  SOCKS{proto}  {ir / 1e3:8.1f}k  {ratio:5.3f}x  {label}", flush=True)
        finally:
            echo.terminate()
            echo.wait()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        sys.exit(f"callcount: {e}")
