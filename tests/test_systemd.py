"""socksd under systemd: the shipped units, readiness on a NOTIFY_SOCKET the
test listens on, and socket activation through systemd-socket-activate
(Debian's systemd package), with one process and with workers."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import PAGE, TWISTD, require, run_socks
from helpers import notify_listener, stop_process, wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
UNITS = ("socksd.service", "socksd.socket", "socksd-identd.service")
# Where the units say socksd is installed (README: Running under systemd).
INSTALLED_TWISTD = "/opt/socksd/bin/twistd"


def _unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections -> keys -> values, in order (systemd allows a
    key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in (EXAMPLES / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.mark.parametrize("name, command", [
    ("socksd.service", "socks --config /etc/socksd/socksd.toml"),
    ("socksd-identd.service", "identd --config /etc/socksd/socksd.toml"),
])
def test_the_service_units_have_what_running_socksd_needs(name, command):
    service = _unit(name)["Service"]
    assert service["Type"] == ["notify"]
    assert service["ExecStart"] == [f"{INSTALLED_TWISTD} -n --pidfile= {command}"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]   # ports below 1024
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    # The identd reads the users' files in their home directories.
    assert service["ProtectHome"] == ["read-only"]
    assert service["PrivateTmp"] == ["yes"]
    assert service["ReadOnlyPaths"] == ["/etc/socksd"]
    # sock_diag (the identd, psutil) is netlink; workers and NOTIFY_SOCKET are AF_UNIX.
    assert service["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX AF_NETLINK"]


def test_the_socksd_unit_runs_as_its_own_user_with_room_for_its_sessions():
    service = _unit("socksd.service")["Service"]
    assert service["User"] == ["socksd"] and service["Group"] == ["socksd"]
    # max_sessions' default (10000) can hold 40064 descriptors.
    assert int(service["LimitNOFILE"][0]) >= 40064
    assert service["RuntimeDirectory"] == ["socksd"]


def test_the_socket_unit_names_the_socket_the_readme_listens_on():
    socket_unit = _unit("socksd.socket")["Socket"]
    assert socket_unit["FileDescriptorName"] == ["socks"]
    readme = (EXAMPLES.parent / "README.rst").read_text()
    assert 'listen = ["systemd:domain=INET:name=socks"]' in readme


@pytest.mark.integration
def test_the_shipped_units_verify(tmp_path):
    """systemd-analyze verify needs no running systemd. It checks that
    ExecStart's program exists: the copies name the twistd under test in
    place of /opt/socksd's. Unknown keys and bad values are only warned
    about: any output fails."""
    analyze = require("systemd-analyze")
    for name in UNITS:
        text = (EXAMPLES / name).read_text()
        (tmp_path / name).write_text(text.replace(INSTALLED_TWISTD, TWISTD))
    result = subprocess.run([analyze, "verify", *(str(tmp_path / name) for name in UNITS)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout + result.stderr == "", \
        result.stdout + result.stderr


# ---- readiness ---------------------------------------------------------------------------

class Process:
    """A program started by the test, its output in a file."""

    def __init__(self, tmp: Path, command: list[str], env: dict[str, str] | None = None
                 ) -> None:
        self.log_path = tmp / f"process-{uuid.uuid4().hex}.log"
        self.log_file = open(self.log_path, "wb")
        self.command = command
        self.process = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})}, cwd=tmp)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> re.Match:
        def found():
            match = re.search(pattern, self.log())
            if not match and self.process.poll() is not None:
                raise AssertionError(f"{self.command} exited with {self.process.returncode}:"
                                     f"\n{self.log()}")
            return match

        return wait_until(found, timeout, lambda: f"{pattern!r} in the log:\n{self.log()}")

    def stop(self) -> None:
        stop_process(self.process, self.log_file)


@pytest.fixture
def processes(tmp_path):
    started: list[Process] = []

    def start(command: list[str], env: dict[str, str] | None = None) -> Process:
        process = Process(tmp_path, command, env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path):
    """An AF_UNIX datagram socket as systemd's: (NOTIFY_SOCKET, the socket)."""
    with notify_listener(request.param, str(tmp_path), timeout=30) as listening:
        yield listening


