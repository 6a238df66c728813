"""Tidy frames and their files: shape of the tables, Parquet round trip, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import flowscope as fs
from flowscope.core.errors import FlowscopeError
from flowscope.record.frames import KEYS, META_KEY, STATS, atomic_write_text
from flowscope.record.snapshot import RAW


@pytest.fixture
def recorded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    rec = fs.watch(model, bins=32, name="demo")
    for _ in range(2):
        model(torch.randn(50, 10)).sum().backward()
        rec.step()
    rec.close()
    return rec


def test_stats_frame_is_tidy(recorded):
    stats = recorded.stats
    assert list(stats.columns[: len(KEYS)]) == KEYS
    assert set(STATS) <= set(stats.columns)
    assert not stats.duplicated(KEYS).any()  # one row per observation
    assert set(stats.run) == {"demo"} and sorted(stats.step.unique()) == [0, 1]
    # three leaf modules x (activation + gradient) + 4 parameters x (weight + weight_grad)
    assert len(stats.query("step == 0")) == 3 * 2 + 4 * 2


def test_hists_frame_counts_agree_with_stats(recorded):
    hists, stats = recorded.hists, recorded.stats
    lin = hists.query("hist == 'linear'")
    assert lin.groupby(KEYS).size().eq(32).all()
    merged = lin.groupby(KEYS)["count"].sum().rename("hist_total").reset_index()
    merged = merged.merge(stats, on=KEYS)
    relu = merged.query("module_type == 'ReLU' and kind == 'activation'")
    others = merged.drop(relu.index)
    # sample counts x stride cover the finite values (zeros left out for ReLU, drop_zeros=auto)
    finite = others["count"] - others["nan"] - others["inf"]
    assert (others.hist_total * others.hist_stride >= finite - others.hist_stride).all()
    nonzero = relu["count"] * (1 - relu["frac_zero"])
    assert (relu.hist_total == nonzero.round()).all()
    # linear bins span exactly [min, max] of each snapshot
    ends = (
        lin.groupby(KEYS)
        .agg(lo=("lo", "min"), hi=("hi", "max"))
        .reset_index()
        .merge(stats, on=KEYS)
    )
    assert ends.lo.to_numpy() == pytest.approx(ends["min"].to_numpy())
    assert ends.hi.to_numpy() == pytest.approx(ends["max"].to_numpy())
    log = hists.query("hist == 'log'").groupby(KEYS)["count"].sum()
    assert (log > 0).all()


def test_parquet_round_trip_with_metadata(recorded, tmp_path):
    recorded.save(tmp_path / "run")
    back = fs.load(tmp_path / "run")
    assert back.stats.equals(recorded.stats)
    assert back.hists.equals(recorded.hists)
    meta = json.loads(pq.read_schema(tmp_path / "run" / "stats.parquet").metadata[META_KEY])
    assert meta["torch"] == torch.__version__ and meta["run"] == "demo"
    assert meta["devices"] == ["cpu"] and meta["dtypes"] == ["float32"]
    assert back.meta["steps"] == 3


def test_load_rejects_foreign_or_broken_folders(tmp_path, recorded):
    with pytest.raises(FlowscopeError, match=r"missing stats\.parquet, hists\.parquet, meta\.json"):
        fs.load(tmp_path)
    recorded.save(tmp_path / "run")
    (tmp_path / "run" / "stats.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(FlowscopeError, match="cannot read flowscope records"):
        fs.load(tmp_path / "run")
    (tmp_path / "config").mkdir()  # a study config's folder, its snapshots damaged
    (tmp_path / "config" / "snapshots.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(FlowscopeError, match="cannot read flowscope snapshots"):
        fs.load(tmp_path / "config")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "meta.json"
    atomic_write_text(target, "old")

    def broken(self, text):
        Path.write_bytes(self, b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]  # no temporary left behind


def test_written_files_follow_the_umask_not_mkstemp(recorded, tmp_path):
    import stat

    from flowscope.record.frames import _UMASK

    recorded.save(tmp_path)
    for name in ("stats.parquet", "hists.parquet", "meta.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~_UMASK, name


def test_empty_recording_gives_empty_frames():
    rec = fs.watch(nn.Linear(2, 2))
    rec.close()
    assert rec.stats.empty and list(rec.stats.columns[: len(KEYS)]) == KEYS


def test_frames_are_the_snapshot_rows_then_their_linear_and_log_bins(recorded):
    # the hists frame, built here bin by bin from the raw rows: per snapshot, its linear bins
    # over its own [min, max], then (after every snapshot's linear bins) its non-empty log bins
    # with the bounds LogEdges gives
    from flowscope.record.frames import log_edges_of, moments

    stats, hists = recorded.stats, recorded.hists  # flushed: the host buffers are complete
    host = recorded._host
    raw = np.concatenate([c[1] for c in host])
    lin = np.concatenate([c[2] for c in host])
    log = np.concatenate([c[3] for c in host])
    edges = log_edges_of(recorded.meta)
    keys = stats[KEYS].to_dict("records")
    linear, logs = [], []
    for i, key in enumerate(keys):
        lo = raw[i, RAW["min"]]  # absolute extremes; the width finite up to float64's limits
        width = raw[i, RAW["max"]] / lin.shape[1] - lo / lin.shape[1]
        for b, count in enumerate(lin[i]):
            bounds = {"lo": lo + b * width, "hi": lo + (b + 1) * width}
            linear.append({**key, "hist": "linear", "bin": b, **bounds, "count": count})
        for b in np.flatnonzero(log[i]):
            bounds = dict(zip(("lo", "hi"), edges.bounds(b), strict=True))
            logs.append({**key, "hist": "log", "bin": b, **bounds, "count": log[i, b]})
    expected = pd.DataFrame(linear + logs).astype(hists.dtypes.to_dict())
    pd.testing.assert_frame_equal(hists, expected, check_exact=True)
    pd.testing.assert_frame_equal(stats[STATS], moments(raw), check_exact=True)
    keys = [k for c in host for k in c[0]]
    assert stats["layer"].tolist() == [k.layer for k in keys]
    assert stats["dtype"].tolist() == [k.dtype for k in keys]
    assert stats.dtypes["step"] == np.int64 and stats.dtypes["hist_stride"] == np.int64


def test_snapshots_file_round_trip_gives_the_same_frames(recorded, tmp_path):
    # what the study engine saves per config: read back, the frames are the recorder's own,
    # keys (str and int columns), raw rows, both histograms and the log edges intact
    from flowscope.record.frames import Snapshots, records_from

    snaps = recorded.snapshots()
    snaps.save(tmp_path / "snapshots.parquet", {**recorded.meta, "run": "demo"})
    back, meta = Snapshots.read(tmp_path / "snapshots.parquet")
    assert meta["run"] == "demo" and back.edges == recorded.hist.log
    for name in ("raw", "lin", "log"):
        np.testing.assert_array_equal(getattr(back, name), getattr(snaps, name))
    again = records_from(back, meta)
    pd.testing.assert_frame_equal(again.stats, recorded.stats, check_exact=True)
    pd.testing.assert_frame_equal(again.hists, recorded.hists, check_exact=True)


def test_front_columns_lead_both_frames_row_for_row(recorded):
    # the engine's config columns: one row per snapshot, and every histogram bin carries the
    # row of its own snapshot (checked here against the snapshot's run-independent keys).
    # Row i goes with snapshot i whatever the index says: the engine's front is a take with
    # repeated labels, here reversed labels that would pair rows wrongly by label
    from flowscope.record.frames import records_from

    snaps = recorded.snapshots()
    steps, layers = snaps.keys["step"], snaps.keys["layer"]
    tags = [f"{s}/{n}" for s, n in zip(steps, layers, strict=True)]
    front = pd.DataFrame({"tag": tags}, index=np.arange(len(tags))[::-1])
    rec = records_from(snaps, {}, front)
    for frame in (rec.stats, rec.hists):
        assert frame.columns[0] == "tag"
        assert (frame["tag"] == frame["step"].astype(str) + "/" + frame["layer"]).all()
    assert len(rec.hists) == len(recorded.hists)
