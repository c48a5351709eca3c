"""Behind a load balancer (`haproxy:` endpoints): rules, logs and the SOCKS4
ident query see the real client from the PROXY header, not the balancer."""

from __future__ import annotations

import re
import socket
import struct
import threading
import time

import pytest

from conftest import PAGE, recv_exact, run_socks
from helpers import wait_until
from socksd.wire import socks4

pytestmark = pytest.mark.integration


def _fake_identd(host: str, answer_user: str):
    """An identd on ``host`` that records the query and names ``answer_user``."""
    server = socket.create_server((host, 0))
    server.settimeout(15)
    seen = {}

    def serve():
        try:
            conn, peer = server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(100)
                if not chunk:
                    return
                data += chunk
            seen["query"], seen["from"] = data, peer[0]
            ports = data.strip().decode()
            conn.sendall(f"{ports} : USERID : UNIX : {answer_user}\r\n".encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, seen, thread


def test_ident_query_goes_to_the_real_client(socks_server, http_server):
    identd, seen, thread = _fake_identd("127.0.0.2", "bob")
    config = (f'[socks4]\nuserid = "ident"\nident_port = {identd.getsockname()[1]}\n'
              'ident_timeout = 5.0\n')
    server = socks_server(config, "--listen", "haproxy:tcp:0:interface=127.0.0.1",
                          "--trusted-proxy", "127.0.0.1/32")
    try:
        with socket.create_connection(server.address, timeout=10) as s:
            s.sendall(f"PROXY TCP4 127.0.0.2 127.0.0.1 5555 {server.port}\r\n".encode())
            s.sendall(socks4.encode_request(socks4.CONNECT, "127.0.0.1", http_server, "bob"))
            reply = b""
            while len(reply) < 8:
                chunk = s.recv(8 - len(reply))
                assert chunk, f"closed after {reply!r}"
                reply += chunk
            assert reply[:2] == bytes((0, socks4.GRANTED)), reply
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            body = b""
            while chunk := s.recv(65536):
                body += chunk
            assert body.endswith(PAGE)
    finally:
        thread.join(10)
        identd.close()
    # The identd on the PROXY header's client address was asked about the
    # header's ports: "<client port>, <socksd port>".
    assert seen["query"] == f"5555, {server.port}\r\n".encode()
    server.wait_for_log(r"127\.0\.0\.2:5555 socks4 user=bob method=ident connect .* ok")


def test_socks5_rules_and_logs_see_the_real_client(socks_server, http_server):
    # Only 127.0.0.3 may connect; the balancer itself is 127.0.0.1.
    config = '[[rules]]\naction = "allow"\nfrom = ["127.0.0.3/32"]\n'
    server = socks_server(config, "--listen", "haproxy:tcp:0:interface=127.0.0.1",
                          "--trusted-proxy", "127.0.0.1/32")
    for client, expected in (("127.0.0.3", 0), ("127.0.0.1", 2)):
        with socket.create_connection(server.address, timeout=10) as s:
            s.sendall(f"PROXY TCP4 {client} 127.0.0.1 4444 {server.port}\r\n".encode())
            s.sendall(b"\x05\x01\x00")
            assert s.recv(2) == b"\x05\x00"
            s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                      + struct.pack("!H", http_server))
            reply = s.recv(10)
            assert reply[1] == expected, reply
    server.wait_for_log(r"127\.0\.0\.1:4444 socks5 .* denied: no rule matched")
    server.wait_for_log(r"127\.0\.0\.3:4444 socks5 user=- method=none connect")


# Only trusted balancers are believed.

PROXY_LISTEN = ("--listen", "haproxy:tcp:0:interface=127.0.0.1")
# A session line (the start-up line names "socks4" too, as its policy).
SESSION_LINE = re.compile(r" socks[45]a? user=")


def v2_header(command: int, source: tuple[str, int] | None = None,
              destination: tuple[str, int] | None = None) -> bytes:
    """A PROXY protocol v2 header (TCP over IPv4, or LOCAL with no address)."""
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    if source is None:
        return signature + bytes((0x20 | command, 0x00)) + b"\x00\x00"
    body = (socket.inet_aton(source[0]) + socket.inet_aton(destination[0])
            + struct.pack("!HH", source[1], destination[1]))
    return signature + bytes((0x20 | command, 0x11)) + struct.pack("!H", len(body)) + body


