"""What this process has done, counted for the metrics endpoint.

Every layer counts here, in plain ints and dicts: prometheus_client's own
metric objects take a lock per increment (a few microseconds, paid on every
session even when nobody scrapes). :mod:`socksd.tap.metrics` turns these
counts into prometheus_client metric families at scrape time. It imports
nothing of ours, so every layer may use it.

Label values are from closed sets (never a raw string a client sent), except
``user`` with ``[metrics] per_user``, which only verified users get.

With ``workers = N`` each worker's counts travel to the supervisor as
:class:`Counts`, their labels already reduced, and the supervisor sums them:
:meth:`Counts.to_json` and :meth:`Counts.from_json`, which takes nothing
it does not bound.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable
from typing import Any

# A session's outcome, as the metrics name it: a closed set, defined once.
OUTCOMES = ("ok", "denied", "auth_failed", "connect_failed", "timeout", "stalled", "refused",
            "lost", "client_error", "shutdown")
COMMANDS = ("connect", "bind", "udp")
VERSIONS = ("socks4", "socks5")
DIRECTIONS = ("up", "down")
AUTH_METHODS = ("none", "userpass", "gssapi", "-")
_OUTCOME = {
    "ok": "ok", "denied": "denied", "denied after reload": "denied",
    "auth failed": "auth_failed", "no acceptable method": "auth_failed",
    "connect failed": "connect_failed", "bind failed": "connect_failed",
    "udp failed": "connect_failed",
    "handshake timeout": "timeout", "idle timeout": "timeout", "udp idle timeout": "timeout",
    "stalled": "stalled", "refused": "refused",
    "client closed": "lost", "connection lost": "lost",
    "shutdown": "shutdown",
}

# Seconds: a loopback handshake takes well under a millisecond, a
# far destination or a Kerberos exchange tens of milliseconds or more.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)


def outcome_label(outcome: str) -> str:
    """A session outcome (as the session line has it) in the closed set:
    what a client got wrong (bad request, command not supported, a GSS-API
    frame refused, ...) is ``client_error``."""
    return _OUTCOME.get(outcome, "client_error")


def command_label(command: str) -> str:
    return command if command in COMMANDS else "other"


class Latency:
    """A histogram's buckets, count and sum: what prometheus_client's
    Histogram keeps, without its lock."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)     # the last: above every bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    def add(self, other: Latency) -> None:
        for index, n in enumerate(other.counts):
            self.counts[index] += n
        self.sum += other.sum


class Stats:
    """One process's counts (see the module docstring)."""

    def __init__(self) -> None:
        self.per_user = False
        # version, command, outcome, method, user: as the sessions ended
        self.ended: Counter[tuple[int, str, str, str, str]] = Counter()
        self.bytes: Counter[tuple[str, str]] = Counter()       # direction, user: ended sessions
        self.ident_lookups: Counter[str] = Counter()           # result
        self.identd_queries: Counter[str] = Counter()          # result
        self.refused: Counter[str] = Counter()                 # reason
        self.reloads: Counter[str] = Counter()                 # result
        self.splice_sessions = 0
        self.handshake = Latency()
        self.connect = Latency()

    def user_label(self, user: str, verified: bool, method: str) -> str:
        """The ``user`` label: a name the server verified (a password,
        Kerberos); not one the client's own identd confirmed, which whoever
        runs that identd chooses."""
        if self.per_user and verified and user != "-" and method != "ident":
            return user
        return "-"

    def session_ended(self, version: int, command: str, outcome: str, user: str,
                      verified: bool, method: str, up: int, down: int, spliced: bool) -> None:
        # Kept as the session has them (our own words: the command is
        # connect/bind/udp or "-", the outcome one of the session's); the
        # closed sets of labels are made at scrape time (sessions()), not
        # once a session.
        who = self.user_label(user, verified, method) if self.per_user else "-"
        self.ended[(version, command, outcome, method, who)] += 1
        if up:
            self.bytes[("up", who)] += up
        if down:
            self.bytes[("down", who)] += down
        if spliced:
            self.splice_sessions += 1

    def sessions(self) -> Counter[tuple[str, str, str, str]]:
        """Sessions ended by (version, command, outcome, user) labels."""
        labelled: Counter[tuple[str, str, str, str]] = Counter()
        for (version, command, outcome, _method, who), n in self.ended.items():
            labelled[(f"socks{version}", command_label(command), outcome_label(outcome),
                      who)] += n
        return labelled

    def auth_failures(self) -> Counter[str]:
        """Failed authentications by method."""
        failed: Counter[str] = Counter()
        for (_version, _command, outcome, method, _who), n in self.ended.items():
            if outcome_label(outcome) == "auth_failed":
                failed[method if method in AUTH_METHODS else "-"] += n
        return failed

    def counts(self, live: Iterable[tuple[tuple[str, str], int]] = (), active: int = 0,
               lookups_in_flight: int = 0) -> Counts:
        """What this process counted, labels reduced: ``live`` adds the
        bytes of the sessions open now, by (direction, user)."""
        counts = Counts()
        counts.sessions = self.sessions()
        counts.bytes = Counter(self.bytes)
        for key, n in live:
            counts.bytes[key] += n
        counts.auth_failures = self.auth_failures()
        for name in _SMALL:
            getattr(counts, name).update(getattr(self, name))
        counts.splice_sessions = self.splice_sessions
        counts.handshake.add(self.handshake)
        counts.connect.add(self.connect)
        counts.sessions_active = active
        counts.lookups_in_flight = lookups_in_flight
        return counts


