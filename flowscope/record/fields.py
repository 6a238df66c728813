"""What a snapshot holds, and nothing that computes one.

The raw statistic fields, the histogram settings, the fixed log-magnitude edges, the sample
stride and the row layout ``raw | linear counts | log counts``: shared by the torch path
(:mod:`flowscope.record.snapshot`), the CPU kernels (:mod:`flowscope.record._kernels`), the
frames and the distributed merge.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

# The raw per-snapshot vector; frames.py turns it into count/mean/std/rms/... per row.
RAW_FIELDS = (
    "numel",  # all elements
    "nonfinite",  # NaN + Inf
    "nan",
    "shift",  # c, the finite value the sums are taken about
    "scale",  # s, a power of two: the sums are of (x - c) / s, so they stay in range
    "sum",  # sum of (x - c) / s over finite x
    "sumsq",  # sum of ((x - c) / s)^2 over finite x
    "min",  # min of the finite x (NaN when there is none)
    "max",  # max of the finite x (NaN when there is none)
    "nonzero",  # count of x != 0, NaN and Inf included
    "saturated",  # count of finite x outside the saturation interval (NaN if no interval)
    "stride",  # histogram sample stride (1 = every element)
)
RAW = {name: i for i, name in enumerate(RAW_FIELDS)}


@dataclass(frozen=True)
class LogEdges:
    """Fixed log-magnitude bins: ``per_decade`` bins per decade from 1e``lo`` to 1e``hi``.

    Layout of the ``2 * per_sign + 1`` counts: negative values from the most negative
    (index 0) towards zero, then the exact-zero bin, then positive values upwards. Per sign:
    an underflow bin (0 < |x| < 1e``lo``), the decades, an overflow bin (|x| >= 1e``hi``,
    Inf included).

    Example:
        >>> e = LogEdges()
        >>> e.size, e.zero_index
        (125, 62)
    """

    lo: int = -30
    hi: int = 30
    per_decade: int = 1

    @property
    def per_sign(self) -> int:
        return (self.hi - self.lo) * self.per_decade + 2

    @property
    def size(self) -> int:
        return 2 * self.per_sign + 1

    @property
    def zero_index(self) -> int:
        return self.per_sign

    def magnitude_bounds(self, j: int) -> tuple[float, float]:
        """(lower, upper) |x| bounds of magnitude bin j (0 = underflow, per_sign-1 = overflow)."""
        if j == 0:
            return 0.0, 10.0**self.lo
        if j == self.per_sign - 1:
            return 10.0**self.hi, math.inf
        k = self.lo * self.per_decade + (j - 1)
        return 10.0 ** (k / self.per_decade), 10.0 ** ((k + 1) / self.per_decade)

    def bounds(self, index: int) -> tuple[float, float]:
        """(lo, hi) signed value bounds of bin ``index`` in the full layout."""
        z = self.zero_index
        if index == z:
            return 0.0, 0.0
        if index > z:
            return self.magnitude_bounds(index - z - 1)
        a, b = self.magnitude_bounds(z - 1 - index)
        return -b, -a


@dataclass(frozen=True)
class HistSpec:
    """How histograms are taken: linear bin count, sample cap, log edges."""

    bins: int = 64
    sample: int = 16384
    log: LogEdges = LogEdges()


def _next_prime(n: int) -> int:
    """Smallest prime >= n (n is small: numel / sample)."""
    n = max(n, 2)
    while any(n % p == 0 for p in range(2, math.isqrt(n) + 1)):
        n += 1
    return n


@functools.lru_cache(maxsize=256)
def outward(lo: float, hi: float, dtype: torch.dtype) -> tuple[float, float]:
    """The largest ``dtype`` value <= lo and the smallest >= hi (as floats).

    Compared in ``dtype`` (as torch compares a tensor with a Python number), these split
    the values exactly where ``lo`` and ``hi`` themselves do: ``x <= 0.1`` on float32 would
    otherwise take 0.1 rounded to float32 (0.10000000149), a value above the bound.

    Example:
        >>> outward(0.1, 0.7, torch.float32)
        (0.09999999403953552, 0.7000000476837158)
    """
    bounds = torch.tensor([lo, hi], dtype=torch.float64)
    near = bounds.to(dtype)  # beyond the dtype's range: +-Inf, still in order
    inf = near.new_tensor(math.inf)
    down = torch.where(near.double() > bounds, torch.nextafter(near, -inf), near)
    up = torch.where(near.double() < bounds, torch.nextafter(near, inf), near)
    return float(down[0]), float(up[1])


@functools.lru_cache(maxsize=4096)
def sample_stride(numel: int, cap: int) -> int:
    """Stride of the histogram sample: 1 when the tensor fits, else a prime >= numel / cap."""
    return 1 if numel <= cap else _next_prime(-(-numel // cap))


def split_row(row: torch.Tensor, spec: HistSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(raw, linear counts, log counts)``: views of a snapshot row (or of rows, on the last
    axis)."""
    n_raw, bins = len(RAW_FIELDS), spec.bins
    return row[..., :n_raw], row[..., n_raw : n_raw + bins], row[..., n_raw + bins :]


def row_width(spec: HistSpec) -> int:
    """Length of one snapshot laid out as raw | linear counts | log counts."""
    return len(RAW_FIELDS) + spec.bins + spec.log.size


_EDGE_TENSORS: dict[tuple[LogEdges, torch.device], torch.Tensor] = {}


def log_edges_on(edges: LogEdges, device: torch.device) -> torch.Tensor:
    """The float64 log edges 10**(k / per_decade) on ``device``, made once per device."""
    key = (edges, device)
    if key not in _EDGE_TENSORS:
        ks = range(edges.lo * edges.per_decade, edges.hi * edges.per_decade + 1)
        values = [10.0 ** (k / edges.per_decade) for k in ks]  # Python's pow, as the kernels'
        _EDGE_TENSORS[key] = torch.tensor(values, dtype=torch.float64, device=device)
    return _EDGE_TENSORS[key]
