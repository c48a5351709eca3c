"""[metrics]: /metrics for Prometheus, parsed with prometheus_client's own parser."""

from __future__ import annotations

import os
import re
import signal
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import fakes
from conftest import recv_exact, recv_until_eof, run_socks
from helpers import wait_until
from socksd.stats import OUTCOMES, Stats, outcome_label
from socksd.tap.metrics import SocksCollector, registry

CONNECT_IP = b"\x05\x01\x00\x01\x5d\xb8\xd8\x22\x00\x50"     # 93.184.216.34:80


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _collected(collector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in collector.collect():
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_every_session_outcome_has_a_label_from_the_closed_set():
    outcomes = ["ok", "denied", "denied after reload", "auth failed", "no acceptable method",
                "connect failed", "bind failed", "udp failed", "handshake timeout",
                "idle timeout", "udp idle timeout", "stalled", "refused", "client closed",
                "connection lost", "bad request", "command not supported", "gssapi", "error",
                "shutdown"]
    assert {outcome_label(o) for o in outcomes} == set(OUTCOMES)
    assert outcome_label("shutdown") == "shutdown"      # not a client's error


def test_labels_never_carry_what_a_client_made_up():
    stats = Stats()
    stats.session_ended(5, "\x1bfoo", "ok", "mallory", False, "userpass", 10, 20, False)
    stats.session_ended(4, "connect", "ok", "alice", True, "ident", 1, 2, True)
    assert set(stats.sessions()) == {("socks5", "other", "ok", "-"),
                                     ("socks4", "connect", "ok", "-")}
    stats.per_user = True
    stats.session_ended(5, "connect", "auth failed", "mallory", False, "userpass", 0, 0, False)
    stats.session_ended(5, "connect", "ok", "alice", True, "userpass", 3, 4, False)
    assert ("socks5", "connect", "auth_failed", "-") in stats.sessions()
    assert ("socks5", "connect", "ok", "alice") in stats.sessions()
    assert stats.bytes[("up", "alice")] == 3 and stats.auth_failures() == {"userpass": 1}
    assert stats.splice_sessions == 1


def test_bytes_of_an_open_session_are_counted_as_they_move():
    factory, reactor = fakes.make_factory()
    stats = Stats()
    collector = SocksCollector(factory, stats, reactor)
    client = fakes.socks5_client(factory, CONNECT_IP)
    out = fakes.Outbound(reactor)
    out.accept()
    client.send(b"x" * 1000)
    out.protocol.dataReceived(b"y" * 300)
    got = _collected(collector)
    assert got[("socksd_relayed_bytes_total", (("direction", "up"),))] == 1000
    assert got[("socksd_relayed_bytes_total", (("direction", "down"),))] == 300
    assert got[("socksd_sessions_active", ())] == 1


def test_the_registry_has_the_process_metrics():
    names = {family.name for family in registry(None).collect()}
    assert {"process_cpu_seconds", "process_resident_memory_bytes",
            "process_open_fds"} <= names
    assert "socksd_sessions_active" in names


@pytest.mark.integration
def test_a_bad_metrics_endpoint_is_a_config_error(tmp_path):
    path = tmp_path / "socksd.toml"
    path.write_text("[metrics]\nlisten = [\"tcp:99999\"]\n")
    result = run_socks("--config", str(path), "--check", cwd=tmp_path)
    assert result.returncode != 0
    assert f"{path}:2: metrics.listen: 'tcp:99999'" in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return _samples(response.read().decode())


def _connect(port: int, dest_port: int) -> tuple[socket.socket, int]:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"\x05\x01\x00")
    assert recv_exact(s, 2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + dest_port.to_bytes(2, "big"))
    return s, recv_exact(s, 10)[1]


