"""Recording on a GPU: hooks never make the host wait, and the numbers are the CPU's.

These need CUDA and are skipped without it (the project's own machine has none); run them
where a GPU is lent. The eager torch path they exercise is also tested on the CPU
(``FLOWSCOPE_KERNELS=eager`` in test_stats.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import flowscope as fs
from flowscope.models.nets import build_net

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

KEY = ["layer", "kind", "call", "tensor"]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_net("mlp", in_dim=64, width=128, depth=4, out_dim=10, activation="tanh")


def batch(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    return x.to(device), y.to(device)


def test_recorded_steps_never_synchronize_the_host():
    # a hook that called .item(), .cpu() or bincount would stall the GPU every layer; under
    # sync debug mode "error" any such synchronisation raises
    model = mlp().cuda()
    x, y = batch("cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = fs.watch(model)
    for _ in range(2):  # warm-up outside the check: allocator, cuBLAS handles
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        rec.step()
    torch.cuda.synchronize()
    before = len(rec._pending.keys)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            rec.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(rec._pending.keys) - before == 3 * before // 2  # every kind, every step
    rec.close()  # the flush: the one transfer, outside the hooks


def test_gpu_snapshots_match_the_cpu_kernels():
    # the same model and batch on the CPU (the C kernel) and the GPU (torch ops)
    frames = {}
    for device in ("cpu", "cuda"):
        model = mlp().to(device)
        x, y = batch(device)
        with fs.watch(model) as rec:
            nn.functional.cross_entropy(model(x), y).backward()
        frames[device] = rec.stats.sort_values(KEY).reset_index(drop=True)
    cpu, gpu = frames["cpu"], frames["cuda"]
    assert (cpu[KEY].values == gpu[KEY].values).all()
    scale = cpu["rms"].to_numpy()  # a mean near zero is judged against the tensor's scale
    one = 2.0 / cpu["count"].to_numpy()  # fractions: a value on a bound may fall either side
    for col in ("mean", "std", "rms", "min", "max", "frac_zero", "frac_saturated"):
        a, b = cpu[col].to_numpy(), gpu[col].to_numpy()
        tol = one if col.startswith("frac") else 1e-4 * abs(a) + 1e-5 * scale
        ok = (abs(a - b) <= tol) | (np.isnan(a) & np.isnan(b))
        assert ok.all(), (col, cpu[KEY][~ok].head(), a[~ok][:5], b[~ok][:5])


def test_signal_propagation_and_coord_check_on_the_gpu_equal_the_cpu():
    from flowscope.doctor.coordcheck import coord_check
    from flowscope.models.inits import apply_init

    torch.manual_seed(0)
    net = build_net("resmlp", width=64, depth=6, variant="batchnorm")
    apply_init(net, "he")
    x = torch.randn(128, 64)
    cpu = fs.signal_propagation(net, x)
    gpu = fs.signal_propagation(net.cuda(), x.cuda())
    np.testing.assert_allclose(gpu.iloc[:, 2:].to_numpy(), cpu.iloc[:, 2:].to_numpy(), rtol=1e-4)

    def make(width: int) -> nn.Module:
        return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 2))

    on = {
        d: coord_check(make, [16, 32], input_shape=(8,), steps=2, device=d) for d in ("cpu", "cuda")
    }
    np.testing.assert_allclose(on["cuda"].sizes["size"], on["cpu"].sizes["size"], rtol=1e-3)
