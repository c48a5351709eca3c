"""GSS-API (RFC 1961) bulk throughput: what the security layer costs.

One CONNECT stream carries data for ``--seconds`` (2 s) to or from a local
bulk target (loadgen.c's ``bulkd``), through

* plain socksd (method none), with a C client (``loadgen bulk``, the same
  transfer as run.py's bulk workload) and with this file's Python client;
* a GSS-API socksd (levels clear, integrity and confidentiality allowed) at
  protection level 0 (clear: no wrapping), 1 (integrity) and 2
  (confidentiality), with this file's Python client.

The GSS-API client is a separate process (``gssapi_bulk.py client ...``)
driving python-gssapi over a blocking socket: it wraps plaintext chunks as
large as ``get_wrap_size_limit(65535)`` allows (just under 64 KiB, so each
MTYP 3 frame is at most 65535 bytes of token), 16 frames per write, and
unwraps every frame it reads. Its own wrap/unwrap cost is PART OF THE
MEASUREMENT: a stream is only as fast as the slower of the two ends, and the
client CPU column shows how busy the client was. The plain rows use the same
Python client (method none, 1 MiB writes and reads), so "level N / plain" is
the cost of GSS-API alone, with the same client code on both sides of the
ratio.

Then, against Dante (issue 18): ``--mib`` (256) MiB up and down through a
socksd allowing GSS-API confidentiality only and through Dante's own server
(``sockd``, built with GSS-API by tests/dante_gssapi.py, enforcing
confidentiality), with Dante's client library as the client of both:
``socksify loadgen transfer``, libdsocks wrapping and unwrapping in C. Each
transfer is checked to have gone through the proxy at confidentiality.

Everything runs on 127.0.0.1: a k5test KDC (its own realm, ports from
``--kdc-portbase``, default 65000, stopped on exit), the ``twistd -n
socks``, Dante's sockd, bulkd and an echo server; all of them are stopped on
exit, on errors, on Ctrl-C and on SIGTERM. Rounds are interleaved; each cell
is the median of ``--rounds`` (3). Needs k5test (``pip install k5test``, a
test extra) and MIT's KDC (``apt-get install krb5-kdc krb5-admin-server
krb5-user``; ``make test`` installs both). Run from the repository root:

    .venv/bin/python benchmarks/gssapi_bulk.py [--quick] [--rounds 3] [--seconds 2] [--mib 256]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    BenchError,
    Server,
    build_loadgen,
    cpu_delta,
    cpu_times,
    free_port,
    machine_busy,
    run_main,
    start_c_server,
    wait_for_proxy,
)

HERE = Path(__file__).resolve().parent
BUSY = 80.0          # % of a core: above this a client or target may be the bottleneck
OTHERS_BUSY = 30.0   # % of a core used by processes not in the benchmark: noisy
FRAMES_PER_WRITE = 16
PLAIN_CHUNK = 1 << 20
MAX_TOKEN = 65535

GSS_CONFIG = """\
# Written by benchmarks/gssapi_bulk.py.
[server]
methods = ["gssapi"]
[gssapi]
keytab = "{keytab}"
levels = ["clear", "integrity", "confidentiality"]
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the client (a separate process) -------------------------------------------

_FRAME = struct.Struct("!BBH")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Channel:
    """A SOCKS5 connection after method selection: plain, or RFC 1961 with a
    security context (level 0 = clear, 1 = integrity, 2 = confidentiality)."""

    def __init__(self, sock: socket.socket, ctx=None, level: int | None = None) -> None:
        self.sock = sock
        self.ctx = ctx
        self.wrapped = level in (1, 2)
        self.conf = level == 2
        self.pending = bytearray()   # received, not yet unwrapped
        self.plain = bytearray()     # unwrapped, not yet consumed
        self.max_plain = ctx.get_wrap_size_limit(MAX_TOKEN, self.conf) if self.wrapped else 0

    def encode(self, data: bytes) -> bytes:
        if not self.wrapped:
            return data
        out = []
        for start in range(0, len(data), self.max_plain):
            token = self.ctx.wrap(data[start:start + self.max_plain], self.conf).message
            out.append(_FRAME.pack(1, 3, len(token)))
            out.append(token)
        return b"".join(out)

    def send(self, data: bytes) -> None:
        self.sock.sendall(self.encode(data))

    def _unwrap_pending(self, keep: bool = True) -> int:
        """Unwrap every whole frame in ``pending``, appending the plaintext to
        ``plain`` if ``keep``; returns the number of plaintext bytes."""
        buf, pos, added = self.pending, 0, 0
        end_of_data = len(buf)
        view = memoryview(buf)
        try:
            while end_of_data - pos >= 4:
                ver, mtyp, length = _FRAME.unpack_from(buf, pos)
                if ver != 1 or mtyp != 3:
                    raise OSError(f"unexpected GSS-API frame {ver:#x} {mtyp:#x}")
                end = pos + 4 + length
                if end > end_of_data:
                    break
                result = self.ctx.unwrap(bytes(view[pos + 4:end]))
                if self.conf and not result.encrypted:
                    raise OSError("unencrypted frame at level 2")
                if keep:
                    self.plain += result.message
                added += len(result.message)
                pos = end
        finally:
            view.release()
        del buf[:pos]
        return added

    def read_exact(self, n: int) -> bytes:
        while len(self.plain) < n:
            data = self.sock.recv(65536)
            if not data:
                raise OSError("connection closed early")
            if self.wrapped:
                self.pending += data
                self._unwrap_pending()
            else:
                self.plain += data
        out = bytes(self.plain[:n])
        del self.plain[:n]
        return out

    def drain_count(self) -> int:
        """Read to EOF; the number of plaintext bytes (unwrapping each frame)."""
        total = len(self.plain)
        self.plain.clear()
        sock = self.sock
        if not self.wrapped:
            buf = bytearray(PLAIN_CHUNK)
            while True:
                n = sock.recv_into(buf)
                if not n:
                    return total
                total += n
        while True:
            data = sock.recv(PLAIN_CHUNK)
            if not data:
                if self.pending:
                    raise OSError(f"EOF inside a frame ({len(self.pending)} bytes left)")
                return total
            self.pending += data
            total += self._unwrap_pending(keep=False)