@pytest.mark.integration
def test_metrics_are_scraped_from_a_running_proxy(socks_server, echo_server):
    metrics_port = _free_port()
    config = (f"[server]\nsplice = false\n[metrics]\nlisten = [\"tcp:{metrics_port}:"
              "interface=127.0.0.1\"]\n"
              "[[rules]]\naction = \"deny\"\nports = [\"9\"]\n"
              "[[rules]]\naction = \"allow\"\nfrom = [\"127.0.0.0/8\"]\n")
    server = socks_server(config)
    server.wait_for_log(f"starting on {metrics_port}")
    open_session, reply = _connect(server.port, echo_server)
    assert reply == 0
    open_session.sendall(b"a" * 5000)
    assert recv_exact(open_session, 5000) == b"a" * 5000
    # A transfer still running: its bytes so far.
    during = _scrape(metrics_port)
    assert during[("socksd_sessions_active", ())] == 1
    assert during[("socksd_relayed_bytes_total", (("direction", "up"),))] >= 5000
    assert during[("socksd_relayed_bytes_total", (("direction", "down"),))] >= 5000
    open_session.close()
    denied, reply = _connect(server.port, 9)
    assert reply == 0x02
    denied.close()
    server.wait_for_log("denied: rule 1")
    wait_until(lambda: _scrape(metrics_port)[("socksd_sessions_active", ())] == 0, 10)
    after = _scrape(metrics_port)
    assert after[("socksd_sessions_total", (("command", "connect"), ("outcome", "ok"),
                                            ("version", "socks5")))] == 1
    assert after[("socksd_sessions_total", (("command", "connect"), ("outcome", "denied"),
                                            ("version", "socks5")))] == 1
    assert after[("socksd_relayed_bytes_total", (("direction", "up"),))] == 5000
    assert after[("socksd_handshake_seconds_count", ())] == 1
    assert after[("socksd_connect_seconds_count", ())] == 1
    assert after[("process_open_fds", ())] > 0
    assert ("socksd_name_lookups_in_flight", ()) in after

    os.kill(server.process.pid, signal.SIGHUP)
    server.wait_for_log("reloaded ")
    assert _scrape(metrics_port)[("socksd_config_reloads_total", (("result", "ok"),))] == 1
    assert "GET /metrics" not in server.log()     # no access-log line per scrape


def test_per_user_off_after_on_sums_into_one_series_each():
    stats = Stats()
    stats.per_user = True
    stats.session_ended(5, "connect", "ok", "alice", True, "userpass", 3, 4, False)
    stats.session_ended(5, "connect", "ok", "bob", True, "userpass", 5, 6, False)
    stats.session_ended(4, "connect", "ok", "carol", True, "ident", 1, 1, False)
    with_users = _collected(SocksCollector(None, stats))
    assert with_users[("socksd_sessions_total", (("command", "connect"), ("outcome", "ok"),
                                                 ("user", "alice"), ("version", "socks5")))] == 1
    # A USERID the client's own identd confirmed is not a label.
    assert with_users[("socksd_sessions_total", (("command", "connect"), ("outcome", "ok"),
                                                 ("user", "-"), ("version", "socks4")))] == 1
    stats.per_user = False      # a reload turned it off
    families = list(SocksCollector(None, stats).collect())
    for family in families:
        labels = [tuple(sorted(s.labels.items())) + (s.name,) for s in family.samples]
        assert len(labels) == len(set(labels)), family.name
    without = _collected(SocksCollector(None, stats))
    assert without[("socksd_sessions_total", (("command", "connect"), ("outcome", "ok"),
                                              ("version", "socks5")))] == 2
    assert without[("socksd_relayed_bytes_total", (("direction", "up"),))] == 9


@pytest.mark.integration
def test_the_metrics_endpoint_serves_one_bodiless_get_per_connection(socks_server):
    from conftest import recv_until_eof

    metrics_port = _free_port()
    server = socks_server(f"[metrics]\nlisten = [\"tcp:{metrics_port}:interface=127.0.0.1\"]\n")
    server.wait_for_log(f"starting on {metrics_port}")
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 50)    # pipelined
        answer = recv_until_eof(s)
    assert answer.count(b"HTTP/1.1 200") == 1 and b"socksd_sessions_active" in answer
    assert b"TwistedWeb" not in answer
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=10) as s:
        s.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 30000000\r\n\r\n")
        s.sendall(b"x" * 65536)
        assert b"HTTP" not in recv_until_eof(s)                        # closed, not read
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=10) as s:
        s.sendall(b"GET /metrics/more HTTP/1.1\r\nHost: x\r\n\r\n")
        assert recv_until_eof(s).startswith(b"HTTP/1.1 404")


