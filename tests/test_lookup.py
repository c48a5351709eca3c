"""socksd.ident.lookup against real loopback sockets: both ends of a
connection, IPv4, IPv6 and v4-mapped, another user's connection, and the
states that must not match (LISTEN, TIME_WAIT)."""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import random
import socket

import pytest

from helpers import connection_as, system_user, wait_until
from socksd.ident import lookup as L
from socksd.ident.lookup import Connection, Owner, lookup, lookup_netlink, lookup_proc, user_name

METHODS = {"netlink": lookup_netlink, "proc": lookup_proc, "auto": lookup}
TEST_USER = "socksd-lookup-test"


@pytest.fixture(params=sorted(METHODS))
def method(request):
    return METHODS[request.param]


@pytest.fixture
def sockets():
    """Close whatever a test opened, even when it fails."""
    with contextlib.ExitStack() as stack:
        yield stack


def listener(stack, family, host, dual_stack=False):
    sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
    # Other processes may leave many TIME_WAIT entries on loopback; without
    # SO_REUSEADDR, bind(port 0) can fail to find a port.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
    sock.bind((host, 0))
    sock.listen(64)
    return sock


def connect(stack, listening, family=None, host=None):
    """A connected (client, server) pair through ``listening``."""
    name = listening.getsockname()
    family = family or listening.family
    client = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
    client.connect((host or name[0], name[1]))
    server, _ = listening.accept()
    stack.enter_context(server)
    return client, server


def inode(sock):
    return os.fstat(sock.fileno()).st_ino


def views(client, server):
    """(query, expected owner) from each end's point of view."""
    c_host, c_port = client.getsockname()[:2]
    s_host, s_port = server.getsockname()[:2]
    me = os.getuid()
    return [(Connection(s_host, s_port, c_host, c_port), Owner(me, inode(server))),
            (Connection(c_host, c_port, s_host, s_port), Owner(me, inode(client)))]


def free_port(stack, family, host):
    """A port nothing listens on or connects from (bound, never listening)."""
    sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock.getsockname()[1]


def wait_for_state(query, state, timeout=5.0):
    last = []

    def reached():
        last.append(diag := L._diag_one(L._parse(query)))
        return diag is not None and diag.state == state and diag

    return wait_until(reached, timeout, lambda: f"{query} to reach TCP state {state}: "
                                                f"last {last[-1]}", interval=0.01)


# ---- one connection, both ends ------------------------------------------------------

@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"),
                                         (socket.AF_INET6, "::1")])
def test_both_ends_of_a_connection(method, sockets, family, host):
    lst = listener(sockets, family, host)
    client, server = connect(sockets, lst)
    for query, expected in views(client, server):
        assert method(query) == expected, query
    # The two ends are different sockets with different inodes.
    assert inode(client) != inode(server)


def test_netlink_is_used_here():
    """CI runs Linux with sock_diag; if the probe failed, lookup() would
    silently scan /proc and the benchmark would measure the wrong thing."""
    assert L.netlink_available()


def test_inode_and_uid_of_a_connection_owned_by_another_user(method, sockets):
    entry = system_user(TEST_USER)
    assert entry.pw_uid != os.getuid()

    lst = listener(sockets, socket.AF_INET, "127.0.0.1")
    port = lst.getsockname()[1]
    with connection_as(entry, lst) as child:
        child_view = Connection("127.0.0.1", child.port, "127.0.0.1", port)
        owner = method(child_view)
        assert owner == Owner(entry.pw_uid, child.inode)
        assert user_name(owner.uid) == TEST_USER
        # Our end of the same connection is still ours.
        our_view = Connection("127.0.0.1", port, "127.0.0.1", child.port)
        assert method(our_view) == Owner(os.getuid(), inode(child.accepted))
        assert user_name(os.getuid()) == pwd.getpwuid(os.getuid()).pw_name


