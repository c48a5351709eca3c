"""BIND and UDP ASSOCIATE end to end: a real `twistd -n socks`, real sockets
on 127.0.0.1, and real clients from Debian: Dante's `socksify` (dante-client)
around curl doing active-mode FTP (BIND, SOCKS5 and SOCKS4) against Twisted's
own FTP server, and around OpenBSD nc sending a DNS query over UDP.

`dig` is not used: bind9 9.18's dig sends with sendmmsg(2), which Dante 1.4's
libdsocks does not wrap, so under socksify dig sets up the association and
then sends its query to the relay without the SOCKS UDP header (socksd rightly
drops it). nc sends with write(2), which Dante does wrap.

Every socket and subprocess has a bounded timeout; a missing client fails.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import TWISTD, recv_exact, recv_until_eof, require
from helpers import wait_until

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"
STRANGER = "127.0.0.2"       # another address on lo: another host, as far as rules go


# Helpers.


def read_reply5(sock: socket.socket) -> tuple[int, str, int]:
    head = recv_exact(sock, 4)
    assert head[0] == 5 and head[2] == 0, f"not a SOCKS5 reply: {head!r}"
    atyp = head[3]
    if atyp == 1:
        host = socket.inet_ntoa(recv_exact(sock, 4))
    elif atyp == 4:
        host = socket.inet_ntop(socket.AF_INET6, recv_exact(sock, 16))
    else:
        raise AssertionError(f"reply with ATYP {atyp}")
    return head[1], host, int.from_bytes(recv_exact(sock, 2), "big")


def read_reply4(sock: socket.socket) -> tuple[int, str, int]:
    reply = recv_exact(sock, 8)
    assert reply[0] == 0, f"not a SOCKS4 reply: {reply!r}"
    return reply[1], socket.inet_ntoa(reply[4:]), int.from_bytes(reply[2:4], "big")


def socks5_request(proxy: tuple[str, int], request: bytes,
                   timeout: float = 10) -> tuple[socket.socket, tuple[int, str, int]]:
    """Method 0x00, then the request; returns the socket and the (first) reply."""
    sock = socket.create_connection(proxy, timeout=timeout)
    try:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(request)
        return sock, read_reply5(sock)
    except BaseException:
        sock.close()
        raise


def ipv4(host: str, port: int) -> bytes:
    """ATYP 1 + address + port."""
    return b"\x01" + socket.inet_aton(host) + port.to_bytes(2, "big")


def bind5(host: str = LOOPBACK, port: int = 21) -> bytes:
    return b"\x05\x02\x00" + ipv4(host, port)


UDP_ASSOCIATE_ANY = b"\x05\x03\x00" + ipv4("0.0.0.0", 0)


def udp_header(host: str, port: int) -> bytes:
    return b"\x00\x00\x00" + ipv4(host, port)


def connect_from(source: str, target: tuple[str, int], timeout: float = 5) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(timeout)
    try:
        sock.bind((source, 0))
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock


def assert_refused(target: tuple[str, int], settle: float = 0.2) -> None:
    """Nothing listens on target (any more): after a moment for the server
    to close its socket, a connection is refused. (One attempt only: a
    listener that accepted it would then close, hiding the fault.)"""
    time.sleep(settle)
    try:
        sock = socket.create_connection(target, timeout=2)
    except ConnectionRefusedError:
        return
    sock.close()
    raise AssertionError(f"{target} still accepts connections")


def closed_by_peer(sock: socket.socket, within: float = 5.0) -> bool:
    """True if the other side closes (EOF or reset) without sending anything."""
    sock.settimeout(within)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def abort(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a crashed client's kernel would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def fd_count(server) -> int:
    """The server's open sockets. Only sockets: twistd opens other
    descriptors (pipes, epoll) lazily after it starts listening, which made
    a count taken right after start-up come out short under load."""
    directory = f"/proc/{server.process.pid}/fd"
    count = 0
    for fd in os.listdir(directory):
        try:
            count += os.readlink(f"{directory}/{fd}").startswith("socket:")
        except FileNotFoundError:
            pass    # closed while we looked
    return count


def udp_port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((LOOPBACK, port))
            return True
        except OSError:
            return False


def no_tracebacks(server) -> None:
    log = server.log()
    assert "Traceback" not in log and "Unhandled" not in log, log


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


# Small UDP servers.


class UDPServer:
    """A UDP server on 127.0.0.1 in a thread; records every datagram it gets."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                data, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            self.received.append((data, addr))
            reply = self.answer(data)
            if reply is not None:
                self.sock.sendto(reply, addr)

    def stop(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def udp_echo():
    server = UDPServer(lambda data: data)
    yield server
    server.stop()


def dns_query(tid: int, name: str) -> bytes:
    """A DNS query for name's A record (RFC 1035), recursion desired."""
    qname = b"".join(bytes((len(label),)) + label.encode() for label in name.split(".")) + b"\0"
    return tid.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + qname + \
        b"\x00\x01\x00\x01"


ANSWER_ADDRESS = "192.0.2.55"


def dns_answer(query: bytes) -> bytes | None:
    """A tiny authoritative responder: every A query gets ANSWER_ADDRESS."""
    if len(query) < 17:
        return None
    end = 12
    while query[end]:
        end += query[end] + 1
    question = query[12:end + 5]
    return (query[:2] + b"\x85\x80\x00\x01\x00\x01\x00\x00\x00\x00" + question
            + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04"
            + socket.inet_aton(ANSWER_ADDRESS))


def parse_dns_answer(answer: bytes, tid: int) -> str:
    assert answer[:2] == tid.to_bytes(2, "big"), answer
    assert answer[2] & 0x80, "not a response"
    assert answer[6:8] == b"\x00\x01", "no answer record"
    assert answer[-6:-4] == b"\x00\x04"
    return socket.inet_ntoa(answer[-4:])


@pytest.fixture
def dns_server():
    server = UDPServer(dns_answer)
    yield server
    server.stop()


def session_line(server, pattern: str) -> str:
    return server.wait_for_log(pattern).group(0)


# BIND: an FTP-active-mode style session.


def test_bind_ftp_active_mode_session(socks_server):
    server = socks_server()
    # The client asks for a BIND; DST is the FTP server it is talking to.
    client, (code, bind_host, bind_port) = socks5_request(server.address, bind5(LOOPBACK, 21))
    with client:
        assert (code, bind_host) == (0, LOOPBACK)
        assert bind_port != 0
        # The FTP server opens its data connection to the address from the
        # first reply (what the client sent in its PORT command).
        with connect_from(LOOPBACK, (bind_host, bind_port)) as data_conn:
            code, peer_host, peer_port = read_reply5(client)
            assert (code, peer_host, peer_port) == (0, *data_conn.getsockname())

            # RETR: the server sends a file and closes its side...
            download = os.urandom(300_000)
            sender = threading.Thread(target=lambda: (data_conn.sendall(download),
                                                      data_conn.shutdown(socket.SHUT_WR)))
            sender.start()
            assert recv_until_eof(client) == download
            sender.join(10)
            # ...and the other direction still works (STOR), EOF included.
            upload = os.urandom(200_000)
            sender = threading.Thread(target=lambda: (client.sendall(upload),
                                                      client.shutdown(socket.SHUT_WR)))
            sender.start()
            assert recv_until_eof(data_conn) == upload
            sender.join(10)
        # The listener took one connection and is gone.
        assert_refused((bind_host, bind_port))
    session_line(server, r"socks5 user=- method=none bind 127\.0\.0\.1:21 up=200000 "
                         r"down=300000 .* ok")


def test_bind_second_incoming_connection_refused(socks_server):
    server = socks_server()
    client, (code, host, port) = socks5_request(server.address, bind5())
    with client:
        assert code == 0
        first = connect_from(LOOPBACK, (host, port))
        try:
            second = connect_from(LOOPBACK, (host, port))
        except OSError:
            second = None    # the listener was already gone: refused outright
        try:
            _code, _host, accepted_port = read_reply5(client)
            conns = [s for s in (first, second) if s is not None]
            [accepted] = [s for s in conns if s.getsockname()[1] == accepted_port]
            others = [s for s in conns if s is not accepted]
            for other in others:
                try:
                    other.sendall(b"not relayed")
                except OSError:
                    pass
                assert closed_by_peer(other), "a second connection to the BIND port was kept"
            accepted.sendall(b"relayed")
            assert recv_exact(client, 7) == b"relayed"
            client.settimeout(0.5)
            with pytest.raises(socket.timeout):
                client.recv(100)
        finally:
            for s in (first, second):
                if s is not None:
                    s.close()
        assert_refused((host, port))


def test_bind_wrong_peer_refused_right_peer_accepted(socks_server):
    server = socks_server()
    client, (code, host, port) = socks5_request(server.address, bind5(LOOPBACK))
    with client:
        assert code == 0
        with connect_from(STRANGER, (host, port)) as stranger:
            assert closed_by_peer(stranger), "a connection from a stranger was kept"
        client.settimeout(0.5)
        with pytest.raises(socket.timeout):
            client.recv(100)
        client.settimeout(10)
        with connect_from(LOOPBACK, (host, port)) as peer:
            assert read_reply5(client) == (0, LOOPBACK, peer.getsockname()[1])
            peer.sendall(b"hello")
            assert recv_exact(client, 5) == b"hello"
    assert re.search(r"bind: refused incoming connection from 127\.0\.0\.2: not the expected "
                     r"peer", server.log()), server.log()


def test_strangers_knocking_on_a_bind_port_are_not_a_flood_of_log(socks_server):
    """Each stranger was a line: anyone who found a waiting BIND port could
    fill the log. Now the first is logged, then a count at most once a
    second, and every knock is counted (the last when the BIND is taken)."""
    server = socks_server()
    knocks = 40
    client, (code, host, port) = socks5_request(server.address, bind5(LOOPBACK))
    with client:
        assert code == 0
        started = time.monotonic()
        for _ in range(knocks):
            with connect_from(STRANGER, (host, port)) as stranger:
                assert closed_by_peer(stranger), "a connection from a stranger was kept"
        elapsed = time.monotonic() - started
        with connect_from(LOOPBACK, (host, port)) as peer:
            assert read_reply5(client) == (0, LOOPBACK, peer.getsockname()[1])
    line = r"bind: refused incoming connection from 127\.0\.0\.2: not the expected peer"
    summary = r"bind: refused (\d+) more incoming connections in the last second"

    def counted() -> tuple[int, int]:
        log = server.log()
        single = len(re.findall(line, log))
        return single, single + sum(int(n) for n in re.findall(summary, log))

    wait_until(lambda: counted()[1] >= knocks, 10, server.log)
    single, total = counted()
    assert total == knocks, server.log()
    # One full line a second at most (and the first), whatever the machine's speed.
    assert single <= elapsed + 2 < knocks, (single, elapsed, server.log())


def test_bindreply_rule_allows_other_peer(socks_server):
    server = socks_server('[[rules]]\naction = "allow"\ncommands = ["bindreply"]\n'
                          'to = ["127.0.0.2"]\n\n'
                          '[[rules]]\naction = "allow"\nfrom = ["127.0.0.0/8"]\n')
    client, (code, host, port) = socks5_request(server.address, bind5(LOOPBACK))
    with client:
        assert code == 0
        with connect_from(STRANGER, (host, port)) as helper:
            assert read_reply5(client) == (0, STRANGER, helper.getsockname()[1])
            client.sendall(b"ping")
            assert recv_exact(helper, 4) == b"ping"


def test_bind_listener_closed_when_client_leaves(socks_server):
    """The client drops its connection (a reset, so it is unmistakably gone,
    not a half-close) while the BIND waits: nothing stays listening."""
    server = socks_server()
    before = fd_count(server)
    client, (code, host, port) = socks5_request(server.address, bind5())
    assert code == 0
    assert fd_count(server) == before + 2      # the control connection and the listener
    abort(client)
    session_line(server, r"bind 127\.0\.0\.1:21 .*client closed")
    assert_refused((host, port))
    wait_until(lambda: fd_count(server) == before, 3, "the listener's socket to be closed")


def test_bind_half_close_while_waiting_is_passed_on(socks_server):
    """EOF from the client while the BIND waits is a half-close like any
    other: once the peer connects it gets the EOF, and the client its data."""
    server = socks_server()
    client, (code, host, port) = socks5_request(server.address, bind5())
    with client:
        assert code == 0
        client.shutdown(socket.SHUT_WR)
        time.sleep(0.2)
        with connect_from(LOOPBACK, (host, port)) as peer:
            assert read_reply5(client) == (0, LOOPBACK, peer.getsockname()[1])
            assert recv_until_eof(peer) == b""
            peer.sendall(b"still flows")
            peer.shutdown(socket.SHUT_WR)
            assert recv_until_eof(client) == b"still flows"


def test_bind_timeout(socks_server):
    server = socks_server("[server]\nbind_timeout = 1.0\n")
    client, (code, host, port) = socks5_request(server.address, bind5())
    with client:
        assert code == 0
        start = time.monotonic()
        client.settimeout(5)
        assert recv_until_eof(client) == b"\x05\x06\x00\x01" + bytes(6)
        assert 0.8 < time.monotonic() - start < 4
    assert_refused((host, port))
    session_line(server, r"bind 127\.0\.0\.1:21 .*bind failed: .*no connection to the BIND port "
                         r"in 1 s")


def test_socks4_bind_raw(socks_server):
    server = socks_server()
    with socket.create_connection(server.address, timeout=10) as client:
        client.sendall(b"\x04\x02\x00\x15" + socket.inet_aton(LOOPBACK) + b"ftpuser\x00")
        code, host, port = read_reply4(client)
        assert (code, host) == (90, LOOPBACK) and port != 0
        with connect_from(LOOPBACK, (host, port)) as peer:
            assert read_reply4(client) == (90, LOOPBACK, peer.getsockname()[1])
            peer.sendall(b"data from the server")
            assert recv_exact(client, 20) == b"data from the server"
            client.sendall(b"and back")
            assert recv_exact(peer, 8) == b"and back"
        assert recv_until_eof(client) == b""
        assert_refused((host, port))
    session_line(server, r"socks4 user=ftpuser method=trust bind 127\.0\.0\.1:21 up=8 down=20 "
                         r".* ok")


# Real clients: Dante's socksify around curl (active-mode FTP) and nc (UDP).


def dante_env(tmp_path: Path, proxy_port: int, protocol: str) -> dict[str, str]:
    conf = tmp_path / f"socks-{protocol}.conf"
    conf.write_text(
        "route {\n"
        f"  from: 0.0.0.0/0 to: 0.0.0.0/0 via: 127.0.0.1 port = {proxy_port}\n"
        f"  proxyprotocol: {protocol}\n"
        "  command: connect bind bindreply udpassociate udpreply\n"
        "  method: none\n"
        "}\n")
    env = dict(os.environ)
    # Dante sends loopback destinations direct unless told not to.
    env.update(SOCKS_CONF=str(conf), SOCKS_AUTOADD_LANROUTES="no")
    for name in ("SOCKS_SERVER", "SOCKS4_SERVER", "SOCKS5_SERVER", "http_proxy", "all_proxy",
                 "ALL_PROXY", "ftp_proxy", "FTP_PROXY"):
        env.pop(name, None)
    return env


@pytest.fixture
def ftp_server(tmp_path):
    """Twisted's FTP server (anonymous, read-only) with one file."""
    root = tmp_path / "ftp"
    root.mkdir()
    contents = b"".join(b"line %05d of a file fetched in active mode\n" % i
                        for i in range(2000))
    (root / "file.txt").write_bytes(contents)
    port = free_port()
    log_path = tmp_path / "ftp.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([TWISTD, "-n", "--pidfile=", "ftp", "-p", str(port),
                                    "-r", str(root)], stdout=log, stderr=subprocess.STDOUT,
                                   cwd=tmp_path)
    try:
        def listening() -> bool:
            log = log_path.read_text(errors="replace")
            assert f"FTPFactory starting on {port}" in log or process.poll() is None, log
            return f"FTPFactory starting on {port}" in log

        wait_until(listening, 20, lambda: log_path.read_text(errors="replace"))
        yield port, contents
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.parametrize("protocol, version", [("socks_v5", "socks5"), ("socks_v4", "socks4")])
def test_socksify_curl_active_ftp(socks_server, ftp_server, tmp_path, protocol, version):
    """curl under socksify: the FTP control connection is a CONNECT, the
    active-mode data connection (PORT) a BIND."""
    server = socks_server()
    ftp_port, contents = ftp_server
    out = subprocess.run([require("socksify"), require("curl"), "-q", "-sS", "--max-time", "20",
                          "--ftp-port", "-", f"ftp://127.0.0.1:{ftp_port}/file.txt"],
                         env=dante_env(tmp_path, server.port, protocol), capture_output=True,
                         timeout=30)
    assert out.returncode == 0, f"{out.stderr!r}\nsocksd:\n{server.log()}"
    assert out.stdout == contents
    session_line(server, rf"{version} user=\S+ method=\w+ bind 127\.0\.0\.1:\d+ up=0 "
                         rf"down={len(contents)} .* ok")
    session_line(server, rf"{version} user=\S+ method=\w+ connect 127\.0\.0\.1:{ftp_port} "
                         r".* ok")


