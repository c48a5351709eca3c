"""``twistd socks``: command-line options and the service they make."""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import replace
from typing import Any, Callable, Sequence

from twisted.application import service
from twisted.cred import strcred
from twisted.cred.checkers import (
    FilePasswordDB,
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from socksd import __version__
from socksd import config as configuration
from socksd.auth import SOCKSRealm, files
from socksd.auth.checkers import FirstOf
from socksd.auth.hashing import HashPool
from socksd.auth.methods import Backoff
from socksd.auth.registry import method_registry
from socksd.ident.registry import ProxiedConnections, Registrar
from socksd.proxy import SOCKSServerFactory
from socksd.proxy.connect import THREAD_POOL_SIZE
from socksd.stats import STATS
from socksd.tap import install_reactor, print_version, privileges, security
from socksd.tap.drain import Drain, Draining
from socksd.tap.identd import IdentdServing
from socksd.tap.listening import bind_now, check_binding
from socksd.tap.logsink import LoggingRoot, check_log_option
from socksd.tap.metrics import registry as metrics_registry
from socksd.tap.metrics import site as metrics_site
from socksd.tap.metrics import workers_registry
from socksd.tap.notify import Notifier
from socksd.tap.reload import Change, Listeners, Reloader, bind_all, hold_sighup
from socksd.tap.workers import WorkersService, bind_shared
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

    def opt_version(self) -> None:
        """Display socksd's and Twisted's versions and exit."""
        print_version()

    def opt_trusted_proxy(self, network: str) -> None:
        """A network whose PROXY headers haproxy: listeners believe (repeatable)."""
        self["trusted_proxies"].append(network)

    def opt_auth(self, description: str) -> None:
        """A credential checker (strcred string); see --help-auth."""
        try:
            super().opt_auth(description)
        except usage.UsageError as e:
            # One line, like a config error, not buried under the usage text.
            sys.exit(f"socksd: --auth {configuration.checker_text(description)}: {e}")
        self["auth_strings"].append(description)   # for workers, which build their own
    def opt_listen(self, description: str) -> None:
        """Listen on this Twisted endpoint instead of the config's (repeatable)."""
        self["listen"].append(description)

    opt_l = opt_listen

    def postOptions(self) -> None:
        hold_sighup()
        # First: checking the config builds endpoints, which imports the reactor.
        install_reactor()
        try:
            account = privileges.after_switch(self.parent)
            self.socks_config, self.checkers = build(self["config"], self["listen"],
                                                     self.get("credCheckers", []),
                                                     self["trusted_proxies"],
                                                     account=account)
            check_log_option(self.socks_config.log, self.parent, self["config"])
            identd = _identd(self.socks_config)
            file_warnings = privileges.user_file_warnings(
                account, identd.policy if identd is not None else None)
            if not self["check"]:
                check_inherited(self.socks_config, self["listen"])
                check_listening(self.socks_config)
        except configuration.ConfigError as e:
            # Not a UsageError: twistd would bury the message under the usage text.
            sys.exit(f"socksd: {e}")
        if self["check"]:
            cfg = self.socks_config
            print(summary(cfg, self.checkers))
            for warning in [*cfg.warnings(), *file_warnings]:
                print(f"warning: {warning}")
            sys.exit(0)
        for warning in file_warnings:
            # Kept by twistd until its log starts, then written there.
            log.warn("{warning}", warning=warning)


def check_inherited(cfg: configuration.Config, listen: list[str]) -> None:
    """ConfigError for a ``systemd:`` endpoint whose socket this process was
    not passed: one line at start, not Twisted's IndexError. Not for
    ``--check``, which may check the file anywhere."""
    identd = _identd(cfg)
    for table, descriptions in (("server", cfg.listen),
                                ("identd", identd.listen if identd is not None else ()),
                                ("metrics", cfg.metrics.listen)):
        for description in descriptions:
            problem = configuration.inherited_problem(description)
            if problem:
                where = "--listen" if table == "server" and listen else \
                    f"{configuration.location(cfg.path, table, 'listen', cfg.source)}: " \
                    f"{table}.listen"
                raise configuration.ConfigError(f"{where}: {description!r}: {problem}")


def check_listening(cfg: configuration.Config) -> None:
    """ConfigError ("cannot listen on tcp:1080: address already in use")
    for the first listener this process cannot bind now, bound as it will
    be at start (see listening.check_binding for why here): the SOCKS ones
    (each worker's with SO_REUSEPORT), the embedded identd's, the metrics
    endpoint's. Not for ``--check``, which may check the file anywhere."""
    identd = _identd(cfg)
    socks = bind_shared if cfg.workers > 1 else bind_now
    check_binding([*((description, socks) for description in cfg.listen),
                   *((description, bind_now) for description in
                     (identd.listen if identd is not None else ())),
                   *((description, bind_now) for description in cfg.metrics.listen)])


def summary(cfg: configuration.Config, checkers: Sequence[ICredentialsChecker]) -> str:
    """What a configuration serves, in one line (--check, and a reload)."""
    return (f"{cfg.path or 'embedded default'}: OK: listen {', '.join(cfg.listen)}; "
            f"methods {', '.join(cfg.methods)}; {len(checkers)} checker(s); "
            f"{cfg.rules_summary()}; {cfg.socks4_summary()}")


def build(path: str | None, listen: list[str], auth_checkers: list[ICredentialsChecker],
          trusted_proxies: Sequence[str] = (), text: str | None = None,
          account: privileges.Account | None = None
          ) -> tuple[configuration.Config, list[ICredentialsChecker]]:
    """The validated config and its checkers (config's, then --auth's):
    from the file at ``path``, or from ``text``, the text of that file as
    the supervisor of a worker read it. ``account``: who twistd serves as
    after start-up, who must be able to read the files read at each login."""
    if path and text is not None:
        cfg = configuration.load_text(text, path)
    else:
        cfg = configuration.load(path) if path else configuration.Config()
    cfg = cfg.with_command_line(listen, bool(auth_checkers), trusted_proxies)

    def location(table: str, key: str) -> str:
        return configuration.location(cfg.path, table, key, cfg.source)

    problem = cfg.proxy_problem()
    if problem:
        where = "--listen" if listen else f"{location('server', 'listen')}: server.listen"
        raise configuration.ConfigError(f"{where}: {problem}")
    checkers: list[ICredentialsChecker] = []
    # Where each checker was named, for messages about it.
    origins: list[str] = []
    for index, description in enumerate(cfg.checkers):
        origins.append(f"{location('server', 'checkers')}: server.checkers[{index}]: "
                       f"{configuration.checker_text(description)}")
        try:
            checkers.append(strcred.makeChecker(description))
        except Exception as e:
            raise configuration.ConfigError(f"{origins[-1]}: {e}") from None
    checkers.extend(auth_checkers)
    origins.extend("--auth" for _checker in auth_checkers)
    for checker in checkers:
        _bytes_users(checker)
        if isinstance(checker, FilePasswordDB):
            origin = ("--auth" if checker in auth_checkers else
                      f"{location('server', 'checkers')}: "
                      "server.checkers")
            # Twisted's file: checker only warns about a missing file, then
            # refuses every login; say so at start-up instead.
            if not os.access(checker.filename, os.R_OK):
                raise configuration.ConfigError(
                    f"{origin}: file:{checker.filename}: cannot read {checker.filename}")
            try:
                files.check_plain_file(checker)
            except (OSError, ValueError) as e:
                raise configuration.ConfigError(
                    f"{origin}: file:{checker.filename}: {e}") from None
    if cfg.gssapi is not None and "gssapi" in cfg.methods:
        from gssapi.exceptions import GSSError

        try:
            cfg.gssapi.acceptor_credentials()
        except GSSError as e:
            raise configuration.ConfigError(
                f"{location('gssapi', 'keytab')}: gssapi.keytab: "
                f"{cfg.gssapi.keytab or 'default keytab'}: "
                f"cannot accept {cfg.gssapi.principal or cfg.gssapi.service} with it: "
                f"{e.gen_message()}") from None
        if cfg.gssapi.principal_map == "strip-realm" and not cfg.gssapi.local_realms:
            # Without a realm to strip, alice@REALM would quietly stop being
            # alice for every rule: say so instead.
            raise configuration.ConfigError(
                f"{location('gssapi', 'principal_map')}: "
                "gssapi.principal_map: \"strip-realm\" strips the local realms, and krb5 "
                "names no default realm: list them in gssapi.local_realms")
    if "userpass" in cfg.methods and not checkers:
        raise configuration.ConfigError(
            f"{location('server', 'methods')}: server.methods: "
            "\"userpass\" needs a checker "
            "(server.checkers or --auth)")
    if account is not None:
        privileges.check_readable(account,
                                  _read_while_serving(cfg, checkers, origins, location))
    return cfg, checkers


def _read_while_serving(cfg: configuration.Config, checkers: Sequence[ICredentialsChecker],
                        origins: Sequence[str], location: Callable[[str, str], str]
                        ) -> list[tuple[str, str]]:
    """(where it is named, path) of each file read at logins, long after
    start-up: password files (file:, htpasswd:) and the GSS-API keytab."""
    files = []
    # Loaded if, and only if, an htpasswd: checker was made (bcrypt, argon2).
    passwd = sys.modules.get("socksd.auth.passwd")
    for checker, origin in zip(checkers, origins, strict=True):
        if isinstance(checker, FilePasswordDB):
            files.append((origin, checker.filename))
        elif passwd is not None and isinstance(checker, passwd.HashedPasswordFile):
            files.append((origin, checker.path))
    if cfg.gssapi is not None and "gssapi" in cfg.methods:
        keytab = privileges.keytab_file(cfg.gssapi.keytab)
        if keytab is not None:
            where = (f"{location('gssapi', 'keytab')}: gssapi.keytab" if cfg.gssapi.keytab
                     else "KRB5_KTNAME")
            files.append((where, keytab))
    return files


def _bytes_users(checker: ICredentialsChecker) -> None:
    """Twisted's ``memory:`` factory stores str names and passwords, while
    RFC 1929 (like conch and ftp) gives IUsernamePassword bytes: store bytes."""
    if isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse):
        checker.users = {
            (k.encode("utf-8") if isinstance(k, str) else k):
                (v.encode("utf-8") if isinstance(v, str) else v)
            for k, v in checker.users.items()}


