"""Username/password (RFC 1929) end to end: every checker kind named by a
strcred string, a user's own ICheckerFactory plugin, and the README's user
story, all through curl against a real `twistd -n socks`."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import PAGE, TWISTD, require
from socksd.auth.passwd import hash_password

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "socksd.toml"
USERPASS_ONLY = '[server]\nmethods = ["userpass"]\n'
# The one wrong password the tests use: it must never appear in a log.
BAD_PASSWORD = "wrong"


def curl(server, credentials: str | None, url: str, out_file: Path,
         scheme: str = "socks5h") -> tuple[subprocess.CompletedProcess, int | None]:
    """curl through ``server``; returns the result and curl's local port to the proxy."""
    auth = f"{credentials}@" if credentials else ""
    result = subprocess.run(
        [require("curl"), "-sS", "--max-time", "10", "-o", str(out_file),
         "-w", "%{local_port}", "-x", f"{scheme}://{auth}127.0.0.1:{server.port}", url],
        capture_output=True, timeout=15)
    port = result.stdout.decode().strip()
    return result, int(port) if port.isdigit() and port != "0" else None


def assert_login_works(server, user: str, password: str, http_port: int, tmp: Path) -> None:
    body = tmp / "body"
    result, _ = curl(server, f"{user}:{password}", f"http://localhost:{http_port}/", body)
    assert result.returncode == 0, (result.stderr, server.log())
    assert body.read_bytes() == PAGE
    server.wait_for_log(rf"user={re.escape(user)} method=userpass connect "
                        rf"localhost:{http_port} up=\d+ down=\d+ .* ok")


def assert_login_refused(server, user: str, password: str, http_port: int,
                         tmp: Path) -> str:
    """The login fails with curl exit 97 and one log line naming peer and user."""
    result, port = curl(server, f"{user}:{password}", f"http://localhost:{http_port}/",
                        tmp / "body")
    assert result.returncode == 97, (result.stderr, server.log())
    assert port is not None, result
    peer = f"127.0.0.1:{port}"
    server.wait_for_log(rf"{re.escape(peer)} .*auth failed")
    lines = [line for line in server.log().splitlines() if f"{peer} " in line]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "auth failed" in line and f"user={user} " in line, line
    if password not in user:  # else the user name itself would match
        assert password not in server.log(), f"the password {password!r} was logged"
    return line


# Every kind of checker.

def _memory(tmp: Path):
    return USERPASS_ONLY + 'checkers = ["memory:alice:secret"]\n', []


def _plain_file(tmp: Path):
    path = tmp / "users.plain"
    path.write_text("bob:hunter2\nalice:secret\n")
    return USERPASS_ONLY, ["--auth", f"file:{path}"]


def _apache_htpasswd(tmp: Path):
    path = tmp / "users.htpasswd"
    subprocess.run([require("htpasswd"), "-B", "-b", "-c", str(path), "alice", "secret"],
                   check=True, capture_output=True, timeout=30)
    assert path.read_text().startswith("alice:$2y$")
    return USERPASS_ONLY, ["--auth", f"htpasswd:{path}"]


def _socksd_passwd(scheme_flag: list[str], prefix: str):
    def make(tmp: Path):
        path = tmp / "users.hashed"
        lines = []
        for user, password in (("bob", "hunter2"), ("alice", "secret")):
            out = subprocess.run([sys.executable, "-m", "socksd.auth.passwd", *scheme_flag,
                                  user], input=f"{password}\n", text=True,
                                 capture_output=True, timeout=30)
            assert out.returncode == 0, out.stderr
            assert out.stdout.startswith(f"{user}:{prefix}"), out.stdout
            assert password not in out.stdout
            lines.append(out.stdout)
        path.write_text("".join(lines))
        return USERPASS_ONLY, ["--auth", f"htpasswd:{path}"]
    return make


CHECKERS = {
    "memory": _memory,
    "file": _plain_file,
    "htpasswd-apache-bcrypt": _apache_htpasswd,
    "htpasswd-socksd-bcrypt": _socksd_passwd([], "$2b$"),
    "htpasswd-socksd-argon2": _socksd_passwd(["--argon2"], "$argon2id$"),
}


