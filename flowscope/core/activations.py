"""The activation catalogue: every activation flowscope knows, and what a "dead unit" is.

Two views of one table, used by the recorder, the doctor, the studies, the theory and the
figures alike:

* :data:`ACTIVATIONS`, the registry of activations the study nets are built with (names of
  the study files): a fresh ``nn.Module``, the same function as a plain elementwise callable
  (for Gauss–Hermite mean-field theory), the saturation interval and whether units can die;
* :func:`activation_type`, what is known of any activation *module type* met in a user's
  model (``"Tanh"``, ``"ReLU6"``, Hugging Face's ``"NewGELUActivation"``): its family (which
  init suits it), the interval outside which an output counts as saturated (DD2424 lecture 4:
  tanh at ±1 and sigmoid at 0/1 kill the gradient) and whether its output is exactly zero on
  a set of positive measure (a unit can die).

A unit is a feature of the last axis, or a channel of a (N, C, H, W) / (N, C, D, H, W) map;
it is dead for a batch when it is exactly 0 for every sample and position
(:func:`alive_units`).

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

from flowscope.core.catalogue import FAMILIES, ActivationType, activation_type, catalogued
from flowscope.core.registry import Registry

__all__ = [
    "ACTIVATIONS",
    "FAMILIES",
    "LEAKY_SLOPE",
    "Activation",
    "ActivationType",
    "activation_type",
    "alive_units",
    "saturation_of",
    "unit_axis",
]

LEAKY_SLOPE = 0.01  # the lecture's Leaky ReLU: max(0.01 x, x)


@dataclass(frozen=True)
class Activation:
    """One activation a study net can be built with.

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
            saturated; None when the function does not saturate on both sides (from the
            module's :class:`ActivationType`).
        zero_output: True when the output is exactly 0 on a set of inputs of positive
            measure (a unit can die), e.g. ReLU on all negative inputs (likewise).
    """

    name: str
    module: Callable[[], nn.Module]
    fn: Callable[[Tensor], Tensor]

    @property
    def type(self) -> ActivationType:
        known = activation_type(self.module())
        assert known is not None, f"{self.name}: its module type is not in the catalogue"
        return known

    @property
    def saturation(self) -> tuple[float, float] | None:
        return saturation_of(self.module())

    @property
    def zero_output(self) -> bool:
        return self.type.zero_output


ACTIVATIONS: Registry[Activation] = Registry("activation")


def _leaky_relu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, LEAKY_SLOPE)


def _identity(x: Tensor) -> Tensor:
    return x


for _act in (
    Activation("tanh", nn.Tanh, torch.tanh),
    Activation("relu", nn.ReLU, torch.relu),
    Activation("sigmoid", nn.Sigmoid, torch.sigmoid),
    Activation("leaky_relu", lambda: nn.LeakyReLU(LEAKY_SLOPE), _leaky_relu),
    Activation("elu", nn.ELU, F.elu),
    Activation("gelu", nn.GELU, F.gelu),
    Activation("linear", nn.Identity, _identity),
):
    ACTIVATIONS.register(_act.name)(_act)
del _act


def saturation_of(module: nn.Module) -> tuple[float, float] | None:
    """The saturation interval of an activation module: its clamp values for Hardtanh and
    ReLU6, else its type's default (None: not a saturating activation).

    Example:
        >>> saturation_of(nn.Hardtanh(-2.0, 2.0)), saturation_of(nn.Sigmoid())
        ((-2.0, 2.0), (0.01, 0.99))
    """
    if isinstance(module, nn.Hardtanh):  # also ReLU6
        return (float(module.min_val), float(module.max_val))
    for cls in type(module).__mro__:  # a subclass of Tanh saturates as Tanh
        known = catalogued(cls.__name__)
        if known is not None:
            return known.saturation
    return None


# -- dead units ----------------------------------------------------------------------------------


def unit_axis(t: Tensor) -> int:
    """The unit axis of a layer output: 1 (channels) for (N, C, H, W[, D]) maps, else the last.

    Example:
        >>> unit_axis(torch.zeros(8, 3, 5, 5)), unit_axis(torch.zeros(8, 16))
        (1, 1)
    """
    return 1 if t.dim() in (4, 5) else t.dim() - 1


def alive_units(output: Tensor) -> Tensor:
    """Per unit, whether it is nonzero for some sample and position of this batch (a NaN is
    alive: not dead, broken); ``~alive_units(x)`` are the dead units. On the output's device.

    Example:
        >>> alive_units(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])).tolist()
        [False, True, True]
    """
    axis = unit_axis(output)
    x = output.detach()
    others = [d for d in range(x.dim()) if d != axis]
    if others and x.is_floating_point() and x.numel():
        # the largest |x| per unit: NaN stays NaN (alive), -0.0 is 0; on CPU ~5x faster than
        # ne(0).any() over a moved axis, which copies a conv map channel-last first
        return x.abs().amax(dim=others).ne(0)
    return x.movedim(axis, -1).reshape(-1, x.shape[axis]).ne(0).any(0)