def test_socksify_nc_dns_query_over_udp(socks_server, dns_server, tmp_path):
    server = socks_server()
    query = dns_query(0x4242, "socksd.test")
    out = subprocess.run([require("socksify"), require("nc"), "-u", "-w", "1", LOOPBACK,
                          str(dns_server.port)],
                         input=query, env=dante_env(tmp_path, server.port, "socks_v5"),
                         capture_output=True, timeout=20)
    assert out.returncode == 0, f"{out.stderr!r}\nsocksd:\n{server.log()}"
    assert parse_dns_answer(out.stdout, 0x4242) == ANSWER_ADDRESS
    [(data, source)] = dns_server.received
    assert data == query
    line = session_line(server, r"socks5 user=- method=none udp 127\.0\.0\.1:\d+ .*")
    assert line.endswith("datagrams up=1 down=1 dropped=0 fragments=0"), line
    # The query came from the relay socket, not from nc's own.
    relay_port = int(re.search(r"UDPRelay starting on (\d+)", server.log()).group(1))
    assert source == (LOOPBACK, relay_port)


# UDP ASSOCIATE with raw sockets.


class Association:
    """A UDP ASSOCIATE: the control connection and the client's UDP socket."""

    def __init__(self, server, request: bytes = UDP_ASSOCIATE_ANY, source: str = LOOPBACK):
        self.control, (code, self.relay_host, self.relay_port) = socks5_request(
            server.address, request)
        assert code == 0, f"UDP ASSOCIATE refused with {code}"
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((source, 0))
        self.udp.settimeout(5)

    @property
    def relay(self) -> tuple[str, int]:
        return self.relay_host, self.relay_port

    def send(self, header: bytes, data: bytes) -> None:
        self.udp.sendto(header + data, self.relay)

    def recv(self, timeout: float = 5) -> bytes:
        self.udp.settimeout(timeout)
        data, addr = self.udp.recvfrom(65535)
        assert addr == self.relay, f"answer from {addr}, not from the relay {self.relay}"
        return data

    def close(self) -> None:
        self.udp.close()
        self.control.close()


