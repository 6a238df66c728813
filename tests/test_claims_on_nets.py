"""The built-in studies' gradient claims, judged on nets whose answer is known by construction.

A claim about how gradients flow must hold on a net whose backpropagated signal does what the
claim says and fail on one whose signal does not: orthogonal linear layers scaled by g make
dL/dh grow by exactly g per layer toward the input; a sigmoid whose inputs sit at +20 passes
on a factor sigma'(8) = 3.4e-4, one whose inputs are ~0 a factor 1/4.
"""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
import torch
from torch import nn

import flowscope as fs
from flowscope.models.nets import build_net
from flowscope.study import spec
from flowscope.study.claims import evaluate_one

NO_PROBES = pd.DataFrame(columns=["config", "probe", "step", "layer", "value"])


def claim(study: str, claim_id: str) -> dict:
    (found,) = [c for c in spec.load(study).claims if c["id"] == claim_id]
    return found


def stats_of(model: nn.Module, x: torch.Tensor, **axes: object):
    """One recorded forward/backward (a random projection of the output as the loss, so the
    backward signal does not depend on the forward weights), as a one-config study frame."""
    with fs.watch(model, kinds=["activation", "gradient", "weight_grad"]) as rec:
        out = model(x)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
    return rec.stats.assign(config="c0", seed=0, **axes)


def orthogonal_chain(gain: float, activation: str = "linear") -> nn.Module:
    """A 10-block MLP whose square weights are orthogonal times ``gain``: through identity
    activations dL/dh grows by exactly ``gain`` per layer toward the input."""
    torch.manual_seed(0)
    net = build_net("mlp", in_dim=64, width=64, depth=10, out_dim=64, activation=activation)
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.orthogonal_(module.weight, gain=gain)
            nn.init.zeros_(module.bias)
    return net


X = torch.randn(128, 64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    ("study", "claim_id", "axes"),
    [
        ("init-scales", "relu-he-gradients-nice", {"activation": "relu", "init": "he"}),
        ("init-scales", "tanh-xavier-gradients-nice", {"activation": "tanh", "init": "xavier"}),
    ],
)
def test_a_nice_range_claim_holds_on_a_flat_signal_and_fails_on_a_growing_one(
    study, claim_id, axes
):
    c = claim(study, claim_id)
    flat = stats_of(orthogonal_chain(1.0), X, norm="none", **axes)
    growing = stats_of(orthogonal_chain(3.0), X, norm="none", **axes)
    assert evaluate_one(c, flat, NO_PROBES, [*axes, "norm"]).status == "held"
    assert evaluate_one(c, growing, NO_PROBES, [*axes, "norm"]).status == "not held"


@pytest.mark.parametrize(
    ("claim_id", "activation"),
    [("tanh-large-gradients-explode", "tanh"), ("relu-large-gradients-explode", "relu")],
)
def test_an_explode_claim_fails_on_a_net_whose_gradients_do_not_explode(claim_id, activation):
    c = claim("init-scales", claim_id)
    axes = {"activation": activation, "init": "large", "norm": "none"}
    flat = stats_of(orthogonal_chain(1.0), X, **axes)
    exploding = stats_of(orthogonal_chain(2.0), X, **axes)  # 2^7 over the inner layers
    assert evaluate_one(c, flat, NO_PROBES, list(axes)).status == "not held"
    assert evaluate_one(c, exploding, NO_PROBES, list(axes)).status == "held"


def sigmoid_net(bias: float) -> nn.Module:
    """Sigmoid blocks whose pre-activations are ``bias`` give or take 1e-3 (orthogonal weights
    times 1e-3: small enough to leave sigma' at sigma'(bias), large enough to pass the
    gradient on without underflow)."""
    torch.manual_seed(0)
    net = build_net("mlp", in_dim=64, width=64, depth=5, out_dim=64, activation="sigmoid")
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.orthogonal_(module.weight, gain=1e-3)
            nn.init.constant_(module.bias, bias)
    return net