def gss_handshake(sock: socket.socket, service: str, level: int):
    """RFC 1961 context establishment and protection level; the context."""
    import gssapi

    flags = gssapi.RequirementFlag
    sock.sendall(b"\x05\x01\x01")
    if _recv_exact(sock, 2) != b"\x05\x01":
        raise OSError("the proxy did not choose GSS-API")
    ctx = gssapi.SecurityContext(
        name=gssapi.Name(service, gssapi.NameType.hostbased_service), usage="initiate",
        flags=flags.mutual_authentication | flags.replay_detection
        | flags.out_of_sequence_detection | flags.integrity | flags.confidentiality)
    token = ctx.step()
    while True:
        if token:
            sock.sendall(_FRAME.pack(1, 1, len(token)) + token)
        if ctx.complete:
            break
        head = _recv_exact(sock, 4)
        if head[:2] != b"\x01\x01":
            raise OSError(f"context establishment: got {head!r}")
        token = ctx.step(_recv_exact(sock, struct.unpack("!H", head[2:])[0]))
    wrapped = ctx.wrap(bytes((level,)), False).message
    sock.sendall(_FRAME.pack(1, 2, len(wrapped)) + wrapped)
    head = _recv_exact(sock, 4)
    if head[:2] != b"\x01\x02":
        raise OSError(f"protection level: got {head!r}")
    granted = ctx.unwrap(_recv_exact(sock, struct.unpack("!H", head[2:])[0])).message
    if granted != bytes((level,)):
        raise OSError(f"asked for protection level {level}, the proxy granted {granted!r}")
    return ctx


def client_main(argv: list[str]) -> int:
    """``client up|down SECS PROXYPORT TARGETPORT none|0|1|2 [SERVICE]``;
    prints ``bytes seconds cpu_seconds`` like ``loadgen bulk``. The clock and
    the CPU count run from the bulk header sent to the last byte delivered
    (upload: the target's byte count received; download: EOF)."""
    direction, secs, proxy_port, target_port, mode = argv[:5]
    service = argv[5] if len(argv) > 5 else "rcmd@localhost"
    secs = float(secs)
    sock = socket.create_connection(("127.0.0.1", int(proxy_port)), timeout=60)
    if mode == "none":
        sock.sendall(b"\x05\x01\x00")
        if _recv_exact(sock, 2) != b"\x05\x00":
            raise OSError("the proxy did not choose method none")
        chan = Channel(sock)
    else:
        level = int(mode)
        chan = Channel(sock, gss_handshake(sock, service, level), level)
    chan.send(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
              + struct.pack("!H", int(target_port)))
    head = chan.read_exact(5)
    if head[1] != 0:
        raise OSError(f"CONNECT failed with reply {head[1]}")
    chan.read_exact({1: 5, 4: 17, 3: head[4] + 2}[head[3]])

    # bulkd's header: 'U' or 'D', then microseconds (native uint64) at offset 8.
    header = (b"U" if direction == "up" else b"D") + bytes(7) + struct.pack("=Q", int(secs * 1e6))
    cpu0, t0 = _cpu(), time.monotonic()
    chan.send(header)
    total = 0
    if direction == "up":
        end = t0 + secs
        if chan.wrapped:
            chunk = b"y" * chan.max_plain
            per_write = FRAMES_PER_WRITE * len(chunk)
            wrap, conf, pack = chan.ctx.wrap, chan.conf, _FRAME.pack
            while time.monotonic() < end:
                parts = []
                for _ in range(FRAMES_PER_WRITE):
                    token = wrap(chunk, conf).message
                    parts.append(pack(1, 3, len(token)))
                    parts.append(token)
                sock.sendall(b"".join(parts))
                total += per_write
        else:
            chunk = b"y" * PLAIN_CHUNK
            while time.monotonic() < end:
                sock.sendall(chunk)
                total += PLAIN_CHUNK
        sock.shutdown(socket.SHUT_WR)
        (confirmed,) = struct.unpack("=Q", chan.read_exact(8))
        if confirmed != total:
            raise OSError(f"sent {total} bytes, the target got {confirmed}")
    else:
        total = chan.drain_count()
    t1, cpu1 = time.monotonic(), _cpu()
    sock.close()
    print(f"{total} {t1 - t0:.6f} {cpu1 - cpu0:.6f}", flush=True)
    return 0


# ---- the harness side ----------------------------------------------------------

