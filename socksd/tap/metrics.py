"""``[metrics] listen``: ``/metrics`` for Prometheus, on Twisted's web server.

The counts are :mod:`socksd.stats`'s and the listener's; they become
prometheus_client metric families when a scrape asks (a custom collector on
a registry of our own), and prometheus_client writes the exposition.
Bytes of sessions still open are read from the sessions themselves at that
moment, spliced or not: a scrape during a transfer sees its bytes so far.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet.interfaces import ITCPTransport
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from socksd.proxy import SOCKSServerFactory
from socksd.proxy.connect import lookups
from socksd.stats import LATENCY_BUCKETS, OUTCOMES, STATS, Latency, Stats


class SocksCollector:
    """What one ``twistd socks`` process has done, and is doing now."""

    def __init__(self, factory: SOCKSServerFactory | None, stats: Stats = STATS,
                 reactor: Any = None) -> None:
        self.factory = factory
        self.stats = stats
        self.reactor = reactor if reactor is not None else getattr(factory, "reactor", None)

    def collect(self) -> Iterator[Metric]:
        stats, factory = self.stats, self.factory
        per_user = stats.per_user
        user = ["user"] if per_user else []

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
        yield GaugeMetricFamily("socksd_sessions_active", "Sessions open now.", value=active)

        sessions = CounterMetricFamily(
            "socksd_sessions", "Sessions ended, by SOCKS version, command and outcome "
            f"({', '.join(OUTCOMES)}).", labels=["version", "command", "outcome", *user])
        # Summed by the labels shown: per_user turned off by a reload leaves
        # counts kept under names, which must not become duplicate series.
        shown: Counter[tuple[str, ...]] = Counter()
        for (version, command, outcome, who), n in stats.sessions().items():
            shown[(version, command, outcome, *([who] if per_user else []))] += n
        for labels, n in sorted(shown.items()):
            sessions.add_metric(list(labels), n)
        yield sessions

        relayed = CounterMetricFamily(
            "socksd_relayed_bytes", "Bytes relayed, up (client to destination) and down, "
            "open sessions included.", labels=["direction", *user])
        totals: Counter[tuple[str, ...]] = Counter(
            {(direction, *(["-"] if per_user else [])): 0 for direction in ("up", "down")})
        for (direction, who), n in (*stats.bytes.items(), *live.items()):
            totals[(direction, who) if per_user else (direction,)] += n
        for labels, n in sorted(totals.items()):
            relayed.add_metric(list(labels), n)
        yield relayed

        yield _by("socksd_auth_failures", "Failed authentications, by method.", "method",
                  stats.auth_failures())
        yield _histogram("socksd_handshake_seconds",
                         "From accepting the connection to the reply that starts the relay.",
                         stats.handshake)
        yield _histogram("socksd_connect_seconds",
                         "CONNECT: from the request to the destination connected.",
                         stats.connect)
        yield _by("socksd_ident_lookups", "SOCKS4 USERIDs checked with the client's identd, "
                  "by result.", "result", stats.ident_lookups)
        yield _by("socksd_identd_queries", "Queries the identd answered, by result.", "result",
                  stats.identd_queries)
        in_flight = lookups(self.reactor).total if self.reactor is not None else 0
        yield GaugeMetricFamily("socksd_name_lookups_in_flight",
                                "Name lookups running or waiting for a thread.", value=in_flight)
        yield CounterMetricFamily("socksd_splice_sessions",
                                  "Sessions relayed in the kernel (splice).",
                                  value=stats.splice_sessions)
        yield _by("socksd_config_reloads", "Configuration reloads (SIGHUP), by result.",
                  "result", stats.reloads)
        yield _by("socksd_refused", "Connections refused before a session began, by reason.",
                  "reason", stats.refused)


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
    collected = CollectorRegistry(auto_describe=True)
    collected.register(SocksCollector(factory))
    ProcessCollector(registry=collected)
    return collected


class MetricsPage(Resource):
    """``/metrics``, rendered on the reactor thread: the collector reads the
    open sessions, which only that thread may touch. (prometheus_client's
    own Twisted resource runs the WSGI app in the reactor's thread pool,
    which also serves the name lookups.)"""

    isLeaf = True

    def __init__(self, collected: CollectorRegistry) -> None:
        super().__init__()
        self.collected = collected

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Server", b"socksd")
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            return b"not found\n"
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.collected)


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


# Scrapers are few: more connections than this at once are refused, and a
# silent one is closed after SCRAPE_TIMEOUT seconds.
MAX_SCRAPERS = 8
SCRAPE_TIMEOUT = 10


class _FewScrapers(WrappingFactory):
    noisy = False

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.protocols) >= MAX_SCRAPERS:
            return None
        return super().buildProtocol(addr)


def site(collected: CollectorRegistry) -> WrappingFactory:
    root = Resource()
    root.putChild(b"metrics", MetricsPage(collected))
    return _FewScrapers(_QuietSite(root, timeout=SCRAPE_TIMEOUT))
