"""SIGHUP reloads the configuration file: new sessions get the new settings,
open ones keep theirs, a broken file keeps the running configuration."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent

import fakes
from conftest import TWISTD, recv_exact
from helpers import refused, wait_until
from socksd.auth.hashing import HashPool
from socksd.auth.methods import Backoff
from socksd.auth.registry import method_registry
from socksd.config import ConfigError
from socksd.proxy import Limits
from socksd.rules import RuleSet, compile_rule
from socksd.stats import STATS
from socksd.tap.reload import Reloader, hold_sighup
from test_bind_udp_session import make_factory as udp_factory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(listen: list[str], rules: str = "", extra: str = "") -> str:
    listed = ", ".join(f'"{d}"' for d in listen)
    return f"[server]\nlisten = [{listed}]\n{extra}\n{rules}"


DENY_ECHO = """
[[rules]]
action = "deny"
to = ["127.0.0.1/32"]
ports = ["{port}"]

[[rules]]
action = "allow"
from = ["127.0.0.0/8"]
"""


def _connect(port: int, dest_port: int) -> tuple[socket.socket, int]:
    """A SOCKS5 CONNECT to 127.0.0.1:dest_port: the socket and the reply code."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"\x05\x01\x00")
    assert recv_exact(s, 2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + dest_port.to_bytes(2, "big"))
    reply = recv_exact(s, 10)
    return s, reply[1]


def _echoes(s: socket.socket, data: bytes = b"still here") -> bool:
    try:
        s.sendall(data)
        return recv_exact(s, len(data)) == data
    except OSError:
        return False


def _hup(server) -> None:
    os.kill(server.process.pid, signal.SIGHUP)


@pytest.mark.integration
def test_reload_applies_rules_and_listen_to_new_sessions_only(socks_server, echo_server):
    kept, removed, added = _free_port(), _free_port(), _free_port()
    listen = [f"tcp:{kept}:interface=127.0.0.1", f"tcp:{removed}:interface=127.0.0.1"]
    server = socks_server(_config(listen), add_listen=False)
    server.wait_for_log(f"starting on {removed}")
    open_session, reply = _connect(kept, echo_server)
    assert reply == 0 and _echoes(open_session)
    on_removed, reply = _connect(removed, echo_server)
    assert reply == 0

    server.config_path.write_text(_config(
        [f"tcp:{kept}:interface=127.0.0.1", f"tcp:{added}:interface=127.0.0.1"],
        DENY_ECHO.format(port=echo_server)))
    _hup(server)
    line = server.wait_for_log(r"reloaded (\S+): OK: listen .*; 2 rule\(s\)")
    assert line.group(1) == str(server.config_path)

    # The open sessions go on, on the kept listener and on the removed one.
    assert _echoes(open_session) and _echoes(on_removed)
    # New sessions: the new rules, the new listener; the removed one is closed.
    denied, reply = _connect(kept, echo_server)
    assert reply == 0x02
    denied.close()
    on_added, reply = _connect(added, echo_server)
    assert reply == 0x02
    on_added.close()
    assert refused(removed)
    assert server.process.poll() is None
    for s in (open_session, on_removed):
        s.close()
    server.wait_for_log(r"denied: rule 1 \(deny\)")


@pytest.mark.integration
def test_a_broken_reload_keeps_the_running_configuration(socks_server, echo_server):
    port = _free_port()
    server = socks_server(_config([f"tcp:{port}:interface=127.0.0.1"]), add_listen=False)
    server.config_path.write_text(f"[server]\nlisten = [\"tcp:{port}:interface=127.0.0.1\"]\n"
                                  "max_sessions = -3\n")
    _hup(server)
    line = server.wait_for_log(r"reload failed, kept the running configuration: (.*)")
    assert line.group(1).startswith(f"{server.config_path}:3: server.max_sessions: ")
    assert "Traceback" not in server.log()
    s, reply = _connect(port, echo_server)
    assert reply == 0 and _echoes(s)
    s.close()

    # A listener that cannot be bound fails the reload as a whole: the
    # rules of the same file are not applied either.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        server.config_path.write_text(_config(
            [f"tcp:{port}:interface=127.0.0.1", f"tcp:{busy}:interface=127.0.0.1"],
            DENY_ECHO.format(port=echo_server)))
        _hup(server)
        server.wait_for_log(r"(?m)reload failed, kept the running configuration: cannot listen "
                            rf"on tcp:{busy}:interface=127\.0\.0\.1: address already in use$")
    s, reply = _connect(port, echo_server)
    assert reply == 0
    s.close()
    assert server.process.poll() is None


