"""Stopping in order (README: Stopping): SIGTERM stops accepting, the open
sessions drain for up to drain_timeout, those left are closed with outcome
``shutdown``, and twistd exits 0; a second signal ends the drain at once.

In memory first (the drain of a listener's sessions, the signals, the order
the services stop in), then a real ``twistd socks``, with one process and
with workers."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.application import service
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent

import fakes
from conftest import recv_exact, recv_until_eof
from helpers import refused, wait_until
from socksd.proxy import Limits
from socksd.tap.drain import ABORT_WAIT, Drain, Draining, Stopping
from test_bind_udp_session import BIND5, bind5
from test_bind_udp_session import make_factory as bind_udp_factory
from test_systemd import _children

CONNECT_IP = b"\x05\x01\x00\x01\x5d\xb8\xd8\x22\x00\x50"        # 93.184.216.34:80
UDP_ASSOCIATE = b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00"


class Clock(MemoryReactorClock):
    """A memory reactor whose callFromThread (a signal handler's way to the
    reactor thread) runs on its next turn."""

    def callFromThread(self, f, *args, **kwargs):
        self.callLater(0, f, *args, **kwargs)


def relayed(factory, reactor) -> tuple[fakes.Client, fakes.Outbound]:
    client = fakes.socks5_client(factory, CONNECT_IP)
    out = fakes.Outbound(reactor)
    out.accept()
    assert client.take()[:2] == b"\x05\x00"
    return client, out


def lose(client: fakes.Client, out: fakes.Outbound | None = None) -> None:
    """The connections the session closed are lost (a socket's would be)."""
    client.lose()
    if out is not None:
        out.protocol.connectionLost(None)


def texts(events) -> list[str]:
    return [formatEvent(e) for e in events]


# ---- the drain of one listener's sessions ------------------------------------------------

def test_the_drain_waits_for_every_open_session_even_one_still_in_its_handshake():
    factory, reactor = fakes.make_factory(limits=Limits(drain_timeout=30))
    with capturedLogs() as events:
        client, out = relayed(factory, reactor)
        connecting = fakes.socks5_client(factory, CONNECT_IP)     # not connected yet
        drained = Drain(factory, reactor).start()
        reactor.advance(29)
        assert not drained.called and not client.closing and not connecting.closing
        fakes.relay_until_far_end_closes(client, out)
        lose(client)
        reactor.advance(0)
        assert not drained.called                 # one is left, in its request
        late = fakes.Outbound(reactor)
        late.accept()                              # ... which becomes a relay
        assert connecting.take()[:2] == b"\x05\x00"
        fakes.relay_until_far_end_closes(connecting, late)
        lose(connecting)
        assert not drained.called                  # its record is written first
        reactor.advance(0)
        assert drained.called
    lines = fakes.session_lines(events)
    assert len(lines) == 2 and all(line.endswith(" ok") for line in lines), lines
    assert "stopping: no new sessions; 2 open, closed in 30 s unless they end before" \
        in texts(events)


def test_what_is_still_open_at_drain_timeout_is_closed_with_outcome_shutdown():
    factory, reactor = fakes.make_factory(limits=Limits(drain_timeout=5))
    with capturedLogs() as events:
        client, out = relayed(factory, reactor)
        connecting = fakes.socks5_client(factory, CONNECT_IP)
        greeting = fakes.Client(factory)
        greeting.send(b"\x05")                   # half a greeting
        drained = Drain(factory, reactor).start()
        reactor.advance(4.9)
        assert not (client.closing or connecting.closing or greeting.closing)
        reactor.advance(0.2)
        assert client.closing and out.transport.disconnecting
        assert connecting.closing and greeting.closing
        assert connecting.session.pending is None          # its connect cancelled
        for each in (client, connecting, greeting):
            assert each.transport.disconnected             # aborted, not flushed
        lose(client, out)
        lose(connecting)
        lose(greeting)
        reactor.advance(0)
        assert drained.called
    lines = fakes.session_lines(events)
    assert len(lines) == 3
    assert all(line.endswith(" shutdown: drain_timeout (5 s) passed") for line in lines), lines
    assert "stopping: closing the 3 session(s) still open: drain_timeout (5 s) passed" \
        in texts(events)


def test_a_bind_waiting_for_its_peer_and_a_udp_association_are_closed_too():
    factory, reactor = bind_udp_factory(limits=Limits(drain_timeout=1))
    with capturedLogs() as events:
        waiting = bind5(factory, False, BIND5)
        assert waiting.take()[:2] == b"\x05\x00"           # the first reply: listening
        udp = fakes.socks5_client(factory, UDP_ASSOCIATE)
        assert udp.take()[:2] == b"\x05\x00"
        drained = Drain(factory, reactor).start()
        reactor.advance(1)
        assert waiting.closing and udp.closing
        assert all(port.stopped for port in [*reactor.listeners, *reactor.udp_listeners])
        lose(waiting)
        lose(udp)
        reactor.advance(0)
        assert drained.called
    bind, udp_line = fakes.session_lines(events)
    assert " bind " in bind and bind.endswith(" shutdown: drain_timeout (1 s) passed"), bind
    assert " udp " in udp_line and " shutdown: drain_timeout (1 s) passed; " in udp_line, \
        udp_line


def test_drain_timeout_0_closes_them_at_once():
    factory, reactor = fakes.make_factory(limits=Limits(drain_timeout=0))
    client, out = relayed(factory, reactor)
    drained = Drain(factory, reactor).start()
    reactor.advance(0)
    assert client.closing
    lose(client, out)
    reactor.advance(0)
    assert drained.called


@pytest.mark.parametrize("cut_before_start", [False, True])
def test_a_cut_closes_them_at_once_before_the_drain_or_during_it(cut_before_start):
    factory, reactor = fakes.make_factory()
    with capturedLogs() as events:
        client, out = relayed(factory, reactor)
        drain = Drain(factory, reactor)
        if cut_before_start:
            drain.cut("a second SIGTERM")
            assert not client.closing       # the listeners are still closing
        drained = drain.start()
        if not cut_before_start:
            reactor.advance(1)
            assert not client.closing
            drain.cut("a second SIGTERM")
        assert client.closing
        lose(client, out)
        reactor.advance(0)
        assert drained.called
        assert not reactor.getDelayedCalls()      # the drain_timeout's call is gone
    [line] = fakes.session_lines(events)
    assert line.endswith(" shutdown: a second SIGTERM")


def test_with_no_session_open_the_drain_is_over_at_once():
    factory, reactor = fakes.make_factory()
    with capturedLogs() as events:
        drained = Drain(factory, reactor).start()
    assert drained.called and events == [] and not reactor.getDelayedCalls()


def test_sessions_that_do_not_end_once_closed_are_waited_for_a_bounded_time():
    factory, reactor = fakes.make_factory(limits=Limits(drain_timeout=1))
    with capturedLogs() as events:
        client, _out = relayed(factory, reactor)
        drained = Drain(factory, reactor).start()
        reactor.advance(1)
        assert client.closing                      # ... but never lost
        reactor.advance(ABORT_WAIT - 0.01)
        assert not drained.called
        reactor.advance(0.02)
        assert drained.called
    assert "stopping: 1 session(s) still open 1 s after they were closed; stopping without " \
        "them" in texts(events)


# ---- the signals ---------------------------------------------------------------------------

class Previous:
    """The reactor's own handler: what it was called with."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, signum, frame) -> None:
        self.calls.append(signum)


def test_the_first_signal_is_the_reactors_and_the_second_cuts_the_drain():
    reactor = Clock()
    stopping, previous, cuts = Stopping(reactor), Previous(), []
    stopping._signalled(previous, signal.SIGTERM, None)
    assert previous.calls == [signal.SIGTERM] and cuts == []
    stopping.draining(cuts.append)                # the reactor stops: the drain begins
    reactor.advance(0)
    assert cuts == []
    stopping._signalled(previous, signal.SIGTERM, None)
    assert cuts == []                             # on the reactor's turn, not in the handler
    reactor.advance(0)
    assert cuts == ["a second SIGTERM"] and previous.calls == [signal.SIGTERM]
    stopping._signalled(previous, signal.SIGINT, None)
    reactor.advance(0)
    assert cuts == ["a second SIGTERM"]           # once is enough


def test_a_second_signal_before_the_drain_began_cuts_it_as_it_begins():
    reactor = Clock()
    stopping, previous, cuts = Stopping(reactor), Previous(), []
    stopping._signalled(previous, signal.SIGINT, None)
    stopping._signalled(previous, signal.SIGINT, None)
    reactor.advance(0)
    assert previous.calls == [signal.SIGINT]
    stopping.draining(cuts.append)
    assert cuts == ["a second SIGINT"]


def test_a_worker_told_to_drain_drains_on_its_first_signal_and_ends_on_its_second():
    """systemd's stop signals every process of the unit: a worker may get
    its supervisor's word to drain before its own SIGTERM, or after."""
    reactor = Clock()
    stopping, previous, cuts = Stopping(reactor), Previous(), []
    stopping.draining(cuts.append)                # the supervisor's word
    stopping._signalled(previous, signal.SIGTERM, None)
    reactor.advance(0)
    assert previous.calls == [] and cuts == []    # stopping already: nothing more
    stopping._signalled(previous, signal.SIGTERM, None)
    reactor.advance(0)
    assert cuts == ["a second SIGTERM"]


def test_install_takes_over_the_reactors_handlers_and_a_real_signal_reaches_them():
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    previous = Previous()
    try:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # not the reactor's: left alone
        Stopping(Clock()).install()
        assert signal.getsignal(signal.SIGTERM) is not previous
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)
        wait_until(lambda: previous.calls, 5, "the SIGTERM handler to run")
        assert previous.calls == [signal.SIGTERM]
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


