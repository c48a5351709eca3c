"""`twistd identd` end to end: a real twistd process, real sockets on loopback,
connections owned by a throwaway system user (made by a forked child that
setuid()s to it), the stdio/inetd mode, start-up errors, and the two proxy
integrations: `twistd socks` answering ident queries with the SOCKS user it
proxies for, and socksd's own SOCKS4 ident verification against this identd.

Needs root (to create the user and act as it); fails, never skips, without it.
"""

from __future__ import annotations

import contextlib
import encodings.idna  # noqa: F401  (loaded before fork: the child cannot import)
import os
import pwd
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from python_socks.sync import Proxy

from conftest import PAGE, TWISTD, recv_until_eof, require
from helpers import connection_as as held_connection_as
from helpers import stop_process, system_user, wait_until
from socksd.ident import lookup
from socksd.ident.policy import IdentPolicy
from socksd.ident.server import MAX_BAD_QUERIES

pytestmark = pytest.mark.integration

IDENT_USER = "socksd-identd-test"
REPLY = re.compile(rb"(\d+), (\d+) : (USERID|ERROR) : (.*)")


# ---- fixtures and helpers ------------------------------------------------------------

@pytest.fixture(scope="module")
def ident_user() -> pwd.struct_passwd:
    """The throwaway system user whose connections the identd must name."""
    return system_user(IDENT_USER)


class Twistd:
    """A running `twistd -n ...` with its log in a file."""

    def __init__(self, tmp: Path, args: list[str], ready: str = r"IdentFactory starting on (\d+)",
                 count: int = 1) -> None:
        self.log_path = tmp / f"twistd-{id(self)}.log"
        self.log_file = open(self.log_path, "wb")
        self.command = [TWISTD, "-n", "--pidfile=", *args]
        self.process = subprocess.Popen(self.command, stdout=self.log_file,
                                        stderr=subprocess.STDOUT, cwd=tmp)
        self.ports = self.wait_for_ports(ready, count)
        self.port = self.ports[0]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_ports(self, pattern: str, count: int = 1, timeout: float = 30) -> list[int]:
        def listening():
            found = [int(p) for p in re.findall(pattern, self.log())]
            if len(found) < count and self.process.poll() is not None:
                raise AssertionError(f"{self.command} exited with {self.process.returncode}:"
                                     f"\n{self.log()}")
            return found if len(found) >= count else None

        return wait_until(listening, timeout,
                          lambda: f"{self.command} to start listening:\n{self.log()}")

    def stop(self) -> None:
        stop_process(self.process, self.log_file)


@pytest.fixture
def twistd(tmp_path):
    started: list[Twistd] = []

    def start(*args: str, **kwargs) -> Twistd:
        process = Twistd(tmp_path, list(args), **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="module")
def identd(tmp_path_factory):
    """One `twistd -n identd` on 127.0.0.1 with the default policy."""
    process = Twistd(tmp_path_factory.mktemp("identd"),
                     ["identd", "--listen", "tcp:0:interface=127.0.0.1"])
    yield process
    process.stop()


def ask(port: int, query: bytes, host: str = "127.0.0.1", timeout: float = 10) -> bytes:
    """One query to an identd; its reply line without CR LF."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(query)
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(1000)
            assert chunk, f"identd closed after {data!r}"
            data += chunk
    assert data.count(b"\r\n") == 1, data
    return data[:-2]


def answer(reply: bytes) -> tuple[bytes, bytes]:
    match = REPLY.fullmatch(reply)
    assert match, reply
    return match.group(3), match.group(4)


@pytest.fixture
def sockets():
    with contextlib.ExitStack() as stack:
        yield stack


def listener(stack, host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(16)
    return sock


def free_port(stack, host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock.getsockname()[1]


@contextlib.contextmanager
def connection_as(entry: pwd.struct_passwd, listening: socket.socket):
    """A connection to ``listening`` held by a child running as ``entry``;
    yields the child's local port (helpers.connection_as)."""
    with held_connection_as(entry, listening) as held:
        yield held.port


# ---- the standalone identd over TCP ----------------------------------------------------

def test_connection_of_another_user(identd, ident_user, sockets):
    lst = listener(sockets)
    server_port = lst.getsockname()[1]
    with connection_as(ident_user, lst) as child_port:
        reply = ask(identd.port, b"%d , %d\r\n" % (child_port, server_port))
        assert reply == b"%d, %d : USERID : UNIX : %s" % (child_port, server_port,
                                                          IDENT_USER.encode()), identd.log()


def test_several_queries_on_one_connection(identd, ident_user, sockets):
    lst = listener(sockets)
    server_port = lst.getsockname()[1]
    mine = sockets.enter_context(socket.create_connection(lst.getsockname()))
    sockets.enter_context(lst.accept()[0])
    my_port = mine.getsockname()[1]
    nobody = free_port(sockets)
    with connection_as(ident_user, lst) as child_port:
        queries = (b"%d,%d\r\n" % (child_port, server_port)
                   + b"%d, %d\r\n" % (my_port, server_port)
                   + b"%d, %d\r\n" % (nobody, server_port)
                   + b"0, 70000\r\n"
                   + b"%d, %d\r\n" % (child_port, server_port))
        with socket.create_connection(("127.0.0.1", identd.port), timeout=10) as s:
            s.sendall(queries)
            data = b""
            while data.count(b"\r\n") < 5:
                chunk = s.recv(4096)
                assert chunk, data
                data += chunk
    user_line = b"%d, %d : USERID : UNIX : %s" % (child_port, server_port, IDENT_USER.encode())
    assert data.split(b"\r\n")[:-1] == [
        user_line,
        b"%d, %d : ERROR : HIDDEN-USER" % (my_port, server_port),
        b"%d, %d : ERROR : NO-USER" % (nobody, server_port),
        b"0, 70000 : ERROR : INVALID-PORT",
        user_line,
    ]


def test_root_connection_is_hidden(identd, sockets):
    lst = listener(sockets)
    client = sockets.enter_context(socket.create_connection(lst.getsockname()))
    server, _ = lst.accept()
    sockets.enter_context(server)
    cport, sport = client.getsockname()[1], lst.getsockname()[1]
    assert ask(identd.port, b"%d, %d\r\n" % (cport, sport)) == \
        b"%d, %d : ERROR : HIDDEN-USER" % (cport, sport)
    # The other end of the same connection is root's too.
    assert ask(identd.port, b"%d, %d\r\n" % (sport, cport)) == \
        b"%d, %d : ERROR : HIDDEN-USER" % (sport, cport)


