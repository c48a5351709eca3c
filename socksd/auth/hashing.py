"""Password checks in threads of their own, bounded in total and per client.

A bcrypt or argon2 check costs tens to hundreds of milliseconds of CPU on
purpose (argon2 at its defaults also 64 MiB), and once a thread runs it, it
cannot be stopped. Handed straight to the reactor's thread pool, checks
queued without bound, ran long after their clients had left, and held up
the name lookups that share that pool. Here they get a small pool of their
own, at most so many wait or run at once (in total and per client), a
check over those bounds is refused at once, and one whose client left
before a thread took it up is never run.

A checker that hashes gets the server's pool in its ``hash_pool`` attribute
(socksd sets it on each checker that has one, including a plugin's) and
runs its slow part through :meth:`HashPool.run`; ``credentials.client``
names the client (see :class:`socksd.auth.ClientUsernamePassword`).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from functools import partial
from typing import Any, Callable

from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from socksd.inflight import PER_CLIENT, InFlight
from socksd.twisted_internals import IReactor, installed_reactor

# Defaults of [server] auth_threads, auth_in_flight, auth_in_flight_per_client.
THREADS = 4
IN_FLIGHT = 16
IN_FLIGHT_PER_CLIENT = 2
# How much nicer than the reactor's thread the checks' threads are: when
# checks and the reactor want the same CPU, relaying and answering go first.
NICENESS = 10


class _CheckThread(threading.Thread):
    """A daemon thread (a check left running must not keep the process
    alive) that runs at a lower priority than the reactor's (Linux has a
    nice value per thread; elsewhere it stays as it is)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, daemon=True, **kwargs)

    def run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                           os.getpriority(os.PRIO_PROCESS, 0) + NICENESS)
        except (AttributeError, OSError):
            pass
        super().run()


class TooManyChecks(Exception):
    """A check refused before it started. Not an UnauthorizedLogin: the
    password was never looked at, so it is no failed login (no backoff),
    and no further checker is asked (they share the bound)."""


class _Job:
    __slots__ = ("client", "call", "deferred", "started")

    def __init__(self, client: str | None, call: Callable[[], Any]) -> None:
        self.client = client
        self.call = call
        self.started = False
        self.deferred: defer.Deferred


class HashPool(InFlight):
    """Runs password checks in up to ``threads`` threads of its own.

    At most ``in_flight`` checks, and ``per_client`` of one client, are
    running or waiting for a thread; more fail at once with TooManyChecks.
    The waiting ones are kept here, in order, not in the thread pool's
    queue: cancelling the Deferred of a waiting check (its client left)
    drops it unrun. A running check cannot be stopped: cancelling only
    stops waiting for it, and it counts until its thread returns.
    """

    def __init__(self, threads: int = THREADS, in_flight: int = IN_FLIGHT,
                 per_client: int = IN_FLIGHT_PER_CLIENT, reactor: IReactor | None = None,
                 run_in_thread: Callable[[Callable[[], Any]], defer.Deferred] | None = None
                 ) -> None:
        """``run_in_thread(call)`` runs ``call`` off the reactor thread and
        fires with its result (default: this pool's own threads)."""
        super().__init__(in_flight, per_client)   # counts waiting + running checks
        self.threads = threads
        self.reactor = reactor
        self.run_in_thread = run_in_thread or self._in_own_thread
        self.threadpool: ThreadPool | None = None
        self.shutdown: object = None         # our reactor shutdown trigger
        self.running = 0
        self.waiting: deque[_Job] = deque()
        self.started = 0                     # checks ever started (for tests, benchmarks)
        self.dropped = 0                     # checks dropped unrun: their client left

    def run(self, client: str | None, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        """``f(*args)`` in a thread, counted against ``client``."""
        bound = self.full(client)
        if bound == PER_CLIENT:
            return defer.fail(TooManyChecks(
                f"busy: {self.per_client} password checks in flight for this client "
                "(auth_in_flight_per_client)"))
        if bound is not None:
            return defer.fail(TooManyChecks(
                f"busy: {self.limit} password checks in flight (auth_in_flight)"))
        job = _Job(client, partial(f, *args))
        job.deferred = defer.Deferred(partial(self._cancel, job))
        self.add(client)
        self.waiting.append(job)
        self._dispatch()
        return job.deferred

    def resize(self, threads: int, in_flight: int, per_client: int) -> None:
        """New bounds (a reload). Checks in flight run on; new ones start
        within the new bounds."""
        self.threads, self.limit, self.per_client = threads, in_flight, per_client
        if self.threadpool is not None:
            self.threadpool.adjustPoolsize(0, threads)
        self._dispatch()

    def _dispatch(self) -> None:
        while self.running < self.threads and self.waiting:
            job = self.waiting.popleft()
            job.started = True
            self.running += 1
            self.started += 1
            try:
                d = self.run_in_thread(job.call)
            except Exception:
                d = defer.fail()
            d.addBoth(self._finished, job)

    def _finished(self, result: Any, job: _Job) -> None:
        self.running -= 1
        self.remove(job.client)
        self._dispatch()
        if not job.deferred.called:          # else cancelled: nobody waits for it
            if isinstance(result, Failure):
                job.deferred.errback(result)
            else:
                job.deferred.callback(result)

    def _cancel(self, job: _Job, _d: defer.Deferred) -> None:
        if not job.started:
            self.waiting.remove(job)     # at most in_flight long
            self.dropped += 1
            self.remove(job.client)

    def _in_own_thread(self, call: Callable[[], Any]) -> defer.Deferred:
        reactor = self.reactor
        if reactor is None:
            reactor = self.reactor = installed_reactor()
        if self.threadpool is None:
            pool = ThreadPool(0, self.threads, "socksd-auth")
            pool.threadFactory = _CheckThread
            pool.start()
            self.shutdown = reactor.addSystemEventTrigger("during", "shutdown",
                                                          self._at_shutdown)
            self.threadpool = pool
        return threads.deferToThreadPool(reactor, self.threadpool, call)

    def _at_shutdown(self) -> None:
        self.shutdown = None
        self.stop()

    def stop(self) -> None:
        """Stop the threads, once the running checks end (also done at
        reactor shutdown)."""
        pool, self.threadpool = self.threadpool, None
        if pool is None:
            return
        shutdown, self.shutdown = self.shutdown, None
        if shutdown is not None and self.reactor is not None:   # set with shutdown
            self.reactor.removeSystemEventTrigger(shutdown)
        pool.stop()


_default: HashPool | None = None


def default_pool() -> HashPool:
    """The pool of a checker nobody gave one (used outside ``twistd socks``)."""
    global _default
    if _default is None:
        _default = HashPool()
    return _default
