"""TensorBoard and CSV export, read back with TensorBoard's own reader and pandas."""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import flowscope as fs
from flowscope.core.errors import FlowscopeError
from flowscope.record.frames import Records
from flowscope.reporter.export import tag_of, to_csv, to_tensorboard


def accumulator_module() -> ModuleType:
    try:
        return importlib.import_module("tensorboard.backend.event_processing.event_accumulator")
    except ModuleNotFoundError as err:
        pytest.fail(
            f"tensorboard is needed by this test ({err}); it is a dev dependency: "
            "pip install -e '.[dev]' (or pip install 'flowscope[tensorboard]')",
            pytrace=False,
        )


def read_events(logdir):
    ea = accumulator_module()
    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.HISTOGRAMS: 0, ea.SCALARS: 0})
    acc.Reload()
    return acc


def recorded(steps: int = 2, name: str = "") -> fs.Recorder:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    rec = fs.watch(model, hist_sample=64, name=name)  # 16 x 12 outputs: sampled, stride 3
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        model(torch.randn(16, 6) * 4).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        rec.step()
    rec.close()
    return rec


def test_histograms_and_scalars_read_back_with_tensorboard(tmp_path):
    rec = recorded()
    assert to_tensorboard(rec, tmp_path) == [tmp_path]
    acc = read_events(tmp_path)
    stats, hists = rec.stats, rec.hists.query("hist == 'log'")
    tags = acc.Tags()
    for row in stats.itertuples():
        tag = tag_of(row.layer, row.kind, row.call, row.tensor)
        assert tag in tags["histograms"], tag
        event = next(e for e in acc.Histograms(tag) if e.step == row.step)
        value = event.histogram_value
        ours = hists[(hists.step == row.step) & (hists.layer == row.layer)
                     & (hists.kind == row.kind) & (hists.tensor == row.tensor)]  # fmt: skip
        ours = ours.sort_values("bin")
        expected = ours["count"].to_numpy() * row.hist_stride
        np.testing.assert_array_equal(value.bucket, expected)
        assert value.num == expected.sum()
        assert np.all(np.diff(value.bucket_limit) > 0) and np.all(np.isfinite(value.bucket_limit))
        np.testing.assert_allclose(value.bucket_limit, np.minimum(ours["hi"], 1e31))
        finite = row.count - row.nan - row.inf
        np.testing.assert_allclose(value.sum, row.mean * finite, rtol=1e-5, atol=1e-9)
        scalar = next(e for e in acc.Scalars(tag_of(row.layer, row.kind, row.call, row.tensor,
                                                     "std")) if e.step == row.step)  # fmt: skip
        assert scalar.value == pytest.approx(row.std, rel=1e-6)
    assert len(acc.Scalars("activation.std/0")) == 2  # one per recorded step


def test_strided_samples_are_scaled_to_the_whole_tensor(tmp_path):
    model = nn.Linear(300, 300)
    with fs.watch(model, kinds=["weight"], hist_sample=1000) as rec:
        model(torch.randn(1, 300))
    row = rec.stats.iloc[0]
    assert row.hist_stride > 1
    to_tensorboard(rec, tmp_path, scalars=[])
    value = read_events(tmp_path).Histograms("weight/<root>/weight")[0].histogram_value
    assert value.num == pytest.approx(row["count"], rel=0.01)  # 90000 estimated from a sample


def test_nonfinite_values_land_in_finite_overflow_buckets(tmp_path):
    with fs.watch(nn.Identity(), kinds=["activation"]) as rec:
        nn.Identity()  # not watched
        rec.model(torch.tensor([0.0, -1e-40, 1e-40, 2.0, float("inf"), -float("inf"), 5e35]))
    to_tensorboard(rec, tmp_path)
    value = read_events(tmp_path).Histograms("activation/<root>")[0].histogram_value
    assert value.num == 7 and np.all(np.diff(value.bucket_limit) > 0)
    assert value.bucket_limit[-1] == 1e31 and value.bucket[-1] == 2  # +Inf and 5e35
    assert value.min == -1e31 and value.max == 1e31


def test_linear_histograms_and_several_runs_go_to_one_folder_each(tmp_path):
    a, b = recorded(1, "a").records(), recorded(1, "b").records()
    both = Records(
        pd.concat([a.stats, b.stats], ignore_index=True),
        pd.concat([a.hists, b.hists], ignore_index=True),
        a.meta,
    )
    folders = to_tensorboard(both, tmp_path, hist="linear", scalars=["rms"])
    assert folders == [tmp_path / "a", tmp_path / "b"]
    acc = read_events(tmp_path / "b")
    scalars = acc.Tags()["scalars"]
    assert scalars and all(t.split("/")[0].endswith(".rms") for t in scalars)
    value = acc.Histograms("activation/0")[0].histogram_value
    lin = b.hists.query("hist == 'linear' and layer == '0' and kind == 'activation'")
    stride = b.stats.query("layer == '0' and kind == 'activation'")["hist_stride"].item()
    assert stride == 3
    counts = lin[lin["count"] > 0].sort_values("bin")["count"] * stride
    np.testing.assert_array_equal(value.bucket, counts)


def test_from_a_saved_folder_and_csv_next_to_parquet(tmp_path):
    rec = recorded(1)
    rec.save(str(tmp_path / "run"))
    to_tensorboard(tmp_path / "run", tmp_path / "tb")
    assert read_events(tmp_path / "tb").Tags()["histograms"]
    paths = to_csv(tmp_path / "run")
    assert paths == [tmp_path / "run" / "stats.csv", tmp_path / "run" / "hists.csv"]
    stats = pd.read_csv(paths[0], keep_default_na=False, na_values=["NaN", ""])
    np.testing.assert_allclose(stats["std"], rec.stats["std"], rtol=1e-12)
    assert list(stats.columns) == list(rec.stats.columns)
    assert len(pd.read_csv(paths[1])) == len(rec.hists)
    assert to_csv(rec, tmp_path / "elsewhere")[0].is_file()


def test_bad_arguments_are_refused_before_writing(tmp_path):
    rec = recorded(1)
    with pytest.raises(FlowscopeError, match="'log' or 'linear'"):
        to_tensorboard(rec, tmp_path, hist="decades")  # type: ignore[arg-type]
    with pytest.raises(FlowscopeError, match="unknown statistic"):
        to_tensorboard(rec, tmp_path, scalars=["stdev"])
    with pytest.raises(FlowscopeError, match="Recorder or a run folder"):
        to_tensorboard(42, tmp_path)  # type: ignore[arg-type]
    with pytest.raises(FlowscopeError, match="needs out_dir"):
        to_csv(rec)
    with pytest.raises(FlowscopeError, match="not a flowscope records folder"):
        to_csv(tmp_path / "missing")
    assert not list(tmp_path.iterdir())
