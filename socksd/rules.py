"""First-match access rules: (client, user, command, destination) -> allow/deny.

One evaluator serves every SOCKS version. Rules are compiled once when the
config is loaded, so evaluation is attribute tests and ``ipaddress`` lookups.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from dataclasses import dataclass
from typing import Iterable, Sequence

from socksd.wire.names import normalize_name

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

COMMANDS = frozenset({"connect", "bind", "udp", "bindreply", "udpreply"})
ANY_USER = "*"
ANONYMOUS = "-"
SELF = "self"      # destination: every address of this host's interfaces


_parsed: dict[str, IPAddress] = {}


def parse_ip(text: str) -> IPAddress:
    """An address as a transport reports it; v4-mapped IPv6 becomes IPv4.

    Remembered (up to a bound): every session parses its client's address
    and most destinations repeat, and ``ipaddress`` parsing is slow.
    """
    address = _parsed.get(text)
    if address is not None:
        return address
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if len(_parsed) >= 4096:
        _parsed.clear()
    _parsed[text] = address
    return address


# Linux delivers a connect() or sendto() aimed at the unspecified address to
# the local host, past any rule about 127.0.0.0/8 or ::1: nothing legitimate
# connects there, so it is refused before the rules.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries to where it is delivered:
    v4-mapped (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d, not :: or ::1),
    NAT64 (64:ff9b::a.b.c.d). Rules about an IPv4 network cover these too."""
    if address.version == 4:
        return None
    value = int(address)
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if (value >> 32 == 0 and value > 1) or address in _NAT64:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return None


def is_unspecified(address: IPAddress) -> bool:
    """0.0.0.0/8, ::, and IPv6 forms carrying an address of 0.0.0.0/8."""
    if address.version == 4:
        return int(address) < 0x1000000
    if not int(address):
        return True
    embedded = embedded_ipv4(address)
    return embedded is not None and int(embedded) < 0x1000000


def client_key(address: IPAddress, ipv6_prefix: int = 64) -> str:
    """Who a client is for per-client limits. An IPv6 host usually holds a
    whole /64 (SLAAC, privacy addresses): counted per address, one client
    would get a fresh share of every limit per address it picks."""
    if address.version == 4 or ipv6_prefix >= 128:
        return str(address)
    return str(ipaddress.IPv6Network((int(address) >> (128 - ipv6_prefix) << (128 - ipv6_prefix),
                                      ipv6_prefix)))


SHARED_BY = ("session", "user", "client", "rule")   # who shares a rate budget
COUNTED_BY = ("user", "client", "rule")              # who max_sessions counts