@pytest.mark.integration
def test_recheck_on_reload_closes_the_sessions_the_new_rules_deny(socks_server, echo_server):
    port = _free_port()
    listen = [f"tcp:{port}:interface=127.0.0.1"]
    server = socks_server(_config(listen, extra="recheck_on_reload = true"), add_listen=False)
    s, reply = _connect(port, echo_server)
    assert reply == 0 and _echoes(s)
    server.config_path.write_text(_config(listen, DENY_ECHO.format(port=echo_server),
                                          extra="recheck_on_reload = true"))
    _hup(server)
    server.wait_for_log("reloaded ")
    server.wait_for_log(r"connect 127\.0\.0\.1:\d+ .* denied after reload: rule 1 \(deny\)")
    s.settimeout(5)
    try:
        assert s.recv(1) == b""
    except ConnectionResetError:
        pass    # cut off: aborted, as a stalled session is
    s.close()


@pytest.mark.integration
def test_with_workers_each_worker_reloads_and_a_new_listen_needs_a_restart(socks_server,
                                                                          echo_server):
    port = _free_port()
    listen = [f"tcp:{port}:interface=127.0.0.1"]
    server = socks_server(_config(listen, extra="workers = 2"), add_listen=False)
    server.wait_for_log(r"w1 serving")
    server.wait_for_log(r"w0 serving")
    s, reply = _connect(port, echo_server)
    assert reply == 0
    server.config_path.write_text(_config(listen, DENY_ECHO.format(port=echo_server),
                                          extra="workers = 2"))
    _hup(server)
    server.wait_for_log(r"w0 reloaded ")
    server.wait_for_log(r"w1 reloaded ")
    # Every new session, whichever worker takes it, is under the new rules.
    for _ in range(12):
        denied, reply = _connect(port, echo_server)
        assert reply == 0x02
        denied.close()
    assert _echoes(s)
    s.close()

    server.config_path.write_text(_config(listen + ["tcp:0:interface=127.0.0.1"],
                                          extra="workers = 2"))
    _hup(server)
    server.wait_for_log(r"reload failed, kept the running configuration: .*server\.listen: "
                        r"changed.*restart")
    denied, reply = _connect(port, echo_server)
    assert reply == 0x02
    denied.close()
    assert server.process.poll() is None


@pytest.mark.integration
def test_twistd_identd_reloads_its_config(tmp_path):
    port, added = _free_port(), _free_port()
    path = tmp_path / "identd.toml"
    path.write_text(f"[identd]\nlisten = [\"tcp:{port}:interface=127.0.0.1\"]\n")
    log = tmp_path / "identd.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([TWISTD, "-n", "--pidfile=", "identd", "--config", str(path)],
                                   stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_until(lambda: f"starting on {port}" in log.read_text(), 20)
        path.write_text(f"[identd]\nlisten = [\"tcp:{added}:interface=127.0.0.1\"]\n"
                        "reply = \"hidden\"\n")
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded " in log.read_text(), 10, lambda: log.read_text())
        assert refused(port)
        with socket.create_connection(("127.0.0.1", added), timeout=5) as s:
            s.sendall(b"1, 1\r\n")
            assert b"ERROR" in s.recv(1000)
        path.write_text("[identd]\nlisten = 3\n")
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload failed, kept the running configuration" in log.read_text(),
                   10, lambda: log.read_text())
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(10)


# The parts, on a memory reactor.

CONNECT_IP = b"\x05\x01\x00\x01\x5d\xb8\xd8\x22\x00\x50"     # 93.184.216.34:80
CONNECT_NAME = b"\x05\x01\x00\x03\x0bexample.com\x00\x50"   # example.com:80
DENY_ALL = RuleSet([compile_rule("nothing", "deny")])


def _serve(factory, rules=DENY_ALL, limits=Limits(), methods=None) -> None:
    factory.serve(methods=methods or factory.methods, rules=rules, limits=limits,
                  socks4=factory.serving.socks4, registry=None, trusted_proxies=())