# Bounds on what a worker reports (Counts.from_json): per worker, at most
# MAX_USERS names get a series of their own (the first to come; the rest
# are counted as "-"), none longer than MAX_USER_LABEL bytes; the other
# labels are short words of ours.
MAX_USERS = 1000
MAX_USER_LABEL = 512
MAX_COUNT = 1 << 63
_WORD = re.compile(r"[a-z0-9_-]{1,40}\Z")
_SMALL = ("ident_lookups", "identd_queries", "refused", "reloads")   # by one label, a word
_MAX_SMALL = 64       # series in each of those
_KEYS = frozenset(("users", "sessions", "bytes", "auth_failures", *_SMALL, "splice_sessions",
                   "handshake", "connect", "sessions_active", "lookups_in_flight"))


class Counts:
    """One process's counts as the metrics show them (labels reduced), or a
    sum of several: what a worker reports, and what the supervisor adds
    up. ``sessions_active`` and ``lookups_in_flight`` are gauges (what is
    open now); the rest are counters, which only grow."""

    def __init__(self) -> None:
        # version, command, outcome, user
        self.sessions: Counter[tuple[str, str, str, str]] = Counter()
        self.bytes: Counter[tuple[str, str]] = Counter()   # direction, user; open sessions too
        self.auth_failures: Counter[str] = Counter()       # method
        self.ident_lookups: Counter[str] = Counter()
        self.identd_queries: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.reloads: Counter[str] = Counter()
        self.splice_sessions = 0
        self.handshake = Latency()
        self.connect = Latency()
        self.sessions_active = 0
        self.lookups_in_flight = 0

    def add(self, other: Counts, gauges: bool = True) -> None:
        """Add ``other``'s counters (and, unless told not to, its gauges:
        a process that ended has none)."""
        self.sessions.update(other.sessions)
        self.bytes.update(other.bytes)
        self.auth_failures.update(other.auth_failures)
        for name in _SMALL:
            getattr(self, name).update(getattr(other, name))
        self.splice_sessions += other.splice_sessions
        self.handshake.add(other.handshake)
        self.connect.add(other.connect)
        if gauges:
            self.sessions_active += other.sessions_active
            self.lookups_in_flight += other.lookups_in_flight

    def to_json(self, named: set[str]) -> dict[str, Any]:
        """A report for :meth:`from_json`. ``named``: the users given a
        series of their own so far (kept by the caller, for the process's
        life): a new name joins while there are fewer than MAX_USERS, any
        other is counted as "-" from then on, so a series once reported
        never shrinks, and the report stays within the bounds."""
        users: dict[str, int] = {}

        def user(name: str) -> int:
            if name != "-" and name not in named:
                if (len(named) < MAX_USERS
                        and len(name.encode("utf-8", "surrogatepass")) <= MAX_USER_LABEL):
                    named.add(name)
                else:
                    name = "-"
            return users.setdefault(name, len(users))

        sessions: Counter[tuple[str, str, str, int]] = Counter()
        for (version, command, outcome, who), n in self.sessions.items():
            sessions[(version, command, outcome, user(who))] += n
        moved: Counter[tuple[str, int]] = Counter()
        for (direction, who), n in self.bytes.items():
            moved[(direction, user(who))] += n
        report: dict[str, Any] = {
            "sessions": [[*labels, n] for labels, n in sessions.items()],
            "bytes": [[*labels, n] for labels, n in moved.items()],
            "auth_failures": dict(self.auth_failures),
            "splice_sessions": self.splice_sessions,
            "handshake": [self.handshake.counts, self.handshake.sum],
            "connect": [self.connect.counts, self.connect.sum],
            "sessions_active": self.sessions_active,
            "lookups_in_flight": self.lookups_in_flight,
            "users": list(users),
        }
        for name in _SMALL:
            report[name] = dict(getattr(self, name))
        return report

    @classmethod
    def from_json(cls, report: Any) -> Counts:
        """The counts a worker reported; ValueError for anything that is not
        what :meth:`to_json` makes within its bounds: the labels are ours
        (closed sets, short words) but for the users, and those are few and
        short."""
        if not isinstance(report, dict) or set(report) != _KEYS:
            raise ValueError("not a report of counts")
        users = report["users"]
        if not isinstance(users, list) or len(users) > MAX_USERS + 1:
            raise ValueError("users: not a list of at most MAX_USERS + 1")
        for name in users:
            if not isinstance(name, str) or not (
                    0 < len(name.encode("utf-8", "surrogatepass")) <= MAX_USER_LABEL):
                raise ValueError("users: a name empty, too long or not a string")
        if len(set(users)) != len(users):
            raise ValueError("users: a name twice")
        counts = cls()
        for item in _items(report["sessions"], 5, "sessions"):
            version, command, outcome, who, n = item
            if (version not in VERSIONS or command not in (*COMMANDS, "other")
                    or outcome not in OUTCOMES):
                raise ValueError(f"sessions: labels {str(item[:3])[:80]!r}")
            _add_once(counts.sessions, (version, command, outcome, _user(users, who)), n,
                      "sessions")
        for item in _items(report["bytes"], 3, "bytes"):
            direction, who, n = item
            if direction not in DIRECTIONS:
                raise ValueError(f"bytes: direction {str(direction)[:20]!r}")
            _add_once(counts.bytes, (direction, _user(users, who)), n, "bytes")
        counts.auth_failures = _by_word(report["auth_failures"], "auth_failures")
        if not set(counts.auth_failures) <= set(AUTH_METHODS):
            raise ValueError("auth_failures: not a method")
        for name in _SMALL:
            setattr(counts, name, _by_word(report[name], name))
        counts.splice_sessions = _count(report["splice_sessions"], "splice_sessions")
        counts.handshake = _latency(report["handshake"], "handshake")
        counts.connect = _latency(report["connect"], "connect")
        counts.sessions_active = _count(report["sessions_active"], "sessions_active")
        counts.lookups_in_flight = _count(report["lookups_in_flight"], "lookups_in_flight")
        return counts


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_COUNT:
        raise ValueError(f"{what}: {str(value)[:30]!r} is not a count")
    return value


