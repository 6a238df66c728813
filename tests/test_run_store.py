"""The run store of a training run: bounded memory, parts on disk, crashes, resuming, the
loss and the update ratio (issue 17)."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import flowscope as fs
from flowscope.core.errors import FlowscopeError
from flowscope.record import runstore


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))


def _train(model: nn.Module, rec: fs.Recorder, steps: int, opt: torch.optim.Optimizer) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.step(loss=loss)


def test_memory_stays_bounded_over_many_steps() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = fs.watch(model, flush_every=5)  # no out=: a temporary folder once 5 steps are held
    held = []
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        model(torch.randn(16, 6, generator=gen)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        rec.step()
        held.append(rec.retained)
    rec.close()
    per_step = 3 + 3 + 4 + 4  # activations, dL/dh, weights, weight gradients
    # never more than flush_every steps held, plus the part of flush_every steps the
    # writer's thread may still be writing
    assert max(held) <= 2 * 5 * per_step
    assert rec.retained == 0 and rec.recorded == 300 * per_step  # closed: all written
    folder = rec.out
    assert folder is not None and len(runstore.part_paths(folder, "snapshots")) == 60
    assert sorted(rec.stats.step.unique()) == list(range(300))  # read back from disk
    del rec
    gc.collect()
    assert not folder.exists()  # the temporary folder leaves with its recorder


def test_a_short_watch_writes_nothing() -> None:
    model = _net()
    with fs.watch(model) as rec:
        model(torch.randn(4, 6)).sum().backward()
    assert rec.out is None and len(rec.stats) == 14


def test_loss_lr_and_update_ratio_against_plain_torch(tmp_path: Path) -> None:
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(3)
    losses, ratios = [], {}
    with fs.watch(model, out=tmp_path / "run", optimizer=opt, every=2, flush_every=2) as rec:
        for step in range(6):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            loss = model(torch.randn(16, 6, generator=gen)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
            losses.append(loss.item())
            for n, p in model.named_parameters():
                ratios[(step, n)] = ((p - before[n]).norm() / p.norm()).item()
    run = fs.load(tmp_path / "run")
    scal = run.scalars.pivot(index="step", columns="name", values="value")
    np.testing.assert_allclose(scal["loss"].to_numpy(), losses, rtol=1e-6)
    assert (scal["lr"] == 0.01).all() and list(scal.index) == list(range(6))
    upd = run.stats[run.stats.kind == "update_ratio"]
    assert sorted(upd.step.unique()) == [0, 2, 4]  # recorded steps only (every=2)
    for row in upd.itertuples():
        want = ratios[(row.step, f"{row.layer}.{row.tensor}")]
        assert row.mean == pytest.approx(want, rel=1e-5) and row.count == 1


def test_update_ratio_only_when_asked() -> None:
    model = _net()
    with fs.watch(model) as rec:
        model(torch.randn(4, 6)).sum().backward()
        rec.step()
    assert "update_ratio" not in set(rec.stats.kind)
    with fs.watch(model, kinds=["weight", "update_ratio"]) as rec:
        model(torch.randn(4, 6)).sum().backward()
        with torch.no_grad():
            model[0].weight.mul_(2.0)  # W -> 2W: ||dW|| / ||W|| = 1/2
        rec.step()
    upd = rec.stats.query("kind == 'update_ratio' and layer == '0' and tensor == 'weight'")
    assert upd["mean"].item() == pytest.approx(0.5)


def test_a_loss_of_several_elements_is_refused() -> None:
    with fs.watch(_net()) as rec, pytest.raises(FlowscopeError, match="one element"):
        rec.step(loss=torch.ones(3))


def test_compact_histograms_equal_the_tidy_frame(tmp_path: Path) -> None:
    """The parts hold one row per snapshot with the bins as fixed-size lists; the tidy view
    made from them is the in-memory recorder's frame, bin for bin."""
    frames = []
    for out in (None, tmp_path / "run"):
        model = _net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with fs.watch(model, out=out, flush_every=2) as rec:
            _train(model, rec, 5, opt)
        frames.append(rec.hists if out is None else fs.load(out).hists)
    keys = ["step", "layer", "kind", "tensor", "call", "hist", "bin"]
    mem, disk = (f.sort_values(keys).reset_index(drop=True) for f in frames)
    disk["run"] = mem["run"]
    pd.testing.assert_frame_equal(mem, disk[mem.columns], check_dtype=False)
    part = pq.read_table(runstore.part_paths(tmp_path / "run", "snapshots")[0])
    assert part.schema.field("linear").type.list_size == 64  # one row per snapshot
    assert len(part) == 2 * 14


