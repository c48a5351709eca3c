"""Processes and /proc readings for benchmarks/run.py.

Everything here starts servers on 127.0.0.1 and is careful to stop them:
each server is a :class:`Server` registered with the caller's ExitStack,
and the C servers also die with run.py (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import os
import random
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A benchmark cannot run; the message says why and what to do."""


# ---- environment ------------------------------------------------------------

def raise_nofile_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def build_loadgen(tmp: Path) -> Path:
    """Compile loadgen.c into ``tmp``; C keeps the generators cheap."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise BenchError("no C compiler (gcc) found: it builds benchmarks/loadgen.c")
    out = tmp / "loadgen"
    proc = subprocess.run([cc, "-O2", "-Wall", "-pthread", "-o", str(out),
                           str(HERE / "loadgen.c")],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise BenchError(f"compiling loadgen.c failed:\n{proc.stderr}")
    return out


def free_port() -> int:
    """A port below the ephemeral range that nothing holds right now.

    Ports from bind(0) are ephemeral ones, which the sessions benchmark's
    outgoing connections may grab before the proxy binds it.
    """
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise BenchError("no free TCP port found in 20000-32000 on 127.0.0.1")


def find_binary(explicit: str | None, name: str, fallback: str, install: str,
                skip_flag: str) -> str:
    """``explicit``, else ``name`` on PATH, else ``fallback``; BenchError
    saying how to install it (or skip the workload) if it is not there."""
    path = explicit or shutil.which(name) or fallback
    if not os.access(path, os.X_OK):
        raise BenchError(f"{name} not found ({path}): install it with `apt-get install "
                         f"{install}` (make bench does), or pass {skip_flag}")
    return path


# ---- processes ----------------------------------------------------------------

class Server:
    """A process we started, in its own session so Ctrl-C reaches only us."""

    def __init__(self, name: str, argv: list[str], *, cwd: Path, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL, env: dict | None = None) -> None:
        self.name = name
        self.argv = argv
        self.proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=stdout,
                                     stderr=stderr, env=env, start_new_session=True)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pids(self) -> list[int]:
        """This process and all its descendants (Dante forks many)."""
        return [self.pid] + descendants(self.pid) if self.alive() else []

    def stop(self) -> None:
        """SIGTERM, then SIGKILL whatever is left of its process group."""
        if self.alive():
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # the group we created (children)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.stdout:
            self.proc.stdout.close()


def read_line(stream, timeout: float, what: str) -> str:
    """One line from a child's stdout pipe, or BenchError after ``timeout``."""
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise BenchError(f"{what}: no answer in {timeout:g} s")
    finally:
        sel.close()
    line = stream.readline()
    if not line:
        raise BenchError(f"{what}: exited without answering")
    return line.strip()


def start_c_server(loadgen: Path, argv: list[str], tmp: Path) -> tuple[Server, int]:
    """Start ``loadgen echo [N]`` or ``loadgen bulkd``; it prints its port."""
    name = "loadgen " + " ".join(argv)
    srv = Server(name, [str(loadgen), *argv], cwd=tmp, stdout=subprocess.PIPE)
    try:
        port = int(read_line(srv.proc.stdout, 10, name))
    except BaseException:
        srv.stop()
        raise
    return srv, port


def socks_probe(port: int, echo_port: int, timeout: float = 2.0, version: int = 5) -> None:
    """One full SOCKS5 (or SOCKS4) CONNECT session through the proxy; raises
    OSError if not."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if version == 4:
            s.sendall(b"\x04\x01" + struct.pack("!H", echo_port)
                      + socket.inet_aton("127.0.0.1") + b"\x00")
            reply = recv_exactly(s, 8)
            if reply[1] != 90:
                raise OSError(f"SOCKS4 CONNECT failed with reply {reply[1]}")
        else:
            s.sendall(b"\x05\x01\x00")
            if recv_exactly(s, 2) != b"\x05\x00":
                raise OSError("proxy refused method none")
            s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                      + struct.pack("!H", echo_port))
            reply = recv_exactly(s, 10)
            if reply[1] != 0:
                raise OSError(f"CONNECT failed with reply {reply[1]}")
        s.sendall(b"x" * 16)
        if recv_exactly(s, 16) != b"x" * 16:
            raise OSError("echo through the proxy came back wrong")


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise OSError("connection closed early")
        data += chunk
    return data


def listening(port: int) -> bool:
    """Whether a socket listens on 127.0.0.1:``port`` (from /proc/net/tcp,
    without connecting: iperf3 -s would take a probe for a client)."""
    local = f"{socket.htonl(0x7F000001):08X}:{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        return any(fields[1] == local and fields[3] == "0A"
                   for fields in (line.split() for line in f))


def wait_listening(srv: Server, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not listening(port):
        if not srv.alive():
            raise BenchError(f"{srv.name} exited with status {srv.proc.returncode} at start-up")
        if time.monotonic() > deadline:
            raise BenchError(f"{srv.name} is not listening on port {port} after {timeout:g} s")
        time.sleep(0.05)


def wait_for_proxy(srv: Server, port: int, echo_port: int, timeout: float = 20.0,
                   version: int = 5) -> None:
    """Until a SOCKS5 (or 4) session through ``srv`` works (or it died / timed out)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not srv.alive():
            raise BenchError(f"{srv.name} exited with status {srv.proc.returncode} at start-up")
        try:
            socks_probe(port, echo_port, version=version)
            return
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    raise BenchError(f"{srv.name} did not serve a SOCKS{version} session on port {port} "
                     f"within {timeout:g} s ({last})")


# ---- /proc -----------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()  # fields from "state" on


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cpu_times(pids: list[int]) -> dict[int, float]:
    """CPU seconds used so far by each pid: user + system of all its threads,
    plus that of its children that exited and were reaped (Dante recycles
    its children; live children are in ``pids`` themselves)."""
    out = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            out[pid] = sum(int(v) for v in fields[11:15]) / CLK_TCK
    return out


def children_cpu() -> float:
    """CPU seconds of this process's reaped children (subprocess.run's)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU used by a process tree between two snapshots of all its live
    processes. A child that exits and is reaped moves its time into its
    parent's, so the tree's total is continuous: compare totals, not pids."""
    return sum(after.values()) - sum(before.values())


def machine_busy() -> float:
    """CPU seconds all CPUs have spent not idle since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


@dataclass
class Memory:
    processes: int
    rss_kib: int
    pss_kib: int


def memory(pids: list[int]) -> Memory:
    """RSS and PSS summed over ``pids``. PSS splits shared pages between
    the processes sharing them, so a sum of PSS counts each page once."""
    rss = pss = n = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                lines = f.readlines()[1:]  # the first is the "[rollup]" header
            fields = dict(line.split(":", 1) for line in lines if ":" in line)
        except OSError:
            continue
        rss += int(fields["Rss"].split()[0])
        pss += int(fields["Pss"].split()[0])
        n += 1
    return Memory(n, rss, pss)


# ---- running a benchmark script -------------------------------------------------

class Terminated(Exception):
    """SIGTERM or SIGHUP: unwind so that every server we started is stopped."""


def _terminate(signum, frame):
    raise Terminated(signum)


def run_main(script: str, main, argv: list[str]) -> None:
    """Run ``main(argv)`` and exit with its status. Signals unwind the stack
    (every server is stopped by its context); errors are one line on stderr."""
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    try:
        sys.exit(main(argv))
    except BenchError as exc:
        print(f"{script}: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{script}: interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
    except Terminated as exc:
        print(f"{script}: signal {exc.args[0]}; servers stopped", file=sys.stderr)
        sys.exit(128 + exc.args[0])
