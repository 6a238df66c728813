"""The doctor's text, compared in full with the expected files in tests/golden/.

Any change of wording, number formatting or layout shows as a unified diff. When the change
is meant, rewrite the expected files and read the diff in review:

    FLOWSCOPE_UPDATE_GOLDEN=1 python -m pytest tests/test_doctor_golden.py

The per-layer table pads its last column, so some expected lines end in spaces: an editor
that strips trailing whitespace breaks them (the failure then says so).
"""

from __future__ import annotations

import difflib
import math
import os
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from flowscope.cli.doctor_cmd import doctor_cmd
from flowscope.doctor import diagnose, format_diagnosis

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("FLOWSCOPE_UPDATE_GOLDEN") == "1"


def assert_golden(name: str, actual: str) -> None:
    """``actual`` equals tests/golden/``name``; with FLOWSCOPE_UPDATE_GOLDEN=1, becomes it."""
    path = GOLDEN / name
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(actual, encoding="utf-8", newline="\n")
        return
    if not path.is_file():
        pytest.fail(f"{path} is missing; write it with FLOWSCOPE_UPDATE_GOLDEN=1", pytrace=False)
    expected = path.read_text(encoding="utf-8")
    if actual == expected:
        return
    diff = "".join(
        difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            fromfile=f"tests/golden/{name}",
            tofile="actual",
        )
    )
    same_words = [s.rstrip() for s in expected.splitlines()] == [
        s.rstrip() for s in actual.splitlines()
    ]
    note = " (only trailing whitespace differs)" if same_words else ""
    pytest.fail(
        f"the output differs from tests/golden/{name}{note}; if the change is meant, rerun "
        f"with FLOWSCOPE_UPDATE_GOLDEN=1\n{diff}",
        pytrace=False,
    )


# -- format_diagnosis on stats frames built from fixed numbers ----------------------------------

WIDTH, BATCH = 16, 64  # units per layer, samples per batch


def stat_row(layer: int, name: str, mtype: str, kind: str, rms: float, **extra: object) -> dict:
    """One row of a stats frame (the columns diagnose reads), all values finite by default."""
    count = WIDTH * WIDTH if kind == "weight" else BATCH * WIDTH
    row = {
        "step": 0,
        "layer_idx": layer,
        "layer": name,
        "module_type": mtype,
        "kind": kind,
        "tensor": "weight" if kind == "weight" else "",
        "count": count,
        "nan": 0,
        "inf": 0,
        "rms": rms,
        "std": rms,
        "frac_zero": 0.0,
        "frac_saturated": 0.0,
    }
    row.update(extra)
    return row


# rms of an activation module's output for a Linear output of rms a (the tidy numbers a
# net of width 16 would give: the next Linear's output is about 4 * weight std * this)
OUTPUT_RMS = {"Tanh": math.tanh, "ReLU": lambda a: a / math.sqrt(2)}


def mlp_stats(
    activation: str,
    act: list[float],
    grad: list[float],
    *,
    weight_std: float,
    saturated: float | list[float] = 0.0,
    zeros: float | list[float] = 0.0,
    nan_from: int | None = None,
    **keys: object,
) -> pd.DataFrame:
    """Linear -> activation blocks (``layers.i.linear``, ``layers.i.act``) with the given rms
    of each Linear output (``act``) and of dL/d(that output) (``grad``). From block
    ``nan_from`` on, activations are NaN, and so is every gradient."""
    n = len(act)
    sat = saturated if isinstance(saturated, list) else [saturated] * n
    zero = zeros if isinstance(zeros, list) else [zeros] * n
    rows = []
    for i in range(n):
        lin, out = f"layers.{i}.linear", f"layers.{i}.act"
        a, g = act[i], grad[i]
        a_nan, g_nan = {}, {}
        if nan_from is not None:  # every value NaN: rms over no finite values
            g, g_nan = math.nan, {"nan": BATCH * WIDTH}
            if i >= nan_from:
                a, a_nan = math.nan, {"nan": BATCH * WIDTH}
        rows += [
            stat_row(2 * i, lin, "Linear", "weight", weight_std),
            stat_row(2 * i, lin, "Linear", "activation", a, **a_nan),
            stat_row(2 * i, lin, "Linear", "gradient", g, **g_nan),
            stat_row(2 * i + 1, out, activation, "activation", OUTPUT_RMS[activation](a),
                     frac_zero=zero[i], frac_saturated=sat[i], **a_nan),
            stat_row(2 * i + 1, out, activation, "gradient", 1.2 * g, **g_nan),
        ]  # fmt: skip
    frame = pd.DataFrame(rows)
    for i, (col, value) in enumerate({"run": "net", **keys}.items()):
        frame.insert(i, col, value)
    return frame


def healthy() -> pd.DataFrame:
    return mlp_stats(
        "Tanh", [1.0, 0.97, 0.95, 0.94, 0.93], [0.08, 0.086, 0.09, 0.095, 0.1],
        weight_std=0.3, saturated=0.02,
    )  # fmt: skip


def vanishing(act: tuple[float, ...] = (0.5, 0.12, 0.03, 0.008, 0.002)) -> pd.DataFrame:
    return mlp_stats("Tanh", list(act), [1e-6, 4e-5, 1e-3, 0.02, 0.1], weight_std=0.06)


