"""Statistics and histograms of one tensor snapshot, computed on the tensor's device.

Nothing here waits on the accelerator: no ``.item()``, no ``.cpu()``, no Python branch on a
tensor's value. Each snapshot becomes three small tensors on its device:

* a float64 vector of ``RAW_FIELDS`` (sums, extremes and counts; the moments are finished on
  the host in :mod:`flowscope.record.frames`, which is the only place tensors become pandas);
* a linear histogram over the snapshot's own finite range ``[min, max]``;
* a log-magnitude histogram on fixed edges (sign x decades, a zero bin, an underflow and an
  overflow bin each side), so snapshots from any layer, step or run add up bin by bin.

Moments are exact over every element. Histograms are counted on a deterministic strided
sample of at most ``hist_sample`` elements (a prime stride, so a sample never locks onto one
feature column); ``stride`` is recorded so counts can be scaled back.

Statistics are over the finite values: NaN and Inf are counted, and the rest of the layer's
numbers stay meaningful. The trick that keeps this branch-free: non-finite entries are
replaced by one of the tensor's own finite values ``c``, which lies inside its own range (the
extremes are unaffected) and adds exactly 0 to sums taken about ``c``. The shift also makes
the variance from sums of squares numerically safe when the mean is far from zero (sigmoid
outputs, say). The sums are of ``(x - c) / s`` with ``s`` a power of two at least the largest
finite ``|x|`` where needed, so neither ``x - c`` nor its square leaves the dtype's range
(``[-2e38, 3e38]`` in float32, ``1e200`` in float64); dividing by a power of two is exact.
"""

from __future__ import annotations

import math
import os

import torch

from flowscope.record import ckernel
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


def _count(idx: torch.Tensor, weights: torch.Tensor, size: int) -> torch.Tensor:
    """Weighted bin counts; bincount on CPU (fastest there), scatter_add elsewhere (no sync)."""
    if idx.device.type == "cpu":
        return torch.bincount(idx, weights=weights, minlength=size).to(torch.float64)
    out = torch.zeros(size, dtype=weights.dtype, device=idx.device)
    return out.scatter_add_(0, idx, weights).to(torch.float64)


