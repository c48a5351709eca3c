"""Password checks under load (issue 13): bounded in total and per client,
never started for a client that left, in threads of their own; and the
backoff after a failed login. RFC 1929 negotiations over in-memory
transports, with socksd's own htpasswd: checker doing real bcrypt checks
whenever the test lets a "thread" run one."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading

import bcrypt
import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.logger import capturedLogs
from twisted.trial import unittest

from fakes import Client, assert_refused, make_factory, session_lines
from socksd import config
from socksd.auth import ClientUsernamePassword, SOCKSRealm
from socksd.auth.checkers import FirstOf
from socksd.auth.hashing import HashPool
from socksd.auth.methods import Backoff, UserPass
from socksd.auth.passwd import HashedPasswordFile, hash_password
from socksd.proxy import Limits
from socksd.tap import socks as tap
from socksd.wire import rfc1929

GREETING_USERPASS = b"\x05\x01\x02"
ALICE = rfc1929.encode_request(b"alice", b"secret")
ALICE_WRONG = rfc1929.encode_request(b"alice", b"wrong")
MALLORY = rfc1929.encode_request(b"mallory", b"guess")
OK, FAILED = b"\x01\x00", b"\x01\x01"


def peer(host: str, port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


class ManualThreads:
    """Stands in for the pool's threads: a check runs (for real, in the
    test's thread) only when the test says so."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, defer.Deferred]] = []
        self.done = 0

    def __call__(self, call) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((call, d))
        return d

    def finish(self) -> None:
        """Run the oldest started check that has not run yet."""
        call, d = self.calls[self.done]
        self.done += 1
        try:
            result = call()
        except Exception:
            d.errback()
        else:
            d.callback(result)


@pytest.fixture
def password_file():
    """alice:secret at bcrypt's lowest cost: the checks are real, and quick."""
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "users")
    with open(path, "wb") as f:
        f.write(b"alice:" + bcrypt.hashpw(b"secret", bcrypt.gensalt(4)) + b"\n")
    yield path
    shutil.rmtree(directory)


def userpass_server(path: str, threads: int = 4, in_flight: int = 16, per_client: int = 2,
                    backoff: Backoff | None = None, limits: Limits = Limits()):
    """A factory whose only method is userpass, checked by htpasswd:path
    through a HashPool whose threads are a ManualThreads."""
    manual = ManualThreads()
    checker = HashedPasswordFile(path)
    checker.hash_pool = HashPool(threads, in_flight, per_client, run_in_thread=manual)
    method = UserPass(Portal(SOCKSRealm(), [FirstOf([checker])]),
                      backoff if backoff is not None else Backoff(0))
    factory, reactor = make_factory(methods=[method], limits=limits)
    return factory, reactor, manual, checker.hash_pool


def login(factory, request: bytes = ALICE, host: str = "127.0.0.1", port: int = 40000,
          bytewise: bool = False) -> Client:
    client = Client(factory, bytewise, peer=peer(host, port))
    client.send(GREETING_USERPASS)
    assert client.take() == b"\x05\x02"
    client.send(request)
    return client


# Bounded work.


@pytest.mark.parametrize("bytewise", [False, True])
def test_per_client_bound_refuses_at_once_with_one_line(password_file, bytewise):
    factory, _, manual, pool = userpass_server(password_file, per_client=2)
    first = login(factory, port=40001, bytewise=bytewise)
    second = login(factory, MALLORY, port=40002, bytewise=bytewise)
    assert first.take() == second.take() == b""       # both being checked
    with capturedLogs() as events:
        third = login(factory, port=40003, bytewise=bytewise)
        assert_refused(third, FAILED)                   # at once: nothing ran yet
        third.lose()
    [line] = session_lines(events)
    assert "127.0.0.1:40003" in line and "user=alice" in line
    assert line.endswith("auth failed: busy: 2 password checks in flight for this client "
                         "(auth_in_flight_per_client)"), line
    assert len(manual.calls) == 2 and pool.total == 2
    # Another client is not refused; and once a check ends, the first may again.
    other = login(factory, host="127.0.0.2")
    assert other.take() == b"" and not other.closing
    manual.finish()
    assert first.take() == OK and not first.closing
    again = login(factory, port=40004)
    assert again.take() == b"" and not again.closing
    assert pool.clients == {"127.0.0.1": 2, "127.0.0.2": 1}


def test_total_bound(password_file):
    factory, _, manual, pool = userpass_server(password_file, threads=1, in_flight=3,
                                               per_client=2)
    waiting = [login(factory, host=host, port=port) for host, port in
               (("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.2", 1))]
    with capturedLogs() as events:
        refused = login(factory, host="127.0.0.3")
        assert_refused(refused, FAILED)
        refused.lose()
    [line] = session_lines(events)
    assert line.endswith("auth failed: busy: 3 password checks in flight (auth_in_flight)")
    assert len(manual.calls) == 1            # one thread: the others wait, unstarted
    for _ in range(3):
        manual.finish()
    assert [c.take() for c in waiting] == [OK, OK, OK]
    assert pool.total == pool.running == 0 and pool.clients == {}


