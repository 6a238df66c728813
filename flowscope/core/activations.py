"""Activation functions as named registry entries, with what the diagnosis needs to know.

Each entry gives a fresh ``nn.Module`` for building nets, the same function as a plain
elementwise callable (for Gauss–Hermite mean-field theory), the interval outside which an
output counts as saturated (DD2424 lecture 4: tanh at ±1 and sigmoid at 0/1 kill the
gradient), and whether the output is exactly zero on a set of positive measure (dead ReLUs).

Example:
    >>> import torch
    >>> act = ACTIVATIONS.get("tanh")
    >>> act.saturation
    (-0.99, 0.99)
    >>> torch.equal(act.module()(torch.ones(3)), act.fn(torch.ones(3)))
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowscope.core.registry import Registry

__all__ = ["ACTIVATIONS", "LEAKY_SLOPE", "Activation"]

LEAKY_SLOPE = 0.01  # the lecture's Leaky ReLU: max(0.01 x, x)


@dataclass(frozen=True)
class Activation:
    """One activation function and its diagnostic properties.

    Example:
        >>> relu = ACTIVATIONS.get("relu")
        >>> relu.module()
        ReLU()
        >>> relu.zero_output, relu.saturation
        (True, None)

    Attributes:
        name: the registry name.
        module: factory returning a fresh ``nn.Module`` computing the function.
        fn: the same function as an elementwise callable on tensors.
        saturation: ``(low, high)``: an output ``<= low`` or ``>= high`` counts as
            saturated; None when the function does not saturate on both sides.
        zero_output: True when the output is exactly 0 on a set of inputs of positive
            measure (a unit can die), e.g. ReLU on all negative inputs.
    """

    name: str
    module: Callable[[], nn.Module]
    fn: Callable[[Tensor], Tensor]
    saturation: tuple[float, float] | None = None
    zero_output: bool = False


ACTIVATIONS: Registry[Activation] = Registry("activation")


def _leaky_relu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, LEAKY_SLOPE)


def _identity(x: Tensor) -> Tensor:
    return x


for _act in (
    Activation("tanh", nn.Tanh, torch.tanh, saturation=(-0.99, 0.99)),
    Activation("relu", nn.ReLU, torch.relu, zero_output=True),
    Activation("sigmoid", nn.Sigmoid, torch.sigmoid, saturation=(0.01, 0.99)),
    Activation("leaky_relu", lambda: nn.LeakyReLU(LEAKY_SLOPE), _leaky_relu),
    Activation("elu", nn.ELU, F.elu),
    Activation("gelu", nn.GELU, F.gelu),
    Activation("linear", nn.Identity, _identity),
):
    ACTIVATIONS.register(_act.name)(_act)
del _act