def _state(sock: socket.socket, process: Process) -> list[str]:
    """The next datagram's lines (30 s at most)."""
    try:
        return sock.recv(4096).decode().split("\n")
    except TimeoutError:
        raise AssertionError(f"nothing on NOTIFY_SOCKET in 30 s:\n{process.log()}") from None


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (its workers)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid:
            found.append(int(entry))
    return sorted(found)


@pytest.mark.parametrize("program, config, reloaded", [
    ("socks", "", r"\] reloaded "),
    ("socks", "[server]\nworkers = 2\n", r"\] w1 reloaded "),
    ("identd", "", r"\] reloaded "),
])
@pytest.mark.integration
def test_ready_reloading_and_stopping_are_told_to_notify_socket(
        tmp_path, processes, notify_socket, program, config, reloaded):
    address, sock = notify_socket
    path = tmp_path / "socksd.toml"
    path.write_text(config)
    process = processes([TWISTD, "-n", "--pidfile=", program, "--config", str(path),
                         "--listen", "tcp:0:interface=127.0.0.1"], {"NOTIFY_SOCKET": address})

    assert _state(sock, process) == ["READY=1"]
    process.wait_for_log(r"Factory(?: \(PROXY\))? starting on \d+")
    if "workers" in config:
        # Every worker serves by now; only the supervisor tells systemd
        # (NotifyAccess=main): its workers never see NOTIFY_SOCKET.
        workers = _children(process.process.pid)
        assert len(workers) == 2
        for worker in workers:
            with open(f"/proc/{worker}/environ", "rb") as f:
                assert b"NOTIFY_SOCKET=" not in f.read()
        process.wait_for_log(r"\] w0 serving on ")
        process.wait_for_log(r"\] w1 serving on ")

    process.process.send_signal(signal.SIGHUP)
    reloading = _state(sock, process)
    assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
    assert _state(sock, process) == ["READY=1"]
    process.wait_for_log(reloaded)

    process.process.send_signal(signal.SIGTERM)
    assert _state(sock, process) == ["STOPPING=1"]
    process.process.wait(30)


