"""socksd.client.SOCKS5ClientEndpoint against a real `twistd socks`: no
authentication, username/password, and GSS-API at every level and in NEC
mode, through a real KDC."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PAGE

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
