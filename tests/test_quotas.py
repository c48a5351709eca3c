"""A rule's max_sessions: the counts (socksd.proxy.quotas) and, with
workers, the supervisor keeping them for every worker over the control
channel, in memory (the worker's end and the supervisor's over
StringTransports, as tests/test_worker_channel.py wires them)."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from socksd.channel import frame
from socksd.config import load_text
from socksd.proxy.quotas import Caps, Holdings, Quotas, cap_key, describe
from socksd.rules import RuleLimits
from socksd.stats import Counts
from socksd.tap.worker import ASK_TIMEOUT
from test_worker_channel import Pair, supervisor

PER_USER = RuleLimits("web", max_sessions=1, max_sessions_per="user")


def test_a_key_counts_per_rule_user_or_client():
    rule = RuleLimits("r", max_sessions=2)
    assert cap_key(rule, "alice", "10.0.0.1") == ("r", "rule", "")
    assert cap_key(PER_USER, "alice", "10.0.0.1") == ("web", "user", "alice")
    # No proven user: counted per client address (a claimed name costs nothing).
    assert cap_key(PER_USER, None, "10.0.0.1") == ("web", "user", "- 10.0.0.1")
    per_client = RuleLimits("r", max_sessions=2, max_sessions_per="client")
    assert cap_key(per_client, "alice", "2001:db8::/64") == ("r", "client", "2001:db8::/64")
    assert describe(PER_USER) == "rule web: max_sessions (1 per user) reached"


def test_local_tickets_are_given_back_once():
    quotas = Quotas()
    first = quotas.take(PER_USER, "alice", None)
    assert first is not None and not isinstance(first, defer.Deferred)
    assert quotas.take(PER_USER, "alice", None) is None
    assert quotas.take(PER_USER, "bob", None) is not None
    first.release()
    first.release()      # once only: bob's place is not given back with it
    assert quotas.caps.open == {("web", "user", "bob"): 1}


def test_holdings_of_an_ended_worker_go_back():
    caps = Caps()
    one, two = Holdings(caps), Holdings(caps)
    key = ("r", "rule", "")
    assert one.take(key, 3) and one.take(key, 3) and two.take(key, 3)
    assert not two.take(key, 3)
    two.give_back(("other", "rule", ""))     # not one of its places: ignored
    one.clear()
    assert caps.open == {key: 1}


SUPERVISOR_CONFIG = """
[[rules]]
name = "web"
action = "allow"
max_sessions = 1
max_sessions_per = "user"
rate = 1000
rate_per = "rule"
"""


def pair() -> tuple[Pair, Quotas]:
    service = supervisor()
    # The caps and rates are the supervisor's configuration's, not the worker's word.
    service.config = load_text(SUPERVISOR_CONFIG, "socksd.toml")
    p = Pair(service, 0, Counts())
    quotas = Quotas()
    quotas.asker = p.down
    return p, quotas


def test_a_worker_asks_the_supervisor_who_counts_every_worker():
    p, quotas = pair()
    other = Pair(p.supervisor, 1, Counts())
    asked = quotas.take(PER_USER, "alice", None)
    assert isinstance(asked, defer.Deferred) and not asked.called
    p.to_supervisor()
    p.to_worker()
    ticket = asked.result
    assert ticket is not None
    # The other worker's ask for alice is refused: one place, every worker's.
    other_quotas = Quotas()
    other_quotas.asker = other.down
    refused = other_quotas.take(PER_USER, "alice", None)
    other.to_supervisor()
    other.to_worker()
    assert refused.result is None
    ticket.release()
    p.to_supervisor()
    assert p.supervisor.caps.open == {}


def test_an_answer_after_the_session_ended_gives_the_place_back():
    p, quotas = pair()
    asked = quotas.take(PER_USER, "alice", None)
    assert isinstance(asked, defer.Deferred)
    asked.addErrback(lambda f: f.trap(defer.CancelledError))
    asked.cancel()                     # the client left while the supervisor counted
    p.to_supervisor()
    assert p.supervisor.caps.open == {("web", "user", "alice"): 1}
    p.to_worker()                      # granted, too late: given back
    p.to_supervisor()
    assert p.supervisor.caps.open == {}


def test_a_supervisor_that_does_not_answer_refuses_in_time():
    p, quotas = pair()
    asked = quotas.take(PER_USER, "alice", None)
    p.supervisor.reactor.advance(ASK_TIMEOUT)
    assert asked.called and asked.result is None


def test_a_channel_that_closes_refuses_the_asks_waiting():
    p, quotas = pair()
    asked = quotas.take(PER_USER, "alice", None)
    p.down.connectionLost(None)
    assert asked.called and asked.result is None


def test_a_worker_that_ends_gives_back_its_places():
    p, quotas = pair()
    quotas.take(PER_USER, "alice", None)
    p.to_supervisor()
    assert p.supervisor.caps.open
    p.crash()
    assert p.supervisor.caps.open == {}


@pytest.mark.parametrize("message", [
    ["take", 1, "r", "rule", "", -1],
    ["take", "x", "r", "rule", "", 1],
    ["take", 1, "r", "everyone", "", 1],
    ["take", 1, "r", 5, "", 1],
    ["give", "r", "rule"],
    ["give", "r", "rule", "x" * 5000],
])
def test_a_malformed_ask_breaks_the_channel(message):
    p, _quotas = pair()
    p.up.dataReceived(frame(message))
    assert p.up.broken


def test_an_answer_to_no_ask_breaks_the_workers_channel():
    p, _quotas = pair()
    p.down.dataReceived(frame(["granted", 7, True]))
    assert p.down.broken


def test_rate_shares_split_a_budget_by_the_workers_sessions():
    from socksd.proxy.quotas import RateShares

    told: list[tuple[int, tuple, float]] = []
    shares = RateShares(lambda worker, key, rate: told.append((worker, key, rate)))
    key = ("web", "rule", "")
    shares.joined(0, key, 1000.0)
    assert told == [(0, key, 1000.0)]          # alone: the whole rate
    shares.joined(1, key, 1000.0)
    shares.joined(1, key, 1000.0)
    assert told[-2:] == [(0, key, 1000 / 3), (1, key, 2000 / 3)]
    told.clear()
    shares.worker_ended(1)
    assert told == [(0, key, 1000.0)]
    shares.left(0, key)
    shares.left(0, key)                         # one it never had: ignored
    assert shares.sessions == {} and shares.given == {}


def test_a_workers_shared_budget_runs_at_the_share_it_is_told():
    from twisted.internet.task import Clock

    from socksd.proxy.quotas import Budgets

    p, _quotas = pair()
    other = Pair(p.supervisor, 1, Counts())
    budgets = [Budgets(), Budgets()]
    for b, end in zip(budgets, (p, other), strict=True):
        b.workers, b.sharing = 2, end.down
        end.down.budgets = b
    limits = RuleLimits("web", rate=1000, rate_per="rule")
    clock = Clock()
    first = budgets[0].lease(clock, limits, None, None)
    assert first.up.rate == 500                 # a worker's first: rate / workers
    p.to_supervisor()
    p.to_worker()
    assert first.up.rate == 1000                # the only session of the rule's
    second = budgets[1].lease(clock, limits, None, None)
    other.to_supervisor()
    p.to_worker()
    other.to_worker()
    assert first.up.rate == first.down.rate == second.up.rate == 500
    second.release()
    other.to_supervisor()
    p.to_worker()
    assert first.up.rate == 1000 and budgets[1].shared == {}


def test_the_supervisor_takes_the_cap_from_its_own_config_not_the_workers():
    p, _quotas = pair()
    p.up.dataReceived(frame(["take", 1, "web", "user", "alice", 10**9]))
    p.up.dataReceived(frame(["take", 2, "web", "user", "alice", 10**9]))
    p.up.dataReceived(frame(["take", 3, "nosuchrule", "rule", "", 10**9]))
    p.up.dataReceived(frame(["take", 4, "web", "client", "10.0.0.1", 10**9]))
    answers = p.up.transport.value()
    assert answers.count(b'"granted",1,true') == 1
    for ident in (2, 3, 4):
        assert f'"granted",{ident},false'.encode() in answers


def test_a_worker_cannot_join_a_budget_the_config_does_not_have():
    p, _quotas = pair()
    p.up.dataReceived(frame(["join", "nosuchrule", "rule", ""]))
    p.up.dataReceived(frame(["join", "web", "user", "x"]))     # web's rate is per rule
    assert p.supervisor.shares.sessions == {}
    p.up.dataReceived(frame(["join", "web", "rule", ""]))
    assert p.supervisor.shares.rates == {("web", "rule", ""): 1000}   # the config's rate


def test_a_worker_that_asks_and_never_reads_breaks_its_channel(monkeypatch):
    from socksd.tap import workers

    monkeypatch.setattr(workers, "MAX_UNREAD_ANSWERS", 3)
    p, _quotas = pair()
    p.up.pauseProducing()           # the worker reads nothing: the answers queue
    for ident in range(3):        # three answers wait: the bound
        p.up.dataReceived(frame(["take", ident, "web", "user", f"u{ident}", 1]))
    assert not p.up.broken
    p.up.dataReceived(frame(["take", 9, "web", "user", "u9", 1]))
    assert p.up.broken
