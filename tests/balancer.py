"""A real load balancer in front of socksd: Debian's HAProxy in TCP mode,
round robin with PROXY protocol v2 (health checks on) over two ``twistd
socks`` instances. Each party has an address of its own, as on separate
machines: the balancer 127.0.0.2, the instances 127.0.0.3 and 127.0.0.4
(clients pick theirs, 127.0.0.5 say). The ``balanced_socks`` fixture in
conftest.py starts one; no fixtures here.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import SBIN_PATH, stop_process, wait_until

BALANCER_HOST = "127.0.0.2"
INSTANCE_HOSTS = ("127.0.0.3", "127.0.0.4")

# One line per connection through the frontend, read by the tests: the
# client, the server chosen, and the address the balancer sent from.
LOG_FORMAT = "client=%ci:%cp frontend=%fi:%fp server=%s source=%bi:%bp"
CONNECTION_LINE = re.compile(r"client=(\S+):(\d+) frontend=(\S+):(\d+) server=(\S+) "
                             r"source=(\S+):(\d+)")


def require_haproxy() -> str:
    """Debian's haproxy; missing means FAIL (never skip)."""
    path = shutil.which("haproxy", path=SBIN_PATH)
    assert path, "haproxy is not installed: `make test` installs it (Debian package haproxy)"
    return path


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def listening(host: str, port: int) -> bool:
    """Is a TCP socket listening on host:port? Read from /proc, not by
    connecting: a connection to the frontend would be a session."""
    wanted = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    with open("/proc/net/tcp") as table:
        return any(fields[1] == wanted and fields[3] == "0A"
                   for fields in (line.split() for line in table.readlines()[1:]))


def haproxy_config(frontend: tuple[str, int], servers: list[tuple[str, int]],
                   check_interval_ms: int = 200) -> str:
    backend = "\n".join(
        f"    server s{i} {host}:{port} send-proxy-v2 check inter {check_interval_ms}ms"
        for i, (host, port) in enumerate(servers, 1))
    return f"""\
global
    log stdout format raw local0 info

defaults
    mode tcp
    log global
    log-format "{LOG_FORMAT}"
    option log-health-checks
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend socks
    bind {frontend[0]}:{frontend[1]}
    default_backend socksd

backend socksd
    balance roundrobin
    # Connect from the balancer's own address (the route would pick 127.0.0.1).
    source {BALANCER_HOST}
{backend}
"""


class HAProxy:
    """``haproxy -db`` (foreground, no daemon) on a config in tmp_path,
    its log (stdout) captured in a file."""

    def __init__(self, tmp_path: Path, servers: list[tuple[str, int]]) -> None:
        self.address = (BALANCER_HOST, free_port(BALANCER_HOST))
        self.servers = servers
        self.config_path = tmp_path / f"haproxy-{id(self)}.cfg"
        self.config_path.write_text(haproxy_config(self.address, servers))
        self.log_path = tmp_path / f"haproxy-{id(self)}.log"
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen([require_haproxy(), "-db", "-f", str(self.config_path)],
                                        stdout=self.log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=tmp_path)
        try:
            wait_until(self._listening, 10, lambda: f"haproxy to listen:\n{self.log()}")
            # Every server checked once (PROXY v2 LOCAL) and found up.
            for i in range(1, len(servers) + 1):
                wait_until(lambda i=i: f"server socksd/s{i} succeeded" in self.log(), 10,
                           lambda: f"haproxy's first health checks:\n{self.log()}")
        except BaseException:
            self.stop()
            raise

    def _listening(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.process.returncode}:\n{self.log()}")
        return listening(*self.address)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connections(self) -> list[dict[str, Any]]:
        """The frontend's connections logged so far (at their ends)."""
        return [dict(client=(m[1], int(m[2])), frontend=(m[3], int(m[4])), server=m[5],
                     source=(m[6], int(m[7])))
                for m in CONNECTION_LINE.finditer(self.log())]

    def stop(self) -> None:
        stop_process(self.process, self.log_file)


class Balanced:
    """HAProxy on 127.0.0.2 in front of two socksd instances (``instances``,
    TwistdSocks from conftest.py, on 127.0.0.3 and 127.0.0.4). Clients
    connect to ``address``."""

    def __init__(self, start_socks: Callable[..., Any], tmp_path: Path, config: str = "",
                 server: str = "", args: tuple[str, ...] = ()) -> None:
        self.instances = []
        for host in INSTANCE_HOSTS:
            text = (f'[server]\nlisten = ["haproxy:tcp:0:interface={host}"]\n'
                    f'trusted_proxies = ["{BALANCER_HOST}/32"]\n{server}\n{config}')
            instance = start_socks(text, *args, add_listen=False)
            instance.host = host
            self.instances.append(instance)
        self.haproxy = HAProxy(tmp_path, [i.address for i in self.instances])
        self.address = self.haproxy.address

    def instance(self, name: str) -> Any:
        """The instance HAProxy calls ``name`` (s1, s2)."""
        return self.instances[int(name[1:]) - 1]

    def stop(self) -> None:
        self.haproxy.stop()
