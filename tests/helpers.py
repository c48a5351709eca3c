"""Small helpers shared by test modules (no fixtures here: see conftest.py)."""

from __future__ import annotations

import contextlib
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import IO, NamedTuple, TypeVar

from hypothesis import strategies as st

from socksd.wire import WireError
from socksd.wire.names import normalize_name

T = TypeVar("T")


def normalizes(name: str) -> bool:
    """Does socksd take ``name`` as a domain name (socksd.wire.names)?"""
    try:
        normalize_name(name)
    except ValueError:
        return False
    return True


# Waiting on something outside the test's control (a subprocess, a log file, a thread).

def wait_until(predicate: Callable[[], T], timeout: float = 10.0,
               what: str | Callable[[], str] = "the condition",
               interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something true, and return that.

    After ``timeout`` seconds it fails, saying ``what`` (a callable is asked
    only then: a log read at the moment of failure). ``predicate`` may raise
    to fail at once (a process that exited).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {said}")
        time.sleep(interval)


# Hypothesis strategies for the SOCKS5 codecs (requests, replies, UDP headers).

ports = st.integers(min_value=0, max_value=65535)
ipv4_hosts = st.ip_addresses(v=4).map(str)
ipv6_hosts = st.ip_addresses(v=6).map(str)


def is_ip_literal(text: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
            return True
        except (OSError, ValueError):
            pass
    return False


def acceptable_domain(name: str) -> bool:
    """What a resolver takes and the codec carries: 1..255 UTF-8 bytes,
    printable, no spaces, and not an IP literal (that would be sent as one)."""
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return (1 <= len(raw) <= 255 and name.isprintable() and " " not in name
            and not is_ip_literal(name) and normalizes(name))


domain_names = st.one_of(
    st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}\.){0,5}[a-z]{2,10}\Z"),
    # Upper case, "_", trailing dots, fullwidth forms and non-ASCII letters:
    # the parser hands on their normal form (socksd.wire.names).
    st.text(alphabet="abcXYZ09-_.üßÄｌｏ．", min_size=1, max_size=80),
).filter(acceptable_domain)


def only_wire_errors(parse: Callable, data: bytes) -> None:
    """Arbitrary bytes give None ("need more"), a message (a NamedTuple) with
    the count of bytes it used, or WireError; nothing else."""
    try:
        result = parse(data)
    except WireError:
        return
    if result is not None:
        message, used = result
        assert isinstance(message, tuple) and hasattr(message, "_fields"), message
        assert 0 < used <= len(data)


# Connections owned by another user (socket-owner lookup, the identd).

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def system_user(name: str) -> pwd.struct_passwd:
    """A throwaway system user (no home, no shell), made if missing. Acting
    as it needs root: without root this fails (it never skips)."""
    assert os.geteuid() == 0, (f"the test creates a system user ({name}) and acts as it: "
                               "run it as root (CI does)")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    useradd = shutil.which("useradd", path=SBIN_PATH)
    assert useradd, "useradd is not installed (Debian package passwd)"
    proc = subprocess.run([useradd, "--system", "--no-create-home", "--shell",
                           "/usr/sbin/nologin", name], capture_output=True, text=True)
    assert proc.returncode in (0, 9), f"useradd: {proc.stderr}"   # 9: already exists
    return pwd.getpwnam(name)


class HeldConnection(NamedTuple):
    port: int                # the child's local port
    inode: int               # its socket's inode, as the lookup reports it
    accepted: socket.socket  # our end, accepted from the listener


@contextlib.contextmanager
def connection_as(entry: pwd.struct_passwd,
                  listening: socket.socket) -> Iterator[HeldConnection]:
    """A connection to ``listening`` made and held by a child running as
    ``entry``, until the block ends. A forked child, not a subprocess: the
    venv's interpreter may live where that user cannot execute it (/root)."""
    host, port = listening.getsockname()[:2]
    report_r, report_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 1
        try:
            os.close(report_r)
            os.close(hold_w)
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            # After setuid nothing more can be imported from a root-only
            # stdlib: a bytes host needs no idna codec.
            sock = socket.socket(listening.family, socket.SOCK_STREAM)
            sock.connect((host.encode(), port))
            inode = os.fstat(sock.fileno()).st_ino
            os.write(report_w, b"%d %d\n" % (sock.getsockname()[1], inode))
            os.read(hold_r, 1)  # until the parent closes hold_w
            status = 0
        except BaseException as e:
            os.write(report_w, f"error {e!r}\n".encode())
        finally:
            os._exit(status)
    os.close(report_w)
    os.close(hold_r)
    accepted = None
    try:
        ready, _, _ = select.select([report_r], [], [], 10)
        assert ready, "child did not connect"
        line = os.read(report_r, 200).decode()
        assert not line.startswith("error"), line
        child_port, child_inode = map(int, line.split())
        accepted, _ = listening.accept()
        yield HeldConnection(child_port, child_inode, accepted)
    finally:
        os.close(hold_w)
        os.close(report_r)
        if accepted is not None:
            accepted.close()
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def stop_process(process: subprocess.Popen, log_file: IO[bytes]) -> None:
    """SIGTERM; a second one after 5 s (socksd drains open sessions for up to
    its drain_timeout, and ends at once at the second), then SIGKILL after
    10 s more; the file its output went to is closed."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    log_file.close()


def refused(port: int) -> bool:
    """Is a connection to 127.0.0.1:port refused (nothing listens there)?"""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@contextlib.contextmanager
def notify_listener(kind: str, folder: str, timeout: float) -> Iterator[tuple[str, socket.socket]]:
    """An AF_UNIX datagram socket listening as systemd's does for sd_notify,
    at a path in ``folder`` (kind "path") or an abstract name ("abstract"):
    (its NOTIFY_SOCKET value, the socket)."""
    import uuid

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock:
        if kind == "path":
            address = os.path.join(folder, "notify")
            sock.bind(address)
        else:
            address = f"@socksd-test-{uuid.uuid4().hex}"
            sock.bind("\0" + address[1:])
        sock.settimeout(timeout)
        yield address, sock
