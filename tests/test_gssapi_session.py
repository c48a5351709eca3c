"""Protocol tests of the SOCKS5 GSS-API method (RFC 1961) over in-memory
transports, with real Kerberos contexts on both sides: the server's acceptor
uses the `kerberos` fixture's keytab, and each test drives a python-gssapi
initiator by hand, frame by frame."""

from __future__ import annotations

import os
import socket
import struct

import gssapi
import pytest
from gssapi.exceptions import GSSError
from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.python.failure import Failure

import fakes
from fakes import (
    Client,
    Outbound,
    alice_portal,
    assert_closes_at,
    assert_refused,
    refused_session_line,
    session_lines,
)
from socksd import config as configuration
from socksd import splice
from socksd.auth.gss import GSSAPISettings
from socksd.auth.registry import method_registry
from socksd.protection import ProtectionWrapper, SecurityLayer
from socksd.proxy import Limits
from socksd.rules import RuleSet, compile_rule, parse_network

pytestmark = pytest.mark.integration

GREETING_GSSAPI = b"\x05\x01\x01"
# CONNECT 93.184.216.34:80
CONNECT_IP = b"\x05\x01\x00\x01" + socket.inet_aton("93.184.216.34") + struct.pack("!H", 80)
# Success with BND.ADDR 10.0.0.5, BND.PORT 51000.
SUCCESS_BOUND = b"\x05\x00\x00\x01\x0a\x00\x00\x05\xc7\x38"
ABORT = b"\x01\xff"


def aborted(out: bytes) -> bool:
    """The server's answer ends with VER=1 MTYP=0xFF. What precedes it may
    only be whole MTYP 1 frames: the acceptor's error token (a KRB-ERROR),
    which GSS-API says to pass to the initiator even on failure."""
    if not out.endswith(ABORT):
        return False
    return all(mtyp == 1 for mtyp, _token in frames(out[:-2]))

Flags = gssapi.RequirementFlag
# What RFC 1961 clients (curl, Dante) ask for: mutual authentication, and
# replay and sequence detection for the per-message tokens.
CLIENT_FLAGS = (Flags.mutual_authentication | Flags.replay_detection
                | Flags.out_of_sequence_detection | Flags.integrity | Flags.confidentiality)


def frame(mtyp: int, token: bytes) -> bytes:
    """An RFC 1961 frame, built here independently of socksd.wire."""
    return struct.pack("!BBH", 1, mtyp, len(token)) + token


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split server output into whole frames (none may be left partial)."""
    out = []
    while data:
        assert len(data) >= 4, f"partial frame head {data!r}"
        version, mtyp, length = struct.unpack_from("!BBH", data)
        assert version == 1, data[:4]
        assert mtyp != 0xFF, "the server aborted"
        assert len(data) >= 4 + length, "partial frame"
        out.append((mtyp, data[4:4 + length]))
        data = data[4 + length:]
    return out


# The server: settings come from a real config file, as twistd would load them.


def load_settings(kerberos, tmp_path, levels=("integrity", "confidentiality"),
                  extra: str = "") -> GSSAPISettings:
    path = tmp_path / "socksd.toml"
    path.write_text(kerberos.config(levels=levels, extra=extra))
    settings = configuration.load(str(path)).gssapi
    assert isinstance(settings, GSSAPISettings)
    return settings


def make_factory(settings: GSSAPISettings | None, names=("gssapi",), rules=None,
                 limits=Limits(), portal=None):
    registry = method_registry(portal, settings)
    # A plain memory reactor (its own synchronous resolver): no names to resolve here.
    return fakes.make_factory([registry[name] for name in names], rules, limits,
                              reactor=MemoryReactorClock())


# The client: a python-gssapi initiator driven by hand.


class Initiator:
    def __init__(self, kerberos, flags=CLIENT_FLAGS, service: str = "rcmd",
                 ccache: str | None = None) -> None:
        self.kerberos = kerberos
        name = gssapi.Name(f"{service}@{kerberos.realm.hostname}",
                           gssapi.NameType.hostbased_service)
        creds = (gssapi.Credentials(usage="initiate", store={"ccache": ccache})
                 if ccache else None)
        self.ctx = gssapi.SecurityContext(name=name, usage="initiate", flags=flags, creds=creds)
        self.level = None

    def establish(self, client: Client) -> list[bytes]:
        """Context establishment; returns the server's MTYP 1 frames, raw."""
        seen = []
        token = self.ctx.step()
        while True:
            client.send(frame(1, token))
            out = client.take()
            if self.ctx.complete:
                # The client expects nothing more: the server must send nothing.
                assert out == b"", out
                break
            seen.append(out)
            [(mtyp, answer)] = frames(out)
            assert mtyp == 1
            token = self.ctx.step(answer)
            if self.ctx.complete:
                assert not token
                break
        assert self.ctx.complete
        return seen

    def ask_level(self, client: Client, level: int) -> bytes:
        """MTYP 2: the wrapped octet; returns the server's raw answer."""
        client.send(frame(2, self.ctx.wrap(bytes((level,)), False).message))
        return client.take()

    def granted(self, answer: bytes) -> int:
        [(mtyp, token)] = frames(answer)
        assert mtyp == 2
        result = self.ctx.unwrap(token)
        assert len(result.message) == 1
        self.level = result.message[0]
        return self.level

    def wrap(self, data: bytes, conf: bool | None = None) -> bytes:
        """Data as MTYP 3 frames, each token at most 65535 bytes."""
        if conf is None:
            conf = self.level == 2
        limit = self.ctx.get_wrap_size_limit(65535, conf)
        return b"".join(frame(3, self.ctx.wrap(data[i:i + limit], conf).message)
                        for i in range(0, len(data), limit))

    def unwrap(self, data: bytes) -> bytes:
        """Server output (whole MTYP 3 frames) -> plaintext, checking protection."""
        out = []
        for mtyp, token in frames(data):
            assert mtyp == 3
            assert len(token) <= 65535
            result = self.ctx.unwrap(token)
            assert result.encrypted == (self.level == 2)
            out.append(result.message)
        return b"".join(out)


def _after_greeting(settings, bytewise=False, limits=Limits()):
    factory, reactor = make_factory(settings, limits=limits)
    client = Client(factory, bytewise)
    client.send(GREETING_GSSAPI)
    assert client.take() == b"\x05\x01"
    return client, reactor


