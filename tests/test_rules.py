"""Tests for socksd.rules: compiling rules from config strings and first-match decisions."""

from __future__ import annotations

import ipaddress
import random
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socksd import rules as rules_module
from socksd.rules import COMMANDS, RuleSet, compile_rule, default_rules, parse_ip, rule_port

CLIENT = parse_ip("192.0.2.10")


def ruleset(*rules):
    return RuleSet(rules)


def allowed(rules, *, client=CLIENT, user=None, command="connect", port=80, name=None,
            address=None, verified=None) -> bool:
    """``verified`` defaults to True for a named user (a password or Kerberos
    login), as named-user rules need by default."""
    if isinstance(address, str):
        address = parse_ip(address)
    if isinstance(client, str):
        client = parse_ip(client)
    if verified is None:
        verified = user is not None
    return rules.decide(client, user, command, port, name, address,
                        verified=verified).allowed


# compile_rule errors.


@pytest.mark.parametrize("action", ["permit", "ALLOW", "", "reject"])
def test_bad_action(action):
    with pytest.raises(ValueError, match="action"):
        compile_rule("r", action)


@pytest.mark.parametrize("source", ["10.0.0.0/33", "not-a-net", "300.1.2.3", "::1/129", ""])
def test_bad_source_network(source):
    with pytest.raises(ValueError, match="not an IP network"):
        compile_rule("r", "allow", sources=[source])


@pytest.mark.parametrize("destination", ["10.0.0.0/33", "", ".", "exa mple.com", "a/b"])
def test_bad_destination(destination):
    with pytest.raises(ValueError):
        compile_rule("r", "allow", destinations=[destination])


@pytest.mark.parametrize("ports", [["70000"], ["1-70000"], ["100-1"], ["http"], ["-1"],
                                   ["1-2-3"], ["1-"], [""], [65536], [-5]])
def test_bad_port_range(ports):
    with pytest.raises(ValueError, match="port"):
        compile_rule("r", "allow", ports=ports)


@pytest.mark.parametrize("commands", [["CONNECT"], ["associate"], ["connect", "listen"], [""]])
def test_unknown_command(commands):
    with pytest.raises(ValueError, match="unknown command"):
        compile_rule("r", "allow", commands=commands)


def test_empty_users_is_an_error():
    with pytest.raises(ValueError):
        compile_rule("r", "allow", users=[])


def test_valid_rule_compiles():
    rule = compile_rule("r", "deny", sources=["10.0.0.0/8", "::1"],
                        destinations=["192.168.0.0/16", "Example.COM.", ".corp.example"],
                        ports=["22", "1000-2000", 443], commands=["connect", "bind", "udp"],
                        users=["alice", "-"], log=True)
    assert not rule.allows
    assert rule.ports == ((22, 22), (1000, 2000), (443, 443))
    assert rule.names == frozenset({"example.com"})
    assert rule.suffixes == (".corp.example",)
    assert rule.networks == (ipaddress.ip_network("192.168.0.0/16"),)
    assert rule.anonymous and rule.users == frozenset({"alice"})
    assert rule.log and rule.label == "r"


# First match.


def test_first_match_wins():
    rules = ruleset(compile_rule("deny-22", "deny", ports=["22"]),
                    compile_rule("allow-all", "allow"))
    decision = rules.decide(CLIENT, None, "connect", 22, None, parse_ip("198.51.100.1"))
    assert not decision.allowed and decision.rule.label == "deny-22"
    decision = rules.decide(CLIENT, None, "connect", 80, None, parse_ip("198.51.100.1"))
    assert decision.allowed and decision.rule.label == "allow-all"

    reversed_rules = ruleset(compile_rule("allow-all", "allow"),
                             compile_rule("deny-22", "deny", ports=["22"]))
    assert allowed(reversed_rules, port=22, address="198.51.100.1")