def test_no_check_for_a_client_that_left(password_file):
    factory, _, manual, pool = userpass_server(password_file, threads=1, per_client=8)
    running = login(factory, port=1)
    gone = [login(factory, MALLORY, port=port) for port in (2, 3, 4)]
    assert len(manual.calls) == 1
    for client in gone:
        client.lose()                    # left before a thread took its check up
    assert pool.total == 1 and pool.dropped == 3
    manual.finish()
    assert running.take() == OK
    assert len(manual.calls) == 1        # nothing started for those who left
    late = login(factory, port=5)
    assert len(manual.calls) == 2
    manual.finish()
    assert late.take() == OK
    assert pool.started == 2


def test_a_running_check_counts_until_it_returns(password_file):
    """A thread cannot be stopped: a client that leaves during its check
    still counts against its bound until the check is over."""
    factory, _, manual, pool = userpass_server(password_file, per_client=1)
    leaving = login(factory, port=1)
    leaving.lose()
    assert pool.clients == {"127.0.0.1": 1}
    refused = login(factory, port=2)
    assert_refused(refused, FAILED)
    manual.finish()                      # its result is dropped: nobody waits
    assert leaving.take() == b""
    assert pool.clients == {}
    admitted = login(factory, port=3)
    manual.finish()
    assert admitted.take() == OK


class OwnThreadsTests(unittest.TestCase):
    """The checks have threads of their own, apart from the reactor's pool,
    where name lookups run."""

    async def test_checks_run_while_the_reactor_pool_is_busy(self):
        from twisted.internet import reactor

        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "users")
        with open(path, "wb") as f:
            f.write(b"alice:" + hash_password(b"secret") + b"\n")
        checker = HashedPasswordFile(path)
        pool = HashPool(threads=2)
        self.addCleanup(pool.stop)
        tap.use_hash_pool([checker], pool)
        release = threading.Event()
        self.addCleanup(release.set)
        for _ in range(reactor.getThreadPool().max):   # every thread there busy
            reactor.callInThread(release.wait, 60)
        check = checker.requestAvatarId(ClientUsernamePassword(b"alice", b"secret",
                                                               "127.0.0.1"))
        check.addTimeout(30, reactor)
        self.assertEqual(await check, b"alice")
        self.assertEqual(pool.started, 1)

    async def test_checks_yield_the_cpu_to_the_reactor(self):
        """Their threads are nicer than the reactor's: when both want the
        CPU, relaying and answering go first (Linux: a nice value per thread)."""
        pool = HashPool(threads=1)
        self.addCleanup(pool.stop)
        own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        theirs = await pool.run(None, lambda: os.getpriority(os.PRIO_PROCESS,
                                                             threading.get_native_id()))
        self.assertEqual(theirs, min(own + 10, 19))
        self.assertEqual(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), own)


# Backoff.


def memory_server(backoff: Backoff, limits: Limits = Limits()):
    """userpass with Twisted's memory: checker (no hashing) and a backoff."""
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
    method = UserPass(Portal(SOCKSRealm(), [FirstOf([checker])]), backoff)
    return make_factory(methods=[method], limits=limits)


def test_backoff_delays_the_next_check_from_that_address():
    factory, reactor = memory_server(Backoff(1.0, 30.0))
    with capturedLogs() as events:
        failed = login(factory, ALICE_WRONG, port=1)
        assert_refused(failed, FAILED)
        failed.lose()
    [line] = session_lines(events)
    assert line.endswith("auth failed: bad username or password (failure 1 in a row from "
                         "this address: backoff 1 s)"), line
    waiting = login(factory, port=2)
    elsewhere = login(factory, host="127.0.0.2")
    assert elsewhere.take() == OK            # another address is not held back
    reactor.advance(0.9)
    assert waiting.take() == b"" and not waiting.closing
    reactor.advance(0.2)
    assert waiting.take() == OK              # checked once the backoff is over


def test_backoff_doubles_up_to_the_maximum_and_a_success_resets_it():
    backoff = Backoff(1.0, 5.0)
    factory, reactor = memory_server(backoff)
    delays = []
    for port in range(1, 6):
        client = login(factory, ALICE_WRONG, port=port)
        assert_refused(client, FAILED)        # memory: answers at once
        delay = backoff.wait("127.0.0.1", reactor.seconds())[1]
        delays.append(delay)
        reactor.advance(delay)
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert login(factory, port=10).take() == OK
    assert backoff.failures == {}
    assert_refused(login(factory, ALICE_WRONG, port=11), FAILED)
    assert backoff.wait("127.0.0.1", reactor.seconds()) == (1, 1.0)


def test_overload_refusals_are_not_failures(password_file):
    backoff = Backoff(1.0, 30.0)
    factory, reactor, manual, _ = userpass_server(password_file, per_client=1,
                                                  backoff=backoff)
    login(factory, port=1)
    assert_refused(login(factory, port=2), FAILED)    # busy
    assert backoff.failures == {}
    manual.finish()
    assert login(factory, port=3).take() == b""        # checked at once, no backoff
    assert len(manual.calls) == 2


