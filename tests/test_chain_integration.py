"""Upstream chaining end to end (a rule's ``via``): a real `twistd socks`
in front, its client on a real socket, and a real upstream behind it:
another `twistd socks` (SOCKS5 with a password, socks4://, socks5+tls://
with a CA made here, socks5+gssapi:// with the KDC fixture), Debian's
Dante (username method, a system user) and Debian's tinyproxy (http://).

What each test proves comes from the upstream's own account of it: its
session line or its log names the user and the destination it was asked
for, so "the client's credentials never went upstream" and "the name
went unresolved" are read where they would show, not assumed.

Every socket has a timeout; every wait for a log line is bounded."""

from __future__ import annotations

import json
import re
import secrets
import socket
import socketserver
import struct
import threading
import time
from pathlib import Path

import pytest

from chain import Daemon, free_port, make_ca, make_server_cert
from conftest import recv_exact, recv_until_eof, require, run_socks
from helpers import system_user, wait_until
from test_bind_udp_integration import UDPServer
from test_upstream_dante import DANTED_CONF, danted, set_password
from test_upstream_dante import USER as DANTE_USER
from test_upstream_tinyproxy import TINYPROXY_CONF, tinyproxy

pytestmark = pytest.mark.integration

WAIT = 10.0            # seconds any one socket operation or log wait may take
FRONT_USER = ("alice", "pw")      # the client's own credentials, at the front only
UP_USER = ("up", "uppw")          # the front's credentials at a socksd upstream
LOOPBACK_CLIENTS = 'from = ["127.0.0.0/8"]'


# A SOCKS client of our own, on a blocking socket with a timeout: the exact
# bytes of each reply are what the tests look at.

def socks5_open(proxy: tuple[str, int], credentials: tuple[str, str] | None = FRONT_USER,
                ) -> socket.socket:
    """A connection to a SOCKS5 proxy, past method negotiation (and RFC
    1929 with ``credentials``; None: method 0x00)."""
    sock = socket.create_connection(proxy, timeout=WAIT)
    try:
        if credentials is None:
            sock.sendall(b"\x05\x01\x00")
            assert recv_exact(sock, 2) == b"\x05\x00"
        else:
            sock.sendall(b"\x05\x01\x02")
            assert recv_exact(sock, 2) == b"\x05\x02"
            user, password = (part.encode() for part in credentials)
            sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
            assert recv_exact(sock, 2) == b"\x01\x00", "the front refused the client's password"
    except BaseException:
        sock.close()
        raise
    return sock


def address(host: str, port: int) -> bytes:
    """A SOCKS5 address: IPv4, IPv6 or a name (ATYP 1, 4, 3) and the port."""
    try:
        packed = b"\x01" + socket.inet_pton(socket.AF_INET, host)
    except OSError:
        try:
            packed = b"\x04" + socket.inet_pton(socket.AF_INET6, host)
        except OSError:
            packed = b"\x03" + bytes([len(host)]) + host.encode()
    return packed + port.to_bytes(2, "big")


def read_address(sock: socket.socket) -> tuple[str, int]:
    kind = recv_exact(sock, 1)[0]
    if kind == 1:
        host = socket.inet_ntop(socket.AF_INET, recv_exact(sock, 4))
    elif kind == 4:
        host = socket.inet_ntop(socket.AF_INET6, recv_exact(sock, 16))
    elif kind == 3:
        host = recv_exact(sock, recv_exact(sock, 1)[0]).decode()
    else:
        raise AssertionError(f"a reply with ATYP {kind}")
    return host, int.from_bytes(recv_exact(sock, 2), "big")


def reply(sock: socket.socket) -> tuple[int, tuple[str, int]]:
    """A SOCKS5 reply: (REP, bound address)."""
    head = recv_exact(sock, 3)
    assert head[0] == 5 and head[2] == 0, f"not a SOCKS5 reply: {head!r}"
    return head[1], read_address(sock)


def request(sock: socket.socket, command: int, host: str, port: int,
            ) -> tuple[int, tuple[str, int]]:
    sock.sendall(bytes([5, command, 0]) + address(host, port))
    return reply(sock)


def connect(proxy: tuple[str, int], host: str, port: int,
            credentials: tuple[str, str] | None = FRONT_USER) -> tuple[socket.socket, int]:
    """CONNECT through the proxy: (the socket, REP)."""
    sock = socks5_open(proxy, credentials)
    try:
        rep, _bound = request(sock, 1, host, port)
    except BaseException:
        sock.close()
        raise
    return sock, rep


def echo_through(proxy: tuple[str, int], host: str, port: int,
                 credentials: tuple[str, str] | None = FRONT_USER,
                 payload: bytes = b"through the chain") -> None:
    """CONNECT to a TCP echo: REP 0, the payload comes back whole, and
    our half-close comes back as the echo's."""
    sock, rep = connect(proxy, host, port, credentials)
    with sock:
        assert rep == 0, f"REP {rep:#x}"
        sock.sendall(payload)
        assert recv_exact(sock, len(payload)) == payload
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""