def test_udp_dns_style_exchange_through_relay(socks_server, udp_echo):
    server = socks_server()
    assoc = Association(server)
    try:
        # The relay is on the address the control connection arrived on.
        assert assoc.relay_host == LOOPBACK and assoc.relay_port != 0
        header = udp_header(LOOPBACK, udp_echo.port)
        for tid in (1, 2, 0xBEEF):
            query = dns_query(tid, f"q{tid}.example")
            assoc.send(header, query)
            assert assoc.recv() == header + query
        assoc.send(header, b"")                # an empty payload is a datagram too
        assert assoc.recv() == header
        assert {addr for _d, addr in udp_echo.received} == {assoc.relay}
    finally:
        assoc.close()
    line = session_line(server, r"socks5 user=- method=none udp 0\.0\.0\.0:0 .*")
    assert line.endswith("datagrams up=4 down=4 dropped=0 fragments=0"), line
    no_tracebacks(server)


def test_udp_dns_query_to_a_dns_responder(socks_server, dns_server):
    server = socks_server()
    assoc = Association(server)
    try:
        header = udp_header(LOOPBACK, dns_server.port)
        assoc.send(header, dns_query(0x1234, "socksd.test"))
        answer = assoc.recv()
        assert answer.startswith(header)
        assert parse_dns_answer(answer[len(header):], 0x1234) == ANSWER_ADDRESS
    finally:
        assoc.close()


