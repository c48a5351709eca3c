"""Behind a real load balancer: Debian's HAProxy (tests/balancer.py) on
127.0.0.2, round robin with PROXY protocol v2 and health checks, in front of
two socksd instances on 127.0.0.3 and 127.0.0.4. Clients bind 127.0.0.5 or
127.0.0.6, so every party has an address of its own: what socksd sees is
either the real client's or visibly someone else's.

(tests/test_haproxy.py sends PROXY headers by hand; here a real balancer does.)
"""

from __future__ import annotations

import re
import socket
import struct
import threading

import pytest

from balancer import BALANCER_HOST, INSTANCE_HOSTS, free_port
from conftest import PAGE, recv_exact, recv_until_eof
from helpers import wait_until
from socksd.wire import socks4
from test_bind_udp_integration import UDPServer

pytestmark = pytest.mark.integration

CLIENT, STRANGER = "127.0.0.5", "127.0.0.6"

RULES = f"""
[[rules]]
action = "allow"
from = ["{CLIENT}/32"]

[[rules]]
action = "deny"
"""

SESSION = re.compile(r"(?:w\d+ )?(\S+) socks[45]a? user=")


def session_peers(instance) -> list[str]:
    """The peers of an instance's session lines, in order."""
    return [m[1] for m in (SESSION.search(line) for line in instance.log().splitlines()
                           if "[socksd#" in line) if m]


def served_by(balanced, clients: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """Which server (s1, s2) HAProxy gave each client connection: its log
    line is written at the connection's end."""
    def logged():
        chosen = {c["client"]: c for c in balanced.haproxy.connections()}
        return chosen if all(client in chosen for client in clients) else None

    chosen = wait_until(logged, 10, lambda: f"haproxy's log of {clients}:\n"
                                            f"{balanced.haproxy.log()}")
    for client in clients:
        # The balancer connected from its own address to a socksd instance,
        # and the client had reached it on the frontend.
        assert chosen[client]["source"][0] == BALANCER_HOST
        assert chosen[client]["frontend"] == balanced.address
    return {client: chosen[client]["server"] for client in clients}


def socks5_connect(address, source: str, port: int) -> tuple[socket.socket, int]:
    """A SOCKS5 CONNECT to 127.0.0.1:port from ``source``: the socket (after
    the reply) and the reply code."""
    s = socket.create_connection(address, timeout=10, source_address=(source, 0))
    s.sendall(b"\x05\x01\x00")
    assert recv_exact(s, 2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port))
    return s, recv_exact(s, 10)[1]


def test_rules_and_session_lines_see_the_real_client(balanced_socks, http_server):
    balanced = balanced_socks(RULES)
    sessions: dict[tuple[str, int], int] = {}    # client address -> reply code
    for source in (CLIENT, CLIENT, STRANGER, STRANGER, CLIENT, CLIENT):
        s, reply = socks5_connect(balanced.address, source, http_server)
        with s:
            sessions[s.getsockname()] = reply
            if reply == 0:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                assert recv_until_eof(s).endswith(PAGE)
    # The rule allowing 127.0.0.5 matched its sessions, and only those: had
    # socksd seen the balancer's 127.0.0.2, all six would have been denied.
    assert sessions == \
        {c: (0 if c[0] == CLIENT else 2) for c in sessions}, sessions

    # Round robin: each instance served some of them, and logged each of its
    # sessions with the real client as the peer.
    servers = served_by(balanced, list(sessions))
    assert set(servers.values()) == {"s1", "s2"}, servers
    for name, instance in (("s1", balanced.instances[0]), ("s2", balanced.instances[1])):
        mine = [c for c, server in servers.items() if server == name]
        for host, port in mine:
            outcome = r"up=\d+ down=\d+ .*ok" if host == CLIENT else r"denied: rule 2 \(deny\)"
            instance.wait_for_log(rf"{re.escape(host)}:{port} socks5 user=- method=none "
                                  rf"connect 127\.0\.0\.1:{http_server} .*{outcome}")
        # One line per session it served, none for the other instance's and
        # none for HAProxy's health checks (PROXY v2 LOCAL, every 200 ms):
        # nothing names the balancer, and none was refused as untrusted.
        assert sorted(session_peers(instance)) == sorted(f"{h}:{p}" for h, p in mine), \
            instance.log()
        assert BALANCER_HOST not in instance.log()
        assert "trusted_proxies" not in instance.log()
    # And the checks, closed by socksd at once, kept both servers up.
    assert "DOWN" not in balanced.haproxy.log() and "failed" not in balanced.haproxy.log()

    # A PROXY header straight from a client is not believed: the instances
    # trust the balancer's address only.
    direct = balanced.instances[0]
    header = f"PROXY TCP4 {CLIENT} {direct.host} 4444 {direct.port}\r\n".encode()
    assert closed_at_once(direct.address, header + b"\x05\x01\x00", CLIENT) == b""
    direct.wait_for_log(rf"closed {re.escape(CLIENT)}:\d+: a PROXY listener, and the peer "
                        r"is not in trusted_proxies")
    assert f"{CLIENT}:4444" not in direct.log()


def closed_at_once(address, data: bytes, source: str) -> bytes:
    """What a server sends before it closes (resets) a connection from source."""
    with socket.socket() as s:
        s.settimeout(10)
        s.bind((source, 0))
        try:
            s.connect(address)
            s.sendall(data)
        except ConnectionResetError:
            return b""    # refused before this thread got to send
        return recv_until_eof(s)