def expect_rep(proxy: tuple[str, int], host: str, port: int, expected: int,
               credentials: tuple[str, str] | None = FRONT_USER) -> None:
    """CONNECT fails with ``expected``, and the front then closes."""
    sock, rep = connect(proxy, host, port, credentials)
    with sock:
        assert rep == expected, f"REP {rep:#x}, wanted {expected:#x}"
        assert sock.recv(1) == b""


def udp_packet(host: str, port: int, payload: bytes) -> bytes:
    return b"\x00\x00\x00" + address(host, port) + payload


def udp_unpack(datagram: bytes) -> tuple[str, int, bytes]:
    assert datagram[:3] == b"\x00\x00\x00", datagram
    kind = datagram[3]
    if kind == 1:
        host, rest = socket.inet_ntop(socket.AF_INET, datagram[4:8]), datagram[8:]
    elif kind == 4:
        host, rest = socket.inet_ntop(socket.AF_INET6, datagram[4:20]), datagram[20:]
    else:
        raise AssertionError(f"a datagram with ATYP {kind}: {datagram!r}")
    return host, int.from_bytes(rest[:2], "big"), rest[2:]


def udp_echo_through(relay: tuple[str, int], target: tuple[str, int], payload: bytes,
                     sock: socket.socket | None = None) -> tuple[str, int, bytes]:
    """One datagram to the UDP echo through the front's relay, from
    ``sock`` (the relay takes the client's datagrams from the one port it
    first heard from; None: a socket of its own), and what comes back
    (from, payload). Datagrams can be lost even on loopback: a few tries,
    each bounded."""
    if sock is None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as own:
            return udp_echo_through(relay, target, payload, own)
    sock.settimeout(2)
    for _ in range(3):
        sock.sendto(udp_packet(*target, payload), relay)
        try:
            data, _sender = sock.recvfrom(65536)
        except socket.timeout:
            continue
        return udp_unpack(data)
    raise AssertionError(f"no datagram came back from {target} through {relay}")


# Servers: echoes (TCP: conftest's echo_server), a UDP echo, and configs.

class _AnswerAtEOF(socketserver.BaseRequestHandler):
    """Reads the request to its end (the client's half-close), then
    answers a moment later and closes: whois, or ``nc -N``'s peer."""

    def handle(self) -> None:
        self.request.settimeout(WAIT)
        asked = b""
        while chunk := self.request.recv(65536):
            asked += chunk
        time.sleep(0.3)      # the answer is not in flight when the EOF is passed on
        self.request.sendall(b"answer to " + asked)


