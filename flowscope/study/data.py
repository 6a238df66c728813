"""Synthetic data as named registry entries: factories of keyword arguments → ``Batch``.

Everything is drawn on the requested device from a ``torch.Generator`` on that device, so
a run is reproducible from its seed and no data passes through the CPU on the way to a GPU.
``gaussian`` is the DD2424 lecture 4 input (N(0,1), d=500); its labels are noise, there
only so that a loss has something to differentiate. ``teacher`` labels the same inputs
with a fixed random network, so a student can learn them; ``images`` feeds the conv net.

Example:
    >>> import torch
    >>> batch = DATA.get("gaussian")(n=8, dim=500, generator=torch.Generator().manual_seed(0))
    >>> tuple(batch.x.shape), batch.y.dtype, batch.task
    ((8, 500), torch.int64, 'classification')
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flowscope.core.errors import FlowscopeError, unknown
from flowscope.core.limits import check_fits
from flowscope.core.registry import Registry

__all__ = ["DATA", "TEACHERS", "Batch", "gaussian", "images", "make_data", "teacher"]

TEACHERS = ("linear", "tanh")


@dataclass(frozen=True)
class Batch:
    """Inputs, targets and the kind of task (which says which loss fits).

    Example:
        >>> import torch
        >>> Batch(torch.zeros(2, 3), torch.tensor([0, 1]), "classification").x.shape
        torch.Size([2, 3])

    Attributes:
        x: float32 inputs, batch first.
        y: targets; for ``"classification"`` int64 class indices in ``[0, classes)``, for
            a cross-entropy loss.
        task: ``"classification"`` for every built-in entry.
    """

    x: Tensor
    y: Tensor
    task: str


DATA: Registry[Callable[..., Batch]] = Registry("data", internal=("device", "generator"))
"""The data sets; ``device`` and ``generator`` come from the run, never from a study file."""


def _count(where: str, name: str, value: object, low: int = 1) -> int:
    """An integer argument >= low, or an error naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise FlowscopeError(f"{where}: {name} must be an integer >= {low}, got {value!r}")
    return value


def _fits(where: str, *shape: int) -> None:
    """Refuse a batch larger than this machine's memory before drawing it."""
    check_fits(f"{where}: a batch of shape {shape}", math.prod(shape))


def _source(
    where: str, device: str | torch.device | None, generator: torch.Generator | None
) -> tuple[torch.device, torch.Generator]:
    """The device and generator to draw from; a fresh seed-0 generator when none is given."""
    try:
        dev = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError) as err:
        raise FlowscopeError(f"{where}: device={device!r} is not a torch device ({err})") from None
    if generator is None:
        dev = dev or torch.device("cpu")
        return dev, torch.Generator(device=dev).manual_seed(0)
    gen = generator.device
    if dev is None:
        return gen, generator
    if gen.type != dev.type or (gen.index is not None and dev.index not in (None, gen.index)):
        raise FlowscopeError(
            f"{where}: generator is on {gen} but device={str(dev)!r}; "
            f"make it with torch.Generator(device={str(dev)!r})"
        )
    return dev, generator


def _labels(n: int, classes: int, dev: torch.device, gen: torch.Generator) -> Tensor:
    """Uniform random class indices."""
    return torch.randint(0, classes, (n,), device=dev, generator=gen)


@DATA.register("gaussian")
def gaussian(
    *,
    n: int = 256,
    dim: int = 500,
    classes: int = 10,
    std: float = 1.0,
    device: str | torch.device | None = None,
    generator: torch.Generator | None = None,
) -> Batch:
    """Inputs x ~ N(0, std²) of shape (n, dim) and random labels (DD2424's experiment input:
    std 1).

    Example:
        >>> import torch
        >>> b = gaussian(n=4, dim=3, classes=2, generator=torch.Generator().manual_seed(1))
        >>> tuple(b.x.shape), sorted(set(b.y.tolist())) <= [0, 1]
        ((4, 3), True)

    Args:
        n: batch size.
        dim: input features (500 in the lecture).
        classes: number of label values, >= 2.
        std: the inputs' standard deviation (> 0): mean-field studies start the first
            layer at a chosen variance q_1 = σ_w² std² + σ_b².
        device: where to create the batch; defaults to the generator's device, else CPU.
        generator: a ``torch.Generator`` on ``device``; None means a fresh one seeded 0.

    Returns:
        A ``Batch`` with float32 ``x`` and int64 ``y`` (labels independent of ``x``).

    Raises:
        FlowscopeError: a size below its minimum or beyond this machine's memory, a bad
            device, a generator elsewhere.
    """
    where = "data 'gaussian'"
    n, dim = _count(where, "n", n), _count(where, "dim", dim)
    classes = _count(where, "classes", classes, low=2)
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 < std < math.inf:
        raise FlowscopeError(f"{where}: std must be a finite number > 0, got {std!r}")
    _fits(where, n, dim)
    dev, gen = _source(where, device, generator)
    x = torch.randn(n, dim, device=dev, generator=gen)
    if std != 1:
        x = x.mul_(std)
    return Batch(x, _labels(n, classes, dev, gen), "classification")


