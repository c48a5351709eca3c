"""`twistd socks` is socksd's, whatever order Twisted finds its plugins in."""

from __future__ import annotations

import importlib.metadata
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.copyright import version as twisted_version
from twisted.plugin import getPlugins
from twisted.scripts.twistd import ServerOptions

import socksd
from conftest import TWISTD

ROOT = Path(__file__).resolve().parent.parent


def _socks_maker(order):
    class Options(ServerOptions):
        def _getPlugins(self, interface):
            return order(list(getPlugins(interface)))

    options = Options()
    options.parseOptions(["socks"])
    return options.loadedPlugins["socks"]


def test_socks_is_ours_in_either_plugin_order():
    makers = list(getPlugins(IServiceMaker))
    names = [m.tapname for m in makers]
    assert names.count("socks") == 1, names
    assert "twisted-socks" in names  # Twisted's example, renamed, still there
    for order in (lambda ms: ms, lambda ms: list(reversed(ms))):
        assert _socks_maker(order).module == "socksd.tap.socks"


def test_installed_normally_not_editable():
    """The suite runs against a normal install (what `pip install .` gives)."""
    assert "site-packages" in socksd.__file__
    plugin = Path(socksd.__file__).parent.parent / "twisted" / "plugins" / "socksd_plugins.py"
    assert plugin.is_file()


def test_version_is_the_installed_distribution():
    """``--version`` and the start-up line say socksd.__version__: the one
    pyproject.toml gives the installed distribution."""
    assert socksd.__version__ == importlib.metadata.version("socksd")


@pytest.mark.integration
@pytest.mark.parametrize("plugin", ["socks", "identd"])
def test_version_names_socksd_and_twisted(plugin, tmp_path):
    """Twisted's --version named Twisted's version alone."""
    out = subprocess.run([TWISTD, plugin, "--version"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (f"socksd version: {socksd.__version__}\n"
                          f"Twisted version: {twisted_version}\n")


def _speaks_socks5(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"


@pytest.mark.integration
def test_twistd_socks_subprocess_from_normal_install(socks_server, tmp_path):
    config = '[server]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
    assert TWISTD.startswith(sys.prefix)
    server = socks_server(config)
    _speaks_socks5(server.port)


@pytest.mark.integration
def test_twistd_socks_with_source_tree_on_path(socks_server):
    """An editable-style layout: the project's own twisted/plugins directory is
    a second plugin directory, found after Twisted's own."""
    server = socks_server(None, env={"PYTHONPATH": str(ROOT)})
    _speaks_socks5(server.port)


@pytest.mark.integration
def test_twistd_twisted_socks_is_the_renamed_example():
    out = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    lines = {line.split()[0]: line for line in out.stdout.splitlines()
             if line.startswith("    ") and line.split()}
    assert "SOCKS4/4a/5 proxy" in lines["socks"]
    assert "SOCKSv4" in lines["twisted-socks"]


@pytest.mark.integration
def test_embedded_default_listens_on_loopback_1080(socks_server):
    server = socks_server(None, add_listen=False)
    assert server.port == 1080
    listening = _listening_sockets()
    assert ("127.0.0.1", 1080) in listening
    assert not any(port == 1080 and host != "127.0.0.1" for host, port in listening)
    _speaks_socks5(1080)


def _listening_sockets() -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket, from /proc/net/tcp*."""
    found = set()
    for name in ("tcp", "tcp6"):
        with open(f"/proc/net/{name}") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] != "0A":  # TCP_LISTEN
                    continue
                hex_host, hex_port = fields[1].split(":")
                raw = bytes.fromhex(hex_host)
                if len(raw) == 4:
                    host = socket.inet_ntop(socket.AF_INET, raw[::-1])
                else:
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    host = socket.inet_ntop(socket.AF_INET6, words)
                found.add((host, int(hex_port, 16)))
    return found