# ---- the order services stop in ------------------------------------------------------------

class Part(service.Service):
    def __init__(self, name: str, order: list[str], stopped=None) -> None:
        self.name = name
        self.order = order
        self.stopped = stopped

    def startService(self) -> None:
        super().startService()
        self.order.append(f"start {self.name}")

    def stopService(self):
        super().stopService()
        self.order.append(f"stop {self.name}")
        return self.stopped


def test_the_socks_side_stops_and_drains_before_the_identd_and_metrics_stop():
    reactor = Clock()
    reactor._exitSignal = signal.SIGTERM          # what the reactor's handler sets
    order: list[str] = []
    listeners_closed: defer.Deferred[None] = defer.Deferred()
    sessions_ended: defer.Deferred[None] = defer.Deferred()
    cuts: list[str] = []

    def drain() -> defer.Deferred[None]:
        order.append("drain")
        return sessions_ended

    draining = Draining(Part("socks", order, listeners_closed), drain, cuts.append, reactor)
    Part("metrics", order).setServiceParent(draining)
    Part("identd", order).setServiceParent(draining)
    draining.startService()
    assert order == ["start socks", "start metrics", "start identd"]
    order.clear()
    stopped = draining.stopService()
    assert order == ["stop socks"]
    listeners_closed.callback(None)
    assert order == ["stop socks", "drain"]
    draining.stopping.now("a second SIGTERM")
    assert cuts == ["a second SIGTERM"]
    sessions_ended.callback(None)
    assert order == ["stop socks", "drain", "stop identd", "stop metrics"]
    assert stopped.called and reactor._exitSignal is None     # twistd exits 0


