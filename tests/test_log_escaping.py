"""No client-supplied string reaches a log line unescaped (audit, issue 13).

A user name (RFC 1929, a SOCKS4 USERID, a GSS-API principal), a destination
name (SOCKS4a, SOCKS5, UDP), what a client's identd said, and what the identd
is asked and answers: each is written through socksd.escape. A line feed in
one used to forge a whole log record (``--syslog`` splits on it); ESC
restyled the terminal of whoever read the log. The session's structured
fields stay raw, for observers that encode them their own way.

In-memory sessions first (every path), then a real ``twistd socks``.
"""

from __future__ import annotations

import socket
import struct

import gssapi
import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import error
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

import fakes
from conftest import PAGE, recv_exact, recv_until_eof
from fakes import Client, session_lines
from socksd.auth import SOCKSRealm
from socksd.auth.checkers import FirstOf
from socksd.auth.registry import method_registry
from socksd.ident.policy import IdentPolicy
from socksd.ident.registry import ProxiedConnections
from socksd.proxy import Socks4Policy
from socksd.rules import RuleSet, compile_rule
from socksd.wire import socks5

# Looks like the end of one record and a whole second one; no ':' (memory:
# checker strings split on it).
FORGED = ("mallory\n2026-01-01T00.00.00+0000 [socksd#info] 127.0.0.1.1 socks5 user=admin "
          "method=userpass connect 10.0.0.1.22 up=0 down=0 0.001s ok\x1b[31m")
FORGED_ESCAPED = ("mallory\\n2026-01-01T00.00.00+0000\\x20[socksd#info]\\x20127.0.0.1.1\\x20"
                  "socks5\\x20user=admin\\x20method=userpass\\x20connect\\x2010.0.0.1.22\\x20"
                  "up=0\\x20down=0\\x200.001s\\x20ok\\x1b[31m")
# A SOCKS4 USERID: any bytes but NUL; \xff is not UTF-8.
USERID = b"bob\r\n2026 socks4 user=admin\x1b[31m\xff"
USERID_ESCAPED = "bob\\r\\n2026\\x20socks4\\x20user=admin\\x1b[31m\\udcff"
# A destination name passes the wire checks (printable, no space) and still
# holds a backslash and a Hangul filler, which is drawn as nothing.
NAME = "a\\nb\u3164.example"
NAME_ESCAPED = "a\\\\nb\\u3164.example"


def assert_clean(text: str) -> None:
    """No line break, no terminal escape, nothing invisible."""
    assert all(c.isprintable() for c in text), repr(text)
    assert "\u3164" not in text, repr(text)


def one_line(events) -> tuple[str, dict]:
    [event] = [e for e in events
               if e.get("log_namespace") == "socksd" and "outcome" in e and "up" in e]
    [line] = session_lines([event])
    assert_clean(line)
    return line, event


def userpass_factory(name: bytes, password: bytes = b"pw"):
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.addUser(name, password)
    registry = method_registry(Portal(SOCKSRealm(), [FirstOf([checker])]))
    return fakes.make_factory(methods=[registry["userpass"]])


def rfc1929(name: bytes, password: bytes) -> bytes:
    return bytes((1, len(name))) + name + bytes((len(password),)) + password


CONNECT_IP = b"\x05\x01\x00\x01" + socket.inet_aton("93.184.216.34") + struct.pack("!H", 80)


# The session's line.


def test_rfc1929_user_name_is_escaped_in_the_session_line():
    factory, reactor = userpass_factory(FORGED.encode())
    client = Client(factory)
    with capturedLogs() as events:
        client.send(b"\x05\x01\x02" + rfc1929(FORGED.encode(), b"pw"))
        assert client.take() == b"\x05\x02\x01\x00"
        client.send(CONNECT_IP)
        out = fakes.Outbound(reactor)
        out.accept()
        assert client.take()[:2] == b"\x05\x00"
        fakes.relay_until_far_end_closes(client, out)
        client.lose()
    line, event = one_line(events)
    assert f" socks5 user={FORGED_ESCAPED} method=userpass connect 93.184.216.34:80 " in line
    assert event["user"] == FORGED     # raw for structured observers


def test_rfc1929_claimed_user_is_escaped_when_login_fails():
    factory, _ = userpass_factory(b"alice")
    client = Client(factory)
    with capturedLogs() as events:
        client.send(b"\x05\x01\x02" + rfc1929(FORGED.encode(), b"pw"))
        assert client.take() == b"\x05\x02\x01\x01"
        client.lose()
    line, event = one_line(events)
    assert f" user={FORGED_ESCAPED} method=userpass " in line and "auth failed" in line
    assert event["user"] == FORGED


def test_socks4_userid_is_escaped():
    factory, reactor = fakes.make_factory()
    client = Client(factory)
    with capturedLogs() as events:
        client.send(b"\x04\x01\x00\x50" + socket.inet_aton("93.184.216.34") + USERID + b"\x00")
        fakes.Outbound(reactor).refuse(error.ConnectionRefusedError())
        client.lose()
    line, event = one_line(events)
    assert f" socks4 user={USERID_ESCAPED} method=trust connect " in line
    assert event["user"] == USERID.decode("utf-8", "surrogateescape")


