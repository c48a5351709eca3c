"""SIGHUP: read the configuration file again and serve under it, or keep
the running configuration and say why in one line.

:class:`Reloader` turns the signal into a call on the reactor thread;
:class:`Listeners` is the set of listen endpoints a reload changes: the
new ones bound first, all or none, then the removed ones closed (their open
sessions go on), the unchanged ones kept bound (no moment they refuse), an
``ssl:`` one with its certificate and key read again for the connections it
accepts next. A ``systemd:`` one is neither added nor removed: systemd
passes its sockets at start only.
"""

from __future__ import annotations

import errno
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from socksd.config import ConfigError, endpoint_type, tls_files_problem
from socksd.stats import STATS
from socksd.tap.listening import (
    CannotListen,
    RenewableTLS,
    Socket,
    cannot_listen,
    read,
    tls_endpoint,
)
from socksd.tap.notify import Notifier
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
                 prefix: str = "", notifier: Notifier | None = None) -> None:
        self.reload = reload
        self.reactor = reactor if reactor is not None else installed_reactor()
        self.prefix = prefix          # "wN " in a worker's lines
        self.notifier = notifier      # systemd's, told when a reload begins and ends
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
        if self.notifier is not None:
            self.notifier.reloading()
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
        if self.notifier is not None:
            self.notifier.reloaded()
        if self.again and self.running:
            self.again = False
            self.now()


class _Listening(service.Service):
    """A listen endpoint's port, bound by a reload, or as its
    :class:`Listeners` start: closed when its endpoint is removed, or they
    stop."""

    def __init__(self, port: IListeningPort | None = None) -> None:
        self.port = port
        self.binding: defer.Deferred[Any] | None = None   # at start

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self.port is None:
            if self.binding is not None:
                self.binding.cancel()        # an endpoint that binds in its own time
            return None
        return self.port.stopListening()


@dataclass
class _Endpoint:
    """A listen endpoint: what keeps it bound, what it binds (tcp: and
    ssl:), and the TLS options it serves (ssl:)."""

    service: _Listening
    socket: Socket | None
    tls: RenewableTLS | None = None

    def renew(self, socket: Socket) -> None:
        """Serve the TLS options read into ``socket``, from the next connection on."""
        assert self.tls is not None and socket.options is not None, "ssl:, read as ssl:"
        self.tls.options = socket.options
        self.socket = socket


