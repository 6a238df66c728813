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
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import jacfwd, jacrev, jvp, vjp, vmap

from flowscope.core.errors import FlowscopeError
from flowscope.record.hooks import forward_hooks

__all__ = ["FULL_MAX", "jacobian_spectrum"]

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
    spectra = _full(f, x, forward=bool(names) or n_out > n_in, entries=n_in * n_out)
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


def _full(f: Callable, x: Tensor, forward: bool, entries: int) -> list[np.ndarray]:
    """Every squared singular value of each output's Jacobian, inputs pooled."""
    jac = vmap(jacfwd(f) if forward else jacrev(f))
    chunk = max(1, FULL_MAX // max(entries, 1))
    pooled: list[list[np.ndarray]] = []
    for start in range(0, x.shape[0], chunk):
        xs = x[start : start + chunk]
        with torch.no_grad():
            js = jac(xs)
        for i, j in enumerate(js):
            s = torch.linalg.svdvals(j.reshape(xs.shape[0], j.shape[1], -1).double())
            if start == 0:
                pooled.append([])
            pooled[i].append((s**2).cpu().numpy().reshape(-1))
    return [np.concatenate(p) for p in pooled]


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
