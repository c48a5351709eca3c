"""relay.send: a write that leaves at once when nothing is queued before it,
and otherwise behaves exactly like ``transport.write`` (order, buffering,
producer pausing). A real TCP transport on a real socket pair; the memory
reactor only records what the transport asks it to watch."""

from __future__ import annotations

import socket

import pytest
from twisted.internet.testing import StringTransport

from socksd import relay


@pytest.fixture
def pair(tcp_server_pair):
    return tcp_server_pair


def read_available(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_sent_at_once_when_nothing_is_queued(pair):
    transport, peer, reactor = pair
    relay.send(transport, b"\x05\x00")
    # Already on the wire: no write-readiness round trip was needed.
    assert read_available(peer, 2) == b"\x05\x00"
    assert transport not in reactor.getWriters()
    assert relay.buffer_empty(transport)


def test_queued_behind_earlier_writes_in_order(pair):
    transport, peer, reactor = pair
    transport.write(b"first ")
    relay.send(transport, b"second")
    assert transport in reactor.getWriters()
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(100)  # nothing overtook the queued bytes
    peer.settimeout(5)
    transport.doWrite()
    assert read_available(peer, 12) == b"first second"


def test_what_the_socket_does_not_take_is_buffered(pair):
    transport, peer, reactor = pair
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = bytes(range(256)) * 8192  # 2 MiB: far more than the socket holds
    relay.send(transport, data)
    assert not relay.buffer_empty(transport)
    assert transport in reactor.getWriters()
    received = b""
    while len(received) < len(data):
        received += peer.recv(1 << 16)
        transport.doWrite()
    assert received == data


def test_paused_producer_as_with_write(pair):
    transport, peer, reactor = pair

    class Producer:
        paused = False

        def pauseProducing(self):
            self.paused = True

        def resumeProducing(self):
            self.paused = False

        def stopProducing(self):
            pass

    producer = Producer()
    transport.registerProducer(producer, True)
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    relay.send(transport, b"x" * (4 * transport.bufferSize))
    assert producer.paused


def test_other_transports_just_write():
    transport = StringTransport()
    relay.send(transport, b"hello")
    assert transport.value() == b"hello"


def test_closing_transport_goes_the_normal_way(pair):
    transport, peer, reactor = pair
    transport.loseConnection()
    relay.send(transport, b"late")
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(100)


def test_aborted_transport_sends_nothing(pair):
    transport, peer, reactor = pair
    transport.abortConnection()   # closes on the next reactor turn
    relay.send(transport, b"after abort")
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(100)