@dataclass(frozen=True, slots=True)
class RuleLimits:
    """What an allowing rule puts on the sessions it admits: a rate each
    direction and a cap on sessions open at once. Counters and budgets are
    keyed by ``key`` (the rule's name, else its position), so a reload that
    inserts a rule leaves the named ones' counts where they were."""

    key: str
    rate: int | None = None          # bytes per second, each direction
    rate_per: str = "session"        # who shares the budget: SHARED_BY
    max_sessions: int | None = None  # open at once
    max_sessions_per: str = "rule"   # counted per: COUNTED_BY


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule. ``None`` in a selector means "any"."""

    action: str                                   # "allow" | "deny"
    sources: tuple[IPNetwork, ...] | None = None
    networks: tuple[IPNetwork, ...] = ()
    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    any_destination: bool = True
    ports: tuple[tuple[int, int], ...] | None = None
    commands: frozenset[str] | None = None
    users: frozenset[str] | None = None           # names; None = anyone
    anonymous: bool = True                        # does an anonymous user match?
    versions: frozenset[int] | None = None        # SOCKS versions
    verified: bool | None = None                  # was the user proven (by ident, a checker)?
    # A user matched by name must be proven: a claimed name (a SOCKS4 USERID
    # taken on trust or from a whitelist) is no identity. verified = "any"
    # (or an explicit true/false) in the config turns this off.
    named_verified: bool = False
    log: bool = False
    label: str = "rule"
    name: str | None = None
    limits: RuleLimits | None = None   # an allowing rule's rate and session cap
    via: tuple[str, ...] = ()          # upstreams (by name) its sessions go through
    # Some upstream of via resolves names here (resolve = "local"): a name
    # is looked up and its addresses checked before going upstream; else the
    # upstream gets the name as the client gave it, never looked up here.
    via_local: bool = False
    source: str | None = None          # where its sessions' connections leave from

    @property
    def allows(self) -> bool:
        return self.action == "allow"

    @property
    def governs(self) -> tuple | None:
        """What binds the sessions this rule admits (its limits, upstreams,
        source), or None when any allowing rule would do as well. A
        session is carried out under one: a name's addresses, a UDP
        association's datagrams, only those whose allowing rule governs
        alike. (Compared by value: a reload's rule of the same name and
        settings governs alike.)"""
        if self.limits is None and not self.via and self.source is None:
            return None
        return self.limits, self.via, self.via_local, self.source

    def matches_request(self, client: IPAddress, user: str | None, command: str,
                        port: int, version: int = 5, verified: bool = False) -> bool:
        """Everything but the destination host."""
        if self.versions is not None and version not in self.versions:
            return False
        if self.verified is not None and verified != self.verified:
            return False
        if self.sources is not None and not any(client in net for net in self.sources):
            return False
        if user is None:
            if not self.anonymous:
                return False
        elif self.users is not None and (user not in self.users or
                                         self.named_verified and not verified):
            return False
        if self.commands is not None and command not in self.commands:
            return False
        if self.ports is not None and not any(lo <= port <= hi for lo, hi in self.ports):
            return False
        return True

    def matches_destination(self, name: str | None, address: IPAddress | None) -> bool:
        if self.any_destination:
            return True
        if address is not None:
            if any(address in net for net in self.networks):
                return True
            embedded = embedded_ipv4(address)
            if embedded is not None and any(embedded in net for net in self.networks):
                return True
        if name is not None:
            name = name.rstrip(".").lower()
            if name in self.names:
                return True
            if any(name.endswith(suffix) or name == suffix[1:] for suffix in self.suffixes):
                return True
        return False


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: Rule | None          # None: no rule matched (implicit deny), or refused before them
    why: str | None = None     # a refusal before the rules

    @property
    def reason(self) -> str:
        if self.why is not None:
            return self.why
        if self.rule is None:
            return "no rule matched (default deny)"
        return f"{self.rule.label} ({self.rule.action})"


_NO_MATCH = Decision(False, None)
UNSPECIFIED = Decision(False, None, "the unspecified address (0.0.0.0/8, ::) is refused "
                                    "as a destination")
_SENT_TO = frozenset({"connect", "udp"})     # commands whose address traffic goes to


class _Ranges:
    """Integer ranges -> bit mask of the rules whose ranges contain a value,
    found by bisection. Built once from (lo, hi, bit) triples by a sweep."""

    __slots__ = ("starts", "masks")

    def __init__(self, ranges: Iterable[tuple[int, int, int]], always: int) -> None:
        events: dict[int, list[int]] = {}
        for lo, hi, bit in ranges:
            events.setdefault(lo, []).append(bit)
            events.setdefault(hi + 1, []).append(-bit)   # -bit: leaves
        self.starts = [-1]
        self.masks = [always]
        counts: dict[int, int] = {}   # a rule may cover a value by two of its ranges
        mask = always
        for point in sorted(events):
            for bit in events[point]:
                key = abs(bit)
                n = counts.get(key, 0) + (1 if bit > 0 else -1)
                counts[key] = n
                mask = mask | key if n else mask & ~key
            self.starts.append(point)
            self.masks.append(mask | always)

    def __call__(self, value: int) -> int:
        return self.masks[bisect_right(self.starts, value) - 1]


class _Index:
    """The rules as bit masks (bit i = rule i), one per selector value: a
    request's candidates are the AND of a few masks and the first match is
    the lowest bit set. Each lookup is a dict get or a bisection, so the cost
    barely grows with the number of rules (thousands of client networks,
    destination block lists, per-user rules). :meth:`Rule.matches_request`
    and :meth:`Rule.matches_destination` stay the definition; the tests check
    this index against them."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        everyone = 0
        # (lo, hi, bit): rule ``bit`` covers lo..hi (per IP version)
        sources: dict[int, list[tuple[int, int, int]]] = {4: [], 6: []}
        networks: dict[int, list[tuple[int, int, int]]] = {4: [], 6: []}
        ports: list[tuple[int, int, int]] = []
        any_source = any_port = any_destination = has_networks = 0
        self.allows = self.any_user = self.anonymous = 0
        self.by_user: dict[str, int] = {}
        self.by_claimed_user: dict[str, int] = {}    # rules an unverified name matches
        self.by_command: dict[str, int] = {}
        self.any_command = 0
        self.by_version: dict[int, int] = {}
        self.any_version = 0
        self.by_verified = {True: 0, False: 0}
        self.names: dict[str, int] = {}
        self.suffixes: dict[str, int] = {}
        for i, rule in enumerate(rules):
            bit = 1 << i
            everyone |= bit
            if rule.allows:
                self.allows |= bit
            if rule.sources is None:
                any_source |= bit
            else:
                for net in rule.sources:
                    sources[net.version].append((int(net.network_address),
                                                 int(net.broadcast_address), bit))
            if rule.users is None:
                self.any_user |= bit
            else:
                for name in rule.users:
                    self.by_user[name] = self.by_user.get(name, 0) | bit
                    if not rule.named_verified:
                        self.by_claimed_user[name] = self.by_claimed_user.get(name, 0) | bit
            if rule.anonymous:
                self.anonymous |= bit
            if rule.commands is None:
                self.any_command |= bit
            else:
                for command in rule.commands:
                    self.by_command[command] = self.by_command.get(command, 0) | bit
            if rule.versions is None:
                self.any_version |= bit
            else:
                for version in rule.versions:
                    self.by_version[version] = self.by_version.get(version, 0) | bit
            for verified in (True, False):
                if rule.verified is None or rule.verified == verified:
                    self.by_verified[verified] |= bit
            if rule.ports is None:
                any_port |= bit
            else:
                ports.extend((lo, hi, bit) for lo, hi in rule.ports)
            if rule.any_destination:
                any_destination |= bit
            for net in rule.networks:
                has_networks |= bit
                networks[net.version].append((int(net.network_address),
                                              int(net.broadcast_address), bit))
            for name in rule.names:
                self.names[name] = self.names.get(name, 0) | bit
            for suffix in rule.suffixes:
                self.suffixes[suffix] = self.suffixes.get(suffix, 0) | bit
        self.everyone = everyone
        self.sources = {v: _Ranges(r, any_source) for v, r in sources.items()}
        self.networks = {v: _Ranges(r, 0) for v, r in networks.items()}
        self.ports = _Ranges(ports, any_port)
        self.any_destination = any_destination
        self.has_networks = has_networks
        # could_allow(): a deny for every destination and port ends the search.
        self.ends_search = self.allows | (any_destination & any_port)

    def request(self, client: IPAddress, user: str | None, command: str, version: int,
                verified: bool) -> int:
        """Rules matching everything but port and destination."""
        mask = self.sources[client.version](int(client))
        if user is None:
            mask &= self.anonymous
        else:
            by_user = self.by_user if verified else self.by_claimed_user
            mask &= self.any_user | by_user.get(user, 0)
        mask &= self.any_command | self.by_command.get(command, 0)
        mask &= self.any_version | self.by_version.get(version, 0)
        return mask & self.by_verified[bool(verified)]

    def destination(self, name: str | None, address: IPAddress | None) -> int:
        mask = self.any_destination
        if address is not None:
            mask |= self.networks[address.version](int(address))
            if address.version == 6:
                embedded = embedded_ipv4(address)
                if embedded is not None:
                    mask |= self.networks[4](int(embedded))
        if name is not None:
            name = name.rstrip(".").lower()
            mask |= self.names.get(name, 0)
            if self.suffixes:
                # ".example.com" matches example.com and every name under it.
                labels = name.split(".")
                for i in range(len(labels)):
                    mask |= self.suffixes.get("." + ".".join(labels[i:]), 0)
        return mask


