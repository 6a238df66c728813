"""The C snapshot kernel on torch's own OpenMP threads (flowscope.record.ckernel)."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from test_stats import check, measured, reference

from flowscope.record.snapshot import RAW


@pytest.fixture(autouse=True)
def c_kernel(monkeypatch):
    monkeypatch.setenv("FLOWSCOPE_KERNELS", "c")


def _force_team(monkeypatch, on: bool) -> None:
    """Split every snapshot over torch's OpenMP team (on) or run it on this thread (off)."""
    from flowscope.record import ckernel as _cpu_kernels

    monkeypatch.setattr(_cpu_kernels, "MOMENTS_FROM", 1 if on else 1 << 62)
    monkeypatch.setattr(_cpu_kernels, "HIST_FROM", 1 if on else 1 << 62)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_team_and_the_calling_thread_agree(monkeypatch, dtype):
    # the same snapshot split over torch's threads and on one: histograms and counts exactly,
    # sums to rounding; NaN/Inf in one thread's share only, zeros and saturated values
    from flowscope.record import ckernel as _team

    if _team.torch_team() is None or torch.get_num_threads() < 2:
        pytest.skip("needs torch on a GNU OpenMP team of 2+ threads")
    g = torch.Generator().manual_seed(14)
    x = torch.tanh(3 * torch.randn(200_003, generator=g)).to(dtype)
    x[:5000] = 0.0
    x[150_000] = float("nan")
    x[150_001] = -float("inf")
    rows = {}
    for on in (True, False):
        _force_team(monkeypatch, on)
        rows[on] = measured(x, saturation=(-0.99, 0.99), spec={"sample": 50_000})
    (team, team_raw, team_lin, team_log), (one, one_raw, one_lin, one_log) = rows[True], rows[False]
    np.testing.assert_array_equal(team_lin, one_lin)
    np.testing.assert_array_equal(team_log, one_log)
    for name in ("numel", "nonfinite", "nan", "shift", "min", "max", "nonzero", "saturated"):
        assert team_raw[RAW[name]] == one_raw[RAW[name]], name
    check(team, reference(x.numpy(), (-0.99, 0.99)))
    check(one, reference(x.numpy(), (-0.99, 0.99)))


def test_snapshots_from_another_thread_use_their_own_team(monkeypatch):
    # a hook may fire on a thread other than the one that runs torch's ops (a second
    # Python thread): its team is its own, and the results are the same
    _force_team(monkeypatch, True)
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(15))
    here = measured(x)
    there: list = []
    worker = threading.Thread(target=lambda: there.append(measured(x)))
    worker.start()
    worker.join(timeout=60)
    assert there, "the snapshot on the second thread did not finish"
    np.testing.assert_array_equal(here[1], there[0][1])
    np.testing.assert_array_equal(here[2], there[0][2])


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_large_snapshots_add_no_thread_pool_of_their_own(monkeypatch):
    # the kernels borrow torch's OpenMP threads: no second OpenMP runtime is loaded and the
    # process gains no threads (a pool of our own would fight torch's spinning workers)
    torch.randn(512, 512) @ torch.randn(512, 512)  # torch's team exists
    threads = len(os.listdir("/proc/self/task"))
    _force_team(monkeypatch, True)
    for _ in range(3):
        measured(torch.randn(1_000_000, generator=torch.Generator().manual_seed(16)))
    runtimes = set(
        re.findall(r"\S*lib(?:g|i|)omp[^/\s]*\.so[.\d]*", Path("/proc/self/maps").read_text())
    )
    assert len({Path(r).name for r in runtimes}) <= 1 and len(runtimes) <= 1, runtimes
    assert len(os.listdir("/proc/self/task")) <= threads


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_snapshots_on_its_own_thread():
    # GNU OpenMP hangs in a child made by fork() once the parent used its team (torch's own
    # parallel ops hang there too): the child must fall back to the calling thread. Run in
    # a fresh interpreter with a timeout, so a regression fails instead of hanging the suite
    import subprocess
    import sys

    script = """
import os, torch
from flowscope.record.snapshot import snapshot, HistSpec
x = torch.randn(1_000_000)
snapshot(x, HistSpec())  # the parent uses torch's team
pid = os.fork()
if pid == 0:
    raw, *_ = snapshot(x, HistSpec())
    os._exit(0 if raw[0].item() == 1_000_000 else 3)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""
    env = {**os.environ, "FLOWSCOPE_KERNELS": "c"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "0"
