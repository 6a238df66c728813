"""flowscope under FSDP and DTensor parameters: each rank's shard, merged into the whole.

Under FSDP2 (``fully_shard``) and tensor parallelism, parameters and their gradients are
DTensors: the recorder snapshots each rank's local part (:mod:`flowscope.record.shards`) and
notes the size of the whole tensor in ``rec.shards``. FSDP1 (``FullyShardedDataParallel``)
flattens parameters: :func:`record_flat_shards` (called by
:func:`flowscope.integrations.distributed.record_synced_grads` after ``backward()``) snapshots
each original parameter's slice of this rank's flat shard and of its reduced gradient.

:func:`flowscope.integrations.distributed.merge_pending` then merges these parts as samples
(never as replicas) in the same three collectives as the DDP merge: counts and the moments
about a common shift add, min and max combine, log histograms add on their fixed edges, linear
histograms are re-binned onto the whole tensor's range. The result equals a snapshot of the
unsharded tensor (moments to float rounding; histograms exactly while a part and the whole
are counted whole, i.e. hold at most ``hist_sample`` elements). :func:`check_coverage` warns
when the parts do not add up to the whole tensor (a parameter no rank held in a step).

This module imports torch only.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from flowscope.record.reader import device_name, dtype_name
from flowscope.record.recorder import ROOT, Recorder, SnapKey
from flowscope.record.shards import FlatShard, flat_shards, user_name, user_type
from flowscope.record.snapshot import RAW

__all__ = ["check_coverage", "record_flat_shards"]


def record_flat_shards(rec: Recorder) -> int:
    """Record ``weight`` and ``weight_grad`` of every parameter FSDP1 flattened, from this
    rank's shard; call it after ``backward()`` on each step (a no-op on unrecorded steps and
    for models without ``FullyShardedDataParallel``).

    Example:
        >>> import torch, flowscope as fs
        >>> model = torch.nn.Linear(3, 2)
        >>> with fs.watch(model) as rec:
        ...     model(torch.randn(4, 3)).sum().backward()
        ...     record_flat_shards(rec)  # no FSDP1 wrapper: nothing to add
        0

    Returns:
        The number of snapshots recorded (every rank records the same keys: a rank holding no
        element of a parameter records an empty part).
    """
    if not rec.active:
        return 0
    parts = flat_shards(rec.model)
    if not parts:
        return 0
    pending = rec.pending()
    at = {k: i for i, (k, _) in enumerate(pending)}  # called twice in a step: rows replaced
    seen = _layers_seen(pending, rec.step_index)
    uncalled = _uncalled_indices(parts, seen[0])
    done = 0
    for part in parts:
        for kind in [k for k in ("weight", "weight_grad") if k in rec.kinds]:
            tensor = part.value if kind == "weight" else part.grad
            key = None if tensor is None else _flat_key(rec, part, kind, tensor, seen)
            if key is not None and key.layer_idx < 0:
                key = key._replace(layer_idx=uncalled[key.layer])
            row = None if key is None or tensor is None else rec.snapshot_row(tensor, key)
            if key is None or row is None:
                continue
            if key in at:
                pending[at[key]] = key, row
            else:
                pending.append((key, row))
            rec.shards[key] = part.numel
            done += 1
    rec.set_pending(pending)
    return done


_Seen = tuple[dict[str, SnapKey], dict[str, SnapKey]]


def _layers_seen(pending: list[tuple[SnapKey, torch.Tensor]], step: int) -> _Seen:
    """Per layer, this step's first activation key and its last gradient key: where the
    hooks would file a weight (the call's forward pass) and a weight gradient (the backward)."""
    first: dict[str, SnapKey] = {}
    last: dict[str, SnapKey] = {}
    for key, _ in pending:
        if key.step == step and key.kind == "activation":
            first.setdefault(key.layer, key)
        elif key.step == step and key.kind == "gradient":
            last[key.layer] = key
    return first, last


def _uncalled_indices(parts: list[FlatShard], first: dict[str, SnapKey]) -> dict[str, int]:
    """Layer indices for modules whose parameters are used but which are not called (an
    attention's out_proj), numbered after the called ones in backward order (the model's
    order reversed), as the recorder's gradient hook numbers them."""
    taken = max((k.layer_idx for k in first.values()), default=-1)
    out: dict[str, int] = {}
    for part in reversed(parts):
        layer = user_name(part.qualname) or ROOT
        if layer not in first and layer not in out:
            taken += 1
            out[layer] = taken
    return out


def _flat_key(
    rec: Recorder, part: FlatShard, kind: str, tensor: torch.Tensor, seen: _Seen
) -> SnapKey | None:
    """The key the hooks would give a flattened parameter's snapshot of ``kind``; None for
    the weights of a module not called this step (MultiheadAttention reads its out_proj's
    weights without calling it: the hooks record no weight for it either)."""
    layer = user_name(part.qualname) or ROOT
    called, grad = seen[0].get(layer), seen[1].get(layer)
    if kind == "weight" and called is None and "activation" in rec.kinds:
        return None
    return SnapKey(
        step=rec.step_index,
        layer_idx=-1 if called is None else called.layer_idx,
        layer=layer,
        module_type=user_type(part.module),
        kind=kind,
        call=0,
        forward=0 if called is None else called.forward,
        backward=-1 if kind == "weight" else 0 if grad is None else grad.backward,
        order=0 if kind == "weight" else 1 if grad is None else grad.order,
        tensor=part.name,
        dtype=dtype_name(tensor.dtype),
        device=device_name(tensor.device),
    )


def check_coverage(keys: Sequence[SnapKey], merged: torch.Tensor, whole: Sequence[int]) -> None:
    """Warn when merged parts of sharded parameters do not count their whole tensor.

    Example:
        >>> from flowscope.integrations.distributed import merge_raw
        >>> from flowscope.record.snapshot import HistSpec, snapshot
        >>> key = SnapKey(0, 0, "fc", "Linear", "weight", 0, 0, -1, 0, "weight", "float32", "cpu")
        >>> parts = torch.stack([snapshot(torch.ones(n), HistSpec())[0] for n in (2, 3)])
        >>> check_coverage([key], merge_raw(parts[:, None]), [5])  # 2 + 3 of 5: silent

        With ``[6]`` it would warn ``fc.weight weight: 5 of 6``.

    Args:
        keys: the merged snapshots' keys.
        merged: their merged raw vectors, (snapshot, field).
        whole: the number of elements of each whole tensor.
    """
    if not keys:
        return
    counted = merged[:, RAW["numel"]].tolist()  # after the collectives: the merge's one read
    odd = [(k, int(c), n) for k, c, n in zip(keys, counted, whole, strict=True) if int(c) != n]
    if odd:
        shown = "; ".join(f"{k.layer}.{k.tensor} {k.kind}: {c} of {n}" for k, c, n in odd[:4])
        warnings.warn(
            f"flowscope: the ranks' parts of {len(odd)} sharded tensor(s) do not add up to the"
            f" whole tensor ({shown}{'; ...' if len(odd) > 4 else ''}): a part was held by no"
            " rank or by several in this step; these rows are not the whole tensor's statistics",
            RuntimeWarning,
            stacklevel=4,
        )
