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

import itertools
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
    y: torch.Tensor | None = None  # the labels of x (classification data), for accuracy


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


def _views(
    source: Callable[[ProbeContext], dict[str, dict[str, torch.Tensor]]],
    probes: dict[str, tuple[str, str]],
) -> None:
    """Register ``end`` probes that each read one key of ``source``'s shared values
    (``name -> (key, summary)``): one pass of ``source`` serves them all."""
    for name, (key, summary) in probes.items():
        _probe(name, "end", summary)(lambda ctx, key=key: source(ctx)[key])


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


# -- Jacobian spectra and free probability (the isometry study) ---------------------------------

SPECTRUM_INPUTS = 8  # inputs of x whose Jacobians the spectrum probes pool


@dataclass
class _Slot:
    """One probe context's derived values, shared by the probes that read them (a strong
    reference to the context: an id could be reused by the next config's)."""

    ctx: ProbeContext | None = None
    values: dict[str, dict[str, torch.Tensor]] | None = None


_SPECTRA, _FREE, _PAIRS = _Slot(), _Slot(), _Slot()


def _activation_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and activation_type(m) is not None]


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float64, device=like.device)


def _spectrum_moments(ctx: ProbeContext) -> dict[str, dict[str, torch.Tensor]]:
    """Mean and variance of λ, the squared singular values of the Jacobian from the input to
    each activation module's output, over the first SPECTRUM_INPUTS inputs."""
    if _SPECTRA.ctx is not ctx or _SPECTRA.values is None:
        from flowscope.theory import jacobian_moments  # torch.func: only when asked for

        names = _activation_names(ctx.model)
        moments = jacobian_moments(ctx.model, ctx.x[:SPECTRUM_INPUTS], layers=names)
        assert isinstance(moments, dict)
        values: dict[str, dict[str, torch.Tensor]] = {"mean": {}, "var": {}, "cv2": {}}
        for name, m in moments.items():
            assert isinstance(m, dict)
            values["mean"][name] = _scalar(m["mean"], ctx.x)
            values["var"][name] = _scalar(m["var"], ctx.x)
            values["cv2"][name] = _scalar(m["var"] / m["mean"] ** 2, ctx.x)
        _SPECTRA.values, _SPECTRA.ctx = values, ctx
    return _SPECTRA.values


_views(
    _spectrum_moments,
    {
        "jacobian_mean": (
            "mean",
            "mean of the squared singular values of the Jacobian from the input to each"
            " activation module's output (flowscope.theory.jacobian_moments, the first"
            f" {SPECTRUM_INPUTS} inputs)",
        ),
        "jacobian_var": (
            "var",
            "variance of the squared singular values of the Jacobian from the input to each"
            f" activation module's output (the first {SPECTRUM_INPUTS} inputs pooled)",
        ),
        "jacobian_cv2": (
            "cv2",
            "variance / mean² of the squared singular values of the Jacobian from the input to each"
            " activation module's output: the spread of the spectrum whatever its scale",
        ),
    },
)


def _chain_and_acts(model: nn.Module) -> tuple[list, list[str]]:
    """The model's first Linear -> activation chain and its activation modules' names."""
    from flowscope.core.errors import FlowscopeError
    from flowscope.theory import mlp_chains

    chains = mlp_chains(model)
    acts = _activation_names(model)
    if not chains or len(chains[0]) != len(acts):
        raise FlowscopeError(
            "the free-probability probes need an MLP whose activations all follow one chain"
            f" of Linear layers; found chains {[len(c) for c in chains]} and {len(acts)}"
            " activation modules"
        )
    return chains[0], acts


def _is_orthogonal(weight: torch.Tensor) -> bool:
    """Whether W Wᵀ (or Wᵀ W) is a multiple of the identity, to float precision."""
    w = weight.detach().double()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    scale = gram.diagonal().mean()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return bool((gram - scale * eye).abs().max() <= 1e-5 * scale)


