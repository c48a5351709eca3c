"""One worker of ``workers = N`` (see socksd.tap.workers): started by the
supervisor with its listening sockets as inherited file descriptors, and,
as JSON on stdin, the ``--auth`` checker strings (never on the command line,
which every local user can read) and the configuration to run: the text of
the file as the supervisor read and validated it, with its path for the
messages. The worker never reads the file itself.

Its control channel (``--channel FD``, socksd.channel) carries its sessions'
identd registrations, its counts, and once that it serves, to the
supervisor, and brings it the configuration of each reload, the requests
for its counts, and the word to stop.

It stops as twistd socks does (socksd.tap.drain): no new sessions, the
open ones drain for up to its ``drain_timeout``, those left are closed;
its counts go last. The supervisor's word, or a SIGTERM or SIGINT of its
own (systemd's stop and a terminal's Ctrl-C signal every process), starts
that; a second signal, or the supervisor's word to end at once, ends it
at once. So does losing the supervisor.

SIGHUP is ignored, with one line: a reload is the supervisor's to make (it
validates the file once and sends every worker the same text), and a HUP
that reaches the workers too (``systemctl kill -s HUP``, a HUP to the
process group) reaches the supervisor as well.
"""

from __future__ import annotations

import signal

if __name__ == "__main__":
    # First, before the imports below (half a second of them): a SIGHUP is
    # never the end of a worker (see the docstring), not even while it
    # starts. Twisted's spawnProcess gives a child the default handlers,
    # whatever the supervisor ignores.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

import argparse
import json
import math
import os
import socket
import sys
from typing import Any, BinaryIO, Callable, Iterator

from twisted.cred import strcred
from twisted.internet import defer, protocol
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IPushProducer, IReactorTime
from twisted.internet.main import installReactor
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    eventAsJSON,
    formatEvent,
    globalLogBeginner,
)
from twisted.python.failure import Failure
from twisted.python.reflect import namedAny
from zope.interface import implementer

from socksd.channel import Malformed, frame
from socksd.config import ConfigError
from socksd.escape import escape
from socksd.ident.channel import RegistrationSender
from socksd.logs import FIELDS
from socksd.proxy.connect import THREAD_POOL_SIZE
from socksd.proxy.quotas import Budgets, Key, key_from
from socksd.stats import MAX_COUNT, STATS, Counts
from socksd.tap import reactor as socksd_reactor
from socksd.tap.drain import Drain, Stopping
from socksd.tap.reload import FAILED
from socksd.tap.workers import FAILURE_MESSAGE, MAX_CONFIG_FRAME, RECORD_SEPARATOR
from socksd.twisted_internals import (
    IReactor,
    IStreamTransport,
    installed_reactor,
    proxy_protocol_factory,
)

log = Logger(namespace="socksd")

# At a clean stop the worker sends its counts last, and waits this long at
# most for the supervisor to take them.
FINAL_REPORT_WAIT = 2.0
# A worker's log records go to the supervisor together, this long after the
# first of them at most, or once they are this many bytes (LogChannel).
LOG_BATCH_DELAY = 0.02
LOG_BATCH_BYTES = 32 << 10
# A rule's max_sessions is counted by the supervisor: a session it has not
# answered for in this long is refused.
ASK_TIMEOUT = 5.0
# The longest reason the supervisor gives for a stop at once (its session
# lines' detail).
MAX_STOP_REASON = 200


def stop_reactor(reactor: IReactor | None = None) -> None:
    """Stop, unless stopping already (both channels end as we stop)."""
    reactor = reactor if reactor is not None else installed_reactor()
    if reactor.running:
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass


