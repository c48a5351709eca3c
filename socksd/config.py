"""The TOML configuration: file -> frozen, validated objects.

A bad file never produces a traceback: :class:`ConfigError` says
``FILE:LINE: key: what is wrong`` and the caller exits non-zero.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, NamedTuple, Sequence

from socksd.auth.gss import LEVEL_NAMES, GSSAPISettings
from socksd.auth.registry import METHODS
from socksd.client.upstream import Upstream, parse_upstream
from socksd.ident.policy import IdentPolicy, parse_mode
from socksd.ident.server import IdentdLimits
from socksd.logs import FORMATS
from socksd.proxy.limits import Limits
from socksd.proxy.socks4 import Socks4Policy
from socksd.proxy.source import SELECTS as SOURCE_SELECTS
from socksd.rules import (
    SELF,
    IPAddress,
    IPNetwork,
    RuleLimits,
    RuleSet,
    compile_rule,
    default_rules,
    parse_ip,
    parse_network,
    port_range,
)

DEFAULT_LISTEN = ("tcp:1080:interface=127.0.0.1",)


# The longest a "wait" key ([identd] proxied_wait) may be, in seconds.
MAX_WAIT = 60
# The longest a stop may wait for the open sessions ([server]
# drain_timeout), in seconds.
MAX_DRAIN = 86400
# The largest file ``workers`` > 1 passes on to the workers (its text
# travels to each; see socksd.tap.workers): far more than rules and lists
# of users take.
MAX_WORKERS_CONFIG = 2 << 20


class ConfigError(Exception):
    """A configuration that must stop start-up; str() is the whole message."""


@dataclass(frozen=True)
class IdentdConfig:
    """The ``[identd]`` table."""

    enabled: bool = False     # does `twistd socks` start it too? (twistd identd always does)
    listen: tuple[str, ...] = ("tcp:113",)
    policy: IdentPolicy = field(default_factory=IdentPolicy)
    limits: IdentdLimits = IdentdLimits()


@dataclass(frozen=True)
class LogConfig:
    """The ``[log]`` table, read by ``twistd socks`` and ``twistd identd`` alike."""

    format: str = "text"      # one of socksd.logs.FORMATS


@dataclass(frozen=True)
class MetricsConfig:
    """The ``[metrics]`` table: where Prometheus scrapes ``/metrics``."""

    listen: tuple[str, ...] = ()     # none: no metrics endpoint
    per_user: bool = False           # a ``user`` label (verified users only)


@dataclass(frozen=True)
class Config:
    path: str | None = None
    listen: tuple[str, ...] = DEFAULT_LISTEN
    methods: tuple[str, ...] = ("none",)
    methods_given: bool = False
    checkers: tuple[str, ...] = ()
    limits: Limits = Limits()
    rules: RuleSet = field(default_factory=default_rules)
    socks4: Socks4Policy = Socks4Policy()
    identd: IdentdConfig | None = None
    gssapi: GSSAPISettings | None = None   # if configured
    workers: int = 1
    socks4_enabled_given: bool = False  # [socks4] enabled is in the file
    trusted_proxies: tuple[IPNetwork, ...] = ()   # networks whose PROXY headers are believed
    recheck_on_reload: bool = False     # a reload judges open sessions again
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    # [[upstreams]] by name: the proxies a rule's ``via`` sends its sessions through.
    upstreams: Mapping[str, Upstream] = field(default_factory=dict)
    # The text it was parsed from (none: the embedded default): what the
    # workers are given to run, and where a later message finds its lines.
    source: str | None = field(default=None, repr=False, compare=False)

    def proxy_problem(self) -> str | None:
        """Why a haproxy: listener cannot start: without trusted_proxies any
        peer's PROXY header would name any client address it likes, for the
        rules, the per-client limits and the SOCKS4 ident query."""
        if self.trusted_proxies:
            return None
        for description in self.listen:
            if description.startswith("haproxy:"):
                return (f"{description!r} takes the client's address from a PROXY header, "
                        "which any peer can send: name the balancers in "
                        "server.trusted_proxies or with --trusted-proxy CIDR")
        return None

    @property
    def authenticated(self) -> bool:
        """Does SOCKS5 require authentication (no "none" method)?"""
        return "none" not in self.methods

    def _socks4_default(self) -> Config:
        """SOCKS4 has no authentication: where SOCKS5 requires it, SOCKS4 is
        off unless the file turns it on, or a client would get around the
        passwords by speaking SOCKS4 with any USERID."""
        if self.socks4_enabled_given or not self.authenticated or not self.socks4.enabled:
            return self
        return replace(self, socks4=replace(self.socks4, enabled=False))

    def socks4_summary(self) -> str:
        """The SOCKS4 policy in a few words, for --check."""
        socks4 = self.socks4
        if not socks4.enabled:
            if self.socks4_enabled_given:
                return "socks4 off"
            return "socks4 off (SOCKS5 requires authentication; [socks4] enabled = true " \
                   "serves it)"
        what = {"trust": "USERIDs taken on trust (unverified claims)",
                "whitelist": f"{len(socks4.whitelist)} whitelisted USERID(s) "
                             "(unverified claims)",
                "ident": "USERIDs verified by the client's identd"}[socks4.userid]
        return f"socks4 userid = {socks4.userid}: {what}"

    def rules_summary(self) -> str:
        """The rules in a few words, for --check: the built-in rule that
        serves a file without ``[[rules]]`` is not counted as the file's."""
        if self.rules.rules == default_rules().rules:
            return "no rules: loopback clients only"
        upstreams = f", {len(self.upstreams)} upstream(s)" if self.upstreams else ""
        return f"{len(self.rules)} rule(s){upstreams}"

    def warnings(self) -> list[str]:
        """What start-up (and --check) should warn about."""
        found = []
        if self.socks4.enabled and self.authenticated and self.socks4.userid == "trust":
            found.append("[socks4] userid = \"trust\" while SOCKS5 requires authentication: "
                         "SOCKS4 clients are served under any USERID they type; rules "
                         "naming users match them only with verified = \"any\"")
        return found

    def checked(self, where: _Where | None = None) -> Config:
        """Checks across tables (also after the command line changed listen)."""
        if self.workers > 1:
            def error(key: str, message: str) -> ConfigError:
                if where is not None:
                    return where.error(message, "server", None, key)
                return ConfigError(f"{self.path or 'command line'}: server.{key}: {message}")

            for description in self.listen:
                try:
                    parse_listener(description)
                except ValueError as e:
                    raise error("listen", str(e)) from None
            size = len(self.source.encode("utf-8")) if self.source is not None else 0
            if size > MAX_WORKERS_CONFIG:
                raise error("workers", f"the file is {size} bytes; workers > 1 are given at "
                                       f"most {MAX_WORKERS_CONFIG}")
        return self

    def with_command_line(self, listen: list[str], have_auth: bool,
                          trusted_proxies: Sequence[str] = ()) -> Config:
        """``--listen`` replaces the listeners; ``--auth`` without explicit
        ``methods`` means "require a password" rather than "ignore it";
        ``--trusted-proxy`` adds to ``trusted_proxies``."""
        changes: dict[str, Any] = {}
        check_listen_option(listen)
        if listen:
            changes["listen"] = tuple(listen)
        if trusted_proxies:
            try:
                networks = tuple(parse_network(text) for text in trusted_proxies)
            except ValueError as e:
                raise ConfigError(f"--trusted-proxy: {e}") from None
            changes["trusted_proxies"] = self.trusted_proxies + networks
        if have_auth and not self.methods_given:
            changes["methods"] = ("userpass",)
        return replace(self, **changes)._socks4_default().checked() if changes else self