# ---- workers = 2: the supervisor's endpoint sums the workers' counts ----------------------

def _echoed(port: int, dest_port: int, user: tuple[bytes, bytes] | None = None,
            size: int = 1000) -> None:
    """A SOCKS5 session to the echo server (RFC 1929 with ``user``):
    ``size`` bytes up and back, then both ends closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        if user is None:
            s.sendall(b"\x05\x01\x00")
            assert recv_exact(s, 2) == b"\x05\x00"
        else:
            s.sendall(b"\x05\x01\x02")
            assert recv_exact(s, 2) == b"\x05\x02"
            name, password = user
            s.sendall(bytes((1, len(name))) + name + bytes((len(password),)) + password)
            assert recv_exact(s, 2) == b"\x01\x00"
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                  + dest_port.to_bytes(2, "big"))
        assert recv_exact(s, 10)[1] == 0
        s.sendall(b"e" * size)
        assert recv_exact(s, size) == b"e" * size
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == b""


def _ended_ok(server, since: int = 0) -> list[str]:
    """The workers (w0, w1) of the sessions logged as ended ok, in order."""
    return re.findall(r"\] (w\d) 127\.0\.0\.1:\d+ socks5 .* ok\n", server.log()[since:])


def _sessions_ok(found: dict) -> float:
    return sum(value for (name, labels), value in found.items()
               if name == "socksd_sessions_total" and ("outcome", "ok") in labels)


def _never_less(before: dict, after: dict) -> None:
    """Every socksd counter of ``before`` is in ``after``, no smaller (a
    worker's own process series start again from 0 when it is restarted)."""
    for (name, labels), value in before.items():
        if name.startswith("socksd_") and not name.startswith("socksd_worker_") \
                and name.endswith(("_total", "_bucket", "_count", "_sum")):
            assert after.get((name, labels), -1) >= value, (name, labels, value)


@pytest.mark.integration
def test_metrics_with_workers_are_the_sum_of_every_workers(socks_server, echo_server):
    from test_workers import _worker_pids

    metrics_port = _free_port()
    server = socks_server(
        '[server]\nworkers = 2\nsplice = false\nmethods = ["userpass", "none"]\n'
        'checkers = ["memory:alice:secret"]\n'
        f'[metrics]\nlisten = ["tcp:{metrics_port}:interface=127.0.0.1"]\nper_user = true\n')
    server.wait_for_log(f"starting on {metrics_port}")
    for index in (0, 1):
        server.wait_for_log(rf"\] w{index} serving on ")
    alice = 0
    for number in range(80):
        user = (b"alice", b"secret") if number % 2 else None
        _echoed(server.port, echo_server, user)
        alice += user is not None
        if number >= 7 and set(_ended_ok(server)) == {"w0", "w1"}:
            break
    sessions = number + 1
    assert set(_ended_ok(server)) == {"w0", "w1"}, server.log()    # both served some
    wait_until(lambda: len(_ended_ok(server)) == sessions, 10, server.log)
    found = _scrape(metrics_port)
    assert found[("socksd_sessions_active", ())] == 0

    def ok(user: str) -> tuple:
        return ("socksd_sessions_total", (("command", "connect"), ("outcome", "ok"),
                                          ("user", user), ("version", "socks5")))

    assert found[ok("alice")] == alice and found[ok("-")] == sessions - alice
    assert found[("socksd_relayed_bytes_total", (("direction", "up"), ("user", "alice")))] \
        == 1000 * alice
    assert sum(v for (name, labels), v in found.items()
               if name == "socksd_relayed_bytes_total" and ("direction", "down") in labels) \
        == 1000 * sessions
    assert found[("socksd_handshake_seconds_count", ())] == sessions
    assert found[("socksd_connect_seconds_count", ())] == sessions
    # Each worker's process, by its index, and the supervisor's own.
    assert len(_worker_pids(server.process.pid)) == 2
    for worker in ("0", "1"):
        label = (("worker", worker),)
        assert found[("socksd_worker_resident_bytes", label)] > 1 << 20
        assert found[("socksd_worker_open_fds", label)] > 3
        assert found[("socksd_worker_cpu_seconds_total", label)] > 0
    assert found[("process_open_fds", ())] > 0
    assert found[("socksd_worker_malformed_frames_total", ())] == 0


@pytest.mark.integration
def test_metrics_never_go_back_when_workers_are_restarted(socks_server, echo_server):
    """A worker killed loses what it counted since the last scrape, no
    more; one stopped cleanly loses nothing; no counter ever goes back."""
    from test_workers import _worker_pids

    def pids_after(old: list[int]) -> list[int]:
        return wait_until(lambda: (p := _worker_pids(server.process.pid)) and len(p) == 2
                          and not set(old) & set(p) and p, 20)

    metrics_port = _free_port()
    server = socks_server(f"[server]\nworkers = 2\n[metrics]\nlisten = [\"tcp:{metrics_port}:"
                          "interface=127.0.0.1\"]\n")
    pids = wait_until(lambda: (p := _worker_pids(server.process.pid)) and len(p) == 2 and p, 15)
    for index in (0, 1):
        server.wait_for_log(rf"\] w{index} serving on ")
    for _ in range(10):
        _echoed(server.port, echo_server)
    wait_until(lambda: len(_ended_ok(server)) == 10, 10, server.log)
    before = _scrape(metrics_port)
    assert _sessions_ok(before) == 10

    for _ in range(6):
        _echoed(server.port, echo_server)
    wait_until(lambda: len(_ended_ok(server)) == 16, 10, server.log)
    os.kill(pids[0], signal.SIGKILL)
    server.wait_for_log(r"worker \d ended ")
    pids = pids_after([pids[0]])
    after_kill = _scrape(metrics_port)
    _never_less(before, after_kill)
    counted = _sessions_ok(after_kill)
    assert 10 <= counted <= 16

    for _ in range(8):
        _echoed(server.port, echo_server)
    wait_until(lambda: len(_ended_ok(server)) == 24, 10, server.log)
    for pid in pids:      # each stopped cleanly, not scraped since: its last report is sent
        since = server.log().count(" ended (")
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda since=since: server.log().count(" ended (") > since, 15, server.log)
    pids_after(pids)
    final = _scrape(metrics_port)
    _never_less(after_kill, final)
    assert _sessions_ok(final) == counted + 8
    assert final[("socksd_sessions_active", ())] == 0
    assert "malformed" not in server.log()


