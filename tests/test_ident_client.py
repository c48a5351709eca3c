"""The RFC 1413 client (socksd.ident.client.query) against real loopback identds.

Each test runs a small identd in-process on the real reactor (port 0 on
127.0.0.1) that answers as the test tells it: a fixed line, nothing at all,
a close, an endless line. trial fails a test that leaves a connection, a
timer or a logged error behind, so every test also proves the client cleans up.
"""

from __future__ import annotations

import socket
import time

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from socksd.ident import client
from socksd.ident.client import (
    HiddenUser,
    IdentError,
    Identity,
    IdentUnavailable,
    InvalidPort,
    NoUser,
    UnknownError,
)

SERVER_PORT = 6191   # the port on the identd's host (the SOCKS client's port)
CLIENT_PORT = 23     # the port on our side (the SOCKS server's port)
QUERY = b"6191, 23\r\n"


class FakeIdentdProtocol(Protocol):
    def connectionMade(self) -> None:
        self.received = b""
        self.replied = False
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.factory.connections.append(self)
        if not self.factory.connected.called:
            self.factory.connected.callback(self)
        if self.factory.immediately:
            self._answer()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\n" in self.received and not self.replied:
            if not self.factory.queried.called:
                self.factory.queried.callback(self.received)
            self._answer()

    def _answer(self) -> None:
        self.replied = True
        if self.factory.reply is not None:
            self.transport.write(self.factory.reply)
        if self.factory.close:
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


class FakeIdentdFactory(Factory):
    protocol = FakeIdentdProtocol
    noisy = False

    def __init__(self, reply: bytes | None, close: bool, immediately: bool) -> None:
        self.reply = reply
        self.close = close
        self.immediately = immediately
        self.connections: list[FakeIdentdProtocol] = []
        self.connected: defer.Deferred[FakeIdentdProtocol] = defer.Deferred()
        self.queried: defer.Deferred[bytes] = defer.Deferred()


