"""The TOML configuration: defaults, every key, and clear errors."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import pytest

from socksd import config
from socksd.proxy import Limits
from socksd.tap import socks as tap

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "socksd.toml"


def load_text(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "socksd.toml"
    path.write_text(text)
    return config.load(str(path))


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(config.ConfigError) as info:
        load_text(tmp_path, text)
    return str(info.value)


def test_embedded_default_is_loopback_only():
    cfg = config.Config()
    assert cfg.listen == ("tcp:1080:interface=127.0.0.1",)
    assert cfg.methods == ("none",)
    assert cfg.limits == Limits()
    ip = ipaddress.ip_address
    assert cfg.rules.decide(ip("127.0.0.1"), None, "connect", 80, None, ip("192.0.2.1")).allowed
    assert cfg.rules.decide(ip("::1"), None, "connect", 80, "example.org", None).allowed
    denied = cfg.rules.decide(ip("10.1.2.3"), None, "connect", 80, None, ip("127.0.0.1"))
    assert not denied.allowed and denied.rule is None


@pytest.mark.parametrize("text, expected", [
    (None, "no rules: loopback clients only"),                  # the embedded default
    ("[server]\nmax_sessions = 7\n", "no rules: loopback clients only"),
    ("[[rules]]\naction = \"allow\"\nfrom = [\"127.0.0.0/8\", \"::1/128\"]\n", "1 rule(s)"),
    ("[[rules]]\naction = \"deny\"\n[[rules]]\naction = \"allow\"\n", "2 rule(s)"),
    ("rules = []\n", "0 rule(s)"),
])
def test_rules_summary_does_not_count_the_built_in_rule(tmp_path, text, expected):
    """The rule that serves a file without [[rules]] is no rule of the file's
    (--check said "1 rule(s)" for a file with none)."""
    cfg = config.Config() if text is None else load_text(tmp_path, text)
    assert cfg.rules_summary() == expected
    assert f"; {expected}; socks4 " in tap.summary(cfg, [])


def test_example_uses_every_key_and_is_valid():
    text = EXAMPLE.read_text()
    for key in config._SERVER_KEYS:
        assert f"\n{key} =" in text, key
    for key in [*config._RULE_KEYS, *config._SOCKS4_KEYS, *config._IDENTD_KEYS,
                *config._GSSAPI_KEYS, *config._LOG_KEYS]:
        assert f"\n{key} =" in text or f".{key}]" in text, key   # a key, or a sub-table
    cfg = config.load(str(EXAMPLE))
    assert cfg.methods == ("userpass",) and cfg.methods_given
    assert len(cfg.rules) == 4


def test_all_keys_are_read(tmp_path):
    cfg = load_text(tmp_path, """