def test_udp_domain_name_destination_resolved(socks_server, udp_echo):
    server = socks_server()
    assoc = Association(server)
    try:
        name_header = b"\x00\x00\x00\x03\x09localhost" + udp_echo.port.to_bytes(2, "big")
        assoc.send(name_header, b"by name")
        # The answer names its source by address.
        assert assoc.recv() == udp_header(LOOPBACK, udp_echo.port) + b"by name"
        assoc.send(name_header, b"again")
        assert assoc.recv() == udp_header(LOOPBACK, udp_echo.port) + b"again"
        assert [d for d, _a in udp_echo.received] == [b"by name", b"again"]
    finally:
        assoc.close()


def test_udp_strangers_are_dropped(socks_server, udp_echo):
    server = socks_server()
    assoc = Association(server)
    header = udp_header(LOOPBACK, udp_echo.port)
    try:
        # Another host sends first: not the client.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other_host:
            other_host.bind((STRANGER, 0))
            other_host.sendto(header + b"from another host", assoc.relay)
            time.sleep(0.3)
            assert udp_echo.received == []
        # The client's first datagram goes through...
        assoc.send(header, b"from the client")
        assert assoc.recv() == header + b"from the client"
        # ...and another socket on the client's host is a stranger too.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other_port:
            other_port.bind((LOOPBACK, 0))
            other_port.settimeout(0.5)
            other_port.sendto(header + b"from another port", assoc.relay)
            with pytest.raises(socket.timeout):
                other_port.recvfrom(65535)
        assert [d for d, _a in udp_echo.received] == [b"from the client"]
        assoc.send(header, b"still works")
        assert assoc.recv() == header + b"still works"
    finally:
        assoc.close()
    line = session_line(server, r"socks5 .* udp 0\.0\.0\.0:0 .*")
    assert line.endswith("datagrams up=2 down=2 dropped=2 fragments=0"), line


