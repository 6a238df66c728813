"""The ``dead_units`` kind: per recorded call of a ReLU-like module, the share of its units
that output exactly 0 for the whole batch; the doctor and the timeline judge dead from it.

Numbers are checked against numpy over the output a plain forward hook captured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_batched import SYNCING, Ops
from torch import nn

import flowscope as fs
from flowscope.core.activations import alive_units
from flowscope.core.errors import FlowscopeError
from flowscope.doctor.table import dead_counts
from flowscope.doctor.timeline import step_checks, timeline
from flowscope.record.selection import KINDS
from flowscope.reporter.timeline_section import timeline_section

WITH_DEAD = [*KINDS, "dead_units"]


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(inplace=True), nn.Linear(20, 1)
    )
    with torch.no_grad():
        net[0].bias[[1, 4, 7]] = -100.0  # three of the first ReLU's units never fire
        net[2].bias[:5] = -100.0  # and five of the in-place one's
    return net


def convnet() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(96, 2))
    with torch.no_grad():
        net[0].bias[[0, 5]] = -100.0  # two channels dead at every position
    return net


def numpy_dead_share(out: np.ndarray) -> float:
    """Dead share by plain numpy: a unit (last axis, or the channel of an NCHW map) is dead
    when every sample and position is exactly 0."""
    units = np.moveaxis(out, 1, -1) if out.ndim == 4 else out
    units = units.reshape(-1, units.shape[-1])
    return float((units == 0).all(axis=0).mean())


@pytest.mark.parametrize("kernels", ["auto", "eager"])  # the C kernel and the torch path
@pytest.mark.parametrize(
    ("make", "shape", "layers"),
    [(mlp, (64, 8), ["1", "3"]), (convnet, (16, 3, 4, 4), ["1"])],
)
def test_recorded_share_equals_numpy_over_the_hooked_output(monkeypatch, kernels, make, shape,
                                                            layers) -> None:  # fmt: skip
    monkeypatch.setenv("FLOWSCOPE_KERNELS", kernels)
    net = make()
    seen: dict[str, np.ndarray] = {}
    handles = [
        net.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name, out.detach().numpy().copy())
        )
        for name in layers
    ]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with fs.watch(net, kinds=WITH_DEAD) as rec:
        net(x).pow(2).mean().backward()
    for h in handles:
        h.remove()
    rows = rec.stats[rec.stats.kind == "dead_units"].set_index("layer")
    assert sorted(rows.index) == layers  # ReLU-like modules only
    counts = dead_counts(rec.stats).set_index("layer")
    for name in layers:
        out = seen[name]
        units = out.shape[1] if out.ndim == 4 else out.shape[-1]
        assert rows.loc[name, "mean"] == pytest.approx(numpy_dead_share(out), abs=1e-12)
        assert rows.loc[name, "count"] == units
        assert counts.loc[name, "samples"] == out.size / units  # batch × positions
    assert rows.loc["1", "mean"] == pytest.approx(3 / 20 if make is mlp else 2 / 6)
    if make is mlp:
        assert rows.loc["3", "mean"] == pytest.approx(5 / 20)


def kill(part: float, at: int, steps: int = 8, out: Path | None = None) -> fs.Recorder:
    """A Linear+ReLU net trained a few steps; at step ``at`` the bias of the first ``part``
    of the ReLU's units is set to -100 (they die)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 1))
    rec = fs.watch(net, kinds=WITH_DEAD, out=out, flush_every=3)
    gen = torch.Generator().manual_seed(2)
    for step in range(steps):
        if step == at:
            with torch.no_grad():
                net[0].bias[: int(part * 20)] = -100.0
        net(torch.randn(256, 8, generator=gen)).pow(2).mean().backward()
        rec.step()
    rec.close()
    return rec


def test_timeline_finds_units_killed_at_step_5_in_their_layer_and_not_before() -> None:
    rec = kill(0.4, at=5)
    t = timeline(rec)
    dead = t.frame[t.frame.problem == "dead"]
    assert dead[["check", "layer", "first_step", "persists"]].values.tolist() == [
        ["dead_units", "1", 5, True]
    ]
    assert dead["value"].iloc[0] == pytest.approx(0.4)
    line = next(line for line in t.lines if line.startswith("dead"))
    assert line.startswith("dead from step 5 in '1' (ReLU): 40% of units output 0")
    flags = step_checks(rec)
    assert set(flags[flags.verdict == "dead"]["step"]) == {5, 6, 7}
    # step by step the same as the one-snapshot doctor
    for step in range(8):
        layers = fs.diagnose(rec, step=step).layers
        judged = layers[layers.check == "dead_units"]
        assert judged["layer"].tolist() == ["1"]  # counted per unit at every step
        mine = flags[(flags.step == step) & (flags.verdict == "dead")]
        theirs = judged[judged.verdict == "dead"]
        assert (
            mine[["layer", "check"]].values.tolist() == theirs[["layer", "check"]].values.tolist()
        )
        assert mine["value"].tolist() == pytest.approx(theirs["value"].tolist())


