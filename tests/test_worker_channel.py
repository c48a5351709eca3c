"""A worker's control channel (``workers = N``), in memory: the worker's
end (socksd.tap.worker.WorkerChannel) wired to the supervisor's
(socksd.tap.workers) over StringTransports. The counts a scrape gathers and
sums, with bounds on what a worker may report; counters that never go back
when a worker ends, cleanly or not; the configuration the supervisor sends;
malformed frames."""

from __future__ import annotations

import json
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure

import fakes
from socksd import stats
from socksd.config import Config, ConfigError, load_text
from socksd.ident.registry import ProxiedConnections
from socksd.stats import LATENCY_BUCKETS, Counts, Stats
from socksd.tap.socks import build
from socksd.tap.worker import WorkerChannel, read_start
from socksd.tap.workers import (
    DRAIN_WAIT,
    REPORT_WAIT,
    STOP_MARGIN,
    STOP_TIMEOUT,
    WorkersService,
    _ChannelFactory,
    _Worker,
    _WorkerLogFactory,
    start_message,
)


def errors(events: list[dict]) -> list[str]:
    return [formatEvent(e) for e in events if e["log_level"].name in ("error", "critical")]


def frame(message) -> bytes:
    payload = message if isinstance(message, bytes) else json.dumps(message).encode()
    return struct.pack("!I", len(payload)) + payload


def some_counts(sessions: int = 1, user: str = "-", active: int = 0) -> Counts:
    """What a worker that served ``sessions`` sessions of ``user`` counted."""
    counted = Stats()
    counted.per_user = True
    for _ in range(sessions):
        counted.session_ended(5, "connect", "ok", user, True, "userpass", 100, 200, False)
        counted.handshake.observe(0.002)
    return counted.counts(active=active)


def samples(counts: Counts) -> dict:
    """Every series of ``counts`` as the metrics show them, per user."""
    from socksd.tap.metrics import families

    found = {}
    for family in families(counts, per_user=True):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def never_less(before: dict, after: dict) -> None:
    for key, value in before.items():
        if key[0] not in ("socksd_sessions_active", "socksd_name_lookups_in_flight"):
            assert after.get(key, 0) >= value, (key, value, after.get(key))


class Pair:
    """A worker process, both ends of its channel, and the supervisor."""

    def __init__(self, supervisor: WorkersService, index: int, counts: Counts) -> None:
        self.supervisor = supervisor
        self.counts = counts
        self.configured: list[tuple[str | None, str | None]] = []
        self.worker = _Worker(supervisor, index)
        self.worker.makeConnection(fakes.FakeProcess())
        supervisor.workers[index] = self.worker
        supervisor.reporting.add(self.worker)
        self.up = _ChannelFactory(self.worker, supervisor.registry).buildProtocol(None)
        self.up.makeConnection(StringTransport())
        self.stops: list[str | None] = []        # what the worker was told: drain, or why not
        self.down = WorkerChannel(index, lambda: self.counts,
                                  lambda path, text: self.configured.append((path, text)),
                                  supervisor.reactor, self.stops.append)
        self.down.makeConnection(StringTransport())

    def to_worker(self) -> None:
        data = self.up.transport.value()
        self.up.transport.clear()
        self.down.dataReceived(data)

    def to_supervisor(self) -> None:
        data = self.down.transport.value()
        self.down.transport.clear()
        self.up.dataReceived(data)

    def crash(self) -> None:
        """kill -9: the process ends, then its channel, nothing said last."""
        self.worker.processEnded(Failure(ConnectionError("killed")))
        self.up.connectionLost(Failure(ConnectionError("closed")))

    def stop_cleanly(self) -> None:
        """SIGTERM: its counts last, and the supervisor hears of its end
        before it reads them (the two come on different descriptors)."""
        self.down.stop()
        self.worker.processEnded(Failure(ConnectionError("exit code 0")))
        self.to_supervisor()
        self.up.connectionLost(Failure(ConnectionError("closed")))


