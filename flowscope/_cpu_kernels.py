"""Fused CPU kernels (numba) for :func:`flowscope.stats.snapshot`.

Eager torch makes one memory pass per operation, so a snapshot with eleven statistics costs
about ten passes over the tensor. On the CPU one compiled call per snapshot does everything:
it finds the shift, reads each element once for all moments and counts (float64
accumulators; one thread below PARALLEL_FROM elements, chunks in parallel above), counts both
histograms on the strided sample and writes the row. It sees CPU tensors through zero-copy
numpy views: nothing is transferred and nothing waits.

The moments pass is optimistic: almost every tensor is finite, so the first loop does no
finiteness test at all. The extremes it finds on the order-preserving integer key tell
whether that was right (every NaN and Inf has a key beyond +-Inf's); only then is the slice
read again by the careful loop, which replaces non-finite values before any float op.

Results follow ``stats.RAW_FIELDS`` exactly, so frames and tests cannot tell the backends
apart except through rounding (float64 here, the tensor's dtype in eager sums).
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import numba
import numpy as np
from numba import njit, prange

from flowscope.stats import RAW_FIELDS, LogEdges

# chunks per call: enough for load balance on any core count, few enough to stay cheap
CHUNKS = 64
PARALLEL_FROM = 1 << 22  # below ~4M elements a thread pool costs more than it saves
N_RAW = len(RAW_FIELDS)  # the row is raw | linear counts | log counts


@njit(cache=True)
def _shift(x: np.ndarray, bits: np.ndarray, exp: int) -> float:
    """The first finite value of ``x`` (0 if there is none): usually element 0."""
    for i in range(x.size):
        if (bits[i] & exp) != exp:
            return np.float64(x[i])
    return 0.0


@njit(cache=True, fastmath=True)
def _fast_pass(
    x: np.ndarray, bits: np.ndarray, magnitude: int, shift: int, c: float, lo: float, hi: float,
    top: int, bottom: int,
) -> tuple[float, float, int, int, int, int]:  # fmt: skip
    """(sum, sumsq) about c, (min key, max key, nonzero, saturated), assuming all finite."""
    s = 0.0
    ss = 0.0
    mnk = top
    mxk = bottom
    nonzero = 0
    sat = 0
    for i in range(x.size):
        b = bits[i]
        w = np.float64(x[i])
        d = w - c
        s += d
        ss += d * d
        key = b ^ ((b >> shift) & magnitude)
        mnk = min(mnk, key)
        mxk = max(mxk, key)
        nonzero += 1 if (b & magnitude) != 0 else 0
        sat += 1 if (w <= lo) | (w >= hi) else 0
    return s, ss, mnk, mxk, nonzero, sat


@njit(cache=True, fastmath=True)
def _careful_pass(
    x: np.ndarray, bits: np.ndarray, exp: int, magnitude: int, shift: int, c: float,
    ckey: int, lo: float, hi: float, top: int, bottom: int,
) -> tuple[float, float, int, int, int, int, int, int]:  # fmt: skip
    """The same for a slice holding NaN or Inf, plus (nan, inf).

    Finiteness is read from the integer bits (exponent all ones = NaN or Inf), which
    fast-math cannot touch; a non-finite entry is replaced by ``c`` before any float op, so
    every float the loop sees is finite and full fast-math is valid. ``c`` is a finite
    value of ``x`` when there is one: as a stand-in it adds 0 to the sums and cannot move
    the extremes; its saturation is taken back by the caller.
    """
    s = 0.0
    ss = 0.0
    mnk = top
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
    return s, ss, mnk, mxk, nonzero, nan, bad - nan, sat


@njit(cache=True)
def _chunk(
    x: np.ndarray, bits: np.ndarray, exp: int, magnitude: int, shift: int, c: float,
    ckey: int, lo: float, hi: float, top: int, bottom: int,
) -> tuple[float, float, int, int, int, int, int, int]:  # fmt: skip
    """(sum, sumsq, min key, max key, nonzero, nan, inf, saturated) of one slice: the fast
    pass, and the careful one when the fast pass saw a key at or beyond +-Inf's (``exp`` is
    the key of +Inf, ``~exp`` that of -Inf; NaNs lie beyond them)."""
    s, ss, mnk, mxk, nonzero, sat = _fast_pass(x, bits, magnitude, shift, c, lo, hi, top, bottom)
    if mxk < exp and mnk > ~exp:
        return s, ss, mnk, mxk, nonzero, 0, 0, sat
    return _careful_pass(x, bits, exp, magnitude, shift, c, ckey, lo, hi, top, bottom)


@njit(cache=True, parallel=True)
def _chunks_parallel(
    x: np.ndarray, bits: np.ndarray, exp: int, magnitude: int, shift: int, c: float,
    ckey: int, lo: float, hi: float, top: int, bottom: int,
) -> tuple[float, float, int, int, int, int, int, int]:  # fmt: skip
    """The same over CHUNKS slices in parallel, for tensors of millions of elements."""
    n = x.size
    sums = np.zeros((CHUNKS, 2))
    ints = np.zeros((CHUNKS, 6), dtype=np.int64)
    step = (n + CHUNKS - 1) // CHUNKS
    for k in prange(CHUNKS):
        start = min(n, k * step)
        stop = min(n, start + step)
        s, ss, mnk, mxk, nonzero, nan, inf, sat = _chunk(
            x[start:stop], bits[start:stop], exp, magnitude, shift, c, ckey, lo, hi, top, bottom
        )
        sums[k, 0] = s
        sums[k, 1] = ss
        ints[k, 0] = mnk
        ints[k, 1] = mxk
        ints[k, 2] = nonzero
        ints[k, 3] = nan
        ints[k, 4] = inf
        ints[k, 5] = sat
    return (
        sums[:, 0].sum(), sums[:, 1].sum(), ints[:, 0].min(), ints[:, 1].max(),
        ints[:, 2].sum(), ints[:, 3].sum(), ints[:, 4].sum(), ints[:, 5].sum(),
    )  # fmt: skip


@njit(cache=True, fastmath=True)
def _hist_into(
    s: np.ndarray, bits: np.ndarray, exp: int, magnitude: int, mant: int, exp_bits: int,
    lo: float, scale: float, bins: int, drop_zeros: bool, base: np.ndarray,
    thresholds: np.ndarray, zero_index: int, lin: np.ndarray, log: np.ndarray,
) -> None:  # fmt: skip
    """Count the sample ``s`` into ``lin`` (zeroed here) and ``log``: bin indices first, in a
    loop that vectorises, then the scatter.

    Linear: finite values (exact zeros too unless ``drop_zeros``) over [lo, lo + bins/scale].
    Log: the exponent field of the bits picks the magnitude bin of the octave's lower end
    (``base``) and the few decade edges inside the octave (``thresholds``, padded with Inf)
    settle it exactly: no log10. Magnitude bin 0 is the underflow bin, the last |x| >= the
    top edge (Inf included). NaN is in neither histogram.
    """
    n = s.size
    lin_idx = np.empty(n, dtype=np.int32)
    mag_idx = np.empty(n, dtype=np.int32)
    top = base[exp_bits]  # the overflow bin (the Inf field's)
    for i in range(n):  # vectorises: no scatter, one table lookup
        b = bits[i]
        fin = (b & exp) != exp
        v = np.float64(s[i]) if fin else 0.0  # finite: fast-math may assume so
        pos = min(max(int((v - lo) * scale), 0), bins - 1)
        lin_idx[i] = -1 if (not fin) or ((b & magnitude) == 0 and drop_zeros) else pos
        e = (b >> mant) & exp_bits
        j = base[e] + (1 if abs(v) >= thresholds[e, 0] else 0)
        mag_idx[i] = j if fin else top  # +-Inf: the overflow bins
    for k in range(1, thresholds.shape[1]):  # finer log bins: more edges in an octave
        for i in range(n):
            b = bits[i]
            fin = (b & exp) != exp
            v = np.float64(s[i]) if fin else 0.0
            e = (b >> mant) & exp_bits
            mag_idx[i] += 1 if fin and abs(v) >= thresholds[e, k] else 0
    lin[:] = 0.0
    log[:] = 0.0
    for i in range(n):
        if lin_idx[i] >= 0:
            lin[lin_idx[i]] += 1
        b = bits[i]
        m = b & magnitude
        if m <= exp:  # NaN is in neither histogram
            j = mag_idx[i]
            signed = zero_index + j + 1 if b >= 0 else zero_index - j - 1
            log[zero_index if m == 0 else signed] += 1


@njit(cache=True)
def _snapshot(
    x: np.ndarray, bits: np.ndarray, exp: int, magnitude: int, mant: int, exp_bits: int,
    shift: int, top: int, bottom: int, lo: float, hi: float, saturation: bool,
    stride: int, bins: int, drop_zeros: bool, base: np.ndarray, thresholds: np.ndarray,
    zero_index: int, parallel_from: int, row: np.ndarray,
) -> None:  # fmt: skip
    """One snapshot of ``x`` into ``row`` (raw fields | linear counts | log counts)."""
    n = x.size
    c = _shift(x, bits, exp)
    tmp = np.empty(1, dtype=x.dtype)
    tmp[0] = c
    ckey_bits = tmp.view(bits.dtype)[0]
    ckey = ckey_bits ^ ((ckey_bits >> shift) & magnitude)
    if n >= parallel_from:
        s, ss, mnk, mxk, nonzero, nan, inf, sat = _chunks_parallel(
            x, bits, exp, magnitude, shift, c, ckey, lo, hi, top, bottom
        )
    else:
        s, ss, mnk, mxk, nonzero, nan, inf, sat = _chunk(
            x, bits, exp, magnitude, shift, c, ckey, lo, hi, top, bottom
        )
    keys = np.empty(2, dtype=bits.dtype)
    keys[0] = mnk
    keys[1] = mxk
    for j in range(2):  # the key map is its own inverse
        keys[j] = keys[j] ^ ((keys[j] >> shift) & magnitude)
    extremes = keys.view(x.dtype)
    finite = nan + inf < n  # else the moments are undefined, as in the eager path
    mn = np.float64(extremes[0]) - c if finite else np.nan
    mx = np.float64(extremes[1]) - c if finite else np.nan
    if c <= lo or c >= hi:  # every non-finite entry was counted as the stand-in c
        sat -= nan + inf
    row[0] = n
    row[1] = nan + inf
    row[2] = nan
    row[3] = c
    row[4] = s
    row[5] = ss
    row[6] = mn
    row[7] = mx
    row[8] = nonzero
    row[9] = sat if saturation else np.nan
    row[10] = stride
    width = mx - mn
    scale = bins / width if width > 0 else 0.0
    sample = x[::stride]
    _hist_into(
        sample, bits[::stride], exp, magnitude, mant, exp_bits, c + mn, scale, bins,
        drop_zeros, base, thresholds, zero_index, row[N_RAW : N_RAW + bins], row[N_RAW + bins :],
    )  # fmt: skip


def snapshot_into(
    x: np.ndarray,
    saturation: tuple[float, float] | None,
    stride: int,
    bins: int,
    drop_zeros: bool,
    log_edges: LogEdges,
    row: np.ndarray,
) -> None:
    """Statistics and both histograms of the 1-d float32/float64 array ``x`` into ``row``."""
    ints, exp, mant, exp_bits, _ = _layout(x.dtype)
    shift, top, bottom = _int_constants(x.dtype.char)
    lo, hi = saturation if saturation is not None else (-math.inf, math.inf)
    e = log_edges
    base, thresholds = log_tables(x.dtype.char, e.lo, e.hi, e.per_decade)
    _snapshot(
        x, x.view(ints), exp, top, mant, exp_bits, shift, top, bottom, lo, hi,
        saturation is not None, stride, bins, drop_zeros, base, thresholds, e.zero_index,
        PARALLEL_FROM, row,
    )  # fmt: skip


def _layout(dtype: np.dtype) -> tuple[Any, Any, int, int, int]:
    """IEEE layout of float32 / float64: the same-width int type, the exponent mask (typed),
    mantissa bits, exponent field mask and bias."""
    if dtype == np.float32:
        return np.int32, np.int32(0x7F800000), 23, 0xFF, 127
    return np.int64, np.int64(0x7FF0000000000000), 52, 0x7FF, 1023


@cache
def _int_constants(dtype_char: str) -> tuple[Any, Any, Any]:
    """(sign shift, largest, smallest) of the same-width int type, typed like the bits; the
    largest is also the magnitude mask (every bit but the sign)."""
    ints = _layout(np.dtype(dtype_char))[0]
    info = np.iinfo(ints)
    return ints(info.bits - 1), ints(info.max), ints(info.min)


@cache
def log_tables(dtype_char: str, lo: int, hi: int, per_decade: int) -> tuple[np.ndarray, np.ndarray]:
    """Per exponent field: the magnitude bin of the octave's lower end, and the decade edges
    inside the octave (padded with Inf), for the fixed log edges 1e``lo``..1e``hi``.

    Magnitude bin of |x| = the number of edges <= |x| (0 = underflow, edges.size = overflow).
    Exponent field 0 holds zeros and subnormals (all below any edge: bin 0 unless an edge
    is subnormal); the last field holds Inf and NaN (overflow bin; NaN is dropped anyway).
    """
    dtype = np.dtype(dtype_char)
    _, _, _, exp_bits, bias = _layout(dtype)
    edges = decade_edges(lo, hi, per_decade)
    fields = exp_bits + 1
    base = np.empty(fields, dtype=np.int32)
    inside: list[np.ndarray] = []
    for e in range(fields):
        if e == exp_bits:  # Inf
            base[e] = edges.size
            inside.append(edges[:0])
            continue
        low = 0.0 if e == 0 else math.ldexp(1.0, e - bias)
        upper = e + 1 - bias  # the octave is [2**(e - bias), 2**upper); subnormals [0, ...)
        high = math.ldexp(1.0, upper) if upper < 1024 else math.inf
        base[e] = int(np.searchsorted(edges, low, side="right"))
        inside.append(edges[(edges > low) & (edges < high)])
    steps = max(1, max(len(t) for t in inside))
    thresholds = np.full((fields, steps), np.inf)
    for e, t in enumerate(inside):
        thresholds[e, : len(t)] = t
    return base, thresholds


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
