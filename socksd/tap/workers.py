"""``workers = N``: N processes serve the same listeners, supervised by the
twistd process.

The supervisor binds every listener N times with SO_REUSEPORT (in
privilegedStartService, so port 1080 or 113 can be bound before twistd drops
privileges) and hands worker i its own set of sockets: the kernel spreads
new connections over the workers by their addresses, with no thundering herd.
A worker is ``python -m socksd.tap.worker``, building the same service from
the same config and adopting its sockets. A worker that dies is restarted on
the same sockets (connections queued meanwhile wait for it); stopping the
supervisor stops them all.

The ``--auth`` checker strings (``memory:alice:secret``) reach a worker on its
stdin, a pipe the supervisor writes and closes, not on its command line:
every local user can read a process's command line (``ps``, /proc/PID/cmdline).

A worker's log events come back to the supervisor as JSON records over a
socket pair (the worker's fd 1) and are published here, so they reach
whatever twistd logs to (``-l FILE``, ``--syslog``, stdout) like the
supervisor's own. The worker never blocks on it (see socksd.tap.worker).

The identd in the supervisor answers for the workers' SOCKS users: each
worker registers its sessions' outgoing connections over a second socket
pair (socksd.ident.channel), which, unlike the log, never drops a message;
a worker's entries are cleared when it ends.

Limits are per worker: each enforces max_sessions and max_sessions_per_client
divided by N (rounded up, so no worker gets 0), so the totals hold, give or
take N-1, when the kernel spreads connections evenly, which it does for many
clients; one client's connections hash by their source ports, spread evenly
too.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Sequence

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IAddress, IProcessTransport
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from socksd.config import parse_listener
from socksd.ident.channel import RegistrationReceiver
from socksd.ident.registry import ProxiedConnections
from socksd.logs import FROM_WORKER
from socksd.twisted_internals import IReactor, installed_reactor

log = Logger(namespace="socksd")

RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
STOP_TIMEOUT = 10.0

# What jsonFileLogObserver puts before each record, and the most a worker may
# send without ending a record (a session's record is well under 2 KiB).
RECORD_SEPARATOR = b"\x1e"
MAX_RECORD = 1 << 20
# The event key carrying a logged failure's message (see _WorkerLog.publish).
FAILURE_MESSAGE = "socksd_failure_message"


def bind_reuseport(family: int, host: str, port: int, backlog: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class _WorkerLog(protocol.Protocol):
    """The supervisor's end of a worker's log channel: RS JSON NL records
    (jsonFileLogObserver's format; JSON text has no raw newline), each
    published as our own event."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.pending = b""

    def dataReceived(self, data: bytes) -> None:
        records = (self.pending + data).split(b"\n")
        self.pending = records.pop()
        if len(self.pending) > MAX_RECORD:
            log.error("worker {index}: log record over {limit} bytes dropped",
                      index=self.index, limit=MAX_RECORD)
            self.pending = b""
        for record in records:
            start = record.rfind(RECORD_SEPARATOR)
            if start >= 0:
                self.publish(record[start + 1:])
            elif record.strip():
                log.error("worker {index}: not a log record: {record!r}",
                          index=self.index, record=record[:200])

    def publish(self, record: bytes) -> None:
        try:
            event = eventFromJSON(record.decode("utf-8"))
        except Exception:
            event = None
        if not isinstance(event, dict):
            log.error("worker {index}: unreadable log record {record!r}",
                      index=self.index, record=record[:200])
            return
        failure, message = event.get("log_failure"), event.pop(FAILURE_MESSAGE, None)
        if failure is not None and message is not None:
            # JSON keeps a failure's type and frames but not its exception
            # object; the worker sent the message alongside.
            failure.value = message
        # Which worker said it, for every line (a JSON line's "worker"); the
        # text lines that name it already say wN themselves.
        event[FROM_WORKER] = self.index
        globalLogPublisher(event)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.pending.strip():
            log.warn("worker {index}: its last log record was cut short", index=self.index)
        self.pending = b""


class _WorkerLogFactory(protocol.ServerFactory):
    noisy = False

    def __init__(self, index: int) -> None:
        self.index = index

    def buildProtocol(self, addr: IAddress | None) -> _WorkerLog:
        return _WorkerLog(self.index)


class _RegistrationsFactory(protocol.ServerFactory):
    noisy = False

    def __init__(self, registry: ProxiedConnections, index: int) -> None:
        self.registry = registry
        self.index = index
        self.built: RegistrationReceiver | None = None

    def buildProtocol(self, addr: IAddress | None) -> RegistrationReceiver:
        self.built = RegistrationReceiver(self.registry, self.index)
        return self.built


class _Worker(protocol.ProcessProtocol):
    transport: IProcessTransport

    def __init__(self, supervisor: WorkersService, index: int, ready_fd: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ready_fd = ready_fd
        self.started = time.monotonic()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.ready = False            # takes a SIGHUP as a reload (before: it would end)
        self.reload_pending = False   # a reload came before it was ready
        self.registrations: RegistrationReceiver | None = None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == self.ready_fd and not self.ready:
            self.ready = True
            if self.reload_pending:
                self.reload_pending = False
                self.reload()

    def reload(self) -> None:
        if not self.ready:
            self.reload_pending = True
            return
        try:
            self.transport.signalProcess("HUP")
        except ProcessExitedAlready:
            pass   # ended: restarted with the file as it is then

    def processEnded(self, reason: Failure) -> None:
        if self.registrations is not None:
            # Its channel closes too, but not necessarily first, and may
            # still hold frames it sent before it died.
            self.registrations.worker_ended()
        self.ended.callback(None)
        self.supervisor.worker_ended(self, reason)


class WorkersService(service.Service):
    def __init__(self, count: int, listen: tuple[str, ...], worker_args: list[str],
                 reactor: IReactor | None = None, auth: Sequence[str] = (),
                 registry: ProxiedConnections | None = None) -> None:
        self.reactor = reactor if reactor is not None else installed_reactor()
        self.count = count
        self.listeners = [parse_listener(d) for d in listen]
        self.worker_args = worker_args
        self.auth = list(auth)     # --auth strings: secrets, sent on the worker's stdin
        self.registry = registry   # the identd's: workers register their sessions in it
        self.sockets: list[list[socket.socket]] = []   # per worker, per listener
        self.workers: dict[int, _Worker] = {}
        self.delays: dict[int, float] = {}
        self.stopping = False

    def privilegedStartService(self) -> None:
        for _ in range(self.count):
            row = []
            for family, host, port, backlog, _haproxy in self.listeners:
                sock = bind_reuseport(family, host, port, backlog)
                if port == 0:
                    # Port 0: the first bind picks it; the others share it.
                    port = sock.getsockname()[1]
                row.append(sock)
            if not self.sockets:
                self.listeners = [(f, h, row[i].getsockname()[1], b, hp)
                                  for i, (f, h, _p, b, hp) in enumerate(self.listeners)]
            self.sockets.append(row)
        for _family, _host, port, _backlog, haproxy in self.listeners:
            log.info("SOCKSServerFactory{proxy} starting on {port} ({n} workers)",
                     proxy=" (PROXY)" if haproxy else "", port=port, n=self.count)
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        for index in range(self.count):
            self.spawn(index)

    def spawn(self, index: int) -> None:
        if self.stopping:
            return
        sockets = self.sockets[index]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # 0: the --auth strings; 1: its log; 3...: its sockets; then the
        # pipe on which it says it is ready (for a reload's SIGHUP)
        child_fds: dict[int, int | str] = {0: "w", 1: theirs.fileno(), 2: 2}
        fds = []
        for number, (sock, (family, _h, _p, _b, haproxy)) in enumerate(
                zip(sockets, self.listeners, strict=True), start=3):
            child_fds[number] = sock.fileno()
            fds.append([number, int(family), haproxy])
        registering: list[str] = []
        pair = None
        if self.registry is not None:
            # Its identd registrations: the next descriptor after the listeners.
            pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            number = 3 + len(sockets)
            child_fds[number] = pair[1].fileno()
            registering = ["--registrations", str(number)]
        # Then the pipe on which it says it takes a reload's SIGHUP.
        ready_fd = 4 + len(sockets)
        child_fds[ready_fd] = "r"
        # -P: the working directory is not put on sys.path (a source checkout
        # there must not shadow the installed socksd); PYTHONPATH still counts.
        reactor_class = type(self.reactor)
        args = [sys.executable, "-P", "-m", "socksd.tap.worker", "--index", str(index),
                "--workers", str(self.count), "--fds", json.dumps(fds),
                "--ready-fd", str(ready_fd),
                "--reactor", f"{reactor_class.__module__}.{reactor_class.__qualname__}",
                *registering, *self.worker_args]
        worker = _Worker(self, index, ready_fd)
        self.workers[index] = worker
        try:
            self.reactor.spawnProcess(worker, sys.executable, args, env=os.environ,
                                      childFDs=child_fds)
        finally:
            theirs.close()
            if pair is not None:
                pair[1].close()
        # Written to the pipe and closed; the worker reads to EOF at start.
        worker.transport.writeToChild(0, json.dumps(self.auth).encode("utf-8"))
        worker.transport.closeStdin()
        ours.setblocking(False)
        self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX,
                                           _WorkerLogFactory(index))
        ours.close()  # Twisted made its own copy of the descriptor
        if pair is not None and self.registry is not None:
            pair[0].setblocking(False)
            registrations = _RegistrationsFactory(self.registry, index)
            self.reactor.adoptStreamConnection(pair[0].fileno(), socket.AF_UNIX, registrations)
            pair[0].close()
            worker.registrations = registrations.built
        log.info("worker {index} started (pid {pid})", index=index,
                 pid=worker.transport.pid if worker.transport else "?")

    def reload(self) -> None:
        """Each worker reads the configuration file again (SIGHUP); one
        spawned later reads it at its start."""
        for worker in self.workers.values():
            worker.reload()   # at once, or once it is ready for it

    def worker_ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.stopping:
            return
        lived = time.monotonic() - worker.started
        # Back off when a worker keeps dying at start-up.
        delay = self.delays.get(worker.index, RESTART_DELAY)
        delay = RESTART_DELAY if lived > 60 else min(delay * 2, MAX_RESTART_DELAY)
        self.delays[worker.index] = delay
        log.warn("worker {index} ended ({why}); restarting in {delay:g} s", index=worker.index,
                 why=reason.getErrorMessage(), delay=delay)
        self.reactor.callLater(delay, self.spawn, worker.index)

    def stopService(self) -> defer.Deferred[None]:
        self.stopping = True
        super().stopService()
        ended: list[defer.Deferred[None]] = []
        for worker in list(self.workers.values()):
            ended.append(worker.ended)
            try:
                worker.transport.signalProcess("TERM")
            except Exception:
                pass

        def kill_stragglers() -> None:
            for worker in list(self.workers.values()):
                try:
                    worker.transport.signalProcess("KILL")
                except Exception:
                    pass

        timer = self.reactor.callLater(STOP_TIMEOUT, kill_stragglers)

        def done(_: object) -> None:
            if timer.active():
                timer.cancel()
            for row in self.sockets:
                for sock in row:
                    sock.close()

        return defer.DeferredList(ended).addBoth(done)
