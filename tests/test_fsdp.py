"""Sharded training (FSDP2, FSDP1 with and without use_orig_params): merged snapshots equal a
snapshot of the unsharded model over the global batch.

Two gloo processes on CPU are spawned once for the module; each runs every scenario and
rank 0 writes the merged frames; the tests compare them with the unsharded model trained in
this process on the global batch.
"""

from __future__ import annotations

import os
import pickle
import socket
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_batched import SYNCING, Ops  # the one list of calls that wait for a device
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.tensor import DTensor, Partial
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import flowscope as fs
from flowscope.integrations import distributed, fsdp
from flowscope.record import shards
from flowscope.record.pending import SnapKey
from flowscope.record.snapshot import RAW

WORLD = 2
BATCH = 8  # global batch; each rank gets BATCH // WORLD contiguous rows
STEPS = 2
KEYS = ["step", "layer_idx", "layer", "module_type", "kind", "call", "forward", "backward"]
KEYS += ["order", "tensor"]  # every key column of the frames
TP_KINDS = ["weight", "weight_grad"]
NETS = ("mlp", "block")
SCENARIOS = [
    *(f"{strategy}-{net}" for strategy in ("fsdp2", "fsdp1-orig", "fsdp1-flat") for net in NETS),
    # replicas (NO_SHARD; FSDP2 over a 2 x 1 replicate x shard mesh): each element counted once.
    # FSDP1's HYBRID_SHARD on such a mesh is left out: under gloo its ranks' gradients are not
    # all-reduced across the replicas (torch 2.13; checked without flowscope)
    *("fsdp1-noshard-mlp", "hsdp-mlp"),
]


class Block(nn.Module):
    """A pre-norm transformer block built by hand (attention + MLP) and a head; the head's
    bias has one element, so one rank's shard of it is empty."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(8, 21), nn.GELU(), nn.Linear(21, 8))
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(x)
        return self.head(self.layer(x))


def _model(net: str) -> nn.Module:
    torch.manual_seed(0)
    if net == "mlp":  # uneven shards: 33 rows, and a last layer of one row
        return nn.Sequential(
            nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 33), nn.ReLU(), nn.Linear(33, 1)
        )
    return Block()


def _data(net: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    shape = (BATCH, 6) if net == "mlp" else (BATCH, 3, 8)
    return torch.randn(*shape, generator=gen) * 2 + 0.5


def _train(model: nn.Module, rec: fs.Recorder, x: torch.Tensor, scale: float) -> None:
    """STEPS SGD steps on the mean square of the output; ``scale`` multiplies the loss and
    divides the gradients (the reference: the ranks' mean losses, their gradients averaged)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(STEPS):
        (model(x).square().mean() * scale).backward()
        if scale != 1.0:
            for p in model.parameters():
                p.grad /= scale
        distributed.record_synced_grads(rec)
        distributed.record_synced_grads(rec)  # again: the step's rows are replaced, not added
        opt.step()
        opt.zero_grad()
        rec.step()


# -- what each rank runs ------------------------------------------------------------------------


def _sharded(strategy: str, net: str) -> nn.Module:
    model = _model(net)
    if net == "block":  # the block's MLP under an activation checkpoint
        model.mlp = checkpoint_wrapper(model.mlp)
    units = (nn.Linear,) if net == "mlp" else (nn.TransformerEncoderLayer, nn.MultiheadAttention)
    if strategy in ("fsdp2", "hsdp"):
        # hsdp: 2 replicas of 1 shard (each rank holds every element: rank 0's count)
        dims = ("replicate", "shard")
        mesh = (
            init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=dims) if strategy == "hsdp" else None
        )
        for module in reversed(list(model.modules())):  # inner units first
            if isinstance(module, units):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return FullyShardedDataParallel(
        model,
        use_orig_params=strategy == "fsdp1-orig",
        sharding_strategy=ShardingStrategy.NO_SHARD if strategy == "fsdp1-noshard" else None,
        device_id=torch.device("cpu"),
        auto_wrap_policy=ModuleWrapPolicy(set(units)),
    )