_SERVER_KEYS = {
    "listen": "strings", "methods": "strings", "checkers": "strings",
    "handshake_timeout": "timeout", "connect_timeout": "timeout", "idle_timeout": "seconds",
    "stall_timeout": "seconds", "max_sessions": "count", "max_sessions_per_client": "count",
    "splice": "bool",
    "bind_timeout": "timeout", "udp_idle_timeout": "timeout", "bind_ports": "ports",
    "udp_ports": "ports", "max_datagram": "count", "workers": "workers",
    "ipv6_client_prefix": "prefix", "trusted_proxies": "strings",
    "auth_threads": "count", "auth_in_flight": "count", "auth_in_flight_per_client": "count",
    "auth_failure_backoff": "seconds", "auth_failure_backoff_max": "timeout",
    "auth_failure_clients": "count", "recheck_on_reload": "bool", "drain_timeout": "drain",
    "source": "strings", "source_select": "string", "udp_advertise": "string",
}
_RULE_KEYS = {
    "action": "string", "from": "strings", "to": "strings", "ports": "ports",
    "commands": "strings", "users": "strings", "versions": "integers", "verified": "verified",
    "log": "bool", "name": "name", "rate": "rate", "rate_per": "string",
    "max_sessions": "count", "max_sessions_per": "string", "via": "strings",
    "source": "string",
}
_UPSTREAM_KEYS = {"name": "name", "url": "string", "ca": "string", "resolve": "string"}
_SOCKS4_KEYS = {
    "enabled": "bool", "userid": "string", "whitelist": "strings",
    "allow_empty_userid": "bool", "ident_port": "port", "ident_timeout": "timeout",
    "ident_fallback": "string", "ident_case_insensitive": "bool",
}
_IDENTD_KEYS = {
    "enabled": "bool", "listen": "strings", "hide": "strings", "reply": "string",
    "users": "modes", "user_files": "strings", "opsys": "string", "charset": "string",
    "unknown_error_only": "bool", "hash_key": "string", "proxied_users": "bool",
    "proxied_reply": "string", "idle_timeout": "seconds", "max_line": "count",
    "max_connections": "count", "max_connections_per_client": "count",
    "ipv6_client_prefix": "prefix", "proxied_wait": "wait",
}
_GSSAPI_KEYS = {
    "keytab": "string", "service": "string", "principal": "string", "levels": "strings",
    "nec_compat": "bool", "principal_map": "string", "principals": "modes",
    "require_sequence": "bool", "local_realms": "strings", "allow_anonymous": "bool",
}
_LOG_KEYS = {"format": "string"}
_METRICS_KEYS = {"listen": "strings", "per_user": "bool"}
_TABLES = ("server", "socks4", "identd", "gssapi", "rules", "log", "metrics", "upstreams")


class _Where:
    """Finds the line a key is on, for messages; tomllib does not keep positions."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.text = text
        self.lines = text.splitlines()
        # What a relative path in the file is relative to (see _in_folder).
        self.folder = os.path.dirname(os.path.abspath(path))

    def line_of(self, table: str | None, index: int | None, key: str | None) -> int | None:
        header = None
        if table is not None:
            pattern = (re.compile(rf"^\s*\[\[\s*{re.escape(table)}\s*\]\]") if index is not None
                       else re.compile(rf"^\s*\[\s*{re.escape(table)}\s*\]"))
            seen = -1
            for number, line in enumerate(self.lines):
                if pattern.match(line):
                    seen += 1
                    if index is None or seen == index:
                        header = number
                        break
            if header is None:
                if "." in table and index is None:
                    # [identd] users = {alice = ...}: the key of the parent table.
                    parent, _, name = table.rpartition(".")
                    return self.line_of(parent, None, name)
                return None
        if key is None:
            return None if header is None else header + 1
        key_re = re.compile(rf"^\s*(\"?){re.escape(key)}\1\s*=")
        start = 0 if header is None else header + 1
        for number in range(start, len(self.lines)):
            line = self.lines[number]
            if header is not None and re.match(r"^\s*\[", line):
                break  # the next table: the key is not in this one
            if key_re.match(line):
                return number + 1
        return None if header is None else header + 1

    def error(self, message: str, table: str | None = None, index: int | None = None,
              key: str | None = None) -> ConfigError:
        # Rules are numbered from 1 in messages, as in "denied by rule 1".
        name = ".".join(p for p in (
            f"{table}[{index + 1}]" if index is not None else table, key) if p)
        line = self.line_of(table, index, key)
        where = f"{self.path}:{line}" if line else self.path
        return ConfigError(f"{where}: {name}: {message}" if name else f"{where}: {message}")


def load(path: str) -> Config:
    """Read and validate a config file; raises ConfigError."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    return load_text(text, path)