def socks5_through(server, header: bytes, request: bytes, source: str = "127.0.0.1") -> bytes:
    with socket.create_connection(server.address, timeout=10, source_address=(source, 0)) as s:
        s.sendall(header + b"\x05\x01\x00")
        assert recv_exact(s, 2) == b"\x05\x00"
        s.sendall(request)
        return recv_exact(s, 10)


def closed_at_once(server, data: bytes, source: str = "127.0.0.1") -> bytes:
    """What the server sends before it closes, for a connection from source."""
    with socket.socket() as s:
        s.settimeout(10)
        s.bind((source, 0))
        try:
            s.connect(server.address)
        except ConnectionResetError:
            # Accepted and reset before a slow client thread saw its own
            # connect complete: the reset surfaces here, as nothing sent.
            return b""
        try:
            s.sendall(data)
        except OSError:
            pass
        out = b""
        try:
            while chunk := s.recv(100):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def test_a_header_from_a_peer_not_trusted_is_not_believed(socks_server, http_server):
    """From 127.0.0.1 a header claiming 10.1.2.3 passed allow from 10.0.0.0/8."""
    config = '[[rules]]\naction = "allow"\nfrom = ["10.0.0.0/8"]\n'
    server = socks_server(config, *PROXY_LISTEN, "--trusted-proxy", "127.0.0.9/32")
    connect = b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", http_server)
    header = f"PROXY TCP4 10.1.2.3 127.0.0.1 4444 {server.port}\r\n".encode()
    assert closed_at_once(server, header + b"\x05\x01\x00" + connect) == b""
    server.wait_for_log(r"closed 127\.0\.0\.1:\d+: a PROXY listener, and the peer is not "
                        r"in trusted_proxies")
    # From the trusted balancer the same header is believed.
    assert socks5_through(server, header.replace(b"4444", b"4445"), connect,
                          source="127.0.0.9")[1] == 0
    server.wait_for_log(r"10\.1\.2\.3:4445 socks5 user=- method=none connect .* ok")
    assert "10.1.2.3:4444" not in server.log()


def test_untrusted_peers_are_logged_once_a_second(socks_server):
    server = socks_server(None, *PROXY_LISTEN, "--trusted-proxy", "127.0.0.9/32")
    started = time.monotonic()
    for _ in range(20):
        closed_at_once(server, b"PROXY TCP4 10.1.2.3 127.0.0.1 1 2\r\n")
    elapsed = time.monotonic() - started

    def counted() -> int:
        log = server.log()
        return (len(re.findall(r"and the peer is not in trusted_proxies", log))
                + sum(int(n) for n in re.findall(r"closed (\d+) more in the last second", log)))

    wait_until(lambda: counted() >= 20, 5, server.log)
    assert counted() == 20, server.log()
    # At most one full line a second (however slow this machine was).
    full = len(re.findall(r"and the peer is not in trusted_proxies", server.log()))
    assert 1 <= full <= elapsed + 2 and full < 20, server.log()
    assert not SESSION_LINE.search(server.log()), server.log()


