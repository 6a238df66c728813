"""The study engine: run folders, resume, divergence as data, crashes kept local."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types

import pandas as pd
import pytest
import torch
from torch import nn

import flowscope as fs
from flowscope.core.errors import FlowscopeError
from flowscope.study import engine, spec

TINY = {
    "name": "tiny",
    "source": {"file": "002_2f5fb56b234155bd.txt", "lines": "850-1350"},
    "net": {"name": "mlp", "in_dim": 12, "width": 12, "depth": 3, "out_dim": 3},
    "init": {"name": "xavier"},
    "data": {"name": "gaussian", "n": 32, "dim": 12, "classes": 3},
    "sweep": {"net.activation": ["tanh", "relu"], "init.name": ["small", "he"]},
    "run": {"seeds": [0], "probes": ["dead_units"]},
    "claim": [
        {
            "id": "tanh-small-shrinks",
            "text": "shrinks",
            "where": {"activation": "tanh", "init": "small"},
            "of": "activation.std",
            "layers": "layers.*.act",
            "reduce": "gain",
            "below": 0.5,
        }
    ],
}


def tiny(**changes) -> spec.Study:
    raw = copy.deepcopy(TINY)
    for key, value in changes.items():
        spec.apply_override(raw, f"{key}={json.dumps(value)}")
    return spec.validate(raw, "tiny.toml")


def test_run_folder_holds_every_file_and_config_columns(tmp_path):
    result = engine.run_study(tiny(), tmp_path / "run")
    out = tmp_path / "run"
    for name in ("spec.json", "stats.parquet", "hists.parquet", "probes.parquet",
                 "configs.json", "claims.json", "meta.json"):  # fmt: skip
        assert (out / name).is_file(), name
    stats = pd.read_parquet(out / "stats.parquet")
    assert list(stats.columns[:4]) == ["config", "activation", "init", "seed"]
    assert stats.groupby("config").size().gt(0).all() and stats.config.nunique() == 4
    assert set(stats.kind) == {"activation", "gradient", "weight_grad"}
    hists = pd.read_parquet(out / "hists.parquet")
    assert set(hists.config) == set(stats.config)
    for frame in (stats, hists):  # config columns from the merge, run from each recording
        assert (frame["config"] == frame["run"]).all()
    # one config's folder loads as Records: its rows of the merged frames, without the
    # config columns (read from its own file here, merged from memory above)
    config = stats["config"].iloc[-1]
    alone = fs.load(out / "configs" / config)
    for mine, merged in ((alone.stats, stats), (alone.hists, hists)):
        config_columns = ["config", *tiny().axis_columns, "seed"]
        rows = merged[merged["config"] == config].drop(columns=config_columns)
        pd.testing.assert_frame_equal(mine, rows.reset_index(drop=True), check_exact=True)
    assert [c["status"] for c in json.loads((out / "configs.json").read_text())] == ["done"] * 4
    claims = json.loads((out / "claims.json").read_text())
    assert claims[0]["id"] == "tanh-small-shrinks" and claims[0]["held"] is True
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config_columns"] == ["config", "activation", "init", "seed"]
    assert meta["torch"] == torch.__version__ and meta["finished"] == 4
    assert result.ran == 4 and not result.failed


def test_rerun_resumes_and_reproduces(tmp_path):
    first = engine.run_study(tiny(), tmp_path)
    again = engine.run_study(tiny(), tmp_path)
    assert again.ran == 0
    victim = first.configs[2]["config"]
    (tmp_path / "configs" / victim / "done.json").unlink()
    third = engine.run_study(tiny(), tmp_path)
    assert third.ran == 1
    cols = ["config", "layer", "kind", "tensor", "std"]
    a = first.stats[cols].sort_values(cols[:4]).reset_index(drop=True)
    b = third.stats[cols].sort_values(cols[:4]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)  # each config seeds its own generator


def test_interrupted_study_keeps_finished_configs(tmp_path, monkeypatch):
    real = engine.run_config
    calls = []

    def flaky(study, config, folder, device=None):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(config.id)
        return real(study, config, folder, device)

    monkeypatch.setattr(engine, "run_config", flaky)
    with pytest.raises(KeyboardInterrupt):
        engine.run_study(tiny(), tmp_path)
    monkeypatch.setattr(engine, "run_config", real)
    assert sorted(p.name for p in (tmp_path / "configs").iterdir()) == sorted(calls)
    resumed = engine.run_study(tiny(), tmp_path)
    assert resumed.ran == 2 and len(resumed.configs) == 4


def test_diverging_config_is_recorded_not_fatal(tmp_path):
    study = tiny(**{"sweep.init.name": ["normal"], "init.std": 1e25, "run.steps": 2})
    result = engine.run_study(study, tmp_path)
    bad = (result.stats["nan"] + result.stats["inf"]).groupby(result.stats["config"]).sum()
    status = {c["config"]: c["status"] for c in result.configs}
    assert {cid: "diverged" if n else "done" for cid, n in bad.items()} == status
    assert status == {  # relu overflows to Inf/NaN; tanh keeps activations in [-1, 1]
        cid: "diverged" if "relu" in cid else "done" for cid in status
    }


def config_fails(monkeypatch, index: int, message: str) -> None:
    """Make the config at ``index`` raise ``RuntimeError(message)`` while it measures."""
    real = engine._measure

    def broken(study, config, dev):
        if config.index == index:
            raise RuntimeError(message)
        return real(study, config, dev)

    monkeypatch.setattr(engine, "_measure", broken)


def test_crashing_config_keeps_the_others(tmp_path, monkeypatch, capsys):
    config_fails(monkeypatch, 1, "out of memory (simulated)")
    result = engine.run_study(tiny(), tmp_path)
    assert [c["status"] for c in result.configs] == ["done", "failed", "done", "done"]
    assert "out of memory (simulated)" in result.failed[0]["error"]
    assert "failed: RuntimeError" in capsys.readouterr().err
    assert result.stats.config.nunique() == 3


def test_other_spec_in_same_folder_is_refused(tmp_path):
    engine.run_study(tiny(), tmp_path)
    with pytest.raises(FlowscopeError, match="holds a run of a different spec"):
        engine.run_study(tiny(**{"net.width": 8}), tmp_path)
    fresh = engine.run_study(tiny(**{"net.width": 8}), tmp_path, fresh=True)
    assert fresh.ran == 4


def test_foreign_folder_is_refused(tmp_path):
    (tmp_path / "stats.parquet").write_text("not mine")
    with pytest.raises(FlowscopeError, match="not a study run folder"):
        engine.run_study(tiny(), tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(FlowscopeError, match="no CUDA device"):
        engine.run_study(tiny(), tmp_path, device="cuda")


def test_seeds_differ_per_config_and_seed_but_are_stable():
    study = tiny(**{"run.seeds": [0, 1]})
    seeds = [engine.derive_seed(study, c) for c in study.configs()]
    assert len(set(seeds)) == len(seeds)
    assert seeds == [engine.derive_seed(study, c) for c in study.configs()]


def test_init_overrides_and_presets_reach_the_right_layers(tmp_path):
    raw = copy.deepcopy(TINY)
    raw["sweep"] = {"init.name": ["half-zero"]}
    raw["presets"] = {"half-zero": {"layers.0.linear": "zeros", "*": "he"}}
    raw["run"] = {"kinds": ["weight"], "seeds": [0]}
    raw["claim"] = []
    result = engine.run_study(spec.validate(raw), tmp_path / "preset")
    weights = result.stats.query("tensor == 'weight'").set_index("layer")["std"]
    assert weights["layers.0.linear"] == 0.0
    assert weights["layers.1.linear"] == pytest.approx((2 / 12) ** 0.5, rel=0.3)
    raw = copy.deepcopy(TINY)
    raw["sweep"] = {"init.name": ["normal"]}
    raw["init"] = {"name": "normal", "std": 5.0, "overrides": {"head": "zeros"}}
    raw["run"] = {"kinds": ["weight"], "seeds": [0]}
    raw["claim"] = []
    study = spec.validate(raw)
    weights = engine.run_study(study, tmp_path / "over").stats.set_index(["layer", "tensor"])
    assert weights.loc[("head", "weight"), "std"] == 0.0
    assert weights.loc[("layers.1.linear", "weight"), "std"] == pytest.approx(5.0, rel=0.3)


def test_merge_uses_the_configs_run_now_and_reads_only_earlier_ones(tmp_path, monkeypatch):
    from flowscope.study import merge as merging

    real = merging.load_config
    loaded = []

    def counting(folder):
        loaded.append(folder.name)
        return real(folder)

    monkeypatch.setattr(merging, "load_config", counting)
    study = tiny(**{"run.probes": ["dead_units", "param_change"]})
    first = engine.run_study(study, tmp_path)
    assert loaded == []  # every config was run by this call: merged from memory
    victim = first.configs[1]["config"]
    (tmp_path / "configs" / victim / "done.json").unlink()
    engine.run_study(study, tmp_path)
    assert sorted(loaded) == sorted(c["config"] for c in first.configs if c["config"] != victim)
    from_disk = engine.merge(study, tmp_path)  # every config read back from its folder
    for name in ("stats", "hists", "probes"):
        pd.testing.assert_frame_equal(getattr(first, name), getattr(from_disk, name))
        pd.testing.assert_frame_equal(  # and the files say the same
            pd.read_parquet(tmp_path / f"{name}.parquet"), getattr(first, name)
        )
    assert [c["config"] for c in first.configs] == [c["config"] for c in from_disk.configs]
    assert [v.to_dict() for v in first.claims] == [v.to_dict() for v in from_disk.claims]


def test_merge_from_memory_matches_disk_with_a_failed_config(tmp_path, monkeypatch):
    config_fails(monkeypatch, 2, "simulated")
    result = engine.run_study(tiny(), tmp_path)
    from_disk = engine.merge(tiny(), tmp_path)
    for name in ("stats", "hists", "probes"):
        pd.testing.assert_frame_equal(getattr(result, name), getattr(from_disk, name))
    assert result.configs == from_disk.configs


def test_config_columns_keep_the_dtypes_of_assigning_them_to_every_frame():
    frame = pd.DataFrame({"layer": ["a", "b"], "value": [1.0, 2.0]})
    empty = frame.iloc[:0]
    rows = [  # (frame, config columns): an axis of int, str and float, bool, an empty frame
        (frame, {"config": "000-x", "width": 2, "norm": True, "seed": 0}),
        (empty, {"config": "001-x", "width": "auto", "norm": False, "seed": 0}),
        (frame, {"config": "002-x", "width": 3.5, "norm": False, "seed": 1}),
    ]
    study = types.SimpleNamespace(axis_columns=["width", "norm"])  # all _concat reads
    one_row = [(f, pd.DataFrame(index=range(1)).assign(**c)) for f, c in rows]
    from flowscope.study.merge import concat_configs

    got = concat_configs(one_row, study, ["layer", "value"])
    plain = pd.concat([f.assign(**c) for f, c in rows], ignore_index=True)
    expected = plain[["config", "width", "norm", "seed", "layer", "value"]]
    pd.testing.assert_frame_equal(got, expected)


def _model_passes(monkeypatch) -> list[int]:
    """Counts the forward passes of every net the engine builds."""
    real = engine.build_net
    passes: list[int] = []

    def counted(name, **kwargs):
        model = real(name, **kwargs)
        passes.append(0)
        index = len(passes) - 1

        def count(module, args, output):
            passes[index] += 1

        model.register_forward_hook(count)
        return model

    monkeypatch.setattr(engine, "build_net", counted)
    return passes


CONV = {"name": "conv", "in_channels": 1, "image_size": 6, "channels": 4, "depth": 2, "out_dim": 3}
IMAGES = {"name": "images", "n": 16, "channels": 1, "size": 6, "classes": 3}


@pytest.mark.parametrize(
    "changes",
    [
        {"net": {**TINY["net"], "activation": "relu", "norm": "batchnorm"}},
        {"net": {**TINY["net"], "activation": "tanh"}},
        {"net": {**TINY["net"], "activation": "relu"}, "run": {"mode": "eval", "warmup": 2}},
        {"net": CONV, "data": IMAGES},
        {"net": {**CONV, "norm": "batchnorm"}, "data": IMAGES},
    ],
)
def test_dead_units_read_on_the_recorded_pass_equal_a_pass_of_their_own(changes, monkeypatch):
    raw = copy.deepcopy(TINY)
    raw.update(copy.deepcopy(changes))
    raw["sweep"] = {"init.name": ["small", "he", "zeros"]}  # zeros: every ReLU unit dead
    raw["run"] = {**raw.get("run", {}), "seeds": [0], "probes": ["dead_units"]}
    raw["claim"] = []
    study = spec.validate(raw, "tiny.toml")
    warmup = raw["run"].get("warmup", 0)
    dev = torch.device("cpu")
    passes = _model_passes(monkeypatch)
    riding = [engine._measure(study, c, dev)[2] for c in study.configs()]
    assert passes == [warmup + 1] * 3  # the recorded pass only: none of the probe's own
    own = dataclasses.replace(engine.PROBES.get("dead_units"), hooks=None)
    monkeypatch.setattr(engine, "PROBES", {"dead_units": own})  # as before: a pass of its own
    alone = [engine._measure(study, c, dev)[2] for c in study.configs()]
    assert passes[3:] == [warmup + 2] * 3
    assert riding == alone  # the same numbers, bit for bit
    assert all(len(rows) == raw["net"]["depth"] for rows in riding)  # one per activation
    if changes["net"].get("activation", "relu") == "relu":
        assert {v for *_, v in riding[2]} == {1.0}


def test_dead_units_with_training_steps_read_the_trained_model(monkeypatch):
    study = tiny(**{"run.steps": 2})
    passes = _model_passes(monkeypatch)
    for config in study.configs():
        engine._measure(study, config, torch.device("cpu"))
    assert set(passes) == {3}  # two training passes, then the probe's own on the end state


def test_dead_units_count_exact_zeros_only():
    from flowscope.study.probes import ProbeContext, dead_units

    x = torch.ones(4, 6)
    x[:, 0] = 0.0  # dead
    x[:, 1] = -0.0  # dead: -0.0 == 0
    x[:, 2] = 0.0
    x[1, 2] = float("nan")  # not dead: a NaN is not 0
    x[:, 3] = 0.0
    x[3, 3] = 1e-30  # not dead
    x[:, 4] = float("-inf")
    model = nn.Sequential(nn.Identity())  # the probe hooks activation modules, Identity too
    got = dead_units(ProbeContext(model=model, x=x, initial={}))
    expected = (x == 0).all(dim=0).double().mean()
    assert got == {"0": expected} and expected.item() == pytest.approx(2 / 6)


def test_same_sign_rows_against_numpy_and_undefined_without_a_live_row():
    from flowscope.study.probes import ProbeContext, same_sign_rows

    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    g = torch.tensor([[1.0, 2, 0, 3, 1], [1, -1, 0, 0, 0], [0.0] * 5, [-1, -2, 0, 0, -5]])
    model[0].weight.grad = g
    model[1].weight.grad = torch.zeros(3, 4)  # a loss saturated to an exact zero gradient
    got = same_sign_rows(ProbeContext(model=model, x=torch.ones(1, 5), initial={}))
    a = g.numpy()
    live = (a != 0).any(axis=1)
    one_sign = ((a >= 0).all(axis=1) | (a <= 0).all(axis=1)) & live
    assert got["0"].item() == pytest.approx(one_sign.sum() / live.sum())  # 2 of 3 live rows
    assert math.isnan(got["1"].item())  # undefined, not 0: the claim then says not measured


def test_swept_bins_merge_configs_with_different_histogram_layouts(tmp_path):
    study = tiny(**{"sweep.run.bins": [8, 16], "sweep.init.name": ["he"]})
    result = engine.run_study(study, tmp_path)
    assert sorted(result.stats["bins"].unique()) == [8, 16]
    lin = result.hists[result.hists["hist"] == "linear"]
    per_snapshot = lin.groupby(["config", "bins", "step", "layer", "kind", "tensor", "call"])
    sizes = per_snapshot.size().reset_index(name="n")
    assert (sizes["n"] == sizes["bins"]).all() and set(sizes["bins"]) == {8, 16}
    for frame in (result.stats, result.hists):
        assert (frame["config"] == frame["run"]).all()
    from_disk = engine.merge(study, tmp_path)
    for name in ("stats", "hists"):
        pd.testing.assert_frame_equal(getattr(result, name), getattr(from_disk, name))
