"""Measuring a model: :class:`DeadUnits`, the default loss, and :func:`examine`, which runs
one forward/backward pass under ``fs.watch`` and hands the records to ``diagnose``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from flowscope.core.activations import activation_type, alive_units
from flowscope.core.errors import FlowscopeError
from flowscope.doctor.diagnosis import Diagnosis, diagnose
from flowscope.doctor.thresholds import Thresholds
from flowscope.record.hooks import forward_hooks
from flowscope.record.recorder import KINDS, ROOT, Recorder, watch

__all__ = ["DeadUnits", "call_model", "default_loss", "examine", "model_state_kept"]


def _can_die(module: nn.Module) -> bool:
    """True for modules whose output can be exactly zero (ReLU-like)."""
    known = activation_type(module)
    return known is not None and known.zero_output


class DeadUnits:
    """Count units that output exactly 0 for every sample, with no_grad forward hooks.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        >>> with torch.no_grad():
        ...     _ = net[0].bias.copy_(torch.tensor([-9.0, -9, 9, 9, 9, 9]))
        >>> with DeadUnits(net) as dead:
        ...     _ = net(torch.randn(32, 4).clamp(-1, 1))
        >>> dead.frame()[["layer", "units", "dead", "samples"]].values.tolist()
        [['1', 6, 2, 32]]

    A unit and its death are the catalogue's (:func:`flowscope.core.activations.alive_units`:
    a feature of the last axis or a channel of a conv map, zero over the batch and every
    position), accumulated over every call. Hooks watch the modules whose output can be
    exactly zero (ReLU-like) unless ``modules`` names others; state stays on the tensor's
    device until ``frame()``. Hooks are removed on exit, also when the body raises.
    """

    def __init__(self, model: nn.Module, modules: Sequence[type[nn.Module]] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise FlowscopeError(f"DeadUnits needs a torch.nn.Module, got {type(model).__name__}")
        self._alive: dict[str, Tensor] = {}
        self._samples: dict[str, int] = {}
        self._types: dict[str, str] = {}
        watched = [
            (name or ROOT, m)
            for name, m in model.named_modules()
            if (isinstance(m, tuple(modules)) if modules is not None else _can_die(m))
        ]
        self._hooks = forward_hooks(watched, self._hook)

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, Tensor) or output.dim() < 2:
                return
            with torch.no_grad():
                alive = alive_units(output)
                seen = self._alive.get(name)
                if seen is None:
                    self._alive[name] = alive
                    self._types[name] = type(module).__name__
                elif seen.shape == alive.shape:
                    seen.logical_or_(alive)
                else:
                    return
                self._samples[name] = self._samples.get(name, 0) + output.numel() // alive.numel()

        return hook

    def __enter__(self) -> DeadUnits:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        self._hooks.remove()

    def frame(self) -> pd.DataFrame:
        """One row per watched layer: ``layer, module_type, units, dead, samples`` (per unit)."""
        names = list(self._alive)
        dead = [(~self._alive[n]).sum() for n in names]
        if len({t.device for t in dead}) == 1:
            counts = torch.stack(dead).tolist()  # one transfer
        else:  # layers on several devices
            counts = [int(t) for t in dead]
        rows = [
            {
                "layer": name,
                "module_type": self._types[name],
                "units": int(self._alive[name].numel()),
                "dead": int(count),
                "samples": self._samples[name],
            }
            for name, count in zip(names, counts, strict=True)
        ]
        return pd.DataFrame(rows, columns=["layer", "module_type", "units", "dead", "samples"])


def _float_tensors(output: Any, depth: int = 0) -> Iterator[Tensor]:
    """Floating-point tensors of a model output, in order (tensors, mappings, sequences)."""
    if isinstance(output, Tensor):
        if output.is_floating_point():
            yield output
    elif depth < 4 and isinstance(output, Mapping):
        for value in output.values():
            yield from _float_tensors(value, depth + 1)
    elif depth < 4 and isinstance(output, (tuple, list)):
        for value in output:
            yield from _float_tensors(value, depth + 1)


def default_loss(output: Any) -> Tensor:
    """The model's own ``output.loss`` if it is a tensor, else the mean of squares of the output.

    Example:
        >>> default_loss(torch.tensor([1.0, 3.0]))
        tensor(5.)

    For outputs that are tuples, lists or mappings (Hugging Face ``ModelOutput``), the first
    floating-point tensor (``logits``) is used.

    Raises:
        FlowscopeError: when the output holds no floating-point tensor.
    """
    own = getattr(output, "loss", None)
    if isinstance(own, Tensor):
        return own
    for tensor in _float_tensors(output):
        return tensor.float().pow(2).mean()
    raise FlowscopeError(
        f"the model's output ({type(output).__name__}) has no floating-point tensor to build "
        "a loss from; pass loss=..."
    )


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(x)``, ``model(*inputs)`` for a tuple/list, ``model(**inputs)`` for a mapping."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@contextmanager
def model_state_kept(model: nn.Module) -> Iterator[None]:
    """Put back, on exit, what a measuring pass changes besides the records: every buffer
    (BatchNorm running statistics, ``num_batches_tracked``), each module's train/eval flag
    and each parameter's ``.grad``.

    Example:
        >>> bn = nn.BatchNorm1d(3)
        >>> with model_state_kept(bn):
        ...     _ = bn(torch.randn(8, 3))
        >>> int(bn.num_batches_tracked), float(bn.running_mean.abs().sum())
        (0, 0.0)

    Buffers are copied back into the same tensor objects (a buffer the forward pass replaced
    is put back as well); buffers and parameters are restored also when the body raises.
    """
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    buffers = [
        (module, key, buf, buf.detach().clone())
        for module in model.modules()
        for key, buf in module._buffers.items()  # the tensor objects themselves, also None
        if buf is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, key, buf, copy in buffers:
                buf.copy_(copy)
                module._buffers[key] = buf
        for module, mode in modes:
            module.training = mode
        for param, grad in grads:
            param.grad = grad


def examine(
    model: nn.Module,
    inputs: Any,
    *,
    loss: Callable[[Any], Tensor] | None = None,
    thresholds: Thresholds | None = None,
    name: str = "doctor",
    kinds: Sequence[str] = KINDS,
) -> tuple[Recorder, Diagnosis]:
    """One forward/backward under ``watch`` and :class:`DeadUnits`, then :func:`diagnose`.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        >>> rec, d = examine(net, torch.randn(16, 8))
        >>> d.runs.run.tolist(), rec.closed
        (['doctor'], True)

    Args:
        model: any module; its buffers (BatchNorm running statistics), train/eval flags and
            ``.grad`` fields are restored afterwards (:func:`model_state_kept`), so its
            state dict and eval outputs are bit-identical before and after.
        inputs: a tensor, a tuple/list of positional inputs, or a mapping of keyword inputs.
        loss: output → scalar tensor; default :func:`default_loss`.
        thresholds: passed to :func:`diagnose`.
        name: the ``run`` column.
        kinds: what the recorder records.

    Returns:
        The (closed) recorder, to save, and the diagnosis (with dead units and theory).

    Raises:
        FlowscopeError: a loss that is not a scalar tensor; whatever the model raises on the
            inputs propagates unchanged.
    """
    if not isinstance(model, nn.Module):
        raise FlowscopeError(f"examine() needs a torch.nn.Module, got {type(model).__name__}")
    loss_fn = loss or default_loss
    with model_state_kept(model):
        rec = watch(model, name=name, kinds=kinds)
        try:
            with DeadUnits(model) as dead:
                value = loss_fn(call_model(model, inputs))
                if not isinstance(value, Tensor) or value.numel() != 1:
                    raise FlowscopeError(f"the loss must be a scalar tensor, got {value!r:.80}")
                if value.requires_grad:
                    value.backward()
        finally:
            rec.close()
    return rec, diagnose(rec, thresholds=thresholds, model=model, dead=dead.frame())
