"""Sharded parameters (FSDP, tensor parallel): the part of a tensor this rank holds, and the
user's names for modules that FSDP and checkpointing wrap.

FSDP2 (``fully_shard``) and tensor parallelism keep parameters and their gradients as
DTensors; FSDP1 (``FullyShardedDataParallel``) flattens the parameters of each wrapped module
into one ``FlatParameter`` and keeps a slice of it on each rank. A rank snapshots only its
local part (no all-gather); :mod:`flowscope.integrations.fsdp` merges the parts of every rank
into the statistics of the whole tensor. A part another rank holds as well (a ``Replicate``
mesh dimension, a hybrid-sharding replica) is counted by one rank only: the others snapshot an
empty tensor, so that every rank still records the same keys.

Torch only; ``torch.distributed`` is read only when a model holds its tensors.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "WRAPPERS",
    "FlatShard",
    "Part",
    "flat_shards",
    "inside_fsdp1",
    "local_part",
    "managed",
    "own_parameters",
    "user_name",
    "user_type",
]

# attribute names wrappers put between a user's modules (FSDP1, checkpoint_wrapper, compile)
WRAPPERS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


@functools.lru_cache(maxsize=8192)
def user_name(qualname: str) -> str:
    """A module's qualified name without wrapper segments ("" for the wrapped root).

    Example:
        >>> user_name("_fsdp_wrapped_module.blocks.1._checkpoint_wrapped_module.mlp")
        'blocks.1.mlp'
    """
    return ".".join(p for p in qualname.split(".") if p not in WRAPPERS)


_TYPES: dict[type, str] = {}


def user_type(module: nn.Module) -> str:
    """The class name a user gave a module: ``Linear`` for FSDP2's ``FSDPLinear``.

    Example:
        >>> user_type(torch.nn.Linear(2, 2))
        'Linear'
    """
    cls = type(module)
    name = _TYPES.get(cls)
    if name is None:
        fsdp2 = [c for c in cls.__mro__ if any(b.__name__ == "FSDPModule" for b in c.__mro__)]
        name = _TYPES[cls] = next((c.__name__ for c in cls.__mro__ if c not in fsdp2), "")
    return name or cls.__name__


class Part(NamedTuple):
    """The part of a DTensor this rank snapshots, and the size of the whole tensor."""

    tensor: torch.Tensor | None  # None: it cannot be snapshotted (``problem`` says why)
    numel: int
    problem: str


def local_part(t: torch.Tensor) -> Part | None:
    """This rank's part of a DTensor (None for any other tensor); no communication.

    ``Shard`` dimensions give the local shard (empty where sharding is uneven); along a
    ``Replicate`` dimension only coordinate 0 counts it. A ``Partial`` placement holds
    addends, not values: its part has no tensor and a ``problem``.

    Example:
        >>> local_part(torch.ones(3)) is None  # DTensors need a process group: tests/test_fsdp.py
        True
    """
    dtensor = _dtensor_class()
    if dtensor is None or not isinstance(t, dtensor):
        return None
    placements = t.placements
    odd = [p for p in placements if not (p.is_shard() or p.is_replicate())]
    if odd:
        what = f"{type(odd[0]).__name__} ({odd[0]})"
        return Part(None, t.numel(), f"a DTensor with placement {what}, a sum not yet reduced,")
    with torch.no_grad():
        local = t.detach().to_local()
    coord = t.device_mesh.get_coordinate()  # None: this rank is not in the mesh
    counted = (
        coord is not None
        and _has_first_rank(t.device_mesh)
        and all(c == 0 for c, p in zip(coord, placements, strict=True) if p.is_replicate())
    )
    return Part(local if counted else local.reshape(-1)[:0], t.numel(), "")


def _dtensor_class() -> Any:
    """``DTensor`` if torch.distributed.tensor is loaded (no DTensor exists otherwise)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


@functools.lru_cache(maxsize=256)
def _has_first_rank(mesh: Any) -> bool:
    """Whether a mesh holds global rank 0: the meshes holding it count a replicated part
    (cached: meshes hash by their layout, read once; the mesh tensor lives on the CPU)."""
    return 0 in mesh.mesh.flatten().tolist()


# -- FSDP1: flat parameters ---------------------------------------------------------------------


class FlatShard(NamedTuple):
    """One original parameter inside an FSDP1 flat parameter, as this rank holds it."""

    qualname: str  # the owning module's qualified name in the model (wrappers included)
    module: nn.Module
    name: str
    value: torch.Tensor  # this rank's elements (possibly none)
    grad: torch.Tensor | None  # the same elements of the reduced gradient
    numel: int  # elements of the whole parameter


_WRAPPERS: dict[type, str] = {}


def _wrapper(cls: type) -> str:
    """``fsdp1`` for FSDP1's wrapper class, ``fsdp2`` for a class fully_shard made, else ""."""
    kind = _WRAPPERS.get(cls)
    if kind is None:
        fsdp2 = any(c.__name__ == "FSDPModule" for c in cls.__mro__)
        fsdp1 = cls.__name__ == "FullyShardedDataParallel"
        kind = _WRAPPERS[cls] = "fsdp2" if fsdp2 else "fsdp1" if fsdp1 else ""
    return kind


