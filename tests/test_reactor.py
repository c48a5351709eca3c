"""socksd's reactor (socksd.tap.reactor): Twisted's own reactor test suites
run against it, plus what it does differently and how twistd picks it.

Twisted tests each reactor with "builders" (twisted.internet.test): mixins
whose test methods take a fresh reactor from ``reactorFactory``. Pointing
them at ours checks TCP connect/accept/close/half-close/abort, adoption of
sockets, descriptor bookkeeping, timers and threads on it exactly as
Twisted checks its epoll reactor.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from twisted.internet import epollreactor, protocol
from twisted.internet.test.test_core import SystemEventTestsBuilder
from twisted.internet.test.test_fdset import ReactorFDSetTestsBuilder
from twisted.internet.test.test_socket import (
    AdoptStreamConnectionErrorsTestsBuilder,
    AdoptStreamPortErrorsTestsBuilder,
)
from twisted.internet.test.test_tcp import (
    AbortConnectionTests,
    AdoptStreamConnectionTestsBuilder,
    TCP4ClientTestsBuilder,
    TCP6ClientTestsBuilder,
    TCPConnectionTestsBuilder,
    TCPFDPortTestsBuilder,
    TCPPortTestsBuilder,
    TCPTransportTestsBuilder,
)
from twisted.internet.test.test_threads import ThreadTestsBuilder
from twisted.internet.test.test_time import TimeTestsBuilder
from twisted.internet.test.test_tls import StartTLSClientTestsMixin, TLSPortTestsBuilder
from twisted.internet.test.test_unix import UNIXTestsBuilder
from twisted.logger import globalLogPublisher

from socksd.tap import reactor as socksd_reactor

OURS = "socksd.tap.reactor.EPollReactor"
BUILDERS = [
    SystemEventTestsBuilder, ReactorFDSetTestsBuilder, TimeTestsBuilder, ThreadTestsBuilder,
    TCP4ClientTestsBuilder, TCP6ClientTestsBuilder, TCPPortTestsBuilder, TCPFDPortTestsBuilder,
    TCPConnectionTestsBuilder, TCPTransportTestsBuilder, AdoptStreamConnectionTestsBuilder,
    AbortConnectionTests, AdoptStreamPortErrorsTestsBuilder,
    AdoptStreamConnectionErrorsTestsBuilder, UNIXTestsBuilder,
    # TLS started on an accepted connection (socksd.stream.Stream hands
    # every path over to Twisted's then), and listenSSL's.
    StartTLSClientTestsMixin, TLSPortTestsBuilder,
]


# Left out on purpose, not skipped: what ours does differently by design.
DIFFERENT = (
    # A connection's logPrefix() as the "system" of legacy log calls made
    # while handling its events: the per-event context this reactor drops
    # (test_no_per_event_log_context below shows the difference).
    "test_logPrefix",
    # Skips itself on any epoll reactor: epoll cannot report a closed fd.
    "test_lostFileDescriptor",
)


def _on_ours(builder):
    """The builder's test case class for our reactor only."""
    ours = type(builder.__name__, (builder,),
                {"_reactors": [OURS], "skippedReactors": {},
                 **{name: None for name in DIFFERENT if hasattr(builder, name)}})
    (case,) = ours.makeTestCaseClasses().values()
    assert getattr(case, "skip", None) is None, case.skip  # ours must load, not skip
    case.__module__ = __name__
    return case


for _builder in BUILDERS:
    _case = _on_ours(_builder)
    globals()[_case.__name__] = _case
del _builder, _case


