"""socksd.twisted_internals against the real Twisted classes: a Twisted
release that renames or reshapes one of the private names it leans on fails
here, by name, not as a quiet change of behaviour somewhere in a session.
A real TCP transport on a real socket pair; the memory reactor only records
what the transport asks it to watch (as in test_relay_send)."""

from __future__ import annotations

import inspect
import re
import signal
import socket
import struct
import subprocess
import sys
from importlib.metadata import version

import pytest
from twisted.internet import epollreactor, ssl, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from socksd import twisted_internals as internals
from socksd.tap import reactor as socksd_reactor


@pytest.fixture
def pair(tcp_server_pair):
    transport, peer, _reactor = tcp_server_pair
    return transport, peer


def test_the_installed_twisted_was_checked():
    """Outside CHECKED_TWISTED, nobody has read this Twisted's source for
    the internals socksd uses: do that, then widen the range."""
    installed = version("Twisted")
    found = re.match(r"(\d+)\.(\d+)", installed)
    assert found, installed
    release = (int(found[1]), int(found[2]))
    oldest, newest = internals.CHECKED_TWISTED
    assert oldest <= release <= newest, (
        f"Twisted {installed} is outside the releases socksd.twisted_internals "
        f"was checked against ({oldest[0]}.{oldest[1]} to {newest[0]}.{newest[1]}): re-check "
        "each private name listed in that module against this release's source, then "
        "widen CHECKED_TWISTED")


def test_importing_it_installs_no_reactor():
    """Every layer imports it; socksd installs its own reactor after that."""
    code = ("import sys, socksd.twisted_internals; "
            "print('twisted.internet.reactor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


# buffered: FileDescriptor's dataBuffer, offset and _tempDataLen

def test_buffered_counts_what_the_socket_has_not_taken(pair):
    transport, peer = pair
    assert internals.buffered(transport) == 0
    transport.write(b"abc")                    # queued (_tempDataBuffer) until doWrite
    assert internals.buffered(transport) == 3
    transport.doWrite()
    assert internals.buffered(transport) == 0
    assert peer.recv(3) == b"abc"


def test_buffered_counts_a_partly_sent_buffer(pair):
    transport, peer = pair
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = bytes(range(256)) * 8192
    transport.write(data)
    transport.doWrite()                        # the socket takes some (dataBuffer, offset)
    held = internals.buffered(transport)
    assert held is not None and 0 < held < len(data)
    transport.write(b"more")                   # behind it (_tempDataLen)
    assert internals.buffered(transport) == held + 4
    received = 0
    while received < len(data) + 4:
        received += len(peer.recv(1 << 16))
        transport.doWrite()
    assert internals.buffered(transport) == 0


def test_buffered_is_none_for_other_transports():
    assert internals.buffered(StringTransport()) is None


def test_buffered_looks_through_wrappers_to_the_socket(pair):
    """A client behind haproxy:, TLS or GSS-API protection that stops reading
    fills the socket transport's buffer under the wrapper: the stall watch
    reads it there (a wrapper reporting None let such a client hold its
    session forever)."""
    transport, _peer = pair
    proxied = internals.HAProxyProtocolWrapper(WrappingFactory(Factory()), Protocol())
    proxied.makeConnection(transport)
    tls = ProtocolWrapper(WrappingFactory(Factory()), Protocol())
    tls.makeConnection(proxied)
    transport.write(b"x" * 100)
    assert internals.buffered(proxied) == 100
    assert internals.buffered(tls) == 100
    assert internals.buffered(ProtocolWrapper(WrappingFactory(Factory()), Protocol())) is None


# direct_socket: also TLS and _aborting

def test_direct_socket_of_an_idle_tcp_transport(pair):
    transport, peer = pair
    assert internals.direct_socket(transport) is transport.socket


def test_no_direct_socket_behind_queued_bytes(pair):
    transport, peer = pair
    transport.write(b"first")
    assert internals.direct_socket(transport) is None


def test_no_direct_socket_while_closing(pair):
    transport, peer = pair
    transport.loseConnection()
    assert internals.direct_socket(transport) is None


def test_no_direct_socket_once_aborted(pair):
    transport, peer = pair
    transport.abortConnection()     # closes on the next reactor turn
    assert transport.connected and not transport.disconnecting
    assert internals.direct_socket(transport) is None


def test_no_direct_socket_under_tls(pair):
    transport, peer = pair
    transport.startTLS(ssl.CertificateOptions(), False)   # as the client side
    assert internals.direct_socket(transport) is None


def test_no_direct_socket_for_a_subclass_or_another_transport(pair):
    transport, peer = pair

    class Server(tcp.Server):
        pass

    transport.__class__ = Server
    assert internals.direct_socket(transport) is None
    assert internals.direct_socket(StringTransport()) is None


# The PROXY protocol wrapper: HAProxyWrappingFactory, HAProxyProtocolWrapper._proxyInfo

class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


def v2_local() -> bytes:
    """A PROXY v2 LOCAL header without addresses: HAProxy's health check."""
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00]) + struct.pack("!H", 0))