def load_text(text: str, path: str) -> Config:
    """Validate the text of the config file ``path`` (read once, by whoever
    validated it first: a worker is given the supervisor's); messages name
    ``path`` and the line, as :func:`load`'s do."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        at = re.search(r" \(at line (\d+), column (\d+)\)$", str(e))
        if at:
            raise ConfigError(f"{path}:{at[1]}: not valid TOML: {str(e)[:at.start()]} "
                              f"(column {at[2]})") from None
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse(data, _Where(path, text))


def location(path: str | None, table: str, key: str, text: str | None = None) -> str:
    """"FILE:LINE" of a key, for errors found after parsing (checkers,
    keytabs): in ``text``, the one parsed (Config.source), or else in the
    file, read again."""
    if path is None:
        return "command line"
    if text is None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            return path
    line = _Where(path, text).line_of(table, None, key)
    return f"{path}:{line}" if line else path


def parse(data: dict[str, Any], where: _Where) -> Config:
    for table in data:
        if table not in _TABLES:
            raise where.error(f"unknown table (known: {', '.join(_TABLES)})", table)
    server = _table(data, "server", _SERVER_KEYS, where)

    listen = tuple(server.get("listen", DEFAULT_LISTEN))
    if not listen:
        raise where.error("needs at least one endpoint", "server", None, "listen")
    for desc in listen:
        problem = _endpoint_problem(desc)
        if problem:
            raise where.error(f"{desc!r}: {problem}", "server", None, "listen")

    # Checkers without methods mean passwords are required, as --auth does:
    # never a password file that is silently not asked for.
    methods = tuple(server.get("methods", ("userpass",) if server.get("checkers")
                               else ("none",)))
    if not methods:
        raise where.error("needs at least one method", "server", None, "methods")
    for method in methods:
        if method not in METHODS:
            raise where.error(f"unknown method {method!r} (known: {', '.join(METHODS)})",
                              "server", None, "methods")
    if len(set(methods)) != len(methods):
        raise where.error("lists a method twice", "server", None, "methods")

    given = {key: server[key] for key in _SERVER_KEYS
             if _SERVER_KEYS[key] in ("seconds", "timeout", "count", "bool", "prefix", "drain")
             and key in server and key != "recheck_on_reload"}
    for key in ("bind_ports", "udp_ports"):
        if key in server:
            try:
                ranges = tuple(port_range(p) for p in server[key])
            except ValueError as e:
                raise where.error(str(e), "server", None, key) from None
            if not ranges:
                raise where.error("needs at least one range (\"0\" = any port)", "server",
                                  None, key)
            given[key] = ranges
    if not 1 <= server.get("max_datagram", 1) <= 65507:
        raise where.error(f"{server['max_datagram']} is not a UDP payload size (1-65507)",
                          "server", None, "max_datagram")
    given.update(_outgoing(server, where))
    checkers = []
    for description in server.get("checkers", ()):
        problem = _checker_problem(description)
        if problem:
            raise where.error(f"{checker_text(description)}: {problem}", "server", None,
                              "checkers")
        checkers.append(_checker_in(description, where.folder))
    limits = Limits(**given)
    if limits.auth_failure_backoff > limits.auth_failure_backoff_max:
        raise where.error(f"{limits.auth_failure_backoff:g} s is more than server."
                          f"auth_failure_backoff_max ({limits.auth_failure_backoff_max:g} s)",
                          "server", None, "auth_failure_backoff")
    upstreams = _upstreams(data.get("upstreams"), where)
    rules = _rules(data.get("rules"), where, upstreams)
    identd = None
    if "identd" in data:
        identd = _identd(_table(data, "identd", _IDENTD_KEYS, where), where)
    gssapi = None
    if "gssapi" in data:
        gssapi = _gssapi(_table(data, "gssapi", _GSSAPI_KEYS, where), where)
    if "gssapi" in methods and gssapi is None:
        raise where.error("\"gssapi\" needs a [gssapi] table (keytab, service, levels)",
                          "server", None, "methods")
    workers = worker_count(server.get("workers", 1))
    try:
        trusted = tuple(parse_network(text) for text in server.get("trusted_proxies", ()))
    except ValueError as e:
        raise where.error(str(e), "server", None, "trusted_proxies") from None
    socks4 = _table(data, "socks4", _SOCKS4_KEYS, where)
    log_config = _log(_table(data, "log", _LOG_KEYS, where), where)
    metrics = _metrics(_table(data, "metrics", _METRICS_KEYS, where), where)
    return Config(where.path, listen, methods, "methods" in server,
                  tuple(checkers), limits, rules,
                  _socks4(socks4, limits, where), identd, gssapi, workers,
                  "enabled" in socks4, trusted,
                  server.get("recheck_on_reload", False),
                  log=log_config, metrics=metrics, upstreams=upstreams,
                  source=where.text)._socks4_default().checked(where)


def _outgoing(server: dict[str, Any], where: _Where) -> dict[str, Any]:
    """source, source_select and udp_advertise, as Limits takes them. An
    address must be one of this host's to be a source: a bind() to it is
    tried now, so a typing mistake stops start-up instead of every CONNECT."""
    given: dict[str, Any] = {}
    addresses = []
    for text in server.get("source", ()):
        address = _specific_address(text, where, "source")
        problem = _bind_problem(address)
        if problem:
            raise where.error(f"{text!r}: {problem}", "server", None, "source")
        addresses.append(address)
    if "source" in server:
        if len(set(addresses)) != len(addresses):
            raise where.error("lists an address twice", "server", None, "source")
        given["source"] = tuple(addresses)
    if "source_select" in server:
        select = server["source_select"]
        if select not in SOURCE_SELECTS:
            raise where.error(f"{select!r} is not {_either(SOURCE_SELECTS)}", "server", None,
                              "source_select")
        given["source_select"] = select
    if server.get("udp_advertise"):     # "": unset, the relay socket's own address
        address = _specific_address(server["udp_advertise"], where, "udp_advertise")
        given["udp_advertise"] = address
        # One of this host's (a balancer in front, no NAT): the relay is
        # bound there; another (NAT forwards it): on the listener's address.
        given["udp_advertise_local"] = _bind_problem(address) is None
    return given


def _specific_address(text: str, where: _Where, key: str) -> str:
    try:
        address = parse_ip(text)
    except ValueError:
        raise where.error(f"{text!r} is not an IP address", "server", None, key) from None
    if address.is_unspecified:
        raise where.error(f"{text!r} is the unspecified address, not one of this host's",
                          "server", None, key)
    return str(address)


def _bind_problem(address: str) -> str | None:
    """Why this host cannot bind ``address`` (not one of its addresses), if it cannot."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
    except OSError as e:
        return f"cannot bind it ({e.strerror}): not an address of this host"
    return None