def supervisor() -> WorkersService:
    service = WorkersService(2, ("tcp:0:interface=127.0.0.1",), [],
                             reactor=MemoryReactorClock(), registry=ProxiedConnections())
    service.spawn = lambda index: None       # stand-ins: no process restarted
    return service


def scrape(service: WorkersService, pairs: list[Pair]) -> Counts:
    """A scrape that every worker answers."""
    gathered = service.gather()
    for pair in pairs:
        pair.to_worker()
        pair.to_supervisor()
    assert gathered.called
    return service.totals()


# ---- what a worker reports ---------------------------------------------------------------

def test_a_report_round_trips():
    counted = Stats()
    counted.per_user = True
    counted.session_ended(5, "connect", "ok", "al\"ice\udcff", True, "userpass", 3, 4, True)
    counted.session_ended(4, "\x1bbogus", "bad request", "mallory", False, "none", 1, 0, False)
    counted.session_ended(5, "udp", "auth failed", "-", False, "gssapi", 0, 0, False)
    counted.ident_lookups["confirmed"] += 2
    counted.refused["max_sessions"] += 1
    counted.connect.observe(0.01)
    counts = counted.counts([(("up", "bob"), 7)], active=3, lookups_in_flight=2)
    wire = json.loads(json.dumps(counts.to_json(set())))
    back = Counts.from_json(wire)
    assert samples(back) == samples(counts)
    assert back.sessions_active == 3 and back.lookups_in_flight == 2


def sessions_of(found: dict, user: str) -> float:
    return found.get(("socksd_sessions_total", (("command", "connect"), ("outcome", "ok"),
                                                ("user", user), ("version", "socks5"))), 0)


def test_users_beyond_the_bound_are_counted_as_dash_and_stay_so(monkeypatch):
    monkeypatch.setattr(stats, "MAX_USERS", 2)
    named: set[str] = set()
    counted = Stats()
    counted.per_user = True

    def ended(user: str) -> None:
        counted.session_ended(5, "connect", "ok", user, True, "userpass", 1, 1, False)

    def report() -> dict:
        return samples(Counts.from_json(json.loads(json.dumps(
            counted.counts().to_json(named)))))

    ended("alice")
    first = report()
    for user in ("bob", "carol", "dave"):
        ended(user)
    second = report()
    assert named == {"alice", "bob"}
    assert sessions_of(second, "carol") == 0 and sessions_of(second, "-") == 2
    ended("carol")        # not named now, nor ever
    ended("erin")
    third = report()
    assert sessions_of(third, "-") == 4 and sessions_of(third, "bob") == 1
    never_less(first, second)
    never_less(second, third)