def test_a_scraper_that_trickles_bytes_is_closed_at_its_deadline():
    """The web server's own timeout is one of inactivity: a byte a second
    would keep the place for ever, and eight of them lock Prometheus out."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionDone
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    from socksd.tap.metrics import MAX_SCRAPERS, SCRAPE_TIMEOUT, site

    clock = Clock()
    factory = site(registry(None), reactor=clock)
    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    held = []
    for _ in range(MAX_SCRAPERS):
        protocol = factory.buildProtocol(peer)
        transport = StringTransport()
        protocol.makeConnection(transport)
        held.append((protocol, transport))
    assert factory.buildProtocol(peer) is None       # the places are taken
    for second in range(SCRAPE_TIMEOUT - 1):
        for protocol, _ in held:
            protocol.dataReceived(b"G")
        clock.advance(1)
        assert not any(t.disconnected for _, t in held), second
    clock.advance(1)
    assert all(t.disconnected for _, t in held)
    for protocol, _ in held:
        protocol.connectionLost(Failure(ConnectionDone()))
    assert factory.buildProtocol(peer) is not None   # a place again
    assert clock.getDelayedCalls() == []             # no timer outlives its connection


def test_a_user_name_that_is_not_utf8_does_not_break_the_scrape():
    """A name read with surrogateescape (from bytes that are not UTF-8)
    becomes a label written escaped, not a UnicodeEncodeError on every
    scrape from then on."""
    from prometheus_client import CollectorRegistry, generate_latest

    stats = Stats()
    stats.per_user = True
    stats.session_ended(5, "connect", "ok", "caf\udce9", True, "userpass", 1, 2, False)
    collected = CollectorRegistry()
    collected.register(SocksCollector(None, stats))
    text = generate_latest(collected).decode()
    assert 'user="caf\\\\xe9"' in text
