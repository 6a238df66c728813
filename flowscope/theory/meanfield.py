"""Mean-field theory of deep random nets: the variance map q_l and the gradient gain χ.

For a stack of fully connected layers ``s_l = W_l φ(s_{l-1}) + b_l`` with i.i.d. zero-mean
weights of variance ``σ_w² / fan_in`` and biases of variance ``σ_b²``, at infinite width every
pre-activation is Gaussian with variance ``q_l`` (Poole et al. 2016, Schoenholz et al. 2017)::

    q_l = σ_w² E[φ(√q_{l-1} z)²] + σ_b²        z ~ N(0, 1)       (forward)
    χ_l = σ_w² E[φ'(√q_l z)²]                                      (backward)

``χ_l`` is the factor by which the mean square of dL/d(pre-activation) grows from layer l+1
back to layer l (gradient-independence assumption), so the rms of dL/dh grows by ``√χ_l`` per
layer toward the input: ``√χ < 1`` vanishes, ``√χ > 1`` explodes.

The expectations are taken by Gauss–Hermite quadrature (``numpy.polynomial.hermite_e``, 128
nodes) when it is exact enough: for √q ≤ 1.5, and only if 64 nodes give the same three moments
to 1e-9. Otherwise — a kink (hardtanh at ±1: 15 % off at √q = 1.5; ELU's φ' at 0) or a
Gaussian so wide that the nodes step over the activation's unit-scale features (E[tanh'(√q
z)²] is 60 % off at √q = 8) — composite Gauss–Legendre panels are used, with edges every 0.25
in z over |z| ≤ 10 and every 0.5 in the activation's own input u = √q z over |u| ≤ 12, so
kinks at 0, ±1, 6 sit on panel edges. Both rules agree with a brute-force integral to 1e-6
(tests/test_theory.py). φ' comes from autograd on the activation's ``fn`` in float64, or from
central differences when the callable does not support autograd.

Example:
    >>> q = variance_map("relu", sigma_w2=1.0, sigma_b2=0.0, q0=1.0, depth=3)
    >>> [round(float(v), 6) for v in q]           # Xavier on ReLU: q halves per layer
    [1.0, 0.5, 0.25, 0.125]
    >>> round(float(gradient_gain("tanh", 500 * 0.01**2, 1e-6)) ** 0.5, 4)
    0.2236

This module imports torch and numpy only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
from numpy.polynomial.hermite_e import hermegauss
from numpy.polynomial.legendre import leggauss
from torch import Tensor, nn

from flowscope.core.activations import ACTIVATIONS
from flowscope.core.errors import FlowscopeError
from flowscope.models.inits import INITS

__all__ = [
    "Link",
    "derivative_moment",
    "expect",
    "gradient_gain",
    "measure_mlp",
    "mlp_chains",
    "predict_chain",
    "predict_mlp",
    "second_moment",
    "sigma_w2_of",
    "variance_map",
]

ActivationLike = str | Callable[[Tensor], Tensor]

GH_NODES = 128  # Gauss–Hermite nodes (exact to ~1e-11 for tanh/sigmoid moments at √q ≤ 1.5)
GH_MAX_SCALE = 1.5  # √q up to which Gauss–Hermite is used
CORE = 12.0  # |u| window (activation input units) with panel edges every CORE_PANEL
CORE_PANEL = 0.5  # edges on multiples of 0.5 in u: kinks at 0, ±1, 6 sit on them
TAIL = 10.0  # |z| up to which the standard normal is integrated (mass beyond: 1.5e-23)
TAIL_PANEL = 0.25  # panel edges every 0.25 in z
GL_NODES = 12  # Gauss–Legendre nodes per panel


def activation_fn(activation: ActivationLike) -> Callable[[Tensor], Tensor]:
    """The elementwise function of a registry name, or the callable itself.

    Example:
        >>> activation_fn("tanh") is torch.tanh
        True
    """
    if isinstance(activation, str):
        return ACTIVATIONS.get(activation).fn
    if callable(activation):
        return activation
    raise FlowscopeError(
        f"activation must be a name in ({', '.join(ACTIVATIONS.names())}) or a callable on "
        f"tensors, got {activation!r}"
    )


@cache
def _gauss_hermite() -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of E[f(z)], z ~ N(0, 1) (probabilists' Hermite, weights sum to 1)."""
    nodes, weights = hermegauss(GH_NODES)
    return nodes, weights / math.sqrt(2 * math.pi)


