"""fs.jacobian_spectrum against an explicit torch.autograd.functional.jacobian + SVD, and
against the known spectra of deep linear nets (free probability / Fuss–Catalan moments)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import flowscope as fs
from flowscope.core.errors import FlowscopeError
from flowscope.models.inits import apply_init
from flowscope.models.nets import mlp


def explicit(fn, x):
    """Squared singular values of each input's Jacobian, from autograd.functional + SVD."""
    out = []
    for xi in x:
        j = torch.autograd.functional.jacobian(lambda v: fn(v.unsqueeze(0)).reshape(-1), xi)
        out.append(torch.linalg.svdvals(j.reshape(j.shape[0], -1)) ** 2)
    return torch.cat(out).numpy()


def net(in_dim, width, depth, out_dim, activation="tanh", seed=0):
    model = mlp(in_dim=in_dim, width=width, depth=depth, out_dim=out_dim, activation=activation)
    model = model.double()
    gen = torch.Generator().manual_seed(seed)
    apply_init(model, "he" if activation == "relu" else "xavier", generator=gen)
    for m in model.modules():  # non-zero biases, so the Jacobian depends on the input
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.bias, std=0.3, generator=gen)
    return model


@pytest.mark.parametrize(("in_dim", "out_dim"), [(12, 5), (5, 12)])  # jacrev / jacfwd
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_full_spectrum_matches_autograd_jacobian(in_dim, out_dim, activation):
    model = net(in_dim, 9, 3, out_dim, activation)
    x = torch.randn(4, in_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = fs.jacobian_spectrum(model, x)
    assert got.shape == (4 * min(in_dim, out_dim),)
    np.testing.assert_allclose(got, explicit(model, x), rtol=1e-10, atol=1e-12)


def test_per_layer_spectra_are_the_jacobians_of_the_prefixes():
    model = net(7, 6, 3, 4)
    x = torch.randn(3, 7, dtype=torch.float64)
    got = fs.jacobian_spectrum(model, x, layers=["layers.*.act", "head"])
    assert list(got) == ["layers.0.act", "layers.1.act", "layers.2.act", "head"]
    for depth in (1, 2, 3):
        prefix = nn.Sequential(*model.layers[:depth])
        want = explicit(prefix, x)
        np.testing.assert_allclose(got[f"layers.{depth - 1}.act"], want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["head"], explicit(model, x), rtol=1e-10, atol=1e-12)


def test_power_iteration_finds_the_largest_values():
    model = net(30, 30, 4, 30)
    x = torch.randn(2, 30, dtype=torch.float64)
    full = fs.jacobian_spectrum(model, x, method="full").reshape(2, -1)
    top = fs.jacobian_spectrum(model, x, method="power", k=8, iters=60).reshape(2, 8)
    np.testing.assert_allclose(top[:, :3], full[:, :3], rtol=1e-6)  # the block's top converge first


def deep_linear(width, depth, init, seed):
    model = mlp(in_dim=width, width=width, depth=depth, activation="linear", bias=False).double()
    apply_init(model, init, generator=torch.Generator().manual_seed(seed))
    return model


def test_orthogonal_deep_linear_net_is_an_exact_isometry():
    # Saxe et al. 2014: a product of orthogonal matrices is orthogonal: every λ is 1
    spectrum = fs.jacobian_spectrum(
        deep_linear(64, 16, "orthogonal", 0), torch.randn(2, 64, dtype=torch.float64)
    )
    np.testing.assert_allclose(spectrum, 1.0, atol=1e-9)


@pytest.mark.parametrize("depth", [1, 4])
def test_gaussian_deep_linear_net_has_the_free_probability_moments(depth):
    # product of L Gaussian N(0, 1/N) matrices: the squared singular values follow the
    # Fuss–Catalan law with moments m_k = binom((L+1)k, k) / (Lk + 1): mean 1, variance L
    # (Pennington, Schoenholz, Ganguli 2017, Sec. 2.4 / their linear Gaussian case)
    means, variances = [], []
    for seed in range(4):
        s = fs.jacobian_spectrum(
            deep_linear(200, depth, "xavier", seed), torch.randn(1, 200, dtype=torch.float64)
        )
        means.append(s.mean())
        variances.append(s.var())
    assert np.mean(means) == pytest.approx(1.0, abs=0.05)
    assert np.mean(variances) == pytest.approx(depth, rel=0.15)


def test_bad_arguments():
    model = net(4, 4, 1, 2)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(FlowscopeError, match="method"):
        fs.jacobian_spectrum(model, x, method="lanczos")
    with pytest.raises(FlowscopeError, match="matches no module"):
        fs.jacobian_spectrum(model, x, layers=["nope*"])
    with pytest.raises(FlowscopeError, match="at least one input"):
        fs.jacobian_spectrum(model, x[:0])
    with pytest.raises(FlowscopeError, match="need method 'full'"):
        fs.jacobian_spectrum(model, x, layers=["head"], method="power")
    with pytest.raises(FlowscopeError, match="k must be"):
        fs.jacobian_spectrum(model, x, method="power", k=0)
