"""What this process has done, counted for the metrics endpoint.

Every layer counts here, in plain ints and dicts: prometheus_client's own
metric objects take a lock per increment (a few microseconds, paid on every
session even when nobody scrapes). :mod:`socksd.tap.metrics` turns these
counts into prometheus_client metric families at scrape time. It imports
nothing of ours, so every layer may use it.

Label values are from closed sets (never a raw string a client sent), except
``user`` with ``[metrics] per_user``, which only verified users get.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter

# A session's outcome, as the metrics name it: a closed set, defined once.
OUTCOMES = ("ok", "denied", "auth_failed", "connect_failed", "timeout", "stalled", "refused",
            "lost", "client_error")
COMMANDS = ("connect", "bind", "udp")
_OUTCOME = {
    "ok": "ok", "denied": "denied", "denied after reload": "denied",
    "auth failed": "auth_failed", "no acceptable method": "auth_failed",
    "connect failed": "connect_failed", "bind failed": "connect_failed",
    "udp failed": "connect_failed",
    "handshake timeout": "timeout", "idle timeout": "timeout", "udp idle timeout": "timeout",
    "stalled": "stalled", "refused": "refused",
    "client closed": "lost", "connection lost": "lost",
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
                failed[method if method in ("none", "userpass", "gssapi") else "-"] += n
        return failed


STATS = Stats()