# ---- a real twistd socks -------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session(proxy_port: int, target: socket.socket, user: bytes = b"",
             password: bytes = b"") -> tuple[socket.socket, socket.socket]:
    """A SOCKS5 CONNECT through the proxy to ``target`` (a listener): the
    client's socket and the target's, the relay running."""
    client = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    if user:
        client.sendall(b"\x05\x01\x02")
        assert recv_exact(client, 2) == b"\x05\x02"
        client.sendall(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
        assert recv_exact(client, 2) == b"\x01\x00"
    else:
        client.sendall(b"\x05\x01\x00")
        assert recv_exact(client, 2) == b"\x05\x00"
    client.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                   + target.getsockname()[1].to_bytes(2, "big"))
    assert recv_exact(client, 10)[1] == 0
    target.settimeout(10)
    inbound, _ = target.accept()
    inbound.settimeout(10)
    assert _relays(client, inbound)
    return client, inbound


def _relays(client: socket.socket, inbound: socket.socket) -> bool:
    try:
        client.sendall(b"ping")
        if recv_exact(inbound, 4) != b"ping":
            return False
        inbound.sendall(b"pong")
        return recv_exact(client, 4) == b"pong"
    except (OSError, AssertionError):
        return False


@pytest.fixture
def target():
    """A listener a session connects to: the test plays the destination."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock


def _start(socks_server, workers: int, extra: str = "", env=None):
    server = socks_server(f"[server]\nworkers = {workers}\n{extra}", env=env)
    for index in range(workers if workers > 1 else 0):
        server.wait_for_log(rf"\] w{index} serving on ")
    return server


def _exits_0(server, within: float) -> float:
    """Waits for twistd's end: its exit status is 0. Returns when it ended."""
    try:
        status = server.process.wait(within)
    except Exception:
        raise AssertionError(f"still running after {within} s:\n{server.log()}") from None
    assert status == 0, f"exit status {status}:\n{server.log()}"
    return time.monotonic()


def _closed(server, workers: int, timeout: float = 5) -> None:
    """Every process serving the port has closed it (Twisted's line)."""
    wait_until(lambda: len(re.findall(rf"Port {server.port} Closed", server.log())) >= workers,
               timeout, lambda: f"the listeners to close:\n{server.log()}")