[server]
listen = ["tcp:0:interface=127.0.0.1", "tcp6:0:interface=\\\\:\\\\:1"]
methods = ["userpass", "none"]
checkers = ["memory:a:b"]
handshake_timeout = 5
connect_timeout = 2.5
idle_timeout = 60.0
max_sessions = 7
max_sessions_per_client = 3
stall_timeout = 9.5
[[rules]]
action = "deny"
to = [".example.com", "10.0.0.0/8"]
ports = [25, "6660-6669"]
commands = ["connect"]
users = ["-"]
log = true
""")
    assert cfg.limits == Limits(5, 2.5, 60.0, 7, 3, stall_timeout=9.5)
    assert cfg.checkers == ("memory:a:b",)
    rule = cfg.rules.rules[0]
    assert rule.suffixes == (".example.com",) and rule.ports == ((25, 25), (6660, 6669))
    assert rule.anonymous and rule.users == frozenset() and rule.log


def test_log_format():
    assert config.Config().log.format == "text"
    assert config.parse({}, config._Where("x.toml", "")).log.format == "text"


def test_log_format_json(tmp_path):
    assert load_text(tmp_path, '[log]\nformat = "json"\n').log == config.LogConfig("json")


@pytest.mark.parametrize("text, expected", [
    ("[server]\nbogus = 1\n", "socksd.toml:2: server.bogus: unknown key"),
    ("[server]\n\nmax_sessions = \"x\"\n",
     "socksd.toml:3: server.max_sessions: must be an integer, not a string"),
    ("[server]\nmax_sessions = true\n", "server.max_sessions: must be an integer, not a boolean"),
    ("[server]\nmax_sessions = 0\n", "server.max_sessions: 0 must be at least 1"),
    ("[server]\nidle_timeout = -1\n", "server.idle_timeout: -1 is out of range"),
    ("[server]\nlisten = \"tcp:1080\"\n", "server.listen: must be a list of strings, not a string"),
    ("[server]\nlisten = [\"nonsense:1080\"]\n",
     "server.listen: 'nonsense:1080': not a valid Twisted endpoint"),
    ("[server]\nlisten = []\n", "server.listen: needs at least one endpoint"),
    ("[server]\nlisten = [\"tcp:1080:interface=999.1.1.1\"]\n",
     "socksd.toml:2: server.listen: 'tcp:1080:interface=999.1.1.1': interface '999.1.1.1' "
     "is not an IP address"),
    ("[identd]\nlisten = [\"tcp:113:interface=999.1.1.1\"]\n",
     "socksd.toml:2: identd.listen: 'tcp:113:interface=999.1.1.1': interface"),
    ("[metrics]\nlisten = [\"tcp:9180:interface=999.1.1.1\"]\n",
     "socksd.toml:2: metrics.listen: 'tcp:9180:interface=999.1.1.1': interface"),
    ("[server]\nmethods = [\"kerberos\"]\n", "server.methods: unknown method 'kerberos'"),
    ("[server]\nmethods = [\"none\", \"none\"]\n", "server.methods: lists a method twice"),
    ("[sever]\n", "sever: unknown table"),
    ("[[rules]]\nfrom = [\"127.0.0.1\"]\n", "socksd.toml:1: rules[1].action: missing"),
    ("[[rules]]\naction = \"allow\"\n[[rules]]\naction = \"maybe\"\n",
     "socksd.toml:4: rules[2].action: action must be \"allow\" or \"deny\""),
    ("[[rules]]\naction = \"allow\"\nfrom = [\"10.0.0.300/8\"]\n",
     "socksd.toml:3: rules[1].from: '10.0.0.300/8' is not an IP network"),
    ("[[rules]]\naction = \"allow\"\nports = [\"80-70\"]\n",
     "rules[1].ports: '80-70' is not a port range"),
    ("[[rules]]\naction = \"allow\"\ncommands = [\"shell\"]\n",
     "rules[1].commands: unknown command 'shell'"),
    ("[[rules]]\naction = \"allow\"\nusers = []\n", "rules[1].users: users is empty"),
    ("[[rules]]\naction = \"allow\"\nports = []\n", "rules[1].ports: ports is empty"),
    ("[[rules]]\naction = \"allow\"\nfrom = []\n", "rules[1].from: from is empty"),
    ("[[rules]]\naction = \"allow\"\nto = []\n", "rules[1].to: to is empty"),
    ("[[rules]]\naction = \"allow\"\ncommands = []\n", "rules[1].commands: commands is empty"),
    ("[[rules]]\naction = \"allow\"\nlog = \"yes\"\n", "rules[1].log: must be true or false"),
    ("[[rules]]\naction = \"allow\"\nverified = \"yes\"\n",
     "socksd.toml:3: rules[1].verified: 'yes' is not true, false or \"any\""),
    ("[[rules]]\naction = \"allow\"\ncolour = \"red\"\n",
     "socksd.toml:3: rules[1].colour: unknown key"),
    ("[server]\n\n[server\n", "socksd.toml:3: not valid TOML: "),
    ("[server]\n[log]\n\nformat = \"xml\"\n",
     "socksd.toml:4: log.format: 'xml' is not \"text\" or \"json\""),
    ("[log]\nformat = 1\n", "socksd.toml:2: log.format: must be a string, not an integer"),
    ("[log]\nformat = \"JSON\"\n", "socksd.toml:2: log.format: 'JSON' is not"),
    ("[log]\nlevel = \"info\"\n", "socksd.toml:2: log.level: unknown key (known: format)"),
    ("log = \"json\"\n", "socksd.toml:1: log: must be a table ([log])"),
])
def test_errors_name_file_line_key_and_reason(tmp_path, text, expected):
    message = error_of(tmp_path, text)
    assert message.startswith(str(tmp_path / "socksd.toml"))
    assert expected in message


@pytest.mark.parametrize("description, problem", [
    ("tcp:1080:interface=999.1.1.1", "interface '999.1.1.1' is not an IP address"),
    ("tcp:1080:999.1.1.1", "interface '999.1.1.1' is not an IP address"),      # by position
    ("haproxy:tcp:1080:interface=localhost", "interface 'localhost' is not an IP address"),
    ("tcp6:1080:50:interface=\\:\\:1\\:", "interface '::1:' is not an IP address"),
    ("tcp6:1080:50:1.2.3", "interface '1.2.3' is not an IP address"),
    ("ssl:1443:privateKey={pem}:interface=10.0.0.256",
     "interface '10.0.0.256' is not an IP address"),
    ("ssl:1443:{pem}:{pem}:TLSv1_2_METHOD:1.2.3.4.5", "interface '1.2.3.4.5' is not an IP address"),
    ("tcp:1080:interface=127.0.0.1", None),
    ("tcp:1080:interface=\\:\\:1", None),
    ("tcp6:1080:interface=fe80\\:\\:1%lo", None),       # a scope, as Twisted takes it
    ("tcp6:1080:50:\\:\\:", None),
    ("tcp:1080", None),
    ("unix:/run/socksd.sock", None),
])
def test_listen_interface_is_an_address(description, problem):
    """--check refuses what only bind() would, at start."""
    import twisted.test

    pem = Path(twisted.test.__file__).parent / "server.pem"   # Twisted's test key + cert
    assert config._endpoint_problem(description.format(pem=pem)) == problem


def test_ssl_listener_without_pyopenssl(tmp_path, monkeypatch):
    """Without the tls extra, an ssl: listener is a config error naming the fix."""
    monkeypatch.setitem(sys.modules, "OpenSSL", None)                # import fails
    monkeypatch.setitem(sys.modules, "twisted.internet.ssl", None)
    import twisted.internet
    monkeypatch.delattr(twisted.internet, "ssl", raising=False)      # the package's attribute
    message = error_of(tmp_path, '[server]\nlisten = ["ssl:1443:privateKey=k.pem"]\n')
    assert "server.listen: 'ssl:1443:privateKey=k.pem': ssl: endpoints need pyOpenSSL: " \
           "pip install 'socksd[tls]'" in message


def test_unreadable_file():
    with pytest.raises(config.ConfigError, match="/nonexistent.toml: cannot read"):
        config.load("/nonexistent.toml")


def test_auth_on_command_line_requires_userpass_unless_methods_given(tmp_path):
    cfg, checkers = tap.build(None, [], [object()])
    assert cfg.methods == ("userpass",) and len(checkers) == 1
    path = tmp_path / "c.toml"
    path.write_text('[server]\nmethods = ["none", "userpass"]\n')
    cfg, _ = tap.build(str(path), ["tcp:0"], [object()])
    assert cfg.methods == ("none", "userpass") and cfg.listen == ("tcp:0",)


def test_checkers_without_methods_require_a_password(tmp_path):
    """As --auth does: a password file that is never asked for would serve
    everyone unauthenticated while the operator believes otherwise."""
    cfg = load_text(tmp_path, '[server]\ncheckers = ["memory:alice:secret"]\n')
    assert cfg.methods == ("userpass",) and not cfg.socks4.enabled
    cfg = load_text(tmp_path, '[server]\nmethods = ["none", "userpass"]\n'
                              'checkers = ["memory:alice:secret"]\n')
    assert cfg.methods == ("none", "userpass") and cfg.socks4.enabled


def test_socks4_follows_socks5_authentication_unless_the_file_says(tmp_path):
    assert config.Config().socks4.enabled
    assert not load_text(tmp_path, '[server]\nmethods = ["userpass"]\n').socks4.enabled
    assert not load_text(tmp_path, '[server]\nmethods = ["gssapi"]\n[gssapi]\n').socks4.enabled
    cfg = load_text(tmp_path, '[server]\nmethods = ["userpass"]\n[socks4]\nenabled = true\n')
    assert cfg.socks4.enabled and cfg.warnings()
    cfg = load_text(tmp_path, '[server]\nmethods = ["userpass"]\n[socks4]\nenabled = true\n'
                              'userid = "ident"\n')
    assert cfg.socks4.enabled and not cfg.warnings()
    cfg, _ = tap.build(None, [], [object()])          # --auth on the embedded default
    assert not cfg.socks4.enabled
    path = tmp_path / "on.toml"
    path.write_text("[socks4]\nenabled = true\n")
    cfg, _ = tap.build(str(path), [], [object()])
    assert cfg.socks4.enabled


def test_ipv6_client_prefix(tmp_path):
    assert config.Config().limits.ipv6_client_prefix == 64
    cfg = load_text(tmp_path, "[server]\nipv6_client_prefix = 128\n"
                              "[identd]\nipv6_client_prefix = 56\n")
    assert cfg.limits.ipv6_client_prefix == 128 and cfg.identd.limits.ipv6_client_prefix == 56
    assert "server.ipv6_client_prefix: 129 is not an IPv6 prefix length (1-128)" in \
        error_of(tmp_path, "[server]\nipv6_client_prefix = 129\n")


def test_identd_proxied_wait(tmp_path):
    assert config.IdentdConfig().limits.proxied_wait == 0.5
    cfg = load_text(tmp_path, "[identd]\nproxied_wait = 2\n")
    assert cfg.identd.limits.proxied_wait == 2
    assert load_text(tmp_path, "[identd]\nproxied_wait = 0\n").identd.limits.proxied_wait == 0


@pytest.mark.parametrize("value, expected", [
    ("-0.1", "socksd.toml:3: identd.proxied_wait: -0.1 is out of range (0 to 60 seconds; "
             "0 = do not wait)"),
    ("61", "socksd.toml:3: identd.proxied_wait: 61 is out of range"),
    ("inf", "socksd.toml:3: identd.proxied_wait: inf is out of range"),
    ("nan", "socksd.toml:3: identd.proxied_wait: nan is out of range"),
    ('"0.5"', "socksd.toml:3: identd.proxied_wait: must be a number of seconds, not a string"),
    ("true", "socksd.toml:3: identd.proxied_wait: must be a number of seconds, not a boolean"),
])
def test_identd_proxied_wait_errors(tmp_path, value, expected):
    message = error_of(tmp_path, f"[identd]\nenabled = true\nproxied_wait = {value}\n")
    assert message.startswith(f"{tmp_path / 'socksd.toml'}:{expected.split(':', 1)[1]}")
    assert "\n" not in message


def test_server_drain_timeout(tmp_path):
    assert config.Config().limits.drain_timeout == 30
    assert load_text(tmp_path, "[server]\ndrain_timeout = 2.5\n").limits.drain_timeout == 2.5
    assert load_text(tmp_path, "[server]\ndrain_timeout = 0\n").limits.drain_timeout == 0


@pytest.mark.parametrize("value, expected", [
    ("-1", "socksd.toml:3: server.drain_timeout: -1 is out of range (0 to 86400 seconds; "
           "0 = close the open sessions at once)"),
    ("86401", "socksd.toml:3: server.drain_timeout: 86401 is out of range"),
    ("inf", "socksd.toml:3: server.drain_timeout: inf is out of range"),
    ("nan", "socksd.toml:3: server.drain_timeout: nan is out of range"),
    ('"30"', "socksd.toml:3: server.drain_timeout: must be a number of seconds, not a string"),
    ("true", "socksd.toml:3: server.drain_timeout: must be a number of seconds, not a boolean"),
])
def test_server_drain_timeout_errors(tmp_path, value, expected):
    message = error_of(tmp_path, f"[server]\nworkers = 1\ndrain_timeout = {value}\n")
    assert message.startswith(f"{tmp_path / 'socksd.toml'}:{expected.split(':', 1)[1]}")
    assert "\n" not in message


def test_identd_proxied_users_with_workers(tmp_path):
    """No longer refused: the workers register their sessions with the
    supervisor's identd."""
    cfg = load_text(tmp_path, "[server]\nworkers = 2\n[identd]\nenabled = true\n"
                              "proxied_users = true\n")
    assert cfg.workers == 2 and cfg.identd.policy.proxied_users