def test_no_rule_matches_is_deny():
    rules = ruleset(compile_rule("only-443", "allow", ports=["443"]))
    decision = rules.decide(CLIENT, None, "connect", 80, None, parse_ip("198.51.100.1"))
    assert not decision.allowed
    assert decision.rule is None
    assert "default deny" in decision.reason
    assert not RuleSet([]).decide(CLIENT, None, "connect", 80, None, None).allowed
    assert len(RuleSet([])) == 0


def test_reason_names_rule_and_action():
    rules = ruleset(compile_rule("no-ssh", "deny", ports=["22"]))
    assert rules.decide(CLIENT, None, "connect", 22).reason == "no-ssh (deny)"


# Sources.


def test_sources():
    rules = ruleset(compile_rule("lan", "allow", sources=["192.0.2.0/24", "2001:db8::/32"]))
    assert allowed(rules, client="192.0.2.200")
    assert allowed(rules, client="2001:db8::5")
    assert not allowed(rules, client="198.51.100.1")
    # A v4-mapped client is normalised by parse_ip and matches the IPv4 network.
    assert allowed(rules, client="::ffff:192.0.2.7")


# Users.


def test_users_star_matches_everyone_including_anonymous():
    rules = ruleset(compile_rule("r", "allow", users=["*"]))
    assert allowed(rules, user=None)
    assert allowed(rules, user="alice")


def test_users_dash_matches_only_anonymous():
    rules = ruleset(compile_rule("r", "allow", users=["-"]))
    assert allowed(rules, user=None)
    assert not allowed(rules, user="alice")


def test_users_names_match_only_those_names():
    rules = ruleset(compile_rule("r", "allow", users=["alice", "bob"]))
    assert allowed(rules, user="alice")
    assert allowed(rules, user="bob")
    assert not allowed(rules, user="carol")
    assert not allowed(rules, user=None)
    assert not allowed(rules, user="Alice")


@pytest.mark.parametrize("scan", [False, True], ids=["index", "scan"])
def test_a_named_user_must_be_verified_by_default(scan):
    """A SOCKS4 USERID taken on trust, or from a whitelist, is a claim: anyone
    may type "alice". A rule naming alice matches only a proven alice unless
    it says verified = "any"; explicit true/false keep their meaning."""
    rules = ruleset(compile_rule("named", "allow", users=["alice"]),
                    compile_rule("any", "allow", users=["bob"], verified="any"),
                    compile_rule("claims", "allow", users=["carol"], verified=False),
                    compile_rule("everyone", "allow", users=["*"], ports=["8080"]),
                    compile_rule("anonymous", "allow", users=["-"], ports=["8081"]))
    if scan:
        rules._index = None
    assert allowed(rules, user="alice", verified=True)
    assert not allowed(rules, user="alice", verified=False)
    assert allowed(rules, user="bob", verified=True)
    assert allowed(rules, user="bob", verified=False)
    assert not allowed(rules, user="carol", verified=True)
    assert allowed(rules, user="carol", verified=False)
    # "*" and "-" name nobody: a claimed name matches them as before.
    assert allowed(rules, user="mallory", verified=False, port=8080)
    assert allowed(rules, user=None, verified=False, port=8081)
    assert not allowed(rules, user="mallory", verified=False, port=8081)


def test_verified_takes_true_false_or_any():
    with pytest.raises(ValueError, match="verified"):
        compile_rule("r", "allow", users=["alice"], verified="yes")


def test_users_names_and_anonymous():
    rules = ruleset(compile_rule("r", "allow", users=["alice", "-"]))
    assert allowed(rules, user="alice")
    assert allowed(rules, user=None)
    assert not allowed(rules, user="bob")


def test_no_users_selector_matches_anyone():
    rules = ruleset(compile_rule("r", "allow"))
    assert allowed(rules, user=None)
    assert allowed(rules, user="anyone")


# Commands and ports.


def test_commands():
    rules = ruleset(compile_rule("r", "allow", commands=["connect", "udp"]))
    assert allowed(rules, command="connect")
    assert allowed(rules, command="udp")
    assert not allowed(rules, command="bind")