def test_load_reads_a_selection(tmp_path: Path) -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with fs.watch(model, out=tmp_path / "run", flush_every=3) as rec:
        _train(model, rec, 9, opt)
    part = fs.load(tmp_path / "run", steps=(2, 4), layers=["0"], kinds=["weight"])
    assert sorted(part.stats.step.unique()) == [2, 3, 4]
    assert set(part.stats.layer) == {"0"} and set(part.stats.kind) == {"weight"}
    assert set(part.hists.step) == {2, 3, 4} and sorted(part.scalars.step) == [2, 3, 4]
    few = fs.load(tmp_path / "run", hist_steps=3)  # histograms of 3 steps, stats of all
    assert set(few.hists.step) == {0, 4, 8} and few.stats.step.nunique() == 9
    full = fs.load(tmp_path / "run")
    pd.testing.assert_frame_equal(
        few.hists, full.hists[full.hists.step.isin([0, 4, 8])].reset_index(drop=True)
    )
    pd.testing.assert_frame_equal(few.stats, full.stats)  # read without the counts
    none = fs.load(tmp_path / "run", hist_steps=0)  # the statistics only
    assert none.hists.empty and none.stats.step.nunique() == 9 and len(none.scalars) == 9
    with pytest.raises(FlowscopeError, match="hist_steps must be a count of steps >= 0"):
        fs.load(tmp_path / "run", hist_steps=-1)


def test_a_long_runs_stats_csv_holds_spaced_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flowscope.reporter import tables

    monkeypatch.setattr(tables, "CSV_STEPS", 4)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with fs.watch(model, out=tmp_path / "run", flush_every=5) as rec:
        _train(model, rec, 10, opt)
    page = fs.report(tmp_path / "run")
    csv = pd.read_csv(tmp_path / "run" / "stats.csv")
    assert sorted(csv.step.unique()) == [0, 3, 6, 9]  # evenly spaced, first and last
    full = fs.load(tmp_path / "run").stats
    assert len(csv) == full.step.isin([0, 3, 6, 9]).sum()
    assert "at 4 evenly spaced steps of 10" in page.read_text()


def test_a_run_continues_in_its_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with fs.watch(model, out=out, flush_every=4) as rec:
        _train(model, rec, 6, opt)
    with fs.watch(model, out=out, flush_every=4) as rec:
        assert rec.step_index == 6  # after the last step written
        _train(model, rec, 4, opt)
    run = fs.load(out)
    assert sorted(run.stats.step.unique()) == list(range(10))
    assert sorted(run.scalars.step) == list(range(10))
    with pytest.raises(FlowscopeError, match="bins=64"):
        fs.watch(model, out=out, bins=32)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FlowscopeError, match="not empty"):
        fs.watch(model, out=tmp_path / "other")


KILLED = """
import sys, torch, flowscope as fs
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
rec = fs.watch(model, out=sys.argv[1], flush_every=3)
step = 0
while True:
    loss = model(torch.randn(16, 6)).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    rec.step(loss=loss)
    step += 1
"""


