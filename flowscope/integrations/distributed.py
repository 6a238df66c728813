"""flowscope under ``torch.distributed``: merge what the ranks recorded, shard study sweeps.

Under DDP every rank records its own shard of the global batch. :func:`merge_pending` turns
the snapshots every rank holds into snapshots of the global batch, with three batched
collectives in all (whatever the number of layers and steps), and then flushes them:

1. ``all_gather_object`` of a digest of the snapshot keys: every rank must have recorded the
   same (step, layer, kind, call, tensor, dtype) snapshots, else a :class:`FlowscopeError`
   names what differs (the full key lists are gathered only then, to say what).
2. ``all_gather`` of the raw statistic vectors (11 numbers per snapshot and rank), stacked
   into one tensor. Each rank then combines them locally, in float64, in the same order, so
   every rank ends with bit-identical merged statistics: counts add; the sums are re-expressed
   about one common shift ``c`` (that of the first rank holding a finite value) with
   ``Σ(x−c) = Σ(x−c_r) + m_r(c_r−c)`` and
   ``Σ(x−c)² = Σ(x−c_r)² + 2(c_r−c)Σ(x−c_r) + m_r(c_r−c)²`` over the ``m_r`` finite values;
   min and max are the extremes over the ranks. (Gathering 11 numbers is as cheap as
   reducing them, and one gather replaces a shift broadcast plus SUM, MIN and MAX reductions.)
3. one SUM ``all_reduce`` of the histograms of all snapshots, stacked: the log-magnitude
   histogram has fixed edges, so its counts add exactly; each rank's linear histogram, taken
   over the rank's own ``[min, max]``, is first re-binned locally onto the global
   ``[min, max]`` grid (below), then added.

**Linear histogram bound.** A rank's range lies inside the global range, so a rank's bins are
no wider than the global bins and each overlaps at most two of them. The count of a rank bin
goes to the global bin holding the rank bin's centre, so every sample is counted in its own
global bin or in a neighbouring one (never further), and the total is exact. Equivalently, the
merged cumulative count at each interior edge is off by at most the counts of the two global
bins beside that edge. It is exact for a rank whose range is the global range, for constant
tensors, and when all ranks share one range.

**What is merged, by kind.** ``activation`` and ``gradient`` hold one value per sample of the
local batch, so the merge is the concatenation over ranks: the global batch. ``weight`` is
replicated by DDP, and ``weight_grad`` is after DDP's all-reduce, so for those (``replicated``)
rank 0's snapshot is kept when every rank's statistics agree (checked; rtol 1e-5). The
recorder's parameter hook fires *before* DDP averages the gradients, so call
:func:`record_synced_grads` after ``backward()`` on recorded steps; replicated snapshots that
differ across ranks are merged as samples instead, with a warning. ``gradient`` rows hold
``dL_r/d(output)`` of each rank's own loss: with a mean-reduced loss, the gradient of the
global-batch loss is these divided by the world size (the factor DDP applies to parameter
gradients). ``dead_units`` (asked for with ``kinds=``): a unit is dead in the global batch
when it is dead in every rank's, so the ranks' per-unit indicators (kept by the recorder
until the flush) are MIN-reduced in one more collective and snapshotted again; the ranks'
shares would only bound it from above.

**Sharded parameters** (FSDP2, FSDP1, tensor parallel): each rank recorded its own part of a
``weight`` or ``weight_grad`` (:mod:`flowscope.record.shards`, noted in ``rec.shards``); those
rows are merged as samples, whatever ``replicated`` says, into the whole parameter's
statistics, and :func:`flowscope.integrations.fsdp.check_coverage` warns when the parts do not
add up to it. Whether a row is a part is part of the key digest, so it adds no collective.

Histogram sample strides: when the ranks' strides differ, counts are weighted by
``stride_r / min(stride)`` so that ``count × hist_stride`` still estimates the full tensor.

Study sweeps over ranks: :mod:`flowscope.integrations.sharded`.

Example: examples/ddp_train.py (``torchrun --nproc_per_node=2 examples/ddp_train.py``:
several processes, so a script rather than a docstring example; tests/test_examples.py runs
it). Each rank watches the module inside the DDP wrapper,
``rec = fs.watch(ddp_model.module, every=50)``; after each ``backward()`` it calls
``distributed.record_synced_grads(rec)`` (the averaged gradients) before ``opt.step()``,
``opt.zero_grad()`` and ``rec.step()``; at the end every rank calls
``distributed.save_merged(rec, "reports/ddp")`` and rank 0 writes the records of the global
batch. Without a process group the same script runs as one process.

This module imports torch only.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from flowscope.core.errors import FlowscopeError
from flowscope.integrations.fsdp import check_coverage, record_flat_shards
from flowscope.record.recorder import KINDS, ROOT, Recorder, SnapKey
from flowscope.record.shards import user_name
from flowscope.record.snapshot import RAW, split_row

__all__ = [
    "REPLICATED",
    "merge_pending",
    "rank_and_world",
    "record_synced_grads",
    "save_merged",
]

REPLICATED = ("weight", "weight_grad")
_MATCH_FIELDS = (
    *("step", "layer_idx", "layer", "module_type", "kind", "call"),
    *("forward", "backward", "order", "tensor", "dtype"),
)
_SUMMED = ("numel", "nonfinite", "nan", "nonzero", "saturated")
_RTOL = 1e-5  # replicated snapshots agree to this relative tolerance on every raw field


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when no process group is initialised.

    Example:
        >>> rank_and_world()
        (0, 1)
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


# -- merging snapshots -------------------------------------------------------------------------


def merge_pending(
    rec: Recorder, group: Any = None, *, replicated: Sequence[str] = REPLICATED
) -> int:
    """Merge every rank's pending snapshots into snapshots of the global batch, then flush.

    Every rank of ``group`` must call it at the same point (it runs collectives); afterwards
    ``rec.stats`` / ``rec.hists`` on any rank describe the global batch, and rank 0 usually
    writes them (:func:`save_merged`). Snapshots already flushed are not touched, so call it
    before anything that flushes (``rec.stats``, ``rec.save``, ``rec.records()``); calling it
    again later merges only the snapshots recorded since. Without an initialised process
    group (or with one rank) it only flushes.

    Example:
        >>> import torch, flowscope as fs
        >>> model = torch.nn.Linear(3, 2)
        >>> with fs.watch(model) as rec:
        ...     model(torch.randn(4, 3)).sum().backward()
        >>> merge_pending(rec)  # one process: flushed, nothing to merge
        6

    Args:
        rec: the recorder of this rank.
        group: the process group (default: the world).
        replicated: kinds that are identical on every rank (kept from rank 0 when they are);
            the other kinds are concatenated over ranks.

    Returns:
        The number of snapshots merged (pending snapshots flushed, without a group).

    Raises:
        FlowscopeError: when the ranks recorded different snapshots, or for an unknown kind.
    """
    bad = [k for k in replicated if k not in KINDS]
    if bad:
        raise FlowscopeError(f"replicated kinds must be among {', '.join(KINDS)}, got {bad}")
    pending = rec.pending()
    count = len(pending)
    world = rank_and_world(group)[1]
    parts = dict(rec.shards)  # parts of sharded tensors -> the whole's size: samples
    rec.shards.clear()
    dead = dict(rec.dead_vectors)
    if world > 1:
        order = sorted(range(count), key=lambda i: _match_key(pending[i][0]))
        keys = [(*_match_key(pending[i][0]), pending[i][0] in parts) for i in order]
        _check_same_keys(keys, group, world)
        if order:
            _merge_rows(rec, pending, order, group, world, (tuple(replicated), parts))
            _merge_dead_units(rec, pending, order, dead, group)
            rec.set_pending(pending)
    rec.flush()
    return count


def _match_key(key: SnapKey) -> tuple[Any, ...]:
    """The fields that must agree across ranks (not the device: cuda:0 on rank 0, ...)."""
    return tuple(getattr(key, f) for f in _MATCH_FIELDS)


def _check_same_keys(keys: list[tuple[Any, ...]], group: Any, world: int) -> None:
    """Raise on every rank, with the differences, unless all ranks hold the same keys."""
    digest = hashlib.sha256(repr(keys).encode()).hexdigest()
    digests: list[Any] = [None] * world
    dist.all_gather_object(digests, (len(keys), digest), group=group)
    if all(d == digests[0] for d in digests):
        return
    lists: list[Any] = [None] * world
    dist.all_gather_object(lists, keys, group=group)
    raise FlowscopeError(_difference(lists))


def _difference(lists: list[list[tuple[Any, ...]]]) -> str:
    """What differs between the ranks' snapshot keys, in words."""
    sets = [set(keys) for keys in lists]
    every = set.intersection(*sets)
    parts = []
    for rank, keys in enumerate(sets):
        extra = sorted(keys - every)
        if extra:
            shown = "; ".join(_describe(k) for k in extra[:4])
            more = f" and {len(extra) - 4} more" if len(extra) > 4 else ""
            parts.append(f"only rank {rank} has {shown}{more}")
    counts = ", ".join(f"rank {r}: {len(keys)}" for r, keys in enumerate(lists))
    detail = "; ".join(parts) or "the same snapshots in different multiplicities"
    return (
        f"ranks recorded different snapshots, so they cannot be merged ({counts}): {detail}. "
        "Every rank must watch the same modules of the same model with the same settings and "
        "call rec.step() equally often."
    )


