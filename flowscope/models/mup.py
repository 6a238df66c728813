"""Width parametrizations for Adam: standard (``sp``: every layer as initialised, one learning
rate) and μP (``mup``: Yang et al. 2021, "Tensor Programs V", Table 3 / the ``mup`` package's
``MuReadout`` + ``MuAdam``), so that hyper-parameters tuned at a base width keep working when
the model gets wider.

Roles, by the layer-order rule: the weights of the Linear and Conv layers in module order —
the first is the **input** layer, the last the **output** (readout) layer, the others
**hidden**; every other parameter (biases, norm gains) is a **vector**. With
``m = width / base_width``, μP for Adam, as applied here on top of the model's own init:

==========  ====================  ===========
role        init                  Adam LR
==========  ====================  ===========
input       as initialised        lr
hidden      as initialised        lr / m
output      as initialised / m    lr / m
vector      as initialised        lr
==========  ====================  ===========

The output row is ``mup``'s readout multiplier 1/m moved into the weight: for Adam (whose
update does not depend on the gradient's scale) ``y = (W / m) h`` trained with lr is the same
as a weight ``W / m`` trained with ``lr / m``. With a fan-in init (variance 1/fan_in) this is
TP5's Table 3 up to constants: hidden updates of size lr / n per entry, an output that stays
O(1) after training steps at any width. Models whose layers do not follow the rule (weight
tying, several heads) should use the ``mup`` package.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
    ...                     nn.Linear(64, 2))
    >>> roles(net)
    {'0.weight': 'input', '0.bias': 'vector', '2.weight': 'hidden', '2.bias': 'vector', \
'4.weight': 'output', '4.bias': 'vector'}
    >>> groups = param_groups(net, lr=0.01, parametrization="mup", width_mult=4.0)
    >>> sorted((g["role"], g["lr"]) for g in groups)
    [('hidden', 0.0025), ('input', 0.01), ('output', 0.0025), ('vector', 0.01)]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flowscope.core.errors import FlowscopeError, unknown

__all__ = ["PARAMETRIZATIONS", "apply_parametrization", "param_groups", "roles"]

PARAMETRIZATIONS = ("sp", "mup")
_MATRIX_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def roles(model: nn.Module) -> dict[str, str]:
    """Each trainable parameter's role (``input``, ``hidden``, ``output``, ``vector``) by the
    layer-order rule; needs at least two Linear/Conv layers."""
    layers = [name for name, m in model.named_modules() if isinstance(m, _MATRIX_LAYERS)]
    if len(layers) < 2:
        raise FlowscopeError(
            f"μP needs an input and an output layer: the model has {len(layers)} Linear/Conv "
            "layer(s); allowed: models with two or more (or use the mup package)"
        )
    weights = {f"{name}.weight" if name else "weight": name for name in layers}
    first, last = layers[0], layers[-1]
    out: dict[str, str] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = weights.get(name)
        if layer is None:
            out[name] = "vector"
        else:
            out[name] = "input" if layer == first else "output" if layer == last else "hidden"
    return out


def _check(parametrization: str, width_mult: float) -> None:
    if parametrization not in PARAMETRIZATIONS:
        raise unknown("parametrization", parametrization, PARAMETRIZATIONS)
    if not width_mult > 0:
        raise FlowscopeError(f"width_mult={width_mult!r}: allowed: a number above 0")


def apply_parametrization(model: nn.Module, parametrization: str, width_mult: float) -> None:
    """Rescale the model's init in place for ``parametrization`` (μP: the output layer's
    weight divided by ``width_mult``; SP: nothing)."""
    _check(parametrization, width_mult)
    if parametrization == "sp":
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, role in roles(model).items():
            if role == "output":
                params[name].div_(width_mult)


def param_groups(
    model: nn.Module, *, lr: float, parametrization: str, width_mult: float
) -> list[dict[str, Any]]:
    """Adam parameter groups: one group per role, each with its learning rate (and a
    ``role`` key, which torch's optimizers keep and ignore)."""
    _check(parametrization, width_mult)
    if parametrization == "sp":
        trained = [p for p in model.parameters() if p.requires_grad]
        return [{"params": trained, "lr": lr, "role": "all"}]
    scale = {"input": 1.0, "hidden": 1 / width_mult, "output": 1 / width_mult, "vector": 1.0}
    by_role: dict[str, list[nn.Parameter]] = {}
    params = dict(model.named_parameters())
    for name, role in roles(model).items():
        by_role.setdefault(role, []).append(params[name])
    return [{"params": ps, "lr": lr * scale[role], "role": role} for role, ps in by_role.items()]