def _established(kerberos, settings, bytewise=False):
    """Greeting and context, the protection level not asked yet; returns
    (client, initiator, reactor)."""
    client, reactor = _after_greeting(settings, bytewise)
    initiator = Initiator(kerberos)
    initiator.establish(client)
    return client, initiator, reactor


def assert_aborted(client: Client) -> None:
    """The server aborted (see aborted()) and closes the connection."""
    assert aborted(client.take())
    assert client.closing


def authenticate(kerberos, factory, level: int, bytewise: bool = False, flags=CLIENT_FLAGS,
                 ccache: str | None = None):
    """Greeting, context and protection level: a client under a security layer."""
    client = Client(factory, bytewise)
    client.send(GREETING_GSSAPI)
    assert client.take() == b"\x05\x01"
    initiator = Initiator(kerberos, flags, ccache=ccache)
    initiator.establish(client)
    assert initiator.granted(initiator.ask_level(client, level)) == level
    assert not client.closing
    return client, initiator


def connect(client: Client, initiator: Initiator, reactor) -> Outbound:
    """CONNECT under the security layer, checked reply; the relay is on."""
    client.send(initiator.wrap(CONNECT_IP))
    assert client.take() == b""
    out = Outbound(reactor)
    assert (out.host, out.port) == ("93.184.216.34", 80)
    out.accept()
    assert initiator.unwrap(client.take()) == SUCCESS_BOUND
    return out


def connected_and_closed_session_line(client: Client, initiator: Initiator, reactor) -> str:
    """CONNECT under the security layer, then the destination and the client
    close: the session's one log line."""
    with capturedLogs() as events:
        out = connect(client, initiator, reactor)
        out.protocol.connectionLost(Failure(error.ConnectionDone()))
        client.lose()
    [line] = session_lines(events)
    return line


def assert_frame_ends_session(client: Client, out: Outbound, data: bytes) -> None:
    """Under the security layer, data reaches nothing and the session
    closes; then both connections end."""
    client.send(data)
    assert out.take() == b""
    assert client.closing
    client.lose()
    out.protocol.connectionLost(Failure(error.ConnectionDone()))


@pytest.fixture
def settings(kerberos, tmp_path) -> GSSAPISettings:
    return load_settings(kerberos, tmp_path)


# Method selection.


def test_gssapi_chosen_when_configured_and_offered(settings):
    factory, _ = make_factory(settings, ("gssapi", "userpass", "none"), portal=alice_portal())
    client = Client(factory)
    client.send(b"\x05\x03\x00\x01\x02")
    assert client.take() == b"\x05\x01"
    assert not client.closing


def test_server_order_wins_over_gssapi(settings):
    factory, _ = make_factory(settings, ("userpass", "gssapi", "none"), portal=alice_portal())
    client = Client(factory)
    client.send(b"\x05\x03\x00\x01\x02")
    assert client.take() == b"\x05\x02"


def test_gssapi_not_offered_by_client_falls_back(settings):
    factory, _ = make_factory(settings, ("gssapi", "none"))
    client = Client(factory)
    client.send(b"\x05\x01\x00")
    assert client.take() == b"\x05\x00"


def test_without_gssapi_settings_there_is_no_gssapi_method():
    registry = method_registry(alice_portal(), None)
    assert "gssapi" not in registry
    assert all(method.code != 0x01 for method in registry.values())
    factory, _ = make_factory(None, tuple(registry), portal=alice_portal())
    client = Client(factory)
    client.send(b"\x05\x02\x00\x01")
    assert client.take() == b"\x05\x00"
    only_gssapi = Client(factory)
    only_gssapi.send(b"\x05\x01\x01")
    assert only_gssapi.take() == b"\x05\xff"
    assert only_gssapi.closing


def test_gssapi_settings_registry_has_method_0x01(settings):
    registry = method_registry(None, settings)
    assert registry["gssapi"].code == 0x01


# Context establishment.


def test_context_established_bytewise_with_mutual_authentication(kerberos, settings, bytewise):
    client, _ = _after_greeting(settings, bytewise)
    initiator = Initiator(kerberos)
    token = initiator.ctx.step()
    data = frame(1, token)
    if bytewise:
        # Nothing comes back until the last byte of the frame is in.
        client.bytewise = False
        for i in range(len(data) - 1):
            client.send(data[i:i + 1])
            assert client.take() == b""
        client.send(data[-1:])
    else:
        client.send(data)
    out = client.take()
    # The AP-REP, framed VER=1 MTYP=1 LEN TOKEN.
    assert out[:2] == b"\x01\x01"
    (length,) = struct.unpack("!H", out[2:4])
    assert length > 0 and len(out) == 4 + length
    assert initiator.ctx.step(out[4:]) is None
    assert initiator.ctx.complete
    assert not client.closing
    assert initiator.granted(initiator.ask_level(client, 1)) == 1


def test_no_extra_empty_token_without_mutual_authentication(kerberos, settings, bytewise):
    client, _ = _after_greeting(settings, bytewise)
    initiator = Initiator(kerberos, flags=Flags.replay_detection | Flags.integrity
                          | Flags.confidentiality | Flags.out_of_sequence_detection)
    token = initiator.ctx.step()
    assert initiator.ctx.complete     # no AP-REP expected
    client.send(frame(1, token))
    assert client.take() == b""       # no zero-length MTYP 1 token either
    assert not client.closing
    # The next frame the client reads is the protection-level answer.
    answer = initiator.ask_level(client, 2)
    assert answer[:2] == b"\x01\x02"
    assert initiator.granted(answer) == 2


def test_context_and_level_in_one_write(kerberos, settings):
    """A client that pipelines (no mutual authentication) is served in order."""
    factory, reactor = make_factory(settings)
    client = Client(factory)
    initiator = Initiator(kerberos, flags=Flags.replay_detection | Flags.out_of_sequence_detection)
    token = initiator.ctx.step()
    initiator.level = 1
    client.send(GREETING_GSSAPI + frame(1, token)
                + frame(2, initiator.ctx.wrap(b"\x01", False).message)
                + initiator.wrap(CONNECT_IP))
    out = client.take()
    assert out[:2] == b"\x05\x01"
    [(mtyp, answer)] = frames(out[2:])
    assert mtyp == 2 and initiator.ctx.unwrap(answer).message == b"\x01"
    out = Outbound(reactor)
    out.accept()
    assert initiator.unwrap(client.take()) == SUCCESS_BOUND


