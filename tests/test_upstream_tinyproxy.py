"""An http:// Upstream in front of Debian's tinyproxy (run in the foreground
with a config of the test's, Basic authentication on): a CONNECT tunnel
carries bytes both ways, names go unresolved, and tinyproxy's refusals come
back as the right kind of failure."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from chain import WAIT, Collect, Daemon, Echo, free_port, listen_tcp, within
from helpers import SBIN_PATH
from socksd.client import DestinationFailed, UpstreamFailed, parse_upstream
from socksd.wire import socks5

pytestmark = pytest.mark.integration

TINYPROXY_CONF = """\
# Written by tests/test_upstream_tinyproxy.py.
Port {port}
Listen 127.0.0.1
Timeout 30
LogLevel Connect
MaxClients 20
Allow 127.0.0.1
DisableViaHeader Yes
BasicAuth proxyuser {password}
{connect_ports}
"""


def tinyproxy() -> str:
    path = shutil.which("tinyproxy", path=SBIN_PATH)
    assert path, "tinyproxy is not installed: `make test` installs it (Debian package tinyproxy)"
    return path


class ThroughTinyproxy(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _directory(self, tmp_path: Path) -> None:
        self.tmp = tmp_path

    def setUp(self) -> None:
        self.echo = listen_tcp(self, Factory.forProtocol(Echo))
        self.closed = free_port()       # allowed, and nothing listens there
        self.port = free_port()
        self.password = secrets.token_urlsafe(12)
        conf = self.tmp / "tinyproxy.conf"
        conf.write_text(TINYPROXY_CONF.format(
            port=self.port, password=self.password,
            connect_ports="\n".join(f"ConnectPort {p}" for p in (self.echo, self.closed))))
        # -d: in the foreground, its log on its output.
        self.proxy = Daemon(self, [tinyproxy(), "-d", "-c", str(conf)], self.port,
                            self.tmp / "tinyproxy.out")
        self.upstream = parse_upstream(
            f"http://proxyuser:{self.password}@127.0.0.1:{self.port}", "web")

    async def test_a_tunnel_by_name(self):
        app = await self.upstream.connect(reactor, "localhost", self.echo,
                                          Factory.forProtocol(Collect), WAIT)
        payload = bytes(range(256)) * 1024
        app.transport.write(payload)
        assert await app.until(len(payload)) == payload
        app.transport.loseConnection()
        await within(app.lost)
        # The name went to tinyproxy unresolved, in our request.
        await self.proxy.wait_for_log(rf"Request .*: CONNECT localhost:{self.echo} HTTP/1\.1")
        await self.proxy.wait_for_log(r'Established connection to host "localhost"')

    async def test_wrong_credentials_are_the_upstreams_failure(self):
        for url in (f"http://proxyuser:wrong@127.0.0.1:{self.port}",
                    f"http://127.0.0.1:{self.port}"):
            with pytest.raises(UpstreamFailed, match=r"the proxy refused our credentials: 40[17]"):
                await parse_upstream(url, "web").connect(
                    reactor, "127.0.0.1", self.echo, Factory.forProtocol(Collect), WAIT)

    async def test_a_port_it_does_not_allow(self):
        with pytest.raises(DestinationFailed) as caught:
            await self.upstream.connect(reactor, "127.0.0.1", free_port(),
                                        Factory.forProtocol(Collect), WAIT)
        assert caught.value.reply == socks5.NOT_ALLOWED and "403" in str(caught.value)

    async def test_a_destination_that_refuses(self):
        with pytest.raises(DestinationFailed) as caught:
            await self.upstream.connect(reactor, "127.0.0.1", self.closed,
                                        Factory.forProtocol(Collect), WAIT)
        # tinyproxy says "500 Unable to connect": no more precise than general failure.
        assert str(caught.value) == "upstream web: the proxy answered 500 Unable to connect"
        assert caught.value.reply == socks5.GENERAL_FAILURE