@given(st.integers(0, 65535))
def test_port_ranges(port):
    rules = ruleset(compile_rule("r", "allow", ports=["80", "1000-2000", "65535"]))
    assert allowed(rules, port=port) == (port == 80 or 1000 <= port <= 2000 or port == 65535)


def test_full_port_range_and_zero():
    rules = ruleset(compile_rule("r", "allow", ports=["0-65535"]))
    assert allowed(rules, port=0) and allowed(rules, port=65535)


# Destinations.


def test_host_names_exact_and_case_insensitive():
    rules = ruleset(compile_rule("r", "allow", destinations=["example.com"]))
    assert allowed(rules, name="example.com")
    assert allowed(rules, name="EXAMPLE.com.")
    assert not allowed(rules, name="www.example.com")
    assert not allowed(rules, name="example.org")
    assert not allowed(rules, address="93.184.216.34")


def test_suffix_matches_subdomains_and_bare_name():
    rules = ruleset(compile_rule("r", "allow", destinations=[".example.com"]))
    assert allowed(rules, name="www.example.com")
    assert allowed(rules, name="a.b.example.com")
    assert allowed(rules, name="example.com")
    assert allowed(rules, name="Example.Com.")
    assert not allowed(rules, name="badexample.com")
    assert not allowed(rules, name="example.com.evil")
    assert not allowed(rules, name="com")


def test_networks_apply_to_addresses():
    rules = ruleset(compile_rule("r", "allow", destinations=["10.0.0.0/8", "2001:db8::/32"]))
    assert allowed(rules, address="10.1.2.3")
    assert allowed(rules, address="2001:db8::1")
    assert not allowed(rules, address="11.0.0.1")
    assert allowed(rules, address="::ffff:10.0.0.1")


def test_networks_apply_to_resolved_addresses_of_names():
    rules = ruleset(compile_rule("no-private", "deny", destinations=["10.0.0.0/8"]),
                    compile_rule("rest", "allow"))
    assert not allowed(rules, name="intranet.example", address="10.9.9.9")
    assert allowed(rules, name="intranet.example", address="93.184.216.34")


def test_a_name_without_address_does_not_match_network_rules():
    rules = ruleset(compile_rule("r", "allow", destinations=["10.0.0.0/8"]))
    assert not allowed(rules, name="intranet.example")


# parse_ip.


@pytest.mark.parametrize("text, expected", [
    ("::ffff:127.0.0.1", "127.0.0.1"),
    ("::ffff:10.1.2.3", "10.1.2.3"),
    ("127.0.0.1", "127.0.0.1"),
    ("::1", "::1"),
    ("fe80::1%eth0", "fe80::1"),
])
def test_parse_ip(text, expected):
    assert parse_ip(text) == ipaddress.ip_address(expected)


def test_parse_ip_v4_mapped_is_ipv4():
    assert parse_ip("::ffff:192.0.2.1").version == 4


def test_parse_ip_refuses_garbage():
    with pytest.raises(ValueError):
        parse_ip("localhost")


# default_rules.


def test_default_rules_allow_loopback_clients_only():
    rules = default_rules()
    assert allowed(rules, client="127.0.0.1", address="93.184.216.34")
    assert allowed(rules, client="127.3.4.5", name="example.com")
    assert allowed(rules, client="::1", address="10.1.2.3")
    assert allowed(rules, client="::ffff:127.0.0.1", address="10.1.2.3")
    assert not allowed(rules, client="10.1.2.3", address="127.0.0.1")
    assert not allowed(rules, client="10.1.2.3", name="localhost")
    assert not allowed(rules, client="::2", address="127.0.0.1")
    assert allowed(rules, client="127.0.0.1", user="alice", command="bind", port=0)


# The unspecified address, IPv6 forms carrying an IPv4 address, "self".


@pytest.mark.parametrize("text", ["0.0.0.0", "0.1.2.3", "0.255.255.255", "::",
                                  "::ffff:0.0.0.0", "::0.0.0.5", "64:ff9b::"])
def test_unspecified_forms(text):
    assert rules_module.is_unspecified(ipaddress.ip_address(text))


