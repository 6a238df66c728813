"""Snapshots with torch ops, batched: a few kernels per recorded step, not per layer.

The path for GPU tensors (and CPU tensors with ``FLOWSCOPE_KERNELS=eager``). A snapshot taken
in a hook only copies the tensor into a staging buffer on its device (one ``copy_``, any
layout or float dtype); :meth:`Batch.finish` then reduces every staged tensor at once with a
fixed number of torch ops, so the kernels launched per recorded step do not grow with the
number of layers. Nothing waits on the device: the rows handed out at :meth:`Batch.add` are
views of one result tensor that ``finish`` fills in stream order.

Layout: each tensor takes whole chunks of ``CHUNK`` values in the buffer, its tail padded
with NaN; the buffer is viewed as (chunks, CHUNK). Per chunk: the non-finite, NaN, nonzero and
saturated counts, the finite extremes, and the sums of (x - c_k) / s and of their squares
about the chunk's largest finite value c_k (s a power of two at least the tensor's abs-max,
so nothing overflows). Chunks are merged per tensor in float64 about a finite value of the
tensor, and both histograms of every tensor's strided sample are counted with one
``scatter_add`` each. The statistics are the C kernel's
(:func:`flowscope.record.snapshot.snapshot_row`) to float rounding. Every pass over the
buffer writes into scratch kept with it: on the CPU a fresh temporary of the buffer's size
per op cost more than the op itself (new pages, zeroed by the kernel).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from flowscope.record.fields import (
    RAW,
    RAW_FIELDS,
    HistSpec,
    log_edges_on,
    outward,
    row_width,
    sample_stride,
)

__all__ = ["CHUNK", "Batch"]

CHUNK = 1024  # values per chunk: float32 sums of 1024 values are pairwise in torch
N_RAW = len(RAW_FIELDS)


@dataclass
class _Staged:
    """One staged tensor: where it sits and how its snapshot is taken."""

    numel: int
    offset: int  # first chunk
    chunks: int
    stride: int  # histogram sample stride
    lo: float  # saturation interval, outward to the tensor's dtype (-inf, inf: none)
    hi: float
    saturation: bool
    drop_zeros: bool


@dataclass
class _Layout:
    """What :meth:`Batch.finish` needs about the staged tensors, on the device (built once
    per distinct layout: a training loop stages the same tensors every step)."""

    seg: torch.Tensor  # (chunks,) the tensor of each chunk
    seg4: torch.Tensor  # (4, chunks) the same, for a 4-row reduction
    down: torch.Tensor  # (1, chunks) -chunk index: the first chunk holding a value, by amax
    width_row: torch.Tensor  # (1, chunks) float64: the chunk's width
    pad_row: torch.Tensor  # (1, chunks) float64: NaN padding values in the chunk
    no_peaks: torch.Tensor  # (4, tensors) float64 -inf: the start of the max-reduction
    start: torch.Tensor  # (fields, tensors) float64: the start of the sums (0, and the
    # histogram sample stride in its row)
    mask: torch.Tensor  # (fields, tensors): 1, NaN for the saturated count of a tensor
    # without a saturation interval
    additive: torch.Tensor  # ADDITIVE and NOT_ADDITIVE on the device
    not_additive: torch.Tensor
    saturating: bool  # some tensor has a saturation interval (else none is counted)
    lo: torch.Tensor  # (chunks, 1) saturation bounds in the buffer's dtype
    hi: torch.Tensor
    sample: torch.Tensor  # flat buffer positions of every tensor's histogram sample
    sample_seg: torch.Tensor  # the tensor of each sampled value
    lin_base: torch.Tensor  # float64 sample_seg * bins: where a sampled value's bins start
    log_base: torch.Tensor  # sample_seg * log size + the zero bin
    drop: torch.Tensor  # per sampled value: its tensor leaves zeros out of the linear bins
    dropping: bool  # some tensor does
    ones: torch.Tensor  # float64 ones, one per sampled value: what the histograms add


@dataclass
class Batch:
    """Tensors of one device and compute dtype staged together, reduced by :meth:`finish`.

    Example:
        >>> b = Batch(torch.device("cpu"), torch.float32, HistSpec(bins=4), capacity=4096)
        >>> row = b.add(torch.tensor([1.0, 2.0, float("nan")]), None, False)
        >>> b.finish()
        >>> row[:3].tolist()  # numel, non-finite, NaN
        [3.0, 1.0, 1.0]
    """

    device: torch.device
    dtype: torch.dtype  # float32 (every float dtype up to 32 bits) or float64
    spec: HistSpec
    capacity: int = 1 << 22  # values in the staging buffer
    max_rows: int = 512
    chunk: int = 0  # values per chunk; 0: CHUNK (read when the batch is made)
    _buffer: torch.Tensor | None = None
    _flat: torch.Tensor | None = None
    _work: torch.Tensor | None = None  # scratch of the buffer's shape and dtype
    _work2: torch.Tensor | None = None  # the same, a second
    _staged: list[_Staged] = field(default_factory=list)
    _used: int = 0  # chunks
    _rows: torch.Tensor | None = None
    _layouts: dict[tuple, _Layout] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.chunk = self.chunk or CHUNK
        self.capacity = -(-self.capacity // self.chunk) * self.chunk  # whole chunks

    def add(
        self, x: torch.Tensor, saturation: tuple[float, float] | None, drop_zeros: bool
    ) -> torch.Tensor:
        """Stage ``x`` (numel > 0) and return its row, filled by the next :meth:`finish`."""
        n = x.numel()
        k = self.chunk
        chunks = -(-n // k)
        with self._lock:
            if self._used + chunks > self.capacity // k or len(self._staged) == self.max_rows:
                self._finish()
            if chunks > self.capacity // k:  # larger than the buffer: a batch of its own
                big = Batch(self.device, self.dtype, self.spec, chunks * k, 1, k)
                row = big.add(x, saturation, drop_zeros)
                big.finish()
                return row
            flat = self._ready()
            start = self._used * k
            with torch.no_grad():
                flat[start : start + n].view(x.shape).copy_(x)  # any layout or float dtype
            lo, hi = outward(*saturation, x.dtype) if saturation else (-math.inf, math.inf)
            stride = sample_stride(n, self.spec.sample)
            self._staged.append(
                _Staged(n, self._used, chunks, stride, lo, hi, saturation is not None, drop_zeros)
            )
            self._used += chunks
            assert self._rows is not None
            return self._rows[len(self._staged) - 1]

    def _ready(self) -> torch.Tensor:
        """The staging buffer, flat (NaN outside the staged values); this batch's rows."""
        if self._buffer is None:
            rows = self.capacity // self.chunk
            shape = (rows, self.chunk)
            self._buffer = torch.full(shape, math.nan, dtype=self.dtype, device=self.device)
            self._flat = self._buffer.view(-1)
            # the reduction writes into these (out=): a fresh temporary of the buffer's size
            # per op cost more than the op itself on the CPU (new pages, zeroed by the kernel)
            self._work = torch.empty_like(self._buffer)
            self._work2 = torch.empty_like(self._buffer)
        if self._rows is None:
            width = row_width(self.spec)
            self._rows = torch.empty(self.max_rows, width, dtype=torch.float64, device=self.device)
        assert self._flat is not None
        return self._flat

    def finish(self) -> None:
        """Reduce every staged tensor into its row; the buffer is free again."""
        with self._lock:
            self._finish()

    def _finish(self) -> None:
        if not self._staged:
            return
        staged, used, rows = self._staged, self._used, self._rows
        assert self._buffer is not None and rows is not None
        assert self._work is not None and self._work2 is not None
        view = self._buffer[:used]
        with torch.no_grad():
            scratch = (self._work[:used], self._work2[:used])
            out = _reduce(view, len(staged), self._layout(staged), self.spec, scratch)
            rows[: len(staged)].copy_(out)
            view.fill_(math.nan)  # padding for the next batch's tails
        self._staged, self._used, self._rows = [], 0, None  # rows handed out stay valid

    def _layout(self, staged: Sequence[_Staged]) -> _Layout:
        """The device tensors describing ``staged``; a training loop stages the same
        tensors every step, so they are built once per distinct layout."""
        key = tuple((s.numel, s.lo, s.hi, s.saturation, s.drop_zeros) for s in staged)
        found = self._layouts.get(key)
        if found is None:
            found = _make_layout(staged, self.device, self.dtype, self.spec, self.chunk)
            if len(self._layouts) > 64:  # layouts that keep changing: keep memory bounded
                self._layouts.clear()
            self._layouts[key] = found
        return found