def test_a_backoff_past_the_handshake_timeout_is_refused_at_once():
    backoff = Backoff(20.0, 30.0)
    factory, reactor = memory_server(backoff, Limits(handshake_timeout=10.0))
    assert_refused(login(factory, ALICE_WRONG, port=1), FAILED)
    with capturedLogs() as events:
        client = login(factory, port=2)
        assert_refused(client, FAILED)
        client.lose()
    [line] = session_lines(events)
    assert line.endswith("auth failed: backoff after 1 failed login in a row from this "
                         "address: 20 s left, past the handshake timeout"), line
    assert backoff.wait("127.0.0.1", reactor.seconds()) == (1, 20.0)  # not extended


def test_a_client_that_leaves_during_its_backoff_gets_nothing_checked():
    checked = []

    class Counting(InMemoryUsernamePasswordDatabaseDontUse):
        def requestAvatarId(self, credentials):
            checked.append(credentials.username)
            return super().requestAvatarId(credentials)

    method = UserPass(Portal(SOCKSRealm(), [FirstOf([Counting(alice=b"secret")])]),
                      Backoff(1.0, 30.0))
    factory, reactor = make_factory(methods=[method])
    assert_refused(login(factory, ALICE_WRONG, port=1), FAILED)
    leaving = login(factory, port=2)
    leaving.lose()
    reactor.advance(2)
    assert checked == [b"alice"] and reactor.getDelayedCalls() == []


def test_backoff_memory_is_bounded():
    backoff = Backoff(1.0, 30.0, clients=3)
    for n in range(5):
        backoff.failed(f"10.0.0.{n}", 100.0 + n)
    assert list(backoff.failures) == ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
    # Forgotten 2 x the maximum after the last failure; a new one starts over.
    assert backoff.wait("10.0.0.4", 104.0 + 59.9) == (1, 0.0)
    assert backoff.wait("10.0.0.4", 104.0 + 60.0) == (0, 0.0)
    backoff.failed("10.0.0.9", 170.0)
    assert list(backoff.failures) == ["10.0.0.9"]
    assert backoff.failed("10.0.0.9", 171.0) == (2, 2.0)
    # Off: nothing remembered.
    off = Backoff(0)
    assert off.failed("10.0.0.1", 1.0) == (0, 0.0) and off.failures == {}


# Configuration.


def test_config_keys_defaults_and_wiring(tmp_path, password_file):
    assert (Limits().auth_threads, Limits().auth_in_flight,
            Limits().auth_in_flight_per_client, Limits().auth_failure_backoff,
            Limits().auth_failure_backoff_max, Limits().auth_failure_clients) == \
        (4, 16, 2, 1.0, 30.0, 10000)
    path = tmp_path / "socksd.toml"
    path.write_text("[server]\nmethods = [\"userpass\"]\nauth_threads = 3\nauth_in_flight = 9\n"
                    "auth_in_flight_per_client = 5\nauth_failure_backoff = 0.5\n"
                    "auth_failure_backoff_max = 8\nauth_failure_clients = 7\n")
    cfg = config.load(str(path))
    memory = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
    htpasswd = HashedPasswordFile(password_file)
    factory = tap.make_factory(cfg, [memory, htpasswd], None)
    pool = htpasswd.hash_pool
    assert (pool.threads, pool.limit, pool.per_client) == (3, 9, 5)
    assert not hasattr(memory, "hash_pool")     # no hashing, no bound
    [method] = factory.methods
    backoff = method.backoff
    assert (backoff.first, backoff.longest, backoff.clients) == (0.5, 8, 7)
    # Each of N workers gets its share.
    tap.make_factory(cfg, [htpasswd], None, share=2)
    assert (htpasswd.hash_pool.threads, htpasswd.hash_pool.limit,
            htpasswd.hash_pool.per_client) == (2, 5, 3)


@pytest.mark.parametrize("text, message", [
    ("auth_threads = 0", r":2: server.auth_threads: 0 must be at least 1"),
    ("auth_in_flight = -1", r":2: server.auth_in_flight: -1 must be at least 1"),
    ("auth_in_flight_per_client = 1.5",
     r":2: server.auth_in_flight_per_client: must be an integer, not a float"),
    ("auth_failure_backoff = -1", r":2: server.auth_failure_backoff: -1 is out of range"),
    ("auth_failure_backoff_max = 0", r":2: server.auth_failure_backoff_max: 0 is out of range"),
    ("auth_failure_clients = 0", r":2: server.auth_failure_clients: 0 must be at least 1"),
    ("auth_failure_backoff = 40", r":2: server.auth_failure_backoff: 40 s is more than "
                                  r"server.auth_failure_backoff_max \(30 s\)"),
])
def test_config_errors(tmp_path, text, message):
    path = tmp_path / "socksd.toml"
    path.write_text(f"[server]\n{text}\n")
    with pytest.raises(config.ConfigError, match=re.escape(str(path)) + message):
        config.load(str(path))