class _Threaded(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def answer_at_eof():
    """A TCP server on 127.0.0.1 that answers once the client half-closes."""
    server = _Threaded(("127.0.0.1", 0), _AnswerAtEOF)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def ask_and_half_close(proxy: tuple[str, int], port: int) -> bytes:
    """CONNECT to the answer_at_eof server: the request, our half-close,
    and everything that came back."""
    sock, rep = connect(proxy, "127.0.0.1", port)
    with sock:
        assert rep == 0, f"REP {rep:#x}"
        sock.sendall(b"the question")
        sock.shutdown(socket.SHUT_WR)
        return recv_until_eof(sock)


@pytest.fixture
def udp_echo():
    """A UDP echo answering in upper case."""
    echo = UDPServer(lambda data: data.upper())
    yield echo.port
    echo.stop()


def front_config(upstreams: dict[str, str], via: list[str], rule: str = "",
                 commands: list[str] | None = None, server: str = "") -> str:
    """The front: its client authenticates as alice (its own checker), and
    one rule sends every loopback client's request (``commands``, default
    all) through ``via``; ``rule``: more of its keys, ``server``: of
    [server]. ``upstreams``: name -> the rest of its table (url = ...)."""
    tables = "".join(f'[[upstreams]]\nname = "{name}"\n{body}\n'
                     for name, body in upstreams.items())
    if commands is not None:
        rule += f"\ncommands = {json.dumps(commands)}"    # a JSON list of strings is TOML
    return (f'[server]\nmethods = ["userpass"]\n'
            f'checkers = ["memory:{FRONT_USER[0]}:{FRONT_USER[1]}"]\n{server}\n'
            f"{tables}"
            f'[[rules]]\naction = "allow"\n{LOOPBACK_CLIENTS}\nvia = {json.dumps(via)}\n{rule}\n')


def socks_url(server, scheme: str = "socks5", user: tuple[str, str] | None = UP_USER,
              host: str = "127.0.0.1") -> str:
    who = f"{user[0]}:{user[1]}@" if user is not None else ""
    return f'url = "{scheme}://{who}{host}:{server.port}"'


def session_line(server, pattern: str) -> str:
    """The whole log line of ``server`` in which ``pattern`` matches."""
    return server.wait_for_log(rf"[^\n]*{pattern}[^\n]*", WAIT).group(0)


def lines_of(server, command: str) -> list[str]:
    return [line for line in server.log().splitlines()
            if re.search(rf" socks[45]a? user=\S+ method=\S+ {command} ", line)]


class _Cleanups:
    """What :class:`chain.Daemon` asks of its test case: somewhere to put
    its stop."""

    def __init__(self) -> None:
        self.calls: list = []

    def addCleanup(self, call, *args) -> None:
        self.calls.append((call, args))


@pytest.fixture
def daemons():
    """Start an outside proxy (Dante, tinyproxy) with ``daemons(command,
    port, output, log=None)``: running, and accepting on ``port``, until
    the test ends."""
    cleanups = _Cleanups()

    def start(command: list[str], port: int, output: Path, log: Path | None = None) -> Daemon:
        return Daemon(cleanups, command, port, output, log)

    yield start
    for call, args in reversed(cleanups.calls):
        call(*args)


def logged(daemon: Daemon, pattern: str) -> str:
    """The outside proxy's log, once ``pattern`` is in it."""
    wait_until(lambda: re.search(pattern, daemon.log()), WAIT,
               lambda: f"{pattern!r} in the log:\n{daemon.log()}")
    return daemon.log()


@pytest.fixture
def upstream(socks_server):
    """A socksd upstream: SOCKS5 with a password (user "up"), the default
    rules (loopback clients, anywhere)."""
    return socks_server(None, "--auth", f"memory:{UP_USER[0]}:{UP_USER[1]}")


# 1. socksd behind socksd: CONNECT by address and by name.

def test_connect_by_address_and_by_name(socks_server, upstream, echo_server):
    front = socks_server(front_config({"corp": socks_url(upstream)}, ["corp"]))
    echo_through(front.address, "127.0.0.1", echo_server)
    front_line = session_line(front, rf"user=alice method=userpass connect "
                                     rf"127\.0\.0\.1:{echo_server} via=corp up=17 down=17 .* ok")
    up_line = session_line(upstream, rf"connect 127\.0\.0\.1:{echo_server} up=17 down=17 .* ok")
    assert "user=up method=userpass" in up_line, up_line
    # Debian's /etc/hosts names ::1 localhost too: the upstream tries both,
    # and the echo listens on 127.0.0.1 only.
    echo_through(front.address, "localhost", echo_server, payload=b"by name")
    session_line(front, rf"user=alice method=userpass connect localhost:{echo_server} "
                        r"via=corp up=7 down=7 .* ok")
    # The name reached the upstream unresolved: its line has the name.
    session_line(upstream, rf"user=up method=userpass connect localhost:{echo_server} "
                           r"up=7 down=7 .* ok")
    assert "alice" not in upstream.log(), upstream.log()
    assert front_line and len(lines_of(upstream, "connect")) == 2


# 2. Failover: the next upstream when one cannot be reached; all dead, REP 1.

def test_failover_to_the_next_upstream(socks_server, upstream, echo_server, udp_echo):
    dead = free_port()
    front = socks_server(front_config({"dead": f'url = "socks5://127.0.0.1:{dead}"',
                                       "live": socks_url(upstream)}, ["dead", "live"]))
    echo_through(front.address, "127.0.0.1", echo_server)
    session_line(front, rf"connect 127\.0\.0\.1:{echo_server} via=live up=17 down=17 .* ok")
    session_line(upstream, rf"user=up method=userpass connect 127\.0\.0\.1:{echo_server} ")
    # UDP ASSOCIATE fails over the same way.
    control, relay = associate(front.address)
    with control:
        assert udp_echo_through(relay, ("127.0.0.1", udp_echo), b"over") == \
            ("127.0.0.1", udp_echo, b"OVER")
    session_line(front, r"udp 0\.0\.0\.0:0 via=live .* ok: datagrams up=1 down=1")


def test_failover_past_a_wrong_password_and_a_silent_upstream(socks_server, upstream,
                                                             echo_server):
    """An upstream that refuses our credentials, or says nothing at all (a
    hung proxy: the kernel accepts, nobody answers), makes way for the
    next, within [server] connect_timeout: each is given its share of it,
    not all of it."""
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:
        front = socks_server(front_config(
            {"silent": f'url = "socks5://127.0.0.1:{silent.getsockname()[1]}"',
             "wrong": socks_url(upstream, user=(UP_USER[0], "not-" + UP_USER[1])),
             "live": socks_url(upstream)}, ["silent", "wrong", "live"],
            server="connect_timeout = 6.0"))
        started = time.monotonic()
        echo_through(front.address, "127.0.0.1", echo_server)
        assert time.monotonic() - started < 6.0
    session_line(front, rf"connect 127\.0\.0\.1:{echo_server} via=live up=17 down=17 .* ok")
    session_line(upstream, r"user=up method=userpass - - .* auth failed")
    session_line(upstream, rf"user=up method=userpass connect 127\.0\.0\.1:{echo_server} ")


def test_every_upstream_dead_is_a_general_failure(socks_server, echo_server):
    first, second = free_port(), free_port()
    front = socks_server(front_config({"one": f'url = "socks5://127.0.0.1:{first}"',
                                       "two": f'url = "socks4://127.0.0.1:{second}"'},
                                      ["one", "two"], commands=["connect", "udp"]))
    expect_rep(front.address, "127.0.0.1", echo_server, 0x01)
    line = session_line(front, rf"connect 127\.0\.0\.1:{echo_server} .* connect failed: .*")
    assert "every upstream failed" in line, line
    assert re.search(r"upstream one: .*refused.*upstream two: .*refused", line), line
    # UDP ASSOCIATE: socks4:// does no UDP, the SOCKS5 one is dead.
    sock = socks5_open(front.address)
    with sock:
        rep, _ = request(sock, 3, "0.0.0.0", 0)
        assert rep == 0x01, f"REP {rep:#x}"
        assert sock.recv(1) == b""
    line = session_line(front, r"user=alice method=userpass udp 0\.0\.0\.0:0 .*")
    assert "upstream one: " in line and " ok" not in line, line


# 3. The upstream's refusal for the destination is the client's answer.

def test_the_upstreams_refusal_is_the_answer_without_failover(socks_server, echo_server):
    strict = socks_server(f'[[rules]]\naction = "deny"\nports = ["{echo_server}"]\n\n'
                          f'[[rules]]\naction = "allow"\n{LOOPBACK_CLIENTS}\n',
                          "--auth", f"memory:{UP_USER[0]}:{UP_USER[1]}")
    lenient = socks_server(None, "--auth", f"memory:{UP_USER[0]}:{UP_USER[1]}")
    front = socks_server(front_config({"strict": socks_url(strict),
                                       "lenient": socks_url(lenient)}, ["strict", "lenient"]))
    expect_rep(front.address, "127.0.0.1", echo_server, 0x02)
    line = session_line(front, rf"connect 127\.0\.0\.1:{echo_server} .* denied.*")
    assert "upstream strict" in line, line
    session_line(strict, rf"user=up method=userpass connect 127\.0\.0\.1:{echo_server} .* denied")
    # An answer for the destination is not the upstream failing: the next
    # one is not asked.
    assert lines_of(lenient, "connect") == [], lenient.log()


# 4. BIND through a socksd upstream.

def test_bind_through_the_upstream(socks_server, upstream):
    front = socks_server(front_config({"corp": socks_url(upstream)}, ["corp"]))
    sock = socks5_open(front.address)
    with sock:
        rep, listener = request(sock, 2, "127.0.0.1", 0)
        assert rep == 0, f"REP {rep:#x}"
        # The first reply names where the upstream listens: neither the
        # front's address nor the upstream's SOCKS port.
        assert listener[0] == "127.0.0.1" and listener[1] not in (0, front.port, upstream.port)
        with socket.create_connection(listener, timeout=WAIT) as peer:
            rep, announced = reply(sock)
            assert rep == 0, f"REP {rep:#x}"
            assert announced == peer.getsockname(), (announced, peer.getsockname())
            peer.sendall(b"from the peer")
            assert recv_exact(sock, 13) == b"from the peer"
            sock.sendall(b"to the peer")
            assert recv_exact(peer, 11) == b"to the peer"
            peer.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""
            sock.shutdown(socket.SHUT_WR)
            assert peer.recv(1) == b""
    session_line(front, r"user=alice method=userpass bind 127\.0\.0\.1:0 via=corp "
                        r"up=11 down=13 .* ok")
    session_line(upstream, r"user=up method=userpass bind 127\.0\.0\.1:0 up=11 down=13 .* ok")


# 5. UDP ASSOCIATE through a socksd upstream: an association of the
# front's own with the upstream, living and dying with the client's.

def associate(proxy: tuple[str, int]) -> tuple[socket.socket, tuple[str, int]]:
    """UDP ASSOCIATE (from an address not known yet): the control
    connection and the relay's address."""
    sock = socks5_open(proxy)
    try:
        rep, relay = request(sock, 3, "0.0.0.0", 0)
        assert rep == 0, f"REP {rep:#x}"
    except BaseException:
        sock.close()
        raise
    return sock, relay


def test_udp_through_the_upstream_ends_with_the_clients(socks_server, upstream, udp_echo):
    front = socks_server(front_config({"corp": socks_url(upstream)}, ["corp"]))
    control, relay = associate(front.address)
    with control, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        assert relay[0] == "127.0.0.1" and relay[1] != upstream.port
        assert udp_echo_through(relay, ("127.0.0.1", udp_echo), b"a datagram", client) == \
            ("127.0.0.1", udp_echo, b"A DATAGRAM")
        # A name goes to the upstream unresolved; the answer comes from the
        # address the upstream sent to.
        assert udp_echo_through(relay, ("localhost", udp_echo), b"by name", client) == \
            ("127.0.0.1", udp_echo, b"BY NAME")
        # The upstream holds an association for the front while the client
        # holds its own: no session line of the upstream's yet.
        assert lines_of(upstream, "udp") == []
    # The client's control connection closed: its association ends, and so
    # does the front's with the upstream (the upstream's line says so).
    line = session_line(front, r"user=alice method=userpass udp 0\.0\.0\.0:0 via=corp .* ok")
    assert "datagrams up=2 down=2 dropped=0" in line, line
    up_line = session_line(upstream, r"user=up method=userpass udp \S+ .* ok")
    assert "datagrams up=2 down=2 dropped=0" in up_line, up_line
    assert "alice" not in upstream.log(), upstream.log()


def test_the_upstream_gone_ends_the_clients_association(socks_server, upstream, udp_echo):
    front = socks_server(front_config({"corp": socks_url(upstream)}, ["corp"]))
    control, relay = associate(front.address)
    with control:
        assert udp_echo_through(relay, ("127.0.0.1", udp_echo), b"before") == \
            ("127.0.0.1", udp_echo, b"BEFORE")
        upstream.process.kill()
        upstream.process.wait(WAIT)
        # The front closes the client's control connection: the end of an
        # association, as RFC 1928 has it.
        control.settimeout(WAIT)
        assert control.recv(1) == b""
    line = session_line(front, r"user=alice method=userpass udp 0\.0\.0\.0:0 via=corp .*")
    assert "upstream closed: upstream corp ended the UDP association" in line, line


# 6. socks4:// (SOCKS4a: names unresolved, the URL's USERID).

def test_connect_through_a_socks4_upstream(socks_server, echo_server):
    upstream = socks_server("[socks4]\nenabled = true\nuserid = \"trust\"\n")
    front = socks_server(front_config(
        {"old": f'url = "socks4://chainer@127.0.0.1:{upstream.port}"'}, ["old"],
        commands=["connect", "bind"]))      # SOCKS4 has no UDP
    echo_through(front.address, "127.0.0.1", echo_server)
    session_line(front, rf"connect 127\.0\.0\.1:{echo_server} via=old up=17 down=17 .* ok")
    session_line(upstream, rf"socks4 user=chainer method=\S+ connect 127\.0\.0\.1:{echo_server} "
                           r"up=17 down=17 .* ok")
    echo_through(front.address, "localhost", echo_server)
    session_line(upstream, rf"socks4a user=chainer method=\S+ connect localhost:{echo_server} "
                           r"up=17 down=17 .* ok")
    assert "alice" not in upstream.log(), upstream.log()


# 7. socks5+tls:// with a CA made here.

def tls_upstream(socks_server, tmp_path: Path):
    """A socksd upstream listening on TLS, its certificate (for localhost
    and 127.0.0.1) from a CA of this test: (the server, the CA file)."""
    ca, ca_cert, ca_key = make_ca(tmp_path)
    crt, key = make_server_cert(tmp_path, ca_cert, ca_key, ["localhost"], ["127.0.0.1"])
    server = socks_server(None, "--listen",
                          f"ssl:0:interface=127.0.0.1:certKey={crt}:privateKey={key}",
                          "--auth", f"memory:{UP_USER[0]}:{UP_USER[1]}")
    return server, ca


def test_connect_through_a_tls_upstream(socks_server, tmp_path, echo_server):
    upstream, ca = tls_upstream(socks_server, tmp_path)
    front = socks_server(front_config(
        {"tls": f'{socks_url(upstream, "socks5+tls", host="localhost")}\nca = "{ca}"'}, ["tls"]))
    echo_through(front.address, "127.0.0.1", echo_server)
    session_line(front, rf"connect 127\.0\.0\.1:{echo_server} via=tls up=17 down=17 .* ok")
    session_line(upstream, rf"user=up method=userpass connect 127\.0\.0\.1:{echo_server} "
                           r"up=17 down=17 .* ok")


def test_a_half_close_crosses_a_tls_upstream(socks_server, daemons, tmp_path, answer_at_eof):
    """The client's half-close goes through the TLS hop as TLS 1.3 has it
    (close_notify, then reading on), so the answer the destination sends
    after it comes back. The TLS end is Debian's socat in front of a
    socksd, as stunnel or socat are put in front of a SOCKS server; socat
    passes a close_notify on as a half-close (and waits ``-t`` for the
    other direction)."""
    ca, ca_cert, ca_key = make_ca(tmp_path)
    crt, key = make_server_cert(tmp_path, ca_cert, ca_key, ["localhost"], ["127.0.0.1"])
    behind = socks_server(None, "--auth", f"memory:{UP_USER[0]}:{UP_USER[1]}")
    port = free_port()
    socat = daemons([require("socat"), "-t", str(WAIT),
                     f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={crt},"
                     f"key={key},verify=0",
                     f"TCP:127.0.0.1:{behind.port}"], port, tmp_path / "socat.out")
    front = socks_server(front_config(
        {"tls": f'url = "socks5+tls://up:uppw@localhost:{port}"\nca = "{ca}"'}, ["tls"]))
    assert ask_and_half_close(front.address, answer_at_eof) == b"answer to the question", \
        socat.log()
    session_line(front, rf"connect 127\.0\.0\.1:{answer_at_eof} via=tls up=12 down=22 .* ok")
    session_line(behind, rf"user=up method=userpass connect 127\.0\.0\.1:{answer_at_eof} "
                         r"up=12 down=22 .* ok")


def test_a_tls_upstream_of_another_ca_is_refused(socks_server, tmp_path, echo_server):
    upstream, _ca = tls_upstream(socks_server, tmp_path)
    other, _, _ = make_ca(tmp_path, "other")
    front = socks_server(front_config(
        {"tls": f'{socks_url(upstream, "socks5+tls", host="localhost")}\nca = "{other}"'},
        ["tls"]))
    expect_rep(front.address, "127.0.0.1", echo_server, 0x01)
    line = session_line(front, rf"connect 127\.0\.0\.1:{echo_server} .* connect failed: .*")
    assert "upstream tls" in line and "certificate verify failed" in line, line
    assert lines_of(upstream, "connect") == [], upstream.log()


# 8. socks5+gssapi:// with the KDC fixture: the front's own credentials
# (the realm's ccache, its user's ticket) and the upstream's keytab.

def test_connect_and_udp_through_a_gssapi_upstream(socks_server, kerberos, echo_server,
                                                   udp_echo):
    upstream = socks_server(kerberos.config(), env=kerberos.env)
    front = socks_server(front_config(
        {"krb": f'url = "socks5+gssapi://localhost:{upstream.port}"'}, ["krb"]),
        env=kerberos.env)
    echo_through(front.address, "127.0.0.1", echo_server, payload=b"x" * 100_000)
    session_line(front, rf"connect 127\.0\.0\.1:{echo_server} via=krb up=100000 down=100000 "
                        r".* ok")
    principal = kerberos.user.split("@")[0]
    session_line(upstream, rf"user={re.escape(principal)}\S* method=gssapi connect "
                           rf"127\.0\.0\.1:{echo_server} up=100000 down=100000 .* ok")
    control, relay = associate(front.address)
    with control:
        assert udp_echo_through(relay, ("127.0.0.1", udp_echo), b"protected") == \
            ("127.0.0.1", udp_echo, b"PROTECTED")
    session_line(front, r"udp 0\.0\.0\.0:0 via=krb .* ok: datagrams up=1 down=1")
    session_line(upstream, r"method=gssapi udp \S+ .* ok: datagrams up=1 down=1 dropped=0")
    assert "alice" not in upstream.log(), upstream.log()


# 9. http:// : Debian's tinyproxy, CONNECT only.

def test_connect_through_tinyproxy(socks_server, daemons, tmp_path, echo_server):
    port, password = free_port(), secrets.token_urlsafe(12)
    conf = tmp_path / "tinyproxy.conf"
    conf.write_text(TINYPROXY_CONF.format(port=port, password=password,
                                          connect_ports=f"ConnectPort {echo_server}"))
    proxy = daemons([tinyproxy(), "-d", "-c", str(conf)], port, tmp_path / "tinyproxy.out")
    front = socks_server(front_config(
        {"web": f'url = "http://proxyuser:{password}@127.0.0.1:{port}"'}, ["web"],
        commands=["connect"]))      # tinyproxy does CONNECT only: the rule says so
    echo_through(front.address, "localhost", echo_server)
    session_line(front, rf"connect localhost:{echo_server} via=web up=17 down=17 .* ok")
    # The name went to tinyproxy unresolved, in the front's request.
    logged(proxy, rf"CONNECT localhost:{echo_server} HTTP/1\.1")
    logged(proxy, r'Established connection to host "localhost"')


# 10. Dante: the username method against a system user made here. Its log
# names the user it authenticated: only ever the URL's, never the client's.

def test_connect_and_udp_through_dante(socks_server, daemons, tmp_path, echo_server, udp_echo):
    system_user(DANTE_USER)
    password = secrets.token_urlsafe(12)
    set_password(DANTE_USER, password)
    port, log = free_port(), tmp_path / "danted.log"
    conf = tmp_path / "danted.conf"
    conf.write_text(DANTED_CONF.format(log=log, port=port))
    dante = daemons([danted(), "-f", str(conf), "-p", str(tmp_path / "danted.pid")], port,
                    tmp_path / "danted.out", log)
    front = socks_server(front_config(
        {"dante": f'url = "socks5://{DANTE_USER}:{password}@127.0.0.1:{port}"'}, ["dante"],
        # Dante's config here does no BIND; the datagrams coming back are
        # the rule's "udpreply".
        commands=["connect", "udp", "udpreply"]))
    echo_through(front.address, "127.0.0.1", echo_server)
    session_line(front, rf"user=alice method=userpass connect 127\.0\.0\.1:{echo_server} "
                        r"via=dante up=17 down=17 .* ok")
    logged(dante, rf"tcp/connect \]: .*username%{DANTE_USER}@127\.0\.0\.1\.\d+ "
                  rf".*127\.0\.0\.1\.{echo_server}")
    control, relay = associate(front.address)
    with control:
        assert udp_echo_through(relay, ("127.0.0.1", udp_echo), b"via dante") == \
            ("127.0.0.1", udp_echo, b"VIA DANTE")
    session_line(front, r"user=alice method=userpass udp 0\.0\.0\.0:0 via=dante .* ok: "
                        r"datagrams up=1 down=1")
    text = logged(dante, rf"udp/udpreply -: 127\.0\.0\.1\.{udp_echo} .* "
                         rf"username%{DANTE_USER}@127\.0\.0\.1\.\d+")
    assert set(re.findall(r"username%([^@\s]+)@", text)) == {DANTE_USER}, text
    assert FRONT_USER[0] not in text and FRONT_USER[1] not in text.split(), text


# 11. Where names are resolved: a network in a rule's to needs addresses,
# which a name sent upstream unresolved does not have here.

def test_a_network_with_a_remote_resolving_upstream_is_a_config_error(tmp_path):
    config = tmp_path / "socksd.toml"
    config.write_text(front_config({"corp": 'url = "socks5://127.0.0.1:1081"'}, ["corp"],
                                   rule='to = ["10.0.0.0/8"]'))
    out = run_socks("--config", str(config), "--check", cwd=tmp_path)
    assert out.returncode != 0, out.stdout
    line = next(n for n, text in enumerate(config.read_text().splitlines(), 1)
                if text.startswith("to = "))
    assert f"{config}:{line}: rules[1].to: '10.0.0.0/8': a network cannot judge names sent " \
           "unresolved to upstream 'corp'" in out.stderr, out.stderr
    # resolve = "local" makes it a valid file.
    config.write_text(front_config(
        {"corp": 'url = "socks5://127.0.0.1:1081"\nresolve = "local"'}, ["corp"],
        rule='to = ["10.0.0.0/8"]'))
    out = run_socks("--config", str(config), "--check", cwd=tmp_path)
    assert out.returncode == 0, out.stderr


def test_a_locally_resolving_upstream_gets_the_address(socks_server, upstream, echo_server):
    front = socks_server(front_config(
        {"corp": f'{socks_url(upstream)}\nresolve = "local"'}, ["corp"],
        rule='to = ["127.0.0.0/8"]'))
    # localhost is ::1 too, which no rule allows: 127.0.0.1 is what goes.
    echo_through(front.address, "localhost", echo_server)
    session_line(front, rf"user=alice method=userpass connect localhost:{echo_server} via=corp "
                        r"up=17 down=17 .* ok")
    session_line(upstream, rf"user=up method=userpass connect 127\.0\.0\.1:{echo_server} "
                           r"up=17 down=17 .* ok")
    assert "localhost" not in upstream.log(), upstream.log()


def test_a_locally_resolved_name_no_rule_allows_is_refused_here(socks_server, upstream,
                                                                echo_server):
    front = socks_server(front_config(
        {"corp": f'{socks_url(upstream)}\nresolve = "local"'}, ["corp"],
        rule='to = ["127.0.0.2/32"]'))
    # localhost's addresses are not 127.0.0.2: denied here, like a direct
    # CONNECT, and the upstream is never asked.
    expect_rep(front.address, "localhost", echo_server, 0x02)
    session_line(front, rf"user=alice method=userpass connect localhost:{echo_server} .* denied")
    assert lines_of(upstream, "connect") == [], upstream.log()


# A SOCKS4 client of the front: its requests go through the upstream too
# (SOCKS5 to it), and its USERID stays at the front.

def socks4_request(proxy: tuple[str, int], command: int, host: str, port: int,
                   userid: bytes = b"bob") -> tuple[socket.socket, tuple[int, str, int]]:
    """A SOCKS4 request (SOCKS4a for a name): the socket and the reply
    (CD, host, port)."""
    sock = socket.create_connection(proxy, timeout=WAIT)
    try:
        try:
            packed, name = socket.inet_aton(host), b""
        except OSError:
            packed, name = b"\x00\x00\x00\x01", host.encode() + b"\x00"
        sock.sendall(bytes([4, command]) + port.to_bytes(2, "big") + packed + userid + b"\x00"
                     + name)
        return sock, read_reply4(sock)
    except BaseException:
        sock.close()
        raise


def read_reply4(sock: socket.socket) -> tuple[int, str, int]:
    answer = recv_exact(sock, 8)
    assert answer[0] == 0, f"not a SOCKS4 reply: {answer!r}"
    return answer[1], socket.inet_ntoa(answer[4:]), int.from_bytes(answer[2:4], "big")


def test_a_socks4_client_connects_and_binds_through_the_upstream(socks_server, upstream,
                                                                 echo_server):
    front = socks_server(front_config({"corp": socks_url(upstream)}, ["corp"],
                                      server='[socks4]\nenabled = true\nuserid = "trust"\n'))
    sock, (cd, _host, _port) = socks4_request(front.address, 1, "localhost", echo_server)
    with sock:
        assert cd == 90, f"CD {cd}"
        sock.sendall(b"four")
        assert recv_exact(sock, 4) == b"four"
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    session_line(front, rf"socks4a user=bob method=\S+ connect localhost:{echo_server} via=corp "
                        r"up=4 down=4 .* ok")
    session_line(upstream, rf"socks5 user=up method=userpass connect localhost:{echo_server} "
                           r"up=4 down=4 .* ok")
    sock, (cd, host, port) = socks4_request(front.address, 2, "127.0.0.1", 0)
    with sock:
        assert cd == 90, f"CD {cd}"
        assert host == "127.0.0.1" and port not in (0, front.port, upstream.port)
        with socket.create_connection((host, port), timeout=WAIT) as peer:
            cd, announced_host, announced_port = read_reply4(sock)
            assert cd == 90 and (announced_host, announced_port) == peer.getsockname()
            peer.sendall(b"peer")
            assert recv_exact(sock, 4) == b"peer"
    session_line(front, r"socks4 user=bob method=\S+ bind 127\.0\.0\.1:0 via=corp .* ok")
    assert "bob" not in upstream.log(), upstream.log()


# Waits through an upstream end when they should.

def test_bind_through_the_upstream_waits_no_longer_than_bind_timeout(socks_server, upstream):
    front = socks_server(front_config({"corp": socks_url(upstream)}, ["corp"],
                                      server="bind_timeout = 1.0"))
    sock = socks5_open(front.address)
    with sock:
        rep, _listener = request(sock, 2, "127.0.0.1", 0)
        assert rep == 0, f"REP {rep:#x}"
        started = time.monotonic()
        rep, _ = reply(sock)       # nobody connects: the second reply fails
        # TTL expired, as for a direct BIND that times out.
        assert rep == 0x06 and time.monotonic() - started < 5, f"REP {rep:#x}"
        assert sock.recv(1) == b""
    session_line(front, r"user=alice method=userpass bind 127\.0\.0\.1:0 via=corp .* "
                        r"bind failed: timed out: upstream corp: no connection to the bound "
                        r"address in 1 s")
    # The front went, and so did its BIND at the upstream.
    session_line(upstream, r"user=up method=userpass bind 127\.0\.0\.1:0 .*")


def test_a_client_that_leaves_ends_the_attempt_upstream(socks_server):
    """The client goes (a reset: a FIN would be a half-close, after which
    a client still wants its answer) while the front waits for a silent
    upstream: the front drops its connection to the upstream then, not at
    the timeout."""
    accepted: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent.settimeout(WAIT)
        front = socks_server(front_config(
            {"silent": f'url = "socks5://127.0.0.1:{silent.getsockname()[1]}"'}, ["silent"],
            server="connect_timeout = 30.0"))
        sock = socks5_open(front.address)
        with sock:
            sock.sendall(b"\x05\x01\x00" + address("127.0.0.1", 9))
            conn, _ = silent.accept()
            accepted.append(conn)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with conn:
            conn.settimeout(WAIT)
            started = time.monotonic()
            # Our greeting, then the end: an abort (RST) may come before the
            # greeting is read, and the kernel then drops it unread.
            assert recv_until_eof(conn) in (b"", b"\x05\x01\x00")
            assert time.monotonic() - started < 5
    session_line(front, r"user=alice method=userpass connect 127\.0\.0\.1:9 .* client closed")