def _first(mask: int) -> int:
    """Index of the lowest bit set: the first rule in order."""
    return (mask & -mask).bit_length() - 1


# Up to this many rules are decided through the bit-mask index. Its masks
# are as long as the rule list, one per selector range, so its memory grows
# with the square of the rule count (about 27 MiB at 10,000 rules, 195 MiB at
# 30,000); longer lists are scanned in order instead (about 1.3 us a rule).
INDEX_MAX_RULES = 10000


class RuleSet:
    """An ordered list of rules; the first that matches decides."""

    __slots__ = ("rules", "_index", "_decisions")

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._decisions = tuple(Decision(rule.allows, rule) for rule in self.rules)
        self._index = _Index(self.rules) if len(self.rules) <= INDEX_MAX_RULES else None

    def __len__(self) -> int:
        return len(self.rules)

    def decide(self, client: IPAddress, user: str | None, command: str, port: int,
               name: str | None = None, address: IPAddress | None = None, *,
               version: int = 5, verified: bool = False) -> Decision:
        """Decide for a destination given by name, by address, or both.

        A name request is decided after resolution, with both the name and
        the address it resolved to, so network rules apply to names too.
        The unspecified address is refused whatever the rules say, as a place
        to send to (CONNECT, UDP). A BIND's address is not sent to: there
        0.0.0.0 keeps its meaning, "any peer", and the rules decide.
        """
        if address is not None and command in _SENT_TO and is_unspecified(address):
            return UNSPECIFIED
        index = self._index
        if index is None:
            return self._scan_decide(client, user, command, port, name, address,
                                     version=version, verified=verified)
        mask = index.request(client, user, command, version, verified) & index.ports(port)
        if mask:
            mask &= index.destination(name, address)
        return self._decisions[_first(mask)] if mask else _NO_MATCH

    def decide_name(self, client: IPAddress, user: str | None, command: str, port: int,
                    name: str, *, version: int = 5, verified: bool = False) -> Decision | None:
        """Decide for a name before resolving it, when the name alone is enough.

        ``None`` means the first rule that could match tests networks, so the
        name must be resolved and :meth:`decide` asked per address. Deciding
        early spares a DNS lookup for requests that are denied anyway.
        """
        index = self._index
        if index is None:
            return self._scan_decide_name(client, user, command, port, name,
                                          version=version, verified=verified)
        mask = index.request(client, user, command, version, verified) & index.ports(port)
        by_name = mask & index.destination(name, None)
        mask &= by_name | index.has_networks
        if not mask:
            return _NO_MATCH
        first = _first(mask)
        return self._decisions[first] if by_name >> first & 1 else None

    def name_upstream(self, client: IPAddress, user: str | None, command: str, port: int,
                      name: str, *, version: int = 5,
                      verified: bool = False) -> Decision | None:
        """The decision for a name sent upstream unresolved, when
        :meth:`decide_name` cannot settle it alone: the first rule that
        matches the name without its addresses, if it allows with ``via``
        and leaves resolving to the upstream. The rules before it that test
        networks only are passed over: their addresses are the upstream's
        to find, never looked up here (a lookup would leak the name to this
        host's resolver). None: resolve and decide per address as ever."""
        index = self._index
        if index is None:
            for i, rule in enumerate(self.rules):
                if rule.matches_request(client, user, command, port, version, verified) and \
                        rule.matches_destination(name, None):
                    return self._upstream_decision(i)
            return None
        mask = index.request(client, user, command, version, verified) & index.ports(port) & \
            index.destination(name, None)
        return self._upstream_decision(_first(mask)) if mask else None

    def _upstream_decision(self, i: int) -> Decision | None:
        rule = self.rules[i]
        return self._decisions[i] if rule.allows and rule.via and not rule.via_local else None

    def could_allow(self, client: IPAddress, user: str | None, command: str, *,
                    version: int = 5, verified: bool = False) -> Rule | None:
        """The first rule that could allow some destination, or None (for UDP
        ASSOCIATE, whose destinations come later, one per datagram: that
        rule's limits bind the association)."""
        index = self._index
        if index is None:
            return self._scan_could_allow(client, user, command, version=version,
                                          verified=verified)
        mask = index.request(client, user, command, version, verified) & index.ends_search
        if not mask:
            return None
        first = _first(mask)
        return self.rules[first] if index.allows >> first & 1 else None


    # The same decisions by scanning the rules in order (Rule.matches_*).

    def _scan_decide(self, client: IPAddress, user: str | None, command: str, port: int,
                     name: str | None = None, address: IPAddress | None = None, *,
                     version: int = 5, verified: bool = False) -> Decision:
        for i, rule in enumerate(self.rules):
            if rule.matches_request(client, user, command, port, version, verified) and \
                    rule.matches_destination(name, address):
                return self._decisions[i]
        return _NO_MATCH

    def _scan_decide_name(self, client: IPAddress, user: str | None, command: str, port: int,
                          name: str, *, version: int = 5,
                          verified: bool = False) -> Decision | None:
        for i, rule in enumerate(self.rules):
            if not rule.matches_request(client, user, command, port, version, verified):
                continue
            if rule.matches_destination(name, None):
                return self._decisions[i]
            if rule.networks:
                return None
        return _NO_MATCH

    def _scan_could_allow(self, client: IPAddress, user: str | None, command: str, *,
                          version: int = 5, verified: bool = False) -> Rule | None:
        for rule in self.rules:
            if not rule.matches_request(client, user, command, rule_port(rule), version,
                                        verified):
                continue
            if rule.allows:
                return rule
            if rule.any_destination and rule.ports is None:
                return None   # denies every destination: nothing after it matters
        return None


