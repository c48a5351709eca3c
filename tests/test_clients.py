"""Real clients (curl, OpenBSD nc, ncat, python-socks, raw sockets) against a
real `twistd -n socks` subprocess, and the config errors `twistd socks` reports.

Every socket and subprocess has a bounded timeout; a missing client fails.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import PAGE, TWISTD, PageHandler, recv_exact, recv_until_eof, require, run_socks
from helpers import wait_until

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "socksd.toml"
LOOPBACK_RULE = """
[[rules]]
action = "allow"
from = ["127.0.0.0/8", "::1/128"]
"""


# Helpers.

def curl(*args: str, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run([require("curl"), "-sS", "--max-time", "10", *args],
                          capture_output=True, timeout=timeout)


def socks5_connect(proxy: tuple[str, int], host: str, port: int,
                   timeout: float = 10) -> socket.socket:
    """A plain socket through the proxy (method 0x00, CONNECT to an IPv4 literal)."""
    sock = socket.create_connection(proxy, timeout=timeout)
    try:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big"))
        head = recv_exact(sock, 4)
        assert head[:2] == b"\x05\x00", f"CONNECT refused: {head!r}"
        atyp = head[3]
        rest = {1: 4, 4: 16}.get(atyp)
        if rest is None:
            rest = recv_exact(sock, 1)[0]
        recv_exact(sock, rest + 2)
    except BaseException:
        sock.close()
        raise
    return sock


def wait_closed(sock: socket.socket, within: float) -> float:
    """Seconds until the proxy closes ``sock`` (EOF or reset); fails after ``within``."""
    sock.settimeout(within)
    start = time.monotonic()
    try:
        recv_until_eof(sock)
    except socket.timeout:
        raise AssertionError(f"connection still open after {within} s") from None
    return time.monotonic() - start


def session_lines(server, pattern: str) -> list[str]:
    return [line for line in server.log().splitlines() if re.search(pattern, line)]


# curl through the embedded default config.

@pytest.mark.parametrize("scheme", ["socks5h", "socks5"])
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_curl_default_config(socks_server, http_server, scheme, host):
    server = socks_server()
    assert "--config" not in server.command
    out = curl("-x", f"{scheme}://127.0.0.1:{server.port}", f"http://{host}:{http_server}/")
    assert out.returncode == 0, out.stderr
    assert out.stdout == PAGE
    # socks5h sends the name; socks5 resolves on the client and sends the address.
    dest = host if scheme == "socks5h" else "127.0.0.1"
    server.wait_for_log(rf"method=none connect {re.escape(dest)}:{http_server} "
                        rf"up=\d+ down=\d+ .* ok")


class _IPv6HTTPServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True


@pytest.fixture
def http6_server():
    """An HTTP server on [::1] answering PAGE; yields its port."""
    server = _IPv6HTTPServer(("::1", 0), PageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("scheme", ["socks5h", "socks5"])
def test_curl_ipv6_destination(socks_server, http6_server, scheme):
    server = socks_server()
    out = curl("-x", f"{scheme}://127.0.0.1:{server.port}", f"http://[::1]:{http6_server}/")
    assert out.returncode == 0, out.stderr
    assert out.stdout == PAGE
    server.wait_for_log(rf"connect \[::1\]:{http6_server} up=\d+ down=\d+ .* ok")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scheme", ["socks5h", "socks5"])
def test_curl_connection_refused(socks_server, scheme):
    server = socks_server()
    port = _closed_port()
    out = curl("-x", f"{scheme}://127.0.0.1:{server.port}", f"http://127.0.0.1:{port}/")
    assert out.returncode == 97, out.stderr
    assert b"(5)" in out.stderr  # reply 0x05: connection refused
    server.wait_for_log(rf"connect 127\.0\.0\.1:{port} .*connect failed: connection refused")


def test_curl_unknown_name(socks_server):
    server = socks_server()
    out = curl("-x", f"socks5h://127.0.0.1:{server.port}", "http://something.invalid/")
    assert out.returncode == 97, out.stderr
    assert b"(4)" in out.stderr  # reply 0x04: host unreachable
    server.wait_for_log(r"connect something\.invalid:80 .*connect failed: host unreachable")


# Half-close through nc and ncat.

def test_openbsd_nc_half_close(socks_server, echo_server):
    server = socks_server()
    nc = require("nc")
    data = os.urandom(6000).hex().encode()  # 12 KB, no NULs to upset anyone
    out = subprocess.run([nc, "-N", "-X", "5", "-x", f"127.0.0.1:{server.port}",
                          "127.0.0.1", str(echo_server)],
                         input=data, capture_output=True, timeout=15)
    assert out.returncode == 0, out.stderr
    assert out.stdout == data
    server.wait_for_log(rf"connect 127\.0\.0\.1:{echo_server} up={len(data)} "
                        rf"down={len(data)} .* ok")


def test_ncat_echo(socks_server, echo_server):
    server = socks_server()
    ncat = require("ncat")
    data = os.urandom(3000).hex().encode()
    out = subprocess.run([ncat, "--proxy", f"127.0.0.1:{server.port}", "--proxy-type",
                          "socks5", "127.0.0.1", str(echo_server)],
                         input=data, capture_output=True, timeout=15)
    assert out.returncode == 0, out.stderr
    assert out.stdout == data
    server.wait_for_log(rf"connect 127\.0\.0\.1:{echo_server} up={len(data)} "
                        rf"down={len(data)} .* ok")


# python-socks.

def _echo_through(proxy_url: str, host: str, port: int, rdns: bool | None) -> None:
    from python_socks.sync import Proxy

    proxy = Proxy.from_url(proxy_url, rdns=rdns)
    sock = proxy.connect(host, port, timeout=10)
    try:
        sock.settimeout(10)
        sock.sendall(b"hello through socksd")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b"hello through socksd"
    finally:
        sock.close()


@pytest.mark.parametrize("rdns", [True, False])
def test_python_socks_no_auth(socks_server, echo_server, rdns):
    server = socks_server()
    _echo_through(f"socks5://127.0.0.1:{server.port}", "localhost", echo_server, rdns)
    dest = "localhost" if rdns else "127.0.0.1"
    server.wait_for_log(rf"user=- method=none connect {dest}:{echo_server} up=20 down=20 .* ok")


def test_python_socks_userpass(socks_server, echo_server):
    from python_socks import ProxyError

    server = socks_server('[server]\nmethods = ["userpass"]\n'
                          'checkers = ["memory:alice:secret"]\n')
    url = f"socks5://alice:secret@127.0.0.1:{server.port}"
    _echo_through(url, "localhost", echo_server, True)
    _echo_through(url, "127.0.0.1", echo_server, False)
    server.wait_for_log(rf"user=alice method=userpass connect localhost:{echo_server} .* ok")
    server.wait_for_log(rf"user=alice method=userpass connect 127\.0\.0\.1:{echo_server} .* ok")
    with pytest.raises(ProxyError):
        _echo_through(f"socks5://alice:nope@127.0.0.1:{server.port}", "localhost",
                      echo_server, True)
    with pytest.raises(ProxyError):  # no credentials: the server wants userpass only
        _echo_through(f"socks5://127.0.0.1:{server.port}", "localhost", echo_server, True)
    server.wait_for_log(r"user=alice method=userpass .*auth failed")
    assert "nope" not in server.log()


# Raw sockets.

def test_no_acceptable_method(socks_server):
    server = socks_server('[server]\nmethods = ["none"]\n')
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(b"\x05\x01\x02")
        assert recv_until_eof(sock) == b"\x05\xff"
    server.wait_for_log(r"no acceptable method")


# Rules.

def test_rule_denies_port(socks_server, http_server, echo_server):
    server = socks_server(f"""