def _make_layout(
    staged: Sequence[_Staged], device: torch.device, dtype: torch.dtype, spec: HistSpec,
    width: int,
) -> _Layout:  # fmt: skip
    seg, pad, lo, hi, sample, sample_seg = [], [], [], [], [], []
    for i, s in enumerate(staged):
        seg.append(np.full(s.chunks, i))
        p = np.zeros(s.chunks)
        p[-1] = s.chunks * width - s.numel
        pad.append(p)
        lo.append(np.full(s.chunks, s.lo))
        hi.append(np.full(s.chunks, s.hi))
        positions = np.arange(0, s.numel, s.stride)
        sample.append(s.offset * width + positions)
        sample_seg.append(np.full(positions.size, i))
    seg_a, sample_seg_a = np.concatenate(seg), np.concatenate(sample_seg)
    drop = np.array([s.drop_zeros for s in staged])
    start = np.zeros((len(RAW_FIELDS), len(staged)))
    start[RAW["stride"]] = [s.stride for s in staged]
    mask = np.ones((len(RAW_FIELDS), len(staged)))
    mask[RAW["saturated"]] = [1.0 if s.saturation else math.nan for s in staged]
    pads = np.concatenate(pad)

    def put(a: np.ndarray, kind: torch.dtype) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(a)).to(kind)
        if device.type == "cpu":
            return host
        return host.pin_memory().to(device, non_blocking=True)  # no wait for the device

    return _Layout(
        seg=put(seg_a, torch.int64),
        seg4=put(np.repeat(seg_a[None], 4, 0), torch.int64),
        down=put(-np.arange(seg_a.size, dtype=np.float64)[None], torch.float64),
        width_row=put(np.full((1, pads.size), float(width)), torch.float64),
        pad_row=put(pads[None], torch.float64),
        no_peaks=put(np.full((4, len(staged)), -np.inf), torch.float64),
        start=put(start, torch.float64),
        mask=put(mask, torch.float64),
        additive=put(ADDITIVE.numpy(), torch.float64),
        not_additive=put(NOT_ADDITIVE.numpy(), torch.int64),
        saturating=any(s.saturation for s in staged),
        lo=put(np.concatenate(lo)[:, None], dtype),
        hi=put(np.concatenate(hi)[:, None], dtype),
        sample=put(np.concatenate(sample), torch.int64),
        sample_seg=put(sample_seg_a, torch.int64),
        lin_base=put(sample_seg_a * spec.bins, torch.float64),
        log_base=put(sample_seg_a * spec.log.size + spec.log.zero_index, torch.int64),
        drop=put(drop[sample_seg_a], torch.bool),
        dropping=bool(drop.any()),
        ones=put(np.ones(sample_seg_a.size), torch.float64),
    )


