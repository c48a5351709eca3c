"""Where twistd writes the log, in the format ``[log] format`` names.

twistd picks its log observer (``-l FILE``, ``-l -``, ``--syslog``) in its
AppLogger, after the plugin's makeService has run, and always writes
Twisted's text. What it looks at first (after ``--logger``) is an
``ILogObserver`` component of its application: ``twistd -y`` users set one
in their .tac file, and AppLogger.start documents that it is consulted. A
twistd plugin is never handed the application, but twistd makes the
plugin's service a child of it (``ser.setServiceParent(application)``, in
ApplicationRunner.createOrGetApplication), and ``setServiceParent`` is given
the application itself, before it is adapted to IServiceCollection. So the
top service of ``twistd socks`` and ``twistd identd`` (:class:`LoggingRoot`)
sets the component there, just before AppLogger.start reads it.

That observer (:class:`socksd.logs.FormatObserver`) writes where twistd's
own would have (:func:`twistd_observer` follows UnixAppLogger._getLogObserver
with Twisted's public pieces: LogFile, stdout, SyslogObserver), and in text
format through the very observer twistd would have made, so the text log is
what it always was. It is set in text format too, so that a reload can
switch the format of a running server (``LoggingRoot.log_observer.format``).

Only Twisted's public API is used here, and no private name. What it
leans on is twistd's behaviour: the runner hands the application to
setServiceParent and AppLogger.start takes its component.
tests/test_json_log_twistd.py runs twistd's own ServerOptions and
ApplicationRunner up to that point, and tests/test_json_log_integration.py
the real twistd: a twistd that stopped doing either fails them.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Mapping
from typing import Any

from twisted.application import service
from twisted.logger import ILogObserver
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile

from socksd.config import ConfigError, LogConfig, location
from socksd.logs import FormatObserver, file_observer, syslog_observer

# twistd's default file for a daemon without -l (UnixAppLogger's).
DAEMON_LOG = "twistd.log"


def twistd_observer(twistd: Mapping[str, Any], log_format: str) -> FormatObserver | None:
    """The observer for twistd's options (its ServerOptions: ``logfile``,
    ``syslog``, ``prefix``, ``nodaemon``, ``logger``), writing where twistd
    would; None where twistd is to choose alone: ``--logger`` (it overrides
    any component) and a daemon told ``-l -`` (twistd refuses that itself)."""
    if twistd.get("logger"):
        return None
    if twistd.get("syslog"):
        return syslog_observer(twistd.get("prefix") or "", log_format)
    logfile = twistd.get("logfile") or ""
    nodaemon = bool(twistd.get("nodaemon"))
    if logfile == "-":
        if not nodaemon:
            return None
        return file_observer(sys.stdout, log_format)
    if nodaemon and not logfile:
        return file_observer(sys.stdout, log_format)
    out = LogFile.fromFullPath(logfile or DAEMON_LOG)
    # SIGUSR1 rotates the file, as twistd's own observer arranges, unless
    # something else has the signal already.
    if not signal.getsignal(signal.SIGUSR1):
        def rotate(signum: int, frame: object) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(out.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return file_observer(out, log_format)


class LoggingRoot(service.MultiService):
    """The top service of a twistd plugin: made a child of twistd's
    application, it gives the application the log observer twistd is to use
    (see the module docstring). ``twistd``: twistd's options (the plugin
    options' ``parent``); None outside twistd, where nothing is set."""

    def __init__(self, log_format: str, twistd: Mapping[str, Any] | None) -> None:
        super().__init__()
        self.log_format = log_format
        self.twistd = twistd
        self.log_observer: FormatObserver | None = None

    def setServiceParent(self, parent: Any) -> None:
        if (self.twistd is not None and isinstance(parent, Componentized)
                and parent.getComponent(ILogObserver) is None):
            observer = twistd_observer(self.twistd, self.log_format)
            if observer is not None:
                parent.setComponent(ILogObserver, observer)
                self.log_observer = observer
        super().setServiceParent(parent)

    def use_format(self, log_format: str) -> None:
        """The format from now on (a reload): the next line is written so."""
        self.log_format = log_format
        if self.log_observer is not None:
            self.log_observer.format = log_format


def check_log_option(log: LogConfig, twistd: Mapping[str, Any] | None,
                     path: str | None) -> None:
    """ConfigError when twistd's ``--logger`` would silently win over
    ``[log] format = "json"``: twistd uses its factory whatever the
    application says, and the log would not be JSON."""
    if log.format == "json" and twistd is not None and twistd.get("logger"):
        raise ConfigError(f"{location(path, 'log', 'format')}: log.format: \"json\" and "
                          f"twistd --logger {twistd['logger']!r} both choose how the log is "
                          "written: drop one")
