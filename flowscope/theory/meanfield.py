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

import math
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import torch
from numpy.polynomial.hermite_e import hermegauss
from numpy.polynomial.legendre import leggauss
from torch import Tensor

from flowscope.core.activations import ACTIVATIONS
from flowscope.core.errors import FlowscopeError
from flowscope.models.inits import INITS

__all__ = [
    "activation_values",
    "check_q",
    "derivative_moment",
    "expect",
    "gradient_gain",
    "predict_mlp",
    "quadrature",
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


def check_q(q: float, what: str = "q") -> float:
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
    scale = math.sqrt(check_q(q))
    m = _moments(fn, scale, quadrature(fn, q))
    return {"phi": float(m[0]), "phi2": float(m[1]), "dphi2": float(m[2])}


def quadrature(activation: ActivationLike, q: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes z and weights w with E[f(z)] ≈ w @ f(z), z ~ N(0, 1): the rule :func:`expect`
    uses for this activation at input variance q (Gauss–Hermite, or the composite panels
    when Gauss–Hermite is not exact enough; see the module's docstring).

    Example:
        >>> z, w = quadrature("tanh", 1.0)
        >>> round(float(w.sum()), 12), round(float(w @ z**2), 12)
        (1.0, 1.0)
    """
    fn = activation_fn(activation)
    scale = math.sqrt(check_q(q))
    if scale <= GH_MAX_SCALE:
        m = _moments(fn, scale, _gauss_hermite())
        half = _moments(fn, scale, _gauss_hermite_half())
        if np.allclose(m, half, rtol=1e-9, atol=1e-300):
            return _gauss_hermite()
    return _panels(scale)


def activation_values(activation: ActivationLike, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """φ(u) and φ'(u) in float64 (autograd, or central differences for callables that do
    not support it).

    Example:
        >>> phi, dphi = activation_values("relu", np.array([-1.0, 2.0]))
        >>> phi.tolist(), dphi.tolist()
        ([0.0, 2.0], [0.0, 1.0])
    """
    return _values(activation_fn(activation), np.asarray(u, dtype=np.float64))


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
    sigma_w2, sigma_b2 = check_q(sigma_w2, "sigma_w2"), check_q(sigma_b2, "sigma_b2")
    q = check_q(q0, "q0")
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
    sigma_w2 = check_q(sigma_w2, "sigma_w2")
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
    the matrix is wider than tall; ``meanfield_orthogonal``: its ``sigma_w2``); ``constant``
    is not random and has no mean-field limit.

    Raises:
        FlowscopeError: unknown scheme or parameter, a bad fan, or ``constant``.
    """
    fan_out = fan_in if fan_out is None else fan_out
    from flowscope.models.inits import init_std

    std = init_std(init, fan_in, fan_out, **init_params)
    if std is not None:
        return fan_in * std**2
    if init in ("orthogonal", "meanfield_orthogonal"):
        params = INITS.get(init).resolve(init_params)
        gain2 = params["gain"] ** 2 if init == "orthogonal" else params["sigma_w2"]
        return gain2 * min(1.0, fan_in / fan_out)
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
    sb2 = check_q(sigma_b2, "sigma_b2")
    q0 = sw2 * check_q(input_var, "input_var") + sb2
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