def _free_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QueryTests(unittest.TestCase):
    timeout = 20

    def identd(self, reply: bytes | None = None, close: bool = False,
               immediately: bool = False) -> FakeIdentdFactory:
        """Listen on a fresh loopback port; ``reply`` is written once the
        query line arrived (or at once), then the server closes if ``close``."""
        factory = FakeIdentdFactory(reply, close, immediately)
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        factory.port = listening.getHost().port
        return factory

    def query(self, factory_or_port, timeout: float = 5.0) -> defer.Deferred:
        port = getattr(factory_or_port, "port", factory_or_port)
        return client.query(reactor, "127.0.0.1", SERVER_PORT, CLIENT_PORT, port=port,
                            timeout=timeout)

    @defer.inlineCallbacks
    def assert_closed(self, factory: FakeIdentdFactory):
        """Every connection the identd accepted has been closed."""
        self.assertTrue(factory.connections, "the client never connected")
        for connection in factory.connections:
            yield connection.lost

    # Answers.

    @defer.inlineCallbacks
    def test_userid_reply_gives_identity_and_query_line_is_exact(self):
        identd = self.identd(b"6191, 23 : USERID : UNIX : alice\r\n")
        identity = yield self.query(identd)
        self.assertEqual(identity, Identity("UNIX", "alice", None))
        self.assertEqual(identity.opsys, "UNIX")
        self.assertEqual(identity.user, "alice")
        [connection] = identd.connections
        self.assertEqual(connection.received, QUERY)
        # The client hangs up after the answer; the identd does not have to.
        yield self.assert_closed(identd)

    @defer.inlineCallbacks
    def test_userid_reply_without_blanks_and_with_charset(self):
        identd = self.identd(b"6191,23:USERID:UNIX,UTF-8:r\xc3\xa9my:x y\r\n", close=True)
        identity = yield self.query(identd)
        self.assertEqual(identity, Identity("UNIX", "rémy:x y", "UTF-8"))
        yield self.assert_closed(identd)

    @defer.inlineCallbacks
    def test_reply_with_bare_lf(self):
        identd = self.identd(b"6191 , 23 : USERID : OTHER : bob\n")
        identity = yield self.query(identd)
        self.assertEqual(identity, Identity("OTHER", "bob", None))
        yield self.assert_closed(identd)

    @defer.inlineCallbacks
    def test_reply_written_at_once_then_close(self):
        """An identd that does not wait to read the query line (and closes
        right after its answer) still gives an answer."""
        identd = self.identd(b"6191, 23 : USERID : UNIX : carol\r\n", close=True,
                             immediately=True)
        identity = yield self.query(identd)
        self.assertEqual(identity, Identity("UNIX", "carol", None))
        yield self.assert_closed(identd)

    @defer.inlineCallbacks
    def test_reply_of_exactly_1000_bytes_is_accepted(self):
        head = b"6191, 23 : USERID : UNIX : "
        user = b"u" * (1000 - len(head) - 1)
        line = head + user + b"\r"
        self.assertEqual(len(line), 1000)
        identd = self.identd(line + b"\n")
        identity = yield self.query(identd)
        self.assertEqual(identity.user, user.decode())
        yield self.assert_closed(identd)

    @defer.inlineCallbacks
    def check_error(self, token: bytes, expected: type[IdentError]):
        identd = self.identd(b"6191, 23 : ERROR : " + token + b"\r\n")
        failure = yield self.assertFailure(self.query(identd), IdentError)
        self.assertIs(type(failure), expected)
        self.assertEqual(failure.token, token.decode())
        self.assertNotIsInstance(failure, IdentUnavailable)
        yield self.assert_closed(identd)

    def test_error_invalid_port(self):
        return self.check_error(b"INVALID-PORT", InvalidPort)

    def test_error_no_user(self):
        return self.check_error(b"NO-USER", NoUser)

    def test_error_hidden_user(self):
        return self.check_error(b"HIDDEN-USER", HiddenUser)

    def test_error_unknown_error(self):
        return self.check_error(b"UNKNOWN-ERROR", UnknownError)

    def test_error_x_token(self):
        return self.check_error(b"X-NOT-TODAY", IdentError)

    def test_error_types_are_ident_errors(self):
        for cls in (InvalidPort, NoUser, HiddenUser, UnknownError):
            self.assertTrue(issubclass(cls, IdentError))
        self.assertEqual(client.error_for("X-FOO").token, "X-FOO")
        self.assertIs(type(client.error_for("NO-USER")), NoUser)

    # Answers that are no answer.

    @defer.inlineCallbacks
    def test_reply_for_other_ports_is_unavailable(self):
        identd = self.identd(b"6192, 23 : USERID : UNIX : alice\r\n")
        yield self.assertFailure(self.query(identd), IdentUnavailable)
        yield self.assert_closed(identd)

    @defer.inlineCallbacks
    def test_reply_with_ports_swapped_is_unavailable(self):
        identd = self.identd(b"23, 6191 : USERID : UNIX : alice\r\n")
        yield self.assertFailure(self.query(identd), IdentUnavailable)
        yield self.assert_closed(identd)

    @defer.inlineCallbacks
    def test_malformed_reply_is_unavailable(self):
        identd = self.identd(b"6191, 23 : SOMETHING ELSE\r\n")
        yield self.assertFailure(self.query(identd), IdentUnavailable)
        yield self.assert_closed(identd)

    @defer.inlineCallbacks
    def test_reply_in_undecodable_charset_is_unavailable_without_traceback(self):
        """A charset Python knows but that cannot decode the id (here the
        'undefined' codec) must end as a typed result, not an exception raised
        inside the protocol (which trial would report as a logged error)."""
        identd = self.identd(b"6191, 23 : USERID : UNIX, undefined : alice\r\n")
        try:
            identity = yield self.query(identd)
        except IdentUnavailable:
            pass
        else:
            self.assertEqual(identity.user, "alice")
        yield self.assert_closed(identd)

    @defer.inlineCallbacks
    def test_nul_in_the_charset_is_a_malformed_reply_without_traceback(self):
        """codecs.lookup raised ValueError for it inside lineReceived: an
        "Unhandled Error" traceback (trial fails a test that logs one), and
        the query ended only when the connection dropped."""
        identd = self.identd(b"6191, 23 : USERID : UNIX,\x00 : eve\r\n")
        failure = yield self.assertFailure(self.query(identd), IdentUnavailable)
        self.assertIn("malformed reply", str(failure))
        self.assertIn("charset", str(failure))
        yield self.assert_closed(identd)

    @defer.inlineCallbacks
    def test_line_of_1001_bytes_without_eol_is_unavailable(self):
        """The identd keeps the connection open: the bound alone ends the wait."""
        identd = self.identd(b"6191, 23 : USERID : UNIX : " + b"u" * 1001)
        started = time.monotonic()
        failure = yield self.assertFailure(self.query(identd, timeout=10), IdentUnavailable)
        self.assertLess(time.monotonic() - started, 5, "waited for the timeout instead")
        self.assertIn("1000", str(failure))
        yield self.assert_closed(identd)

    @defer.inlineCallbacks
    def test_close_without_reply_is_unavailable(self):
        identd = self.identd(None, close=True)
        yield self.assertFailure(self.query(identd), IdentUnavailable)
        self.assertEqual(identd.connections[0].received, QUERY)
        yield self.assert_closed(identd)

    @defer.inlineCallbacks
    def test_close_after_partial_reply_is_unavailable(self):
        identd = self.identd(b"6191, 23 : USERID : UNIX : alice", close=True)
        yield self.assertFailure(self.query(identd), IdentUnavailable)
        yield self.assert_closed(identd)

    @defer.inlineCallbacks
    def test_stalling_identd_times_out(self):
        identd = self.identd(None)
        started = time.monotonic()
        failure = yield self.assertFailure(self.query(identd, timeout=0.5), IdentUnavailable)
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.45)
        self.assertLess(elapsed, 3.0)
        self.assertIn("0.5", str(failure))
        self.assertEqual(identd.connections[0].received, QUERY)
        # The abandoned query connection is closed, not leaked.
        yield self.assert_closed(identd)

    @defer.inlineCallbacks
    def test_nothing_listening_is_unavailable(self):
        started = time.monotonic()
        yield self.assertFailure(self.query(_free_port(), timeout=5), IdentUnavailable)
        self.assertLess(time.monotonic() - started, 3.0)

    # Cancellation.

    @defer.inlineCallbacks
    def test_cancel_closes_the_connection(self):
        identd = self.identd(None)
        d = self.query(identd, timeout=10)
        yield identd.queried
        d.cancel()
        yield self.assertFailure(d, defer.CancelledError)
        yield self.assert_closed(identd)

    @defer.inlineCallbacks
    def test_cancel_before_connected(self):
        identd = self.identd(None)
        d = self.query(identd, timeout=10)
        d.cancel()
        yield self.assertFailure(d, defer.CancelledError)
        # Give a connection that got through anyway the chance to show up.
        yield task.deferLater(reactor, 0.2, lambda: None)
        for connection in identd.connections:
            yield connection.lost
