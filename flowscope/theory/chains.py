"""A model's Linear -> [norm] -> activation chains, and the mean-field prediction along one.

:func:`mlp_chains` reads the chains off any model (weights, norm gains, activations as they
are); :func:`predict_chain` runs the variance map and the gradient gain of
:mod:`flowscope.theory.meanfield` along a chain. Torch and numpy only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from flowscope.core.activations import activation_type
from flowscope.theory.meanfield import check_q, expect

__all__ = ["Link", "followed", "mlp_chains", "predict_chain"]


_NORMS = (nn.BatchNorm1d, nn.LayerNorm)


def followed(module: nn.Module) -> bool:
    """Whether mean-field theory can follow an activation module: an elementwise function of
    the catalogue (the shrink family's dead zones are left out)."""
    known = activation_type(module)
    return known is not None and known.family != "shrink"


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
            if isinstance(module, nn.Linear) or not (
                followed(module) or isinstance(module, _NORMS)
            ):
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
    if j < len(leaves) and followed(leaves[j][1]):
        return linear, norm, leaves[j][1], j + 1
    return None


def predict_chain(chain: list[Link], q0: float) -> dict[str, np.ndarray]:
    """Mean-field prediction along a chain, anchored at the first Linear's output variance.

    Example:
        >>> net = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(500, 500), nn.ReLU())])
        >>> for m in net[::2]:
        ...     _ = nn.init.normal_(m.weight, std=(2 / 500) ** 0.5), nn.init.zeros_(m.bias)
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
        by the batch std of its input, which is √q less the previous activation's mean: with
        batchnorm the gradient grows toward the input by √(E[φ'²] / Var[φ]) per layer, ≥ 1
        for every φ (ReLU: √(π / (π − 1)) ≈ 1.2112; Yang, Pennington, Rao, Sohl-Dickstein,
        Schoenholz 2019, "A mean field theory of batch normalization").
    """
    n = len(chain)
    q = np.full(n, math.nan)
    spread = np.full(n, math.nan)  # variance of each Linear's output over the batch
    gain = np.full(n, math.nan)
    q[0] = spread[0] = check_q(q0, "q0")  # the input's own mean is not known: taken as 0
    for k in range(n):
        link = chain[k]
        v = q[k] if link.norm is None else link.norm
        if not math.isfinite(v):
            break
        m = expect(link.activation, v)
        if k + 1 < n:
            nxt = chain[k + 1]
            q[k + 1] = nxt.sigma_w2 * m["phi2"] + nxt.sigma_b2
            # the activation's mean is a constant over the batch: it moves each unit of the
            # next Linear by a fixed offset (as does the bias), not its batch variance
            spread[k + 1] = nxt.sigma_w2 * max(m["phi2"] - m["phi"] ** 2, 0.0)
            # batchnorm divides the backward signal by the batch std of its input (Yang et
            # al. 2019): with E[φ'²] over Var[φ] this is the Gaussian Poincaré ratio, >= 1
            # for every φ: ReLU π/(π - 1) per layer, squared
            scale = 1.0 if link.norm is None else link.gamma2 / spread[k]
            gain[k] = math.sqrt(nxt.back_w2 * m["dphi2"] * scale) if scale > 0 else math.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        pre_std = np.sqrt(q)
        act_gain = np.concatenate([[math.nan], pre_std[1:] / pre_std[:-1]])
    return {"q": q, "pre_std": pre_std, "act_gain": act_gain, "grad_gain": gain}