def test_the_sigmoid_claims_read_the_local_factor_against_saturation():
    axes = {"activation": "sigmoid", "init": "large", "n": 128}
    saturated = stats_of(sigmoid_net(8.0), X, **axes)  # sigma'(8) = 3.4e-4
    unsaturated = stats_of(sigmoid_net(0.0), X, **axes)  # sigma'(0) = 1/4
    kills = claim("activations", "sigmoid-saturation-kills-gradients")
    saturates = claim("activations", "sigmoid-large-saturates")
    assert evaluate_one(kills, saturated, NO_PROBES, list(axes)).status == "held"
    assert evaluate_one(saturates, saturated, NO_PROBES, list(axes)).status == "held"
    assert evaluate_one(kills, unsaturated, NO_PROBES, list(axes)).status == "not held"
    assert evaluate_one(saturates, unsaturated, NO_PROBES, list(axes)).status == "not held"
    passes = claim("activations", "sigmoid-unsaturated-passes-gradients")
    v = evaluate_one(passes, unsaturated.assign(init="xavier"), NO_PROBES, list(axes))
    assert v.status == "held"
    assert all(val == pytest.approx(0.25, rel=1e-4) for val in v.numbers["interval"]["all"])


def bn_relu_net(depth: int = 16) -> nn.Module:
    torch.manual_seed(0)
    net = build_net("mlp", in_dim=256, width=256, depth=depth, out_dim=10, activation="relu",
                    norm="batchnorm")  # fmt: skip
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.1)
            nn.init.zeros_(module.bias)
    return net


def test_the_batchnorm_gain_claim_reads_measured_over_the_mean_field_prediction():
    from flowscope.study.probes import ProbeContext, meanfield_grad

    net, x = bn_relu_net(), torch.randn(512, 256, generator=torch.Generator().manual_seed(1))
    running = [b.clone() for b in net.buffers()]
    predicted = meanfield_grad(ProbeContext(model=net, x=x, initial={}))
    assert all(torch.equal(a, b) for a, b in zip(running, net.buffers(), strict=True))
    # the probe's profile: sqrt(pi / (pi - 1)) per layer toward the input (Yang et al. 2019),
    # each layer's up to its sampled weights' norm (256 x 256 entries: ~0.5% per layer)
    inner = [predicted[f"layers.{i}.linear"].item() for i in range(1, 9)]
    gains = [a / b for a, b in itertools.pairwise(inner)]
    gain = (torch.pi / (torch.pi - 1)) ** 0.5
    assert gains == pytest.approx([gain] * 7, rel=0.025)
    assert (inner[0] / inner[-1]) ** (1 / 7) == pytest.approx(gain, rel=0.01)
    axes = {"norm": "batchnorm", "mode": "train"}
    stats = stats_of(net, x, **axes)
    probes = pd.DataFrame(
        [("c0", "meanfield_grad", 0, name, v.item()) for name, v in predicted.items()],
        columns=["config", "probe", "step", "layer", "value"],
    ).assign(seed=0, **axes)  # the engine's probes frame carries the config columns
    c = claim("batchnorm", "bn-gradient-gain-mean-field")
    v = evaluate_one(c, stats, probes, list(axes))
    assert v.status == "held", v.detail  # measured within 3% of the prediction
    assert v.numbers["predicted"]["c0"] == pytest.approx(1.2112, rel=0.01)
    assert v.numbers["measured"]["c0"] == pytest.approx(1.2112, rel=0.03)
    # the old theory's profile (no gain through batchnorm) is caught by the same claim
    flat = probes.assign(value=1.0)
    old = evaluate_one(c, stats, flat, list(axes))
    assert old.status == "not held" and old.numbers["value"]["c0"] > 1.15


def test_a_prediction_over_other_layers_than_the_measurement_is_refused():
    from flowscope.core.errors import FlowscopeError

    axes = {"norm": "batchnorm", "mode": "train"}
    net, x = bn_relu_net(depth=4), torch.randn(64, 256)
    stats = stats_of(net, x, **axes)
    probes = pd.DataFrame([("c0", "meanfield_grad", 0, "layers.1.linear", 1.0)],
                          columns=["config", "probe", "step", "layer", "value"]
                          ).assign(seed=0, **axes)  # fmt: skip
    with pytest.raises(FlowscopeError, match=r"predicts layers \['layers.1.linear'\]"):
        evaluate_one(claim("batchnorm", "bn-gradient-gain-mean-field"), stats, probes, list(axes))
