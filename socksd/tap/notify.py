"""Readiness for systemd (``Type=notify``): the sd_notify(3) protocol, one
datagram of ``KEY=VALUE`` lines to the AF_UNIX socket that $NOTIFY_SOCKET
names (a path, or an abstract name written with a leading ``@``).

``READY=1`` once the reactor runs with every listener bound (with
``workers = N``, once every worker serves too); ``RELOADING=1`` as a reload
begins and ``READY=1`` when it is over, applied or refused; ``STOPPING=1``
as the process begins to stop. Only the twistd process, systemd's main pid,
tells: it takes NOTIFY_SOCKET out of its environment, so no worker (nor
anything a plugin starts) ever sees it.

The protocol is this small; libsystemd, or a package for it, would add a
dependency for nothing.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable, MutableMapping

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from socksd.twisted_internals import IReactor, installed_reactor

log = Logger(namespace="socksd")


def notify(address: str, state: str) -> None:
    """Send ``state`` to the socket systemd listens on at ``address``;
    OSError if it cannot be sent. Never blocks: systemd reads at once, and a
    full queue is an error, not a wait."""
    if not address.startswith(("/", "@")):
        # As sd_notify(3): a relative path would depend on the working directory.
        raise OSError(errno.EAFNOSUPPORT, "not a path nor an abstract socket name")
    # An abstract socket's name starts with a NUL byte, written as "@".
    target = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(state.encode("utf-8"), socket.MSG_DONTWAIT, target)


class Notifier(service.Service):
    """Tells systemd how the service is doing. Add it to the root service
    last: it is started after every listener is bound, and stopped first,
    so STOPPING=1 comes before anything closes.

    ``serving``: with workers, a Deferred that fires once every worker
    serves, which READY=1 waits for."""

    def __init__(self, serving: Callable[[], defer.Deferred[None]] | None = None,
                 reactor: IReactor | None = None,
                 environ: MutableMapping[str, str] | None = None) -> None:
        environ = environ if environ is not None else os.environ
        self.address = environ.pop("NOTIFY_SOCKET", None) or None
        self.serving = serving
        self.reactor = reactor if reactor is not None else installed_reactor()
        self.ready = False

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self._started)

    def _started(self) -> None:
        serving = self.serving() if self.serving is not None else defer.succeed(None)
        serving.addCallback(lambda _: self._ready())

    def _ready(self) -> None:
        if self.running and not self.ready:
            self.ready = True
            self.send("READY=1")

    def reloading(self) -> None:
        """A reload begins. Before READY=1 there is nothing to say: systemd
        is still waiting for the start."""
        if self.ready:
            # MONOTONIC_USEC: which reload this is, for a systemd that
            # matches it to its own request (sd_notify(3)).
            self.send(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def reloaded(self) -> None:
        """A reload is over, applied or refused: the service serves on."""
        if self.ready:
            self.send("READY=1")

    def stopService(self) -> None:
        super().stopService()
        self.send("STOPPING=1")

    def send(self, state: str) -> None:
        if self.address is None:
            return
        try:
            notify(self.address, state)
        except OSError as e:
            log.warn("cannot tell systemd {state} at NOTIFY_SOCKET {address}: {error}",
                     state=state.split("\n", 1)[0], address=self.address,
                     error=e.strerror or e)
