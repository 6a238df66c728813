"""Shared test set-up: a tiny valid study and its TOML text, one-thread torch, user packages,
an independent numpy quadrature for the mean-field tests.

Test modules import the helpers by name (``from conftest import TINY_STUDY, study_toml``):
pytest puts this folder on ``sys.path``.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

USER_PACKAGES = ("userpkg",)  # packages tests write into tmp_path and import by name

TINY_STUDY: dict[str, Any] = {  # valid, and runs its two configs in well under a second
    "name": "tiny",
    "source": {"file": "002_2f5fb56b234155bd.txt", "lines": "850-1350"},
    "net": {"name": "mlp", "in_dim": 8, "width": 8, "depth": 2, "out_dim": 2},
    "init": {"name": "xavier"},
    "data": {"name": "gaussian", "n": 16, "dim": 8, "classes": 2},
    "sweep": {"net.activation": ["tanh", "relu"]},
    "run": {"seeds": [0]},
}


# E[f(z)], z standard normal, as NORMAL_W @ f(NORMAL_Z): the trapezoid rule with step 0.1 on
# |z| <= 9, in numpy alone (the mean-field tests' reference, independent of flowscope's
# Gauss-Hermite quadrature); each test bounds the rule's error for its own integrands
NORMAL_Z = np.arange(-90, 91) / 10
NORMAL_W = 0.1 * np.exp(-(NORMAL_Z**2) / 2) / math.sqrt(2 * math.pi)


def bisect(g: Callable[[float], float], a: float, b: float) -> float:
    """The root of ``g`` in the bracket [a, b] after 60 halvings (to float rounding)."""
    ga = g(a)
    assert ga * g(b) < 0  # a bracket
    for _ in range(60):
        m = (a + b) / 2
        a, b = (m, b) if (g(m) > 0) == (ga > 0) else (a, m)
    return (a + b) / 2


def study_toml(study: Mapping[str, Any]) -> str:
    """A study table as the TOML text a user writes: its plain keys first, then one
    ``[table]`` per section (``key = value`` lines), then one ``[[claim]]`` per claim.

    Example:
        >>> print(study_toml({"name": "x", "sweep": {"net.depth": [1, 2]}}), end="")
        name = "x"
        <BLANKLINE>
        [sweep]
        "net.depth" = [1, 2]
    """
    plain = {k: v for k, v in study.items() if not isinstance(v, Mapping) and k != "claim"}
    lines = _assignments(plain)
    for name, table in study.items():
        if isinstance(table, Mapping):
            lines += ["", f"[{name}]", *_assignments(table)]
    for claim in study.get("claim", []):
        lines += ["", "[[claim]]", *_assignments(claim)]
    return "\n".join(lines).lstrip("\n") + "\n"


def _assignments(table: Mapping[str, Any]) -> list[str]:
    return [f"{_key(key)} = {_value(value)}" for key, value in table.items()]


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _value(value: Any) -> str:
    """TOML reads JSON's strings, numbers, booleans and lists the same; tables are inline."""
    if isinstance(value, Mapping):
        return "{ " + ", ".join(_assignments(value)) + " }" if value else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return json.dumps(value)


@pytest.fixture
def write_study(tmp_path: Path) -> Callable[..., Path]:
    """``write_study(study=TINY_STUDY, name="study.toml")``: the study (a table, or TOML
    text) written into ``tmp_path``; returns the file's path."""

    def write(study: Mapping[str, Any] | str = TINY_STUDY, name: str = "study.toml") -> Path:
        path = tmp_path / name
        path.write_text(study if isinstance(study, str) else study_toml(study))
        return path

    return write


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Small tensors: one intra-op thread is faster and immune to a busy machine. Use it for a
    whole module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _forget_user_packages() -> Iterator[None]:
    """Each test imports its own tmp_path ``userpkg``: never one cached by an earlier test."""
    importlib.invalidate_caches()
    yield
    for name in [n for n in sys.modules if n.split(".")[0] in USER_PACKAGES]:
        del sys.modules[name]


@pytest.fixture(scope="session")
def compare_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two streamed training runs, healthy and with an exploding layer (test_compare's
    ``_train``), trained once for the comparison tests and the browser check."""
    from test_compare import _train

    root = tmp_path_factory.mktemp("compare-runs")
    return _train(root / "healthy", False), _train(root / "blown", True)