def test_a_name_too_long_for_a_label_is_counted_as_dash():
    counted = Stats()
    counted.per_user = True
    long = "\u00e9" * (stats.MAX_USER_LABEL // 2 + 1)
    counted.session_ended(5, "connect", "ok", long, True, "userpass", 1, 1, False)
    named: set[str] = set()
    found = samples(Counts.from_json(counted.counts().to_json(named)))
    assert not named and sessions_of(found, "-") == 1


def _report(**changes) -> dict:
    report = some_counts(2, "alice").to_json(set())
    report.update(changes)
    return report


BUCKETS = len(LATENCY_BUCKETS) + 1


@pytest.mark.parametrize("report, why", [
    ([], "not a report"),
    ({**_report(), "extra": 1}, "not a report"),
    ({k: v for k, v in _report().items() if k != "bytes"}, "not a report"),
    (_report(users=["-"] * 2), "a name twice"),
    (_report(users=[""]), "empty, too long"),
    (_report(users=["x" * (stats.MAX_USER_LABEL + 1)]), "empty, too long"),
    (_report(users=["u%d" % n for n in range(stats.MAX_USERS + 2)]), "users: not a list"),
    (_report(sessions=[["socks6", "connect", "ok", 0, 1]]), "sessions: labels"),
    (_report(sessions=[["socks5", "\x1b[31m", "ok", 0, 1]]), "sessions: labels"),
    (_report(sessions=[["socks5", "connect", "fine", 0, 1]]), "sessions: labels"),
    (_report(sessions=[["socks5", "connect", "ok", 9, 1]]), "not in the users list"),
    (_report(sessions=[["socks5", "connect", "ok", True, 1]]), "not in the users list"),
    (_report(sessions=[["socks5", "connect", "ok", 0, 1]] * 2), "a series twice"),
    (_report(sessions=[["socks5", "connect", "ok", 0]]), "5-item lists"),
    (_report(sessions=[["socks5", "connect", "ok", 0, -1]]), "is not a count"),
    (_report(sessions=[["socks5", "connect", "ok", 0, True]]), "is not a count"),
    (_report(sessions=[["socks5", "connect", "ok", 0, 1 << 64]]), "is not a count"),
    (_report(sessions=[["socks5", "connect", "ok", 0, 1.5]]), "is not a count"),
    (_report(bytes=[["sideways", 0, 1]]), "bytes: direction"),
    (_report(auth_failures={"kerberos": 1}), "not a method"),
    (_report(refused={"\x1b[31m": 1}), "refused: label"),
    (_report(refused={"x" * 41: 1}), "refused: label"),
    (_report(reloads={f"r{n}": 1 for n in range(65)}), "at most 64"),
    (_report(reloads=[1]), "reloads: not a table"),
    (_report(handshake=[[0] * (BUCKETS - 1), 0.0]), "handshake: not [bucket counts, sum]"),
    (_report(handshake=[[0] * BUCKETS, float("nan")]), "handshake: sum"),
    (_report(connect=[[0] * BUCKETS, -1.0]), "connect: sum"),
    (_report(sessions_active=-1), "sessions_active"),
    (_report(splice_sessions="3"), "splice_sessions"),
])
def test_a_report_out_of_bounds_is_refused(report, why):
    with pytest.raises(ValueError) as info:
        Counts.from_json(json.loads(json.dumps(report)))
    assert why in str(info.value), str(info.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=5),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.fixed_dictionaries(
    {key: json_values for key in _report()})))
def test_any_json_is_a_report_or_a_value_error(value):
    try:
        counts = Counts.from_json(value)
    except ValueError:
        return
    assert isinstance(counts, Counts)


def test_sums_add_gauges_of_the_living_only():
    total = Counts()
    total.add(some_counts(3, active=2))
    total.add(some_counts(1, active=5), gauges=False)
    assert total.sessions_active == 2
    assert sum(total.sessions.values()) == 4 and total.handshake.counts == \
        [n * 4 for n in some_counts(1).handshake.counts]


# ---- gathering and summing, across the ends of workers -----------------------------------

def test_a_scrape_asks_every_worker_and_sums_their_answers():
    service = supervisor()
    pairs = [Pair(service, 0, some_counts(2, "alice", active=1)),
             Pair(service, 1, some_counts(3, "bob", active=2))]
    totals = scrape(service, pairs)
    assert sum(totals.sessions.values()) == 5 and totals.sessions_active == 3
    assert totals.bytes[("up", "alice")] == 200 and totals.bytes[("up", "bob")] == 300


def test_a_scrape_waits_a_bounded_time_for_a_silent_worker():
    service = supervisor()
    answering = Pair(service, 0, some_counts(1))
    silent = Pair(service, 1, some_counts(1))
    scrape(service, [answering, silent])
    silent.counts = some_counts(10)        # counted since, but it does not answer now
    answering.counts = some_counts(2)
    gathered = service.gather()
    later = service.gather()               # a second scraper meanwhile: the next round
    answering.to_worker()
    answering.to_supervisor()
    assert not gathered.called and not later.called
    service.reactor.advance(REPORT_WAIT)
    assert gathered.called and not later.called
    # The silent one counts with its last report.
    assert sum(service.totals().sessions.values()) == 3
    answering.to_worker()
    answering.to_supervisor()
    service.reactor.advance(REPORT_WAIT)
    assert later.called


def test_a_scrape_with_no_worker_alive_answers_at_once():
    service = supervisor()
    assert service.gather().called


