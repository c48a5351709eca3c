"""Shared fixtures: a real `twistd socks` subprocess, and small real servers.

Tests run against the installed socksd (``make test`` installs it normally,
not editable, into .venv), so the subprocess is the `twistd` next to the
interpreter running pytest.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from twisted.logger import globalLogPublisher

from balancer import Balanced
from helpers import stop_process, wait_until

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
PAGE = b"socksd test page\n" * 64


# The integration line (pyproject.toml's `integration` marker): a test that
# starts twistd, a KDC or an outside program carries the marker, so that
# ``pytest -m "not integration"`` is the quick unit run. Held by tool: an
# unmarked test that asks for one of these fixtures, or starts a program other
# than this interpreter, fails.

INTEGRATION_FIXTURES = frozenset({"socks_server", "balanced_socks", "kerberos"})
# Programs a unit test may start: our own code under this interpreter, and
# useradd for the throwaway user a fork-as-user test acts as.
UNIT_PROGRAMS = frozenset({sys.executable, "useradd"})

_unit_test: str | None = None    # the node id of the running unmarked test


def _starts(executable, args) -> str:
    if executable is not None:
        return os.fsdecode(executable)
    if isinstance(args, (str, bytes, os.PathLike)):
        return os.fsdecode(args).split()[0]
    return os.fsdecode(args[0])


def _guard_subprocesses(event: str, details: tuple) -> None:
    """An audit hook: an unmarked test may not start an outside program."""
    if event != "subprocess.Popen" or _unit_test is None:
        return
    program = _starts(details[0], details[1])
    if program in UNIT_PROGRAMS or os.path.basename(program) in UNIT_PROGRAMS:
        return
    raise AssertionError(f"{_unit_test} starts {program}: a test that runs twistd, a KDC or "
                         "an outside program carries @pytest.mark.integration")


sys.addaudithook(_guard_subprocesses)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    global _unit_test
    if item.get_closest_marker("integration") is not None:
        _unit_test = None
        return
    _unit_test = item.nodeid
    used = INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    if used:
        pytest.fail(f"uses {', '.join(sorted(used))} (twistd or a KDC) without "
                    "@pytest.mark.integration", pytrace=False)


def pytest_runtest_teardown(item: pytest.Item) -> None:
    global _unit_test
    _unit_test = None


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly n bytes from a blocking socket; EOF before is a failure."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {data!r}, wanted {n} bytes")
        data += chunk
    return data


def recv_until_eof(sock: socket.socket) -> bytes:
    """Everything until EOF; a reset (abortConnection) also counts as the end."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def run_socks(*args: str, cwd: Path, env: dict[str, str] | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess:
    """``twistd -n socks ARGS`` to its end (``--check``, a start-up error),
    output as text."""
    return subprocess.run([TWISTD, "-n", "--pidfile=", "socks", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


def require(program: str) -> str:
    """A real client the tests need; missing means FAIL (never skip)."""
    path = shutil.which(program)
    assert path, f"{program} is not installed: `make test` installs it (Debian package)"
    return path


class TwistdSocks:
    """A running `twistd -n socks` with its log captured in a file."""

    host = "127.0.0.1"    # where its listener is (it is told with --listen or the config)

    def __init__(self, tmp_path: Path, config: str | None, args: list[str],
                 env: dict[str, str] | None, add_listen: bool = True,
                 twistd_args: tuple[str, ...] = (), cwd: Path | None = None) -> None:
        self.tmp = tmp_path
        self.log_path = tmp_path / f"twistd-{id(self)}.log"
        command = [TWISTD, "-n", "--pidfile=", *twistd_args, "socks"]
        if config is not None:
            self.config_path = tmp_path / f"socksd-{id(self)}.toml"
            self.config_path.write_text(config)
            command += ["--config", str(self.config_path)]
        if add_listen and not any(a.startswith(("--listen", "-l")) for a in args):
            command += ["--listen", "tcp:0:interface=127.0.0.1"]
        command += args
        self.command = command
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT,
                                        env=full_env, cwd=cwd or tmp_path)
        try:
            self.port = self._wait_for_port()
        except BaseException:
            self.stop()   # the fixture never got this server: stop it here
            raise

    def _wait_for_port(self, timeout: float = 30.0) -> int:
        def listening():
            # The start-up line (socksd.tap.socks.started_line): its first listener.
            match = re.search(r"socksd \S+ listening on .*? \(port (\d+)[,)]", self.log())
            if not match and self.process.poll() is not None:
                raise AssertionError(f"twistd exited with {self.process.returncode}:\n{self.log()}")
            return match

        match = wait_until(listening, timeout,
                           lambda: f"twistd to start listening:\n{self.log()}")
        return int(match.group(1))

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        return wait_until(lambda: re.search(pattern, self.log()), timeout,
                          lambda: f"a log line matching {pattern!r}:\n{self.log()}")

    def rss_kib(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        stop_process(self.process, self.log_file)


@pytest.fixture
def log_events():
    """Every event logged while the test runs."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.fixture
def tcp_server_pair():
    """A real tcp.Server on one end of a socket pair (its reactor a memory
    one), the other end, and that reactor: Twisted's own write buffer and
    socket, without a running reactor."""
    from twisted.internet import tcp
    from twisted.internet.protocol import Protocol
    from twisted.internet.testing import MemoryReactorClock

    a, b = socket.socketpair()
    a.setblocking(False)
    b.settimeout(5)
    reactor = MemoryReactorClock()
    transport = tcp.Server(a, Protocol(), ("127.0.0.1", 40000), None, 1, reactor)
    yield transport, b, reactor
    a.close()
    b.close()


@pytest.fixture(params=["bytewise", "whole"])
def bytewise(request) -> bool:
    """Feed every exchange one byte at a time, then in one piece (tests/fakes.py)."""
    return request.param == "bytewise"


@pytest.fixture
def socks_server(tmp_path):
    """Start servers with ``socks_server(config_text=None, *args, env=None)``;
    a free loopback port is used unless args or ``add_listen=False`` say otherwise;
    ``twistd_args`` go before ``socks``; it runs in ``cwd``, by default the
    test's tmp_path (where the config file is written)."""
    started: list[TwistdSocks] = []

    def start(config: str | None = None, *args: str, env: dict[str, str] | None = None,
              add_listen: bool = True, twistd_args: tuple[str, ...] = (),
              cwd: Path | None = None):
        server = TwistdSocks(tmp_path, config, list(args), env, add_listen, twistd_args, cwd)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def balanced_socks(socks_server, tmp_path):
    """Start ``balanced_socks(config="", server="", *args)``: HAProxy on
    127.0.0.2 (tests/balancer.py: TCP mode, round robin, PROXY v2 with health
    checks) in front of two socksd instances on 127.0.0.3 and 127.0.0.4, each
    with a ``haproxy:`` listener and ``trusted_proxies`` = the balancer.
    ``server`` adds lines to their ``[server]`` table, ``config`` other tables;
    ``args`` go to ``twistd socks``. Clients connect to its ``address``."""
    started: list[Balanced] = []

    def start(config: str = "", server: str = "", *args: str) -> Balanced:
        balanced = Balanced(socks_server, tmp_path, config, server, args)
        started.append(balanced)
        return balanced

    yield start
    for balanced in started:
        balanced.stop()


class PageHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    """An HTTP server on 127.0.0.1 answering PAGE; yields its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), PageHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(65536)
            if not data:
                self.request.shutdown(socket.SHUT_WR)
                return
            self.request.sendall(data)


class _ThreadingTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def echo_server():
    """A TCP echo server on 127.0.0.1 that half-closes after the client does."""
    server = _ThreadingTCPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


class Kerberos:
    """A real MIT KDC (k5test) with socksd's service key in its own keytab.

    The service is ``rcmd/localhost``, the name clients ask for by
    ``rcmd@localhost``, plus ``rcmd/127.0.0.1`` for a client that names the
    proxy by its address (Dante's): see :class:`LocalhostRealm`.
    """

    def __init__(self, realm) -> None:
        self.realm = realm
        self.env = dict(realm.env)
        self.service_principal = f"rcmd/{realm.hostname}@{realm.realm}"
        self.keytab = os.path.join(realm.tmpdir, "socksd.keytab")
        for host in (realm.hostname, "127.0.0.1"):
            realm.addprinc(f"rcmd/{host}")
            realm.extract_keytab(f"rcmd/{host}", self.keytab)
        self.user = realm.user_princ          # has a ticket in the realm's ccache

    def config(self, levels=("integrity", "confidentiality"), extra: str = "",
               methods=('"gssapi"',)) -> str:
        level_list = ", ".join(f'"{level}"' for level in levels)
        return (f"[server]\nmethods = [{', '.join(methods)}]\n"
                f'[gssapi]\nkeytab = "{self.keytab}"\nlevels = [{level_list}]\n{extra}')


def localhost_realm_class():
    """k5test's MIT realm, named for ``localhost`` rather than the machine.

    k5test names the KDC's address and its host principals after
    ``socket.getfqdn()``, and MIT krb5 canonicalizes a host-based service
    name through the resolver (forward, then reverse). Both depend on the
    machine: its host name, and what /etc/hosts maps 127.0.0.1 and ::1 back
    to. Here every name is ``localhost``, taken literally.
    """
    from k5test.realm import MITRealm

    class LocalhostRealm(MITRealm):
        @property
        def hostname(self) -> str:
            return "localhost"

        def __init__(self, *args, **kwargs) -> None:
            try:
                super().__init__(*args, **kwargs)
            except BaseException:
                # k5test starts the KDC before its first kinit: a realm that
                # failed half-way must not leave a krb5kdc on the port, where
                # the next run's kinit would ask it and fail in turn.
                self.stop()
                raise

    return LocalhostRealm


def assert_port_free(port: int) -> None:
    """krb5kdc binds with SO_REUSEPORT, so a second KDC on the same port
    starts fine and then answers half the requests from another database:
    every kinit and ticket then fails at random. Say so plainly instead."""
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError as e:
                raise AssertionError(
                    f"port {port} is taken ({e}): another KDC (a stale krb5kdc of an earlier "
                    f"run?) or another test run; set SOCKSD_TEST_KDC_PORTBASE") from None


LITERAL_HOST_NAMES = {"libdefaults": {"dns_canonicalize_hostname": "false", "rdns": "false"}}


@pytest.fixture(scope="session")
def kerberos():
    """One KDC for the whole run (k5test listens on fixed ports from
    SOCKSD_TEST_KDC_PORTBASE, default 61000). A missing KDC fails."""
    for program in ("krb5kdc", "kdb5_util", "kadmin.local"):
        assert shutil.which(program) or os.path.exists(f"/usr/sbin/{program}"), \
            f"{program} is missing: `make test` installs krb5-kdc and krb5-admin-server"
    portbase = int(os.environ.get("SOCKSD_TEST_KDC_PORTBASE", "61000"))
    assert_port_free(portbase)
    realm = localhost_realm_class()(portbase=portbase, krb5_conf=LITERAL_HOST_NAMES)
    saved = {key: os.environ.get(key) for key in realm.env}
    os.environ.update(realm.env)   # for in-process python-gssapi clients
    try:
        yield Kerberos(realm)
    finally:
        realm.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