# Protection-level negotiation.


@pytest.mark.parametrize("levels, asked, granted", [
    (("integrity", "confidentiality"), 1, 1),
    (("integrity", "confidentiality"), 2, 2),
    (("confidentiality",), 1, 2),
    (("integrity",), 1, 1),
    (("clear", "confidentiality"), 1, 2),
    (("integrity", "confidentiality"), 0, 1),     # no "clear": the closest stronger
    (("confidentiality",), 0, 2),
    (("clear", "integrity", "confidentiality"), 0, 0),
    (("clear",), 0, 0),
])
def test_level_granted(kerberos, tmp_path, levels, asked, granted):
    client, initiator, _ = _established(kerberos, load_settings(kerberos, tmp_path, levels))
    with capturedLogs() as events:
        answer = initiator.ask_level(client, asked)
    assert initiator.granted(answer) == granted
    assert not client.closing
    assert client.session.method == "gssapi"
    assert client.session.user.name == "user"
    assert (client.session.layer is None) == (granted == 0)
    texts = [formatEvent(e) for e in events]
    assert any("gssapi" in t and kerberos.user in t and f"protection {granted}" in t
               for t in texts), texts


@pytest.mark.parametrize("levels, asked", [
    (("integrity",), 2),
    (("clear",), 1),
    (("clear", "integrity"), 2),
    (("integrity", "confidentiality"), 3),        # selective: refused, as Dante does
    (("clear", "integrity", "confidentiality"), 3),
    (("integrity", "confidentiality"), 4),
    (("integrity", "confidentiality"), 255),
])
def test_level_refused_aborts(kerberos, tmp_path, levels, asked):
    client, initiator, reactor = _established(kerberos,
                                              load_settings(kerberos, tmp_path, levels))
    with capturedLogs() as events:
        assert initiator.ask_level(client, asked) == ABORT
        assert client.closing
        # Nothing after the abort is acted upon.
        initiator.level = 2
        client.send(initiator.wrap(CONNECT_IP))
        assert client.take() == b""
        assert reactor.tcpClients == []
        client.lose()
    [line] = session_lines(events)
    assert "method=gssapi" in line and "auth failed" in line
    assert f"protection level {asked}" in line


def test_level_message_of_two_octets_aborts(kerberos, settings):
    client, initiator, _ = _established(kerberos, settings)
    client.send(frame(2, initiator.ctx.wrap(b"\x01\x01", False).message))
    assert_refused(client, ABORT)


def test_nec_mode_unwrapped_octet_gets_unwrapped_answer(kerberos, tmp_path, bytewise):
    settings = load_settings(kerberos, tmp_path, extra="nec_compat = true\n")
    client, initiator, reactor = _established(kerberos, settings, bytewise)
    client.send(b"\x01\x02\x00\x01\x01")
    assert client.take() == b"\x01\x02\x00\x01\x01"
    initiator.level = 1
    # The security layer is in force all the same.
    assert client.session.layer is not None and client.session.layer.level == 1
    out = connect(client, initiator, reactor)
    client.send(initiator.wrap(b"ping"))
    assert out.take() == b"ping"


@pytest.mark.parametrize("levels, asked, granted", [
    (("confidentiality",), 1, 2),
    (("clear", "integrity"), 0, 0),
])
def test_nec_mode_grants_like_rfc_mode(kerberos, tmp_path, levels, asked, granted):
    settings = load_settings(kerberos, tmp_path, levels, extra="nec_compat = true\n")
    client, _, _ = _established(kerberos, settings)
    client.send(frame(2, bytes((asked,))))
    assert client.take() == frame(2, bytes((granted,)))
    assert not client.closing


def test_nec_mode_still_accepts_the_wrapped_octet(kerberos, tmp_path):
    settings = load_settings(kerberos, tmp_path, extra="nec_compat = true\n")
    client, initiator, _ = _established(kerberos, settings)
    assert initiator.granted(initiator.ask_level(client, 2)) == 2


def test_unwrapped_octet_without_nec_compat_aborts(kerberos, settings):
    client, _, _ = _established(kerberos, settings)
    line = refused_session_line(client, [b"\x01\x02\x00\x01\x01"], ABORT)
    assert "method=gssapi" in line and "auth failed" in line and "GSS-API" in line


# Aborts during the handshake.


@pytest.mark.parametrize("data, reason", [
    (frame(1, b"this is no GSS-API token"), "GSS-API"),
    (frame(1, b"\x60\x82\x01\x00" + b"\x00" * 40), "GSS-API"),
    (frame(2, b"\x01"), "message type 2, expected 1"),
    (frame(3, b"hello"), "message type 3, expected 1"),
    (b"\x05\x01\x00\x01" + b"\x00" * 6, "version 5"),
    (b"\x02\x01\x00\x00", "version 2"),
    (b"\x01\x07\x00\x00", "type 7"),
    (ABORT, "aborted"),
])
def test_bad_context_message_aborts(kerberos, settings, bytewise, data, reason):
    client, reactor = _after_greeting(settings, bytewise)
    with capturedLogs() as events:
        client.send(data)
        assert_aborted(client)
        client.lose()
    [line] = session_lines(events)
    assert "method=gssapi" in line and "user=-" in line
    assert "auth failed" in line and reason in line
    assert "Traceback" not in "".join(formatEvent(e) or "" for e in events)


@pytest.mark.parametrize("mtyp", [1, 3])
def test_wrong_mtyp_after_context_aborts(kerberos, settings, mtyp):
    client, initiator, _ = _established(kerberos, settings)
    client.send(frame(mtyp, initiator.ctx.wrap(b"\x01", False).message))
    assert_refused(client, ABORT)


def test_garbage_protection_token_aborts(kerberos, settings):
    client, _, _ = _established(kerberos, settings)
    client.send(frame(2, b"\x05\x04\x00\xff" + b"\x00" * 40))
    assert_refused(client, ABORT)


@pytest.fixture(scope="module")
def two_services(kerberos):
    """A keytab with two services' keys: rcmd/<host> (the session keytab's
    key, not re-randomised) and socksd-other/<host>."""
    realm = kerberos.realm
    path = os.path.join(realm.tmpdir, "two-services.keytab")
    if not os.path.exists(path):
        realm.addprinc(f"socksd-other/{realm.hostname}")
        realm.extract_keytab(f"rcmd/{realm.hostname}", path)            # -norandkey
        realm.extract_keytab(f"socksd-other/{realm.hostname}", path)
    return path