def test_no_such_connection(identd, sockets):
    a, b = free_port(sockets), free_port(sockets)
    assert ask(identd.port, b"%d, %d\r\n" % (a, b)) == b"%d, %d : ERROR : NO-USER" % (a, b)


def test_listening_socket_is_no_user(identd, sockets):
    lst = listener(sockets)
    nobody = free_port(sockets)
    port = lst.getsockname()[1]
    assert ask(identd.port, b"%d, %d\r\n" % (port, nobody)) == \
        b"%d, %d : ERROR : NO-USER" % (port, nobody)


def half_closed(port: int, data: bytes, client: str) -> bytes:
    """Send ``data`` to the identd and half-close, as each real client does
    it; everything it answers until it closes."""
    if client == "python":
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            return recv_until_eof(s)
    command = {"nc -N": [require("nc.openbsd"), "-N", "127.0.0.1", str(port)],
               "ncat": [require("ncat"), "127.0.0.1", str(port)]}[client]
    return subprocess.run(command, input=data, capture_output=True, timeout=20).stdout


@pytest.mark.parametrize("client", ["nc -N", "ncat", "python"])
def test_a_query_then_half_close_is_answered(identd, ident_user, sockets, client):
    """The lookup ends after the client's EOF: the answer must still go out
    (it used to be lost with the connection, and nothing was logged)."""
    lst = listener(sockets)
    server_port = lst.getsockname()[1]
    with connection_as(ident_user, lst) as child_port:
        out = half_closed(identd.port, b"%d, %d\r\n" % (child_port, server_port), client)
    assert out == b"%d, %d : USERID : UNIX : %s\r\n" % (child_port, server_port,
                                                       IDENT_USER.encode()), identd.log()


def test_every_query_before_eof_is_answered_the_last_without_cr_lf(identd, ident_user,
                                                                   sockets):
    lst = listener(sockets)
    server_port = lst.getsockname()[1]
    nobody = free_port(sockets)
    with connection_as(ident_user, lst) as child_port:
        out = half_closed(identd.port, b"%d, %d\r\nxyz\r\n0%d , 00%d" % (
            nobody, server_port, child_port, server_port), "python")
    assert out.split(b"\r\n") == [
        b"%d, %d : ERROR : NO-USER" % (nobody, server_port),
        b"xyz : ERROR : INVALID-PORT",
        b"%d, %d : USERID : UNIX : %s" % (child_port, server_port, IDENT_USER.encode()),
        b""]


@pytest.mark.parametrize("query,reply", [
    (b"0, 23\r\n", b"0, 23 : ERROR : INVALID-PORT"),
    (b"65536,23\r\n", b"65536,23 : ERROR : INVALID-PORT"),
    (b"abc, def\r\n", b"abc, def : ERROR : INVALID-PORT"),
])
def test_invalid_port(identd, query, reply):
    assert ask(identd.port, query) == reply


def test_garbage_does_not_hurt_the_server(identd, ident_user, sockets):
    with socket.create_connection(("127.0.0.1", identd.port), timeout=10) as s:
        s.sendall(b"\x00\xff\x16\x03\x01 garbage :: \r\n")
        data = s.recv(1000)
        assert data.endswith(b" : ERROR : INVALID-PORT\r\n"), data
    # A line over the limit (1000) is closed, and the server still answers others.
    with socket.create_connection(("127.0.0.1", identd.port), timeout=10) as s:
        s.sendall(b"1" * 5000)
        s.settimeout(10)
        rest = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(4096):
                rest += chunk
        assert rest == b""
    lst = listener(sockets)
    with connection_as(ident_user, lst) as child_port:
        port = lst.getsockname()[1]
        assert answer(ask(identd.port, b"%d, %d\r\n" % (child_port, port))) == \
            (b"USERID", b"UNIX : " + IDENT_USER.encode())
    assert identd.process.poll() is None
    assert "Traceback" not in identd.log()


@pytest.mark.parametrize("flood", [b"\n" * 65536, (b"A" * 40 + b"\n") * 1600])
def test_a_flood_of_bad_queries_is_closed_with_one_log_line(identd, flood):
    """The hostile-client audit's identd flood: a packet of malformed lines
    used to be answered (and logged) line by line, stalling the reactor for
    seconds. Now a few are answered, then the connection closes with one
    log line, and other clients are answered at once."""
    with socket.create_connection(("127.0.0.1", identd.port), timeout=10) as s:
        me = s.getsockname()[1]
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            s.sendall(flood)
        replies = recv_until_eof(s)
        assert time.monotonic() - started < 5
    assert replies.count(b"\r\n") == MAX_BAD_QUERIES, replies[:500]
    assert ask(identd.port, b"1, 2\r\n") == b"1, 2 : ERROR : NO-USER"
    mine = [line for line in identd.log().splitlines() if f"127.0.0.1:{me} " in line]
    assert len(mine) == 1 and "malformed" in mine[0], mine
    assert "Traceback" not in identd.log()


def test_a_silent_client_does_not_block_others(identd):
    with socket.create_connection(("127.0.0.1", identd.port), timeout=10) as silent:
        silent.sendall(b"123")           # no EOL, ever
        started = time.monotonic()
        assert ask(identd.port, b"1, 2\r\n") == b"1, 2 : ERROR : NO-USER"
        assert time.monotonic() - started < 2


def test_ipv6(twistd, ident_user, sockets):
    identd6 = twistd("identd", "--listen", r"tcp6:0:interface=\:\:1")
    lst = listener(sockets, "::1")
    port = lst.getsockname()[1]
    with connection_as(ident_user, lst) as child_port:
        reply = ask(identd6.port, b"%d, %d\r\n" % (child_port, port), host="::1")
        assert reply == b"%d, %d : USERID : UNIX : %s" % (child_port, port,
                                                          IDENT_USER.encode()), identd6.log()
    a, b = free_port(sockets, "::1"), free_port(sockets, "::1")
    assert ask(identd6.port, b"%d, %d\r\n" % (a, b), host="::1") == \
        b"%d, %d : ERROR : NO-USER" % (a, b)


def test_dual_stack_listener_answers_ipv4_queries(twistd, ident_user, sockets):
    """On a dual-stack tcp6 listener an IPv4 querier is ::ffff:127.0.0.1:
    the lookup must still find the IPv4 connection."""
    dual = twistd("identd", "--listen", r"tcp6:0:interface=\:\:")
    lst = listener(sockets)
    port = lst.getsockname()[1]
    with connection_as(ident_user, lst) as child_port:
        reply = ask(dual.port, b"%d, %d\r\n" % (child_port, port), host="127.0.0.1")
        assert reply == b"%d, %d : USERID : UNIX : %s" % (child_port, port,
                                                          IDENT_USER.encode()), dual.log()