def rule_port(rule: Rule) -> int:
    """A port the rule's port selector matches (any, if it has none)."""
    return rule.ports[0][0] if rule.ports else 0


LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def default_rules() -> RuleSet:
    """No rules configured: loopback clients may go anywhere, nobody else."""
    return RuleSet([Rule("allow", sources=LOOPBACK, label="default rule (loopback clients)")])


def compile_rule(label: str, action: str, sources: Sequence[str] | None = None,
                 destinations: Sequence[str] | None = None,
                 ports: Sequence[str] | None = None, commands: Sequence[str] | None = None,
                 users: Sequence[str] | None = None, log: bool = False,
                 versions: Sequence[int] | None = None,
                 verified: bool | str | None = None,
                 host_addresses: Sequence[IPAddress] = (), name: str | None = None,
                 limits: RuleLimits | None = None, via: Sequence[str] = (),
                 via_local: bool = False, source: str | None = None) -> Rule:
    """Build a rule from config strings; raises ValueError naming the bad value.

    ``verified``: True (proven users only), False (unproven only), "any"
    (both), or None: both, except that a user matched by name in ``users``
    must be proven. ``host_addresses`` are what the destination "self" (this
    host's interface addresses) stands for.
    """
    if action not in ("allow", "deny"):
        raise ValueError(f"action must be \"allow\" or \"deny\", not {action!r}")
    for key, value in (("from", sources), ("to", destinations), ("ports", ports),
                       ("commands", commands)):
        if value is not None and len(value) == 0:
            raise ValueError(f"{key} is empty: the rule could never match "
                             f"(leave {key} out to match any)")
    compiled_sources = None
    if sources is not None:
        compiled_sources = tuple(parse_network(s) for s in sources)
    networks: list[IPNetwork] = []
    names: set[str] = set()
    suffixes: list[str] = []
    any_destination = destinations is None
    for item in destinations or ():
        if item == SELF:
            if not host_addresses:
                raise ValueError("\"self\": this host's addresses are not known")
            networks.extend(ipaddress.ip_network(a) for a in host_addresses)
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
            continue
        except ValueError:
            pass
        # The form names from clients are matched in (socksd.wire.names).
        try:
            if item.startswith("."):
                suffixes.append("." + normalize_name(item[1:]))
            else:
                names.add(normalize_name(item))
        except ValueError as e:
            raise ValueError(f"{item!r} is neither a network nor a host name ({e})") from None
    compiled_ports = None
    if ports is not None:
        compiled_ports = tuple(port_range(p) for p in ports)
    compiled_commands = None
    if commands is not None:
        unknown = sorted(set(commands) - COMMANDS)
        if unknown:
            raise ValueError(f"unknown command {unknown[0]!r} "
                             f"(known: {', '.join(sorted(COMMANDS))})")
        compiled_commands = frozenset(commands)
    user_names = None
    anonymous = True
    if users is not None:
        if ANY_USER in users:
            user_names, anonymous = None, True
        else:
            anonymous = ANONYMOUS in users
            user_names = frozenset(u for u in users if u != ANONYMOUS)
            if not anonymous and not user_names:
                raise ValueError("users is empty: the rule could never match")
            if anonymous and not user_names:
                user_names = frozenset()
    compiled_versions = None
    if versions is not None:
        bad = [v for v in versions if v not in (4, 5)]
        if bad or not versions:
            raise ValueError(f"versions are 4 and/or 5, not {bad or versions!r}")
        compiled_versions = frozenset(versions)
    if limits is not None:
        if action != "allow":
            raise ValueError("rate and max_sessions are for rules that allow")
        if limits.rate_per not in SHARED_BY:
            raise ValueError(f"rate_per is one of {', '.join(SHARED_BY)}, "
                             f"not {limits.rate_per!r}")
        if limits.max_sessions_per not in COUNTED_BY:
            raise ValueError(f"max_sessions_per is one of {', '.join(COUNTED_BY)}, "
                             f"not {limits.max_sessions_per!r}")
    if verified not in (None, True, False, "any"):
        raise ValueError(f"verified is true, false or \"any\", not {verified!r}")
    compiled_verified = None if isinstance(verified, str) else verified   # "any": either
    named_verified = verified is None and bool(user_names)
    return Rule(action, compiled_sources, tuple(networks), frozenset(names), tuple(suffixes),
                any_destination, compiled_ports, compiled_commands, user_names, anonymous,
                compiled_versions, compiled_verified, named_verified, log, label, name,
                limits, tuple(via), via_local, source)


def parse_network(text: str) -> IPNetwork:
    """A network from the config (host bits allowed); ValueError naming it."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP network") from None


def port_range(text: str | int) -> tuple[int, int]:
    if isinstance(text, int):
        lo = hi = text
    else:
        lo_s, sep, hi_s = str(text).partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if sep else lo
        except ValueError:
            raise ValueError(f"{text!r} is not a port or port range like \"1-1023\"") from None
    if not (0 <= lo <= hi <= 65535):
        raise ValueError(f"{text!r} is not a port range within 0-65535")
    return lo, hi
