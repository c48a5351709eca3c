"""README.rst is the front door: it must render as reStructuredText. A
table whose text runs into a column margin stops docutils (and PyPI's
renderer) with "Malformed table", and the page shows the raw markup."""

from __future__ import annotations

from pathlib import Path

import docutils.core
import docutils.utils

README = Path(__file__).resolve().parent.parent / "README.rst"


def test_readme_renders_without_warnings():
    try:
        docutils.core.publish_doctree(
            README.read_text(), source_path=str(README),
            settings_overrides={"report_level": 2, "halt_level": 2, "warning_stream": False})
    except docutils.utils.SystemMessage as e:
        raise AssertionError(f"README.rst: {e}") from None
