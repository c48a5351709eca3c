"""``workers = N``: N processes serve the same listeners, supervised by the
twistd process.

The supervisor binds every listener N times with SO_REUSEPORT (in
privilegedStartService, so port 1080 or 113 can be bound before twistd drops
privileges) and hands worker i its own set of sockets: the kernel spreads
new connections over the workers by their addresses, with no thundering herd.
A ``systemd:`` listener is the one socket systemd passed, handed to every
worker: the kernel gives each connection to one of the processes accepting
on it.
A worker is ``python -m socksd.tap.worker``, building the same service from
the same config and adopting its sockets. A worker that dies is restarted on
the same sockets (connections queued meanwhile wait for it); stopping the
supervisor stops them all: each drains its sessions (socksd.tap.drain),
told over its control channel, and is killed if it outlives its
``drain_timeout`` by STOP_MARGIN.

The ``--auth`` checker strings (``memory:alice:secret``) reach a worker on its
stdin, a pipe the supervisor writes and closes, not on its command line:
every local user can read a process's command line (``ps``, /proc/PID/cmdline).

A worker's log events come back to the supervisor as JSON records over a
socket pair (the worker's fd 1) and are published here, so they reach
whatever twistd logs to (``-l FILE``, ``--syslog``, stdout) like the
supervisor's own. The worker never blocks on it (see socksd.tap.worker).
This is the supervisor's work for every session of every worker, on the
cores the workers serve on: a record carries the message the worker made
and the fields a JSON line writes, nothing to rebuild (see
:func:`compact_event`), and a worker sends its records in batches, so the
supervisor wakes for many at a time.

Each worker has a second socket pair to the supervisor, its control
channel (socksd.channel), which, unlike the log, never drops a message:

* the identd in the supervisor answers for the workers' SOCKS users: each
  worker registers its sessions' outgoing connections over it
  (socksd.ident.channel); a worker's entries are cleared when it ends;
* the configuration a worker runs is the text the supervisor read and
  validated, never the file as the worker would find it: on its stdin at
  its start (the text the supervisor runs now, so a worker restarted after
  a reload runs the reload's), then over the channel at each reload. A
  worker ignores SIGHUP (socksd.tap.worker);
* the metrics: a scrape asks every worker for its counts and sums their
  answers (see :meth:`WorkersService.gather`);
* a worker says once that it serves (its sockets adopted): systemd is told
  the service is ready when every worker has (socksd.tap.notify);
* the word to stop: drain, then, at a second signal, end at once (see
  :meth:`_Worker.stop` for why not a signal).

A malformed frame from a worker (never sent by the code it runs: a bug,
or a corrupted process) is logged and counted, its identd entries are
cleared, and the worker is stopped and restarted with a new channel:
dropping just that frame could drop a retraction (an identd answer naming
the wrong user), and a worker the supervisor cannot trust to report, or
cannot configure, must not serve on.

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
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer, endpoints, protocol
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IAddress, IDelayedCall, IProcessTransport
from twisted.logger import Logger, LogLevel, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from socksd.channel import Malformed, frame
from socksd.config import MAX_WORKERS_CONFIG, Config, SharedListener, parse_listener
from socksd.ident.channel import RegistrationReceiver
from socksd.ident.registry import ProxiedConnections
from socksd.logs import FIELDS, FROM_WORKER
from socksd.proxy.quotas import Caps, Holdings, Key, RateShares, key_from
from socksd.rules import RuleLimits
from socksd.stats import MAX_COUNT, Counts
from socksd.tap.listening import CannotListen
from socksd.twisted_internals import IReactor, installed_reactor

log = Logger(namespace="socksd")

RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
# A worker told to end at once (its channel broke, a second signal) is
# killed if it has not ended after this long.
STOP_TIMEOUT = 10.0
# A draining worker is killed this long after its drain_timeout: time to
# close what is left, and to send its last counts (FINAL_REPORT_WAIT).
STOP_MARGIN = 5.0

# What jsonFileLogObserver puts before each record, and the most a worker may
# send without ending a record (a session's record is well under 2 KiB).
RECORD_SEPARATOR = b"\x1e"
MAX_RECORD = 1 << 20
# The event key carrying a logged failure's message (see _WorkerLog.publish).
FAILURE_MESSAGE = "socksd_failure_message"

# A scrape waits at most this long for the workers' counts (those that have
# not answered by then count with their last report).
REPORT_WAIT = 1.0
# After a worker ended, its channel is read this long at most for the
# frames still on their way (the counts a clean stop sends last).
DRAIN_WAIT = 5.0
# The largest frame a worker sends: its counts, within the bounds of
# Counts.from_json (MAX_USERS names of MAX_USER_LABEL bytes, JSON-escaped,
# and the series that can name them) with room.
MAX_REPORT = 8 << 20
# The largest frame the supervisor sends: the configuration's text (valid
# TOML escapes to at most three times its size in ASCII JSON: a 2-byte
# UTF-8 character, or a 4-byte one, becomes \uXXXX, or two) and its path.
MAX_CONFIG_FRAME = 3 * MAX_WORKERS_CONFIG + (64 << 10)


def bind_reuseport(family: int, host: str, port: int, backlog: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def bind_shared(description: str) -> socket.socket | None:
    """A socket bound where ``description`` binds for the workers, as
    :meth:`WorkersService.privilegedStartService` binds it; None for a
    ``systemd:`` one, which systemd bound."""
    listener = parse_listener(description)
    if listener.inherited:
        return None
    return bind_reuseport(listener.family, listener.host, listener.port, listener.backlog)


def inherited_socket(listener: SharedListener, reactor: IReactor) -> socket.socket:
    """The socket systemd passed for a ``systemd:`` listener, found by
    Twisted's own parser (start-up checked it: config.inherited_problem),
    taken over: the supervisor holds it for every worker it starts."""
    assert listener.inherited is not None, "a systemd: listener"
    endpoint = endpoints.serverFromString(reactor, listener.inherited)
    assert isinstance(endpoint, endpoints.AdoptedStreamServerEndpoint), "systemd:'s endpoint"
    sock = socket.socket(fileno=endpoint.fileno)
    sock.setblocking(False)
    return sock


class _WorkerLog(protocol.Protocol):
    """The supervisor's end of a worker's log channel: RS record NL (JSON
    text has no raw newline), each record published as our own event.

    A record is the worker's compact array (socksd.tap.worker.log_record),
    or, for an event with a failure, Twisted's JSON of the whole event
    (jsonFileLogObserver's format). Either way the worker says no more than
    a log line: its message and the fields a JSON line carries are taken as
    strings and numbers, checked; which worker said it is ours to add."""

    def __init__(self, index: int, closed: defer.Deferred[None] | None = None) -> None:
        self.index = index
        self.pending = b""
        self.closed = closed      # fired at its end: everything the worker wrote is read

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
        event = (compact_event(record) if record[:1] == b"[" else self.twisted_event(record))
        if event is None:
            log.error("worker {index}: unreadable log record {record!r}",
                      index=self.index, record=record[:200])
            return
        # Which worker said it, for every line (a JSON line's "worker"); the
        # text lines that name it already say wN themselves.
        event[FROM_WORKER] = self.index
        globalLogPublisher(event)

    @staticmethod
    def twisted_event(record: bytes) -> dict[str, Any] | None:
        """An event with a failure, as Twisted wrote it (eventAsJSON)."""
        try:
            event = eventFromJSON(record.decode("utf-8"))
        except Exception:
            return None
        if not isinstance(event, dict) or event.get("log_failure") is None:
            return None     # the worker sends the others compact
        when = event.get("log_time")
        if not (when is None or type(when) in (int, float) and 0 <= when <= MAX_LOG_TIME):
            return None     # no observer could write its time
        failure, message = event["log_failure"], event.pop(FAILURE_MESSAGE, None)
        if message is not None:
            # JSON keeps a failure's type and frames but not its exception
            # object; the worker sent the message alongside.
            failure.value = message
        return event

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.pending.strip():
            log.warn("worker {index}: its last log record was cut short", index=self.index)
        self.pending = b""
        if self.closed is not None and not self.closed.called:
            self.closed.callback(None)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a worker writes")


# A worker writes no NaN or Infinity (socksd.tap.worker.log_record).
_DECODER = json.JSONDecoder(parse_constant=_no_constant)
LEVELS = {level.name: level for level in LogLevel.iterconstants()}
FIELD_NAMES = frozenset(FIELDS)
_PLAIN = frozenset((str, int, float, bool))
# The latest time a record may carry (the year 5138): an observer cannot
# write a time past datetime's year 9999.
MAX_LOG_TIME = 1e11


def compact_event(record: bytes) -> dict[str, Any] | None:
    """The event of a worker's compact record ``[time, level, namespace,
    system, text, fields]`` (socksd.tap.worker.log_record), or None when it
    is not one. The message is the event's format, its braces doubled: an
    observer formats it back to the text the worker made, and a text line
    and a JSON line read the same as the worker's own would.

    Checked with as few steps as it takes (this runs for every session of
    every worker): the fields by their names and types as sets."""
    try:
        item = _DECODER.decode(record.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if type(item) is not list or len(item) != 6:
        return None
    when, level, namespace, system, text, fields = item
    if type(text) is not str or type(fields) is not dict or \
            not FIELD_NAMES.issuperset(fields) or \
            not _PLAIN.issuperset(map(type, fields.values())) or \
            not (level is None or type(level) is str and level in LEVELS) or \
            not (namespace is None or type(namespace) is str) or \
            not (system is None or type(system) is str) or \
            not (when is None or type(when) in (int, float) and 0 <= when <= MAX_LOG_TIME):
        return None
    event: dict[str, Any] = fields
    event["log_format"] = text.replace("{", "{{").replace("}", "}}")
    if when is not None:
        event["log_time"] = when
    if level is not None:
        event["log_level"] = LEVELS[level]
    if namespace is not None:
        event["log_namespace"] = namespace
    if system is not None:
        event["log_system"] = system
    return event


class _WorkerLogFactory(protocol.ServerFactory):
    noisy = False

    def __init__(self, index: int, closed: defer.Deferred[None] | None = None) -> None:
        self.index = index
        self.closed = closed

    def buildProtocol(self, addr: IAddress | None) -> _WorkerLog:
        return _WorkerLog(self.index, self.closed)


# Answers to a worker's asks (take: granted) waiting for it to read them:
# each is a session of its own waiting, so more than a process serves is no
# worker of ours.
MAX_UNREAD_ANSWERS = 65536


class _WorkerChannel(RegistrationReceiver):
    """The supervisor's end of a worker's control channel: the worker's
    identd registrations (RegistrationReceiver) and its counts come up; its
    configuration and the requests for its counts go down."""

    MAX_LENGTH = MAX_REPORT
    after_malformed = "; the worker is stopped, to be restarted with a new channel"

    def __init__(self, worker: _Worker, registry: ProxiedConnections, caps: Caps) -> None:
        super().__init__(registry, worker.index)
        self.worker = worker
        self.drain: IDelayedCall | None = None
        self.holdings = Holdings(caps)     # its sessions' places under the rules' caps

    def message_received(self, message: list[Any]) -> None:
        if message[0] == "serving" and len(message) == 1:
            self.worker.supervisor.serving(self.worker)
            return
        if message[0] == "take" and len(message) == 6:
            if len(self.queue) >= MAX_UNREAD_ANSWERS:
                # A worker that asks and never reads the answers: not the
                # code it runs (its sessions wait for each answer).
                raise Malformed(f"take: {len(self.queue)} answers unread")
            ident, limit = message[1], message[5]
            if not _sequence(ident) or not _sequence(limit):
                raise Malformed("take: not numbered, or no limit")
            key = key_from("take", message[2:5])
            # The cap is the supervisor's own configuration's, not what the
            # worker says (a worker is not trusted to set it), and a worker
            # holds no more places than a process serves sessions.
            supervisor = self.worker.supervisor
            limits = supervisor.rule_limits(key[0])
            granted = limits is not None and limits.max_sessions is not None and \
                limits.max_sessions_per == key[1] and \
                self.holdings.places() < supervisor.config.limits.max_sessions and \
                self.holdings.take(key, limits.max_sessions)
            self.send(("granted", ident), "granted", frame(["granted", ident, granted]))
            return
        if message[0] in ("join", "leave") and len(message) == 4:
            key = key_from(message[0], message[1:4])
            supervisor = self.worker.supervisor
            shares = supervisor.shares
            if message[0] == "leave":
                shares.left(self.worker.index, key)
                return
            # The rate is the supervisor's own configuration's, as a cap is.
            limits = supervisor.rule_limits(key[0])
            if limits is None or limits.rate is None or limits.rate_per != key[1] or \
                    shares.held(self.worker.index) >= supervisor.config.limits.max_sessions:
                return     # no such shared budget now (a reload dropped it), or too many
            shares.joined(self.worker.index, key, limits.rate)
            return
        if message[0] == "give" and len(message) == 4:
            self.holdings.give_back(key_from("give", message[1:4]))
            return
        if message[0] != "counts":
            super().message_received(message)
            return
        if len(message) != 3 or not _sequence(message[1]):
            raise Malformed(f"counts: a message of {len(message)} items, or not numbered")
        try:
            counts = Counts.from_json(message[2])
        except ValueError as e:
            raise Malformed(f"counts: {e}") from None
        self.worker.reported(message[1], counts)

    def malformed(self, why: str) -> None:
        if self.broken:
            return
        super().malformed(why)
        self.worker.broke()

    def worker_ended(self) -> None:
        super().worker_ended()
        # The counts a clean stop sent last may still be on their way: read
        # on until the end of the channel, for a while.
        if not self.closed:
            self.drain = self.worker.supervisor.reactor.callLater(DRAIN_WAIT, self.close)

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        if self.drain is not None and self.drain.active():
            self.drain.cancel()
        self.holdings.clear()       # its sessions ended with it
        self.worker.supervisor.shares.worker_ended(self.worker.index)
        self.worker.supervisor.retire(self.worker)


def _sequence(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and 0 <= value < MAX_COUNT


class _ChannelFactory(protocol.ServerFactory):
    noisy = False

    def __init__(self, worker: _Worker, registry: ProxiedConnections) -> None:
        self.worker = worker
        self.registry = registry

    def buildProtocol(self, addr: IAddress | None) -> _WorkerChannel:
        self.worker.channel = _WorkerChannel(self.worker, self.registry,
                                             self.worker.supervisor.caps)
        return self.worker.channel


class _Worker(protocol.ProcessProtocol):
    transport: IProcessTransport

    def __init__(self, supervisor: WorkersService, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started = time.monotonic()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.log_closed: defer.Deferred[None] = defer.Deferred()   # read to its end
        self.alive = True
        self.channel: _WorkerChannel | None = None
        self.latest: Counts | None = None   # its last report
        self.answered = -1                  # the request that report answered

    def configure(self, message: bytes) -> None:
        """Run this configuration (a frame of ["config", PATH, TEXT]); a
        worker still starting reads it once it runs."""
        if self.channel is not None:
            self.channel.send("config", "config", message)

    def ask(self, sequence: int) -> None:
        if self.channel is not None:
            self.channel.send("report", "report", frame(["report", sequence]))

    def reported(self, sequence: int, counts: Counts) -> None:
        self.latest = counts
        self.answered = max(self.answered, sequence)
        self.supervisor.answered(self)

    def broke(self) -> None:
        """Its channel broke: stop it (killed if it has not ended after
        STOP_TIMEOUT); it is restarted like any worker that ended."""
        self.supervisor.malformed_frames += 1
        self.signal("TERM")
        self.supervisor.reactor.callLater(STOP_TIMEOUT, self.signal, "KILL")

    def gone(self) -> defer.Deferred[None]:
        """Fires once the process has ended and its log is read to the end:
        the lines it wrote last, its last sessions' at a stop, are in this
        process's log before it ends too. DRAIN_WAIT after its end at most
        (whatever holds the log's other end open)."""
        gone: defer.Deferred[None] = defer.Deferred()
        timer: IDelayedCall | None = None

        def over(_: object = None) -> None:
            if timer is not None and timer.active():
                timer.cancel()
            if not gone.called:
                gone.callback(None)

        def ended(result: None) -> None:
            nonlocal timer
            timer = self.supervisor.reactor.callLater(DRAIN_WAIT, over)
            self.log_closed.addCallback(over)
            return result

        self.ended.addCallback(ended)
        return gone

    def stop(self, why: str | None) -> None:
        """Stop: drain (``why`` None), or end at once, for ``why``. Said
        over its channel, not with a signal: systemd's stop signals every
        process of the unit, a terminal's Ctrl-C every process of its
        group, so a worker may have had a signal of its own already, and a
        second one ends it at once. A worker whose channel is gone has
        stopped already, or is about to: SIGTERM all the same."""
        channel = self.channel
        if channel is not None and not channel.closed:
            channel.send(("stop", why is not None), "stop", frame(["stop", why]))
        else:
            self.signal("TERM")

    def signal(self, name: str) -> None:
        if self.alive:
            try:
                self.transport.signalProcess(name)
            except ProcessExitedAlready:
                pass

    def processEnded(self, reason: Failure) -> None:
        self.alive = False
        if self.channel is not None:
            # Its channel closes too, but not necessarily first, and may
            # still hold frames it sent before it died.
            self.channel.worker_ended()
        self.ended.callback(None)
        self.supervisor.worker_ended(self, reason)


def start_message(auth: Sequence[str], cfg: Config) -> bytes:
    """What a worker reads on its stdin at start (socksd.tap.worker.read_start):
    the --auth strings and the configuration it runs, none of it on its
    command line."""
    config = ({"path": cfg.path, "text": cfg.source}
              if cfg.path is not None and cfg.source is not None else None)
    return json.dumps({"auth": list(auth), "config": config}).encode("utf-8")


def config_message(cfg: Config) -> bytes:
    """The frame that tells a worker to run ``cfg``: the text it was parsed
    from, and its path for the messages (none: the embedded default)."""
    return frame(["config", cfg.path, cfg.source])


class WorkersService(service.Service):
    def __init__(self, count: int, listen: tuple[str, ...], worker_args: list[str],
                 reactor: IReactor | None = None, auth: Sequence[str] = (),
                 registry: ProxiedConnections | None = None,
                 config: Config | None = None,
                 started: Callable[[str, int | None], None] | None = None) -> None:
        self.reactor = reactor if reactor is not None else installed_reactor()
        self.count = count
        self.listen = listen
        self.listeners = [parse_listener(d) for d in listen]
        self.started = started      # told each listener's description and port, once bound
        self.worker_args = worker_args
        self.auth = list(auth)     # --auth strings: secrets, sent on the worker's stdin
        # The identd's: workers register their sessions in it.
        self.registry = registry if registry is not None else ProxiedConnections()
        self.config = config if config is not None else Config()   # what every worker runs
        self.sockets: list[list[socket.socket]] = []   # per worker, per listener
        # Which workers have served since the start (a restarted one too),
        # and who waits for them all (systemd's READY=1).
        self.served: set[int] = set()
        self.waiting_for_all: list[defer.Deferred[None]] = []
        self.workers: dict[int, _Worker] = {}
        self.delays: dict[int, float] = {}
        self.stopping = False
        # The metrics: the last report of each worker whose channel is
        # open, and the sum of those of the workers that ended (counters
        # never go back when a worker is restarted).
        self.reporting: set[_Worker] = set()
        self.retired = Counts()
        self.caps = Caps()      # the rules' max_sessions, for every worker
        self.shares = RateShares(self._tell_share)   # the shared rates, split between them
        self._limits_of: object = None                # the rules _limits was made from
        self._limits: dict[str, RuleLimits] = {}
        self.malformed_frames = 0
        self.sequence = 0                  # of the requests for counts
        self.waiting: set[_Worker] = set()     # not answered the one in flight yet
        self.waiters: list[defer.Deferred[None]] = []
        self.next_waiters: list[defer.Deferred[None]] = []   # came during a round
        self.round: IDelayedCall | None = None
        self.kill_timer: IDelayedCall | None = None     # at a stop

    def privilegedStartService(self) -> None:
        # systemd passed one socket for each systemd: listener: every worker
        # gets that one. The others are bound once per worker.
        inherited = {i: inherited_socket(listener, self.reactor)
                     for i, listener in enumerate(self.listeners) if listener.inherited}
        for _ in range(self.count):
            row = []
            for i, listener in enumerate(self.listeners):
                sock = inherited.get(i)
                if sock is None:
                    try:
                        sock = bind_reuseport(listener.family, listener.host, listener.port,
                                              listener.backlog)
                    except OSError as e:
                        raise CannotListen("socksd", self.listen[i], e) from None
                    if listener.port == 0:
                        # Port 0: the first bind picks it; the others share it.
                        self.listeners[i] = listener._replace(port=sock.getsockname()[1])
                row.append(sock)
            self.sockets.append(row)
        if self.started is not None:
            for i, description in enumerate(self.listen):
                self.started(description, self.sockets[0][i].getsockname()[1])
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
        control, its_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # 0: the --auth strings and the configuration; 1: its log; 3...:
        # its sockets; then its control channel.
        child_fds: dict[int, int | str] = {0: "w", 1: theirs.fileno(), 2: 2}
        fds = []
        for number, (sock, listener) in enumerate(zip(sockets, self.listeners, strict=True),
                                                  start=3):
            child_fds[number] = sock.fileno()
            fds.append([number, int(listener.family), listener.haproxy])
        channel_fd = 3 + len(sockets)
        child_fds[channel_fd] = its_control.fileno()
        # -P: the working directory is not put on sys.path (a source checkout
        # there must not shadow the installed socksd); PYTHONPATH still counts.
        reactor_class = type(self.reactor)
        args = [sys.executable, "-P", "-m", "socksd.tap.worker", "--index", str(index),
                "--workers", str(self.count), "--fds", json.dumps(fds),
                "--channel", str(channel_fd),
                "--reactor", f"{reactor_class.__module__}.{reactor_class.__qualname__}",
                *self.worker_args]
        worker = _Worker(self, index)
        self.workers[index] = worker
        try:
            self.reactor.spawnProcess(worker, sys.executable, args, env=os.environ,
                                      childFDs=child_fds)
        finally:
            theirs.close()
            its_control.close()
        # Written to the pipe and closed; the worker reads to EOF at start.
        # Not on its command line, which every local user can read.
        worker.transport.writeToChild(0, start_message(self.auth, self.config))
        worker.transport.closeStdin()
        ours.setblocking(False)
        self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX,
                                           _WorkerLogFactory(index, worker.log_closed))
        ours.close()  # Twisted made its own copy of the descriptor
        control.setblocking(False)
        self.reactor.adoptStreamConnection(control.fileno(), socket.AF_UNIX,
                                           _ChannelFactory(worker, self.registry))
        control.close()
        self.reporting.add(worker)
        log.info("worker {index} started (pid {pid})", index=index,
                 pid=worker.transport.pid if worker.transport else "?")

    def reload(self, cfg: Config) -> None:
        """Every worker runs ``cfg`` from now on (the text the supervisor
        validated), and so does every worker started later."""
        self.config = cfg
        message = config_message(cfg)
        for worker in self.workers.values():
            worker.configure(message)

    def serving(self, worker: _Worker) -> None:
        """``worker`` serves: it has adopted its sockets."""
        self.served.add(worker.index)
        if len(self.served) == self.count:
            waiting, self.waiting_for_all = self.waiting_for_all, []
            for waiter in waiting:
                waiter.callback(None)

    def ready(self) -> defer.Deferred[None]:
        """Fires once every worker has served (systemd's READY=1). A worker
        restarted later changes nothing: the others serve meanwhile."""
        if len(self.served) == self.count:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self.waiting_for_all.append(waiter)
        return waiter

    def pids(self) -> dict[int, int]:
        """The live workers' process ids, by index."""
        return {index: worker.transport.pid for index, worker in self.workers.items()
                if worker.alive and worker.transport.pid is not None}

    # ---- the workers' counts ----------------------------------------------------------

    def gather(self) -> defer.Deferred[None]:
        """Ask every live worker for its counts; fires once all have
        answered, or after REPORT_WAIT. Pulled at each scrape rather than
        pushed by the workers now and then: a scrape is exact (a session
        that ended before it is in it), and idle workers, or workers with
        no metrics endpoint to report to, do no work for it. A scrape that
        comes while a round of requests is out asks in the next round, once
        that one is over (the workers that answered the first answered
        before it came), together with every other scrape that came
        meanwhile."""
        waiter: defer.Deferred[None] = defer.Deferred()
        if self.round is not None:
            self.next_waiters.append(waiter)
            return waiter
        self.waiters.append(waiter)
        self._ask()
        return waiter

    def _ask(self) -> None:
        """A round: every live worker is asked for its counts."""
        if self.round is None:
            self.sequence += 1
            self.waiting = {worker for worker in self.workers.values()
                            if worker.alive and worker.channel is not None
                            and not worker.channel.closed}
            self.round = self.reactor.callLater(REPORT_WAIT, self._gathered)
            for worker in list(self.waiting):
                worker.ask(self.sequence)
            if not self.waiting:
                self._gathered()

    def answered(self, worker: _Worker) -> None:
        if worker.answered >= self.sequence:
            self._stop_waiting_for(worker)

    def _stop_waiting_for(self, worker: _Worker) -> None:
        if worker in self.waiting:
            self.waiting.discard(worker)
            if not self.waiting:
                self._gathered()

    def _gathered(self) -> None:
        if self.round is not None and self.round.active():
            self.round.cancel()
        self.round = None
        self.waiting = set()
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self.next_waiters and self.round is None:
            self.waiters, self.next_waiters = self.next_waiters, []
            self._ask()

    def rule_limits(self, key: str) -> RuleLimits | None:
        """The limits of the rule ``key`` (its name or position) in the
        configuration the workers run now."""
        rules = self.config.rules
        if self._limits_of is not rules:
            self._limits_of = rules
            self._limits = {r.limits.key: r.limits for r in rules.rules if r.limits is not None}
        return self._limits.get(key)

    def _tell_share(self, index: int, key: Key, rate: float) -> None:
        """Worker ``index``'s part of a shared rate budget, sent to it."""
        worker = self.workers.get(index)
        channel = worker.channel if worker is not None else None
        if channel is not None and not channel.closed:
            # One waiting for the same key is replaced: only the latest counts.
            channel.send(("share", *key), "share", frame(["share", *key, rate]))

    def retire(self, worker: _Worker) -> None:
        """Its channel is closed: its last report counts forever (what it
        counted after that report is lost: the crash of a worker loses
        what it counted since the last scrape), its gauges no more."""
        if worker in self.reporting:
            self.reporting.discard(worker)
            if worker.latest is not None:
                self.retired.add(worker.latest, gauges=False)
        self._stop_waiting_for(worker)

    def totals(self) -> Counts:
        """Every worker's counts summed: the ended ones' last reports, the
        others' latest; gauges of the live workers only."""
        total = Counts()
        total.add(self.retired)
        for worker in self.reporting:
            if worker.latest is not None:
                total.add(worker.latest, gauges=worker.alive)
        return total

    def worker_ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        self._stop_waiting_for(worker)
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
        """Every worker drains (README: Stopping), and is killed if it has
        not ended ``drain_timeout`` (the one it runs) + STOP_MARGIN later.
        Fires once all have ended."""
        self.stopping = True
        super().stopService()
        # No worker accepts from now on: nor may the sockets held here for
        # restarts, or the kernel would queue connections on them that
        # nobody accepts, where the client should be refused at once.
        self._close_sockets()
        ended: list[defer.Deferred[None]] = []
        for worker in list(self.workers.values()):
            ended.append(worker.gone())
            worker.stop(None)
        deadline = self.config.limits.drain_timeout + STOP_MARGIN
        if ended:
            log.info("stopping: {count} worker(s) drain their sessions; killed if still "
                     "running in {deadline:g} s", count=len(ended), deadline=deadline)
        self.kill_timer = self.reactor.callLater(deadline, self._kill_stragglers)

        def done(_: object) -> None:
            if self.kill_timer is not None and self.kill_timer.active():
                self.kill_timer.cancel()
            # Every scrape still waiting is answered, with what came in.
            self.waiters.extend(self.next_waiters)
            self.next_waiters = []
            self._gathered()

        return defer.DeferredList(ended).addBoth(done)

    def now(self, why: str) -> None:
        """The workers' drains end at once (a second signal): each closes
        its sessions left; killed if it has not ended after STOP_TIMEOUT."""
        if not self.stopping:
            return
        for worker in list(self.workers.values()):
            worker.stop(why)
        timer = self.kill_timer
        if timer is not None and timer.active() and \
                timer.getTime() - self.reactor.seconds() > STOP_TIMEOUT:
            timer.reset(STOP_TIMEOUT)

    def _kill_stragglers(self) -> None:
        for worker in list(self.workers.values()):
            if worker.alive:
                log.warn("worker {index} still running after it was told to stop: killed",
                         index=worker.index)
                worker.signal("KILL")

    def _close_sockets(self) -> None:
        for row in self.sockets:
            for sock in row:
                sock.close()