def test_a_run_killed_mid_run_loads_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED), str(out)])
    try:
        deadline = time.time() + 60
        while len(runstore.part_paths(out, "snapshots")) < 3 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run = fs.load(out)
    steps = sorted(run.stats.step.unique())
    assert len(steps) >= 9 and len(steps) % 3 == 0 and steps == list(range(len(steps)))
    fs.report(out, tmp_path / "report")
    assert (tmp_path / "report" / "report.html").is_file()


def test_a_closed_streamed_watch_reports_from_its_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with fs.watch(model, out=out, flush_every=2) as rec:
        _train(model, rec, 3, opt)
        with pytest.raises(FlowscopeError, match="streamed run"):
            rec.save(str(out))  # its meta.json and parts stay as they are
    assert rec.written == out
    fs.report(rec)
    assert (out / "report.html").is_file() and not (out / "stats.parquet").exists()
    assert sorted(fs.load(out).stats.step.unique()) == [0, 1, 2]


def test_the_report_of_a_training_run_tells_its_story(tmp_path: Path) -> None:
    out = tmp_path / "run"
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with fs.watch(model, out=out, flush_every=4, optimizer=opt) as rec:
        _train(model, rec, 12, opt)
    html = fs.report(out).read_text()
    for title in (
        "Loss over the steps",
        "Learning rate over the steps",
        "Activation rms per layer over the steps",
        "Update : weight ratio per layer over the steps",
        "Activation and dL/dh rms of a few layers over the steps",
    ):
        assert f"<b>{title}.</b>" in html
    assert "12 recorded, 0–11" in html  # not rec.step()'s count, 13: the step opened after
    assert fs.load(out).meta["steps"] == 13


def test_the_loss_curve_bins_long_runs() -> None:
    from flowscope.reporter.plots import layer_steps, loss_curve

    scalars = pd.DataFrame(
        {"run": "", "step": range(10_000), "name": "loss", "value": np.linspace(2, 1, 10_000)}
    )
    scalars.loc[5000, "value"] = 50.0  # a spike stays in the envelope
    ax = loss_curve(scalars, points=100)
    assert len(ax.lines[0].get_xdata()) == 100
    assert ax.collections[0].get_paths()[0].vertices[:, 1].max() == pytest.approx(50.0)
    stats = pd.DataFrame(
        {
            "step": np.repeat(np.arange(1000), 2),
            "layer_idx": np.tile([0, 1], 1000),
            "layer": np.tile(["a", "b"], 1000),
            "kind": "update_ratio",
            "call": 0,
            "tensor": "weight",
            "mean": 1e-3,
        }
    )
    ax = layer_steps(stats, "update_ratio", "mean", points=50)
    grid = ax.images[0].get_array()
    assert grid.shape == (2, 50) and np.allclose(grid, -3.0)


def test_layer_lines_draw_bucket_means_with_their_extremes() -> None:
    from flowscope.reporter.plots import layer_lines

    rng = np.random.default_rng(0)
    steps, names = np.arange(2000), ["l0", "a0", "l1", "a1", "l2", "a2"]
    values = rng.lognormal(size=(len(steps), len(names)))
    stats = pd.DataFrame(
        {
            "step": np.repeat(steps, len(names)),
            "layer_idx": np.tile(np.arange(len(names)), len(steps)),
            "layer": np.tile(names, len(steps)),
            "module_type": np.tile(["Linear", "ReLU"] * 3, len(steps)),
            "kind": "activation",
            "call": 0,
            "tensor": "output",
            "rms": values.reshape(-1),
        }
    )
    ax = layer_lines(stats, "activation", points=40)  # the ReLU layers only
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a0", "a1", "a2"]
    a1 = values[:, 3].reshape(40, 50)  # 2000 steps in 40 buckets of 50
    assert np.allclose(ax.lines[1].get_ydata(), a1.mean(axis=1))
    band = ax.collections[1].get_paths()[0].vertices[:, 1]
    assert band.max() == pytest.approx(a1.max()) and band.min() == pytest.approx(a1.min())
    with pytest.raises(FlowscopeError, match="no 'activation' rows for layers"):
        layer_lines(stats, "activation", layers=["l9"])