def _free_moments(ctx: ProbeContext) -> dict[str, dict[str, torch.Tensor]]:
    """isometry_moments at the net's own σ_w², σ_b² (pooled over its layers), weights
    orthogonal or not as they are, from the input's mean square."""
    if _FREE.ctx is ctx and _FREE.values is not None:
        return _FREE.values
    from flowscope.theory import isometry_moments

    chain, acts = _chain_and_acts(ctx.model)
    modules = dict(ctx.model.named_modules())
    orthogonal = all(_is_orthogonal(modules[link.name].weight) for link in chain)
    sw2 = float(np.mean([link.sigma_w2 for link in chain]))
    sb2 = float(np.mean([link.sigma_b2 for link in chain]))
    q1 = chain[0].sigma_w2 * float(ctx.x.detach().double().pow(2).mean()) + chain[0].sigma_b2
    m = isometry_moments(chain[0].activation, sw2, sb2, q1, len(chain), orthogonal=orthogonal)
    m["cv2"] = m["var"] / m["mean"] ** 2
    _FREE.values = {
        key: {n: _scalar(v, ctx.x) for n, v in zip(acts, m[key], strict=True)}
        for key in ("mean", "var", "cv2")
    }
    _FREE.ctx = ctx
    return _FREE.values


_views(
    _free_moments,
    {
        "isometry_mean": (
            "mean",
            "free-probability mean of λ for each activation output (flowscope.theory"
            ".isometry_moments at the net's own σ_w², σ_b²): ∏ σ_w² E[φ'²]",
        ),
        "isometry_var": (
            "var",
            "free-probability variance of λ for each activation output (Pennington, Schoenholz,"
            " Ganguli 2017): mean² × Σ (E[φ'⁴]/E[φ'²]² − 1 + 1 if Gaussian weights)",
        ),
        "isometry_cv2": (
            "cv2",
            "free-probability variance / mean² of λ for each activation output: Σ over the"
            " layers of E[φ'⁴]/E[φ'²]² − 1, plus 1 per Gaussian weight matrix",
        ),
    },
)


# -- pairs of inputs through the net (the edge-of-chaos study) ----------------------------------


