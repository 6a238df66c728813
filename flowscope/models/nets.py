"""The study nets as named registry entries: factories of keyword arguments → ``nn.Module``.

Module names are a contract: the recorder keys its rows by them and the studies' claims
name them. Hidden blocks are ``layers.{i}`` with children ``linear`` (``conv`` in the conv
net), ``norm`` (only when there is a norm) and ``act``, in that order; the output layer is
``head``. The defaults of ``mlp`` are the DD2424 lecture 4 net: 500 inputs, ten tanh layers
of 500 units, no output layer.

Example:
    >>> net = build_net("mlp", depth=2, width=8, in_dim=4)
    >>> [name for name, m in net.named_modules() if not list(m.children())]
    ['layers.0.linear', 'layers.0.act', 'layers.1.linear', 'layers.1.act']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection

from torch import Tensor, nn

from flowscope.core.activations import ACTIVATIONS
from flowscope.core.errors import FlowscopeError, unknown
from flowscope.core.registry import Registry

__all__ = ["MLP", "NETS", "Block", "ConvNet", "build_net"]

NETS: Registry[Callable[..., nn.Module]] = Registry("net")

MLP_NORMS = ("none", "batchnorm", "layernorm")
CONV_NORMS = ("none", "batchnorm")


class Block(nn.Module):
    """One hidden layer: ``linear`` (or ``conv``), optional ``norm``, then ``act``.

    The norm sits between the affine map and the non-linearity, as in DD2424 lecture 4.
    A residual net adds the skip itself (``h = h + block(h)``), so the block is the branch.
    """

    def __init__(self, affine: str, layer: nn.Module, norm: nn.Module | None, act: nn.Module):
        super().__init__()
        self.affine = affine
        self.add_module(affine, layer)
        if norm is not None:
            self.norm = norm
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        h = getattr(self, self.affine)(x)
        if "norm" in self._modules:
            h = self.norm(h)
        out: Tensor = self.act(h)
        return out


class MLP(nn.Module):
    """A fully connected net of ``Block``s and an optional ``head`` (see ``mlp``).

    ``skips[i]`` says whether block ``i`` is residual: ``h = h + layers[i](h)``.
    """

    def __init__(
        self,
        blocks: list[Block],
        head: nn.Linear | None,
        input_shape: tuple[int, ...],
        skips: tuple[bool, ...],
    ):
        super().__init__()
        self.layers = nn.ModuleList(blocks)
        self.skips = skips
        if head is not None:
            self.head = head
        self.input_shape = input_shape

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.input_shape, flatten=True)
        h = x.flatten(1) if x.dim() > 2 else x
        for block, skip in zip(self.layers, self.skips, strict=True):
            h = h + block(h) if skip else block(h)
        return self.head(h) if "head" in self._modules else h


class ConvNet(nn.Module):
    """Conv ``Block``s, global average pooling, and a Linear ``head`` (see ``conv``)."""

    def __init__(self, blocks: list[Block], head: nn.Linear, input_shape: tuple[int, ...]):
        super().__init__()
        self.layers = nn.ModuleList(blocks)
        self.head = head
        self.input_shape = input_shape

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.input_shape, flatten=False)
        h = x
        for block in self.layers:
            h = block(h)
        out: Tensor = self.head(h.mean(dim=(2, 3)))
        return out


def _check_input(x: Tensor, shape: tuple[int, ...], flatten: bool) -> None:
    """Raise FlowscopeError for an input that is not (batch, *shape); shapes only, no sync."""
    got = tuple(x.shape[1:])
    if flatten and len(got) > 1:
        got = (math.prod(got),)
    if x.dim() < 2 or got != shape:
        raise FlowscopeError(
            f"input of shape {tuple(x.shape)} does not fit this net; expected (batch, "
            f"{', '.join(map(str, shape))})"
        )


def _count(where: str, name: str, value: object, low: int = 1) -> int:
    """An integer argument >= low, or an error naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise FlowscopeError(f"{where}: {name} must be an integer >= {low}, got {value!r}")
    return value


def _flag(where: str, name: str, value: object) -> bool:
    """A bool argument, or an error naming it (1 and 'yes' are not booleans)."""
    if not isinstance(value, bool):
        raise FlowscopeError(f"{where}: {name} must be True or False, got {value!r}")
    return value


def _choice(where: str, name: str, value: object, allowed: Collection[str]) -> str:
    """One of ``allowed``, or a did-you-mean error."""
    if not isinstance(value, str) or value not in allowed:
        raise unknown(name, value, allowed, where)
    return value