def test_udp_fragments_and_malformed_datagrams_dropped(socks_server, udp_echo):
    server = socks_server()
    assoc = Association(server)
    try:
        header = udp_header(LOOPBACK, udp_echo.port)
        assoc.send(b"\x00\x00\x01" + header[3:], b"fragment 1")
        assoc.send(b"\x00\x01\x00" + header[3:], b"RSV not 0")
        assoc.send(b"", b"\x00\x00")
        assoc.send(header, b"whole")
        assert assoc.recv() == header + b"whole"
        assert [d for d, _a in udp_echo.received] == [b"whole"]
    finally:
        assoc.close()
    line = session_line(server, r"socks5 .* udp 0\.0\.0\.0:0 .*")
    assert line.endswith("datagrams up=1 down=1 dropped=2 fragments=1"), line
    no_tracebacks(server)


def test_udp_association_torn_down_with_control_connection(socks_server, udp_echo):
    server = socks_server()
    # Settle: the first session may open things that stay (none expected).
    warm = Association(server)
    warm.close()
    session_line(server, r"udp 0\.0\.0\.0:0 .*datagrams")
    time.sleep(0.2)
    before = fd_count(server)

    assoc = Association(server)
    header = udp_header(LOOPBACK, udp_echo.port)
    assoc.send(header, b"ping")
    assert assoc.recv() == header + b"ping"
    assert fd_count(server) == before + 2      # the control connection and the relay socket
    assoc.control.close()

    wait_until(lambda: fd_count(server) == before, 5,
               f"the process's open files to return to {before}")
    assert udp_port_free(assoc.relay_port), "the relay port is still bound"
    # Nothing answers on it any more.
    assoc.send(header, b"after close")
    with pytest.raises((socket.timeout, ConnectionRefusedError)):
        assoc.recv(timeout=0.5)
    assoc.udp.close()
    assert [d for d, _a in udp_echo.received] == [b"ping"]
    line = session_line(server, r"socks5 .* udp 0\.0\.0\.0:0 up=4 down=4 .* ok: datagrams .*")
    assert line.endswith("datagrams up=1 down=1 dropped=0 fragments=0"), line


