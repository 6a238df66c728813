"""Depth scales of deep random nets: the correlation map, χ₁, ξ_q, ξ_c and the edge of chaos.

Two inputs a, b enter a deep random net (weights N(0, σ_w²/fan_in), biases N(0, σ_b²)). At
infinite width their pre-activations at layer l are jointly Gaussian with variances q_l and
covariance q_ab,l; once q_l has reached its fixed point q*, their correlation
c_l = q_ab,l / q* follows the correlation map (Poole et al. 2016, eq. 3-5)::

    c_{l+1} = f(c_l) = (σ_w² E[φ(u₁) φ(u₂)] + σ_b²) / q*
    u₁ = √q* z₁,  u₂ = √q* (c z₁ + √(1 - c²) z₂),   z₁, z₂ ~ N(0, 1) independent

c = 1 is always a fixed point; its slope there is χ₁ = σ_w² E[φ'(√q* z)²] (Poole eq. 7).
χ₁ < 1: **ordered** phase, every pair of inputs becomes perfectly correlated (c* = 1);
χ₁ > 1: **chaotic** phase, c = 1 is unstable and correlations converge to c* < 1; χ₁ = 1 is
the **edge of chaos**. Near their fixed points both maps converge exponentially
(Schoenholz et al. 2017, eq. 4-9)::

    |q_l - q*| ~ exp(-l / ξ_q),   ξ_q⁻¹ = -log(σ_w² E[z φ(√q* z) φ'(√q* z)] / √q*)
    |c_l - c*| ~ exp(-l / ξ_c),   ξ_c⁻¹ = -log(σ_w² E[φ'(u₁) φ'(u₂)] at c*)

The ξ_q written here is the slope of the variance map at q*, d/dq [σ_w² E φ(√q z)²]; by
Stein's lemma it equals Schoenholz's ``-log(χ₁ + σ_w² E[φ''(u) φ(u)])``, without φ''. At
c* = 1, ξ_c = -1/log χ₁, which diverges at the edge of chaos: signals propagate through
depth ~ξ_c, and Schoenholz et al. find nets trainable up to depth ~6 ξ_c.

One-dimensional expectations use :func:`flowscope.theory.meanfield.quadrature` (the rule of
:func:`~flowscope.theory.meanfield.expect`); the two-dimensional ones its tensor product,
or a coarser composite rule where that would be a million points (``_pair_nodes``), and
closed forms (arc-cosine kernels) for ReLU-like activations.

**ReLU** (and other positively homogeneous φ: linear, leaky ReLU) has no transition in the
usual sense: χ₁ = σ_w² E[φ'²] does not depend on q (σ_w²/2 for ReLU), the variance map is
linear in q and has a finite fixed point only while χ₁ < 1 (q* = σ_b² / (1 - σ_w²/2)), and
there c* = 1: no chaotic phase. At σ_w² = 2 (He) q is kept when σ_b² = 0 and grows linearly
otherwise; beyond it q grows geometrically (q* = inf: :func:`depth_scales` says
``phase = "unbounded"``). Hayou, Doucet, Rousseau 2019 ("On the impact of the activation
function on deep neural networks training") discuss this case.

Example:
    >>> s = depth_scales("tanh", 1.5, 0.05)
    >>> s["phase"], round(s["chi_1"], 4), round(s["xi_c"], 2)
    ('ordered', 0.9386, 15.79)
    >>> round(edge_of_chaos("tanh", 0.05), 3)     # Schoenholz et al. 2017: ~1.76
    1.761

Torch and numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import torch

from flowscope.core.errors import FlowscopeError
from flowscope.theory.meanfield import (
    GH_NODES,
    ActivationLike,
    activation_fn,
    activation_values,
    check_q,
    quadrature,
)

__all__ = ["correlation_map", "depth_scales", "edge_of_chaos", "fixed_point"]

Q_MAX = 1e12  # a variance beyond this counts as unbounded (no finite fixed point)
Q_MIN = 1e-12  # a variance below this counts as 0 (the signal dies out)
CRITICAL_TOL = 1e-9  # |χ₁ - 1| within this: the edge of chaos itself


def _root(g: Callable[[float], float], a: float, b: float, ga: float, gb: float) -> float:
    """A root of g in [a, b] where g(a), g(b) have opposite signs (Illinois regula falsi:
    bracketing, so it cannot leave the interval; superlinear)."""
    side = 0
    for _ in range(200):
        x = (a * gb - b * ga) / (gb - ga)
        gx = g(x)
        if abs(gx) <= 1e-15 or abs(b - a) <= 1e-14 * max(1.0, abs(x)):
            return x
        if (gx > 0) == (gb > 0):
            b, gb = x, gx
            if side == -1:
                ga /= 2
            side = -1
        else:
            a, ga = x, gx
            if side == 1:
                gb /= 2
            side = 1
    return (a + b) / 2


def fixed_point(
    activation: ActivationLike, sigma_w2: float, sigma_b2: float, q0: float = 1.0
) -> float:
    """q*: the fixed point of q = σ_w² E[φ(√q z)²] + σ_b² that iterating the map from ``q0``
    reaches (0 when the signal dies out, ``inf`` when it grows without bound).

    Example:
        >>> round(fixed_point("relu", 1.0, 0.5), 12)        # σ_b² / (1 - σ_w²/2)
        1.0
        >>> fixed_point("relu", 3.0, 0.0), fixed_point("tanh", 0.5, 0.0)
        (inf, 0.0)

    Where every q is a fixed point (linear at σ_w² = 1, ReLU at σ_w² = 2, both with
    σ_b² = 0) it is ``q0``.

    Raises:
        FlowscopeError: an unknown activation or a bad variance.
    """
    sw2, sb2, q0 = check_q(sigma_w2, "sigma_w2"), check_q(sigma_b2, "sigma_b2"), check_q(q0, "q0")
    fn = activation_fn(activation)
    q0 = max(q0, Q_MIN)

    def g(q: float) -> float:
        z, w = quadrature(fn, q)
        phi, _ = activation_values(fn, math.sqrt(q) * z)
        return sw2 * float(w @ phi**2) + sb2 - q

    g0 = g(q0)
    if abs(g0) <= 1e-12 * q0:  # q0 is a fixed point (or on a line of them)
        return q0
    step = 4.0 if g0 > 0 else 0.25  # the map moves q up (down) from q0: walk that way
    a, ga = q0, g0
    while True:
        b = a * step
        if b > Q_MAX:
            return math.inf
        if b < Q_MIN:
            return 0.0
        gb = g(b)
        if gb == 0:
            return b
        if (gb > 0) != (ga > 0):
            return _root(g, a, b, ga, gb)
        a, ga = b, gb


def _pair_nodes(fn: Callable, q: float) -> tuple[np.ndarray, np.ndarray]:
    """1-D nodes and weights for the tensor-product rule at variance q: Gauss–Hermite where
    :func:`quadrature` trusts it; else composite 8-node Gauss–Legendre panels at most 1 wide
    in z (|z| <= 9) with edges also every 1 in u = √q z (|u| <= 8): coarser than the 1-D
    rule, whose square would be a million points, and as exact for a smooth φ (tested
    against the 1-D rule at c = 1 in tests/test_depthscales.py)."""
    z, w = quadrature(fn, q)
    if z.size <= GH_NODES:
        return z, w
    edges = np.arange(-9.0, 9.5, 1.0)
    u_edges = np.arange(-8.0, 8.5, 1.0) / math.sqrt(q)
    edges = np.unique(np.concatenate([edges, u_edges[np.abs(u_edges) < 9.0]]))
    x, gl = _legendre8()
    lo, hi = edges[:-1, None], edges[1:, None]
    nodes = (lo + hi) / 2 + (hi - lo) / 2 * x
    weights = (hi - lo) / 2 * gl * np.exp(-(nodes**2) / 2) / math.sqrt(2 * math.pi)
    return nodes.ravel(), weights.ravel()


@cache
def _legendre8() -> tuple[np.ndarray, np.ndarray]:
    """8-node Gauss–Legendre nodes and weights on [-1, 1]."""
    return np.polynomial.legendre.leggauss(8)


def _phi(fn: Callable, u: np.ndarray) -> np.ndarray:
    """φ(u) in float64, without its derivative."""
    with torch.no_grad():
        return torch.as_tensor(fn(torch.from_numpy(u)), dtype=torch.float64).numpy()


def _pair_moments(fn: Callable, q: float, c: float, slopes: bool = True) -> tuple[float, float]:
    """(E[φ(u₁)φ(u₂)], E[φ'(u₁)φ'(u₂)]) at variance q and correlation c (the second NaN
    unless ``slopes``)."""
    sides = _homogeneous_sides(fn)
    if sides is not None:
        return _kinked_pair(*sides, q, c)
    z, w = _pair_nodes(fn, q)
    s, c = math.sqrt(q), min(max(c, -1.0), 1.0)
    u1 = s * z
    u2 = s * (c * z[:, None] + math.sqrt(max(1.0 - c * c, 0.0)) * z[None, :])
    ww = w[:, None] * w[None, :]
    if not slopes:
        phi1, phi2 = _phi(fn, u1), _phi(fn, u2.ravel()).reshape(u2.shape)
        return float((ww * phi1[:, None] * phi2).sum()), math.nan
    phi1, dphi1 = activation_values(fn, u1)
    phi2, dphi2 = activation_values(fn, u2.ravel())
    phi2, dphi2 = phi2.reshape(u2.shape), dphi2.reshape(u2.shape)
    return float((ww * phi1[:, None] * phi2).sum()), float((ww * dphi1[:, None] * dphi2).sum())


def _kinked_pair(a: float, b: float, q: float, c: float) -> tuple[float, float]:
    """The pair moments of φ(u) = a·relu(u) + b·relu(-u) in closed form: the arc-cosine
    kernels of Cho & Saul 2009, K(c) = E[relu(u₁)relu(u₂)] = q (√(1-c²) + (π - arccos c) c)
    / 2π and P(c) = P(u₁ > 0, u₂ > 0) = (π - arccos c) / 2π; relu(-u₂) has correlation -c."""
    c = min(max(c, -1.0), 1.0)

    def k(r: float) -> float:
        return q * (math.sqrt(max(1 - r * r, 0.0)) + (math.pi - math.acos(r)) * r) / (2 * math.pi)

    def p(r: float) -> float:
        return (math.pi - math.acos(r)) / (2 * math.pi)

    phi = (a * a + b * b) * k(c) + 2 * a * b * k(-c)
    dphi = (a * a + b * b) * p(c) - 2 * a * b * p(-c)  # φ' = a on u > 0, -b on u < 0
    return phi, dphi


def correlation_map(
    activation: ActivationLike, sigma_w2: float, sigma_b2: float, c: Any, q: float | None = None
) -> Any:
    """f(c) = (σ_w² E[φ(u₁)φ(u₂)] + σ_b²) / q: the correlation of two inputs one layer on,
    given their correlation c and their common variance q (default: the fixed point q*).

    Example:
        >>> round(correlation_map("tanh", 2.0, 0.0, 1.0), 10)     # c = 1 is always fixed
        1.0
        >>> correlation_map("relu", 2.0, 0.0, [0.0, 0.5]).round(4).tolist()   # 1/π, ...
        [0.3183, 0.609]

    Args:
        activation: a name in ``ACTIVATIONS`` or an elementwise callable.
        sigma_w2, sigma_b2: the weights' σ_w² (fan_in × variance) and the biases' variance.
        c: a correlation in [-1, 1], or a sequence of them.
        q: the inputs' variance at this layer; None = the fixed point q* from q = 1.

    Returns:
        f(c), a float for a scalar ``c``, else an array.

    Raises:
        FlowscopeError: a bad argument, or q* = 0 or inf (no correlation to speak of).
    """
    fn = activation_fn(activation)
    sw2, sb2 = check_q(sigma_w2, "sigma_w2"), check_q(sigma_b2, "sigma_b2")
    q = fixed_point(fn, sw2, sb2) if q is None else check_q(q, "q")
    if not Q_MIN <= q <= Q_MAX:
        raise FlowscopeError(f"the correlation map needs a variance in (0, inf); q = {q}")
    cs = np.atleast_1d(np.asarray(c, dtype=np.float64))
    if not np.all(np.abs(cs) <= 1):
        raise FlowscopeError(f"c must be correlations in [-1, 1], got {c!r}")
    out = np.array([(sw2 * _pair_moments(fn, q, float(v), False)[0] + sb2) / q for v in cs])
    return float(out[0]) if np.ndim(c) == 0 else out


def _correlation_fixed_point(fn: Callable, sw2: float, sb2: float, q: float) -> float:
    """c* < 1 of the chaotic phase: the stable root of f(c) = c below 1 (f(0) >= 0, f > c
    just... below 1 f < c since f'(1) = χ₁ > 1)."""

    def g(c: float) -> float:
        return (sw2 * _pair_moments(fn, q, c, False)[0] + sb2) / q - c

    g0 = g(0.0)
    if g0 <= 0:  # odd φ without bias: c = 0 is fixed
        return 0.0
    for eps in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
        gb = g(1.0 - eps)
        if gb < 0:
            return _root(g, 0.0, 1.0 - eps, g0, gb)
    return 1.0  # χ₁ so close to 1 that c* cannot be told from 1


def depth_scales(activation: ActivationLike, sigma_w2: float, sigma_b2: float) -> dict[str, Any]:
    """Where a deep random net sits on the phase diagram: q*, χ₁, c*, ξ_q, ξ_c.

    Example:
        >>> s = depth_scales("tanh", 2.5, 0.05)
        >>> s["phase"], round(s["c_star"], 4), round(s["xi_c"], 2)
        ('chaotic', 0.4468, 11.8)
        >>> r = depth_scales("relu", 1.0, 0.1)
        >>> r["phase"], round(r["chi_1"], 12), round(r["q_star"], 12), round(r["xi_c"], 4)
        ('ordered', 0.5, 0.2, 1.4427)

    Args:
        activation: a name in ``ACTIVATIONS`` or an elementwise callable (``torch.erf``).
        sigma_w2: σ_w² = fan_in × the weights' variance (>= 0).
        sigma_b2: the biases' variance (>= 0).

    Returns:
        A dict with

        - ``q_star``: the variance fixed point reached from q = 1 (0: the signal dies out;
          ``inf``: no finite fixed point);
        - ``chi_1``: σ_w² E[φ'(√q* z)²], the slope of the correlation map at c = 1 (and the
          gradients' mean-square gain per layer);
        - ``c_star``: the stable correlation fixed point (1 in the ordered phase);
        - ``xi_q``, ``xi_c``: the depth scales (layers) of the variance and correlation
          maps (``inf`` at the edge of chaos for ``xi_c``);
        - ``phase``: ``ordered`` (χ₁ < 1), ``chaotic`` (χ₁ > 1), ``critical`` (χ₁ = 1 within
          1e-9), or ``unbounded`` (q* = inf: the others are NaN, χ₁ kept where it does not
          depend on q) or ``vanishing`` (q* = 0: c* and ξ_c are NaN, the limit q → 0 is
          used for χ₁ and ξ_q);
        - ``note``: a sentence for the special cases (ReLU-like activations, q* = 0 or inf),
          else "".

    Raises:
        FlowscopeError: an unknown activation or a bad variance.
    """
    fn = activation_fn(activation)
    sw2, sb2 = check_q(sigma_w2, "sigma_w2"), check_q(sigma_b2, "sigma_b2")
    q = fixed_point(fn, sw2, sb2)
    homogeneous = _homogeneous(fn)
    note = ""
    if homogeneous:
        note = (
            "a positively homogeneous activation (ReLU-like): χ₁ does not depend on q, the "
            "variance map is linear, and c* = 1 wherever q* is finite: no chaotic phase"
        )
    nan = math.nan
    if math.isinf(q):
        chi = sw2 * _dphi2(fn, 1.0) if homogeneous else nan
        out = {"q_star": q, "chi_1": chi, "c_star": nan, "xi_q": nan, "xi_c": nan}
        why = "no finite variance fixed point: q grows without bound with depth"
        return {**out, "phase": "unbounded", "note": f"{why}; {note}" if note else why}
    q_eval = max(q, Q_MIN)
    chi = sw2 * _dphi2(fn, q_eval)
    z, w = quadrature(fn, q_eval)
    phi, dphi = activation_values(fn, math.sqrt(q_eval) * z)
    slope = sw2 * float(w @ (z * phi * dphi)) / math.sqrt(q_eval)
    xi_q = _scale(slope)
    if q == 0.0:
        why = "q* = 0: the signal dies out, the correlation of two inputs has no limit"
        out = {"q_star": 0.0, "chi_1": chi, "c_star": nan, "xi_q": xi_q, "xi_c": nan}
        return {**out, "phase": "vanishing", "note": f"{why}; {note}" if note else why}
    if abs(chi - 1) <= CRITICAL_TOL:
        phase, c_star, chi_c = "critical", 1.0, 1.0
    elif chi < 1 or homogeneous:
        phase, c_star, chi_c = "ordered", 1.0, chi
    else:
        phase = "chaotic"
        c_star = _correlation_fixed_point(fn, sw2, sb2, q)
        chi_c = sw2 * _pair_moments(fn, q, c_star)[1]
    scales = {"q_star": q, "chi_1": chi, "c_star": c_star, "xi_q": xi_q, "xi_c": _scale(chi_c)}
    return {**scales, "phase": phase, "note": note}


def _scale(slope: float) -> float:
    """-1 / log(slope): the depth over which a deviation shrinks by e (inf at slope 1)."""
    if not 0 < slope < 1:
        return math.inf if slope >= 1 - CRITICAL_TOL else math.nan
    return -1.0 / math.log(slope)


def _dphi2(fn: Callable, q: float) -> float:
    """E[φ'(√q z)²]."""
    z, w = quadrature(fn, q)
    _, dphi = activation_values(fn, math.sqrt(q) * z)
    return float(w @ dphi**2)


def _homogeneous(fn: Callable) -> bool:
    """Whether φ(a u) = a φ(u) for a > 0 (ReLU, leaky ReLU, linear): checked on values."""
    return _homogeneous_sides(fn) is not None


def _homogeneous_sides(fn: Callable) -> tuple[float, float] | None:
    """(a, b) with φ(u) = a·relu(u) + b·relu(-u) when φ is positively homogeneous (checked
    on values), else None."""
    u = np.array([-2.0, -0.5, 0.3, 1.7, 1.0, -1.0])
    phi, _ = activation_values(fn, u)
    a, b = float(phi[4]), float(phi[5])
    line = np.where(u > 0, a * u, -b * u)
    return (a, b) if np.allclose(phi, line, rtol=1e-12, atol=1e-15) else None


def edge_of_chaos(activation: ActivationLike, sigma_b2: float) -> float:
    """The critical σ_w² at which χ₁ = σ_w² E[φ'(√q* z)²] = 1 (q* depends on σ_w² too).

    Example:
        >>> round(edge_of_chaos("tanh", 0.0), 6), round(edge_of_chaos("relu", 0.3), 6)
        (1.0, 2.0)

    For ReLU-like activations χ₁ does not depend on q, so the line is σ_w² = 1 / E[φ'²]
    for every σ_b² (2 for ReLU); but there q has no finite fixed point unless σ_b² = 0, and
    below it c* = 1 (no chaotic phase), see the module's docstring.

    Args:
        activation: a name in ``ACTIVATIONS`` or an elementwise callable.
        sigma_b2: the biases' variance (>= 0).

    Returns:
        σ_w², to about 1e-10.

    Raises:
        FlowscopeError: a bad argument, or no σ_w² up to 1e4 reaches χ₁ = 1.
    """
    fn = activation_fn(activation)
    sb2 = check_q(sigma_b2, "sigma_b2")
    if _homogeneous(fn):
        return 1.0 / _dphi2(fn, 1.0)

    def g(sw2: float) -> float:
        q = fixed_point(fn, sw2, sb2)
        if math.isinf(q):
            return math.inf
        return sw2 * _dphi2(fn, max(q, Q_MIN)) - 1.0

    a, ga = 0.0, -1.0
    b = 1.0
    while (gb := g(b)) < 0:
        a, ga, b = b, gb, 2 * b
        if b > 1e4:
            raise FlowscopeError(
                f"no edge of chaos for this activation at sigma_b2={sb2}: χ₁ < 1 up to σ_w² = 1e4"
            )
    if gb == 0:
        return b
    if math.isinf(gb):  # shrink to a finite bracket
        for _ in range(60):
            mid = (a + b) / 2
            gm = g(mid)
            if math.isfinite(gm) and gm >= 0:
                b, gb = mid, gm
                break
            if math.isinf(gm):
                b = mid
            else:
                a, ga = mid, gm
    return _root(g, a, b, ga, gb)