def _either(choices: Sequence[str]) -> str:
    quoted = [f'"{c}"' for c in choices]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _log(table: dict[str, Any], where: _Where) -> LogConfig:
    log_format = table.get("format", LogConfig.format)
    if log_format not in FORMATS:
        raise where.error(f"{log_format!r} is not \"text\" or \"json\"", "log", None,
                          "format")
    return LogConfig(log_format)


def _metrics(table: dict[str, Any], where: _Where) -> MetricsConfig:
    listen = tuple(table.get("listen", ()))
    for description in listen:
        problem = _endpoint_problem(description)
        if problem:
            raise where.error(f"{description!r}: {problem}", "metrics", None, "listen")
    return MetricsConfig(listen, table.get("per_user", False))


def _gssapi(table: dict[str, Any], where: _Where) -> GSSAPISettings:
    levels = []
    for name in table.get("levels", ("integrity", "confidentiality")):
        if name not in LEVEL_NAMES:
            raise where.error(f"{name!r} is not a level ({', '.join(LEVEL_NAMES)}; "
                              "selective protection is not offered)", "gssapi", None, "levels")
        levels.append(LEVEL_NAMES[name])
    if not levels:
        raise where.error("needs at least one level", "gssapi", None, "levels")
    principal_map = table.get("principal_map", "strip-realm")
    if principal_map not in ("strip-realm", "keep"):
        raise where.error(f"{principal_map!r} is not \"strip-realm\" or \"keep\"", "gssapi",
                          None, "principal_map")
    keytab = table.get("keytab") or None
    if keytab:
        # krb5 reads a name with no TYPE: prefix as a file; other types
        # (MEMORY:, KEYRING:) name no file.
        if keytab.startswith("FILE:") or ":" not in keytab:
            keytab = _in_folder(keytab.removeprefix("FILE:"), where.folder)
    realms: dict[str, Any] = {}
    if "local_realms" in table:
        if not table["local_realms"]:
            raise where.error("needs at least one realm (principal_map = \"keep\" strips none)",
                              "gssapi", None, "local_realms")
        for realm in table["local_realms"]:
            if not realm or "@" in realm or not realm.isprintable() or realm != realm.strip():
                raise where.error(f"{realm!r} is not a realm name (EXAMPLE.COM)", "gssapi",
                                  None, "local_realms")
        realms["local_realms"] = frozenset(table["local_realms"])
    return GSSAPISettings(
        keytab=keytab, service=table.get("service", "rcmd"),
        principal=table.get("principal") or None, levels=tuple(sorted(set(levels))),
        nec_compat=table.get("nec_compat", False), principal_map=principal_map,
        principals=dict(table.get("principals", {})),
        require_sequence=table.get("require_sequence", True),
        allow_anonymous=table.get("allow_anonymous", False), **realms)

def _identd(table: dict[str, Any], where: _Where) -> IdentdConfig:
    def bad(key: str, message: str) -> ConfigError:
        return where.error(message, "identd", None, key)

    listen = tuple(table.get("listen", IdentdConfig.listen))
    if not listen:
        raise bad("listen", "needs at least one endpoint")
    for desc in listen:
        problem = _endpoint_problem(desc)
        if problem:
            raise bad("listen", f"{desc!r}: {problem}")
    modes = {}
    for key in ("reply", "proxied_reply"):
        try:
            modes[key] = parse_mode(table.get(key, "name"))
        except ValueError as e:
            raise bad(key, str(e)) from None
    users = {}
    for user, mode in table.get("users", {}).items():
        try:
            users[user] = parse_mode(mode)
        except ValueError as e:
            raise where.error(str(e), "identd.users", None, user) from None
    opsys = table.get("opsys", "UNIX")
    if not re.match(r"^[\x21-\x7e]{1,40}$", opsys) or ":" in opsys or "," in opsys:
        raise bad("opsys", f"{opsys!r} is not a token (printable, no ':' or ',')")
    charset = table.get("charset") or None
    if charset is not None:
        try:
            "x".encode(charset)
        except LookupError:
            raise bad("charset", f"unknown charset {charset!r}") from None
    policy_args: dict[str, Any] = dict(
        reply=modes["reply"], proxied_reply=modes["proxied_reply"], users=users,
        hide=frozenset(table.get("hide", ("root",))),
        user_files=frozenset(table.get("user_files", ())), opsys=opsys, charset=charset,
        unknown_error_only=table.get("unknown_error_only", False),
        proxied_users=table.get("proxied_users", True))
    if "hash_key" in table:
        policy_args["hash_key"] = table["hash_key"].encode("utf-8")
    limits = IdentdLimits(**{k: table[k] for k in ("idle_timeout", "max_line",
                                                   "max_connections",
                                                   "max_connections_per_client",
                                                   "ipv6_client_prefix", "proxied_wait")
                             if k in table})
    return IdentdConfig(table.get("enabled", False), listen, IdentPolicy(**policy_args),
                        limits)


