"""The SOCKS4 and SOCKS5 handshakes on their own, against a fake owner: what
they ask of a session is the RequestOwner contract and nothing else."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs

from socksd.auth import ANONYMOUS, User
from socksd.auth.methods import NoAuth
from socksd.proxy import Session, Socks4Policy, connect
from socksd.proxy.handshake import RequestOwner
from socksd.proxy.socks4 import Socks4Handshake
from socksd.proxy.socks5 import REPLY_FOR, Socks5Handshake
from socksd.rules import parse_ip
from socksd.wire import socks4, socks5


class FakeOwner:
    """A RequestOwner that records what it is asked; requests wait on
    Deferreds the test fires."""

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.peer = "127.0.0.1:40000"
        self.client = parse_ip("127.0.0.1")
        self.client_key: str | None = "127.0.0.1"
        self.notes: dict[str, str] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.requests: list[defer.Deferred] = []

    def note(self, *, method=None, command=None, detail=None) -> None:
        self.notes.update({k: v for k, v in
                           (("method", method), ("command", command), ("detail", detail))
                           if v is not None})

    def _call(self, *call: Any) -> None:
        self.calls.append(call)

    def authenticated(self, method, avatar, layer=None):
        self._call("authenticated", method, avatar)

    def authentication_failed(self, method, user, reason):
        self._call("authentication_failed", method, user, reason)

    def _request(self, *call: Any) -> defer.Deferred:
        self._call(*call)
        self.requests.append(defer.Deferred())
        return self.requests[-1]

    def connect(self, host, port, by_name):
        return self._request("connect", host, port, by_name)

    def bind(self, host, port, by_name):
        return self._request("bind", host, port, by_name)

    def udp_associate(self, host, port):
        return self._request("udp", host, port)

    def start_relay(self, end, reply, early=b""):
        self._call("start_relay", end, reply, early)

    def connect_failed(self, failed):
        self._call("connect_failed", failed.reason)

    def fail(self, outcome, detail="", abort=False):
        self._call("fail", outcome, detail)


class FakeEnd:
    announced = None     # a BIND's peer as an upstream named it (bind.Incoming)

    def __init__(self) -> None:
        self.transport = StringTransport(hostAddress=IPv4Address("TCP", "10.0.0.5", 51000),
                                         peerAddress=IPv4Address("TCP", "10.0.0.9", 80))


def test_the_contract_is_what_the_session_and_the_fake_offer():
    for owner in (Session, FakeOwner()):
        for name in ("note", "authenticated", "authentication_failed", "connect", "bind",
                     "udp_associate", "start_relay", "connect_failed", "fail"):
            assert callable(getattr(owner, name)), name
    assert set(RequestOwner.__annotations__) == {"transport", "peer", "client"}
    assert isinstance(RequestOwner.client_key, property)


def socks5_handshake(owner: FakeOwner) -> Socks5Handshake:
    methods = [NoAuth()]

    def choose(offered: bytes):
        return next((m for m in methods if m.code in offered), None)

    return Socks5Handshake(owner, choose, MemoryReactorClock(), 30.0)


def test_socks5_connect_is_asked_of_the_owner_and_relayed():
    owner = FakeOwner()
    handshake = socks5_handshake(owner)
    handshake.data_received(b"\x05\x01\x00" + b"\x05\x01\x00\x03\x07example\x00\x50early")
    assert owner.transport.value() == b"\x05\x00"
    assert owner.notes == {"method": "none"}
    assert owner.calls == [("authenticated", "none", ANONYMOUS),
                           ("connect", "example", 80, True)]
    end = FakeEnd()
    owner.requests[0].callback(end)
    reply = socks5.encode_reply(socks5.SUCCEEDED, "10.0.0.5", 51000)
    assert owner.calls[-1] == ("start_relay", end, reply, b"early")


@pytest.mark.parametrize("reason, code", sorted(REPLY_FOR.items()))
def test_socks5_failures_map_to_their_reply(reason, code):
    owner = FakeOwner()
    handshake = socks5_handshake(owner)
    handshake.data_received(b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50")
    owner.transport.clear()
    owner.requests[0].errback(connect.ConnectFailed(reason, "why"))
    assert owner.transport.value() == socks5.encode_reply(code)
    assert owner.calls[-1] == ("connect_failed", reason)


def test_socks5_bind_replies_twice():
    owner = FakeOwner()
    handshake = socks5_handshake(owner)
    handshake.data_received(b"\x05\x01\x00\x05\x02\x00\x01\x0a\x00\x00\x09\x00\x15")
    assert owner.calls[-1] == ("bind", "10.0.0.9", 21, False)
    waiter = type("Waiter", (), {"bound": ("10.0.0.5", 51000),
                                 "accepted": defer.Deferred()})()
    owner.transport.clear()
    owner.requests[0].callback(waiter)
    assert owner.transport.value() == socks5.encode_reply(socks5.SUCCEEDED, "10.0.0.5", 51000)
    end = FakeEnd()
    waiter.accepted.callback(end)
    reply = socks5.encode_reply(socks5.SUCCEEDED, "10.0.0.9", 80)
    assert owner.calls[-1] == ("start_relay", end, reply, b"")


def test_socks5_unknown_command_is_noted_and_refused():
    owner = FakeOwner()
    socks5_handshake(owner).data_received(
        b"\x05\x01\x00\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50")
    assert owner.notes["command"] == "0x09"
    assert owner.transport.value().endswith(socks5.encode_reply(socks5.COMMAND_NOT_SUPPORTED))
    assert owner.calls[-1] == ("fail", "command not supported", "0x09")


def test_socks5_no_acceptable_method():
    owner = FakeOwner()
    socks5_handshake(owner).data_received(b"\x05\x01\x02")
    assert owner.transport.value() == b"\x05\xff"
    assert owner.calls == [("fail", "no acceptable method", "offered 2")]


def socks4_request(command: int = socks4.CONNECT, userid: bytes = b"fred") -> bytes:
    return bytes((4, command)) + b"\x00\x50\x7f\x00\x00\x01" + userid + b"\x00"


def test_socks4_connect_is_asked_of_the_owner_and_relayed():
    owner = FakeOwner()
    handshake = Socks4Handshake(owner, Socks4Policy(), MemoryReactorClock())
    handshake.data_received(socks4_request())
    assert owner.notes == {"method": "trust"}
    assert owner.calls == [("authenticated", "trust", User("fred", verified=False)),
                           ("connect", "127.0.0.1", 80, False)]
    end = FakeEnd()
    owner.requests[0].callback(end)
    reply = socks4.encode_reply(socks4.GRANTED, "10.0.0.5", 51000)
    assert owner.calls[-1] == ("start_relay", end, reply, b"")


def test_socks4_failure_replies_91():
    owner = FakeOwner()
    Socks4Handshake(owner, Socks4Policy(), MemoryReactorClock()).data_received(socks4_request())
    owner.requests[0].errback(connect.ConnectFailed(connect.REFUSED))
    assert owner.transport.value() == socks4.encode_reply(socks4.REJECTED)
    assert owner.calls[-1] == ("connect_failed", connect.REFUSED)


def test_socks4_whitelist_refusal_is_an_authentication_failure():
    owner = FakeOwner()
    policy = Socks4Policy(userid="whitelist", whitelist=frozenset({"alice"}))
    Socks4Handshake(owner, policy, MemoryReactorClock()).data_received(socks4_request())
    assert owner.transport.value() == socks4.encode_reply(socks4.REJECTED)
    assert owner.calls == [("authentication_failed", "whitelist", "fred",
                            "USERID not in whitelist")]


def test_socks4_an_unexpected_failure_checking_the_userid_replies_91_at_once(monkeypatch):
    """A bug in the check is not the client's doing: it gets 91 now (not at
    the handshake timeout), and the failure is logged with its traceback."""
    owner = FakeOwner()
    policy = Socks4Policy(userid="ident")
    handshake = Socks4Handshake(owner, policy, MemoryReactorClock())

    def broken(*args, **kwargs):
        return defer.fail(RuntimeError("boom"))

    monkeypatch.setattr("socksd.ident.client.query", broken)
    with capturedLogs() as events:
        handshake.data_received(socks4_request())
    assert owner.transport.value() == socks4.encode_reply(socks4.REJECTED)
    assert owner.calls == [("fail", "error", "checking the USERID: boom")]
    [event] = [e for e in events if "log_failure" in e]
    assert event["log_failure"].check(RuntimeError)