QUICK = {"rounds": 1, "seconds": 0.5, "mib": 32}
FULL = {"rounds": 3, "seconds": 2.0, "mib": 256}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="GSS-API (RFC 1961) bulk throughput through socksd at protection levels "
                    "1 and 2, against plain socksd; and at confidentiality against Dante's "
                    "server, with Dante's client library as the client.")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round, 0.5 s transfers, 32 MiB through socksd and Dante")
    p.add_argument("--rounds", type=int, help="rounds, median reported (default 3)")
    p.add_argument("--seconds", type=float,
                   help="seconds per transfer of the levels table (default 2)")
    p.add_argument("--mib", type=int,
                   help="MiB per transfer through socksd and Dante's server (default 256)")
    p.add_argument("--no-dante", action="store_true",
                   help="skip the comparison with Dante's server (it needs Dante rebuilt with "
                        "GSS-API: tests/dante_gssapi.py builds and caches it, a couple of "
                        "minutes the first time)")
    p.add_argument("--kdc-portbase", type=int, default=65000,
                   help="k5test KDC ports start here (default 65000)")
    p.add_argument("--twistd", help="twistd running socksd (default: next to this Python)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (configs, socksd logs) and print its path")
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not 1 <= args.mib <= 65536:
        p.error("--mib must be 1..65536")
    if not 1 <= args.rounds <= 50:
        p.error("--rounds must be 1..50")
    if not 0.1 <= args.seconds <= 60:
        p.error("--seconds must be 0.1..60")
    if not 1024 <= args.kdc_portbase <= 65525:
        p.error("--kdc-portbase must be 1024..65525 (k5test uses ten ports from it)")
    return args


@dataclass
class Via:
    name: str
    server: Server
    port: int
    mode: str            # "c" (loadgen, method none), "none", or a GSS-API level "0" "1" "2"


@dataclass
class Sample:
    rate: float      # MB/s in the levels table, MiB/s in the table against Dante
    proxy: float     # % of one core
    client: float
    target: float
    others: float


@dataclass
class Series:
    samples: list[Sample] = field(default_factory=list)

    def med(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)

    def lo(self) -> float:
        return min(s.rate for s in self.samples)

    def hi(self) -> float:
        return max(s.rate for s in self.samples)

    def per_cpu(self) -> float:
        """Median of the rate per proxy CPU-second."""
        return statistics.median(s.rate / max(s.proxy / 100.0, 1e-9) for s in self.samples)


# Host names taken literally: no forward-then-reverse canonicalization through
# the resolver, whose answers for 127.0.0.1 depend on the machine's /etc/hosts.
LITERAL_HOST_NAMES = {"libdefaults": {"dns_canonicalize_hostname": "false", "rdns": "false"}}
SERVICE_HOSTS = ("localhost", "127.0.0.1")


def start_realm(portbase: int, tmp: Path):
    """A k5test realm (KDC on portbase) named for ``localhost``, as tests/
    conftest.py's: the service key of rcmd/localhost (this file's client asks
    for rcmd@localhost) and of rcmd/127.0.0.1 (Dante's client names the proxy
    by its address) in one keytab."""
    try:
        from k5test.realm import MITRealm
    except ImportError:
        raise BenchError("k5test is not installed: `.venv/bin/pip install k5test` "
                         "(a test extra: `make test` installs it)") from None
    for program in ("krb5kdc", "kdb5_util", "kadmin.local"):
        if not (shutil.which(program) or os.path.exists(f"/usr/sbin/{program}")):
            raise BenchError(f"{program} is missing: apt-get install krb5-kdc krb5-admin-server "
                             "krb5-user (`make test` installs them)")

    class LocalhostRealm(MITRealm):
        @property
        def hostname(self) -> str:
            return "localhost"

        def __init__(self, *args, **kwargs) -> None:
            try:
                super().__init__(*args, **kwargs)
            except BaseException:
                self.stop()   # k5test starts the KDC before its first kinit
                raise

    try:
        realm = LocalhostRealm(portbase=portbase, krb5_conf=LITERAL_HOST_NAMES)
    except Exception as exc:
        raise BenchError(f"k5test realm on ports {portbase}-{portbase + 9} did not start "
                         f"({exc}); is another KDC using them? (--kdc-portbase)") from None
    try:
        keytab = tmp / "socksd.keytab"
        for host in SERVICE_HOSTS:
            realm.addprinc(f"rcmd/{host}")
            realm.extract_keytab(f"rcmd/{host}", str(keytab))
    except BaseException:
        realm.stop()
        raise
    return realm, keytab