def _service_settings(kerberos, tmp_path, keytab, extra):
    text = kerberos.config().replace(kerberos.keytab, keytab) + extra
    path = tmp_path / "socksd.toml"
    path.write_text(text)
    return configuration.load(str(path)).gssapi


@pytest.mark.parametrize("configured, asked, accepted", [
    ('service = "rcmd"', "rcmd", True),
    ('service = "rcmd"', "socksd-other", False),
    ("", "socksd-other", False),                       # the default service is rcmd
    ('service = "socksd-other"', "socksd-other", True),
    ('service = "socksd-other"', "rcmd", False),
    ('principal = "rcmd/{host}@{realm}"', "rcmd", True),
    ('principal = "rcmd/{host}@{realm}"', "socksd-other", False),
])
def test_only_the_configured_service_is_accepted(kerberos, tmp_path, two_services,
                                                 configured, asked, accepted):
    realm = kerberos.realm
    extra = configured.format(host=realm.hostname, realm=realm.realm) + "\n"
    settings = _service_settings(kerberos, tmp_path, two_services, extra)
    client, _ = _after_greeting(settings)
    initiator = Initiator(kerberos, service=asked)
    client.send(frame(1, initiator.ctx.step()))
    out = client.take()
    if accepted:
        [(mtyp, answer)] = frames(out)
        assert mtyp == 1
        initiator.ctx.step(answer)
        assert initiator.ctx.complete
        assert initiator.granted(initiator.ask_level(client, 2)) == 2
        assert client.session.user.name == "user"
    else:
        assert aborted(out)
        assert client.closing


def test_ticket_for_a_principal_not_in_the_keytab_aborts(kerberos, settings, two_services):
    client, _ = _after_greeting(settings)
    initiator = Initiator(kerberos, service="socksd-other")
    with capturedLogs() as events:
        client.send(frame(1, initiator.ctx.step()))
        assert_aborted(client)
        client.lose()
    [line] = session_lines(events)
    assert "auth failed" in line and "method=gssapi" in line


def test_stalled_long_frame_ends_at_handshake_timeout(kerberos, settings):
    client, reactor = _after_greeting(settings, limits=Limits(handshake_timeout=10))
    with capturedLogs() as events:
        client.send(b"\x01\x01\xff\xff" + b"\x00" * 1000)
        assert client.take() == b""
        assert_closes_at(client, reactor, 10)
        client.lose()
    [line] = session_lines(events)
    assert "handshake timeout" in line and "127.0.0.1:40000" in line


def test_handshake_timeout_during_context_sends_abort(kerberos, settings):
    """Issue 5: "0x01 0xFF abort on any failure (... timeout), then close"."""
    client, reactor = _after_greeting(settings, limits=Limits(handshake_timeout=10))
    client.send(b"\x01\x01\xff\xff" + b"\x00" * 1000)
    reactor.advance(10.1)
    assert client.closing
    assert client.take() == ABORT


def test_largest_context_frame_is_read_whole(kerberos, settings):
    """65535 bytes of garbage token: read to the end, then refused (no hang)."""
    client, _ = _after_greeting(settings)
    client.send(b"\x01\x01\xff\xff" + b"\x00" * 65534)
    assert client.take() == b""
    assert not client.closing
    client.send(b"\x00")
    assert_aborted(client)


def test_client_leaves_during_context(kerberos, settings):
    client, _ = _after_greeting(settings)
    with capturedLogs() as events:
        client.send(b"\x01\x01\x00")
        client.lose()
    [line] = session_lines(events)
    assert "client closed" in line and "during handshake" in line


# The security layer: request, reply and relay as MTYP 3 frames.


@pytest.mark.parametrize("level", [1, 2])
def test_request_and_reply_are_wrapped(kerberos, settings, bytewise, level):
    factory, reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, level, bytewise)
    # A plain SOCKS request is not accepted any more.
    assert isinstance(client.session.transport, ProtectionWrapper)
    wrapped = initiator.wrap(CONNECT_IP)
    assert wrapped[:2] == b"\x01\x03"
    client.send(wrapped)
    assert client.take() == b""
    out = Outbound(reactor)
    out.accept()
    reply = client.take()
    assert reply[:2] == b"\x01\x03"
    if level == 2:
        assert SUCCESS_BOUND not in reply
    assert initiator.unwrap(reply) == SUCCESS_BOUND


@pytest.mark.parametrize("level", [1, 2])
def test_relay_both_ways_is_wrapped(kerberos, settings, bytewise, level):
    factory, reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, level, bytewise)
    with capturedLogs() as events:
        out = connect(client, initiator, reactor)
        client.send(initiator.wrap(b"GET / HTTP/1.0\r\n\r\n"))
        assert out.take() == b"GET / HTTP/1.0\r\n\r\n"
        out.protocol.dataReceived(b"HTTP/1.0 200 OK\r\n\r\nhello")
        raw = client.take()
        assert raw[:2] == b"\x01\x03"
        if level == 2:
            assert b"hello" not in raw
        assert initiator.unwrap(raw) == b"HTTP/1.0 200 OK\r\n\r\nhello"
        out.protocol.connectionLost(Failure(error.ConnectionDone()))
        assert client.closing
        client.lose()
    [line] = session_lines(events)
    assert "method=gssapi" in line and "user=user " in line
    assert "connect 93.184.216.34:80" in line
    assert "up=18" in line and "down=24" in line and line.endswith(" ok")
    assert "[splice]" not in line


@pytest.mark.parametrize("level", [1, 2])
def test_200_kib_each_way_in_frames_of_at_most_65535(kerberos, settings, level):
    factory, reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, level)
    out = connect(client, initiator, reactor)
    down = bytes(range(256)) * 800           # 200 KiB
    out.protocol.dataReceived(down)
    raw = client.take()
    received = frames(raw)
    assert len(received) >= 4
    assert all(mtyp == 3 and 0 < len(token) <= 65535 for mtyp, token in received)
    # Frames are filled up to the limit, not chopped small.
    assert max(len(token) for _m, token in received) > 60000
    assert initiator.unwrap(raw) == down
    up = bytes(reversed(down))
    client.send(initiator.wrap(up))
    assert out.take() == up


