"""Mean-field theory against closed forms, a brute-force integral, and measured nets."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from flowscope.core.errors import FlowscopeError
from flowscope.models.inits import apply_init
from flowscope.models.nets import build_net
from flowscope.theory import (
    derivative_moment,
    expect,
    gradient_gain,
    mlp_chains,
    predict_chain,
    predict_mlp,
    second_moment,
    sigma_w2_of,
    variance_map,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster


# -- an independent integral: the trapezoid rule on a fine grid, with numpy's own functions --

Z = np.linspace(-12, 12, 1_200_001)
DENSITY = np.exp(-(Z**2) / 2) / math.sqrt(2 * math.pi)


def brute(f, q: float) -> float:
    """E[f(√q z)], z ~ N(0, 1), by brute force (independent of flowscope.theory.meanfield)."""
    with np.errstate(over="ignore"):
        return float(np.trapezoid(f(math.sqrt(q) * Z) * DENSITY, Z))


def sech2(u):
    return 1 / np.cosh(np.clip(u, -350, 350)) ** 2


def dsigmoid(u):
    s = 1 / (1 + np.exp(-np.clip(u, -700, 700)))
    return s * (1 - s)


def elu(u):
    return np.where(u > 0, u, np.expm1(np.minimum(u, 0)))


def delu(u):
    return np.where(u > 0, 1.0, np.exp(np.minimum(u, 0)))


NUMPY = {
    "tanh": (np.tanh, sech2),
    "sigmoid": (lambda u: 1 / (1 + np.exp(-np.clip(u, -700, 700))), dsigmoid),
    "relu": (lambda u: np.maximum(u, 0), lambda u: (u > 0).astype(float)),
    "elu": (elu, delu),
}

# √q across both quadrature rules (Gauss–Hermite up to 1.5, panels beyond) and the switch
SCALES = [0.01, 0.3, 1.0, 1.5, 1.51, 3.0, 8.0, 22.36, 1e3]


@pytest.mark.parametrize("name", sorted(NUMPY))
@pytest.mark.parametrize("scale", SCALES)
def test_moments_match_brute_force_integral(name, scale):
    f, df = NUMPY[name]
    q = scale**2
    m = expect(name, q)
    assert m["phi2"] == pytest.approx(brute(lambda u: f(u) ** 2, q), rel=1e-6, abs=1e-300)
    assert m["dphi2"] == pytest.approx(brute(lambda u: df(u) ** 2, q), rel=1e-5)
    assert m["phi"] == pytest.approx(brute(f, q), rel=1e-6, abs=1e-12 * scale)


# -- closed forms ---------------------------------------------------------------------------


def test_relu_variance_halves_under_xavier_and_stays_under_he():
    q = variance_map("relu", 1.0, 0.0, 3.0, 6)
    np.testing.assert_allclose(q, 3.0 * 0.5 ** np.arange(7), rtol=1e-12)
    np.testing.assert_allclose(variance_map("relu", 2.0, 0.0, 3.0, 6), 3.0, rtol=1e-12)


def test_linear_variance_multiplies_by_sigma_w2_plus_bias():
    np.testing.assert_allclose(variance_map("linear", 0.5, 0.0, 8.0, 4), 8.0 * 0.5 ** np.arange(5))
    # with bias: q_l = 0.5 q_{l-1} + 1, fixed point 2
    q = variance_map("linear", 0.5, 1.0, 0.0, 30)
    assert q[1] == pytest.approx(1.0) and q[-1] == pytest.approx(2.0, rel=1e-8)


def test_relu_derivative_moment_is_one_half_at_every_scale():
    for q in (1e-12, 1.0, 2.25, 9.0, 1e20):
        assert derivative_moment("relu", q) == pytest.approx(0.5, rel=1e-12)


def test_tanh_small_init_gain_is_sigma_sqrt_n():
    sigma, n = 0.01, 500
    sw2 = n * sigma**2
    assert math.sqrt(gradient_gain("tanh", sw2, 1e-8)) == pytest.approx(0.2236, abs=1e-4)
    pred = predict_mlp("tanh", "small", fan_in=n, depth=10)
    # deep layers are in tanh's linear regime: both gains are σ√n = 0.2236
    np.testing.assert_allclose(pred["grad_gain"][3:], sigma * math.sqrt(n), rtol=1e-3)
    np.testing.assert_allclose(pred["act_gain"][3:], sigma * math.sqrt(n), rtol=1e-3)


def test_tanh_large_init_saturates_forward_and_explodes_backward():
    """σ = 1, n = 500: q ≈ 482, E[tanh'²] ≈ (4/3)φ(0)/√q, so √χ ≈ 3.48 per layer."""
    pred = predict_mlp("tanh", "large", fan_in=500, depth=10)
    q = pred["q"][-1]
    assert pred["act_std"][-1] == pytest.approx(math.sqrt(brute(lambda u: np.tanh(u) ** 2, q)))
    assert pred["act_std"][-1] > 0.98  # saturated: |tanh| near 1
    asymptotic = math.sqrt(500 * (4 / 3) / math.sqrt(2 * math.pi) / math.sqrt(q))
    assert pred["grad_gain"][-1] == pytest.approx(asymptotic, rel=2e-3)
    assert pred["grad_gain"][-1] == pytest.approx(3.48, abs=0.01)


def test_he_relu_is_critical_and_xavier_relu_shrinks_by_root_half():
    he = predict_mlp("relu", "he", fan_in=500, depth=10)
    np.testing.assert_allclose(he["grad_gain"], 1.0, rtol=1e-12)
    np.testing.assert_allclose(he["pre_std"], math.sqrt(2.0), rtol=1e-12)
    xavier = predict_mlp("relu", "xavier", fan_in=500, depth=10)
    np.testing.assert_allclose(xavier["act_gain"][1:], math.sqrt(0.5), rtol=1e-12)
    np.testing.assert_allclose(xavier["grad_std"][0], math.sqrt(0.5) ** 9, rtol=1e-10)


def test_sigma_w2_of_schemes():
    assert sigma_w2_of("he", 500) == pytest.approx(2.0)
    assert sigma_w2_of("xavier", 123) == pytest.approx(1.0)
    assert sigma_w2_of("normal", 400, std=0.1) == pytest.approx(4.0)
    assert sigma_w2_of("orthogonal", 64, gain=1.5) == pytest.approx(2.25)
    assert sigma_w2_of("orthogonal", 32, 64) == pytest.approx(0.5)  # taller than wide


def test_callables_and_finite_differences_agree_with_names():
    assert expect(torch.tanh, 2.0) == pytest.approx(expect("tanh", 2.0), rel=1e-12)

    def no_autograd(x: torch.Tensor) -> torch.Tensor:  # goes through numpy: no autograd
        return torch.from_numpy(np.tanh(x.detach().numpy()))

    for q in (0.5, 40.0):
        assert derivative_moment(no_autograd, q) == pytest.approx(
            derivative_moment("tanh", q), rel=1e-6
        )
    assert second_moment(nn.LeakyReLU(0.2), 1.0) == pytest.approx(0.5 + 0.5 * 0.04, rel=1e-10)


# -- against measurement: the DD2424 lecture-4 nets ---------------------------------------------


def measured(activation: str, init: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A 10 x 500 net on N(0,1) inputs (batch 1000), by a plain loop with retain_grad()."""
    net = build_net("mlp", activation=activation)
    apply_init(net, init, generator=torch.Generator().manual_seed(seed))
    x = torch.randn(1000, 500, generator=torch.Generator().manual_seed(100 + seed))
    pre, post, h = [], [], x
    for block in net.layers:
        s = block.linear(h)
        s.retain_grad()
        h = block.act(s)
        pre.append(s)
        post.append(h)
    # an independent random projection: dL/d(output) does not depend on the forward weights
    r = torch.randn(h.shape, generator=torch.Generator().manual_seed(7))
    (h * r).sum().backward()
    grad = np.array([s.grad.double().pow(2).mean().sqrt().item() for s in pre])
    return {
        "pre_std": np.array([s.detach().double().std().item() for s in pre]),
        "act_std": np.array([a.detach().double().std().item() for a in post]),
        "grad_gain": grad[:-1] / grad[1:],
    }


@pytest.fixture(scope="module")
def lecture_nets():
    torch.manual_seed(0)
    return {
        (act, init): measured(act, init)
        for act in ("tanh", "relu")
        for init in ("small", "large", "xavier", "he")
    }


INITS4 = ["small", "large", "xavier", "he"]


@pytest.mark.parametrize("init", INITS4)
def test_tanh_nets_match_theory_within_3_percent(lecture_nets, init):
    got, pred = lecture_nets["tanh", init], predict_mlp("tanh", init, fan_in=500, depth=10)
    np.testing.assert_allclose(got["pre_std"], pred["pre_std"], rtol=0.03)
    np.testing.assert_allclose(got["act_std"], pred["act_std"], rtol=0.03)
    np.testing.assert_allclose(got["grad_gain"], pred["grad_gain"][:-1], rtol=0.08)


@pytest.mark.parametrize("init", INITS4)
def test_relu_nets_match_theory_per_layer(lecture_nets, init):
    """ReLU nets do not contract toward a fixed point, so finite-width noise (≈ 5 % per layer
    at n = 500) accumulates in the std; each layer's gain is compared instead (15 %)."""
    got, pred = lecture_nets["relu", init], predict_mlp("relu", init, fan_in=500, depth=10)
    assert got["pre_std"][0] == pytest.approx(pred["pre_std"][0], rel=0.03)
    gains = got["pre_std"][1:] / got["pre_std"][:-1]
    np.testing.assert_allclose(gains, pred["act_gain"][1:], rtol=0.15)
    np.testing.assert_allclose(got["act_std"][0], pred["act_std"][0], rtol=0.03)
    np.testing.assert_allclose(got["grad_gain"], pred["grad_gain"][:-1], rtol=0.08)


def test_tanh_large_measured_gradient_grows_3_5_per_layer(lecture_nets):
    got = lecture_nets["tanh", "large"]
    assert got["act_std"].min() > 0.97  # saturated forward
    assert np.all((got["grad_gain"] > 3.3) & (got["grad_gain"] < 3.7))  # exploding backward


# -- chains found in user models -----------------------------------------------------------


def test_chains_found_in_sequential_and_study_nets():
    seq = nn.Sequential(
        nn.Linear(10, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 20), nn.Tanh(),
        nn.Linear(20, 5),  # a head: not a link
        nn.Linear(5, 5), nn.GELU(), nn.Linear(5, 5), nn.GELU(),
    )  # fmt: skip
    chains = mlp_chains(seq)
    assert [[link.name for link in c] for c in chains] == [["0", "3"], ["6", "8"]]
    assert chains[0][0].norm == pytest.approx(1.0) and chains[0][1].norm is None
    net = build_net("mlp", depth=4, width=8, in_dim=3, out_dim=2)
    names = [link.name for link in mlp_chains(net)[0]]
    assert names == [f"layers.{i}.linear" for i in range(4)]


def test_predict_chain_matches_a_batchnorm_net():
    torch.manual_seed(0)
    blocks = []
    for _ in range(6):
        blocks += [nn.Linear(400, 400), nn.BatchNorm1d(400), nn.Tanh()]
    net = nn.Sequential(*blocks)
    for m in net[::3]:
        nn.init.normal_(m.weight, std=1.0)  # huge weights: batchnorm rescues the forward pass
        nn.init.zeros_(m.bias)
    x = torch.randn(1000, 400)
    outs, h = [], x
    for m in net:
        h = m(h)
        if isinstance(m, nn.Linear):
            outs.append(h.detach().double().pow(2).mean().sqrt().item())
    chain = mlp_chains(net)[0]
    pred = predict_chain(chain, q0=outs[0] ** 2)
    # after the norm the tanh input has variance 1: each Linear output has rms σ_w √E[tanh(z)²]
    sigma_w2 = np.array([400 * m.weight.double().pow(2).mean().item() for m in net[3::3]])
    expected = np.sqrt(sigma_w2 * brute(lambda u: np.tanh(u) ** 2, 1.0))
    np.testing.assert_allclose(pred["pre_std"][1:], expected, rtol=1e-6)
    np.testing.assert_allclose(outs[1:], pred["pre_std"][1:], rtol=0.03)


# -- bad arguments --------------------------------------------------------------------------


def test_unknown_activation_name():
    with pytest.raises(FlowscopeError, match=r"unknown activation 'tahn'.*did you mean 'tanh'"):
        expect("tahn", 1.0)


def test_activation_not_callable():
    with pytest.raises(FlowscopeError, match=r"activation must be a name .* or a callable"):
        expect(3.0, 1.0)  # type: ignore[arg-type]


def test_negative_variance():
    with pytest.raises(FlowscopeError, match=r"q must be a finite number >= 0, got -1.0"):
        expect("tanh", -1.0)


def test_nan_q0():
    with pytest.raises(FlowscopeError, match=r"q0 must be a finite number >= 0, got nan"):
        variance_map("tanh", 1.0, 0.0, float("nan"), 3)


def test_negative_sigma_w2():
    with pytest.raises(FlowscopeError, match=r"sigma_w2 must be a finite number >= 0"):
        variance_map("tanh", -2.0, 0.0, 1.0, 3)


def test_bad_depth():
    with pytest.raises(FlowscopeError, match=r"depth must be an integer >= 0, got 2.5"):
        variance_map("tanh", 1.0, 0.0, 1.0, 2.5)  # type: ignore[arg-type]


def test_predict_mlp_depth_zero():
    with pytest.raises(FlowscopeError, match=r"depth must be an integer >= 1, got 0"):
        predict_mlp("relu", "he", fan_in=10, depth=0)


def test_predict_mlp_bad_fan_in():
    with pytest.raises(FlowscopeError, match=r"fan_in must be an integer >= 1, got 0"):
        predict_mlp("relu", "he", fan_in=0, depth=3)


def test_constant_init_has_no_mean_field_limit():
    with pytest.raises(FlowscopeError, match=r"init 'constant' is not an i.i.d. random scheme"):
        predict_mlp("tanh", "constant", fan_in=10, depth=3)


def test_unknown_init():
    with pytest.raises(FlowscopeError, match=r"unknown init 'kaiming'"):
        sigma_w2_of("kaiming", 10)


def test_theory_is_torch_core_without_pandas():
    code = "import sys, flowscope.theory\nprint(sorted({'pandas', 'click'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def bn_net(act: type[nn.Module], depth: int = 16, width: int = 512) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.BatchNorm1d(width), act()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def test_batchnorm_gradient_gain_is_the_mean_field_one():
    # Yang, Pennington, Rao, Sohl-Dickstein, Schoenholz 2019: backward through batchnorm
    # divides by the batch std of its input, so with ReLU dL/dh grows by sqrt(pi/(pi-1)) per
    # layer toward the input (square layers: the weights' forward and backward variance agree)
    p = predict_chain(mlp_chains(bn_net(nn.ReLU))[0], q0=1.0)
    assert p["grad_gain"][1:-1] == pytest.approx(math.sqrt(math.pi / (math.pi - 1)), rel=0.01)
    assert math.sqrt(math.pi / (math.pi - 1)) == pytest.approx(1.2112, abs=1e-4)


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_a_deep_batchnorm_net_measures_the_predicted_gradient_gain(act):
    # 16 Linear -> BatchNorm1d -> act layers, 512 wide, batch 1024, a random-projection loss
    # (gradients independent of the forward weights, as the theory assumes)
    net = bn_net(act)
    g = torch.Generator().manual_seed(1)
    h, pre = torch.randn(1024, 512, generator=g), []
    for i in range(16):
        s = net[3 * i](h)
        s.retain_grad()
        pre.append(s)
        h = net[3 * i + 2](net[3 * i + 1](s))
    out = net[-1](h)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    rms = np.array([float(s.grad.double().pow(2).mean().sqrt()) for s in pre])
    measured = np.exp(np.log(rms[:-1] / rms[1:])[1:-1].mean())  # inner layers, geometric
    q0 = float(pre[0].detach().double().pow(2).mean())
    predicted = predict_chain(mlp_chains(net)[0], q0)["grad_gain"]
    assert measured == pytest.approx(np.exp(np.log(predicted[1:-1]).mean()), rel=0.03)
    if act is nn.ReLU:
        assert measured == pytest.approx(1.2112, rel=0.03)
    assert predicted[0] == pytest.approx(rms[0] / rms[1], rel=0.03)  # the input layer too
