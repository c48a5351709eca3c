"""Behind a load balancer (`haproxy:` endpoints): rules, logs and the SOCKS4
ident query see the real client from the PROXY header, not the balancer."""

from __future__ import annotations

import socket
import struct
import threading

from socksd.wire import socks4

from conftest import PAGE


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
    server = socks_server(config, "--listen", "haproxy:tcp:0:interface=127.0.0.1")
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
    server = socks_server(config, "--listen", "haproxy:tcp:0:interface=127.0.0.1")
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
