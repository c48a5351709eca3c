"""`workers = N`: N processes share the listeners (SO_REUSEPORT), the twistd
process restarts one that dies and stops them all when it stops."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time

import pytest

from conftest import TWISTD, require
from helpers import wait_until
from socksd import config


def _worker_pids(parent: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if int(fields[1]) == parent and b"socksd.tap.worker" in cmdline:
            pids.append(int(entry))
    return sorted(pids)


def _session(port: int, dest_port: int, reply: int = 0x00) -> None:
    """A SOCKS5 CONNECT to 127.0.0.1:dest_port answered with ``reply``; once
    connected (to an HTTP server), one GET read to its end."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                  + dest_port.to_bytes(2, "big"))
        assert s.recv(10)[:2] == bytes((5, reply))
        if reply == 0x00:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            while s.recv(65536):
                pass


@pytest.mark.integration
def test_workers_serve_restart_and_stop(socks_server, http_server):
    require("curl")
    server = socks_server("[server]\nworkers = 2\n")
    pids = wait_until(lambda: (p := _worker_pids(server.process.pid)) and len(p) == 2 and p, 15)
    for _ in range(40):
        _session(server.port, http_server)
    server.wait_for_log(r"\] w0 127\.0\.0\.1:\d+ socks5 .* ok")
    server.wait_for_log(r"\] w1 127\.0\.0\.1:\d+ socks5 .* ok")

    os.kill(pids[0], signal.SIGKILL)
    server.wait_for_log(r"worker \d ended .*; restarting")
    restarted = wait_until(lambda: (p := _worker_pids(server.process.pid)) and len(p) == 2
                           and pids[0] not in p and p, 15)
    assert pids[1] in restarted
    time.sleep(0.5)
    for _ in range(10):
        _session(server.port, http_server)

    server.process.send_signal(signal.SIGTERM)
    server.process.wait(20)
    assert not any(_alive(pid) for pid in restarted), "workers outlived the supervisor"


@pytest.mark.parametrize("twistd_args, reactor", [
    ((), "socksd.tap.reactor.EPollReactor"),
    (("--reactor", "poll"), "twisted.internet.pollreactor.PollReactor"),
])
@pytest.mark.integration
def test_workers_run_on_the_supervisors_reactor(socks_server, http_server, twistd_args, reactor):
    server = socks_server("[server]\nworkers = 2\n", twistd_args=twistd_args)
    server.wait_for_log(rf"reactor class: {re.escape(reactor)}\.")
    for index in (0, 1):
        server.wait_for_log(rf"\] w{index} serving on {re.escape(reactor)}\n")
    _session(server.port, http_server)


