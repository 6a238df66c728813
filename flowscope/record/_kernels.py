"""Fused CPU kernels (numba) for :func:`flowscope.record.snapshot.snapshot`.

Eager torch makes one memory pass per operation, so a snapshot with eleven statistics costs
about ten passes over the tensor. On the CPU one compiled call per snapshot does everything:
it finds the shift, reads each element once for all moments and counts, counts both
histograms on the strided sample and writes the row. It sees CPU tensors through zero-copy
numpy views: nothing is transferred and nothing waits.

Large tensors (PARALLEL_FROM elements; samples of HIST_TEAM_FROM values) are split over
torch's own OpenMP threads, which spin idle between torch's operations anyway
(:mod:`flowscope.record._team`): each thread runs the same code on its share and the results are
merged, so the split changes nothing but the order of float additions.

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
from functools import cache, lru_cache
from typing import Any

import numpy as np
import torch
from numba import carray, cfunc, njit, types

from flowscope.record._team import (
    call_int,
    float32_at,
    float64_at,
    int32_at,
    int64_at,
    run_team,
    team_size,
    torch_team,
)
from flowscope.record.fields import RAW_FIELDS, LogEdges, outward

PARALLEL_FROM = 1 << 17  # from here the moments pass is split over torch's threads
HIST_TEAM_FROM = 1 << 12  # ... and the histograms, from this many sampled values
F32_EXP = np.int32(0x7F800000)  # the exponent field: all ones is NaN or Inf
F64_EXP = np.int64(0x7FF0000000000000)
# the narrow pass: float32 partial sums over blocks this long (LLVM keeps 4 x 8 float32
# accumulators, so each adds 128 values: at most 128 * 2**-24 = 7.6e-6 relative on the sum
# of squares, ~1e-7 typically; see docs/PERFORMANCE.md)
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


@njit(cache=True)  # no fast-math: it would fold w * inv - c * inv into (w - c) * inv
def _scaled_sums(
    x: np.ndarray, bits: np.ndarray, exp: int, c: float, inv: float
) -> tuple[float, float]:
    """(sum, sumsq) of ``(x - c) * inv`` over the finite values, ``inv`` = 1 / a power of two:
    float64 tensors near the limits of the type, read a second time (rare)."""
    s = 0.0
    ss = 0.0
    ci = c * inv
    for i in range(x.size):
        if (bits[i] & exp) != exp:
            d = np.float64(x[i]) * inv - ci
            s += d
            ss += d * d
    return s, ss


@njit(cache=True, fastmath=True)
def _narrow_block(
    x: np.ndarray, bits: np.ndarray, c: Any, saturation: bool, klo: Any, khi: Any
) -> tuple[Any, Any, Any, Any, Any, Any]:  # fmt: skip
    """(sum, sumsq) about c, (min key, max key), zeros and saturated of a float32 block, in
    32-bit lanes.

    Every integer is forced to int32 (numba widens int32 arithmetic to int64, which halves
    the lanes); the counters are float32, exact up to 2**24. Saturated means
    ``key <= klo or key >= khi`` (the keys of the float32 bounds, see
    :func:`saturation_keys`); LLVM splits the loop on ``saturation``, so the test costs
    nothing where it is off.
    """
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
        if saturation:
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
        a, b, lo, hi, z, q = _narrow_block(
            x[start:stop], bits[start:stop], c32, saturation, klo, khi
        )
        sat += int(q)
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


# -- histograms -----------------------------------------------------------------------------


@njit(cache=True, fastmath=True)
def _hist_counts(
    x: np.ndarray, bits: np.ndarray, stride: int, start: int, stop: int, exp: Any,
    magnitude: Any, mant: int, exp_bits: int, pre: float, lo: float, scale: float, bins: int,
    drop_zeros: bool, base: np.ndarray, thresholds: np.ndarray, zero_index: int,
    lc: np.ndarray, gc: np.ndarray,
) -> None:  # fmt: skip
    """Add the sample positions [start, stop) (``x[p * stride]``) to four copies of the
    linear counts ``lc`` (4 x (bins + 1)) and of the log counts ``gc``: bin indices first,
    in loops that vectorise, then the scatter.

    Linear: finite values (exact zeros too unless ``drop_zeros``), bin ``(v * pre - lo) *
    scale`` with ``lo`` = min * pre and ``scale`` = bins / ((max - min) * pre): ``pre`` is 1/2,
    so that differences stay finite up to float64's limits, or a large power of two for a
    range of float64 subnormals (where bins / range would overflow). Exact either way; ``lo``
    is passed pre-multiplied because fast-math would fold ``v * pre - mn * pre`` back into
    ``(v - mn) * pre``.
    Log: the exponent field of the bits picks the magnitude bin of the octave's lower end
    (``base``) and the few decade edges inside the octave (``thresholds``, padded with Inf)
    settle it exactly: no log10. Magnitude bin 0 is the underflow bin, the last |x| >= the
    top edge (Inf included). NaN is in neither histogram.

    Indices are stored shifted by one, 0 meaning "not counted", so the scatter has no
    branch; it spreads over four copies of the counts, because a sample whose values share
    a bin (most of a layer's values lie in one or two decades) would otherwise make every
    increment wait for the one before.
    """
    n = stop - start
    s = np.empty(n, dtype=x.dtype)
    for i in range(n):  # one strided read; the loops below read the copy three times
        s[i] = x[(start + i) * stride]
    sb = s.view(bits.dtype)
    lin_idx = np.empty(n, dtype=np.int32)
    log_idx = np.empty(n, dtype=np.int32)
    top = base[exp_bits]  # the overflow bin (the Inf field's)
    for i in range(n):  # vectorises: no scatter, one table lookup
        b = sb[i]
        fin = (b & exp) != exp
        v = np.float64(s[i]) if fin else 0.0  # finite: fast-math may assume so
        pos = min(max(int((v * pre - lo) * scale), 0), bins - 1)
        lin_idx[i] = 0 if (not fin) or ((b & magnitude) == 0 and drop_zeros) else pos + 1
        e = (b >> mant) & exp_bits
        j = base[e] + (1 if abs(v) >= thresholds[e, 0] else 0)
        log_idx[i] = j if fin else top  # +-Inf: the overflow bins
    for k in range(1, thresholds.shape[1]):  # finer log bins: more edges in an octave
        for i in range(n):
            b = sb[i]
            fin = (b & exp) != exp
            v = np.float64(s[i]) if fin else 0.0
            e = (b >> mant) & exp_bits
            log_idx[i] += 1 if fin and abs(v) >= thresholds[e, k] else 0
    for i in range(n):  # magnitude bin -> signed bin; zero has its own, NaN none
        b = sb[i]
        m = b & magnitude
        j = log_idx[i]
        signed = zero_index + j + 1 if b >= 0 else zero_index - j - 1
        log_idx[i] = 0 if m > exp else (zero_index if m == 0 else signed) + 1
    wl = bins + 1
    wg = gc.size // 4
    n4 = n - n % 4
    for i in range(0, n4, 4):
        lc[lin_idx[i]] += 1
        lc[wl + lin_idx[i + 1]] += 1
        lc[2 * wl + lin_idx[i + 2]] += 1
        lc[3 * wl + lin_idx[i + 3]] += 1
        gc[log_idx[i]] += 1
        gc[wg + log_idx[i + 1]] += 1
        gc[2 * wg + log_idx[i + 2]] += 1
        gc[3 * wg + log_idx[i + 3]] += 1
    for i in range(n4, n):
        lc[lin_idx[i]] += 1
        gc[log_idx[i]] += 1


@njit(cache=True)
def _fold(counts: np.ndarray, out: np.ndarray) -> None:
    """``out`` = the sum of the copies in ``counts`` (each out.size + 1 long, slot 0 unused)."""
    w = out.size + 1
    out[:] = 0.0
    for c in range(counts.size // w):
        for j in range(out.size):
            out[j] += counts[c * w + j + 1]


# -- torch's OpenMP team ------------------------------------------------------------------------
# A task is an int64 array (slots below) plus a float64 array (c, saturation lo/hi, linear
# histogram lo/scale), read by the worker of the tensor's dtype on every thread of the team.

TEAM_MAX = 256  # result slots: more threads than any torch team here
(THREAD_NUM, NUM_THREADS, X, N, JOB, FLOATS, SUMS, INTS, CKEY, KLO, KHI, NARROW, SATURATION,
 SAMPLE, STRIDE, BINS, DROP_ZEROS, BASE, FIELDS, THRESHOLDS, EDGES_PER_FIELD, ZERO_INDEX,
 LOG_SIZE, LIN_COUNTS, LOG_COUNTS) = range(25)  # fmt: skip
TASK_SLOTS = 25
MOMENTS, HISTOGRAMS = 0, 1  # the task's JOB


@njit(cache=True)
def _team_share(
    task: np.ndarray, x: np.ndarray, bits: np.ndarray, exp: Any, magnitude: Any, shift: Any,
    mant: int, exp_bits: int, top: Any, bottom: Any, ckey: Any, klo: Any, khi: Any,
) -> None:  # fmt: skip
    """This thread's share of a task (a worker's body; see :func:`_run_on_team`)."""
    t = call_int(task[THREAD_NUM])
    size = call_int(task[NUM_THREADS])
    floats = carray(float64_at(task[FLOATS]), 6)
    if task[JOB] == MOMENTS:
        n = x.size
        start = n * t // size
        stop = n * (t + 1) // size
        s, ss, mnk, mxk, nonzero, nan, inf, sat = _chunk(
            x[start:stop], bits[start:stop], exp, magnitude, shift, floats[0], ckey, floats[1],
            floats[2], top, bottom, task[NARROW] != 0, task[SATURATION] != 0, klo, khi,
        )  # fmt: skip
        sums = carray(float64_at(task[SUMS]), 2 * TEAM_MAX)
        ints = carray(int64_at(task[INTS]), 6 * TEAM_MAX)
        sums[2 * t] = s
        sums[2 * t + 1] = ss
        for j, v in enumerate((mnk, mxk, nonzero, nan, inf, sat)):
            ints[6 * t + j] = v
        return
    m = task[SAMPLE]
    wl = 4 * (task[BINS] + 1)  # one thread's linear counts: four copies of bins + 1
    wg = 4 * (task[LOG_SIZE] + 1)
    fields = task[FIELDS]
    _hist_counts(
        x, bits, task[STRIDE], m * t // size, m * (t + 1) // size, exp, magnitude, mant,
        exp_bits, floats[5], floats[3], floats[4], task[BINS], task[DROP_ZEROS] != 0,
        carray(int32_at(task[BASE]), fields),
        carray(float64_at(task[THRESHOLDS]), (fields, task[EDGES_PER_FIELD])),
        task[ZERO_INDEX], carray(int32_at(task[LIN_COUNTS] + 4 * wl * t), wl),
        carray(int32_at(task[LOG_COUNTS] + 4 * wg * t), wg),
    )  # fmt: skip


def _worker32(data: Any) -> None:
    """The body run on each thread for float32 (compiled by :func:`_worker`)."""
    task = carray(data, TASK_SLOTS, np.int64)
    x = carray(float32_at(task[X]), task[N])
    _team_share(
        task, x, x.view(np.int32), F32_EXP, np.int32(0x7FFFFFFF), np.int32(31), 23, 0xFF,
        np.int32(0x7FFFFFFF), np.int32(-0x80000000), np.int32(task[CKEY]), np.int32(task[KLO]),
        np.int32(task[KHI]),
    )  # fmt: skip


def _worker64(data: Any) -> None:
    """The same for float64."""
    task = carray(data, TASK_SLOTS, np.int64)
    x = carray(float64_at(task[X]), task[N])
    _team_share(
        task, x, x.view(np.int64), F64_EXP, np.int64(0x7FFFFFFFFFFFFFFF), np.int64(63), 52,
        0x7FF, np.int64(0x7FFFFFFFFFFFFFFF), np.int64(-0x8000000000000000), task[CKEY],
        task[KLO], task[KHI],
    )  # fmt: skip


@cache
def _worker(dtype_char: str) -> Any:
    """The worker of a dtype as a C callback, compiled on first use (not at import)."""
    body = _worker32 if dtype_char == "f" else _worker64
    return cfunc(types.void(types.voidptr), cache=True)(body)


@njit(cache=True)
def _run_on_team(team: np.ndarray, task: np.ndarray, floats: np.ndarray) -> None:
    """Every thread of torch's team runs its share of ``task`` (``team``: see
    :func:`_team_of` and :mod:`flowscope.record._team`)."""
    task[THREAD_NUM] = team[2]
    task[NUM_THREADS] = team[3]
    task[FLOATS] = floats.ctypes.data
    run_team(team[0], team[1], task.ctypes.data, min(team[4], TEAM_MAX))


@njit(cache=True)
def _moments_on_team(
    x: np.ndarray, team: np.ndarray, c: float, ckey: Any, lo: float, hi: float,
    narrow: bool, saturation: bool, klo: Any, khi: Any, top: Any, bottom: Any,
) -> tuple[float, float, Any, Any, int, int, int, int]:  # fmt: skip
    """The moments pass split over the team, every thread :func:`_chunk` on its share; the
    slots a smaller team leaves unused stay neutral."""
    sums = np.zeros(2 * TEAM_MAX)
    ints = np.zeros(6 * TEAM_MAX, dtype=np.int64)
    ints[0::6] = top
    ints[1::6] = bottom
    task = np.zeros(TASK_SLOTS, dtype=np.int64)
    task[X] = x.ctypes.data
    task[N] = x.size
    task[JOB] = MOMENTS
    task[SUMS] = sums.ctypes.data
    task[INTS] = ints.ctypes.data
    task[CKEY] = ckey
    task[KLO] = klo
    task[KHI] = khi
    task[NARROW] = narrow
    task[SATURATION] = saturation
    _run_on_team(team, task, np.array([c, lo, hi, 0.0, 0.0, 0.0]))
    return (
        sums[0::2].sum(), sums[1::2].sum(), ints[0::6].min(), ints[1::6].max(),
        ints[2::6].sum(), ints[3::6].sum(), ints[4::6].sum(), ints[5::6].sum(),
    )  # fmt: skip


@njit(cache=True)
def _histograms(
    x: np.ndarray, bits: np.ndarray, stride: int, exp: Any, magnitude: Any, mant: int,
    exp_bits: int, pre: float, lo: float, scale: float, bins: int, drop_zeros: bool,
    base: np.ndarray, thresholds: np.ndarray, zero_index: int, team: np.ndarray,
    lin: np.ndarray, log: np.ndarray,
) -> None:  # fmt: skip
    """Both histograms of the sample ``x[::stride]`` into ``lin`` and ``log``: on the team
    when the sample is long enough to pay for it, each thread into its own counts."""
    m = (x.size + stride - 1) // stride
    threads = team[4] if m >= team[6] else 1
    lc = np.zeros(threads * 4 * (bins + 1), dtype=np.int32)
    gc = np.zeros(threads * 4 * (log.size + 1), dtype=np.int32)
    if threads > 1:
        task = np.zeros(TASK_SLOTS, dtype=np.int64)
        task[X] = x.ctypes.data
        task[N] = x.size
        task[JOB] = HISTOGRAMS
        task[SAMPLE] = m
        task[STRIDE] = stride
        task[BINS] = bins
        task[DROP_ZEROS] = drop_zeros
        task[BASE] = base.ctypes.data
        task[FIELDS] = base.size
        task[THRESHOLDS] = thresholds.ctypes.data
        task[EDGES_PER_FIELD] = thresholds.shape[1]
        task[ZERO_INDEX] = zero_index
        task[LOG_SIZE] = log.size
        task[LIN_COUNTS] = lc.ctypes.data
        task[LOG_COUNTS] = gc.ctypes.data
        _run_on_team(team, task, np.array([0.0, 0.0, 0.0, lo, scale, pre]))
    else:
        _hist_counts(
            x, bits, stride, 0, m, exp, magnitude, mant, exp_bits, pre, lo, scale, bins,
            drop_zeros, base, thresholds, zero_index, lc, gc,
        )  # fmt: skip
    _fold(lc, lin)
    _fold(gc, log)


@njit(cache=True)
def _snapshot(
    x: np.ndarray, bits: np.ndarray, stride: int, bins: int, drop_zeros: bool, row: np.ndarray,
    exp: int, magnitude: int, mant: int, exp_bits: int, shift: int, top: int, bottom: int,
    lo: float, hi: float, saturation: bool, klo: Any, khi: Any, base: np.ndarray,
    thresholds: np.ndarray, zero_index: int, team: np.ndarray,
) -> None:  # fmt: skip
    """One snapshot of ``x`` into ``row`` (raw fields | linear counts | log counts)."""
    n = x.size
    c = _shift(x, bits, exp)
    tmp = np.empty(1, dtype=x.dtype)
    tmp[0] = c
    ckey_bits = tmp.view(bits.dtype)[0]
    ckey = ckey_bits ^ ((ckey_bits >> shift) & magnitude)
    narrow = x.itemsize == 4  # float32
    if n >= team[5] and team[4] > 1:
        s, ss, mnk, mxk, nonzero, nan, inf, sat = _moments_on_team(
            x, team, c, ckey, lo, hi, narrow, saturation, klo, khi, top, bottom
        )
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
    mn = np.float64(extremes[0]) if finite else np.nan
    mx = np.float64(extremes[1]) if finite else np.nan
    scale = 1.0
    big = max(abs(mn), abs(mx)) if finite else 0.0
    if x.itemsize == 8 and (big > 2.0**480 or 0.0 < big < 2.0**-480):
        # float64 near its limits: x - c or its square would overflow (or squares vanish);
        # read again with the sums taken of (x - c) / 2**e, e the exponent of the abs-max
        e = min(max(math.frexp(big)[1], -1000), 1023)
        scale = math.ldexp(1.0, e)
        s, ss = _scaled_sums(x, bits, exp, c, math.ldexp(1.0, -e))
    if c <= lo or c >= hi:  # every non-finite entry was counted as the stand-in c
        sat -= nan + inf
    row[0] = n
    row[1] = nan + inf
    row[2] = nan
    row[3] = c
    row[4] = scale
    row[5] = s
    row[6] = ss
    row[7] = mn
    row[8] = mx
    row[9] = nonzero
    row[10] = sat if saturation else np.nan
    row[11] = stride
    pre = 0.5 if not (0.0 < mx - mn < 1e-290) else 2.0**600  # see _hist_counts
    hlo = mn * pre
    width = mx * pre - hlo
    hscale = bins / width if width > 0 else 0.0
    _histograms(
        x, bits, stride, exp, magnitude, mant, exp_bits, pre, hlo, hscale, bins, drop_zeros, base,
        thresholds, zero_index, team, row[N_RAW : N_RAW + bins], row[N_RAW + bins :],
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
    # the team's workers see the data as one contiguous run of ``x.size`` elements: a strided
    # view (x[:, 0], a stride-0 expand) is read on the calling thread, through its strides
    threads = team_size() if x.flags.c_contiguous else 1
    ints, *settings = _settings(
        x.dtype.char, saturation, log_edges, threads, PARALLEL_FROM, HIST_TEAM_FROM
    )
    _snapshot(x, x.view(ints), stride, bins, drop_zeros, row, *settings)


@lru_cache(maxsize=256)  # one entry per dtype x saturation x ...: a handful
def _settings(
    dtype_char: str,
    saturation: tuple[float, float] | None,
    e: LogEdges,
    threads: int,
    moments_from: int,
    hist_from: int,
) -> tuple[Any, ...]:
    """The bits' int type, then every argument of :func:`_snapshot` after ``row``: the same
    for every snapshot of a layer, so computed once (a snapshot's Python is microseconds)."""
    ints, exp, mant, exp_bits, _ = _layout(np.dtype(dtype_char))
    shift, top, bottom = _int_constants(dtype_char)
    lo, hi = saturation if saturation is not None else (-math.inf, math.inf)
    klo, khi = saturation_keys(lo, hi)
    base, thresholds = log_tables(dtype_char, e.lo, e.hi, e.per_decade)
    team = _team_of(dtype_char, threads, moments_from, hist_from)
    return (
        ints, exp, top, mant, exp_bits, shift, top, bottom, lo, hi, saturation is not None,
        klo, khi, base, thresholds, e.zero_index, team,
    )  # fmt: skip


@cache
def _team_of(dtype_char: str, threads: int, moments_from: int, hist_from: int) -> np.ndarray:
    """The team as the kernels take it: GOMP_parallel, the dtype's worker, omp_get_thread_num,
    omp_get_num_threads, threads (1: no team), and from which tensor size (moments) and
    sample size (histograms) to use it."""
    found = torch_team()
    if found is None or threads < 2:
        return np.array([0, 0, 0, 0, 1, moments_from, hist_from], dtype=np.int64)
    gomp, thread_num, num_threads = found
    worker = _worker(dtype_char).address
    team = [gomp, worker, thread_num, num_threads, threads, moments_from, hist_from]
    return np.array(team, dtype=np.int64)


def _layout(dtype: np.dtype) -> tuple[Any, Any, int, int, int]:
    """IEEE layout of float32 / float64: the same-width int type, the exponent mask (typed),
    mantissa bits, exponent field mask and bias."""
    if dtype == np.float32:
        return np.int32, F32_EXP, 23, 0xFF, 127
    return np.int64, F64_EXP, 52, 0x7FF, 1023


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

    The bounds go outward to float32 values first (:func:`flowscope.record.snapshot.outward`);
    a bound that lands on a zero takes the key of the zero that keeps both zeros on its side.
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