def _describe(key: tuple[Any, ...]) -> str:
    f = dict(zip(_MATCH_FIELDS, key, strict=False))  # the last entry: a sharded tensor's part
    tensor = f" tensor {f['tensor']!r}" if f["tensor"] else ""
    return f"step {f['step']} layer {f['layer']!r} {f['kind']} call {f['call']}{tensor}"


def _merge_rows(
    rec: Recorder,
    pending: list[tuple[SnapKey, torch.Tensor]],
    order: list[int],
    group: Any,
    world: int,
    how: tuple[tuple[str, ...], dict[SnapKey, int]],
) -> None:
    """Replace the snapshots ``order`` of ``pending`` (sorted alike on every rank) by merged
    ones, in place. ``how``: the replicated kinds, and the parts of sharded tensors with the
    size of each whole tensor (merged as samples, their sum checked)."""
    replicated, parts = how
    # an accelerator's rows where there are (NCCL gathers no CPU tensor; FSDP's CPU offload
    # leaves weight rows on the CPU beside activation rows on the GPU)
    devices = [pending[i][1].device for i in order]
    device = next((d for d in devices if d.type != "cpu"), devices[0])
    stacked = torch.stack([pending[i][1].to(device) for i in order])
    raw, lins, logs = split_row(stacked, rec.hist)
    gathered = [torch.empty_like(raw) for _ in range(world)]
    dist.all_gather(gathered, raw, group=group)
    every = torch.stack(gathered)  # (rank, snapshot, field)
    keys = [pending[i][0] for i in order]
    keep = _agreeing(every, [k.kind for k in keys], replicated)
    keep = [k and keys[s] not in parts for s, k in enumerate(keep)]
    rows = [s for s, k in enumerate(keep) if not k]
    if not rows:
        return
    _warn_disagreeing([keys[s] for s in rows if keys[s] not in parts], replicated)
    sub = every[:, rows]
    merged = merge_raw(sub)
    sharded = [j for j, s in enumerate(rows) if keys[s] in parts]
    whole = [parts[keys[rows[j]]] for j in sharded]
    check_coverage([keys[rows[j]] for j in sharded], merged[sharded], whole)
    weight = _stride_weights(sub)[dist.get_rank(group)]
    lin = rebin_linear(lins[rows], raw[rows], merged)
    hists = torch.cat([lin, logs[rows]], dim=1) * weight[:, None]
    dist.all_reduce(hists, group=group)  # one SUM for every histogram of every snapshot
    for j, s in enumerate(rows):
        pending[order[s]] = pending[order[s]][0], torch.cat([merged[j], hists[j]])


