"""What ``fs.watch`` hooks and how: the modules it selects, the kinds, the histogram and
saturation settings, checked before any hook is placed, and the float tensors of an output.

Torch only; no hook is placed here (see :mod:`flowscope.record.recorder`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from flowscope.core.activations import activation_type
from flowscope.core.errors import FlowscopeError, unknown
from flowscope.record.fields import HistSpec, LogEdges
from flowscope.record.shards import managed, own_parameters

__all__ = [
    "ALL_KINDS",
    "HIST_LIMITS",
    "KINDS",
    "ROOT",
    "ModuleSelector",
    "SaturationMap",
    "check_kinds",
    "float_tensors",
    "hist_spec",
    "saturation_table",
    "select_modules",
    "zero_output",
]

KINDS = ("activation", "gradient", "weight", "weight_grad")
# kinds recorded only when asked for (``update_ratio`` keeps a copy of the weights each
# recorded step) or, for update_ratio, when watch() is given the optimizer; ``dead_units``
# (record/deadunits.py): per recorded call of a ReLU-like module, its dead units
OPTIONAL_KINDS = ("update_ratio", "dead_units")
ALL_KINDS = (*KINDS, *OPTIONAL_KINDS)
ROOT = "<root>"

# allowed histogram settings: a row holds bins + 2 * 60 * per_decade + 5 counts per snapshot,
# and a sample is staged whole; beyond these a typo (bins=10**7) would exhaust memory
HIST_LIMITS = {"bins": (1, 4096), "hist_sample": (16, 1 << 24), "log_bins_per_decade": (1, 100)}

ModuleSelector = type[nn.Module] | str
SaturationMap = Mapping[type[nn.Module] | str, tuple[float, float] | None]


def hist_spec(bins: int, sample: int, per_decade: int, prefix: str = "") -> HistSpec:
    """Validated histogram settings (``prefix`` names them as the caller does: ``run.``)."""
    for label, value, (low, high) in (
        ("bins", bins, HIST_LIMITS["bins"]),
        ("hist_sample", sample, HIST_LIMITS["hist_sample"]),
        ("log_bins_per_decade", per_decade, HIST_LIMITS["log_bins_per_decade"]),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise FlowscopeError(f"{prefix}{label} must be an integer >= {low}, got {value!r}")
        if value > high:
            raise FlowscopeError(
                f"{prefix}{label} must be an integer in [{low}, {high}], got {value!r}"
            )
    return HistSpec(bins=bins, sample=sample, log=LogEdges(per_decade=per_decade))


def check_kinds(kinds: Sequence[str], name: str = "kinds", entry: str = "kind") -> tuple[str, ...]:
    """Validated kinds, in canonical order (``name``/``entry`` label them as the caller does)."""
    if isinstance(kinds, str):
        kinds = [kinds]
    for kind in kinds:
        if kind not in ALL_KINDS:
            raise unknown(entry, kind, ALL_KINDS)
    if not kinds:
        raise FlowscopeError(f"{name} is empty; choose from {', '.join(ALL_KINDS)}")
    return tuple(k for k in ALL_KINDS if k in kinds)


def zero_output(module: nn.Module) -> bool:
    """Whether a module's output is exactly 0 on a set of positive measure (ReLU-like)."""
    known = activation_type(module)
    return known is not None and known.zero_output


def saturation_table(overrides: SaturationMap | None) -> dict[type, tuple[float, float] | None]:
    """The user's saturation intervals by class (given by class or class name); the others
    come from the activation catalogue (:func:`flowscope.core.activations.saturation_of`)."""
    table: dict[type, tuple[float, float] | None] = {}
    by_name = {cls.__name__: cls for cls in vars(nn).values() if isinstance(cls, type)}
    for target, interval in (overrides or {}).items():
        cls = by_name.get(target) if isinstance(target, str) else target
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise unknown(
                "module type in saturation",
                target,
                [n for n, c in by_name.items() if issubclass(c, nn.Module)],
            )
        if interval is not None:
            ok = isinstance(interval, tuple | list) and len(interval) == 2
            if not ok or not float(interval[0]) < float(interval[1]):
                raise FlowscopeError(
                    f"saturation for {cls.__name__} must be (lo, hi) with lo < hi, or None;"
                    f" got {interval!r}"
                )
            interval = (float(interval[0]), float(interval[1]))
        table[cls] = interval
    return table


def select_modules(
    model: nn.Module,
    modules: ModuleSelector | Sequence[ModuleSelector] | None = None,
    swapped: dict[tuple[int, str], torch.Tensor | None] | None = None,
) -> list[tuple[str, nn.Module]]:
    """The (qualified name, module) pairs ``watch`` hooks, in ``named_modules`` order.

    Modules count as owning parameters as the model stores them between steps: FSDP1's flat
    parameters do not, the modules whose parameters it flattened do (``swapped``:
    :func:`flowscope.record.shards.managed` of the model, computed when not given).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> [n for n, _ in select_modules(net, torch.nn.Linear)]
        ['0']
    """
    named = [(n or ROOT, m) for n, m in model.named_modules()]
    if modules is None:
        if swapped is None:  # (a recorder passes the map it took at watch time)
            swapped = managed(model)  # FSDP1: the modules whose parameters it flattened
        owners = {i for (i, _), p in swapped.items() if p is None}
        return [
            (n, m)
            for n, m in named
            if not any(True for _ in m.children())
            or id(m) in owners
            or any(True for _ in (own_parameters(m, swapped) if swapped else m.parameters(False)))
        ]
    selectors = [modules] if isinstance(modules, str | type) else list(modules)
    if not selectors:
        raise FlowscopeError(
            "modules is empty: nothing would be recorded; pass module types or name patterns,"
            " or None for every leaf module"
        )
    chosen: set[str] = set()
    for sel in selectors:
        if isinstance(sel, str):
            hits = {n for n, _ in named if fnmatch.fnmatchcase(n, sel)}
        elif isinstance(sel, type) and issubclass(sel, nn.Module):
            hits = {n for n, m in named if isinstance(m, sel)}
        else:
            raise FlowscopeError(
                f"modules entries are module types or name patterns (str), got {sel!r}"
            )
        if not hits:
            shown = ", ".join(n for n, _ in named[:12]) + (", ..." if len(named) > 12 else "")
            raise FlowscopeError(f"modules selector {sel!r} matches no module; names: {shown}")
        chosen |= hits
    return [(n, m) for n, m in named if n in chosen]


def float_tensors(
    output: Any, path: str = "", depth: int = 0
) -> Iterator[tuple[str, torch.Tensor]]:
    """Floating-point tensors in a module output, with their path ("" for a bare tensor)."""
    if isinstance(output, torch.Tensor):
        if output.is_floating_point() and output.layout == torch.strided:  # not sparse
            yield path, output
    elif depth < 4 and isinstance(output, Mapping):
        for k, v in output.items():
            yield from float_tensors(v, f"{path}.{k}" if path else str(k), depth + 1)
    elif depth < 4 and isinstance(output, tuple | list):
        for i, v in enumerate(output):
            yield from float_tensors(v, f"{path}.{i}" if path else str(i), depth + 1)