def proxied() -> tuple:
    factory = internals.proxy_protocol_factory(ServerFactory.forProtocol(Recorder))
    wrapper = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    wrapper.makeConnection(StringTransport())
    return wrapper, wrapper.wrappedProtocol


def test_the_protocol_sees_the_wrapper_as_its_transport():
    wrapper, protocol = proxied()
    assert protocol.transport is wrapper
    assert internals.is_proxy_wrapper(protocol.transport)
    assert isinstance(wrapper, internals.HAProxyProtocolWrapper)
    assert not internals.is_proxy_wrapper(StringTransport())


def test_proxy_info_once_the_header_is_read():
    wrapper, protocol = proxied()
    assert internals.proxy_info(wrapper) is None
    assert not internals.is_health_check(wrapper)
    wrapper.dataReceived(b"PROXY TCP4 192.0.2.7 127.0.0.1 6000 1080\r\nhello")
    info = internals.proxy_info(wrapper)
    assert info is not None and info.source == IPv4Address("TCP", "192.0.2.7", 6000)
    assert wrapper.getPeer() == info.source
    assert not internals.is_health_check(wrapper)
    assert protocol.data == b"hello"


def test_a_header_without_a_client_is_a_health_check():
    wrapper, protocol = proxied()
    wrapper.dataReceived(v2_local())
    assert internals.is_health_check(wrapper)
    assert protocol.data == b""    # the header alone reaches the protocol as nothing


def test_after_each_read_sees_a_header_the_protocol_does_not():
    wrapper, protocol = proxied()
    seen = []
    internals.after_each_read(
        wrapper, lambda: seen.append((internals.is_health_check(wrapper), protocol.data)))
    # (Twisted's v1 parser wants something after UNKNOWN, as HAProxy sends.)
    wrapper.dataReceived(b"PROXY UNKNOWN ffff")
    wrapper.dataReceived(b"::1 ffff::2 1 2\r\n")
    wrapper.dataReceived(b"x")
    assert seen == [(False, b""), (True, b""), (True, b"x")]


def test_a_real_transport_under_a_wrapper(pair):
    """The wrapper is what tcp.Server reads into, through its dataReceived."""
    transport, peer = pair
    factory = internals.proxy_protocol_factory(ServerFactory.forProtocol(Recorder))
    wrapper = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    transport.protocol = wrapper
    wrapper.makeConnection(transport)
    calls = []
    internals.after_each_read(wrapper, lambda: calls.append(1))
    peer.sendall(v2_local())
    transport.doRead()
    assert calls == [1] and internals.is_health_check(wrapper)


# The make-believe interfaces: what they name, real reactors and transports provide.

@pytest.mark.parametrize("reactor_class", [socksd_reactor.EPollReactor,
                                           epollreactor.EPollReactor])
def test_the_reactors_provide_what_ireactor_names(reactor_class):
    for interface in internals.IReactor.__bases__:
        assert interface.implementedBy(reactor_class), interface


def test_installed_reactor_is_the_global_one():
    from twisted.internet import reactor

    assert internals.installed_reactor() is reactor


def stream_transport_parts(transport) -> None:
    for interface in internals.IStreamTransport.__bases__:
        assert interface.providedBy(transport), interface
    assert transport.connected and not transport.disconnecting


def test_tcp_provides_what_istreamtransport_names(pair):
    transport, peer = pair
    stream_transport_parts(transport)


def test_wrappers_provide_what_istreamtransport_names(pair):
    from twisted.protocols.tls import TLSMemoryBIOFactory

    transport, peer = pair
    factory = internals.proxy_protocol_factory(ServerFactory.forProtocol(Recorder))
    wrapper = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    wrapper.makeConnection(transport)
    stream_transport_parts(wrapper)
    tls = TLSMemoryBIOFactory(ssl.CertificateOptions(), True, ServerFactory.forProtocol(Recorder))
    tls_protocol = tls.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    tls_protocol.makeConnection(transport)
    stream_transport_parts(tls_protocol)


# exit_cleanly: the reactor's _exitSignal, which twistd ends with

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_exit_cleanly_forgets_the_signal_twistd_would_end_with(signum):
    from twisted.application import app

    reactor = socksd_reactor.EPollReactor()
    try:
        handler = reactor.sigTerm if signum == signal.SIGTERM else reactor.sigInt
        handler(signum)                      # what the reactor's handler does
        assert reactor._exitSignal == signum
        # ... which twistd reads once the reactor has stopped, to kill itself with
        assert "_exitSignal" in inspect.getsource(app.ApplicationRunner.startReactor)
        internals.exit_cleanly(reactor)
        assert reactor._exitSignal is None
        internals.exit_cleanly(reactor)      # twice, or with no signal: nothing to do
        assert reactor._exitSignal is None
    finally:
        reactor._poller.close()
        reactor.waker.connectionLost(None)