def _merge_dead_units(
    rec: Recorder,
    pending: list[tuple[SnapKey, torch.Tensor]],
    order: list[int],
    dead: dict[SnapKey, torch.Tensor],
    group: Any,
) -> None:
    """``dead_units`` rows of the global batch: a unit is dead there when it is dead on every
    rank's batch, so the ranks' per-unit indicators are MIN-reduced (one collective for all)
    and snapshotted again; averaging the ranks' shares would overstate it."""
    idx = [i for i in order if pending[i][0] in dead]  # the same keys, in the same order
    if not idx:
        return
    vectors = [dead[pending[i][0]] for i in idx]
    flat = torch.cat([v.reshape(-1) for v in vectors])
    dist.all_reduce(flat, op=dist.ReduceOp.MIN, group=group)
    for i, merged in zip(idx, flat.split([v.numel() for v in vectors]), strict=True):
        row = rec.snapshot_row(merged, pending[i][0])
        if row is not None:
            pending[i] = pending[i][0], row


def _agreeing(every: torch.Tensor, kinds: list[str], replicated: tuple[str, ...]) -> list[bool]:
    """Per snapshot: a replicated kind whose raw statistics agree on every rank."""
    same = torch.isclose(every, every[:1], rtol=_RTOL, atol=0.0, equal_nan=True).all(2).all(0)
    return [k in replicated and bool(s) for k, s in zip(kinds, same.tolist(), strict=True)]


