"""Apply the doctor's fixes: re-initialise by scheme name, or LSUV.

``reinit`` redraws every Linear / Conv weight from a named scheme (``inits.INITS``) and
zeroes their biases. ``lsuv`` is Mishkin & Matas (2015), "All you need is a good init":
orthonormal weights first, then, layer by layer in the order the forward pass reaches them,
divide the weight by the std of the layer's output on a batch until that variance is 1
within ``tol`` (at most ``max_iter`` rescalings). The model's buffers (BatchNorm running
statistics) are restored after LSUV's forward passes, and its train/eval mode is kept.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
    >>> reinit(net, "xavier", generator=torch.Generator().manual_seed(0))
    ['0', '2']
    >>> report = lsuv(net, torch.randn(256, 64), generator=torch.Generator().manual_seed(0))
    >>> bool(((report.after_std - 1).abs() < 0.02).all())
    True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from flowscope.core.errors import FlowscopeError
from flowscope.models.inits import INIT_TARGETS, INITS, apply_init
from flowscope.record.hooks import forward_hooks
from flowscope.record.recorder import ROOT, ModuleSelector, select_modules

__all__ = ["LSUV_COLUMNS", "lsuv", "reinit"]

LSUV_COLUMNS = ["layer", "module_type", "before_std", "after_std", "iterations", "converged"]


def reinit(
    model: nn.Module, scheme: str, *, generator: torch.Generator | None = None, **params: object
) -> list[str]:
    """Re-initialise every Linear and Conv1d/2d/3d weight of ``model`` from ``scheme``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(500, 500), torch.nn.ReLU())
        >>> reinit(net, "he", generator=torch.Generator().manual_seed(0))
        ['0']
        >>> round(net[0].weight.std().item(), 3)        # √(2/500)
        0.063

    Args:
        model: any module; norm layers and embeddings are left alone.
        scheme: a name in ``flowscope.models.inits.INITS`` (``xavier``, ``he``, ``orthogonal``,
            ``normal`` with ``std=``, ...).
        generator: a ``torch.Generator`` on the model's device, for reproducible draws.
        **params: the scheme's parameters, and ``bias=None`` to keep the biases (default:
            zeroed).

    Returns:
        The qualified names of the layers re-initialised, in ``named_modules`` order.

    Raises:
        FlowscopeError: unknown scheme or parameter (with did-you-mean), a lazy layer, a
            generator on another device; nothing is changed then.
    """
    if not isinstance(model, nn.Module):
        raise FlowscopeError(f"reinit() needs a torch.nn.Module, got {type(model).__name__}")
    return apply_init(model, scheme, generator=generator, **params)  # type: ignore[arg-type]


class _Stop(Exception):
    """Raised from a forward hook to end a forward pass once the layer of interest ran."""


def _targets(
    model: nn.Module, modules: ModuleSelector | Sequence[ModuleSelector] | None
) -> list[tuple[str, nn.Module]]:
    """The layers LSUV scales: Linear/Conv by default, or the selected ones (with weights)."""
    if modules is None:
        return [(n or ROOT, m) for n, m in model.named_modules() if isinstance(m, INIT_TARGETS)]
    chosen = select_modules(model, modules)
    for name, module in chosen:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() < 2:
            raise FlowscopeError(
                f"lsuv: layer {name!r} ({type(module).__name__}) has no weight of shape "
                "(out, in, ...) to scale; select Linear / Conv layers"
            )
    return chosen


def _check_args(model: object, tol: object, max_iter: object) -> None:
    """Validate LSUV's arguments before anything changes."""
    if not isinstance(model, nn.Module):
        raise FlowscopeError(f"lsuv() needs a torch.nn.Module, got {type(model).__name__}")
    ok = not isinstance(tol, bool) and isinstance(tol, (int, float)) and 0 < tol < 1
    if not ok:
        raise FlowscopeError(f"tol must be a number in (0, 1), got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise FlowscopeError(f"max_iter must be an integer >= 1, got {max_iter!r}")


def _call(model: nn.Module, batch: Any) -> Any:
    """Run the model on a tensor, a tuple/list of inputs, or a mapping of keyword inputs."""
    from flowscope.doctor.measure import call_model

    return call_model(model, batch)


class _Probe:
    """Forward hooks that record each target's output std (first call) and can stop the pass."""

    def __init__(self, targets: list[tuple[str, nn.Module]]) -> None:
        self.std: dict[str, float] = {}
        self.order: list[str] = []
        self.stop_at: str | None = None
        self.hooks = forward_hooks(targets, self._hook)

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name in self.std or not isinstance(output, Tensor):
                return
            self.std[name] = float(output.detach().double().std(unbiased=False))
            self.order.append(name)
            if name == self.stop_at:
                raise _Stop

        return hook

    def run(self, model: nn.Module, batch: Any, stop_at: str | None = None) -> dict[str, float]:
        """One forward pass (ended after ``stop_at`` ran); the stds it saw."""
        self.std, self.order, self.stop_at = {}, [], stop_at
        with contextlib.suppress(_Stop):
            _call(model, batch)
        return self.std

    def close(self) -> None:
        self.hooks.remove()


def lsuv(
    model: nn.Module,
    batch: Any,
    *,
    tol: float = 0.02,
    max_iter: int = 10,
    modules: ModuleSelector | Sequence[ModuleSelector] | None = None,
    generator: torch.Generator | None = None,
    orthogonal: bool = True,
) -> pd.DataFrame:
    """Layer-sequential unit-variance init (Mishkin & Matas 2015) on one batch.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        >>> out = lsuv(net, torch.randn(512, 32), generator=torch.Generator().manual_seed(0))
        >>> out.columns.tolist()
        ['layer', 'module_type', 'before_std', 'after_std', 'iterations', 'converged']
        >>> out.converged.all()
        np.True_

    Args:
        model: the model; its Linear / Conv1d/2d/3d layers are scaled (or ``modules``).
        batch: a tensor, a tuple/list of positional inputs, or a mapping of keyword inputs.
        tol: stop when |Var(output) − 1| ≤ tol (the paper's Tol_var; 0.02 → std within 1 %).
        max_iter: at most this many rescalings per layer (the paper's T_max).
        modules: which layers, as for ``fs.watch`` (a type, a name glob, or a list).
        generator: for the orthogonal pre-init, on the model's device.
        orthogonal: start from orthonormal weights with zero biases, as the paper does; False
            keeps the current weights and only rescales them.

    Returns:
        One row per layer the forward pass reached, in that order: ``layer, module_type,
        before_std`` (output std with the weights as they were), ``after_std`` (output std
        after LSUV, from a final forward pass), ``iterations`` (rescalings applied),
        ``converged``.

    Raises:
        FlowscopeError: bad arguments; a selected layer the forward pass never reaches; a
            layer whose output variance is 0 or not finite on this batch (nothing to scale).
    """
    _check_args(model, tol, max_iter)
    targets = _targets(model, modules)
    if not targets:
        raise FlowscopeError("lsuv: the model has no Linear or Conv layer to scale")
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    probe = _Probe(targets)
    try:
        with torch.no_grad():
            before = dict(probe.run(model, batch))
            order = list(probe.order)
            missing = [n for n, _ in targets if n not in before]
            if modules is not None and missing:
                raise FlowscopeError(f"lsuv: the forward pass never reached {missing}")
            by_name = dict(targets)
            if orthogonal:
                _orthogonal_init([by_name[n] for n in order], generator)
            steps = {name: _scale_layer(model, batch, probe, name, by_name[name], tol, max_iter)
                     for name in order}  # fmt: skip
            after = probe.run(model, batch)
    finally:
        probe.close()
        _restore(model, buffers)
    rows = [
        {
            "layer": name,
            "module_type": type(by_name[name]).__name__,
            "before_std": before[name],
            "after_std": after.get(name, math.nan),
            "iterations": steps[name][0],
            "converged": steps[name][1],
        }
        for name in order
    ]
    return pd.DataFrame(rows, columns=LSUV_COLUMNS)


def _orthogonal_init(layers: list[nn.Module], generator: torch.Generator | None) -> None:
    """Orthonormal weights (rows or columns), zero biases."""
    scheme = INITS.get("orthogonal")
    for layer in layers:
        scheme(_weight(layer), generator=generator)
        bias = getattr(layer, "bias", None)
        if isinstance(bias, Tensor):
            bias.zero_()


def _weight(layer: nn.Module) -> Tensor:
    """The layer's weight tensor (checked to exist by ``_targets``)."""
    weight = layer.weight
    assert isinstance(weight, Tensor)
    return weight


def _scale_layer(
    model: nn.Module, batch: Any, probe: _Probe, name: str, layer: nn.Module, tol: float, cap: int
) -> tuple[int, bool]:
    """Divide the layer's weight by its output std until the variance is 1 ± tol."""
    weight = _weight(layer)
    for done in range(cap + 1):
        std = probe.run(model, batch, stop_at=name)[name]
        if not (math.isfinite(std) and std > 0):
            raise FlowscopeError(
                f"lsuv: layer {name!r} has output std {std} on this batch after {done} "
                "rescaling(s); nothing to scale (dead input or overflow)"
            )
        if abs(std**2 - 1) <= tol:
            return done, True
        if done < cap:
            weight.div_(std)
    return cap, False


def _restore(model: nn.Module, buffers: dict[str, Tensor]) -> None:
    """Put the buffers (BatchNorm running statistics, counters) back as they were."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in buffers:
                buf.copy_(buffers[name])