def test_flags_reply_opsys_hide(twistd, ident_user, sockets):
    server = twistd("identd", "--listen", "tcp:0:interface=127.0.0.1", "--reply", "uid",
                    "--opsys", "OTHER", "--hide", "nobody")
    lst = listener(sockets)
    port = lst.getsockname()[1]
    root_client = sockets.enter_context(socket.create_connection(lst.getsockname()))
    sockets.enter_context(lst.accept()[0])
    root_port = root_client.getsockname()[1]
    with connection_as(ident_user, lst) as child_port:
        assert ask(server.port, b"%d, %d\r\n" % (child_port, port)) == \
            b"%d, %d : USERID : OTHER : %d" % (child_port, port, ident_user.pw_uid)
    # --hide replaces the default list: root is no longer hidden.
    assert ask(server.port, b"%d, %d\r\n" % (root_port, port)) == \
        b"%d, %d : USERID : OTHER : 0" % (root_port, port)


def test_config_file_policy(twistd, ident_user, sockets, tmp_path):
    config = tmp_path / "identd.toml"
    config.write_text(f"""
[identd]
listen = ["tcp:0:interface=127.0.0.1"]
unknown_error_only = true
charset = "UTF-8"

[identd.users]
"{IDENT_USER}" = "fixed:guest"
""")
    server = twistd("identd", "--config", str(config))
    lst = listener(sockets)
    port = lst.getsockname()[1]
    with connection_as(ident_user, lst) as child_port:
        assert ask(server.port, b"%d, %d\r\n" % (child_port, port)) == \
            b"%d, %d : USERID : UNIX,UTF-8 : guest" % (child_port, port)
    a, b = free_port(sockets), free_port(sockets)
    assert ask(server.port, b"%d, %d\r\n" % (a, b)) == b"%d, %d : ERROR : UNKNOWN-ERROR" % (a, b)
    assert ask(server.port, b"0, 0\r\n") == b"0, 0 : ERROR : UNKNOWN-ERROR"


def test_idle_timeout_and_max_line_from_config(twistd, tmp_path):
    config = tmp_path / "identd.toml"
    config.write_text('[identd]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
                      "idle_timeout = 0.5\nmax_line = 20\n")
    server = twistd("identd", "--config", str(config))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        started = time.monotonic()
        s.sendall(b"1, ")
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(100) == b""
        assert 0.3 < time.monotonic() - started < 5
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"1," + b" " * 30 + b"2\r\n")
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(100) == b""


def test_per_client_limit_from_config(twistd, tmp_path):
    config = tmp_path / "identd.toml"
    config.write_text('[identd]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
                      "max_connections_per_client = 2\n")
    server = twistd("identd", "--config", str(config))
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(socket.create_connection(("127.0.0.1", server.port),
                                                             timeout=10)) for _ in range(2)]
        third = stack.enter_context(socket.create_connection(("127.0.0.1", server.port),
                                                             timeout=10))
        with contextlib.suppress(OSError):
            third.sendall(b"1, 2\r\n")
        with contextlib.suppress(ConnectionResetError):
            assert third.recv(100) == b""           # closed without an answer
        for s in held:
            s.sendall(b"1, 2\r\n")
            assert s.recv(100) == b"1, 2 : ERROR : NO-USER\r\n"


def refusals_in_log(log: str, line: str, summary: str) -> tuple[int, int]:
    """(lines naming one refusal, refusals in all) in a log, where ``line``
    matches a line for one and ``summary`` one counting more (group 1)."""
    single = len(re.findall(line, log))
    return single, single + sum(int(n) for n in re.findall(summary, log))


def test_a_flood_over_the_per_client_limit_is_not_a_flood_of_log(twistd, tmp_path):
    """A line per refused connection was a line per knock: now the first is
    logged, then a count at most once a second; every refusal is counted."""
    config = tmp_path / "identd.toml"
    config.write_text('[identd]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
                      "max_connections_per_client = 1\n")
    server = twistd("identd", "--config", str(config))
    knocks = 60
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10):
        for _ in range(knocks):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                with contextlib.suppress(ConnectionResetError):
                    assert s.recv(100) == b""           # closed without an answer
    elapsed = time.monotonic() - started
    line = r"identd: refused 127\.0\.0\.1:\d+: max_connections_per_client \(1\)"
    summary = (r"identd: refused (\d+) more in the last second: "
               r"max_connections_per_client \(1\)")
    wait_until(lambda: refusals_in_log(server.log(), line, summary)[1] >= knocks, 10,
               server.log)
    single, total = refusals_in_log(server.log(), line, summary)
    assert total == knocks, server.log()
    # One full line a second at most (and the first), whatever the machine's speed.
    assert single <= elapsed + 2 < knocks, (single, elapsed, server.log())


# ---- stdio (inetd) -------------------------------------------------------------------

