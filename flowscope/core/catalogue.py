"""The catalogue of activation module types: what flowscope knows of each (no torch).

Keyed by class name, so frames (whose ``module_type`` column holds class names), the
recorder (module instances) and the figures (which never import torch) read one table.
:mod:`flowscope.core.activations` adds the torch side: the study activations, clamp values
of a module instance and the definition of a dead unit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["FAMILIES", "ActivationType", "activation_type", "catalogued"]

FAMILIES = ("tanh", "sigmoid", "relu", "shrink", "linear")


@dataclass(frozen=True)
class ActivationType:
    """What flowscope knows of an activation module type.

    Attributes:
        family: ``tanh`` and ``sigmoid`` (Xavier-like inits suit them), ``relu`` (the ReLU
            family and smooth variants: He-like inits), ``shrink`` (Hardshrink, Softshrink,
            Threshold), ``linear`` (Identity).
        saturation: the default ``(low, high)`` interval beyond which an output counts as
            saturated; None where the function does not saturate, or where the interval is
            the module's own clamp values (Hardtanh, ReLU6: see :func:`saturation_of`).
        zero_output: its output is exactly 0 on a set of inputs of positive measure, so a unit
            can die and its linear histogram leaves the zeros out.
    """

    family: str
    saturation: tuple[float, float] | None = None
    zero_output: bool = False

    @property
    def xavier_like(self) -> bool:
        """Saturating both ways (tanh, sigmoid): Xavier-like inits suit it."""
        return self.family in ("tanh", "sigmoid")


_TYPES: dict[str, ActivationType] = {
    "Tanh": ActivationType("tanh", (-0.99, 0.99)),
    "Softsign": ActivationType("tanh", (-0.99, 0.99)),
    "Hardtanh": ActivationType("tanh"),  # saturated at its clamp values
    "Tanhshrink": ActivationType("tanh"),
    "Sigmoid": ActivationType("sigmoid", (0.01, 0.99)),
    "Hardsigmoid": ActivationType("sigmoid", (0.0, 1.0)),
    "LogSigmoid": ActivationType("sigmoid"),
    "ReLU": ActivationType("relu", zero_output=True),
    "ReLU6": ActivationType("relu", zero_output=True),  # saturated at its clamp values
    "Threshold": ActivationType("shrink", zero_output=True),
    "Hardshrink": ActivationType("shrink", zero_output=True),
    "Softshrink": ActivationType("shrink", zero_output=True),
    "Identity": ActivationType("linear"),
}
_RELU_LIKE = (
    "LeakyReLU PReLU RReLU ELU SELU CELU GELU SiLU Mish Softplus Hardswish "
    # other libraries' classes (Hugging Face transformers, timm)
    "NewGELUActivation GELUActivation FastGELUActivation QuickGELUActivation SiLUActivation "
    "GELUTanh"
)
_TYPES.update({name: ActivationType("relu") for name in _RELU_LIKE.split()})
# activation classes of other libraries not listed above: by their name
_OTHER = re.compile(r"ReLU|GELU|SiLU|Swish|Tanh|Sigmoid|Softplus|Mish|ELU|Activation$")


def catalogued(name: str) -> ActivationType | None:
    """The catalogue's entry for a class name (no guess from the name)."""
    return _TYPES.get(name)


def activation_type(module: object) -> ActivationType | None:
    """What is known of an activation module (instance, class or class name); None when it
    is not an activation.

    Example:
        >>> activation_type("Tanh").saturation, activation_type("ReLU").zero_output
        ((-0.99, 0.99), True)
        >>> activation_type("NewGELUActivation").family, activation_type("Linear")
        ('relu', None)
    """
    if isinstance(module, str):
        name = module
    else:  # a class or an instance
        name = (module if isinstance(module, type) else type(module)).__name__
    known = _TYPES.get(name)
    if known is not None or not _OTHER.search(name):
        return known
    family = "tanh" if "Tanh" in name else "sigmoid" if "Sigmoid" in name else "relu"
    return ActivationType(family)
