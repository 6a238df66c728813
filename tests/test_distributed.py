"""torch.distributed: merged snapshots equal a single-process run over the global batch.

Two gloo processes on CPU are spawned once per module (spawning costs seconds); each runs
every scenario and writes what it saw; the tests compare that with a run in this process.
"""

from __future__ import annotations

import copy
import pickle
import socket
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import flowscope as fs
from flowscope.core.errors import FlowscopeError
from flowscope.integrations import distributed, sharded
from flowscope.record.snapshot import HistSpec, snapshot
from flowscope.study import engine, spec

WORLD = 2
BATCH = 24  # global batch; each rank gets BATCH // WORLD contiguous rows
STEPS = 2
KEYS = ["step", "layer", "kind", "call", "tensor"]

STUDY = {
    "name": "tiny-sharded",
    "source": {"file": "002_2f5fb56b234155bd.txt", "lines": "850-1350"},
    "net": {"name": "mlp", "in_dim": 8, "width": 8, "depth": 2, "out_dim": 3},
    "init": {"name": "xavier"},
    "data": {"name": "gaussian", "n": 16, "dim": 8, "classes": 3},
    "sweep": {"net.activation": ["tanh", "relu"], "init.name": ["small", "he"]},
    "run": {"seeds": [0]},
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    )


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 6, generator=gen) * 3 + 1
    return x, torch.randint(0, 3, (BATCH,), generator=gen)


def _train(model: nn.Module, rec: fs.Recorder, x, y, scale: float, synced: bool) -> None:
    """STEPS SGD steps; ``scale`` multiplies the loss (see the reference run)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(STEPS):
        (nn.functional.cross_entropy(model(x), y) * scale).backward()
        if scale != 1.0:  # the reference: DDP's average of the ranks' gradients
            for p in model.parameters():
                p.grad /= scale
        if synced:
            distributed.record_synced_grads(rec)
        opt.step()
        opt.zero_grad()
        rec.step()


# -- what each rank runs ------------------------------------------------------------------------


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        seen = {"ddp": _ddp(rank, Path(out)), **_mismatch(rank), **_unsynced(rank)}
        seen["dead"] = _dead_units(rank)
        study = spec.validate(copy.deepcopy(STUDY), "s.toml")
        result = sharded.run_study_sharded(study, Path(out) / "sh")
        seen["sharded_result"] = None if result is None else result.ran
        (Path(out) / f"rank{rank}.pkl").write_bytes(pickle.dumps(seen))
    finally:
        dist.destroy_process_group()


def _shard(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _data()
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    return x[rows], y[rows]


def _ddp(rank: int, out: Path) -> int:
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    rec = fs.watch(model, bins=16)
    x, y = _shard(rank)
    _train(ddp, rec, x, y, 1.0, synced=True)
    rec.close()
    written = distributed.save_merged(rec, out / "ddp")
    return int(written is not None)


def _mismatch(rank: int) -> dict[str, str]:
    model = _model()
    with fs.watch(model, modules=nn.Linear if rank else None) as rec:
        model(_shard(rank)[0]).sum().backward()
    try:
        distributed.merge_pending(rec)
    except FlowscopeError as err:
        return {"mismatch": str(err)}
    return {"mismatch": ""}


def _unsynced(rank: int) -> dict[str, object]:
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    rec = fs.watch(model, kinds=["weight_grad"])
    x, y = _shard(rank)
    nn.functional.cross_entropy(ddp(x), y).backward()
    rec.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distributed.merge_pending(rec)
    stats = rec.stats
    counts = dict(zip(stats.layer + "." + stats.tensor, stats["count"], strict=True))
    return {"unsynced_warning": [str(w.message) for w in caught], "unsynced_counts": counts}


def _dead_model() -> nn.Module:
    """Units u0 = x0, u1 = -x0, u2 = x1, u3 = -x1 through a ReLU."""
    lin = nn.Linear(2, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]]))
    return nn.Sequential(lin, nn.ReLU())


def _dead_batch() -> torch.Tensor:
    """Rank 0's half: x0 > 0, x1 > 0 (u1, u3 dead); rank 1's: x0 < 0, x1 > 0 (u0, u3 dead);
    the global batch: u3 dead only."""
    x = torch.rand(BATCH, 2) + 0.5
    x[BATCH // WORLD :, 0] *= -1
    return x


def _dead_units(rank: int) -> list[float]:
    model = _dead_model()
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    with fs.watch(model, kinds=["activation", "dead_units"]) as rec:
        model(_dead_batch()[rows])
    distributed.merge_pending(rec)
    dead = rec.stats[rec.stats.kind == "dead_units"]
    return [float(dead["mean"].iloc[0]), float(dead["count"].iloc[0])]


# -- the spawned run and the single-process reference ------------------------------------------


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("dist")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out)), nprocs=WORLD)
    return out, [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference() -> fs.Recorder:
    """One process, the global batch; the loss is scaled so that dL/d(output) per sample
    equals each rank's (its own mean loss), and the gradients are then averaged as DDP does."""
    model = _model()
    rec = fs.watch(model, bins=16)
    x, y = _data()
    _train(model, rec, x, y, float(WORLD), synced=True)
    rec.close()
    return rec


