"""An Upstream in front of Debian's Dante server (danted, dante-server) with
RFC 1929 username/password checked against the system's password database:
CONNECT and UDP ASSOCIATE through it, and Dante's own log naming the user
the URL gave, which is the only user it ever hears of."""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from chain import WAIT, Collect, Daemon, Echo, UpperEcho, free_port, listen_tcp, listen_udp, within
from helpers import SBIN_PATH, system_user
from socksd.client import DestinationFailed, UpstreamFailed, parse_upstream
from socksd.wire import socks5

pytestmark = pytest.mark.integration

USER = "socksd-upstream"

DANTED_CONF = """\
# Written by tests/test_upstream_dante.py.
logoutput: {log}
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
socksmethod: username
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0
    log: error connect disconnect
}}
socks pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0
    command: connect udpassociate
    log: error connect disconnect iooperation
}}
socks pass {{
    from: 0.0.0.0/0 to: 127.0.0.0/8
    command: udpreply
    log: error connect disconnect iooperation
}}
"""


def danted() -> str:
    path = shutil.which("danted", path=SBIN_PATH)
    assert path, "danted is not installed: `make test` installs it (Debian package dante-server)"
    return path


def set_password(user: str, password: str) -> None:
    chpasswd = shutil.which("chpasswd", path=SBIN_PATH)
    assert chpasswd, "chpasswd is not installed (Debian package passwd)"
    out = subprocess.run([chpasswd], input=f"{user}:{password}\n", capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, f"chpasswd: {out.stderr}"


class ThroughDante(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _directory(self, tmp_path: Path) -> None:
        self.tmp = tmp_path

    def setUp(self) -> None:
        # Dante checks the password as the system does (getpwnam, shadow):
        # a real system user with a password of this run.
        system_user(USER)
        self.password = secrets.token_urlsafe(12)
        set_password(USER, self.password)
        self.port = free_port()
        self.log = self.tmp / "danted.log"
        conf = self.tmp / "danted.conf"
        conf.write_text(DANTED_CONF.format(log=self.log, port=self.port))
        check = subprocess.run([danted(), "-V", "-f", str(conf)], capture_output=True,
                               text=True, timeout=30)
        assert check.returncode == 0, f"danted -V: {check.stdout}{check.stderr}"
        self.dante = Daemon(self, [danted(), "-f", str(conf), "-p", str(self.tmp / "pid")],
                            self.port, self.tmp / "danted.out", self.log)
        self.echo = listen_tcp(self, Factory.forProtocol(Echo))
        self.udp_echo = listen_udp(self, UpperEcho())
        self.upstream = parse_upstream(
            f"socks5://{USER}:{self.password}@127.0.0.1:{self.port}", "dante")

    def only_our_user(self, log: str) -> None:
        users = set(re.findall(r"username%([^@\s]+)@", log))
        assert users == {USER}, log

    async def test_connect(self):
        app = await self.upstream.connect(reactor, "127.0.0.1", self.echo,
                                          Factory.forProtocol(Collect), WAIT)
        app.transport.write(b"through dante")
        assert await app.until(13) == b"through dante"
        app.transport.loseConnection()
        await within(app.lost)
        log = await self.dante.wait_for_log(
            rf"tcp/connect \]: .*username%{USER}@127\.0\.0\.1\.\d+ .*127\.0\.0\.1\.{self.echo}")
        self.only_our_user(log)

    async def test_udp_associate(self):
        arrived: defer.Deferred = defer.Deferred()
        association = await self.upstream.udp_associate(
            reactor, lambda host, port, data: arrived.callback((host, port, data)), WAIT)
        local_port = association.local_address[1]
        association.send(b"datagram via dante", "127.0.0.1", self.udp_echo)
        assert await within(arrived) == ("127.0.0.1", self.udp_echo, b"DATAGRAM VIA DANTE")
        association.close()
        assert await within(association.closed) == "closed by us"
        # Dante names the association by our user and the UDP port we asked for.
        log = await self.dante.wait_for_log(
            rf"udp/udpreply -: 127\.0\.0\.1\.{self.udp_echo} .* "
            rf"username%{USER}@127\.0\.0\.1\.{local_port}")
        self.only_our_user(log)

    async def test_a_wrong_password(self):
        wrong = parse_upstream(f"socks5://{USER}:not-{self.password}@127.0.0.1:{self.port}",
                               "dante")
        with pytest.raises(UpstreamFailed, match="upstream dante: username/password refused"):
            await wrong.connect(reactor, "127.0.0.1", self.echo, Factory.forProtocol(Collect),
                                WAIT)
        await self.dante.wait_for_log(rf'system password authentication failed for user "{USER}"')

    async def test_a_refused_destination(self):
        with pytest.raises(DestinationFailed) as caught:
            await self.upstream.connect(reactor, "127.0.0.1", free_port(),
                                        Factory.forProtocol(Collect), WAIT)
        assert caught.value.reply == socks5.CONNECTION_REFUSED
