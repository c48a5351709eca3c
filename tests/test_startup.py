"""What ``twistd socks`` and ``twistd identd`` say as they start: the start-up
line of each SOCKS listener, and the one line for a listener that cannot be
bound, with ``-n`` and as a daemon (twistd then forks, and reports through a
pipe what goes wrong after the fork)."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from twisted.internet.error import CannotListenError

import socksd
from conftest import TWISTD
from socksd.tap.listening import cannot_listen, why_not

MODES = {"-n": ("-n",), "daemon": ()}
WORKERS = "[server]\nworkers = 2\n"


# The words: the errno's, not Twisted's "Couldn't listen on ...: [Errno 98] ...".

@pytest.mark.parametrize("error, words", [
    (OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)), "address already in use"),
    (OSError(errno.EACCES, os.strerror(errno.EACCES)), "permission denied"),
    (OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL)),
     "cannot assign requested address"),
    (CannotListenError("127.0.0.1", 1080, OSError(errno.EADDRINUSE, "Address already in use")),
     "address already in use"),
    (CannotListenError(None, "/run/s.sock", "Cannot acquire lock"), "cannot acquire lock"),
])
def test_why_a_listener_could_not_be_bound(error, words):
    assert why_not(error) == words
    assert cannot_listen("tcp:1080", error) == f"cannot listen on tcp:1080: {words}"


# A port in use: one line, non-zero, in every mode.

@pytest.fixture
def busy():
    """A port another server listens on (127.0.0.1)."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        yield taken.getsockname()[1]