@pytest.mark.parametrize("level", [1, 2])
def test_partial_frames_are_buffered(kerberos, settings, level):
    factory, reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, level)
    out = connect(client, initiator, reactor)
    data = initiator.wrap(b"first") + initiator.wrap(b"second")
    first_len = 4 + struct.unpack("!H", data[2:4])[0]
    for i in range(len(data)):
        client.send(data[i:i + 1])
        relayed = out.take()
        if i == first_len - 1:
            assert relayed == b"first"
        elif i == len(data) - 1:
            assert relayed == b"second"
        else:
            assert relayed == b"", i
    assert not client.closing


def test_many_frames_in_one_read(kerberos, settings):
    factory, reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, 2)
    out = connect(client, initiator, reactor)
    client.send(b"".join(initiator.wrap(bytes((i,)) * i) for i in range(1, 50)))
    assert out.take() == b"".join(bytes((i,)) * i for i in range(1, 50))


@pytest.mark.parametrize("level", [1, 2])
def test_request_with_early_data_in_one_read(kerberos, settings, level):
    factory, reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, level)
    client.send(initiator.wrap(CONNECT_IP) + initiator.wrap(b"early"))
    out = Outbound(reactor)
    out.accept()
    assert initiator.unwrap(client.take()) == SUCCESS_BOUND
    assert out.take() == b"early"


def _tampered(token: bytes, index: int) -> bytes:
    return token[:index] + bytes((token[index] ^ 0x01,)) + token[index + 1:]


@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("where", ["header", "middle", "last"])
def test_tampered_frame_ends_the_session(kerberos, settings, level, where):
    factory, reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, level)
    out = connect(client, initiator, reactor)
    token = initiator.ctx.wrap(b"transfer 100 to alice", level == 2).message
    index = {"header": 2, "middle": len(token) // 2, "last": len(token) - 1}[where]
    with capturedLogs() as events:
        assert_frame_ends_session(client, out, frame(3, _tampered(token, index)))
    assert out.transport.disconnecting
    [line] = session_lines(events)
    assert "method=gssapi" in line and "user=user " in line
    assert "gssapi" in line.split("s ", 1)[-1] and "unwrap failed" in line
    assert not line.endswith(" ok")


@pytest.mark.parametrize("level", [1, 2])
def test_tampered_request_ends_the_session(kerberos, settings, level):
    factory, reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, level)
    token = initiator.ctx.wrap(CONNECT_IP, level == 2).message
    with capturedLogs() as events:
        client.send(frame(3, _tampered(token, len(token) // 2)))
        assert client.closing
        assert reactor.tcpClients == []
        client.lose()
    [line] = session_lines(events)
    assert "unwrap failed" in line


@pytest.mark.parametrize("level", [1, 2])
def test_replayed_frame_ends_the_session(kerberos, settings, level):
    factory, reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, level)
    out = connect(client, initiator, reactor)
    wrapped = initiator.wrap(b"pay 100")
    with capturedLogs() as events:
        client.send(wrapped)
        assert out.take() == b"pay 100"
        assert_frame_ends_session(client, out, wrapped)
    [line] = session_lines(events)
    assert "unwrap failed" in line and "user=user " in line


# What Dante's client asks for: no replay or sequence detection.
WITHOUT_SEQUENCE = Flags.mutual_authentication | Flags.integrity | Flags.confidentiality
BIND_IP = b"\x05\x02\x00\x01" + socket.inet_aton("93.184.216.34") + struct.pack("!H", 21)


@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("request_,command", [(CONNECT_IP, "connect"), (BIND_IP, "bind")],
                         ids=["connect", "bind"])
def test_stream_commands_need_replay_and_sequence_detection(kerberos, settings, level,
                                                            request_, command):
    """Kerberos checks wrapped tokens for replay and order only when the
    initiator asked for it, and the flags are fixed before the command is
    known: a context without them authenticates, and its CONNECT or BIND is
    refused with REP 0x02 and a line naming the missing flags."""
    factory, reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, level, flags=WITHOUT_SEQUENCE)
    assert Flags.replay_detection not in initiator.ctx.actual_flags
    assert Flags.out_of_sequence_detection not in initiator.ctx.actual_flags
    with capturedLogs() as events:
        client.send(initiator.wrap(request_))
        reply = initiator.unwrap(client.take())
        assert reply[:2] == b"\x05\x02" and client.closing
        client.lose()
    assert reactor.tcpClients == [] and reactor.tcpServers == []
    [line] = session_lines(events)
    assert f"user=user method=gssapi {command} 93.184.216.34:" in line, line
    assert line.endswith(f"denied: gssapi: {command} needs replay and sequence detection, "
                         "the client's context lacks GSS_C_REPLAY_FLAG and "
                         "GSS_C_SEQUENCE_FLAG ([gssapi] require_sequence)"), line


def test_one_missing_flag_is_named(kerberos, settings):
    factory, _reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, 1,
                                     flags=WITHOUT_SEQUENCE | Flags.replay_detection)
    with capturedLogs() as events:
        client.send(initiator.wrap(CONNECT_IP))
        assert initiator.unwrap(client.take())[:2] == b"\x05\x02"
        client.lose()
    [line] = session_lines(events)
    assert "lacks GSS_C_SEQUENCE_FLAG (" in line, line


def test_udp_needs_neither_flag(kerberos, settings):
    """Datagrams are lost and reordered: UDP ASSOCIATE never requires them
    (the whole association is in test_gssapi_udp and test_gssapi_dante)."""
    factory, _reactor = make_factory(settings)
    _client, initiator = authenticate(kerberos, factory, 2, flags=WITHOUT_SEQUENCE)
    layer = SecurityLayer(initiator.ctx, 2)
    assert layer.refusal("udp") is None
    assert "GSS_C_REPLAY_FLAG" in layer.refusal("connect")
    assert SecurityLayer(initiator.ctx, 2, require_sequence=False).refusal("connect") is None


def test_require_sequence_false_serves_a_client_without_them(kerberos, tmp_path):
    """The operator's choice: then a replayed frame is not caught by
    Kerberos (the client did not ask), and is relayed."""
    settings = load_settings(kerberos, tmp_path, extra="require_sequence = false\n")
    assert settings.require_sequence is False
    factory, reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, 1, flags=WITHOUT_SEQUENCE)
    outbound = connect(client, initiator, reactor)
    client.send(initiator.wrap(b"data"))
    assert outbound.take() == b"data"