def _warn_disagreeing(merged_keys: list[SnapKey], replicated: tuple[str, ...]) -> None:
    """Warn once when replicated kinds differ across ranks (merged as samples instead)."""
    odd = [k for k in merged_keys if k.kind in replicated]
    if odd:
        shown = ", ".join(f"{k.layer!r} {k.kind} (step {k.step})" for k in odd[:4])
        warnings.warn(
            f"flowscope: {len(odd)} {'/'.join(sorted({k.kind for k in odd}))} snapshot(s) "
            f"differ across ranks ({shown}{', ...' if len(odd) > 4 else ''}); merged as samples "
            "of all ranks. Under DDP call flowscope.distributed.record_synced_grads(rec) "
            "after backward() so that weight_grad holds the averaged gradient.",
            RuntimeWarning,
            stacklevel=4,
        )


def merge_raw(every: torch.Tensor) -> torch.Tensor:
    """Raw statistic vectors of the concatenation, from each part's: (rank, snap, F) -> (snap, F).

    Example:
        >>> from flowscope.record.snapshot import HistSpec, snapshot
        >>> a, b = torch.tensor([1.0, 2.0]), torch.tensor([4.0, 8.0])
        >>> parts = torch.stack([snapshot(t, HistSpec())[0] for t in (a, b)])[:, None]
        >>> whole = snapshot(torch.cat([a, b]), HistSpec())[0]
        >>> torch.allclose(merge_raw(parts)[0], whole, equal_nan=True)  # NaN: no saturation
        True
    """
    col = {name: every[..., i] for name, i in RAW.items()}
    finite = col["numel"] - col["nonfinite"]
    has = finite > 0
    first = has.to(torch.uint8).argmax(0, keepdim=True)  # the first rank with a finite value
    shift = col["shift"].gather(0, first)[0]
    # one common scale (the largest, a power of two): every part's sums are moved onto it
    scale = torch.where(has, col["scale"], 0.0).amax(0)
    scale = torch.where(scale > 0, scale, 1.0)
    ratio = torch.where(has, col["scale"] / scale, 0.0)
    d = torch.where(has, col["shift"] / scale - shift / scale, 0.0)
    s = torch.where(has, col["sum"] * ratio, 0.0)
    q = torch.where(has, col["sumsq"] * ratio * ratio, 0.0)
    merged = {
        "sum": (s + finite * d).sum(0),
        "sumsq": (q + 2 * d * s + finite * d * d).sum(0),
        "min": torch.where(has, col["min"], math.inf).amin(0),
        "max": torch.where(has, col["max"], -math.inf).amax(0),
        "shift": shift,
        "scale": scale,
    }
    any_finite = has.any(0)
    out = every[0].clone()  # no finite value anywhere: rank 0's (0 or NaN, as a snapshot has)
    for name, value in merged.items():
        out[:, RAW[name]] = torch.where(any_finite, value, every[0, :, RAW[name]])
    for name in _SUMMED:  # saturated is NaN where the module has no saturation interval
        total = col[name].nansum(0)
        out[:, RAW[name]] = torch.where(col[name].isnan().all(0), math.nan, total)
    out[:, RAW["stride"]] = _merged_stride(every)
    return out


def _merged_stride(every: torch.Tensor) -> torch.Tensor:
    """The smallest sample stride among ranks that saw elements (1 if none did)."""
    stride = every[..., RAW["stride"]]
    stride = torch.where(every[..., RAW["numel"]] > 0, stride, math.inf).amin(0)
    return torch.where(torch.isfinite(stride), stride, 1.0)


def _stride_weights(every: torch.Tensor) -> torch.Tensor:
    """(rank, snap) weights stride_r / merged stride: counts × stride estimate the tensor."""
    return every[..., RAW["stride"]] / _merged_stride(every)


