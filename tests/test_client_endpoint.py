"""socksd.client.SOCKS5ClientEndpoint against a real `twistd socks`: no
authentication, username/password, and GSS-API at every level and in NEC
mode, through a real KDC; and in memory, against a proxy played by hand,
what its GSS-API protection does with a reply read along with the
protection answer, and with a frame it refuses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import gssapi
import pytest
from twisted.internet import defer, error
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from conftest import PAGE
from socksd import protection
from socksd.client import SOCKS5ClientEndpoint, SOCKSError
from socksd.wire import rfc1961, socks5

SCRIPT = str(Path(__file__).with_name("client_fetch.py"))


def fetch(server, http_port: int, env: dict | None = None, **options) -> dict:
    options.update(proxy_port=server.port, host="127.0.0.1", port=http_port)
    full_env = dict(os.environ, **(env or {}))
    out = subprocess.run([sys.executable, SCRIPT, json.dumps(options)], capture_output=True,
                         text=True, timeout=60, env=full_env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def page_ok(result: dict) -> None:
    assert "error" not in result, result
    assert result["tail"].encode("latin-1") == PAGE[-64:]


@pytest.mark.integration
def test_no_authentication(socks_server, http_server):
    page_ok(fetch(socks_server(), http_server))


@pytest.mark.integration
def test_username_password(socks_server, http_server):
    server = socks_server('[server]\nmethods = ["userpass"]\ncheckers = ["memory:alice:secret"]\n')
    page_ok(fetch(server, http_server, username="alice", password="secret"))
    refused = fetch(server, http_server, username="alice", password="wrong")
    assert refused["error"].startswith("SOCKSError: username/password refused")


@pytest.mark.integration
@pytest.mark.parametrize("level", [1, 2])
def test_gssapi_levels(kerberos, socks_server, http_server, level):
    server = socks_server(kerberos.config(), env=kerberos.env)
    page_ok(fetch(server, http_server, env=kerberos.env, gssapi_service="rcmd@localhost",
                  gssapi_level=level))
    server.wait_for_log(rf"gssapi: user@\S+ as user, protection {level}")


@pytest.mark.integration
def test_gssapi_clear_only_when_allowed(kerberos, socks_server, http_server):
    allowed = socks_server(kerberos.config(levels=("clear", "integrity")), env=kerberos.env)
    page_ok(fetch(allowed, http_server, env=kerberos.env, gssapi_service="rcmd@localhost",
                  gssapi_level=0))
    allowed.wait_for_log(r"protection 0")
    # Without "clear" the server grants the closest stronger level instead.
    stronger = socks_server(kerberos.config(levels=("integrity",)), env=kerberos.env)
    page_ok(fetch(stronger, http_server, env=kerberos.env, gssapi_service="rcmd@localhost",
                  gssapi_level=0))
    stronger.wait_for_log(r"protection 1")


@pytest.mark.integration
def test_gssapi_nec_mode(kerberos, socks_server, http_server):
    server = socks_server(kerberos.config(extra="nec_compat = true\n"), env=kerberos.env)
    page_ok(fetch(server, http_server, env=kerberos.env, gssapi_service="rcmd@localhost",
                  gssapi_level=2, nec=True))
    server.wait_for_log(r"protection 2")


@pytest.mark.integration
def test_gssapi_refused_level_is_an_error(kerberos, socks_server, http_server):
    server = socks_server(kerberos.config(levels=("integrity",)), env=kerberos.env)
    result = fetch(server, http_server, env=kerberos.env, gssapi_service="rcmd@localhost",
                   gssapi_level=2)
    assert "error" in result and "SOCKSError" in result["error"], result


def test_a_proxy_that_never_answers_times_out(http_server):
    """Every wait has a timeout: the handshake too, on the client side."""
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        class Proxy:
            port = silent.getsockname()[1]

        started = time.monotonic()
        result = fetch(Proxy, http_server, timeout=0.5)
        assert result["error"].startswith("SOCKSError: no SOCKS answer from the proxy in 0.5 s")
        assert time.monotonic() - started < 30
    finally:
        silent.close()


# In memory: the proxy's side played by hand with a real acceptor context.


class HandPlayedProxy:
    """An endpoint whose one connection is a StringTransport that delivers
    to ``transport.protocol``, as a socket does."""

    def connect(self, factory):
        self.transport = StringTransport()
        self.transport.protocol = factory.buildProtocol(self.transport.getPeer())
        self.transport.protocol.makeConnection(self.transport)
        return defer.succeed(self.transport.protocol)

    def receive(self, data: bytes) -> None:
        self.transport.protocol.dataReceived(data)

    def take(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value


class App(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def frame(mtyp: int, token: bytes) -> bytes:
    return bytes((1, mtyp)) + len(token).to_bytes(2, "big") + token


def protected_client(kerberos, level: int = 2):
    """The client past method selection and context establishment, its
    protection level asked: (proxy, connect()'s deferred, the acceptor)."""
    proxy = HandPlayedProxy()
    endpoint = SOCKS5ClientEndpoint("example.com", 80, proxy,
                                    gssapi_service=f"rcmd@{kerberos.realm.hostname}",
                                    gssapi_level=level)
    d = endpoint.connect(Factory.forProtocol(App))
    assert proxy.take() == b"\x05\x02\x01\x00"
    proxy.receive(b"\x05\x01")
    credentials = gssapi.Credentials(
        name=gssapi.Name(kerberos.service_principal, gssapi.NameType.kerberos_principal),
        usage="accept", store={"keytab": kerberos.keytab})
    acceptor = gssapi.SecurityContext(creds=credentials, usage="accept")
    [(mtyp, token)] = _frames(proxy.take())
    assert mtyp == rfc1961.CONTEXT
    proxy.receive(frame(rfc1961.CONTEXT, acceptor.step(token)))
    [(mtyp, token)] = _frames(proxy.take())
    assert mtyp == rfc1961.PROTECTION and acceptor.unwrap(token).message == bytes((level,))
    return proxy, d, acceptor


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    while data:
        length = int.from_bytes(data[2:4], "big")
        out.append((data[1], data[4:4 + length]))
        data = data[4 + length:]
    return out


@pytest.mark.integration
def test_reply_read_with_the_protection_answer(kerberos):
    """Answer, reply and the first data in one read: the part after the
    answer goes in beneath the new layer, and arrives unwrapped."""
    proxy, d, acceptor = protected_client(kerberos)
    layer = protection.SecurityLayer(acceptor, 2)
    proxy.receive(frame(rfc1961.PROTECTION, acceptor.wrap(b"\x02", False).message)
                  + layer.encode(socks5.encode_reply(socks5.SUCCEEDED, "10.0.0.5", 51000))
                  + layer.encode(b"hello"))
    app = d.result
    assert app.received == b"hello"
    assert layer.decode(proxy.take()) == socks5.encode_request(socks5.CONNECT, "example.com", 80)
    assert isinstance(app.transport, protection.ProtectionWrapper)
    app.transport.write(b"GET /")
    raw = proxy.take()
    assert b"GET" not in raw and layer.decode(raw) == b"GET /"


@pytest.mark.integration
def test_a_refused_frame_fails_the_connect_with_its_reason(kerberos):
    proxy, d, acceptor = protected_client(kerberos)
    proxy.receive(frame(rfc1961.PROTECTION, acceptor.wrap(b"\x02", False).message))
    proxy.take()                                # the wrapped request
    proxy.receive(socks5.encode_reply(socks5.SUCCEEDED))     # not wrapped
    assert proxy.transport.disconnected         # aborted
    assert not d.called
    proxy.transport.protocol.connectionLost(Failure(error.ConnectionAborted()))
    failure = d.result
    d.addErrback(lambda _f: None)
    assert failure.check(SOCKSError)
    assert str(failure.value) == "GSS-API frame: version 5"