class Assembly:
    """Makes what the listener serves from a configuration: its methods,
    portal and checkers anew each time, while the parts that must outlive a
    reload are kept: the password checks' threads and bounds, and the
    failed-login memory (a reload must not forgive a password guesser).
    With ``share`` workers each gets its share of the session limits and of
    the password checks' threads and bounds."""

    def __init__(self, share: int = 1) -> None:
        self.share = share
        self.pool: HashPool | None = None
        self.backoff: Backoff | None = None

    def settings(self, cfg: configuration.Config, checkers: list[ICredentialsChecker],
                 proxied: Registrar | None) -> dict[str, Any]:
        """``SOCKSServerFactory``'s settings (and its ``serve``'s)."""
        limits = cfg.limits
        if self.share > 1:
            limits = replace(limits, **{key: -(-getattr(limits, key) // self.share) for key in (
                "max_sessions", "max_sessions_per_client", "auth_threads", "auth_in_flight",
                "auth_in_flight_per_client")})
        portal = None
        if checkers:
            portal = Portal(SOCKSRealm(), [FirstOf(checkers)])
            bounds = (limits.auth_threads, limits.auth_in_flight,
                      limits.auth_in_flight_per_client)
            if self.pool is None:
                self.pool = HashPool(*bounds)
            else:
                self.pool.resize(*bounds)
            use_hash_pool(checkers, self.pool)
        backoff = (limits.auth_failure_backoff, limits.auth_failure_backoff_max,
                   limits.auth_failure_clients)
        if self.backoff is None:
            self.backoff = Backoff(*backoff)
        else:
            self.backoff.resize(*backoff)
        registry = method_registry(portal, cfg.gssapi if "gssapi" in cfg.methods else None,
                                   self.backoff)
        return dict(methods=[registry[name] for name in cfg.methods], rules=cfg.rules,
                    limits=limits, socks4=cfg.socks4, registry=proxied,
                    trusted_proxies=cfg.trusted_proxies,
                    recheck_on_reload=cfg.recheck_on_reload, upstreams=cfg.upstreams)


