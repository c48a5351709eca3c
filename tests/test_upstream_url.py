"""parse_upstream: every URL form an [[upstreams]] entry takes, and an
error naming what is wrong (never showing the password) for the rest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chain import make_ca
from socksd.client import parse_upstream
from socksd.client.upstream import TLS_NEEDS


def test_socks5_without_authentication():
    up = parse_upstream("socks5://127.0.0.1:1080", "corp")
    assert (up.name, up.scheme, up.host, up.port) == ("corp", "socks5", "127.0.0.1", 1080)
    assert up.username is None and up.password is None and up.tls is None
    assert up.commands == {"connect", "bind", "udp"}
    assert up.url_text == "socks5://127.0.0.1:1080" and str(up) == "upstream corp"


def test_socks5_credentials_are_percent_decoded_and_never_shown():
    up = parse_upstream("socks5://al%20ice:s%3Ac%40ret%2F@Proxy.Example.:1080")
    assert (up.username, up.password) == ("al ice", "s:c@ret/")
    assert up.host == "proxy.example"      # the one normal form of a name
    assert up.url_text == "socks5://al%20ice:***@proxy.example:1080"
    assert up.name == up.url_text           # a name by default, for the logs
    assert "ret" not in repr(up) and "ret" not in str(up)


def test_ipv6_hosts():
    up = parse_upstream("socks5://[::1]:1080")
    assert up.host == "::1" and up.url_text == "socks5://[::1]:1080"
    assert parse_upstream("http://[2001:DB8::0001]:3128").host == "2001:db8::1"


def test_gssapi_service_names():
    assert parse_upstream("socks5+gssapi://proxy.example:1080").gssapi_service == \
        "rcmd@proxy.example"
    assert parse_upstream("socks5+gssapi://proxy.example:1080?service=socks"
                          ).gssapi_service == "socks@proxy.example"
    assert parse_upstream("socks5+gssapi://10.0.0.1:1080?service=rcmd@proxy.example"
                          ).gssapi_service == "rcmd@proxy.example"


def test_socks4_takes_a_userid_and_does_no_udp():
    up = parse_upstream("socks4://bob@127.0.0.1:1080")
    assert up.username == "bob" and up.password is None
    assert up.commands == {"connect", "bind"} and up.url_text == "socks4://bob@127.0.0.1:1080"


def test_http_with_basic_credentials():
    up = parse_upstream("http://user:pa:ss@127.0.0.1:3128")
    assert (up.username, up.password, up.commands) == ("user", "pa:ss", {"connect"})
    assert up.url_text == "http://user:***@127.0.0.1:3128"


def test_tls_with_a_private_ca(tmp_path: Path):
    ca, _cert, _key = make_ca(tmp_path)
    up = parse_upstream(f"socks5+tls://alice:secret@proxy.example:1080?ca={ca}")
    assert up.tls is not None and up.ca == str(ca)
    assert up.url_text == f"socks5+tls://alice:***@proxy.example:1080?ca={ca}"
    # Without ca=, the system's trust.
    assert parse_upstream("socks5+tls://proxy.example:1080").tls is not None


@pytest.mark.parametrize("url, message", [
    ("proxy.example:1080", "not a URL (SCHEME://HOST:PORT)"),
    ("ftp://proxy.example:1080", "unknown scheme 'ftp' (one of: socks5, socks5+gssapi, "
                                 "socks5+tls, socks4, http)"),
    ("socks5://proxy.example", "no port (socks5://HOST:PORT)"),
    ("socks5://proxy.example:0", "no port"),
    ("socks5://proxy.example:70000", "the port must be a number from 1 to 65535"),
    ("socks5://proxy.example:http", "the port must be a number from 1 to 65535"),
    ("socks5://:1080", "no host"),
    ("socks5://proxy..example:1080", "bad host name: empty label"),
    ("socks5://proxy.example:1080/path", "a proxy URL has no path or fragment"),
    ("socks5://proxy.example:1080#x", "a proxy URL has no path or fragment"),
    ("socks5://proxy.example:1080?ca=x", "unknown option 'ca' (socks5 takes no options)"),
    ("socks5+gssapi://proxy.example:1080?level=1",
     "unknown option 'level' (socks5+gssapi takes only service)"),
    ("socks5+gssapi://h:1?service=a&service=b", "option 'service' given twice"),
    ("socks5+gssapi://h:1?service=", "service= names the GSS-API service"),
    ("socks5+gssapi://alice:secret@h:1", "socks5+gssapi takes no user or password"),
    ("socks5://alice@h:1", "a user needs a password (socks5://USER:PASS@HOST:PORT)"),
    ("socks5://:secret@h:1", "empty user name"),
    ("socks5://" + "u" * 256 + ":secret@h:1", "at most 255 bytes"),
    ("socks4://bob:secret@h:1", "socks4 sends a USERID, no password"),
    ("http://a%3Ab:secret@h:1", "user name cannot hold ':'"),
    ("socks5://alice:%ff@h:1", "not UTF-8 once percent-decoded"),
    ("socks5+tls://h:1?ca=", "ca= names a PEM file"),
    ("socks5+tls://h:1?ca=/nonexistent/ca.pem", "ca: cannot read /nonexistent/ca.pem: "
                                                "No such file or directory"),
])
def test_errors_say_what_is_wrong(url, message):
    with pytest.raises(ValueError) as caught:
        parse_upstream(url)
    assert message in str(caught.value)
    assert "secret" not in str(caught.value)


def test_a_ca_file_that_is_no_certificate(tmp_path: Path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=f"ca: {junk} is not a PEM certificate"):
        parse_upstream(f"socks5+tls://h:1?ca={junk}")


@pytest.mark.parametrize("url", [
    "socks5://alice:se/cret@h:1",          # unencoded "/", "?" and "#" end the
    "socks5://alice:se?cret@h:1",          # authority early: the password must
    "socks5://alice:se#cret@h:1",          # still be hidden in the message
    "socks5://alice:secret@h:99999",
    "socks5://alice:secret@[::1:1",
])
def test_a_misparsed_password_is_still_hidden(url):
    with pytest.raises(ValueError) as caught:
        parse_upstream(url)
    assert "cret" not in str(caught.value), caught.value


def test_tls_without_pyopenssl_names_the_fix():
    """As without the socksd[tls] extra: OpenSSL cannot be imported."""
    script = (
        "import sys\n"
        "class NoOpenSSL:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'OpenSSL':\n"
        "            raise ImportError('No module named ' + repr(name))\n"
        "sys.meta_path.insert(0, NoOpenSSL())\n"
        "from socksd.client import parse_upstream\n"
        "print(parse_upstream('socks5://h:1').scheme)\n"
        "try:\n"
        "    parse_upstream('socks5+tls://h:1')\n"
        "except ValueError as e:\n"
        "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["socks5", TLS_NEEDS]
    assert TLS_NEEDS == "socks5+tls: upstreams need pyOpenSSL: pip install 'socksd[tls]'"
