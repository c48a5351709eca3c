"""Small helpers shared by test modules (no fixtures here: see conftest.py)."""

from __future__ import annotations

from socksd.wire.names import normalize_name


def normalizes(name: str) -> bool:
    """Does socksd take ``name`` as a domain name (socksd.wire.names)?"""
    try:
        normalize_name(name)
    except ValueError:
        return False
    return True