def _sessions_active(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "socksd_sessions_active":
            return family.samples[0].value
    raise AssertionError(f"no socksd_sessions_active in {text}")


def _ask(port: int, query: bytes) -> bytes:
    """The identd's answer to one query (it keeps the connection for more)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(query)
        answer = b""
        while not answer.endswith(b"\r\n"):
            chunk = sock.recv(1000)
            assert chunk, f"the identd closed after {answer!r}"
            answer += chunk
        return answer.strip()


@pytest.mark.integration
@pytest.mark.parametrize("workers", [1, 2])
def test_a_session_open_at_sigterm_goes_on_until_its_client_closes(
        socks_server, target, tmp_path, workers):
    """New clients are refused at once; the session relays on, its user
    still named by the embedded identd; the metrics endpoint shows it;
    systemd hears STOPPING=1 at the start; twistd exits 0 once it ended."""
    ident_port, metrics_port = _free_port(), _free_port()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    with notify:
        server = _start(socks_server, workers,
                        'methods = ["userpass"]\ncheckers = ["memory:alice:secret"]\n'
                        f'[identd]\nenabled = true\nproxied_users = true\n'
                        f'listen = ["tcp:{ident_port}:interface=127.0.0.1"]\n'
                        f'[metrics]\nlisten = ["tcp:{metrics_port}:interface=127.0.0.1"]\n',
                        env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
        server.wait_for_log(rf"IdentFactory starting on {ident_port}\b")
        assert notify.recv(100) == b"READY=1"
        client, inbound = _session(server.port, target, b"alice", b"secret")
        source_port = inbound.getpeername()[1]
        query = b"%d, %d\r\n" % (source_port, target.getsockname()[1])

        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert notify.recv(100) == b"STOPPING=1"
        _closed(server, workers)
        assert refused(server.port)
        assert time.monotonic() - signalled < 5
        server.wait_for_log(r"stopping: no new sessions; 1 open, closed in 30 s")
        time.sleep(0.5)
        assert _relays(client, inbound), server.log()
        assert _ask(ident_port, query).endswith(b": USERID : UNIX : alice"), server.log()
        assert _sessions_active(metrics_port) == 1
        assert server.process.poll() is None

    client.close()
    assert inbound.recv(10) == b""          # the client's end passed on
    inbound.close()
    _exits_0(server, 10)
    [line] = re.findall(r"user=alice .*", server.log())
    assert line.endswith(" ok"), line
    assert "shutdown" not in server.log()


@pytest.mark.integration
@pytest.mark.parametrize("workers", [1, 2])
def test_a_session_still_open_at_drain_timeout_is_closed_with_outcome_shutdown(
        socks_server, target, workers):
    server = _start(socks_server, workers, "drain_timeout = 2\n")
    client, inbound = _session(server.port, target)
    server.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(1)
    assert _relays(client, inbound), server.log()
    client.settimeout(10)
    assert recv_until_eof(client) == b""          # cut: closed, or reset
    cut = time.monotonic() - signalled
    assert 1.5 < cut < 4, cut
    ended = _exits_0(server, 10)
    assert ended - signalled < 6
    assert re.search(r"connect 127\.0\.0\.1:\d+ up=\d+ down=\d+ \S+ shutdown: "
                     r"drain_timeout \(2 s\) passed\n", server.log()), server.log()
    client.close()
    inbound.close()


@pytest.mark.integration
@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_sigterm_ends_the_drain_at_once(socks_server, target, workers):
    server = _start(socks_server, workers)
    client, inbound = _session(server.port, target)
    server.process.send_signal(signal.SIGTERM)
    server.wait_for_log(r"stopping: no new sessions; 1 open, closed in 30 s")
    assert _relays(client, inbound), server.log()
    server.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    client.settimeout(10)
    assert recv_until_eof(client) == b""
    assert time.monotonic() - signalled < 2
    ended = _exits_0(server, 10)
    assert ended - signalled < 3
    assert re.search(r"up=\d+ down=\d+ \S+ shutdown: a second SIGTERM\n", server.log()), \
        server.log()
    client.close()
    inbound.close()


@pytest.mark.integration
@pytest.mark.parametrize("workers_first", [True, False])
def test_a_sigterm_to_every_process_of_the_unit_drains_all_the_same(
        socks_server, target, workers_first):
    """systemctl stop signals every process of the unit (and Ctrl-C every
    process of the group): a worker that got a SIGTERM of its own, and its
    supervisor's word to drain too, in either order, drains."""
    server = _start(socks_server, 2)
    client, inbound = _session(server.port, target)
    workers = _children(server.process.pid)
    assert len(workers) == 2
    processes = [*workers, server.process.pid] if workers_first else \
        [server.process.pid, *workers]
    for pid in processes:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass        # the worker with nothing to drain, told first, is over already
        time.sleep(0.2)
    server.wait_for_log(r"stopping: no new sessions; 1 open")
    time.sleep(1)
    assert _relays(client, inbound), server.log()
    assert server.process.poll() is None
    client.close()
    assert inbound.recv(10) == b""
    inbound.close()
    _exits_0(server, 10)
    [line] = re.findall(r"connect 127\.0\.0\.1:\d+ up=.*", server.log())
    assert line.endswith(" ok"), line