@pytest.mark.parametrize("clean", [False, True], ids=["kill -9", "SIGTERM"])
def test_counters_never_go_back_when_a_worker_is_restarted(clean):
    service = supervisor()
    first = Pair(service, 0, some_counts(10, "alice", active=4))
    other = Pair(service, 1, some_counts(5, "bob", active=1))
    before = samples(scrape(service, [first, other]))
    first.counts = some_counts(12, "alice", active=4)     # two more since the scrape
    if clean:
        first.stop_cleanly()
    else:
        first.crash()
    ended = service.totals()
    # Its gauges are gone with it; its counts stay.
    assert ended.sessions_active == 1
    assert sum(ended.sessions.values()) == (17 if clean else 15)
    never_less(before, samples(ended))
    restarted = Pair(service, 0, some_counts(1, "carol"))
    after = samples(scrape(service, [restarted, other]))
    never_less(before, after)
    never_less(samples(ended), after)
    assert sum(service.totals().sessions.values()) == (18 if clean else 16)


def test_the_last_counts_are_read_after_the_process_ended_for_a_while_only():
    service = supervisor()
    pair = Pair(service, 0, some_counts(1, active=4))
    pair.down.report()
    pair.worker.processEnded(Failure(ConnectionError("exit code 0")))
    assert not pair.up.transport.disconnecting
    pair.to_supervisor()                       # read after its end: still its counts
    assert sum(service.totals().sessions.values()) == 1
    assert service.totals().sessions_active == 0       # but its sessions are gone
    service.reactor.advance(DRAIN_WAIT)
    assert pair.up.transport.disconnecting     # no end of the channel seen: closed
    pair.up.connectionLost(Failure(ConnectionError("closed")))
    assert sum(service.totals().sessions.values()) == 1 and not service.reporting


def test_a_worker_stopping_cleanly_gives_up_on_a_supervisor_that_does_not_read():
    reactor = MemoryReactorClock()
    channel = WorkerChannel(0, lambda: some_counts(1), lambda path, text: None, reactor)
    channel.makeConnection(StringTransport())
    stopped = channel.stop()
    assert b'["counts",0,' in channel.transport.value()
    assert channel.transport.disconnecting and not stopped.called
    reactor.advance(2.0)
    assert stopped.called


# ---- readiness (systemd's READY=1) -------------------------------------------------------

def test_ready_once_every_worker_serves_and_a_restart_changes_nothing():
    service = supervisor()
    pairs = [Pair(service, index, some_counts(0)) for index in range(2)]
    ready = service.ready()
    pairs[1].down.serving()
    pairs[1].to_supervisor()
    assert not ready.called                    # worker 0 does not serve yet
    pairs[0].crash()
    restarted = Pair(service, 0, some_counts(0))
    restarted.down.serving()
    restarted.to_supervisor()
    assert ready.called
    assert service.ready().called              # asked later: at once


def test_a_serving_message_with_more_in_it_is_malformed(log_events):
    service = supervisor()
    pair = Pair(service, 0, some_counts(0))
    pair.up.dataReceived(frame(["serving", 1]))
    assert pair.worker.transport.signals == ["TERM"]
    assert "unknown message 'serving' of 2 items" in errors(log_events)[0]


# ---- the configuration --------------------------------------------------------------------

def test_a_reload_sends_the_validated_text_and_a_later_worker_starts_with_it(tmp_path):
    service = supervisor()
    pair = Pair(service, 0, some_counts(0))
    path = str(tmp_path / "socksd.toml")
    text = "[server]\nworkers = 2\nmax_sessions = 7\n"
    cfg = load_text(text, path)
    service.reload(cfg)
    pair.to_worker()
    assert pair.configured == [(path, text)]
    # One spawned now reads the same on its stdin, --auth strings with it.
    auth, start_path, start_text = read_start(_Stdin(start_message(["memory:a:b"], cfg)))
    assert (auth, start_path, start_text) == (["memory:a:b"], path, text)
    assert read_start(_Stdin(start_message([], Config()))) == ([], None, None)   # no --config


class _Stdin:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self) -> bytes:
        return self.data


