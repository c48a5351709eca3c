"""Running as root, and secrets other local users can read (audit, issue 13).

* ``twistd socks``/``twistd identd`` started as root without ``-u`` keeps
  root for every client it serves: a warning at start names ``-u/--uid``.
* ``--auth memory:alice:secret`` was copied onto every worker's command line,
  which every local user reads (``ps``): workers get it on stdin now.
* A keytab, a password file (``file:``, ``htpasswd:``) or a config holding
  ``memory:`` passwords that every local user can read: a warning names it.
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

import conftest
from conftest import TWISTD, require
from helpers import wait_until
from socksd.auth.passwd import hash_password
from socksd.tap.security import readable_by_others, root_warning
from test_workers import _worker_pids as worker_pids

ROOT_WARNING = "running as root: twistd was given no -u/--uid"
READABLE = "is readable by every local user"
NOBODY = ("-u", "65534", "-g", "65534")


# Unit: what is said, and when.


def test_root_warning_names_the_options():
    message = root_warning("socks", uid=0, euid=0)
    assert message.startswith(ROOT_WARNING)
    assert "-u/--uid and -g/--gid" in message and "twistd -u nobody -g nogroup socks" in message


def test_a_real_uid_of_root_is_warned_about_too():
    message = root_warning("identd", uid=0, euid=65534)
    assert "real uid is still root (twistd --euid)" in message and "-u/--uid" in message


def test_no_root_warning_for_another_user():
    assert root_warning("socks", uid=65534, euid=65534) is None


@pytest.fixture
def open_dir():
    """A directory every local user may search (tmp_path's parents are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="socksd-security-"))
    path.chmod(0o755)
    assert os.stat("/tmp").st_mode & stat.S_IXOTH
    yield path
    shutil.rmtree(path)


def test_readable_by_others(open_dir, tmp_path):
    secret = open_dir / "secret"
    secret.write_text("x")
    secret.chmod(0o644)
    assert readable_by_others(str(secret))
    secret.chmod(0o640)
    assert not readable_by_others(str(secret))
    # World-readable, but in a directory others cannot enter.
    closed = open_dir / "closed"
    closed.mkdir(mode=0o711)
    (closed / "inner").mkdir(mode=0o700)
    hidden = closed / "inner" / "secret"
    hidden.write_text("x")
    hidden.chmod(0o644)
    assert not readable_by_others(str(hidden))
    assert not readable_by_others(str(open_dir / "missing"))


# twistd as root, or not.


@pytest.fixture
def as_root(monkeypatch, tmp_path):
    """twistd runs as uid 0: directly when the suite runs as root, else in a
    user namespace mapping this user to root (util-linux unshare)."""
    if os.geteuid() != 0:
        wrapper = tmp_path / "twistd-as-root"
        wrapper.write_text(f'#!/bin/sh\nexec {require("unshare")} --user --map-root-user '
                           f'{TWISTD} "$@"\n')
        wrapper.chmod(0o755)
        monkeypatch.setattr(conftest, "TWISTD", str(wrapper))


def not_root() -> tuple[str, ...]:
    """twistd options that leave it running as somebody else than root."""
    return NOBODY if os.geteuid() == 0 else ()


def root_warnings(log: str) -> list[str]:
    """Warning lines about root. Not the word "root" anywhere: the project's
    own path may hold it (a clone in /root puts it in twistd's first line)."""
    return [line for line in log.splitlines() if "#warn]" in line and "root" in line]


def socks5_no_method(server) -> None:
    """A session (no acceptable method) and its line: by then twistd's
    startService has run."""
    with socket.create_connection(server.address, timeout=10) as s:
        s.sendall(b"\x05\x01\x7f")
        assert s.recv(2) == b"\x05\xff"
    server.wait_for_log(r"no acceptable method")


@pytest.mark.integration
def test_twistd_socks_as_root_warns(as_root, socks_server):
    server = socks_server()
    line = server.wait_for_log(rf"\[socksd#warn\] {re.escape(ROOT_WARNING)}.*\n")[0]
    assert "-g/--gid" in line


@pytest.mark.integration
def test_twistd_socks_with_uid_does_not_warn(socks_server):
    server = socks_server(None, twistd_args=not_root())
    socks5_no_method(server)
    if os.geteuid() == 0:
        assert "set uid/gid 65534/65534" in server.log()
    assert not root_warnings(server.log())


def start_identd(tmp_path: Path, *twistd_args: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "identd.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([conftest.TWISTD, "-n", "--pidfile=", *twistd_args,
                                    "identd", "--listen", "tcp:0:interface=127.0.0.1"],
                                   stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    def listening():
        match = re.search(r"IdentFactory starting on (\d+)", log.read_text())
        assert match or process.poll() is None, log.read_text()
        return match

    match = wait_until(listening, 30, log.read_text)
    return process, log, int(match[1])


def identd_log_after_a_query(tmp_path: Path, *twistd_args: str) -> str:
    """The log once a query was answered (startService has run by then)."""
    process, log, port = start_identd(tmp_path, *twistd_args)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"1, 1\r\n")
            assert s.recv(100).endswith(b" : ERROR : NO-USER\r\n")
        wait_until(lambda: "asked" in log.read_text(), 10, log.read_text)
        return log.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)