def make_factory(cfg: configuration.Config, checkers: list[ICredentialsChecker],
                 proxied: Registrar | None, share: int = 1, worker: int | None = None,
                 assembly: Assembly | None = None) -> SOCKSServerFactory:
    """The listeners' factory (``share``: see :class:`Assembly`). ``worker``:
    which worker process this is, for its lines."""
    assembly = assembly if assembly is not None else Assembly(share)
    return SOCKSServerFactory(**assembly.settings(cfg, checkers, proxied), worker=worker)


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
    top = LoggingRoot(cfg.log.format, options.parent)
    security.RootWarning("socks").setServiceParent(top)
    # The identd in this process answers for the SOCKS users' sockets: the
    # sessions register them here, or, with workers, over each worker's
    # channel to this registry. With no identd configured it listens
    # nowhere, until a reload turns it on.
    proxied = ProxiedConnections()
    identd = IdentdServing(_identd(cfg), proxied)
    STATS.per_user = cfg.metrics.per_user
    serving: Callable[[], defer.Deferred[None]] | None = None   # what READY=1 waits for
    if cfg.workers > 1:
        # What the file says is checked against the listeners this process
        # holds for them (the command line's or the file's): the workers'
        # checks of a reload's text must be the same as this process's.
        worker_args = [*(arg for description in cfg.listen for arg in ("--listen", description)),
                       *(arg for network in options["trusted_proxies"]
                         for arg in ("--trusted-proxy", network))]
        workers = WorkersService(cfg.workers, cfg.listen, worker_args,
                                 auth=options["auth_strings"], registry=proxied, config=cfg,
                                 started=started_line(cfg))
        # Each worker drains its own sessions; this process waits for them.
        draining = Draining(workers, lambda: defer.succeed(None), workers.now)
        serving = workers.ready
        # The endpoint is the supervisor's: it sums what the workers counted.
        metrics = Listeners(cfg.metrics.listen, metrics_site(workers_registry(workers),
                                                             workers.gather))
        metrics.setServiceParent(draining)
        reload: Callable[[], defer.Deferred[str]] = SupervisorReload(options, cfg, workers,
                                                                     identd, top, metrics)
    else:
        assembly = Assembly()
        factory = make_factory(cfg, options.checkers, registering(cfg, proxied),
                               assembly=assembly)
        listeners = Listeners(cfg.listen, factory, started=started_line(cfg))
        drain = Drain(factory)
        draining = Draining(listeners, drain.start, drain.cut)
        metrics = Listeners(cfg.metrics.listen, metrics_site(metrics_registry(factory)))
        metrics.setServiceParent(draining)
        reload = Reload(options, cfg, factory, assembly, listeners, identd, proxied, top,
                        metrics)
    # The identd answers about the sessions' connections while they drain.
    identd.listeners.setServiceParent(draining)
    draining.setServiceParent(top)
    # Last: started once every listener is bound, stopped first. With
    # workers, ready once every worker serves; after a reload, once the
    # supervisor has applied the file and sent its text to every worker
    # (each applies it as it reads it, and says so: "wN reloaded").
    notifier = Notifier(serving)
    Reloader(reload, notifier=notifier).setServiceParent(top)
    notifier.setServiceParent(top)
    return top