@pytest.mark.parametrize("kind", sorted(CHECKERS))
def test_checker(socks_server, http_server, tmp_path, kind):
    config, args = CHECKERS[kind](tmp_path)
    server = socks_server(config, *args)
    assert_login_works(server, "alice", "secret", http_server, tmp_path)
    assert_login_refused(server, "alice", BAD_PASSWORD, http_server, tmp_path)
    assert_login_refused(server, "mallory", "secret", http_server, tmp_path)
    # No credentials at all: curl offers only "no auth", which is not accepted.
    result, _ = curl(server, None, f"http://localhost:{http_server}/", tmp_path / "body")
    assert result.returncode == 97, result.stderr
    server.wait_for_log(r"no acceptable method")


def test_htpasswd_file_reread_on_each_login(socks_server, http_server, tmp_path):
    path = tmp_path / "users.htpasswd"
    htpasswd = require("htpasswd")
    subprocess.run([htpasswd, "-B", "-b", "-c", str(path), "alice", "secret"],
                   check=True, capture_output=True, timeout=30)
    server = socks_server(USERPASS_ONLY, "--auth", f"htpasswd:{path}")
    assert_login_refused(server, "carol", "s3cret", http_server, tmp_path)
    subprocess.run([htpasswd, "-B", "-b", str(path), "carol", "s3cret"],
                   check=True, capture_output=True, timeout=30)
    assert_login_works(server, "carol", "s3cret", http_server, tmp_path)


def test_auth_without_methods_requires_password(socks_server, http_server, tmp_path):
    """--auth given while the config does not set methods makes userpass required."""
    path = tmp_path / "users.plain"
    path.write_text("alice:secret\n")
    server = socks_server(None, "--auth", f"file:{path}")
    assert_login_works(server, "alice", "secret", http_server, tmp_path)
    result, _ = curl(server, None, f"http://localhost:{http_server}/", tmp_path / "body")
    assert result.returncode == 97, result.stderr


def test_relative_paths_in_the_config_are_its_folders(socks_server, http_server, tmp_path):
    """systemd starts a service in /: a config naming ``htpasswd:users``
    next to it reads that file, not /users."""
    (tmp_path / "users").write_bytes(b"alice:" + hash_password(b"secret") + b"\n")
    (tmp_path / "plain").write_text("bob:hunter2\n")
    server = socks_server(USERPASS_ONLY + 'checkers = ["htpasswd:users", "file:plain"]\n',
                          cwd=Path("/"))
    assert_login_works(server, "alice", "secret", http_server, tmp_path)
    assert_login_works(server, "bob", "hunter2", http_server, tmp_path)


# The README's user story.

def test_example_config_with_auth_file(socks_server, http_server, tmp_path):
    """`twistd -n socks --config examples/socksd.toml --auth file:users.passwd`."""
    (tmp_path / "users.passwd").write_text("alice:fromfile\nbob:hunter2\n")
    server = socks_server(EXAMPLE.read_text(), "--auth", "file:users.passwd")
    # alice from the --auth file (the config's memory checker is asked first).
    assert_login_works(server, "alice", "fromfile", http_server, tmp_path)
    # bob logs in, but the example's rules allow only alice.
    result, _ = curl(server, "bob:hunter2", f"http://localhost:{http_server}/",
                     tmp_path / "body")
    assert result.returncode == 97 and b"(2)" in result.stderr, result.stderr
    server.wait_for_log(rf"user=bob method=userpass connect localhost:{http_server} .*denied")
    # Rule 1 denies blocked.example before any lookup.
    result, _ = curl(server, "alice:fromfile", "http://blocked.example/", tmp_path / "body")
    assert result.returncode == 97 and b"(2)" in result.stderr, result.stderr
    server.wait_for_log(r"user=alice .*connect blocked\.example:80 .*denied.*rule 1")
    assert_login_refused(server, "alice", BAD_PASSWORD, http_server, tmp_path)
    # alice from the config's own checkers (memory:alice:secret).
    assert_login_works(server, "alice", "secret", http_server, tmp_path)


