"""Fused CPU kernels (numba) for :func:`flowscope.stats.snapshot`.

Eager torch makes one memory pass per operation, so a snapshot with eleven statistics costs
about ten passes over the tensor. On the CPU these kernels read each element once for all
moments and counts (float64 accumulators, one partial per chunk, chunks in parallel) and
once more per sampled element for both histograms. They see CPU tensors through zero-copy
numpy views: nothing is transferred and nothing waits.

Results follow ``stats.RAW_FIELDS`` exactly, so frames and tests cannot tell the backends
apart except through rounding (float64 here, the tensor's dtype in eager sums).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

# chunks per call: enough for load balance on any core count, few enough to stay cheap
CHUNKS = 64


@njit(cache=True)
def _shift(x: np.ndarray) -> float:
    """The first finite value of ``x`` (0 if there is none): usually element 0."""
    for i in range(x.size):
        v = np.float64(x[i])
        if v - v == 0.0:
            return v
    return 0.0


# reassociation lets LLVM vectorise the reductions; NaN/Inf semantics stay (no nnan/ninf)
FAST = {"reassoc", "contract", "nsz", "arcp"}


@njit(parallel=True, cache=True, fastmath=FAST)
def _moments(x: np.ndarray, c: float, lo: float, hi: float) -> np.ndarray:
    """Per chunk: sum, sumsq (about c), min, max (about c), nonzero, nan, nonfinite, saturated.

    Branch-free, so the inner loop vectorises. ``c`` must be a finite value of ``x`` (see
    ``_shift``) when there is one: non-finite entries then count as ``c``, which adds 0 to the
    sums and cannot move the extremes.
    """
    n = x.size
    out = np.zeros((CHUNKS, 8))
    step = (n + CHUNKS - 1) // CHUNKS
    for k in prange(CHUNKS):
        s = 0.0
        ss = 0.0
        mn = np.inf
        mx = -np.inf
        nonzero = 0
        nan = 0
        bad = 0
        sat = 0
        for i in range(k * step, min(n, (k + 1) * step)):
            v = np.float64(x[i])
            fin = v - v == 0.0
            d = v - c if fin else 0.0  # 0 is the value c itself: it moves neither extreme
            s += d
            ss += d * d
            mn = min(mn, d)
            mx = max(mx, d)
            nonzero += 1 if v != 0.0 else 0  # NaN and Inf count as nonzero, as in eager
            nan += 1 if v != v else 0
            bad += 0 if fin else 1
            sat += 1 if (v <= lo) | (v >= hi) else 0  # +-Inf compare as outside: taken out below
        out[k, 0] = s
        out[k, 1] = ss
        out[k, 2] = mn
        out[k, 3] = mx
        out[k, 4] = nonzero
        out[k, 5] = nan
        out[k, 6] = bad - nan  # +-Inf
        out[k, 7] = sat - (bad - nan)
    return out


@njit(cache=True)
def _hists(
    s: np.ndarray,
    bits: np.ndarray,
    mant: int,
    bias: int,
    lo: float,
    hi: float,
    bins: int,
    drop_zeros: bool,
    edges: np.ndarray,
    k_lo: int,
    per_decade: int,
    zero_index: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Linear counts over [lo, hi] (finite values) and fixed log-magnitude counts (NaN out).

    ``bits`` is the same sample seen as integers: the binary exponent read from them gives
    the decade to within one, and one comparison with ``edges`` settles it (exact, no log10).
    ``edges[j]`` = 10 ** ((k_lo + j) / per_decade); magnitude bin 0 is the underflow bin,
    bin j + 1 holds [edges[j], edges[j + 1]), the last bin |x| >= edges[-1] (Inf included).
    """
    lin = np.zeros(bins)
    log = np.zeros(2 * zero_index + 1)
    width = hi - lo
    scale = bins / width if width > 0 else 0.0
    top = edges.size
    log10_2 = math.log10(2.0)
    exp_mask = (1 << (bits.itemsize * 8 - 1 - mant)) - 1
    for i in range(s.size):
        v = np.float64(s[i])
        if v != v:
            continue
        if v == 0.0:
            log[zero_index] += 1
            if not drop_zeros:
                lin[0 if scale == 0.0 else min(max(int((v - lo) * scale), 0), bins - 1)] += 1
            continue
        a = abs(v)
        if a == np.inf:
            j = top
        else:
            lin[0 if scale == 0.0 else min(max(int((v - lo) * scale), 0), bins - 1)] += 1
            e2 = ((bits[i] >> mant) & exp_mask) - bias  # floor(log2 a), subnormals aside
            j = math.floor(e2 * log10_2 * per_decade) - k_lo + 1
            j = min(max(j, 0), top)
            while j > 0 and a < edges[j - 1]:  # at most a step or two
                j -= 1
            while j < top and a >= edges[j]:
                j += 1
        log[zero_index + j + 1 if v > 0 else zero_index - j - 1] += 1
    return lin, log


_EDGES: dict[tuple[int, int, int], np.ndarray] = {}


def decade_edges(lo: int, hi: int, per_decade: int) -> np.ndarray:
    """The fixed log edges as float64, computed once per layout."""
    key = (lo, hi, per_decade)
    if key not in _EDGES:
        ks = np.arange(lo * per_decade, hi * per_decade + 1)
        _EDGES[key] = np.array([10.0 ** (k / per_decade) for k in ks])
    return _EDGES[key]


def set_threads(n: int) -> None:
    """Use as many threads as torch does (numba's pool is created on first use)."""
    cap = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    numba.set_num_threads(max(1, min(n, cap)))