def _joined(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    joined = a.merge(b, on=KEYS, suffixes=("_ddp", "_ref"), validate="one_to_one")
    assert len(joined) == len(a) == len(b)
    return joined


def test_only_rank_zero_writes_and_every_rank_sees_the_merge(spawned):
    out, seen = spawned
    assert [s["ddp"] for s in seen] == [1, 0]
    assert (out / "ddp" / "stats.parquet").is_file()


def test_merged_moments_equal_the_global_batch(spawned, reference):
    merged = fs.load(spawned[0] / "ddp").stats
    joined = _joined(merged, reference.stats)
    assert set(joined.kind) == {"activation", "gradient", "weight", "weight_grad"}
    for col in ("count", "nan", "inf", "frac_zero", "frac_saturated"):
        np.testing.assert_array_equal(joined[f"{col}_ddp"], joined[f"{col}_ref"], err_msg=col)
    for col in ("mean", "std", "rms", "min", "max", "absmax"):
        a, b = joined[f"{col}_ddp"].to_numpy(), joined[f"{col}_ref"].to_numpy()
        scale = np.abs(joined["rms_ref"].to_numpy())
        assert np.all(np.abs(a - b) <= 1e-5 * scale + 1e-12), col  # float32 sums per rank
    act = joined[(joined.kind == "activation") & (joined.step == 0)]
    assert (act.count_ddp == act.count_ref).all() and act.count_ddp.iloc[0] == BATCH * 32


def test_merged_log_histograms_are_exact(spawned, reference):
    keys = [*KEYS, "bin"]
    a = fs.load(spawned[0] / "ddp").hists.query("hist == 'log'")[[*keys, "count"]]
    b = reference.hists.query("hist == 'log'")[[*keys, "count"]]
    joined = a.merge(b, on=keys, how="outer", suffixes=("_ddp", "_ref")).fillna(0.0)
    np.testing.assert_array_equal(joined.count_ddp, joined.count_ref)


def test_merged_linear_histograms_within_one_bin(spawned, reference):
    a = fs.load(spawned[0] / "ddp").hists.query("hist == 'linear'")
    b = reference.hists.query("hist == 'linear'")
    moved = total = 0.0
    for key, ref in b.groupby(KEYS):
        got = a.set_index(KEYS).loc[key].sort_values("bin")
        ref = ref.sort_values("bin")
        exact, merged = ref["count"].to_numpy(), got["count"].to_numpy()
        assert merged.sum() == exact.sum(), key
        np.testing.assert_allclose(got["lo"], ref["lo"], rtol=1e-5, atol=1e-6 * ref.hi.abs().max())
        cdf_gap = np.abs(np.cumsum(merged) - np.cumsum(exact))[:-1]
        assert np.all(cdf_gap <= exact[:-1] + exact[1:]), key  # the documented bound
        moved += np.abs(merged - exact).sum() / 2
        total += exact.sum()
    assert moved / total < 0.1  # in this test: see docs/INTEGRATIONS.md for the numbers


def test_weights_and_synced_gradients_are_kept_from_rank_zero(spawned, reference):
    merged = fs.load(spawned[0] / "ddp").stats
    for kind in ("weight", "weight_grad"):
        got = merged[merged.kind == kind].set_index([*KEYS]).sort_index()["count"]
        ref = reference.stats[reference.stats.kind == kind].set_index([*KEYS]).sort_index()
        assert (got == ref["count"]).all()  # not doubled: one replica's numbers


def test_unsynced_weight_grads_warn_and_merge_as_samples(spawned):
    seen = spawned[1][0]
    assert any("record_synced_grads" in w for w in seen["unsynced_warning"])
    assert seen["unsynced_counts"]["0.weight"] == 2 * 32 * 6  # both ranks' local gradients


def test_dead_units_merge_into_the_global_batchs_share(spawned):
    model = _dead_model()
    with fs.watch(model, kinds=["dead_units"]) as rec:  # the global batch, one process
        model(_dead_batch())
    share = float(rec.stats.loc[rec.stats.kind == "dead_units", "mean"].iloc[0])
    assert share == 0.25  # u3 only; the ranks' shares (0.5 each) would average to 0.5
    for seen in spawned[1]:
        assert seen["dead"] == [share, 4.0]


def test_different_layers_on_ranks_raise_a_clear_error(spawned):
    for rank, seen in enumerate(spawned[1]):
        message = seen["mismatch"]
        assert "ranks recorded different snapshots" in message, rank
        assert "only rank 0 has" in message and "'1'" in message  # the Tanh, unwatched on rank 1


def test_sharded_study_matches_a_single_process_run(spawned, tmp_path):
    out, seen = spawned
    assert [s["sharded_result"] for s in seen] == [4, None]  # rank 0 merged, 4 configs ran
    single = engine.run_study(spec.validate(copy.deepcopy(STUDY), "s.toml"), tmp_path)
    sharded = pd.read_parquet(out / "sh" / "stats.parquet")
    cols = ["config", "layer", "kind", "tensor", "step", "count", "mean", "std"]
    a = sharded[cols].sort_values(cols[:5]).reset_index(drop=True)
    b = single.stats[cols].sort_values(cols[:5]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert (out / "sh" / "claims.json").is_file() and (out / "sh" / "configs.json").is_file()


# -- single-process pieces ----------------------------------------------------------------------


def test_merge_raw_of_shards_equals_the_whole_with_nonfinite_and_constant_parts():
    spec_ = HistSpec(bins=8)
    parts = [
        torch.tensor([float("nan"), 5.0, 7.0, float("inf")]),
        torch.full((3,), 2.0),
        torch.tensor([float("nan")]),
        torch.tensor([1e6 + 1, 1e6 - 3.0]),
    ]
    raws = torch.stack([snapshot(p, spec_)[0] for p in parts])[:, None]
    whole = snapshot(torch.cat(parts), spec_)[0]
    merged = distributed.merge_raw(raws)[0]
    torch.testing.assert_close(merged, whole, rtol=1e-9, atol=0.0, equal_nan=True)


def test_rebin_is_exact_for_the_part_spanning_the_range_and_for_constants():
    spec_ = HistSpec(bins=8)
    whole = torch.linspace(-1, 3, 50)
    for part in (whole, torch.full((5,), 1.3)):
        raw, lin, _ = snapshot(part, spec_)
        target = snapshot(whole, spec_)[0][None]
        got = distributed.rebin_linear(lin[None], raw[None], target)[0]
        expected = torch.histc(part, bins=8, min=-1, max=3).double()
        torch.testing.assert_close(got, expected)


def test_without_a_process_group_merge_only_flushes():
    model = _model()
    with fs.watch(model) as rec:
        model(torch.randn(2, 6)).sum().backward()
    n = len(rec._pending.keys)
    assert distributed.merge_pending(rec) == n and not rec._pending.keys
    assert distributed.rank_and_world() == (0, 1)
    with pytest.raises(FlowscopeError, match="replicated kinds"):
        distributed.merge_pending(rec, replicated=["weights"])
