"""Password checks under load, against a real `twistd -n socks` (issue 13):
a flood of logins from one address does not stop another client's login,
no check runs for a client that left before it started, and a failed login
delays the next one from that address."""

from __future__ import annotations

import re
import socket
import subprocess
import textwrap

import pytest

from conftest import recv_exact, require
from helpers import wait_until
from socksd.wire import rfc1929
from test_auth_integration import USERPASS_ONLY, assert_login_refused, assert_login_works

pytestmark = pytest.mark.integration

GREETING_USERPASS = b"\x05\x01\x02"
FLOOD_SOURCE = "127.0.0.2"     # loopback, but not the address the other clients use


def send_login(server, user: bytes, password: bytes = b"pw",
               source: str = "127.0.0.1") -> socket.socket:
    """A client that sends a greeting and an RFC 1929 login in one write."""
    sock = socket.socket()
    sock.settimeout(30)
    sock.bind((source, 0))
    sock.connect(server.address)
    sock.sendall(GREETING_USERPASS + rfc1929.encode_request(user, password))
    return sock


def test_a_flood_from_one_address_does_not_stop_another_login(socks_server, http_server,
                                                              tmp_path):
    """Each flooding client sends a login for an unknown user and leaves at
    once, 100 of them; bob (bcrypt cost 5) then logs in from another
    address. Beyond 2 checks in flight for the flooding address its logins
    are refused at once, so bob's is not queued behind them."""
    path = tmp_path / "users"
    htpasswd = require("htpasswd")
    for user, password, cost, create in (("alice", "secret", "12", ["-c"]),
                                         ("bob", "hunter2", "5", [])):
        subprocess.run([htpasswd, "-B", "-C", cost, "-b", *create, str(path), user, password],
                       check=True, capture_output=True, timeout=60)
    server = socks_server(USERPASS_ONLY, "--auth", f"htpasswd:{path}")
    for _ in range(100):
        send_login(server, b"mallory", b"guess", source=FLOOD_SOURCE).close()
    assert_login_works(server, "bob", "hunter2", http_server, tmp_path)
    server.wait_for_log(rf"{re.escape(FLOOD_SOURCE)}:\d+ socks5 user=mallory .*auth failed: "
                        r"busy: 2 password checks in flight for this client "
                        r"\(auth_in_flight_per_client\)")


GATED = textwrap.dedent('''
    """A checker that records each check it starts, then waits until the test
    creates DIR/go (test plugin). It runs on socksd's bounded pool, as any
    checker that hashes can: socksd sets hash_pool."""

    import os
    import time

    from zope.interface import implementer

    from twisted.cred.checkers import ICredentialsChecker
    from twisted.cred.credentials import IUsernamePassword
    from twisted.cred.strcred import ICheckerFactory
    from twisted.internet import threads
    from twisted.plugin import IPlugin


    @implementer(ICredentialsChecker)
    class GatedChecker:
        credentialInterfaces = (IUsernamePassword,)
        hash_pool = None

        def __init__(self, directory):
            self.directory = directory

        def _check(self, username):
            with open(os.path.join(self.directory, "started"), "ab") as f:
                f.write(username + b"\\n")
            deadline = time.monotonic() + 60
            while not os.path.exists(os.path.join(self.directory, "go")):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            return username

        def requestAvatarId(self, credentials):
            if self.hash_pool is None:
                return threads.deferToThread(self._check, credentials.username)
            return self.hash_pool.run(getattr(credentials, "client", None), self._check,
                                      credentials.username)


    @implementer(ICheckerFactory, IPlugin)
    class GatedCheckerFactory:
        authType = "gated"
        authHelp = "Records each check, then waits for DIR/go (test plugin)."
        argStringFormat = "A directory."
        credentialInterfaces = (IUsernamePassword,)

        def generateChecker(self, argstring=""):
            return GatedChecker(argstring)


    gated = GatedCheckerFactory()
''')


def test_no_check_runs_for_a_client_that_left(socks_server, tmp_path):
    """One thread, held by the first login; three more clients send a login
    and leave while theirs wait for it. Once the thread is free, a new
    login is checked next: the three never were."""
    plugins = tmp_path / "plugin-root" / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "gated.py").write_text(GATED)
    gate = tmp_path / "gate"
    gate.mkdir()
    started = gate / "started"
    config = (USERPASS_ONLY + f'checkers = ["gated:{gate}"]\n'
              "auth_threads = 1\nauth_in_flight_per_client = 8\n")
    server = socks_server(config, env={"PYTHONPATH": str(tmp_path / "plugin-root")})
    first = send_login(server, b"first")
    wait_until(lambda: started.exists() and started.read_bytes() == b"first\n", 20,
               "the first check to start")
    for n in range(3):
        with send_login(server, b"gone%d" % n) as gone:
            port = gone.getsockname()[1]
        server.wait_for_log(rf"127\.0\.0\.1:{port} socks5 user=- method=userpass .*"
                            r"client closed: during handshake")
    (gate / "go").touch()
    assert recv_exact(first, 4) == b"\x05\x02\x01\x00"
    first.close()
    with send_login(server, b"late") as late:
        assert recv_exact(late, 4) == b"\x05\x02\x01\x00"
    assert started.read_bytes() == b"first\nlate\n"


def test_a_failed_login_delays_the_next_from_that_address(socks_server, http_server,
                                                          tmp_path):
    server = socks_server(USERPASS_ONLY + 'checkers = ["memory:alice:secret"]\n')
    line = assert_login_refused(server, "alice", "wrong", http_server, tmp_path)
    assert line.endswith("auth failed: bad username or password (failure 1 in a row from "
                         "this address: backoff 1 s)"), line
    # The next login waits out the second, then is checked: no refusal.
    assert_login_works(server, "alice", "secret", http_server, tmp_path)
