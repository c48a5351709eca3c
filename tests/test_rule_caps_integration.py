"""A rule's ``max_sessions`` against a real `twistd socks`: sessions beyond
the cap get REP 0x02 (SOCKS4: 91) and a line naming the rule, counted per
rule, per client address or per user, given back when a session ends, and
kept by the rule's name across a reload that inserts a rule before it."""

from __future__ import annotations

import os
import signal
import socket
import struct

import pytest

from conftest import recv_exact
from helpers import wait_until

pytestmark = pytest.mark.integration


def socks5(server, port: int, source: str = "127.0.0.1",
           user: tuple[str, str] | None = None) -> tuple[socket.socket, int]:
    """A SOCKS5 CONNECT to 127.0.0.1:port from ``source``: the socket and REP."""
    s = socket.create_connection(server.address, timeout=10, source_address=(source, 0))
    if user is None:
        s.sendall(b"\x05\x01\x00")
        assert recv_exact(s, 2) == b"\x05\x00"
    else:
        s.sendall(b"\x05\x01\x02")
        assert recv_exact(s, 2) == b"\x05\x02"
        name, password = (x.encode() for x in user)
        s.sendall(bytes([1, len(name)]) + name + bytes([len(password)]) + password)
        assert recv_exact(s, 2) == b"\x01\x00"
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port))
    reply = recv_exact(s, 10)
    return s, reply[1]


def socks4(server, port: int) -> tuple[socket.socket, int]:
    s = socket.create_connection(server.address, timeout=10)
    s.sendall(b"\x04\x01" + struct.pack("!H", port) + socket.inet_aton("127.0.0.1") + b"u\0")
    return s, recv_exact(s, 8)[1]


@pytest.fixture
def target(echo_server):
    """An echo server: a session to it ends when its client closes."""
    return echo_server


def capped(per: str, cap: int = 2, extra: str = "") -> str:
    return f"""
[[rules]]
name = "capped"
action = "allow"
max_sessions = {cap}
max_sessions_per = "{per}"
{extra}
"""


def admitted(server, target: int) -> bool:
    """Is a session let in now? (closed at once)"""
    s, rep = socks5(server, target)
    s.close()
    return rep == 0


def held_open(sessions: list[socket.socket]) -> None:
    for s in sessions:
        s.close()


def test_a_rule_cap_refuses_the_session_beyond_it(socks_server, target):
    server = socks_server(capped("rule"))
    first = [socks5(server, target) for _ in range(2)]
    assert [rep for _, rep in first] == [0, 0]
    extra, rep = socks5(server, target)
    assert rep == 0x02
    extra.close()
    server.wait_for_log(r"denied: rule capped: max_sessions \(2\) reached")
    four, rep4 = socks4(server, target)
    assert rep4 == 91
    four.close()
    # One ends: its place is given back.
    first[0][0].close()
    wait_until(lambda: admitted(server, target), 10, "a session once one under the cap ended")
    held_open([s for s, _ in first])


def test_a_per_client_cap_counts_each_client_address(socks_server, target):
    server = socks_server(capped("client", 1))
    a, rep_a = socks5(server, target, "127.0.0.2")
    b, rep_b = socks5(server, target, "127.0.0.3")
    again, rep_again = socks5(server, target, "127.0.0.2")
    assert (rep_a, rep_b, rep_again) == (0, 0, 0x02)
    server.wait_for_log(r"max_sessions \(1 per client\) reached")
    held_open([a, b, again])


def test_a_per_user_cap_counts_each_user(socks_server, target):
    server = socks_server(capped("user", 1), "--auth", "memory:alice:pw:bob:pw")
    alice, rep_a = socks5(server, target, user=("alice", "pw"))
    bob, rep_b = socks5(server, target, user=("bob", "pw"))
    alice2, rep_a2 = socks5(server, target, user=("alice", "pw"))
    assert (rep_a, rep_b, rep_a2) == (0, 0, 0x02)
    held_open([alice, bob, alice2])


def test_a_reload_that_inserts_a_rule_keeps_a_named_rules_count(socks_server, target):
    server = socks_server(capped("rule"))
    held = [socks5(server, target) for _ in range(2)]
    assert [rep for _, rep in held] == [0, 0]
    # A rule before it: "capped" is now the second rule; its count stays.
    server.config_path.write_text("""
[[rules]]
action = "deny"
to = ["192.0.2.0/24"]
""" + capped("rule"))
    os.kill(server.process.pid, signal.SIGHUP)
    server.wait_for_log(r"reloaded")
    extra, rep = socks5(server, target)
    assert rep == 0x02
    extra.close()
    held_open([s for s, _ in held])


def test_a_cap_holds_across_workers(socks_server, target):
    """workers = 2: the supervisor counts every worker's sessions under the
    cap (the kernel spreads connections over both workers' sockets)."""
    server = socks_server("[server]\nworkers = 2\n" + capped("rule", 3))
    sessions = [socks5(server, target) for _ in range(8)]
    assert sorted(rep for _, rep in sessions) == [0, 0, 0, 2, 2, 2, 2, 2]
    held_open([s for s, _ in sessions[:1]])
    wait_until(lambda: admitted(server, target), 10, "a session once one under the cap ended")
    held_open([s for s, _ in sessions])