@pytest.mark.integration
def test_worker_logs_reach_the_twistd_log_file(tmp_path, http_server):
    """Workers publish through the supervisor: with `twistd -l FILE` (and a
    daemon's /dev/null stdout) their session lines are in FILE."""
    config = tmp_path / "socksd.toml"
    config.write_text("[server]\nworkers = 2\n")
    logfile = tmp_path / "socksd.log"
    process = subprocess.Popen([TWISTD, "-n", "--pidfile=", "-l", str(logfile), "socks",
                                "--config", str(config),
                                "--listen", "tcp:0:interface=127.0.0.1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=tmp_path)
    try:
        port = int(wait_until(lambda: logfile.exists() and re.search(
            r"listening on \S+ \(port (\d+), 2 workers\)", logfile.read_text()), 15)[1])
        wait_until(lambda: len(_worker_pids(process.pid)) == 2, 15)
        time.sleep(0.5)
        for _ in range(40):
            _session(port, http_server)
        for worker in ("w0", "w1"):
            wait_until(lambda worker=worker: re.search(
                rf"\[socksd#info\] {worker} 127\.0\.0\.1:\d+ "
                rf"socks5 user=- method=none connect .* ok", logfile.read_text()), 15)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)


@pytest.mark.integration
def test_a_stalled_supervisor_never_blocks_the_workers(socks_server):
    """Workers log through the supervisor, but never wait for it: while it is
    stopped (its log sink stalled, say) they go on serving and drop what does
    not fit their buffer, then say how much was dropped."""
    server = socks_server("[server]\nworkers = 2\n")
    wait_until(lambda: len(_worker_pids(server.process.pid)) == 2, 15)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))   # bound, not listening: connections are refused
    try:
        closed_port = closed.getsockname()[1]
        _session(server.port, closed_port, reply=0x05)
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            # Far more log records than the channel's socket and buffer hold.
            for _ in range(1500):
                _session(server.port, closed_port, reply=0x05)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
    finally:
        closed.close()
    server.wait_for_log(r"w\d \d+ log events dropped: the supervisor did not read them in time")
    server.wait_for_log(r"\] w\d 127\.0\.0\.1:\d+ socks5 .* connection refused")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("text, message", [
    ('[server]\nworkers = 2\nlisten = ["unix:/tmp/x.sock"]\n',
     "server.listen: 'unix:/tmp/x.sock': workers > 1 serves tcp:"),
    ('[server]\nworkers = 0\n', "server.workers: 0 is not a number of processes"),
    ('[server]\nworkers = "many"\n', "server.workers: 'many' is not a number"),
])
def test_workers_config_errors(tmp_path, text, message):
    path = tmp_path / "w.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as info:
        config.load(str(path))
    assert message in str(info.value)


def test_auto_is_the_physical_cores_we_may_run_on(tmp_path):
    path = tmp_path / "w.toml"
    path.write_text('[server]\nworkers = "auto"\n')
    assert config.load(str(path)).workers == config.physical_cores()
    assert 1 <= config.physical_cores() <= (os.cpu_count() or 1)


def _sysfs(root, siblings: dict[int, str]):
    """A fake /sys/devices/system/cpu: each CPU's thread_siblings_list."""
    for cpu, text in siblings.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(text + "\n")
    return str(root)


# 4 cores, 2 hardware threads each: CPU n and n + 4 are siblings.
SMT = {cpu: f"{cpu % 4},{cpu % 4 + 4}" for cpu in range(8)}


@pytest.mark.parametrize("siblings, allowed, cores", [
    (SMT, set(range(8)), 4),                       # siblings count once
    (SMT, {0, 4}, 1),                              # one core's two threads
    (SMT, {0, 1, 2, 3}, 4),                        # one thread of each core
    (SMT, {0, 1, 5}, 2),
    ({cpu: str(cpu) for cpu in range(6)}, set(range(6)), 6),           # no SMT
    ({cpu: str(cpu) for cpu in range(6)}, {2, 5}, 2),                  # affinity
    ({cpu: f"{cpu // 4 * 4}-{cpu // 4 * 4 + 3}" for cpu in range(8)},  # 4 threads a core
     set(range(8)), 2),
])
def test_auto_counts_each_core_we_may_run_on_once(tmp_path, siblings, allowed, cores):
    assert config.physical_cores(_sysfs(tmp_path, siblings), allowed) == cores


@pytest.mark.parametrize("siblings", [
    {},                                      # no topology at all (a container, another OS)
    {0: "0,4", 1: "1,5"},                    # CPUs 2 and 3 not described
    {cpu: "" for cpu in range(4)},
    {cpu: "zero" for cpu in range(4)},
    {cpu: "3-1" for cpu in range(4)},
    {cpu: "7" for cpu in range(4)},          # a list that does not hold the CPU itself
])
def test_auto_is_the_cpus_we_may_run_on_where_sysfs_does_not_say(tmp_path, siblings):
    assert config.physical_cores(_sysfs(tmp_path, siblings), {0, 1, 2, 3}) == 4


def test_auto_without_an_affinity_is_the_cpu_count(tmp_path, monkeypatch):
    def unknown(pid: int) -> set[int]:
        raise OSError("no affinity here")

    monkeypatch.setattr(os, "sched_getaffinity", unknown)
    assert config.physical_cores(_sysfs(tmp_path, SMT)) == (os.cpu_count() or 1)