@pytest.mark.integration
def test_twistd_identd_as_root_warns(as_root, tmp_path):
    text = identd_log_after_a_query(tmp_path)
    assert re.search(rf"\[socksd#warn\] {re.escape(ROOT_WARNING)}.* identd ", text), text


@pytest.mark.integration
def test_twistd_identd_with_uid_does_not_warn(tmp_path):
    text = identd_log_after_a_query(tmp_path, *not_root())
    assert "asked" in text and not root_warnings(text), text


# Files read after -u/-g: checked at start as that user.


@pytest.mark.integration
@pytest.mark.parametrize("check", [True, False], ids=["check", "start"])
def test_a_root_only_password_file_stops_a_twistd_that_drops_root(open_dir, tmp_path, check):
    """Read at every login, after twistd became nobody: each login would
    fail with a PermissionError traceback."""
    assert os.geteuid() == 0, "the test starts twistd as root: run it as root (CI does)"
    users = htpasswd(open_dir / "users", 0o600)
    out = subprocess.run([TWISTD, "-n", "--pidfile=", "-u", "nobody", "-g", "nogroup", "socks",
                          "--config", str(write_config(open_dir)), "--listen",
                          "tcp:0:interface=127.0.0.1", *(["--check"] if check else [])],
                         capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode != 0 and out.stdout == "", out
    assert out.stderr == (
        f"socksd: {open_dir}/socksd.toml:3: server.checkers[0]: 'htpasswd:{users}': {users} "
        "cannot be read as nobody:nogroup (uid 65534, gid 65534), whom twistd -u/-g runs "
        "socksd as (Permission denied): every login would fail; make it readable by that "
        "user or group\n")


@pytest.mark.integration
def test_a_password_file_its_group_reads_serves_logins_after_dropping_root(
        socks_server, open_dir, http_server, tmp_path):
    assert os.geteuid() == 0, "the test starts twistd as root: run it as root (CI does)"
    users = htpasswd(open_dir / "users", 0o640)
    os.chown(users, 0, grp.getgrnam("nogroup").gr_gid)
    server = socks_server(None, "--config", str(write_config(open_dir)),
                          twistd_args=("-u", "nobody", "-g", "nogroup"))
    body = tmp_path / "body"
    result = subprocess.run([require("curl"), "-sS", "--max-time", "10", "-o", str(body),
                             "--socks5", f"127.0.0.1:{server.port}", "--proxy-user",
                             "alice:secret", f"http://127.0.0.1:{http_server}/"],
                            capture_output=True, timeout=15)
    assert result.returncode == 0, (result.stderr, server.log())
    assert body.read_bytes() == conftest.PAGE
    server.wait_for_log(r"user=alice method=userpass connect .* ok")
    assert "set uid/gid 65534/65534" in server.log()
    assert "Traceback" not in server.log() and "PermissionError" not in server.log()


def write_config(folder: Path) -> Path:
    """A config naming the htpasswd file ``users`` next to it."""
    config = folder / "socksd.toml"
    config.write_text('[server]\nmethods = ["userpass"]\ncheckers = ["htpasswd:users"]\n')
    return config


# Secrets other users can read.


def htpasswd(path: Path, mode: int) -> Path:
    path.write_bytes(b"alice:" + hash_password(b"secret") + b"\n")
    path.chmod(mode)
    return path


def security_warnings(server) -> list[str]:
    return [line for line in server.log().splitlines() if "#warn]" in line and (
        READABLE in line or "command line" in line or "root" in line)]


@pytest.mark.integration
def test_world_readable_password_files_are_named(socks_server, open_dir):
    hashed = htpasswd(open_dir / "users.htpasswd", 0o644)
    plain = open_dir / "users.txt"
    plain.write_text("bob:builder\n")
    plain.chmod(0o604)
    server = socks_server('[server]\nmethods = ["userpass"]\n',
                          "--auth", f"htpasswd:{hashed}", "--auth", f"file:{plain}")
    socks5_no_method(server)
    found = [line for line in security_warnings(server) if READABLE in line]
    assert len(found) == 2, server.log()
    assert f"htpasswd: password file {hashed} {READABLE}" in found[0]
    assert f"file: password file {plain} {READABLE}" in found[1]
    assert "chmod o-r" in found[0]


@pytest.mark.integration
def test_a_config_holding_memory_passwords_is_named(socks_server, open_dir):
    config = open_dir / "socksd.toml"
    config.write_text('[server]\nmethods = ["userpass"]\ncheckers = ["memory:alice:secret"]\n')
    config.chmod(0o644)
    server = socks_server(None, "--config", str(config))
    server.wait_for_log(rf"config file \(its memory: checkers hold passwords\) "
                        rf"{re.escape(str(config))} {READABLE}")


@pytest.mark.integration
def test_memory_on_the_command_line_is_warned_about(socks_server):
    server = socks_server('[server]\nmethods = ["userpass"]\n', "--auth", "memory:alice:secret")
    server.wait_for_log(r"--auth memory:USER:PASSWORD puts the password on twistd's command "
                        r"line, which every local user can read \(ps\); use --auth htpasswd:FILE")


@pytest.mark.integration
def test_world_readable_keytab_is_named(socks_server, kerberos, open_dir):
    keytab = open_dir / "socksd.keytab"
    shutil.copyfile(kerberos.keytab, keytab)
    keytab.chmod(0o644)
    config = kerberos.config().replace(kerberos.keytab, str(keytab))
    server = socks_server(config)
    server.wait_for_log(rf"\[gssapi\] keytab {re.escape(str(keytab))} {READABLE}")


@pytest.mark.integration
def test_no_warning_when_secrets_are_private(socks_server, kerberos, open_dir, http_server):
    keytab = open_dir / "socksd.keytab"
    shutil.copyfile(kerberos.keytab, keytab)
    keytab.chmod(0o600)
    hashed = htpasswd(open_dir / "users.htpasswd", 0o640)
    plain = open_dir / "users.txt"
    plain.write_text("bob:builder\n")
    plain.chmod(0o600)
    config = open_dir / "socksd.toml"
    config.write_text(kerberos.config(methods=('"gssapi"', '"userpass"'))
                      .replace(kerberos.keytab, str(keytab))
                      .replace("[server]\n", '[server]\ncheckers = ["memory:carol:pw"]\n'))
    config.chmod(0o600)
    if os.geteuid() == 0:
        # Private, and yet readable by the group twistd -g gives socksd,
        # which reads them at each login (checked at start).
        for secret in (keytab, hashed, plain):
            os.chown(secret, 0, 65534)
            secret.chmod(0o640)
    server = socks_server(None, "--config", str(config), "--auth", f"htpasswd:{hashed}",
                          "--auth", f"file:{plain}", twistd_args=not_root())
    socks5_no_method(server)
    assert security_warnings(server) == [], server.log()


# --auth secrets never on a worker's command line.




def assert_cmdlines_hold_no_secret(pids: list[int]) -> None:
    for pid in pids:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        assert b"socksd.tap.worker" in cmdline
        assert b"secret" not in cmdline and b"alice" not in cmdline, cmdline


def logins_reach_both_workers(server, http_server: int, tmp_path: Path, since: int = 0) -> None:
    """alice:secret through curl until each worker has logged one of her
    sessions (the kernel spreads connections by their source port); only the
    log after offset ``since`` counts."""
    body = tmp_path / "body"
    seen: set[str] = set()
    for _ in range(64):
        result = subprocess.run(
            [require("curl"), "-sS", "--max-time", "10", "-o", str(body), "-x",
             f"socks5://alice:secret@127.0.0.1:{server.port}",
             f"http://127.0.0.1:{http_server}/"], capture_output=True, timeout=15)
        assert result.returncode == 0, (result.stderr, server.log())
        assert body.read_bytes() == conftest.PAGE
        seen = set(re.findall(r"\] (w\d) 127\.0\.0\.1:\d+ socks5 user=alice method=userpass "
                              r"connect .* ok", server.log()[since:]))
        if seen == {"w0", "w1"}:
            return
    raise AssertionError(f"sessions on {seen} only:\n{server.log()}")


@pytest.mark.integration
def test_auth_strings_reach_workers_off_their_command_line(socks_server, http_server,
                                                           tmp_path):
    server = socks_server('[server]\nworkers = 2\nmethods = ["userpass"]\n',
                          "--auth", "memory:alice:secret")
    pids = wait_until(lambda: (p := worker_pids(server.process.pid)) and len(p) == 2 and p,
                      timeout=20)
    assert_cmdlines_hold_no_secret(pids)
    logins_reach_both_workers(server, http_server, tmp_path)

    # A restarted worker is given them again.
    os.kill(pids[0], signal.SIGKILL)
    restarted = wait_until(lambda: (p := worker_pids(server.process.pid)) and len(p) == 2
                           and pids[0] not in p and p, timeout=20)
    assert_cmdlines_hold_no_secret(restarted)
    wait_until(lambda: server.log().count(" serving on ") == 3, timeout=20)
    logins_reach_both_workers(server, http_server, tmp_path, since=len(server.log()))
