"""SIGHUP: read the configuration file again and serve under it, or keep
the running configuration and say why in one line.

:class:`Reloader` turns the signal into a call on the reactor thread;
:class:`Listeners` is the set of listen endpoints a reload changes: the
new ones bound first, all or none, then the removed ones closed (their open
sessions go on), the unchanged ones untouched (no moment they refuse).
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Iterable

from twisted.application import service, strports
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from socksd.config import ConfigError
from socksd.stats import STATS
from socksd.twisted_internals import IReactor, installed_reactor

log = Logger(namespace="socksd")

FAILED = "reload failed, kept the running configuration: {error}"

_held: list[int] = []     # SIGHUPs before a Reloader took over


def hold_sighup() -> None:
    """From here on a SIGHUP never ends the process: one that comes before
    the reactor runs (systemd's ExecReload right after the start) is kept
    and made a reload once a :class:`Reloader` starts."""
    signal.signal(signal.SIGHUP, lambda signum, frame: _held.append(signum))


class Reloader(service.Service):
    """Calls ``reload`` on SIGHUP. ``reload`` returns (or fires with) the
    line that says what now runs; a :class:`ConfigError` keeps the running
    configuration, and so does anything else, with its traceback. The
    process never ends for a reload."""

    def __init__(self, reload: Callable[[], Any], reactor: IReactor | None = None,
                 prefix: str = "") -> None:
        self.reload = reload
        self.reactor = reactor if reactor is not None else installed_reactor()
        self.prefix = prefix          # "wN " in a worker's lines
        self.running_reload: defer.Deferred[None] | None = None
        self.again = False

    def startService(self) -> None:
        super().startService()
        signal.signal(signal.SIGHUP, self._signalled)
        if _held:
            _held.clear()
            self.reactor.callFromThread(self.now)

    def stopService(self) -> None:
        super().stopService()
        # A HUP while stopping is a reload nobody needs, not the end.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def _signalled(self, signum: int, frame: Any) -> None:
        # A signal handler runs between two bytecodes of whatever the
        # reactor thread was doing: do the work on the reactor's own turn.
        self.reactor.callFromThread(self.now)

    def now(self) -> defer.Deferred[None]:
        """Reload now; a HUP during a reload makes one more after it."""
        if not self.running:
            return defer.succeed(None)     # stopping: nothing to serve it
        if self.running_reload is not None:
            self.again = True
            return self.running_reload
        self.running_reload = d = defer.maybeDeferred(self.reload)
        d.addCallbacks(self._done, self._failed)
        d.addBoth(self._next)   # at once, if the reload was synchronous
        return d

    def _done(self, summary: str) -> None:
        STATS.reloads["ok"] += 1
        log.info("{prefix}reloaded {summary}", prefix=self.prefix, summary=summary)

    def _failed(self, failure: Failure) -> None:
        STATS.reloads["failed"] += 1
        if failure.check(ConfigError):
            log.error("{prefix}" + FAILED, prefix=self.prefix, error=failure.getErrorMessage())
        else:
            log.failure("{prefix}" + FAILED, failure, prefix=self.prefix,
                        error=failure.getErrorMessage())

    def _next(self, _: object) -> None:
        self.running_reload = None
        if self.again and self.running:
            self.again = False
            self.now()


class _Listening(service.Service):
    """A port a reload bound: closed when its endpoint is removed."""

    def __init__(self, port: IListeningPort) -> None:
        self.port = port

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        return self.port.stopListening()


class Listeners(service.MultiService):
    """Listen endpoints by their description, all with one factory. At
    start-up each is a ``strports`` service (bound in privilegedStartService,
    before twistd drops root)."""

    def __init__(self, descriptions: Iterable[str], factory: Factory[Any],
                 reactor: IReactor | None = None) -> None:
        super().__init__()
        self.factory = factory
        self.reactor = reactor if reactor is not None else installed_reactor()
        self.by_description: dict[str, service.IService] = {}
        for description in descriptions:
            self._add(description, strports.service(description, factory))

    @property
    def descriptions(self) -> tuple[str, ...]:
        return tuple(self.by_description)

    def _add(self, description: str, child: service.IService) -> None:
        child.setServiceParent(self)
        self.by_description[description] = child

    def bind(self, descriptions: Iterable[str]) -> defer.Deferred[Change]:
        """Bind the endpoints not bound yet. Fires with the :class:`Change`
        that puts the new set in place, or fails with a ConfigError, having
        closed what it bound: nothing changes unless everything can."""
        wanted = list(dict.fromkeys(descriptions))
        added = [d for d in wanted if d not in self.by_description]
        removed = [d for d in self.by_description if d not in wanted]
        listening = [endpoints.serverFromString(self.reactor, d).listen(self.factory)
                     for d in added]

        def bound(results: list[tuple[bool, Any]]) -> Change:
            change = Change(self, removed)
            for description, (ok, port) in zip(added, results, strict=True):
                if ok:
                    change.added[description] = port
            failed = [(d, result) for d, (ok, result) in zip(added, results, strict=True)
                      if not ok]
            if failed:
                change.cancel()
                description, why = failed[0]
                raise ConfigError(f"{description!r}: cannot listen: {why.getErrorMessage()}")
            return change

        return defer.DeferredList(listening, consumeErrors=True).addCallback(bound)


class Change:
    """Listeners bound for a reload, and those it will close."""

    def __init__(self, listeners: Listeners, removed: list[str]) -> None:
        self.listeners = listeners
        self.added: dict[str, IListeningPort] = {}
        self.removed = removed

    def apply(self) -> None:
        """The new set is in place; the removed endpoints stop accepting
        (their open sessions go on)."""
        listeners = self.listeners
        for description, port in self.added.items():
            listeners._add(description, _Listening(port))
        for description in self.removed:
            listeners.by_description.pop(description).disownServiceParent()

    def cancel(self) -> None:
        for port in self.added.values():
            port.stopListening()
        self.added = {}


def bind_all(wanted: list[tuple[Listeners, Iterable[str]]]) -> defer.Deferred[list[Change]]:
    """Bind every set's new endpoints, one set after the other: all or none
    (a failure cancels what the sets before it bound)."""
    changes: list[Change] = []

    def bound(change: Change) -> None:
        changes.append(change)

    def undo(failure: Failure) -> Failure:
        for change in changes:
            change.cancel()
        return failure

    def bind(_: None, listeners: Listeners, descriptions: Iterable[str]) -> defer.Deferred[None]:
        return listeners.bind(descriptions).addCallback(bound)

    d: defer.Deferred[None] = defer.succeed(None)
    for listeners, descriptions in wanted:
        d = d.addCallback(bind, listeners, descriptions)
    return d.addCallbacks(lambda _: changes, undo)
