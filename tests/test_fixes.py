"""reinit and LSUV: what they change, checked by hooks and plain tensor math."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from flowscope.core.errors import FlowscopeError
from flowscope.doctor import examine
from flowscope.doctor.fixes import LSUV_COLUMNS, lsuv, reinit
from flowscope.models.inits import apply_init
from flowscope.models.nets import build_net

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster


LEAN = ("activation", "gradient", "weight")


def outputs_std(model: nn.Module, x: torch.Tensor, kinds=(nn.Linear, nn.Conv2d)) -> dict:
    """Output std of every Linear / Conv2d on x, by own hooks (independent of fixes.py)."""
    seen: dict[str, float] = {}

    def keep(name: str):
        def hook(module, args, out) -> None:
            seen.setdefault(name, out.double().std(unbiased=False).item())

        return hook

    handles = [
        m.register_forward_hook(keep(n)) for n, m in model.named_modules() if isinstance(m, kinds)
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def tanh_small(width: int = 128, depth: int = 8) -> nn.Module:
    net = build_net("mlp", activation="tanh", width=width, in_dim=width, depth=depth)
    apply_init(net, "small", generator=torch.Generator().manual_seed(0))
    return net


def test_reinit_wraps_the_registry_and_fixes_the_verdict():
    net = tanh_small()
    x = torch.randn(128, 128, generator=torch.Generator().manual_seed(1))
    _, before = examine(net, x, kinds=LEAN)
    names = reinit(net, "xavier", generator=torch.Generator().manual_seed(0))
    assert names == [f"layers.{i}.linear" for i in range(8)]
    w = torch.cat([net.layers[i].linear.weight.flatten() for i in range(8)])
    assert w.std().item() == pytest.approx(1 / math.sqrt(128), rel=0.01)
    assert all(bool((net.layers[i].linear.bias == 0).all()) for i in range(8))
    _, after = examine(net, x, kinds=LEAN)
    assert (before.runs.loc[0, "verdict"], after.runs.loc[0, "verdict"]) == (
        "vanishing",
        "healthy",
    )


def test_reinit_keeps_biases_when_asked_and_takes_scheme_parameters():
    net = nn.Sequential(nn.Linear(400, 300))
    nn.init.constant_(net[0].bias, 0.5)
    reinit(net, "normal", std=0.2, bias=None, generator=torch.Generator().manual_seed(0))
    assert net[0].weight.std().item() == pytest.approx(0.2, rel=0.01)
    assert bool((net[0].bias == 0.5).all())


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_lsuv_brings_every_layer_output_to_unit_variance(activation):
    net = build_net("mlp", activation=activation, width=128, in_dim=128, depth=8, out_dim=10)
    apply_init(net, "small", generator=torch.Generator().manual_seed(0))
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(1))
    before = outputs_std(net, x)
    table = lsuv(net, x, tol=0.02, generator=torch.Generator().manual_seed(2))
    after = outputs_std(net, x)
    assert list(table.columns) == LSUV_COLUMNS
    assert table.layer.tolist() == [*(f"layers.{i}.linear" for i in range(8)), "head"]
    np.testing.assert_allclose(table.before_std, [before[n] for n in table.layer], rtol=1e-6)
    np.testing.assert_allclose(table.after_std, [after[n] for n in table.layer], rtol=1e-6)
    for n in table.layer:  # Var within 1 ± tol on this batch, measured independently
        assert abs(after[n] ** 2 - 1) <= 0.02
    assert table.converged.all() and table.iterations.between(0, 10).all()
    # the orthogonal first layer keeps N(0, 1) inputs at unit variance; later ones need scaling
    assert table.iterations.iloc[0] == 0 and (table.iterations.iloc[1:] >= 1).all()
    assert before["layers.7.linear"] < 1e-3  # it was vanishing


def test_lsuv_starts_from_orthonormal_weights():
    net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32))
    lsuv(net, torch.randn(512, 64), generator=torch.Generator().manual_seed(0))
    for layer in (net[0], net[2]):
        w = layer.weight.detach().double()
        gram = w @ w.T  # rows orthogonal, all of one norm (the LSUV scale)
        scale = gram.diagonal().mean()
        eye = torch.eye(32, dtype=torch.float64)
        torch.testing.assert_close(gram / scale, eye, atol=1e-5, rtol=0)
        assert bool((layer.bias == 0).all())


def test_lsuv_on_a_conv_net_restores_batchnorm_buffers_and_mode():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4),
    )  # fmt: skip
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    running = net[1].running_mean.clone(), net[1].num_batches_tracked.clone()
    table = lsuv(net, x, generator=torch.Generator().manual_seed(2))
    assert table.layer.tolist() == ["0", "3", "6"]
    assert torch.equal(net[1].running_mean, running[0])
    assert torch.equal(net[1].num_batches_tracked, running[1])
    assert net.training
    after = outputs_std(net, x, kinds=(nn.Conv2d, nn.Linear))
    for name in ("0", "3", "6"):
        assert abs(after[name] ** 2 - 1) <= 0.02


def test_lsuv_keeps_weights_and_stops_at_the_iteration_cap():
    torch.manual_seed(0)
    layer = nn.Linear(32, 32)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(32) * 2)  # bias variance ~4: Var(Wx + b) > 1 always
    net = nn.Sequential(layer, nn.Tanh())
    w0 = layer.weight.detach().clone()
    table = lsuv(net, torch.randn(64, 32), orthogonal=False, max_iter=3)
    row = table.iloc[0]
    assert (row["iterations"], bool(row["converged"])) == (3, False)
    ratio = layer.weight.detach() / w0
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))  # only rescaled


def test_lsuv_on_selected_modules_only():
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    w2 = net[2].weight.detach().clone()
    table = lsuv(net, torch.randn(64, 16), modules="0")
    assert table.layer.tolist() == ["0"]
    assert torch.equal(net[2].weight, w2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lsuv_and_examine_on_cuda():
    net = tanh_small(64, 4).cuda()
    x = torch.randn(128, 64, device="cuda")
    table = lsuv(net, x, generator=torch.Generator(device="cuda").manual_seed(0))
    assert ((table.after_std**2 - 1).abs() <= 0.02).all()
    _, d = examine(net, x, kinds=LEAN)
    assert d.runs.loc[0, "verdict"] == "healthy"


# -- bad arguments ----------------------------------------------------------------------------


def test_reinit_unknown_scheme():
    with pytest.raises(FlowscopeError, match=r"unknown init 'hee'.*did you mean 'he'"):
        reinit(nn.Linear(2, 2), "hee")


def test_reinit_bad_parameter():
    with pytest.raises(FlowscopeError, match=r"init 'normal': std=-1 is not allowed"):
        reinit(nn.Linear(2, 2), "normal", std=-1)


def test_reinit_needs_a_module():
    with pytest.raises(FlowscopeError, match=r"reinit\(\) needs a torch.nn.Module, got str"):
        reinit("net", "he")  # type: ignore[arg-type]


def test_lsuv_needs_a_module():
    with pytest.raises(FlowscopeError, match=r"lsuv\(\) needs a torch.nn.Module, got int"):
        lsuv(3, torch.randn(2, 2))  # type: ignore[arg-type]


@pytest.mark.parametrize("tol", [0, 1.5, True, "0.1"])
def test_lsuv_bad_tolerance(tol):
    with pytest.raises(FlowscopeError, match=r"tol must be a number in \(0, 1\)"):
        lsuv(nn.Linear(2, 2), torch.randn(4, 2), tol=tol)


def test_lsuv_bad_iteration_cap():
    with pytest.raises(FlowscopeError, match=r"max_iter must be an integer >= 1, got 0"):
        lsuv(nn.Linear(2, 2), torch.randn(4, 2), max_iter=0)


def test_lsuv_module_without_weight():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(FlowscopeError, match=r"layer '1' \(ReLU\) has no weight"):
        lsuv(net, torch.randn(4, 2), modules=nn.ReLU)


def test_lsuv_selected_layer_never_reached():
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(FlowscopeError, match=r"never reached \['unused'\]"):
        lsuv(Skips(), torch.randn(4, 2), modules=nn.Linear)


def test_lsuv_zero_output_cannot_be_scaled():
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(FlowscopeError, match=r"layer '0' has output std 0.0 on this batch"):
        lsuv(net, torch.zeros(8, 4))
    assert not net[0]._forward_hooks  # hooks removed after the error


def test_lsuv_model_without_layers():
    with pytest.raises(FlowscopeError, match=r"no Linear or Conv layer to scale"):
        lsuv(nn.Sequential(nn.ReLU()), torch.randn(2, 2))
