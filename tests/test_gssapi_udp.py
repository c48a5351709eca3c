"""UDP ASSOCIATE under GSS-API protection: each datagram, SOCKS UDP header
included, travels as one RFC 1961 encapsulated frame (section 6)."""

from __future__ import annotations

import socket
import struct
import time

import gssapi
import pytest

from conftest import recv_exact
from socksd.wire import socks5
from test_gssapi_smoke import _frame

pytestmark = pytest.mark.integration


def _handshake(s, level: int):
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
        token = ctx.step(_frame(s)[1])
    wrapped = ctx.wrap(bytes((level,)), False).message
    s.sendall(struct.pack("!BBH", 1, 2, len(wrapped)) + wrapped)
    assert ctx.unwrap(_frame(s)[1]).message == bytes((level,))
    return ctx


def _frame_of(ctx, data: bytes, level: int) -> bytes:
    token = ctx.wrap(data, level == 2).message
    return struct.pack("!BBH", 1, 3, len(token)) + token


@pytest.mark.parametrize("level", [1, 2])
def test_udp_datagrams_are_encapsulated(kerberos, socks_server, level):
    server = socks_server(kerberos.config(), env=kerberos.env)
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.settimeout(5)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(5)
    with socket.create_connection(server.address, timeout=10) as s:
        ctx = _handshake(s, level)
        s.sendall(_frame_of(ctx, socks5.encode_request(socks5.UDP_ASSOCIATE, "0.0.0.0", 0),
                            level))
        reply, _ = socks5.parse_reply(ctx.unwrap(_frame(s)[1]).message)
        assert reply.code == socks5.SUCCEEDED
        relay = (reply.host, reply.port)

        # A plain (unwrapped) datagram is dropped: it must be protected. Sent
        # first, from another socket on the client's host, it does not take
        # the association either (only a datagram that unwraps fixes the port).
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.bind(("127.0.0.1", 0))
            other.sendto(socks5.encode_udp("127.0.0.1", echo.getsockname()[1], b"plain"),
                         relay)
            time.sleep(0.2)
        # A protected one goes through; the answer comes back protected.
        datagram = socks5.encode_udp("127.0.0.1", echo.getsockname()[1], b"query")
        client.sendto(_frame_of(ctx, datagram, level), relay)
        data, source = echo.recvfrom(100)
        assert data == b"query"
        echo.sendto(b"answer", source)
        frame, _ = client.recvfrom(70000)
        mtyp, length = frame[1], struct.unpack("!H", frame[2:4])[0]
        assert frame[0] == 1 and mtyp == 3 and length == len(frame) - 4
        result = ctx.unwrap(frame[4:])
        assert result.encrypted == (level == 2)
        answer = socks5.parse_udp(result.message)
        assert (answer.host, answer.port, answer.data) == ("127.0.0.1", echo.getsockname()[1],
                                                           b"answer")
    line = server.wait_for_log(r"socks5 user=user method=gssapi udp .*").group(0)
    assert "datagrams up=1 down=1 dropped=1" in line, line
    echo.close()
    client.close()