def _table(data: dict[str, Any], name: str, kinds: dict[str, str],
           where: _Where) -> dict[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise where.error(f"must be a table ([{name}])", key=name)
    for key, value in table.items():
        kind = kinds.get(key)
        if kind is None:
            raise where.error(f"unknown key (known: {', '.join(kinds)})", name, None, key)
        _check_type(where, value, kind, name, None, key)
    return table


def _socks4(table: dict[str, Any], limits: Limits, where: _Where) -> Socks4Policy:
    policy = Socks4Policy(**{k: v for k, v in table.items() if k != "whitelist"},
                          whitelist=frozenset(table.get("whitelist", ())))
    if policy.userid not in ("trust", "whitelist", "ident"):
        raise where.error(f"{policy.userid!r} is not \"trust\", \"whitelist\" or \"ident\"",
                          "socks4", None, "userid")
    if policy.ident_fallback not in ("refuse", "trust"):
        raise where.error(f"{policy.ident_fallback!r} is not \"refuse\" or \"trust\"",
                          "socks4", None, "ident_fallback")
    if policy.userid == "ident" and policy.ident_timeout >= limits.handshake_timeout:
        raise where.error(f"{policy.ident_timeout:g} s must be shorter than "
                          f"server.handshake_timeout ({limits.handshake_timeout:g} s), "
                          "or clients get no reply", "socks4", None, "ident_timeout")
    return policy


def _upstreams(raw: Any, where: _Where) -> dict[str, Upstream]:
    """``[[upstreams]]``: name -> the proxy, its URL parsed (and its CA file
    read) now, so a bad one stops start-up rather than fail sessions."""
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise where.error("must be an array of tables ([[upstreams]])", key="upstreams")
    upstreams: dict[str, Upstream] = {}
    for index, table in enumerate(raw):
        if not isinstance(table, dict):
            raise where.error("must be a table", "upstreams", index)
        for key, value in table.items():
            kind = _UPSTREAM_KEYS.get(key)
            if kind is None:
                raise where.error(f"unknown key (known: {', '.join(_UPSTREAM_KEYS)})",
                                  "upstreams", index, key)
            _check_type(where, value, kind, "upstreams", index, key)
        for key in ("name", "url"):
            if key not in table:
                raise where.error("missing", "upstreams", index, key)
        name = table["name"]
        if name in upstreams:
            raise where.error(f"{name!r} names another upstream already", "upstreams", index,
                              "name")
        resolve = table.get("resolve", "remote")
        if resolve not in ("remote", "local"):
            raise where.error(f"{resolve!r} is \"remote\" (the upstream resolves names) or "
                              "\"local\" (socksd resolves, checks, and sends the address)",
                              "upstreams", index, "resolve")
        ca = table.get("ca")
        try:
            upstream = parse_upstream(table["url"], name,
                                      None if ca is None else _in_folder(ca, where.folder))
        except ValueError as e:
            raise where.error(str(e), "upstreams", index,
                              "ca" if ca is not None and "ca" in str(e) else "url") from None
        upstreams[name] = replace(upstream, resolve_locally=resolve == "local")
    return upstreams


def _rules(raw: Any, where: _Where, upstreams: Mapping[str, Upstream] | None = None) -> RuleSet:
    if raw is None:
        return default_rules()
    if not isinstance(raw, list):
        raise where.error("must be an array of tables ([[rules]])", key="rules")
    compiled = []
    host: list | None = None
    names: dict[str, int] = {}
    for index, table in enumerate(raw):
        if not isinstance(table, dict):
            raise where.error("must be a table", "rules", index)
        for key, value in table.items():
            kind = _RULE_KEYS.get(key)
            if kind is None:
                raise where.error(f"unknown key (known: {', '.join(_RULE_KEYS)})", "rules",
                                  index, key)
            _check_type(where, value, kind, "rules", index, key)
        if "action" not in table:
            raise where.error("missing (\"allow\" or \"deny\")", "rules", index, "action")
        args = dict(action=table["action"], sources=table.get("from"),
                    destinations=table.get("to"), ports=table.get("ports"),
                    commands=table.get("commands"), users=table.get("users"),
                    log=table.get("log", False), versions=table.get("versions"),
                    verified=table.get("verified"))
        if SELF in (table.get("to") or ()):
            if host is None:
                try:
                    host = host_addresses()
                except OSError as e:
                    raise where.error(f"\"self\": cannot read this host's addresses: {e}",
                                      "rules", index, "to") from None
            args["host_addresses"] = host
        name = table.get("name")
        if name is not None:
            if name in names:
                raise where.error(f"{name!r} names rule {names[name] + 1} already", "rules",
                                  index, "name")
            names[name] = index
            args["name"] = name
        for key in ("rate_per", "max_sessions_per"):
            if key in table and ("rate" if key == "rate_per" else "max_sessions") not in table:
                raise where.error(f"is of no use without {key.removesuffix('_per')} (the "
                                  "rule sets none)", "rules", index, key)
        if "rate" in table or "max_sessions" in table:
            args["limits"] = RuleLimits(
                name or str(index + 1), _rate(table.get("rate")),
                table.get("rate_per", "session"), table.get("max_sessions"),
                table.get("max_sessions_per", "rule"))
        if "source" in table:
            if table.get("action") != "allow":
                raise where.error("is for rules that allow", "rules", index, "source")
            if "via" in table:
                raise where.error("a rule's connections leave from its upstreams (via), not "
                                  "from a source address", "rules", index, "source")
            try:
                address = str(parse_ip(table["source"]))
            except ValueError:
                raise where.error(f"{table['source']!r} is not an IP address", "rules", index,
                                  "source") from None
            problem = _bind_problem(address)
            if problem:
                raise where.error(f"{address!r}: {problem}", "rules", index, "source")
            args["source"] = address
        if "via" in table:
            args["via"] = via = _via(table, index, upstreams or {}, where)
            args["via_local"] = any((upstreams or {})[n].resolve_locally for n in via)
        label = f"rule {name}" if name is not None else f"rule {index + 1}"
        try:
            compiled.append(compile_rule(label, **args))
        except ValueError as e:
            raise where.error(str(e), "rules", index, _guilty_key(str(e), table)) from None
    return RuleSet(compiled)


def _via(table: dict[str, Any], index: int, upstreams: Mapping[str, Upstream],
         where: _Where) -> tuple[str, ...]:
    """A rule's ``via``: upstreams by name, tried in order."""
    via = table["via"]
    if not via:
        raise where.error("needs at least one upstream (leave via out to connect directly)",
                          "rules", index, "via")
    if table.get("action") != "allow":
        raise where.error("is for rules that allow", "rules", index, "via")
    for name in via:
        if name not in upstreams:
            known = ", ".join(upstreams) or "none: add [[upstreams]]"
            raise where.error(f"{name!r} is no upstream (known: {known})", "rules", index,
                              "via")
    if len(set(via)) != len(via):
        raise where.error("names an upstream twice", "rules", index, "via")
    # A name sent upstream unresolved has no address here for a network to
    # judge: only names can be matched, unless every upstream resolves
    # locally (and sends the address, checked like a direct CONNECT's).
    networks = [item for item in table.get("to") or () if _is_network(item)]
    remote = [name for name in via if not upstreams[name].resolve_locally]
    if networks and remote:
        raise where.error(f"{networks[0]!r}: a network cannot judge names sent unresolved to "
                          f"upstream {remote[0]!r}: match names in to, or set resolve = "
                          "\"local\" on the upstream", "rules", index, "to")
    commands = set(table.get("commands") or ("connect", "bind", "udp"))
    for command in sorted(commands & {"connect", "bind", "udp"}):
        if not any(command in upstreams[name].commands for name in via):
            raise where.error(f"no upstream in via does {command} ("
                              f"{', '.join(f'{n}: {upstreams[n].scheme}' for n in via)}); "
                              "list the commands the rule is for", "rules", index, "via")
    return tuple(via)


def _is_network(item: str) -> bool:
    if item == SELF:
        return True
    try:
        parse_network(item)
    except ValueError:
        return False
    return True


# A rate's units: bytes (B, kB/KB, MB, GB and KiB, MiB, GiB) or bits (kbit,
# Mbit, Gbit) per second; a bare number is bytes.
_RATE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10,
               "mib": 1 << 20, "gib": 1 << 30, "kbit": 125, "mbit": 125_000,
               "gbit": 125_000_000}
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)(?:/s)?\s*")
MAX_RATE = 1 << 40     # a TiB per second: more is a typo, not a link


