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
from flowscope.record.shards import flat_shards, user_name, user_type
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
    index = {k.layer: k.layer_idx for k, _ in pending if k.step == rec.step_index}
    # as the hooks do: a module's weights when it was called (MultiheadAttention reads its
    # out_proj's weights without calling it), its gradients when a backward reached them
    called = {k.layer for k, _ in pending if k.step == rec.step_index and k.kind == "activation"}
    done = 0
    kinds = [k for k in ("weight", "weight_grad") if k in rec.kinds]
    for part in parts:
        layer = user_name(part.qualname) or ROOT
        for kind in kinds:
            tensor = part.value if kind == "weight" else part.grad
            if tensor is None or (
                kind == "weight" and "activation" in rec.kinds and layer not in called
            ):
                continue
            key = SnapKey(
                step=rec.step_index,
                layer_idx=index.get(layer, -1),
                layer=layer,
                module_type=user_type(part.module),
                kind=kind,
                call=0,
                forward=0,
                backward=-1 if kind == "weight" else 0,
                order=0 if kind == "weight" else 1,
                tensor=part.name,
                dtype=dtype_name(tensor.dtype),
                device=device_name(tensor.device),
            )
            row = rec.snapshot_row(tensor, key)
            if row is None:
                continue
            if key in at:
                pending[at[key]] = key, row
            else:
                pending.append((key, row))
            rec.shards[key] = part.numel
            done += 1
    rec.set_pending(pending)
    return done


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