# Names: socksd.wire.names refuses a name with anything but letters, digits,
# "-" and "_" before it is looked up, matched or logged (issue 13, item 7):
# such a name never reaches a line; the refusal's line stays clean.


def test_socks4a_name_with_a_line_feed_is_refused_unlogged():
    factory, reactor = fakes.make_factory()
    client = Client(factory)
    with capturedLogs() as events:
        client.send(b"\x04\x01\x00\x50\x00\x00\x00\x01fred\x00" + NAME.encode() + b"\x00")
        assert client.take()[:2] == b"\x00\x5b"          # 91
        assert reactor.nameResolver.names == []
        client.lose()
    line, _event = one_line(events)
    assert_clean(line)
    assert "bad domain name" in line and "example" not in line


def test_socks5_name_with_a_line_feed_is_refused_unlogged():
    factory, reactor = fakes.make_factory()
    raw = NAME.encode()
    request = b"\x05\x01\x00\x03" + bytes((len(raw),)) + raw + struct.pack("!H", 443)
    with capturedLogs() as events:
        client = fakes.socks5_client(factory, request)
        client.lose()
    line, _event = one_line(events)
    assert_clean(line)
    assert "bad domain name" in line and "example" not in line


def test_udp_name_with_a_line_feed_is_dropped_unlogged():
    from test_bind_udp_session import associate, make_factory
    rules = RuleSet([compile_rule("dns", "allow", commands=["udp"], ports=["53"], log=True),
                     compile_rule("loopback", "allow", sources=["127.0.0.0/8"])])
    factory, reactor = make_factory(rules=rules)
    with capturedLogs() as events:
        client, relay, port = associate(factory)
        relay.datagramReceived(socks5.encode_udp(NAME, 53, b"q"), ("127.0.0.1", 6000))
    assert port.take() == [] and reactor.nameResolver.names == []
    assert relay.counts["dropped"] == 1
    assert not [e for e in events if "allowed by" in (formatEvent(e) or "")]


def test_a_user_name_with_a_space_cannot_add_a_field():
    factory, reactor = userpass_factory(b"x user=admin")
    client = Client(factory)
    with capturedLogs() as events:
        client.send(b"\x05\x01\x02" + rfc1929(b"x user=admin", b"pw"))
        client.send(CONNECT_IP)
        client.lose()
    line, _ = one_line(events)
    assert " user=x\\x20user=admin method=userpass " in line
    assert line.count("user=") == 2     # the field, and the name's own text


def test_what_the_clients_identd_said_is_escaped():
    # socksd.proxy.socks4 / socksd.ident.client: the identd on the client's
    # host is the client's; its answer ends up in the session's line.
    from test_socks4_session import Client as Client4
    from test_socks4_session import answer_identd, ident_userid
    factory, reactor = fakes.make_factory(socks4=Socks4Policy(userid="ident"))
    client = Client4(factory)
    with capturedLogs() as events:
        client.send(b"\x04\x01\x00\x50" + socket.inet_aton("93.184.216.34") + b"fred\x00")
        answer_identd(reactor, ident_userid("barney\u3164\\x1b"))
        client.lose()
    line, event = one_line(events)
    assert line.endswith("auth failed: identd says 'barney\\u3164\\\\x1b'"), line
    assert event["detail"] == "identd says 'barney\u3164\\x1b'"


@pytest.mark.integration
def test_gssapi_principal_is_escaped(kerberos, tmp_path):
    from test_gssapi_session import (
        CLIENT_FLAGS,
        GREETING_GSSAPI,
        Initiator,
        load_settings,
        make_factory,
    )
    principal = "e\x1b[31mvil"
    realm = kerberos.realm
    # Double quotes: kadmin's own quoting (k5test's shlex quotes are not).
    realm.run_kadminl(f'addprinc -pw pw "{principal}"')
    name = gssapi.Name(f"{principal}@{realm.realm}", gssapi.NameType.kerberos_principal)
    creds = gssapi.raw.acquire_cred_with_password(name, b"pw", usage="initiate").creds
    initiator = Initiator(kerberos)
    initiator.ctx = gssapi.SecurityContext(
        name=gssapi.Name(f"rcmd@{realm.hostname}", gssapi.NameType.hostbased_service),
        usage="initiate", flags=CLIENT_FLAGS, creds=gssapi.Credentials(creds))
    factory, _ = make_factory(load_settings(kerberos, tmp_path))
    client = Client(factory)
    with capturedLogs() as events:
        client.send(GREETING_GSSAPI)
        assert client.take() == b"\x05\x01"
        initiator.establish(client)
        initiator.granted(initiator.ask_level(client, 1))
        client.lose()
    texts = [formatEvent(e) for e in events]
    for text in texts:
        assert_clean(text)
    [gss] = [t for t in texts if " gssapi: " in t]
    assert gss == (f"127.0.0.1:40000 gssapi: e\\x1b[31mvil@{realm.realm} as e\\x1b[31mvil, "
                   "protection 1")
    line, event = one_line(events)
    assert " user=e\\x1b[31mvil method=gssapi " in line
    assert event["user"] == principal


