"""GSS-API (RFC 1961) through a real `twistd -n socks`, a real MIT KDC
(the `kerberos` fixture) and real clients: python-gssapi driven over a
socket, and Debian's curl."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import socketserver
import struct
import subprocess
import threading

import gssapi
import pytest

from conftest import PAGE, require, run_socks

pytestmark = pytest.mark.integration

Flags = gssapi.RequirementFlag
CLIENT_FLAGS = (Flags.mutual_authentication | Flags.replay_detection
                | Flags.out_of_sequence_detection | Flags.integrity | Flags.confidentiality)
MIB = 1 << 20


def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = s.recv(n - len(data))
        assert chunk, f"closed after {bytes(data)!r}"
        data += chunk
    return bytes(data)


class GSSClient:
    """An RFC 1961 client over a blocking socket; ``wire`` keeps every byte
    received from the proxy after the protection-level negotiation."""

    def __init__(self, address, kerberos) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.kerberos = kerberos
        self.level: int | None = None
        self.wire = bytearray()

    def close(self) -> None:
        self.sock.close()

    def frame(self) -> tuple[int, bytes]:
        head = _recv_exact(self.sock, 4)
        assert head[0] == 1 and head[1] != 0xFF, head
        return head[1], _recv_exact(self.sock, struct.unpack("!H", head[2:])[0])

    def send_frame(self, mtyp: int, token: bytes) -> None:
        self.sock.sendall(struct.pack("!BBH", 1, mtyp, len(token)) + token)

    def authenticate(self, level: int) -> int:
        s = self.sock
        s.sendall(b"\x05\x01\x01")
        assert _recv_exact(s, 2) == b"\x05\x01"
        name = gssapi.Name(f"rcmd@{self.kerberos.realm.hostname}",
                           gssapi.NameType.hostbased_service)
        self.ctx = ctx = gssapi.SecurityContext(name=name, usage="initiate", flags=CLIENT_FLAGS)
        token = ctx.step()
        while True:
            self.send_frame(1, token)
            if ctx.complete:
                break
            mtyp, answer = self.frame()
            assert mtyp == 1
            token = ctx.step(answer)
            if ctx.complete and not token:
                break
        assert ctx.complete
        self.send_frame(2, ctx.wrap(bytes((level,)), False).message)
        mtyp, answer = self.frame()
        assert mtyp == 2
        granted = ctx.unwrap(answer).message
        assert len(granted) == 1
        self.level = granted[0]
        return self.level

    # After negotiation: plain at level 0, MTYP 3 frames at levels 1 and 2.

    def send(self, data: bytes) -> None:
        if self.level == 0:
            self.sock.sendall(data)
            return
        conf = self.level == 2
        limit = self.ctx.get_wrap_size_limit(65535, conf)
        self.sock.sendall(b"".join(
            struct.pack("!BBH", 1, 3, len(token)) + token
            for token in (self.ctx.wrap(data[i:i + limit], conf).message
                          for i in range(0, len(data), limit))))

    def receive(self) -> bytes:
        """The next plaintext chunk; b"" at EOF."""
        if self.level == 0:
            data = self.sock.recv(65536)
            self.wire += data
            return data
        head = b""
        while len(head) < 4:
            chunk = self.sock.recv(4 - len(head))
            if not chunk:
                assert head == b"", f"EOF inside a frame head {head!r}"
                return b""
            head += chunk
        assert head[:2] == b"\x01\x03", head
        token = _recv_exact(self.sock, struct.unpack("!H", head[2:])[0])
        self.wire += head + token
        result = self.ctx.unwrap(token)
        assert result.encrypted == (self.level == 2)
        return result.message

    def receive_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.receive()
            assert chunk, f"EOF after {len(data)} of {n} bytes"
            data += chunk
        assert len(data) == n, (len(data), n)
        return data

    def connect(self, port: int, host: str = "127.0.0.1") -> bytes:
        self.send(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port))
        reply = self.receive_exact(10)
        assert reply[:4] == b"\x05\x00\x00\x01", reply
        return reply

    def fetch(self, port: int, path: str = "/") -> bytes:
        """HTTP/1.0 GET through the proxy; the whole response, to EOF."""
        self.connect(port)
        self.send(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        response = b""
        while True:
            chunk = self.receive()
            if not chunk:
                return response
            response += chunk


# Servers on the far side.


class _BlobHandler(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(self.server.blob)
        self.request.shutdown(socket.SHUT_WR)
        self.request.recv(1)


class _BlobServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def blob_server():
    """A TCP server that sends 1 MiB of random bytes and half-closes."""
    server = _BlobServer(("127.0.0.1", 0), _BlobHandler)
    server.blob = os.urandom(MIB)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# Protected sessions end to end.


@pytest.mark.parametrize("level", [1, 2])
def test_fetch_page_at_level(kerberos, socks_server, http_server, level):
    server = socks_server(kerberos.config(), env=kerberos.env)
    client = GSSClient(server.address, kerberos)
    try:
        assert client.authenticate(level) == level
        response = client.fetch(http_server)
    finally:
        client.close()
    assert response.startswith(b"HTTP/1.0 200")
    assert response.endswith(PAGE)
    # What crossed the wire: at level 2 the page is nowhere in it; at level 1
    # (integrity only) it travels in the clear inside the tokens.
    if level == 2:
        assert b"socksd test page" not in client.wire
    else:
        assert b"socksd test page" in client.wire
    line = server.wait_for_log(r".*socks5 user=user method=gssapi connect "
                               rf"127\.0\.0\.1:{http_server} .* ok").group(0)
    assert "[splice]" not in line
    server.wait_for_log(rf"gssapi: {kerberos.user} as user, protection {level}")


def test_a_principal_of_another_realm_keeps_it_for_the_rules(kerberos, socks_server,
                                                             http_server):
    """strip-realm strips only local_realms (by default krb5's default
    realm): user@KRBTEST.COM, KRBTEST.COM not listed, is not the "user" a
    rule names, as alice@EVIL.EXAMPLE is not our alice."""
    rule = ('[[rules]]\naction = "allow"\nfrom = ["127.0.0.0/8"]\nusers = ["user"]\n')
    config = kerberos.config(extra='local_realms = ["CORP.EXAMPLE"]\n') + rule
    server = socks_server(config, env=kerberos.env)
    client = GSSClient(server.address, kerberos)
    try:
        assert client.authenticate(2) == 2
        client.send(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                    + struct.pack("!H", http_server))
        assert client.receive_exact(10)[:2] == b"\x05\x02"     # not allowed by ruleset
    finally:
        client.close()
    server.wait_for_log(rf"gssapi: {kerberos.user} as {kerberos.user}, protection 2")
    server.wait_for_log(rf"socks5 user={kerberos.user} method=gssapi connect .*denied")

    # The default realm is local: the same client is "user" and allowed.
    server = socks_server(kerberos.config() + rule, env=kerberos.env)
    client = GSSClient(server.address, kerberos)
    try:
        assert client.authenticate(2) == 2
        assert client.fetch(http_server).endswith(PAGE)
    finally:
        client.close()
    server.wait_for_log(rf"gssapi: {kerberos.user} as user, protection 2")


@pytest.mark.parametrize("level", [1, 2])
def test_one_mib_download_hashed_end_to_end(kerberos, socks_server, blob_server, level):
    server = socks_server(kerberos.config(), env=kerberos.env)
    client = GSSClient(server.address, kerberos)
    try:
        assert client.authenticate(level) == level
        client.connect(blob_server.server_address[1])
        digest = hashlib.sha256()
        size = 0
        while True:
            chunk = client.receive()
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    finally:
        client.close()
    assert size == MIB
    assert digest.hexdigest() == hashlib.sha256(blob_server.blob).hexdigest()
    # No token over the RFC 1961 limit (the client parsed every frame head).
    assert len(client.wire) > MIB
    server.wait_for_log(rf"socks5 user=user method=gssapi connect .* up=0 down={MIB} .* ok")


@pytest.mark.parametrize("level", [1, 2])
def test_one_mib_echo_round_trip(kerberos, socks_server, echo_server, level):
    server = socks_server(kerberos.config(), env=kerberos.env)
    client = GSSClient(server.address, kerberos)
    payload = os.urandom(MIB)
    try:
        assert client.authenticate(level) == level
        client.connect(echo_server)
        sender = threading.Thread(target=client.send, args=(payload,))
        sender.start()
        echoed = client.receive_exact(MIB)
        sender.join(10)
        client.sock.shutdown(socket.SHUT_WR)
        # The echo server half-closes after our EOF: that reaches us too.
        assert client.receive() == b""
    finally:
        client.close()
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    server.wait_for_log(rf"up={MIB} down={MIB} .* ok")


def test_clear_level_session_has_no_encapsulation(kerberos, socks_server, http_server):
    server = socks_server(kerberos.config(levels=("clear", "integrity", "confidentiality")),
                          env=kerberos.env)
    client = GSSClient(server.address, kerberos)
    try:
        assert client.authenticate(0) == 0
        # Plain SOCKS5 from here on.
        client.sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                            + struct.pack("!H", http_server))
        assert _recv_exact(client.sock, 4) == b"\x05\x00\x00\x01"
        _recv_exact(client.sock, 6)
        client.sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        response = b""
        while chunk := client.sock.recv(65536):
            response += chunk
    finally:
        client.close()
    assert response.startswith(b"HTTP/1.0 200") and response.endswith(PAGE)
    server.wait_for_log(r"socks5 user=user method=gssapi connect .* ok")
    server.wait_for_log(r"protection 0")


def test_level_zero_without_clear_gets_integrity(kerberos, socks_server, http_server):
    server = socks_server(kerberos.config(), env=kerberos.env)
    client = GSSClient(server.address, kerberos)
    try:
        assert client.authenticate(0) == 1
        assert client.fetch(http_server).endswith(PAGE)
    finally:
        client.close()


def test_tampered_frame_is_rejected_by_the_server(kerberos, socks_server, echo_server):
    server = socks_server(kerberos.config(), env=kerberos.env)
    client = GSSClient(server.address, kerberos)
    try:
        assert client.authenticate(2) == 2
        client.connect(echo_server)
        token = bytearray(client.ctx.wrap(b"hello", True).message)
        token[len(token) // 2] ^= 0x01
        client.send_frame(3, bytes(token))
        try:
            answer = client.sock.recv(65536)
        except ConnectionResetError:     # the server aborts the connection
            answer = b""
        assert answer == b""             # nothing echoed
    finally:
        client.close()
    server.wait_for_log(r"socks5 user=user method=gssapi connect .* gssapi: GSS-API unwrap failed")


# Start-up and configuration.


def _config_file(tmp_path, text: str):
    path = tmp_path / "gssapi.toml"
    path.write_text(text)
    return str(path)


def _twistd(args, env, timeout=30):
    return run_socks(*args, cwd=None, env=env, timeout=timeout)


def test_bad_keytab_stops_start_up_with_a_clear_message(kerberos, tmp_path):
    missing = tmp_path / "no-such.keytab"
    text = kerberos.config().replace(kerberos.keytab, str(missing))
    path = _config_file(tmp_path, text)
    result = _twistd(["--config", path, "--listen", "tcp:0:interface=127.0.0.1"], kerberos.env)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    assert "socksd: " in output and path in output
    assert "gssapi.keytab" in output and str(missing) in output
    assert "starting on" not in output


def test_keytab_without_the_service_key_stops_start_up(kerberos, tmp_path):
    path = _config_file(tmp_path, kerberos.config(extra='service = "nosuchservice"\n'))
    result = _twistd(["--config", path, "--listen", "tcp:0:interface=127.0.0.1"], kerberos.env)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    assert "gssapi.keytab" in output and "nosuchservice" in output


def test_check_with_a_gssapi_table_passes(kerberos, tmp_path):
    path = _config_file(tmp_path, kerberos.config(
        methods=('"gssapi"', '"none"'),
        extra='nec_compat = true\nprincipal_map = "keep"\n'
              f'principals = {{ "{kerberos.user}" = "alice" }}\n'))
    result = _twistd(["--config", path, "--check"], kerberos.env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout and "methods gssapi, none" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_check_with_a_bad_keytab_fails(kerberos, tmp_path):
    text = kerberos.config().replace(kerberos.keytab, str(tmp_path / "missing.keytab"))
    result = _twistd(["--config", _config_file(tmp_path, text), "--check"], kerberos.env)
    assert result.returncode != 0
    assert "gssapi.keytab" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_gssapi_method_without_gssapi_table_is_a_config_error(tmp_path):
    path = _config_file(tmp_path, '[server]\nmethods = ["gssapi", "none"]\n')
    for args in (["--config", path, "--check"],
                 ["--config", path, "--listen", "tcp:0:interface=127.0.0.1"]):
        result = _twistd(args, {})
        output = result.stdout + result.stderr
        assert result.returncode != 0
        assert "Traceback" not in output
        assert f"{path}:2: server.methods" in output and "[gssapi]" in output


@pytest.mark.parametrize("key, value, what", [
    ("levels", '["selective"]', "selective"),
    ("levels", "[]", "at least one level"),
    ("principal_map", '"lowercase"', "strip-realm"),
    ("nec_compat", '"yes"', "true or false"),
    ("local_realms", "[]", "at least one realm"),
    ("local_realms", '["KRBTEST.COM", "@KRBTEST.COM"]', "not a realm name"),
    ("local_realms", '[""]', "not a realm name"),
    ("local_realms", '"KRBTEST.COM"', "list of strings"),
    ("allow_anonymous", '"yes"', "true or false"),
    ("unknown_key", '"x"', "unknown key"),
])
def test_bad_gssapi_values_are_config_errors(kerberos, tmp_path, key, value, what):
    text = (f"[server]\nmethods = [\"gssapi\"]\n[gssapi]\nkeytab = \"{kerberos.keytab}\"\n"
            f"{key} = {value}\n")
    path = _config_file(tmp_path, text)
    result = _twistd(["--config", path, "--check"], kerberos.env)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    assert f"{path}:5: gssapi.{key}" in output and what in output


@pytest.fixture
def no_default_realm(kerberos, tmp_path) -> dict[str, str]:
    """The KDC fixture's environment with a krb5.conf that names no
    default_realm (the realm's KDC is still listed)."""
    with open(kerberos.env["KRB5_CONFIG"]) as f:
        text = f.read()
    path = tmp_path / "krb5-no-default-realm.conf"
    path.write_text(re.sub(r"(?m)^\s*default_realm\s*=.*$", "", text))
    return {**kerberos.env, "KRB5_CONFIG": str(path)}


def test_strip_realm_without_a_default_realm_stops_start_up(kerberos, tmp_path,
                                                             no_default_realm):
    """strip-realm strips only local realms; with none known every
    principal would keep its realm and stop matching the rules' names."""
    path = _config_file(tmp_path, kerberos.config())
    for args in (["--config", path, "--check"],
                 ["--config", path, "--listen", "tcp:0:interface=127.0.0.1"]):
        result = _twistd(args, no_default_realm)
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        assert "Traceback" not in output
        assert f"{path}:" in output and "gssapi.principal_map" in output, output
        assert "no default realm" in output and "local_realms" in output, output


@pytest.mark.parametrize("extra", ['local_realms = ["KRBTEST.COM"]\n',
                                   'principal_map = "keep"\n'])
def test_without_a_default_realm_local_realms_or_keep_pass(kerberos, tmp_path,
                                                          no_default_realm, extra):
    path = _config_file(tmp_path, kerberos.config(extra=extra))
    result = _twistd(["--config", path, "--check"], no_default_realm)
    assert result.returncode == 0, result.stdout + result.stderr


# curl (Debian bookworm's 7.88).


class _GreetingRecorder:
    """A raw TCP listener standing in for a SOCKS5 server: it records the
    client's greeting, answers "no acceptable methods" and closes."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(30)
        self.port = self.listener.getsockname()[1]
        self.greeting = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            data = b""
            while len(data) < 2 or len(data) < 2 + data[1]:
                chunk = conn.recv(512)
                if not chunk:
                    break
                data += chunk
            self.greeting = data
            conn.sendall(b"\x05\xff")

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


def test_curl_socks5_gssapi_offers_method_0x01(kerberos, tmp_path):
    """Debian's curl 7.88 cannot complete a SOCKS5 GSS-API session (it
    forgets that it offered GSS-API when the method reply comes in a later
    read: "SOCKS5 GSSAPI per-message authentication is not supported"), so
    this documents only what can be relied on: it offers method 0x01."""
    curl = require("curl")
    recorder = _GreetingRecorder()
    try:
        result = subprocess.run(
            [curl, "-sS", "--max-time", "20", "--socks5-gssapi",
             "--socks5-hostname", f"localhost:{recorder.port}", "http://example.invalid/"],
            env={**os.environ, **kerberos.env}, capture_output=True, timeout=30)
    finally:
        recorder.close()
    greeting = recorder.greeting
    assert greeting[:1] == b"\x05", (greeting, result.stderr)
    assert len(greeting) == 2 + greeting[1]
    assert 0x01 in greeting[2:], greeting
    assert result.returncode != 0     # we answered "no acceptable methods"


def test_curl_offering_gssapi_gets_method_none_when_only_none_is_configured(
        kerberos, socks_server, http_server):
    """Issue 5: curl offering 0x00 and 0x01 together must still work with
    methods = ["none"]."""
    curl = require("curl")
    server = socks_server('[server]\nmethods = ["none"]\n', env=kerberos.env)
    result = subprocess.run(
        [curl, "-sS", "--max-time", "20", "--socks5-gssapi",
         "--socks5-hostname", f"127.0.0.1:{server.port}",
         f"http://127.0.0.1:{http_server}/"],
        env={**os.environ, **kerberos.env}, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == PAGE
    server.wait_for_log(r"socks5 user=- method=none connect .* ok")