def test_clients_asking_for_both_are_served_at_the_default(kerberos, settings):
    factory, reactor = make_factory(settings)
    assert settings.require_sequence is True
    client, initiator = authenticate(kerberos, factory, 2)
    outbound = connect(client, initiator, reactor)
    wrapped = initiator.wrap(b"pay 100")
    client.send(wrapped)
    assert outbound.take() == b"pay 100"
    client.send(wrapped)
    assert outbound.take() == b"", "a replayed frame was relayed"
    assert client.closing


def test_out_of_order_frames_end_the_session(kerberos, settings):
    factory, reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, 1)
    out = connect(client, initiator, reactor)
    first = initiator.wrap(b"one")
    second = initiator.wrap(b"two")
    with capturedLogs() as events:
        client.send(second)
        client.send(first)
        assert out.take() in (b"two", b"")
        assert client.closing
        client.lose()
        out.protocol.connectionLost(Failure(error.ConnectionDone()))
    [line] = session_lines(events)
    assert "unwrap failed" in line


def test_unencrypted_frame_in_confidential_session_ends_it(kerberos, settings):
    factory, reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, 2)
    out = connect(client, initiator, reactor)
    with capturedLogs() as events:
        assert_frame_ends_session(client, out, initiator.wrap(b"plain text", conf=False))
    [line] = session_lines(events)
    assert "unencrypted frame" in line


def test_unencrypted_request_in_confidential_session_is_refused(kerberos, settings):
    factory, reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, 2)
    client.send(initiator.wrap(CONNECT_IP, conf=False))
    assert client.closing
    assert reactor.tcpClients == []


def test_encrypted_frame_in_integrity_session_is_accepted(kerberos, settings):
    """Level 1 asks for integrity at least: confidentiality on top is no harm."""
    factory, reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, 1)
    out = connect(client, initiator, reactor)
    client.send(initiator.wrap(b"secret", conf=True))
    assert out.take() == b"secret"


@pytest.mark.parametrize("data", [b"\x05\x01\x00", b"\x01\x01\x00\x01x", b"\x01\xff",
                                  b"\x02\x03\x00\x00"])
def test_non_mtyp3_data_under_the_layer_ends_the_session(kerberos, settings, data):
    factory, reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, 1)
    with capturedLogs() as events:
        client.send(data)
        assert client.closing
        client.lose()
    assert reactor.tcpClients == []
    [line] = session_lines(events)
    assert "method=gssapi" in line and "gssapi" in line


def test_clear_level_has_no_encapsulation(kerberos, tmp_path):
    factory, reactor = make_factory(load_settings(kerberos, tmp_path,
                                                  ("clear", "integrity", "confidentiality")))
    client, initiator = authenticate(kerberos, factory, 0)
    assert client.session.layer is None
    client.send(CONNECT_IP)
    out = Outbound(reactor)
    out.accept()
    assert client.take() == SUCCESS_BOUND
    client.send(b"plain")
    assert out.take() == b"plain"
    out.protocol.dataReceived(b"text")
    assert client.take() == b"text"


# Half-close and flow control through the wrapper.


@pytest.mark.parametrize("level", [1, 2])
def test_half_close_through_the_wrapper(kerberos, settings, level):
    factory, reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, level)
    out = connect(client, initiator, reactor)
    client.send(initiator.wrap(b"request"))
    client.session.readConnectionLost()
    assert out.take() == b"request"
    assert out.transport.write_closed and not out.transport.disconnecting
    out.protocol.dataReceived(b"response")
    assert initiator.unwrap(client.take()) == b"response"
    assert not client.closing
    out.protocol.readConnectionLost()
    assert client.closing and out.transport.disconnecting


def test_server_side_eof_half_closes_the_client(kerberos, settings):
    factory, reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, 2)
    out = connect(client, initiator, reactor)
    out.protocol.dataReceived(b"all")
    out.protocol.readConnectionLost()
    assert initiator.unwrap(client.take()) == b"all"
    assert client.transport.write_closed and not client.closing
    client.send(initiator.wrap(b"still talking"))
    assert out.take() == b"still talking"


def test_flow_control_through_the_wrapper(kerberos, settings):
    factory, reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, 1)
    out = connect(client, initiator, reactor)
    # The outbound socket's producer is the client side, and pausing it
    # pauses the real client transport (under the wrapper).
    out.transport.producer.pauseProducing()
    assert client.transport.producerState == "paused"
    out.transport.producer.resumeProducing()
    assert client.transport.producerState == "producing"
    client.transport.producer.pauseProducing()
    assert out.transport.producerState == "paused"


# The avatar: principal -> local name.


def test_avatar_is_principal_without_realm_by_default(kerberos, settings):
    factory, reactor = make_factory(settings)
    assert kerberos.user == f"user@{kerberos.realm.realm}"
    client, initiator = authenticate(kerberos, factory, 1)
    assert client.session.user.name == "user"
    assert client.session.user.verified
    line = connected_and_closed_session_line(client, initiator, reactor)
    assert "socks5 user=user method=gssapi connect" in line


def test_principal_map_keep_keeps_the_realm(kerberos, tmp_path):
    factory, reactor = make_factory(load_settings(kerberos, tmp_path,
                                                  extra='principal_map = "keep"\n'))
    client, initiator = authenticate(kerberos, factory, 2)
    assert client.session.user.name == kerberos.user
    line = connected_and_closed_session_line(client, initiator, reactor)
    assert f"user={kerberos.user} method=gssapi" in line


def test_principals_table_maps_names(kerberos, tmp_path):
    extra = f'principals = {{ "{kerberos.user}" = "alice" }}\n'
    factory, reactor = make_factory(load_settings(kerberos, tmp_path, extra=extra))
    client, initiator = authenticate(kerberos, factory, 1)
    assert client.session.user.name == "alice"
    line = connected_and_closed_session_line(client, initiator, reactor)
    assert "user=alice method=gssapi" in line


def test_principals_table_other_names_fall_back_to_strip_realm(kerberos, tmp_path):
    extra = f'principals = {{ "bob@{kerberos.realm.realm}" = "robert" }}\n'
    factory, _ = make_factory(load_settings(kerberos, tmp_path, extra=extra))
    client, _ = authenticate(kerberos, factory, 1)
    assert client.session.user.name == "user"


