"""The identd's registry of SOCKS users' connections (socksd.ident.registry):
each registration is removed by its own handle, the newest of a connection
answers, and a query can wait for a registration."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from socksd.ident.registry import ProxiedConnections

LOCAL, REMOTE = "127.0.0.1", "192.0.2.7"


def test_each_registration_is_removed_by_its_own_handle():
    registry = ProxiedConnections()
    old = registry.add(LOCAL, 40001, REMOTE, 6667, "alice")
    new = registry.add(LOCAL, 40001, REMOTE, 6667, "bob")      # same ports, newer
    assert registry.user_for(LOCAL, 40001, REMOTE, 6667) == "bob" and len(registry) == 2
    registry.remove(old)                 # a late retraction leaves the new entry
    assert registry.user_for(LOCAL, 40001, REMOTE, 6667) == "bob" and len(registry) == 1
    registry.remove(old)                 # twice: nothing more
    assert len(registry) == 1
    registry.remove(new)
    assert registry.user_for(LOCAL, 40001, REMOTE, 6667) is None and len(registry) == 0


def test_addresses_are_compared_as_addresses():
    registry = ProxiedConnections()
    registry.add("::ffff:127.0.0.1", 40001, "::ffff:192.0.2.7", 6667, "alice")
    assert registry.user_for(LOCAL, 40001, REMOTE, 6667) == "alice"
    assert registry.user_for("not an address", 40001, REMOTE, 6667) is None
    with pytest.raises(ValueError):
        registry.add("example.org", 1, REMOTE, 2, "alice")


def test_wait_for_fires_on_the_registration_of_that_connection_only():
    registry = ProxiedConnections()
    got: list[str] = []
    registry.wait_for(LOCAL, 40001, REMOTE, 6667).addCallback(got.append)
    registry.wait_for(LOCAL, 40001, REMOTE, 6667).addCallback(got.append)
    assert registry.waiting() == 2
    registry.add(LOCAL, 40002, REMOTE, 6667, "bob")
    assert got == []
    registry.add(LOCAL, 40001, REMOTE, 6667, "alice")
    assert got == ["alice", "alice"] and registry.waiting() == 0
    # Registered already: at once.
    assert registry.wait_for(LOCAL, 40001, REMOTE, 6667).result == "alice"


def test_a_cancelled_wait_is_forgotten():
    registry = ProxiedConnections()
    d = registry.wait_for(LOCAL, 40001, REMOTE, 6667)
    kept = registry.wait_for(LOCAL, 40001, REMOTE, 6667)
    d.cancel()
    assert registry.waiting() == 1
    failures: list = []
    d.addErrback(failures.append)
    assert failures[0].check(defer.CancelledError)
    registry.add(LOCAL, 40001, REMOTE, 6667, "alice")
    assert kept.result == "alice"