def run_identd(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([TWISTD, "identd", *args], capture_output=True, timeout=30,
                          cwd=cwd, **kwargs)


def test_stdio(ident_user, sockets, tmp_path):
    lst = listener(sockets)
    port = lst.getsockname()[1]
    with connection_as(ident_user, lst) as child_port:
        out = run_identd("--stdio", "--local-address", "127.0.0.1", "--remote-address",
                         "127.0.0.1", input=b"%d , %d\r\n" % (child_port, port), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"%d, %d : USERID : UNIX : %s\r\n" % (child_port, port,
                                                              IDENT_USER.encode())
    assert b"Traceback" not in out.stderr


def test_stdio_errors(sockets, tmp_path):
    a, b = free_port(sockets), free_port(sockets)
    out = run_identd("--stdio", "--local-address", "127.0.0.1", "--remote-address",
                     "127.0.0.1", input=b"%d, %d\n" % (a, b), cwd=tmp_path)
    assert (out.returncode, out.stdout) == (0, b"%d, %d : ERROR : NO-USER\r\n" % (a, b))
    out = run_identd("--stdio", "--local-address", "127.0.0.1", "--remote-address",
                     "127.0.0.1", input=b"99999, 1\r\n", cwd=tmp_path)
    assert (out.returncode, out.stdout) == (0, b"99999, 1 : ERROR : INVALID-PORT\r\n")


def test_stdio_without_addresses_on_a_pipe_fails_cleanly(tmp_path):
    out = run_identd("--stdio", input=b"1, 2\r\n", cwd=tmp_path)
    assert out.returncode != 0
    assert out.stdout == b""
    assert b"--local-address" in out.stderr
    assert b"Traceback" not in out.stderr


def test_stdio_on_an_inetd_socket(ident_user, sockets, tmp_path):
    """Under inetd stdin and stdout are the accepted connection; the
    addresses come from it."""
    lst = listener(sockets)
    port = lst.getsockname()[1]
    front = listener(sockets)
    querier = sockets.enter_context(socket.create_connection(front.getsockname(), timeout=10))
    accepted, _ = front.accept()
    sockets.enter_context(accepted)
    with connection_as(ident_user, lst) as child_port:
        querier.sendall(b"%d, %d\r\n" % (child_port, port))
        proc = subprocess.run([TWISTD, "identd", "--stdio"], stdin=accepted, stdout=accepted,
                              stderr=subprocess.PIPE, timeout=30, cwd=tmp_path)
        accepted.close()     # (the forked child holds a copy: read to the EOL, not EOF)
        data = b""
        while not data.endswith(b"\n") and (chunk := querier.recv(1000)):
            data += chunk
    assert proc.returncode == 0, proc.stderr
    assert data == b"%d, %d : USERID : UNIX : %s\r\n" % (child_port, port, IDENT_USER.encode())


@pytest.mark.parametrize("option", ["--local-address", "--remote-address"])
@pytest.mark.parametrize("value,reason", [
    ("bogus", "'bogus' does not appear to be an IPv4 or IPv6 address"),
    ("", "'' does not appear to be an IPv4 or IPv6 address"),
    ("[::1]", "'[::1]' does not appear to be an IPv4 or IPv6 address"),
    ("127.0.0.1:113", "'127.0.0.1:113' does not appear to be an IPv4 or IPv6 address"),
    ("fe80::1%nosuch0", "unknown interface in 'fe80::1%nosuch0'"),
], ids=["name", "empty", "brackets", "with-port", "unknown-scope"])
def test_stdio_bad_address_is_an_option_error(tmp_path, option, value, reason):
    """Refused like any bad option: one line naming it, non-zero, nothing
    answered (it was a traceback, UNKNOWN-ERROR and exit 0)."""
    addresses = {"--local-address": "127.0.0.1", "--remote-address": "127.0.0.1",
                 option: value}
    out = run_identd("--stdio", *(x for pair in addresses.items() for x in pair),
                     input=b"1, 2\r\n", cwd=tmp_path)
    assert out.returncode != 0, out
    assert out.stdout == b""
    assert out.stderr.decode() == f"identd: {option}: {reason}\n"


def test_check_refuses_a_bad_address(tmp_path):
    out = run_identd("--check", "--local-address", "bogus", cwd=tmp_path)
    assert out.returncode != 0
    assert out.stdout == b""
    assert out.stderr.startswith(b"identd: --local-address: 'bogus'"), out.stderr


@pytest.mark.parametrize("listen, problem", [
    ("tcp:99999", b"port '99999' is not 0-65535"),
    ("tcp:113:interface=999.1.1.1", b"interface '999.1.1.1' is not an IP address"),
    ("bogus:1", b"not a valid Twisted endpoint"),
    ("ssl:1443:privateKey=/nonexistent.pem", b"cannot read /nonexistent.pem"),
])
def test_check_refuses_a_bad_listen(tmp_path, listen, problem):
    """--listen is checked as twistd socks checks it: one line, no traceback."""
    out = run_identd("--check", "--listen", listen, cwd=tmp_path)
    assert out.returncode != 0
    assert out.stderr.startswith(b"identd: --listen: '%s': %s" % (listen.encode(), problem)), \
        out.stderr
    assert b"Traceback" not in out.stderr


@pytest.mark.parametrize("host,given", [
    ("127.0.0.1", "127.0.0.1"),
    ("127.0.0.1", "::ffff:127.0.0.1"),      # v4-mapped, as a dual-stack inetd sees it
    ("::1", "::1"),
    ("::1", "0:0:0:0:0:0:0:1"),
])
def test_stdio_address_forms(ident_user, sockets, tmp_path, host, given):
    """Every form the lookup understands is still accepted and answered."""
    lst = listener(sockets, host)
    port = lst.getsockname()[1]
    with connection_as(ident_user, lst) as child_port:
        out = run_identd("--stdio", "--local-address", given, "--remote-address", given,
                         input=b"%d, %d\r\n" % (child_port, port), cwd=tmp_path)
    assert (out.returncode, out.stderr) == (0, b""), out.stderr
    assert out.stdout == b"%d, %d : USERID : UNIX : %s\r\n" % (child_port, port,
                                                              IDENT_USER.encode())


@pytest.mark.parametrize("scope", ["lo", "1"])
def test_stdio_scoped_ipv6_address(sockets, tmp_path, scope):
    """A link-local address with its %interface (name or index) is an address."""
    out = run_identd("--stdio", "--local-address", f"fe80::1%{scope}", "--remote-address",
                     "fe80::2", input=b"1, 2\r\n", cwd=tmp_path)
    assert (out.returncode, out.stdout, out.stderr) == (0, b"1, 2 : ERROR : NO-USER\r\n", b"")


def test_stdio_on_a_unix_socket_fails_cleanly(tmp_path):
    """Not a TCP connection under inetd: no addresses to take (was an IndexError)."""
    querier, stdin = socket.socketpair()
    with querier, stdin:
        querier.sendall(b"1, 2\r\n")
        proc = subprocess.run([TWISTD, "identd", "--stdio"], stdin=stdin, stdout=stdin,
                              stderr=subprocess.PIPE, timeout=30, cwd=tmp_path)
        stdin.close()
        assert proc.returncode != 0
        assert b"--local-address" in proc.stderr and b"Traceback" not in proc.stderr, \
            proc.stderr
        querier.settimeout(10)
        assert recv_until_eof(querier) == b""      # nothing answered


# ---- --check and bad configurations -------------------------------------------------------

def test_check_ok(tmp_path):
    config = tmp_path / "ok.toml"
    config.write_text('[identd]\nlisten = ["tcp:0:interface=127.0.0.1"]\nreply = "hashed"\n')
    out = run_identd("--config", str(config), "--check", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert b"OK" in out.stdout and b"tcp:0:interface=127.0.0.1" in out.stdout


@pytest.mark.parametrize("table,key", [
    ('reply = "sometimes"', "identd.reply"),
    ("max_line = 0", "identd.max_line"),
    ('listen = ["bogus:1"]', "identd.listen"),
    ('opsys = "A:B"', "identd.opsys"),
    ("frobnicate = true", "identd.frobnicate"),
])
@pytest.mark.parametrize("check", [True, False])
def test_bad_config_exits_nonzero_without_traceback(tmp_path, table, key, check):
    config = tmp_path / "bad.toml"
    config.write_text(f"[identd]\n{table}\n")
    args = ["--config", str(config)] + (["--check"] if check else
                                         ["--listen", "tcp:0:interface=127.0.0.1"])
    out = subprocess.run([TWISTD, "-n", "--pidfile=", "identd", *args], capture_output=True,
                         timeout=30, cwd=tmp_path)
    text = (out.stdout + out.stderr).decode(errors="replace")
    assert out.returncode != 0, text
    assert key in text, text
    assert f"{config}:2" in text, text
    assert "Traceback" not in text, text


def test_bad_reply_flag_and_missing_config(tmp_path):
    out = run_identd("--reply", "bogus", "--check", cwd=tmp_path)
    assert out.returncode != 0
    assert b"--reply" in out.stderr and b"Traceback" not in out.stderr
    out = run_identd("--config", str(tmp_path / "missing.toml"), "--check", cwd=tmp_path)
    assert out.returncode != 0
    assert b"missing.toml" in out.stderr and b"Traceback" not in out.stderr


def test_socks_with_bad_identd_table_exits_nonzero(tmp_path):
    config = tmp_path / "socksd.toml"
    config.write_text('[identd]\nenabled = true\nproxied_reply = "whatever"\n')
    out = subprocess.run([TWISTD, "-n", "--pidfile=", "socks", "--config", str(config),
                          "--check"], capture_output=True, timeout=30, cwd=tmp_path)
    text = (out.stdout + out.stderr).decode(errors="replace")
    assert out.returncode != 0, text
    assert "identd.proxied_reply" in text and "Traceback" not in text, text


# ---- the proxy integration (issue 4, item 5) ----------------------------------------------

def proxy_config(extra: str = "") -> str:
    return ('[server]\nmethods = ["userpass"]\n'
            'checkers = ["memory:alice:secret:bob:hunter2"]\n\n'
            '[identd]\nenabled = true\nlisten = ["tcp:0:interface=127.0.0.1"]\n' + extra)


@contextlib.contextmanager
def proxied_session(proxy_port: int, user: str, password: str, target: socket.socket):
    """An open SOCKS5 CONNECT session to ``target`` (a listener); yields the
    proxy's outbound source port as the target sees it."""
    proxy = Proxy.from_url(f"socks5://{user}:{password}@127.0.0.1:{proxy_port}")
    client = proxy.connect(dest_host="127.0.0.1", dest_port=target.getsockname()[1],
                           timeout=10)
    try:
        target.settimeout(10)
        inbound, (_host, source_port) = target.accept()
        try:
            # Bytes both ways: the relay runs, so the session is registered.
            client.sendall(b"ping")
            assert inbound.recv(4) == b"ping"
            inbound.sendall(b"pong")
            assert client.recv(4) == b"pong"
            yield source_port
        finally:
            inbound.close()
    finally:
        client.close()


def identd_port_of(server) -> int:
    return int(server.wait_for_log(r"IdentFactory starting on (\d+)").group(1))


def test_proxied_connection_is_answered_with_the_socks_user(socks_server, sockets):
    server = socks_server(proxy_config())
    ident_port = identd_port_of(server)
    target = listener(sockets)
    tport = target.getsockname()[1]
    with proxied_session(server.port, "alice", "secret", target) as alice_port:
        with proxied_session(server.port, "bob", "hunter2", target) as bob_port:
            assert ask(ident_port, b"%d, %d\r\n" % (alice_port, tport)) == \
                b"%d, %d : USERID : UNIX : alice" % (alice_port, tport), server.log()
            assert ask(ident_port, b"%d , %d\r\n" % (bob_port, tport)) == \
                b"%d, %d : USERID : UNIX : bob" % (bob_port, tport)
    # Once the session is over, the registration is gone: never alice again.
    deadline = time.monotonic() + 5
    while True:
        reply = ask(ident_port, b"%d, %d\r\n" % (alice_port, tport))
        kind, value = answer(reply)
        if kind == b"ERROR":
            break
        assert value != b"UNIX : alice" or time.monotonic() < deadline, reply
        time.sleep(0.05)
    assert value in (b"NO-USER", b"HIDDEN-USER"), reply


def test_proxy_inbound_side_is_answered_by_the_kernel(socks_server, sockets):
    """Only the outbound connection is alice's: the client's connection to
    the proxy is answered as usual (it is root's, this test's own socket)."""
    server = socks_server(proxy_config())
    ident_port = identd_port_of(server)
    target = listener(sockets)
    proxy = Proxy.from_url(f"socks5://alice:secret@127.0.0.1:{server.port}")
    client = proxy.connect(dest_host="127.0.0.1", dest_port=target.getsockname()[1],
                           timeout=10)
    with client:
        inbound, _ = target.accept()
        with inbound:
            cport = client.getsockname()[1]
            assert ask(ident_port, b"%d, %d\r\n" % (cport, server.port)) == \
                b"%d, %d : ERROR : HIDDEN-USER" % (cport, server.port)


def test_proxied_users_false_answers_the_real_owner(socks_server, sockets):
    server = socks_server(proxy_config("proxied_users = false\n"))
    ident_port = identd_port_of(server)
    target = listener(sockets)
    tport = target.getsockname()[1]
    with proxied_session(server.port, "alice", "secret", target) as source_port:
        assert ask(ident_port, b"%d, %d\r\n" % (source_port, tport)) == \
            b"%d, %d : ERROR : HIDDEN-USER" % (source_port, tport)


def test_a_proxied_user_called_root_is_hidden(socks_server, sockets):
    """hide = ["root"] (the default) holds for SOCKS users: a password
    user named root is not announced to the servers it connects to."""
    server = socks_server('[server]\nmethods = ["userpass"]\n'
                          'checkers = ["memory:root:secret:alice:secret"]\n\n'
                          '[identd]\nenabled = true\nlisten = ["tcp:0:interface=127.0.0.1"]\n')
    ident_port = identd_port_of(server)
    target = listener(sockets)
    tport = target.getsockname()[1]
    with proxied_session(server.port, "root", "secret", target) as root_port:
        with proxied_session(server.port, "alice", "secret", target) as alice_port:
            assert ask(ident_port, b"%d, %d\r\n" % (root_port, tport)) == \
                b"%d, %d : ERROR : HIDDEN-USER" % (root_port, tport), server.log()
            assert ask(ident_port, b"%d, %d\r\n" % (alice_port, tport)) == \
                b"%d, %d : USERID : UNIX : alice" % (alice_port, tport)
    server.wait_for_log(r"HIDDEN-USER.*hidden by config \(SOCKS user\)")


def test_proxied_reply_hashed(socks_server, sockets):
    server = socks_server(proxy_config('proxied_reply = "hashed"\nhash_key = "k1"\n'))
    ident_port = identd_port_of(server)
    target = listener(sockets)
    tport = target.getsockname()[1]
    expected = IdentPolicy(hash_key=b"k1").apply("hashed", "alice", None, "test").user
    with proxied_session(server.port, "alice", "secret", target) as source_port:
        assert ask(ident_port, b"%d, %d\r\n" % (source_port, tport)) == \
            b"%d, %d : USERID : UNIX : %s" % (source_port, tport, expected.encode())


# ---- with workers = 2: the workers register with the supervisor's identd (issue 15) --------

class IdentAskingServer:
    """A destination that asks the identd about each connection in its
    accept callback, as an IRC server does, and tells the client, first
    thing, the reply it got."""

    def __init__(self, ident_port: int) -> None:
        self.ident_port = ident_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.heard: dict[int, bytes] = {}     # a connection's source port -> the reply
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, (_host, source_port) = self.sock.accept()
            except OSError:
                return     # closed: the test is over
            try:
                reply = ask(self.ident_port, b"%d, %d\r\n" % (source_port, self.port))
            except Exception as e:     # the client sees it, and the test fails on it
                reply = f"no reply: {e!r}".encode()
            self.heard[source_port] = reply
            threading.Thread(target=self.session, args=(conn, reply), daemon=True).start()

    def session(self, conn: socket.socket, reply: bytes) -> None:
        with conn:
            conn.settimeout(30)
            try:
                conn.sendall(reply + b"\r\n")
                while conn.recv(1024):
                    pass
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_workers_register_with_the_supervisors_identd(socks_server):
    """workers = 2, the identd in the supervisor: a query made from the
    destination's accept callback is answered with the session's user,
    through either worker; once the session is over, never again."""
    ident_port = unused_port()
    server = socks_server(
        '[server]\nworkers = 2\nmethods = ["userpass"]\n'
        'checkers = ["memory:alice:secret:bob:hunter2"]\n\n'
        f'[identd]\nenabled = true\nproxied_users = true\n'
        f'listen = ["tcp:{ident_port}:interface=127.0.0.1"]\n')
    server.wait_for_log(rf"IdentFactory starting on {ident_port}\b")
    for index in (0, 1):
        server.wait_for_log(rf"\] w{index} serving on ")
    destination = IdentAskingServer(ident_port)
    users = [("alice", "secret"), ("bob", "hunter2")]
    served: dict[str, int] = {}        # worker -> sessions it served
    try:
        for number in range(40):
            user, password = users[number % 2]
            proxy = Proxy.from_url(f"socks5://{user}:{password}@127.0.0.1:{server.port}")
            client = proxy.connect(dest_host="127.0.0.1", dest_port=destination.port,
                                   timeout=10)
            with client:
                client.settimeout(10)
                client_port = client.getsockname()[1]
                line = recv_line(client)
            kind, value = answer(line)
            source_port = int(REPLY.fullmatch(line).group(1))
            assert (kind, value) == (b"USERID", b"UNIX : " + user.encode()), \
                (line, server.log())
            # The session's line says which worker served it.
            worker = server.wait_for_log(
                rf"\] (w\d) 127\.0\.0\.1:{client_port} socks5 user={user} ").group(1)
            served[worker] = served.get(worker, 0) + 1
            # Over: its retraction reached the identd; the port is not the user's.
            after = no_longer_answered(ident_port, source_port, destination.port, user)
            assert after in (b"NO-USER", b"HIDDEN-USER"), after
            if len(served) == 2 and min(served.values()) >= 2:
                break
    finally:
        destination.close()
    assert sorted(served) == ["w0", "w1"], served
    assert "malformed identd registration" not in server.log()


def owner_pid(port: int, dest_port: int, candidates: list[int]) -> int:
    """Which of ``candidates`` holds the socket 127.0.0.1:port -> dest_port."""
    owner = lookup.lookup(lookup.Connection("127.0.0.1", port, "127.0.0.1", dest_port))
    assert owner is not None, port
    for pid in candidates:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{owner.inode}]":
                    return pid
    raise AssertionError(f"no worker holds socket:[{owner.inode}]")


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def test_a_worker_that_dies_takes_its_registrations_with_it(socks_server):
    """SIGKILL a worker in the middle of a session: its entries are cleared
    (the port is no longer answered with the user), and the worker that
    replaces it registers its own sessions."""
    server = socks_server(
        '[server]\nworkers = 2\nmethods = ["userpass"]\n'
        'checkers = ["memory:alice:secret"]\n\n'
        '[identd]\nenabled = true\nlisten = ["tcp:0:interface=127.0.0.1"]\n')
    ident_port = identd_port_of(server)
    for index in (0, 1):
        server.wait_for_log(rf"\] w{index} serving on ")
    workers = wait_until(lambda: (c := children(server.process.pid)) and len(c) == 2 and c, 15)
    destination = IdentAskingServer(ident_port)
    try:
        proxy = Proxy.from_url(f"socks5://alice:secret@127.0.0.1:{server.port}")
        with proxy.connect(dest_host="127.0.0.1", dest_port=destination.port,
                           timeout=10) as client:
            client.settimeout(10)
            line = recv_line(client)
            assert answer(line) == (b"USERID", b"UNIX : alice"), line
            source_port = int(REPLY.fullmatch(line).group(1))
            os.kill(owner_pid(source_port, destination.port, workers), signal.SIGKILL)
            server.wait_for_log(r"worker \d ended .*; restarting")
            after = no_longer_answered(ident_port, source_port, destination.port, "alice")
            assert after in (b"NO-USER", b"HIDDEN-USER"), after
        wait_until(lambda: len(children(server.process.pid)) == 2, 15)
        server.wait_for_log(r"worker \d started \(pid \d+\)(?s:.*)worker \d started "
                            r"(?s:.*)worker \d started")
        for _ in range(6):      # both workers, the new one too, with the kernel's spread
            with proxy.connect(dest_host="127.0.0.1", dest_port=destination.port,
                               timeout=10) as client:
                client.settimeout(10)
                assert answer(recv_line(client)) == (b"USERID", b"UNIX : alice")
    finally:
        destination.close()


def recv_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1000)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data[:-2]


def no_longer_answered(ident_port: int, port: int, dest_port: int, user: str) -> bytes:
    """Ask about an ended session's port until the identd stops naming its
    user (its retraction and its log line cross on two channels); then the
    user is never named again. The error it answers with."""
    deadline = time.monotonic() + 5
    while True:
        kind, value = answer(ask(ident_port, b"%d, %d\r\n" % (port, dest_port)))
        if kind == b"ERROR":
            break
        assert time.monotonic() < deadline, f"{port} still answered {value!r}"
        time.sleep(0.05)
    for _ in range(3):
        kind, again = answer(ask(ident_port, b"%d, %d\r\n" % (port, dest_port)))
        assert not (kind == b"USERID" and again.endswith(user.encode())), again
    return value


# ---- socksd's SOCKS4 ident verification against this identd --------------------------------

def socks4_ident_config(ident_port: int) -> str:
    return (f'[socks4]\nuserid = "ident"\nident_port = {ident_port}\nident_timeout = 3\n\n'
            '[[rules]]\naction = "allow"\nfrom = ["127.0.0.0/8"]\nversions = [4]\n'
            "verified = true\n")


def curl_as(user: pwd.struct_passwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require("curl"), "-q", "-sS", "--max-time", "15", *args],
                          capture_output=True, timeout=20, user=user.pw_uid,
                          group=user.pw_gid, extra_groups=[], cwd="/",
                          env={"PATH": "/usr/bin:/bin", "HOME": "/"})