def _start(tmp_path: Path, mode: str, plugin: str, *args: str, config: str | None = None,
           command: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``twistd [-n] --pidfile P -l L PLUGIN ARGS`` to its end: a start that
    fails. A daemon that started after all is stopped (and the test fails)."""
    pidfile, logfile = tmp_path / "twistd.pid", tmp_path / "twistd.log"
    if config is not None:
        (tmp_path / "socksd.toml").write_text(config)
        args = ("--config", str(tmp_path / "socksd.toml"), *args)
    try:
        # The timeout: a daemon whose launching process waits for ever.
        return subprocess.run([*command, TWISTD, *MODES[mode], "--pidfile", str(pidfile), "-l",
                               str(logfile), plugin, *args], capture_output=True, text=True,
                              timeout=30, cwd=tmp_path)
    finally:
        if pidfile.exists():
            pid = pidfile.read_text().strip()
            if pid.isdigit():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _assert_one_line(out: subprocess.CompletedProcess, line: str, tmp_path: Path) -> None:
    output = out.stdout + out.stderr
    assert out.returncode != 0, output
    assert output == line + "\n", output
    # Found before twistd forked, started its log or wrote its pid file.
    assert not (tmp_path / "twistd.pid").exists()
    assert not (tmp_path / "twistd.log").exists()


@pytest.mark.integration
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("plugin, config", [("socks", None), ("socks", WORKERS),
                                            ("identd", None)],
                         ids=["socks", "socks-workers", "identd"])
def test_a_busy_port_is_one_line(tmp_path, busy, mode, plugin, config):
    """Was a 36-line traceback with -n, and as a daemon twistd's ``An error
    has occurred: b"twisted.internet.error.CannotListenError: Couldn't
    listen on 127.0.0.1:25080: [Errno 98] Address a"``. With workers the
    twistd process binds the workers' sockets (SO_REUSEPORT)."""
    listen = f"tcp:{busy}:interface=127.0.0.1"
    out = _start(tmp_path, mode, plugin, "--listen", listen, config=config)
    _assert_one_line(out, f"{'identd' if plugin == 'identd' else 'socksd'}: cannot listen on "
                          f"{listen}: address already in use", tmp_path)


@pytest.mark.integration
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("table", ["metrics", "identd"])
def test_the_metrics_and_identd_listeners_of_twistd_socks_too(tmp_path, busy, mode, table):
    listen = f"tcp:{busy}:interface=127.0.0.1"
    enabled = "enabled = true\n" if table == "identd" else ""
    out = _start(tmp_path, mode, "socks", "--listen", "tcp:0:interface=127.0.0.1",
                 config=f'[{table}]\n{enabled}listen = ["{listen}"]\n')
    _assert_one_line(out, f"socksd: cannot listen on {listen}: address already in use",
                     tmp_path)


@pytest.mark.integration
def test_two_listeners_on_one_port_are_one_line(tmp_path):
    """Each is bound as it will be at start, and held until the last is.
    (The workers' sockets may share a port: SO_REUSEPORT.)"""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    out = _start(tmp_path, "-n", "socks", "--listen", f"tcp:{port}:interface=127.0.0.1",
                 "--listen", f"tcp:{port}")
    _assert_one_line(out, f"socksd: cannot listen on tcp:{port}: address already in use",
                     tmp_path)


@pytest.mark.integration
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("plugin, args", [
    ("socks", ("--listen", "tcp:1:interface=127.0.0.1")),
    ("identd", ()),                                    # its default: tcp:113
])
def test_a_port_below_1024_without_root_is_permission_denied(tmp_path, mode, plugin, args):
    # As root, without the capability to bind such ports (what root has and
    # a user has not).
    command = ("setpriv", "--bounding-set", "-net_bind_service") if os.geteuid() == 0 else ()
    out = _start(tmp_path, mode, plugin, *args, command=command)
    listen = args[1] if args else "tcp:113"
    _assert_one_line(out, f"{'identd' if plugin == 'identd' else 'socksd'}: cannot listen on "
                          f"{listen}: permission denied", tmp_path)


@pytest.mark.integration
@pytest.mark.parametrize("config", [None, WORKERS], ids=["one", "workers"])
def test_an_interface_not_on_this_host_cannot_be_assigned(tmp_path, config):
    listen = "tcp:0:interface=192.0.2.1"        # TEST-NET-1: nobody's
    out = _start(tmp_path, "daemon", "socks", "--listen", listen, config=config)
    _assert_one_line(out, f"socksd: cannot listen on {listen}: cannot assign requested "
                          "address", tmp_path)


@pytest.mark.integration
def test_check_binds_nothing(tmp_path, busy):
    """--check may check a file anywhere: a port in use here is no error."""
    out = subprocess.run([TWISTD, "socks", "--listen", f"tcp:{busy}:interface=127.0.0.1",
                          "--check"], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"embedded default: OK: listen tcp:{busy}:interface=127.0.0.1;")


@pytest.mark.integration
@pytest.mark.parametrize("mode", MODES)
def test_a_listener_that_fails_as_twistd_binds_it_is_one_line_too(tmp_path, mode):
    """A unix: socket is bound only by twistd (its path depends on --rundir
    and --chroot): the failure comes after the log began, and as a daemon
    after the fork. One line in the log, no traceback, no pid file left; a
    daemon's launching process exits 1 (with twistd's own words) rather than
    waiting for ever."""
    taken = tmp_path / "taken.sock"
    taken.write_text("a file, not a socket\n")
    out = _start(tmp_path, mode, "socks", "--listen", f"unix:{taken}")
    line = f"socksd: cannot listen on unix:{taken}: address already in use"
    assert out.returncode != 0
    assert not (tmp_path / "twistd.pid").exists()
    log = (tmp_path / "twistd.log").read_text()
    assert "Traceback" not in log and re.search(rf"\] {re.escape(line)}\n", log), log
    if mode == "-n":
        assert out.stdout + out.stderr == ""
    else:
        # twistd's words, and as much of the line as its pipe carries.
        assert (out.stdout + out.stderr).startswith(
            "An error has occurred: b'socksd.tap.listening.CannotListen: socksd: cannot listen "
            "on unix:"), out.stdout + out.stderr


# The start-up line: what each SOCKS listener serves, once bound.

@pytest.mark.integration
def test_the_start_up_line_names_the_endpoint_methods_socks4_and_identd(socks_server, tmp_path):
    unix = tmp_path / "socks.sock"
    server = socks_server('[server]\ncheckers = ["memory:alice:secret"]\n'
                          '[identd]\nenabled = true\nlisten = ["tcp:0:interface=127.0.0.1"]\n',
                          "--listen", "tcp:0:interface=127.0.0.1", "--listen", f"unix:{unix}")
    serving = ("methods userpass; socks4 off (SOCKS5 requires authentication; [socks4] "
               "enabled = true serves it); identd on tcp:0:interface=127.0.0.1")
    version = re.escape(socksd.__version__)
    server.wait_for_log(rf"\] socksd {version} listening on tcp:0:interface=127\.0\.0\.1 "
                        rf"\(port {server.port}\): {re.escape(serving)}\n")
    server.wait_for_log(rf"\] socksd {version} listening on unix:{re.escape(str(unix))}: "
                        rf"{re.escape(serving)}\n")


@pytest.mark.integration
def test_the_start_up_line_with_workers(socks_server):
    server = socks_server(WORKERS)
    server.wait_for_log(rf"\] socksd {re.escape(socksd.__version__)} listening on "
                        rf"tcp:0:interface=127\.0\.0\.1 \(port {server.port}, 2 workers\): "
                        r"methods none; socks4 userid = trust: USERIDs taken on trust "
                        r"\(unverified claims\); identd off\n")