@pytest.mark.parametrize("text", ["1.0.0.0", "127.0.0.1", "::1", "2001:db8::", "64:ff9b::1:0:0"])
def test_specified_addresses(text):
    assert not rules_module.is_unspecified(ipaddress.ip_address(text))


@pytest.mark.parametrize("path", ["index", "scan"])
@pytest.mark.parametrize("command,refused", [("connect", True), ("udp", True),
                                             ("bind", False)])
def test_unspecified_destination_refused_before_any_rule(path, command, refused):
    """Linux delivers connect()/sendto() to 0.0.0.0 or :: to the local host.
    An allow-all cannot let it through; a BIND's 0.0.0.0 means "any peer"
    (nothing is sent to it) and stays for the rules."""
    rules = build([compile_rule("all", "allow")], path)
    for text in ("0.0.0.0", "::", "::ffff:0.0.0.0"):
        decision = rules.decide(CLIENT, None, command, 80, None, parse_ip(text))
        assert decision.allowed is not refused, text
        if refused:
            assert decision.reason.startswith("the unspecified address"), decision.reason


@pytest.mark.parametrize("path", ["index", "scan"])
@pytest.mark.parametrize("text", ["64:ff9b::7f00:1", "64:ff9b::127.0.0.53", "::127.0.0.1",
                                  "::ffff:127.0.0.1"])
def test_ipv4_rules_cover_ipv6_forms_of_their_addresses(path, text):
    """IPv4-compatible and NAT64 addresses are delivered to the IPv4 address
    they carry: deny 127.0.0.0/8 covers them (v4-mapped ones too)."""
    rules = build([compile_rule("no-loopback", "deny", destinations=["127.0.0.0/8"]),
                   compile_rule("rest", "allow")], path)
    address = ipaddress.ip_address(text)
    decision = rules.decide(CLIENT, None, "connect", 80, None, address)
    assert not decision.allowed and decision.rule.label == "no-loopback"
    # An IPv6 rule still sees the IPv6 address.
    six = build([compile_rule("nat64", "deny", destinations=["64:ff9b::/96"]),
                 compile_rule("rest", "allow")], path)
    if text.startswith("64:ff9b"):
        assert not six.decide(CLIENT, None, "connect", 80, None, address).allowed


def test_self_stands_for_the_hosts_addresses():
    host = [parse_ip(a) for a in ("127.0.0.1", "192.0.2.2", "::1", "fd00::2", "fe80::1")]
    rules = ruleset(compile_rule("no-self", "deny", destinations=["self"], host_addresses=host),
                    compile_rule("rest", "allow"))
    for text in ("192.0.2.2", "fd00::2", "127.0.0.1", "::ffff:192.0.2.2", "64:ff9b::c000:202"):
        assert not allowed(rules, address=text), text
    assert allowed(rules, address="192.0.2.3")
    assert allowed(rules, address="127.0.0.2")    # the address, not its network
    with pytest.raises(ValueError, match="self"):
        compile_rule("r", "deny", destinations=["self"])


def test_config_self_reads_this_hosts_addresses(tmp_path):
    from socksd import config

    path = tmp_path / "socksd.toml"
    path.write_text('[[rules]]\naction = "deny"\nto = ["self"]\n')
    [rule] = config.load(str(path)).rules.rules
    host = config.host_addresses()
    assert parse_ip("127.0.0.1") in host and parse_ip("::1") in host
    assert {net.network_address for net in rule.networks} == set(host)


# decide_name.


def test_decide_name_needs_address_for_network_rule():
    rules = ruleset(compile_rule("no-private", "deny", destinations=["10.0.0.0/8"]),
                    compile_rule("rest", "allow"))
    assert rules.decide_name(CLIENT, None, "connect", 80, "example.com") is None