def _shift(flat: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """The first finite value of ``flat`` as a 1-element tensor (0 if none), found on device.

    It must be a value of the tensor: non-finite entries are replaced by it, which then
    cannot move the extremes.
    """
    first = finite.to(torch.uint8).argmax().reshape(1)
    return torch.where(finite[first], flat.index_select(0, first), torch.zeros_like(flat[:1]))


def _power_of_two_scale(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1/s, s)`` with ``s = 2**e >= absmax``: ``1/s`` in the dtype of ``absmax`` (exact,
    subnormal at worst), ``s`` in float64. ``x / s`` then lies in [-1, 1]: no square or sum of
    a shifted value overflows, and scaling by a power of two loses no digit."""
    top = math.frexp(torch.finfo(absmax.dtype).max)[1]  # 128 for float32, 1024 for float64
    e = torch.frexp(absmax).exponent.clamp(-(top - 8), top - 1)
    e64 = e.to(torch.float64)
    return torch.exp2(-e64).to(absmax.dtype), torch.exp2(e64)


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
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    n = flat.numel()
    if n and backend_for(flat, backend) == "c":
        row = torch.empty(row_width(spec), dtype=torch.float64) if out is None else out
        stride = sample_stride(n, spec.sample)  # the tensor is read where it lies
        ckernel.snapshot_into(flat, stride, spec.bins, drop_zeros, saturation, spec.log, row)
        return row
    with torch.no_grad():
        flat = flat.reshape(-1)
        parts = (
            _empty(spec, flat.device)
            if n == 0
            else _snapshot_eager(flat, spec, saturation, drop_zeros)
        )
        full = torch.cat(parts)
    return full if out is None else out.copy_(full)


def _snapshot_eager(
    flat: torch.Tensor, spec: HistSpec, saturation: tuple[float, float] | None, drop_zeros: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch ops on the tensor's device (GPUs, and CPU with FLOWSCOPE_KERNELS=eager)."""
    n = flat.numel()
    finite = torch.isfinite(flat)
    n_finite = torch.count_nonzero(finite)
    c = _shift(flat, finite)
    w = torch.where(finite, flat, c)  # non-finite -> c: extremes unmoved, adds 0 about c
    lo_hi = torch.aminmax(w)
    inv, scale = _power_of_two_scale(torch.maximum(lo_hi.min.abs(), lo_hi.max.abs()))
    y = w.mul_(inv).sub_(c * inv)  # (x - c) / s with |x / s| <= 1: cannot overflow
    sums = torch.stack([y.sum(), (y * y).sum()]).to(torch.float64)
    nonfinite = n - n_finite
    nan = torch.count_nonzero(torch.isnan(flat))
    if saturation is None:
        sat = torch.full((), math.nan, dtype=torch.float64, device=flat.device)
    else:
        lo, hi = outward(*saturation, flat.dtype)
        outside = torch.count_nonzero((flat <= lo) | (flat >= hi))
        sat = outside - (nonfinite - nan)  # +-Inf compare as outside: take them back out
    stride = sample_stride(n, spec.sample)
    extremes = torch.stack([lo_hi.min, lo_hi.max]).to(torch.float64)
    extremes = torch.where(n_finite > 0, extremes, math.nan)  # no finite value: undefined
    counts = torch.stack([nonfinite, nan, torch.count_nonzero(flat)]).to(torch.float64)
    raw = torch.cat(
        [
            torch.full((1,), float(n), dtype=torch.float64, device=flat.device),
            counts[:2],  # nonfinite, nan
            c.to(torch.float64),  # shift
            scale.reshape(1),
            sums,  # sum, sumsq of (x - c) / s
            extremes,  # min, max
            counts[2:],  # nonzero
            sat.to(torch.float64).reshape(1),
            torch.full((1,), float(stride), dtype=torch.float64, device=flat.device),
        ]
    )
    sample = flat[::stride]
    lin = _linear_hist(sample, lo_hi.min, lo_hi.max, spec.bins, drop_zeros)
    log = _log_hist(sample, spec.log)
    return raw, lin, log


def _empty(spec: HistSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The snapshot of an empty tensor: zero counts, NaN moments."""
    raw = torch.full((len(RAW_FIELDS),), math.nan, dtype=torch.float64, device=device)
    for field in ("numel", "nonfinite", "nan", "nonzero"):
        raw[RAW[field]] = 0.0
    raw[RAW["stride"]] = raw[RAW["scale"]] = 1.0
    zeros = torch.zeros(spec.bins, dtype=torch.float64, device=device)
    return raw, zeros, torch.zeros(spec.log.size, dtype=torch.float64, device=device)


def _linear_hist(
    s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int, drop_zeros: bool
) -> torch.Tensor:
    """Counts of finite sample values in ``bins`` equal bins over [lo, hi] (device scalars)."""
    keep = (s - s) == 0  # finite
    if drop_zeros:
        keep &= s != 0
    # in float64 (a range of float32 subnormals still has a finite bins / width), and in
    # halves of the values (hi - lo and s - lo stay finite up to float64's limits)
    half_lo = lo.double() * 0.5
    width = hi.double() * 0.5 - half_lo
    scale = torch.where(width > 0, bins / width, torch.zeros_like(width))  # constant: bin 0
    pos = (torch.nan_to_num(s.double(), 0.0, 0.0, 0.0) * 0.5 - half_lo) * scale
    idx = torch.nan_to_num_(pos, 0.0, bins - 1.0, 0.0).clamp_(0, bins - 1).long()
    return _count(idx, keep.to(s.dtype), bins)


def _log_hist(s: torch.Tensor, edges: LogEdges) -> torch.Tensor:
    """Counts of sample values (Inf included, NaN left out) on the fixed log-magnitude bins.

    The magnitude bin is the number of float64 edges <= |s| (a search, not ``log10``, which
    can round a value next to an edge into its neighbour): the same bins as the CPU kernels.
    """
    j = torch.bucketize(s.double().abs(), _edges_on(edges, s.device), right=True)
    sign = torch.sign(torch.nan_to_num(s, 0.0))
    idx = (edges.zero_index + sign * (j + 1)).long()
    return _count(idx, (s == s).to(s.dtype), edges.size)


_EDGE_TENSORS: dict[tuple[LogEdges, torch.device], torch.Tensor] = {}


def _edges_on(edges: LogEdges, device: torch.device) -> torch.Tensor:
    """The float64 log edges 10**(k / per_decade) on ``device``, made once per device."""
    key = (edges, device)
    if key not in _EDGE_TENSORS:
        ks = range(edges.lo * edges.per_decade, edges.hi * edges.per_decade + 1)
        values = [10.0 ** (k / edges.per_decade) for k in ks]  # Python's pow, as the kernels'
        _EDGE_TENSORS[key] = torch.tensor(values, dtype=torch.float64, device=device)
    return _EDGE_TENSORS[key]