def test_socks4_ident_verification_against_our_identd(socks_server, identd, http_server,
                                                      ident_user):
    server = socks_server(socks4_ident_config(identd.port))
    url = f"http://127.0.0.1:{http_server}/"
    out = curl_as(ident_user, "-x", f"socks4://{IDENT_USER}@127.0.0.1:{server.port}", url)
    assert out.returncode == 0, f"{out.stderr!r}\n{server.log()}\n{identd.log()}"
    assert out.stdout == PAGE
    server.wait_for_log(rf"socks4 user={IDENT_USER} method=ident connect "
                        rf"127\.0\.0\.1:{http_server} .* ok")
    out = curl_as(ident_user, "-x", f"socks4://someoneelse@127.0.0.1:{server.port}", url)
    assert out.returncode != 0
    assert b"(93)" in out.stderr, out.stderr


def test_socks4_exact_reply_bytes_against_our_identd(socks_server, identd, http_server,
                                                     ident_user, sockets):
    """The raw SOCKS4 exchange made by the throwaway user: 90, then 93."""
    server = socks_server(socks4_ident_config(identd.port))
    head = b"\x04\x01" + http_server.to_bytes(2, "big") + socket.inet_aton("127.0.0.1")
    replies = []
    for userid in (IDENT_USER.encode(), b"mallory"):
        replies.append(socks4_as(ident_user, server.port, head + userid + b"\x00"))
    assert replies[0][:2] == b"\x00\x5a", (replies, server.log())
    assert replies[1] == b"\x00\x5d" + bytes(6), replies


