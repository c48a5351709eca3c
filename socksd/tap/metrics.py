"""``[metrics] listen``: ``/metrics`` for Prometheus, on Twisted's web server.

The counts are :mod:`socksd.stats`'s and the listener's; they become
prometheus_client metric families when a scrape asks (a custom collector on
a registry of our own), and prometheus_client writes the exposition.
Bytes of sessions still open are read from the sessions themselves at that
moment, spliced or not: a scrape during a transfer sees its bytes so far.

With ``workers = N`` the endpoint is the supervisor's: a scrape asks every
worker for its counts (socksd.tap.workers), sums them with the supervisor's
own, and adds each worker's CPU, memory and descriptors, read from /proc.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Callable, Iterator, cast

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from socksd.proxy import SOCKSServerFactory
from socksd.proxy.connect import lookups
from socksd.stats import LATENCY_BUCKETS, OUTCOMES, STATS, Counts, Latency, Stats
from socksd.tap.workers import WorkersService
from socksd.twisted_internals import installed_reactor

log = Logger(namespace="socksd")


def counts_now(factory: SOCKSServerFactory | None, stats: Stats = STATS,
               reactor: Any = None) -> Counts:
    """What this process has counted, with its open sessions' bytes so far
    (read from them now) and the gauges as they are now."""
    live: Counter[tuple[str, str]] = Counter()
    active = 0
    if factory is not None:
        active = factory.counts.sessions
        for session in list(factory.counts.live):
            up, down = session.moved()
            who = stats.user_label(session.user.name or "-", session.user.verified,
                                   session.method)
            live[("up", who)] += up
            live[("down", who)] += down
    in_flight = lookups(reactor).total if reactor is not None else 0
    return stats.counts(live.items(), active, in_flight)


class SocksCollector:
    """What one ``twistd socks`` process has done, and is doing now."""

    def __init__(self, factory: SOCKSServerFactory | None, stats: Stats = STATS,
                 reactor: Any = None) -> None:
        self.factory = factory
        self.stats = stats
        self.reactor = reactor if reactor is not None else getattr(factory, "reactor", None)

    def counts(self) -> Counts:
        return counts_now(self.factory, self.stats, self.reactor)

    def collect(self) -> Iterator[Metric]:
        return families(self.counts(), self.stats.per_user)


class WorkersCollector(SocksCollector):
    """The supervisor's, with ``workers = N``: its own counts (its identd,
    its reloads) and the workers' (their last reports: see
    WorkersService.gather, which a scrape waits for first), and each live
    worker's process series, read from /proc now."""

    def __init__(self, workers: WorkersService, stats: Stats = STATS,
                 reactor: Any = None) -> None:
        super().__init__(None, stats, reactor if reactor is not None else workers.reactor)
        self.workers = workers

    def counts(self) -> Counts:
        counts = super().counts()
        counts.add(self.workers.totals())
        return counts

    def collect(self) -> Iterator[Metric]:
        yield from super().collect()
        resident = GaugeMetricFamily("socksd_worker_resident_bytes",
                                     "A worker's resident memory.", labels=["worker"])
        cpu = CounterMetricFamily("socksd_worker_cpu_seconds",
                                  "A worker's CPU time, user and system (from 0 again when it "
                                  "is restarted).", labels=["worker"])
        fds = GaugeMetricFamily("socksd_worker_open_fds", "A worker's open descriptors.",
                                labels=["worker"])
        for index, pid in sorted(self.workers.pids().items()):
            usage = process_usage(pid)
            if usage is None:
                continue     # ended since
            label = [str(index)]
            resident.add_metric(label, usage[0])
            cpu.add_metric(label, usage[1])
            fds.add_metric(label, usage[2])
        yield resident
        yield cpu
        yield fds
        yield CounterMetricFamily("socksd_worker_malformed_frames",
                                  "Frames from a worker that no worker sends (each stopped "
                                  "and restarted the worker).",
                                  value=self.workers.malformed_frames)