def test_configurations_and_requests_waiting_are_replaced_not_queued(tmp_path):
    service = supervisor()
    pair = Pair(service, 0, some_counts(1))
    pair.up.pauseProducing()                   # the worker reads slowly
    for size in range(1, 50):
        service.reload(load_text(f"[server]\nmax_sessions = {size}\n", "f.toml"))
        service.gather()
        service.reactor.advance(REPORT_WAIT)
    assert len(pair.up.queue) == 2 and pair.up.transport.value() == b""
    pair.up.resumeProducing()
    pair.to_worker()
    assert pair.configured == [("f.toml", "[server]\nmax_sessions = 49\n")]
    assert pair.down.asked == service.sequence
    # And the worker's end: a report waiting is replaced by the newer one.
    pair.down.pauseProducing()
    pair.down.report()
    pair.down.report()
    assert len(pair.down.queue) == 1


def test_a_worker_builds_from_the_text_and_names_the_file_in_its_messages(tmp_path):
    """The file is not read: it may have changed since the supervisor
    validated it (here it is not even there)."""
    path = str(tmp_path / "gone.toml")
    text = '[server]\nlisten = ["tcp:1080"]\n\nmethods = ["userpass"]\n'
    with pytest.raises(ConfigError) as info:
        build(path, [], [], (), text)
    assert str(info.value).startswith(f"{path}:4: server.methods: ")
    with pytest.raises(ConfigError) as info:
        load_text("[server]\n\nmax_sessions = -3\n", path)
    assert str(info.value).startswith(f"{path}:3: server.max_sessions: ")


def test_metrics_with_workers_is_no_longer_refused_and_a_huge_file_is(tmp_path):
    cfg = load_text('[server]\nworkers = 2\n[metrics]\nlisten = ["tcp:9108"]\n', "f.toml")
    assert cfg.workers == 2 and cfg.metrics.listen == ("tcp:9108",)
    with pytest.raises(ConfigError) as info:
        load_text("[server]\nworkers = 2\n" + "#" * (2 << 20), "f.toml")
    assert "f.toml:2: server.workers: the file is" in str(info.value)


# ---- malformed frames --------------------------------------------------------------------

@pytest.mark.parametrize("bad, why", [
    (["counts", 1, {"users": []}], "counts: not a report"),
    (["counts", -1, _report()], "not numbered"),
    (["counts", 1], "not numbered"),
    (["counts", 1, _report(refused={"\x1b[31mred\n": 1})], "refused: label"),
    (["config", "f.toml", "x"], "unknown message 'config'"),
    (["report", 1], "unknown message 'report'"),
])
def test_a_malformed_frame_from_a_worker_stops_it_with_one_line(bad, why, log_events):
    service = supervisor()
    pair = Pair(service, 3, some_counts(2))
    scrape(service, [pair])
    pair.down.add("127.0.0.1", 40001, "192.0.2.7", 6667, "alice")
    pair.to_supervisor()
    assert len(service.registry) == 1
    pair.up.dataReceived(frame(bad) + frame(["add", 9, "127.0.0.1", 40002, "192.0.2.7", 6667,
                                             "eve"]))
    [line] = errors(log_events)
    assert line.startswith("worker 3: malformed frame on its channel (") and why in line, line
    assert "1 identd entry cleared; the worker is stopped" in line
    assert "\x1b" not in line and "\n" not in line
    assert len(service.registry) == 0                     # nothing after it counts either
    assert pair.worker.transport.signals == ["TERM"] and service.malformed_frames == 1
    assert pair.up.transport.disconnecting
    pair.worker.processEnded(Failure(ConnectionError("terminated")))
    pair.up.connectionLost(Failure(ConnectionError("closed")))
    assert sum(service.totals().sessions.values()) == 2   # its last good report stays
    service.reactor.advance(STOP_TIMEOUT)
    assert pair.worker.transport.signals == ["TERM"]      # it ended: not killed too


