"""Stopping in order (README: Stopping): on SIGTERM (or SIGINT) socksd
stops accepting, tells systemd ``STOPPING=1``, lets the open sessions
finish for up to ``[server] drain_timeout`` seconds, closes those left
with outcome ``shutdown``, and exits 0. A second signal ends it at once.

The reactor's stop is where it starts: twistd stops the application's
services in the reactor's "before shutdown" phase and waits for the
Deferreds their ``stopService`` return, and a drain is one of those. A
worker (socksd.tap.worker), which runs its reactor itself, drains from its
own "before shutdown" trigger, with the same :class:`Drain` and
:class:`Stopping`.
"""

from __future__ import annotations

import functools
import signal
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from socksd.proxy import SOCKSServerFactory
from socksd.twisted_internals import IReactor, exit_cleanly, installed_reactor

log = Logger(namespace="socksd")

# Once the sessions left are closed, each ends on the reactor's next turn
# (an aborted connection is lost then); this bounds the wait all the same.
ABORT_WAIT = 1.0


class Stopping:
    """This process's stop signals. The first SIGTERM or SIGINT does what
    the reactor does with it (a line, then the reactor stops, and the
    drain begins); the next one ends the drain at once: whoever sends a
    second wants the process gone now. So does :meth:`now`, for the stops
    a signal does not ask for (a worker's supervisor asks over its
    channel)."""

    def __init__(self, reactor: IReactor | None = None) -> None:
        self.reactor = reactor if reactor is not None else installed_reactor()
        self.signals = 0
        self.began = False                 # the drain has begun
        self.at_once: str | None = None    # why it ends at once, once it must
        self.cut: Callable[[str], None] | None = None

    def install(self) -> None:
        """Take SIGTERM and SIGINT over from the reactor, which installs its
        handlers as it starts running (call this once it runs) and puts
        back what it found as it ends. A signal it leaves alone stays so."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if callable(previous):
                signal.signal(signum, functools.partial(self._signalled, previous))

    def _signalled(self, previous: Callable[[int, Any], Any], signum: int, frame: Any) -> None:
        # Runs between two bytecodes of whatever the reactor thread was
        # doing: the work is done on the reactor's own turn.
        self.signals += 1
        if self.signals > 1:
            self.reactor.callFromThread(self.now, f"a second {signal.Signals(signum).name}")
        elif not self.began:
            previous(signum, frame)        # the reactor's: "Received SIGTERM", then stop
        # else: stopping already (a worker its supervisor told): this one
        # asks for what is under way.

    def now(self, why: str) -> None:
        """End the drain at once: the one under way, or the one to come."""
        if self.at_once is not None:
            return
        self.at_once = why
        if self.cut is not None:
            self.cut(why)

    def draining(self, cut: Callable[[str], None]) -> None:
        """A drain has begun; ``cut(why)`` ends it at once."""
        self.began = True
        self.cut = cut
        if self.at_once is not None:
            cut(self.at_once)


class Drain:
    """A stop's wait for the sessions of ``listener``: :meth:`start` fires
    once they have all ended. Those still open ``drain_timeout`` seconds
    after it (the one the listener serves under at the stop), or when
    :meth:`cut` is called, are closed with outcome ``shutdown``, and waited
    for ABORT_WAIT at most. Waits are Deferreds fired by the sessions'
    ends, never a poll."""

    def __init__(self, listener: SOCKSServerFactory, reactor: IReactor | None = None) -> None:
        self.listener = listener
        self.reactor = reactor if reactor is not None else installed_reactor()
        self.done: defer.Deferred[None] | None = None
        self.timer: IDelayedCall | None = None
        self.why: str | None = None        # why the sessions left were closed

    def start(self) -> defer.Deferred[None]:
        """Wait for the open sessions (the listeners no longer accept)."""
        if self.done is not None:
            return self.done
        done: defer.Deferred[None] = defer.Deferred()
        self.done = done
        listener = self.listener
        count = len(listener.counts.live)
        if self.why is not None:
            self._close(self.why)              # cut before it began
        elif count:
            timeout = listener.limits.drain_timeout
            # Formatted here: a worker's line reaches the supervisor as JSON,
            # its fields flattened with str(), format specs dropped.
            log.info("{prefix}stopping: no new sessions; {count} open, closed in {timeout} s "
                     "unless they end before", prefix=listener.prefix, worker=listener.worker,
                     count=count, timeout=f"{timeout:g}")
            self.timer = self.reactor.callLater(timeout, self.cut,
                                                f"drain_timeout ({timeout:g} s) passed")
        listener.drained().addCallback(self._over)
        return done

    def cut(self, why: str) -> None:
        """Close the sessions still open now."""
        if self.why is not None:
            return
        self.why = why
        if self.done is not None:
            self._close(why)

    def _close(self, why: str) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        listener = self.listener
        count = len(listener.counts.live)
        if not count:
            return
        log.warn("{prefix}stopping: closing the {count} session(s) still open: {why}",
                 prefix=listener.prefix, worker=listener.worker, count=count, why=why)
        listener.shut_down(why)
        self.timer = self.reactor.callLater(ABORT_WAIT, self._gave_up)

    def _gave_up(self) -> None:
        listener = self.listener
        log.error("{prefix}stopping: {count} session(s) still open {wait} s after they were "
                  "closed; stopping without them", prefix=listener.prefix,
                  worker=listener.worker, count=len(listener.counts.live),
                  wait=f"{ABORT_WAIT:g}")
        self._over(None)

    def _over(self, _: object) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if self.done is not None and not self.done.called:
            self.done.callback(None)


class Draining(service.MultiService):
    """The SOCKS service (the listeners, or the workers) and what serves on
    while its sessions drain: its other children, the embedded identd (an
    IRC server asks about a session's connection whenever it likes, and a
    closed identd would name nobody) and the metrics endpoint (a scrape
    shows the drain).

    Stopped in order: ``socks`` first (no new sessions; with workers, each
    worker drains its own), then ``drain()`` (the sessions of this
    process's listeners), then the other children; then the process exits
    0. ``cut(why)`` ends the drain at once (a second signal)."""

    def __init__(self, socks: service.IService, drain: Callable[[], defer.Deferred[None]],
                 cut: Callable[[str], None], reactor: IReactor | None = None) -> None:
        super().__init__()
        self.reactor = reactor if reactor is not None else installed_reactor()
        self.socks = socks
        self.drain = drain
        self.cut = cut
        self.stopping = Stopping(self.reactor)
        socks.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self.stopping.install)

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        stopped = defer.maybeDeferred(self.socks.stopService)
        stopped.addErrback(self._failed, "stopping the SOCKS listeners")
        stopped.addCallback(lambda _: self.drain())
        self.stopping.draining(self.cut)
        stopped.addErrback(self._failed, "waiting for the sessions")

        def rest(_: object) -> defer.Deferred[Any]:
            others = [child for child in reversed(list(self)) if child is not self.socks]
            return defer.DeferredList([defer.maybeDeferred(child.stopService)
                                       for child in others])

        def over(_: object) -> None:
            exit_cleanly(self.reactor)

        return stopped.addCallback(rest).addCallback(over)

    def _failed(self, failure: Failure, what: str) -> None:
        log.failure("stopping: {what} failed", failure, what=what)