def wait_for_gssapi(srv: Server, port: int, timeout: float = 20.0) -> None:
    """Until the server answers a greeting offering GSS-API with method 1."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not srv.alive():
            raise BenchError(f"{srv.name} exited with status {srv.proc.returncode} at start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"\x05\x01\x01")
                if _recv_exact(s, 2) == b"\x05\x01":
                    return
                raise OSError("did not choose GSS-API")
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    raise BenchError(f"{srv.name} did not offer GSS-API on port {port} within {timeout:g} s "
                     f"({last})")


class Bench:
    def __init__(self, args, tmp: Path, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.tmp = tmp
        self.twistd = args.twistd or str(Path(sys.executable).parent / "twistd")
        if not os.access(self.twistd, os.X_OK):
            raise BenchError(f"{self.twistd} not found: run `make install` (or pass --twistd)")
        log(f"k5test realm on ports {args.kdc_portbase}-{args.kdc_portbase + 9}")
        self.realm, self.keytab = start_realm(args.kdc_portbase, tmp)
        stack.callback(self.realm.stop)
        self.env = dict(os.environ, **self.realm.env)
        self.service = f"rcmd@{self.realm.hostname}"
        self.loadgen = build_loadgen(tmp)
        self.echo, self.echo_port = start_c_server(self.loadgen, ["echo"], tmp)
        stack.callback(self.echo.stop)
        self.bulkd, self.bulk_port = start_c_server(self.loadgen, ["bulkd"], tmp)
        stack.callback(self.bulkd.stop)
        plain, plain_port = self.start_socksd("plain", None, lambda srv, port: wait_for_proxy(
            srv, port, self.echo_port))
        stack.callback(plain.stop)
        gss_config = tmp / "socksd-gssapi.toml"
        gss_config.write_text(GSS_CONFIG.format(keytab=self.keytab))
        gss, gss_port = self.start_socksd("gssapi", gss_config, wait_for_gssapi)
        stack.callback(gss.stop)
        self.vias = [
            Via("plain, C client", plain, plain_port, "c"),
            Via("plain", plain, plain_port, "none"),
            Via("GSS-API level 0 (clear)", gss, gss_port, "0"),
            Via("GSS-API level 1 (integrity)", gss, gss_port, "1"),
            Via("GSS-API level 2 (confidentiality)", gss, gss_port, "2"),
        ]

    def start_socksd(self, tag: str, config: Path | None, ready) -> tuple[Server, int]:
        """twistd socks from the temp dir (so the *installed* socksd runs)."""
        last: BenchError | None = None
        logfile = self.tmp / f"socksd-{tag}.log"
        for _ in range(3):  # a port can be taken between free_port() and bind
            port = free_port()
            argv = [self.twistd, "-n", "--pidfile=", "-l", str(logfile), "socks",
                    "--listen", f"tcp:{port}:interface=127.0.0.1"]
            if config is not None:
                argv += ["--config", str(config)]
            srv = Server(f"socksd ({tag})", argv, cwd=self.tmp, env=self.env)
            try:
                ready(srv, port)
                return srv, port
            except BenchError as exc:
                srv.stop()
                last = exc
        tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
        raise BenchError(f"{last}\n{tail}")

    def crypto_ceiling(self, seconds: float) -> dict[str, float]:
        """MB/s of python-gssapi alone on one core, in this process: wrap and
        unwrap of get_wrap_size_limit(65535)-byte chunks at levels 1 and 2,
        with a context established between our user and socksd's key."""
        import gssapi

        flags = gssapi.RequirementFlag
        creds = gssapi.Credentials(
            name=gssapi.Name(f"{self.service.split('@')[0]}@", gssapi.NameType.hostbased_service),
            usage="accept", store={"keytab": str(self.keytab)})
        initiator = gssapi.SecurityContext(
            name=gssapi.Name(self.service, gssapi.NameType.hostbased_service), usage="initiate",
            flags=flags.mutual_authentication | flags.replay_detection
            | flags.out_of_sequence_detection | flags.integrity | flags.confidentiality)
        acceptor = gssapi.SecurityContext(creds=creds, usage="accept")
        token = initiator.step()
        for _ in range(10):
            answer = acceptor.step(token)
            if initiator.complete:
                break
            token = initiator.step(answer)
            if initiator.complete and acceptor.complete:
                break
        if not (initiator.complete and acceptor.complete):
            raise BenchError("could not establish a local GSS-API context")
        out = {}
        for level, conf in ((1, False), (2, True)):
            chunk = b"y" * initiator.get_wrap_size_limit(MAX_TOKEN, conf)
            tokens, t0 = [], time.perf_counter()
            end = t0 + seconds
            while time.perf_counter() < end and len(tokens) < 100000:
                tokens.append(initiator.wrap(chunk, conf).message)
            t1 = time.perf_counter()
            for token in tokens:
                acceptor.unwrap(token)
            t2 = time.perf_counter()
            mb = len(tokens) * len(chunk) / 1e6
            out[f"wrap {level}"], out[f"unwrap {level}"] = mb / (t1 - t0), mb / (t2 - t1)
        return out

    def transfer(self, via: Via, direction: str, seconds: float) -> tuple[float, float, float]:
        """One transfer: (bytes, seconds, client CPU seconds)."""
        if via.mode == "c":
            argv = [str(self.loadgen), "bulk", direction, f"{seconds}", "1", str(self.bulk_port),
                    str(via.port)]
        else:
            argv = [sys.executable, str(Path(__file__).resolve()), "client", direction,
                    f"{seconds}", str(via.port), str(self.bulk_port), via.mode, self.service]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                              env=self.env, cwd=self.tmp)
        if proc.returncode != 0:
            raise BenchError(f"{via.name} {direction}: client failed "
                             f"(status {proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
        nbytes, secs, cpu = (float(v) for v in proc.stdout.split())
        return nbytes, secs, cpu

    def once(self, via: Via, direction: str, seconds: float) -> Sample:
        proxy_pids = via.server.pids()
        p0, t0 = cpu_times(proxy_pids), cpu_times([self.bulkd.pid])
        m0, w0 = machine_busy(), time.monotonic()
        nbytes, secs, client = self.transfer(via, direction, seconds)
        wall = time.monotonic() - w0
        proxy = cpu_delta(p0, cpu_times(via.server.pids()))
        target = cpu_delta(t0, cpu_times([self.bulkd.pid]))
        # The client's interpreter start-up and handshake are outside its own
        # count (header to last byte) but inside ``wall``: "other" absorbs them.
        others = max(0.0, machine_busy() - m0 - proxy - target - client)
        def pct(s, over=wall):
            return 100.0 * s / over
        return Sample(nbytes / secs / 1e6, pct(proxy), pct(client, secs), pct(target),
                      pct(others))

    def run(self) -> dict[tuple[str, str], Series]:
        results = {(d, v.name): Series() for d in ("upload", "download") for v in self.vias}
        self.ceilings: list[dict[str, float]] = []
        for d in ("up", "down"):
            for via in self.vias:
                self.once(via, d, 0.3)  # warm-up: first-use code paths, tickets, buffers
        for r in range(self.args.rounds):
            c = self.crypto_ceiling(min(0.5, self.args.seconds))
            self.ceilings.append(c)
            log(f"  python-gssapi alone round {r + 1}/{self.args.rounds}: "
                + ", ".join(f"{k} {v:.0f} MB/s" for k, v in c.items()))
            for d, label in (("up", "upload"), ("down", "download")):
                for via in self.vias:
                    s = self.once(via, d, self.args.seconds)
                    results[(label, via.name)].samples.append(s)
                    log(f"  {label:8} {via.name:33} round {r + 1}/{self.args.rounds}: "
                        f"{s.rate:8.1f} MB/s  proxy {s.proxy:3.0f}%  client {s.client:3.0f}%")
        return results


# ---- GSS-API confidentiality against Dante's server ------------------------------

# Dante's server (sockd of the GSS-API build, Debian's danted): GSS-API only,
# confidentiality enforced, one line per session at its end (as socksd logs).
# The gssapi.* settings belong to the client-rule: Dante 1.4 negotiates the
# method before any socks-rule is matched. See sockd.conf(5).
DANTE_CONFIG = """\
# Written by benchmarks/gssapi_bulk.py.
logoutput: {log}
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
socksmethod: gssapi
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0
    gssapi.servicename: rcmd
    gssapi.keytab: FILE:{keytab}
    gssapi.enctype: confidentiality
}}
socks pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0
    log: disconnect
}}
"""
# socksd the same way: GSS-API only, confidentiality only.
CONFIDENTIALITY_CONFIG = """\
# Written by benchmarks/gssapi_bulk.py.
[server]
methods = ["gssapi"]
[gssapi]
keytab = "{keytab}"
levels = ["confidentiality"]
"""
# Dante's client library (dante.conf(5)): every TCP connect() through the
# proxy, GSS-API with service rcmd at the proxy's address, confidentiality.
SOCKS_CONF = """\
# Written by benchmarks/gssapi_bulk.py for socksify (SOCKS_CONF).
logoutput: {log}
route {{
    from: 0.0.0.0/0 to: 0.0.0.0/0 via: 127.0.0.1 port = {port}
    protocol: tcp
    command: connect
    proxyprotocol: socks_v5
    method: gssapi
    gssapi.servicename: rcmd
    gssapi.enctype: confidentiality
}}
"""
# What Dante's client logs once the protection level is agreed.
CLIENT_CONFIDENTIALITY = "using gssapi confidentiality protection (2)"
CONFIDENTIALITY_VS_DANTE = 1.0   # issue 18: socksd against Dante, each direction
ROUTED_CPU = 1.0     # % of a core: a proxy that relayed the transfer used more than this
LOG_WAIT = 10.0      # seconds for a proxy's session line after the client is done
WARMUP_MIB = 16


def dante_build():
    """The GSS-API Dante build of tests/dante_gssapi.py (built and cached there
    on first use; BenchError if that fails)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import dante_gssapi

    try:
        return dante_gssapi.ensure()
    except dante_gssapi.DanteBuildError as exc:
        raise BenchError(f"building Dante with GSS-API failed (or pass --no-dante): {exc}") \
            from None


@dataclass
class Proxy:
    """socksd or Dante's server, as the comparison measures it."""
    name: str
    server: Server
    port: int
    log: Path
    socks_conf: Path   # Dante's client configuration routing through this proxy


def socksd_session(text: str, target: int) -> tuple[int, int] | None:
    """(up, down) of socksd's GSS-API session to ``target`` at protection 2
    in ``text``, or None: its session line, and the gssapi line of the same peer."""
    for m in re.finditer(rf"(\S+) socks5 user=\S+ method=gssapi connect 127\.0\.0\.1:{target} "
                         r"up=(\d+) down=(\d+) ", text):
        if re.search(rf"{re.escape(m.group(1))} gssapi: \S+ as \S+, protection 2\n", text):
            return int(m.group(2)), int(m.group(3))
    return None


def dante_session(text: str, target: int) -> tuple[int, int] | None:
    """(up, down) of Dante's session to ``target`` in ``text``, or None. Its
    end line: "tcp/connect ]: A -> gssapi/confidentiality%USER@CLIENT PROXY ->
    B, C -> EXTERNAL TARGET -> D": C bytes written to the target, D read from it."""
    m = re.search(r"tcp/connect \]: \d+ -> gssapi/confidentiality%\S+ \S+ -> \d+, (\d+) -> "
                  rf"\S+ 127\.0\.0\.1\.{target} -> (\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


class DanteComparison:
    """Dante's client library (libdsocks under socksify) runs ``loadgen
    transfer``, a fixed number of bytes up or down, through socksd and
    through Dante's own GSS-API server, both at confidentiality."""

    def __init__(self, bench: Bench, stack: contextlib.ExitStack) -> None:
        self.bench = bench
        self.args = bench.args
        self.tmp = bench.tmp
        self.dante = dante_build()
        log(f"Dante with GSS-API: {self.dante.directory}")
        self.client_log = self.tmp / "dante-client.log"
        config = self.tmp / "socksd-confidentiality.toml"
        config.write_text(CONFIDENTIALITY_CONFIG.format(keytab=bench.keytab))
        srv, port = bench.start_socksd("confidentiality", config, wait_for_gssapi)
        stack.callback(srv.stop)
        self.proxies = [self.proxy("socksd", srv, port, self.tmp / "socksd-confidentiality.log")]
        srv, port, logfile = self.start_sockd()
        stack.callback(srv.stop)
        self.proxies.append(self.proxy("Dante", srv, port, logfile))

    def proxy(self, name: str, srv: Server, port: int, logfile: Path) -> Proxy:
        conf = self.tmp / f"socks-{name}.conf"
        conf.write_text(SOCKS_CONF.format(log=self.client_log, port=port))
        return Proxy(name, srv, port, logfile, conf)

    def sockd_files(self) -> tuple[Path, dict[str, str]]:
        """Dante's negotiate children run as user.unprivileged (nobody) when
        they display the client's name, which reads the Kerberos
        configuration, and they keep a replay cache: a directory they can
        reach with a readable krb5.conf and keytab (a copy of socksd's) and a
        writable replay cache. The keytab and environment for sockd."""
        shared = self.tmp / "dante"
        shared.mkdir()
        os.chmod(self.tmp, 0o711)     # traversable, not listable
        os.chmod(shared, 0o755)
        keytab, conf, rcache = shared / "proxy.keytab", shared / "krb5.conf", shared / "rcache"
        shutil.copyfile(self.bench.keytab, keytab)
        shutil.copyfile(self.bench.realm.env["KRB5_CONFIG"], conf)
        for path in (keytab, conf):
            os.chmod(path, 0o644)
        rcache.mkdir()
        os.chmod(rcache, 0o1777)
        return keytab, dict(self.bench.env, KRB5_CONFIG=str(conf), KRB5RCACHEDIR=str(rcache))

    def start_sockd(self) -> tuple[Server, int, Path]:
        keytab, env = self.sockd_files()
        logfile = self.tmp / "sockd.log"
        conf = self.tmp / "sockd.conf"
        sockd = str(self.dante.sockd)
        last: BenchError | None = None
        for _ in range(3):  # a port can be taken between free_port() and bind
            port = free_port()
            conf.write_text(DANTE_CONFIG.format(log=logfile, port=port, keytab=keytab))
            check = subprocess.run([sockd, "-V", "-f", str(conf)], capture_output=True,
                                   text=True, timeout=30, env=env)
            if check.returncode != 0:
                raise BenchError(f"sockd -V rejects {conf}:\n{check.stdout}{check.stderr}")
            srv = Server("sockd (GSS-API)", [sockd, "-f", str(conf), "-p",
                                             str(self.tmp / "sockd.pid")], cwd=self.tmp, env=env)
            try:
                wait_for_gssapi(srv, port)
                return srv, port, logfile
            except BenchError as exc:
                srv.stop()
                last = exc
        tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
        raise BenchError(f"{last}\n{tail}")

    def once(self, proxy: Proxy, direction: str, nbytes: int) -> Sample:
        """One transfer of ``nbytes``; fails unless it went through ``proxy``
        at confidentiality (the client's log, the proxy's session line and
        its CPU say so)."""
        self.client_log.unlink(missing_ok=True)
        offset = proxy.log.stat().st_size if proxy.log.exists() else 0
        argv = [str(self.dante.socksify), str(self.bench.loadgen), "transfer", direction,
                str(nbytes), str(self.bench.bulk_port)]
        env = self.dante.env(proxy.socks_conf, extra=self.bench.realm.env, log=self.client_log)
        p0, t0 = cpu_times(proxy.server.pids()), cpu_times([self.bench.bulkd.pid])
        m0, w0 = machine_busy(), time.monotonic()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=self.tmp,
                                  timeout=60 + nbytes / 2**20)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{proxy.name} {direction}: loadgen transfer under socksify did "
                             f"not finish in {60 + nbytes / 2**20:.0f} s") from None
        wall = time.monotonic() - w0
        proxy_cpu = cpu_delta(p0, cpu_times(proxy.server.pids()))
        target = cpu_delta(t0, cpu_times([self.bench.bulkd.pid]))
        client_log = self.client_log.read_text(errors="replace") \
            if self.client_log.exists() else ""
        if proc.returncode != 0:
            raise BenchError(f"{proxy.name} {direction}: loadgen transfer under socksify failed "
                             f"(status {proc.returncode}): {proc.stderr.strip()[-1000:]}\n"
                             f"Dante's client log:\n{client_log[-2000:]}")
        got, secs, client = (float(v) for v in proc.stdout.split())
        others = max(0.0, machine_busy() - m0 - proxy_cpu - target - client)
        if 100.0 * proxy_cpu / wall < ROUTED_CPU:
            raise BenchError(f"{proxy.name} {direction}: the proxy used "
                             f"{100.0 * proxy_cpu / wall:.1f}% CPU, so the transfer cannot have "
                             "gone through it (socksify did not take loadgen's connect?)")
        if CLIENT_CONFIDENTIALITY not in client_log:
            raise BenchError(f"{proxy.name} {direction}: Dante's client did not log "
                             f"{CLIENT_CONFIDENTIALITY!r}:\n{client_log[-2000:]}")
        self.check_session(proxy, offset, direction, nbytes)
        return Sample(got / secs / 2**20, 100.0 * proxy_cpu / wall, 100.0 * client / secs,
                      100.0 * target / wall, 100.0 * others / wall)

    def check_session(self, proxy: Proxy, offset: int, direction: str, nbytes: int) -> None:
        """Until the proxy has logged the session, GSS-API at confidentiality,
        with ``nbytes`` relayed in ``direction``."""
        find = socksd_session if proxy.name == "socksd" else dante_session
        deadline = time.monotonic() + LOG_WAIT
        while True:
            with open(proxy.log, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
            found = find(text, self.bench.bulk_port)
            if found is not None:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{proxy.name} {direction}: no GSS-API confidentiality session "
                                 f"to port {self.bench.bulk_port} in its log after {LOG_WAIT:g} "
                                 f"s; the log since the transfer began:\n{text[-2000:]}")
            time.sleep(0.1)
        up, down = found
        relayed = up if direction == "up" else down
        if relayed < nbytes:
            raise BenchError(f"{proxy.name} {direction}: it logged {relayed} bytes relayed "
                             f"{direction}, the transfer was {nbytes}")

    def run(self) -> dict[tuple[str, str], Series]:
        """(direction, proxy name) -> MiB/s samples; rounds interleaved, the
        order of the two proxies reversed every second round."""
        nbytes = self.args.mib << 20
        for d in ("up", "down"):
            for proxy in self.proxies:
                self.once(proxy, d, min(nbytes, WARMUP_MIB << 20))  # warm-up
        results = {(d, p.name): Series() for d in ("upload", "download") for p in self.proxies}
        for r in range(self.args.rounds):
            order = self.proxies[::-1] if r % 2 else self.proxies
            for d, label in (("up", "upload"), ("down", "download")):
                for proxy in order:
                    s = self.once(proxy, d, nbytes)
                    results[(label, proxy.name)].samples.append(s)
                    log(f"  confidentiality {label:8} {proxy.name:6} round {r + 1}/"
                        f"{self.args.rounds}: {s.rate:8.1f} MiB/s  proxy {s.proxy:3.0f}%  "
                        f"client {s.client:3.0f}%")
        return results