def log_record(event: LogEvent) -> bytes:
    """An event as the supervisor reads it (socksd.tap.workers._WorkerLog):
    RS, a JSON array, NL.

    ``[time, level, namespace, system, text, fields]``: the message made
    here, where the event's own objects are (as the text line and the JSON
    line word it, format specs included), and of the fields only those a
    JSON line carries (socksd.logs.FIELDS), as JSON carries them. The
    supervisor then has nothing to rebuild but a small dict, and nothing
    to take from the worker but strings and numbers it checks.

    An event with a failure goes as Twisted's own JSON record instead
    (eventAsJSON), with the failure's message beside it: the supervisor
    rebuilds the failure, frames and all, for the traceback. Those are rare.
    """
    failure = event.get("log_failure")
    if failure is not None:
        event = dict(event)
        event[FAILURE_MESSAGE] = failure.getErrorMessage()
        return RECORD_SEPARATOR + eventAsJSON(event).encode("utf-8") + b"\n"
    when, level = event.get("log_time"), event.get("log_level")
    namespace, system = event.get("log_namespace"), event.get("log_system")
    fields = {name: value for name in FIELDS if (value := event.get(name)) is not None}
    if type(when) not in (int, float):
        when = None
    record = [when, getattr(level, "name", None),
              namespace if namespace is None or type(namespace) is str else str(namespace),
              system if system is None or type(system) is str else str(system),
              formatEvent(event), fields]
    if not _PLAIN.issuperset(map(type, fields.values())):
        record[5] = {name: _json_value(value) for name, value in fields.items()}
    try:
        text = _ENCODER.encode(record)
    except ValueError:
        # A float JSON cannot write (inf, nan): as the JSON line writes it.
        record[5] = {name: _json_value(value) for name, value in fields.items()}
        if when is not None and not math.isfinite(when):
            record[0] = None
        text = _ENCODER.encode(record)
    return RECORD_SEPARATOR + text.encode("ascii") + b"\n"


# What a record's fields are, mostly: written as they are.
_PLAIN = frozenset((str, int, float, bool))
# ASCII (a client's bytes kept as lone surrogates travel as \udcXX), compact,
# and never NaN or Infinity, which the supervisor does not take.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, check_circular=False)


def _json_value(value: Any) -> str | int | float:
    """A field's value as the JSON line writes it (socksd.logs.json_line):
    strings and numbers as they are, anything else as its str()."""
    if isinstance(value, (str, int)) or isinstance(value, float) and math.isfinite(value):
        return value
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


@implementer(ILogObserver, IPushProducer)
class LogChannel(protocol.Protocol):
    """The worker's log, to the supervisor: each event as a record
    (:func:`log_record`) on the socket the supervisor passed as fd 1.

    Records are sent in batches, LOG_BATCH_DELAY after the first of one,
    or at LOG_BATCH_BYTES: the supervisor then wakes for many sessions'
    lines at a time, where it woke for a few. On a machine with as many
    cores as processes serving, its wake-ups take a core from a worker in
    the middle of its sessions (and cost it CPU of its own).

    Writes never block the reactor: when the supervisor stops reading (its
    own log sink stalls, it is stopped) and Twisted's write buffer fills,
    records are dropped and counted until it catches up. When the supervisor
    is gone, so is the worker.
    """

    transport: IStreamTransport
    paused = False
    dropped = 0
    closed: defer.Deferred[None] | None = None     # the worker closed it (close())

    def __init__(self, worker: int, gone: Callable[[], None] = lambda: stop_reactor(),
                 reactor: IReactorTime | None = None) -> None:
        self.worker = worker
        self.gone = gone      # the supervisor is gone: the worker ends
        self._reactor = reactor
        self.batch: list[bytes] = []
        self.batch_bytes = 0
        self.sending: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)

    def __call__(self, event: LogEvent) -> None:
        if self.paused or not self.connected:
            self.dropped += 1
            return
        record = log_record(event)
        self.batch.append(record)
        self.batch_bytes += len(record)
        if self.batch_bytes >= LOG_BATCH_BYTES or self.closed is not None:
            self.send()     # a full batch, or the last lines of a worker that ends
        elif self.sending is None:
            reactor = self._reactor if self._reactor is not None else installed_reactor()
            self.sending = reactor.callLater(LOG_BATCH_DELAY, self.send)

    def send(self) -> None:
        """Write the batch (what Twisted's buffer takes beyond its size
        pauses us: the next events are dropped, not this batch)."""
        if self.sending is not None:
            if self.sending.active():
                self.sending.cancel()
            self.sending = None
        if self.batch and self.connected:
            self.transport.write(b"".join(self.batch))
        self.batch = []
        self.batch_bytes = 0

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            log.warn("w{worker} {dropped} log events dropped: the supervisor did not read "
                     "them in time", worker=self.worker, dropped=dropped)

    def stopProducing(self) -> None:
        pass

    def close(self, reactor: IReactor) -> defer.Deferred[None]:
        """The worker ends: the records written are sent, then the channel
        is closed. Fires once it is, or after FINAL_REPORT_WAIT: the
        reactor's end drops what Twisted still buffers, the lines of the
        last sessions to end among them."""
        if self.closed is not None:
            return self.closed
        self.send()     # the batch goes first
        closed: defer.Deferred[None] = defer.Deferred()
        self.closed = closed
        if not self.connected:
            closed.callback(None)
            return closed

        def waited() -> None:
            if not closed.called:
                closed.callback(None)

        timer = reactor.callLater(FINAL_REPORT_WAIT, waited)
        closed.addBoth(lambda _: timer.cancel() if timer.active() else None)
        # A producer still registered could hold the close back.
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        return closed

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.connected = False
        self.send()     # nowhere to go: dropped
        if self.closed is None:
            self.gone()
        elif not self.closed.called:
            self.closed.callback(None)