def test_rules_verified_any(tmp_path):
    cfg = load_text(tmp_path, '[[rules]]\naction = "allow"\nusers = ["alice"]\n'
                              'verified = "any"\n')
    [rule] = cfg.rules.rules
    assert rule.verified is None and not rule.named_verified


def test_userpass_without_checker_is_an_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[server]\nmethods = ["userpass"]\n')
    with pytest.raises(config.ConfigError, match="userpass\" needs a checker"):
        tap.build(str(path), [], [])


def test_bad_checker_string_is_an_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[server]\nmethods = ["userpass"]\ncheckers = ["nosuchchecker:x"]\n')
    with pytest.raises(config.ConfigError,
                       match=r"c.toml:3: server.checkers: 'nosuchchecker:\*\*\*': unknown checker "
                             r"type 'nosuchchecker'"):
        tap.build(str(path), [], [])


def test_checker_that_cannot_be_made_is_an_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[server]\nmethods = ["userpass"]\ncheckers = ["htpasswd:/nonexistent"]\n')
    with pytest.raises(config.ConfigError, match=r"server.checkers\[0\]: 'htpasswd:/nonexistent'"):
        tap.build(str(path), [], [])


@pytest.mark.parametrize("key", ["handshake_timeout", "connect_timeout"])
def test_waits_cannot_be_unbounded(tmp_path, key):
    assert f"server.{key}: 0 is out of range" in error_of(tmp_path, f"[server]\n{key} = 0\n")


