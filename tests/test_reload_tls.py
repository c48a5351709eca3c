"""A reload reads an ``ssl:`` listener's certificate and key again: the
connections it accepts next get the new certificate, the open ones keep
theirs; files it cannot use fail the reload as a whole. Certificates are
made here, told apart by their serial numbers, and seen by a real TLS client
(Python's ssl module)."""

from __future__ import annotations

import datetime
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor, threads
from twisted.internet.protocol import Factory
from twisted.protocols.wire import Echo
from twisted.trial import unittest

from conftest import recv_exact
from helpers import wait_until
from socksd.config import ConfigError
from socksd.tap.reload import Listeners
from test_reload import _echoes, _free_port, _hup


def _certificate(serial: int) -> tuple[bytes, bytes]:
    """A self-signed certificate with this serial number, and its key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"socksd test {serial}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(serial)
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .sign(key, hashes.SHA256()))
    return (certificate.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _write(directory: Path, name: str, serial: int) -> tuple[Path, Path]:
    """``name``.crt and ``name``.key in ``directory``, for a new certificate."""
    certificate, key = _certificate(serial)
    crt, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    crt.write_bytes(certificate)
    key_path.write_bytes(key)
    return crt, key_path


def _ssl(port: int, crt: Path, key: Path, prefix: str = "", options: str = "") -> str:
    return (f"{prefix}ssl:{port}:interface=127.0.0.1:certKey={crt}:privateKey={key}"
            f"{options}")


# Twisted's haproxy:ssl: reads the PROXY header inside TLS (its wrapper is
# the TLS factory's protocol).
PROXY_HEADER = b"PROXY TCP4 192.0.2.1 127.0.0.1 40000 443\r\n"


def _tls(port: int, header: bytes = b"") -> ssl.SSLSocket:
    """A TLS connection to 127.0.0.1:port, handshake done, ``header`` sent
    first in it; the certificate is not verified, only looked at."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    tls = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
    tls.sendall(header)
    return tls


def _serial(tls: ssl.SSLSocket) -> int:
    """The serial number of the certificate the server sent."""
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _still_echoes(tls: ssl.SSLSocket) -> bool:
    tls.sendall(b"still here")
    return recv_exact(tls, 10) == b"still here"


