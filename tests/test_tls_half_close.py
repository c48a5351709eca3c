"""socksd.twisted_internals.tls_client: TLS that half-closes as TLS 1.3
has it (close_notify closes one's own writing; reading goes on), on real
loopback sockets: against OpenSSL through Python's ssl module, and against
itself. Twisted's own TLS ends the whole connection at either side's
close_notify, and its loseWriteConnection sent a bare FIN under TLS, which
lost the answer a relay's destination sent after a client's half-close."""

from __future__ import annotations

import socket
import ssl as stdlib_ssl
import threading
from pathlib import Path

import pytest
from OpenSSL import SSL
from twisted.internet import defer, error, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.trial import unittest
from zope.interface import implementer

from chain import WAIT, Collect, make_ca, make_server_cert, within
from socksd import twisted_internals as internals


class OpenSSLServer:
    """One TLS 1.3 connection served by Python's ssl module in a thread:
    it says "ready" (the handshake is over), reads to the client's end,
    tells a close_notify (recv gives b"") from a bare FIN (SSLEOFError),
    then answers and closes as told."""

    def __init__(self, crt: Path, key: Path, answer: bytes, notify: bool) -> None:
        context = stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = stdlib_ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(crt, key)
        self.context, self.answer, self.notify = context, answer, notify
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(WAIT)
        self.port = self.listener.getsockname()[1]
        self.read = b""
        self.end = ""           # how the client's writing ended
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        raw, _ = self.listener.accept()
        raw.settimeout(WAIT)
        with self.context.wrap_socket(raw, server_side=True,
                                      suppress_ragged_eofs=False) as conn:
            conn.sendall(b"ready")
            try:
                while chunk := conn.recv(65536):
                    self.read += chunk
                self.end = "close_notify"
            except stdlib_ssl.SSLEOFError:
                self.end = "bare EOF"
                return
            conn.sendall(self.answer)
            if self.notify:
                conn.unwrap()    # ours (theirs came): closed both ways

    def finished(self) -> defer.Deferred:
        """Fires once the thread is done (in a thread: the reactor runs on)."""
        return within(threads.deferToThread(self.thread.join, WAIT))

    def close(self) -> None:
        self.listener.close()


@implementer(IOpenSSLServerConnectionCreator)
class ServerContext:
    """A server's TLS connections from its files, without the pyOpenSSL
    certificate objects Twisted's own helpers still pass (deprecated)."""

    def __init__(self, crt: Path, key: Path) -> None:
        self.context = SSL.Context(SSL.TLS_METHOD)
        self.context.use_certificate_chain_file(str(crt))
        self.context.use_privatekey_file(str(key))

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)


@implementer(IHalfCloseableProtocol)
class Answering(Protocol):
    """A server end that answers the first bytes, half-closes, then reads
    what comes after its half-close, to the client's."""

    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        if not self.data:
            self.transport.write(b"hello, and that is all from me")
            self.transport.loseWriteConnection()
        self.data += data

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()
        self.done.callback(self.data)

    def writeConnectionLost(self) -> None:
        pass


class HalfClose(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _directory(self, tmp_path: Path) -> None:
        self.tmp = tmp_path

    def setUp(self) -> None:
        ca, ca_cert, ca_key = make_ca(self.tmp)
        self.crt, self.key = make_server_cert(self.tmp, ca_cert, ca_key, ["localhost"],
                                              ["127.0.0.1"])
        self.creator = optionsForClientTLS("localhost",
                                           trustRoot=Certificate.loadPEM(ca.read_bytes()))

    async def connect(self, port: int) -> Collect:
        endpoint = internals.tls_client(self.creator, TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                                          port, WAIT))
        return await within(endpoint.connect(Factory.forProtocol(Collect)))

    async def ready(self, port: int) -> Collect:
        """Connected to an OpenSSLServer, past its handshake."""
        app = await self.connect(port)
        assert await app.until(5) == b"ready"
        app.data = b""
        return app

    async def test_our_half_close_is_close_notify_and_the_answer_comes_back(self):
        server = OpenSSLServer(self.crt, self.key, b"the answer", notify=True)
        self.addCleanup(server.close)
        app = await self.ready(server.port)
        app.transport.write(b"the question")
        app.transport.loseWriteConnection()
        # The answer, then the server's close_notify: an EOF, not a loss.
        assert await within(app.eof) == b"the answer"
        await server.finished()
        assert (server.end, server.read) == ("close_notify", b"the question")
        app.transport.loseConnection()
        await within(app.lost)
        assert app.reason.check(error.ConnectionDone), app.reason

    async def test_closing_ends_at_the_peers_close_notify(self):
        """loseConnection (both ways) still ends the connection once the
        peer's close_notify answers ours, with what it sent before it."""
        server = OpenSSLServer(self.crt, self.key, b"last words", notify=True)
        self.addCleanup(server.close)
        app = await self.ready(server.port)
        app.transport.write(b"bye")
        app.transport.loseConnection()
        await within(app.lost)
        assert app.reason.check(error.ConnectionDone), app.reason
        assert app.data == b"last words"
        await server.finished()
        assert (server.end, server.read) == ("close_notify", b"bye")

    async def test_a_fin_without_close_notify_is_a_lost_connection(self):
        """The server answers and drops the socket with no close_notify:
        a truncation, which ends the connection as lost, not as an EOF."""
        server = OpenSSLServer(self.crt, self.key, b"cut", notify=False)
        self.addCleanup(server.close)
        app = await self.ready(server.port)
        app.transport.loseWriteConnection()
        await within(app.lost)
        await server.finished()
        assert server.end == "close_notify"
        assert not app.eof.called and app.data == b"cut"
        assert app.reason.check(error.ConnectionLost), app.reason

    async def test_both_ends_half_close_either_way_round(self):
        """Its peer's close_notify first: an EOF, and writing goes on until
        our own half-close, which the peer reads as its EOF."""
        server_options = ServerContext(self.crt, self.key)
        answering: list[Answering] = []

        def build() -> Answering:
            answering.append(Answering())
            return answering[-1]

        factory = internals._half_closing_tls()(server_options, False,
                                                Factory.forProtocol(build))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        app = await self.connect(port.getHost().port)
        app.transport.write(b"hi")
        assert await within(app.eof) == b"hello, and that is all from me"
        app.transport.write(b" and after your close")
        app.transport.loseWriteConnection()
        assert await within(answering[0].done) == b"hi and after your close"
        await within(app.lost)
        assert app.reason.check(error.ConnectionDone), app.reason


def test_the_twisted_tls_methods_it_overrides_and_calls_are_there():
    """By name, so that a Twisted that renamed one fails here (the class
    would otherwise quietly stop overriding it)."""
    from twisted.protocols.tls import BufferingTLSTransport

    for name in ("_flushReceiveBIO", "_checkHandshakeStatus", "_unbufferPendingWrites",
                 "_flushSendBIO", "_shutdownTLS", "_tlsShutdownFinished"):
        assert callable(getattr(BufferingTLSTransport, name, None)), name
    made = internals._half_closing_tls().protocol
    assert issubclass(made, BufferingTLSTransport)
    assert IHalfCloseableProtocol.implementedBy(made)