def test_a_session_in_its_handshake_finishes_under_the_settings_it_started_with():
    factory, reactor = fakes.make_factory()
    started = fakes.Client(factory)
    _serve(factory, methods=[method_registry(fakes.alice_portal())["userpass"]])
    # Before: "none" and the default rules; the new ones require a password
    # and deny everything.
    started.send(b"\x05\x01\x00")
    assert started.take() == b"\x05\x00"
    started.send(CONNECT_IP)
    assert len(reactor.tcpClients) == 1
    late = fakes.Client(factory)
    late.send(b"\x05\x01\x00")
    assert late.take() == b"\x05\xff"


@pytest.mark.parametrize("request_, denied", [
    (CONNECT_IP, RuleSet([compile_rule("not-there", "deny", destinations=["93.184.216.0/24"]),
                          compile_rule("rest", "allow")])),
    (CONNECT_NAME, RuleSet([compile_rule("not-there", "deny", destinations=["example.com"]),
                            compile_rule("rest", "allow")])),
])
def test_recheck_closes_relays_the_new_rules_deny_and_keeps_the_others(request_, denied):
    factory, reactor = fakes.make_factory()
    with capturedLogs() as events:
        client = fakes.socks5_client(factory, request_)
        if request_ is CONNECT_NAME:
            reactor.nameResolver.answer("93.184.216.34")
        out = fakes.Outbound(reactor)
        out.accept()
        other = fakes.socks5_client(factory, b"\x05\x01\x00\x01\x0a\x00\x00\x09\x00\x50",
                                    peer=fakes.PEER)
        other_out = fakes.Outbound(reactor)
        other_out.accept()
        waiting = fakes.socks5_client(factory, CONNECT_IP)   # not connected yet
        _serve(factory, rules=denied)
        factory.recheck()
        assert client.closing
        assert not other.closing and not waiting.closing
        client.lose()
        out.protocol.connectionLost(None)
    [line] = fakes.session_lines(events)
    assert "denied after reload: not-there (deny)" in line