def test_decide_name_decides_when_the_name_is_enough():
    rules = ruleset(compile_rule("no-evil", "deny", destinations=[".evil.example"]),
                    compile_rule("no-private", "deny", destinations=["10.0.0.0/8"]),
                    compile_rule("rest", "allow"))
    decision = rules.decide_name(CLIENT, None, "connect", 80, "www.evil.example")
    assert decision is not None and not decision.allowed
    assert decision.rule.label == "no-evil"
    # Past the name rule, the network rule needs an address.
    assert rules.decide_name(CLIENT, None, "connect", 80, "good.example") is None


def test_decide_name_skips_network_rules_that_cannot_match_the_request():
    rules = ruleset(compile_rule("no-private-ssh", "deny", destinations=["10.0.0.0/8"],
                                 ports=["22"]),
                    compile_rule("rest", "allow"))
    decision = rules.decide_name(CLIENT, None, "connect", 80, "example.com")
    assert decision is not None and decision.allowed and decision.rule.label == "rest"
    assert rules.decide_name(CLIENT, None, "connect", 22, "example.com") is None


def test_decide_name_any_destination_and_default_deny():
    assert default_rules().decide_name(parse_ip("127.0.0.1"), None, "connect", 80,
                                       "example.com").allowed
    decision = default_rules().decide_name(parse_ip("10.1.2.3"), None, "connect", 80,
                                           "example.com")
    assert decision is not None and not decision.allowed and decision.rule is None


def test_decide_name_name_rule_matches():
    rules = ruleset(compile_rule("only-example", "allow", destinations=["example.com"]))
    decision = rules.decide_name(CLIENT, None, "connect", 80, "example.com")
    assert decision is not None and decision.allowed
    decision = rules.decide_name(CLIENT, None, "connect", 80, "other.example")
    assert decision is not None and not decision.allowed


# The bit-mask index against the rules' own definition (Rule.matches_*), which
# is what first-match means: same decision for any rules and any request.

_ADDRESSES = ["10.0.0.1", "10.0.0.200", "10.0.1.5", "192.0.2.10", "127.0.0.1", "0.0.0.0",
              "255.255.255.255", "::1", "2001:db8::1", "2001:db8:1::7", "fe80::1",
              "64:ff9b::7f00:1", "::10.0.0.200", "::", "64:ff9b::", "0.1.2.3"]
_NETWORKS = ["10.0.0.0/8", "10.0.0.0/24", "10.0.0.128/25", "10.0.1.0/24", "192.0.2.10/32",
             "0.0.0.0/0", "127.0.0.0/8", "::/0", "::1/128", "2001:db8::/32", "2001:db8::/64"]
_NAMES = ["example.com", "www.example.com", "a.b.example.com", "example.org", "com",
          "WWW.Example.COM.", "localhost", "x..example.com"]
_DESTINATIONS = _NETWORKS + ["example.com", "www.example.com", ".example.com", ".com",
                             ".b.example.com", "localhost", ".org"]
_USERS = ["alice", "bob", "*", "-"]
_PORT_RANGES = ["80", "1-1023", "443", "1024-65535", "0", "8000-8080"]


def _random_rule(rng: random.Random, label: str):
    def maybe(make):
        return None if rng.random() < 0.4 else make()

    def some(pool, most):
        return rng.sample(pool, rng.randint(1, most))

    return compile_rule(
        label, rng.choice(["allow", "deny"]),
        sources=maybe(lambda: some(_NETWORKS, 3)),
        destinations=maybe(lambda: some(_DESTINATIONS, 4)),
        ports=maybe(lambda: some(_PORT_RANGES, 3)),
        commands=maybe(lambda: some(sorted(COMMANDS), 3)),
        users=maybe(lambda: some(_USERS, 3)),
        versions=maybe(lambda: rng.choice([[4], [5], [4, 5]])),
        verified=rng.choice([None, True, False, "any"]))


# Compiled once: hypothesis draws lists of them (compiling per example was
# most of these tests' time).
_RULE_POOL = [_random_rule(random.Random(seed), f"rule {seed}") for seed in range(600)]


def rulesets():
    return st.lists(st.sampled_from(_RULE_POOL), max_size=12)


