"""Residual MLPs and CNNs for the ``residual`` studies (registry entries ``resmlp`` and
``resconv``): pre-activation blocks ``x + branch(x)`` with the normalisation and branch
scalings of Brock, De & Smith 2021 ("Characterizing signal propagation to close the
performance gap in unnormalized ResNets"). ``resconv`` has 3×3 convolutions (circular
padding) and BatchNorm2d where ``resmlp`` has Linear layers and BatchNorm1d.

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

__all__ = [
    "RES_VARIANTS", "ResBlock", "ResMLP", "WSConv2d", "WSLinear", "build_resconv", "build_resmlp",
]  # fmt: skip

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


class WSConv2d(nn.Conv2d):
    """A 3×3 convolution with scaled weight standardisation: each filter (over input
    channels and taps) shifted to mean 0 and scaled to norm 1 in the forward pass."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        centred = w - w.mean((1, 2, 3), keepdim=True)
        scale = centred.pow(2).sum((1, 2, 3), keepdim=True).add(1e-12).rsqrt()
        return self._conv_forward(x, centred * scale, self.bias)


def _layer(width: int, variant: str, conv: bool) -> nn.Module:
    """The branch's affine layer: Linear, or a 3×3 circular-padded conv (every pixel has
    the full fan-in, so the growth laws hold at the borders too); standardised for NF."""
    if conv:
        kind = WSConv2d if variant == "nf" else nn.Conv2d
        return kind(width, width, 3, padding=1, padding_mode="circular", bias=False)
    return (WSLinear if variant == "nf" else nn.Linear)(width, width, bias=False)


class ResBlock(nn.Module):
    """``x + branch(x)`` (see the module's table); ``conv``: 3×3 convolutions and
    BatchNorm2d on ``(N, C, H, W)`` maps instead of Linear layers and BatchNorm1d."""

    def __init__(
        self, width: int, variant: str, alpha: float, beta: float, depth: int, conv: bool = False
    ):
        super().__init__()
        self.variant, self.alpha, self.beta = variant, alpha, beta
        self.depth_scale = 1 / math.sqrt(depth)
        norm = nn.BatchNorm2d if conv else nn.BatchNorm1d
        if variant == "batchnorm":
            self.norm_a = norm(width)
        self.fc_a = _layer(width, variant, conv)
        if variant == "batchnorm":
            self.norm_b = norm(width)
        self.fc_b = _layer(width, variant, conv)
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
    """``blocks`` (a ModuleList of :class:`ResBlock`) then a Linear ``head``; on conv maps
    (``image_size`` given) global average pooling before the head."""

    def __init__(
        self,
        blocks: list[ResBlock],
        head: nn.Linear,
        variant: str,
        alpha: float,
        image_size: int | None = None,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.variant, self.alpha = variant, alpha
        width = head.in_features
        self.input_shape = (width,) if image_size is None else (width, image_size, image_size)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        if x.dim() == 4:
            x = x.mean((2, 3))
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
    return _build("resmlp", width, depth, out_dim, variant, alpha, None)


@NETS.register("resconv")
def build_resconv(
    *, channels: int = 16, image_size: int = 8, depth: int = 10, out_dim: int = 10,
    variant: str = "batchnorm", alpha: float = 0.2,
) -> ResMLP:  # fmt: skip
    """A residual CNN on ``(N, channels, image_size, image_size)`` maps: ``depth`` blocks of
    two 3×3 convolutions (stride 1, circular padding), global average pooling, ``head``.

    Example:
        >>> import torch
        >>> build_resconv(channels=4, image_size=6, depth=2)(torch.randn(3, 4, 6, 6)).shape
        torch.Size([3, 10])
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise FlowscopeError(
            f"net 'resconv': image_size must be an integer >= 1, got {image_size!r}"
        )
    return _build("resconv", channels, depth, out_dim, variant, alpha, image_size)


def _build(
    name: str, width: int, depth: int, out_dim: int, variant: str, alpha: float,
    image_size: int | None,
) -> ResMLP:  # fmt: skip
    where = f"net {name!r}"
    size = "width" if image_size is None else "channels"
    for key, value in {size: width, "depth": depth, "out_dim": out_dim}.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FlowscopeError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    if variant not in RES_VARIANTS:
        raise unknown("variant", variant, RES_VARIANTS, where)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise FlowscopeError(f"{where}: alpha must be a number above 0, got {alpha!r}")
    conv = image_size is not None
    blocks = [
        ResBlock(width, variant, float(alpha), math.sqrt(1 + k * alpha**2), depth, conv)
        for k in range(depth)
    ]
    return ResMLP(blocks, nn.Linear(width, out_dim), variant, float(alpha), image_size)