def started_line(cfg: configuration.Config) -> Callable[[str, int | None], None]:
    """The start-up line of each SOCKS listener, once bound (port 0 is a
    port by then): socksd's version, the endpoint, what it serves."""
    identd = _identd(cfg)

    def started(description: str, port: int | None) -> None:
        bound = ", ".join([*([f"port {port}"] if port is not None else []),
                           *([f"{cfg.workers} workers"] if cfg.workers > 1 else [])])
        # Not "version": a JSON line's version is a session's SOCKS version.
        log.info("socksd {release} listening on {endpoint}{bound}: methods {methods}; "
                 "{socks4}; identd {identd}", release=__version__, endpoint=description,
                 port=port, bound=f" ({bound})" if bound else "",
                 methods=", ".join(cfg.methods), socks4=cfg.socks4_summary(),
                 identd=f"on {', '.join(identd.listen)}" if identd is not None else "off")

    return started


def _identd(cfg: configuration.Config) -> configuration.IdentdConfig | None:
    """The embedded identd's settings, if ``[identd] enabled``."""
    return cfg.identd if cfg.identd is not None and cfg.identd.enabled else None


def registering(cfg: configuration.Config, registrar: Registrar | None) -> Registrar | None:
    """Where sessions register who owns their outgoing sockets (the
    registry, or a worker's channel to it): only while the identd answers
    with the SOCKS users (identd.proxied_users)."""
    identd = _identd(cfg)
    return registrar if identd is not None and identd.policy.proxied_users else None


