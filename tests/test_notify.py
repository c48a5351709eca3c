"""systemd's readiness protocol (socksd.tap.notify): datagrams on a real
AF_UNIX socket bound by the test, at a path and at an abstract name, and
what the notifier says when, driven by a memory reactor."""

from __future__ import annotations

import socket
import time

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent

from helpers import notify_listener
from socksd.config import ConfigError
from socksd.tap.notify import Notifier, notify
from socksd.tap.reload import Reloader


@pytest.fixture(params=["path", "abstract"])
def systemd(request, tmp_path):
    """A socket listening as systemd's does; yields (NOTIFY_SOCKET, socket)."""
    with notify_listener(request.param, str(tmp_path), timeout=5) as listening:
        yield listening


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting, without waiting for more."""
    found = []
    sock.setblocking(False)
    try:
        while True:
            found.append(sock.recv(4096).decode())
    except BlockingIOError:
        return found
    finally:
        sock.settimeout(5)


def test_a_state_reaches_the_socket_named_by_notify_socket(systemd):
    address, sock = systemd
    notify(address, "READY=1")
    assert sock.recv(4096) == b"READY=1"


def test_a_relative_path_is_refused_as_sd_notify_refuses_it(tmp_path):
    with pytest.raises(OSError, match="not a path nor an abstract socket name"):
        notify("notify", "READY=1")


def test_a_socket_nobody_listens_on_is_an_error_logged_not_raised(tmp_path, log_events):
    environ = {"NOTIFY_SOCKET": str(tmp_path / "gone")}
    notifier = Notifier(reactor=MemoryReactorClock(), environ=environ)
    notifier.send("READY=1")
    lines = [formatEvent(e) for e in log_events]
    assert any(line.startswith("cannot tell systemd READY=1 at NOTIFY_SOCKET ") for line in lines)


def test_the_notifier_takes_notify_socket_out_of_the_environment(systemd):
    """Its workers, and whatever else it starts, never see it: only the
    main process tells systemd."""
    address, _sock = systemd
    environ = {"NOTIFY_SOCKET": address, "PATH": "/bin"}
    notifier = Notifier(reactor=MemoryReactorClock(), environ=environ)
    assert environ == {"PATH": "/bin"} and notifier.address == address


def test_without_notify_socket_nothing_is_sent(log_events):
    notifier = Notifier(reactor=MemoryReactorClock(), environ={})
    notifier.send("READY=1")
    assert notifier.address is None and log_events == []


def _running(systemd, serving=None):
    address, sock = systemd
    reactor = MemoryReactorClock()
    notifier = Notifier(serving, reactor=reactor, environ={"NOTIFY_SOCKET": address})
    notifier.startService()
    return notifier, reactor, sock


def test_ready_once_the_reactor_runs_then_stopping(systemd):
    notifier, reactor, sock = _running(systemd)
    assert received(sock) == []               # bound, but not accepting yet
    reactor.run()
    assert received(sock) == ["READY=1"]
    notifier.stopService()
    assert received(sock) == ["STOPPING=1"]


def test_with_workers_ready_waits_for_every_worker(systemd):
    serving: defer.Deferred[None] = defer.Deferred()
    notifier, reactor, sock = _running(systemd, lambda: serving)
    reactor.run()
    assert received(sock) == []
    serving.callback(None)
    assert received(sock) == ["READY=1"]


def test_stopped_before_the_workers_serve_it_never_says_ready(systemd):
    serving: defer.Deferred[None] = defer.Deferred()
    notifier, reactor, sock = _running(systemd, lambda: serving)
    reactor.run()
    notifier.stopService()
    serving.callback(None)
    assert received(sock) == ["STOPPING=1"]


def _reloads(outcome):
    """What a reload that ``outcome`` tells systemd."""
    def reload():
        if isinstance(outcome, Exception):
            raise outcome
        return outcome
    return reload


@pytest.mark.parametrize("outcome", [
    "the new file's summary",
    ConfigError("f.toml:3: server.max_sessions: -3 must be at least 1"),
    RuntimeError("a bug"),
])
def test_a_reload_says_reloading_then_ready_whether_applied_or_not(systemd, outcome):
    notifier, reactor, sock = _running(systemd)
    reactor.run()
    reloader = Reloader(_reloads(outcome), reactor=reactor, notifier=notifier)
    reloader.startService()
    try:
        assert received(sock) == ["READY=1"]
        reloader.now()
        reloading, ready = received(sock)
        lines = reloading.split("\n")
        assert lines[0] == "RELOADING=1" and ready == "READY=1"
        # sd_notify(3): the monotonic clock in microseconds, when it was sent.
        key, value = lines[1].split("=")
        assert key == "MONOTONIC_USEC" and 0 < int(value) <= time.monotonic_ns() // 1000
    finally:
        reloader.stopService()


def test_a_reload_before_ready_says_nothing_of_it(systemd):
    """systemd still waits for the start's READY=1: a RELOADING=1 now would
    end the start with the reload's READY=1, before the workers serve."""
    serving: defer.Deferred[None] = defer.Deferred()
    notifier, reactor, sock = _running(systemd, lambda: serving)
    reactor.run()
    reloader = Reloader(_reloads("ok"), reactor=reactor, notifier=notifier)
    reloader.startService()
    try:
        reloader.now()
        assert received(sock) == []
        serving.callback(None)
        assert received(sock) == ["READY=1"]
    finally:
        reloader.stopService()


def test_a_reload_that_takes_time_says_ready_when_it_is_over(systemd):
    notifier, reactor, sock = _running(systemd)
    reactor.run()
    pending: defer.Deferred[str] = defer.Deferred()
    reloader = Reloader(lambda: pending, reactor=reactor, notifier=notifier)
    reloader.startService()
    try:
        received(sock)
        reloader.now()
        assert [state.split("\n")[0] for state in received(sock)] == ["RELOADING=1"]
        pending.callback("bound")
        assert received(sock) == ["READY=1"]
    finally:
        reloader.stopService()