_PAGE = os.sysconf("SC_PAGESIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


def process_usage(pid: int) -> tuple[int, float, int] | None:
    """(resident bytes, CPU seconds, open descriptors) of a process, from
    /proc, as prometheus_client's process collector reads its own; None
    when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # After the command's ")": state, ppid, ... utime and stime are
            # the 14th and 15th fields of the line.
            fields = f.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/statm", "rb") as f:
            resident = int(f.read().split()[1]) * _PAGE
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        cpu = (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, ValueError, IndexError):
        return None
    return resident, cpu, fds


def _printable(user: str) -> str:
    """A user label the exposition can write: a name read with
    surrogateescape (bytes that are not UTF-8) would make every scrape fail
    with UnicodeEncodeError; its bytes are shown escaped instead."""
    try:
        user.encode("utf-8")
    except UnicodeEncodeError:
        return user.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return user


def families(counts: Counts, per_user: bool) -> Iterator[Metric]:
    """The socksd series of ``counts``; with ``per_user``, by user too."""
    user = ["user"] if per_user else []
    yield GaugeMetricFamily("socksd_sessions_active", "Sessions open now.",
                            value=counts.sessions_active)

    sessions = CounterMetricFamily(
        "socksd_sessions", "Sessions ended, by SOCKS version, command and outcome "
        f"({', '.join(OUTCOMES)}).", labels=["version", "command", "outcome", *user])
    # Summed by the labels shown: per_user turned off by a reload leaves
    # counts kept under names, which must not become duplicate series.
    shown: Counter[tuple[str, ...]] = Counter()
    for (version, command, outcome, who), n in counts.sessions.items():
        shown[(version, command, outcome, *([_printable(who)] if per_user else []))] += n
    for labels, n in sorted(shown.items()):
        sessions.add_metric(list(labels), n)
    yield sessions

    relayed = CounterMetricFamily(
        "socksd_relayed_bytes", "Bytes relayed, up (client to destination) and down, "
        "open sessions included.", labels=["direction", *user])
    totals: Counter[tuple[str, ...]] = Counter(
        {(direction, *(["-"] if per_user else [])): 0 for direction in ("up", "down")})
    for (direction, who), n in counts.bytes.items():
        totals[(direction, _printable(who)) if per_user else (direction,)] += n
    for labels, n in sorted(totals.items()):
        relayed.add_metric(list(labels), n)
    yield relayed

    yield _by("socksd_auth_failures", "Failed authentications, by method.", "method",
              counts.auth_failures)
    yield _histogram("socksd_handshake_seconds",
                     "From accepting the connection to the reply that starts the relay.",
                     counts.handshake)
    yield _histogram("socksd_connect_seconds",
                     "CONNECT: from the request to the destination connected.",
                     counts.connect)
    yield _by("socksd_ident_lookups", "SOCKS4 USERIDs checked with the client's identd, "
              "by result.", "result", counts.ident_lookups)
    yield _by("socksd_identd_queries", "Queries the identd answered, by result.", "result",
              counts.identd_queries)
    yield GaugeMetricFamily("socksd_name_lookups_in_flight",
                            "Name lookups running or waiting for a thread.",
                            value=counts.lookups_in_flight)
    yield CounterMetricFamily("socksd_splice_sessions",
                              "Sessions relayed in the kernel (splice).",
                              value=counts.splice_sessions)
    yield _by("socksd_config_reloads", "Configuration reloads (SIGHUP), by result.",
              "result", counts.reloads)
    yield _by("socksd_refused", "Connections refused before a session began, by reason.",
              "reason", counts.refused)


def _by(name: str, documentation: str, label: str, counts: Counter[str]) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, n in sorted(counts.items()):
        family.add_metric([value], n)
    return family


def _histogram(name: str, documentation: str, latency: Latency) -> Metric:
    buckets, total = [], 0
    for bound, n in zip((*LATENCY_BUCKETS, float("inf")), latency.counts, strict=True):
        total += n
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=latency.sum)


def registry(factory: SOCKSServerFactory | None) -> CollectorRegistry:
    """socksd's series and the process's (CPU, memory, open descriptors)."""
    return _with_process(SocksCollector(factory))


def workers_registry(workers: WorkersService) -> CollectorRegistry:
    """The supervisor's: socksd's series summed over the workers, theirs
    by worker, and its own process's (prometheus_client's multiprocess mode
    would have none of the process series)."""
    return _with_process(WorkersCollector(workers))


def _with_process(collector: SocksCollector) -> CollectorRegistry:
    collected = CollectorRegistry(auto_describe=True)
    collected.register(collector)
    ProcessCollector(registry=collected)
    return collected


class MetricsPage(Resource):
    """``/metrics``, rendered on the reactor thread: the collector reads the
    open sessions, which only that thread may touch. (prometheus_client's
    own Twisted resource runs the WSGI app in the reactor's thread pool,
    which also serves the name lookups.)"""

    isLeaf = True

    def __init__(self, collected: CollectorRegistry,
                 gather: Callable[[], defer.Deferred[None]] | None = None) -> None:
        super().__init__()
        self.collected = collected
        self.gather = gather     # what to wait for first (the workers' counts), if anything

    def render_GET(self, request: Request) -> bytes | int:
        request.setHeader(b"Server", b"socksd")
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            return b"not found\n"
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        if self.gather is None:
            return generate_latest(self.collected)
        gone: list[object] = []
        request.notifyFinish().addErrback(gone.append)    # the scraper left meanwhile

        def answer(_: None) -> None:
            if gone:
                return
            try:
                body = generate_latest(self.collected)
            except Exception:
                log.failure("metrics: the scrape failed")
                request.setResponseCode(500)
                body = b"the scrape failed\n"
            request.write(body)
            request.finish()

        self.gather().addCallback(answer)
        return NOT_DONE_YET


class _OneRequest(Request):
    """A scrape is a GET with no body, one per connection: a body would be
    spooled to a temporary file whatever its size, and pipelined requests
    answered while the client reads none of it."""

    def gotLength(self, length: int | None) -> None:
        if length != 0:
            transport = self.channel.transport if self.channel is not None else None
            if ITCPTransport.providedBy(transport):
                transport.abortConnection()
            elif transport is not None:
                transport.loseConnection()
            return
        # The channel answers, then closes, reading nothing pipelined behind.
        if self.channel is not None:
            self.channel.persistent = False
        self.responseHeaders.setRawHeaders(b"connection", [b"close"])
        super().gotLength(length)


class _QuietSite(Site):
    """No access-log line per scrape: Prometheus asks every few seconds."""

    noisy = False
    displayTracebacks = False
    requestFactory = _OneRequest

    def log(self, request: Any) -> None:
        pass


# Scrapers are few: more connections than this at once are refused, and
# each is closed SCRAPE_TIMEOUT seconds after it came, whatever it sends
# meanwhile (the web server's own timeout is one of inactivity: a byte a
# second would hold a place for ever, and eight such would lock Prometheus
# out).
MAX_SCRAPERS = 8
SCRAPE_TIMEOUT = 10


class _Deadline(ProtocolWrapper):
    """A scraper's connection, aborted at its deadline."""

    deadline: IDelayedCall | None = None

    def makeConnection(self, transport: Any) -> None:
        factory = cast(_FewScrapers, self.factory)
        self.deadline = factory.reactor.callLater(SCRAPE_TIMEOUT, transport.abortConnection)
        super().makeConnection(transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        super().connectionLost(reason)


class _FewScrapers(WrappingFactory):
    noisy = False
    protocol = _Deadline

    def __init__(self, wrapped: Site, reactor: Any) -> None:
        super().__init__(wrapped)
        self.reactor = reactor

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.protocols) >= MAX_SCRAPERS:
            return None
        return super().buildProtocol(addr)


def site(collected: CollectorRegistry,
         gather: Callable[[], defer.Deferred[None]] | None = None,
         reactor: Any = None) -> WrappingFactory:
    root = Resource()
    root.putChild(b"metrics", MetricsPage(collected, gather))
    web = _QuietSite(root, timeout=SCRAPE_TIMEOUT,
                     **({} if reactor is None else {"reactor": reactor}))
    return _FewScrapers(web, reactor if reactor is not None else installed_reactor())
