"""The probes of the isometry and edge-of-chaos studies against direct computations, and
free probability (isometry_moments) against measured Jacobian spectra of wide nets."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from conftest import NORMAL_W, NORMAL_Z, bisect
from flowscope.models.inits import apply_init
from flowscope.models.nets import mlp
from flowscope.study.claims import reduce_series
from flowscope.study.probes import PROBES, ProbeContext, pair_cosines
from flowscope.theory import edge_of_chaos, isometry_moments, jacobian_moments, jacobian_spectrum


def net(activation, init, width=64, depth=6, seed=0, **params):
    model = mlp(in_dim=width, width=width, depth=depth, activation=activation).double()
    apply_init(model, init, generator=torch.Generator().manual_seed(seed), **params)
    return model


def context(model, x):
    return ProbeContext(model=model, x=x, initial={})


def test_depth_scale_reducer_recovers_xi():
    assert reduce_series(np.exp(-np.arange(12) / 3.5), "depth_scale") == pytest.approx(3.5)
    assert math.isinf(reduce_series(np.ones(5), "depth_scale"))
    assert math.isnan(reduce_series(np.array([1.0, 0.0]), "depth_scale"))


def test_pair_cosines_is_the_mean_correlation_of_rows_0_1_2_3():
    h = torch.randn(5, 7, dtype=torch.float64)  # the odd last row has no partner
    a, b = h.numpy()[[0, 2]], h.numpy()[[1, 3]]
    want = np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    assert float(pair_cosines(h)) == pytest.approx(want, rel=1e-12)


def test_pair_probes_read_the_linear_outputs():
    model = net("tanh", "meanfield", sigma_w2=2.0, sigma_b2=0.1)
    x = torch.randn(8, 64, dtype=torch.float64)
    ctx = context(model, x)
    measured = PROBES.get("pair_correlation").fn(ctx)
    gaps = PROBES.get("decorrelation").fn(ctx)
    h = x
    for i, block in enumerate(model.layers):
        h = block.linear(h if i == 0 else torch.tanh(h))
        name = f"layers.{i}.linear"
        assert float(measured[name]) == pytest.approx(float(pair_cosines(h)), rel=1e-12)
        assert float(gaps[name]) == pytest.approx(1 - float(pair_cosines(h)), rel=1e-9)
    theory = PROBES.get("meanfield_correlation").fn(ctx)
    first = "layers.0.linear"  # the theory starts from the measured first layer
    assert float(theory[first]) == pytest.approx(float(measured[first]), rel=1e-12)
    assert list(theory) == list(measured)


def test_jacobian_probes_agree_with_the_spectrum():
    model = net("tanh", "meanfield_orthogonal", sigma_w2=1.2, sigma_b2=0.01)
    x = torch.randn(10, 64, dtype=torch.float64)
    ctx = context(model, x)
    mean, cv2 = PROBES.get("jacobian_mean").fn(ctx), PROBES.get("jacobian_cv2").fn(ctx)
    spectra = jacobian_spectrum(model, x[:8], layers=["layers.*.act"])
    for name, s in spectra.items():
        assert float(mean[name]) == pytest.approx(s.mean(), rel=1e-9)
        assert float(cv2[name]) == pytest.approx(s.var() / s.mean() ** 2, rel=1e-7)
    moments = jacobian_moments(model, x[:8])
    assert moments["mean"] == pytest.approx(spectra["layers.5.act"].mean(), rel=1e-9)


@pytest.mark.parametrize("init", ["meanfield", "meanfield_orthogonal"])
def test_free_probability_matches_wide_tanh_nets_at_the_edge_of_chaos(init):
    # Pennington, Schoenholz, Ganguli 2017: the moments of J^T J at the edge of chaos; a
    # 256-wide, 8-deep tanh net, inputs at q* (so q_l = q* throughout), 2 seeds x 8 inputs
    sb2 = 1e-3
    sw2 = edge_of_chaos("tanh", sb2)
    q1 = 0.1072923561475335  # depth_scales("tanh", sw2, 1e-3)["q_star"]
    theory = isometry_moments("tanh", sw2, sb2, q1, 8, orthogonal=init != "meanfield")
    means, cv2s = [], []
    for seed in range(2):
        model = net("tanh", init, width=256, depth=8, seed=seed, sigma_w2=sw2, sigma_b2=sb2)
        gen = torch.Generator().manual_seed(1000 + seed)  # own stream: not the weights', not global
        x = torch.randn(8, 256, dtype=torch.float64, generator=gen) * math.sqrt((q1 - sb2) / sw2)
        m = jacobian_moments(model, x)
        means.append(m["mean"])
        cv2s.append(m["var"] / m["mean"] ** 2)
    assert theory["mean"][-1] == pytest.approx(1.0, abs=0.01)  # critical: chi_1 = 1
    assert np.mean(means) == pytest.approx(theory["mean"][-1], rel=0.1)
    cv2 = theory["var"][-1] / theory["mean"][-1] ** 2
    assert np.mean(cv2s) == pytest.approx(cv2, rel=0.2)
    assert cv2 == pytest.approx(8.35 if init == "meanfield" else 0.35, abs=0.05)


def test_train_accuracy_is_the_share_of_correct_argmax():
    model = mlp(in_dim=6, width=6, depth=2, out_dim=3, activation="tanh").double()
    x = torch.randn(20, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    got = PROBES.get("train_accuracy").fn(ProbeContext(model=model, x=x, initial={}, y=y))
    want = float((model(x).argmax(1) == y).double().mean())
    assert list(got) == ["head"] and float(got["head"]) == pytest.approx(want)


def test_depth_ratio_reads_the_initial_weights():
    from flowscope.theory import depth_scales

    model = net("tanh", "meanfield", width=128, depth=12, sigma_w2=1.2, sigma_b2=0.05)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # "training" changes the weights; the probe reads the initial ones
        for p in model.parameters():
            p.mul_(3.0)
    ctx = ProbeContext(model=model, x=torch.randn(4, 128, dtype=torch.float64), initial=initial)
    got = float(PROBES.get("meanfield_depth_ratio").fn(ctx)["layers.11.linear"])
    links = [initial[f"layers.{i}.linear.weight"] for i in range(1, 12)]
    sw2 = float(np.mean([128 * float(w.pow(2).mean()) for w in links]))
    sb2 = float(
        np.mean([float(initial[f"layers.{i}.linear.bias"].pow(2).mean()) for i in range(1, 12)])
    )
    assert got == pytest.approx(12 / (6 * depth_scales("tanh", sw2, sb2)["xi_c"]), rel=1e-9)
    assert got == pytest.approx(12 / (6 * depth_scales("tanh", 1.2, 0.05)["xi_c"]), rel=0.15)


def tanh_edge_of_chaos(sigma_b2):
    """The σ_w² where χ₁ = σ_w² E[sech⁴(√q* z)] = 1 for tanh, q* the root of
    q = σ_w² E[tanh²(√q z)] + σ_b², in numpy alone (not flowscope's quadrature): E[.] by the
    trapezoid rule with step 0.1 on |z| <= 9 (the integrands are analytic in the strip
    |Im z| < π / (2√q), at least 1 wide for q < 2.4, so the rule's error is ~exp(-2π / 0.1),
    far below 1e-12; the normal mass beyond 9 is 2e-19), q* and σ_w² by 60 bisections
    (brackets [0, 9] and [1, 4]: to rounding, ~1e-16)."""
    z, w = NORMAL_Z, NORMAL_W

    def chi_1_minus_1(sw2):
        q = bisect(lambda q: sw2 * float(w @ np.tanh(math.sqrt(q) * z) ** 2) + sigma_b2 - q, 0, 9)
        return sw2 * float(w @ np.cosh(math.sqrt(q) * z) ** -4) - 1

    return bisect(chi_1_minus_1, 1.0, 4.0)  # χ₁ < 1 at σ_w² = 1 once σ_b² > 0, > 1 at 4


def test_doctor_says_where_an_mlp_sits_on_the_phase_diagram():
    import flowscope as fs
    from flowscope.theory import depth_scales

    model = net("tanh", "meanfield", width=64, depth=30, sigma_w2=1.0, sigma_b2=0.05).float()
    with fs.watch(model) as rec:
        model(torch.randn(32, 64)).pow(2).mean().backward()
    (note,) = [n for n in fs.diagnose(rec).notes if n.startswith("mean field")]
    xi = depth_scales("tanh", 1.0, 0.05)["xi_c"]  # 3.63: 6 xi_c = 22 < 30
    assert "ordered phase" in note and "depth 30 is beyond ~6 xi_c" in note
    found = re.search(r"xi_c = ([0-9.]+) layers", note)
    assert found and float(found.group(1)) == pytest.approx(xi, rel=0.1)  # at the net's sigmas
    assert "expect it not to train" in note
    # the critical σ_w² is quoted at the σ_b² the biases have, mean(b²) over the Linears that
    # follow an activation (layers 1-29): 0.0513 for this seed, where the edge of chaos is at
    # 1.768 (1.761 at the nominal 0.05)
    biases = [model.layers[i].linear.bias.detach().double() for i in range(1, 30)]
    sb2 = float(np.mean([float(b.pow(2).mean()) for b in biases]))
    quoted = re.search(r"sigma_b\^2 ([0-9.e-]+) ->", note)
    half_unit = 0.5 * 10 ** (math.floor(math.log10(sb2)) - 2)  # of 3 significant figures
    assert quoted and abs(float(quoted.group(1)) - sb2) <= half_unit
    want = tanh_edge_of_chaos(sb2)
    critical = re.findall(
        r"sigma_w\^2 = ([0-9.]+) \(init 'meanfield' with sigma_w2=([0-9.]+)\)", note
    )
    assert len(critical) == 1 and critical[0][0] == critical[0][1]
    # printed to 3 significant figures: within half a unit of the last, 0.005, of the root
    # (whose own error, < 1e-12, does not count); the nominal σ_b² would print 1.76 and fail
    assert abs(float(critical[0][0]) - want) <= 0.005
    apply_init(model, "xavier", generator=torch.Generator().manual_seed(1))
    with fs.watch(model) as rec:
        model(torch.randn(32, 64)).pow(2).mean().backward()
    (note,) = [n for n in fs.diagnose(rec).notes if n.startswith("mean field")]
    assert "at the edge of chaos" in note
