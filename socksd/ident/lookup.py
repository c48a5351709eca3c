"""Who owns a TCP connection on this machine (Linux): the identd's question.

``lookup(Connection(local_host, local_port, remote_host, remote_port))``
returns the :class:`Owner` (uid and socket inode) of the one TCP socket with
that 4-tuple, or None. "Local" is this machine's end of the connection being
asked about: for an ident query that is the address the query arrived on and
the query's first port; "remote" is the querier's address and second port.

Two ways to ask the kernel:

* ``lookup_netlink`` -- one sock_diag request for one exact socket. The kernel
  answers with a hash-table lookup (``inet_diag_find_one_icsk``), so the cost
  does not grow with the number of sockets on the machine.
* ``lookup_proc`` -- reads /proc/net/tcp and /proc/net/tcp6, which costs time
  proportional to the number of sockets. Used only where netlink is not
  available (some containers and sandboxes), or for one call that hit an
  unexpected netlink error.

Only states where a process still holds (or just held) a real socket count
(:data:`OWNED_STATES`): LISTEN entries never match a 4-tuple, and TIME_WAIT
and half-open request entries report uid 0 because no process owns them.

Everything here is blocking but short; the identd runs it in a thread. Pure
stdlib, no Twisted.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import pwd
import socket
import struct
import threading
from typing import NamedTuple

__all__ = ["Connection", "Owner", "OWNED_STATES", "lookup", "lookup_netlink", "lookup_proc",
           "netlink_available", "user_name"]


class Connection(NamedTuple):
    """One TCP connection seen from this machine: ``local_*`` is our end."""

    local_host: str
    local_port: int
    remote_host: str
    remote_port: int


class Owner(NamedTuple):
    uid: int
    inode: int


# TCP states (include/net/tcp_states.h).
TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_SYN_RECV = 3
TCP_FIN_WAIT1 = 4
TCP_FIN_WAIT2 = 5
TCP_TIME_WAIT = 6
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8
TCP_LAST_ACK = 9
TCP_LISTEN = 10
TCP_CLOSING = 11

#: States whose uid is a real owner. Not LISTEN (not a connection), not
#: TIME_WAIT / CLOSE (no socket left; the kernel reports uid 0), and not
#: SYN_RECV (a request socket before accept(); uid 0 as well).
OWNED_STATES = frozenset({TCP_ESTABLISHED, TCP_SYN_SENT, TCP_FIN_WAIT1, TCP_FIN_WAIT2,
                          TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING})

_NETLINK_TIMEOUT = 1.0  # seconds; the kernel answers within sendmsg(), this is a backstop


# ---- addresses ---------------------------------------------------------------

class _Query(NamedTuple):
    """A Connection parsed: one address family for both ends."""

    family: int
    local: bytes          # 4 or 16 bytes, network order
    local_port: int
    remote: bytes
    remote_port: int
    interface: int        # IPv6 scope (link-local), else 0


def parse_address(host: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """Parse one host; ValueError if it is not an IP address. Returns the
    address (v4-mapped IPv6 turned into IPv4) and the IPv6 scope's ifindex."""
    if not isinstance(host, str):
        raise ValueError(f"not an IP address: {host!r}")
    address = ipaddress.ip_address(host)  # raises ValueError for anything else
    interface = 0
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            scope = address.scope_id
            try:
                interface = int(scope) if scope.isdigit() else socket.if_nametoindex(scope)
            except OSError:
                raise ValueError(f"unknown interface in {host!r}") from None
            address = ipaddress.IPv6Address(address.packed)  # drop the scope
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped, 0
    return address, interface


def _port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"not a TCP port: {port!r}")
    return port


def _parse(conn: Connection) -> _Query | None:
    """The query for ``conn``; None when the two ends cannot form one
    connection (an IPv4 and a non-mapped IPv6 address)."""
    local, local_if = parse_address(conn.local_host)
    remote, remote_if = parse_address(conn.remote_host)
    local_port, remote_port = _port(conn.local_port), _port(conn.remote_port)
    if local.version != remote.version:
        return None
    family = socket.AF_INET if local.version == 4 else socket.AF_INET6
    return _Query(family, local.packed, local_port, remote.packed, remote_port,
                  local_if or remote_if)


def _mapped(query: _Query) -> _Query:
    """The IPv4 query in the form a dual-stack AF_INET6 socket has."""
    prefix = b"\0" * 10 + b"\xff\xff"
    return query._replace(family=socket.AF_INET6, local=prefix + query.local,
                          remote=prefix + query.remote)


