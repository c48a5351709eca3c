"""README.rst is the front door: it must render as reStructuredText (and
so must CHANGELOG.rst). A
table whose text runs into a column margin stops docutils (and PyPI's
renderer) with "Malformed table", and the page shows the raw markup."""

from __future__ import annotations

from pathlib import Path

import docutils.core
import docutils.utils
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["README.rst", "CHANGELOG.rst"])
def test_renders_without_warnings(name):
    path = ROOT / name
    try:
        docutils.core.publish_doctree(
            path.read_text(), source_path=str(path),
            settings_overrides={"report_level": 2, "halt_level": 2, "warning_stream": False})
    except docutils.utils.SystemMessage as e:
        raise AssertionError(f"{name}: {e}") from None


def test_the_license_file_is_the_license_pyproject_names():
    import tomllib

    license = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert license == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
