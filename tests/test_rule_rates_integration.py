"""A rule's ``rate`` from the config file, against a real `twistd socks`:
a session under ``rate = "1MiB"`` moves 2 MiB in 1.9 s (the bucket starts
with 0.1 s of budget) ± 15% each way; ``rate_per = "rule"`` makes two
sessions share one budget, also across ``workers = 2``; a generous rate does
not slow anything; UDP datagrams over the budget are dropped and counted."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from conftest import recv_exact
from test_rule_caps_integration import socks5

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 2 * MiB
EXPECTED = (SIZE - 0.1 * MiB) / MiB      # seconds, at 1 MiB/s


class Source:
    """A TCP server that sends SIZE bytes to each connection and closes;
    what a connection sends it is counted (an upload)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.port = self.listener.getsockname()[1]
        self.uploaded: list[int] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            mode = conn.recv(1)
            if mode == b"d":
                conn.sendall(b"x" * SIZE)
                return
            total = 0
            while total < SIZE - 1:     # the mode byte was the first
                chunk = conn.recv(65536)
                if not chunk:
                    break
                total += len(chunk)
            self.uploaded.append(total)
            conn.sendall(b"k")

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def source():
    s = Source()
    yield s
    s.close()


def rated(rate: str, per: str = "session", extra: str = "") -> str:
    return f"""
{extra}
[[rules]]
name = "metered"
action = "allow"
rate = "{rate}"
rate_per = "{per}"
"""


def download(server, port: int) -> float:
    """Seconds to take SIZE bytes through the proxy."""
    s, rep = socks5(server, port)
    assert rep == 0
    with s:
        s.settimeout(30)
        started = time.monotonic()
        s.sendall(b"d")
        got = 0
        while got < SIZE:
            chunk = s.recv(65536)
            assert chunk, f"closed after {got} bytes"
            got += len(chunk)
        return time.monotonic() - started


def upload(server, port: int) -> float:
    s, rep = socks5(server, port)
    assert rep == 0
    with s:
        s.settimeout(30)
        started = time.monotonic()
        s.sendall(b"u" + b"y" * (SIZE - 1))
        assert recv_exact(s, 1) == b"k"
        return time.monotonic() - started


def test_a_rules_rate_holds_each_way(socks_server, source):
    server = socks_server(rated("1MiB"))
    down = download(server, source.port)
    up = upload(server, source.port)
    # The upload's first byte is the mode: SIZE - 1 + 1 bytes, as the download.
    for seconds in (down, up):
        assert EXPECTED * 0.85 <= seconds <= EXPECTED * 1.15, (down, up)


def test_a_generous_rate_does_not_slow_a_session(socks_server, source):
    server = socks_server(rated("10GiB"))
    assert download(server, source.port) < EXPECTED / 4


def both_at_once(server, port: int) -> list[float]:
    times: list[float] = []
    threads = [threading.Thread(target=lambda: times.append(download(server, port)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(times) == 2
    return times


@pytest.mark.parametrize("workers", [1, 2])
def test_sessions_under_one_rule_share_its_rate(socks_server, source, workers):
    """Two downloads at once under rate_per = "rule": 4 MiB at 1 MiB/s in
    all, so each takes about twice as long as alone; with workers = 2 the
    supervisor splits the rule's rate between the workers' budgets."""
    server = socks_server(rated("1MiB", "rule", f"[server]\nworkers = {workers}\n"))
    times = both_at_once(server, source.port)
    # Both end near 3.9 s (4 MiB - the burst, at 1 MiB/s); alone they took 1.9 s.
    slowest = max(times)
    assert 3.9 * 0.85 <= slowest <= 3.9 * 1.2, times


def test_per_session_rates_are_not_shared(socks_server, source):
    server = socks_server(rated("1MiB"))
    times = both_at_once(server, source.port)
    assert max(times) <= EXPECTED * 1.2, times


def udp_associate(server) -> tuple[socket.socket, socket.socket, tuple[str, int]]:
    """A SOCKS5 UDP ASSOCIATE: the control connection, the client's UDP
    socket, and the relay's address the reply named."""
    control = socket.create_connection(server.address, timeout=10)
    control.sendall(b"\x05\x01\x00")
    assert recv_exact(control, 2) == b"\x05\x00"
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    control.sendall(b"\x05\x03\x00\x01" + socket.inet_aton("127.0.0.1")
                    + struct.pack("!H", client.getsockname()[1]))
    reply = recv_exact(control, 10)
    assert reply[1] == 0, reply
    return control, client, (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0])


def test_udp_datagrams_over_the_rate_are_dropped_and_counted(socks_server):
    server = socks_server(rated("10kB"))
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.settimeout(0.2)
    control, client, relay = udp_associate(server)
    header = b"\0\0\0\x01" + socket.inet_aton("127.0.0.1") + \
        struct.pack("!H", echo.getsockname()[1])
    # 20 datagrams of 500 bytes at once: the burst (1 kB) takes two.
    for _ in range(20):
        client.sendto(header + b"z" * 500, relay)
    arrived = 0
    while True:
        try:
            echo.recvfrom(2048)
            arrived += 1
        except TimeoutError:
            break
    assert 1 <= arrived <= 4, arrived
    control.close()
    line = server.wait_for_log(r"udp 127\.0\.0\.1:\d+ .*datagrams up=\d+ down=\d+ "
                               r"dropped=(\d+)")
    assert int(line.group(1)) >= 16
    client.close()
    echo.close()