def test_udp_idle_timeout(socks_server, udp_echo):
    server = socks_server("[server]\nudp_idle_timeout = 1.0\n")
    assoc = Association(server)
    try:
        header = udp_header(LOOPBACK, udp_echo.port)
        assoc.send(header, b"ping")
        assert assoc.recv() == header + b"ping"
        start = time.monotonic()
        assoc.control.settimeout(5)
        assert recv_until_eof(assoc.control) == b""
        assert 0.8 < time.monotonic() - start < 4
        wait_until(lambda: udp_port_free(assoc.relay_port), 3, "the relay port to be closed")
    finally:
        assoc.close()
    session_line(server, r"udp 0\.0\.0\.0:0 .*udp idle timeout: 1 s; datagrams up=1 down=1")


def test_udp_ipv6_destination_on_ipv4_relay_is_dropped_quietly(socks_server, udp_echo):
    server = socks_server()
    assoc = Association(server)
    try:
        v6_header = b"\x00\x00\x00\x04" + socket.inet_pton(socket.AF_INET6, "::1") + \
            udp_echo.port.to_bytes(2, "big")
        assoc.send(v6_header, b"to ::1")
        header = udp_header(LOOPBACK, udp_echo.port)
        assoc.send(header, b"to 127.0.0.1")
        assert assoc.recv() == header + b"to 127.0.0.1"
    finally:
        assoc.close()
    line = session_line(server, r"socks5 .* udp 0\.0\.0\.0:0 .*")
    assert line.endswith("datagrams up=1 down=1 dropped=1 fragments=0"), line
    no_tracebacks(server)