def _rate(value: int | str | None) -> int | None:
    """``rate`` in bytes per second (already type-checked); None if unset."""
    if value is None or isinstance(value, int):
        return value
    match = _RATE.fullmatch(value)
    unit = match and _RATE_UNITS.get(match.group(2).lower())
    assert match is not None and unit is not None    # _check_type said so
    return int(float(match.group(1)) * unit)


def rate_problem(value: object) -> str | None:
    """Why ``value`` is no rate (bytes per second), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return "must be a number of bytes per second or a string like \"10MiB\" or " \
            "\"100Mbit\""
    if isinstance(value, str):
        match = _RATE.fullmatch(value)
        if match is None or match.group(2).lower() not in _RATE_UNITS:
            return (f"{value!r} is not a rate: a number and a unit (B, kB, MB, GB, KiB, MiB, "
                    "GiB, kbit, Mbit, Gbit), per second")
    rate = _rate(value)
    assert rate is not None
    if not 1 <= rate <= MAX_RATE:
        return f"{value!r} is out of range (at least 1 byte per second, at most 1 TiB)"
    return None


def host_addresses() -> list[IPAddress]:
    """Every address of this host's interfaces, up or not (getifaddrs(3), which
    asks the kernel over netlink), for the destination "self": a connection to
    any of them reaches this host's own services, loopback or not."""
    import psutil

    found = []
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                found.append(parse_ip(entry.address))
    return sorted(set(found), key=lambda a: (a.version, int(a)))


def _guilty_key(message: str, table: dict[str, Any]) -> str | None:
    """Which key of a rule a compile_rule error is about."""
    for key in ("action", "from", "to", "ports", "commands", "users", "versions"):
        value = table.get(key)
        items = value if isinstance(value, list) else [value]
        if any(item is not None and repr(item) in message for item in items):
            return key
    for key in ("from", "to", "ports", "commands", "users", "versions", "rate_per",
                "max_sessions_per"):
        if message.startswith(f"{key} "):
            return key
    if message.startswith("rate and max_sessions"):
        return "rate" if "rate" in table else "max_sessions"
    return None


