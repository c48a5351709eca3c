"""What the identd answers (socksd.ident.policy) and the ``[identd]`` config table.

User files are real files under a temporary home, owned (via chown, as root)
by the uid the test pretends is the connection's owner.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from socksd import config
from socksd.config import IdentdConfig
from socksd.ident.policy import MAX_USER_FILE, Answer, IdentPolicy, parse_mode, read_user_file
from socksd.ident.server import IdentdLimits

UID = 4321          # the pretend owner of the connection and of the user file
OTHER_UID = 4322

HASHED = re.compile(r"h[0-9a-f]{10}")
RANDOM = re.compile(r"u[0-9a-f]{10}")


def user(answer: Answer) -> str | None:
    assert answer.error is None, answer
    return answer.user


def error(answer: Answer) -> str | None:
    assert answer.user is None, answer
    return answer.error


# ---- hide ---------------------------------------------------------------------------

def test_root_is_hidden_by_default():
    policy = IdentPolicy()
    assert policy.hide == frozenset({"root"})
    assert error(policy.answer("root", 0, "/root")) == "HIDDEN-USER"
    assert user(policy.answer("alice", 1000, None)) == "alice"


def test_hide_list_replaces_the_default():
    policy = IdentPolicy(hide=frozenset({"alice", "bob"}))
    assert user(policy.answer("root", 0, "/root")) == "root"
    assert error(policy.answer("alice", 1000, None)) == "HIDDEN-USER"
    assert error(policy.answer("bob", 1001, None)) == "HIDDEN-USER"
    assert user(policy.answer("carol", 1002, None)) == "carol"


def test_empty_hide_list_hides_nobody():
    assert user(IdentPolicy(hide=frozenset()).answer("root", 0, "/root")) == "root"


def test_hide_wins_over_a_per_user_mode():
    policy = IdentPolicy(users={"root": "fixed:admin"})
    assert error(policy.answer("root", 0, "/root")) == "HIDDEN-USER"


def test_unknown_error_only_turns_hidden_into_unknown_error():
    policy = IdentPolicy(unknown_error_only=True, users={"bob": "hidden"})
    assert error(policy.answer("root", 0, None)) == "UNKNOWN-ERROR"
    assert error(policy.answer("bob", 1001, None)) == "UNKNOWN-ERROR"
    assert error(policy.error("NO-USER")) == "UNKNOWN-ERROR"
    assert error(policy.error("INVALID-PORT")) == "UNKNOWN-ERROR"
    assert user(policy.answer("alice", 1000, None)) == "alice"


def test_errors_pass_through_without_unknown_error_only():
    policy = IdentPolicy()
    for token in ("NO-USER", "INVALID-PORT", "HIDDEN-USER", "UNKNOWN-ERROR"):
        assert error(policy.error(token)) == token


# ---- reply modes ----------------------------------------------------------------------

def test_global_modes():
    key = b"k"
    assert user(IdentPolicy(reply="name").answer("alice", 1000, None)) == "alice"
    assert user(IdentPolicy(reply="uid").answer("alice", 1000, None)) == "1000"
    assert error(IdentPolicy(reply="hidden").answer("alice", 1000, None)) == "HIDDEN-USER"
    assert RANDOM.fullmatch(user(IdentPolicy(reply="random").answer("alice", 1000, None)))
    hashed = user(IdentPolicy(reply="hashed", hash_key=key).answer("alice", 1000, None))
    assert HASHED.fullmatch(hashed)
    assert user(IdentPolicy(reply="fixed:guest").answer("alice", 1000, None)) == "guest"


def test_per_user_modes_override_the_global_one():
    policy = IdentPolicy(reply="uid", users={
        "alice": "name", "bob": "hidden", "carol": "fixed:c4", "dave": "hashed",
        "erin": "random", "root": "name"}, hide=frozenset(), hash_key=b"k")
    assert user(policy.answer("alice", 1000, None)) == "alice"
    assert error(policy.answer("bob", 1001, None)) == "HIDDEN-USER"
    assert user(policy.answer("carol", 1002, None)) == "c4"
    assert HASHED.fullmatch(user(policy.answer("dave", 1003, None)))
    assert RANDOM.fullmatch(user(policy.answer("erin", 1004, None)))
    assert user(policy.answer("root", 0, None)) == "root"
    assert user(policy.answer("frank", 1005, None)) == "1005"      # the global mode


def test_per_user_hidden_under_a_global_name():
    policy = IdentPolicy(users={"bob": "hidden"})
    assert error(policy.answer("bob", 1001, None)) == "HIDDEN-USER"
    assert user(policy.answer("alice", 1000, None)) == "alice"


def test_a_uid_without_a_name():
    policy = IdentPolicy()
    assert user(policy.answer(None, 54321, None)) == "54321"
    # Per-user modes are keyed by the same label.
    assert user(IdentPolicy(users={"54321": "fixed:x"}).answer(None, 54321, None)) == "x"


def test_hashed_is_stable_for_a_key_and_differs_across_keys_and_users():
    one = IdentPolicy(reply="hashed", hash_key=b"key one")
    same = IdentPolicy(reply="hashed", hash_key=b"key one")
    two = IdentPolicy(reply="hashed", hash_key=b"key two")
    a1 = user(one.answer("alice", 1000, None))
    assert user(one.answer("alice", 1000, None)) == a1
    assert user(same.answer("alice", 1000, None)) == a1
    assert user(two.answer("alice", 1000, None)) != a1
    assert user(one.answer("bob", 1001, None)) != a1
    assert "alice" not in a1


def test_default_hash_key_is_random_per_policy():
    """Without a configured key, tokens cannot be precomputed by outsiders."""
    a = user(IdentPolicy(reply="hashed").answer("alice", 1000, None))
    b = user(IdentPolicy(reply="hashed").answer("alice", 1000, None))
    assert a != b


def test_random_differs_between_answers():
    policy = IdentPolicy(reply="random")
    tokens = {user(policy.answer("alice", 1000, None)) for _ in range(20)}
    assert len(tokens) == 20
    assert not any("alice" in t for t in tokens)


def test_notes_say_how_the_reply_was_chosen():
    """The note is what lets an admin map a token back to the user."""
    assert "alice" in IdentPolicy(reply="random").answer("alice", 1000, None).note
    assert "alice" in IdentPolicy(reply="hashed").answer("alice", 1000, None).note


# ---- parse_mode ----------------------------------------------------------------------

@pytest.mark.parametrize("text", ["name", "uid", "hidden", "random", "hashed", "fixed:x",
                                  "fixed:A.b_c-9", "fixed:" + "a" * 32, "  name  "])
def test_parse_mode_accepts(text):
    assert parse_mode(text) == text.strip()


@pytest.mark.parametrize("text", ["", "Name", "NAME", "names", "fixed", "fixed:",
                                  "fixed:a b", "fixed:a:b", "fixed:" + "a" * 33, "fixed:é",
                                  "fixed:a\r\nb", "fixed:a,b", "hide", "none", "uid:1"])
def test_parse_mode_rejects(text):
    with pytest.raises(ValueError) as info:
        parse_mode(text)
    assert "mode" in str(info.value)


# ---- user files -----------------------------------------------------------------------

@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    os.chown(home, UID, UID)
    os.chown(home / ".config", UID, UID)
    return home


def write_user_file(home: Path, text: str | bytes, uid: int = UID) -> Path:
    path = home / ".config" / "socksd-ident"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    os.chown(path, uid, uid)
    return path


@pytest.mark.parametrize("mode,expected", [
    ("fixed:mynick", "mynick"), ("uid", str(UID)), ("name", "alice"),
])
def test_user_file_sets_the_reply_for_a_listed_user(home, mode, expected):
    write_user_file(home, mode + "\n")
    policy = IdentPolicy(reply="hidden", user_files=frozenset({"alice"}))
    assert user(policy.answer("alice", UID, str(home))) == expected


def test_user_file_can_hide(home):
    write_user_file(home, "hidden\n")
    policy = IdentPolicy(user_files=frozenset({"alice"}))
    assert error(policy.answer("alice", UID, str(home))) == "HIDDEN-USER"


def test_user_file_hashed_and_random(home):
    policy = IdentPolicy(user_files=frozenset({"alice"}), hash_key=b"k")
    write_user_file(home, "hashed\n")
    assert HASHED.fullmatch(user(policy.answer("alice", UID, str(home))))
    write_user_file(home, "random\n")
    assert RANDOM.fullmatch(user(policy.answer("alice", UID, str(home))))


def test_user_file_ignored_for_users_not_listed(home):
    write_user_file(home, "fixed:mynick\n")
    assert user(IdentPolicy().answer("alice", UID, str(home))) == "alice"
    policy = IdentPolicy(user_files=frozenset({"bob"}))
    assert user(policy.answer("alice", UID, str(home))) == "alice"


def test_star_lets_every_user_set_a_reply(home):
    write_user_file(home, "fixed:mynick\n")
    policy = IdentPolicy(user_files=frozenset({"*"}))
    assert user(policy.answer("alice", UID, str(home))) == "mynick"


def test_user_file_overrides_the_per_user_mode(home):
    write_user_file(home, "fixed:mynick\n")
    policy = IdentPolicy(users={"alice": "uid"}, user_files=frozenset({"alice"}))
    assert user(policy.answer("alice", UID, str(home))) == "mynick"


def test_user_file_cannot_unhide_a_hidden_user(home):
    write_user_file(home, "name\n")
    policy = IdentPolicy(hide=frozenset({"alice"}), user_files=frozenset({"*"}))
    assert error(policy.answer("alice", UID, str(home))) == "HIDDEN-USER"


def test_user_file_is_read_on_each_lookup(home):
    policy = IdentPolicy(user_files=frozenset({"alice"}))
    write_user_file(home, "fixed:first\n")
    assert user(policy.answer("alice", UID, str(home))) == "first"
    write_user_file(home, "fixed:second\n")
    assert user(policy.answer("alice", UID, str(home))) == "second"
    (home / ".config" / "socksd-ident").unlink()
    assert user(policy.answer("alice", UID, str(home))) == "alice"


def test_user_file_comments_and_blank_lines(home):
    write_user_file(home, "# my ident reply\n\n   \n  fixed:nick2  \n")
    assert read_user_file(str(home), UID) == "fixed:nick2"


def test_missing_home_or_file(tmp_path, home):
    assert read_user_file(str(home), UID) is None
    assert read_user_file(str(tmp_path / "nowhere"), UID) is None
    policy = IdentPolicy(user_files=frozenset({"*"}))
    assert user(policy.answer("alice", UID, str(tmp_path / "nowhere"))) == "alice"
    assert user(policy.answer("alice", UID, None)) == "alice"


@pytest.mark.parametrize("text", ["fixed:has space\n", "bogus\n", "fixed:\n", "fixed:a:b\n",
                                  "fixed:" + "a" * 40 + "\n", "NAME\n"])
def test_invalid_line_is_ignored(home, text):
    write_user_file(home, text)
    assert read_user_file(str(home), UID) is None
    policy = IdentPolicy(reply="uid", user_files=frozenset({"alice"}))
    assert user(policy.answer("alice", UID, str(home))) == str(UID)


def test_binary_garbage_is_ignored(home):
    write_user_file(home, b"\xff\xfe\x00\x01fixed:x\n")
    assert read_user_file(str(home), UID) is None


def test_file_owned_by_someone_else_is_ignored(home):
    write_user_file(home, "fixed:spoofed\n", uid=OTHER_UID)
    assert read_user_file(str(home), UID) is None
    policy = IdentPolicy(user_files=frozenset({"alice"}))
    assert user(policy.answer("alice", UID, str(home))) == "alice"
    write_user_file(home, "fixed:spoofed\n", uid=0)
    assert read_user_file(str(home), UID) is None


def test_symlink_is_ignored_even_to_a_file_the_user_owns(home, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("fixed:vialink\n")
    os.chown(target, UID, UID)
    link = home / ".config" / "socksd-ident"
    link.symlink_to(target)
    os.lchown(link, UID, UID)
    assert read_user_file(str(home), UID) is None
    policy = IdentPolicy(user_files=frozenset({"alice"}))
    assert user(policy.answer("alice", UID, str(home))) == "alice"


def test_symlink_to_a_root_file_is_ignored(home, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("fixed:rootsecret\n")
    (home / ".config" / "socksd-ident").symlink_to(secret)
    assert read_user_file(str(home), UID) is None


def test_directory_and_fifo_are_ignored_without_blocking(home):
    path = home / ".config" / "socksd-ident"
    os.mkfifo(path)
    os.chown(path, UID, UID)
    assert read_user_file(str(home), UID) is None      # must not wait for a writer
    path.unlink()
    path.mkdir()
    os.chown(path, UID, UID)
    assert read_user_file(str(home), UID) is None


def test_only_the_first_bytes_are_read(home):
    write_user_file(home, "#" * MAX_USER_FILE + "\nfixed:toolate\n")
    assert read_user_file(str(home), UID) is None
    write_user_file(home, "fixed:early\n" + "#" * (MAX_USER_FILE * 4))
    assert read_user_file(str(home), UID) == "fixed:early"


# ---- the [identd] config table ---------------------------------------------------------

def load_text(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "socksd.toml"
    path.write_text(text)
    return config.load(str(path))


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(config.ConfigError) as info:
        load_text(tmp_path, text)
    return str(info.value)


def test_no_identd_table(tmp_path):
    assert load_text(tmp_path, "[server]\n").identd is None


def test_empty_identd_table_gives_the_defaults(tmp_path):
    identd = load_text(tmp_path, "[identd]\n").identd
    assert identd.enabled is False
    assert identd.listen == ("tcp:113",)
    assert identd.limits == IdentdLimits()
    assert identd.limits.idle_timeout == 60.0 and identd.limits.max_line == 1000
    policy = identd.policy
    assert policy.reply == "name" and policy.proxied_reply == "name"
    assert policy.hide == frozenset({"root"})
    assert policy.opsys == "UNIX" and policy.charset is None
    assert policy.unknown_error_only is False and policy.proxied_users is True
    assert policy.users == {} and policy.user_files == frozenset()
    assert IdentdConfig().listen == ("tcp:113",)


def test_every_identd_key(tmp_path):
    identd = load_text(tmp_path, """
