"""Residual MLPs for the ``residual`` study (registry entry ``resmlp``): pre-activation blocks
``x + branch(x)`` with the normalisation and branch scalings of Brock, De & Smith 2021
("Characterizing signal propagation to close the performance gap in unnormalized ResNets").

Every block is a module whose forward returns its input plus its branch, so
:func:`flowscope.doctor.signal.residual_blocks` finds it. The branch has two Linear layers
(``fc_a``, ``fc_b``); ``variant`` says what surrounds them:

==============  ===========================================================================
``batchnorm``   ``fc_b(relu(norm_b(fc_a(relu(norm_a(x))))))``: a pre-activation BN-ResNet block
``none``        ``fc_b(relu(fc_a(relu(x))))``: no normalisation
``nf``          ``x + alpha * fc_b(g relu(fc_a(g relu(x / beta))))``: a normalizer-free block;
                ``fc_a``/``fc_b`` are scaled weight-standardised (rows of zero mean and unit
                norm, in the forward pass), ``g = sqrt(2 / (1 - 1/pi))`` makes ``g relu(z)``
                of unit variance, ``beta_k = sqrt(1 + k alpha^2)`` is block k's expected
                input std
``skipinit``    ``x + gain * fc_b(relu(fc_a(relu(x))))`` with ``gain`` a parameter set to 0
``sqrt_depth``  ``x + fc_b(relu(fc_a(relu(x)))) / sqrt(depth)``
==============  ===========================================================================

Fixup (branch's last layer zero, its first scaled) has at init the signal propagation of
SkipInit (a zero branch); it is not built separately.

Example:
    >>> import torch
    >>> net = build_resmlp(width=8, depth=3, out_dim=2, variant="nf")
    >>> [name for name, _ in net.named_children()], net(torch.randn(4, 8)).shape
    (['blocks', 'head'], torch.Size([4, 2]))
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowscope.core.errors import FlowscopeError, unknown
from flowscope.models.nets import NETS

__all__ = ["RES_VARIANTS", "ResBlock", "ResMLP", "WSLinear", "build_resmlp"]

RES_VARIANTS = ("batchnorm", "none", "nf", "skipinit", "sqrt_depth")
RELU_GAIN = math.sqrt(2 / (1 - 1 / math.pi))  # Var(g relu(z)) = 1 for z ~ N(0, 1)


class WSLinear(nn.Linear):
    """A Linear layer with scaled weight standardisation (Brock et al. 2021, eq. 3): each
    row of the weight shifted to mean 0 and scaled to norm 1 in the forward pass, so the
    output keeps the variance of the input and carries no mean shift."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        centred = w - w.mean(1, keepdim=True)
        scale = centred.pow(2).sum(1, keepdim=True).add(1e-12).rsqrt()
        return nn.functional.linear(x, centred * scale, self.bias)


class ResBlock(nn.Module):
    """``x + branch(x)`` (see the module's table)."""

    def __init__(self, width: int, variant: str, alpha: float, beta: float, depth: int):
        super().__init__()
        self.variant, self.alpha, self.beta = variant, alpha, beta
        self.depth_scale = 1 / math.sqrt(depth)
        linear = WSLinear if variant == "nf" else nn.Linear
        if variant == "batchnorm":
            self.norm_a = nn.BatchNorm1d(width)
        self.fc_a = linear(width, width, bias=False)
        if variant == "batchnorm":
            self.norm_b = nn.BatchNorm1d(width)
        self.fc_b = linear(width, width, bias=False)
        if variant == "skipinit":
            self.gain = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        if self.variant == "batchnorm":
            return x + self.fc_b(torch.relu(self.norm_b(self.fc_a(torch.relu(self.norm_a(x))))))
        if self.variant == "nf":
            h = RELU_GAIN * torch.relu(x / self.beta)
            return x + self.alpha * self.fc_b(RELU_GAIN * torch.relu(self.fc_a(h)))
        branch = self.fc_b(torch.relu(self.fc_a(torch.relu(x))))
        if self.variant == "skipinit":
            return x + self.gain * branch
        if self.variant == "sqrt_depth":
            return x + self.depth_scale * branch
        return x + branch


class ResMLP(nn.Module):
    """``blocks`` (a ModuleList of :class:`ResBlock`) then a Linear ``head``."""

    def __init__(self, blocks: list[ResBlock], head: nn.Linear, variant: str, alpha: float):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.variant, self.alpha = variant, alpha
        self.input_shape = (head.in_features,)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        out: Tensor = self.head(x)
        return out


@NETS.register("resmlp")
def build_resmlp(
    *, width: int = 256, depth: int = 10, out_dim: int = 10, variant: str = "batchnorm",
    alpha: float = 0.2,
) -> ResMLP:  # fmt: skip
    """A residual MLP on inputs of ``width`` features: ``depth`` blocks, then ``head``.

    Raises:
        FlowscopeError: a size below 1, an unknown variant, alpha not above 0.
    """
    where = "net 'resmlp'"
    for key, value in {"width": width, "depth": depth, "out_dim": out_dim}.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FlowscopeError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    if variant not in RES_VARIANTS:
        raise unknown("variant", variant, RES_VARIANTS, where)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise FlowscopeError(f"{where}: alpha must be a number above 0, got {alpha!r}")
    blocks = [
        ResBlock(width, variant, float(alpha), math.sqrt(1 + k * alpha**2), depth)
        for k in range(depth)
    ]
    return ResMLP(blocks, nn.Linear(width, out_dim), variant, float(alpha))