def test_netlink_answers_an_unprivileged_process_about_every_users_sockets(sockets):
    """twistd -u nobody identd: sock_diag needs no privilege to say who owns
    another user's socket, or root's; the /proc fallback is not asked."""
    entry = system_user(TEST_USER)
    nobody = pwd.getpwnam("nobody")
    lst = listener(sockets, socket.AF_INET, "127.0.0.1")
    port = lst.getsockname()[1]
    with connection_as(entry, lst) as child:
        views = [Connection("127.0.0.1", child.port, "127.0.0.1", port),
                 Connection("127.0.0.1", port, "127.0.0.1", child.port)]
        report_r, report_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            try:
                os.close(report_r)
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                found = [lookup_netlink(view) for view in views]
                os.write(report_w, repr([(o.uid, o.inode) if o else None
                                         for o in found]).encode())
            finally:
                os._exit(0)
        os.close(report_w)
        with open(report_r, "rb") as report:
            seen = report.read().decode()
        os.waitpid(pid, 0)
        assert seen == repr([(entry.pw_uid, child.inode), (0, inode(child.accepted))])


# ---- v4-mapped ---------------------------------------------------------------------

def test_v4_mapped_on_a_dual_stack_socket(method, sockets):
    lst = listener(sockets, socket.AF_INET6, "::ffff:127.0.0.1", dual_stack=True)
    port = lst.getsockname()[1]
    v4_client, v6_server = connect(sockets, lst, socket.AF_INET, "127.0.0.1")
    assert v6_server.family == socket.AF_INET6
    cport = v4_client.getsockname()[1]
    me = os.getuid()
    server_owner, client_owner = Owner(me, inode(v6_server)), Owner(me, inode(v4_client))

    # The server end is an AF_INET6 socket: not in /proc/net/tcp at all, so
    # both the netlink v4 lookup and the proc tcp6 fallback are exercised.
    q4 = L._parse(Connection("127.0.0.1", port, "127.0.0.1", cport))
    assert L._proc_scan("/proc/net/tcp", q4) is None
    for local in ("127.0.0.1", "::ffff:127.0.0.1"):
        for remote in ("127.0.0.1", "::ffff:127.0.0.1"):
            assert method(Connection(local, port, remote, cport)) == server_owner
            assert method(Connection(local, cport, remote, port)) == client_owner

    # Both ends dual-stack AF_INET6 sockets.
    v6_client, v6_server2 = connect(sockets, lst, socket.AF_INET6, "::ffff:127.0.0.1")
    cport2 = v6_client.getsockname()[1]
    assert method(Connection("127.0.0.1", cport2, "127.0.0.1", port)) == \
        Owner(me, inode(v6_client))
    assert method(Connection("::ffff:127.0.0.1", port, "127.0.0.1", cport2)) == \
        Owner(me, inode(v6_server2))


# ---- what must not match -------------------------------------------------------------

@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"),
                                         (socket.AF_INET6, "::1")])
def test_not_found(method, sockets, family, host):
    a, b = free_port(sockets, family, host), free_port(sockets, family, host)
    query = Connection(host, a, host, b)
    assert L._diag_one(L._parse(query)) is None  # the kernel's ENOENT
    assert method(query) is None


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"),
                                         (socket.AF_INET6, "::1")])
def test_listening_socket_is_not_a_connection(method, sockets, family, host):
    lst = listener(sockets, family, host)
    client, server = connect(sockets, lst)  # a real connection exists too
    port = lst.getsockname()[1]
    nobody = free_port(sockets, family, host)
    query = Connection(host, port, host, nobody)
    # The kernel's exact lookup falls back to the listener on the local port:
    # the state filter is what keeps it out.
    diag = L._diag_one(L._parse(query))
    assert diag is not None and diag.state == L.TCP_LISTEN
    assert method(query) is None
    assert method(Connection(host, port, host, 0)) is None


