"""Signal-propagation plots (Brock, De & Smith 2021, "Characterizing signal propagation to
close the performance gap in unnormalized ResNets", section 3): per residual block at init,
the residual stream's **average channel squared mean** and **average channel variance**, and
the **residual branch's variance** — :func:`signal_propagation`, with the blocks found by
:func:`residual_blocks`.

Definitions (per block, over one batch):

- the stream after block ℓ is the block's output ``y``; the branch is what the block adds to
  its input, ``y − x`` (so an α-scaled branch counts with its α, as it enters the stream);
- a channel is an index of ``channel_dim`` (1: the channels of a conv map ``(N, C, ...)`` and
  the features of ``(N, C)``; -1 for ``(N, T, C)`` sequences); its mean and (population)
  variance are taken over every other axis;
- average channel squared mean = mean over channels of (channel mean)²; average channel
  variance = mean over channels of the channel variance; depth 0 is the first block's input.

Theory the study and the tests check against: a linear residual stack
``x ← x + W x`` with ``W ~ N(0, σ²/n)`` multiplies both stream statistics by ``1 + σ²`` per
block; an NF block ``x ← x + α f(x / β)`` with a variance-preserving ``f`` and ``β`` the
expected stream std adds α² per block: Var(x_k) = Var(x_0) + k α²; a pre-activation BN block
adds the branch variance (≈ 1) per block: linear growth in depth.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self, n):
    ...         super().__init__()
    ...         self.fc = nn.Linear(n, n, bias=False)
    ...     def forward(self, x):
    ...         return x + self.fc(x)
    >>> net = nn.Sequential(*[Block(8) for _ in range(3)])
    >>> [name for name, _ in residual_blocks(net)]
    ['0', '1', '2']
    >>> spp = signal_propagation(net, torch.randn(64, 8))
    >>> spp.columns.tolist()
    ['depth', 'block', 'channel_mean_sq', 'channel_var', 'branch_var']
    >>> spp.depth.tolist()
    [0, 1, 2, 3]
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor, fx, nn

from flowscope.core.errors import FlowscopeError
from flowscope.doctor.measure import call_model, model_state_kept
from flowscope.record.hooks import Hooks

__all__ = ["SPP_COLUMNS", "residual_blocks", "residual_growth", "signal_propagation"]

SPP_COLUMNS = ["depth", "block", "channel_mean_sq", "channel_var", "branch_var"]

_ADDS = {operator.add, operator.iadd, torch.add}


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADDS
    return node.op == "call_method" and node.target in ("add", "add_")


def _adds_to_input(node: Any, source: fx.Node) -> bool:
    """True when ``node`` is ``source + branch``, or ``(source + branch) + branch2``, ...:
    an add one of whose operands is the input itself or such an add (several branches)."""
    if not isinstance(node, fx.Node) or not _is_add(node):
        return False
    operands = [*node.args[:2], *node.kwargs.values()]
    return any(a is source or _adds_to_input(a, source) for a in operands)


class _Shallow(fx.Tracer):
    """Traces a module's own forward only: every submodule call is one node (a leaf), so a
    stage of 100 blocks costs one node per block, not a trace of each block's insides."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _is_residual(module: nn.Module) -> bool | None:
    """The rule: the module's traced forward returns ``x + branch(x)`` (the add's operand is
    the forward's first input, unchanged), possibly with more branches added to that sum.
    None when torch.fx cannot trace it."""
    try:
        graph = _Shallow().trace(module)
    except Exception:  # data-dependent control flow, unsupported ops: the user declares blocks
        return None
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    outputs = [n for n in graph.nodes if n.op == "output"]
    if not inputs or not outputs:
        return False
    result = outputs[0].args[0]
    if isinstance(result, (tuple, list)) and result:
        result = result[0]
    return _adds_to_input(result, inputs[0])


def _builtin(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn.")


def residual_blocks(
    model: nn.Module, blocks: Sequence[str | type[nn.Module]] | None = None
) -> list[tuple[str, nn.Module]]:
    """The residual blocks of ``model``, in module order: those named or typed in ``blocks``,
    or else every module whose traced forward returns its input plus a branch (``torch.fx``;
    a block nested in a block found already is left out, as is torch's own modules).

    Raises :class:`FlowscopeError` naming what was tried when there is none.
    """
    if not isinstance(model, nn.Module):
        raise FlowscopeError(
            f"signal propagation needs a torch.nn.Module, got {type(model).__name__}"
        )
    named = list(model.named_modules())
    if blocks is not None:
        names = {b for b in blocks if isinstance(b, str)}
        types = tuple(b for b in blocks if isinstance(b, type))
        unknown = names - {name for name, _ in named}
        if unknown:
            raise FlowscopeError(
                f"blocks={sorted(unknown)!r}: no such module in the model; "
                f"allowed: qualified module names such as {[n for n, _ in named[1:4]]!r} "
                "or module types"
            )
        found = [(n, m) for n, m in named if n in names or (types and isinstance(m, types))]
        if not found:
            raise FlowscopeError(f"blocks={list(blocks)!r} matches no module of the model")
        return found
    found, untraced = [], []
    for name, module in named:
        if _builtin(module) or any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        verdict = _is_residual(module)
        if verdict is None:
            untraced.append(name or "<model>")
        elif verdict:
            found.append((name, module))
    if not found:
        why = f"; torch.fx could not trace {untraced[:3]}" if untraced else ""
        raise FlowscopeError(
            "no residual block found: none of the model's modules returns its input plus a "
            f"branch (x + f(x)){why}; name them with blocks=['layer1.0', ...] or blocks=[MyBlock]"
        )
    return found


def _channel_stats(t: Tensor, channel_dim: int) -> tuple[Tensor, Tensor]:
    """(average channel squared mean, average channel variance) of ``t``, in float64."""
    if t.dim() < 2:
        raise FlowscopeError(
            f"signal propagation needs outputs with a batch axis, got shape {tuple(t.shape)}"
        )
    rows = t.detach().to(torch.float64).movedim(channel_dim, -1).reshape(-1, t.shape[channel_dim])
    mean = rows.mean(0)
    return (mean * mean).mean(), rows.var(0, unbiased=False).mean()


def _first(value: Any) -> Tensor:
    while isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, Tensor):
        raise FlowscopeError(f"a residual block returned {type(value).__name__}, not a tensor")
    return value