class RenewedCertificates(unittest.TestCase):
    """Listeners on the real reactor, serving an echo; the clients in threads."""

    @pytest.fixture(autouse=True)
    def _directory(self, tmp_path: Path) -> None:
        self.dir = tmp_path

    def setUp(self) -> None:
        self.port = _free_port()

    def listen(self, description: str) -> Listeners:
        listeners = Listeners([description], Factory.forProtocol(Echo), reactor)
        listeners.startService()
        self.addCleanup(listeners.stopService)
        return listeners

    @defer.inlineCallbacks
    def serial(self, header: bytes = b""):
        """The serial number a new connection gets."""
        tls = yield threads.deferToThread(_tls, self.port, header)
        try:
            return _serial(tls)
        finally:
            tls.close()

    @defer.inlineCallbacks
    def open(self, header: bytes = b""):
        """A connection kept open across a reload, and its serial number."""
        tls = yield threads.deferToThread(_tls, self.port, header)
        self.addCleanup(tls.close)
        assert (yield threads.deferToThread(_still_echoes, tls))
        return tls

    @defer.inlineCallbacks
    def renewed_in_the_same_files(self, prefix: str, header: bytes):
        crt, key = _write(self.dir, "server", 1)
        description = _ssl(self.port, crt, key, prefix)
        listeners = self.listen(description)
        opened = yield self.open(header)
        assert _serial(opened) == 1

        _write(self.dir, "server", 2)
        change = yield listeners.bind([description])
        assert (yield self.serial(header)) == 1       # nothing changes before apply()
        change.apply()
        assert (yield self.serial(header)) == 2
        assert listeners.descriptions == (description,)
        # The connection open before the reload keeps its certificate and goes on.
        assert _serial(opened) == 1
        assert (yield threads.deferToThread(_still_echoes, opened))

    def test_a_kept_ssl_endpoint_serves_the_certificate_now_in_its_files(self):
        return self.renewed_in_the_same_files("", b"")

    def test_a_kept_endpoint_under_haproxy_too(self):
        return self.renewed_in_the_same_files("haproxy:", PROXY_HEADER)

    @defer.inlineCallbacks
    def test_an_ssl_endpoint_a_reload_added_renews_too(self):
        crt, key = _write(self.dir, "server", 1)
        first = f"tcp:{_free_port()}:interface=127.0.0.1"
        listeners = self.listen(first)
        added = _ssl(self.port, crt, key)
        (yield listeners.bind([first, added])).apply()
        assert (yield self.serial()) == 1
        _write(self.dir, "server", 2)
        (yield listeners.bind([first, added])).apply()
        assert (yield self.serial()) == 2

    @defer.inlineCallbacks
    def test_a_cancelled_change_swaps_nothing(self):
        crt, key = _write(self.dir, "server", 1)
        description = _ssl(self.port, crt, key)
        listeners = self.listen(description)
        _write(self.dir, "server", 2)
        change = yield listeners.bind([description])
        change.cancel()
        assert (yield self.serial()) == 1

    @defer.inlineCallbacks
    def test_another_certificate_path_on_the_same_port_is_swapped_in_place(self):
        old_crt, old_key = _write(self.dir, "old", 1)
        old = _ssl(self.port, old_crt, old_key)
        listeners = self.listen(old)
        opened = yield self.open()
        new_crt, new_key = _write(self.dir, "new", 2)
        old_crt.unlink()      # the renewal moved the files: the old ones are not read again
        old_key.unlink()
        new = _ssl(self.port, new_crt, new_key)
        change = yield listeners.bind([new])
        assert change.added == {} and change.removed == []    # no socket bound, none closed
        change.apply()
        assert listeners.descriptions == (new,)
        assert (yield self.serial()) == 2
        assert (yield threads.deferToThread(_still_echoes, opened))
        # And the swapped endpoint renews as a kept one from then on.
        _write(self.dir, "new", 3)
        (yield listeners.bind([new])).apply()
        assert (yield self.serial()) == 3

    @defer.inlineCallbacks
    def test_files_it_cannot_use_fail_the_reload_and_the_old_certificate_serves(self):
        crt, key = _write(self.dir, "server", 1)
        description = _ssl(self.port, crt, key)
        listeners = self.listen(description)
        good_key = key.read_bytes()
        dh = self.dir / "dh.pem"
        dh.write_text("-----BEGIN DH PARAMETERS-----\nbroken\n-----END DH PARAMETERS-----\n")
        other_key = _certificate(2)[1]

        def garbage_key():
            key.write_text("not a key\n")
            return description, "cannot load its certificate and key"

        def key_of_another_certificate():
            key.write_bytes(other_key)
            return description, "cannot load its certificate and key"

        def missing_key():
            key.unlink()
            return description, f"cannot read {key}: No such file or directory"

        def broken_dh_parameters():
            # Twisted reads only the name; OpenSSL reads the file at the first
            # connection, unless the reload makes it read it.
            return (_ssl(self.port, crt, key, options=f":dhParameters={dh}"),
                    "cannot load its certificate and key")

        for breaks in (garbage_key, key_of_another_certificate, missing_key,
                       broken_dh_parameters):
            wanted, why = breaks()
            with pytest.raises(ConfigError) as raised:
                yield listeners.bind([wanted])
            message = str(raised.value)
            assert message.startswith(f"{wanted!r}: {why}"), (breaks.__name__, message)
            assert "\n" not in message
            assert listeners.descriptions == (description,)
            assert (yield self.serial()) == 1, breaks.__name__
            key.write_bytes(good_key)

    @defer.inlineCallbacks
    def test_any_other_change_on_a_kept_port_needs_a_restart(self):
        crt, key = _write(self.dir, "server", 1)
        for old, new in ((_ssl(self.port, crt, key), _ssl(self.port, crt, key,
                                                               options=":backlog=7")),
                         (_ssl(self.port, crt, key), _ssl(self.port, crt, key, "haproxy:")),
                         (f"tcp:{self.port}:interface=127.0.0.1",
                          f"tcp:{self.port}:interface=127.0.0.1:backlog=7")):
            listeners = self.listen(old)
            with pytest.raises(ConfigError) as raised:
                yield listeners.bind([new])
            assert str(raised.value) == (
                f"cannot listen on {new}: port {self.port} is still bound for {old}, which it "
                "replaces; on a port it keeps, a reload changes only an ssl: endpoint's "
                "certificate and key files: restart socksd for this change")
            assert listeners.descriptions == (old,)
            with socket.create_connection(("127.0.0.1", self.port), timeout=5):
                pass      # still listening
            yield listeners.stopService()

    @defer.inlineCallbacks
    def test_all_or_none_a_port_that_cannot_be_bound_swaps_no_certificate(self):
        crt, key = _write(self.dir, "server", 1)
        description = _ssl(self.port, crt, key)
        listeners = self.listen(description)
        _write(self.dir, "server", 2)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            busy = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
            with pytest.raises(ConfigError, match=f"^cannot listen on {busy}: address already "
                                                  "in use$"):
                yield listeners.bind([description, busy])
        assert (yield self.serial()) == 1


