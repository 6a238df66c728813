"""Fused CPU kernels (numba) for :func:`flowscope.stats.snapshot`.

Eager torch makes one memory pass per operation, so a snapshot with eleven statistics costs
about ten passes over the tensor. On the CPU these kernels read each element once for all
moments and counts (float64 accumulators; one thread below PARALLEL_FROM elements, chunks
in parallel above) and once more per sampled element for both histograms. They see CPU
tensors through zero-copy numpy views: nothing is transferred and nothing waits.

Results follow ``stats.RAW_FIELDS`` exactly, so frames and tests cannot tell the backends
apart except through rounding (float64 here, the tensor's dtype in eager sums).
"""

from __future__ import annotations

import math
from typing import Any

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


PARALLEL_FROM = 1 << 22  # below ~4M elements a thread pool costs more than it saves


@njit(cache=True, fastmath=True)
def _moments_serial(
    x: np.ndarray,
    bits: np.ndarray,
    exp: int,
    magnitude: int,
    top: int,
    bottom: int,
    shift: int,
    c: float,
    ckey: int,
    lo: float,
    hi: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(sum, sumsq) about c and (min key, max key, nonzero, nan, inf, saturated) of a slice.

    Finiteness is read from the integer bits (exponent all ones = NaN or Inf), which
    fast-math cannot touch; a non-finite entry is replaced by ``c`` before any float op, so
    every float the loop sees is finite and full fast-math is valid. The extremes are taken
    on an integer key that orders like the floats (negative values have their magnitude
    bits flipped): float min/max does not vectorise, integer min/max does. ``c`` is a finite
    value of ``x`` when there is one (``_shift``): as a stand-in it adds 0 to the sums and
    cannot move the extremes; its saturation is taken back by the caller. The integer
    constants come typed like ``bits`` (int32 for float32, int64 for float64).
    """
    s = 0.0
    ss = 0.0
    mnk = top  # an empty slice returns the neutral keys
    mxk = bottom
    nonzero = 0
    nan = 0
    bad = 0
    sat = 0
    for i in range(x.size):
        b = bits[i]
        fin = (b & exp) != exp
        w = np.float64(x[i]) if fin else c
        d = w - c
        s += d
        ss += d * d
        key = b ^ ((b >> shift) & magnitude) if fin else ckey
        mnk = min(mnk, key)
        mxk = max(mxk, key)
        nonzero += 1 if (b & magnitude) != 0 else 0  # NaN and Inf are nonzero, as in eager
        nan += 1 if (b & magnitude) > exp else 0
        bad += 0 if fin else 1
        sat += 1 if (w <= lo) | (w >= hi) else 0
    sums = np.empty(2)
    sums[0] = s
    sums[1] = ss
    ints = np.empty(6, dtype=np.int64)  # keys fit: int32 keys widen, int64 keys are int64
    ints[0] = mnk
    ints[1] = mxk
    ints[2] = nonzero
    ints[3] = nan
    ints[4] = bad - nan
    ints[5] = sat
    return sums, ints


@njit(cache=True, parallel=True)
def _moments_parallel(
    x: np.ndarray,
    bits: np.ndarray,
    exp: int,
    magnitude: int,
    top: int,
    bottom: int,
    shift: int,
    c: float,
    ckey: int,
    lo: float,
    hi: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The same over CHUNKS slices in parallel, for tensors of millions of elements."""
    n = x.size
    sums = np.zeros((CHUNKS, 2))
    ints = np.zeros((CHUNKS, 6), dtype=np.int64)
    step = (n + CHUNKS - 1) // CHUNKS
    for k in prange(CHUNKS):
        start = min(n, k * step)
        stop = min(n, start + step)
        part = _moments_serial(
            x[start:stop], bits[start:stop], exp, magnitude, top, bottom, shift, c, ckey, lo, hi
        )
        sums[k] = part[0]
        ints[k] = part[1]
    return sums, ints


def moments(x: np.ndarray, c: float, lo: float, hi: float) -> tuple[float, ...]:
    """(sum, sumsq, min, max, nonzero, nan, inf, saturated) of ``x``; sums and extremes
    about ``c``; extremes are 0 when ``x`` holds no finite value."""
    ints, exp, _, _, _ = _layout(x.dtype)
    info = np.iinfo(ints)
    width = info.bits
    magnitude = ints(info.max)  # every bit but the sign
    bits = x.view(ints)
    ckey = _key_of(np.array([c], dtype=x.dtype).view(ints))[0]
    args: tuple[Any, ...] = (
        *(x, bits, exp, magnitude, ints(info.max), ints(info.min), width - 1, c, ckey, lo, hi),
    )
    if x.size >= PARALLEL_FROM:
        sums, counts = _moments_parallel(*args)
        s, ss = sums.sum(axis=0)
        mn_key, mx_key = counts[:, 0].min(), counts[:, 1].max()
        nonzero, nan, inf, sat = counts[:, 2:].sum(axis=0)
    else:
        (s, ss), (mn_key, mx_key, nonzero, nan, inf, sat) = _moments_serial(*args)
    keys = _key_of(np.array([mn_key, mx_key], dtype=ints))
    mn, mx = keys.view(x.dtype).astype(np.float64) - c
    if c <= lo or c >= hi:  # every non-finite entry was counted as the stand-in c
        sat -= nan + inf
    return float(s), float(ss), float(mn), float(mx), int(nonzero), int(nan), int(inf), int(sat)


def _layout(dtype: np.dtype) -> tuple[Any, Any, int, int, int]:
    """IEEE layout of float32 / float64: the same-width int type, the exponent mask (typed),
    mantissa bits, exponent field mask and bias."""
    if dtype == np.float32:
        return np.int32, np.int32(0x7F800000), 23, 0xFF, 127
    return np.int64, np.int64(0x7FF0000000000000), 52, 0x7FF, 1023


def _key_of(values: np.ndarray) -> np.ndarray:
    """The order-preserving integer key of float bits, and back (the map is an involution)."""
    info = np.iinfo(values.dtype)
    return values ^ ((values >> (info.bits - 1)) & values.dtype.type(info.max))


@njit(cache=True, fastmath=True)
def _hist_index(
    s: np.ndarray,
    bits: np.ndarray,
    exp: int,
    magnitude: int,
    mant: int,
    exp_bits: int,
    bias: int,
    lo: float,
    scale: float,
    bins: int,
    drop_zeros: bool,
    edges: np.ndarray,
    k_lo: int,
    per_decade: int,
    steps: int,
    zero_index: int,
    lin_idx: np.ndarray,
    log_idx: np.ndarray,
) -> None:
    """Bin indices of every sampled value (-1 = not counted); no scatter, so it vectorises.

    Linear: finite values (exact zeros too unless ``drop_zeros``) over [lo, lo + bins/scale].
    Log: the binary exponent read from the bits gives a decade that is never above the true
    one and at most ``steps`` below it; that many comparisons with ``edges`` settle it
    exactly (no log10). ``edges[j]`` = 10 ** ((k_lo + j) / per_decade); magnitude bin 0 is
    the underflow bin, bin j + 1 holds [edges[j], edges[j + 1]), the last bin |x| >=
    edges[-1] (Inf included). NaN is in neither histogram.
    """
    top = edges.size
    log10_2 = math.log10(2.0)
    for i in range(s.size):
        b = bits[i]
        fin = (b & exp) != exp
        nan = (b & magnitude) > exp
        zero = (b & magnitude) == 0
        v = np.float64(s[i]) if fin else 0.0
        pos = min(max(int((v - lo) * scale), 0), bins - 1)
        lin_idx[i] = -1 if (not fin) or (zero and drop_zeros) else pos
        e2 = ((b >> mant) & exp_bits) - bias
        j = min(max(math.floor(e2 * log10_2 * per_decade) - k_lo + 1, 0), top)
        a = abs(v)
        for _ in range(steps):
            j += 1 if j < top and a >= edges[min(j, top - 1)] else 0
        j = j if fin else top  # +-Inf: the overflow bins
        signed = zero_index + j + 1 if b >= 0 else zero_index - j - 1
        log_idx[i] = -1 if nan else (zero_index if zero else signed)


@njit(cache=True)
def _scatter(lin_idx: np.ndarray, log_idx: np.ndarray, lin: np.ndarray, log: np.ndarray) -> None:
    """Count the indices into ``lin`` and ``log`` (zeroed here; -1 = not counted)."""
    lin[:] = 0.0
    log[:] = 0.0
    for i in range(lin_idx.size):
        if lin_idx[i] >= 0:
            lin[lin_idx[i]] += 1
        if log_idx[i] >= 0:
            log[log_idx[i]] += 1


def hists(
    sample: np.ndarray,
    lo: float,
    hi: float,
    bins: int,
    drop_zeros: bool,
    log_lo: int,
    log_hi: int,
    per_decade: int,
    zero_index: int,
    lin: np.ndarray,
    log: np.ndarray,
) -> None:
    """Linear counts over [lo, hi] and fixed log-magnitude counts of a (strided) sample,
    written into ``lin`` (``bins`` long) and ``log`` (``2 * zero_index + 1`` long)."""
    ints, exp, mant, exp_bits, bias = _layout(sample.dtype)
    info = np.iinfo(ints)
    width = hi - lo
    scale = bins / width if width > 0 else 0.0
    edges = decade_edges(log_lo, log_hi, per_decade)
    steps = 1 + math.ceil(math.log10(2.0) * per_decade)
    lin_idx = np.empty(sample.size, dtype=np.int32)
    log_idx = np.empty(sample.size, dtype=np.int32)
    args: tuple[Any, ...] = (
        *(sample, sample.view(ints), exp, ints(info.max), mant, exp_bits, bias, lo),
        *(scale, bins, drop_zeros, edges, log_lo * per_decade, per_decade, steps, zero_index),
        *(lin_idx, log_idx),
    )
    _hist_index(*args)
    _scatter(lin_idx, log_idx, lin, log)


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
