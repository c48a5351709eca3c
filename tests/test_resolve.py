"""Name lookups in flight are bounded per client and in total, and count
until the resolver really finishes (getaddrinfo in the reactor's thread pool
cannot be cancelled), not until the session gives up on them."""

from __future__ import annotations

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.logger import capturedLogs

from fakes import Client, failure_reply, make_factory, session_lines, socks5_client
from socksd.proxy import Limits, connect
from socksd.rules import RuleSet, compile_rule

PER_CLIENT = connect.MAX_LOOKUPS_PER_CLIENT
ALICE = IPv4Address("TCP", "192.0.2.10", 40000)
BOB = IPv4Address("TCP", "192.0.2.20", 40000)


def connect_name(name: str, port: int = 80) -> bytes:
    """A SOCKS5 CONNECT to name:port."""
    raw = name.encode()
    return b"\x05\x01\x00\x03" + bytes((len(raw),)) + raw + port.to_bytes(2, "big")


def factory_for_anyone(timeout: float = 3.0):
    rules = RuleSet([compile_rule("anyone", "allow")])
    return make_factory(rules=rules, limits=Limits(connect_timeout=timeout))


def start_lookups(factory, peer, count: int, prefix: str = "slow") -> list[Client]:
    clients = []
    for i in range(count):
        client = socks5_client(factory, connect_name(f"{prefix}{i}.example"), peer=peer)
        assert client.take() == b"" and not client.closing, "no lookup started"
        clients.append(client)
    return clients


def assert_refused_at_once(factory, peer, detail: str, request=None) -> None:
    resolver = factory.reactor.nameResolver
    asked = len(resolver.queries)
    with capturedLogs() as events:
        client = socks5_client(factory, request or connect_name("one-more.example"), peer=peer)
        assert client.take() == failure_reply(0x04)
        assert client.closing
        client.lose()
    assert len(resolver.queries) == asked, "a lookup over the bound was started"
    [line] = session_lines(events)
    assert detail in line


def test_lookups_per_client_are_bounded():
    factory, reactor = factory_for_anyone()
    start_lookups(factory, ALICE, PER_CLIENT)
    assert_refused_at_once(factory, ALICE, "too many name lookups in flight for this client")


def test_timed_out_lookup_still_counts_until_it_finishes():
    factory, reactor = factory_for_anyone(timeout=3.0)
    resolver = reactor.nameResolver
    clients = start_lookups(factory, ALICE, PER_CLIENT)
    reactor.advance(3.1)
    for client in clients:
        assert client.take() == failure_reply(0x04), "the lookup did not time out"
        client.lose()
    # The sessions gave up, but the lookups (getaddrinfo in a thread) go on.
    assert_refused_at_once(factory, ALICE, "too many name lookups in flight for this client")
    # One really finishes: one new lookup may start, and no more.
    resolver.answer("192.0.2.80", index=0)
    start_lookups(factory, ALICE, 1, prefix="again")
    assert_refused_at_once(factory, ALICE, "too many name lookups in flight for this client")


def test_client_that_leaves_at_once_still_holds_its_lookup():
    """Resets free the session slot at once; the lookup stays counted."""
    factory, reactor = factory_for_anyone()
    for client in start_lookups(factory, ALICE, PER_CLIENT):
        client.lose()
    assert factory.sessions == 0
    assert_refused_at_once(factory, ALICE, "too many name lookups in flight for this client")
    for i in range(PER_CLIENT):
        reactor.nameResolver.answer(index=i)       # "not found", long after
    start_lookups(factory, ALICE, PER_CLIENT, prefix="later")


def test_another_client_is_not_affected():
    factory, reactor = factory_for_anyone()
    resolver = reactor.nameResolver
    for client in start_lookups(factory, ALICE, PER_CLIENT):
        client.lose()
    assert_refused_at_once(factory, ALICE, "for this client")
    bob = socks5_client(factory, connect_name("www.example"), peer=BOB)
    assert resolver.names[-1] == "www.example"
    resolver.answer("192.0.2.80")
    [(host, port, _factory, _timeout, _bind)] = reactor.tcpClients
    assert (host, port) == ("192.0.2.80", 80)
    assert not bob.closing


def test_total_lookups_are_bounded():
    factory, reactor = factory_for_anyone()
    total = connect.MAX_LOOKUPS
    peers = [IPv4Address("TCP", f"192.0.2.{100 + i}", 40000) for i in range(total)]
    for peer in peers:
        start_lookups(factory, peer, 1)
    assert_refused_at_once(factory, BOB, f"too many name lookups in flight ({total})")
    reactor.nameResolver.answer(index=0)
    start_lookups(factory, BOB, 1)


def test_socks4a_over_the_bound_gets_91():
    factory, reactor = factory_for_anyone()
    start_lookups(factory, ALICE, PER_CLIENT)
    client = Client(factory, peer=ALICE)
    client.send(b"\x04\x01\x00\x50\x00\x00\x00\x01fred\x00one-more.example\x00")
    assert client.take() == b"\x00\x5b\x00\x00\x00\x00\x00\x00"
    assert client.closing
    assert len(reactor.nameResolver.queries) == PER_CLIENT


# resolve() itself.


class RaisingResolver:
    def resolveHostName(self, receiver, name, port=0, addressTypes=None,
                        transportSemantics="TCP"):
        raise RuntimeError("broken resolver")


def test_resolver_that_raises_releases_its_count():
    factory, reactor = factory_for_anyone()
    reactor.nameResolver = RaisingResolver()
    for _ in range(connect.MAX_LOOKUPS + 1):
        d = connect.resolve(reactor, "x.example", 80, 3.0, "192.0.2.10")
        failure = []
        d.addErrback(failure.append)
        assert failure[0].check(RuntimeError)
    assert connect.lookups(reactor).total == 0


def test_counts_are_per_reactor_and_emptied():
    factory, reactor = factory_for_anyone()
    d = connect.resolve(reactor, "x.example", 80, 3.0, "192.0.2.10")
    counts = connect.lookups(reactor)
    assert (counts.total, counts.clients) == (1, {"192.0.2.10": 1})
    other, _ = factory_for_anyone()
    assert connect.lookups(other.reactor).total == 0
    failures = []
    d.addErrback(failures.append)
    reactor.nameResolver.answer()
    assert (counts.total, counts.clients) == (0, {})
    assert failures[0].check(error.DNSLookupError)
