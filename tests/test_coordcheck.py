"""The μP coordinate check: slopes against a plain training loop recomputed here, μP's
learning rates checked on Adam's first step, SP's blow-up and μP's flat lines on an MLP, and
the command's exit codes and errors."""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from flowscope.cli.main import main
from flowscope.core.errors import FlowscopeError
from flowscope.doctor.coordcheck import coord_check
from flowscope.models.mup import apply_parametrization, param_groups, roles

WIDTHS = [32, 64, 128, 256]


def mlp(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4)
    )


@pytest.fixture(scope="module")
def checks():
    return {
        p: coord_check(mlp, WIDTHS, input_shape=(16,), batch=32, steps=3, parametrization=p)
        for p in ("sp", "mup")
    }


def test_sizes_are_those_of_a_plain_training_loop(checks):
    """Recompute one width's run without flowscope: the same seeds, Adam, the MSE loss."""
    width = 64
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, generator=gen)
    torch.manual_seed(0)
    model = mlp(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = None
    expected = []
    for step in range(4):
        hidden = model[:4](x)
        out = model[4](hidden)
        if target is None:
            target = torch.randn(out.shape, generator=gen)
        expected.append(
            (
                step,
                float(hidden.detach().double().pow(2).mean().sqrt()),
                float(out.detach().double().pow(2).mean().sqrt()),
            )
        )
        if step == 3:
            break
        nn.functional.mse_loss(out, target).backward()
        opt.step()
        opt.zero_grad()
    sizes = checks["sp"].sizes
    got = sizes[sizes.width == width].pivot(index="step", columns="layer", values="size")
    for step, hidden_rms, out_rms in expected:
        assert got.loc[step, "3"] == pytest.approx(hidden_rms, rel=1e-5)
        assert got.loc[step, "4"] == pytest.approx(out_rms, rel=1e-5)


def test_slopes_are_log_log_fits(checks):
    sizes, slopes = checks["sp"].sizes, checks["sp"].slopes
    one = sizes[(sizes.layer == "4") & (sizes.step == 1)].sort_values("width")
    fit = np.polyfit(np.log(one.width), np.log(one["size"]), 1)[0]
    assert slopes.set_index(["layer", "step"]).slope[("4", 1)] == pytest.approx(fit)
    assert sorted(slopes.step.unique()) == [0, 1, 2, 3]


def test_sp_output_blows_up_with_width_and_mup_stays_flat(checks):
    sp = checks["sp"].slopes.set_index(["layer", "step"]).slope
    # at init the standard parametrization is width-stable (fan-in init) ...
    assert abs(sp[("4", 0)]) < 0.2
    # ... and after one Adam step the readout grows about linearly with width (TP5, Fig. 5:
    # slope 1 in the limit; 0.99 at these widths)
    assert sp[("4", 1)] > 0.7
    assert not checks["sp"].ok and "4" in set(checks["sp"].unstable.layer)
    mup = checks["mup"].slopes
    late = mup[mup.step >= 1]
    hidden = late[late.layer != "4"]
    assert hidden.slope.abs().max() < 0.15, hidden  # width-stable features
    # the readout: nothing grows with width; its init part, scaled by 1/m, shrinks with width
    # and the O(1) part the updates add takes over step by step (-0.46, -0.25, -0.17 here)
    readout = late[late.layer == "4"].sort_values("step").slope.to_numpy()
    assert readout.max() < 0.3 and (np.diff(readout) > 0).all(), readout
    assert checks["mup"].ok
    assert "OK: every layer's slope <= 0.5" in checks["mup"].summary()


def test_mup_learning_rates_on_adams_first_step():
    """Adam's first update is lr * sign(grad) per element: the group lr is read off it."""
    torch.manual_seed(0)
    width_mult = 4.0
    model = mlp(128)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_parametrization(model, "mup", width_mult)
    readout = model[4].weight.detach()
    torch.testing.assert_close(readout, before["4.weight"] / width_mult, rtol=0, atol=0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = param_groups(model, lr=0.01, parametrization="mup", width_mult=width_mult)
    opt = torch.optim.Adam(groups, eps=1e-30)  # the first step: exactly lr * sign(grad)
    model(torch.randn(8, 16)).pow(2).mean().backward()
    opt.step()
    expected = {"input": 0.01, "hidden": 0.0025, "output": 0.0025, "vector": 0.01}
    for name, p in model.named_parameters():
        step = (p.detach() - start[name]).abs()
        moved = step[step > 0]
        lr = expected[roles(model)[name]]
        np.testing.assert_allclose(moved.numpy(), lr, rtol=1e-3, err_msg=name)


def test_bad_inputs_are_named():
    with pytest.raises(FlowscopeError, match=r"widths=\[64\]: allowed: two or more"):
        coord_check(mlp, [64], input_shape=(16,))
    with pytest.raises(FlowscopeError, match=r"optimizer='sgd' with μP: allowed: adam"):
        coord_check(mlp, WIDTHS, input_shape=(16,), optimizer="sgd", parametrization="mup")
    with pytest.raises(FlowscopeError, match=r"parametrization 'ntk'"):
        coord_check(mlp, WIDTHS, input_shape=(16,), parametrization="ntk")
    with pytest.raises(FlowscopeError, match=r"returned a str, not a torch.nn.Module"):
        coord_check(lambda w: "model", WIDTHS, input_shape=(16,))
    with pytest.raises(FlowscopeError, match=r"the output's shape changes with the width"):
        coord_check(lambda w: nn.Linear(16, w), WIDTHS, input_shape=(16,))
    with pytest.raises(FlowscopeError, match=r"factory\(width=32\) failed: TypeError"):
        coord_check(lambda: nn.Linear(16, 4), WIDTHS, input_shape=(16,))  # no width argument
    with pytest.raises(FlowscopeError, match=r"failed on inputs of shape \(64, 3\)"):
        coord_check(mlp, WIDTHS, input_shape=(3,))
    with pytest.raises(FlowscopeError, match=r"has 1 Linear/Conv layer"):
        roles(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "cc_models.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def make(width):
                return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width),
                                     nn.ReLU(), nn.Linear(width, 4))

            def grows(width):
                return nn.Linear(16, width)
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_command_exit_codes_and_files(factories):
    runner = CliRunner()
    args = ["coord-check", "cc_models:make", "--widths", "32,64,128", "--steps", "2"]
    sp = runner.invoke(main, [*args, "--input-shape", "32,16", "--out", "out"])
    assert sp.exit_code == 1, sp.output
    assert "UNSTABLE" in sp.output
    slopes = pd.read_csv(factories / "out" / "slopes.csv", dtype={"layer": str})
    assert set(slopes.columns) == {"layer", "step", "slope"} and len(slopes) == 5 * 3
    assert (factories / "out" / "coord_check.png").stat().st_size > 0
    mup = runner.invoke(main, [*args, "--input-shape", "32,16", "--mup"])
    assert mup.exit_code == 0, mup.output
    assert "coordinate check (mup), widths 32, 64, 128" in mup.output


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--widths", "64,x"], 2, "Invalid value for '--widths': '64,x': allowed: two or more"),
        (["--widths", "64,64"], 2, "'64,64' repeats a width"),
        (["--input-shape", "16"], 2, "allowed: batch first and at least one more size"),
        (["--optimizer", "sgd", "--mup"], 2, "--mup needs --optimizer adam"),
        (["--device", "nosuchdev"], 2, "'nosuchdev' is not a torch device; use cpu, cuda"),
        (["--steps", "0"], 2, "Invalid value for '--steps'"),
    ],
)
def test_command_usage_errors(factories, extra, code, message):
    args = ["coord-check", "cc_models:make", "--input-shape", "8,16", *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_command_wrong_factory_is_one_error_line(factories):
    result = CliRunner().invoke(main, ["coord-check", "cc_models:grows", "--input-shape", "8,16"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [
        "Error: the output's shape changes with the width: (8, 64) at width 64, (8, 128) at "
        "width 128; allowed: a factory whose width changes the hidden layers only"
    ]
