"""Snapshot statistics and histograms against plain numpy on the same values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowscope.record.frames import moments
from flowscope.record.snapshot import RAW, HistSpec, LogEdges, backend_for, sample_stride, snapshot


@pytest.fixture(params=["eager", "c"], autouse=True)
def backend(request, monkeypatch):
    """Every test here runs on both backends: torch ops and the fused CPU kernels."""
    monkeypatch.setenv("FLOWSCOPE_KERNELS", request.param)
    return request.param


def test_backend_selection(backend):
    assert backend_for(torch.zeros(3)) == backend
    if backend == "c":  # forced, it refuses what it cannot run instead of falling back
        with pytest.raises(ValueError, match="needs a compiler and a CPU tensor"):
            backend_for(torch.zeros(3, dtype=torch.int64))
    else:
        assert backend_for(torch.zeros(3, dtype=torch.int64)) == "eager"
    with pytest.raises(ValueError, match="FLOWSCOPE_KERNELS must be one of"):
        backend_for(torch.zeros(3), "fast")


def reference(values: np.ndarray, saturation: tuple[float, float] | None = None) -> dict:
    """Statistics over the finite values, computed in float64 with numpy."""
    v = values.astype(np.float64).ravel()
    fin = v[np.isfinite(v)]
    out = {
        "count": v.size,
        "nan": int(np.isnan(v).sum()),
        "inf": int(np.isinf(v).sum()),
        "mean": fin.mean(),
        "std": fin.std(),
        "rms": math.sqrt((fin**2).mean()),
        "min": fin.min(),
        "max": fin.max(),
        "absmax": np.abs(fin).max(),
        "frac_zero": (fin == 0).mean(),
    }
    if saturation is not None:
        lo, hi = saturation
        out["frac_saturated"] = ((fin <= lo) | (fin >= hi)).mean()
    return out


def measured(x: torch.Tensor, **kwargs) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    raw, lin, log = snapshot(x, HistSpec(**kwargs.pop("spec", {})), **kwargs)
    row = moments(raw.numpy()[None]).iloc[0].to_dict()
    return row, raw.numpy(), lin.numpy(), log.numpy()


def check(row: dict, ref: dict, rtol: float = 1e-5) -> None:
    """Relative agreement; a near-zero mean is judged against the tensor's scale (rms)."""
    scale = abs(ref.get("rms", 0.0)) or 1.0
    for name, want in ref.items():
        assert row[name] == pytest.approx(want, rel=rtol, abs=rtol * scale), name


@pytest.mark.parametrize("shape", [(1000, 500), (7,), (3, 5, 11), (1,)])
def test_moments_match_numpy(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3 + 0.5
    row, *_ = measured(x)
    check(row, reference(x.numpy()))


def test_variance_stays_exact_when_mean_dominates():
    # sigmoid-like outputs: mean 0.5, std 1e-3; a naive E[x^2] - E[x]^2 in fp32 loses this
    x = 0.5 + 1e-3 * torch.randn(200_000, generator=torch.Generator().manual_seed(2))
    row, *_ = measured(x)
    assert row["std"] == pytest.approx(x.double().std(unbiased=False).item(), rel=1e-4)


def test_huge_finite_values_do_not_overflow_the_moments():
    # exploding gradients reach 1e17..1e20: their squares overflow float32 if summed naively
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(9)) * 1e19
    row, *_ = measured(x)
    assert row["inf"] == 0 and np.isfinite(row["rms"])
    check(row, reference(x.numpy()))


def test_nan_and_inf_are_counted_and_left_out():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(3))
    x[0] = float("nan")  # the first element: the shift must come from a finite one
    x[5] = float("inf")
    x[17] = -float("inf")
    x[123] = float("nan")
    row, _, lin, log = measured(x)
    check(row, reference(x.numpy()))
    assert (row["nan"], row["inf"]) == (2, 2)
    assert lin.sum() == 10_000 - 4  # the linear histogram counts the finite values only
    assert log.sum() == 10_000 - 2  # the log histogram keeps +-Inf in its overflow bins
    assert log[0] == 1 and log[-1] == 1


def test_leading_non_finite_values_do_not_leak_into_the_extremes():
    # all-positive values after 100 NaN/Inf: min must stay 0.2, not a substituted 0
    x = torch.linspace(0.2, 0.8, 1000)
    x[:100] = float("nan")
    x[50] = float("inf")
    row, *_ = measured(x)
    check(row, reference(x.numpy()))
    assert row["min"] == pytest.approx(float(x[100]))


