"""GSS-API interop with an independent peer: Dante's SOCKS client library
(libdsocksd 1.4, Debian's own ``dante`` source rebuilt with GSS-API by
dante_gssapi.py) negotiates RFC 1961 with a real `twistd -n socks` and a real
MIT KDC, then carries real programs' traffic (curl, a Python echo client)
inside integrity and confidentiality encapsulation."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import dante_gssapi
from conftest import PAGE, require

pytestmark = pytest.mark.integration

LEVELS = {"integrity": 1, "confidentiality": 2}


class Socksified:
    """A program run under Dante's socksify, with Dante's own log."""

    def __init__(self, result: subprocess.CompletedProcess, log: Path) -> None:
        self.returncode = result.returncode
        self.stdout = result.stdout
        self.stderr = result.stderr.decode(errors="replace")
        self.log = log.read_text(errors="replace") if log.exists() else ""


def socksify(dante, kerberos, tmp_path: Path, port: int, enctype: str | None,
             *program: str, timeout: float = 30, udp: bool = False,
             stdin: bytes | None = None) -> Socksified:
    """Run ``program`` with every TCP connection (with ``udp``: every UDP
    socket, by UDP ASSOCIATE) routed through socksd at 127.0.0.1:``port``
    (Dante 1.4 client syntax, socks.conf(5)): SOCKS v5, GSS-API only,
    service ``rcmd`` at the name of 127.0.0.1 (localhost), and
    ``gssapi.enctype`` if given (else Dante's default: ask for
    confidentiality, accept integrity). The Kerberos client env (KRB5_CONFIG,
    KRB5CCNAME with the realm user's ticket) goes to the program."""
    log = tmp_path / "dante-client.log"
    conf = tmp_path / "socks.conf"
    conf.write_text("\n".join([
        f"logoutput: {log}",
        "route {",
        f"  from: 0.0.0.0/0 to: 0.0.0.0/0 via: 127.0.0.1 port = {port}",
        f"  protocol: {'udp' if udp else 'tcp'}",
        f"  command: {'udpassociate' if udp else 'connect'}",
        "  proxyprotocol: socks_v5",
        "  method: gssapi",
        "  gssapi.servicename: rcmd",
        *([f"  gssapi.enctype: {enctype}"] if enctype else []),
        "}",
    ]) + "\n")
    result = subprocess.run([str(dante.socksify), *program],
                            env=dante.env(conf, extra=kerberos.env, log=log),
                            capture_output=True, timeout=timeout, input=stdin)
    return Socksified(result, log)


def curl(dante, kerberos, tmp_path, server, enctype, http_port) -> Socksified:
    return socksify(dante, kerberos, tmp_path, server.port, enctype, require("curl"), "-sS",
                    "--noproxy", "*", "--max-time", "20", f"http://127.0.0.1:{http_port}/")


def details(run: Socksified, server) -> str:
    return f"client stderr:\n{run.stderr}\nDante log:\n{run.log}\nsocksd log:\n{server.log()}"


@pytest.mark.parametrize("level", ["integrity", "confidentiality"])
def test_curl_fetches_a_page_through_dante(kerberos, socks_server, http_server,
                                           tmp_path, level):
    dante = dante_gssapi.ensure()    # a failed build FAILS here, with its log
    server = socks_server(kerberos.config(levels=[level]), env=kerberos.env)
    run = curl(dante, kerberos, tmp_path, server, level, http_server)
    assert run.returncode == 0, details(run, server)
    assert run.stdout == PAGE, details(run, server)
    # Each peer logs the level: Dante the one it uses, socksd the one it answered.
    assert re.search(rf"using gssapi {level} protection \({LEVELS[level]}\)", run.log), \
        details(run, server)
    server.wait_for_log(rf"gssapi: {re.escape(kerberos.user)} as user, "
                        rf"protection {LEVELS[level]}\n")
    server.wait_for_log(rf"socks5 user=user method=gssapi connect 127\.0\.0\.1:{http_server} "
                        r"up=\d+ down=\d+ \S+ ok")


@pytest.mark.parametrize("level", ["integrity", "confidentiality"])
def test_udp_through_dante(kerberos, socks_server, tmp_path, level):
    """Dante's client asks for neither replay nor sequence detection (it
    cannot for datagrams, which are lost and reordered): its UDP ASSOCIATE
    is served at socksd's default, each datagram one protected frame. socat
    sends a line to a UDP echo and prints the answer."""
    dante = dante_gssapi.ensure()
    server = socks_server(kerberos.config(levels=[level]), env=kerberos.env)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as echo:
        echo.bind(("127.0.0.1", 0))
        echo.settimeout(0.2)
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    data, source = echo.recvfrom(65535)
                except socket.timeout:
                    continue
                echo.sendto(data.upper(), source)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            # -t: after stdin's EOF, wait this long for the answer.
            run = socksify(dante, kerberos, tmp_path, server.port, level, require("socat"),
                           "-t", "5", "-", f"UDP:127.0.0.1:{echo.getsockname()[1]}",
                           udp=True, stdin=b"datagram through dante\n")
        finally:
            stop.set()
            thread.join(5)
    assert run.returncode == 0, details(run, server)
    assert run.stdout == b"DATAGRAM THROUGH DANTE\n", details(run, server)
    assert re.search(rf"using gssapi {level} protection \({LEVELS[level]}\)", run.log), \
        details(run, server)
    line = server.wait_for_log(r"socks5 user=user method=gssapi udp .*").group(0)
    assert "datagrams up=1 down=1 dropped=0" in line, line
    assert "auth failed" not in server.log()


def test_defaults_agree_on_confidentiality(kerberos, socks_server, http_server,
                                           tmp_path):
    """Dante's default (asks for confidentiality, would accept integrity)
    against socksd's default (both levels)."""
    dante = dante_gssapi.ensure()
    server = socks_server(kerberos.config(), env=kerberos.env)
    run = curl(dante, kerberos, tmp_path, server, None, http_server)
    assert run.returncode == 0 and run.stdout == PAGE, details(run, server)
    server.wait_for_log(r"gssapi: \S+ as user, protection 2\n")
    server.wait_for_log(r"user=user method=gssapi connect .* ok")


# One thread at a time on the socket: Dante's client marks a socket "in a
# native call" (syscalldepth, per socket, not per thread) while one thread
# sits in recv(), and a send() from another thread meanwhile bypasses the
# GSS-API layer and goes out as plaintext (seen on the wire; socksd rightly
# drops the session). So the client below alternates send and receive.
ECHO_CLIENT = r"""
import socket, sys
port = int(sys.argv[1])
sizes = [1, 2, 100, 1400, 7000, 16384, 65535, 65536, 65537, 200000, 654321]
total = 0
s = socket.create_connection(("127.0.0.1", port))
for n, size in enumerate(sizes):
    data = bytes((i * 7919 + n) % 256 for i in range(size))
    s.sendall(data)
    back = bytearray()
    while len(back) < size:
        chunk = s.recv(size - len(back))
        assert chunk, f"EOF after {total + len(back)} bytes"
        back += chunk
    assert back == data, f"echo of {size} bytes differs"
    total += size
s.shutdown(socket.SHUT_WR)
assert s.recv(1) == b"", "data after the echo"
print(total)
"""
ECHO_TOTAL = sum([1, 2, 100, 1400, 7000, 16384, 65535, 65536, 65537, 200000, 654321])


@pytest.mark.parametrize("level", ["integrity", "confidentiality"])
def test_bulk_echo_both_ways_through_dante(kerberos, socks_server, echo_server,
                                           tmp_path, level):
    """About 1 MiB each way in writes from 1 byte to 640 KiB: Dante cuts its
    writes into RFC 1961 frames, socksd cuts the echo into its own."""
    dante = dante_gssapi.ensure()
    server = socks_server(kerberos.config(levels=[level]), env=kerberos.env)
    run = socksify(dante, kerberos, tmp_path, server.port, level, sys.executable, "-c",
                   ECHO_CLIENT, str(echo_server))
    assert run.returncode == 0, details(run, server)
    assert run.stdout.split() == [str(ECHO_TOTAL).encode()], details(run, server)
    server.wait_for_log(rf"protection {LEVELS[level]}\n")
    server.wait_for_log(rf"method=gssapi connect 127\.0\.0\.1:{echo_server} "
                        rf"up={ECHO_TOTAL} down={ECHO_TOTAL} \S+ ok")


def test_level_below_the_request_is_refused(kerberos, socks_server, http_server,
                                            tmp_path):
    """socksd never answers below the level asked for (Dante's own server
    refuses likewise); a server allowing only integrity refuses Dante's
    default request for confidentiality, with RFC 1961's abort message."""
    dante = dante_gssapi.ensure()
    server = socks_server(kerberos.config(levels=["integrity"]), env=kerberos.env)
    run = curl(dante, kerberos, tmp_path, server, None, http_server)
    assert run.returncode != 0 and run.stdout == b"", details(run, server)
    server.wait_for_log(r"auth failed: protection level 2 not accepted")
    # The abort is 2 octets, 01 ff (RFC 1961 3.8); Dante reads a 4-octet
    # header there, so it reports a short read rather than "rejected".
    assert re.search(r"read of response from proxy server failed, read 2/4", run.log), \
        details(run, server)
    assert " ok\n" not in server.log()


def test_client_ignoring_the_agreed_level_is_cut_off(kerberos, socks_server,
                                                     http_server, tmp_path):
    """socksd answers a request for integrity with confidentiality when that
    is all it allows (RFC 1961 4.3: the server returns the level it agrees
    to). Dante 1.4, configured for integrity only, should then close (RFC
    1961 4.4); it goes on with integrity-only frames instead. Either way no
    data may pass: socksd drops the session on the first unencrypted frame."""
    dante = dante_gssapi.ensure()
    server = socks_server(kerberos.config(levels=["confidentiality"]), env=kerberos.env)
    run = curl(dante, kerberos, tmp_path, server, "integrity", http_server)
    assert run.returncode != 0 and run.stdout == b"", details(run, server)
    server.wait_for_log(r"protection 2\n")
    server.wait_for_log(r"user=user method=gssapi .* up=0 down=0 ")
    assert " ok\n" not in server.log()