def _items(value: Any, size: int, what: str) -> list[list[Any]]:
    # Each series at most once (see _add_once), and labels from closed sets
    # and the users list: the number of series is bounded by those.
    if not isinstance(value, list) or not all(
            isinstance(item, list) and len(item) == size for item in value):
        raise ValueError(f"{what}: not a list of {size}-item lists")
    return value


def _user(users: list[str], index: Any) -> str:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(users):
        raise ValueError(f"user {str(index)[:20]!r} is not in the users list")
    return users[index]


def _add_once(counter: Counter[Any], key: tuple[str, ...], n: Any, what: str) -> None:
    if key in counter:
        raise ValueError(f"{what}: a series twice")
    counter[key] = _count(n, what)


def _by_word(value: Any, what: str) -> Counter[str]:
    if not isinstance(value, dict) or len(value) > _MAX_SMALL:
        raise ValueError(f"{what}: not a table of at most {_MAX_SMALL}")
    counts: Counter[str] = Counter()
    for label, n in value.items():
        if not isinstance(label, str) or not _WORD.match(label):
            raise ValueError(f"{what}: label {str(label)[:50]!r}")
        counts[label] = _count(n, what)
    return counts


def _latency(value: Any, what: str) -> Latency:
    latency = Latency()
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], list)
            and len(value[0]) == len(latency.counts)):
        raise ValueError(f"{what}: not [bucket counts, sum]")
    latency.counts = [_count(n, what) for n in value[0]]
    total = value[1]
    if (isinstance(total, bool) or not isinstance(total, (int, float))
            or not math.isfinite(total) or total < 0):
        raise ValueError(f"{what}: sum {str(total)[:30]!r}")
    latency.sum = float(total)
    return latency


STATS = Stats()