# ---- netlink sock_diag -----------------------------------------------------------
#
# The messages are written by hand with struct because pyroute2 (the usual
# Python netlink library) only offers sock_diag *dumps*: the kernel walks every
# socket and we filter, O(number of sockets). An exact inet_diag_sockid without
# NLM_F_DUMP makes the kernel do one hash lookup (inet_diag_find_one_icsk) and
# answer with one inet_diag_msg, or with NLMSG_ERROR -ENOENT.

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_ALL_STATES = 0xFFFFFFFF

# struct nlmsghdr: len, type, flags, seq, pid (host order).
_NLMSGHDR = struct.Struct("=IHHII")
# struct inet_diag_req_v2 head: family, protocol, ext, pad, idiag_states.
_REQ_HEAD = struct.Struct("=BBBxI")
# struct inet_diag_sockid: sport, dport (network order), src[16], dst[16];
# then (host order) interface, cookie[2].
_SOCKID_ADDR = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
# struct inet_diag_msg: family, state, timer, retrans, sockid (48 bytes),
# expires, rqueue, wqueue, uid, inode.
_MSG_HEAD = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")
_SOCKID_SIZE = _SOCKID_ADDR.size + _SOCKID_TAIL.size  # 48
_MSG_SIZE = _MSG_HEAD.size + _SOCKID_SIZE + _MSG_TAIL.size  # 72
_ERR = struct.Struct("=i")


class _Diag(NamedTuple):
    """What the kernel said about a socket, before any state filtering."""

    state: int
    uid: int
    inode: int
    local_port: int
    remote_port: int


