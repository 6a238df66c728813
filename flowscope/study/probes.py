"""Probes: measurements a study needs beyond the per-layer distributions.

Each probe is a registry entry with a ``when`` (``backward``: right after the first recorded
backward, gradients in place; ``step``: after every optimizer step and once before the first;
``end``: after the run) and a function returning ``{layer: 0-d tensor}`` on the model's device.
The engine stacks every probe value of a run and moves them to the host in one transfer.

An ``end`` probe that only reads one forward pass of ``x`` also names its forward ``hooks``
(``hooks(model, into)`` attaches them, each writing its layer's value into ``into``, and
returns them as a :class:`flowscope.record.hooks.Hooks`); its ``fn`` runs that pass itself
(:func:`read_pass`). When a run has
no training step the end state is the state of the recorded pass, so the engine attaches the
hooks to that pass instead of running another one: the same hooks on the same forward give
the same numbers. Torch only, but ``meanfield_grad`` (numpy, and it reads its anchor on the
host: one sync per run).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flowscope.core.activations import activation_type, alive_units
from flowscope.core.registry import Registry
from flowscope.record.hooks import Hooks, forward_hooks

ProbeHooks = Callable[[nn.Module, dict[str, torch.Tensor]], Hooks]


@dataclass(frozen=True)
class ProbeContext:
    """What a probe may look at."""

    model: nn.Module
    x: torch.Tensor
    initial: dict[str, torch.Tensor]  # parameter values before training (detached clones;
    # the parameters themselves, detached, when the run has no training step to change them)


@dataclass(frozen=True)
class Probe:
    name: str
    when: str  # backward | step | end
    summary: str
    fn: Callable[[ProbeContext], dict[str, torch.Tensor]]
    hooks: ProbeHooks | None = None  # end probes reading one forward pass of x: its hooks


PROBES: Registry[Probe] = Registry("probe")


def _probe(
    name: str, when: str, summary: str, hooks: ProbeHooks | None = None
) -> Callable[[Callable], Callable]:
    def add(fn: Callable[[ProbeContext], dict[str, torch.Tensor]]) -> Callable:
        PROBES.register(name)(Probe(name, when, summary, fn, hooks))
        return fn

    return add


@contextmanager
def attached(hooks: ProbeHooks, model: nn.Module, into: dict[str, torch.Tensor]) -> Iterator[None]:
    """``hooks`` on ``model``, filling ``into``, for the ``with`` block only."""
    with hooks(model, into):
        yield


def read_pass(hooks: ProbeHooks, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What ``hooks`` capture during one no-grad forward pass of ``x``."""
    captured: dict[str, torch.Tensor] = {}
    with attached(hooks, model, captured), torch.no_grad():
        model(x)
    return captured


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@_probe("param_change", "step", "max |p - p_initial| per parameter (0 = never changed)")
def param_change(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {
            name: (p.detach() - ctx.initial[name]).abs().max()
            for name, p in ctx.model.named_parameters()
        }


@_probe("distinct_units", "end", "number of distinct units (rows of [W | b]) of each Linear")
def distinct_units(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for name, lin in _linears(ctx.model):
            rows = lin.weight.detach()
            if lin.bias is not None:
                rows = torch.cat([rows, lin.bias.detach()[:, None]], dim=1)
            out[name] = count_distinct_rows(rows)
    return out


def count_distinct_rows(rows: torch.Tensor, rel_tol: float = 1e-5) -> torch.Tensor:
    """Rows equal within ``rel_tol`` x the largest entry count as one unit (float sums of
    identical updates may differ in the last bits between rows)."""
    diff = (rows[:, None, :] - rows[None, :, :]).abs().amax(dim=2)
    tol = rel_tol * rows.abs().max().clamp(min=1e-30)
    same_as_earlier = torch.triu(diff <= tol, diagonal=1).any(dim=0)
    return (~same_as_earlier).sum().to(torch.float64)


@_probe(
    "same_sign_rows",
    "backward",
    "share of rows of each Linear weight gradient whose non-zero entries all have one sign",
)
def same_sign_rows(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    out = {}
    for name, lin in _linears(ctx.model):
        g = lin.weight.grad
        if g is None:
            continue
        pos, neg = (g > 0).any(dim=1), (g < 0).any(dim=1)
        live = pos | neg
        # no live row (a loss saturated to an exact zero gradient): the share is undefined
        share = (live & ~(pos & neg)).sum().double() / live.sum().double()
        out[name] = torch.where(live.any(), share, share.new_tensor(float("nan")))
    return out


def _dead_unit_hooks(model: nn.Module, into: dict[str, torch.Tensor]) -> Hooks:
    """Forward hooks on every activation module of the catalogue: the share of its units
    dead for the batch (:func:`flowscope.core.activations.alive_units`)."""

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
            into[name] = (~alive_units(output)).double().mean()

        return hook

    acts = [(n, m) for n, m in model.named_modules() if activation_type(m) is not None]
    return forward_hooks(acts, keep)


@_probe(
    "dead_units",
    "end",
    "share of units of each activation module zero for the whole batch",
    hooks=_dead_unit_hooks,
)
def dead_units(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    return read_pass(_dead_unit_hooks, ctx.model, ctx.x)


@contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """The model's buffers (batchnorm running statistics) as they were, after the block."""
    kept = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in kept:
                buffer.copy_(value)


@_probe(
    "meanfield_grad",
    "backward",
    "mean-field prediction of rms(dL/d Linear output) along each Linear -> [norm] -> activation"
    " chain, relative to the chain's last Linear (flowscope.theory.predict_chain)",
)
def meanfield_grad(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """Each chain's predicted gradient profile: the product of ``predict_chain``'s per-link
    gains from a Linear to the chain's last (1 there), anchored at the first Linear's output
    mean square on ``x`` (a no-grad pass that leaves the running statistics as they were).
    Reduced like a measured ``gradient.rms`` series, it is what theory predicts for it."""
    from flowscope.theory import mlp_chains, predict_chain  # numpy: only when asked for

    chains = mlp_chains(ctx.model)
    firsts = {chain[0].name for chain in chains}
    linears = [(n, m) for n, m in _linears(ctx.model) if n in firsts]
    into: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
            into[name] = output.detach().double().pow(2).mean()

        return hook

    with _buffers_kept(ctx.model), forward_hooks(linears, keep), torch.no_grad():
        ctx.model(ctx.x)
    out = {}
    for chain in chains:
        gain = predict_chain(chain, float(into[chain[0].name]))["grad_gain"][:-1]
        profile = [*np.cumprod(gain[::-1])[::-1], 1.0]  # rms at link l / rms at the last
        for link, value in zip(chain, profile, strict=True):
            out[link.name] = torch.tensor(float(value), dtype=torch.float64, device=ctx.x.device)
    return out