def signal_propagation(
    model: nn.Module,
    x: Any,
    *,
    blocks: Sequence[str | type[nn.Module]] | None = None,
    channel_dim: int = 1,
) -> pd.DataFrame:
    """The signal-propagation plot's numbers for one forward pass of ``model`` on ``x``.

    One row per depth (0: the first block's input; k: the output of the k-th block), columns
    :data:`SPP_COLUMNS`; ``branch_var`` is NaN at depth 0. The model runs as it is (train
    mode: batch statistics, as at the start of training) without gradients; its buffers
    (BatchNorm running statistics) and modes are put back afterwards.
    """
    found = residual_blocks(model, blocks)
    inputs: dict[str, Tensor] = {}
    rows: list[tuple[str, Tensor, Tensor, Tensor]] = []

    def before(name: str, module: nn.Module, args: Any) -> None:
        inputs[name] = _first(args).detach().clone()  # a block may add into its input in place

    def after(name: str, module: nn.Module, args: Any, output: Any) -> None:
        y, x_in = _first(output), inputs.pop(name)
        if y.shape != x_in.shape:
            raise FlowscopeError(
                f"block {name!r} changes the shape {tuple(x_in.shape)} -> {tuple(y.shape)}: "
                "its branch is not y - x; leave it out with blocks=[...]"
            )
        if not rows:
            nan = x_in.new_tensor(float("nan"), dtype=torch.float64)  # on the model's device
            rows.append(("", *_channel_stats(x_in, channel_dim), nan))
        mean_sq, var = _channel_stats(y, channel_dim)
        rows.append((name, mean_sq, var, _channel_stats(y.detach() - x_in, channel_dim)[1]))

    with model_state_kept(model), torch.no_grad(), Hooks() as hooks:
        for name, module in found:
            hooks.forward_pre(module, functools.partial(before, name))
            hooks.forward(module, functools.partial(after, name))
        call_model(model, x)
    if not rows:
        raise FlowscopeError("the forward pass did not run any of the residual blocks found")
    numbers = torch.stack([torch.stack(r[1:]) for r in rows]).cpu().tolist()  # one transfer
    return pd.DataFrame(
        [
            (depth, r[0], *values)
            for depth, (r, values) in enumerate(zip(rows, numbers, strict=True))
        ],
        columns=SPP_COLUMNS,
    )


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


def residual_growth(
    spp: pd.DataFrame, blocks: Sequence[tuple[str, nn.Module]] | None = None
) -> tuple[bool, str]:
    """The doctor's reading of a signal-propagation frame: (a problem?, one line).

    The stream's second moment m_k (squared mean + variance) is compared with the growth
    laws (docs/RESIDUAL_AND_WIDTH.md): normalised blocks add about the same amount per block
    (linear growth: m_L / m_{L/2} <= 2), NF / SkipInit / 1/sqrt(depth) blocks stay within a
    few times m_0; unscaled, unnormalised blocks double it per block. A problem: exponential
    growth, m_L / m_{L/2} above 2.5 with m_L above 10 m_0 (from 4 blocks on).

    Example:
        >>> frame = pd.DataFrame({"depth": range(9), "channel_mean_sq": 0.0,
        ...                       "channel_var": [2.0**k for k in range(9)]})
        >>> residual_growth(frame)[0]
        True
    """
    m = (spp["channel_mean_sq"] + spp["channel_var"]).to_numpy(dtype=float)
    depth = len(m) - 1
    if depth < 1 or not (m > 0).all():
        return False, "residual stream: too few blocks or a zero stream to judge its growth"
    per_block = (m[-1] / m[0]) ** (1 / depth)
    half = m[-1] / m[depth // 2] if depth >= 4 else float("nan")
    normed = blocks is not None and any(
        isinstance(sub, _NORMS) for _, block in blocks for sub in block.modules()
    )
    kind = "normalised" if normed else "without normalisation" if blocks is not None else ""
    head = (
        f"residual stream over {depth} blocks{f' ({kind})' if kind else ''}: second moment "
        f"{m[0]:.3g} -> {m[-1]:.3g} (x{per_block:.3g} per block"
        + (f", x{half:.3g} over the second half)" if depth >= 4 else ")")
    )
    if depth >= 4 and half > 2.5 and m[-1] > 10 * m[0]:
        why = (
            "exponential growth: each branch adds about what the stream holds; theory for "
            "normalised (BatchNorm) blocks is linear growth, about +1 per block"
        )
        fix = "scale the branches (SkipInit: a zero gain; NF: x + alpha f(x / beta); 1/sqrt(depth))"
        return True, f"{head}: {why}; fix: {fix}"
    law = "linear growth, as theory predicts for normalised blocks" if normed else "bounded"
    return False, f"{head}: {law if m[-1] > 2 * m[0] else 'flat'}"
