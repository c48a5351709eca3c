"""One worker of ``workers = N`` (see socksd.tap.workers): started by the
supervisor with its listening sockets as inherited file descriptors, and the
``--auth`` checker strings as a JSON list on stdin (never on the command line,
which every local user can read). With ``--registrations FD`` its verified
sessions register their outgoing connections with the supervisor's identd
over that socket (socksd.ident.channel)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from typing import BinaryIO

from twisted.cred import strcred
from twisted.internet import protocol
from twisted.internet.interfaces import IPushProducer
from twisted.internet.main import installReactor
from twisted.logger import ILogObserver, LogEvent, Logger, eventAsJSON, globalLogBeginner
from twisted.python.failure import Failure
from twisted.python.reflect import namedAny
from zope.interface import implementer

from socksd.ident.channel import RegistrationSender
from socksd.proxy.connect import THREAD_POOL_SIZE
from socksd.tap import reactor as socksd_reactor
from socksd.tap.reload import Reloader
from socksd.tap.workers import FAILURE_MESSAGE, RECORD_SEPARATOR
from socksd.twisted_internals import IStreamTransport, installed_reactor, proxy_protocol_factory

log = Logger(namespace="socksd")


@implementer(ILogObserver, IPushProducer)
class LogChannel(protocol.Protocol):
    """The worker's log, to the supervisor: each event as a JSON record on
    the socket the supervisor passed as fd 1.

    Writes never block the reactor: when the supervisor stops reading (its
    own log sink stalls, it is stopped) and Twisted's write buffer fills,
    records are dropped and counted until it catches up. When the supervisor
    is gone, so is the worker.
    """

    transport: IStreamTransport
    paused = False
    dropped = 0

    def __init__(self, worker: int) -> None:
        self.worker = worker

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)

    def __call__(self, event: LogEvent) -> None:
        if self.paused or not self.connected:
            self.dropped += 1
            return
        failure = event.get("log_failure")
        if failure is not None:
            event = dict(event)
            event[FAILURE_MESSAGE] = failure.getErrorMessage()
        self.transport.write(RECORD_SEPARATOR + eventAsJSON(event).encode("utf-8") + b"\n")

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

    def connectionLost(self, reason: Failure | None = None) -> None:
        reactor = installed_reactor()
        self.connected = False
        if reactor.running:
            reactor.stop()


def read_auth(stdin: BinaryIO) -> list[str]:
    """The supervisor's --auth strings: a JSON list, then EOF."""
    auth = json.loads(stdin.read() or b"[]")
    if not (isinstance(auth, list) and all(isinstance(a, str) for a in auth)):
        raise SystemExit("socksd worker: stdin is not a JSON list of --auth strings")
    return auth


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m socksd.tap.worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--fds", required=True)
    parser.add_argument("--config")
    parser.add_argument("--trusted-proxy", action="append", default=[])
    parser.add_argument("--reactor", help="the supervisor's reactor class, to run on the same")
    parser.add_argument("--ready-fd", type=int,
                        help="written to once a SIGHUP is a reload, then closed")
    parser.add_argument("--registrations", type=int,
                        help="the descriptor of the channel to the supervisor's identd")
    args = parser.parse_args(argv)
    # A reload before the handler below is in place is not the end of us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    if args.reactor:
        installReactor(namedAny(args.reactor)())
    else:
        socksd_reactor.install()
    reactor = installed_reactor()
    reactor.suggestThreadPoolSize(THREAD_POOL_SIZE)   # name lookups: see connect.MAX_LOOKUPS

    from socksd.tap import socks as socks_tap

    # Every event goes to the supervisor, which logs it where twistd logs;
    # stray writes to stdout (print in a plugin) go to stderr instead.
    channel = LogChannel(args.index)
    channel_factory = protocol.ServerFactory()
    channel_factory.protocol = lambda: channel
    reactor.adoptStreamConnection(1, socket.AF_UNIX, channel_factory)
    os.dup2(2, 1)
    globalLogBeginner.beginLoggingTo([channel], redirectStandardIO=False)
    registrations = None
    if args.registrations is not None:
        registrations = RegistrationSender()
        registrations_factory = protocol.ServerFactory()
        registrations_factory.protocol = lambda: registrations
        reactor.adoptStreamConnection(args.registrations, socket.AF_UNIX, registrations_factory)
        os.close(args.registrations)  # Twisted made its own copy of the descriptor
    auth = read_auth(sys.stdin.buffer)
    checkers = [strcred.makeChecker(description) for description in auth]
    cfg, checkers = socks_tap.build(args.config, [], checkers, args.trusted_proxy)
    assembly = socks_tap.Assembly(args.workers)
    factory = socks_tap.make_factory(cfg, checkers, socks_tap.registering(cfg, registrations),
                                     worker=args.index, assembly=assembly)

    def reload() -> str:
        """The supervisor checked the file and passed its SIGHUP on."""
        cfg, checkers = socks_tap.build(args.config, [],
                                        [strcred.makeChecker(a) for a in auth],
                                        args.trusted_proxy)
        factory.serve(**assembly.settings(cfg, checkers,
                                          socks_tap.registering(cfg, registrations)))
        if cfg.recheck_on_reload:
            factory.recheck()
        return socks_tap.summary(cfg, checkers)

    Reloader(reload, reactor, prefix=f"w{args.index} ").startService()
    if args.ready_fd is not None:
        # Until now the supervisor holds back a reload's SIGHUP: before
        # Python ran, its default action would have ended us.
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)
    for fd, family, haproxy in json.loads(args.fds):
        port_factory = proxy_protocol_factory(factory) if haproxy else factory
        reactor.adoptStreamPort(fd, socket.AddressFamily(family), port_factory)
        os.close(fd)  # Twisted made its own copy of the descriptor
    reactor_class = type(reactor)
    log.info("w{worker} serving on {reactor}", worker=args.index,
             reactor=f"{reactor_class.__module__}.{reactor_class.__qualname__}")
    reactor.run()   # installs twistd-like SIGTERM/SIGINT handling: stop


if __name__ == "__main__":
    main()