def test_udp_answer_too_large_to_wrap_is_dropped_quietly(socks_server):
    """A DNS answer is bigger than its query: one that fits a UDP datagram
    but not with the SOCKS header in front must be dropped and counted."""
    big = UDPServer(lambda data: b"A" * 65500 if data == b"big" else data)
    server = socks_server()
    assoc = Association(server)
    try:
        header = udp_header(LOOPBACK, big.port)
        assoc.send(header, b"big")
        with pytest.raises(socket.timeout):
            assoc.recv(timeout=0.5)
        assoc.send(header, b"small")
        assert assoc.recv() == header + b"small"
    finally:
        assoc.close()
        big.stop()
    line = session_line(server, r"socks5 .* udp 0\.0\.0\.0:0 .*")
    assert line.endswith("datagrams up=2 down=1 dropped=1 fragments=0"), line
    no_tracebacks(server)


def test_udp_request_naming_the_clients_port(socks_server, udp_echo):
    """DST.ADDR/DST.PORT of the request say where the client sends from:
    only that port is the client."""
    server = socks_server()
    client_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client_udp.bind((LOOPBACK, 0))
    client_udp.settimeout(5)
    src_port = client_udp.getsockname()[1]
    control, (code, host, port) = socks5_request(server.address,
                                                 b"\x05\x03\x00" + ipv4(LOOPBACK, src_port))
    try:
        assert code == 0
        header = udp_header(LOOPBACK, udp_echo.port)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.bind((LOOPBACK, 0))
            other.sendto(header + b"other port first", (host, port))
        time.sleep(0.2)
        client_udp.sendto(header + b"named port", (host, port))
        data, _addr = client_udp.recvfrom(65535)
        assert data == header + b"named port"
        assert [d for d, _a in udp_echo.received] == [b"named port"]
    finally:
        client_udp.close()
        control.close()


