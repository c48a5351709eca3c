"""A rule's own ``source`` against a real `twistd socks`: its sessions leave
from that address (before [server] source), and a destination of the other
family fails with 0x04 and a line saying why."""

from __future__ import annotations

import socket

import pytest

from test_rule_caps_integration import socks5

pytestmark = pytest.mark.integration


def test_a_rules_source_is_where_its_sessions_leave_from(socks_server):
    with socket.create_server(("127.0.0.1", 0)) as target:
        port = target.getsockname()[1]
        server = socks_server(f"""
[server]
source = ["127.0.0.3"]
[[rules]]
action = "allow"
ports = [{port}]
source = "127.0.0.2"
[[rules]]
action = "allow"
""")
        client, rep = socks5(server, port)
        assert rep == 0
        target.settimeout(5)
        conn, peer = target.accept()
        assert peer[0] == "127.0.0.2"
        conn.close()
        client.close()


def test_a_rules_source_of_the_other_family_is_host_unreachable(socks_server):
    with socket.create_server(("127.0.0.1", 0)) as target:
        server = socks_server('[[rules]]\naction = "allow"\nsource = "::1"\n')
        client, rep = socks5(server, target.getsockname()[1])
        client.close()
        assert rep == 0x04
        server.wait_for_log(r"no source address of IPv4 family: rule 1 source")
