"""The torch path (a GPU's): batched snapshots, few kernels, no host sync, the C kernel's numbers.

Run on the CPU with ``FLOWSCOPE_KERNELS=eager``: the same code a GPU runs. Kernel launches
are counted as aten calls (deterministic), host synchronisations as the aten ops that need
one on a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import flowscope as fs
from flowscope.record.batched import CHUNK, Batch
from flowscope.record.fields import HistSpec, split_row
from flowscope.record.snapshot import snapshot_row

KEY = ["layer", "kind", "call", "tensor"]


@pytest.fixture
def eager(monkeypatch):
    monkeypatch.setenv("FLOWSCOPE_KERNELS", "eager")


def pairs(k: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(k):
        layers += [nn.Linear(64, 64), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(64, 10))


def aten_calls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def step_calls(k: int) -> tuple[int, int, int]:
    """(aten calls of a bare step, of a recorded step, snapshots) for k Linear+Tanh pairs."""
    model = pairs(k)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))

    def bare() -> None:
        model(x).sum().backward()

    rec = fs.watch(model)
    rec.pause()

    def recorded() -> None:
        rec.resume()
        model(x).sum().backward()
        rec.step()
        rec.pause()

    bare()
    recorded()  # warm: the layout of the step's batch is built once
    before = rec.recorded
    counts = aten_calls(bare), aten_calls(recorded)
    rec.close()
    return *counts, rec.recorded - before


def test_aten_calls_per_snapshot_and_per_layer_stay_few(eager):
    # the measure: a 3-module net (14 snapshots) cost ~270 aten calls per snapshot
    # and ~2180 per added Linear + Tanh pair; each is a kernel launch on a GPU
    bare1, rec1, snaps1 = step_calls(1)
    bare3, rec3, snaps3 = step_calls(3)
    assert snaps1 == 14 and snaps3 == 30
    assert (rec1 - bare1) / snaps1 <= 30
    assert ((rec3 - bare3) - (rec1 - bare1)) / 2 <= 80  # per added pair (8 snapshots)


SYNCING = {
    "aten._local_scalar_dense.default",  # .item(), bool(tensor), int(tensor)
    "aten.is_nonzero.default",
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten.bincount.default",  # sizes its output from the data
    "aten.unique_dim.default",
    "aten._unique2.default",
    "aten.repeat_interleave.Tensor",
    "aten.equal.default",
}


class Ops(TorchDispatchMode):
    """Every aten overload called, and whether a boolean mask indexed a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("aten.index.Tensor") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
        ):
            name = "aten.index.Tensor(bool mask)"  # boolean indexing: nonzero on a GPU
        self.names.append(name)
        return func(*args, **(kwargs or {}))