def test_a_share_below_the_limit_is_healthy_and_few_samples_fall_back_to_zeros() -> None:
    assert "dead" not in set(timeline(kill(0.2, at=2)).frame.problem)  # 20% < 25%
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 1))
    with torch.no_grad():
        net[0].bias[:10] = -100.0
    with fs.watch(net, kinds=WITH_DEAD) as rec:
        for _ in range(3):
            net(torch.randn(8, 8)).sum().backward()  # 8 samples per unit < dead_min_samples
            rec.step()
    checks = fs.diagnose(rec).layers
    assert "dead_units" not in set(checks.check) and "zero_share" in set(checks.check)
    assert set(step_checks(rec).check) <= {"zero_share", "act_scale", "grad_scale"}


def test_a_recorded_step_with_dead_units_calls_nothing_that_waits_for_a_gpu(monkeypatch) -> None:
    monkeypatch.setenv("FLOWSCOPE_KERNELS", "eager")  # the code a GPU runs
    net = convnet()
    x = torch.randn(16, 3, 4, 4)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    rec = fs.watch(net, kinds=WITH_DEAD)
    for _ in range(2):
        with Ops() as ops:
            net(x).sum().backward()
            opt.step()
            opt.zero_grad()
            rec.step()
        bad = [n for n in ops.names if n in SYNCING or "bool mask" in n]
        assert not bad, bad
        assert "aten.amax.default" in ops.names  # the hook ran under the mode
    rec.close()
    assert (rec.stats.kind == "dead_units").sum() == 2


def test_the_run_store_round_trips_the_rows_and_the_doctor_reads_them(tmp_path: Path) -> None:
    rec = kill(0.4, at=5, out=tmp_path / "run")
    loaded = fs.load(tmp_path / "run", kinds=["dead_units"]).stats
    assert loaded["step"].tolist() == list(range(8)) and set(loaded.layer) == {"1"}
    assert loaded["mean"].tolist() == [0.0] * 5 + [pytest.approx(0.4)] * 3
    assert (loaded["count"] == 20).all()
    cols = ["step", "layer", "count", "mean", "frac_zero"]
    mem = rec.stats[rec.stats.kind == "dead_units"][cols].reset_index(drop=True)
    assert loaded[cols].reset_index(drop=True).equals(mem)
    assert timeline(tmp_path / "run").frame.query("problem == 'dead'")["first_step"].tolist() == [5]
    runs = fs.diagnose(tmp_path / "run").runs
    assert runs.loc[0, "dead"] == pytest.approx(0.4)


def test_opt_in_only_relu_like_modules_and_the_report_says_so() -> None:
    net = mlp()
    with fs.watch(net) as rec:  # default kinds: none
        net(torch.randn(4, 8)).sum().backward()
    assert "dead_units" not in set(rec.stats.kind)
    tanh = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    with fs.watch(tanh, kinds=["activation", "dead_units"]) as rec:
        tanh(torch.randn(4, 4))
    assert "dead_units" not in set(rec.stats.kind)
    with pytest.raises(FlowscopeError, match="dead_units"):
        fs.watch(tanh, kinds=["dead_unit"])
    section = timeline_section(kill(0.4, at=1, steps=3).stats, "run", {"": "run"})
    assert section is not None and section["dead_units"] is True


def test_the_report_says_dead_is_judged_per_unit_when_the_counts_are_there(tmp_path: Path) -> None:
    kill(0.4, at=1, steps=3, out=tmp_path / "run")
    fs.report(tmp_path / "run", tmp_path / "report")
    html = (tmp_path / "report" / "report.html").read_text()
    assert "from the per-unit counts recorded at each step" in html
    assert "per-unit counts were not recorded" not in html
    assert "40% of units output 0 for the whole batch" in html


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 6), (2, 3, 4, 5), (2, 3, 2, 2, 2), (5,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_alive_units_is_any_nonzero_over_batch_and_positions(shape, dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    out = torch.randn(shape, generator=gen).relu() * (torch.rand(shape, generator=gen) < 0.2)
    flat = out.view(-1)
    flat[:3] = torch.tensor([float("nan"), -0.0, float("-inf")])  # NaN/Inf alive, -0.0 dead
    out = out.to(dtype)
    axis = 1 if out.dim() in (4, 5) else out.dim() - 1
    want = np.moveaxis(out.float().numpy(), axis, -1).reshape(-1, out.shape[axis]) != 0
    assert alive_units(out).tolist() == want.any(axis=0).tolist()
