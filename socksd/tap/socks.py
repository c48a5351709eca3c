"""``twistd socks``: command-line options and the service they make."""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import replace
from typing import Sequence

from twisted.application import service, strports
from twisted.cred import strcred
from twisted.cred.checkers import (
    FilePasswordDB,
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import Portal
from twisted.logger import Logger
from twisted.python import usage

from socksd import config as configuration
from socksd.auth import SOCKSRealm
from socksd.auth.checkers import FirstOf
from socksd.auth.hashing import HashPool
from socksd.auth.methods import Backoff
from socksd.auth.registry import method_registry
from socksd.ident.registry import ProxiedConnections
from socksd.proxy import SOCKSServerFactory
from socksd.proxy.connect import THREAD_POOL_SIZE
from socksd.tap import identd as identd_tap
from socksd.tap import install_reactor, security
from socksd.tap.logsink import LoggingRoot, check_log_option
from socksd.tap.workers import WorkersService
from socksd.twisted_internals import installed_reactor

log = Logger(namespace="socksd")


class Options(usage.Options, strcred.AuthOptionMixin):
    synopsis = "[--config FILE] [--listen ENDPOINT]... [--auth CHECKER]... [--check]"
    longdesc = (
        "A SOCKS proxy. Without --config it listens on 127.0.0.1:1080, asks no "
        "authentication and serves loopback clients only. --auth adds "
        "credential checkers (Twisted strcred strings, e.g. file:PATH, "
        "htpasswd:PATH, memory:USER:PASS, unix, or a checker plugin); given "
        "without 'methods' in the config, it makes username/password required."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (see README.rst)."],
    ]
    optFlags = [
        ["check", None, "Validate the configuration, print a summary and exit (0 if valid)."],
    ]
    supportedInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["auth_strings"] = []
        self["trusted_proxies"] = []

    def opt_trusted_proxy(self, network: str) -> None:
        """A network whose PROXY headers haproxy: listeners believe (repeatable)."""
        self["trusted_proxies"].append(network)

    def opt_auth(self, description: str) -> None:
        """A credential checker (strcred string); see --help-auth."""
        try:
            super().opt_auth(description)
        except usage.UsageError as e:
            # One line, like a config error, not buried under the usage text.
            sys.exit(f"socksd: --auth {description!r}: {e}")
        self["auth_strings"].append(description)   # for workers, which build their own
    def opt_listen(self, description: str) -> None:
        """Listen on this Twisted endpoint instead of the config's (repeatable)."""
        self["listen"].append(description)

    opt_l = opt_listen

    def postOptions(self) -> None:
        # First: checking the config builds endpoints, which imports the reactor.
        install_reactor()
        try:
            self.socks_config, self.checkers = build(self["config"], self["listen"],
                                                     self.get("credCheckers", []),
                                                     self["trusted_proxies"])
            check_log_option(self.socks_config.log, self.parent, self["config"])
        except configuration.ConfigError as e:
            # Not a UsageError: twistd would bury the message under the usage text.
            sys.exit(f"socksd: {e}")
        if self["check"]:
            cfg = self.socks_config
            print(f"{cfg.path or 'embedded default'}: OK: listen {', '.join(cfg.listen)}; "
                  f"methods {', '.join(cfg.methods)}; {len(self.checkers)} checker(s); "
                  f"{len(cfg.rules)} rule(s); {cfg.socks4_summary()}")
            for warning in cfg.warnings():
                print(f"warning: {warning}")
            sys.exit(0)


def build(path: str | None, listen: list[str], auth_checkers: list[ICredentialsChecker],
          trusted_proxies: Sequence[str] = ()
          ) -> tuple[configuration.Config, list[ICredentialsChecker]]:
    """The validated config and its checkers (config's, then --auth's)."""
    cfg = configuration.load(path) if path else configuration.Config()
    cfg = cfg.with_command_line(listen, bool(auth_checkers), trusted_proxies)
    problem = cfg.proxy_problem()
    if problem:
        where = "--listen" if listen else \
            f"{configuration.location(cfg.path, 'server', 'listen')}: server.listen"
        raise configuration.ConfigError(f"{where}: {problem}")
    checkers: list[ICredentialsChecker] = []
    for index, description in enumerate(cfg.checkers):
        try:
            checkers.append(strcred.makeChecker(description))
        except Exception as e:
            raise configuration.ConfigError(
                f"{configuration.location(cfg.path, 'server', 'checkers')}: "
                f"server.checkers[{index}]: {description!r}: {e}") from None
    checkers.extend(auth_checkers)
    for checker in checkers:
        _bytes_users(checker)
        # Twisted's file: checker only warns about a missing file, then
        # refuses every login; say so at start-up instead.
        if isinstance(checker, FilePasswordDB) and not os.access(checker.filename, os.R_OK):
            origin = ("--auth" if checker in auth_checkers else
                      f"{configuration.location(cfg.path, 'server', 'checkers')}: "
                      "server.checkers")
            raise configuration.ConfigError(
                f"{origin}: file:{checker.filename}: cannot read {checker.filename}")
    if cfg.gssapi is not None and "gssapi" in cfg.methods:
        from gssapi.exceptions import GSSError

        try:
            cfg.gssapi.acceptor_credentials()
        except GSSError as e:
            raise configuration.ConfigError(
                f"{configuration.location(cfg.path, 'gssapi', 'keytab')}: gssapi.keytab: "
                f"{cfg.gssapi.keytab or 'default keytab'}: "
                f"cannot accept {cfg.gssapi.principal or cfg.gssapi.service} with it: "
                f"{e.gen_message()}") from None
        if cfg.gssapi.principal_map == "strip-realm" and not cfg.gssapi.local_realms:
            # Without a realm to strip, alice@REALM would quietly stop being
            # alice for every rule: say so instead.
            raise configuration.ConfigError(
                f"{configuration.location(cfg.path, 'gssapi', 'principal_map')}: "
                "gssapi.principal_map: \"strip-realm\" strips the local realms, and krb5 "
                "names no default realm: list them in gssapi.local_realms")
    if "userpass" in cfg.methods and not checkers:
        raise configuration.ConfigError(
            f"{configuration.location(cfg.path, 'server', 'methods')}: server.methods: "
            "\"userpass\" needs a checker "
            "(server.checkers or --auth)")
    return cfg, checkers


def _bytes_users(checker: ICredentialsChecker) -> None:
    """Twisted's ``memory:`` factory stores str names and passwords, while
    RFC 1929 (like conch and ftp) gives IUsernamePassword bytes: store bytes."""
    if isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse):
        checker.users = {
            (k.encode("utf-8") if isinstance(k, str) else k):
                (v.encode("utf-8") if isinstance(v, str) else v)
            for k, v in checker.users.items()}