@pytest.mark.parametrize("description, shown", [
    ("memory:alice:s3cret:bob:hunter2", "'memory:alice:***:bob:***'"),
    ("memory:alice", "'memory:alice'"),
    ("memroy:alice:s3cret", "'memroy:***'"),
    ("file:/etc/socksd/users", "'file:/etc/socksd/users'"),
    ("anonymous", "'anonymous'"),
])
def test_checker_strings_in_messages_keep_their_passwords_out(description, shown):
    assert config.checker_text(description) == shown


def test_an_unknown_checker_type_in_the_file_is_named_without_its_arguments(tmp_path):
    path = tmp_path / "socksd.toml"
    path.write_text('[server]\ncheckers = ["memroy:alice:s3cret"]\n')
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(path))
    assert "memroy:***" in str(caught.value) and "s3cret" not in str(caught.value)


# Relative paths: against the file's folder, never the working directory.


def test_relative_checker_paths_are_the_config_folders(tmp_path, monkeypatch):
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "socksd.toml").write_text(
        '[server]\ncheckers = ["htpasswd:users", "file:sub/users.plain", "file:/abs/users", '
        '"memory:alice:pw", "htpasswd:../up"]\n')
    monkeypatch.chdir(tmp_path)    # a relative config path, from another folder
    cfg = config.load("etc/socksd.toml")
    assert cfg.checkers == (f"htpasswd:{folder}/users", f"file:{folder}/sub/users.plain",
                            "file:/abs/users", "memory:alice:pw", f"htpasswd:{folder}/../up")


def test_relative_keytab_is_the_config_folders(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    for written, read in [("socksd.keytab", f"{tmp_path}/socksd.keytab"),
                          ("FILE:keys/socksd.keytab", f"{tmp_path}/keys/socksd.keytab"),
                          ("FILE:/etc/krb5.keytab", "/etc/krb5.keytab"),
                          ("/etc/krb5.keytab", "/etc/krb5.keytab"),
                          ("MEMORY:socksd", "MEMORY:socksd")]:
        cfg = load_text(tmp_path, f'[gssapi]\nkeytab = "{written}"\nlocal_realms = ["X"]\n')
        assert cfg.gssapi is not None and cfg.gssapi.keytab == read, written


def test_a_relative_checker_path_is_read_from_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "users").write_text("alice:secret\n")
    (tmp_path / "socksd.toml").write_text('[server]\ncheckers = ["file:users"]\n')
    monkeypatch.chdir("/")
    cfg, checkers = tap.build(str(tmp_path / "socksd.toml"), [], [])
    assert [checker.filename for checker in checkers] == [f"{tmp_path}/users"]
