"""Study nets: the module-naming contract, forward passes against plain tensor math, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowscope.core.activations import ACTIVATIONS
from flowscope.core.errors import FlowscopeError
from flowscope.models.nets import NETS, build_net


def _leaves(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if not list(m.children())]


def _expected(depth: int, children: list[str], head: bool) -> list[str]:
    names = [f"layers.{i}.{child}" for i in range(depth) for child in children]
    return [*names, "head"] if head else names


def _x(model: nn.Module, n: int = 6, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *model.input_shape, generator=gen)  # type: ignore[arg-type]


def test_registry_holds_the_study_nets() -> None:
    assert NETS.names() == ["conv", "mlp", "resconv", "resmlp"]


@pytest.mark.parametrize("name", NETS.names())
def test_every_net_builds_runs_and_backpropagates_with_defaults(name) -> None:
    model = build_net(name)
    out = model(_x(model, n=4))
    assert out.shape[0] == 4 and torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_default_mlp_is_the_lecture_net() -> None:
    model = build_net("mlp")
    assert _leaves(model) == _expected(10, ["linear", "act"], head=False)
    assert model.input_shape == (500,)
    assert all(b.linear.in_features == 500 == b.linear.out_features for b in model.layers)
    assert all(isinstance(b.act, nn.Tanh) for b in model.layers)


@pytest.mark.parametrize(
    ("norm", "children", "norm_type"),
    [
        ("none", ["linear", "act"], None),
        ("batchnorm", ["linear", "norm", "act"], nn.BatchNorm1d),
        ("layernorm", ["linear", "norm", "act"], nn.LayerNorm),
    ],
)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("out_dim", [None, 3])
def test_mlp_leaf_names_and_order(norm, children, norm_type, residual, out_dim) -> None:
    kwargs = {"norm": norm, "residual": residual, "out_dim": out_dim}
    model = build_net("mlp", in_dim=4, width=5, depth=3, **kwargs)
    assert _leaves(model) == _expected(3, children, head=out_dim is not None)
    if norm_type is not None:
        assert all(type(b.norm) is norm_type for b in model.layers)


@pytest.mark.parametrize("name", ACTIVATIONS.names())
def test_mlp_activation_modules_come_from_the_registry(name) -> None:
    model = build_net("mlp", in_dim=3, width=4, depth=2, activation=name)
    expected = type(ACTIVATIONS.get(name).module())
    assert [type(b.act) for b in model.layers] == [expected, expected]
    assert model.layers[0].act is not model.layers[1].act


def _plain_mlp(model: nn.Module, x: Tensor, norm: str, residual: bool) -> Tensor:
    """The MLP written out in tensor math, from its parameters alone."""
    h = x
    for block in model.layers:
        w, b = block.linear.weight, block.linear.bias
        s = h @ w.T + b
        if norm == "batchnorm":  # training mode: batch statistics, biased variance
            mean, var = s.mean(0), s.var(0, unbiased=False)
            s = (s - mean) / torch.sqrt(var + 1e-5) * block.norm.weight + block.norm.bias
        elif norm == "layernorm":
            mean, var = s.mean(1, keepdim=True), s.var(1, unbiased=False, keepdim=True)
            s = (s - mean) / torch.sqrt(var + 1e-5) * block.norm.weight + block.norm.bias
        out = torch.tanh(s)
        h = h + out if residual and w.shape[0] == w.shape[1] else out
    return h @ model.head.weight.T + model.head.bias


@pytest.mark.parametrize("norm", ["none", "batchnorm", "layernorm"])
@pytest.mark.parametrize("residual", [False, True])
def test_mlp_forward_equals_plain_tensor_math(norm, residual) -> None:
    torch.manual_seed(0)
    model = build_net("mlp", in_dim=7, width=9, depth=4, out_dim=3, norm=norm, residual=residual)
    x = _x(model, n=16)
    torch.testing.assert_close(model(x), _plain_mlp(model, x, norm, residual))


def test_residual_mlp_forward_equals_a_loop_over_its_blocks() -> None:
    # in_dim != width: the first block cannot have a skip, all later ones do.
    model = build_net("mlp", in_dim=6, width=8, depth=5, out_dim=2, residual=True)
    x = _x(model)
    h = model.layers[0](x)
    for block in list(model.layers)[1:]:
        h = h + block(h)
    assert torch.equal(model(x), model.head(h))
    plain = build_net("mlp", in_dim=6, width=8, depth=5, out_dim=2, residual=False)
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(plain(x), model(x))


def test_residual_mlp_with_equal_in_and_width_skips_every_block() -> None:
    model = build_net("mlp", in_dim=8, width=8, depth=3, residual=True)
    x = _x(model)
    h = x
    for block in model.layers:
        h = h + block(h)
    assert torch.equal(model(x), h)


def test_mlp_without_bias_and_with_flattened_input() -> None:
    model = build_net("mlp", in_dim=16, width=4, depth=2, out_dim=2, bias=False)
    assert [n for n, _ in model.named_parameters()] == [
        "layers.0.linear.weight",
        "layers.1.linear.weight",
        "head.weight",
    ]
    x = torch.randn(3, 1, 4, 4)
    assert torch.equal(model(x), model(x.flatten(1)))


def test_builds_are_independent() -> None:
    a, b = (
        build_net("mlp", in_dim=3, width=3, depth=1),
        build_net("mlp", in_dim=3, width=3, depth=1),
    )
    assert a.layers[0].linear.weight is not b.layers[0].linear.weight


@pytest.mark.parametrize(
    ("norm", "children"), [("none", ["conv", "act"]), ("batchnorm", ["conv", "norm", "act"])]
)
def test_conv_leaf_names_and_order(norm, children) -> None:
    model = build_net("conv", in_channels=2, image_size=6, channels=4, depth=3, norm=norm)
    assert _leaves(model) == _expected(3, children, head=True)
    assert model.input_shape == (2, 6, 6)
    if norm == "batchnorm":
        assert all(isinstance(b.norm, nn.BatchNorm2d) for b in model.layers)


def test_conv_forward_equals_plain_tensor_math() -> None:
    model = build_net("conv", in_channels=2, image_size=6, channels=4, depth=3, out_dim=5)
    x = _x(model, n=3)
    h = x
    for block in model.layers:
        h = F.relu(F.conv2d(h, block.conv.weight, block.conv.bias, padding=1))
        assert h.shape[-2:] == (6, 6)
    expected = h.mean(dim=(2, 3)) @ model.head.weight.T + model.head.bias
    torch.testing.assert_close(model(x), expected)


def test_conv_first_block_takes_the_input_channels() -> None:
    model = build_net("conv", in_channels=1, channels=8, depth=2)
    assert model.layers[0].conv.weight.shape == (8, 1, 3, 3)
    assert model.layers[1].conv.weight.shape == (8, 8, 3, 3)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("mlp", {"depth": 0}, r"net 'mlp': depth must be an integer >= 1, got 0"),
        ("mlp", {"depth": 2.5}, r"depth must be an integer >= 1, got 2.5"),
        ("mlp", {"depth": True}, r"depth must be an integer >= 1, got True"),
        ("mlp", {"width": 0}, r"width must be an integer >= 1, got 0"),
        ("mlp", {"in_dim": -3}, r"in_dim must be an integer >= 1, got -3"),
        ("mlp", {"out_dim": 0}, r"out_dim must be an integer >= 1, got 0"),
        ("mlp", {"activation": "tahn"}, r"activation 'tahn' in net 'mlp': did you mean 'tanh'"),
        ("mlp", {"norm": "bn"}, r"norm 'bn' in net 'mlp'.*Allowed: batchnorm, layernorm, none"),
        ("mlp", {"residual": 1}, r"residual must be True or False, got 1"),
        ("mlp", {"bias": "yes"}, r"bias must be True or False, got 'yes'"),
        ("mlp", {"widht": 3}, r"argument 'widht': did you mean 'width'\?"),
        (
            "conv",
            {"norm": "layernorm"},
            r"norm 'layernorm' in net 'conv'.*Allowed: batchnorm, none",
        ),
        ("conv", {"channels": 0}, r"net 'conv': channels must be an integer >= 1, got 0"),
        ("conv", {"image_size": 0}, r"image_size must be an integer >= 1, got 0"),
        ("conv", {"in_channels": None}, r"in_channels must be an integer >= 1, got None"),
        ("conv", {"depth": -1}, r"depth must be an integer >= 1, got -1"),
        ("conv", {"out_dim": 0}, r"out_dim must be an integer >= 1, got 0"),
        ("conv", {"activation": "Relu"}, r"activation 'Relu' in net 'conv': did you mean"),
        ("conv", {"kernel": 5}, r"net 'conv' argument 'kernel'"),
        ("mpl", {}, r"unknown net 'mpl': did you mean 'mlp'\?"),
    ],
)
def test_bad_argument(name, kwargs, message) -> None:
    with pytest.raises(FlowscopeError, match=message):
        build_net(name, **kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [
        ("mlp", {"in_dim": 4}, (2, 5)),
        ("conv", {"in_channels": 1, "image_size": 8}, (2, 1, 9, 9)),
        ("conv", {"in_channels": 1, "image_size": 8}, (1, 8, 8)),
    ],
)
def test_input_of_the_wrong_shape(name, kwargs, shape) -> None:
    model = build_net(name, **kwargs)
    with pytest.raises(FlowscopeError, match=rf"input of shape \({shape[0]}, .*expected"):
        model(torch.zeros(shape))
