"""Issue 17's keys in the config file: rule names, rates and caps, a rule's
source, [[upstreams]] and a rule's via. Every bad value stops start-up with
file:line, key and reason; the good ones reach the compiled rules."""

from __future__ import annotations

import pytest

from socksd.rules import RuleLimits
from test_config import error_of, load_text

UP = '[[upstreams]]\nname = "up"\nurl = "socks5://u:p@127.0.0.1:1081"\n'
UP_LOCAL = UP + 'resolve = "local"\n'


def test_limits_and_names_reach_the_rules(tmp_path):
    cfg = load_text(tmp_path, """
[[rules]]
name = "web"
action = "allow"
rate = "100Mbit"
rate_per = "client"
max_sessions = 3
[[rules]]
action = "allow"
rate = 2048
""")
    web, second = cfg.rules.rules
    assert web.label == "rule web" and web.name == "web"
    assert web.limits == RuleLimits("web", 12_500_000, "client", 3, "rule")
    assert second.label == "rule 2" and second.limits == RuleLimits("2", 2048)


@pytest.mark.parametrize("rule, expected", [
    ('rate = "1 parsec"', ":3: rules[1].rate: '1 parsec' is not a rate"),
    ("rate = 0", ":3: rules[1].rate: 0 is out of range"),
    ('rate = "2TiB"', ":3: rules[1].rate: '2TiB' is not a rate"),
    ("rate = 1.5", ":3: rules[1].rate: must be a number of bytes per second"),
    ('rate = 10\nrate_per = "planet"', "rules[1].rate_per: rate_per is one of session, "),
    ('max_sessions_per = "user"', "rules[1].max_sessions_per: is of no use without "
                                  "max_sessions"),
    ('max_sessions = 0', "rules[1].max_sessions: 0 must be at least 1"),
    ('max_sessions = 2\nmax_sessions_per = "session"',
     "rules[1].max_sessions_per: max_sessions_per is one of user, client, rule"),
    ('name = "7"', "rules[1].name: '7' is not a rule name"),
    ('name = "a b"', "rules[1].name: 'a b' is not a rule name"),
    ('source = "192.0.2.77"', "rules[1].source: '192.0.2.77': cannot bind it"),
    ('source = "somewhere"', "rules[1].source: 'somewhere' is not an IP address"),
    ('via = ["nowhere"]', "rules[1].via: 'nowhere' is no upstream (known: none"),
])
def test_rule_key_errors(tmp_path, rule, expected):
    assert expected in error_of(tmp_path, f'[[rules]]\naction = "allow"\n{rule}\n')


def test_a_deny_rule_takes_no_limits_source_or_via(tmp_path):
    assert "rules[1].rate: rate and max_sessions are for rules that allow" in error_of(
        tmp_path, '[[rules]]\naction = "deny"\nrate = 5\n')
    assert "rules[1].source: is for rules that allow" in error_of(
        tmp_path, '[[rules]]\naction = "deny"\nsource = "127.0.0.1"\n')
    assert "rules[1].via: is for rules that allow" in error_of(
        tmp_path, UP + '[[rules]]\naction = "deny"\nvia = ["up"]\n')


def test_two_rules_cannot_share_a_name(tmp_path):
    assert "rules[2].name: 'a' names rule 1 already" in error_of(
        tmp_path, '[[rules]]\nname = "a"\naction = "allow"\n[[rules]]\nname = "a"\n'
                  'action = "deny"\n')


def test_a_rules_source_reaches_the_rule(tmp_path):
    cfg = load_text(tmp_path, '[[rules]]\naction = "allow"\nsource = "127.0.0.2"\n')
    assert cfg.rules.rules[0].source == "127.0.0.2"


def test_upstreams_are_parsed_and_named_by_via(tmp_path):
    cfg = load_text(tmp_path, UP + UP_LOCAL.replace('"up"', '"near"') + """
[[rules]]
action = "allow"
to = [".example.org"]
via = ["up", "near"]
""")
    assert set(cfg.upstreams) == {"up", "near"}
    assert not cfg.upstreams["up"].resolve_locally and cfg.upstreams["near"].resolve_locally
    rule = cfg.rules.rules[0]
    assert rule.via == ("up", "near") and rule.via_local


@pytest.mark.parametrize("text, expected", [
    (UP + UP, ":5: upstreams[2].name: 'up' names another upstream already"),
    ('[[upstreams]]\nurl = "socks5://127.0.0.1:1"\n', "upstreams[1].name: missing"),
    ('[[upstreams]]\nname = "x"\n', "upstreams[1].url: missing"),
    ('[[upstreams]]\nname = "x"\nurl = "ftp://127.0.0.1:1"\n',
     "upstreams[1].url: unknown scheme 'ftp'"),
    ('[[upstreams]]\nname = "x"\nurl = "socks5://u:hunter2@127.0.0.1"\n',
     "upstreams[1].url: socks5://u:***@127.0.0.1: no port"),
    ('[[upstreams]]\nname = "x"\nurl = "socks5://127.0.0.1:1"\nresolve = "maybe"\n',
     "upstreams[1].resolve: 'maybe' is \"remote\""),
    ('[[upstreams]]\nname = "x"\nurl = "socks5://127.0.0.1:1"\nca = "ca.pem"\n',
     "upstreams[1].ca: socks5://127.0.0.1:1: a ca is for socks5+tls upstreams"),
    ('[[upstreams]]\nname = "x"\nurl = "socks5://127.0.0.1:1"\ncolour = "red"\n',
     "upstreams[1].colour: unknown key"),
    (UP + '[[rules]]\naction = "allow"\nto = ["10.0.0.0/8"]\nvia = ["up"]\n',
     "rules[1].to: '10.0.0.0/8': a network cannot judge names sent unresolved to "
     "upstream 'up'"),
    ('[[upstreams]]\nname = "web"\nurl = "http://127.0.0.1:3128"\n'
     '[[rules]]\naction = "allow"\nvia = ["web"]\n',
     "rules[1].via: no upstream in via does bind (web: http)"),
    (UP + '[[rules]]\naction = "allow"\nvia = ["up", "up"]\n',
     "rules[1].via: names an upstream twice"),
    (UP + '[[rules]]\naction = "allow"\nvia = ["up"]\nsource = "127.0.0.1"\n',
     "rules[1].source: a rule's connections leave from its upstreams"),
])
def test_upstream_and_via_errors(tmp_path, text, expected):
    said = error_of(tmp_path, text)
    assert expected in said
    assert "hunter2" not in said


def test_via_with_networks_is_fine_when_every_upstream_resolves_here(tmp_path):
    cfg = load_text(tmp_path, UP_LOCAL + '[[rules]]\naction = "allow"\n'
                                         'to = ["127.0.0.0/8"]\nvia = ["up"]\n')
    assert cfg.rules.rules[0].via_local


def test_an_http_upstream_is_fine_for_a_connect_rule(tmp_path):
    cfg = load_text(tmp_path, '[[upstreams]]\nname = "web"\nurl = "http://127.0.0.1:3128"\n'
                              '[[rules]]\naction = "allow"\ncommands = ["connect"]\n'
                              'via = ["web"]\n')
    assert cfg.rules.rules[0].via == ("web",)