def make_factory(cfg: configuration.Config, checkers: list[ICredentialsChecker],
                 proxied: ProxiedConnections | None, share: int = 1,
                 worker: int | None = None) -> SOCKSServerFactory:
    """The listeners' factory; with ``share`` workers each gets its share
    of the session limits and of the password checks' threads and bounds.
    ``worker``: which worker process this is, for its lines."""
    limits = cfg.limits
    if share > 1:
        limits = replace(limits, **{key: -(-getattr(limits, key) // share) for key in (
            "max_sessions", "max_sessions_per_client", "auth_threads", "auth_in_flight",
            "auth_in_flight_per_client")})
    portal = None
    if checkers:
        portal = Portal(SOCKSRealm(), [FirstOf(checkers)])
        use_hash_pool(checkers, HashPool(limits.auth_threads, limits.auth_in_flight,
                                         limits.auth_in_flight_per_client))
    registry = method_registry(portal, cfg.gssapi if "gssapi" in cfg.methods else None,
                               Backoff(limits.auth_failure_backoff,
                                       limits.auth_failure_backoff_max,
                                       limits.auth_failure_clients))
    return SOCKSServerFactory([registry[name] for name in cfg.methods], cfg.rules, limits,
                              socks4=cfg.socks4, registry=proxied,
                              trusted_proxies=cfg.trusted_proxies, worker=worker)


def use_hash_pool(checkers: list, pool: HashPool) -> None:
    """Hand the bounded pool to every checker that hashes: those with a
    ``hash_pool`` attribute (htpasswd:, and any plugin that asks for one)."""
    for checker in checkers:
        if hasattr(checker, "hash_pool"):
            checker.hash_pool = pool


# Descriptors a session may hold: its two sockets and, while spliced data is
# in flight, a pipe.
FDS_PER_SESSION = 4


def raise_nofile_limit(max_sessions: int) -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one, as servers holding many
    sockets do (the usual soft default, 1024, is 250 sessions); warn when
    even that is short of what ``max_sessions`` can need. Workers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_sessions * FDS_PER_SESSION + 64
    if soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, need)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warn("max_sessions = {sessions} can need {need} file descriptors; the limit is "
                 "{limit} (raise it: ulimit -n, or LimitNOFILE= in a systemd unit)",
                 sessions=max_sessions, need=need, limit=soft)


def makeService(options: Options) -> service.IService:
    cfg = options.socks_config
    for warning in cfg.warnings():
        log.warn("{warning}", warning=warning)
    raise_nofile_limit(cfg.limits.max_sessions)
    security.warn_about_secrets(cfg, options.checkers, options["auth_strings"])
    # Name lookups: see connect.MAX_LOOKUPS.
    installed_reactor().suggestThreadPoolSize(THREAD_POOL_SIZE)
    proxied = None
    identd = cfg.identd if cfg.identd is not None and cfg.identd.enabled else None
    if identd is not None and identd.policy.proxied_users and cfg.workers == 1:
        proxied = ProxiedConnections()
    top = LoggingRoot(cfg.log.format, options.parent)
    security.RootWarning("socks").setServiceParent(top)
    if cfg.workers > 1:
        worker_args = [arg for network in options["trusted_proxies"]
                       for arg in ("--trusted-proxy", network)]
        if options["config"]:
            worker_args += ["--config", os.path.abspath(options["config"])]
        WorkersService(cfg.workers, cfg.listen, worker_args,
                       auth=options["auth_strings"]).setServiceParent(top)
    else:
        factory = make_factory(cfg, options.checkers, proxied)
        for description in cfg.listen:
            strports.service(description, factory).setServiceParent(top)
    if identd is not None:
        # The identd in the same process answers for the SOCKS users' sockets.
        for child in identd_tap.make_services(identd, proxied):
            child.setServiceParent(top)
    return top