def test_a_recorded_step_calls_nothing_that_waits_for_a_gpu(eager):
    model = pairs(2)
    x = torch.randn(32, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = fs.watch(model)
    for _ in range(2):  # a new layout in the first step, the cached one in the second
        with Ops() as ops:
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            rec.step()  # the batch is reduced here
        bad = [n for n in ops.names if n in SYNCING or "bool mask" in n]
        assert not bad, bad
        assert len(ops.names) > 100  # the mode saw the step's ops
    rec.close()


class Blocks(nn.Module):
    """Containers whose output is their last child's, an in-place ReLU, a module called
    twice, a NaN, a half-precision branch: what the row reuse and the staging must get right."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Sequential(nn.Linear(16, 32), nn.Tanh())
        self.b = nn.Sequential(nn.Linear(32, 32), nn.ReLU(inplace=True))
        self.shared = nn.Linear(32, 32)
        self.low = nn.Linear(32, 8).to(torch.bfloat16)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(self.a(x))
        h = self.shared(self.shared(h))
        h = h.masked_fill(torch.arange(32) == 5, float("nan"))  # a NaN column
        return self.head(h) + self.low(h.bfloat16()).float().sum(-1, keepdim=True)


def record(kernels: str, monkeypatch) -> tuple:
    monkeypatch.setenv("FLOWSCOPE_KERNELS", kernels)
    model = Blocks()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(4))
    with fs.watch(model) as rec:
        model(x).nan_to_num().sum().backward()
    stats = rec.stats.sort_values(KEY).reset_index(drop=True)
    return stats, rec.hists


def test_torch_path_gives_the_c_kernels_numbers_on_a_real_model(monkeypatch):
    c, c_hists = record("c", monkeypatch)
    e, e_hists = record("eager", monkeypatch)
    assert (c[KEY].values == e[KEY].values).all()
    for col in ("count", "nan", "inf", "min", "max", "frac_zero", "frac_saturated"):
        np.testing.assert_array_equal(c[col].to_numpy(), e[col].to_numpy(), err_msg=col)
    scale = c["rms"].abs().to_numpy()
    for col in ("mean", "std", "rms"):
        a, b = c[col].to_numpy(), e[col].to_numpy()
        ok = (np.abs(a - b) <= 1e-5 * scale) | (np.isnan(a) & np.isnan(b))
        assert ok.all(), (col, c[KEY][~ok])
    for kind in ("log", "linear"):  # log: fixed edges; linear: the same formula in float64
        counts = [h[h["hist"] == kind].sort_values([*KEY, "bin"]).reset_index(drop=True)
                  for h in (c_hists, e_hists)]  # fmt: skip
        assert len(counts[0]) > 0
        np.testing.assert_array_equal(counts[0]["count"], counts[1]["count"], err_msg=kind)


def test_batches_that_fill_up_or_a_tensor_beyond_the_buffer_give_the_same_rows():
    spec = HistSpec(bins=8, sample=64)
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(n, generator=g) * s for n, s in ((3000, 1.0), (5000, 1e-3), (700, 1e20))]
    xs.append(torch.randn(40, 50, generator=g).t())  # transposed
    alone = [snapshot_row(x, spec, backend="eager") for x in xs]
    # 4 chunks: the 3000 values fill 3, the 5000 go beyond the buffer (a batch of their own),
    # the last two share the emptied buffer
    small = Batch(torch.device("cpu"), torch.float32, spec, capacity=4 * CHUNK)
    rows = [small.add(x, None, False) for x in xs]
    small.finish()
    for a, b in zip(alone, rows, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-12, atol=0)
    raw, lin, _ = split_row(rows[1], spec)
    assert raw[0] == 5000 and lin.sum() == len(range(0, 5000, 79))  # stride: prime >= 5000/64


def test_a_tensor_staged_after_another_keeps_its_linear_bins():
    # its bins start at index * bins in one scatter; added to the bin position (float64)
    # before truncating, 64 + 31.999999999999996 rounds to 96: 0.9 of [0, 1.8] (bin 31
    # alone and in the C kernel) went to bin 32
    spec = HistSpec(bins=64)
    y = torch.tensor([0.0, 0.9, 1.8])
    alone = snapshot_row(y, spec, backend="eager")
    b = Batch(torch.device("cpu"), torch.float32, spec, capacity=4 * CHUNK)
    b.add(torch.tensor([1.0, 2.0]), None, False)
    row = b.add(y, None, False)
    b.finish()
    assert split_row(alone, spec)[1].nonzero().view(-1).tolist() == [0, 31, 63]
    torch.testing.assert_close(row, alone, equal_nan=True, rtol=0, atol=0)


def test_a_tensor_without_a_finite_value_beside_a_huge_float64_one_keeps_its_counts():
    # a tensor with no finite value takes c, the shift its chunks' sums are moved to, from
    # chunk 0 of the batch (another tensor's): d = (0 - 1e200) / 1, n d^2 = 0 * inf = NaN,
    # and the additive map spread the NaN over numel, the NaN / Inf counts and the rest
    spec = HistSpec(bins=4)
    y = torch.tensor([math.nan, math.inf], dtype=torch.float64)
    b = Batch(torch.device("cpu"), torch.float64, spec, capacity=4 * CHUNK)
    b.add(torch.tensor([1e200, 1.0], dtype=torch.float64), None, False)
    row = b.add(y, None, False)
    b.finish()
    torch.testing.assert_close(row, snapshot_row(y, spec, backend="c"), equal_nan=True,
                               rtol=0, atol=0)  # fmt: skip