# Rules.


def test_connect_only_rule_refuses_bind_and_udp(socks_server, echo_server):
    server = socks_server('[[rules]]\naction = "allow"\nfrom = ["127.0.0.0/8"]\n'
                          'commands = ["connect"]\n')
    refused = b"\x05\x02\x00\x01" + bytes(6)
    for request in (bind5(), UDP_ASSOCIATE_ANY):
        with socket.create_connection(server.address, timeout=10) as s:
            s.sendall(b"\x05\x01\x00")
            assert recv_exact(s, 2) == b"\x05\x00"
            s.sendall(request)
            assert recv_until_eof(s) == refused
    with socket.create_connection(server.address, timeout=10) as s:
        s.sendall(b"\x04\x02\x00\x15" + socket.inet_aton(LOOPBACK) + b"\x00")
        assert recv_until_eof(s) == b"\x00\x5b" + bytes(6)
    # CONNECT is still allowed.
    client, (code, _h, _p) = socks5_request(server.address,
                                            b"\x05\x01\x00" + ipv4(LOOPBACK, echo_server))
    with client:
        assert code == 0
        client.sendall(b"echo")
        assert recv_exact(client, 4) == b"echo"
    session_line(server, r"socks5 .* bind 127\.0\.0\.1:21 .*denied")
    session_line(server, r"socks5 .* udp 0\.0\.0\.0:0 .*denied")
    session_line(server, r"socks4 .* bind 127\.0\.0\.1:21 .*denied")


def test_udp_rules_per_datagram(socks_server, udp_echo):
    server = socks_server(
        '[[rules]]\naction = "deny"\ncommands = ["udp"]\nto = ["127.0.0.0/8"]\n'
        f'ports = [{udp_echo.port}]\n\n'
        '[[rules]]\naction = "allow"\nfrom = ["127.0.0.0/8"]\n')
    assoc = Association(server)
    try:
        assoc.send(udp_header(LOOPBACK, udp_echo.port), b"denied")
        with pytest.raises(socket.timeout):
            assoc.recv(timeout=0.5)
        assert udp_echo.received == []
    finally:
        assoc.close()
    line = session_line(server, r"socks5 .* udp 0\.0\.0\.0:0 .*")
    assert line.endswith("datagrams up=0 down=0 dropped=1 fragments=0"), line