def _check_type(where: _Where, value: Any, kind: str, table: str, index: int | None,
                key: str) -> None:
    def bad(what: str) -> ConfigError:
        return where.error(f"must be {what}, not {_toml_type(value)}", table, index, key)

    if kind == "strings":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
    elif kind == "ports":
        if not isinstance(value, list) or not all(
                isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))
                for v in value):
            raise bad("a list of ports or \"lo-hi\" ranges")
    elif kind == "integers":
        if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise bad("a list of integers")
    elif kind == "port":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("a port number")
        if not 1 <= value <= 65535:
            raise where.error(f"{value} is not a port (1-65535)", table, index, key)
    elif kind == "workers":
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int)
                                or not 1 <= value <= 256):
            raise where.error(f"{value!r} is not a number of processes (1-256) or \"auto\"",
                              table, index, key)
    elif kind == "string":
        if not isinstance(value, str):
            raise bad("a string")
    elif kind == "modes":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise bad("a table of name = \"value\"")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind == "prefix":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 128:
            raise where.error(f"{value!r} is not an IPv6 prefix length (1-128)", table, index,
                              key)
    elif kind == "verified":
        if not isinstance(value, bool) and value != "any":
            raise where.error(f"{value!r} is not true, false or \"any\"", table, index, key)
    elif kind in ("seconds", "timeout"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number of seconds")
        if kind == "timeout" and not 0 < value <= 86400:
            # Every wait has a timeout: these two cannot be switched off.
            raise where.error(f"{value} is out of range (more than 0, at most a day)",
                              table, index, key)
        if not 0 <= value <= 86400 * 365:
            raise where.error(f"{value} is out of range (0 to one year; 0 = never)", table,
                              index, key)
    elif kind == "drain":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number of seconds")
        if not 0 <= value <= MAX_DRAIN:
            # Every wait has a timeout: a stop has no "never".
            raise where.error(f"{value} is out of range (0 to {MAX_DRAIN} seconds; "
                              "0 = close the open sessions at once)", table, index, key)
    elif kind == "wait":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number of seconds")
        if not 0 <= value <= MAX_WAIT:
            # An ident client gives up after seconds: a longer wait only
            # holds its connection after it has stopped listening.
            raise where.error(f"{value} is out of range (0 to {MAX_WAIT} seconds; "
                              "0 = do not wait)", table, index, key)
    elif kind == "rate":
        problem = rate_problem(value)
        if problem is not None:
            raise where.error(problem, table, index, key)
    elif kind == "name":
        if not isinstance(value, str):
            raise bad("a string")
        if not _RULE_NAME.fullmatch(value) or value.isdigit():
            raise where.error(f"{value!r} is not a rule name (letters, digits, \"_\", "
                              "\"-\", \".\"; up to 64; not only digits, which are "
                              "positions)", table, index, key)
    elif kind == "count":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        if value < 1:
            raise where.error(f"{value} must be at least 1", table, index, key)


# A rule's name reaches log lines and metric labels as it is: kept to a
# charset that needs no escaping there.
_RULE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def _toml_type(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def check_listen_option(listen: list[str]) -> None:
    """ConfigError for the first ``--listen`` string Twisted would refuse."""
    for description in listen:
        problem = _endpoint_problem(description)
        if problem:
            raise ConfigError(f"--listen: {description!r}: {problem}")


def _split_endpoint(description: str) -> tuple[str, list[str], dict[str, str], bool]:
    """An endpoint string -> (type, positional args, keyword args, behind
    haproxy:), by the rules of Twisted's strports (``:`` separates, ``\\``
    escapes). Twisted keeps its parser private."""
    haproxy = False
    while description.startswith("haproxy:"):
        haproxy, description = True, description[len("haproxy:"):]
    parts, current, escaped = [], "", False
    for char in description:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    args = [part for part in parts[1:] if "=" not in part]
    options = dict(part.split("=", 1) for part in parts[1:] if "=" in part)
    return parts[0], args, options, haproxy


def endpoint_type(description: str) -> str:
    """The type an endpoint string names (``tcp``, ``ssl``, ...), under any ``haproxy:``."""
    return _split_endpoint(description)[0]


class SharedListener(NamedTuple):
    """A listener the workers share (:func:`parse_listener`)."""

    family: int
    host: str
    port: int
    backlog: int
    haproxy: bool
    # systemd: the description (without haproxy:) that finds the socket
    # systemd passed: one socket, handed to every worker, never bound here.
    inherited: str | None = None


def parse_listener(description: str) -> SharedListener:
    """A tcp/tcp6 endpoint string (optionally haproxy:) -> the address the
    supervisor binds for each worker, or a systemd: one (INET or INET6) ->
    the socket systemd passed. Other endpoint types cannot be shared."""
    kind, args, options, haproxy = _split_endpoint(description)
    if kind == "systemd":
        given = _systemd_given(args, options)
        if _systemd_problem(given) is None and given["domain"] in ("INET", "INET6"):
            family = socket.AF_INET6 if given["domain"] == "INET6" else socket.AF_INET
            return SharedListener(family, "", 0, 0, haproxy,
                                  description.removeprefix("haproxy:"))
    if kind not in ("tcp", "tcp6") or not (args or "port" in options):
        raise ValueError(f"{description.removeprefix('haproxy:')!r}: workers > 1 serves tcp:, "
                         "tcp6: and systemd:domain=INET or INET6 listeners only (haproxy: in "
                         "front of them or not)")
    # Twisted's order: tcp:PORT:INTERFACE:BACKLOG, tcp6:PORT:BACKLOG:INTERFACE.
    names = ("port", "interface", "backlog") if kind == "tcp" else ("port", "backlog",
                                                                    "interface")
    given = {**dict(zip(names, args, strict=False)), **options}
    host = given.get("interface", "::" if kind == "tcp6" else "0.0.0.0")
    # Like Twisted's tcp:, an IPv6 interface means an IPv6 socket.
    family = socket.AF_INET6 if kind == "tcp6" or ":" in host else socket.AF_INET
    return SharedListener(family, host, int(given["port"]), int(given.get("backlog", 50)),
                          haproxy)


def worker_count(value: int | str) -> int:
    """``workers`` from the config: an int, or "auto" for the physical
    cores this process may run on (:func:`physical_cores`)."""
    if value == "auto":
        return physical_cores()
    return int(value)


CPU_SYSFS = "/sys/devices/system/cpu"


def physical_cores(sysfs: str = CPU_SYSFS, allowed: set[int] | None = None) -> int:
    """The cores among the CPUs this process may run on (``allowed``: its
    affinity, os.sched_getaffinity), each core's SMT siblings counted once,
    as ``sysfs``'s topology (thread_siblings_list) groups them: a second
    worker on a core's other hardware thread shares that core's execution
    units, and adds a process to schedule more than it adds work done.
    Where the topology does not say, the CPUs we may run on (os.cpu_count()
    when the affinity is not known either)."""
    if allowed is None:
        try:
            allowed = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            return os.cpu_count() or 1
    if not allowed:
        return os.cpu_count() or 1
    cores: set[frozenset[int]] = set()
    for cpu in allowed:
        try:
            with open(f"{sysfs}/cpu{cpu}/topology/thread_siblings_list") as f:
                siblings = _cpu_list(f.read())
        except (OSError, ValueError):
            siblings = None
        if not siblings or cpu not in siblings:
            return len(allowed)
        cores.add(siblings)
    return len(cores)


def _cpu_list(text: str) -> frozenset[int]:
    """The kernel's CPU list format: ``0-3,8-11``; ValueError for anything else."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        low, dash, high = part.partition("-")
        first, last = int(low), int(high) if dash else int(low)
        if not 0 <= first <= last < 1 << 16:
            raise ValueError(f"{part!r} is not a range of CPUs")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def checker_text(description: str) -> str:
    """A checker string as an error message may show it (quoted): without
    the passwords a ``memory:`` one holds, and, for a type no checker
    factory knows (a typing mistake, ``memroy:alice:s3cret``), without
    anything after the type. The other types' arguments are paths and
    options, which the operator needs to see."""
    from twisted.cred import strcred

    auth_type, _, rest = description.partition(":")
    if not rest:
        return repr(description)
    if auth_type == "memory":
        fields = rest.split(":")
        return repr(":".join(["memory", *(f if i % 2 == 0 else "***"
                                          for i, f in enumerate(fields))]))
    try:
        strcred.findCheckerFactory(auth_type)
    except strcred.InvalidAuthType:
        return repr(f"{auth_type}:***")
    return repr(description)


# strcred checker types whose argument is a file's path: Twisted's file:
# and socksd's htpasswd:. Any other type's argument is left as written.
PATH_CHECKERS = ("file", "htpasswd")


def _in_folder(path: str, folder: str) -> str:
    """A path from the file, relative to the file's folder: services start
    in / (systemd) or wherever twistd was run, and a file that works from
    one working directory must work from any. Made absolute once, here,
    so that every later reader (a checker made again at a reload, a
    worker, the start-up checks) reads the same file."""
    return path if os.path.isabs(path) else os.path.join(folder, path)


def _checker_in(description: str, folder: str) -> str:
    """A checker string from the file with its path, if its type takes one,
    relative to the file's folder (``htpasswd:users`` ->
    ``htpasswd:/etc/socksd/users``)."""
    auth_type, _, argument = description.partition(":")
    if auth_type in PATH_CHECKERS and argument:
        return f"{auth_type}:{_in_folder(argument, folder)}"
    return description


def _checker_problem(description: str) -> str | None:
    """Why strcred would not know this checker string's type, if it would not."""
    from twisted.cred import strcred

    auth_type = description.split(":", 1)[0]
    try:
        strcred.findCheckerFactory(auth_type)
    except strcred.InvalidAuthType:
        return (f"unknown checker type {auth_type!r} "
                "(`twistd socks --help-auth` lists those installed)")
    return None


def tls_files_problem(e: Exception) -> str:
    """What is wrong with an ``ssl:`` endpoint whose parsing (which reads
    its key and certificate) or context raised ``e``: at --check, at start
    and at a reload alike."""
    if isinstance(e, OSError):
        return f"cannot read {e.filename or 'a file it names'}: {e.strerror or e}"
    if isinstance(e, (ValueError, KeyError, TypeError)):
        return f"not a valid Twisted endpoint ({e or type(e).__name__})"
    # pyOpenSSL's errors for a bad PEM, Twisted's for a key of another certificate
    return f"cannot load its certificate and key ({e or type(e).__name__})"


def _endpoint_problem(description: str) -> str | None:
    """Why Twisted would refuse this server endpoint string, if it would."""
    from twisted.internet import endpoints, reactor
    from twisted.internet.abstract import isIPAddress, isIPv6Address

    kind, args, options, _haproxy = _split_endpoint(description)
    if kind == "systemd":
        # Its sockets exist only in the process systemd starts: the string
        # alone is checked here (--check may run anywhere), the socket at
        # start (inherited_problem).
        return _systemd_problem(_systemd_given(args, options))
    try:
        endpoints.serverFromString(reactor, description)
    except ImportError as e:
        if kind == "ssl":
            return "ssl: endpoints need pyOpenSSL: pip install 'socksd[tls]'"
        return f"this endpoint type needs a module that is not installed ({e})"
    except Exception as e:  # ValueError, KeyError, TypeError, OSError, pyOpenSSL's errors
        return tls_files_problem(e) if kind == "ssl" else \
            f"not a valid Twisted endpoint ({e or type(e).__name__})"
    if kind in ("tcp", "tcp6", "ssl"):
        # Twisted takes any integer here and only bind() refuses it, at start.
        port = options.get("port", args[0] if args else "")
        try:
            valid = 0 <= int(port) <= 65535   # int(), as Twisted parses it
        except ValueError:
            valid = False
        if not valid:
            return f"port {port!r} is not 0-65535"
        # Twisted hands the interface to bind() as it is: 999.1.1.1 would
        # fail only there, at start, and a host name be looked up then.
        interface = options.get("interface", args[_INTERFACE_ARG[kind]]
                                if len(args) > _INTERFACE_ARG[kind] else "")
        if interface and not (isIPAddress(interface) or isIPv6Address(interface)):
            return f"interface {interface!r} is not an IP address"
    return None


# Where Twisted's parsers take a listener's interface when it is given by
# position: tcp:PORT:INTERFACE, tcp6:PORT:BACKLOG:INTERFACE,
# ssl:PORT:PRIVATEKEY:CERTKEY:SSLMETHOD:INTERFACE.
_INTERFACE_ARG = {"tcp": 1, "tcp6": 2, "ssl": 4}


def _systemd_given(args: list[str], options: dict[str, str]) -> dict[str, str]:
    """A systemd: string's arguments by name, in Twisted's order
    (systemd:DOMAIN:INDEX:NAME); more than three positional ones are kept
    under "" for :func:`_systemd_problem`."""
    given = dict(zip(("domain", "index", "name"), args, strict=False))
    if len(args) > 3:
        given[""] = ":".join(args[3:])
    return {**given, **options}


def _systemd_problem(given: dict[str, str]) -> str | None:
    """Why Twisted's parser would refuse a systemd: string, whatever was inherited."""
    if set(given) - {"domain", "index", "name"}:
        return "not a valid Twisted endpoint (systemd: takes domain= and index= or name=)"
    if not hasattr(socket, f"AF_{given.get('domain')}"):
        return f"domain {given.get('domain')!r} is not an address family (INET, INET6, UNIX)"
    if ("index" in given) == ("name" in given):
        return "give one of index= and name="
    if "index" in given and not given["index"].isdigit():
        return f"index {given['index']!r} is not a number"
    return None


def inherited_problem(description: str) -> str | None:
    """Why a systemd: endpoint cannot be served by this process: no such
    socket was passed to it, or not a listening one of its domain. None for
    other types. Twisted's own parser finds the socket, as it will to serve it
    (it reads LISTEN_FDS, and ignores them without LISTEN_FDNAMES)."""
    from twisted.internet import endpoints, reactor

    kind, args, options, _haproxy = _split_endpoint(description)
    if kind != "systemd":
        return None
    given = _systemd_given(args, options)
    which = f"at index {given['index']}" if "index" in given else \
        f"named {given.get('name')!r}"
    try:
        endpoint = endpoints.serverFromString(reactor, description.removeprefix("haproxy:"))
    except (IndexError, KeyError):
        return (f"systemd passed no socket {which} (they come in LISTEN_FDS, named in "
                "LISTEN_FDNAMES): start this from a .socket unit, or under "
                "systemd-socket-activate with --fdname")
    assert isinstance(endpoint, endpoints.AdoptedStreamServerEndpoint), "systemd:'s endpoint"
    family = getattr(socket, f"AF_{given['domain']}")
    try:
        # A copy of the descriptor: the original is the listener's, later.
        with socket.socket(fileno=os.dup(endpoint.fileno)) as probe:
            listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            if probe.family != family or probe.type != socket.SOCK_STREAM or not listening:
                return (f"the socket systemd passed {which} is not a listening "
                        f"{given['domain']} stream socket")
    except OSError as e:
        return f"what systemd passed {which} is not a socket ({e.strerror or e})"
    return None