class WorkerChannel(RegistrationSender):
    """The worker's end of its control channel: its sessions' identd
    registrations (RegistrationSender), its counts, and once that it serves
    go up; the configuration to run, the requests for its counts, and the
    word to stop come down.

    The counts are counted in plain ints as ever (socksd.stats) and made a
    report only when the supervisor asks (a scrape), and once more as the
    worker stops; a report still waiting for the supervisor to read it is
    replaced by a newer one, never queued behind it.
    """

    MAX_LENGTH = MAX_CONFIG_FRAME

    def __init__(self, index: int, counts: Callable[[], Counts],
                 configure: Callable[[str | None, str | None], None],
                 reactor: IReactor | None = None,
                 end: Callable[[str | None], None] | None = None) -> None:
        super().__init__()
        self.reactor = reactor if reactor is not None else installed_reactor()
        self.index = index
        self.counts = counts
        self.configure = configure
        # Stop: drain (None), or end at once for the reason given.
        self.end = end if end is not None else lambda why: stop_reactor(self.reactor)
        self.named: set[str] = set()    # users with series of their own (Counts.to_json)
        # The rules' max_sessions are counted by the supervisor: the asks
        # it has not answered yet, by number (quotas.Asker).
        self.asks: dict[int, tuple[defer.Deferred[bool], Key]] = {}
        self.ask_ids: Iterator[int] = iter(range(1 << 62))
        self.budgets: Budgets | None = None    # whose shared rates the supervisor sets
        self.asked = 0                  # the last request for counts
        self.stopping = False
        self.ended: defer.Deferred[None] = defer.Deferred()

    def message_received(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == "report" and len(message) == 2:
            sequence = message[1]
            if isinstance(sequence, bool) or not isinstance(sequence, int) \
                    or not 0 <= sequence < MAX_COUNT:
                raise Malformed(f"report: {str(sequence)[:20]!r} is not a number")
            self.asked = sequence
            self.report()
        elif kind == "config" and len(message) == 3:
            path, text = message[1], message[2]
            if not (path is None and text is None
                    or isinstance(path, str) and isinstance(text, str)):
                raise Malformed("config: not a path and a text")
            self.configure(path, text)
        elif kind == "granted" and len(message) == 3:
            ident, granted = message[1], message[2]
            if not isinstance(granted, bool) or ident not in self.asks:
                raise Malformed("granted: not an answer to an ask")
            asked, key = self.asks.pop(ident)
            if asked.called:
                # The session ended before the answer came: the place goes back.
                if granted:
                    self.give_back(key)
            else:
                asked.callback(granted)
        elif kind == "share" and len(message) == 5:
            rate = message[4]
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
                raise Malformed("share: not a rate")
            key = key_from("share", message[1:4])
            if self.budgets is not None:
                self.budgets.set_rate(key, rate)
        elif kind == "stop" and len(message) == 2:
            why = message[1]
            if not (why is None or isinstance(why, str) and 0 < len(why) <= MAX_STOP_REASON):
                raise Malformed("stop: neither null nor a reason")
            self.end(why)
        else:
            super().message_received(message)

    # quotas.Asker: a rule's max_sessions holds across the workers.

    def ask(self, key: Key, limit: int) -> defer.Deferred[bool]:
        """May one more session open under ``key``? The supervisor counts."""
        if self.closed:
            return defer.succeed(False)   # stopping: no new session anyway
        ident = next(self.ask_ids)
        asked: defer.Deferred[bool] = defer.Deferred()
        # Every wait has a timeout: a supervisor that does not answer refuses.
        asked.addTimeout(ASK_TIMEOUT, self.reactor, onTimeoutCancel=lambda _r, _t: False)
        self.asks[ident] = asked, key
        self.send(("take", ident), "take", frame(["take", ident, *key, limit]))
        return asked

    def give_back(self, key: Key) -> None:
        if not self.closed:
            self.send(("give", next(self.ask_ids)), "give", frame(["give", *key]))

    # quotas.Sharing: a shared rate budget is split between the workers.

    def joined(self, key: Key) -> None:
        self.send(("join", next(self.ask_ids)), "join", frame(["join", *key]))

    def left(self, key: Key) -> None:
        self.send(("leave", next(self.ask_ids)), "leave", frame(["leave", *key]))

    def serving(self) -> None:
        """Say that this worker serves (its sockets adopted): the supervisor
        tells systemd the service is ready once every worker has."""
        self.send("serving", "serving", frame(["serving"]))

    def report(self) -> None:
        self.send("counts", "counts", frame(["counts", self.asked,
                                             self.counts().to_json(self.named)]))

    def malformed(self, why: str) -> None:
        if self.broken:
            return
        log.error("w{worker} malformed frame from the supervisor ({why}); stopping",
                  worker=self.index, why=escape(why))
        super().malformed(why)     # closes the channel: we stop (connectionLost)

    def stop(self) -> defer.Deferred[None]:
        """A clean stop: the counts once more, then the channel closed once
        the supervisor has them, or FINAL_REPORT_WAIT passed."""
        self.stopping = True
        if not self.closed:
            self.report()
            self.flush_and_close()
        done: defer.Deferred[None] = defer.Deferred()

        def over(_: object = None) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        timer = self.reactor.callLater(FINAL_REPORT_WAIT, over)
        self.ended.addBoth(over)
        return done

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        asks, self.asks = self.asks, {}
        for asked, _key in asks.values():
            if not asked.called:
                asked.callback(False)     # no supervisor to count: refused
        if not self.ended.called:
            self.ended.callback(None)
        if not self.stopping:
            # The supervisor is gone, or closed us: a worker it cannot
            # configure, nor hear from, does not serve on, its open
            # sessions included.
            self.end("the control channel to the supervisor closed")


def read_start(stdin: BinaryIO) -> tuple[list[str], str | None, str | None]:
    """What the supervisor wrote on stdin, then closed: the --auth strings,
    and the configuration's path and text (both None: the embedded
    default)."""
    start = json.loads(stdin.read() or b"{}")
    auth, config = (start.get("auth"), start.get("config")) if isinstance(start, dict) \
        else (None, None)
    if not (isinstance(auth, list) and all(isinstance(a, str) for a in auth)):
        raise SystemExit("socksd worker: stdin has no JSON list of --auth strings")
    if config is None:
        return auth, None, None
    if not (isinstance(config, dict) and isinstance(config.get("path"), str)
            and isinstance(config.get("text"), str)):
        raise SystemExit("socksd worker: stdin has no configuration path and text")
    return auth, config["path"], config["text"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m socksd.tap.worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--fds", required=True)
    parser.add_argument("--channel", type=int, required=True,
                        help="the descriptor of the control channel to the supervisor")
    parser.add_argument("--listen", action="append", default=[],
                        help="what the supervisor listens on (it holds the sockets)")
    parser.add_argument("--trusted-proxy", action="append", default=[])
    parser.add_argument("--reactor", help="the supervisor's reactor class, to run on the same")
    args = parser.parse_args(argv)
    # A SIGHUP is never the end of us, nor a reload (see the module's docstring).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    if args.reactor:
        installReactor(namedAny(args.reactor)())
    else:
        socksd_reactor.install()
    reactor = installed_reactor()
    reactor.suggestThreadPoolSize(THREAD_POOL_SIZE)   # name lookups: see connect.MAX_LOOKUPS

    from socksd.tap import socks as socks_tap
    from socksd.tap.metrics import counts_now

    # Every event goes to the supervisor, which logs it where twistd logs;
    # stray writes to stdout (print in a plugin) go to stderr instead.
    channel = LogChannel(args.index, reactor=reactor)
    channel_factory = protocol.ServerFactory()
    channel_factory.protocol = lambda: channel
    reactor.adoptStreamConnection(1, socket.AF_UNIX, channel_factory)
    os.dup2(2, 1)
    globalLogBeginner.beginLoggingTo([channel], redirectStandardIO=False)

    auth, path, text = read_start(sys.stdin.buffer)
    checkers = [strcred.makeChecker(description) for description in auth]
    try:
        cfg, checkers = socks_tap.build(path, args.listen, checkers, args.trusted_proxy, text)
    except ConfigError as e:
        # Checked by the supervisor: what fails here is what changed since
        # (a checker's file). One line on stderr, which is twistd's: the
        # log channel is written only once the reactor runs.
        raise SystemExit(f"socksd worker {args.index}: cannot start: {e}") from None
    STATS.per_user = cfg.metrics.per_user
    assembly = socks_tap.Assembly(args.workers)

    def configure(path: str | None, text: str | None) -> None:
        """A reload: the text the supervisor validated, with its path."""
        try:
            cfg, checkers = socks_tap.build(path, args.listen,
                                            [strcred.makeChecker(a) for a in auth],
                                            args.trusted_proxy, text)
            factory.serve(**assembly.settings(cfg, checkers,
                                              socks_tap.registering(cfg, control)))
        except ConfigError as e:
            # Checked by the supervisor: what fails here is what changed
            # since (a checker's file, a keytab).
            log.error("w{worker} " + FAILED, worker=args.index, error=str(e))
            return
        except Exception as e:
            log.failure("w{worker} " + FAILED, worker=args.index, error=str(e))
            return
        STATS.per_user = cfg.metrics.per_user
        if cfg.recheck_on_reload:
            factory.recheck()
        log.info("w{worker} reloaded {summary}", worker=args.index,
                 summary=socks_tap.summary(cfg, checkers))

    # SIGTERM, SIGINT or the supervisor's word: drain (README: Stopping).
    stopping = Stopping(reactor)

    def end(why: str | None) -> None:
        """Stop: drain (``why`` None), or at once, for ``why``."""
        if why is not None:
            stopping.now(why)
        stop_reactor(reactor)

    channel.gone = lambda: end("the supervisor is gone")
    control = WorkerChannel(args.index, lambda: counts_now(factory, STATS, reactor), configure,
                            reactor, end)
    factory = socks_tap.make_factory(cfg, checkers, socks_tap.registering(cfg, control),
                                     worker=args.index, assembly=assembly)
    # The rules' caps and shared rates hold across the workers.
    quotas = factory.counts.quotas
    quotas.asker = control
    quotas.budgets.workers = args.workers
    quotas.budgets.sharing = control
    control.budgets = quotas.budgets
    drain = Drain(factory, reactor)
    control_factory = protocol.ServerFactory()
    control_factory.protocol = lambda: control
    reactor.adoptStreamConnection(args.channel, socket.AF_UNIX, control_factory)
    os.close(args.channel)  # Twisted made its own copy of the descriptor
    ports: list[IListeningPort] = []

    def stop() -> defer.Deferred[Any]:
        """The reactor stops: no new sessions, the open ones drain, then
        the counts go last (the drained sessions counted) and the control
        channel closes (their identd entries taken back first), as does
        the log (their lines sent)."""
        closed = defer.DeferredList([defer.maybeDeferred(port.stopListening) for port in ports])
        drained = closed.addCallback(lambda _: drain.start())
        stopping.draining(drain.cut)
        return drained.addBoth(lambda _: defer.DeferredList([control.stop(),
                                                             channel.close(reactor)]))

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.callWhenRunning(stopping.install)

    def hup(signum: int, frame: Any) -> None:
        reactor.callFromThread(log.info, "w{worker} SIGHUP ignored: the supervisor (pid "
                               "{supervisor}) reloads, and sends the workers what it read",
                               worker=args.index, supervisor=os.getppid())

    signal.signal(signal.SIGHUP, hup)
    for fd, family, haproxy in json.loads(args.fds):
        port_factory = proxy_protocol_factory(factory) if haproxy else factory
        ports.append(reactor.adoptStreamPort(fd, socket.AddressFamily(family), port_factory))
        os.close(fd)  # Twisted made its own copy of the descriptor
    control.serving()
    reactor_class = type(reactor)
    log.info("w{worker} serving on {reactor}", worker=args.index,
             reactor=f"{reactor_class.__module__}.{reactor_class.__qualname__}")
    reactor.run()   # installs twistd-like SIGTERM/SIGINT handling (stop), then Stopping's


if __name__ == "__main__":
    main()