def exploding() -> pd.DataFrame:
    return mlp_stats(
        "ReLU", [4.0, 8.5, 18.0, 38.0, 81.0], [0.4, 0.19, 0.09, 0.042, 0.02],
        weight_std=0.75, zeros=0.5,
    )  # fmt: skip


def saturated() -> pd.DataFrame:
    return mlp_stats(
        "Tanh", [3.0, 3.98, 3.99, 3.99, 3.99], [0.02, 0.025, 0.03, 0.04, 0.05],
        weight_std=1.0, saturated=[0.8, 0.85, 0.85, 0.85, 0.85],
    )  # fmt: skip


def nonfinite() -> pd.DataFrame:
    return mlp_stats(
        "ReLU", [1.4, 1.4, 1.38, 1.4, 1.4], [0.1] * 5, weight_std=0.35, zeros=0.5, nan_from=3
    )


def dead() -> pd.DataFrame:
    return mlp_stats(
        "ReLU", [1.4, 1.4, 1.35, 1.3, 1.3], [0.1, 0.1, 0.11, 0.11, 0.12],
        weight_std=0.35, zeros=[0.5, 0.6, 0.55, 0.95, 0.5],
    )  # fmt: skip


# per-unit counts (DeadUnits.frame()) for the dead case: layers.1.act has 7 of 16 units
# dead; layers.3.act is not counted (its zero share bounds it); layers.4.act saw too few samples
DEAD_UNITS = pd.DataFrame(
    {
        "layer": ["layers.0.act", "layers.1.act", "layers.2.act", "layers.4.act"],
        "module_type": ["ReLU"] * 4,
        "units": [16, 16, 16, 16],
        "dead": [1, 7, 0, 2],
        "samples": [64, 64, 64, 8],
    }
)


def study() -> pd.DataFrame:
    """Four configurations of a study, grouped by (config, seed): no per-layer tables."""
    parts = [
        vanishing().assign(config="tanh-small", seed=0),
        vanishing(act=(0.6, 0.16, 0.05, 0.014, 0.004)).assign(config="tanh-small", seed=1),
        healthy().assign(config="tanh-xavier", seed=0),
        exploding().assign(config="relu-large", seed=0),
    ]
    return pd.concat(parts, ignore_index=True)


# name: (stats frame, diagnose's keyword arguments, the verdicts of its runs)
TEXT_CASES = {
    "healthy": (healthy, {}, ["healthy"]),
    "vanishing": (vanishing, {}, ["vanishing"]),
    "exploding": (exploding, {}, ["exploding"]),
    "saturated": (saturated, {}, ["saturated"]),
    "dead": (dead, {"dead": DEAD_UNITS}, ["dead"]),
    "nonfinite": (nonfinite, {}, ["non-finite"]),
    "study": (study, {"by": ["config", "seed"]},
              ["exploding", "vanishing", "vanishing", "healthy"]),
}  # fmt: skip


@pytest.mark.parametrize("case", TEXT_CASES)
def test_format_diagnosis_matches_golden(case):
    build, kwargs, verdicts = TEXT_CASES[case]
    d = diagnose(build(), **kwargs)
    assert d.runs["verdict"].tolist() == verdicts  # the case shows what its name says
    assert_golden(f"doctor_text_{case}.txt", format_diagnosis(d) + "\n")


# -- `flowscope doctor` on a model from a user's package ----------------------------------------

FACTORIES = textwrap.dedent(
    '''
    """Factories for the doctor's golden output: fixed seeds, one thread."""
    import torch
    from torch import nn


    def plain_mlp():
        """Six Linear(32, 32) + Tanh with PyTorch's default init: the signal shrinks."""
        torch.manual_seed(0)
        layers = []
        for _ in range(6):
            layers += [nn.Linear(32, 32), nn.Tanh()]
        return nn.Sequential(*layers, nn.Linear(32, 4))


    def he_mlp():
        """Six Linear(32, 32) + ReLU with He init and zero biases: healthy."""
        torch.manual_seed(0)
        layers = []
        for _ in range(6):
            linear = nn.Linear(32, 32)
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(32, 4))
    '''
)


@pytest.fixture
def one_thread():
    """One intra-op thread: the sums, and so the printed digits, do not depend on the machine's
    core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def factories(tmp_path, monkeypatch, one_thread):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)  # records go to tmp_path/reports
    return tmp_path


CLI_CASES = {
    "vanishing_fix_xavier": (["userpkg.models:plain_mlp", "--input-shape", "64,32",
                              "--fix", "xavier"], 1),
    "healthy": (["userpkg.models:he_mlp", "--input-shape", "64,32"], 0),
}  # fmt: skip


@pytest.mark.parametrize("case", CLI_CASES)
def test_doctor_command_matches_golden(factories, case):
    args, exit_code = CLI_CASES[case]
    result = CliRunner().invoke(doctor_cmd, args, catch_exceptions=False)
    transcript = f"$ flowscope doctor {' '.join(args)}\n{result.output}[exit {result.exit_code}]\n"
    assert_golden(f"doctor_cli_{case}.txt", transcript)
    assert result.exit_code == exit_code
