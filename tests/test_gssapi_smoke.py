"""GSS-API through a real `twistd socks` and a real KDC (smoke test; the
thorough suite is in test_gssapi_*.py)."""

import socket
import struct

import gssapi
import pytest

from conftest import PAGE, recv_exact

pytestmark = pytest.mark.integration


def _frame(s):
    head = recv_exact(s, 4)
    assert head[0] == 1 and head[1] != 0xFF, head
    return head[1], recv_exact(s, struct.unpack("!H", head[2:])[0])


@pytest.mark.parametrize("level", [1, 2])
def test_protected_session_fetches_a_page(kerberos, socks_server, http_server, level):
    server = socks_server(kerberos.config(), env=kerberos.env)
    with socket.create_connection(server.address, timeout=10) as s:
        s.sendall(b"\x05\x01\x01")
        assert recv_exact(s, 2) == b"\x05\x01"
        ctx = gssapi.SecurityContext(
            name=gssapi.Name("rcmd@localhost", gssapi.NameType.hostbased_service),
            usage="initiate", flags=gssapi.RequirementFlag.mutual_authentication
        | gssapi.RequirementFlag.replay_detection
        | gssapi.RequirementFlag.out_of_sequence_detection)
        token = ctx.step()
        while token:
            s.sendall(struct.pack("!BBH", 1, 1, len(token)) + token)
            if ctx.complete:
                break
            _mtyp, answer = _frame(s)
            token = ctx.step(answer)
        assert ctx.complete
        wrapped = ctx.wrap(bytes((level,)), False).message
        s.sendall(struct.pack("!BBH", 1, 2, len(wrapped)) + wrapped)
        mtyp, answer = _frame(s)
        assert mtyp == 2 and ctx.unwrap(answer).message == bytes((level,))

        def send(data):
            token = ctx.wrap(data, level == 2).message
            s.sendall(struct.pack("!BBH", 1, 3, len(token)) + token)

        def receive():
            _mtyp, token = _frame(s)
            result = ctx.unwrap(token)
            assert result.encrypted == (level == 2)
            return result.message

        send(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", http_server))
        assert receive()[:2] == b"\x05\x00"
        send(b"GET / HTTP/1.0\r\n\r\n")
        body = b""
        while not body.endswith(PAGE):
            body += receive()
    server.wait_for_log(r"socks5 user=user method=gssapi connect .* ok")