def test_rules_see_the_mapped_name(kerberos, tmp_path):
    extra = f'principals = {{ "{kerberos.user}" = "alice" }}\n'
    rules = RuleSet([compile_rule("alice only", "allow", users=["alice"])])
    factory, reactor = make_factory(load_settings(kerberos, tmp_path, extra=extra),
                                    rules=rules)
    client, initiator = authenticate(kerberos, factory, 1)
    connect(client, initiator, reactor)

    rules = RuleSet([compile_rule("bob only", "allow", users=["bob"])])
    factory, reactor = make_factory(load_settings(kerberos, tmp_path, extra=extra),
                                    rules=rules)
    client, initiator = authenticate(kerberos, factory, 2)
    client.send(initiator.wrap(CONNECT_IP))
    assert reactor.tcpClients == []
    reply = initiator.unwrap(client.take())
    assert reply[:2] == b"\x05\x02"           # connection not allowed by ruleset
    assert client.closing


# strip-realm strips only the local realms (issue 13, item 8).


def test_the_local_realm_is_krb5s_default_realm(kerberos, settings):
    """Read at start from krb5 (here k5test's krb5.conf, KRB5_CONFIG)."""
    assert settings.local_realms == frozenset({kerberos.realm.realm}) == {"KRBTEST.COM"}


def test_strip_realm_keeps_a_foreign_realm(kerberos, settings):
    """alice@EVIL.EXAMPLE, from a realm with a cross-realm trust, was
    "alice": the local alice for every rule and log line."""
    assert settings.local_name("alice@EVIL.EXAMPLE") == "alice@EVIL.EXAMPLE"
    assert settings.local_name("alice@KRBTEST.COM.EVIL.EXAMPLE") == \
        "alice@KRBTEST.COM.EVIL.EXAMPLE"
    assert settings.local_name("alice@krbtest.com") == "alice@krbtest.com"   # realms are case-exact
    assert settings.local_name("alice@KRBTEST.COM") == "alice"
    assert settings.local_name("host/proxy.example@KRBTEST.COM") == "host/proxy.example"
    # An @ inside the name (escaped, in krb5's display form) is not the realm's.
    assert settings.local_name("alice\\@EVIL.EXAMPLE@KRBTEST.COM") == "alice\\@EVIL.EXAMPLE"
    assert settings.local_name("alice\\@KRBTEST.COM@EVIL.EXAMPLE") == \
        "alice\\@KRBTEST.COM@EVIL.EXAMPLE"


def test_principals_table_still_maps_a_foreign_principal(kerberos, tmp_path):
    settings = load_settings(kerberos, tmp_path,
                             extra='principals = { "alice@EVIL.EXAMPLE" = "evil-alice" }\n')
    assert settings.local_name("alice@EVIL.EXAMPLE") == "evil-alice"


def test_local_realms_lists_the_realms_stripped(kerberos, tmp_path):
    settings = load_settings(kerberos, tmp_path,
                             extra='local_realms = ["KRBTEST.COM", "CORP.EXAMPLE"]\n')
    assert settings.local_name("alice@CORP.EXAMPLE") == "alice"
    assert settings.local_name("alice@KRBTEST.COM") == "alice"
    assert settings.local_name("alice@EVIL.EXAMPLE") == "alice@EVIL.EXAMPLE"


def test_a_principal_of_a_realm_not_listed_keeps_it_and_rules_see_that(kerberos, tmp_path):
    """A real ticket from the KDC, for user@KRBTEST.COM, with KRBTEST.COM
    not among local_realms: the user is user@KRBTEST.COM, and a rule naming
    "user" does not match it (as alice@EVIL.EXAMPLE does not match "alice")."""
    extra = 'local_realms = ["CORP.EXAMPLE"]\n'
    rules = RuleSet([compile_rule("user only", "allow", users=["user"])])
    factory, reactor = make_factory(load_settings(kerberos, tmp_path, extra=extra), rules=rules)
    client, initiator = authenticate(kerberos, factory, 1)
    assert client.session.user.name == "user@KRBTEST.COM"
    client.send(initiator.wrap(CONNECT_IP))
    assert reactor.tcpClients == []
    assert initiator.unwrap(client.take())[:2] == b"\x05\x02"   # not allowed by ruleset
    assert client.closing

    rules = RuleSet([compile_rule("user@KRBTEST.COM", "allow", users=["user@KRBTEST.COM"])])
    factory, reactor = make_factory(load_settings(kerberos, tmp_path, extra=extra), rules=rules)
    client, initiator = authenticate(kerberos, factory, 2)
    line = connected_and_closed_session_line(client, initiator, reactor)
    assert "socks5 user=user@KRBTEST.COM method=gssapi connect" in line


@pytest.fixture(scope="module")
def at_in_name_ccache(kerberos, tmp_path_factory) -> str:
    """A ticket for the principal whose one name component is
    "alice@EVIL.EXAMPLE", in the local realm: alice\\@EVIL.EXAMPLE@KRBTEST.COM."""
    realm = kerberos.realm
    ccache = f"FILE:{tmp_path_factory.mktemp('at-in-name') / 'ccache'}"
    # A query string: realm.addprinc() shell-quotes, and kadmin.local would
    # take the quotes for part of the name.
    realm.run_kadminl("addprinc -pw alice-password alice\\@EVIL.EXAMPLE")
    realm.kinit("alice\\@EVIL.EXAMPLE", "alice-password", flags=["-c", ccache])
    return ccache


def test_an_at_sign_in_the_name_is_not_taken_for_the_realm(kerberos, settings,
                                                           at_in_name_ccache):
    """A real principal with an @ in its name: strip-realm strips the real
    realm (KRBTEST.COM) and keeps the name as krb5 displays it, escaped, so
    it is never the "alice" a rule names."""
    rules = RuleSet([compile_rule("alice only", "allow", users=["alice"])])
    factory, reactor = make_factory(settings, rules=rules)
    client, initiator = authenticate(kerberos, factory, 1, ccache=at_in_name_ccache)
    assert client.session.user.name == "alice\\@EVIL.EXAMPLE"
    client.send(initiator.wrap(CONNECT_IP))
    assert reactor.tcpClients == []
    assert initiator.unwrap(client.take())[:2] == b"\x05\x02"