# A real twistd, a real SIGHUP, a real TLS client through the proxy.

def _socks5_over_tls(port: int, echo_port: int) -> ssl.SSLSocket:
    tls = _tls(port)
    tls.sendall(b"\x05\x01\x00")
    assert recv_exact(tls, 2) == b"\x05\x00"
    tls.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + echo_port.to_bytes(2, "big"))
    assert recv_exact(tls, 10)[:2] == b"\x05\x00"
    return tls


def _new_serial(port: int) -> int:
    with _tls(port) as tls:
        return _serial(tls)


@pytest.mark.integration
def test_twistd_renews_its_certificates_on_sighup(socks_server, echo_server, tmp_path):
    port, metrics = _free_port(), _free_port()
    crt, key = _write(tmp_path, "server", 1)

    def config(crt: Path, key: Path, options: str = "") -> str:
        return (f'[server]\nlisten = ["{_ssl(port, crt, key, options=options)}"]\n'
                f'[metrics]\nlisten = ["{_ssl(metrics, crt, key)}"]\n')

    server = socks_server(config(crt, key), add_listen=False)
    opened = _socks5_over_tls(port, echo_server)
    assert _serial(opened) == 1 and _new_serial(metrics) == 1

    def reloaded(times: int) -> None:
        _hup(server)
        wait_until(lambda: server.log().count("reloaded ") == times, 10, server.log)

    # Renewed in place (certbot's way): the same files, new contents.
    _write(tmp_path, "server", 2)
    reloaded(1)
    assert _new_serial(port) == 2 and _new_serial(metrics) == 2
    assert _echoes(opened) and _serial(opened) == 1

    # Renewed under new names, on the same ports.
    new_crt, new_key = _write(tmp_path, "renewed", 3)
    server.config_path.write_text(config(new_crt, new_key))
    reloaded(2)
    assert _new_serial(port) == 3 and _new_serial(metrics) == 3
    assert _echoes(opened)

    # A broken key, then another backlog: the reload fails, nothing changes.
    good = new_key.read_bytes()
    new_key.write_text("not a key\n")
    _hup(server)
    line = server.wait_for_log(r"reload failed, kept the running configuration: (.*)")
    assert "cannot load its certificate and key" in line.group(1), line.group(0)
    new_key.write_bytes(good)
    server.config_path.write_text(config(new_crt, new_key, ":backlog=7"))
    _hup(server)
    server.wait_for_log(r"reload failed, kept the running configuration: .*still bound for .*"
                        r"restart socksd for this change")
    assert _new_serial(port) == 3 and _new_serial(metrics) == 3
    assert _echoes(opened)
    opened.close()
    assert server.process.poll() is None
    assert "Traceback" not in server.log()
