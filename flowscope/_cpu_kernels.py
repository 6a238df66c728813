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

A float32 tensor is read by the narrow pass first: every lane 32 bits wide (float32 sums
over blocks of NARROW_BLOCK elements, added up in float64; int32 keys; float32 counters),
twice the lanes of the float64 pass. Its sums are trusted only when the extremes show
every value finite and every deviation from the shift within [NARROW_LO, NARROW_HI]
(no float32 overflow or underflow of a square); otherwise the slice is read again by the
float64 pass (or the careful one), so the float32 sums never decide a result they cannot
hold.

Results follow ``stats.RAW_FIELDS`` exactly, so frames and tests cannot tell the backends
apart except through rounding (float64 here, the tensor's dtype in eager sums).
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import numba
import numpy as np
import torch
from numba import njit, prange

from flowscope.stats import RAW_FIELDS, LogEdges, outward

# chunks per call: enough for load balance on any core count, few enough to stay cheap
CHUNKS = 64
PARALLEL_FROM = 1 << 22  # below ~4M elements a thread pool costs more than it saves
# the narrow pass: float32 partial sums over blocks this long (each of LLVM's ~32 vector
# accumulators adds ~128 values: relative error ~1e-7, against 1e-5 allowed by the tests)
NARROW_BLOCK = 4096
# ... trusted when the largest |x - shift| lies in this range: above, a block's sum of
# squares could overflow float32 (4096 * 2**112 < 3.4e38); below, squares of the leading
# values would approach float32's subnormals (2**-80 >> 1.2e-38)
NARROW_LO, NARROW_HI = 2.0**-40, 2.0**56
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


@njit(cache=True, fastmath=True)
def _narrow_block(x: np.ndarray, bits: np.ndarray, c: Any) -> tuple[Any, Any, Any, Any, Any]:
    """(sum, sumsq) about c, (min key, max key) and zeros of a float32 block, 32-bit lanes.

    Every integer is forced to int32 (numba widens int32 arithmetic to int64, which halves
    the lanes); the counter is a float32, exact up to 2**24.
    """
    mag = np.int32(0x7FFFFFFF)
    a = np.float32(0.0)
    b = np.float32(0.0)
    zeros = np.float32(0.0)
    mnk = np.int32(0x7FFFFFFF)
    mxk = np.int32(-0x80000000)
    for i in range(x.size):
        u = bits[i]
        d = x[i] - c
        a += d
        b += d * d
        key = np.int32(u ^ np.int32(np.int32(u >> np.int32(31)) & mag))
        mnk = key if key < mnk else mnk
        mxk = key if key > mxk else mxk
        zeros += np.float32(1.0) if np.int32(u & mag) == np.int32(0) else np.float32(0.0)
    return a, b, mnk, mxk, zeros


@njit(cache=True, fastmath=True)
def _narrow_block_saturated(
    x: np.ndarray, bits: np.ndarray, c: Any, klo: Any, khi: Any
) -> tuple[Any, Any, Any, Any, Any, Any]:
    """The same plus the saturated count, compared on the key: ``key <= klo or key >= khi``
    (the keys of the float32 bounds, see :func:`saturation_keys`)."""
    mag = np.int32(0x7FFFFFFF)
    a = np.float32(0.0)
    b = np.float32(0.0)
    zeros = np.float32(0.0)
    sat = np.float32(0.0)
    mnk = np.int32(0x7FFFFFFF)
    mxk = np.int32(-0x80000000)
    for i in range(x.size):
        u = bits[i]
        d = x[i] - c
        a += d
        b += d * d
        key = np.int32(u ^ np.int32(np.int32(u >> np.int32(31)) & mag))
        mnk = key if key < mnk else mnk
        mxk = key if key > mxk else mxk
        zeros += np.float32(1.0) if np.int32(u & mag) == np.int32(0) else np.float32(0.0)
        sat += np.float32(1.0) if (key <= klo) | (key >= khi) else np.float32(0.0)
    return a, b, mnk, mxk, zeros, sat


@njit(cache=True)
def _narrow_pass(
    x: np.ndarray, bits: np.ndarray, c: float, saturation: bool, klo: Any, khi: Any
) -> tuple[float, float, Any, Any, int, int]:  # fmt: skip
    """(sum, sumsq, min key, max key, nonzero, saturated) of a float32 slice, block by
    block; the caller decides whether the sums can be trusted."""
    n = x.size
    c32 = np.float32(c)
    s = 0.0
    ss = 0.0
    zeros = 0
    sat = 0
    mnk = np.int32(0x7FFFFFFF)
    mxk = np.int32(-0x80000000)
    for start in range(0, n, NARROW_BLOCK):
        stop = min(n, start + NARROW_BLOCK)
        if saturation:
            a, b, lo, hi, z, q = _narrow_block_saturated(
                x[start:stop], bits[start:stop], c32, klo, khi
            )
            sat += int(q)
        else:
            a, b, lo, hi, z = _narrow_block(x[start:stop], bits[start:stop], c32)
        s += a
        ss += b
        zeros += int(z)
        mnk = min(mnk, lo)
        mxk = max(mxk, hi)
    return s, ss, mnk, mxk, n - zeros, sat


@njit(cache=True)
def _narrow_trusted(mnk: Any, mxk: Any, c: float, exp: Any) -> bool:
    """Whether the narrow pass's sums hold: every value finite and every deviation from the
    shift either 0 or within [NARROW_LO, NARROW_HI]."""
    if mxk >= exp or mnk <= ~exp:
        return False
    mag = np.int32(0x7FFFFFFF)
    lo = np.float64(np.int32(mnk ^ ((mnk >> 31) & mag)).view(np.float32)) - c
    hi = np.float64(np.int32(mxk ^ ((mxk >> 31) & mag)).view(np.float32)) - c
    m = max(abs(lo), abs(hi))
    return bool(m == 0.0 or (NARROW_LO <= m <= NARROW_HI))


@njit(cache=True)
def _chunk(
    x: np.ndarray, bits: np.ndarray, exp: int, magnitude: int, shift: int, c: float,
    ckey: int, lo: float, hi: float, top: int, bottom: int, narrow: bool, saturation: bool,
    klo: Any, khi: Any,
) -> tuple[float, float, int, int, int, int, int, int]:  # fmt: skip
    """(sum, sumsq, min key, max key, nonzero, nan, inf, saturated) of one slice.

    float32 (``narrow``): the narrow pass, kept when :func:`_narrow_trusted` says so. Then
    (and for float64) the float64 pass, and the careful one when a pass saw a key at or
    beyond +-Inf's (``exp`` is the key of +Inf, ``~exp`` that of -Inf; NaNs lie beyond).
    """
    finite = True  # until a pass shows otherwise
    if narrow:
        s, ss, mnk, mxk, nonzero, sat = _narrow_pass(x, bits, c, saturation, klo, khi)
        if _narrow_trusted(mnk, mxk, c, exp):
            return s, ss, mnk, mxk, nonzero, 0, 0, sat
        finite = mxk < exp and mnk > ~exp  # finite, but beyond float32's sums
    if finite:
        s, ss, mnk, mxk, nonzero, sat = _fast_pass(
            x, bits, magnitude, shift, c, lo, hi, top, bottom
        )
        if mxk < exp and mnk > ~exp:
            return s, ss, mnk, mxk, nonzero, 0, 0, sat
    return _careful_pass(x, bits, exp, magnitude, shift, c, ckey, lo, hi, top, bottom)


@njit(cache=True, parallel=True)
def _chunks_parallel(
    x: np.ndarray, bits: np.ndarray, exp: int, magnitude: int, shift: int, c: float,
    ckey: int, lo: float, hi: float, top: int, bottom: int, narrow: bool, saturation: bool,
    klo: Any, khi: Any,
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
            x[start:stop], bits[start:stop], exp, magnitude, shift, c, ckey, lo, hi, top, bottom,
            narrow, saturation, klo, khi,
        )  # fmt: skip
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
    """Count the sample ``s`` into ``lin`` and ``log`` (both overwritten): bin indices
    first, in loops that vectorise, then the scatter.

    Linear: finite values (exact zeros too unless ``drop_zeros``) over [lo, lo + bins/scale].
    Log: the exponent field of the bits picks the magnitude bin of the octave's lower end
    (``base``) and the few decade edges inside the octave (``thresholds``, padded with Inf)
    settle it exactly: no log10. Magnitude bin 0 is the underflow bin, the last |x| >= the
    top edge (Inf included). NaN is in neither histogram.

    Indices are stored shifted by one, 0 meaning "not counted", so the scatter has no
    branch; it spreads over four copies of the counts, because a sample whose values share
    a bin (most of a layer's values lie in one or two decades) would otherwise make every
    increment wait for the one before.
    """
    n = s.size
    lin_idx = np.empty(n, dtype=np.int32)
    log_idx = np.empty(n, dtype=np.int32)
    top = base[exp_bits]  # the overflow bin (the Inf field's)
    for i in range(n):  # vectorises: no scatter, one table lookup
        b = bits[i]
        fin = (b & exp) != exp
        v = np.float64(s[i]) if fin else 0.0  # finite: fast-math may assume so
        pos = min(max(int((v - lo) * scale), 0), bins - 1)
        lin_idx[i] = 0 if (not fin) or ((b & magnitude) == 0 and drop_zeros) else pos + 1
        e = (b >> mant) & exp_bits
        j = base[e] + (1 if abs(v) >= thresholds[e, 0] else 0)
        log_idx[i] = j if fin else top  # +-Inf: the overflow bins
    for k in range(1, thresholds.shape[1]):  # finer log bins: more edges in an octave
        for i in range(n):
            b = bits[i]
            fin = (b & exp) != exp
            v = np.float64(s[i]) if fin else 0.0
            e = (b >> mant) & exp_bits
            log_idx[i] += 1 if fin and abs(v) >= thresholds[e, k] else 0
    for i in range(n):  # magnitude bin -> signed bin; zero has its own, NaN none
        b = bits[i]
        m = b & magnitude
        j = log_idx[i]
        signed = zero_index + j + 1 if b >= 0 else zero_index - j - 1
        log_idx[i] = 0 if m > exp else (zero_index if m == 0 else signed) + 1
    wl = bins + 1
    wg = log.size + 1
    lc = np.zeros(4 * wl, dtype=np.int32)
    gc = np.zeros(4 * wg, dtype=np.int32)
    m4 = n - n % 4
    for i in range(0, m4, 4):
        lc[lin_idx[i]] += 1
        lc[wl + lin_idx[i + 1]] += 1
        lc[2 * wl + lin_idx[i + 2]] += 1
        lc[3 * wl + lin_idx[i + 3]] += 1
        gc[log_idx[i]] += 1
        gc[wg + log_idx[i + 1]] += 1
        gc[2 * wg + log_idx[i + 2]] += 1
        gc[3 * wg + log_idx[i + 3]] += 1
    for i in range(m4, n):
        lc[lin_idx[i]] += 1
        gc[log_idx[i]] += 1
    for j in range(bins):
        lin[j] = lc[j + 1] + lc[wl + j + 1] + lc[2 * wl + j + 1] + lc[3 * wl + j + 1]
    for j in range(log.size):
        log[j] = gc[j + 1] + gc[wg + j + 1] + gc[2 * wg + j + 1] + gc[3 * wg + j + 1]


@njit(cache=True)
def _snapshot(
    x: np.ndarray, bits: np.ndarray, exp: int, magnitude: int, mant: int, exp_bits: int,
    shift: int, top: int, bottom: int, lo: float, hi: float, saturation: bool, klo: Any,
    khi: Any, stride: int, bins: int, drop_zeros: bool, base: np.ndarray,
    thresholds: np.ndarray, zero_index: int, parallel_from: int, row: np.ndarray,
) -> None:  # fmt: skip
    """One snapshot of ``x`` into ``row`` (raw fields | linear counts | log counts)."""
    n = x.size
    c = _shift(x, bits, exp)
    tmp = np.empty(1, dtype=x.dtype)
    tmp[0] = c
    ckey_bits = tmp.view(bits.dtype)[0]
    ckey = ckey_bits ^ ((ckey_bits >> shift) & magnitude)
    narrow = x.itemsize == 4  # float32
    if n >= parallel_from:
        s, ss, mnk, mxk, nonzero, nan, inf, sat = _chunks_parallel(
            x, bits, exp, magnitude, shift, c, ckey, lo, hi, top, bottom, narrow, saturation,
            klo, khi,
        )  # fmt: skip
    else:
        s, ss, mnk, mxk, nonzero, nan, inf, sat = _chunk(
            x, bits, exp, magnitude, shift, c, ckey, lo, hi, top, bottom, narrow, saturation,
            klo, khi,
        )  # fmt: skip
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
    sample = np.empty((n + stride - 1) // stride, dtype=x.dtype)
    for i in range(sample.size):  # one strided read; the histogram loops read it 3 times
        sample[i] = x[i * stride]
    _hist_into(
        sample, sample.view(bits.dtype), exp, magnitude, mant, exp_bits, c + mn, scale, bins,
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
    klo, khi = saturation_keys(lo, hi)
    e = log_edges
    base, thresholds = log_tables(x.dtype.char, e.lo, e.hi, e.per_decade)
    _snapshot(
        x, x.view(ints), exp, top, mant, exp_bits, shift, top, bottom, lo, hi,
        saturation is not None, klo, khi, stride, bins, drop_zeros, base, thresholds,
        e.zero_index, PARALLEL_FROM, row,
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
def saturation_keys(lo: float, hi: float) -> tuple[np.int32, np.int32]:
    """int32 keys (see :func:`_narrow_block`) such that, for every finite float32 ``w``,
    ``w <= lo`` iff ``key(w) <= klo`` and ``w >= hi`` iff ``key(w) >= khi``.

    The bounds go outward to float32 values first (:func:`flowscope.stats.outward`); a bound
    that lands on a zero takes the key of the zero that keeps both zeros on its side.
    """
    down, up = outward(lo, hi, torch.float32)
    down = 0.0 if down == 0 else down  # +0's key: -0 <= lo and +0 <= lo alike
    up = -0.0 if up == 0 else up  # -0's key: both zeros >= hi
    keys = np.array([down, up], dtype=np.float32).view(np.int32)
    keys = keys ^ ((keys >> 31) & np.int32(0x7FFFFFFF))
    return keys[0], keys[1]


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
