"""GSS-API with bad Kerberos tickets, through a real `twistd -n socks` and
the real KDC (the `kerberos` fixture): an expired ticket, no ticket at all,
and a ticket for a service socksd holds no key for.

Each must fail cleanly: the client learns why; socksd, when it gets a token
at all, answers 01 FF (RFC 1961 section 3.8) and logs one line with the
reason; it keeps serving; and nothing anywhere logs a traceback.

An expired ticket never reaches socksd from an MIT client: the library
checks the ticket's end time (with no clock-skew allowance) before it builds
a token, so the client fails after method selection, before sending any
RFC 1961 message. (An acceptor allows ``clockskew``, 300 s, past the end
time, so a token made just before expiry and sent later would be accepted:
that is Kerberos, not socksd.)
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import gssapi
import pytest

from conftest import require
from helpers import wait_until

pytestmark = pytest.mark.integration

Flags = gssapi.RequirementFlag
CLIENT_FLAGS = (Flags.mutual_authentication | Flags.replay_detection
                | Flags.out_of_sequence_detection | Flags.integrity | Flags.confidentiality)
ABORT = b"\x01\xff"
FETCH = str(Path(__file__).with_name("client_fetch.py"))


def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = s.recv(n - len(data))
        assert chunk, f"closed after {bytes(data)!r}"
        data += chunk
    return bytes(data)


def _recv_to_eof(s: socket.socket, limit: int = 1 << 20) -> bytes:
    data = bytearray()
    while len(data) < limit:
        chunk = s.recv(65536)
        if not chunk:
            return bytes(data)
        data += chunk
    raise AssertionError(f"more than {limit} bytes and no EOF")


def _frame(mtyp: int, token: bytes) -> bytes:
    return struct.pack("!BBH", 1, mtyp, len(token)) + token


def _context(service: str) -> gssapi.SecurityContext:
    return gssapi.SecurityContext(
        name=gssapi.Name(service, gssapi.NameType.hostbased_service),
        usage="initiate", flags=CLIENT_FLAGS)


def _service(kerberos) -> str:
    return f"rcmd@{kerberos.realm.hostname}"


def _no_traceback(server) -> None:
    log = server.log()
    assert "Traceback" not in log, log
    assert "Unhandled Error" not in log, log


def _still_serves(server, kerberos, echo_port: int) -> None:
    """A whole GSS-API session at level 2 with the user's good ticket."""
    assert server.process.poll() is None, "twistd exited"
    with socket.create_connection(server.address, timeout=10) as s:
        s.sendall(b"\x05\x01\x01")
        assert _recv_exact(s, 2) == b"\x05\x01"
        ctx = _context(_service(kerberos))
        token = ctx.step()
        while True:
            if token:
                s.sendall(_frame(1, token))
            if ctx.complete:
                break
            head = _recv_exact(s, 4)
            assert head[:2] == b"\x01\x01", head
            token = ctx.step(_recv_exact(s, struct.unpack("!H", head[2:])[0]))
        s.sendall(_frame(2, ctx.wrap(b"\x02", False).message))
        head = _recv_exact(s, 4)
        assert head[:2] == b"\x01\x02", head
        assert ctx.unwrap(_recv_exact(s, struct.unpack("!H", head[2:])[0])).message == b"\x02"

        def send(data: bytes) -> None:
            s.sendall(_frame(3, ctx.wrap(data, True).message))

        def receive() -> bytes:
            head = _recv_exact(s, 4)
            assert head[:2] == b"\x01\x03", head
            return ctx.unwrap(_recv_exact(s, struct.unpack("!H", head[2:])[0])).message

        send(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", echo_port))
        reply = receive()
        assert reply[:2] == b"\x05\x00", reply
        send(b"still serving")
        echoed = b""
        while len(echoed) < len(b"still serving"):
            echoed += receive()
        assert echoed == b"still serving"
    server.wait_for_log(r"socks5 user=user method=gssapi connect 127\.0\.0\.1:\d+ .* ok")


def _client_gives_up_after_method_selection(server, service: str, expected_error: str) -> None:
    """The client offers GSS-API, is told 01, and its library refuses to make
    a token: nothing is sent, the client closes."""
    with socket.create_connection(server.address, timeout=10) as s:
        s.sendall(b"\x05\x01\x01")
        assert _recv_exact(s, 2) == b"\x05\x01"
        with pytest.raises(gssapi.exceptions.GSSError) as info:
            _context(service).step()
        assert re.search(expected_error, str(info.value), re.I), str(info.value)
    # socksd ends the session with its one log line, cleanly.
    server.wait_for_log(r"socks5 user=- method=\S+ - - up=0 down=0 \S+ client closed: "
                        r"during handshake")


@pytest.fixture(scope="module")
def expired_ccache(kerberos, tmp_path_factory):
    """A ccache whose TGT and rcmd/<host> service ticket have both expired:
    `kinit -l 5s` with the user's password, `kvno`, then wait them out."""
    path = tmp_path_factory.mktemp("expired") / "ccache"
    ccache = f"FILE:{path}"
    env = {**os.environ, **kerberos.env, "KRB5CCNAME": ccache}
    kinit = subprocess.run([require("kinit"), "-l", "5s", kerberos.user],
                           input=kerberos.realm.password("user") + "\n", env=env,
                           capture_output=True, text=True, timeout=30)
    assert kinit.returncode == 0, kinit.stdout + kinit.stderr
    kvno = subprocess.run([require("kvno"), f"rcmd/{kerberos.realm.hostname}"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert kvno.returncode == 0, kvno.stdout + kvno.stderr
    listing = subprocess.run([require("klist"), ccache], env=env, capture_output=True,
                             text=True, timeout=30).stdout
    assert f"rcmd/{kerberos.realm.hostname}@" in listing, listing
    # klist -s fails once no ticket is valid any more (end time <= now).
    wait_until(lambda: subprocess.run([require("klist"), "-s", ccache], env=env,
                                      timeout=30).returncode != 0,
               30, "the 5 s tickets to expire", interval=0.2)
    time.sleep(1.1)  # strictly past the end time, as the GSS library checks it
    return ccache


# ---- (a) an expired service ticket -------------------------------------------------

def test_expired_ticket_fails_on_the_client_and_socksd_ends_cleanly(
        kerberos, socks_server, echo_server, expired_ccache, monkeypatch):
    server = socks_server(kerberos.config(), env=kerberos.env)
    with monkeypatch.context() as m:
        m.setenv("KRB5CCNAME", expired_ccache)
        _client_gives_up_after_method_selection(server, _service(kerberos), r"expired")
    _still_serves(server, kerberos, echo_server)
    _no_traceback(server)


# ---- (b) no ticket at all --------------------------------------------------------------

def test_no_ticket_fails_on_the_client_and_socksd_ends_cleanly(
        kerberos, socks_server, echo_server, tmp_path, monkeypatch):
    server = socks_server(kerberos.config(), env=kerberos.env)
    with monkeypatch.context() as m:
        m.setenv("KRB5CCNAME", f"FILE:{tmp_path / 'no-such-ccache'}")
        _client_gives_up_after_method_selection(server, _service(kerberos),
                                                r"No Kerberos credentials")
    _still_serves(server, kerberos, echo_server)
    _no_traceback(server)


# ---- (c) a ticket for a service socksd has no key for -----------------------------------

def test_ticket_for_the_wrong_service_gets_abort_and_a_logged_reason(
        kerberos, socks_server, echo_server):
    server = socks_server(kerberos.config(), env=kerberos.env)
    realm = kerberos.realm
    with socket.create_connection(server.address, timeout=10) as s:
        s.sendall(b"\x05\x01\x01")
        assert _recv_exact(s, 2) == b"\x05\x01"
        # The KDC knows host/<host> (k5test made it), socksd's keytab does not.
        ctx = _context(f"host@{realm.hostname}")
        token = ctx.step()
        assert token and not ctx.complete
        s.sendall(_frame(1, token))
        answer = _recv_to_eof(s)
    # socksd may first hand back the error token its GSS-API library made
    # (a KRB-ERROR: it tells the client why); it must end with 01 FF and close.
    assert answer.endswith(ABORT), answer
    rest = answer[:-len(ABORT)]
    while rest:
        assert rest[:2] == b"\x01\x01" and len(rest) >= 4, answer
        end = 4 + struct.unpack("!H", rest[2:4])[0]
        assert len(rest) >= end, answer
        with pytest.raises(gssapi.exceptions.GSSError):
            ctx.step(rest[4:end])   # the client's library reports the KDC error
        rest = rest[end:]
    server.wait_for_log(
        r"socks5 user=- method=gssapi - - up=0 down=\d+ \S+ auth failed: GSS-API: .*"
        + re.escape(f"host/{realm.hostname}@{realm.realm}"))
    _still_serves(server, kerberos, echo_server)
    _no_traceback(server)


# ---- the same three through socksd.client's endpoint (its own process) ------------------

@pytest.mark.parametrize("case", ["expired", "no ticket", "wrong service"])
def test_client_endpoint_fails_cleanly(kerberos, socks_server, echo_server, expired_ccache,
                                       tmp_path, case):
    """SOCKS5ClientEndpoint's Deferred fails with the reason, and the client
    process logs no traceback (no 'Unhandled Error')."""
    server = socks_server(kerberos.config(), env=kerberos.env)
    env = dict(os.environ, **kerberos.env)
    service, expected = _service(kerberos), None
    if case == "expired":
        env["KRB5CCNAME"], expected = expired_ccache, r"expired"
    elif case == "no ticket":
        env["KRB5CCNAME"] = f"FILE:{tmp_path / 'no-such-ccache'}"
        expected = r"No Kerberos credentials"
    else:
        service = f"host@{kerberos.realm.hostname}"
    options = dict(proxy_port=server.port, host="127.0.0.1", port=echo_server,
                   gssapi_service=service, gssapi_level=2)
    out = subprocess.run([sys.executable, FETCH, json.dumps(options)], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "error" in result, result
    if expected:
        assert re.search(expected, result["error"], re.I), result
    assert "Traceback" not in out.stderr and "Unhandled Error" not in out.stderr, out.stderr
    if case == "wrong service":
        server.wait_for_log(r"auth failed: GSS-API: .*"
                            + re.escape(f"host/{kerberos.realm.hostname}@"))
    else:
        server.wait_for_log(r"client closed: during handshake")
    _still_serves(server, kerberos, echo_server)
    _no_traceback(server)