def socks4_as(entry: pwd.struct_passwd, port: int, request: bytes) -> bytes:
    """A SOCKS4 request sent by a child running as ``entry``: the first 8
    reply bytes (fewer if the server closes)."""
    read_r, read_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_r)
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(15)
            sock.connect(("127.0.0.1", port))
            sock.sendall(request)
            reply = b""
            while len(reply) < 8:
                chunk = sock.recv(8 - len(reply))
                if not chunk:
                    break
                reply += chunk
            os.write(read_w, reply)
            status = 0
        except BaseException as e:
            os.write(read_w, f"error {e!r}".encode())
        finally:
            os._exit(status)
    os.close(read_w)
    try:
        data = b""
        while chunk := os.read(read_r, 100):
            data += chunk
    finally:
        os.close(read_r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    return data


def test_socks4_ident_against_the_identd_in_the_same_process(socks_server, http_server,
                                                             ident_user, sockets):
    """One twistd: the proxy's SOCKS4 ident check queries the identd that
    runs in its own reactor (the lookup must not deadlock the process)."""
    ident_port = free_port(sockets)
    sockets.close()     # release it for the identd
    config = (socks4_ident_config(ident_port)
              + f'\n[identd]\nenabled = true\nlisten = ["tcp:{ident_port}:interface=127.0.0.1"]\n')
    server = socks_server(config)
    assert identd_port_of(server) == ident_port
    url = f"http://127.0.0.1:{http_server}/"
    out = curl_as(ident_user, "-x", f"socks4://{IDENT_USER}@127.0.0.1:{server.port}", url)
    assert out.returncode == 0, f"{out.stderr!r}\n{server.log()}"
    assert out.stdout == PAGE
    out = curl_as(ident_user, "-x", f"socks4://root@127.0.0.1:{server.port}", url)
    assert b"(93)" in out.stderr, out.stderr


def test_identd_table_without_enabled_does_not_start_the_identd_in_socks(socks_server):
    """README: ``enabled`` defaults to false for `twistd socks`, so a config
    shared with a standalone `twistd identd` does not bind its port twice."""
    server = socks_server('[identd]\nlisten = ["tcp:0:interface=127.0.0.1"]\n')
    time.sleep(0.5)
    assert server.process.poll() is None, server.log()
    assert "IdentFactory" not in server.log()


def test_socks_and_identd_share_one_config_file(twistd, socks_server, tmp_path):
    """The DESIGN's deployment: `twistd socks --config F` and `twistd identd
    --config F` side by side; ``enabled = false`` keeps the identd out of the
    proxy, and the standalone identd serves the table anyway."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = f'[identd]\nenabled = false\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n'
    config = tmp_path / "shared.toml"
    config.write_text(text)
    standalone = twistd("identd", "--config", str(config))
    assert standalone.port == port
    proxy = socks_server(text)
    time.sleep(0.5)
    assert proxy.process.poll() is None, proxy.log()
    assert "IdentFactory" not in proxy.log()
    assert ask(port, b"0, 0\r\n") == b"0, 0 : ERROR : INVALID-PORT"


def test_check_defaults_to_port_113(tmp_path):
    out = run_identd("--check", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert b"tcp:113" in out.stdout


# ---- privileges and user files ---------------------------------------------------------

def test_drops_privileges_after_binding(twistd, ident_user, sockets):
    server = twistd(f"--uid={ident_user.pw_uid}", f"--gid={ident_user.pw_gid}", "identd",
                    "--listen", "tcp:0:interface=127.0.0.1")
    server.wait_for_ports(r"set uid/gid (\d+)")
    with open(f"/proc/{server.process.pid}/status") as f:
        uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
    assert set(map(int, uids)) == {ident_user.pw_uid}
    lst = listener(sockets)
    port = lst.getsockname()[1]
    root_client = sockets.enter_context(socket.create_connection(lst.getsockname()))
    sockets.enter_context(lst.accept()[0])
    root_port = root_client.getsockname()[1]
    # Unprivileged, it still sees who owns every connection.
    assert ask(server.port, b"%d, %d\r\n" % (root_port, port)) == \
        b"%d, %d : ERROR : HIDDEN-USER" % (root_port, port), server.log()
    with connection_as(ident_user, lst) as child_port:
        assert ask(server.port, b"%d, %d\r\n" % (child_port, port)) == \
            b"%d, %d : USERID : UNIX : %s" % (child_port, port, IDENT_USER.encode())


def test_as_nobody_it_answers_for_every_users_sockets(twistd, ident_user, sockets):
    """twistd -u nobody -g nogroup identd: the kernel's sock_diag answers an
    unprivileged process about other users' sockets, root's included."""
    server = twistd("-u", "nobody", "-g", "nogroup", "identd", "--listen",
                    "tcp:0:interface=127.0.0.1", "--hide", "nobody")
    server.wait_for_ports(r"set uid/gid (\d+)")
    with open(f"/proc/{server.process.pid}/status") as f:
        status = f.read()
    nobody = pwd.getpwnam("nobody")
    for field, expected in (("Uid:", nobody.pw_uid), ("Gid:", nobody.pw_gid)):
        line = next(line for line in status.splitlines() if line.startswith(field))
        assert set(map(int, line.split()[1:])) == {expected}, line
    lst = listener(sockets)
    port = lst.getsockname()[1]
    root_client = sockets.enter_context(socket.create_connection(lst.getsockname()))
    sockets.enter_context(lst.accept()[0])
    root_port = root_client.getsockname()[1]
    assert ask(server.port, b"%d, %d\r\n" % (root_port, port)) == \
        b"%d, %d : USERID : UNIX : root" % (root_port, port), server.log()
    with connection_as(ident_user, lst) as child_port:
        assert ask(server.port, b"%d, %d\r\n" % (child_port, port)) == \
            b"%d, %d : USERID : UNIX : %s" % (child_port, port, IDENT_USER.encode())
        # The listener's end of that connection is root's.
        assert ask(server.port, b"%d, %d\r\n" % (port, child_port)) == \
            b"%d, %d : USERID : UNIX : root" % (port, child_port)
    assert "Traceback" not in server.log()


@pytest.fixture
def user_file(ident_user):
    """Writes ~/.config/socksd-ident for the throwaway user (in its passwd
    home), removing whatever it created afterwards."""
    home = Path(ident_user.pw_dir)
    created: list[Path] = []
    for directory in (home, home / ".config"):
        if not directory.exists():
            directory.mkdir(mode=0o755)
            os.chown(directory, ident_user.pw_uid, ident_user.pw_gid)
            created.append(directory)
    path = home / ".config" / "socksd-ident"
    assert not path.exists() or path in created, f"{path} exists already"

    def write(text: str) -> Path:
        path.write_text(text)
        os.chown(path, ident_user.pw_uid, ident_user.pw_gid)
        return path

    yield write
    path.unlink(missing_ok=True)
    for directory in reversed(created):
        directory.rmdir()


def test_user_file_over_a_real_identd(twistd, ident_user, user_file, sockets, tmp_path):
    config = tmp_path / "identd.toml"
    config.write_text('[identd]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
                      f'user_files = ["{IDENT_USER}"]\n')
    server = twistd("identd", "--config", str(config))
    lst = listener(sockets)
    port = lst.getsockname()[1]
    with connection_as(ident_user, lst) as child_port:
        query = b"%d, %d\r\n" % (child_port, port)
        assert answer(ask(server.port, query))[1] == b"UNIX : " + IDENT_USER.encode()
        user_file("fixed:ircnick\n")
        assert answer(ask(server.port, query))[1] == b"UNIX : ircnick"
        user_file("hidden\n")
        assert answer(ask(server.port, query)) == (b"ERROR", b"HIDDEN-USER")
        user_file("not a mode\n")
        assert answer(ask(server.port, query))[1] == b"UNIX : " + IDENT_USER.encode()


def test_check_the_example_config(tmp_path):
    example = Path(__file__).resolve().parent.parent / "examples" / "socksd.toml"
    out = run_identd("--config", str(example), "--check", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert b"tcp:113" in out.stdout


def test_a_user_file_it_cannot_read_after_dropping_root_is_a_warning(
        twistd, ident_user, user_file, sockets, tmp_path):
    """Optional and many, so a warning at start, not a stop; the identd then
    answers as if the file were not there."""
    config = tmp_path / "identd.toml"
    config.write_text('[identd]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
                      f'user_files = ["{IDENT_USER}"]\n')
    reply = user_file("fixed:ircnick\n")
    reply.chmod(0o600)
    check = subprocess.run([TWISTD, "-u", "nobody", "-g", "nogroup", "identd", "--config",
                            str(config), "--check"], capture_output=True, timeout=30,
                           cwd=tmp_path)
    assert check.returncode == 0, check
    warning = (f"identd: {reply}, {IDENT_USER}'s reply mode, cannot be read as nobody:nogroup "
               "(uid 65534, gid 65534), whom twistd -u/-g runs the identd as (Permission "
               "denied): it is ignored")
    assert check.stdout.decode().splitlines()[1:] == [f"warning: {warning}"], check
    # The identd that twistd socks runs ([identd] enabled) is checked the same way.
    socks_config = tmp_path / "socksd.toml"
    socks_config.write_text(config.read_text() + "enabled = true\n")
    check = subprocess.run([TWISTD, "-u", "nobody", "-g", "nogroup", "socks", "--config",
                            str(socks_config), "--check"], capture_output=True, timeout=30,
                           cwd=tmp_path)
    assert check.returncode == 0, check
    assert check.stdout.decode().splitlines()[1:] == [f"warning: {warning}"], check
    server = twistd("-u", "nobody", "-g", "nogroup", "identd", "--config", str(config))
    assert re.search(rf"\[socksd#warn\] {re.escape(warning)}\n", server.log()), server.log()
    lst = listener(sockets)
    port = lst.getsockname()[1]
    with connection_as(ident_user, lst) as child_port:
        query = b"%d, %d\r\n" % (child_port, port)
        assert answer(ask(server.port, query))[1] == b"UNIX : " + IDENT_USER.encode()
        reply.chmod(0o644)     # read at each query: now it counts
        assert answer(ask(server.port, query))[1] == b"UNIX : ircnick"