def rebin_linear(lin: torch.Tensor, own: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """Linear histograms over each row's own range, moved onto the merged range's bins.

    The count of each own bin goes to the merged bin holding the own bin's centre; own ranges
    lie inside the merged ones, so a sample moves to its true merged bin or a neighbour.

    Example:
        >>> from flowscope.record.snapshot import HistSpec, snapshot
        >>> spec = HistSpec(bins=4)
        >>> part, whole = torch.tensor([2.0, 3.0]), torch.tensor([0.0, 2.0, 3.0, 4.0])
        >>> raw, lin, _ = snapshot(part, spec)
        >>> rebin_linear(lin[None], raw[None], snapshot(whole, spec)[0][None]).tolist()
        [[0.0, 0.0, 2.0, 0.0]]

        Exactly it is ``[0, 0, 1, 1]``: 3.0 opens the last merged bin, and the centre of its
        own bin, 2.875, lies in the bin before. One bin off, as bounded.

    Args:
        lin: (snap, bins) counts over each snapshot's own [min, max].
        own: (snap, F) raw vectors those histograms were taken with.
        merged: (snap, F) raw vectors of the merged snapshots.

    Returns:
        (snap, bins) counts over the merged [min, max].
    """
    bins = lin.shape[1]
    r = {name: own[:, i : i + 1] for name, i in RAW.items()}
    g = {name: merged[:, i : i + 1] for name, i in RAW.items()}
    # in halves of the values: differences stay finite up to float64's limits
    offset = r["min"] * 0.5 - g["min"] * 0.5  # own lo - merged lo
    width = (r["max"] * 0.5 - r["min"] * 0.5) / bins
    span = g["max"] * 0.5 - g["min"] * 0.5
    centre = offset + (torch.arange(bins, device=lin.device, dtype=own.dtype) + 0.5) * width
    scale = torch.where(span > 0, bins / span, torch.zeros_like(span))
    pos = torch.nan_to_num(centre * scale, 0.0, bins - 1.0, 0.0).floor().clamp(0, bins - 1)
    out = torch.zeros_like(lin)
    return out.scatter_add_(1, pos.long(), lin)


# -- DDP's averaged gradients -------------------------------------------------------------------


def record_synced_grads(rec: Recorder) -> int:
    """Re-record this step's ``weight_grad`` snapshots from the parameters' current ``.grad``.

    Under DDP the recorder's parameter hook sees each rank's local gradient, before DDP
    averages it; after ``backward()`` returns, ``.grad`` holds the average, identical on every
    rank, which is the gradient the optimizer applies. Call this after ``backward()`` and
    before ``zero_grad()`` on each step (it returns at once on unrecorded steps). Reads
    tensors on their device; no host synchronisation. Under FSDP1 it also records every
    flattened parameter's ``weight`` and ``weight_grad`` from this rank's shard
    (:func:`flowscope.integrations.fsdp.record_flat_shards`); under FSDP2 the gradients'
    local shards are re-read (they are reduced already).

    Example:
        >>> import torch, flowscope as fs
        >>> model = torch.nn.Linear(3, 2)
        >>> rec = fs.watch(model)
        >>> model(torch.randn(4, 3)).sum().backward()
        >>> record_synced_grads(rec)  # weight and bias
        2
        >>> rec.close()

    Returns:
        The number of snapshots re-recorded.
    """
    if not rec.active:
        return 0
    flat = record_flat_shards(rec)  # FSDP1: the flat parameters' shards
    pending = rec.pending()
    done = 0
    for i, (key, _) in enumerate(pending):
        if key.kind != "weight_grad" or key.step != rec.step_index:
            continue
        param = _parameter(rec, key)
        if param is None or param.grad is None:
            continue
        row = rec.snapshot_row(param.grad, key)  # the recorder's own path and settings
        if row is not None:
            pending[i] = key, row
            done += 1
    if done:
        rec.set_pending(pending)
    return done + flat


def _parameter(rec: Recorder, key: SnapKey) -> torch.Tensor | None:
    """The parameter a weight_grad snapshot was taken of (None if the model changed)."""
    modules = {user_name(q) or ROOT: m for q, m in rec.targets}  # keys name no wrappers
    module = modules.get(key.layer)
    if module is None:
        return None
    return dict(module.named_parameters(recurse=False)).get(key.tensor)


def save_merged(rec: Recorder, out_dir: str | Path, group: Any = None) -> Path | None:
    """Merge every rank's snapshots (:func:`merge_pending`); rank 0 writes ``out_dir``.

    Every rank must call it. Returns once the folder is written, on every rank.

    Example:
        >>> import torch, flowscope as fs
        >>> model = torch.nn.Linear(3, 2)
        >>> with fs.watch(model) as rec:
        ...     model(torch.randn(4, 3)).sum().backward()
        >>> save_merged(rec, "reports/merged")  # one process: rank 0 of 1
        PosixPath('reports/merged')

    Returns:
        ``out_dir`` on rank 0, None on the other ranks.
    """
    merge_pending(rec, group)
    rank, world = rank_and_world(group)
    out = Path(out_dir) if rank == 0 else None
    if out is not None:
        rec.save(str(out))
    if world > 1:
        dist.barrier(group=group)
    return out
