"""One worker of ``workers = N`` (see socksd.tap.workers): started by the
supervisor with its listening sockets as inherited file descriptors."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

from twisted.cred import strcred
from twisted.logger import globalLogBeginner, jsonFileLogObserver

from socksd.proxy import session


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m socksd.tap.worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--fds", required=True)
    parser.add_argument("--config")
    parser.add_argument("--auth", action="append", default=[])
    args = parser.parse_args(argv)

    from twisted.internet import reactor
    # Public API only offers proxyEndpoint(); an adopted port needs the factory.
    from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory

    from socksd.tap import socks as socks_tap

    # Every event goes to the supervisor, which logs it where twistd logs.
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stdout)],
                                     redirectStandardIO=False)
    session.WORKER = args.index
    checkers = [strcred.makeChecker(description) for description in args.auth]
    cfg, checkers = socks_tap.build(args.config, [], checkers)
    factory = socks_tap.make_factory(cfg, checkers, None, share=args.workers)
    for fd, family, haproxy in json.loads(args.fds):
        port_factory = HAProxyWrappingFactory(factory) if haproxy else factory
        reactor.adoptStreamPort(fd, socket.AddressFamily(family), port_factory)
        os.close(fd)  # Twisted made its own copy of the descriptor
    reactor.run()   # installs twistd-like SIGTERM/SIGINT handling: stop


if __name__ == "__main__":
    main()