requests = st.fixed_dictionaries({
    "client": st.sampled_from(_ADDRESSES).map(parse_ip),
    "user": st.sampled_from([None, "alice", "bob", "carol"]),
    "command": st.sampled_from(sorted(COMMANDS)),
    "port": st.sampled_from([0, 22, 80, 443, 1023, 1024, 8080, 65535]),
    "version": st.sampled_from([4, 5]),
    "verified": st.booleans(),
})


def build(rules, path: str) -> RuleSet:
    """A RuleSet deciding by the bit-mask index, or by the in-order scan it
    falls back to for very long rule lists."""
    limit = rules_module.INDEX_MAX_RULES if path == "index" else -1
    with mock.patch.object(rules_module, "INDEX_MAX_RULES", limit):
        return RuleSet(rules)


both_paths = pytest.mark.parametrize("path", ["index", "scan"])


def reference(rules, r, name, address):
    for rule in rules:
        if rule.matches_request(r["client"], r["user"], r["command"], r["port"], r["version"],
                                r["verified"]) and rule.matches_destination(name, address):
            return rule
    return None


@both_paths
@settings(max_examples=400)
@given(rulesets(), requests, st.one_of(st.none(), st.sampled_from(_NAMES)),
       st.one_of(st.none(), st.sampled_from(_ADDRESSES).map(parse_ip)))
def test_index_decides_like_first_match(path, rules, r, name, address):
    decision = build(rules, path).decide(r["client"], r["user"], r["command"], r["port"], name,
                                     address, version=r["version"], verified=r["verified"])
    if address is not None and r["command"] in ("connect", "udp") and \
            rules_module.is_unspecified(address):
        assert decision is rules_module.UNSPECIFIED     # before any rule
        return
    expected = reference(rules, r, name, address)
    assert decision.rule is expected
    assert decision.allowed == (expected is not None and expected.allows)


@both_paths
@settings(max_examples=400)
@given(rulesets(), requests, st.sampled_from(_NAMES))
def test_index_decide_name_like_first_match(path, rules, r, name):
    got = build(rules, path).decide_name(r["client"], r["user"], r["command"], r["port"], name,
                                     version=r["version"], verified=r["verified"])
    for rule in rules:
        if not rule.matches_request(r["client"], r["user"], r["command"], r["port"],
                                    r["version"], r["verified"]):
            continue
        if rule.matches_destination(name, None):
            assert got is not None and got.rule is rule
            return
        if rule.networks:
            assert got is None
            return
    assert got is not None and got.rule is None and not got.allowed


@both_paths
@settings(max_examples=400)
@given(rulesets(), requests)
def test_index_could_allow_like_first_match(path, rules, r):
    got = build(rules, path).could_allow(r["client"], r["user"], r["command"],
                                     version=r["version"], verified=r["verified"])
    expected = None
    for rule in rules:
        if not rule.matches_request(r["client"], r["user"], r["command"], rule_port(rule),
                                    r["version"], r["verified"]):
            continue
        if rule.allows:
            expected = rule
            break
        if rule.any_destination and rule.ports is None:
            break
    assert got is expected


def test_many_client_networks_cost_one_lookup():
    """10,000 per-network rules: the index finds the one rule for a client
    without testing the others (counted, not timed)."""
    rules = [compile_rule(f"rule {i}", "allow", sources=[f"10.{i // 256}.{i % 256}.0/24"],
                          destinations=[f"192.168.{i % 256}.0/24"]) for i in range(10000)]
    tested = []
    original = type(rules[0]).matches_request
    ruleset = RuleSet(rules)
    try:
        type(rules[0]).matches_request = lambda self, *a: tested.append(self) or original(self, *a)
        decision = ruleset.decide(parse_ip("10.39.15.7"), None, "connect", 80, None,
                                  parse_ip(f"192.168.{(39 * 256 + 15) % 256}.1"))
    finally:
        type(rules[0]).matches_request = original
    assert decision.rule is rules[39 * 256 + 15] and decision.allowed
    assert tested == []
