"""``twistd identd``: the RFC 1413 server on its own.

Flags override the ``[identd]`` table of ``--config``. twistd's own
``--uid``/``--gid`` drop privileges after the port (113) is bound.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import replace
from typing import Any, BinaryIO

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from socksd import config as configuration
from socksd.ident import lookup
from socksd.ident.policy import parse_mode
from socksd.ident.registry import ProxiedConnections
from socksd.ident.server import IdentFactory, answer_query
from socksd.tap import install_reactor, print_version, privileges, security
from socksd.tap.listening import bind_now, check_binding
from socksd.tap.logsink import LoggingRoot, check_log_option
from socksd.tap.notify import Notifier
from socksd.tap.reload import Change, Listeners, Reloader, hold_sighup
from socksd.wire import ident

log = Logger(namespace="socksd")


class Options(usage.Options):
    synopsis = ("[--config FILE] [--listen ENDPOINT]... "
                "[--stdio --local-address A --remote-address B]")
    longdesc = ("An RFC 1413 ident server answering who owns a TCP connection on this "
                "host (Linux sock_diag, or /proc/net/tcp*). Default: tcp:113, root hidden.")
    optParameters = [
        ["config", "c", None, "TOML configuration file; its [identd] table is used."],
        ["reply", None, None, "Reply mode for everybody: name, uid, hidden, random, hashed, "
                              "fixed:TEXT."],
        ["opsys", None, None, "The operating system field (default UNIX)."],
        ["local-address", None, None, "--stdio: the address the query was made to."],
        ["remote-address", None, None, "--stdio: the address the query came from."],
    ]
    optFlags = [
        ["stdio", None, "Answer one query read from stdin on stdout and exit (inetd)."],
        ["unknown-error-only", None, "Answer UNKNOWN-ERROR for every error."],
        ["check", None, "Validate the configuration and exit."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["hide"] = []

    def opt_version(self) -> None:
        """Display socksd's and Twisted's versions and exit."""
        print_version()

    def opt_listen(self, description: str) -> None:
        """Listen on this Twisted endpoint instead of the config's (repeatable)."""
        self["listen"].append(description)

    opt_l = opt_listen

    def opt_hide(self, user: str) -> None:
        """Answer HIDDEN-USER for this user (repeatable; replaces the list)."""
        self["hide"].append(user)

    def postOptions(self) -> None:
        hold_sighup()
        # First: checking the config builds endpoints, which imports the reactor.
        install_reactor()
        try:
            self.identd, self.log_config = build(self)
            check_addresses(self)
            check_log_option(self.log_config, self.parent, self["config"])
            file_warnings = privileges.user_file_warnings(
                privileges.after_switch(self.parent), self.identd.policy)
            if not (self["check"] or self["stdio"]):
                check_inherited(self)
                # As twistd socks does (socksd.tap.socks.check_listening).
                check_binding((description, bind_now) for description in self.identd.listen)
        except configuration.ConfigError as e:
            sys.exit(f"identd: {e}")
        if self["check"]:
            print(summary(self, self.identd))
            for warning in file_warnings:
                print(f"warning: {warning}")
            sys.exit(0)
        for warning in file_warnings:
            # Kept by twistd until its log starts, then written there.
            log.warn("{warning}", warning=warning)
        if self["stdio"]:
            sys.exit(serve_stdio(self.identd, self["local-address"], self["remote-address"]))


def build(options: Options) -> tuple[configuration.IdentdConfig, configuration.LogConfig]:
    """The ``[identd]`` table with the flags applied, and the ``[log]`` table."""
    cfg = configuration.IdentdConfig()
    log_config = configuration.LogConfig()
    if options["config"]:
        loaded = configuration.load(options["config"])
        cfg = loaded.identd or cfg
        log_config = loaded.log
    changes: dict[str, Any] = {}   # IdentPolicy fields
    if options["reply"]:
        try:
            changes["reply"] = parse_mode(options["reply"])
        except ValueError as e:
            raise configuration.ConfigError(f"--reply: {e}") from None
    if options["opsys"]:
        changes["opsys"] = options["opsys"]
    if options["hide"]:
        changes["hide"] = frozenset(options["hide"])
    if options["unknown-error-only"]:
        changes["unknown_error_only"] = True
    if changes:
        cfg = replace(cfg, policy=replace(cfg.policy, **changes))
    if options["listen"]:
        configuration.check_listen_option(options["listen"])
        cfg = replace(cfg, listen=tuple(options["listen"]))
    return cfg, log_config