@pytest.mark.parametrize("threshold", [None, 1000])
def test_large_tensors_take_the_parallel_path_exactly(monkeypatch, threshold):
    # None: the real threshold (millions of elements); 1000: the same path on a small tensor,
    # with chunks that hold NaN/Inf next to finite-only chunks
    from flowscope.record import ckernel as _cpu_kernels

    if threshold is not None:
        monkeypatch.setattr(_cpu_kernels, "MOMENTS_FROM", threshold)
    n = _cpu_kernels.MOMENTS_FROM + 12_345  # uneven chunks
    x = torch.randn(n, generator=torch.Generator().manual_seed(11)).double() * 3 - 1
    x[:: max(n // 40, 1) + 3] = float("nan")
    x[7] = -float("inf")
    row, *_ = measured(x, saturation=(-4.0, 2.0))
    check(row, reference(x.numpy(), (-4.0, 2.0)))


def test_all_nonfinite_and_empty_and_constant():
    row, *_ = measured(torch.full((5,), float("nan")))
    assert row["nan"] == 5 and math.isnan(row["mean"])
    row, _, lin, log = measured(torch.empty(0, 3))
    assert row["count"] == 0 and lin.sum() == 0 and log.sum() == 0
    row, _, lin, log = measured(torch.full((100,), 2.5))
    assert (row["mean"], row["std"], row["min"], row["max"]) == (2.5, 0.0, 2.5, 2.5)
    assert lin[0] == 100  # zero width: everything in the first bin, nothing lost


def test_saturation_and_zero_fraction():
    x = torch.tanh(4 * torch.randn(50_000, generator=torch.Generator().manual_seed(4)))
    x[:1000] = 0.0
    x[1000] = float("inf")  # compares as "outside" but is not a finite saturated value
    row, *_ = measured(x, saturation=(-0.99, 0.99))
    check(row, reference(x.numpy(), (-0.99, 0.99)))
    row, *_ = measured(x)
    assert math.isnan(row["frac_saturated"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(dtype):
    x = (torch.randn(4096, generator=torch.Generator().manual_seed(5)) * 2).to(dtype)
    row, _, lin, log = measured(x)
    check(row, reference(x.float().numpy()), rtol=1e-6)
    assert lin.sum() == 4096 and log.sum() == 4096


def test_linear_histogram_matches_numpy_on_the_sample():
    x = torch.randn(100_003, generator=torch.Generator().manual_seed(6))
    row, raw, lin, _ = measured(x, spec={"bins": 50, "sample": 10_000})
    stride = int(raw[RAW["stride"]])
    assert stride == sample_stride(x.numel(), 10_000) == 11  # next prime >= 10.0003
    sample = x.numpy()[::stride].astype(np.float64)
    want, _ = np.histogram(sample, bins=50, range=(row["min"], row["max"]))
    assert lin.sum() == sample.size
    assert np.abs(lin - want).sum() <= 4  # only values on a bin edge may fall either side


def test_linear_histogram_can_leave_out_zeros():
    x = torch.relu(torch.randn(10_000, generator=torch.Generator().manual_seed(7)))  # unsampled
    _, _, lin, _ = measured(x, drop_zeros=True)
    assert lin.sum() == int((x != 0).sum())


def test_log_histogram_bins_by_decade():
    values = [0.0, 3e-31, 1.5e-3, 2e-3, -7.0, -7e29, 5e30, 1e-30, 9.99e-1]
    _, _, _, log = measured(torch.tensor(values, dtype=torch.float64))
    e = LogEdges()
    expect = np.zeros(e.size)
    for v in values:
        if v == 0:
            expect[e.zero_index] += 1
            continue
        k = math.floor(math.log10(abs(v)))
        j = 0 if k < e.lo else e.per_sign - 1 if k >= e.hi else k - e.lo + 1
        expect[e.zero_index + (1 if v > 0 else -1) * (j + 1)] += 1
    np.testing.assert_array_equal(log, expect)


@pytest.mark.parametrize("per_decade", [2, 3, 4, 5])
def test_log_histogram_at_finer_resolution(per_decade):
    g = torch.Generator().manual_seed(per_decade)
    mags = 10 ** (torch.rand(5000, generator=g, dtype=torch.float64) * 70 - 35)  # 1e-35..1e35
    x = (mags * torch.sign(torch.randn(5000, generator=g, dtype=torch.float64))).float()
    spec = {"log": LogEdges(per_decade=per_decade), "sample": 1 << 20}
    _, _, _, log = measured(x, spec=spec)
    e = LogEdges(per_decade=per_decade)
    v = x.double().numpy()
    k = np.floor(np.log10(np.abs(v)) * per_decade) - e.lo * per_decade + 1
    j = np.clip(k, 0, e.per_sign - 1).astype(int)
    expect = np.zeros(e.size)
    np.add.at(expect, np.where(v > 0, e.zero_index + j + 1, e.zero_index - j - 1), 1)
    assert log.sum() == 5000
    assert np.abs(log - expect).sum() <= 2  # a value within rounding of an edge may differ


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_decade", [1, 4])
def test_log_histogram_on_edges_and_subnormals(backend, dtype, per_decade):
    # every edge, its neighbours one ulp away, subnormals and the extremes of the dtype:
    # the C kernel reads the bin from the exponent bits and a table, and must agree
    # exactly with a search of |v| among the float64 edges
    e = LogEdges(per_decade=per_decade)
    ks = range(e.lo * per_decade, e.hi * per_decade + 1)  # Python's pow, as flowscope's
    edges = np.array([10.0 ** (k / per_decade) for k in ks])  # (numpy's differs at 1e23)
    info = np.finfo(np.float32 if dtype == torch.float32 else np.float64)
    on = edges.astype(info.dtype)
    mags = np.concatenate(
        [on, np.nextafter(on, 0), np.nextafter(on, np.inf), [info.smallest_subnormal, info.tiny,
         info.tiny * 3.5, info.max, 1.0, 2.0, 0.5, 3.0]]
    ).astype(info.dtype)  # fmt: skip
    v = np.concatenate([mags, -mags])
    _, _, _, log = measured(torch.from_numpy(v), spec={"log": e, "sample": 1 << 20})
    j = np.searchsorted(edges, np.abs(v.astype(np.float64)), side="right")
    expect = np.zeros(e.size)
    np.add.at(expect, np.where(v > 0, e.zero_index + j + 1, e.zero_index - j - 1), 1)
    if backend == "c":
        np.testing.assert_array_equal(log, expect)
    else:  # log10 in the eager path can round a value next to an edge into its neighbour
        assert log.sum() == v.size and np.abs(log - expect).sum() <= 2 * 3 * edges.size


def test_log_edges_bounds_are_consistent():
    e = LogEdges(per_decade=2)
    assert e.size == 2 * ((30 - -30) * 2 + 2) + 1
    for i in range(e.size - 1):
        lo, hi = e.bounds(i)
        assert lo <= hi
        assert hi == pytest.approx(e.bounds(i + 1)[0])  # contiguous from -inf to +inf
    assert e.bounds(0)[0] == -math.inf and e.bounds(e.size - 1)[1] == math.inf


def test_no_autograd_graph_is_built():
    x = torch.randn(100, requires_grad=True)
    raw, lin, log = snapshot(x * 2, HistSpec())
    assert not raw.requires_grad and not lin.requires_grad and not log.requires_grad


@pytest.mark.parametrize("scale", [1e-25, 1e-13, 1e15, 1e30])
def test_tiny_and_huge_float32_values_keep_exact_moments(scale):
    # vanishing gradients (1e-25: squares below float32's range) and exploding ones: the
    # float32 narrow pass cannot hold their squares and must hand the slice to float64
    x = (torch.randn(50_000, generator=torch.Generator().manual_seed(12)) * scale).float()
    row, *_ = measured(x)
    check(row, reference(x.numpy()), rtol=1e-6)


@pytest.mark.parametrize(
    "bounds", [(-0.99, 0.99), (0.1, 0.7), (-0.7, -0.1), (0.25, 0.5), (-0.0, 1.0), (-1.0, 0.0),
               (0.0, -0.0), (-1e300, 1e300), (1e-40, 3e38),
               (float(np.float32(0.7)), float(np.float32(-0.7)))],
)  # fmt: skip
def test_saturation_on_the_float32_neighbours_of_the_bounds(bounds):
    # the narrow pass compares integer keys of float32 bounds: every float32 next to a
    # float64 bound, and both zeros, must land on the side a float64 compare puts them
    # (0.1 rounds up in float32, 0.7 down; -0.0 <= +0.0 and +0.0 >= -0.0 hold)
    lo, hi = bounds
    near = []
    for b in (lo, hi):
        f = np.float32(np.clip(b, -3e38, 3e38))
        for _ in range(3):
            near += [f, -f]
            f = np.nextafter(f, np.float32(np.inf))
        f = np.float32(np.clip(b, -3e38, 3e38))
        for _ in range(3):
            f = np.nextafter(f, np.float32(-np.inf))
            near += [f, -f]
    v = np.array([*near, 0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45], dtype=np.float32)
    v = np.tile(v, 300)  # long enough for several vector lanes
    row, *_ = measured(torch.from_numpy(v), saturation=bounds)
    w = v.astype(np.float64)
    assert round(row["frac_saturated"] * v.size) == ((w <= lo) | (w >= hi)).sum()


def test_float32_moments_agree_with_float64_on_the_same_values():
    # narrow float32 sums (blocked, added in float64) against the float64 pass itself
    g = torch.Generator().manual_seed(13)
    x = torch.randn(300_001, generator=g) * 0.05 + 3.0  # mean >> std: the shift matters
    row32, *_ = measured(x)
    row64, *_ = measured(x.double())
    for name in ("mean", "std", "rms", "min", "max", "frac_zero"):
        assert row32[name] == pytest.approx(row64[name], rel=1e-6), name
