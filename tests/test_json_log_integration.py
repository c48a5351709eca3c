"""``[log] format = "json"`` in a real twistd: every line it writes (its own
start-up and shut-down lines, socksd's session, rule and identd lines, a
traceback, a worker's lines) is one JSON object, to stdout (``-l -``) and to
a file (``-l FILE``). The formatter and the syslog path: tests/test_json_log.py."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import textwrap

import pytest

from conftest import PAGE, TWISTD
from helpers import wait_until

pytestmark = pytest.mark.integration

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
# A user name over RFC 1929: a line feed and a forged record, a quote, ESC,
# and a byte that is not UTF-8.
HOSTILE_NAME = b'mallory\n{"level":"info","event":"forged"}\x1b[31m\xff'
CONFIG = """\
[server]
checkers = ["memory:alice:pw"]
[[rules]]
action = "allow"
from = ["127.0.0.0/8"]
log = true
[log]
format = "json"
"""


def json_lines(text: str) -> list[dict]:
    """Every line of a log, parsed; a line that is not one JSON object fails."""
    assert text.endswith("\n"), text[-200:]
    lines = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            raise AssertionError(f"not JSON: {line!r}\nin:\n{text}") from None
        assert isinstance(value, dict), line
        assert RFC3339_UTC.fullmatch(value["time"]), line
        assert value["level"] in ("debug", "info", "warn", "error", "critical"), line
        assert isinstance(value["event"], str), line
        lines.append(value)
    return lines


def socks5_userpass(port: int, user: bytes, password: bytes, dest_port: int) -> bool:
    """A SOCKS5 session with RFC 1929: True if it logged in and fetched the page."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\x05\x01\x02")
        assert s.recv(2) == b"\x05\x02"
        s.sendall(bytes((1, len(user))) + user + bytes((len(password),)) + password)
        status = s.recv(2)
        if status != b"\x01\x00":
            return False
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                  + struct.pack("!H", dest_port))
        assert s.recv(10)[:2] == b"\x05\x00"
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data.endswith(PAGE)


def test_dash_l_dash_every_line_is_json(socks_server, http_server):
    server = socks_server(CONFIG, twistd_args=("-l", "-"))
    assert socks5_userpass(server.port, b"alice", b"pw", http_server)
    assert not socks5_userpass(server.port, HOSTILE_NAME, b"wrong", http_server)
    server.wait_for_log(r'"outcome":"auth failed"')
    server.stop()
    lines = json_lines(server.log())

    events = [line["event"] for line in lines]
    assert any(re.fullmatch(r"twistd \S+ \(.* \S+\) starting up\.", e) for e in events)
    assert any(e.startswith("reactor class: ") for e in events)
    assert "Server Shut Down." in events
    assert all("version" not in line for line in lines if "starting up" in line["event"])

    [ok] = [line for line in lines if line.get("outcome") == "ok"]
    assert ok["level"] == "info" and ok["user"] == "alice" and ok["method"] == "userpass"
    assert ok["version"] == 5 and ok["command"] == "connect"
    assert ok["destination"] == f"127.0.0.1:{http_server}"
    assert isinstance(ok["up"], int) and ok["down"] > len(PAGE)
    assert isinstance(ok["duration"], float) and 0 <= ok["duration"] < 30
    assert re.fullmatch(r"127\.0\.0\.1:\d+", ok["peer"]) and "worker" not in ok

    [rule] = [line for line in lines if "rule" in line]
    assert rule["rule"] == "rule 1 (allow)" and rule["user"] == "alice"
    assert rule["event"].endswith("allowed by rule 1 (allow)")

    [refused] = [line for line in lines if line.get("outcome") == "auth failed"]
    assert refused["level"] == "warn"
    assert refused["user"] == HOSTILE_NAME.decode("utf-8", "backslashreplace")
    assert "forged" not in events


BOOM_PLUGIN = textwrap.dedent('''\
    from twisted.cred import error
    from twisted.cred.checkers import ICredentialsChecker
    from twisted.cred.credentials import IUsernamePassword
    from twisted.cred.strcred import ICheckerFactory
    from twisted.internet import defer
    from twisted.plugin import IPlugin
    from zope.interface import implementer


    @implementer(ICredentialsChecker)
    class BoomChecker:
        """pw for anyone; a checker that breaks for the user "boom"."""
        credentialInterfaces = (IUsernamePassword,)

        def requestAvatarId(self, credentials):
            if credentials.username == b"boom":
                return defer.fail(RuntimeError("the password database is on fire"))
            if credentials.password == b"pw":
                return defer.succeed(credentials.username.decode())
            return defer.fail(error.UnauthorizedLogin("wrong"))


    @implementer(ICheckerFactory, IPlugin)
    class BoomCheckerFactory:
        authType = "boom"
        authHelp = "Breaks for the user boom."
        argStringFormat = "No argument."
        credentialInterfaces = (IUsernamePassword,)

        def generateChecker(self, argstring=""):
            return BoomChecker()


    boom = BoomCheckerFactory()
''')


