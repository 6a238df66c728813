"""The verdict timeline (issue 17): the doctor over the steps of a training run, and when and
where each problem began. The faults are injected at known steps into known layers; the
per-step checks are compared with ``diagnose(step=s)`` run on each step on its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import flowscope as fs
from flowscope.core.errors import FlowscopeError
from flowscope.doctor.timeline import step_checks, timeline

STEPS = 24
DEAD_STEP, DEAD_LINEAR, DEAD_RELU = 7, 2, "3"  # bias of Linear '2' -> its ReLU '3' dies
NAN_STEP, NAN_LINEAR = 16, 6  # a NaN in Linear '6''s weight: its output is the first NaN


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [nn.Linear(12 if i else 8, 12), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(12, 1))
    fs.reinit(model, "he", generator=torch.Generator().manual_seed(0))  # healthy at first
    return model


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder: healthy, then a dead layer from DEAD_STEP, then NaN from NAN_STEP."""
    out = tmp_path_factory.mktemp("timeline") / "run"
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    with fs.watch(model, out=out, optimizer=opt, flush_every=5) as rec:
        for step in range(STEPS):
            with torch.no_grad():
                if step == DEAD_STEP:
                    model[DEAD_LINEAR].bias.fill_(-100.0)
                if step == NAN_STEP:
                    model[NAN_LINEAR].weight[0, 0] = float("nan")
            loss = model(torch.randn(64, 8, generator=gen)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    return out


def _first_nan_output(model: nn.Sequential, x: torch.Tensor) -> str:
    """The first module of the forward pass whose output holds a NaN (run child by child)."""
    seen: list[str] = []
    for name, module in model.named_children():
        x = module(x)
        if torch.isnan(x).any():
            seen.append(name)
    return seen[0]


def test_the_nan_is_found_at_its_step_and_in_its_layer(run: Path) -> None:
    t = timeline(run)
    rows = t.frame[t.frame["problem"] == "non-finite"]
    assert rows["first_step"].min() == NAN_STEP
    # where it began, found independently: the first module whose output is NaN
    model = _net()
    with torch.no_grad():
        model[NAN_LINEAR].weight[0, 0] = float("nan")
    origin = _first_nan_output(model, torch.randn(4, 8))
    assert origin == str(NAN_LINEAR)
    line = next(s for s in t.lines if s.startswith("non-finite"))
    assert f"first at step {NAN_STEP} in {origin!r}" in line
    assert rows["persists"].all()  # Adam/SGD spread it into every weight: it never leaves


def test_the_dead_layer_is_found_at_its_step(run: Path) -> None:
    t = timeline(run)
    dead = t.frame[t.frame["problem"] == "dead"]
    assert dead["first_step"].min() == DEAD_STEP  # later ReLUs may follow: '4' sees no input
    row = dead.set_index("layer").loc[DEAD_RELU]
    assert row["first_step"] == DEAD_STEP and row["persists"]
    assert row["value"] == 1.0  # every output exactly 0 (bias -100 against inputs of ~1)
    stats = fs.load(run).stats
    relu = stats[(stats.layer == DEAD_RELU) & (stats.kind == "activation")].set_index("step")
    assert relu.loc[DEAD_STEP - 1, "frac_zero"] < 0.9 <= relu.loc[DEAD_STEP, "frac_zero"]
    assert any(s.startswith(f"dead from step {DEAD_STEP} in '{DEAD_RELU}'") for s in t.lines)


def test_per_step_checks_equal_diagnose_at_each_step(run: Path) -> None:
    stats = fs.load(run).stats
    flags = step_checks(stats)
    cols = ["layer", "check", "verdict"]
    for step in range(STEPS):
        layers = fs.diagnose(stats, step=step).layers
        want = layers[(layers.verdict != "healthy") & (layers.check != "values")]
        got = flags[flags.step == step]
        assert sorted(map(tuple, got[cols].values)) == sorted(map(tuple, want[cols].values)), step
        merged = got.merge(want, on=cols, suffixes=("", "_doctor"))
        np.testing.assert_allclose(merged["value"], merged["value_doctor"], rtol=1e-9)
        np.testing.assert_array_equal(merged["threshold"], merged["threshold_doctor"])


def test_a_healthy_run_has_an_empty_timeline(run: Path) -> None:
    stats = fs.load(run, steps=(0, DEAD_STEP - 1)).stats
    t = timeline(stats)
    assert t.ok() and t.lines == [] and str(t) == "no problem at any recorded step"
    assert t.last_step == {"": DEAD_STEP - 1}  # keyed by the run's name ('' by default)


def test_groups_are_judged_apart(run: Path) -> None:
    stats = fs.load(run).stats
    two = pd.concat([stats.assign(run="a"), stats[stats.step < DEAD_STEP].assign(run="b")])
    t = timeline(two)
    assert set(t.frame["run"]) == {"a"} and t.last_step == {"a": STEPS - 1, "b": DEAD_STEP - 1}
    assert all(line.startswith("[a] ") for line in t.lines)


def test_bad_input_is_refused() -> None:
    with pytest.raises(FlowscopeError, match="lacks columns"):
        timeline(pd.DataFrame({"run": ["a"], "step": [0]}))
    with pytest.raises(FlowscopeError, match="run folder"):
        timeline(42)
    with pytest.raises(FlowscopeError, match="Thresholds"):
        timeline(pd.DataFrame(), thresholds=0.5)  # type: ignore[arg-type]


def test_the_report_exports_the_timeline(run: Path, tmp_path: Path) -> None:
    page = fs.report(run, tmp_path / "page")
    exported = pd.read_csv(tmp_path / "page" / "timeline.csv", keep_default_na=False)
    want = timeline(run).frame
    assert len(exported) == len(want) > 0
    assert exported["first_step"].tolist() == want["first_step"].tolist()
    assert exported["layer"].astype(str).tolist() == want["layer"].astype(str).tolist()
    assert 'href="timeline.csv"' in page.read_text()