def test_recheck_of_a_udp_association():
    factory, reactor = udp_factory()
    allowed = fakes.socks5_client(factory, b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
    assert allowed.take()[:2] == b"\x05\x00"
    _serve(factory, rules=RuleSet([compile_rule("no-udp", "deny", commands=["udp"]),
                                   compile_rule("rest", "allow")]))
    with capturedLogs() as events:
        factory.recheck()
        assert allowed.closing
        allowed.lose()
    [line] = fakes.session_lines(events)
    assert "denied after reload: no rule allows udp" in line


def test_recheck_gives_a_udp_association_the_new_rules():
    factory, reactor = udp_factory()
    client = fakes.socks5_client(factory, b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
    session = client.session
    new = RuleSet([compile_rule("udp-here", "allow", destinations=["10.0.0.0/8"])])
    _serve(factory, rules=new)
    factory.recheck()
    assert not client.closing
    assert session.udp.rules.rules is new


class _Clock(MemoryReactorClock):
    def callFromThread(self, f, *args, **kwargs):
        self.callLater(0, f, *args, **kwargs)


def test_reloader_reports_each_reload_and_never_stops():
    reactor = _Clock()
    outcomes = iter([lambda: "a: OK", lambda: (_ for _ in ()).throw(ConfigError("f:1: k: bad")),
                     lambda: 1 / 0, lambda: defer.succeed("b: OK")])
    reloader = Reloader(lambda: next(outcomes)(), reactor)
    reloader.running = True
    before = dict(STATS.reloads)
    with capturedLogs() as events:
        for _ in range(4):
            reloader.now()
    lines = [formatEvent(e) for e in events]
    assert lines[0] == "reloaded a: OK"
    assert lines[1] == "reload failed, kept the running configuration: f:1: k: bad"
    assert lines[2].startswith("reload failed, kept the running configuration: ")
    assert events[2].get("log_failure") is not None     # unexpected: with its traceback
    assert lines[3] == "reloaded b: OK"
    assert STATS.reloads["ok"] - before.get("ok", 0) == 2
    assert STATS.reloads["failed"] - before.get("failed", 0) == 2


def test_a_hup_during_a_reload_makes_one_more_after_it():
    reactor = _Clock()
    pending: list[defer.Deferred] = []

    def reload():
        pending.append(defer.Deferred())
        return pending[-1]

    reloader = Reloader(reload, reactor)
    reloader.running = True
    reloader.now()
    reloader.now()
    reloader.now()
    assert len(pending) == 1
    pending[0].callback("x")
    assert len(pending) == 2      # the two HUPs meanwhile: one reload
    pending[1].callback("y")
    assert len(pending) == 2


def test_reload_keeps_failed_logins_and_resizes_the_password_pool():
    backoff = Backoff(1.0, 30.0, clients=5)
    for n in range(4):
        backoff.failed(f"10.0.0.{n}", 100.0)
    backoff.resize(2.0, 60.0, 2)
    assert list(backoff.failures) == ["10.0.0.2", "10.0.0.3"]
    assert backoff.wait("10.0.0.3", 100.5) == (1, 0.5)
    pool = HashPool(2, 4, 1, run_in_thread=lambda call: defer.Deferred())
    for n in range(3):
        pool.run(f"c{n}", lambda: None)
    assert pool.running == 2
    pool.resize(3, 8, 2)
    assert pool.running == 3 and (pool.limit, pool.per_client) == (8, 2)


@pytest.mark.integration
def test_a_reload_switches_the_log_format(socks_server, echo_server):
    port = _free_port()
    listen = [f"tcp:{port}:interface=127.0.0.1"]
    server = socks_server(_config(listen), add_listen=False)
    server.config_path.write_text(_config(listen) + "\n[log]\nformat = \"json\"\n")
    _hup(server)
    server.wait_for_log(r'"event": ?"reloaded ')
    s, reply = _connect(port, echo_server)
    assert reply == 0 and _echoes(s)
    s.close()
    line = server.wait_for_log(r'\{[^\n]*"outcome": ?"ok"[^\n]*\}')
    assert json.loads(line.group(0))["destination"] == f"127.0.0.1:{echo_server}"


def test_a_reload_during_the_handshake_judges_the_session_when_its_relay_starts():
    factory, reactor = fakes.make_factory()
    client = fakes.socks5_client(factory, CONNECT_IP)     # connecting: not judged again yet
    _serve(factory, rules=RuleSet([compile_rule("not-there", "deny",
                                                destinations=["93.184.216.0/24"]),
                                   compile_rule("rest", "allow")]))
    factory.serving.recheck_on_reload = True
    factory.recheck()
    assert not client.closing
    with capturedLogs() as events:
        out = fakes.Outbound(reactor)
        out.accept()
        assert client.closing
        client.lose()
        out.protocol.connectionLost(None)
    [line] = fakes.session_lines(events)
    assert "denied after reload: not-there (deny)" in line


def test_a_hup_at_start_up_is_kept_and_made_a_reload_once_the_reactor_runs():
    previous = signal.getsignal(signal.SIGHUP)
    try:
        hold_sighup()       # what the options do, before the config is read
        os.kill(os.getpid(), signal.SIGHUP)     # systemd's ExecReload, right after the start
        reloads: list[str] = []
        reactor = _Clock()
        reloader = Reloader(lambda: reloads.append("reloaded") or "x: OK", reactor)
        reloader.startService()
        reactor.advance(0)
        assert reloads == ["reloaded"]
        reloader.stopService()
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.integration
def test_reloads_while_a_worker_restarts_end_no_worker(socks_server, echo_server):
    from test_workers import _worker_pids

    port = _free_port()
    server = socks_server(_config([f"tcp:{port}:interface=127.0.0.1"], extra="workers = 2"),
                          add_listen=False)
    pids = wait_until(lambda: (p := _worker_pids(server.process.pid)) and len(p) == 2 and p, 15)
    os.kill(pids[0], signal.SIGKILL)
    server.wait_for_log(r"worker \d ended")
    for _ in range(30):      # through the restart, while the new worker starts
        _hup(server)
        time.sleep(0.1)
    wait_until(lambda: (p := _worker_pids(server.process.pid)) and len(p) == 2 and p, 15)
    time.sleep(1)
    assert "process ended by signal 1" not in server.log()
    assert server.log().count("ended (") == 1
    s, reply = _connect(port, echo_server)
    assert reply == 0
    s.close()


def _denied_by_both_workers(server, port: int, dest_port: int, since: int) -> None:
    """SOCKS5 CONNECTs to dest_port are denied until each worker has logged
    one of those denials after log offset ``since`` (the kernel spreads
    connections by their source ports); one allowed fails the test. A
    worker sends its lines in batches (up to 20 ms late), so the attempts
    are spread over time as well as over source ports."""
    for _ in range(120):
        s, reply = _connect(port, dest_port)
        s.close()
        assert reply == 0x02, server.log()[since:]
        if {"w0", "w1"} <= set(re.findall(r"\] (w\d) 127\.0\.0\.1:\d+ socks5 .* denied: rule 1",
                                          server.log()[since:])):
            return
        time.sleep(0.025)
    raise AssertionError(f"denials by one worker only:\n{server.log()[since:]}")


@pytest.mark.integration
def test_workers_run_the_text_the_supervisor_validated(socks_server, echo_server):
    """A worker never reads the file: one restarted runs the configuration
    of the last good reload, whatever the file says by then (changed, or
    broken), and a SIGHUP sent to a worker itself reloads nothing."""
    from test_workers import _worker_pids

    def restarted(old: int) -> list[int]:
        pids = wait_until(lambda: (p := _worker_pids(server.process.pid)) and len(p) == 2
                          and old not in p and p, 20)
        wait_until(lambda: server.log().count(" serving on ") >= serving + 1, 20, server.log)
        return pids

    port = _free_port()
    listen = [f"tcp:{port}:interface=127.0.0.1"]
    server = socks_server(_config(listen, extra="workers = 2"), add_listen=False)
    pids = wait_until(lambda: (p := _worker_pids(server.process.pid)) and len(p) == 2 and p, 15)
    server.config_path.write_text(_config(listen, DENY_ECHO.format(port=echo_server),
                                          extra="workers = 2"))
    _hup(server)
    server.wait_for_log(r"w0 reloaded ")
    server.wait_for_log(r"w1 reloaded ")
    _denied_by_both_workers(server, port, echo_server, 0)

    # Changed since, not reloaded: a worker restarted now runs what was reloaded.
    server.config_path.write_text(_config(listen, extra="workers = 2"))
    serving = server.log().count(" serving on ")
    since = len(server.log())
    os.kill(pids[0], signal.SIGKILL)
    pids = restarted(pids[0])
    _denied_by_both_workers(server, port, echo_server, since)

    # A HUP to the workers themselves: noted, and nothing read.
    since = len(server.log())
    for pid in pids:
        os.kill(pid, signal.SIGHUP)
    for index in (0, 1):
        server.wait_for_log(rf"w{index} SIGHUP ignored: the supervisor \(pid "
                            rf"{server.process.pid}\) reloads")
    _denied_by_both_workers(server, port, echo_server, since)
    assert "reloaded" not in server.log()[since:]

    # Broken now, and a reload refused: a worker restarted still starts, on
    # the last good one.
    server.config_path.write_text("[server\n")
    _hup(server)
    server.wait_for_log(r"reload failed, kept the running configuration: .*not valid TOML")
    serving = server.log().count(" serving on ")
    since = len(server.log())
    os.kill(pids[1], signal.SIGKILL)
    restarted(pids[1])
    _denied_by_both_workers(server, port, echo_server, since)
    time.sleep(1)
    assert server.log()[since:].count(" ended (") == 1, server.log()[since:]

    # And the next good reload reaches every worker.
    server.config_path.write_text(_config(listen, extra="workers = 2"))
    since = len(server.log())
    _hup(server)
    wait_until(lambda: all(f"w{index} reloaded " in server.log()[since:] for index in (0, 1)),
               10, server.log)
    for _ in range(12):
        s, reply = _connect(port, echo_server)
        assert reply == 0 and _echoes(s)
        s.close()


@pytest.mark.integration
def test_workers_check_the_file_against_the_listeners_the_command_line_gave(socks_server,
                                                                            echo_server):
    """The file's own listen (a haproxy: one, with nobody trusted) is
    replaced by --listen: the twistd process accepts it, and so must each
    worker, at its start and at a reload (they restarted for ever)."""
    port = _free_port()
    config = _config(["haproxy:tcp:1080:interface=127.0.0.1"], extra="workers = 2")
    server = socks_server(config, "--listen", f"tcp:{port}:interface=127.0.0.1",
                          add_listen=False)
    server.wait_for_log(r"w1 serving")
    server.wait_for_log(r"w0 serving")
    s, reply = _connect(port, echo_server)
    assert reply == 0 and _echoes(s)
    s.close()
    _hup(server)
    server.wait_for_log(r"w0 reloaded ")
    server.wait_for_log(r"w1 reloaded ")
    assert "cannot start" not in server.log() and "ended" not in server.log()