class _Fails:
    """A descriptor whose doRead raises past Twisted's own handling: its
    ``connectionLost`` raises too, so the error escapes ``_doReadOrWrite``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lost = 0

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "fails"

    def doRead(self):
        raise RuntimeError("doRead broke")

    def connectionLost(self, reason) -> None:
        self.lost += 1
        raise RuntimeError("connectionLost broke")


def test_an_error_escaping_a_handler_is_logged_and_the_loop_goes_on():
    import os

    reactor = socksd_reactor.EPollReactor()
    events = []
    globalLogPublisher.addObserver(events.append)
    r, w = os.pipe()
    try:
        os.write(w, b"x")
        fails = _Fails(r)
        reactor.addReader(fails)
        reactor.doIteration(0)          # must not raise
        assert fails.lost == 1
        # ...and the loop still serves others: a timer set now fires.
        fired = []
        reactor.callLater(0, fired.append, True)
        reactor.runUntilCurrent()
        assert fired == [True]
    finally:
        globalLogPublisher.removeObserver(events.append)
        reactor.removeAll()
        os.close(r)
        os.close(w)
    # Twisted's own handling logs through the legacy API ("failure"), ours
    # through twisted.logger ("log_failure").
    failures = [e.get("log_failure") or e.get("failure") for e in events]
    messages = {str(f.value) for f in failures if f is not None}
    # Twisted logs the doRead error and disconnects; ours logs what escaped.
    assert "doRead broke" in messages
    assert "connectionLost broke" in messages


@pytest.mark.parametrize("reactor_class, system", [
    (socksd_reactor.EPollReactor, "-"),
    (epollreactor.EPollReactor, "Server,0,127.0.0.1"),   # what ours leaves out
])
def test_no_per_event_log_context(reactor_class, system):
    """The point of this reactor: handlers run without callWithLogger's
    context, so old-style log calls in them have the default system."""
    from twisted.python import context, log

    reactor = reactor_class()
    seen = []

    class Server(protocol.Protocol):
        def dataReceived(self, data):
            seen.append(context.get(log.ILogContext, {}).get("system"))
            self.transport.loseConnection()

    factory = protocol.Factory.forProtocol(Server)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = protocol.ClientCreator(reactor, protocol.Protocol)
    done = client.connectTCP("127.0.0.1", port.getHost().port)
    done.addCallback(lambda p: p.transport.write(b"hi"))
    reactor.callLater(10, reactor.stop)

    def check():
        if seen:
            reactor.stop()
        else:
            reactor.callLater(0.01, check)

    check()
    reactor.run(installSignalHandlers=False)
    port.stopListening()
    assert seen == [system]


@pytest.mark.parametrize("args, expected", [
    ([], "socksd.tap.reactor.EPollReactor"),
    (["--reactor", "socksd"], "socksd.tap.reactor.EPollReactor"),
    (["--reactor", "poll"], "twisted.internet.pollreactor.PollReactor"),
])
def test_twistd_installs_ours_unless_told_otherwise(args, expected):
    """twistd installs a reactor only when parsing ``--reactor``; otherwise
    ``socks`` installs ours while its options are parsed, before anything
    imports the default one."""
    script = (
        "from twisted.scripts.twistd import ServerOptions\n"
        "config = ServerOptions()\n"
        f"config.parseOptions({args!r} + ['socks', '--listen', 'tcp:0:interface=127.0.0.1'])\n"
        "from twisted.internet import reactor\n"
        "print(type(reactor).__module__ + '.' + type(reactor).__qualname__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def test_soon_runs_after_the_events_of_the_batch_before_waiting():
    import os

    reactor = socksd_reactor.EPollReactor()
    order = []
    pipes = [os.pipe() for _ in range(2)]

    class Reader:
        def __init__(self, fd: int) -> None:
            self.fd = fd

        def fileno(self) -> int:
            return self.fd

        def logPrefix(self) -> str:
            return "reader"

        def doRead(self):
            os.read(self.fd, 1)
            order.append(f"read {self.fd}")
            reactor.soon(lambda: order.append(f"soon {self.fd}"))

        def connectionLost(self, reason) -> None:
            pass

    try:
        for r, w in pipes:
            os.write(w, b"x")
            reactor.addReader(Reader(r))
        reactor.doIteration(1)
        # Both reads first (one batch), then what they queued, in order.
        (a, _), (b, _) = pipes
        assert sorted(order[:2]) == sorted([f"read {a}", f"read {b}"])
        assert order[2:] == [f"soon {int(line.split()[1])}" for line in order[:2]]
        # Queued by a timer: run before the next wait, which then does not block.
        reactor.callLater(0, reactor.soon, lambda: order.append("after timer"))
        reactor.runUntilCurrent()
        reactor.doIteration(60)
        assert order[-1] == "after timer"
    finally:
        reactor.removeAll()
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_a_closed_stream_leaves_no_trace_and_sends_its_fin():
    """A Stream's close leaves nothing in the reactor's sets and sends the
    FIN; an adopted one (its descriptor shared with the caller's copy) too,
    by a shutdown, as Twisted does."""
    import socket as socket_module

    from socksd.stream import AdoptedStream, Stream

    reactor = socksd_reactor.EPollReactor()
    listener = socket_module.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(2)
    ends = []
    try:
        for kind in (Stream, AdoptedStream):
            mine = socket_module.create_connection(listener.getsockname())
            theirs, _ = listener.accept()
            ends += [mine, theirs]
            if kind is Stream:
                mine.setblocking(False)
                stream = Stream(mine, protocol.Protocol(), theirs.getsockname(), None, 0,
                                reactor)
            else:
                stream = reactor.adoptStreamConnection(mine.fileno(), socket_module.AF_INET,
                                                       protocol.Factory.forProtocol(
                                                           protocol.Protocol))
            assert type(stream) is kind
            fd = stream.fileno()
            assert reactor._selectables.get(fd) is stream
            stream.loseConnection()
            reactor.doIteration(0)
            assert fd not in reactor._selectables and fd not in reactor._reads
            theirs.settimeout(5)
            assert theirs.recv(1) == b""          # the FIN, either way
    finally:
        reactor.removeAll()
        listener.close()
        for end in ends:
            end.close()