def _flat_params(model: nn.Module) -> Iterator[Any]:
    """The FlatParameters of FSDP1 wrappers in ``model`` (each once)."""
    seen: set[int] = set()
    for module in model.modules():
        if _wrapper(type(module)) != "fsdp1":
            continue
        handle = getattr(module, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        if flat is not None and id(flat) not in seen:
            seen.add(id(flat))
            yield handle, flat


def managed(model: nn.Module) -> dict[tuple[int, str], torch.Tensor | None]:
    """Parameters FSDP swaps during forward, by ``(id(module), name)``: FSDP1's flattened
    ones map to None (read from :func:`flat_shards` instead), FSDP2's to their sharded DTensor
    (a module left unsharded after forward holds the whole tensor while its hooks run).

    Example:
        >>> managed(torch.nn.Linear(2, 2))  # no FSDP
        {}
    """
    out: dict[tuple[int, str], torch.Tensor | None] = {}
    kinds = {type(m): _wrapper(type(m)) for m in model.modules()}  # one pass: ~1 us a module
    if "fsdp1" in kinds.values():
        for _, flat in _flat_params(model):
            out.update({(id(i.module), i.param_name): None for i in flat._param_infos})
    if "fsdp2" in kinds.values():
        for module in model.modules():
            if kinds[type(module)] != "fsdp2":
                continue
            state = module._get_fsdp_state()  # type: ignore[operator]
            group = getattr(state, "_fsdp_param_group", None)
            for param in getattr(group, "fsdp_params", ()):
                info = param._module_info
                out[(id(info.module), info.param_name)] = param.sharded_param
    return out


def own_parameters(
    module: nn.Module, managed: dict[tuple[int, str], torch.Tensor | None]
) -> Iterator[tuple[str, torch.Tensor]]:
    """``module.named_parameters(recurse=False)`` as stored between steps: without FSDP1's
    flat parameters and their views, with FSDP2's sharded parameters (``managed``:
    :func:`managed`).

    Example:
        >>> [name for name, _ in own_parameters(torch.nn.Linear(2, 2), {})]
        ['weight', 'bias']
    """
    for name, param in module.named_parameters(recurse=False):
        if getattr(param, "_is_flat_param", False):
            continue
        stored = managed.get((id(module), name), param)
        if stored is not None:
            yield name, stored


def inside_fsdp1(model: nn.Module) -> str:
    """Why ``model``'s parameters cannot all be read, or "": a module that FSDP1 manages from
    a wrapper outside it (its flat parameters are out of reach; watch the wrapper).

    Example:
        >>> inside_fsdp1(torch.nn.Linear(2, 2))
        ''
    """
    if type(model).__name__ == "FullyShardedDataParallel":
        return ""
    seen = managed(model)
    flattened = any(  # use_orig_params=True: FSDP1 marks the parameters it flattened
        getattr(p, "_fsdp_flattened", False) and (id(m), n) not in seen
        for m in model.modules()
        for n, p in m.named_parameters(recurse=False)
        if not getattr(p, "_is_flat_param", False)
    )
    # use_orig_params=False: they are gone from the modules; FSDP1 marks the modules (FSDP2
    # marks its modules too, always with use_orig_params True)
    marks = model.__dict__
    removed = marks.get("_is_fsdp_managed_module") and marks.get("_fsdp_use_orig_params") is False
    if not (flattened or removed):
        return ""
    return (
        f"this {type(model).__name__} is managed by a FullyShardedDataParallel (FSDP1) wrapper"
        " outside it: parameters that wrapper flattened itself (not in a nested FSDP unit) are"
        " not recorded (no weight, no weight_grad rows); watch the wrapper instead,"
        " fs.watch(fsdp_model)"
    )


def flat_shards(model: nn.Module) -> list[FlatShard]:
    """Every original parameter of the FSDP1 flat parameters in ``model``, as this rank holds
    it, in a deterministic order (the same on every rank).

    Read after ``backward()`` (the flat parameters are sharded again, their gradients reduced).
    A rank outside the group that holds global rank 0 (hybrid sharding's other replicas), or
    every rank under ``NO_SHARD``'s replicas but rank 0, holds nothing that counts.

    Example:
        >>> flat_shards(torch.nn.Linear(2, 2))  # no FullyShardedDataParallel inside
        []
    """
    names = {id(m): q for q, m in model.named_modules()}
    out = []
    for handle, flat in _flat_params(model):
        local = getattr(flat, "_local_shard", None)  # also while the flat parameter is whole
        local = flat.detach() if local is None else local
        grad = flat.grad
        counted = _counts(handle)
        for i, info in enumerate(flat._param_infos):
            shard = flat._shard_param_infos[i]
            span = slice(0, 0)
            if counted and shard.in_shard:
                span = slice(shard.offset_in_shard, shard.offset_in_shard + shard.numel_in_shard)
            part_grad = None if grad is None else grad.detach()[span]
            qualname = names.get(id(info.module), "")
            numel = int(flat._numels[i])
            value = local[span]
            out.append(FlatShard(qualname, info.module, info.param_name, value, part_grad, numel))
    return out


def _counts(handle: Any) -> bool:
    """Whether this rank's flat shard counts: it is in the shard group holding global rank 0."""
    import torch.distributed as dist

    group = getattr(handle, "process_group", None)
    if group is None or not handle.uses_sharded_strategy:
        return not dist.is_initialized() or dist.get_rank() == 0
    return 0 in dist.get_process_group_ranks(group)
