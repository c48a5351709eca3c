"""The checker plugin the README points to (examples/plugins): loaded by a
real twistd through --auth and the config, as a user would install it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TWISTD
from test_auth_integration import assert_login_refused, assert_login_works

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "plugins"
TOOL = EXAMPLE / "twisted" / "plugins" / "socksd_sqlite_checker.py"

pytestmark = pytest.mark.integration


def add_user(database: Path, name: str, password: str) -> None:
    """The example's own tool, run as the README says."""
    done = subprocess.run([sys.executable, str(TOOL), str(database), name],
                          input=password + "\n", capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_the_plugin_directory_is_laid_out_as_twisted_finds_it():
    assert TOOL.exists()
    assert not (EXAMPLE / "twisted" / "__init__.py").exists()
    assert not (EXAMPLE / "twisted" / "plugins" / "__init__.py").exists()


@pytest.mark.parametrize("where", ["--auth", "config"])
def test_the_example_checker_serves_logins(socks_server, http_server, tmp_path, where):
    database = tmp_path / "users.db"
    add_user(database, "alice", "wonder-land")
    env = {"PYTHONPATH": str(EXAMPLE)}
    if where == "--auth":
        server = socks_server(None, "--auth", f"sqlite:{database}", env=env)
    else:
        server = socks_server(f'[server]\nmethods = ["userpass"]\n'
                              f'checkers = ["sqlite:{database}"]\n', env=env)
    assert_login_works(server, "alice", "wonder-land", http_server, tmp_path)
    assert_login_refused(server, "alice", "wonderland", http_server, tmp_path)
    assert_login_refused(server, "bob", "wonder-land", http_server, tmp_path)
    # A new password counts from the next login, without a restart.
    add_user(database, "alice", "looking-glass")
    assert_login_refused(server, "alice", "wonder-land", http_server, tmp_path)
    assert_login_works(server, "alice", "looking-glass", http_server, tmp_path)


def test_help_auth_lists_it_and_a_missing_database_is_one_line(tmp_path):
    env = {"PYTHONPATH": str(EXAMPLE)}
    listed = subprocess.run([TWISTD, "socks", "--help-auth"], capture_output=True, text=True,
                            timeout=30, cwd=tmp_path, env={**os.environ, **env})
    assert "sqlite" in listed.stdout + listed.stderr
    missing = subprocess.run([TWISTD, "-n", "--pidfile=", "socks", "--auth",
                              f"sqlite:{tmp_path / 'none.db'}", "--check"],
                             capture_output=True, text=True, timeout=30, cwd=tmp_path,
                             env={**os.environ, **env})
    assert missing.returncode != 0
    assert "Traceback" not in missing.stdout + missing.stderr
    assert "none.db" in missing.stderr or "database" in missing.stderr, missing.stderr