class Listeners(service.MultiService):
    """Listen endpoints by their description, all with one factory, bound
    as the service starts: in privilegedStartService, before twistd drops
    root, as ``strports`` services bind, but keeping each port: ``started``
    is told its number (the start-up line names it: port 0 is a port once
    bound). One that cannot be bound ends the process with one line,
    ``program``'s name first (:class:`CannotListen`). An ``ssl:`` one serves
    a :class:`RenewableTLS`: a reload reads its files again."""

    def __init__(self, descriptions: Iterable[str], factory: Factory[Any],
                 reactor: IReactor | None = None, program: str = "socksd",
                 started: Callable[[str, int | None], None] | None = None) -> None:
        super().__init__()
        self.factory = factory
        self.reactor = reactor if reactor is not None else installed_reactor()
        self.program = program
        self.started = started
        self.by_description: dict[str, _Endpoint] = {}
        for description in descriptions:
            socket = read(description, factory)
            tls = RenewableTLS(socket.options) if socket is not None and \
                socket.options is not None else None
            self._add(description, _Endpoint(_Listening(), socket, tls))

    def privilegedStartService(self) -> None:
        self._bind_at_start()
        super().privilegedStartService()

    def startService(self) -> None:
        self._bind_at_start()        # if started without privilegedStartService (not by twistd)
        super().startService()

    def _bind_at_start(self) -> None:
        """Bind every endpoint not bound yet; :class:`CannotListen` for the
        first that cannot be. One that binds in its own time (a plugin's:
        Twisted's own bind at once) logs that line if it fails, as
        strports services log their failures."""
        now = True
        failed: list[tuple[str, Failure]] = []

        def bound(port: IListeningPort, description: str, listening: _Listening) -> None:
            listening.port = port
            if self.started is not None:
                # None for an address with no port (unix:).
                self.started(description, getattr(port.getHost(), "port", None))

        def not_bound(failure: Failure, description: str) -> None:
            if now:
                failed.append((description, failure))
            elif failure.check(CannotListenError, OSError):
                log.error("{program}: {line}", program=self.program,
                          line=cannot_listen(description, failure.value))
            elif not failure.check(defer.CancelledError):
                log.failure("{program}: cannot listen on {description}", failure,
                            program=self.program, description=description)

        for description, endpoint in self.by_description.items():
            listening = endpoint.service
            if listening.port is not None or listening.binding is not None:
                continue
            listening.binding = self._endpoint(description, endpoint.tls).listen(self.factory)
            listening.binding.addCallback(bound, description, listening)
            listening.binding.addErrback(not_bound, description)
        now = False
        if failed:
            description, failure = failed[0]
            if failure.check(CannotListenError, OSError):
                raise CannotListen(self.program, description, failure.value)
            failure.raiseException()

    def _endpoint(self, description: str, tls: RenewableTLS | None) -> IStreamServerEndpoint:
        """The endpoint that binds ``description`` on the reactor (an
        ``ssl:`` one serving ``tls``)."""
        if tls is not None:
            return tls_endpoint(description, self.reactor, tls)
        return endpoints.serverFromString(self.reactor, description)

    @property
    def descriptions(self) -> tuple[str, ...]:
        return tuple(self.by_description)

    def _add(self, description: str, endpoint: _Endpoint) -> None:
        endpoint.service.setServiceParent(self)
        self.by_description[description] = endpoint

    def bind(self, descriptions: Iterable[str]) -> defer.Deferred[Change]:
        """Read the ``ssl:`` endpoints' files again and bind the endpoints
        not bound yet. An ``ssl:`` endpoint that differs from a removed one
        only in its TLS options takes over its socket. Fires with the
        :class:`Change` that puts the new set in place, or fails with a
        ConfigError, having closed what it bound: nothing changes unless
        everything can."""
        wanted = list(dict.fromkeys(descriptions))
        change = Change(self, [d for d in self.by_description if d not in wanted])
        # A systemd: socket is passed once, at start, and Twisted closes the
        # descriptor it came on once it listens: it can be neither had again
        # nor had anew (the number may be another descriptor by now).
        added = [d for d in wanted if d not in self.by_description]
        for description in [*change.removed, *added]:
            if endpoint_type(description) == "systemd":
                what = "removed" if description in change.removed else "added"
                return defer.fail(ConfigError(
                    f"{description!r}: {what}, but systemd passes its sockets at start only: "
                    "restart for this change"))
        binding: list[tuple[str, Socket | None]] = []
        try:
            for description in wanted:
                kept = self.by_description.get(description)
                if kept is not None and kept.tls is None:
                    continue          # bound, with no files to read again
                socket = self._read(description)
                running = description if kept is not None else change.same_socket(socket)
                if running is not None and socket is not None:
                    change.renew(running, description, socket)
                else:
                    binding.append((description, socket))
        except ConfigError:
            return defer.fail()
        listening = [defer.maybeDeferred(self._listen, description, socket, change)
                     for description, socket in binding]

        def bound(results: list[tuple[bool, Any]]) -> Change:
            failed = [(description, socket, result) for (description, socket), (ok, result)
                      in zip(binding, results, strict=True) if not ok]
            if failed:
                change.cancel()
                raise ConfigError(self._cannot_listen(change, *failed[0]))
            return change

        return defer.DeferredList(listening, consumeErrors=True).addCallback(bound)

    def _read(self, description: str) -> Socket | None:
        """What ``description`` binds, its files read now, or a ConfigError
        naming it and what is wrong."""
        try:
            socket = read(description, self.factory)
            if socket is not None and socket.options is not None:
                # Else OpenSSL would load dhParameters, and check the key
                # against the certificate, at each connection.
                socket.options.getContext()
        except Exception as e:    # OSError, pyOpenSSL's errors, Twisted's for a key or chain
            raise ConfigError(f"{description!r}: {tls_files_problem(e)}") from None
        return socket

    def _listen(self, description: str, socket: Socket | None,
                change: Change) -> defer.Deferred[None]:
        """Bind ``description``, for ``change``."""
        tls = RenewableTLS(socket.options) if socket is not None and \
            socket.options is not None else None

        def bound(port: IListeningPort) -> None:
            change.added[description] = _Endpoint(_Listening(port), socket, tls)

        listening: defer.Deferred[IListeningPort] = self._endpoint(description, tls).listen(
            self.factory)
        return listening.addCallback(bound)

    def _cannot_listen(self, change: Change, description: str, socket: Socket | None,
                       why: Failure) -> str:
        """The reload's line for an endpoint it could not bind."""
        error = why.value
        if socket is not None and isinstance(error, CannotListenError) and \
                error.socketError.errno == errno.EADDRINUSE:
            holder = next((d for d in change.removed if socket.port and
                           (held := self.by_description[d].socket) is not None and
                           held.port == socket.port), None)
            if holder is not None:
                # Changed on the port it keeps: the new one could be bound
                # only once the old one is closed, refusing clients meanwhile.
                return (f"cannot listen on {description}: port {socket.port} is still bound for "
                        f"{holder}, which it replaces; on a port it keeps, a reload changes "
                        "only an ssl: endpoint's certificate and key files: restart socksd for "
                        "this change")
        return cannot_listen(description, error)


class Change:
    """What a reload changes of a set of listeners: the endpoints it bound,
    the ``ssl:`` ones' new TLS options, and the endpoints it will close."""

    def __init__(self, listeners: Listeners, removed: list[str]) -> None:
        self.listeners = listeners
        self.added: dict[str, _Endpoint] = {}
        # description -> (the running endpoint whose socket it keeps, what it read)
        self.renewed: dict[str, tuple[str, Socket]] = {}
        self.removed = removed

    def renew(self, running: str, description: str, socket: Socket) -> None:
        """``description`` keeps ``running``'s socket, with the TLS options read into ``socket``."""
        self.renewed[description] = (running, socket)
        if running != description:
            self.removed.remove(running)

    def same_socket(self, socket: Socket | None) -> str | None:
        """A removed ``ssl:`` endpoint bound as ``socket`` is, whose socket a
        new one can take over."""
        if socket is None or socket.options is None:
            return None
        return next((d for d in self.removed
                     if self.listeners.by_description[d].socket == socket), None)

    def apply(self) -> None:
        """The new set is in place: the ``ssl:`` endpoints serve their new
        options to the connections they accept next; the removed endpoints
        stop accepting (their open sessions go on)."""
        listeners = self.listeners
        for description, endpoint in self.added.items():
            listeners._add(description, endpoint)
        for description, (running, socket) in self.renewed.items():
            endpoint = listeners.by_description.pop(running)
            listeners.by_description[description] = endpoint
            endpoint.renew(socket)
        for description in self.removed:
            listeners.by_description.pop(description).service.disownServiceParent()

    def cancel(self) -> None:
        """Close what was bound; nothing else has changed yet."""
        for endpoint in self.added.values():
            endpoint.service.stopService()
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