[identd]
enabled = false
listen = ["tcp:0:interface=127.0.0.1", "tcp6:0:interface=\\\\:\\\\:1"]
hide = []
reply = "fixed:guest"
user_files = ["alice", "bob"]
opsys = "OTHER"
charset = "UTF-8"
unknown_error_only = true
hash_key = "s3cret"
proxied_users = false
proxied_reply = "hashed"
idle_timeout = 12.5
max_line = 200
max_connections = 50
max_connections_per_client = 3

[identd.users]
alice = "uid"
bob = "hidden"
"carol.x" = "fixed:c"
""").identd
    assert identd.enabled is False
    assert identd.listen == ("tcp:0:interface=127.0.0.1", "tcp6:0:interface=\\:\\:1")
    policy = identd.policy
    assert policy.hide == frozenset()
    assert policy.reply == "fixed:guest"
    assert policy.users == {"alice": "uid", "bob": "hidden", "carol.x": "fixed:c"}
    assert policy.user_files == frozenset({"alice", "bob"})
    assert policy.opsys == "OTHER" and policy.charset == "UTF-8"
    assert policy.unknown_error_only is True
    assert policy.hash_key == b"s3cret"
    assert policy.proxied_users is False and policy.proxied_reply == "hashed"
    assert identd.limits == IdentdLimits(idle_timeout=12.5, max_line=200, max_connections=50,
                                         max_connections_per_client=3)
    # The configured hash key makes hashed tokens reproducible across restarts.
    again = IdentPolicy(reply="hashed", hash_key=b"s3cret").answer("alice", 1, None)
    assert policy.apply("hashed", "alice", 1, "t").user == again.user


def test_users_inline_table(tmp_path):
    identd = load_text(tmp_path, '[identd]\nusers = { alice = "random", root = "name" }\n'
                                 'hide = ["bob"]\n').identd
    assert identd.policy.users == {"alice": "random", "root": "name"}
    assert identd.policy.hide == frozenset({"bob"})


def test_idle_timeout_zero_means_never(tmp_path):
    assert load_text(tmp_path, "[identd]\nidle_timeout = 0\n").identd.limits.idle_timeout == 0


@pytest.mark.parametrize("line,key", [
    ('enabled = "yes"', "enabled"),
    ('listen = "tcp:113"', "listen"),
    ("listen = []", "listen"),
    ('listen = ["nosuchendpoint:113"]', "listen"),
    ('listen = ["tcp:notaport"]', "listen"),
    ("listen = [113]", "listen"),
    ('hide = "root"', "hide"),
    ("hide = [0]", "hide"),
    ('reply = "bogus"', "reply"),
    ('reply = "fixed:two words"', "reply"),
    ("reply = 1", "reply"),
    ('users = "alice"', "users"),
    ("users = { alice = 1 }", "users"),
    ('user_files = "alice"', "user_files"),
    ('opsys = "UN:IX"', "opsys"),
    ('opsys = "UNIX,UTF-8"', "opsys"),
    ('opsys = ""', "opsys"),
    ('opsys = "HAS SPACE"', "opsys"),
    ("opsys = 1", "opsys"),
    ('charset = "no-such-charset-x"', "charset"),
    ("charset = 8", "charset"),
    ("unknown_error_only = 1", "unknown_error_only"),
    ('unknown_error_only = "true"', "unknown_error_only"),
    ("hash_key = 12", "hash_key"),
    ('proxied_users = "yes"', "proxied_users"),
    ('proxied_reply = "bogus"', "proxied_reply"),
    ('proxied_reply = "fixed:"', "proxied_reply"),
    ("idle_timeout = -1", "idle_timeout"),
    ('idle_timeout = "60"', "idle_timeout"),
    ("idle_timeout = true", "idle_timeout"),
    ("max_line = 0", "max_line"),
    ("max_line = 10.5", "max_line"),
    ('max_line = "1000"', "max_line"),
    ("max_connections = 0", "max_connections"),
    ("max_connections = -3", "max_connections"),
    ("max_connections_per_client = 0", "max_connections_per_client"),
    ("max_connections_per_client = false", "max_connections_per_client"),
    ("proxied_wait = -1", "proxied_wait"),
    ("proxied_wait = 600", "proxied_wait"),
    ('proxied_wait = "0.5"', "proxied_wait"),
    ("no_such_key = 1", "no_such_key"),
])
def test_bad_identd_values_name_the_key(tmp_path, line, key):
    message = error_of(tmp_path, f'[server]\nlisten = ["tcp:1080"]\n\n[identd]\n{line}\n')
    assert f"identd.{key}" in message, message
    path = str(tmp_path / "socksd.toml")
    assert message.startswith(f"{path}:5:"), message      # the file and the line
    assert "Traceback" not in message


@pytest.mark.parametrize("text, line", [
    ('[identd]\n\n[identd.users]\nalice = "name"\nbob = "sometimes"\n', 5),
    ('[identd]\nusers = {alice = "name", bob = "sometimes"}\n', 2),   # inline table
])
def test_bad_per_user_mode_names_the_user(tmp_path, text, line):
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'socksd.toml'}:{line}: identd.users.bob: "), message
    assert "sometimes" in message


def test_identd_must_be_a_table(tmp_path):
    message = error_of(tmp_path, "identd = 5\n")
    assert "identd" in message and "table" in message, message