# The identd's own lines: the query is the client's; a SOCKS user's name
# (proxied_users) and notes about it are in the reply.


@pytest.mark.parametrize("reply", ["name", "random"])
def test_identd_log_escapes_a_socks_users_name(reply):
    from test_identd_protocol import LOCAL, REMOTE, ask, make_factory
    registry = ProxiedConnections()
    registry.add(LOCAL, 6193, REMOTE, 23, "al\u3164ice\\")
    registry.add(LOCAL, 6194, REMOTE, 23, "bob\ncannot be sent")
    policy = IdentPolicy(hash_key=b"k", proxied_reply=reply)
    with capturedLogs() as events:
        ask(make_factory(policy, registry=registry), b"6193, 23\r\n6194, 23\r\n")
    texts = [formatEvent(e) for e in events if "identd" in (formatEvent(e) or "")]
    assert len(texts) == 2, texts
    for text in texts:
        assert_clean(text)
    if reply == "name":
        assert "USERID : UNIX : al\\u3164ice\\\\'" in texts[0]
    else:
        assert "(random for al\\u3164ice\\\\)" in texts[0]
    assert "bob\\ncannot be sent" in texts[1]


def test_identd_log_escapes_the_query():
    from test_identd_protocol import connect, make_factory
    proto, _transport = connect(make_factory())
    with capturedLogs() as events:
        proto.dataReceived(b"\x1b[31m\xff" + "\u3164".encode() + b"\r\n")
        proto.connectionLost(Failure(error.ConnectionDone()))
    [text] = [formatEvent(e) for e in events if "malformed" in (formatEvent(e) or "")]
    assert_clean(text)
    assert "(first '\\x1b[31m\\udcff\\u3164')" in text


# A real twistd socks, its log file.


def session_log_lines(log: str, version: str) -> list[str]:
    """Every line that looks like a session's, forged ones included."""
    return [line for line in log.splitlines() if f" {version} user=" in line]


def assert_log_clean(log: str) -> None:
    assert "\x1b" not in log and "\r" not in log and "\u3164" not in log, log
    assert "\n\t" not in log, log    # twistd's mark of a message that held a line feed


@pytest.mark.integration
def test_twistd_escapes_a_forged_user_name(socks_server, http_server):
    toml_name = FORGED.replace("\n", "\\n").replace("\x1b", "\\u001b")
    server = socks_server(f'[server]\nmethods = ["userpass"]\n'
                          f'checkers = ["memory:{toml_name}:pw"]\n')
    with socket.create_connection(server.address, timeout=10) as s:
        s.sendall(b"\x05\x01\x02" + rfc1929(FORGED.encode(), b"pw"))
        assert recv_exact(s, 4) == b"\x05\x02\x01\x00"
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                  + struct.pack("!H", http_server) + b"GET / HTTP/1.0\r\n\r\n")
        assert recv_exact(s, 10)[:2] == b"\x05\x00"
        assert PAGE in recv_until_eof(s)
    server.wait_for_log(r" ok\n")
    log = server.log()
    [line] = session_log_lines(log, "socks5")
    assert (f" socks5 user={FORGED_ESCAPED} method=userpass connect 127.0.0.1:{http_server} "
            in line), line
    assert line.endswith(" ok"), line
    assert_log_clean(log)


@pytest.mark.integration
def test_twistd_escapes_a_socks4_userid_and_names(socks_server):
    # Port 9 is denied whatever the name: no lookup, a line at once.
    server = socks_server('[[rules]]\naction = "deny"\nports = [9]\n'
                          '[[rules]]\naction = "allow"\nfrom = ["127.0.0.0/8"]\n')
    name = NAME.encode()
    requests = [
        ("socks4", b"\x04\x01\x00\x09" + socket.inet_aton("127.0.0.1") + USERID + b"\x00"),
        ("socks4", b"\x04\x01\x00\x09\x00\x00\x00\x01fred\x00" + name + b"\x00"),
        ("socks5", b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes((len(name),)) + name
         + b"\x00\x09"),
    ]
    refused = [b"\x00\x5b" + bytes(6),                          # 91, denied by rule 1
               b"\x00\x5b" + bytes(6),                          # 91, a name no resolver takes
               b"\x05\x00" + b"\x05\x04\x00\x01" + bytes(6)]   # 0x04, likewise
    for (_version, request), answer in zip(requests, refused, strict=True):
        with socket.create_connection(server.address, timeout=10) as s:
            s.sendall(request)
            assert recv_until_eof(s) == answer
    server.wait_for_log(r"(?s)denied: .*bad domain name.*bad domain name")
    log = server.log()
    assert_log_clean(log)
    lines = session_log_lines(log, "socks4")
    assert len(lines) == 2, lines
    assert f" socks4 user={USERID_ESCAPED} method=trust connect 127.0.0.1:9 " in lines[0]
    assert " bad request: SOCKS4a host name: bad domain name: " in lines[1]
    [line] = session_log_lines(log, "socks5")
    assert " bad request: request: bad domain name: " in line
