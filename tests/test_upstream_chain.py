"""socksd.client.upstream against socksd itself: a socksd listener in this
process (made from a config text as `twistd socks` makes it) is the
upstream, on real loopback sockets, and an Upstream parsed from a URL
drives CONNECT, BIND and UDP ASSOCIATE through it over SOCKS5 (none,
username/password, TLS with a private CA, GSS-API with a real KDC) and
SOCKS4a; and what each kind of failure comes back as."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ClientCreator, Factory
from twisted.trial import unittest

from chain import (
    Collect,
    Echo,
    Sessions,
    Silent,
    UpperEcho,
    free_port,
    listen_tcp,
    listen_udp,
    make_ca,
    make_server_cert,
    socksd,
    within,
)
from socksd.client import DestinationFailed, UpstreamFailed, parse_upstream
from socksd.wire import socks5

ADDED_PRINCIPALS: set[str] = set()
USERPASS = '[server]\nmethods = ["userpass"]\ncheckers = ["memory:alice:secret"]\n'


class ChainCase(unittest.TestCase):
    """The reactor's echo servers, the log's session lines, a tmp dir."""

    @pytest.fixture(autouse=True)
    def _directory(self, tmp_path: Path) -> None:
        self.tmp = tmp_path

    def setUp(self) -> None:
        self.echo = listen_tcp(self, Factory.forProtocol(Echo))
        self.udp_echo = listen_udp(self, UpperEcho())
        self.sessions = Sessions()
        self.sessions.start()
        self.addCleanup(self.sessions.stop)

    async def echo_through(self, upstream, host: str = "127.0.0.1", data: bytes = b"hello",
                           half_close: bool = True):
        """CONNECT to the echo through ``upstream``; the data comes back;
        our half-close is passed on and the echo's close comes back.
        (Twisted's TLS has no half-close: ``half_close=False`` there.)"""
        app = await upstream.connect(reactor, host, self.echo, Factory.forProtocol(Collect), 10)
        assert app.made
        app.transport.write(data)
        assert await app.until(len(data)) == data
        if half_close:
            app.transport.loseWriteConnection()
            await within(app.eof)
        # Both directions are done: a half-closing protocol closes itself.
        app.transport.loseConnection()
        await within(app.lost)
        return app

    async def ended(self, command: str, count: int = 1) -> list[dict]:
        """The session lines for ``command``, once socksd has written them."""
        deadline = time.monotonic() + 10

        def lines() -> list[dict]:
            return [e for e in self.sessions.events if e["command"] == command]

        while len(lines()) < count:
            assert time.monotonic() < deadline, f"no {command} session line: " \
                f"{self.sessions.events}"
            await deferLater(0.02)
        return lines()


def deferLater(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


async def finish(end: Collect) -> None:
    """The other side closed: its EOF comes through the proxy, and this
    side (which can half-close) then closes too."""
    await within(end.eof)
    end.transport.loseConnection()
    await within(end.lost)


def remember(made: list, protocol):
    made.append(protocol)
    return protocol


class SOCKS5Chain(ChainCase):
    async def test_connect_without_authentication(self):
        port, _ = await socksd(self, self.tmp)
        await self.echo_through(parse_upstream(f"socks5://127.0.0.1:{port}", "up"))
        [line] = await self.ended("connect")
        assert line["destination"] == f"127.0.0.1:{self.echo}"
        assert line["up"] == line["down"] == 5 and line["outcome"] == "ok"

    async def test_a_name_is_sent_unresolved(self):
        port, _ = await socksd(self, self.tmp)
        await self.echo_through(parse_upstream(f"socks5://127.0.0.1:{port}"), "LocalHost.")
        [line] = await self.ended("connect")
        # The upstream got the name (in its normal form) and resolved it.
        assert line["destination"] == f"localhost:{self.echo}", line

    async def test_connect_with_the_urls_user_and_password(self):
        port, _ = await socksd(self, self.tmp, USERPASS)
        await self.echo_through(parse_upstream(f"socks5://alice:secret@127.0.0.1:{port}"))
        [line] = await self.ended("connect")
        assert line["user"] == "alice" and line["method"] == "userpass"

    async def test_percent_encoded_credentials(self):
        port, _ = await socksd(self, self.tmp, '[server]\nmethods = ["userpass"]\n'
                               'checkers = ["memory:al ice:p@ss/w rd"]\n')
        await self.echo_through(
            parse_upstream(f"socks5://al%20ice:p%40ss%2Fw%20rd@127.0.0.1:{port}"))
        [line] = await self.ended("connect")
        assert line["user"] == "al ice"

    async def test_a_wrong_password_is_the_upstreams_failure(self):
        port, _ = await socksd(self, self.tmp, USERPASS)
        upstream = parse_upstream(f"socks5://alice:wrong@127.0.0.1:{port}", "corp")
        with pytest.raises(UpstreamFailed) as caught:
            await upstream.connect(reactor, "127.0.0.1", self.echo,
                                   Factory.forProtocol(Collect), 10)
        assert str(caught.value) == "upstream corp: username/password refused"
        assert caught.value.reply == socks5.GENERAL_FAILURE
        assert "wrong" not in repr(upstream) and "wrong" not in upstream.url_text

    async def test_no_credentials_for_a_proxy_that_wants_them(self):
        port, _ = await socksd(self, self.tmp, USERPASS)
        with pytest.raises(UpstreamFailed, match=r"accepts none of our methods \(0xff\)"):
            await parse_upstream(f"socks5://127.0.0.1:{port}").connect(
                reactor, "127.0.0.1", self.echo, Factory.forProtocol(Collect), 10)

    async def test_a_refused_destination_is_the_upstreams_reply(self):
        port, _ = await socksd(self, self.tmp)
        closed = free_port()
        with pytest.raises(DestinationFailed) as caught:
            await parse_upstream(f"socks5://127.0.0.1:{port}").connect(
                reactor, "127.0.0.1", closed, Factory.forProtocol(Collect), 10)
        assert caught.value.reply == socks5.CONNECTION_REFUSED

    async def test_a_rule_refusal_is_the_upstreams_reply(self):
        port, _ = await socksd(self, self.tmp, f'[[rules]]\naction = "deny"\n'
                               f'ports = ["{self.echo}"]\n\n[[rules]]\naction = "allow"\n'
                               'from = ["127.0.0.0/8"]\n')
        with pytest.raises(DestinationFailed) as caught:
            await parse_upstream(f"socks5://127.0.0.1:{port}", "corp").connect(
                reactor, "127.0.0.1", self.echo, Factory.forProtocol(Collect), 10)
        assert caught.value.reply == socks5.NOT_ALLOWED
        assert str(caught.value) == "upstream corp: the proxy replied 0x2"

    async def test_bind_through_the_upstream(self):
        port, _ = await socksd(self, self.tmp)
        upstream = parse_upstream(f"socks5://127.0.0.1:{port}")
        bound = await upstream.bind(reactor, "127.0.0.1", 0, Factory.forProtocol(Collect),
                                    10, 10)
        # The upstream's own listening address, not ours, nor its SOCKS port.
        assert bound.host == "127.0.0.1" and bound.port not in (0, port)
        peer = await within(ClientCreator(reactor, Collect).connectTCP(bound.host, bound.port))
        accepted = await within(bound.accepted)
        assert (accepted.host, accepted.port) == ("127.0.0.1", peer.transport.getHost().port)
        peer.transport.write(b"from the peer")
        assert await accepted.protocol.until(13) == b"from the peer"
        accepted.protocol.transport.write(b"to the peer")
        assert await peer.until(11) == b"to the peer"
        peer.transport.loseConnection()
        await finish(accepted.protocol)
        [line] = await self.ended("bind")
        assert line["outcome"] == "ok"

    async def test_bind_waits_no_longer_than_told(self):
        port, _ = await socksd(self, self.tmp)
        bound = await parse_upstream(f"socks5://127.0.0.1:{port}", "corp").bind(
            reactor, "127.0.0.1", 0, Factory.forProtocol(Collect), 10, 0.3)
        started = time.monotonic()
        with pytest.raises(DestinationFailed,
                           match="no connection to the bound address in 0.3 s") as caught:
            await within(bound.accepted)
        assert time.monotonic() - started < 5
        # As the upstream's own BIND timeout answers: the client gets TTL
        # expired, as from a direct BIND.
        assert caught.value.reply == socks5.TTL_EXPIRED

    async def test_udp_associate_carries_datagrams_both_ways(self):
        port, factory = await socksd(self, self.tmp)
        received: list[tuple[str, int, bytes]] = []
        arrived: defer.Deferred = defer.Deferred()

        def datagram(host: str, source_port: int, payload: bytes) -> None:
            received.append((host, source_port, payload))
            if not arrived.called:
                arrived.callback(None)

        association = await parse_upstream(f"socks5://127.0.0.1:{port}").udp_associate(
            reactor, datagram, 10)
        assert association.relay_address[0] == "127.0.0.1"
        assert association.send(b"a datagram", "127.0.0.1", self.udp_echo)
        await within(arrived)
        assert received == [("127.0.0.1", self.udp_echo, b"A DATAGRAM")]
        # The association ends with its control connection, the proxy's doing.
        factory.shut_down("test")
        why = await within(association.closed)
        assert why.startswith("the proxy closed the control connection"), why
        assert not association.send(b"late", "127.0.0.1", self.udp_echo)
        [line] = await self.ended("udp")
        assert "datagrams up=1 down=1" in line["detail"], line

    async def test_closing_the_association_closes_the_control_connection(self):
        port, _ = await socksd(self, self.tmp, USERPASS)
        association = await parse_upstream(f"socks5://alice:secret@127.0.0.1:{port}"
                                           ).udp_associate(reactor, lambda *a: None, 10)
        association.close()
        assert await within(association.closed) == "closed by us"
        [line] = await self.ended("udp")
        assert line["user"] == "alice"

    async def test_datagrams_from_anyone_but_the_relay_are_dropped(self):
        port, _ = await socksd(self, self.tmp)
        received: list = []
        association = await parse_upstream(f"socks5://127.0.0.1:{port}").udp_associate(
            reactor, lambda *a: received.append(a), 10)
        self.addCleanup(association.close)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.sendto(socks5.encode_udp("127.0.0.1", 9, b"forged"),
                            association.local_address)
        deadline = time.monotonic() + 5
        while association.dropped == 0 and time.monotonic() < deadline:
            await deferLater(0.02)
        assert association.dropped == 1 and received == []


class Failures(ChainCase):
    async def test_an_upstream_that_refuses_the_connection(self):
        closed = free_port()
        with pytest.raises(UpstreamFailed, match=r"upstream down: .*refused"):
            await parse_upstream(f"socks5://127.0.0.1:{closed}", "down").connect(
                reactor, "127.0.0.1", self.echo, Factory.forProtocol(Collect), 10)

    async def test_a_silent_upstream_times_out(self):
        silent: list[Silent] = []
        port = listen_tcp(self, Factory.forProtocol(lambda: remember(silent, Silent())))
        for url in (f"socks5://127.0.0.1:{port}", f"socks4://127.0.0.1:{port}",
                    f"http://127.0.0.1:{port}"):
            started = time.monotonic()
            with pytest.raises(UpstreamFailed, match=r"upstream slow: no answer in 0.4 s"):
                await parse_upstream(url, "slow").connect(
                    reactor, "127.0.0.1", self.echo, Factory.forProtocol(Collect), 0.4)
            assert time.monotonic() - started < 5
            await within(silent[-1].lost)     # and the connection was dropped

    async def test_cancelling_drops_the_connection(self):
        silent: list[Silent] = []
        port = listen_tcp(self, Factory.forProtocol(lambda: remember(silent, Silent())))
        d = parse_upstream(f"socks5://127.0.0.1:{port}").connect(
            reactor, "127.0.0.1", self.echo, Factory.forProtocol(Collect), 10)
        while not silent:
            await deferLater(0.01)
        d.cancel()
        with pytest.raises(defer.CancelledError):
            await d
        await within(silent[0].lost)

    async def test_http_does_no_bind_nor_udp(self):
        upstream = parse_upstream("http://127.0.0.1:1", "web")
        for call in (lambda: upstream.bind(reactor, "127.0.0.1", 0, Factory(), 1, 1),
                     lambda: upstream.udp_associate(reactor, lambda *a: None, 1)):
            with pytest.raises(UpstreamFailed) as caught:
                await call()
            assert caught.value.reply == socks5.COMMAND_NOT_SUPPORTED
        with pytest.raises(UpstreamFailed, match="socks4 does not do udp"):
            await parse_upstream("socks4://127.0.0.1:1").udp_associate(
                reactor, lambda *a: None, 1)


class SOCKS4Chain(ChainCase):
    async def test_connect_by_name_and_by_address(self):
        port, _ = await socksd(self, self.tmp)
        upstream = parse_upstream(f"socks4://127.0.0.1:{port}")
        await self.echo_through(upstream, "localhost")
        await self.echo_through(upstream, "127.0.0.1")
        by_name, by_address = await self.ended("connect", 2)
        assert by_name["version"] == 4 and by_name["destination"] == f"localhost:{self.echo}"
        assert by_address["destination"] == f"127.0.0.1:{self.echo}"

    async def test_the_urls_userid_is_sent(self):
        port, _ = await socksd(self, self.tmp)
        await self.echo_through(parse_upstream(f"socks4://bob@127.0.0.1:{port}"))
        [line] = await self.ended("connect")
        assert line["user"] == "bob"

    async def test_a_refusal_is_the_upstreams_reply(self):
        port, _ = await socksd(self, self.tmp, f'[[rules]]\naction = "deny"\n'
                               f'ports = ["{self.echo}"]\n\n[[rules]]\naction = "allow"\n'
                               'from = ["127.0.0.0/8"]\n')
        with pytest.raises(DestinationFailed) as caught:
            await parse_upstream(f"socks4://127.0.0.1:{port}").connect(
                reactor, "127.0.0.1", self.echo, Factory.forProtocol(Collect), 10)
        assert caught.value.reply == socks5.GENERAL_FAILURE
        assert "91" in str(caught.value)

    async def test_ipv6_has_no_socks4_form(self):
        with pytest.raises(DestinationFailed) as caught:
            await parse_upstream("socks4://127.0.0.1:1").connect(
                reactor, "::1", self.echo, Factory.forProtocol(Collect), 10)
        assert caught.value.reply == socks5.ADDRESS_TYPE_NOT_SUPPORTED

    async def test_bind(self):
        port, _ = await socksd(self, self.tmp)
        bound = await parse_upstream(f"socks4://127.0.0.1:{port}").bind(
            reactor, "127.0.0.1", 0, Factory.forProtocol(Collect), 10, 10)
        assert bound.host == "127.0.0.1" and bound.port not in (0, port)
        peer = await within(ClientCreator(reactor, Collect).connectTCP(bound.host, bound.port))
        accepted = await within(bound.accepted)
        assert accepted.port == peer.transport.getHost().port
        accepted.protocol.transport.write(b"hi")
        assert await peer.until(2) == b"hi"
        peer.transport.write(b"there")
        assert await accepted.protocol.until(5) == b"there"
        accepted.protocol.transport.loseConnection()
        await finish(peer)
        [line] = await self.ended("bind")
        assert line["version"] == 4 and line["outcome"] == "ok"


class TLSChain(ChainCase):
    """socks5+tls: socksd's ssl: listener, its certificate from a CA made here."""

    def certificates(self, dns=("localhost",), ips=("127.0.0.1",)):
        ca, ca_cert, ca_key = make_ca(self.tmp)
        crt, key = make_server_cert(self.tmp, ca_cert, ca_key, list(dns), list(ips))
        return ca, f"ssl:0:interface=127.0.0.1:certKey={crt}:privateKey={key}"

    async def test_connect_bind_and_udp_inside_tls(self):
        ca, listen = self.certificates()
        port, _ = await socksd(self, self.tmp, USERPASS, listen=listen)
        for host in ("localhost", "127.0.0.1"):
            upstream = parse_upstream(f"socks5+tls://alice:secret@{host}:{port}?ca={ca}")
            app = await self.echo_through(upstream, half_close=False)
            assert app.transport.getPeer().port == port
        bound = await upstream.bind(reactor, "127.0.0.1", 0, Factory.forProtocol(Collect),
                                    10, 10)
        peer = await within(ClientCreator(reactor, Collect).connectTCP(bound.host, bound.port))
        accepted = await within(bound.accepted)
        peer.transport.write(b"bound")
        assert await accepted.protocol.until(5) == b"bound"
        # Our side closes first: a half-close does not cross Twisted's TLS.
        accepted.protocol.transport.loseConnection()
        await finish(peer)
        arrived: defer.Deferred = defer.Deferred()
        association = await upstream.udp_associate(
            reactor, lambda h, p, data: arrived.callback(data), 10)
        association.send(b"over udp", "127.0.0.1", self.udp_echo)
        assert await within(arrived) == b"OVER UDP"
        association.close()
        await within(association.closed)
        lines = await self.ended("connect", 2)
        assert all(line["user"] == "alice" for line in lines)

    async def test_a_certificate_from_another_ca_is_refused(self):
        _ca, listen = self.certificates()
        other, _, _ = make_ca(self.tmp, "other")
        port, _ = await socksd(self, self.tmp, listen=listen)
        with pytest.raises(UpstreamFailed, match="certificate verify failed"):
            await parse_upstream(f"socks5+tls://localhost:{port}?ca={other}").connect(
                reactor, "127.0.0.1", self.echo, Factory.forProtocol(Collect), 10)
        await self.no_session()

    async def test_a_certificate_for_another_name_is_refused(self):
        ca, listen = self.certificates(dns=("proxy.example",), ips=())
        port, _ = await socksd(self, self.tmp, listen=listen)
        with pytest.raises(UpstreamFailed, match="localhost"):
            await parse_upstream(f"socks5+tls://localhost:{port}?ca={ca}").connect(
                reactor, "127.0.0.1", self.echo, Factory.forProtocol(Collect), 10)
        await self.no_session()

    async def test_the_systems_trust_does_not_know_a_private_ca(self):
        _ca, listen = self.certificates()
        port, _ = await socksd(self, self.tmp, listen=listen)
        with pytest.raises(UpstreamFailed, match="certificate verify failed"):
            await parse_upstream(f"socks5+tls://localhost:{port}").connect(
                reactor, "127.0.0.1", self.echo, Factory.forProtocol(Collect), 10)

    async def no_session(self) -> None:
        await deferLater(0.2)
        assert [e for e in self.sessions.events if e["command"] == "connect"] == []


@pytest.mark.integration
class GSSAPIChain(ChainCase):
    """socks5+gssapi with this process's own credentials: the KDC fixture's
    ccache (KRB5CCNAME, its user's ticket) and socksd's keytab."""

    @pytest.fixture(autouse=True)
    def _kerberos(self, kerberos, monkeypatch) -> None:
        self.kerberos = kerberos
        self.monkeypatch = monkeypatch

    async def test_connect_and_udp_under_confidentiality(self):
        port, _ = await socksd(self, self.tmp, self.kerberos.config())
        upstream = parse_upstream(f"socks5+gssapi://localhost:{port}", "krb")
        assert upstream.gssapi_service == "rcmd@localhost"
        app = await self.echo_through(upstream, data=b"x" * 100_000)
        assert type(app.transport).__name__ == "ProtectionWrapper"
        arrived: defer.Deferred = defer.Deferred()
        association = await upstream.udp_associate(
            reactor, lambda h, p, data: arrived.callback((h, p, data)), 10)
        # Each datagram is one protected frame: the relay would drop a
        # plain one (and then nothing would come back).
        assert association.layer is not None and association.layer.level == 2
        association.send(b"protected", "127.0.0.1", self.udp_echo)
        assert await within(arrived) == ("127.0.0.1", self.udp_echo, b"PROTECTED")
        association.close()
        await within(association.closed)
        [connect] = await self.ended("connect")
        [udp] = await self.ended("udp")
        principal = self.kerberos.user.split("@")[0]
        assert connect["method"] == "gssapi" and connect["user"].startswith(principal)
        assert "datagrams up=1 down=1 dropped=0" in udp["detail"], udp

    async def test_bind_under_protection(self):
        port, _ = await socksd(self, self.tmp, self.kerberos.config())
        bound = await parse_upstream(f"socks5+gssapi://localhost:{port}").bind(
            reactor, "127.0.0.1", 0, Factory.forProtocol(Collect), 10, 10)
        peer = await within(ClientCreator(reactor, Collect).connectTCP(bound.host, bound.port))
        accepted = await within(bound.accepted)
        peer.transport.write(b"knock")
        assert await accepted.protocol.until(5) == b"knock"
        accepted.protocol.transport.write(b"who")
        assert await peer.until(3) == b"who"
        peer.transport.loseConnection()
        await finish(accepted.protocol)

    async def test_credentials_from_a_client_keytab(self):
        """No ticket in any ccache: the process's client keytab
        (KRB5_CLIENT_KTNAME) is its own identity, as a service's would be."""
        realm = self.kerberos.realm
        principal = f"chainer/{realm.hostname}"
        if principal not in ADDED_PRINCIPALS:      # the realm is the session's
            realm.addprinc(principal)
            ADDED_PRINCIPALS.add(principal)
        keytab = self.tmp / "client.keytab"
        realm.extract_keytab(principal, str(keytab))
        self.monkeypatch.setenv("KRB5_CLIENT_KTNAME", f"FILE:{keytab}")
        self.monkeypatch.setenv("KRB5CCNAME", f"FILE:{self.tmp / 'fresh-ccache'}")
        port, _ = await socksd(self, self.tmp, self.kerberos.config())
        await self.echo_through(parse_upstream(f"socks5+gssapi://localhost:{port}"))
        [line] = await self.ended("connect")
        assert line["method"] == "gssapi"
        # (socksd names a principal of its own realm without the realm)
        assert line["user"] == principal, line

    async def test_a_service_the_kdc_does_not_know(self):
        port, _ = await socksd(self, self.tmp, self.kerberos.config())
        with pytest.raises(UpstreamFailed, match=r"upstream krb: GSS-API: .*"):
            await parse_upstream(f"socks5+gssapi://localhost:{port}?service=nosuch",
                                 "krb").connect(reactor, "127.0.0.1", self.echo,
                                                Factory.forProtocol(Collect), 10)