def test_time_wait_is_not_an_owner(method, sockets):
    lst = listener(sockets, socket.AF_INET, "127.0.0.1")
    client, server = connect(sockets, lst)
    query, _ = views(client, server)[1]  # the client's end closes first
    client.close()
    server.close()
    diag = wait_for_state(query, L.TCP_TIME_WAIT)
    assert diag.uid == 0 and diag.inode == 0
    # /proc lists it too, with state 06 (TIME_WAIT) and uid 0.
    needle = b" %s %s 06 " % (
        L._proc_hex(socket.inet_aton(query.local_host), query.local_port),
        L._proc_hex(socket.inet_aton(query.remote_host), query.remote_port))
    with open("/proc/net/tcp", "rb") as f:
        assert needle in f.read()
    assert method(query) is None


# ---- netlink and proc agree --------------------------------------------------------------

def test_netlink_and_proc_agree_on_random_connections(sockets):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    listeners = {socket.AF_INET: listener(sockets, socket.AF_INET, "127.0.0.1"),
                 socket.AF_INET6: listener(sockets, socket.AF_INET6, "::1")}
    cases = []
    for _ in range(20):
        client, server = connect(sockets, listeners[rng.choice(list(listeners))])
        cases.append(rng.choice(views(client, server)))
    rng.shuffle(cases)
    for query, expected in cases:
        assert lookup_netlink(query) == lookup_proc(query) == expected, (seed, query)


# ---- errors and fallbacks ----------------------------------------------------------------

@pytest.mark.parametrize("query", [
    Connection("localhost", 1, "127.0.0.1", 2),
    Connection("127.0.0.1", 1, "1.2.3.256", 2),
    Connection("", 1, "127.0.0.1", 2),
    Connection("fe80::1%no-such-interface0", 1, "fe80::2", 2),
    Connection("127.0.0.1", 70000, "127.0.0.1", 2),
    Connection("127.0.0.1", 1, "127.0.0.1", -1),
    Connection(None, 1, "127.0.0.1", 2),
])
def test_bad_query_raises_value_error(method, query):
    with pytest.raises(ValueError):
        method(query)


def test_mixed_families_are_no_connection(method):
    assert method(Connection("127.0.0.1", 1, "::1", 2)) is None


def test_user_name():
    assert user_name(0) == "root"
    unknown = next(uid for uid in range(54321, 64000) if not _has_uid(uid))
    assert user_name(unknown) is None


def _has_uid(uid):
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def test_unavailable_netlink_is_detected_once_and_proc_answers(monkeypatch, sockets):
    calls = []

    def refuse():
        calls.append(1)
        raise OSError(errno.EPROTONOSUPPORT, "Protocol not supported")

    monkeypatch.setattr(L, "_netlink_state", None)
    monkeypatch.setattr(L, "_open_netlink", refuse)
    lst = listener(sockets, socket.AF_INET, "127.0.0.1")
    client, server = connect(sockets, lst)
    for query, expected in views(client, server):
        assert lookup(query) == expected
    assert not L.netlink_available()
    assert len(calls) == 1


def test_probe_rejects_netlink_that_finds_nothing(monkeypatch):
    """Without tcp_diag the kernel answers ENOENT to everything; the probe's
    own listener must be found, or netlink is not used."""
    monkeypatch.setattr(L, "_diag_one", lambda query: None)
    assert L._probe() is False
    monkeypatch.undo()
    assert L._probe() is True


def test_netlink_error_after_probe_falls_back_for_that_call(monkeypatch, sockets):
    lst = listener(sockets, socket.AF_INET6, "::1")
    client, server = connect(sockets, lst)
    assert L.netlink_available()

    def broken():
        raise OSError(errno.ENOBUFS, "No buffer space available")

    monkeypatch.setattr(L, "_open_netlink", broken)
    for query, expected in views(client, server):
        with pytest.raises(OSError):
            lookup_netlink(query)
        assert lookup(query) == expected
    assert L.netlink_available()  # one failed call does not disable netlink