# ---- socket activation -------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _fetch(port: int, http_port: int) -> bytes:
    """The page, through the proxy on ``port``, by a real client."""
    curl = require("curl")
    result = subprocess.run([curl, "-sS", "--max-time", "30", "--socks5-hostname",
                             f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}/"],
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _listening_sockets(port: int) -> list[str]:
    """The inodes of the listening TCP sockets on ``port``."""
    inodes = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.append(fields[9])
    return inodes


def _holds(pid: int, inode: str) -> bool:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                return True
        except OSError:
            pass
    return False


def _activated(processes, tmp_path, config: str, fdname: str | None = "socks",
               twistd: tuple[str, ...] = ("socks",)) -> tuple[Process, int]:
    """twistd under systemd-socket-activate on a free loopback port, which
    starts it at the first connection."""
    activate = require("systemd-socket-activate")
    port = _free_port()
    path = tmp_path / "socksd.toml"
    path.write_text(config)
    process = processes([activate, "--listen", f"127.0.0.1:{port}",
                         *([f"--fdname={fdname}"] if fdname else []),
                         TWISTD, "-n", "--pidfile=", *twistd, "--config", str(path)])
    process.wait_for_log(rf"Listening on 127\.0\.0\.1:{port} as 3\.")
    return process, port


@pytest.mark.integration
def test_one_process_serves_the_socket_systemd_passed(tmp_path, processes, http_server):
    listen = 'listen = ["systemd:domain=INET:name=socks"]'
    process, port = _activated(processes, tmp_path, f"[server]\n{listen}\n")
    assert _fetch(port, http_server) == PAGE
    assert process.wait_for_log(r"listening on systemd:domain=INET:name=socks \(port (\d+)\): "
                                r"methods none;").group(1) == str(port)

    process.process.send_signal(signal.SIGHUP)
    process.wait_for_log(r"\] reloaded .*: OK: listen systemd:domain=INET:name=socks;")
    # Its socket is passed at start only (and its descriptor closed since):
    # another systemd: listen needs a restart.
    (tmp_path / "socksd.toml").write_text(
        '[server]\nlisten = ["systemd:domain=INET:index=0"]\n')
    process.process.send_signal(signal.SIGHUP)
    process.wait_for_log(r"reload failed, kept the running configuration: "
                         r"'systemd:domain=INET:name=socks': removed, but systemd passes its "
                         r"sockets at start only: restart for this change")
    assert _fetch(port, http_server) == PAGE


@pytest.mark.integration
def test_workers_share_the_socket_systemd_passed(tmp_path, processes, http_server):
    """One socket, the one systemd bound, in every worker (not one bound per
    worker): the kernel gives each connection to one of them."""
    process, port = _activated(processes, tmp_path, "[server]\nworkers = 2\n"
                               'listen = ["systemd:domain=INET:name=socks"]\n')
    assert _fetch(port, http_server) == PAGE
    process.wait_for_log(r"\] w0 serving on ")
    process.wait_for_log(r"\] w1 serving on ")
    [inode] = _listening_sockets(port)
    workers = _children(process.process.pid)
    assert len(workers) == 2 and all(_holds(worker, inode) for worker in workers)
    for _ in range(20):
        assert _fetch(port, http_server) == PAGE

    process.process.send_signal(signal.SIGHUP)
    process.wait_for_log(r"\] w0 reloaded ")
    process.wait_for_log(r"\] w1 reloaded ")
    assert _fetch(port, http_server) == PAGE
    # A worker that dies is restarted on the same socket.
    os.kill(workers[0], signal.SIGKILL)
    process.wait_for_log(r"worker \d ended .*; restarting")
    restarted = wait_until(lambda: (c := _children(process.process.pid)) and len(c) == 2
                           and workers[0] not in c and c, 15)
    assert all(_holds(worker, inode) for worker in restarted)
    for _ in range(10):
        assert _fetch(port, http_server) == PAGE


NO_SOCKET = ("'systemd:domain=INET:index=0': systemd passed no socket at index 0 (they come "
             "in LISTEN_FDS, named in LISTEN_FDNAMES): start this from a .socket unit, or "
             "under systemd-socket-activate with --fdname")


@pytest.mark.parametrize("config", ["", "[server]\nworkers = 2\n"])
@pytest.mark.integration
def test_systemd_listen_with_nothing_passed_is_one_line(tmp_path, config):
    (tmp_path / "socksd.toml").write_text(config)
    result = run_socks("--config", str(tmp_path / "socksd.toml"),
                       "--listen", "systemd:domain=INET:index=0", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr == f"socksd: --listen: {NO_SOCKET}\n", result.stderr
    # --check checks the string only: it may run anywhere.
    result = run_socks("--config", str(tmp_path / "socksd.toml"), "--check",
                       "--listen", "systemd:domain=INET:index=0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.integration
def test_the_identd_with_nothing_passed_is_one_line(tmp_path):
    (tmp_path / "socksd.toml").write_text('[identd]\nlisten = ["systemd:domain=INET:index=0"]\n')
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "identd", "--config",
                             str(tmp_path / "socksd.toml")],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr == f"identd: {tmp_path / 'socksd.toml'}:2: identd.listen: " \
                            f"{NO_SOCKET}\n", result.stderr


@pytest.mark.integration
def test_without_fdname_twisted_sees_no_socket_and_says_so_in_one_line(
        tmp_path, processes):
    """systemd-socket-activate sets LISTEN_FDNAMES only with --fdname, and
    Twisted ignores LISTEN_FDS without it (systemd's units always set both)."""
    process, port = _activated(processes, tmp_path,
                               '[server]\nlisten = ["systemd:domain=INET:index=0"]\n',
                               fdname=None)
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        pass     # what starts it
    wait_until(lambda: process.process.poll() is not None, 30,
               lambda: f"twistd to stop:\n{process.log()}")
    assert process.process.returncode != 0
    assert f"{tmp_path / 'socksd.toml'}:2: server.listen: {NO_SOCKET}\n" in process.log()
    assert "Traceback" not in process.log()