def test_a_streamed_recorder_reads_stats_without_the_histogram_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = fs.watch(model, out=tmp_path / "run", flush_every=3)
    _train(model, rec, 8, opt)  # 2 parts on disk, 2 steps held
    skipped = []
    read = runstore.read
    monkeypatch.setattr(
        runstore, "read", lambda *a, skip=(), **k: skipped.append(skip) or read(*a, skip=skip, **k)
    )
    stats = rec.stats
    assert ("linear", "log") in skipped  # the parts were read without their counts
    rec.close()
    stored = fs.load(tmp_path / "run")
    pd.testing.assert_frame_equal(stats, stored.stats)
    pd.testing.assert_frame_equal(rec.hists, stored.hists)  # then built with the counts
    assert rec.scalars["step"].tolist() == list(range(8))
    # against the same run kept in memory (no run folder, no part read back)
    twin = _net()
    with fs.watch(twin, flush_every=1000) as held:
        _train(twin, held, 8, torch.optim.SGD(twin.parameters(), lr=0.05))
    assert held.out is None
    pd.testing.assert_frame_equal(stats, held.stats)
    pd.testing.assert_frame_equal(rec.hists, held.hists)


def test_a_step_does_not_wait_for_its_part_to_be_written(tmp_path: Path, monkeypatch) -> None:
    # the part goes to disk on the writer's thread: here its write blocks until released,
    # and the spilling step returns first; a read of the run waits for the write
    import threading

    from flowscope.record import frames

    release, started = threading.Event(), threading.Event()
    write = frames.Snapshots.write_part

    def slow(self, *args, **kwargs):
        started.set()
        assert release.wait(30)
        return write(self, *args, **kwargs)

    monkeypatch.setattr(frames.Snapshots, "write_part", slow)
    model, out = _net(), tmp_path / "run"
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = fs.watch(model, out=out, flush_every=2)
    _train(model, rec, 2, opt)  # step 2 hands its part over
    assert started.wait(30) and not release.is_set()
    assert runstore.part_paths(out, "snapshots") == []  # not on disk yet
    per_step = 3 + 3 + 4 + 4
    assert rec.retained == 2 * (per_step + 1)  # in memory, with the two losses
    assert rec.recorded == 2 * per_step
    _train(model, rec, 1, opt)  # the next step does not wait either
    threading.Timer(0.2, release.set).start()
    stats = rec.stats  # waits for the part, then reads it and the held step
    assert sorted(stats.step.unique()) == [0, 1, 2] and len(stats) == 3 * per_step
    rec.close()
    assert len(runstore.part_paths(out, "snapshots")) == 2 and rec.retained == 0


def _disk_full_on(monkeypatch: pytest.MonkeyPatch, call: int) -> list[int]:
    """Make the ``call``-th part's snapshot write fail as a full disk does; the sizes of the
    parts written or tried, in order."""
    from flowscope.record import frames

    write, calls = frames.Snapshots.write_part, []

    def write_part(self, *args, **kwargs):
        calls.append(len(self))
        if len(calls) == call:
            raise OSError(28, "No space left on device")
        return write(self, *args, **kwargs)

    monkeypatch.setattr(frames.Snapshots, "write_part", write_part)
    return calls


def test_a_part_that_fails_to_write_is_held_and_written_later(tmp_path, monkeypatch) -> None:
    calls = _disk_full_on(monkeypatch, 1)
    model, out = _net(), tmp_path / "run"
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = fs.watch(model, out=out, flush_every=2)
    _train(model, rec, 3, opt)  # the part of steps 0-1 fails on the writer's thread
    with pytest.raises(OSError, match="No space left"):
        _train(model, rec, 1, opt)  # step 3 hands over the next part: the failure shows
    assert rec.retained == 4 * (3 + 3 + 4 + 4 + 1)  # steps 0-3 and their losses held again
    _train(model, rec, 2, opt)
    rec.close()
    per_step = 3 + 3 + 4 + 4
    assert calls == [2 * per_step, 6 * per_step]  # the failed steps went with steps 2-5
    run = fs.load(out)
    assert sorted(run.stats.step.unique()) == list(range(6))
    assert sorted(run.scalars[run.scalars.name == "loss"].step) == list(range(6))


