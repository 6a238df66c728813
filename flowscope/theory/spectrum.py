"""The spectrum of a model's input–output Jacobian: :func:`jacobian_spectrum`.

For an input x the Jacobian J = ∂ model(x) / ∂x (the output and the input flattened); its
squared singular values λ (the eigenvalues of JᵀJ) say how the net stretches small changes
of its input. A net is **dynamically isometric** when they all sit near 1 (Saxe et al. 2014;
Pennington, Schoenholz, Ganguli 2017): signals and gradients then pass through any depth
unchanged in every direction, not only on average. Mean-field theory fixes the mean of λ
(χ₁ per layer); the spread around it is what orthogonal weights and the activation change.

Two ways to get λ, chosen per model (``method="auto"``):

- **full**: the Jacobian of each input, exactly, with ``torch.func`` (``jacrev`` when the
  output has at most as many entries as the input, else ``jacfwd``; ``vmap`` over inputs in
  chunks of at most ``FULL_MAX`` Jacobian entries), then its singular values in float64.
  ``auto`` picks it when one input's Jacobian has at most ``FULL_MAX`` = 2²² entries (16 MB
  in float32). All min(n_in, n_out) values per input.
- **power**: block power (subspace) iteration on JᵀJ through Jacobian-vector products
  (``torch.func.jvp``) and vector-Jacobian products (``torch.func.vjp``), never forming J:
  the ``k`` largest λ per input (Rayleigh–Ritz on the final block). ``auto`` picks it for
  larger Jacobians; it costs ``iters`` × 2k passes per input.

Per-layer spectra (``layers=``): the Jacobian from the input to each named module's output,
all from one forward-mode pass per input direction (``jacfwd``, full method only).

The model is run as it is (train or eval mode): each input is passed alone, as a batch of
one, so batchnorm in train mode would normalise over one sample: call ``model.eval()`` first.

Torch and numpy only.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import jacfwd, jacrev, jvp, vjp, vmap

from flowscope.core.errors import FlowscopeError
from flowscope.record.hooks import forward_hooks
from flowscope.theory.meanfield import (
    ActivationLike,
    activation_fn,
    activation_values,
    check_q,
    quadrature,
    second_moment,
)

__all__ = ["FULL_MAX", "isometry_moments", "jacobian_moments", "jacobian_spectrum"]

FULL_MAX = 2**22  # Jacobian entries of one input up to which "auto" computes J exactly
METHODS = ("auto", "full", "power")


def jacobian_spectrum(
    model: nn.Module,
    x: Tensor,
    *,
    layers: list[str] | None = None,
    method: str = "auto",
    k: int = 16,
    iters: int = 60,
    seed: int = 0,
) -> np.ndarray | dict[str, np.ndarray]:
    """Squared singular values of the input–output Jacobian of ``model`` at the inputs ``x``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(4, 4, bias=False)
        >>> _ = nn.init.orthogonal_(net.weight, gain=2.0)
        >>> jacobian_spectrum(net, torch.randn(3, 4)).round(4).tolist() == [4.0] * 12
        True
        >>> deep = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
        >>> spectra = jacobian_spectrum(deep, torch.randn(2, 6), layers=["1", "2"])
        >>> {name: s.shape for name, s in spectra.items()}
        {'1': (12,), '2': (6,)}

    Args:
        model: any module mapping a batch to a batch; run as it is (see the module's notes).
        x: a batch of inputs, first axis the batch (at least one input).
        layers: module names (globs, ``fnmatch``) whose outputs get a spectrum each: the
            Jacobian from the input to that output. None: the model's output only.
        method: ``"full"`` (exact), ``"power"`` (the ``k`` largest per input, matrix-free)
            or ``"auto"`` (full when one input's Jacobian has at most ``FULL_MAX`` entries).
        k: with ``power``, how many of the largest values per input.
        iters: with ``power``, the block power iterations.
        seed: with ``power``, the seed of the random start block.

    Returns:
        A float64 numpy array of λ = σ², all inputs pooled (``len(x)`` × min(n_in, n_out)
        values for ``full``, ``len(x)`` × k for ``power``, each input's in descending order);
        with ``layers``, a dict from module name to such an array, in execution order.

    Raises:
        FlowscopeError: an empty batch, an unknown method, a layer glob matching nothing,
            ``layers`` with ``power``, or bad ``k`` / ``iters``.
    """
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise FlowscopeError("x must be a batch of at least one input (a tensor, batch first)")
    if method not in METHODS:
        raise FlowscopeError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    for name, value in (("k", k), ("iters", iters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FlowscopeError(f"{name} must be an integer >= 1, got {value!r}")
    names = _layer_names(model, layers)
    f = _function(model, x, names)
    with torch.no_grad():
        outs = f(x[0])
    n_in, n_out = x[0].numel(), max(o.numel() for o in outs)
    if method == "auto":
        method = "full" if n_in * n_out <= FULL_MAX else "power"
    if method == "power":
        if names:
            raise FlowscopeError("per-layer spectra (layers=...) need method 'full'")
        return _power(f, x, min(k, n_in, n_out), iters, seed)
    entries = n_in * sum(o.numel() for o in outs)
    spectra = _full(f, x, forward=bool(names) or n_out > n_in, entries=entries)
    if not names:
        return spectra[0]
    return dict(zip(names, spectra, strict=True))


def _layer_names(model: nn.Module, layers: list[str] | None) -> list[str]:
    """The module names the globs match, in ``named_modules`` order."""
    if layers is None:
        return []
    if isinstance(layers, str):
        layers = [layers]
    all_names = [n for n, _ in model.named_modules() if n]
    picked = []
    for glob in layers:
        hit = [n for n in all_names if fnmatch.fnmatchcase(n, glob)]
        if not hit:
            raise FlowscopeError(
                f"layer {glob!r} matches no module; modules: {', '.join(all_names[:20])}"
                + (" ..." if len(all_names) > 20 else "")
            )
        picked += [n for n in hit if n not in picked]
    return [n for n in all_names if n in picked]


def _function(model: nn.Module, x: Tensor, names: list[str]) -> Callable[[Tensor], tuple]:
    """One input -> the flattened outputs asked for (the model's, or the named modules')."""
    if not names:

        def output(xi: Tensor) -> tuple[Tensor, ...]:
            return (model(xi.unsqueeze(0)).reshape(-1),)

        return output
    modules = dict(model.named_modules())
    captured: dict[str, Tensor] = {}

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, args: object, out: Tensor) -> None:
            captured[name] = out

        return hook

    def per_layer(xi: Tensor) -> tuple[Tensor, ...]:
        captured.clear()
        with forward_hooks([(n, modules[n]) for n in names], keep):
            model(xi.unsqueeze(0))
        return tuple(captured[n].reshape(-1) for n in names)

    return per_layer


def _jacobians(f: Callable, x: Tensor, forward: bool, entries: int) -> Iterator[list[Tensor]]:
    """Per chunk of inputs, each output's Jacobians (chunk, n_out, n_in), ``entries`` being
    the Jacobian entries of one input (all outputs)."""
    jac = vmap(jacfwd(f) if forward else jacrev(f))
    chunk = max(1, FULL_MAX // max(entries, 1))
    for start in range(0, x.shape[0], chunk):
        xs = x[start : start + chunk]
        with torch.no_grad():
            js = jac(xs)
        yield [j.reshape(xs.shape[0], j.shape[1], -1) for j in js]


def _full(f: Callable, x: Tensor, forward: bool, entries: int) -> list[np.ndarray]:
    """Every squared singular value of each output's Jacobian, inputs pooled."""
    pooled: list[list[np.ndarray]] = []
    for js in _jacobians(f, x, forward, entries):
        if not pooled:
            pooled = [[] for _ in js]
        for i, j in enumerate(js):
            s = torch.linalg.svdvals(j.double())
            pooled[i].append((s**2).cpu().numpy().reshape(-1))
    return [np.concatenate(p) for p in pooled]


def jacobian_moments(
    model: nn.Module, x: Tensor, *, layers: list[str] | None = None
) -> dict[str, dict[str, float]] | dict[str, float]:
    """Mean and variance of the squared singular values λ that :func:`jacobian_spectrum`
    returns (method ``full``), from traces, without a singular value decomposition:
    Σλ = ‖J‖²_F and Σλ² = ‖JJᵀ‖²_F per input (over its min(n_in, n_out) values).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(5, 5), nn.Tanh())
        >>> x = torch.randn(3, 5)
        >>> m, s = jacobian_moments(net, x), jacobian_spectrum(net, x)
        >>> bool(abs(m["mean"] - s.mean()) < 1e-9), bool(abs(m["var"] - s.var()) < 1e-9)
        (True, True)

    Args:
        model, x, layers: as for :func:`jacobian_spectrum`.

    Returns:
        ``{"mean": ..., "var": ...}`` (the population variance of the pooled values); with
        ``layers``, a dict from module name to such a dict.

    Raises:
        FlowscopeError: as :func:`jacobian_spectrum`.
    """
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise FlowscopeError("x must be a batch of at least one input (a tensor, batch first)")
    names = _layer_names(model, layers)
    f = _function(model, x, names)
    with torch.no_grad():
        outs = f(x[0])
    n_in, n_out = x[0].numel(), sum(o.numel() for o in outs)
    forward = bool(names) or n_out > n_in
    sums: list[list[float]] = []
    for js in _jacobians(f, x, forward, n_in * n_out):
        if not sums:
            sums = [[0.0, 0.0, 0.0] for _ in js]
        for i, j in enumerate(js):
            j = j.double()
            gram = j @ j.mT if j.shape[1] <= j.shape[2] else j.mT @ j
            sums[i][0] += float(j.pow(2).sum())
            sums[i][1] += float(gram.pow(2).sum())
            sums[i][2] += j.shape[0] * min(j.shape[1], j.shape[2])
    moments = []
    for total, squares, count in sums:
        mean = total / count
        moments.append({"mean": mean, "var": max(squares / count - mean**2, 0.0)})
    return dict(zip(names, moments, strict=True)) if names else moments[0]


def _power(f: Callable, x: Tensor, k: int, iters: int, seed: int) -> np.ndarray:
    """The k largest squared singular values of each input's Jacobian, matrix-free."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for xi in x:
        start = torch.randn(k, *xi.shape, generator=gen, dtype=torch.float64).to(xi)
        out.append(_top(lambda v: f(v)[0], xi, _orthonormal(start), iters))
    return np.concatenate(out)


def _top(g: Callable[[Tensor], Tensor], xi: Tensor, block: Tensor, iters: int) -> np.ndarray:
    """Block power iteration on JᵀJ of g at xi from the orthonormal rows of ``block``; the
    Ritz values (Rayleigh–Ritz on the last block), largest first."""
    pullback = vjp(g, xi)[1]

    def push(v: Tensor) -> Tensor:
        return jvp(g, (xi,), (v,))[1]

    def pull(u: Tensor) -> Tensor:
        return pullback(u)[0]

    with torch.no_grad():
        for _ in range(iters):
            block = _orthonormal(vmap(pull)(vmap(push)(block)))
        images = vmap(push)(block).reshape(block.shape[0], -1).double()
    ritz = torch.linalg.eigvalsh(images @ images.T)  # Vᵀ JᵀJ V with V orthonormal
    return ritz.flip(0).clamp(min=0).cpu().numpy()


def _orthonormal(block: Tensor) -> Tensor:
    """Rows made orthonormal (QR of the flattened block), same shape."""
    flat = block.reshape(block.shape[0], -1)
    q, _ = torch.linalg.qr(flat.double().T)
    return q.T.to(block.dtype).reshape(block.shape)


def isometry_moments(
    activation: ActivationLike,
    sigma_w2: float,
    sigma_b2: float,
    q1: float,
    depth: int,
    *,
    orthogonal: bool = False,
) -> dict[str, np.ndarray]:
    """Free-probability mean and variance of the squared singular values λ of the Jacobian
    from the input to each layer's activation output (Pennington, Schoenholz, Ganguli 2017).

    Example:
        >>> m = isometry_moments("linear", 1.0, 0.0, 1.0, 4)       # Gaussian: var = L
        >>> m["mean"].tolist(), m["var"].round(12).tolist()
        ([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0])
        >>> isometry_moments("relu", 2.0, 0.0, 1.0, 3, orthogonal=True)["var"].round(9).tolist()
        [1.0, 2.0, 3.0]

    The net: ``depth`` square layers ``h_l = W_l φ(h_{l-1}) + b_l`` (the first on the input),
    weights of variance σ_w²/n (i.i.d. Gaussian, or √σ_w² × orthogonal), biases N(0, σ_b²).
    Jᵀ J is a product of the freely independent factors W_lᵀ D_l² W_l with D_l = diag φ'(h_l)
    and h_l of variance q_l (the variance map from q_1). Each factor has mean
    m_l = σ_w² E[φ'(√q_l z)²] and normalized variance v_l = E[φ'⁴] / E[φ'²]² − 1 + s_W,
    s_W = 1 for a square Gaussian W (Marchenko–Pastur) and 0 for an orthogonal one; under
    free multiplicative convolution means multiply and normalized variances add, so

        mean_L = ∏ m_l,    var_L = mean_L² · Σ v_l.

    At the edge of chaos (∏ m_l = 1) with orthogonal weights, var_L = L · (E[φ'⁴]/E[φ'²]² − 1)
    at q*: it vanishes as q* → 0 for tanh (dynamical isometry), and is L for ReLU
    (φ'² ∈ {0, 1}) whatever the init: ReLU nets cannot be made isometric.

    Args:
        activation: a name in ``ACTIVATIONS`` or an elementwise callable.
        sigma_w2, sigma_b2: the weights' σ_w² and the biases' variance.
        q1: the variance of the first layer's pre-activations.
        depth: the number of layers (>= 1).
        orthogonal: orthogonal weights instead of i.i.d. Gaussian ones.

    Returns:
        ``{"mean": ..., "var": ..., "q": ...}``: arrays over the layers 1..depth.

    Raises:
        FlowscopeError: a bad argument.
    """
    fn = activation_fn(activation)
    sw2, sb2, q = check_q(sigma_w2, "sigma_w2"), check_q(sigma_b2, "sigma_b2"), check_q(q1, "q1")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise FlowscopeError(f"depth must be an integer >= 1, got {depth!r}")
    mean, spread = 1.0, 0.0
    out: dict[str, list[float]] = {"mean": [], "var": [], "q": []}
    for _ in range(depth):
        z, w = quadrature(fn, q)
        _, dphi = activation_values(fn, np.sqrt(q) * z)
        m2, m4 = float(w @ dphi**2), float(w @ dphi**4)
        mean *= sw2 * m2
        spread += (m4 / m2**2 - 1 if m2 > 0 else np.nan) + (0.0 if orthogonal else 1.0)
        out["mean"].append(mean)
        out["var"].append(mean**2 * spread)
        out["q"].append(q)
        q = sw2 * second_moment(fn, q) + sb2
    return {key: np.asarray(value) for key, value in out.items()}