def _open_netlink() -> socket.socket:
    """A sock_diag netlink socket (OSError where the kernel or sandbox says no)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    sock.settimeout(_NETLINK_TIMEOUT)
    return sock


def _diag_request(query: _Query, seq: int) -> bytes:
    sockid = (_SOCKID_ADDR.pack(query.local_port, query.remote_port,
                                query.local.ljust(16, b"\0"), query.remote.ljust(16, b"\0"))
              + _SOCKID_TAIL.pack(query.interface, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    body = _REQ_HEAD.pack(query.family, socket.IPPROTO_TCP, 0, _ALL_STATES) + sockid
    # No NLM_F_DUMP (one exact socket) and no NLM_F_ACK (the answer is the ack).
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST,
                          seq, 0) + body


def _diag_one(query: _Query) -> _Diag | None:
    """Ask sock_diag about exactly one socket. None for ENOENT; OSError for
    any other failure. The kernel may answer with a LISTEN socket on the local
    port when no connection matches: callers filter on the state."""
    seq = 1
    with _open_netlink() as sock:
        sock.sendto(_diag_request(query, seq), (0, 0))
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, got_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size or offset + length > len(data):
                    raise OSError(errno.EBADMSG, "truncated netlink message")
                payload = offset + _NLMSGHDR.size
                offset += (length + 3) & ~3
                if got_seq != seq:
                    continue  # not ours (cannot happen on a fresh socket)
                if kind == NLMSG_ERROR:
                    (error,) = _ERR.unpack_from(data, payload)
                    if error == -errno.ENOENT:
                        return None
                    raise OSError(-error, os.strerror(-error))
                if kind == SOCK_DIAG_BY_FAMILY and length - _NLMSGHDR.size >= _MSG_SIZE:
                    _family, state, _timer, _retrans = _MSG_HEAD.unpack_from(data, payload)
                    sport, dport, _src, _dst = _SOCKID_ADDR.unpack_from(
                        data, payload + _MSG_HEAD.size)
                    *_queues, uid, inode = _MSG_TAIL.unpack_from(
                        data, payload + _MSG_HEAD.size + _SOCKID_SIZE)
                    return _Diag(state, uid, inode, sport, dport)
                raise OSError(errno.EBADMSG, f"unexpected netlink message type {kind}")


def _owned(diag: _Diag | None, query: _Query) -> Owner | None:
    if (diag is None or diag.state not in OWNED_STATES
            or (diag.local_port, diag.remote_port) != (query.local_port, query.remote_port)):
        return None
    return Owner(diag.uid, diag.inode)


def _netlink(query: _Query) -> Owner | None:
    owner = _owned(_diag_one(query), query)
    if owner is None and query.family == socket.AF_INET:
        # The kernel's IPv4 lookup already finds dual-stack AF_INET6 sockets
        # (they are hashed by their IPv4 addresses); asking in the AF_INET6
        # form as well costs one more round trip only on a miss.
        owner = _owned(_diag_one(_mapped(query)), query)
    return owner


def lookup_netlink(conn: Connection) -> Owner | None:
    """The owner of ``conn`` by one sock_diag lookup. ValueError for a bad
    address or port; OSError if netlink itself fails."""
    query = _parse(conn)
    if query is None:
        return None
    return _netlink(query)


# ---- /proc/net/tcp{,6} ---------------------------------------------------------

def _proc_hex(address: bytes, port: int) -> bytes:
    """An address as /proc/net/tcp prints it: each 32-bit word of the
    network-order address printed as a host-order integer (so 127.0.0.1 is
    0100007F on little-endian machines), then the port in plain hex."""
    words = struct.unpack(f"={len(address) // 4}I", address)
    return ("".join(f"{w:08X}" for w in words) + f":{port:04X}").encode()


def _proc_scan(path: str, query: _Query) -> Owner | None:
    # "sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...": find the
    # " local rem " pair as a substring rather than splitting every line.
    needle = b" " + _proc_hex(query.local, query.local_port) + b" " + \
        _proc_hex(query.remote, query.remote_port) + b" "
    try:
        with open(path, "rb") as f:
            table = f.read()
    except FileNotFoundError:
        return None  # no IPv6 in this kernel
    start = table.find(needle)
    while start >= 0:
        end = table.find(b"\n", start)
        fields = table[start:end if end >= 0 else len(table)].split()
        state, uid, inode = int(fields[2], 16), int(fields[6]), int(fields[8])
        if state in OWNED_STATES:
            return Owner(uid, inode)
        start = table.find(needle, start + 1)
    return None


def _proc(query: _Query) -> Owner | None:
    if query.family == socket.AF_INET:
        # AF_INET sockets are in tcp; dual-stack AF_INET6 sockets talking
        # IPv4 are only in tcp6, with v4-mapped addresses.
        return (_proc_scan("/proc/net/tcp", query)
                or _proc_scan("/proc/net/tcp6", _mapped(query)))
    return _proc_scan("/proc/net/tcp6", query)


def lookup_proc(conn: Connection) -> Owner | None:
    """The owner of ``conn`` from /proc/net/tcp and tcp6 (time grows with the
    number of sockets). ValueError for a bad address or port."""
    query = _parse(conn)
    if query is None:
        return None
    return _proc(query)


# ---- the choice -------------------------------------------------------------------

_netlink_state: bool | None = None  # None: not probed yet
_probe_lock = threading.Lock()


def _probe() -> bool:
    """Can sock_diag answer TCP lookups here? Asked once: the socket must open,
    and a lookup of a listener of our own must find it (a kernel without the
    tcp_diag module answers ENOENT to everything, like "not found")."""
    try:
        _open_netlink().close()
    except OSError:
        return False
    try:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return True  # no IPv4 to probe with; netlink opened, trust it
    with listener:
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
        except OSError:
            return True  # no loopback to probe with; trust the open socket
        port = listener.getsockname()[1]
        query = _Query(socket.AF_INET, socket.inet_aton("127.0.0.1"), port, bytes(4), 0, 0)
        try:
            diag = _diag_one(query)
        except OSError:
            return False
        return diag is not None and diag.state == TCP_LISTEN and diag.local_port == port


def netlink_available() -> bool:
    """Whether :func:`lookup` uses netlink (probed on first use, then remembered)."""
    global _netlink_state
    if _netlink_state is None:
        with _probe_lock:
            if _netlink_state is None:
                _netlink_state = _probe()
    return _netlink_state


def lookup(conn: Connection) -> Owner | None:
    """The owner of ``conn``: netlink where it works, else /proc.

    ValueError for a bad address or port; nothing else escapes. If netlink
    worked at the probe but one call fails with an OSError (a timeout, memory
    pressure, a sandbox change), that call falls back to /proc, so the answer
    stays right and only that call is slower. An unreadable /proc is "not found".
    """
    query = _parse(conn)
    if query is None:
        return None
    if netlink_available():
        try:
            return _netlink(query)
        except OSError:
            pass
    try:
        return _proc(query)
    except (OSError, ValueError, IndexError):
        return None


def user_name(uid: int) -> str | None:
    """The login name of ``uid``, or None if the password database has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError, TypeError):
        return None
