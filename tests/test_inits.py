"""Weight-init schemes: the drawn values against their formulas, written out here again."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowscope.core.errors import FlowscopeError
from flowscope.models.inits import INITS, apply_init, fans, init_std

# Parameters a scheme needs to run at all; every other entry runs with none.
REQUIRED = {"normal": {"std": 0.05}}
NONRANDOM = {"zeros", "constant"}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _params(name: str) -> dict[str, object]:
    return dict(REQUIRED.get(name, {}))


def _filled(name: str, shape: tuple[int, ...], seed: int = 0, **params: object) -> torch.Tensor:
    weight = torch.full(shape, float("nan"))
    gen = torch.Generator().manual_seed(seed)
    return INITS.get(name)(weight, generator=gen, **{**_params(name), **params})


def _gaussian_names() -> list[str]:
    return [n for n in INITS.names() if init_std(n, 500, 500, **_params(n))]


def test_registry_holds_exactly_the_documented_schemes() -> None:
    assert INITS.names() == sorted(
        [
            *["zeros", "constant", "small", "large", "xavier", "glorot", "he", "orthogonal"],
            *["normal", "repeated_rows", "meanfield", "meanfield_orthogonal"],
        ]
    )


def test_repeated_rows_makes_identical_units_at_the_xavier_scale() -> None:
    w = INITS.get("repeated_rows")(
        torch.empty(300, 400), generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(w, w[:1].expand_as(w))  # every unit starts identical
    assert w[0].std().item() == pytest.approx(400**-0.5, rel=0.1)
    assert init_std("repeated_rows", 400, 300) is None  # not i.i.d.: no Gaussian std to quote


@pytest.mark.parametrize("name", INITS.names())
@pytest.mark.parametrize("shape", [(7, 5), (4, 3, 3), (6, 2, 3, 3), (2, 2, 2, 2, 2)])
def test_every_scheme_writes_every_entry_of_linear_and_conv_weights(name, shape) -> None:
    weight = _filled(name, shape)
    assert weight.shape == shape
    assert torch.isfinite(weight).all()  # the NaN sentinel is gone everywhere


@pytest.mark.parametrize("name", INITS.names())
def test_same_seed_gives_identical_weights(name) -> None:
    assert torch.equal(_filled(name, (50, 40), seed=3), _filled(name, (50, 40), seed=3))


@pytest.mark.parametrize("name", sorted(set(INITS.names()) - NONRANDOM))
def test_different_seed_gives_different_weights(name) -> None:
    assert not torch.equal(_filled(name, (50, 40), seed=3), _filled(name, (50, 40), seed=4))


# The formulas, written again independently of flowscope.models.inits (n_in = n_out = 500).
EXPECTED_STD_500 = {
    "small": 0.01,
    "large": 1.0,
    "xavier": 1 / math.sqrt(500),  # DD2424: sigma = 1/sqrt(n_in)
    "glorot": math.sqrt(2 / (500 + 500)),
    "he": math.sqrt(2 / 500),
    "normal": 0.05,
    "meanfield": 1 / math.sqrt(500),  # sigma_w2 = 1 by default: sqrt(sigma_w2 / n_in)
}


def test_expected_table_covers_every_gaussian_scheme() -> None:
    assert sorted(EXPECTED_STD_500) == _gaussian_names()


@pytest.mark.parametrize("name", sorted(EXPECTED_STD_500))
def test_gaussian_scheme_on_500x500_has_its_std(name) -> None:
    weight = _filled(name, (500, 500))
    expected = EXPECTED_STD_500[name]
    assert init_std(name, 500, 500, **_params(name)) == pytest.approx(expected, rel=1e-12)
    assert weight.std().item() == pytest.approx(expected, rel=0.02)
    assert abs(weight.mean().item()) < 0.01 * expected


def test_xavier_and_glorot_differ_when_fans_differ() -> None:
    # Linear(500 -> 200): DD2424's Xavier uses n_in only, Glorot the average of both fans.
    xavier, glorot = _filled("xavier", (200, 500)), _filled("glorot", (200, 500))
    assert xavier.std().item() == pytest.approx(1 / math.sqrt(500), rel=0.03)
    assert glorot.std().item() == pytest.approx(math.sqrt(2 / 700), rel=0.03)
    assert glorot.std().item() > 1.1 * xavier.std().item()
    assert init_std("xavier", 500, 200) != init_std("glorot", 500, 200)


def test_conv_scheme_uses_in_channels_times_kernel_as_fan_in() -> None:
    weight = _filled("he", (64, 32, 3, 3))  # fan_in = 32 * 9 = 288
    assert weight.std().item() == pytest.approx(math.sqrt(2 / 288), rel=0.03)


def test_zeros_and_constant() -> None:
    assert torch.count_nonzero(_filled("zeros", (5, 4))) == 0
    assert torch.equal(_filled("constant", (5, 4)), torch.full((5, 4), 0.01))
    assert torch.equal(_filled("constant", (5, 4), value=-0.3), torch.full((5, 4), -0.3))
    assert init_std("zeros", 5, 5) == 0.0
    assert init_std("constant", 5, 5) is None
    assert init_std("orthogonal", 5, 5) is None


@pytest.mark.parametrize("shape", [(300, 500), (500, 500)])
def test_orthogonal_rows_are_orthonormal(shape) -> None:
    weight = _filled("orthogonal", shape).double()
    eye = torch.eye(shape[0], dtype=torch.double)
    torch.testing.assert_close(weight @ weight.T, eye, atol=1e-5, rtol=0)


def test_orthogonal_tall_matrix_has_orthonormal_columns_and_gain_scales() -> None:
    weight = _filled("orthogonal", (500, 300), gain=2.0).double()
    eye = torch.eye(300, dtype=torch.double)
    torch.testing.assert_close(weight.T @ weight, 4 * eye, atol=1e-5, rtol=0)


def test_orthogonal_conv_weight_is_orthogonal_once_flattened() -> None:
    flat = _filled("orthogonal", (16, 3, 3, 3)).reshape(16, -1).double()
    torch.testing.assert_close(flat @ flat.T, torch.eye(16, dtype=torch.double), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "shape", [(20, 500), (500, 20), (8, 3, 5), (16, 3, 3, 3), (8, 2, 3, 3), (4, 2, 2, 3, 5)]
)
def test_fans_agree_with_torch(shape) -> None:
    weight = torch.empty(shape)
    assert fans(weight) == nn.init._calculate_fan_in_and_fan_out(weight)


def test_fans_of_linear_and_grouped_conv() -> None:
    assert fans(nn.Linear(500, 20).weight) == (500, 20)
    assert fans(nn.Conv2d(4, 8, 3, groups=2).weight) == (2 * 9, 8 * 9)


class _Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.body = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.Conv2d(2, 3, 3))
        self.vol = nn.Conv3d(1, 2, 2, bias=False)
        self.up = nn.ConvTranspose2d(2, 3, 3)
        self.emb = nn.Embedding(10, 4)


def test_apply_init_touches_exactly_linear_and_conv_and_zeroes_their_biases() -> None:
    model = _Zoo()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_init(model, "large", generator=torch.Generator().manual_seed(0))
    assert names == ["fc", "body.0", "body.2", "vol"]
    after = model.state_dict()
    for key in ["fc.weight", "body.0.weight", "body.2.weight", "vol.weight"]:
        assert not torch.equal(before[key], after[key])
    for key in ["fc.bias", "body.0.bias", "body.2.bias"]:
        assert torch.count_nonzero(after[key]) == 0
    for key in ["up.weight", "up.bias", "emb.weight", "body.1.weight", "body.1.bias"]:
        assert torch.equal(before[key], after[key])


def test_apply_init_with_bias_none_leaves_biases() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    biases = [model[0].bias.clone(), model[1].bias.clone()]
    apply_init(model, "he", bias=None)
    assert torch.equal(model[0].bias, biases[0]) and torch.equal(model[1].bias, biases[1])


def test_apply_init_uses_each_layers_own_fan_in() -> None:
    model = nn.Sequential(nn.Linear(500, 400), nn.Tanh(), nn.Linear(400, 500))
    apply_init(model, "xavier", generator=torch.Generator().manual_seed(0))
    assert model[0].weight.std().item() == pytest.approx(1 / math.sqrt(500), rel=0.03)
    assert model[2].weight.std().item() == pytest.approx(1 / math.sqrt(400), rel=0.03)


def test_apply_init_is_reproducible_and_leaves_leaf_parameters() -> None:
    def build() -> nn.Module:
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
        apply_init(model, "he", generator=torch.Generator().manual_seed(7))
        return model

    first, second = build(), build()
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
        assert a.is_leaf and a.requires_grad and a.grad_fn is None


def test_apply_init_checks_every_layer_before_changing_any() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.LazyLinear(2))
    before = model[0].weight.clone()
    with pytest.raises(FlowscopeError, match=r"layer '1' \(LazyLinear\)"):
        apply_init(model, "large")
    assert torch.equal(model[0].weight, before)


def test_unknown_scheme() -> None:
    with pytest.raises(FlowscopeError, match=r"unknown init 'xavir': did you mean 'xavier'\?"):
        apply_init(nn.Linear(2, 2), "xavir")


def test_normal_without_std() -> None:
    with pytest.raises(FlowscopeError, match=r"init 'normal' needs parameter 'std'"):
        init_std("normal", 5, 5)


def test_normal_with_negative_std() -> None:
    with pytest.raises(FlowscopeError, match=r"std=-1 is not allowed; std must be a finite"):
        INITS.get("normal")(torch.empty(2, 2), std=-1)


def test_normal_with_non_number_std() -> None:
    with pytest.raises(FlowscopeError, match=r"std='0.1' is not allowed"):
        apply_init(nn.Linear(2, 2), "normal", std="0.1")


def test_misspelt_parameter() -> None:
    with pytest.raises(FlowscopeError, match=r"parameter 'sdt': did you mean 'std'\?"):
        apply_init(nn.Linear(2, 2), "normal", sdt=0.1)


def test_parameter_for_a_scheme_without_parameters() -> None:
    with pytest.raises(FlowscopeError, match=r"init 'xavier' takes no parameters, got std=0.1"):
        apply_init(nn.Linear(2, 2), "xavier", std=0.1)


def test_orthogonal_with_zero_gain() -> None:
    with pytest.raises(FlowscopeError, match=r"gain=0 is not allowed; gain must be a finite"):
        init_std("orthogonal", 5, 5, gain=0)


def test_constant_with_nan_value() -> None:
    with pytest.raises(FlowscopeError, match=r"value=nan is not allowed"):
        init_std("constant", 5, 5, value=float("nan"))


def test_bad_bias_option() -> None:
    with pytest.raises(FlowscopeError, match=r"bias='ones' is not allowed; use 'zeros' or None"):
        apply_init(nn.Linear(2, 2), "he", bias="ones")


def test_fan_in_below_one() -> None:
    with pytest.raises(FlowscopeError, match=r"fan_in must be an integer >= 1, got 0"):
        init_std("he", 0, 5)


def test_fans_of_a_vector() -> None:
    with pytest.raises(FlowscopeError, match=r"got shape \(3,\)"):
        fans(torch.empty(3))


def test_generator_on_another_device_than_the_weight() -> None:
    model = nn.Linear(2, 2, device="meta")
    with pytest.raises(FlowscopeError, match=r"generator is on cpu but the weight .* is on meta"):
        apply_init(model, "he", generator=torch.Generator())


@CUDA
def test_apply_init_on_cuda_draws_on_the_device() -> None:
    model = nn.Linear(500, 500, device="cuda")
    apply_init(model, "he", generator=torch.Generator(device="cuda").manual_seed(0))
    assert model.weight.std().item() == pytest.approx(math.sqrt(2 / 500), rel=0.03)
    with pytest.raises(FlowscopeError, match=r"generator is on cpu"):
        apply_init(model, "he", generator=torch.Generator())


@pytest.mark.parametrize("name", ["meanfield", "meanfield_orthogonal", "orthogonal"])
def test_mean_field_schemes_draw_biases_with_variance_sigma_b2(name) -> None:
    net = nn.Sequential(nn.Linear(300, 400), nn.Tanh(), nn.Linear(400, 400))
    gen = torch.Generator().manual_seed(0)
    apply_init(net, name, generator=gen, sigma_b2=0.09)
    for layer in (net[0], net[2]):
        assert layer.bias.std().item() == pytest.approx(0.3, rel=0.1)
    apply_init(net, name, generator=gen)  # sigma_b2 = 0 by default: biases 0 as elsewhere
    assert not net[0].bias.any()


def test_meanfield_weights_have_variance_sigma_w2_over_fan_in() -> None:
    weight = _filled("meanfield", (400, 300), sigma_w2=1.76)
    assert init_std("meanfield", 300, 400, sigma_w2=1.76) == pytest.approx(math.sqrt(1.76 / 300))
    assert weight.var().item() == pytest.approx(1.76 / 300, rel=0.03)


def test_meanfield_orthogonal_is_orthogonal_times_sqrt_sigma_w2() -> None:
    weight = _filled("meanfield_orthogonal", (300, 300), sigma_w2=1.5).double()
    assert torch.allclose(weight @ weight.T, 1.5 * torch.eye(300, dtype=torch.float64), atol=1e-5)