# Anonymous contexts (GSS_C_ANON_FLAG) are refused unless allow_anonymous.


class AnonymousView:
    """The acceptor's real context, as an anonymous PKINIT client's would
    look: its actual_flags also carry GSS_C_ANON_FLAG. A stand-in because a
    real anonymous context needs anonymous PKINIT: Debian's krb5-pkinit
    package, a KDC certificate and the WELLKNOWN/ANONYMOUS principal, none
    of which the KDC fixture has. Everything else is the real context."""

    def __init__(self, context) -> None:
        self._context = context

    @property
    def actual_flags(self):
        return self._context.actual_flags | {Flags.anonymity}

    def __getattr__(self, name):
        return getattr(self._context, name)


def _anonymous_client(kerberos, settings):
    """After the greeting, the negotiation's context seen as anonymous."""
    client, reactor = _after_greeting(settings)
    negotiation = client.session.handler.negotiation
    negotiation.context = AnonymousView(negotiation.context)
    return client


def test_an_anonymous_context_is_refused(kerberos, settings):
    client = _anonymous_client(kerberos, settings)
    initiator = Initiator(kerberos)
    with capturedLogs() as events:
        client.send(frame(1, initiator.ctx.step()))
        assert_aborted(client)
        client.lose()
    [line] = session_lines(events)
    assert "method=gssapi" in line and "auth failed" in line, line
    assert "anonymous" in line and "GSS_C_ANON_FLAG" in line and "allow_anonymous" in line
    assert client.session.user.name is None


def test_allow_anonymous_accepts_it(kerberos, tmp_path):
    settings = load_settings(kerberos, tmp_path, extra="allow_anonymous = true\n")
    assert settings.allow_anonymous
    client = _anonymous_client(kerberos, settings)
    initiator = Initiator(kerberos)
    [(_mtyp, answer)] = frames(_take_after(client, frame(1, initiator.ctx.step())))
    initiator.ctx.step(answer)
    assert initiator.granted(initiator.ask_level(client, 2)) == 2
    assert client.session.user.verified and not client.closing


def _take_after(client: Client, data: bytes) -> bytes:
    client.send(data)
    return client.take()


def test_anonymous_is_refused_by_default(settings):
    assert settings.allow_anonymous is False


def test_session_log_after_failed_request_under_the_layer(kerberos, settings):
    factory, _ = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, 2)
    with capturedLogs() as events:
        client.send(initiator.wrap(b"\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50"))
        assert initiator.unwrap(client.take()) == b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00"
        assert client.closing
        client.lose()
    [line] = session_lines(events)
    assert "user=user method=gssapi" in line and "command not supported" in line


# The layer object itself.


def test_security_layer_wrap_limit_and_round_trip(kerberos, settings):
    factory, _ = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, 2)
    layer = client.session.layer
    assert isinstance(layer, SecurityLayer) and layer.level == 2
    assert 60000 < layer.max_plain < 65535
    encoded = layer.encode(b"x" * (layer.max_plain + 1))
    parts = frames(encoded)
    assert len(parts) == 2 and all(len(token) <= 65535 for _m, token in parts)
    assert initiator.unwrap(encoded) == b"x" * (layer.max_plain + 1)
    with pytest.raises(GSSError):
        initiator.ctx.unwrap(parts[0][1])      # a replay is caught by the client too


# The protection under the session: beneath it, above a haproxy: wrapper.


@pytest.mark.parametrize("when", ["request", "relay"])
def test_a_refused_frame_is_the_sessions_outcome(kerberos, settings, when):
    """The wrapper aborts and hands up why: the session ends with outcome
    "gssapi" and the layer's reason."""
    factory, reactor = make_factory(settings)
    client, initiator = authenticate(kerberos, factory, 2)
    with capturedLogs() as events:
        out = connect(client, initiator, reactor) if when == "relay" else None
        client.send(initiator.wrap(CONNECT_IP if out is None else b"data", conf=False))
        assert client.transport.disconnected, "not aborted"
        client.lose()
        if out is not None:
            assert out.take() == b""
            out.protocol.connectionLost(Failure(error.ConnectionDone()))
    if out is None:
        assert reactor.tcpClients == []
    [line] = session_lines(events)
    assert line.endswith("s gssapi: GSS-API: unencrypted frame in a confidential session"), line


class ProxiedClient(fakes.Client):
    """A client behind a haproxy: listener: its transport delivers to the
    PROXY wrapper, which delivers to the session."""

    def __init__(self, factory) -> None:
        self.bytewise = False
        self.proxied = HAProxyWrappingFactory(factory).buildProtocol(fakes.PEER)
        self.transport = fakes.HalfCloseTransport(hostAddress=fakes.LISTEN,
                                                  peerAddress=fakes.PEER)
        self.transport.protocol = self.proxied
        self.proxied.makeConnection(self.transport)
        self.session = self.proxied.wrappedProtocol


def test_protection_goes_under_the_session_above_haproxy(kerberos, settings):
    registry = method_registry(None, settings)
    factory, reactor = fakes.make_factory([registry["gssapi"]], reactor=MemoryReactorClock(),
                                          trusted_proxies=[parse_network("127.0.0.0/8")])
    client = ProxiedClient(factory)
    client.send(b"PROXY TCP4 127.0.0.9 127.0.0.1 5555 1080\r\n" + GREETING_GSSAPI)
    assert client.take() == b"\x05\x01"
    initiator = Initiator(kerberos)
    initiator.establish(client)
    assert initiator.granted(initiator.ask_level(client, 2)) == 2
    session = client.session
    wrapper = session.transport
    assert isinstance(wrapper, ProtectionWrapper)
    assert client.proxied.wrappedProtocol is wrapper and wrapper.transport is client.proxied
    # Still known as proxied, with the real client from the PROXY header.
    assert session.proxied is client.proxied and session.peer == "127.0.0.9:5555"
    with capturedLogs() as events:
        out = connect(client, initiator, reactor)
        assert not splice.plain_tcp(session.transport, out.transport)
        client.send(initiator.wrap(b"ping"))
        assert out.take() == b"ping"
        out.protocol.connectionLost(Failure(error.ConnectionDone()))
        client.lose()
    [line] = session_lines(events)
    assert line.startswith("127.0.0.9:5555 socks5 user=user method=gssapi connect "), line
    assert line.endswith(" ok"), line