def test_example_config_with_auth_file_checks(tmp_path):
    (tmp_path / "users.passwd").write_text("alice:fromfile\n")
    out = subprocess.run([TWISTD, "socks", "--config", str(EXAMPLE), "--auth",
                          "file:users.passwd", "--check"], capture_output=True, text=True,
                         timeout=30, cwd=tmp_path)
    output = out.stdout + out.stderr
    assert out.returncode == 0, output
    assert "2 checker(s)" in output and "Traceback" not in output, output


# A user's own checker plugin.

PLUGIN = textwrap.dedent('''
    """A checker whose password is the user name reversed (test plugin)."""

    from zope.interface import implementer

    from twisted.cred import error
    from twisted.cred.checkers import ICredentialsChecker
    from twisted.cred.credentials import IUsernamePassword
    from twisted.cred.strcred import ICheckerFactory
    from twisted.internet import defer
    from twisted.plugin import IPlugin


    def _text(value):
        return value.decode("utf-8") if isinstance(value, bytes) else value


    @implementer(ICredentialsChecker)
    class ReversedNameChecker:
        credentialInterfaces = (IUsernamePassword,)

        def requestAvatarId(self, credentials):
            name = _text(credentials.username)
            if name and _text(credentials.password) == name[::-1]:
                return defer.succeed(name)
            return defer.fail(error.UnauthorizedLogin("not the reversed name"))


    @implementer(ICheckerFactory, IPlugin)
    class ReversedNameCheckerFactory:
        authType = "mychecker"
        authHelp = "Accepts a user whose password is the user name reversed."
        argStringFormat = "No argument."
        credentialInterfaces = (IUsernamePassword,)

        def generateChecker(self, argstring=""):
            return ReversedNameChecker()


    mychecker = ReversedNameCheckerFactory()
''')


@pytest.fixture
def plugin_path(tmp_path) -> str:
    """A directory with twisted/plugins/mychecker.py and no __init__.py files."""
    root = tmp_path / "plugin-root"
    plugins = root / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "mychecker.py").write_text(PLUGIN)
    assert not (root / "twisted" / "__init__.py").exists()
    assert not (plugins / "__init__.py").exists()
    return str(root)


@pytest.mark.parametrize("where", ["--auth", "config"])
def test_custom_checker_plugin(socks_server, http_server, tmp_path, plugin_path, where):
    env = {"PYTHONPATH": plugin_path}
    if where == "--auth":
        server = socks_server(None, "--auth", "mychecker:", env=env)
    else:
        server = socks_server(USERPASS_ONLY + 'checkers = ["mychecker:"]\n', env=env)
    assert_login_works(server, "alice", "ecila", http_server, tmp_path)
    assert_login_refused(server, "alice", "alice", http_server, tmp_path)


def test_help_auth_lists_checkers(tmp_path, plugin_path):
    out = subprocess.run([TWISTD, "socks", "--help-auth"], capture_output=True, text=True,
                         timeout=30, cwd=tmp_path)
    output = out.stdout + out.stderr
    assert out.returncode == 0, output
    assert "htpasswd" in output and "Traceback" not in output, output
    assert "mychecker" not in output
    # A plugin on PYTHONPATH is listed too.
    out = subprocess.run([TWISTD, "socks", "--help-auth"], capture_output=True, text=True,
                         timeout=30, cwd=tmp_path, env={**__import__("os").environ,
                                                        "PYTHONPATH": plugin_path})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "mychecker" in out.stdout + out.stderr


@pytest.mark.parametrize("auth, message", [
    ("nosuchchecker:x", r"not recognized: nosuchchecker"),
    ("htpasswd:/nonexistent/users", r"No such file or directory.*/nonexistent/users"),
])
def test_bad_auth_option(tmp_path, auth, message):
    out = subprocess.run([TWISTD, "-n", "--pidfile=", "socks", "--listen",
                          "tcp:0:interface=127.0.0.1", "--auth", auth],
                         capture_output=True, text=True, timeout=30, cwd=tmp_path)
    output = out.stdout + out.stderr
    assert out.returncode != 0, output
    assert "Traceback" not in output, output
    assert re.search(message, output), output