def test_a_local_header_is_a_health_check_closed_quietly(socks_server):
    """HAProxy's health checks send PROXY v2 LOCAL and close: no session line."""
    server = socks_server(None, *PROXY_LISTEN, "--trusted-proxy", "127.0.0.1/32")
    for _ in range(3):
        closed_at_once(server, v2_header(0x0))
    closed_at_once(server, v2_header(0x0) + b"\x05\x01\x00")
    # (Twisted's v1 parser wants something after UNKNOWN, as HAProxy sends.)
    closed_at_once(server, b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")
    time.sleep(0.5)
    assert not SESSION_LINE.search(server.log()), server.log()
    # A v2 PROXY header with addresses is a client like any other.
    header = v2_header(0x1, ("127.0.0.5", 6000), ("127.0.0.1", server.port))
    request = b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + b"\x00\x01"
    assert socks5_through(server, header, request)[1] != 0
    server.wait_for_log(r"127\.0\.0\.5:6000 socks5 user=- method=none connect 127\.0\.0\.1:1 ")


def test_a_proxy_source_that_is_no_address_is_a_bad_request(socks_server):
    """Twisted's v1 parser takes any word for the source address: a trusted
    balancer's garbled header ended the session with a traceback."""
    server = socks_server(None, *PROXY_LISTEN, "--trusted-proxy", "127.0.0.1/32")
    header = f"PROXY TCP4 not-an-ip\x1b[31m 127.0.0.1 5000 {server.port}\r\n".encode()
    assert closed_at_once(server, header + b"\x05\x01\x00") == b""
    server.wait_for_log(r"bad request: PROXY header: the source is not an IP address")
    log = server.log()
    assert "Traceback" not in log and "Unhandled" not in log and "\x1b" not in log, log


def test_bind_and_udp_listen_on_the_sockets_own_address(socks_server):
    """The header's destination is the balancer's idea: a forged 0.0.0.0
    made UDP ASSOCIATE bind a wildcard socket."""
    server = socks_server(None, *PROXY_LISTEN, "--trusted-proxy", "127.0.0.1/32")
    header = f"PROXY TCP4 127.0.0.5 0.0.0.0 5000 {server.port}\r\n".encode()
    udp = socks5_through(server, header, b"\x05\x03\x00\x01" + bytes(6))
    assert udp[1] == 0 and socket.inet_ntoa(udp[4:8]) == "127.0.0.1", udp
    bind = socks5_through(server, header, b"\x05\x02\x00\x01" + socket.inet_aton("127.0.0.5")
                          + b"\x00\x15")
    assert bind[1] == 0 and socket.inet_ntoa(bind[4:8]) == "127.0.0.1", bind


def test_a_burst_through_the_balancer_is_counted_per_real_client(socks_server):
    """Counting starts once the header names the client: three clients behind
    one balancer, max_sessions_per_client = 1, all served."""
    server = socks_server("[server]\nmax_sessions_per_client = 1\n", *PROXY_LISTEN,
                          "--trusted-proxy", "127.0.0.1/32")
    held = []
    try:
        for i in (5, 6, 7):
            s = socket.create_connection(server.address, timeout=10)
            held.append(s)
            s.sendall(f"PROXY TCP4 127.0.0.{i} 127.0.0.1 {4000 + i} {server.port}\r\n"
                      .encode() + b"\x05\x01\x00")
        for s in held:
            assert recv_exact(s, 2) == b"\x05\x00"
    finally:
        for s in held:
            s.close()
    assert "max_sessions_per_client" not in server.log()


@pytest.mark.parametrize("config,args", [
    ('[server]\nlisten = ["haproxy:tcp:0:interface=127.0.0.1"]\n', ()),
    ("", PROXY_LISTEN),
])
def test_a_proxy_listener_needs_trusted_proxies(tmp_path, config, args):
    path = tmp_path / "socksd.toml"
    path.write_text(config)
    out = run_socks("--config", str(path), *args, "--check", cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "takes the client's address from a PROXY header, which any peer can send: name " \
           "the balancers in server.trusted_proxies or with --trusted-proxy CIDR" in out.stderr
    path.write_text(config + '[server]\ntrusted_proxies = ["10.0.0.0/8"]\n' if not config else
                    config + 'trusted_proxies = ["10.0.0.0/8"]\n')
    ok = run_socks("--config", str(path), *args, "--check", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr


def test_workers_get_the_trusted_proxies_of_the_command_line(socks_server, http_server):
    server = socks_server("[server]\nworkers = 2\n", *PROXY_LISTEN,
                          "--trusted-proxy", "127.0.0.1/32")
    header = f"PROXY TCP4 127.0.0.6 127.0.0.1 4446 {server.port}\r\n".encode()
    connect = b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", http_server)
    assert socks5_through(server, header, connect)[1] == 0
    server.wait_for_log(r"w\d 127\.0\.0\.6:4446 socks5 .* connect")