[[rules]]
action = "deny"
ports = ["{echo_server}"]
log = true
{LOOPBACK_RULE}""")
    for scheme, host in (("socks5h", "localhost"), ("socks5", "127.0.0.1")):
        out = curl("-x", f"{scheme}://127.0.0.1:{server.port}", f"http://{host}:{echo_server}/")
        assert out.returncode == 97, out.stderr
        assert b"(2)" in out.stderr  # reply 0x02: not allowed by ruleset
        server.wait_for_log(rf"connect {host}:{echo_server} .*denied.*rule 1")
    # Rule 2 allows the rest.
    out = curl("-x", f"socks5h://127.0.0.1:{server.port}", f"http://localhost:{http_server}/")
    assert out.returncode == 0, out.stderr
    assert out.stdout == PAGE
    denied = session_lines(server, r"denied")
    assert len(denied) == 2 and all("rule 1" in line for line in denied), server.log()


# Flow control.

MiB = 1 << 20


@pytest.mark.parametrize("path", ["splice", "twisted"])
def test_flow_control_bounds_memory(socks_server, path):
    """On both relay paths: a receiver that stops reading stalls the sender,
    memory stays bounded, and once it reads every byte arrives intact."""
    server = socks_server("[server]\nsplice = false\n" if path == "twisted" else None)
    total = 256 * MiB
    chunk_size = MiB
    block = os.urandom(chunk_size)

    sink = socket.create_server(("127.0.0.1", 0))
    sink.settimeout(10)
    client = socks5_connect(server.address, "127.0.0.1", sink.getsockname()[1])
    conn, _ = sink.accept()
    conn.settimeout(60)
    start_reading = threading.Event()
    sent = {"bytes": 0, "done": False, "error": None}
    received = {"bytes": 0, "error": None}
    sent_hash, received_hash = hashlib.sha256(), hashlib.sha256()

    def sender():
        try:
            client.settimeout(60)
            for i in range(total // chunk_size):
                chunk = i.to_bytes(8, "big") + block[8:]
                view = memoryview(chunk)
                while view:
                    n = client.send(view)
                    view = view[n:]
                    sent["bytes"] += n
                sent_hash.update(chunk)
            client.shutdown(socket.SHUT_WR)
            sent["done"] = True
        except BaseException as e:  # reported by the test
            sent["error"] = e

    def receiver():
        start_reading.wait(60)
        try:
            while True:
                data = conn.recv(MiB)
                if not data:
                    break
                received["bytes"] += len(data)
                received_hash.update(data)
            conn.close()
        except BaseException as e:
            received["error"] = e

    threads = [threading.Thread(target=sender, daemon=True),
               threading.Thread(target=receiver, daemon=True)]
    try:
        time.sleep(0.3)
        rss_before = server.rss_kib()
        for t in threads:
            t.start()
        # Wait until the sender stalls (no progress for 2 s), at most 10 s.
        deadline = time.monotonic() + 10
        last, last_change = -1, time.monotonic()
        while time.monotonic() < deadline and not sent["done"] and sent["error"] is None:
            time.sleep(0.25)
            if sent["bytes"] != last:
                last, last_change = sent["bytes"], time.monotonic()
            elif time.monotonic() - last_change > 2:
                break
        rss_after = server.rss_kib()
        stalled_at = sent["bytes"]
        assert sent["error"] is None, sent["error"]
        assert not sent["done"] and stalled_at < total, \
            f"the sender pushed all {total} bytes into a sink that never reads"
        growth_mib = (rss_after - rss_before) / 1024
        assert growth_mib < 64, (f"twistd RSS grew by {growth_mib:.1f} MiB while the "
                                 f"sink did not read ({stalled_at / MiB:.1f} MiB sent)")

        # Now the sink reads: everything arrives, nothing is lost.
        start_reading.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "transfer did not finish in 60 s"
        assert sent["error"] is None, sent["error"]
        assert received["error"] is None, received["error"]
        assert sent["done"]
        assert received["bytes"] == total
        assert received_hash.hexdigest() == sent_hash.hexdigest()
        # The sink closed: EOF comes back to the client and the session ends.
        client.settimeout(10)
        assert recv_until_eof(client) == b""
    finally:
        start_reading.set()
        client.close()
        conn.close()
        sink.close()
    line = server.wait_for_log(rf"up={total} down=0 .* ok.*").group(0)
    assert line.endswith("[splice]") == (path == "splice"), line


# Timeouts and limits.

def test_idle_timeout(socks_server, echo_server):
    server = socks_server("[server]\nidle_timeout = 1.0\n")
    with socks5_connect(server.address, "127.0.0.1", echo_server) as sock:
        sock.sendall(b"ping")
        assert recv_exact(sock, 4) == b"ping"
        elapsed = wait_closed(sock, 6)
    assert 0.8 <= elapsed <= 5, elapsed
    server.wait_for_log(rf"connect 127\.0\.0\.1:{echo_server} up=4 down=4 .*idle timeout")


def test_idle_timeout_reset_by_traffic(socks_server, echo_server):
    server = socks_server("[server]\nidle_timeout = 1.0\n")
    with socks5_connect(server.address, "127.0.0.1", echo_server) as sock:
        for _ in range(6):  # 3 s of traffic, every 0.5 s: never idle for 1 s
            sock.sendall(b"x")
            assert recv_exact(sock, 1) == b"x"
            time.sleep(0.5)
        wait_closed(sock, 6)
    server.wait_for_log(r"up=6 down=6 .*idle timeout")


def test_handshake_timeout(socks_server):
    server = socks_server("[server]\nhandshake_timeout = 1.0\n")
    with socket.create_connection(server.address, timeout=5) as sock:
        elapsed = wait_closed(sock, 6)
    assert 0.8 <= elapsed <= 5, elapsed
    server.wait_for_log(r"handshake timeout")


def test_max_sessions_per_client(socks_server, echo_server):
    server = socks_server("[server]\nmax_sessions_per_client = 2\n")
    first = socks5_connect(server.address, "127.0.0.1", echo_server)
    second = socks5_connect(server.address, "127.0.0.1", echo_server)
    try:
        with socket.create_connection(server.address, timeout=5) as third:
            assert wait_closed(third, 5) < 2
        server.wait_for_log(r"max_sessions_per_client \(2\) reached")
        for sock in (first, second):  # the first two are untouched
            sock.sendall(b"still here")
            assert recv_exact(sock, 10) == b"still here"
    finally:
        first.close()
    # One session ended: a new one is allowed again.
    server.wait_for_log(r"up=10 down=10 .* ok")
    try:
        with socks5_connect(server.address, "127.0.0.1", echo_server) as again:
            again.sendall(b"ok")
            assert recv_exact(again, 2) == b"ok"
    finally:
        second.close()


# Configuration errors.

BAD_CONFIGS = {
    "unknown-key": ('[server]\nlisten = ["tcp:1080:interface=127.0.0.1"]\ncolour = "blue"\n',
                    r"{path}:3: server\.colour: unknown key"),
    "wrong-type": ('[server]\nmethods = ["none"]\nidle_timeout = "soon"\n',
                   r"{path}:3: server\.idle_timeout: must be a number"),
    "wrong-type-list": ('[server]\nlisten = "tcp:1080"\n',
                        r"{path}:2: server\.listen: must be a list of strings"),
    "bad-network": ('[[rules]]\naction = "allow"\n\n[[rules]]\naction = "allow"\n'
                    'from = ["10.0.0.0/33"]\n',
                    r"{path}:6: rules\[2\]\.from: .*10\.0\.0\.0/33"),
    "bad-port": ('[[rules]]\naction = "deny"\nports = ["80-70000"]\n',
                 r"{path}:3: rules\[1\]\.ports: .*80-70000"),
    "unknown-table": ('[server]\nmethods = ["none"]\n\n[sever]\nlisten = []\n',
                      r"{path}(:4)?: sever: unknown table"),
    "invalid-toml": ('[server\nlisten = []\n', r"{path}:1: not valid TOML"),
    "unknown-method": ('[server]\nmethods = ["none", "magic"]\n',
                       r"{path}:2: server\.methods: .*magic"),
    "listen-port-range": ('[server]\nlisten = ["tcp:99999:interface=127.0.0.1"]\n',
                          r"{path}:2: server\.listen: .*port '99999' is not 0-65535"),
    "missing-password-file": ('[server]\nmethods = ["userpass"]\n'
                              'checkers = ["file:/nonexistent/users"]\n',
                              r"{path}:3: server\.checkers: file:/nonexistent/users: "
                              r"cannot read /nonexistent/users"),
}


def _run_twistd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_socks(*args, cwd=cwd, timeout=30)


def _assert_config_error(out: subprocess.CompletedProcess, pattern: str) -> None:
    output = out.stdout + out.stderr
    assert out.returncode != 0, output
    assert "Traceback" not in output, output
    assert re.search(pattern, output), f"{pattern!r} not in:\n{output}"


@pytest.mark.parametrize("check", [True, False], ids=["check", "start"])
@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config(tmp_path, case, check):
    text, pattern = BAD_CONFIGS[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    args = ["--config", str(path)] + (["--check"] if check else
                                      ["--listen", "tcp:0:interface=127.0.0.1"])
    _assert_config_error(_run_twistd(*args, cwd=tmp_path),
                         pattern.format(path=re.escape(str(path))))


@pytest.mark.parametrize("check", [True, False], ids=["check", "start"])
def test_missing_config_file(tmp_path, check):
    path = tmp_path / "nowhere.toml"
    args = ["--config", str(path)] + (["--check"] if check else
                                      ["--listen", "tcp:0:interface=127.0.0.1"])
    _assert_config_error(_run_twistd(*args, cwd=tmp_path),
                         rf"{re.escape(str(path))}: .*(No such file|not found|cannot read)")


def test_unknown_checker_in_config(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nmethods = ["userpass"]\ncheckers = ["nosuchchecker:x"]\n')
    _assert_config_error(_run_twistd("--config", str(path), "--check", cwd=tmp_path),
                         rf"{re.escape(str(path))}(:\d+)?: server\.checkers.*nosuchchecker")


@pytest.mark.parametrize("check", [True, False], ids=["check", "start"])
@pytest.mark.parametrize("kind", ["file", "htpasswd"])
def test_a_user_listed_twice_is_refused_naming_both_lines(tmp_path, kind, check):
    """``passwd alice >> users`` to change her password added a line the
    checker would never read: the old password would keep working."""
    from socksd.auth.passwd import hash_password

    def entry(password: bytes) -> bytes:
        return b"alice:" + (password if kind == "file" else hash_password(password)) + b"\n"

    users = tmp_path / "users"
    users.write_bytes(b"# users\n" + entry(b"old") + b"bob:" + entry(b"x")[6:]
                      + entry(b"new"))
    path = tmp_path / "socksd.toml"
    path.write_text(f'[server]\nmethods = ["userpass"]\ncheckers = ["{kind}:users"]\n')
    args = ["--config", str(path)] + (["--check"] if check else
                                      ["--listen", "tcp:0:interface=127.0.0.1"])
    _assert_config_error(_run_twistd(*args, cwd=tmp_path),
                         rf"{re.escape(str(path))}:3: server\.checkers.*{kind}:"
                         rf"{re.escape(str(users))}'?: {re.escape(str(users))}:4: user 'alice' "
                         r"again, first on line 2: only that first entry would count; keep one")
    # The same file given with --auth.
    args = ["--auth", f"{kind}:users"] + (["--check"] if check else
                                          ["--listen", "tcp:0:interface=127.0.0.1"])
    _assert_config_error(_run_twistd(*args, cwd=tmp_path),
                         rf"--auth\W+{kind}:users\W.*users:4: user 'alice' again, "
                         r"first on line 2")


def test_example_config_checks(tmp_path):
    out = _run_twistd("--config", str(EXAMPLE), "--check", cwd=tmp_path)
    output = out.stdout + out.stderr
    assert out.returncode == 0, output
    assert "Traceback" not in output
    assert re.search(r"OK: listen tcp:1080:interface=127\.0\.0\.1; methods userpass; "
                     r"1 checker\(s\); 4 rule\(s\), 1 upstream\(s\)", output), output


# ---- listeners: TLS, and bad --listen strings ---------------------------------------

def test_socks5_over_tls_listener(socks_server, echo_server):
    """``ssl:`` listen endpoints (README): SOCKS5 inside TLS, the relay on the
    TLS transport (not the splice path, which needs bare sockets)."""
    import ssl

    import twisted.test

    pem = Path(twisted.test.__file__).parent / "server.pem"   # Twisted's test key + cert
    server = socks_server(None, "--listen",
                          f"ssl:0:interface=127.0.0.1:privateKey={pem}:certKey={pem}")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    payload = os.urandom(256 * 1024)
    with socket.create_connection(server.address, timeout=10) as raw, \
            context.wrap_socket(raw) as tls:
        tls.sendall(b"\x05\x01\x00")
        assert recv_exact(tls, 2) == b"\x05\x00"
        tls.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + echo_server.to_bytes(2, "big"))
        reply = recv_exact(tls, 10)
        assert reply[:4] == b"\x05\x00\x00\x01", reply
        # One thread: an ssl socket must not be read and written from two.
        for start in range(0, len(payload), 16384):
            chunk = payload[start:start + 16384]
            tls.sendall(chunk)
            assert recv_exact(tls, len(chunk)) == chunk
    line = server.wait_for_log(rf"connect 127\.0\.0\.1:{echo_server} up=\d+ down=\d+ .*")
    assert "[splice]" not in line.group(0)


@pytest.mark.parametrize("check", [True, False], ids=["check", "start"])
@pytest.mark.parametrize("listen, pattern", [
    ("nonsense:1080", r"--listen: 'nonsense:1080': not a valid Twisted endpoint"),
    ("tcp:notaport", r"--listen: 'tcp:notaport': not a valid Twisted endpoint"),
    # Twisted accepts these strings; bind() or the key file would fail at start.
    ("tcp:99999", r"--listen: 'tcp:99999': port '99999' is not 0-65535"),
    ("tcp:1080:interface=999.1.1.1",
     r"--listen: 'tcp:1080:interface=999\.1\.1\.1': interface '999\.1\.1\.1' is not an IP "
     r"address"),
    ("ssl:0:privateKey=/nonexistent/key.pem",
     r"--listen: 'ssl:0:privateKey=/nonexistent/key.pem': cannot read /nonexistent/key.pem"),
])
def test_bad_listen_option(tmp_path, check, listen, pattern):
    """--listen is checked like server.listen: one line, no traceback."""
    args = ["--listen", listen] + (["--check"] if check else [])
    _assert_config_error(_run_twistd(*args, cwd=tmp_path), pattern)


@pytest.mark.parametrize("listen", ["tcp: 1080:interface=127.0.0.1",   # int() takes it
                                    "tcp:port=1_080:interface=127.0.0.1",
                                    "systemd:domain=INET:index=0"])        # only under systemd
def test_listen_strings_twisted_takes_pass_the_check(tmp_path, listen):
    out = _run_twistd("--listen", listen, "--check", cwd=tmp_path)
    assert out.returncode == 0 and "OK: listen" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("check", [True, False], ids=["check", "start"])
@pytest.mark.parametrize("auth, pattern", [
    ("memory:alice", r"^socksd: --auth 'memory:alice': .*format"),
    ("nosuchtype:x", r"^socksd: --auth 'nosuchtype:\*\*\*': .*nosuchtype"),
    # A mistyped type, a password after it: the password is not repeated.
    ("memroy:alice:s3cret", r"^socksd: --auth 'memroy:\*\*\*': .*memroy"),
    ("file:/nonexistent/users", r"^socksd: --auth: file:/nonexistent/users: "
                                r"cannot read /nonexistent/users$"),
])
def test_bad_auth_option(tmp_path, check, auth, pattern):
    """A bad --auth is one line (no usage text, no traceback), non-zero exit."""
    args = ["--auth", auth] + (["--check"] if check else
                               ["--listen", "tcp:0:interface=127.0.0.1"])
    out = _run_twistd(*args, cwd=tmp_path)
    _assert_config_error(out, pattern.replace("^", "(?m)^", 1))
    assert "Usage:" not in out.stdout + out.stderr


def _connect_and_fill(server, dest):
    """A CONNECT whose destination then sends until every buffer on the way
    to the client is full; returns (client, the destination's socket)."""
    port = dest.getsockname()[1]
    client = socket.create_connection(server.address, timeout=10)
    client.sendall(b"\x05\x01\x00")
    assert recv_exact(client, 2) == b"\x05\x00"
    client.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big"))
    assert recv_exact(client, 10)[:2] == b"\x05\x00"
    inbound, _ = dest.accept()
    inbound.setblocking(False)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            inbound.send(b"y" * 65536)
        except BlockingIOError:
            time.sleep(0.2)        # let socksd fill its side too, then try again
            try:
                inbound.send(b"y" * 65536)
            except BlockingIOError:
                break
    return client, inbound


def test_client_reset_in_a_spliced_session_is_logged_not_a_traceback(socks_server):
    """The destination fills every buffer (so the kernel splice path runs and
    holds data for the client), then the client resets: one epoll event says
    both readable and writable. One line per session, 'connection lost'."""
    server = socks_server()
    with socket.create_server(("127.0.0.1", 0)) as dest:
        port = dest.getsockname()[1]
        for _ in range(10):
            client, inbound = _connect_and_fill(server, dest)
            time.sleep(0.1)
            client.close()        # unread data: the kernel sends RST
            time.sleep(0.1)
            inbound.close()
    wait_until(lambda: len(re.findall(rf"connect 127\.0\.0\.1:{port} ", server.log())) >= 10,
               10, server.log)
    log = server.log()
    assert "Unhandled Error" not in log and "Traceback" not in log, log
    lines = re.findall(rf"connect 127\.0\.0\.1:{port} .*", log)
    assert all(" connection lost: " in line for line in lines), lines
    assert any("[splice]" in line for line in lines), lines


@pytest.mark.parametrize("max_sessions, hard, warned", [
    (1000, 8192, False),   # soft raised to the hard limit: enough for 1000 sessions
    (1000, 512, True),     # raised, and still short: said at start
])
def test_descriptor_limit_is_raised_for_max_sessions(tmp_path, max_sessions, hard, warned):
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    config = tmp_path / "limits.toml"
    config.write_text(f"[server]\nmax_sessions = {max_sessions}\n")
    log_path = tmp_path / "twistd.log"
    with open(log_path, "wb") as out:
        process = subprocess.Popen([TWISTD, "-n", "--pidfile=", "socks", "--config", str(config),
                                    "--listen", "tcp:0:interface=127.0.0.1"], stdout=out,
                                   stderr=subprocess.STDOUT, cwd=tmp_path, preexec_fn=limit)
    try:
        def listening() -> bool:
            log = log_path.read_text()
            assert "starting on" in log or process.poll() is None, log
            return "starting on" in log

        wait_until(listening, 30, log_path.read_text)
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        assert re.search(rf"Max open files\s+{hard}\s+{hard}\s", limits), limits
        warning = (f"max_sessions = {max_sessions} can need {max_sessions * 4 + 64} file "
                   f"descriptors; the limit is {hard}")
        assert (warning in log_path.read_text()) == warned, log_path.read_text()
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize("splice", ["true", "false"])
def test_a_client_that_never_reads_ends_at_stall_timeout(socks_server, splice):
    """Every wait has a timeout, even with idle_timeout = 0 (the default)."""
    server = socks_server(f"[server]\nstall_timeout = 1.0\nsplice = {splice}\n")
    with socket.create_server(("127.0.0.1", 0)) as dest:
        client, inbound = _connect_and_fill(server, dest)
        with client, inbound:
            line = server.wait_for_log(r"connect 127\.0\.0\.1:\d+ .* stalled: a receiver "
                                       r"took nothing for 1 s.*", timeout=10).group(0)
    assert ("[splice]" in line) == (splice == "true"), line


def test_a_slow_reader_is_not_a_stall(socks_server):
    server = socks_server("[server]\nstall_timeout = 1.0\n")
    with socket.create_server(("127.0.0.1", 0)) as dest:
        client, inbound = _connect_and_fill(server, dest)
        with client, inbound:
            def keep_sending():       # the destination never stops: socksd stays blocked
                inbound.setblocking(True)
                try:
                    while True:
                        inbound.sendall(b"y" * 65536)
                except OSError:
                    pass

            threading.Thread(target=keep_sending, daemon=True).start()
            # Reads in bursts with pauses: each second something is taken
            # (kernel buffers are megabytes, so a trickle would not show).
            client.settimeout(0.05)
            end = time.monotonic() + 4
            while time.monotonic() < end:
                burst = time.monotonic() + 0.3
                while time.monotonic() < burst:
                    try:
                        assert client.recv(1 << 20), "socksd closed the session"
                    except TimeoutError:
                        pass
                time.sleep(0.4)
            assert "stalled" not in server.log(), server.log()
