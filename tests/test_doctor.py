"""The doctor's verdicts on known-bad and known-good nets, checked against plain tensor math."""

from __future__ import annotations

import math
import re
from functools import cache
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import flowscope as fs
from flowscope.core.errors import FlowscopeError
from flowscope.doctor import (
    DeadUnits,
    Diagnosis,
    Thresholds,
    compare,
    default_loss,
    diagnose,
    examine,
)
from flowscope.models.inits import apply_init
from flowscope.models.nets import build_net

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster


WIDTH = 128
LEAN = ("activation", "gradient", "weight")  # what the verdicts need (weight: for the fix)


def lecture_net(activation: str, init: str, width: int = WIDTH, depth: int = 10) -> nn.Module:
    net = build_net("mlp", activation=activation, width=width, in_dim=width, depth=depth)
    apply_init(net, init, generator=torch.Generator().manual_seed(0))
    return net


def batch(width: int = WIDTH, n: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


@cache
def lecture(activation: str, init: str, width: int = WIDTH) -> tuple[fs.Recorder, Diagnosis]:
    """One examined lecture net per configuration, shared by the tests that read it."""
    net = lecture_net(activation, init, width)
    return examine(net, batch(width), name=f"{activation}-{init}", kinds=LEAN)


def verdict_of(activation: str, init: str, width: int = WIDTH) -> tuple[str, Diagnosis]:
    d = lecture(activation, init, width)[1]
    return d.runs.loc[0, "verdict"], d


def manual(net: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """rms of each Linear output and of dL/d(that output), by retain_grad() (no flowscope)."""
    outs, h = [], x
    for block in net.layers:
        s = block.linear(h)
        s.retain_grad()
        outs.append(s)
        h = block.act(s)
    h.pow(2).mean().backward()
    act = np.array([s.detach().double().pow(2).mean().sqrt().item() for s in outs])
    grad = np.array([s.grad.double().pow(2).mean().sqrt().item() for s in outs])
    return act, grad


# -- the verdicts on the lecture's nets ---------------------------------------------------------


def test_tanh_small_init_is_vanishing_with_the_numbers_behind_it():
    verdict, d = verdict_of("tanh", "small")
    assert verdict == "vanishing"
    act, grad = manual(lecture_net("tanh", "small"), batch())
    run = d.runs.iloc[0]
    assert run["act_gain"] == pytest.approx((act[-1] / act[0]) ** (1 / 9), rel=1e-4)
    assert run["grad_ratio"] == pytest.approx(grad[0] / grad[-1], rel=1e-4)
    assert run["grad_gain"] == pytest.approx((grad[0] / grad[-1]) ** (1 / 9), rel=1e-4)
    assert run["act_gain"] == pytest.approx(0.01 * math.sqrt(WIDTH), rel=0.05)  # σ√n
    rows = d.layers.set_index(["layer", "check"])
    assert rows.loc[("layers.9.linear", "act_scale"), "verdict"] == "vanishing"
    assert rows.loc[("layers.0.linear", "grad_scale"), "value"] == pytest.approx(
        grad[0] / grad[-1], rel=1e-4
    )
    assert rows.loc[("layers.9.linear", "act_scale"), "threshold"] == 10


def test_weight_gradients_stay_flat_while_dl_dh_vanishes():
    """The lecture's trap: dL/dW_l = δ_l a_{l-1}ᵀ multiplies a shrinking δ by a growing a."""
    rec, d = examine(lecture_net("tanh", "small"), batch(), kinds=("gradient", "weight_grad"))
    wg = rec.stats.query("kind == 'weight_grad' and tensor == 'weight'").set_index("layer")
    ratio = wg.loc["layers.0.linear", "rms"] / wg.loc["layers.9.linear", "rms"]
    assert 0.2 < ratio < 5  # flat within a factor of 5 ...
    assert d.runs.loc[0, "grad_ratio"] < 1e-5  # ... while dL/dh falls by 10^5
    assert d.runs.loc[0, "verdict"] == "vanishing"


def test_relu_large_init_is_exploding():
    verdict, d = verdict_of("relu", "large")
    assert verdict == "exploding"
    assert d.runs.loc[0, "act_gain"] == pytest.approx(math.sqrt(WIDTH / 2), rel=0.15)
    assert "He" in d.runs.loc[0, "fix"] and "use std 0.125" in d.runs.loc[0, "fix"]  # √(2/128)


def test_tanh_large_init_saturates_and_gradients_explode():
    net = lecture_net("tanh", "large", width=500, depth=6)
    _, d = examine(net, batch(500, 64), kinds=LEAN)
    verdict = d.runs.loc[0, "verdict"]
    assert verdict == "exploding+saturated"
    run = d.runs.iloc[0]
    assert run["grad_gain"] == pytest.approx(3.48, rel=0.05)  # mean-field √χ at n = 500
    assert abs(math.log(run["act_gain"])) < 0.05  # the forward scale is steady ...
    assert run["saturated"] > 0.85  # ... because the units sit at ±1
    sat = d.layers.query("check == 'saturated' and layer == 'layers.4.act'").iloc[0]
    h = batch(500, 64)
    for block in net.layers[:5]:
        h = block(h)
    assert sat["value"] == pytest.approx((h.abs() >= 0.99).double().mean().item(), abs=1e-6)
    assert sat["verdict"] == "saturated"


def test_deep_sigmoid_vanishes_at_xavier_and_saturates_at_large_init():
    verdict, d = verdict_of("sigmoid", "xavier")
    assert "vanishing" in verdict.split("+")
    assert d.runs.loc[0, "grad_gain"] < 0.3  # slope <= 1/4
    assert "tanh" in d.runs.loc[0, "fix"] and "already have Xavier scale" in d.runs.loc[0, "fix"]
    verdict, _ = verdict_of("sigmoid", "large")
    assert "saturated" in verdict.split("+")


def test_relu_he_is_healthy():
    verdict, d = verdict_of("relu", "he")
    assert verdict == "healthy" and d.ok()
    run = d.runs.iloc[0]
    assert run["fix"] == ""
    assert 0.8 < run["act_gain"] < 1.2 and 0.8 < run["grad_gain"] < 1.25
    assert run["dead"] < 0.25  # measured per unit with batch 128


def test_nan_is_non_finite_and_found_where_it_starts():
    net = lecture_net("tanh", "xavier")
    with torch.no_grad():
        net.layers[3].linear.weight[0, 0] = float("nan")
    rec, d = examine(net, batch(), kinds=LEAN)
    run = d.runs.iloc[0]
    assert run["verdict"].split("+")[0] == "non-finite"
    assert run["worst_layer"] == "layers.3.linear"
    assert run["nonfinite"] > 0
    assert "layers.3.linear" in run["fix"]
    acts = rec.stats.query("kind == 'activation'").set_index("layer")
    assert acts.loc["layers.2.act", "nan"] == 0 and acts.loc["layers.3.linear", "nan"] > 0
    # the NaN flows back into every gradient, so every layer's check fires
    row = d.layers.query("check == 'non-finite' and layer == 'layers.0.linear'").iloc[0]
    assert row["verdict"] == "non-finite" and row["value"] > 0


def test_xavier_relu_is_vanishing_at_default_thresholds_and_healthy_at_looser_ones():
    rec, d = lecture("relu", "xavier")
    assert d.runs.loc[0, "verdict"] == "vanishing"
    loose = diagnose(rec, thresholds=Thresholds(act_ratio=100, grad_ratio=100))
    assert loose.runs.loc[0, "verdict"] == "healthy"
    assert "act_ratio=100" in loose.runs.loc[0, "thresholds"]


# -- dead units -----------------------------------------------------------------------------


def dead_linear(n: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU())
    with torch.no_grad():
        net[0].bias[:4] = -100.0  # four units never fire
    return net, torch.randn(n, 16, generator=torch.Generator().manual_seed(3))


def test_dead_units_are_counted_per_unit_and_judged():
    net, x = dead_linear(128)
    with DeadUnits(net) as dead:
        out = net[1](net[0](x))
        net[3](net[2](out))
    frame = dead.frame().set_index("layer")
    assert frame.loc["1", "dead"] == int((out == 0).all(0).sum()) == 4
    assert frame.loc["1", "units"] == 10 and frame.loc["1", "samples"] == 128
    _, d = examine(net, x)
    row = d.layers.query("check == 'dead_units' and layer == '1'").iloc[0]
    assert row["value"] == pytest.approx(0.4) and row["verdict"] == "dead"
    assert d.runs.loc[0, "dead"] == pytest.approx(0.4)
    assert "dead" in d.runs.loc[0, "verdict"].split("+")
    assert all(not m._forward_hooks for m in net.modules())  # hooks gone


def test_dead_channels_of_a_conv_net():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    with torch.no_grad():
        conv.bias[[1, 5, 6]] = -1e3
    net = nn.Sequential(conv, nn.ReLU(inplace=True))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with DeadUnits(net) as dead:
        y = net(x)
    row = dead.frame().iloc[0]
    assert (row["units"], row["dead"], row["samples"]) == (8, 3, 4 * 8 * 8)
    assert row["dead"] == int((y == 0).all(dim=(0, 2, 3)).sum())


def test_small_batches_fall_back_to_the_zero_share_bound():
    net, x = dead_linear(16)  # 16 samples per unit < 64
    _, d = examine(net, x)
    checks = set(d.layers.query("layer == '1'").check)
    assert "zero_share" in checks and "dead_units" not in checks
    assert math.isnan(d.runs.loc[0, "dead"])


def test_zero_share_bound_from_the_frame_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
    with torch.no_grad():
        net[0].bias.fill_(-2.0)
        net[0].weight.mul_(0.5)
    with fs.watch(net) as rec:
        net(torch.randn(64, 16)).sum().backward()
    zero = (net(torch.randn(64, 16)) == 0).double().mean().item()
    assert zero > 0.9
    d = diagnose(rec.stats)  # no model, no per-unit counts
    row = d.layers.query("check == 'zero_share'").iloc[0]
    assert row["verdict"] == "dead" and "upper bound" in row["reason"]


# -- sources, groups, steps -------------------------------------------------------------------


def test_every_source_kind_gives_the_same_runs(tmp_path):
    net = lecture_net("tanh", "small", width=64, depth=6)
    with fs.watch(net, name="small") as rec:
        (net(batch(64)) ** 2).mean().backward()
    rec.save(tmp_path / "run")
    expected = diagnose(rec.stats).runs
    for source in (rec, rec.records(), tmp_path / "run", str(tmp_path / "run")):
        runs = diagnose(source).runs
        pd.testing.assert_frame_equal(runs.drop(columns=["fix"]), expected.drop(columns=["fix"]))


def test_grouping_by_config_columns_of_a_study():
    frames = []
    for act, init in (("tanh", "small"), ("relu", "he"), ("relu", "large")):
        net = lecture_net(act, init, width=64, depth=8)
        with fs.watch(net, name="study", kinds=LEAN) as rec:
            (net(batch(64)) ** 2).mean().backward()
        frames.append(rec.stats.assign(config=f"{act}-{init}", activation=act, init=init))
    d = diagnose(pd.concat(frames, ignore_index=True), by=["config", "activation", "init"])
    verdicts = dict(zip(d.runs.config, d.runs.verdict, strict=True))
    assert verdicts == {"tanh-small": "vanishing", "relu-he": "healthy", "relu-large": "exploding"}
    assert list(d.layers.columns[:3]) == ["config", "activation", "init"]
    assert list(d.runs.columns) == [
        "config", "activation", "init", "verdict", "act_gain", "grad_gain", "grad_ratio",
        "worst_layer", "saturated", "dead", "nonfinite", "reason", "fix", "thresholds",
    ]  # fmt: skip
    assert not d.ok()
    assert "[config=tanh-small, activation=tanh, init=small] VANISHING" in str(d)


def test_latest_step_by_default_and_any_step_on_request():
    net = lecture_net("tanh", "small", width=64, depth=6)
    x = batch(64)
    with fs.watch(net) as rec:
        (net(x) ** 2).mean().backward()
        rec.step()
        apply_init(net, "xavier", generator=torch.Generator().manual_seed(0))
        (net(x) ** 2).mean().backward()
    assert diagnose(rec).runs.loc[0, "verdict"] == "healthy"
    assert diagnose(rec, step=0).runs.loc[0, "verdict"] == "vanishing"


def test_roles_compare_like_with_like():
    """A head and per-block projections are compared within their own kind only."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(4)]
    net = nn.ModuleDict({"body": nn.Sequential(*blocks), "head": nn.Linear(64, 1)})
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=math.sqrt(2 / 64))
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        net["head"].weight.mul_(1e-4)  # a tiny head: not a vanishing net
    with fs.watch(net) as rec:
        net["head"](net["body"](batch(64))).pow(2).mean().backward()
    d = diagnose(rec)
    assert d.runs.loc[0, "verdict"] == "healthy"
    scale = d.layers.query("check == 'act_scale'")
    assert set(scale.layer) == {f"body.{i}.0" for i in range(4)}


def test_theory_beside_measurement_for_model_chains():
    d = lecture("tanh", "small")[1]
    theory = d.theory
    assert theory is not None and len(theory) == 10
    inner = theory.dropna(subset=["act_gain"])
    np.testing.assert_allclose(inner["act_gain"], inner["pred_act_gain"], rtol=0.05)
    fix = d.runs.loc[0, "fix"]
    assert "tanh, weight std 0.01, fan-in 128" in fix
    assert "use std 0.0884 (Xavier" in fix and 'fs.reinit(model, "xavier")' in fix
    assert "Mean-field theory" in fix


def test_fan_in_is_estimated_without_the_model():
    rec, _ = lecture("tanh", "small")
    fix = diagnose(rec.stats).runs.loc[0, "fix"]
    fan_in = float(re.search(r"fan-in ≈ (\d+)", fix).group(1))
    assert fan_in == pytest.approx(WIDTH, rel=0.05)


def test_text_report_and_compare():
    net = lecture_net("tanh", "small", width=64, depth=6)
    _, before = examine(net, batch(64), kinds=LEAN)
    text = str(before)
    assert "VANISHING" in text and "layers.5.linear" in text and "fix: tanh" in text
    changed = fs.reinit(net, "xavier", generator=torch.Generator().manual_seed(0))
    assert changed == [f"layers.{i}.linear" for i in range(6)]  # the fix the text names
    _, after = examine(net, batch(64), kinds=LEAN)
    table = compare(before, after).set_index("measure")
    assert table.loc["verdict", "before"] == "vanishing"
    assert table.loc["verdict", "after"] == "healthy"
    assert table.loc["act_gain", "after"] > table.loc["act_gain", "before"]


def test_examine_restores_grads_and_takes_tuple_dict_and_own_loss():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x, y=None):
            out = self.a(x) + (self.b(y) if y is not None else 0)
            return SimpleNamespace(loss=out.sum() * 0 + 3 * out.mean(), logits=out)

    model = Two()
    x = torch.randn(8, 4)
    rec1, _ = examine(model, (x, x))
    rec2, _ = examine(model, {"x": x, "y": x})
    assert all(p.grad is None for p in model.parameters())
    g1 = rec1.stats.query("kind == 'gradient' and layer == 'a'").iloc[0]
    assert g1["mean"] == pytest.approx(3 / 32)  # d(3·mean)/d out: the model's own loss
    assert rec2.stats.query("kind == 'gradient' and layer == 'b'").iloc[0]["mean"] == g1["mean"]


def test_default_loss_is_mean_square_of_first_float_output():
    t = torch.tensor([1.0, 3.0])
    assert default_loss(t).item() == 5.0
    assert default_loss((torch.tensor([1, 2]), {"logits": t})).item() == 5.0
    assert default_loss(SimpleNamespace(loss=t.sum())).item() == 4.0


# -- bad arguments ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_stats() -> pd.DataFrame:
    net = lecture_net("tanh", "xavier", width=16, depth=3)
    with fs.watch(net) as rec:
        net(batch(16, 32)).sum().backward()
    return rec.stats


def test_bad_source():
    with pytest.raises(FlowscopeError, match=r"diagnose\(\) takes a stats DataFrame.*got int"):
        diagnose(3)


def test_missing_columns(small_stats):
    with pytest.raises(FlowscopeError, match=r"lacks columns \['rms'\]"):
        diagnose(small_stats.drop(columns=["rms"]))


def test_missing_by_column(small_stats):
    with pytest.raises(FlowscopeError, match=r"lacks columns \['config'\]"):
        diagnose(small_stats, by=["config"])


def test_bad_by(small_stats):
    with pytest.raises(FlowscopeError, match=r"by must be a column name or a non-empty list"):
        diagnose(small_stats, by=[])


def test_bad_thresholds_type(small_stats):
    with pytest.raises(FlowscopeError, match=r"thresholds must be a Thresholds, got dict"):
        diagnose(small_stats, thresholds={"act_ratio": 5})  # type: ignore[arg-type]


def test_bad_ratio_threshold():
    with pytest.raises(FlowscopeError, match=r"Thresholds.act_ratio must be a number > 1, got 0.5"):
        Thresholds(act_ratio=0.5)


def test_bad_share_threshold():
    with pytest.raises(FlowscopeError, match=r"Thresholds.saturated must be in \(0, 1\], got 2"):
        Thresholds(saturated=2)


def test_bad_count_threshold():
    with pytest.raises(FlowscopeError, match=r"dead_min_samples must be an integer >= 0, got -1"):
        Thresholds(dead_min_samples=-1)


def test_bad_model(small_stats):
    with pytest.raises(FlowscopeError, match=r"model must be a torch.nn.Module, got str"):
        diagnose(small_stats, model="net")  # type: ignore[arg-type]


def test_bad_dead_frame(small_stats):
    with pytest.raises(FlowscopeError, match=r"dead lacks columns \['units', 'samples'\]"):
        diagnose(small_stats, dead=pd.DataFrame({"layer": ["1"], "dead": [0]}))


def test_step_not_recorded(small_stats):
    with pytest.raises(FlowscopeError, match=r"step 7 is not recorded .* recorded: \[0\]"):
        diagnose(small_stats, step=7)


def test_empty_frame(small_stats):
    with pytest.raises(FlowscopeError, match=r"the stats frame is empty"):
        diagnose(small_stats.iloc[:0])


def test_not_a_records_folder(tmp_path):
    with pytest.raises(FlowscopeError, match=r"is not a flowscope records folder"):
        diagnose(tmp_path)


def test_compare_needs_same_grouping(small_stats):
    a = diagnose(small_stats)
    b = diagnose(small_stats.assign(config="x"), by="config")
    with pytest.raises(FlowscopeError, match=r"cannot compare diagnoses grouped by"):
        compare(a, b)


def test_examine_needs_a_module():
    with pytest.raises(FlowscopeError, match=r"examine\(\) needs a torch.nn.Module, got str"):
        examine("net", torch.randn(2, 2))  # type: ignore[arg-type]


def test_examine_needs_a_scalar_loss():
    net = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    with pytest.raises(FlowscopeError, match=r"the loss must be a scalar tensor"):
        examine(net, torch.randn(4, 3), loss=lambda out: out)
    assert all(not m._forward_hooks for m in net.modules())  # hooks gone after the error


def test_default_loss_without_float_output():
    with pytest.raises(FlowscopeError, match=r"has no floating-point tensor"):
        default_loss((torch.tensor([1, 2]),))


def test_dead_units_needs_a_module():
    with pytest.raises(FlowscopeError, match=r"DeadUnits needs a torch.nn.Module, got list"):
        DeadUnits([])  # type: ignore[arg-type]


def test_distinct_names_form_one_stack():
    torch.manual_seed(0)
    net = nn.Sequential()
    for name in ("encoder", "middle", "decoder"):
        net.add_module(name, nn.Linear(64, 64))
        net.add_module(f"{name}_act", nn.Tanh())
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
    _, d = examine(net, batch(64), kinds=LEAN)
    assert d.runs.loc[0, "verdict"] == "vanishing"
    assert set(d.layers.query("check == 'act_scale'").layer) == {"encoder", "middle", "decoder"}


def test_frame_without_activations_or_gradients(small_stats):
    only_weights = small_stats[small_stats.kind == "weight"]
    with pytest.raises(FlowscopeError, match=r"nothing to judge: .*kinds recorded: \['weight'\]"):
        diagnose(only_weights)