def test_a_recorder_dropped_while_its_part_is_written_leaves_no_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no out=: the part goes to a temporary folder that the recorder's finalizer removes;
    # collected while the writer's thread still writes into it, the folder must not come back
    import tempfile
    import threading

    from flowscope.record import frames
    from flowscope.record import writer as part_writer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    release, started, done = threading.Event(), threading.Event(), threading.Event()
    write, write_part = frames.Snapshots.write_part, part_writer.write_part

    def slow(self, *args, **kwargs):
        started.set()
        assert release.wait(30)
        return write(self, *args, **kwargs)

    def watched(part):
        try:
            return write_part(part)
        finally:
            done.set()

    monkeypatch.setattr(frames.Snapshots, "write_part", slow)
    monkeypatch.setattr(part_writer, "write_part", watched)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = fs.watch(model, flush_every=2)
    _train(model, rec, 2, opt)  # step 2 hands its part over: a temporary folder
    folder = rec.out
    assert folder is not None and folder.parent == tmp_path and started.wait(30)
    threading.Timer(0.3, release.set).start()  # the write ends while the finalizer runs
    with pytest.warns(RuntimeWarning, match="dropped without close"):
        del rec
        gc.collect()  # the finalizer removes the folder once the part being written is done
    assert done.is_set() and release.is_set()  # it waited for the write
    assert not folder.exists(), sorted(p.name for p in folder.rglob("*"))


def test_an_interrupted_wait_for_the_part_in_flight_does_not_hold_it_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C while a read waits for the part being written: the write goes on and succeeds,
    # so its rows must not also be held again (read twice: once from disk, once from memory)
    import threading

    from flowscope.record import frames

    release, started, done, calls = threading.Event(), threading.Event(), threading.Event(), []
    write = frames.Snapshots.write_part

    def slow_second(self, *args, **kwargs):
        calls.append(len(self))
        if len(calls) != 2:
            return write(self, *args, **kwargs)
        started.set()
        assert release.wait(30)
        try:
            return write(self, *args, **kwargs)
        finally:
            done.set()

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    monkeypatch.setattr(frames.Snapshots, "write_part", slow_second)
    model, out = _net(), tmp_path / "run"
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = fs.watch(model, out=out, flush_every=2)
    _train(model, rec, 5, opt)  # part 0 written, part 1 (steps 2-3) in flight, step 4 held
    assert started.wait(30)
    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt):
            _ = rec.stats  # waits for part 1: interrupted
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    release.set()
    assert done.wait(30)
    per_step = 3 + 3 + 4 + 4
    stats = rec.stats
    assert stats.step.value_counts().sort_index().tolist() == [per_step] * 5
    assert sorted(rec.scalars.step) == list(range(5))
    rec.close()
    assert sorted(fs.load(out).scalars.step) == list(range(5))


def test_a_part_that_fails_once_in_flight_is_written_by_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the last part handed over fails once (a transient error) and the failure shows at
    # close(): close must still write it, as close() did when parts were written in step()
    calls = _disk_full_on(monkeypatch, 2)
    model, out = _net(), tmp_path / "run"
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    warned = pytest.warns(RuntimeWarning, match="No space left.*retried")  # said, not raised
    with warned, fs.watch(model, out=out, flush_every=2) as rec:
        _train(model, rec, 4, opt)  # step 3 hands over steps 2-3: that write fails
    assert rec.written == out and len(calls) == 3  # written again at close, complete
    run = fs.load(out)
    assert sorted(run.stats.step.unique()) == [0, 1, 2, 3]
    assert sorted(run.scalars.step) == [0, 1, 2, 3]