def _scenario(rank: int, name: str) -> dict[str, object]:
    strategy, net = name.rsplit("-", 1)
    model = _sharded(strategy, net)
    x = _data(net)[rank * BATCH // WORLD : (rank + 1) * BATCH // WORLD]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = fs.watch(model, bins=16)
        _train(model, rec, x, 1.0)
        rec.close()
        distributed.merge_pending(rec)
    return {
        "stats": rec.stats,
        "hists": rec.hists,
        "warnings": [str(w.message) for w in caught if "flowscope" in str(w.message)],
    }


def _tensor_parallel() -> dict[str, object]:
    """Column- then row-parallel Linears (weights Shard(0), Shard(1); the row-parallel bias
    Replicate), the same batch on both ranks: weights and their gradients."""
    mesh = init_device_mesh("cpu", (WORLD,))
    model = _model("mlp")
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    with fs.watch(model, kinds=TP_KINDS, bins=16) as rec:
        _train(model, rec, _data("mlp"), 1.0)
    distributed.merge_pending(rec)
    return {"stats": rec.stats, "hists": rec.hists}


class Addends(nn.Module):
    """A parameter held as a DTensor with a Partial placement (addends of a pending sum)."""

    def __init__(self) -> None:
        super().__init__()
        mesh = init_device_mesh("cpu", (WORLD,))
        self.w = nn.Parameter(DTensor.from_local(torch.ones(3), mesh, [Partial()]))
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _partial() -> dict[str, object]:
    model = Addends()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fs.watch(model, kinds=["weight"]) as rec:
            model(torch.ones(2, 3))
        distributed.merge_pending(rec)
    inside = {}
    for strategy, net in (("fsdp1-flat", "block"), ("fsdp1-orig", "block"), ("fsdp1-orig", "mlp")):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            fs.watch(_sharded(strategy, net).module).close()  # the module in the wrapper
        inside[f"{strategy}-{net}"] = [str(w.message) for w in said if "flowscope" in str(w)]
    return {"warnings": [str(w.message) for w in caught], "rows": list(rec.stats.layer), **inside}


def _unmerged() -> list[str]:
    """Frames asked for before the merge: each rank's own shards, said loudly."""
    model = _sharded("fsdp2", "mlp")
    with fs.watch(model, kinds=["weight"]) as rec:
        model(_data("mlp"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec.stats  # noqa: B018 (the flush)
    return [str(w.message) for w in caught]


def _syncing_calls() -> dict[str, list[str]]:
    """Calls that wait for a device (test_batched.SYNCING) in an FSDP2 step, bare and
    recorded: the recorder's hooks and record_synced_grads add none. The torch path of the
    snapshots (what runs on a GPU): the C kernel's calls do not pass torch's dispatcher."""
    os.environ["FLOWSCOPE_KERNELS"] = "eager"
    seen: dict[str, list[str]] = {}
    for recorded in (False, True):
        model = _sharded("fsdp2", "mlp")
        rec = fs.watch(model) if recorded else None
        with Ops() as ops:
            model(_data("mlp")).square().mean().backward()
            if rec is not None:
                distributed.record_synced_grads(rec)
                rec.step()
        if rec is not None:
            rec.close()
            distributed.merge_pending(rec)
        name = "recorded" if recorded else "bare"
        seen[name] = sorted(n for n in ops.names if n in SYNCING)
        seen[f"{name} calls"] = ops.names
    del os.environ["FLOWSCOPE_KERNELS"]
    return seen


def _update_ratios(model: nn.Module) -> pd.Series:
    """update_ratio of each parameter over 2 SGD steps on the same batch on every rank."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = fs.watch(model, optimizer=opt, kinds=["weight"])
    for _ in range(STEPS):
        model(_data("mlp")).square().mean().backward()
        opt.step()
        opt.zero_grad()
        rec.step()
    rec.close()
    distributed.merge_pending(rec)
    ratios = rec.stats.query("kind == 'update_ratio'")
    return ratios.set_index(["step", "layer", "tensor"])[["count", "mean"]]


def _lightning_fsdp1(out: str) -> dict[str, object]:
    """Lightning's callback under an FSDP1 strategy (a stand-in trainer: Lightning's
    FSDPStrategy needs a GPU): it watches the wrapper around the LightningModule."""
    from flowscope.integrations.lightning import FlowscopeCallback

    wrapper = _sharded("fsdp1-flat", "block")
    callback = FlowscopeCallback(out, every=1, report=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.on_train_start(SimpleNamespace(model=wrapper), wrapper.module)
    rec = callback.recorder
    assert rec is not None
    rec.close()
    said = [str(w.message) for w in caught if "flowscope" in str(w.message)]
    return {"watched": type(rec.model).__name__, "run": rec.name, "warnings": said}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        seen = {name: _scenario(rank, name) for name in SCENARIOS}
        seen["tp"] = _tensor_parallel()
        seen["partial"] = _partial()
        seen["unmerged"] = _unmerged()
        seen["syncing"] = _syncing_calls()
        seen["update_ratio"] = _update_ratios(_sharded("fsdp2", "mlp"))
        seen["lightning"] = _lightning_fsdp1(str(Path(out) / "pl"))
        (Path(out) / f"rank{rank}.pkl").write_bytes(pickle.dumps(seen))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out)), nprocs=WORLD)
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def references() -> dict[str, fs.Recorder]:
    """The unsharded model, one process, the global batch (loss scaled, gradients averaged)."""
    refs = {}
    for net in ("mlp", "block"):
        model = _model(net)
        rec = fs.watch(model, bins=16)
        _train(model, rec, _data(net), float(WORLD))
        rec.close()
        refs[net] = rec
    return refs


def _joined(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    joined = a.merge(b, on=KEYS, how="outer", suffixes=("_fsdp", "_ref"), indicator=True)
    missing = joined[joined._merge != "both"][[*KEYS, "_merge"]]
    assert missing.empty, missing.to_string()
    return joined


@pytest.mark.parametrize("name", SCENARIOS)
def test_merged_statistics_equal_the_unsharded_model(spawned, references, name):
    merged = spawned[0][name]["stats"]
    ref = references[name.rsplit("-", 1)[1]].stats
    joined = _joined(merged, ref)
    assert set(joined.kind) == {"activation", "gradient", "weight", "weight_grad"}
    _assert_same(joined)


def _assert_same(joined: pd.DataFrame) -> None:
    """Counts equal, moments and extremes within 1e-5 of the snapshot's rms."""
    for col in ("count", "nan", "inf", "frac_zero"):
        np.testing.assert_array_equal(joined[f"{col}_fsdp"], joined[f"{col}_ref"], err_msg=col)
    for col in ("mean", "std", "rms", "min", "max", "absmax"):
        a, b = joined[f"{col}_fsdp"].to_numpy(), joined[f"{col}_ref"].to_numpy()
        scale = np.abs(joined["rms_ref"].to_numpy())
        bad = np.abs(a - b) > 1e-5 * scale + 1e-9
        assert not bad.any(), (col, joined.loc[bad, KEYS].to_string())


@pytest.mark.parametrize("name", SCENARIOS)
def test_merged_log_histograms_are_exact(spawned, references, name):
    keys = [*KEYS, "bin"]
    # attention's in_proj_bias is left out: its key third has a gradient that is zero in exact
    # arithmetic (softmax ignores a shift shared by every key), so what it holds is rounding
    # noise, which differs between a batch of 4 and of 8 (its moments agree to 1e-9)
    query = "hist == 'log' and tensor != 'in_proj_bias'"
    a = spawned[0][name]["hists"].query(query)[[*keys, "count"]]
    b = references[name.rsplit("-", 1)[1]].hists.query(query)[[*keys, "count"]]
    joined = a.merge(b, on=keys, how="outer", suffixes=("_fsdp", "_ref")).fillna(0.0)
    np.testing.assert_array_equal(joined.count_fsdp, joined.count_ref)


@pytest.mark.parametrize("name", SCENARIOS)
def test_merged_linear_histograms_are_within_one_bin(spawned, references, name):
    """Shards' histograms are re-binned onto the whole's range as DDP's are: totals exact,
    each value in its own bin or a neighbour (the bound in docs/INTEGRATIONS.md)."""
    got = spawned[0][name]["hists"].query("hist == 'linear'").set_index(KEYS)
    ref = references[name.rsplit("-", 1)[1]].hists.query("hist == 'linear'")
    for key, exact in ref.groupby(KEYS):
        exact = exact.sort_values("bin")["count"].to_numpy()
        merged = got.loc[key].sort_values("bin")["count"].to_numpy()
        assert merged.sum() == exact.sum(), key
        gap = np.abs(np.cumsum(merged) - np.cumsum(exact))[:-1]
        assert np.all(gap <= exact[:-1] + exact[1:]), key


def test_every_rank_holds_the_same_merged_frames_with_the_users_names(spawned):
    for name in SCENARIOS:
        a, b = (seen[name]["stats"] for seen in spawned)
        pd.testing.assert_frame_equal(a[[*KEYS, "count", "mean"]], b[[*KEYS, "count", "mean"]])
        layers = set(a.layer)
        assert not any(w in layer for layer in layers for w in shards.WRAPPERS), layers
        assert "FSDP" not in "".join(a.module_type.unique()), name
    block = set(spawned[0]["fsdp2-block"]["stats"].layer)
    assert {"mlp.0", "attn", "layer.linear1", "head"} <= block


def test_no_scenario_warns(spawned):
    for name in SCENARIOS:
        assert spawned[0][name]["warnings"] == [], name


def test_tensor_parallel_weights_and_gradients_equal_the_unsharded_model(spawned):
    model = _model("mlp")
    with fs.watch(model, kinds=TP_KINDS, bins=16) as ref:
        _train(model, ref, _data("mlp"), 1.0)
    joined = _joined(spawned[0]["tp"]["stats"], ref.stats)
    assert set(joined.kind) == set(TP_KINDS) and len(joined) == 2 * 2 * 3 * STEPS
    _assert_same(joined)


def test_a_partial_placement_is_left_out_with_a_warning_not_a_crash(spawned):
    for seen in spawned:
        said = [w for w in seen["partial"]["warnings"] if "Partial" in w]
        assert len(said) == 1 and "is not recorded ('<root>' weight 'w'" in said[0], seen["partial"]
        assert "<root>" not in seen["partial"]["rows"] and "lin" in seen["partial"]["rows"]


def test_watching_the_module_inside_an_fsdp1_wrapper_warns(spawned):
    for seen in spawned:
        for name in ("fsdp1-flat-block", "fsdp1-orig-block"):  # the root's own LayerNorm, head
            said = seen["partial"][name]
            assert len(said) == 1 and "watch the wrapper instead" in said[0], (name, said)
        assert seen["partial"]["fsdp1-orig-mlp"] == []  # every parameter in a visible unit


def test_recording_a_sharded_step_adds_no_call_that_waits_for_a_device(spawned):
    for seen in spawned:
        calls = seen["syncing"]
        assert calls["recorded"] == calls["bare"], (calls["recorded"], calls["bare"])
        assert len(calls["recorded calls"]) > len(calls["bare calls"]) + 100  # the mode saw it


def test_update_ratios_of_dtensor_parameters_are_the_whole_parameters(spawned):
    """DTensor arithmetic makes the norms of the whole (all-reduces at rec.step()); the
    replicated one-element ratio is counted once."""
    ref = _update_ratios(_model("mlp"))
    for seen in spawned:
        got = seen["update_ratio"]
        assert len(got) == len(ref) == 6 * STEPS and (got["count"] == 1).all()
        np.testing.assert_allclose(got["mean"], ref.loc[got.index, "mean"], rtol=1e-6)


def test_lightning_under_fsdp1_watches_the_wrapper(spawned):
    for seen in spawned:
        got = seen["lightning"]
        assert got == {"watched": "FullyShardedDataParallel", "run": "Block", "warnings": []}


def test_frames_asked_for_before_the_merge_say_so(spawned):
    for seen in spawned:
        assert any("flushed unmerged" in w for w in seen["unmerged"]), seen["unmerged"]


def test_parts_that_miss_elements_of_the_whole_warn():
    key = SnapKey(0, 0, "fc", "Linear", "weight", 0, 0, -1, 0, "w", "float32", "cpu")
    merged = torch.zeros(1, len(RAW))
    merged[0, RAW["numel"]] = 6.0
    fsdp.check_coverage([key], merged, [6])  # complete: silent
    with pytest.warns(RuntimeWarning, match=r"fc\.w weight: 6 of 8"):
        fsdp.check_coverage([key], merged, [8])


def test_local_part_of_a_plain_tensor_is_none_and_names_lose_wrappers():
    assert shards.local_part(torch.ones(3)) is None
    assert shards.user_name("_orig_mod._fsdp_wrapped_module") == ""
    assert shards.user_name("a._checkpoint_wrapped_module.b") == "a.b"
