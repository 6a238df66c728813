"""Run comparison (issue 17): ``flowscope compare RUN_A RUN_B`` and ``fs.compare`` on two
small training runs, one healthy and one whose layer '4' is made to explode at a known step."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import flowscope as fs
from flowscope.cli.main import main
from flowscope.core.errors import FlowscopeError
from flowscope.doctor.runcompare import RunComparison

STEPS, BLOW_STEP, BLOWN = 12, 5, 4  # Linear '4''s weight x1000 before step 5's forward


def _train(out: Path, blow: bool) -> Path:
    torch.manual_seed(0)
    layers = [m for _ in range(3) for m in (nn.Linear(8, 8), nn.Tanh())]
    model = nn.Sequential(*layers, nn.Linear(8, 1))
    fs.reinit(model, "xavier", generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    with fs.watch(model, out=out, optimizer=opt, flush_every=4) as rec:
        for step in range(STEPS):
            if blow and step == BLOW_STEP:
                with torch.no_grad():
                    model[BLOWN].weight.mul_(1000.0)
            loss = model(torch.randn(32, 8, generator=gen)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    return out


@pytest.fixture(scope="module")
def runs(compare_runs: tuple[Path, Path]) -> tuple[Path, Path]:
    return compare_runs  # trained once per session (conftest)


def test_the_cli_flags_the_exploding_run_and_exits_1(runs, tmp_path):
    healthy, blown = runs
    result = CliRunner().invoke(main, ["compare", str(healthy), str(blown), "--out", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert f"exploding in '{BLOWN}' (Linear) from step {BLOW_STEP}, persists" in result.stdout
    assert (tmp_path / "compare.html").is_file()
    assert f"page: {tmp_path / 'compare.html'}" in result.stdout
    page = (tmp_path / "compare.html").read_text()
    for kind in ("activation", "gradient", "update_ratio"):  # both runs had an optimizer
        assert f'id="steps-{kind}"' in page


def test_swapped_the_healthy_run_adds_no_problem_and_exits_0(runs, tmp_path):
    healthy, blown = runs
    result = CliRunner().invoke(main, ["compare", str(blown), str(healthy), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "no problem in B that A does not have" in result.stdout
    assert "in A, gone in B" in result.stdout


def test_the_layers_side_by_side_against_the_stats(runs):
    healthy, blown = runs
    c = fs.compare(healthy, blown)
    assert isinstance(c, RunComparison) and not c.ok()
    row = c.new[(c.new.layer == str(BLOWN)) & (c.new.check == "act_scale")].iloc[0]
    assert row.problem == "exploding" and row.first_step == BLOW_STEP
    # the B/A activation rms ratio of each Linear, from the two stats frames directly
    last = [fs.load(r).stats.query(f"kind == 'activation' and step == {STEPS - 1}") for r in runs]
    rms = [s.set_index("layer")["rms"] for s in last]
    layers = c.layers.set_index("layer")
    for name in ("0", "2", "4", "6"):
        assert layers.loc[name, "act_ratio"] == pytest.approx(rms[1][name] / rms[0][name])
    assert "activation rms x" in layers.loc[str(BLOWN), "differs"]
    assert layers.loc["0", "differs"] == ""  # the first layer is untouched: same inputs, ~same W


def test_records_and_loss_overlay(runs):
    healthy, blown = runs
    c = fs.compare(fs.load(healthy), fs.load(blown))
    losses = c.scalars[c.scalars.name == "loss"]
    # records in memory are named by their model; the same name twice becomes "A: ", "B: "
    a, b = "A: Sequential", "B: Sequential"
    assert c.names == (a, b) and losses.groupby("run").size().to_dict() == {a: STEPS, b: STEPS}
    first = losses.groupby("run")["value"].first()
    assert first[a] == pytest.approx(first[b])  # the same seed until the blow-up


def test_two_diagnoses_keep_the_old_behaviour(runs):
    healthy, blown = runs
    before, after = fs.diagnose(healthy), fs.diagnose(blown)
    frame = fs.compare(before, after)
    assert isinstance(frame, pd.DataFrame)
    verdict = frame[frame.measure == "verdict"]
    assert verdict["before"].item() == "healthy" and "exploding" in verdict["after"].item()
    with pytest.raises(FlowscopeError, match="two Diagnosis objects or two runs"):
        fs.compare(before, blown)


@pytest.mark.parametrize(
    ("which", "message"),
    [("missing", "does not exist"), ("empty", "not a flowscope"), ("file", "is not a folder")],
)
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, which, message):
    bad = {"missing": tmp_path / "nope", "empty": tmp_path, "file": tmp_path / "f.txt"}[which]
    (tmp_path / "f.txt").write_text("x")
    result = CliRunner().invoke(main, ["compare", str(bad), str(runs[0])])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, FlowscopeError)
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "RUN_A" in error[0]


def test_factor_is_checked():
    for bad in (0.5, 1, float("inf"), True):
        with pytest.raises(FlowscopeError, match="factor"):
            fs.compare(pd.DataFrame(), pd.DataFrame(), factor=bad)