@cache
def _gauss_hermite_half() -> tuple[np.ndarray, np.ndarray]:
    """The same rule with half the nodes: the check on Gauss–Hermite's accuracy."""
    nodes, weights = hermegauss(GH_NODES // 2)
    return nodes, weights / math.sqrt(2 * math.pi)


@cache
def _panels(scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes z and weights (density included) of the composite Gauss–Legendre rule at √q."""
    edges = np.arange(-TAIL, TAIL + TAIL_PANEL / 2, TAIL_PANEL)
    if scale > 0:
        u_edges = np.arange(-CORE, CORE + CORE_PANEL / 2, CORE_PANEL) / scale
        edges = np.unique(np.concatenate([edges, u_edges[np.abs(u_edges) < TAIL]]))
    x, w = leggauss(GL_NODES)
    lo, hi = edges[:-1, None], edges[1:, None]
    z = (lo + hi) / 2 + (hi - lo) / 2 * x
    wz = (hi - lo) / 2 * w * np.exp(-(z**2) / 2) / math.sqrt(2 * math.pi)
    return z.ravel(), wz.ravel()


def _moments(
    fn: Callable[[Tensor], Tensor], scale: float, rule: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """[E φ, E φ², E φ'²] under one quadrature rule."""
    z, w = rule
    phi, dphi = _values(fn, scale * z)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.array([w @ phi, w @ phi**2, w @ dphi**2])


def _values(fn: Callable[[Tensor], Tensor], u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """φ(u) and φ'(u) in float64: autograd, or central differences when that fails."""
    x = torch.tensor(u, dtype=torch.float64, requires_grad=True)
    try:
        y = fn(x)
        (grad,) = torch.autograd.grad(y.sum(), x)
        return y.detach().numpy(), grad.numpy()
    except (RuntimeError, TypeError, AttributeError):
        pass
    with torch.no_grad():
        base = torch.tensor(u, dtype=torch.float64)
        y = torch.as_tensor(fn(base), dtype=torch.float64)
        h = 1e-6 * torch.clamp(base.abs(), min=1.0)
        up = torch.as_tensor(fn(base + h), dtype=torch.float64)
        down = torch.as_tensor(fn(base - h), dtype=torch.float64)
    return y.numpy(), ((up - down) / (2 * h)).numpy()


def _check_q(q: float, what: str = "q") -> float:
    """A finite variance >= 0."""
    if isinstance(q, bool) or not isinstance(q, (int, float, np.floating)):
        raise FlowscopeError(f"{what} must be a number >= 0, got {q!r}")
    if not (math.isfinite(q) and q >= 0):
        raise FlowscopeError(f"{what} must be a finite number >= 0, got {q!r}")
    return float(q)


def expect(activation: ActivationLike, q: float) -> dict[str, float]:
    """E[φ(√q z)], E[φ(√q z)²] and E[φ'(√q z)²] for z ~ N(0, 1).

    Example:
        >>> m = expect("relu", 4.0)
        >>> round(m["phi2"], 10), round(m["dphi2"], 10)     # q/2 and 1/2
        (2.0, 0.5)

    Args:
        activation: a name in ``ACTIVATIONS`` or an elementwise callable on float64 tensors.
        q: the variance of the activation's input, finite and >= 0.

    Returns:
        ``{"phi": E[φ], "phi2": E[φ²], "dphi2": E[φ'²]}``.

    Raises:
        FlowscopeError: an unknown activation name or a bad ``q``.
    """
    fn = activation_fn(activation)
    scale = math.sqrt(_check_q(q))
    m = None
    if scale <= GH_MAX_SCALE:
        m = _moments(fn, scale, _gauss_hermite())
        half = _moments(fn, scale, _gauss_hermite_half())
        if not np.allclose(m, half, rtol=1e-9, atol=1e-300):
            m = None
    if m is None:
        m = _moments(fn, scale, _panels(scale))
    return {"phi": float(m[0]), "phi2": float(m[1]), "dphi2": float(m[2])}


def second_moment(activation: ActivationLike, q: float) -> float:
    """E[φ(√q z)²]: the mean square of the activation's output at input variance q.

    Example:
        >>> round(second_moment("linear", 3.0), 12)
        3.0
    """
    return expect(activation, q)["phi2"]


def derivative_moment(activation: ActivationLike, q: float) -> float:
    """E[φ'(√q z)²]: the mean squared slope of the activation at input variance q.

    Example:
        >>> round(derivative_moment("relu", 1.0), 12)
        0.5
    """
    return expect(activation, q)["dphi2"]


def variance_map(
    activation: ActivationLike, sigma_w2: float, sigma_b2: float, q0: float, depth: int
) -> np.ndarray:
    """Iterate q_l = σ_w² E[φ(√q_{l-1} z)²] + σ_b² from q_0, ``depth`` times.

    Example:
        >>> variance_map("linear", 2.0, 0.0, 1.0, 3).round(12).tolist()  # q times σ_w² per layer
        [1.0, 2.0, 4.0, 8.0]
        >>> variance_map("relu", 2.0, 0.0, 1.0, 2).round(12).tolist()   # He keeps q
        [1.0, 1.0, 1.0]

    Args:
        activation: a name in ``ACTIVATIONS`` or an elementwise callable.
        sigma_w2: σ_w² = fan_in × the weights' variance (>= 0).
        sigma_b2: the biases' variance (>= 0).
        q0: the variance of the pre-activations of the first layer (>= 0).
        depth: how many times to apply the map (>= 0).

    Returns:
        ``[q_0, q_1, ..., q_depth]`` (float64, length ``depth + 1``). Values that overflow
        float64 become ``inf``.

    Raises:
        FlowscopeError: an unknown activation, a negative or non-finite variance, a bad depth.
    """
    sigma_w2, sigma_b2 = _check_q(sigma_w2, "sigma_w2"), _check_q(sigma_b2, "sigma_b2")
    q = _check_q(q0, "q0")
    depth = _check_depth(depth, low=0)
    out = [q]
    for _ in range(depth):
        q = sigma_w2 * second_moment(activation, q) + sigma_b2 if math.isfinite(q) else math.inf
        q = q if math.isfinite(q) else math.inf
        out.append(q)
    return np.asarray(out, dtype=np.float64)


def gradient_gain(activation: ActivationLike, sigma_w2: float, q: Any) -> Any:
    """χ = σ_w² E[φ'(√q z)²]: growth of E[(dL/dh)²] per layer toward the input.

    Example:
        >>> round(gradient_gain("relu", 2.0, 1.0), 12)          # He on ReLU: critical
        1.0
        >>> gradient_gain("linear", 0.5, [1.0, 4.0]).round(12).tolist()
        [0.5, 0.5]

    Args:
        activation: a name in ``ACTIVATIONS`` or an elementwise callable.
        sigma_w2: σ_w² of the layer above (fan_in × weight variance; for square layers the
            same as the forward σ_w²).
        q: the pre-activation variance of the layer (a number or an array of them).

    Returns:
        χ (a float for a scalar ``q``, else an array). The rms of dL/dh grows by ``√χ``
        per layer toward the input.

    Raises:
        FlowscopeError: an unknown activation or a bad variance.
    """
    sigma_w2 = _check_q(sigma_w2, "sigma_w2")
    if np.ndim(q) == 0:
        return sigma_w2 * derivative_moment(activation, float(q))
    return np.array([sigma_w2 * derivative_moment(activation, float(v)) for v in np.ravel(q)])


def sigma_w2_of(init: str, fan_in: int, fan_out: int | None = None, **init_params: object) -> float:
    """σ_w² = fan_in × variance of an init scheme's weights.

    Example:
        >>> round(sigma_w2_of("he", 500), 12), round(sigma_w2_of("small", 500), 12)
        (2.0, 0.05)
        >>> sigma_w2_of("orthogonal", 500, gain=2.0)
        4.0

    ``orthogonal`` rows have unit norm, so it acts as σ_w² = gain² (× fan_in/fan_out when
    the matrix is wider than tall); ``constant`` is not random and has no mean-field limit.

    Raises:
        FlowscopeError: unknown scheme or parameter, a bad fan, or ``constant``.
    """
    fan_out = fan_in if fan_out is None else fan_out
    from flowscope.models.inits import init_std

    std = init_std(init, fan_in, fan_out, **init_params)
    if std is not None:
        return fan_in * std**2
    if init == "orthogonal":
        gain = INITS.get("orthogonal").resolve(init_params)["gain"]
        return gain**2 * min(1.0, fan_in / fan_out)
    raise FlowscopeError(
        f"init {init!r} is not an i.i.d. random scheme; mean-field theory needs one of "
        f"{', '.join(n for n in INITS.names() if n != 'constant')}"
    )


def _check_depth(depth: object, low: int = 1) -> int:
    """An integer depth >= low."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < low:
        raise FlowscopeError(f"depth must be an integer >= {low}, got {depth!r}")
    return depth


def predict_mlp(
    activation: ActivationLike,
    init: str,
    fan_in: int,
    depth: int,
    input_var: float = 1.0,
    *,
    sigma_b2: float = 0.0,
    **init_params: object,
) -> dict[str, np.ndarray]:
    """Predicted per-layer statistics of a plain MLP (Linear → activation, ``depth`` times).

    Example:
        >>> p = predict_mlp("tanh", "small", fan_in=500, depth=10)
        >>> round(float(p["grad_gain"][-1]), 4), f"{p['pre_std'][-1]:.2e}"
        (0.2236, '2.98e-07')
        >>> p = predict_mlp("relu", "he", fan_in=500, depth=10)
        >>> round(float(p["pre_std"][-1]), 6), round(float(p["grad_gain"][0]), 6)
        (1.414214, 1.0)

    The study nets (``nets.mlp``): every layer has ``fan_in`` inputs and outputs (the
    lecture: 500), weights from ``init``, biases N(0, σ_b²) (0 after ``apply_init``), inputs
    with mean 0 and variance ``input_var``. Layer ``l`` is ``layers.{l}`` of the net.

    Args:
        activation: a name in ``ACTIVATIONS`` or an elementwise callable.
        init: a scheme in ``INITS`` (not ``constant``).
        fan_in: units per layer (= input dimension), >= 1.
        depth: number of layers, >= 1.
        input_var: variance of the input entries (>= 0).
        sigma_b2: variance of the biases (>= 0).
        **init_params: the scheme's parameters (``std=`` for ``normal``).

    Returns:
        Arrays of length ``depth``, index l = layer l:

        - ``q``: pre-activation variance (the Linear output), ``pre_std`` = √q;
        - ``act_std`` / ``act_rms``: std / rms of the activation's output (what the
          lecture's activation histograms show);
        - ``chi``: χ_l = σ_w² E[φ'(√q_l z)²];
        - ``grad_gain``: √χ_l, the factor by which the rms of dL/d(pre-activation) grows
          from layer l+1 to layer l (the last entry: from a next layer of the same width);
        - ``grad_std``: rms of dL/d(pre-activation) relative to the last layer's
          (last entry 1).
        - ``act_gain``: pre_std[l] / pre_std[l-1] (first entry NaN).

    Raises:
        FlowscopeError: unknown activation or init, bad sizes or variances.
    """
    depth = _check_depth(depth)
    if isinstance(fan_in, bool) or not isinstance(fan_in, int) or fan_in < 1:
        raise FlowscopeError(f"fan_in must be an integer >= 1, got {fan_in!r}")
    activation_fn(activation)
    sw2 = sigma_w2_of(init, fan_in, fan_in, **init_params)
    sb2 = _check_q(sigma_b2, "sigma_b2")
    q0 = sw2 * _check_q(input_var, "input_var") + sb2
    q = variance_map(activation, sw2, sb2, q0, depth - 1)
    moments = [expect(activation, float(v)) if math.isfinite(v) else None for v in q]
    nan = math.nan
    phi = np.array([m["phi"] if m else nan for m in moments])
    phi2 = np.array([m["phi2"] if m else nan for m in moments])
    chi = np.array([sw2 * m["dphi2"] if m else nan for m in moments])
    gain = np.sqrt(chi)
    grad_std = np.ones(depth)
    for layer in range(depth - 2, -1, -1):
        grad_std[layer] = grad_std[layer + 1] * gain[layer]
    with np.errstate(invalid="ignore", divide="ignore"):
        pre_std = np.sqrt(q)
        act_gain = np.concatenate([[nan], pre_std[1:] / pre_std[:-1]])
    return {
        "q": q,
        "pre_std": pre_std,
        "act_rms": np.sqrt(phi2),
        "act_std": np.sqrt(np.maximum(phi2 - phi**2, 0.0)),
        "act_gain": act_gain,
        "chi": chi,
        "grad_gain": gain,
        "grad_std": grad_std,
    }


# Elementwise activation modules mean-field theory can follow (by class).
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.Tanh,
    nn.Sigmoid,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Softsign,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Tanhshrink,
    nn.Identity,
)
_NORMS = (nn.BatchNorm1d, nn.LayerNorm)


@dataclass(frozen=True)
class Link:
    """One Linear → [norm] → activation step of a model, with what the theory needs.

    Attributes:
        name: qualified name of the Linear (the recorder's ``layer``).
        fan_in: its in_features.
        sigma_w2: fan_in × mean(W²) (forward); ``back_w2``: out_features × mean(W²), the
            σ_w² the backward pass through this weight sees.
        sigma_b2: mean(b²) (0 without bias).
        weight_std: the std of W's entries.
        norm: None, or the mean square the norm leaves (mean γ² + mean β²; 1 at init);
            ``gamma2``: mean γ², the norm's factor on the backward signal (times 1/q).
        activation: the activation as an elementwise callable (in-place switched off).
        act_type: the activation's class name.
    """

    name: str
    fan_in: int
    sigma_w2: float
    back_w2: float
    sigma_b2: float
    weight_std: float
    norm: float | None
    gamma2: float
    activation: Callable[[Tensor], Tensor]
    act_type: str


def _link(name: str, linear: nn.Linear, norm: nn.Module | None, act: nn.Module) -> Link:
    """Read one link's numbers off its modules."""
    with torch.no_grad():
        w = linear.weight.detach().double()
        mean_sq = float(w.pow(2).mean())
        bias = linear.bias
        sb2 = float(bias.detach().double().pow(2).mean()) if isinstance(bias, Tensor) else 0.0
        after_norm, g2 = None, 1.0
        if norm is not None:
            gamma, beta = getattr(norm, "weight", None), getattr(norm, "bias", None)
            g2 = float(gamma.detach().double().pow(2).mean()) if isinstance(gamma, Tensor) else 1.0
            b2 = float(beta.detach().double().pow(2).mean()) if isinstance(beta, Tensor) else 0.0
            after_norm = g2 + b2
    fn = copy.copy(act)
    if hasattr(fn, "inplace"):
        fn.inplace = False  # type: ignore[assignment]
    return Link(
        name=name,
        fan_in=linear.in_features,
        sigma_w2=linear.in_features * mean_sq,
        back_w2=linear.out_features * mean_sq,
        sigma_b2=sb2,
        weight_std=float(w.std(unbiased=False)),
        norm=after_norm,
        gamma2=g2,
        activation=fn,
        act_type=type(act).__name__,
    )


def mlp_chains(model: nn.Module) -> list[list[Link]]:
    """The Linear → [BatchNorm1d | LayerNorm] → activation chains of a model, in order.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
        ...                     nn.Linear(8, 2))
        >>> [[link.name for link in chain] for chain in mlp_chains(net)]
        [['0', '2']]

    A chain is a run of at least two links where each Linear's ``in_features`` equals the
    previous one's ``out_features`` and the modules follow each other in definition order
    (``named_modules``), as in ``nn.Sequential`` stacks and the study nets. A Linear
    without an elementwise activation after it (a head) ends the chain.
    """
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    chains: list[list[Link]] = []
    current: list[Link] = []
    last_out: int | None = None
    i = 0
    while i < len(leaves):
        name, module = leaves[i]
        found = _match_link(leaves, i)
        if found is None:
            if isinstance(module, nn.Linear) or not isinstance(module, ELEMENTWISE + _NORMS):
                chains.append(current)
                current, last_out = [], None
            i += 1
            continue
        linear, norm, act, i = found
        if last_out is not None and linear.in_features != last_out:
            chains.append(current)
            current = []
        current.append(_link(name, linear, norm, act))
        last_out = linear.out_features
    chains.append(current)
    return [c for c in chains if len(c) >= 2]


def _match_link(
    leaves: list[tuple[str, nn.Module]], i: int
) -> tuple[nn.Linear, nn.Module | None, nn.Module, int] | None:
    """(linear, norm, activation, next index) when a link starts at leaves[i], else None."""
    linear = leaves[i][1]
    if not isinstance(linear, nn.Linear):
        return None
    j, norm = i + 1, None
    if j < len(leaves) and isinstance(leaves[j][1], _NORMS):
        norm, j = leaves[j][1], j + 1
    if j < len(leaves) and isinstance(leaves[j][1], ELEMENTWISE):
        return linear, norm, leaves[j][1], j + 1
    return None


def predict_chain(chain: list[Link], q0: float) -> dict[str, np.ndarray]:
    """Mean-field prediction along a chain, anchored at the first Linear's output variance.

    Example:
        >>> net = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(50, 50), nn.ReLU())])
        >>> for m in net[::2]:
        ...     _ = nn.init.normal_(m.weight, std=(2 / 50) ** 0.5), nn.init.zeros_(m.bias)
        >>> p = predict_chain(mlp_chains(net)[0], q0=1.0)
        >>> (p["q"] / p["q"][0]).round(1).tolist()    # He: the variance stays (up to sampling)
        [1.0, 1.0, 1.0]

    Args:
        chain: links as ``mlp_chains`` returns them.
        q0: the mean square of the first Linear's output (measured).

    Returns:
        Arrays over the links: ``q`` (mean square of each Linear's output), ``pre_std``
        (√q), ``act_gain`` (pre_std[l] / pre_std[l-1], first NaN), ``grad_gain`` (rms of
        dL/d(Linear output) at link l over that at link l+1; last NaN). A norm resets the
        activation's input variance to its ``norm`` value and divides the backward signal
        by √q.
    """
    n = len(chain)
    q = np.full(n, math.nan)
    gain = np.full(n, math.nan)
    q[0] = _check_q(q0, "q0")
    for k in range(n):
        link = chain[k]
        v = q[k] if link.norm is None else link.norm
        if not math.isfinite(v):
            break
        m = expect(link.activation, v)
        if k + 1 < n:
            nxt = chain[k + 1]
            q[k + 1] = nxt.sigma_w2 * m["phi2"] + nxt.sigma_b2
            scale = 1.0 if link.norm is None or q[k] <= 0 else link.gamma2 / q[k]
            gain[k] = math.sqrt(nxt.back_w2 * m["dphi2"] * scale)
    with np.errstate(invalid="ignore", divide="ignore"):
        pre_std = np.sqrt(q)
        act_gain = np.concatenate([[math.nan], pre_std[1:] / pre_std[:-1]])
    return {"q": q, "pre_std": pre_std, "act_gain": act_gain, "grad_gain": gain}


def measure_mlp(
    activation: str,
    init: str,
    *,
    fan_in: int = 500,
    depth: int = 10,
    batch: int = 1000,
    seed: int = 0,
    **init_params: object,
) -> dict[str, np.ndarray]:
    """Measure, on a real ``nets.mlp``, what :func:`predict_mlp` predicts.

    Example:
        >>> got = measure_mlp("tanh", "xavier", fan_in=64, depth=3, batch=256)
        >>> sorted(got)
        ['act_std', 'grad_gain', 'pre_std']

    Inputs are N(0, 1); weights from ``init`` with zero biases (``inits.apply_init``); the
    loss is ⟨output, r⟩ with r ~ N(0, 1) drawn independently, so dL/d(output) does not depend
    on the forward weights (the gradient-independence assumption of the theory; a loss such
    as mean(output²) correlates them and inflates the top layers' gradient gain by up to √2).

    Returns:
        ``pre_std`` and ``act_std`` per layer (std over batch × units of the Linear output and
        of the activation output) and ``grad_gain`` (length depth − 1: rms of dL/d(Linear
        output) at layer l over that at l + 1).
    """
    from flowscope.models.inits import apply_init
    from flowscope.models.nets import build_net

    net = build_net("mlp", activation=activation, in_dim=fan_in, width=fan_in, depth=depth)
    params: dict[str, Any] = dict(init_params)
    apply_init(net, init, generator=torch.Generator().manual_seed(seed), **params)
    x = torch.randn(batch, fan_in, generator=torch.Generator().manual_seed(10_000 + seed))
    pre, post, h = [], [], x
    for block in net.layers:  # type: ignore[union-attr]
        s = block.linear(h)
        s.retain_grad()
        h = block.act(s)
        pre.append(s)
        post.append(h)
    r = torch.randn(h.shape, generator=torch.Generator().manual_seed(20_000 + seed))
    (h * r).sum().backward()
    grad = np.array([float(s.grad.double().pow(2).mean().sqrt()) for s in pre])
    return {
        "pre_std": np.array([float(s.detach().double().std(unbiased=False)) for s in pre]),
        "act_std": np.array([float(a.detach().double().std(unbiased=False)) for a in post]),
        "grad_gain": grad[:-1] / grad[1:],
    }


def _lecture_table(seeds: int = 1) -> str:
    """Theory against measurement on the DD2424 lecture-4 nets, as text."""
    lines = [
        "10 layers x 500 units, N(0,1) inputs, batch 1000; max |measured/predicted - 1| "
        f"over layers (and {seeds} seed(s))",
        f"{'config':<14} {'pre-act std':>11} {'act std':>9} {'layer gain':>10} "
        f"{'dL/dh gain':>10}   predicted: last pre-act std, dL/dh gain per layer",
    ]
    for act in ("tanh", "relu"):
        for init in ("small", "large", "xavier", "he"):
            pred = predict_mlp(act, init, fan_in=500, depth=10)
            worst = np.zeros(4)
            for seed in range(seeds):
                got = measure_mlp(act, init, seed=seed)
                gains = got["pre_std"][1:] / got["pre_std"][:-1]
                devs = [
                    got["pre_std"] / pred["pre_std"],
                    got["act_std"] / pred["act_std"],
                    gains / pred["act_gain"][1:],
                    got["grad_gain"] / pred["grad_gain"][:-1],
                ]
                worst = np.maximum(worst, [np.abs(d - 1).max() for d in devs])
            lines.append(
                f"{act + ' ' + init:<14} {worst[0]:>11.1%} {worst[1]:>9.1%} {worst[2]:>10.1%} "
                f"{worst[3]:>10.1%}   {pred['pre_std'][-1]:.3g}, {pred['grad_gain'][-2]:.4g}"
            )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m flowscope.theory.meanfield [seeds]
    import sys

    print(_lecture_table(int(sys.argv[1]) if len(sys.argv) > 1 else 1))