class Reload:
    """SIGHUP with ``workers = 1``: the file read and checked as --check
    does, the listen endpoints it adds bound, then everything swapped in:
    new sessions are served under it; the open ones keep their settings
    (unless ``recheck_on_reload`` judges them again). Command-line options
    stay as given."""

    def __init__(self, options: Options, cfg: configuration.Config,
                 factory: SOCKSServerFactory, assembly: Assembly, listeners: Listeners,
                 identd: IdentdServing, proxied: ProxiedConnections | None,
                 root: LoggingRoot, metrics: Listeners) -> None:
        self.options = options
        self.root = root
        self.metrics = metrics
        self.workers = cfg.workers
        self.factory = factory
        self.assembly = assembly
        self.listeners = listeners
        self.identd = identd
        self.proxied = proxied

    def __call__(self) -> defer.Deferred[str]:
        cfg, checkers = rebuild(self.options)
        identd = _identd(cfg)

        def apply(changes: list[Change]) -> str:
            try:
                settings = self.assembly.settings(cfg, checkers, registering(cfg, self.proxied))
            except BaseException:
                for change in changes:
                    change.cancel()
                raise
            for change in changes:
                change.apply()
            if identd is not None:
                self.identd.serve(identd)
            self.root.use_format(cfg.log.format)
            STATS.per_user = cfg.metrics.per_user
            self.factory.serve(**settings)
            if cfg.recheck_on_reload:
                self.factory.recheck()
            return reloaded(cfg, checkers, self.workers)

        return bind_all([(self.listeners, cfg.listen),
                         (self.identd.listeners, identd.listen if identd is not None else ()),
                         (self.metrics, cfg.metrics.listen)]).addCallback(apply)


class SupervisorReload:
    """SIGHUP with ``workers = N``: the file is read and checked here,
    once, then its text is sent to every worker, which runs that text (not
    the file as it finds it: it may have changed since), so no worker ever
    runs a configuration the others do not. The workers hold their
    listening sockets from the start: a changed ``listen`` needs a restart,
    and is refused. The identd and the metrics endpoints are the
    supervisor's, rebound here."""

    def __init__(self, options: Options, cfg: configuration.Config, workers: WorkersService,
                 identd: IdentdServing, root: LoggingRoot, metrics: Listeners) -> None:
        self.options = options
        self.root = root
        self.listen = cfg.listen
        self.count = cfg.workers
        self.workers = workers
        self.identd = identd
        self.metrics = metrics

    def __call__(self) -> defer.Deferred[str]:
        cfg, checkers = rebuild(self.options)
        if cfg.listen != self.listen:
            raise configuration.ConfigError(
                f"{configuration.location(cfg.path, 'server', 'listen', cfg.source)}: "
                f"server.listen: changed, and the {self.count} workers hold their sockets "
                "from the start: restart socksd for a new listen")
        identd = _identd(cfg)

        def apply(changes: list[Change]) -> str:
            for change in changes:
                change.apply()
            if identd is not None:
                self.identd.serve(identd)
            self.root.use_format(cfg.log.format)
            STATS.per_user = cfg.metrics.per_user
            self.workers.reload(cfg)
            return reloaded(cfg, checkers, self.count)

        return bind_all([(self.identd.listeners, identd.listen if identd is not None else ()),
                         (self.metrics, cfg.metrics.listen)]).addCallback(apply)


def rebuild(options: Options) -> tuple[configuration.Config, list[ICredentialsChecker]]:
    """The configuration a reload would run: the file read again, the
    command line's options as given at start (``--auth`` checkers made
    again from their strings, so a plugin checker reads its store again)."""
    auth = []
    for description in options["auth_strings"]:
        try:
            auth.append(strcred.makeChecker(description))
        except Exception as e:
            raise configuration.ConfigError(
                f"--auth {configuration.checker_text(description)}: {e}") from None
    cfg, checkers = build(options["config"], options["listen"], auth,
                          options["trusted_proxies"])
    check_log_option(cfg.log, options.parent, options["config"])
    for warning in cfg.warnings():
        log.warn("{warning}", warning=warning)
    return cfg, checkers


def reloaded(cfg: configuration.Config, checkers: Sequence[ICredentialsChecker],
             workers: int) -> str:
    """The reload's line: what --check says of the file now served."""
    kept = "" if cfg.workers == workers else \
        f"; workers = {workers} until a restart (the file says {cfg.workers})"
    return summary(cfg, checkers) + kept
