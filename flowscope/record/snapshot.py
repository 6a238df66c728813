"""Statistics and histograms of one tensor snapshot, computed on the tensor's device.

Nothing here waits on the accelerator: no ``.item()``, no ``.cpu()``, no Python branch on a
tensor's value. Each snapshot becomes one float64 row on its device (``fields.split_row``):

* the raw vector of ``RAW_FIELDS`` (sums, extremes and counts; the moments are finished on
  the host in :mod:`flowscope.record.frames`, which is the only place tensors become pandas);
* a linear histogram over the snapshot's own finite range ``[min, max]``;
* a log-magnitude histogram on fixed edges (sign x decades, a zero bin, an underflow and an
  overflow bin each side), so snapshots from any layer, step or run add up bin by bin.

Moments are exact over every element. Histograms are counted on a deterministic strided
sample of at most ``hist_sample`` elements of the tensor's logical order (a prime stride, so
a sample never locks onto one feature column); ``stride`` is recorded so counts can be
scaled back. Statistics are over the finite values: NaN and Inf are counted, and the rest of
the layer's numbers stay meaningful. Sums are taken about a finite value of the tensor (the
shift) and divided by a power of two where the dtype's range needs it, so neither ``x - c``
nor its square overflows at float32's or float64's limits.

Two implementations of the one definition, equal to float rounding (tests/
test_snapshot_properties.py checks both against an exact reference):

* ``c``: CPU float tensors, the compiled kernel (:mod:`flowscope.record.ckernel`), one call
  per snapshot, reading the tensor where it lies;
* ``eager``: torch ops on any device (:mod:`flowscope.record.batched`); the recorder stages
  a step's tensors and reduces them together, here one tensor is a batch of its own.
"""

from __future__ import annotations

import math
import os

import torch

from flowscope.record import ckernel
from flowscope.record.batched import Batch
from flowscope.record.fields import (
    RAW,
    RAW_FIELDS,
    HistSpec,
    LogEdges,
    outward,
    row_width,
    sample_stride,
    split_row,
)

__all__ = [
    "BACKENDS",
    "RAW",
    "RAW_FIELDS",
    "HistSpec",
    "LogEdges",
    "backend_for",
    "outward",
    "row_width",
    "sample_stride",
    "snapshot",
    "snapshot_row",
    "split_row",
]


BACKENDS = ("auto", "eager", "c")


def backend_for(x: torch.Tensor, backend: str | None = None) -> str:
    """``c`` (the compiled CPU kernel) for CPU float tensors where it could be built, else
    ``eager`` (torch ops, any device).

    ``backend`` (or the FLOWSCOPE_KERNELS environment variable) forces one: ``eager``,
    ``c`` (an error where it cannot run) or ``auto``.
    """
    choice = backend or os.environ.get("FLOWSCOPE_KERNELS", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"FLOWSCOPE_KERNELS must be one of {', '.join(BACKENDS)}, got {choice!r}")
    fits = x.device.type == "cpu" and x.is_floating_point()
    if choice == "eager" or (choice == "auto" and not fits):
        return "eager"
    if not fits or ckernel.kernel() is None:
        if choice == "c":
            raise ValueError(f"the C kernel needs a compiler and a CPU tensor, got {x.device}")
        return "eager"
    return "c"


def snapshot(
    x: torch.Tensor,
    spec: HistSpec,
    saturation: tuple[float, float] | None = None,
    drop_zeros: bool = False,
    backend: str | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics and histograms of ``x`` as device tensors, with no host synchronization.

    Example:
        >>> raw, lin, log = snapshot(torch.tensor([0.0, 1.0, 2.0, float("nan")]), HistSpec(bins=2))
        >>> raw[RAW["nan"]].item(), lin.tolist()
        (1.0, [1.0, 2.0])

    Args:
        x: any floating tensor (any shape, any device); fp16/bf16 are counted in fp32.
        spec: histogram settings.
        saturation: (lo, hi); finite values with x <= lo or x >= hi count as saturated.
        drop_zeros: leave exact zeros out of the linear histogram (their share is in the
            statistics); the lecture's ReLU figures are drawn this way.
        backend: ``eager`` (torch ops, any device), ``c`` (the compiled CPU kernel) or None
            for the default (see :func:`backend_for`).
        out: a float64 row of ``row_width(spec)`` on the tensor's device to hold the
            results (the recorder's mmap-backed rows on CPU); they are returned as views of
            it. The C kernel writes into it directly, the eager path copies in.

    Returns:
        ``(raw, linear_counts, log_counts)``: float64 vectors of lengths ``len(RAW_FIELDS)``,
        ``spec.bins`` and ``spec.log.size``.
    """
    return split_row(snapshot_row(x, spec, saturation, drop_zeros, backend, out), spec)


def snapshot_row(
    x: torch.Tensor,
    spec: HistSpec,
    saturation: tuple[float, float] | None = None,
    drop_zeros: bool = False,
    backend: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`snapshot` as one float64 row ``raw | linear counts | log counts`` (``out``
    when given): the recorder's form, with the least Python per call."""
    flat = x.detach()
    n = flat.numel()
    if n == 0:
        full = empty_row(spec, flat.device)
        return full if out is None else out.copy_(full)
    if backend_for(flat, backend) == "c":
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        row = torch.empty(row_width(spec), dtype=torch.float64) if out is None else out
        ckernel.snapshotter(spec)(flat, saturation, drop_zeros, row)  # read where it lies
        return row
    batch = Batch(flat.device, compute_dtype(flat), spec, capacity=n, max_rows=1)
    row = batch.add(flat, saturation, drop_zeros)
    batch.finish()
    return row if out is None else out.copy_(row)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the torch path stages ``x`` in: float64 for float64, else float32 (exact
    for every float dtype up to 32 bits)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def empty_row(spec: HistSpec, device: torch.device) -> torch.Tensor:
    """The snapshot of an empty tensor: zero counts, NaN moments."""
    raw = torch.full((len(RAW_FIELDS),), math.nan, dtype=torch.float64, device=device)
    for field in ("numel", "nonfinite", "nan", "nonzero"):
        raw[RAW[field]] = 0.0
    raw[RAW["stride"]] = raw[RAW["scale"]] = 1.0
    counts = torch.zeros(spec.bins + spec.log.size, dtype=torch.float64, device=device)
    return torch.cat([raw, counts])