@pytest.mark.parametrize("description, expected", [
    ("tcp:1080", (socket.AF_INET, "0.0.0.0", 1080, 50, False)),
    # Twisted's positional order: tcp:PORT:INTERFACE:BACKLOG ...
    ("tcp:1080:127.0.0.1", (socket.AF_INET, "127.0.0.1", 1080, 50, False)),
    ("tcp:1080:127.0.0.1:7", (socket.AF_INET, "127.0.0.1", 1080, 7, False)),
    # ... and tcp6:PORT:BACKLOG:INTERFACE.
    ("tcp6:1080:7:\\:\\:1", (socket.AF_INET6, "::1", 1080, 7, False)),
    ("tcp6:port=1080", (socket.AF_INET6, "::", 1080, 50, False)),
    # tcp: with an IPv6 interface is an IPv6 socket, as in Twisted.
    ("tcp:1080:interface=\\:\\:1", (socket.AF_INET6, "::1", 1080, 50, False)),
    ("haproxy:tcp:port=1080:interface=127.0.0.1:backlog=9",
     (socket.AF_INET, "127.0.0.1", 1080, 9, True)),
])
def test_listeners_shared_by_workers_are_read_as_twisted_reads_them(description, expected):
    """The supervisor binds these itself (SO_REUSEPORT): it must bind what
    Twisted would, never a wider address than the string names."""
    assert config.parse_listener(description) == (*expected, None)


@pytest.mark.parametrize("description, family, haproxy", [
    ("systemd:domain=INET:index=0", socket.AF_INET, False),
    ("systemd:INET6:1", socket.AF_INET6, False),       # Twisted's order: DOMAIN:INDEX:NAME
    ("haproxy:systemd:domain=INET6:name=socks", socket.AF_INET6, True),
])
def test_a_systemd_listener_is_the_socket_systemd_passed_shared_by_the_workers(
        description, family, haproxy):
    """Bound by systemd, found by Twisted's parser from the same string."""
    assert config.parse_listener(description) == (
        family, "", 0, 0, haproxy, description.removeprefix("haproxy:"))


@pytest.mark.parametrize("description, message", [
    ("systemd:domain=UNIX:index=0", "workers > 1 serves tcp:, tcp6: and systemd:domain=INET"),
    ("systemd:domain=INET", "give one of index= and name="),
    ("systemd:domain=INET:index=0:name=socks", "give one of index= and name="),
    ("systemd:domain=INETX:index=0", "domain 'INETX' is not an address family"),
    ("systemd:domain=INET:index=first", "index 'first' is not a number"),
    ("systemd:domain=INET:index=0:backlog=5", "systemd: takes domain= and index= or name="),
])
def test_a_systemd_listener_the_workers_cannot_share_is_refused(tmp_path, description, message):
    path = tmp_path / "w.toml"
    path.write_text(f'[server]\nworkers = 2\nlisten = ["{description}"]\n')
    with pytest.raises(config.ConfigError) as info:
        config.load(str(path))
    assert str(info.value).startswith(f"{path}:3: server.listen: '{description}': ")
    assert message in str(info.value)


@pytest.mark.integration
def test_workers_bind_the_positional_interface(socks_server):
    """tcp:PORT:127.0.0.1 with workers: loopback only (it bound 0.0.0.0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = socks_server("[server]\nworkers = 2\n", "--listen", f"tcp:{port}:127.0.0.1")
    assert server.port == port
    listening = []   # (table, local address in /proc's hex) of LISTEN sockets on port
    for table in ("tcp", "tcp6"):
        with open(f"/proc/net/{table}") as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    listening.append((table, local.rsplit(":", 1)[0]))
    # Both workers' sockets (SO_REUSEPORT), each on 127.0.0.1 (0100007F).
    assert listening == [("tcp", "0100007F")] * 2, listening
