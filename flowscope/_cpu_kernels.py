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
def _shift(x: np.ndarray, probe: int) -> float:
    """The first finite value among the first ``probe`` elements (0 if none)."""
    for i in range(min(probe, x.size)):
        v = np.float64(x[i])
        if v - v == 0.0:
            return v
    return 0.0


@njit(parallel=True, cache=True)
def _moments(x: np.ndarray, c: float, lo: float, hi: float) -> np.ndarray:
    """Per chunk: sum, sumsq (about c), min, max (about c), nonzero, nan, inf, saturated."""
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
        inf = 0
        sat = 0
        for i in range(k * step, min(n, (k + 1) * step)):
            v = np.float64(x[i])
            if v - v != 0.0:  # NaN or +-Inf: counted, left out of every statistic
                if v != v:
                    nan += 1
                else:
                    inf += 1
                continue
            d = v - c
            s += d
            ss += d * d
            mn = min(mn, d)
            mx = max(mx, d)
            if v != 0.0:
                nonzero += 1
            if v <= lo or v >= hi:
                sat += 1
        out[k, 0] = s
        out[k, 1] = ss
        out[k, 2] = mn
        out[k, 3] = mx
        out[k, 4] = nonzero + nan + inf  # NaN and Inf are nonzero, as in the eager path
        out[k, 5] = nan
        out[k, 6] = inf
        out[k, 7] = sat
    return out


@njit(cache=True)
def _hists(
    s: np.ndarray,
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

    ``edges[j]`` = 10 ** ((k_lo + j) / per_decade); magnitude bin 0 is the underflow bin,
    bin j + 1 holds [edges[j], edges[j + 1]), the last bin |x| >= edges[-1] (Inf included).
    """
    lin = np.zeros(bins)
    log = np.zeros(2 * zero_index + 1)
    width = hi - lo
    scale = bins / width if width > 0 else 0.0
    top = edges.size  # magnitude bins: 0 .. top (underflow, decades, overflow)
    log2_10 = math.log2(10.0)
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
            _, e = math.frexp(a)  # a = m * 2**e, m in [0.5, 1): a first guess at the bin
            j = math.floor((e - 1) / log2_10 * per_decade) - k_lo + 1
            j = min(max(j, 0), top)
            while j > 0 and a < edges[j - 1]:
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