def test_dash_l_file_with_workers_and_a_traceback(tmp_path, http_server):
    """workers = 2: a worker's session lines and its traceback come out of
    the supervisor as JSON, with the worker that sent them; nothing is
    written anywhere but FILE."""
    plugins = tmp_path / "plugin-root" / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "boomchecker.py").write_text(BOOM_PLUGIN)
    config = tmp_path / "socksd.toml"
    config.write_text('[server]\nworkers = 2\ncheckers = ["boom:"]\n[log]\nformat = "json"\n')
    logfile = tmp_path / "socksd.log"
    output = tmp_path / "output"
    with open(output, "wb") as out:
        process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "-l", str(logfile), "socks", "--config", str(config),
             "--listen", "tcp:0:interface=127.0.0.1"], stdout=out, stderr=subprocess.STDOUT,
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(plugins.parent.parent)})
    try:
        def log() -> str:
            return logfile.read_text() if logfile.exists() else ""

        port = int(wait_until(lambda: re.search(r"listening on \S+ \(port (\d+), 2 workers\)",
                                                log()),
                              30, lambda: f"the supervisor to listen:\n{log()}")[1])
        wait_until(lambda: log().count("serving on") == 2, 30,
                   lambda: f"two workers to serve:\n{log()}")
        for _ in range(40):
            assert socks5_userpass(port, b"alice", b"pw", http_server)
        assert not socks5_userpass(port, b"boom", b"pw", http_server)
        wait_until(lambda: '"traceback"' in log(), 15, lambda: f"a traceback:\n{log()}")
        wait_until(lambda: {line.get("worker") for line in json_lines(log())
                            if line.get("outcome") == "ok"} == {0, 1}, 15,
                   lambda: f"both workers' session lines:\n{log()}")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)
    lines = json_lines(log())
    assert output.read_text() == ""

    assert any(line["event"].startswith("twistd ") for line in lines)
    assert "Server Shut Down." in [line["event"] for line in lines]
    ok = [line for line in lines if line.get("outcome") == "ok"]
    assert len(ok) == 40 and all(line["user"] == "alice" for line in ok)
    served = [line for line in lines if "serving on" in line["event"]]
    assert sorted(line["worker"] for line in served) == [0, 1]

    [failure] = [line for line in lines if "traceback" in line]
    assert failure["level"] == "critical" and failure["worker"] in (0, 1)
    assert failure["event"] == "checker failed for boom" and failure["user"] == "boom"
    assert "RuntimeError: the password database is on fire" in failure["traceback"]
    [broken] = [line for line in lines if line.get("user") == "boom" and "outcome" in line]
    assert broken["worker"] == failure["worker"]
    assert "checker error" in broken["detail"]


def test_identd_reads_log_format_from_the_same_file(tmp_path):
    config = tmp_path / "socksd.toml"
    config.write_text('[log]\nformat = "json"\n')
    logfile = tmp_path / "identd.log"
    output = tmp_path / "output"
    with open(output, "wb") as out:
        process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "-l", str(logfile), "identd", "--config", str(config),
             "--listen", "tcp:0:interface=127.0.0.1"], stdout=out, stderr=subprocess.STDOUT,
            cwd=tmp_path)
    try:
        def log() -> str:
            return logfile.read_text() if logfile.exists() else ""

        port = int(wait_until(lambda: re.search(r"IdentFactory starting on (\d+)", log()), 30,
                              lambda: f"the identd to listen:\n{log()}")[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"1, 1\r\n")
            assert s.recv(100).endswith(b"\r\n")
        wait_until(lambda: "asked" in log(), 15, lambda: f"the identd's line:\n{log()}")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)
    lines = json_lines(log())
    assert output.read_text() == ""
    [asked] = [line for line in lines if "asked" in line["event"]]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", asked["peer"]) and asked["level"] == "info"
    assert asked["event"].startswith(f"identd: {asked['peer']} asked '1, 1': '1, 1 : ERROR")
    assert "Server Shut Down." in [line["event"] for line in lines]