@NETS.register("mlp")
def mlp(
    *,
    in_dim: int = 500,
    width: int = 500,
    depth: int = 10,
    out_dim: int | None = None,
    activation: str = "tanh",
    norm: str = "none",
    residual: bool = False,
    bias: bool = True,
) -> MLP:
    """A fully connected net: ``depth`` blocks Linear → (norm) → activation, then a head.

    Example:
        >>> import torch
        >>> net = mlp(in_dim=4, width=8, depth=3, out_dim=2, norm="batchnorm")
        >>> net(torch.randn(5, 4)).shape
        torch.Size([5, 2])
        >>> [n for n, m in net.named_modules() if not list(m.children())][:4]
        ['layers.0.linear', 'layers.0.norm', 'layers.0.act', 'layers.1.linear']

    Args:
        in_dim: input features (inputs with more dims are flattened after the batch dim).
        width: units of every hidden layer.
        depth: number of hidden Linear layers (10 → ``layers.0`` … ``layers.9``).
        out_dim: size of the Linear ``head``; None for no output layer (the lecture's
            experiment, where the last hidden layer's activations are the output).
        activation: a name in ``ACTIVATIONS``.
        norm: ``"none"``, ``"batchnorm"`` or ``"layernorm"``, between Linear and activation.
        residual: if True, ``h = h + block(h)`` for every block whose input and output sizes
            agree (all but the first when ``in_dim != width``).
        bias: whether the Linear layers (and the head) have a bias.

    Returns:
        An ``MLP`` with ``layers.{i}.linear``, ``layers.{i}.norm`` (if any),
        ``layers.{i}.act`` and ``head`` (if ``out_dim``); ``input_shape == (in_dim,)``.

    Raises:
        FlowscopeError: a size below 1, an unknown activation or norm, a non-bool flag.
    """
    where = "net 'mlp'"
    for key, value in {"in_dim": in_dim, "width": width, "depth": depth}.items():
        _count(where, key, value)
    if out_dim is not None:
        _count(where, "out_dim", out_dim)
    act = ACTIVATIONS.get(activation, where)
    norm = _choice(where, "norm", norm, MLP_NORMS)
    residual, bias = _flag(where, "residual", residual), _flag(where, "bias", bias)
    norm_layer = {"none": None, "batchnorm": nn.BatchNorm1d, "layernorm": nn.LayerNorm}[norm]
    fan_ins = [in_dim] + [width] * (depth - 1)
    blocks = [
        Block(
            "linear",
            nn.Linear(fan_in, width, bias=bias),
            norm_layer(width) if norm_layer else None,
            act.module(),
        )
        for fan_in in fan_ins
    ]
    skips = tuple(residual and fan_in == width for fan_in in fan_ins)
    head = nn.Linear(width, out_dim, bias=bias) if out_dim is not None else None
    return MLP(blocks, head, (in_dim,), skips)


@NETS.register("conv")
def conv(
    *,
    in_channels: int = 3,
    image_size: int = 32,
    channels: int = 16,
    depth: int = 4,
    activation: str = "relu",
    norm: str = "none",
    out_dim: int = 10,
    bias: bool = True,
) -> ConvNet:
    """A small conv net: ``depth`` blocks 3×3 Conv2d → (BatchNorm2d) → activation, then a head.

    Example:
        >>> import torch
        >>> net = conv(in_channels=1, image_size=8, channels=4, depth=2, out_dim=3)
        >>> net(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 3])
        >>> [n for n, m in net.named_modules() if not list(m.children())]
        ['layers.0.conv', 'layers.0.act', 'layers.1.conv', 'layers.1.act', 'head']

    Every conv has stride 1 and padding 1, so the maps stay ``image_size`` wide and every
    block has the same fan-in (``channels`` × 9, the first ``in_channels`` × 9); global
    average pooling then feeds the Linear ``head``.

    Args:
        in_channels: channels of the input images.
        image_size: height and width of the input images (checked on every forward).
        channels: channels of every conv layer.
        depth: number of conv blocks (``layers.0`` … ``layers.{depth-1}``).
        activation: a name in ``ACTIVATIONS``.
        norm: ``"none"`` or ``"batchnorm"``, between conv and activation.
        out_dim: size of the Linear ``head``.
        bias: whether the convs and the head have a bias.

    Returns:
        A ``ConvNet`` with ``layers.{i}.conv``, ``layers.{i}.norm`` (if any),
        ``layers.{i}.act`` and ``head``; ``input_shape == (in_channels, size, size)``.

    Raises:
        FlowscopeError: a size below 1, an unknown activation or norm, a non-bool flag.
    """
    where = "net 'conv'"
    sizes = {"in_channels": in_channels, "image_size": image_size, "channels": channels}
    for key, value in {**sizes, "depth": depth, "out_dim": out_dim}.items():
        _count(where, key, value)
    act = ACTIVATIONS.get(activation, where)
    norm = _choice(where, "norm", norm, CONV_NORMS)
    bias = _flag(where, "bias", bias)
    blocks = [
        Block(
            "conv",
            nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=bias),
            nn.BatchNorm2d(channels) if norm == "batchnorm" else None,
            act.module(),
        )
        for i in range(depth)
    ]
    head = nn.Linear(channels, out_dim, bias=bias)
    return ConvNet(blocks, head, (in_channels, image_size, image_size))


def build_net(name: str, **kwargs: object) -> nn.Module:
    """Build the registered net ``name`` from keyword arguments, checking their names first.

    Example:
        >>> build_net("mlp", depth=1, width=3, in_dim=2, out_dim=1)
        MLP(
          (layers): ModuleList(
            (0): Block(
              (linear): Linear(in_features=2, out_features=3, bias=True)
              (act): Tanh()
            )
          )
          (head): Linear(in_features=3, out_features=1, bias=True)
        )

    Args:
        name: a name in ``NETS`` (``mlp``, ``conv``, …).
        **kwargs: the factory's keyword arguments; the rest keep their defaults.

    Returns:
        A fresh module, with torch's default initialization (see ``inits.apply_init``).

    Raises:
        FlowscopeError: unknown net or argument name (with did-you-mean), bad values.
    """
    return NETS.check_args(name, kwargs)(**kwargs)