@DATA.register("teacher")
def teacher(
    *,
    n: int = 256,
    dim: int = 500,
    classes: int = 10,
    kind: str = "linear",
    hidden: int = 32,
    device: str | torch.device | None = None,
    generator: torch.Generator | None = None,
) -> Batch:
    """Inputs x ~ N(0, 1) labelled by a fixed random teacher network, so they can be learnt.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> b = teacher(n=1000, dim=20, classes=3, kind="tanh", generator=g)
        >>> b.y.bincount().tolist() != [1000, 0, 0]  # every class shows up
        True

    The teacher is drawn first, then ``x``, from the same generator: one seed gives one
    teacher whatever ``n`` is. A second call on the same (advanced) generator draws a new
    teacher, so make one large batch and split it for training and held-out data.
    ``linear``: labels = argmax(x Wᵀ) with W ~ N(0, 1/dim), a (classes × dim) matrix.
    ``tanh``: labels = argmax(tanh(x W1ᵀ) W2ᵀ) with W1 ~ N(0, 1/dim) of shape
    (hidden × dim), so pre-activations are ~N(0, 1), and W2 ~ N(0, 1/hidden).
    No biases, so by symmetry every class is about equally frequent.

    Args:
        n: batch size.
        dim: input features.
        classes: number of classes, >= 2.
        kind: the teacher, ``"linear"`` or ``"tanh"`` (one hidden layer).
        hidden: hidden units of the ``tanh`` teacher (unused for ``linear``).
        device: where to create the batch; defaults to the generator's device, else CPU.
        generator: a ``torch.Generator`` on ``device``; None means a fresh one seeded 0.

    Returns:
        A ``Batch`` with float32 ``x`` and int64 ``y`` = the teacher's argmax class.

    Raises:
        FlowscopeError: a size below its minimum or beyond this machine's memory, an
            unknown kind, a bad device or generator.
    """
    where = "data 'teacher'"
    n, dim = _count(where, "n", n), _count(where, "dim", dim)
    classes, hidden = _count(where, "classes", classes, low=2), _count(where, "hidden", hidden)
    if kind not in TEACHERS:
        raise unknown("teacher kind", kind, TEACHERS, where)
    _fits(where, n, dim)
    dev, gen = _source(where, device, generator)
    if kind == "linear":
        w = torch.randn(classes, dim, device=dev, generator=gen) / math.sqrt(dim)
        x = torch.randn(n, dim, device=dev, generator=gen)
        logits = x @ w.T
    else:
        w1 = torch.randn(hidden, dim, device=dev, generator=gen) / math.sqrt(dim)
        w2 = torch.randn(classes, hidden, device=dev, generator=gen) / math.sqrt(hidden)
        x = torch.randn(n, dim, device=dev, generator=gen)
        logits = torch.tanh(x @ w1.T) @ w2.T
    return Batch(x, logits.argmax(dim=1), "classification")


@DATA.register("images")
def images(
    *,
    n: int = 64,
    channels: int = 3,
    size: int = 32,
    classes: int = 10,
    device: str | torch.device | None = None,
    generator: torch.Generator | None = None,
) -> Batch:
    """Images x ~ N(0, 1) of shape (n, channels, size, size) and random labels.

    Example:
        >>> import torch
        >>> b = images(n=2, channels=1, size=8, generator=torch.Generator().manual_seed(0))
        >>> tuple(b.x.shape), tuple(b.y.shape)
        ((2, 1, 8, 8), (2,))

    Args:
        n: batch size.
        channels: image channels (the conv net's ``in_channels``).
        size: height and width (the conv net's ``image_size``).
        classes: number of label values, >= 2.
        device: where to create the batch; defaults to the generator's device, else CPU.
        generator: a ``torch.Generator`` on ``device``; None means a fresh one seeded 0.

    Returns:
        A ``Batch`` with float32 ``x`` and int64 ``y`` (labels independent of ``x``).

    Raises:
        FlowscopeError: a size below its minimum or beyond this machine's memory, a bad
            device, a generator elsewhere.
    """
    where = "data 'images'"
    n, channels = _count(where, "n", n), _count(where, "channels", channels)
    size, classes = _count(where, "size", size), _count(where, "classes", classes, low=2)
    _fits(where, n, channels, size, size)
    dev, gen = _source(where, device, generator)
    x = torch.randn(n, channels, size, size, device=dev, generator=gen)
    return Batch(x, _labels(n, classes, dev, gen), "classification")


def make_data(name: str, **kwargs: object) -> Batch:
    """Draw a batch from the registered data ``name``, checking argument names first.

    Example:
        >>> make_data("images", n=1, size=4).x.shape
        torch.Size([1, 3, 4, 4])

    Args:
        name: a name in ``DATA`` (``gaussian``, ``teacher``, ``images``).
        **kwargs: the factory's keyword arguments; the rest keep their defaults.

    Returns:
        The ``Batch``.

    Raises:
        FlowscopeError: unknown data or argument name (with did-you-mean), bad values.
    """
    return DATA.check_args(name, kwargs, internal=True)(**kwargs)