def _reduce(
    v: torch.Tensor, tensors: int, lay: _Layout, spec: HistSpec,
    scratch: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:  # fmt: skip
    """The rows of ``tensors`` staged tensors from the (chunks, chunk width) buffer ``v``;
    ``scratch``: two tensors of ``v``'s shape and dtype.

    Sums of (x - c) / s about c, a finite value of the tensor (a constant tensor has exactly
    zero spread), s a power of two at least its abs-max, so no value, difference or square
    leaves the dtype's range. Per chunk, the sums are taken about the chunk's largest finite
    value c_k (non-finite entries replaced by it add 0), then moved to c, the c_k of the
    tensor's first chunk holding a finite value, in float64: sum += n_k d,
    sumsq += 2 d sum_k + n_k d^2, d = (c_k - c) / s. (The C kernel takes the sums about the
    tensor's first finite value: the rows' shift and sums differ, the moments agree.)
    Written for few kernels (each op is a launch on a GPU): one op per pass over the buffer,
    per-chunk numbers as rows of one matrix, one reduction per kind of merge. Every pass
    writes into ``scratch``: no temporary of the buffer's size is allocated. No pass writes
    bool or needs an argmax: on the CPU either is ~5x slower than a pass in the buffer's
    dtype (4M values: a compare 1.3 ms into bool, 0.25 ms into float32).
    """
    f64 = torch.float64
    w, work = scratch
    # counts per chunk as 0/1 in the buffer's dtype, summed (exact), the padding included:
    # outside the saturation interval (Inf compares outside; an interval given upside down,
    # lo >= hi, can hold a value on both sides), non-finite, NaN, nonzero (NaN and Inf are)
    outside = []
    if lay.saturating:
        torch.le(v, lay.lo, out=w)
        outside.append(torch.maximum(w, torch.ge(v, lay.hi, out=work), out=w).sum(1))
    # the finite extremes per chunk: non-finite values (and the NaN padding) as +inf, -inf
    mn = torch.nan_to_num(v, math.inf, math.inf, math.inf, out=w).amin(1)
    mx = torch.nan_to_num(v, -math.inf, -math.inf, -math.inf, out=work).amax(1)
    rows = [torch.eq(work, -math.inf, out=work).sum(1)]  # only non-finite values are -inf
    rows += [torch.ne(v, v, out=work).sum(1), torch.ne(v, 0, out=work).sum(1), *outside]
    ck = mx.nan_to_num(0.0, 0.0, 0.0)  # c_k: the largest finite value, 0 when none
    # non-finite (+inf in w) -> c_k: in range, adds 0 about c_k; finite values are <= c_k
    w = torch.minimum(w, ck[:, None], out=w)
    per_chunk = torch.stack([*rows, -mn, mx, ck]).to(f64)  # one conversion
    counts, ends = per_chunk[: len(rows)], per_chunk[len(rows) :]  # (4 or 3, chunks), (3, chunks)
    n = lay.width_row[0] - counts[0]  # finite values
    # per tensor, one max-reduction: -min, max, abs-max, -(first chunk holding a value)
    peaks = torch.cat([ends[:2], ends[:2].amax(0, keepdim=True), lay.down])
    peaks = peaks.where(n > 0, -math.inf)
    top = lay.no_peaks.clone().scatter_reduce_(1, lay.seg4, peaks, "amax")  # (4, tensors)
    some = top[3] > -math.inf
    limit = math.frexp(torch.finfo(v.dtype).max)[1]
    e = torch.frexp(top[2].clamp(min=0)).exponent.clamp_(-(limit - 8), limit - 1)
    scale = torch.exp2(e.to(f64))  # s: a power of two >= the abs-max
    # c: the first holding chunk's c_k; 0 for a tensor with no finite value (chunk 0's c_k
    # belongs to another tensor, and moving its chunks' sums there could overflow)
    c = ends[2][(-top[3]).nan_to_num_(0.0, 0.0, 0.0).long()] * some
    inv = scale.reciprocal().index_select(0, lay.seg)
    inv_v = inv.to(v.dtype)[:, None]
    d = w.mul_(inv_v).sub_(ck[:, None] * inv_v)  # (x - c_k) / s, |d| <= 2: no overflow
    # sums of a chunk in the buffer's dtype (torch sums pairwise: 1024 values lose ~1e-7),
    # then float64: a sum with dtype=float64 would convert the whole buffer first
    sk = d.sum(1).to(f64)
    qk = d.square_().sum(1).to(f64)
    delta = ends[2] * inv - c.index_select(0, lay.seg) * inv  # (c_k - c) / s: no overflow
    sums = torch.stack([sk + n * delta, qk + (2 * delta) * sk + n * delta.square()])
    # the additive raw fields of every chunk are one linear map of its counts and sums
    # (ADDITIVE); summed per tensor by one index_add
    # with no saturation interval in the batch, the count outside it is any row: `mask`
    # makes every tensor's saturated count NaN
    no_interval = [] if lay.saturating else [lay.pad_row]
    base = torch.cat([lay.width_row, counts, *no_interval, sums, lay.pad_row])  # (8, chunks)
    raw = lay.start.clone().index_add_(1, lay.seg, lay.additive @ base)  # (12, tensors)
    # top[3] is -0 or -inf: `undefined` is 0, or NaN for the extremes when nothing is finite
    undefined = top[3] * 0
    rest = torch.stack([c, scale, undefined - top[0], undefined + top[1]])
    raw.index_copy_(0, lay.not_additive, rest)
    raw = (raw * lay.mask).T  # saturated: NaN where no interval
    lo, hi = raw[:, 7], raw[:, 8]
    lin, log = _histograms(v.view(-1), lay, lo, hi, tensors, spec)
    return torch.cat([raw, lin, log], 1)


def _additive() -> torch.Tensor:
    """RAW_FIELDS (rows) from a chunk's [width, non-finite, NaN, nonzero, outside, sum,
    sumsq, padding] (columns); the NaN padding is taken out, Inf = non-finite - NaN is taken
    out of the values outside the saturation interval (Inf compares outside)."""
    m = torch.zeros(len(RAW_FIELDS), 8, dtype=torch.float64)
    m[RAW["numel"], [0, 7]] = torch.tensor([1.0, -1.0], dtype=torch.float64)
    m[RAW["nonfinite"], [1, 7]] = torch.tensor([1.0, -1.0], dtype=torch.float64)
    m[RAW["nan"], [2, 7]] = torch.tensor([1.0, -1.0], dtype=torch.float64)
    m[RAW["sum"], 5] = m[RAW["sumsq"], 6] = 1.0
    m[RAW["nonzero"], [3, 7]] = torch.tensor([1.0, -1.0], dtype=torch.float64)
    m[RAW["saturated"], [1, 2, 4]] = torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    return m


ADDITIVE = _additive()
NOT_ADDITIVE = torch.tensor([RAW[f] for f in ("shift", "scale", "min", "max")])


def _histograms(
    flat: torch.Tensor, lay: _Layout, lo: torch.Tensor, hi: torch.Tensor, tensors: int,
    spec: HistSpec,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Linear and log counts of every tensor's sample: one gather, one scatter each. A value
    a histogram leaves out is added to a slot past its end, cut off before returning.

    The linear bin as the C kernel's: (x * pre - lo * pre) * bins / width, pre = 1/2 (so the
    width hi * pre - lo * pre stays finite at float64's limits), 2^600 for a range too
    narrow to divide (< 1e-290); one value (width 0): bin 0.
    """
    s = flat[lay.sample].to(torch.float64)
    bins, edges = spec.bins, spec.log
    seg = lay.sample_seg
    pre: torch.Tensor | float = 0.5
    if flat.dtype == torch.float64:  # float32 ranges are never that narrow
        span = hi - lo
        pre = torch.full_like(lo, 0.5).masked_fill_((span > 0) & (span < 1e-290), 2.0**600)
    low = lo * pre
    # bins / width rounded once, as the C kernel's (a Python number over a tensor is taken
    # as bins * (1 / width): two roundings put values on a bin edge one bin low)
    scale = torch.full_like(lo, float(bins)).div_(hi * pre - low).nan_to_num_(0.0, 0.0, 0.0)
    shifted = s * (pre[seg] if isinstance(pre, torch.Tensor) else pre)  # exact: a power of 2
    pos = shifted.sub_(low[seg]).mul_(scale[seg])  # finite for finite values
    pos.add_(s - s)  # NaN for NaN and Inf
    if lay.dropping:
        pos.masked_fill_(lay.drop & (s == 0), math.nan)
    dummy = float(tensors * bins)  # the slot of the values left out (NaN here)
    # the bin (truncated) before its tensor's base is added: 64 + 31.999999999999996 rounds up
    pos.clamp_(0, bins - 1).trunc_().add_(lay.lin_base).nan_to_num_(dummy, dummy, dummy)
    lin = torch.zeros(tensors * bins + 1, dtype=torch.float64, device=flat.device)
    lin.scatter_add_(0, pos.long(), lay.ones)
    j = torch.bucketize(s.abs(), log_edges_on(edges, flat.device), right=True)
    slot = lay.log_base + torch.sign(s).long() * j.add_(1)  # NaN: sign 0, masked below
    log = torch.zeros(tensors * edges.size + 1, dtype=torch.float64, device=flat.device)
    log.scatter_add_(0, slot.masked_fill_(s != s, tensors * edges.size), lay.ones)  # NaN: left out
    return lin[:-1].view(tensors, bins), log[:-1].view(tensors, edges.size)
