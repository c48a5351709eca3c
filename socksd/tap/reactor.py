"""The reactor ``twistd socks`` runs on unless ``--reactor`` names another.

It is Twisted's epoll reactor with one thing left out: the legacy log
context. Twisted's ``doPoll`` dispatches every readiness event through
``log.callWithLogger``, which asks the descriptor for its ``logPrefix()``
and pushes a context so that old-style ``log.msg`` calls made while
handling it carry that prefix as their "system". socksd logs through
``twisted.logger``, whose events never read that context, yet every event
pays for the wrapping (a ``logPrefix()`` call, a context pushed and popped),
and a short SOCKS session is little more than a handful of events.

What is kept: the same poller, the same ``_doReadOrWrite`` (a descriptor
whose ``doRead``/``doWrite`` raises is logged and disconnected, as before),
and an error escaping it is logged without stopping the loop. Old-style log
lines from inside a handler show ``-`` as their system instead of the
connection's prefix.
"""

from __future__ import annotations

import socket
import sys
from select import EPOLLIN
from typing import Callable

from twisted.internet import epollreactor  # Linux; see install_default
from twisted.internet.main import installReactor
from twisted.logger import Logger

from socksd.stream import AdoptedStream, Stream, StreamPort

log = Logger(namespace="socksd")


class EPollReactor(epollreactor.EPollReactor):
    """epoll, dispatching events without a log context per event; with
    :meth:`soon` for socksd.stream's closes."""

    def __init__(self) -> None:
        self._soon: list[Callable[[], object]] = []
        super().__init__()

    def soon(self, call: Callable[[], object]) -> None:
        """Call ``call`` once the events being handled now have been, before
        waiting for more: ``callLater(0, call)`` without a timer for it."""
        self._soon.append(call)

    def _run_soon(self) -> None:
        calls, self._soon = self._soon, []
        for call in calls:
            try:
                call()
            except Exception:
                log.failure("while running {call!r}", call=call)

    def doPoll(self, timeout: float | None) -> None:
        if self._soon:
            # Queued by timers that just ran: theirs first, then no waiting.
            self._run_soon()
            timeout = 0
        try:
            events = self._poller.poll(-1 if timeout is None else timeout,
                                       len(self._selectables))
        except InterruptedError:
            return
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed by an earlier event of this batch
            try:
                if event == EPOLLIN and type(selectable) is Stream:
                    # The commonest event, a plain connection readable and
                    # nothing more: _doReadOrWrite's read path, inline.
                    try:
                        why = selectable.doRead()
                    except BaseException:
                        why = sys.exc_info()[1]
                        log.failure("while reading {selectable!r}", selectable=selectable)
                    if why:
                        self._disconnectSelectable(selectable, why, True)
                    continue
                handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.failure("while handling {selectable!r}", selectable=selectable)
        if self._soon:
            self._run_soon()

    doIteration = doPoll

    # TCP connections as socksd.stream.Stream: Twisted's, with the direct
    # paths a short session is made of. (connectTCP's outgoing ones stay
    # Twisted's: socksd connects its own; see socksd.proxy.connect.)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        listening = StreamPort(port, factory, backlog, interface, self)
        listening.startListening()
        return listening

    def adoptStreamPort(self, fileDescriptor, addressFamily, factory):
        if addressFamily not in (socket.AF_INET, socket.AF_INET6):
            return super().adoptStreamPort(fileDescriptor, addressFamily, factory)
        listening = StreamPort._fromListeningDescriptor(self, fileDescriptor, addressFamily,
                                                        factory)
        listening.startListening()
        return listening

    def adoptStreamConnection(self, fileDescriptor, addressFamily, factory):
        if addressFamily not in (socket.AF_INET, socket.AF_INET6):
            return super().adoptStreamConnection(fileDescriptor, addressFamily, factory)
        return AdoptedStream._fromConnectedSocket(fileDescriptor, addressFamily, factory, self)


def install() -> EPollReactor:
    """Install it as the global reactor (what ``--reactor socksd`` does)."""
    reactor = EPollReactor()
    installReactor(reactor)
    return reactor


def install_default() -> None:
    """Install ours unless a reactor is already installed (``--reactor``, or
    a program that embeds socksd and chose its own)."""
    if "twisted.internet.reactor" not in sys.modules:
        install()
