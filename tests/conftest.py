"""Shared test set-up."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator

import pytest

USER_PACKAGES = ("userpkg",)  # packages tests write into tmp_path and import by name


@pytest.fixture(autouse=True)
def _forget_user_packages() -> Iterator[None]:
    """Each test imports its own tmp_path ``userpkg``: never one cached by an earlier test."""
    importlib.invalidate_caches()
    yield
    for name in [n for n in sys.modules if n.split(".")[0] in USER_PACKAGES]:
        del sys.modules[name]