def check_inherited(options: Options) -> None:
    """ConfigError for a ``systemd:`` endpoint whose socket this process was
    not passed: one line at start (socksd.tap.socks.check_inherited)."""
    for description in options.identd.listen:
        problem = configuration.inherited_problem(description)
        if problem:
            where = "--listen" if options["listen"] else \
                f"{configuration.location(options['config'], 'identd', 'listen')}: identd.listen"
            raise configuration.ConfigError(f"{where}: {description!r}: {problem}")


def check_addresses(options: Options) -> None:
    """ConfigError for a ``--local-address``/``--remote-address`` the lookup
    cannot use: found here, not as a traceback and an UNKNOWN-ERROR answer."""
    for option in ("local-address", "remote-address"):
        if options[option] is not None:
            try:
                # The lookup's own parser: IPv4, IPv6, v4-mapped, %scope.
                lookup.parse_address(options[option])
            except ValueError as e:
                raise configuration.ConfigError(f"--{option}: {e}") from None


def serve_stdio(cfg: configuration.IdentdConfig, local: str | None, remote: str | None,
                stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    """One query from stdin, its answer on stdout, synchronously (no reactor).

    Under inetd stdin is the connection: its addresses are used unless given.
    """
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    if local is None or remote is None:
        try:
            sock = socket.socket(fileno=os.dup(stdin.fileno()))
            with sock:
                if sock.family not in (socket.AF_INET, socket.AF_INET6):
                    raise ValueError("not a TCP socket")
                local = local or sock.getsockname()[0]
                remote = remote or sock.getpeername()[0]
        except (OSError, ValueError):
            print("identd --stdio: give --local-address and --remote-address "
                  "(stdin is not a TCP socket)", file=sys.stderr)
            return 2
    most = cfg.limits.max_line + 2        # the line and its CR LF
    line = stdin.readline(most)
    if line.endswith(b"\n"):
        line = line[:-1]
    elif not line or len(line) == most:
        return 1          # nothing at all, or a line over the limit
    # else a last line ended by EOF rather than CR LF: answered as over TCP
    if line.endswith(b"\r"):
        line = line[:-1]
    if len(line) > cfg.limits.max_line:
        return 1
    results: list[bytes | Failure] = []
    d = answer_query(cfg.policy, None, line, local, remote,
                     blocking=lambda f, *a: f(*a))
    d.addBoth(results.append)
    reply = results[0]
    if not isinstance(reply, bytes):
        reply = b"0, 0 : ERROR : " + ident.UNKNOWN_ERROR.encode() + b"\r\n"
    stdout.write(reply)
    stdout.flush()
    return 0


class IdentdServing:
    """An identd's factory and listeners, which a reload changes: the reply
    policy and limits for the next query, the listen endpoints added and
    removed (see :class:`~socksd.tap.reload.Listeners`)."""

    def __init__(self, cfg: configuration.IdentdConfig | None,
                 registry: ProxiedConnections | None = None, program: str = "socksd") -> None:
        settings = cfg if cfg is not None else configuration.IdentdConfig()
        self.factory = IdentFactory(settings.policy, settings.limits, registry=registry)
        self.listeners = Listeners(cfg.listen if cfg is not None else (), self.factory,
                                   program=program)

    def serve(self, cfg: configuration.IdentdConfig) -> None:
        """The reply policy and limits for the next query."""
        self.factory.policy, self.factory.limits = cfg.policy, cfg.limits


def summary(options: Options, cfg: configuration.IdentdConfig) -> str:
    return f"{options['config'] or 'defaults'}: OK: identd listen {', '.join(cfg.listen)}"


def makeService(options: Options) -> service.IService:
    top = LoggingRoot(options.log_config.format, options.parent)
    security.RootWarning("identd").setServiceParent(top)
    identd = IdentdServing(options.identd, program="identd")
    identd.listeners.setServiceParent(top)

    def reload() -> defer.Deferred[str]:
        cfg, log_config = build(options)
        check_log_option(log_config, options.parent, options["config"])

        def apply(change: Change) -> str:
            change.apply()
            identd.serve(cfg)
            top.use_format(log_config.format)
            return summary(options, cfg)

        return identd.listeners.bind(cfg.listen).addCallback(apply)

    # Last: started once every listener is bound, stopped first.
    notifier = Notifier()
    Reloader(reload, notifier=notifier).setServiceParent(top)
    notifier.setServiceParent(top)
    return top
