"""SOCKS4/4a end to end: real `twistd -n socks`, real Debian clients (curl,
OpenBSD nc, ncat), and USERID verification against a real identd (oidentd)
answering for connections made by a throwaway system user.

The ident tests need root (to create the user and run clients as it); they
fail, never skip, when it or a tool is missing.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import PAGE, require, run_socks
from helpers import SBIN_PATH, system_user, wait_until

pytestmark = pytest.mark.integration

IDENT_USER = "socksd-ident-test"


def require_sbin(program: str) -> str:
    path = shutil.which(program, path=SBIN_PATH)
    assert path, f"{program} is not installed: `make test` installs it (Debian package)"
    return path


def free_port() -> int:
    """A loopback port with nothing listening on it (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def curl(*args: str, user: str | None = None, home: Path | None = None,
         timeout: float = 20) -> subprocess.CompletedProcess:
    """curl without any curlrc (-q), optionally run as another user."""
    command = [require("curl"), "-q", "-sS", "--max-time", "15", *args]
    kwargs = {}
    if user is not None:
        entry = pwd.getpwnam(user)
        kwargs = dict(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[], cwd="/",
                      env={"PATH": "/usr/bin:/bin", "HOME": str(home or "/")})
    return subprocess.run(command, capture_output=True, timeout=timeout, **kwargs)


def session_line(server, pattern: str) -> str:
    return server.wait_for_log(pattern).group(0)


# Real SOCKS4 clients with the default policy (trust).


def test_curl_socks4(socks_server, http_server):
    server = socks_server()
    out = curl("--socks4", f"127.0.0.1:{server.port}", f"http://127.0.0.1:{http_server}/")
    assert out.returncode == 0, out.stderr
    assert out.stdout == PAGE
    session_line(server, rf"socks4 user=- method=trust connect 127\.0\.0\.1:{http_server} "
                         r"up=\d+ down=\d+ .* ok")


def test_curl_socks4a(socks_server, http_server):
    server = socks_server()
    out = curl("--socks4a", f"127.0.0.1:{server.port}", f"http://localhost:{http_server}/")
    assert out.returncode == 0, out.stderr
    assert out.stdout == PAGE
    session_line(server, rf"socks4a user=- method=trust connect localhost:{http_server} .* ok")


def test_curl_socks4a_url_with_userid(socks_server, http_server):
    server = socks_server()
    out = curl("-x", f"socks4a://alice@127.0.0.1:{server.port}",
               f"http://localhost:{http_server}/")
    assert out.returncode == 0, out.stderr
    assert out.stdout == PAGE
    session_line(server, rf"socks4a user=alice method=trust connect localhost:{http_server} "
                         r".* ok")


def test_curl_socks4_whitelist(socks_server, http_server):
    server = socks_server('[socks4]\nuserid = "whitelist"\nwhitelist = ["alice"]\n'
                          "allow_empty_userid = false\n")
    url = f"http://127.0.0.1:{http_server}/"
    out = curl("-x", f"socks4://alice@127.0.0.1:{server.port}", url)
    assert out.returncode == 0, out.stderr
    assert out.stdout == PAGE
    for proxy in (f"socks4://mallory@127.0.0.1:{server.port}",
                  f"socks4://127.0.0.1:{server.port}"):
        out = curl("-x", proxy, url)
        assert out.returncode != 0 and b"(91)" in out.stderr, out.stderr
    session_line(server, r"socks4 user=mallory method=whitelist .*auth failed")


def test_curl_socks4_denied_by_version_rule(socks_server, http_server):
    server = socks_server('[[rules]]\naction = "allow"\nfrom = ["127.0.0.0/8"]\n'
                          "versions = [5]\n")
    out = curl("--socks4", f"127.0.0.1:{server.port}", f"http://127.0.0.1:{http_server}/")
    assert out.returncode != 0
    assert b"(91)" in out.stderr, out.stderr
    session_line(server, r"socks4 user=- .* denied")
    # SOCKS5 on the same listener is still allowed.
    out = curl("--socks5", f"127.0.0.1:{server.port}", f"http://127.0.0.1:{http_server}/")
    assert out.returncode == 0, out.stderr
    assert out.stdout == PAGE


def test_openbsd_nc_socks4_echo(socks_server, echo_server):
    server = socks_server()
    nc = require("nc")
    data = b"".join(b"line %d through nc -X 4\n" % i for i in range(500))
    out = subprocess.run([nc, "-N", "-w", "10", "-X", "4", "-x", f"127.0.0.1:{server.port}",
                          "127.0.0.1", str(echo_server)], input=data, capture_output=True,
                         timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout == data
    session_line(server, rf"socks4 user=- method=trust connect 127\.0\.0\.1:{echo_server} "
                         rf"up={len(data)} down={len(data)} .* ok")


def test_ncat_socks4_echo(socks_server, echo_server):
    server = socks_server()
    ncat = require("ncat")
    data = b"ncat says hello\n" * 100
    out = subprocess.run([ncat, "--proxy-type", "socks4", "--proxy",
                          f"127.0.0.1:{server.port}", "--proxy-auth", "bob", "127.0.0.1",
                          str(echo_server)], input=data, capture_output=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout == data
    session_line(server, rf"socks4 user=bob method=trust connect 127\.0\.0\.1:{echo_server} "
                         r".* ok")


def test_unterminated_userid_gets_91_and_close(socks_server):
    server = socks_server()
    with socket.create_connection(server.address, timeout=5) as s:
        s.sendall(b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 300)
        reply = b""
        while True:
            chunk = s.recv(100)
            if not chunk:
                break
            reply += chunk
    assert reply == b"\x00\x5b" + bytes(6)
    session_line(server, r"socks4 .*bad request")


# Ident: a real oidentd and a throwaway user.


@pytest.fixture(scope="module")
def ident_user() -> str:
    """The throwaway system user whose connections oidentd will name."""
    return system_user(IDENT_USER).pw_name


class Oidentd:
    def __init__(self, tmp_path: Path, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port()
        self.config = tmp_path / "oidentd.conf"
        # Our own configuration, so the answer does not depend on /etc/oidentd.conf:
        # no user may hide, spoof or randomise the reply.
        self.config.write_text(
            "default {\n\tdefault {\n"
            + "".join(f"\t\tdeny {c}\n" for c in ("spoof", "spoof_all", "spoof_privport",
                                                     "random", "random_numeric", "numeric",
                                                     "hide", "forward"))
            + "\t}\n}\n")
        self.log_path = tmp_path / "oidentd.log"
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [require_sbin("oidentd"), "-i", "-S", "-d", "-C", str(self.config),
             "-a", host, "-p", str(self.port)],
            stdout=self.log_file, stderr=subprocess.STDOUT)
        self._wait_until_listening()

    def _wait_until_listening(self, timeout: float = 10) -> None:
        def listening() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"oidentd exited with {self.process.returncode}:\n"
                                     f"{self.log()}")
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(listening, timeout, lambda: f"oidentd on {self.port}:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()


@pytest.fixture
def oidentd(tmp_path):
    daemon = Oidentd(tmp_path)
    yield daemon
    daemon.stop()


def ident_config(ident_port: int, timeout: float = 3) -> str:
    # SOCKS4 is only for ident-verified users: a grant proves verification.
    return (f'[socks4]\nuserid = "ident"\nident_port = {ident_port}\n'
            f"ident_timeout = {timeout}\n\n"
            '[[rules]]\naction = "allow"\nfrom = ["127.0.0.0/8"]\nversions = [4]\n'
            "verified = true\n")


def test_oidentd_verified_user_is_granted(socks_server, http_server, ident_user, oidentd,
                                          tmp_path):
    server = socks_server(ident_config(oidentd.port))
    out = curl("-x", f"socks4://{ident_user}@127.0.0.1:{server.port}",
               f"http://127.0.0.1:{http_server}/", user=ident_user, home=tmp_path)
    assert out.returncode == 0, f"{out.stderr!r}\nsocksd:\n{server.log()}\n" \
                                f"oidentd:\n{oidentd.log()}"
    assert out.stdout == PAGE
    session_line(server, rf"socks4 user={ident_user} method=ident "
                         rf"connect 127\.0\.0\.1:{http_server} up=\d+ down=\d+ .* ok")
    assert ident_user in oidentd.log()


def test_oidentd_other_userid_is_93(socks_server, http_server, ident_user, oidentd, tmp_path):
    server = socks_server(ident_config(oidentd.port))
    out = curl("-x", f"socks4://someoneelse@127.0.0.1:{server.port}",
               f"http://127.0.0.1:{http_server}/", user=ident_user, home=tmp_path)
    assert out.returncode != 0
    assert b"(93)" in out.stderr, f"{out.stderr!r}\noidentd:\n{oidentd.log()}"
    session_line(server, rf"socks4 user=someoneelse method=ident .*auth failed.*{ident_user}")


def test_oidentd_stopped_is_92(socks_server, http_server, ident_user, oidentd, tmp_path):
    server = socks_server(ident_config(oidentd.port))
    url = f"http://127.0.0.1:{http_server}/"
    proxy = f"socks4://{ident_user}@127.0.0.1:{server.port}"
    out = curl("-x", proxy, url, user=ident_user, home=tmp_path)
    assert out.returncode == 0 and out.stdout == PAGE, out.stderr
    oidentd.stop()
    started = time.monotonic()
    out = curl("-x", proxy, url, user=ident_user, home=tmp_path)
    assert out.returncode != 0
    assert b"(92)" in out.stderr, out.stderr
    assert time.monotonic() - started < 2.5, "a refused identd must not wait for the timeout"
    session_line(server, rf"socks4 user={ident_user} method=ident .*auth failed.*identd")


def test_ident_port_closed_is_92(socks_server, http_server):
    server = socks_server(ident_config(free_port()))
    out = curl("-x", f"socks4://nobody@127.0.0.1:{server.port}",
               f"http://127.0.0.1:{http_server}/")
    assert out.returncode != 0
    assert b"(92)" in out.stderr, out.stderr


def _socks4_exchange(address, request: bytes, timeout: float = 15,
                     source: str | None = None) -> bytes:
    """Send a request, return everything the server sent before closing (or
    the first 8 bytes when it grants and keeps the connection open)."""
    with socket.create_connection(address, timeout=timeout,
                                  source_address=(source, 0) if source else None) as s:
        s.sendall(request)
        reply = b""
        while len(reply) < 8:
            chunk = s.recv(8 - len(reply))
            if not chunk:
                break
            reply += chunk
        return reply


def test_oidentd_exact_reply_bytes(socks_server, http_server, oidentd):
    """This process's own user, as oidentd reports it: 90 with the real bound
    address; any other USERID: exactly 93."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    server = socks_server(ident_config(oidentd.port))
    head = b"\x04\x01" + http_server.to_bytes(2, "big") + socket.inet_aton("127.0.0.1")
    reply = _socks4_exchange(server.address, head + me.encode() + b"\x00")
    assert reply[:2] == b"\x00\x5a", (reply, oidentd.log())
    assert reply[4:] == socket.inet_aton("127.0.0.1")
    assert int.from_bytes(reply[2:4], "big") not in (0, http_server)
    reply = _socks4_exchange(server.address, head + b"not-" + me.encode() + b"\x00")
    assert reply == b"\x00\x5d" + bytes(6)


def test_oidentd_is_asked_from_the_address_the_client_reached(socks_server, http_server,
                                                              tmp_path):
    """The identd finds a connection by both its ends: socksd on 127.0.0.3
    used to ask the client 127.0.0.5's oidentd from 127.0.0.1 (the loopback
    route's source, as a host with several addresses may), and oidentd,
    having no connection between those, answered NO-USER (92)."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    daemon = Oidentd(tmp_path, host="127.0.0.5")
    try:
        server = socks_server(ident_config(daemon.port), "--listen", "tcp:0:interface=127.0.0.3")
        server.host = "127.0.0.3"
        head = b"\x04\x01" + http_server.to_bytes(2, "big") + socket.inet_aton("127.0.0.1")
        reply = _socks4_exchange(server.address, head + me.encode() + b"\x00",
                                 source="127.0.0.5")
        assert reply[:2] == b"\x00\x5a", (reply, daemon.log(), server.log())
        assert re.search(rf"\[127\.0\.0\.3\] Successful lookup: \d+ , {server.port} : {me} ",
                         daemon.log()), daemon.log()
    finally:
        daemon.stop()


class FakeIdentd:
    """An identd on 127.0.0.1 that says what a test wants: ``answer`` for
    every query (a %-format taking the query's two port bytes), then closes;
    or, without an answer, accepts queries and never says anything."""

    def __init__(self, answer: bytes | None = None) -> None:
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.queries: list[bytes] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            if self.answer is None:
                self.accepted.append(connection)     # held open, never answered
                continue
            with connection:
                connection.settimeout(10)
                query = b""
                while b"\n" not in query:
                    chunk = connection.recv(100)
                    if not chunk:
                        break
                    query += chunk
                self.queries.append(query)
                ports = [p.strip() for p in query.strip().split(b",")]
                if len(ports) == 2:
                    connection.sendall(self.answer % tuple(ports))

    def close(self) -> None:
        self.listener.close()
        for connection in self.accepted:
            connection.close()


@pytest.fixture
def stalling_identd():
    identd = FakeIdentd()
    yield identd
    identd.close()


def test_stalling_identd_times_out_with_92(socks_server, http_server, stalling_identd):
    server = socks_server(ident_config(stalling_identd.port, timeout=3))
    started = time.monotonic()
    out = curl("-x", f"socks4://someone@127.0.0.1:{server.port}",
               f"http://127.0.0.1:{http_server}/")
    elapsed = time.monotonic() - started
    assert out.returncode != 0
    assert b"(92)" in out.stderr, out.stderr
    assert 2.8 <= elapsed < 6, f"92 after {elapsed:.2f} s; ident_timeout is 3 s"
    assert stalling_identd.accepted, "socksd never queried the identd"
    session_line(server, r"socks4 user=someone method=ident .*auth failed.*identd")


def test_stalling_identd_exact_reply_bytes(socks_server, stalling_identd):
    server = socks_server(ident_config(stalling_identd.port, timeout=1))
    started = time.monotonic()
    reply = _socks4_exchange(server.address,
                             b"\x04\x01\x00\x50\x7f\x00\x00\x01someone\x00")
    assert reply == b"\x00\x5c" + bytes(6)
    assert 0.9 <= time.monotonic() - started < 4


def test_identd_with_a_nul_in_its_charset_is_92_without_traceback(socks_server):
    """A NUL in the charset field made the ident client raise ValueError
    (from codecs.lookup): an "Unhandled Error" traceback in socksd's log
    before the 92. It is a malformed reply, logged on the session's line."""
    identd = FakeIdentd(b"%s, %s : USERID : UNIX,\x00 : eve\r\n")
    try:
        server = socks_server(ident_config(identd.port))
        reply = _socks4_exchange(server.address, b"\x04\x01\x00\x50\x7f\x00\x00\x01eve\x00")
        assert reply == b"\x00\x5c" + bytes(6)
        assert identd.queries, "socksd never queried the identd"
        session_line(server, r"socks4 user=eve method=ident .*auth failed.*malformed reply")
    finally:
        identd.close()
    log = server.log()
    assert "Unhandled Error" not in log and "Traceback" not in log, log


def test_identd_never_vouches_for_a_trusted_userid(socks_server):
    """With the identd in the same process, a SOCKS4 USERID taken on trust
    (not verified) is not what the identd answers for the outgoing
    connection: anyone could claim any name. A password user still is."""
    server = socks_server('[server]\nmethods = ["userpass", "none"]\n'
                          'checkers = ["memory:alice:secret"]\n\n'
                          '[identd]\nenabled = true\nlisten = ["tcp:0:interface=127.0.0.1"]\n')
    ident_port = int(server.wait_for_log(r"IdentFactory starting on (\d+)").group(1))
    with socket.create_server(("127.0.0.1", 0)) as target:
        tport = target.getsockname()[1]
        target.settimeout(10)

        def ident_for(client: socket.socket) -> bytes:
            inbound, (_host, source_port) = target.accept()
            with inbound:
                client.sendall(b"ping")           # the relay runs: the session is set up
                assert inbound.recv(4) == b"ping"
                with socket.create_connection(("127.0.0.1", ident_port), timeout=10) as q:
                    q.sendall(b"%d, %d\r\n" % (source_port, tport))
                    return q.recv(512).split(b" : ", 1)[1].strip()

        with socket.create_connection(server.address, timeout=10) as client:
            client.sendall(b"\x04\x01" + tport.to_bytes(2, "big")
                           + socket.inet_aton("127.0.0.1") + b"mallory\x00")
            assert client.recv(8)[:2] == b"\x00\x5a"
            assert ident_for(client) == b"ERROR : HIDDEN-USER"   # socksd's own (root)
        with socket.create_connection(server.address, timeout=10) as client:
            client.sendall(b"\x05\x01\x02")
            assert client.recv(2) == b"\x05\x02"
            client.sendall(b"\x01\x05alice\x06secret")
            assert client.recv(2) == b"\x01\x00"
            client.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                           + tport.to_bytes(2, "big"))
            assert client.recv(10)[:2] == b"\x05\x00"
            assert ident_for(client) == b"USERID : UNIX : alice"


# SOCKS4 next to SOCKS5 authentication (no way around the passwords).


@pytest.mark.parametrize("how", ["--auth", "methods", "checkers only"])
def test_socks4_is_off_when_socks5_requires_a_password(socks_server, http_server, how):
    """SOCKS4 has no authentication: a server that requires passwords must
    not serve `curl -x socks4a://alice@...` on trust."""
    if how == "--auth":
        server = socks_server(None, "--auth", "memory:alice:secret")
    elif how == "methods":
        server = socks_server('[server]\nmethods = ["userpass"]\n'
                              'checkers = ["memory:alice:secret"]\n')
    else:
        server = socks_server('[server]\ncheckers = ["memory:alice:secret"]\n')
    out = curl("-x", f"socks4a://alice@127.0.0.1:{server.port}",
               f"http://localhost:{http_server}/")
    assert out.returncode != 0 and out.stdout == b""
    session_line(server, r"socks4 user=- method=- - - .* bad request: SOCKS4 is disabled")
    # SOCKS5 with the password still works.
    out = curl("-x", f"socks5h://alice:secret@127.0.0.1:{server.port}",
               f"http://localhost:{http_server}/")
    assert out.returncode == 0 and out.stdout == PAGE, out.stderr
    assert " method=trust " not in server.log()


def test_socks4_next_to_passwords_only_when_the_file_says_so(socks_server, http_server):
    """[socks4] enabled = true turns it back on, and userid = "trust" next
    to required passwords is warned about at start; a rule naming alice does
    not match the USERID alice, which is a claim."""
    server = socks_server('[server]\nmethods = ["userpass"]\n'
                          'checkers = ["memory:alice:secret"]\n'
                          '[socks4]\nenabled = true\n'
                          '[[rules]]\naction = "allow"\nusers = ["alice"]\n')
    server.wait_for_log(r"\[socks4\] userid = \"trust\" while SOCKS5 requires authentication")
    out = curl("-x", f"socks4a://alice@127.0.0.1:{server.port}",
               f"http://localhost:{http_server}/")
    assert out.returncode != 0
    session_line(server, rf"socks4a user=alice method=trust connect localhost:{http_server} "
                         r".* denied: no rule matched")
    out = curl("-x", f"socks5h://alice:secret@127.0.0.1:{server.port}",
               f"http://localhost:{http_server}/")
    assert out.returncode == 0 and out.stdout == PAGE, out.stderr


@pytest.mark.parametrize("config,args,expected", [
    ("", (), "socks4 userid = trust: USERIDs taken on trust (unverified claims)"),
    ("", ("--auth", "memory:alice:secret"),
     "socks4 off (SOCKS5 requires authentication; [socks4] enabled = true serves it)"),
    ('[server]\ncheckers = ["memory:alice:secret"]\n', (),
     "methods userpass; 1 checker(s); no rules: loopback clients only; socks4 off (SOCKS5 "
     "requires"),
    ('[socks4]\nenabled = false\n', (), "socks4 off\n"),
    ('[socks4]\nuserid = "ident"\n', (), "socks4 userid = ident: USERIDs verified by"),
    ('[server]\nmethods = ["userpass"]\n[socks4]\nenabled = true\n',
     ("--auth", "memory:alice:secret"),
     'warning: [socks4] userid = "trust" while SOCKS5 requires authentication'),
])
def test_check_prints_the_socks4_policy(tmp_path, config, args, expected):
    path = tmp_path / "socksd.toml"
    path.write_text(config)
    out = run_socks("--config", str(path), *args, "--check", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert expected in out.stdout, out.stdout