def test_an_oversized_frame_from_a_worker_stops_it():
    service = supervisor()
    pair = Pair(service, 0, some_counts(1))
    pair.up.dataReceived(struct.pack("!I", pair.up.MAX_LENGTH + 1))
    assert pair.worker.transport.signals == ["TERM"] and pair.up.transport.disconnecting
    service.reactor.advance(STOP_TIMEOUT)         # it did not end: killed
    assert pair.worker.transport.signals == ["TERM", "KILL"]


def test_a_malformed_frame_from_the_supervisor_ends_the_worker_channel(log_events):
    reactor = MemoryReactorClock()
    configured: list = []
    channel = WorkerChannel(1, lambda: some_counts(1),
                            lambda path, text: configured.append(path), reactor)
    channel.makeConnection(StringTransport())
    channel.dataReceived(frame(["config", 7, "\x1b[2J"]) + frame(["config", None, None]))
    assert configured == [] and channel.transport.disconnecting
    [line] = errors(log_events)
    assert line.startswith("w1 malformed frame from the supervisor (config: not a path")


def test_the_largest_file_a_worker_may_run_fits_in_a_frame_it_reads():
    """Any valid file within MAX_WORKERS_CONFIG reaches the workers at a
    reload: a 2-byte UTF-8 character (a comment in French, Russian, ...)
    is 6 bytes of ASCII JSON, three times its size."""
    from socksd.config import MAX_WORKERS_CONFIG
    from socksd.tap.workers import config_message

    line = "# " + "é" * 500 + "\n"
    text = "[server]\nworkers = 2\n" + line * ((MAX_WORKERS_CONFIG - 64) // len(line.encode()))
    assert len(text.encode()) <= MAX_WORKERS_CONFIG
    service = supervisor()
    pair = Pair(service, 0, some_counts(0))
    service.reload(load_text(text, "/etc/socksd.toml"))
    assert len(config_message(service.config)) - 4 > 2 * MAX_WORKERS_CONFIG
    pair.to_worker()
    assert not pair.down.broken and pair.configured == [("/etc/socksd.toml", text)]


def test_a_scrape_that_comes_during_a_round_is_asked_in_the_next():
    """The workers that answered the round out before a scrape came answered
    before it: the scrape waits for a round of its own, and sees every
    session that ended before it."""
    service = supervisor()
    fast = Pair(service, 0, some_counts(1))
    slow = Pair(service, 1, some_counts(1))
    first = service.gather()
    fast.to_worker()
    fast.to_supervisor()                  # answered: 1 session
    fast.counts = some_counts(5)          # 4 more end in worker 0 ...
    second = service.gather()             # ... then this scrape comes
    slow.to_worker()
    slow.to_supervisor()
    assert first.called and not second.called
    assert sum(service.totals().sessions.values()) == 2
    for pair in (fast, slow):             # the next round
        pair.to_worker()
        pair.to_supervisor()
    assert second.called
    assert sum(service.totals().sessions.values()) == 6


def test_scrapes_waiting_for_the_next_round_are_answered_when_the_service_stops():
    service = supervisor()
    pair = Pair(service, 0, some_counts(1))
    first = service.gather()
    second = service.gather()
    service.stopService()
    pair.crash()                           # it ends without a word
    assert first.called and second.called


# ---- stopping ----------------------------------------------------------------------------

def _ended(pair: Pair) -> None:
    """The worker process ends, and its log and channel close."""
    pair.worker.processEnded(Failure(ConnectionError("exit code 0")))
    pair.worker.log_closed.callback(None)
    pair.up.connectionLost(Failure(ConnectionError("closed")))


def test_a_stop_tells_every_worker_to_drain_and_kills_it_after_its_drain_timeout():
    """Over its channel, not with a signal (which would be its second when
    systemd signalled it too); killed drain_timeout + STOP_MARGIN later."""
    service = supervisor()
    service.config = load_text("[server]\nworkers = 2\ndrain_timeout = 7\n", "f.toml")
    pairs = [Pair(service, 0, some_counts(1)), Pair(service, 1, some_counts(1))]
    stopped = service.stopService()
    for pair in pairs:
        pair.to_worker()
        assert pair.stops == [None] and pair.worker.transport.signals == []
    _ended(pairs[0])
    service.reactor.advance(7 + STOP_MARGIN - 0.1)
    assert pairs[1].worker.transport.signals == [] and not stopped.called
    service.reactor.advance(0.2)
    assert pairs[0].worker.transport.signals == []          # it had ended
    assert pairs[1].worker.transport.signals == ["KILL"]
    _ended(pairs[1])
    assert stopped.called


def test_a_second_signal_tells_every_worker_to_end_at_once_and_kills_it_sooner():
    service = supervisor()
    pair = Pair(service, 0, some_counts(1))
    service.stopService()
    pair.to_worker()
    service.reactor.advance(1)
    service.now("a second SIGTERM")
    pair.to_worker()
    assert pair.stops == [None, "a second SIGTERM"]
    service.reactor.advance(STOP_TIMEOUT - 0.1)
    assert pair.worker.transport.signals == []
    service.reactor.advance(0.2)
    assert pair.worker.transport.signals == ["KILL"]


def test_a_worker_whose_channel_is_gone_is_sent_sigterm():
    service = supervisor()
    pair = Pair(service, 0, some_counts(1))
    pair.up.connectionLost(Failure(ConnectionError("closed")))
    service.stopService()
    assert pair.worker.transport.signals == ["TERM"]


def test_the_sockets_held_for_restarts_close_as_the_stop_begins():
    """Or the kernel would queue the connections nobody will accept, where
    the client should be refused at once."""
    service = supervisor()
    held = socket.socket()
    service.sockets = [[held]]
    Pair(service, 0, some_counts(1))
    service.stopService()
    assert held.fileno() == -1


def test_the_stop_waits_for_a_workers_log_read_to_its_end_for_a_while():
    """Its last sessions' lines come on its log after its end, maybe."""
    service = supervisor()
    pair = Pair(service, 0, some_counts(1))
    _WorkerLogFactory(0, pair.worker.log_closed).buildProtocol(None).makeConnection(
        StringTransport())
    stopped = service.stopService()
    pair.worker.processEnded(Failure(ConnectionError("exit code 0")))
    pair.up.connectionLost(Failure(ConnectionError("closed")))
    assert not stopped.called
    service.reactor.advance(DRAIN_WAIT - 0.1)
    assert not stopped.called
    service.reactor.advance(0.2)                  # its log's other end held open
    assert stopped.called


def test_the_stop_is_over_once_a_workers_log_is_read_to_its_end():
    service = supervisor()
    pair = Pair(service, 0, some_counts(1))
    log = _WorkerLogFactory(0, pair.worker.log_closed).buildProtocol(None)
    log.makeConnection(StringTransport())
    stopped = service.stopService()
    log.connectionLost(Failure(ConnectionError("closed")))     # before its end: fine too
    pair.worker.processEnded(Failure(ConnectionError("exit code 0")))
    assert stopped.called


@pytest.mark.parametrize("message, why", [
    (["stop"], "unknown message 'stop' of 1 items"),
    (["stop", 1], "stop: neither null nor a reason"),
    (["stop", ""], "stop: neither null nor a reason"),
    (["stop", "x" * 201], "stop: neither null nor a reason"),
])
def test_a_malformed_stop_from_the_supervisor_ends_the_worker_at_once(message, why, log_events):
    pair = Pair(supervisor(), 1, some_counts(1))
    pair.down.dataReceived(frame(message))
    [line] = errors(log_events)
    assert line.startswith(f"w1 malformed frame from the supervisor ({why}") and \
        pair.down.transport.disconnecting
    pair.down.connectionLost(Failure(ConnectionError("closed")))
    assert pair.stops == ["the control channel to the supervisor closed"]


def test_a_worker_whose_channel_closes_ends_at_once():
    pair = Pair(supervisor(), 0, some_counts(1))
    pair.down.connectionLost(Failure(ConnectionError("closed")))
    assert pair.stops == ["the control channel to the supervisor closed"]
    stopping = Pair(supervisor(), 0, some_counts(1))
    stopping.down.stop()                         # its own clean stop closes it
    stopping.down.connectionLost(Failure(ConnectionError("closed")))
    assert stopping.stops == []
