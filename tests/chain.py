"""Parts for the upstream chaining tests (socksd.client.upstream): a socksd
listener in this process, built from a config text as `twistd socks` builds
it; small echo servers on the reactor; and a protocol that collects what it
reads. Every wait here has a timeout."""

from __future__ import annotations

import datetime
import ipaddress
import re
import socket
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from helpers import stop_process, wait_until
from socksd.tap import socks as tap

WAIT = 10.0     # seconds any one step of a test may take


def within(d: defer.Deferred, seconds: float = WAIT) -> defer.Deferred:
    return d.addTimeout(seconds, reactor)


@implementer(IHalfCloseableProtocol)
class Collect(protocol.Protocol):
    """Keeps what it reads; ``until(n)`` fires once n bytes are in,
    ``lost`` at the end, ``eof`` at the peer's half-close."""

    def __init__(self) -> None:
        self.data = b""
        self.waiting: list[tuple[int, defer.Deferred]] = []
        self.lost: defer.Deferred = defer.Deferred()
        self.eof: defer.Deferred = defer.Deferred()
        self.made = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for entry in list(self.waiting):
            if len(self.data) >= entry[0]:
                self.waiting.remove(entry)
                entry[1].callback(self.data)

    def until(self, count: int) -> defer.Deferred:
        if len(self.data) >= count:
            return defer.succeed(self.data)
        d: defer.Deferred = defer.Deferred()
        self.waiting.append((count, d))
        return within(d)

    def readConnectionLost(self) -> None:
        if not self.eof.called:
            self.eof.callback(self.data)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        self.reason = reason
        if not self.lost.called:
            self.lost.callback(None)


@implementer(IHalfCloseableProtocol)
class Echo(protocol.Protocol):
    """Echoes; closes once the peer has half-closed."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class UpperEcho(protocol.DatagramProtocol):
    """A UDP echo answering in upper case."""

    def datagramReceived(self, data: bytes, addr) -> None:
        self.transport.write(data.upper(), addr)


class Silent(protocol.Protocol):
    """Accepts and says nothing; ``lost`` fires when the client goes."""

    def __init__(self) -> None:
        self.lost: defer.Deferred = defer.Deferred()

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)


class Sessions:
    """The session lines socksd logs in this process (their fields)."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        if "session" in event:
            self.events.append(event)

    def start(self) -> None:
        globalLogPublisher.addObserver(self)

    def stop(self) -> None:
        globalLogPublisher.removeObserver(self)


async def socksd(case, tmp: Path, config: str = "",
                 listen: str = "tcp:0:interface=127.0.0.1"):
    """A socksd listener on the reactor, made from ``config`` as `twistd
    socks` makes it; closed (its sessions too) when ``case`` ends.
    Returns (port number, factory)."""
    path = tmp / f"socksd-{len(list(tmp.iterdir()))}.toml"
    path.write_text(config)
    cfg, checkers = tap.build(str(path), [listen], [])
    factory = tap.make_factory(cfg, checkers, None)
    port = await within(serverFromString(reactor, listen).listen(factory))

    async def close() -> None:
        factory.shut_down("test over")
        await within(factory.drained())
        await port.stopListening()

    case.addCleanup(lambda: defer.ensureDeferred(close()))
    return port.getHost().port, factory


def listen_tcp(case, factory: protocol.Factory) -> int:
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    return port.getHost().port


def listen_udp(case, proto: protocol.DatagramProtocol) -> int:
    port = reactor.listenUDP(0, proto, interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    return port.getHost().port


# A private CA and a server certificate it signed, for socks5+tls.

def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca(directory: Path, tag: str = "ca"
            ) -> tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(_name(f"socksd test {tag}"))
                   .issuer_name(_name(f"socksd test {tag}")).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(
                       digital_signature=True, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                   .sign(key, hashes.SHA256()))
    path = directory / f"{tag}.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path, certificate, key


def make_server_cert(directory: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                     dns: list[str], ips: list[str]) -> tuple[Path, Path]:
    """A server certificate for these names and addresses, signed by the
    CA: (certificate file, key file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    certificate = (x509.CertificateBuilder().subject_name(_name(dns[0] if dns else ips[0]))
                   .issuer_name(ca.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .sign(ca_key, hashes.SHA256()))
    crt, key_path = directory / "server.crt", directory / "server.key"
    crt.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return crt, key_path


# Outside proxies (Dante, tinyproxy) run for a test.

def free_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


class Daemon:
    """A program run in the foreground for one test, its output in a file;
    started once it accepts connections on ``port``."""

    def __init__(self, case, command: list[str], port: int, output: Path,
                 log: Path | None = None) -> None:
        self.output = output
        self.log_path = log or output
        self.file = open(output, "wb")
        self.process = subprocess.Popen(command, stdout=self.file, stderr=subprocess.STDOUT,
                                        cwd=output.parent)
        case.addCleanup(self.stop)

        def listening() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"{command[0]} exited with {self.process.returncode}:\n"
                                     f"{self.log()}")
            return accepts(port)

        wait_until(listening, WAIT, lambda: f"{command[0]} to listen on {port}:\n{self.log()}")

    def log(self) -> str:
        text = self.output.read_text(errors="replace") if self.output.exists() else ""
        if self.log_path != self.output and self.log_path.exists():
            text += self.log_path.read_text(errors="replace")
        return text

    async def wait_for_log(self, pattern: str) -> str:
        """The log once a line matches ``pattern``: polled on the reactor,
        which keeps serving the echo servers the program talks to."""
        deadline = time.monotonic() + WAIT
        while not re.search(pattern, self.log()):
            assert time.monotonic() < deadline, \
                f"timed out waiting for the log to match {pattern!r}:\n{self.log()}"
            await task.deferLater(reactor, 0.05, lambda: None)
        return self.log()

    def stop(self) -> None:
        stop_process(self.process, self.file)
