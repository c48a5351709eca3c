"""Ways around issue 17's controls that an audit found, against a real
`twistd socks`: a client rate escaped by sessions that end one after
another, a UDP datagram let out under another rule's association, a name
looked up here on its way upstream, a per-user cap escaped by claimed
names."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from conftest import recv_exact
from test_rule_caps_integration import socks4, socks5
from test_rule_rates_integration import Source, udp_associate

pytestmark = pytest.mark.integration


@pytest.fixture
def source():
    s = Source()
    yield s
    s.close()


def test_sessions_ending_one_after_another_do_not_escape_a_client_rate(socks_server, source):
    """Each session reads a little and closes (its read charged after it is
    made): the budget its predecessors overdrew holds the next one back."""
    server = socks_server("""
[[rules]]
name = "slow"
action = "allow"
rate = "100kB"
rate_per = "client"
""")
    got = 0
    started = time.monotonic()
    while time.monotonic() - started < 3:
        s, rep = socks5(server, source.port)
        assert rep == 0
        with s:
            s.settimeout(5)
            s.sendall(b"d")
            try:
                got += len(s.recv(65536))
            except TimeoutError:
                pass
    elapsed = time.monotonic() - started
    # 100 kB/s, a 10 kB burst, and a read of up to the burst per session
    # that found the budget full: far from the megabytes the sessions asked.
    assert got <= 100_000 * elapsed * 1.5 + 20_000, (got, elapsed)


def test_a_datagram_another_rule_allows_does_not_escape_the_associations_rule(socks_server):
    """The association is governed by rule 1 (no rate); a datagram only rule
    2 allows would escape rule 2's rate and cap: dropped."""
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.settimeout(0.5)
    server = socks_server("""
[[rules]]
action = "allow"
commands = ["udp", "udpreply"]
to = ["127.0.0.2/32"]
[[rules]]
name = "metered"
action = "allow"
rate = "1kB"
max_sessions = 1
""")
    control, client, relay = udp_associate(server)
    header = b"\0\0\0\x01" + socket.inet_aton("127.0.0.1") + \
        struct.pack("!H", echo.getsockname()[1])
    client.sendto(header + b"x" * 100, relay)
    with pytest.raises(TimeoutError):
        echo.recvfrom(2048)
    control.close()
    line = server.wait_for_log(r"udp .*datagrams up=(\d+) down=\d+ dropped=(\d+)")
    assert (line.group(1), line.group(2)) == ("0", "1")
    for s in (client, echo):
        s.close()


def test_a_claimed_name_is_no_user_for_a_per_user_cap(socks_server, echo_server):
    """SOCKS4 USERIDs taken on trust: a client cannot escape a per-user cap
    by claiming a new name per session (they count per client address)."""
    server = socks_server("""
[[rules]]
name = "one-each"
action = "allow"
max_sessions = 1
max_sessions_per = "user"
""")
    first, rep1 = socks4(server, echo_server)
    s = socket.create_connection(server.address, timeout=10)
    s.sendall(b"\x04\x01" + struct.pack("!H", echo_server) + socket.inet_aton("127.0.0.1")
              + b"another\0")
    rep2 = recv_exact(s, 8)[1]
    assert (rep1, rep2) == (90, 91)
    first.close()
    s.close()


def test_a_name_goes_upstream_unresolved_past_rules_that_test_networks(socks_server):
    """A deny on a network before the via rule used to make socksd look the
    name up here (a leak to this host's resolver, and names only the
    upstream knows failed): it goes upstream as the client gave it."""
    upstream = socks_server("")
    front = socks_server(f"""
[[upstreams]]
name = "up"
url = "socks5://127.0.0.1:{upstream.port}"
[[rules]]
action = "deny"
to = ["10.0.0.0/8"]
[[rules]]
action = "allow"
via = ["up"]
commands = ["connect"]
""")
    s = socket.create_connection(front.address, timeout=10)
    s.sendall(b"\x05\x01\x00")
    assert recv_exact(s, 2) == b"\x05\x00"
    name = b"leak-probe.invalid"
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", 80))
    reply = recv_exact(s, 10)
    s.close()
    assert reply[1] != 0      # the upstream could not resolve it either
    upstream.wait_for_log(r"connect leak-probe\.invalid:80 .*failed")
    line = front.wait_for_log(r"connect leak-probe\.invalid:80 .*upstream up")
    assert "DNS lookup" not in line.group(0)