class RecordingIdentd:
    """An identd (RFC 1413) on the client's address: it records who asked
    what, and names ``user`` for the connections it was told of (the
    client's port, the port it connected to), NO-USER for anything else."""

    def __init__(self, host: str) -> None:
        self.listener = socket.create_server((host, free_port(host)))
        self.port = self.listener.getsockname()[1]
        self.owners: dict[tuple[int, int], str] = {}
        self.queries: list[tuple[str, bytes]] = []     # (asker's address, query line)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, asker = self.listener.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(10)
                query = b""
                while not query.endswith(b"\n"):
                    chunk = connection.recv(100)
                    if not chunk:
                        break
                    query += chunk
                self.queries.append((asker[0], query))
                try:
                    ports = tuple(int(p) for p in query.split(b","))
                except ValueError:
                    continue
                owner = self.owners.get(ports)   # type: ignore[arg-type]
                answer = f"USERID : UNIX : {owner}" if owner else "ERROR : NO-USER"
                connection.sendall(f"{ports[0]} , {ports[1]} : {answer}\r\n".encode())

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)   # wakes the accept (close alone does not)
        self.listener.close()
        self.thread.join(10)


@pytest.fixture
def client_identd():
    identd = RecordingIdentd(CLIENT)
    yield identd
    identd.close()


def test_socks4_ident_asks_the_real_client(balanced_socks, http_server, client_identd):
    # SOCKS4 only for a USERID the client's identd confirms, from the client.
    config = (f'[socks4]\nuserid = "ident"\nident_port = {client_identd.port}\n'
              'ident_timeout = 5.0\n\n'
              f'[[rules]]\naction = "allow"\nfrom = ["{CLIENT}/32"]\nversions = [4]\n'
              'verified = true\n')
    balanced = balanced_socks(config)
    frontend_port = balanced.address[1]
    assert frontend_port not in (i.port for i in balanced.instances)
    clients = []
    for _ in range(4):
        with socket.socket() as s:
            s.settimeout(10)
            s.bind((CLIENT, 0))
            port = s.getsockname()[1]
            # The client's connection, as its own host knows it: to the
            # balancer's frontend. That is what its identd can answer for.
            client_identd.owners[(port, frontend_port)] = "alice"
            s.connect(balanced.address)
            s.sendall(socks4.encode_request(socks4.CONNECT, "127.0.0.1", http_server, "alice"))
            reply = recv_exact(s, 8)
            assert reply[:2] == bytes((0, socks4.GRANTED)), (reply, client_identd.queries)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert recv_until_eof(s).endswith(PAGE)
            clients.append((CLIENT, port))

    # Each session asked the identd on the real client's address (it listens
    # nowhere else) about the client's port and the frontend's port: RFC 1413
    # "<port on the identd's side> , <port on the asker's side>", here the
    # header's destination, not socksd's own listening port.
    assert sorted(q for _, q in client_identd.queries) == \
        sorted(f"{port}, {frontend_port}\r\n".encode() for _, port in clients)
    # Asked by the socksd instances' host, never through the balancer (on a
    # loopback interface the route picks 127.0.0.1 as the source).
    assert all(asker != BALANCER_HOST for asker, _ in client_identd.queries), \
        client_identd.queries

    servers = served_by(balanced, clients)
    assert set(servers.values()) == {"s1", "s2"}, servers
    for (host, port), name in servers.items():
        balanced.instance(name).wait_for_log(
            rf"{re.escape(host)}:{port} socks4 user=alice method=ident "
            rf"connect 127\.0\.0\.1:{http_server} up=\d+ down=\d+ .*ok")
    for instance in balanced.instances:
        assert BALANCER_HOST not in instance.log()
    assert INSTANCE_HOSTS == tuple(i.host for i in balanced.instances)



# UDP ASSOCIATE behind the balancer: the reply names udp_advertise.

PUBLIC = "127.0.0.7"     # the instances' host as the clients reach it, past the balancer


@pytest.fixture
def udp_echo():
    """A UDP echo (the destination) that records its peers."""
    echo = UDPServer(lambda data: b"echo " + data)
    yield echo
    echo.stop()


def test_udp_associate_through_the_balancer_names_udp_advertise(balanced_socks, udp_echo):
    """HAProxy carries TCP only: the UDP ASSOCIATE reply must name an
    address the client reaches the instance at (udp_advertise), not the one
    the balancer connected to (127.0.0.3, 127.0.0.4)."""
    balanced = balanced_socks("", f'udp_advertise = "{PUBLIC}"')
    header = b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + \
        struct.pack("!H", udp_echo.port)
    controls: list[socket.socket] = []
    clients: list[tuple[str, int]] = []
    try:
        for turn in range(2):      # round robin: one association per instance
            control = socket.create_connection(balanced.address, timeout=10,
                                               source_address=(CLIENT, 0))
            controls.append(control)
            clients.append(control.getsockname())
            control.sendall(b"\x05\x01\x00")
            assert recv_exact(control, 2) == b"\x05\x00"
            control.sendall(b"\x05\x03\x00\x01" + bytes(6))
            reply = recv_exact(control, 10)
            assert reply[:4] == b"\x05\x00\x00\x01", reply
            relay = (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0])
            assert relay[0] == PUBLIC
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.bind((CLIENT, 0))
                client.settimeout(5)
                client.sendto(header + f"ping {turn}".encode(), relay)
                answer, came_from = client.recvfrom(1000)
            assert came_from == relay
            assert answer == header + f"echo ping {turn}".encode()
    finally:
        for control in controls:
            control.close()
    # Both instances served one, and the destination saw two relays.
    servers = served_by(balanced, clients)
    assert sorted(servers.values()) == ["s1", "s2"], servers
    assert len({peer for _data, peer in udp_echo.received}) == 2