def pair_cosines(output: torch.Tensor) -> torch.Tensor:
    """Mean over the pairs (rows 0 and 1, 2 and 3, ...) of the cosine between their vectors:
    the correlation c = q_ab / √(q_aa q_bb) of mean-field theory."""
    flat = output.detach().double().reshape(output.shape[0], -1)
    a, b = flat[0 : flat.shape[0] // 2 * 2 : 2], flat[1 : flat.shape[0] // 2 * 2 : 2]
    return ((a * b).sum(1) / (a.pow(2).sum(1) * b.pow(2).sum(1)).sqrt()).mean()


def _pair_hooks(gap: bool) -> ProbeHooks:
    def attach(model: nn.Module, into: dict[str, torch.Tensor]) -> Hooks:
        def keep(name: str) -> Callable:
            def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
                c = pair_cosines(output)
                into[name] = 1 - c if gap else c

            return hook

        return forward_hooks(_linears(model), keep)

    return attach


@_probe(
    "pair_correlation",
    "end",
    "correlation c of the outputs of each Linear for pairs of inputs (rows 0/1, 2/3, ...),"
    " averaged over the pairs",
    hooks=_pair_hooks(gap=False),
)
def pair_correlation(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    return read_pass(_pair_hooks(gap=False), ctx.model, ctx.x)


@_probe(
    "decorrelation",
    "end",
    "1 - c for pairs of inputs at each Linear's output (pair_correlation's complement: it"
    " decays like exp(-l / ξ_c) in the ordered phase)",
    hooks=_pair_hooks(gap=True),
)
def decorrelation(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    return read_pass(_pair_hooks(gap=True), ctx.model, ctx.x)


def _pair_theory(ctx: ProbeContext) -> dict[str, dict[str, torch.Tensor]]:
    """The mean-field q_l and c_l along the model's chain, per link at its own σ_w², σ_b²,
    from the first Linear's measured mean square and pair correlation; and exp(-l / ξ_c)
    with ξ_c = depth_scales at the chain's pooled σ_w², σ_b² (and its c*)."""
    if _PAIRS.ctx is ctx and _PAIRS.values is not None:
        return _PAIRS.values
    from flowscope.theory import correlation_map, depth_scales, expect, mlp_chains

    chain = mlp_chains(ctx.model)[0]
    first = dict(ctx.model.named_modules())[chain[0].name]
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
            seen["q"], seen["c"] = output.detach().double().pow(2).mean(), pair_cosines(output)

        return hook

    hooks = forward_hooks([(chain[0].name, first)], keep)
    with _buffers_kept(ctx.model), hooks, torch.no_grad():
        ctx.model(ctx.x)
    q, c = float(seen["q"]), min(float(seen["c"]), 1.0)  # one sync, like meanfield_grad
    qs, cs = [q], [c]
    for link, nxt in itertools.pairwise(chain):
        q_next = nxt.sigma_w2 * expect(link.activation, q)["phi2"] + nxt.sigma_b2
        c = correlation_map(link.activation, nxt.sigma_w2, nxt.sigma_b2, c, q=q) * q / q_next
        c, q = min(max(c, -1.0), 1.0), q_next  # rounding may step past 1
        qs.append(q)
        cs.append(c)
    sw2 = float(np.mean([link.sigma_w2 for link in chain[1:]]))
    sb2 = float(np.mean([link.sigma_b2 for link in chain[1:]]))
    scales = depth_scales(chain[0].activation, sw2, sb2)
    names = [link.name for link in chain]
    series = {
        "rms": np.sqrt(qs),
        "c": np.array(cs),
        "gap": 1 - np.array(cs),
        "xi": np.exp(-np.arange(len(chain)) / scales["xi_c"]),
        "c_star": np.full(len(chain), scales["c_star"]),
    }
    _PAIRS.values = {
        key: {n: _scalar(v, ctx.x) for n, v in zip(names, values, strict=True)}
        for key, values in series.items()
    }
    _PAIRS.ctx = ctx
    return _PAIRS.values


_views(
    _pair_theory,
    {
        "meanfield_pre_rms": (
            "rms",
            "mean-field √q_l of each Linear's output along the chain (each layer's own σ_w², σ_b²;"
            " anchored at the first Linear's measured mean square): it converges to √q*",
        ),
        "meanfield_correlation": (
            "c",
            "mean-field c_l of pairs of inputs at each Linear (the correlation map,"
            " flowscope.theory.correlation_map, from the first Linear's measured c): it"
            " converges to c*",
        ),
        "meanfield_decorrelation": (
            "gap",
            "1 - meanfield_correlation: mean-field theory's value of the probe decorrelation",
        ),
        "meanfield_xi_c": (
            "xi",
            "exp(-l / ξ_c) at Linear l, ξ_c = flowscope.theory.depth_scales at the chain's pooled"
            " σ_w², σ_b²: its depth_scale is ξ_c (NaN where ξ_c is not defined)",
        ),
        "meanfield_c_star": (
            "c_star",
            "c* of flowscope.theory.depth_scales at the chain's pooled σ_w², σ_b², at every Linear:"
            " the correlation deep layers converge to (1 in the ordered phase)",
        ),
    },
)


# -- training (the trainability study) ----------------------------------------------------------


@_probe(
    "train_accuracy",
    "end",
    "share of the inputs x whose largest output is their label y, after the run's steps"
    " (keyed by the model's last Linear)",
)
def train_accuracy(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    from flowscope.core.errors import FlowscopeError

    linears = _linears(ctx.model)
    if ctx.y is None or not linears or ctx.y.dtype not in (torch.int64, torch.int32):
        raise FlowscopeError("probe train_accuracy needs classification data and a Linear head")
    with _buffers_kept(ctx.model), torch.no_grad():
        hit = ctx.model(ctx.x).argmax(dim=1) == ctx.y
    return {linears[-1][0]: hit.double().mean()}


@_probe(
    "meanfield_depth_ratio",
    "end",
    "depth / (6 ξ_c), ξ_c = flowscope.theory.depth_scales at the chain's pooled σ_w², σ_b² of"
    " the initial weights: Schoenholz et al. 2017 find nets trainable where it is below ~1",
)
def meanfield_depth_ratio(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    from flowscope.theory import depth_scales, mlp_chains

    chain = mlp_chains(ctx.model)[0]
    sw2, sb2 = [], []
    for link in chain[1:]:  # the weights before training (ctx.initial), not after it
        w = ctx.initial[f"{link.name}.weight"].double()
        sw2.append(w.shape[1] * float(w.pow(2).mean()))
        bias = ctx.initial.get(f"{link.name}.bias")
        sb2.append(float(bias.double().pow(2).mean()) if bias is not None else 0.0)
    xi = depth_scales(chain[0].activation, float(np.mean(sw2)), float(np.mean(sb2)))["xi_c"]
    return {chain[-1].name: _scalar(len(chain) / (6 * xi), ctx.x)}


# -- signal propagation of residual nets (the residual study) ------------------------------------

_SPP = _Slot()


def _spp(ctx: ProbeContext) -> dict[str, dict[str, torch.Tensor]]:
    """The signal-propagation numbers of the model's residual blocks on ``x``
    (:func:`flowscope.doctor.signal.signal_propagation`), one pass shared by the spp probes."""
    if _SPP.ctx is not ctx or _SPP.values is None:
        from flowscope.doctor.signal import signal_propagation

        frame = signal_propagation(ctx.model, ctx.x).iloc[1:]  # depth 0 is the input
        second = frame.channel_mean_sq + frame.channel_var
        values: dict[str, dict[str, float]] = {
            "m2": dict(zip(frame.block, second, strict=True)),
            "var": dict(zip(frame.block, frame.channel_var, strict=True)),
            "branch": dict(zip(frame.block, frame.branch_var, strict=True)),
        }
        _SPP.values = {
            key: {name: _scalar(v, ctx.x) for name, v in vals.items()}
            for key, vals in values.items()
        }
        _SPP.ctx = ctx
    return _SPP.values


_views(
    _spp,
    {
        "spp_second_moment": (
            "m2",
            "the residual stream's second moment after each residual block (average channel squared"
            " mean + average channel variance: flowscope.doctor.signal_propagation)",
        ),
        "spp_channel_var": (
            "var",
            "the residual stream's average channel variance after each residual block",
        ),
        "spp_branch_var": (
            "branch",
            "the average channel variance of each residual branch's output (what the block adds)",
        ),
    },
)


@_probe(
    "spp_growth_theory",
    "end",
    "the growth law's second moment after each block of a resmlp net, from the input's"
    " (flowscope.theory.residual.stream_second_moment)",
)
def spp_growth_theory(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    from flowscope.core.errors import FlowscopeError
    from flowscope.doctor.signal import residual_blocks
    from flowscope.theory.residual import stream_second_moment

    variant, alpha = getattr(ctx.model, "variant", None), getattr(ctx.model, "alpha", None)
    if not isinstance(variant, str) or not isinstance(alpha, float):
        raise FlowscopeError("probe spp_growth_theory needs a 'resmlp' net (its variant and alpha)")
    names = [name for name, _ in residual_blocks(ctx.model)]
    x = ctx.x.detach().double()
    m0 = float(x.mean(0).pow(2).mean() + x.var(0, unbiased=False).mean())
    law = stream_second_moment(variant, len(names), alpha=alpha, m0=m0)
    return {name: _scalar(v, ctx.x) for name, v in zip(names, law, strict=True)}
