"""``[log] format = "json"`` through twistd's own machinery: a real
ServerOptions and ApplicationRunner, up to the observer AppLogger.start
would take (the application's ILogObserver component), for ``-l -``,
``-l FILE``, a daemon's twistd.log and ``--syslog``; and a worker's events,
through the supervisor, with the worker that sent them.

The real twistd process: tests/test_json_log_integration.py.
"""

from __future__ import annotations

import io
import signal
import syslog
from pathlib import Path

import pytest
from twisted.application.app import ApplicationRunner
from twisted.application.service import Application, IServiceCollection
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, Logger, globalLogPublisher, textFileLogObserver
from twisted.scripts.twistd import ServerOptions

from socksd.logs import FROM_WORKER, FormatObserver, json_line
from socksd.tap.logsink import LoggingRoot, twistd_observer
from socksd.tap.worker import LOG_BATCH_DELAY, LogChannel
from socksd.tap.workers import _WorkerLog
from test_json_log import HOSTILE, parsed, session_event

# ---- a worker's events, through the supervisor -----------------------------------------


def test_a_workers_events_come_out_with_the_worker_that_sent_them():
    clock = Clock()
    channel = LogChannel(1, reactor=clock)
    transport = StringTransport()
    channel.makeConnection(transport)
    worker_log = Logger(namespace="twisted.internet", observer=channel)
    worker_log.info("something of Twisted's, in a worker")
    channel(session_event(worker=1, user=HOSTILE))   # the session line, as a worker logs it
    try:
        raise RuntimeError("boom in a worker")
    except RuntimeError:
        Logger(namespace="socksd", observer=channel).failure("checker failed")
    clock.advance(LOG_BATCH_DELAY)     # the batch goes

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        receiver = _WorkerLog(1)
        receiver.makeConnection(StringTransport())
        receiver.dataReceived(transport.value())
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [parsed(json_line(event)) for event in events]
    assert all(event[FROM_WORKER] == 1 for event in events)
    twisted_line, session_line, failure_line = lines
    assert twisted_line["worker"] == 1 and "user" not in twisted_line
    assert session_line["worker"] == 1 and session_line["user"] == HOSTILE
    assert session_line["up"] == 78 and session_line["duration"] == 0.0031
    assert failure_line["worker"] == 1
    assert "RuntimeError: boom in a worker" in failure_line["traceback"]


# ---- twistd's options choose where; [log] format chooses how ---------------------------


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "socksd.toml"
    path.write_text('[server]\nlisten = ["tcp:0:interface=127.0.0.1"]\n[log]\nformat = "json"\n')
    return path


@pytest.fixture
def sigusr1():
    """twistd_observer may take SIGUSR1 (rotation) in this process: give it back."""
    before = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, before)


def application_observer(argv: list[str]):
    """What twistd's AppLogger.start would log through: twistd's own option
    parsing and application making (ApplicationRunner.createOrGetApplication,
    which calls our makeService and setServiceParent), then the application's
    ILogObserver component, which AppLogger.start takes first."""
    options = ServerOptions()
    options.parseOptions(argv)
    application = ApplicationRunner(options).createOrGetApplication()
    root = next(iter(IServiceCollection(application)))
    assert isinstance(root, LoggingRoot)
    observer = application.getComponent(ILogObserver)
    assert observer is root.log_observer
    return observer


@pytest.mark.parametrize("tap", ["socks", "identd"])
def test_dash_l_dash_is_json_on_stdout(config_file, capsys, tap):
    argv = ["-n", "-l", "-", tap, "--config", str(config_file)]
    if tap == "identd":
        argv += ["--listen", "tcp:0:interface=127.0.0.1"]
    observer = application_observer(argv)
    assert isinstance(observer, FormatObserver) and observer.format == "json"
    observer(session_event())
    assert parsed(capsys.readouterr().out.rstrip("\n"))["user"] == "alice"


def test_dash_l_file_is_json_in_that_file(config_file, tmp_path, sigusr1):
    logfile = tmp_path / "out.log"
    observer = application_observer(["-n", "-l", str(logfile), "socks", "--config",
                                     str(config_file)])
    observer(session_event())
    assert parsed(logfile.read_text().rstrip("\n"))["outcome"] == "ok"
    assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)   # rotation, as twistd


def test_a_daemon_without_dash_l_writes_twistd_log(config_file, tmp_path, monkeypatch, sigusr1):
    monkeypatch.chdir(tmp_path)
    observer = application_observer(["socks", "--config", str(config_file)])
    observer(session_event())
    assert parsed((tmp_path / "twistd.log").read_text().rstrip("\n"))["outcome"] == "ok"


def test_syslog_is_json_to_syslog(config_file, monkeypatch):
    sent: list[tuple[int, str]] = []
    opened: list[tuple] = []
    monkeypatch.setattr(syslog, "syslog", lambda priority, message: sent.append(
        (priority, message)))
    from twisted.python.syslog import SyslogObserver
    monkeypatch.setattr(SyslogObserver, "openlog", lambda self, *args: opened.append(args))
    observer = application_observer(["-n", "--syslog", "--prefix", "proxy", "socks",
                                     "--config", str(config_file)])
    assert isinstance(observer, FormatObserver) and observer.format == "json"
    assert opened == [("proxy", 0, syslog.LOG_USER)]       # as twistd --syslog opens it
    observer(session_event())
    [(priority, message)] = sent
    assert priority == syslog.LOG_INFO and parsed(message)["user"] == "alice"


def test_text_format_writes_what_twistd_would(tmp_path, capsys):
    observer = application_observer(["-n", "socks", "--listen", "tcp:0:interface=127.0.0.1"])
    assert observer.format == "text"
    event = session_event()
    observer(event)
    expected = io.StringIO()
    textFileLogObserver(expected)(event)
    assert capsys.readouterr().out == expected.getvalue()


def test_a_logger_given_to_twistd_chooses_alone():
    assert twistd_observer({"logger": print, "nodaemon": True, "logfile": "-"}, "text") is None
    assert twistd_observer({"logfile": "-", "nodaemon": False}, "json") is None   # twistd exits


def test_json_with_twistds_logger_is_a_one_line_error(config_file):
    options = ServerOptions()
    with pytest.raises(SystemExit) as info:
        options.parseOptions(["-n", "--logger", "twisted.logger.textFileLogObserver", "socks",
                              "--config", str(config_file)])
    assert info.value.code == (f"socksd: {config_file}:4: log.format: \"json\" and twistd "
                               "--logger 'twisted.logger.textFileLogObserver' both choose how "
                               "the log is written: drop one")


def test_outside_twistd_nothing_is_set():
    root = LoggingRoot("json", None)
    application = Application("x")
    root.setServiceParent(application)
    assert application.getComponent(ILogObserver) is None and root.log_observer is None