# ---- report ----------------------------------------------------------------------

def fmt_cpu(v: float, limit: float | None = None) -> str:
    return f"{v:.0f}%" + ("!" if limit is not None and v > limit else "")


def table(rows: list[list[str]], indent: str = "  ") -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        cells = [c.ljust(w) if i < 2 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.append(indent + "  ".join(cells).rstrip())
        if k == 0:
            out.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(out)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def report(args, bench: Bench, res: dict[tuple[str, str], Series]) -> str:
    rows = [["direction", "via", "MB/s", "range", "proxy CPU", "client CPU", "target CPU",
             "other CPU"]]
    for d in ("upload", "download"):
        for v in bench.vias:
            s = res[(d, v.name)]
            rows.append([d, v.name, f"{s.med('rate'):.0f}", f"{s.lo():.0f}-{s.hi():.0f}",
                         fmt_cpu(s.med("proxy")), fmt_cpu(s.med("client"), BUSY),
                         fmt_cpu(s.med("target"), BUSY), fmt_cpu(s.med("others"), OTHERS_BUSY)])
    lines = [f"GSS-API bulk throughput, one CONNECT stream, {args.seconds:g} s per transfer, "
             f"median of {args.rounds} round{'s' if args.rounds != 1 else ''} "
             "(MB/s = 10^6 bytes/s)", table(rows), ""]
    for d in ("upload", "download"):
        plain = res[(d, "plain")].med("rate")
        c = res[(d, "plain, C client")].med("rate")
        l1 = res[(d, "GSS-API level 1 (integrity)")].med("rate")
        l2 = res[(d, "GSS-API level 2 (confidentiality)")].med("rate")
        lines.append(f"  {d:8}  level1/plain {ratio(l1, plain)}   level2/plain {ratio(l2, plain)}"
                     f"   (against the C client: {ratio(l1, c)}, {ratio(l2, c)})")
    ceiling = {k: statistics.median(c[k] for c in bench.ceilings) for k in bench.ceilings[0]}
    lines += [
        "",
        "  python-gssapi alone (this process, one core, no I/O: the crypto ceiling of either end):",
        f"  level 1 wrap {ceiling['wrap 1']:.0f} MB/s, unwrap {ceiling['unwrap 1']:.0f} MB/s;  "
        f"level 2 wrap {ceiling['wrap 2']:.0f} MB/s, unwrap {ceiling['unwrap 2']:.0f} MB/s.",
        "  Upload: the client wraps, socksd unwraps; download: socksd wraps, the client unwraps.",
    ]
    lines += [
        "",
        "plain = socksd with method none; its sessions relay with splice(2) in the kernel.",
        "GSS-API levels 1 and 2 never take the splice fast path: socksd unwraps and wraps every",
        "frame in its one Python thread. Level 0 (clear) authenticates, then relays like plain.",
        "The client of every row but 'plain, C client' is one Python process (python-gssapi),",
        "wrapping plaintext chunks of get_wrap_size_limit(65535) bytes (~64 KiB), 16 frames per",
        "write, and unwrapping every frame it reads: its wrap/unwrap cost is part of the",
        "measurement. CPU: CPU seconds / wall seconds, 100% = one core (client: during its",
        f"transfer). '!' marks a client or target above {BUSY:.0f}% (it may be the bottleneck:",
        "then the proxy's number is a lower bound) or 'other' above "
        f"{OTHERS_BUSY:.0f}% (noise).",
    ]
    return "\n".join(lines)



def report_dante(args, res: dict[tuple[str, str], Series]) -> str:
    rows = [["direction", "via", "MiB/s", "range", "per proxy CPU-s", "proxy CPU", "client CPU",
             "target CPU", "other CPU"]]
    for d in ("upload", "download"):
        for name in ("socksd", "Dante"):
            s = res[(d, name)]
            rows.append([d, name, f"{s.med('rate'):.1f}", f"{s.lo():.1f}-{s.hi():.1f}",
                         f"{s.per_cpu():.1f}", fmt_cpu(s.med("proxy")),
                         fmt_cpu(s.med("client"), BUSY), fmt_cpu(s.med("target"), BUSY),
                         fmt_cpu(s.med("others"), OTHERS_BUSY)])
    lines = [f"GSS-API confidentiality against Dante's server: Dante's client library as the "
             f"client, {args.mib} MiB per transfer,",
             f"median of {args.rounds} round{'s' if args.rounds != 1 else ''} "
             "(MiB/s = 2^20 bytes/s; 'per proxy CPU-s' = MiB per CPU-second of the proxy)",
             table(rows), ""]
    ratios = {}
    for d in ("upload", "download"):
        mine, dante = res[(d, "socksd")], res[(d, "Dante")]
        ratios[d] = mine.med("rate") / dante.med("rate")
        lines.append(f"  {d:8}  socksd/Dante MiB/s {ratios[d]:.2f}x   per proxy CPU-s "
                     f"{ratio(mine.per_cpu(), dante.per_cpu())}")
    missed = [d for d, r in ratios.items() if r < CONFIDENTIALITY_VS_DANTE]
    lines += [
        f"  issue 18 target (GSS-API confidentiality >= {CONFIDENTIALITY_VS_DANTE:.1f}x Dante, "
        f"both directions; medians): upload {ratios['upload']:.2f}x, download "
        f"{ratios['download']:.2f}x: " + (f"MISSED ({', '.join(missed)})" if missed else "met"),
        "",
        "The client: `socksify loadgen transfer up|down BYTES PORT` with the GSS-API build of",
        "Dante's libdsocks preloaded (tests/dante_gssapi.py), one blocking stream of 1 MiB reads",
        "and writes that libdsocks wraps and unwraps (its cost is the client CPU). socksd:",
        "methods = [\"gssapi\"], levels = [\"confidentiality\"]; Dante: sockd of the same build,",
        "socksmethod gssapi, gssapi.enctype confidentiality, its default process model. Every",
        "transfer is checked: Dante's client logged confidentiality (2), the proxy logged the",
        "session (socksd: method=gssapi at protection 2; Dante: gssapi/confidentiality) with",
        f"the bytes relayed, and the proxy used at least {ROUTED_CPU:g}% of a core. '!' marks a",
        f"client or target above {BUSY:.0f}% of a core: then both proxies wait on it, their MiB/s",
        "is bounded by it, and the MiB per proxy CPU-second says more about the proxies.",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="socksd-gssbench-"))
    with contextlib.ExitStack() as stack:
        if args.keep:
            log(f"temporary directory (kept): {tmp}")
        else:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        t0 = time.monotonic()
        bench = Bench(args, tmp, stack)
        # Set up (and build, the first time) before the long run: a failure shows at once.
        against = None if args.no_dante else DanteComparison(bench, stack)
        os.environ.update(bench.realm.env)  # the in-process python-gssapi ceiling
        log("GSS-API bulk throughput")
        results = bench.run()
        dante = None
        if against is not None:
            log(f"GSS-API confidentiality, socksd against Dante, {args.mib} MiB per transfer")
            dante = against.run()
        elapsed = time.monotonic() - t0
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"socksd GSS-API benchmark: {os.cpu_count()} CPUs, load average {load}\n")
    print(report(args, bench, results))
    if dante is not None:
        print()
        print(report_dante(args, dante))
    print(f"total time {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        sys.exit(client_main(sys.argv[2:]))
    run_main("benchmarks/gssapi_bulk.py", main, sys.argv[1:])
