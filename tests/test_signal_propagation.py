"""Signal-propagation plots (Brock, De & Smith 2021): the numbers against closed forms and an
independent numpy computation on the same weights; the residual-block rule; errors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from flowscope.core.errors import FlowscopeError
from flowscope.doctor.signal import residual_blocks, signal_propagation

GAMMA_RELU = math.sqrt(2 / (1 - 1 / math.pi))  # Var(relu(z)) = (1 - 1/pi) / 2 for z ~ N(0, 1)


class LinearBlock(nn.Module):
    """x + W x, W ~ N(0, sigma2 / n): both stream statistics grow by 1 + sigma2 per block."""

    def __init__(self, n: int, sigma2: float):
        super().__init__()
        self.fc = nn.Linear(n, n, bias=False)
        nn.init.normal_(self.fc.weight, std=math.sqrt(sigma2 / n))

    def forward(self, x):
        return x + self.fc(x)


class WSLinear(nn.Linear):
    """Scaled weight standardisation (Brock et al. 2021, eq. 3): rows of zero mean and norm
    gain, so a branch adds no mean shift."""

    def __init__(self, n: int, gain: float):
        super().__init__(n, n, bias=False)
        self.gain = gain

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(1, keepdim=True)) / (
            w.std(1, keepdim=True, unbiased=False) * math.sqrt(w.shape[1])
        )
        return nn.functional.linear(x, self.gain * w)


class NFBlock(nn.Module):
    """x + alpha * f(x / beta), f variance-preserving (NF-ResNet)."""

    def __init__(self, n: int, alpha: float, beta: float):
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.fc1, self.fc2 = WSLinear(n, 1.0), WSLinear(n, GAMMA_RELU)

    def forward(self, x):
        return x + self.alpha * self.fc2(torch.relu(self.fc1(x / self.beta)))


class PreActBN(nn.Module):
    """x + W relu(BN(x)) with He init: the branch has variance ~1 whatever the stream's."""

    def __init__(self, n: int):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(n), nn.Linear(n, n, bias=False)
        nn.init.normal_(self.fc.weight, std=math.sqrt(2 / n))

    def forward(self, x):
        return x + self.fc(torch.relu(self.bn(x)))


def test_linear_stack_matches_numpy_and_closed_form():
    torch.manual_seed(0)
    n, depth, sigma2 = 512, 8, 0.5
    net = nn.Sequential(*[LinearBlock(n, sigma2) for _ in range(depth)]).double()
    x = torch.randn(256, n, dtype=torch.float64) + 0.3  # a mean for the squared-mean column
    spp = signal_propagation(net, x)

    h = x.numpy()
    expect = [(np.mean(h.mean(0) ** 2), np.mean(h.var(0)), np.nan)]
    for block in net:
        branch = h @ block.fc.weight.detach().numpy().T
        h = h + branch
        expect.append((np.mean(h.mean(0) ** 2), np.mean(h.var(0)), np.mean(branch.var(0))))
    got = spp[["channel_mean_sq", "channel_var", "branch_var"]].to_numpy()
    np.testing.assert_allclose(got, np.array(expect), rtol=1e-10)

    # E|x + Wx|^2 = (1 + sigma2) |x|^2: both statistics grow geometrically, the branch is
    # sigma2 times the stream it reads
    k = spp.depth.to_numpy()
    v0, m0 = spp.channel_var[0], spp.channel_mean_sq[0]
    np.testing.assert_allclose(spp.channel_var, v0 * (1 + sigma2) ** k, rtol=0.08)
    np.testing.assert_allclose(spp.channel_mean_sq, m0 * (1 + sigma2) ** k, rtol=0.25)
    np.testing.assert_allclose(
        spp.branch_var[1:], sigma2 * v0 * (1 + sigma2) ** (k[1:] - 1), rtol=0.08
    )


def test_nf_scaling_grows_one_plus_k_alpha_squared():
    torch.manual_seed(1)
    n, depth, alpha = 1024, 10, 0.2
    net = nn.Sequential(*[NFBlock(n, alpha, math.sqrt(1 + k * alpha**2)) for k in range(depth)])
    spp = signal_propagation(net, torch.randn(512, n))
    k = spp.depth.to_numpy()
    # Var(x_k) = Var(x_0) + k alpha^2 (Brock et al. 2021, section 4); sampling error ~0.5% here
    np.testing.assert_allclose(spp.channel_var, spp.channel_var[0] + k * alpha**2, rtol=0.02)
    np.testing.assert_allclose(spp.branch_var[1:], alpha**2, rtol=0.03)
    assert spp.channel_mean_sq.max() < 0.01  # weight standardisation: no mean shift


def test_batchnorm_resnet_grows_linearly_and_keeps_running_stats():
    torch.manual_seed(2)
    n, depth = 512, 12
    net = nn.Sequential(*[PreActBN(n) for _ in range(depth)])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    spp = signal_propagation(net, torch.randn(256, n))
    # each branch reads a normalised input, so it adds the same amount per block: linear
    # growth, not geometric. The He branch W relu(z) has second moment 2 * E[relu(z)^2] = 1,
    # of which the channel mean (W times E[relu(z)] = 1/sqrt(2 pi)) carries 1/pi: the mean
    # shift of Brock et al. (section 4.1); the rest, 1 - 1/pi, is channel variance.
    np.testing.assert_allclose(spp.branch_var[1:], 1 - 1 / math.pi, rtol=0.03)
    var_slope = np.polyfit(spp.depth, spp.channel_var, 1)[0]
    mean_slope = np.polyfit(spp.depth, spp.channel_mean_sq, 1)[0]
    assert var_slope == pytest.approx(1 - 1 / math.pi, rel=0.05)
    assert mean_slope == pytest.approx(1 / math.pi, rel=0.25)  # 12 random sums per channel
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats put back
    assert all(m.training for m in net.modules())


def test_blocks_found_by_the_rule():
    class TwoBranches(nn.Module):  # a transformer block: x + attn(x), then + mlp(...)
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = x + self.a(x)
            return h + self.b(h)

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            x += self.a(x)
            return x

    class Plain(nn.Module):  # y = f(x) + g(x): no operand is the input itself
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) + self.b(x)

    class Stage(nn.Module):  # a residual stage holding residual blocks: only the outer counts
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(TwoBranches(), TwoBranches())

        def forward(self, x):
            return x + self.inner(x)

    net = nn.Sequential(TwoBranches(), Plain(), nn.Sequential(InPlace()), Stage(), nn.ReLU())
    assert [name for name, _ in residual_blocks(net)] == ["0", "2.0", "3"]

    torch.manual_seed(0)
    x = torch.randn(16, 4)
    spp = signal_propagation(net, x)
    assert spp.block.tolist() == ["", "0", "2.0", "3"]
    # the in-place block's branch is measured against its input before the add
    h = net[1](net[0](x))
    block = net[2][0]
    branch = block.a(h.clone()).detach()
    assert spp.branch_var[2] == pytest.approx(
        float(branch.double().var(0, unbiased=False).mean()), rel=1e-6
    )


def test_declared_blocks_and_conv_channels():
    class ConvBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent: torch.fx cannot trace it
                return x
            return x + self.conv(x)

    net = nn.Sequential(ConvBlock(), ConvBlock())
    with pytest.raises(
        FlowscopeError, match=r"no residual block found.*could not trace \['0', '1'\].*blocks="
    ):
        residual_blocks(net)
    x = torch.randn(8, 3, 5, 5) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    spp = signal_propagation(net, x, blocks=[ConvBlock])
    # channels are dim 1: per-channel variances 1, 4, 9 -> their average ~ 14/3
    per_channel = x.double().transpose(0, 1).reshape(3, -1).var(1, unbiased=False)
    assert spp.channel_var[0] == pytest.approx(float(per_channel.mean()), rel=1e-12)
    assert signal_propagation(net, x, blocks=["1"]).block.tolist() == ["", "1"]


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        (["nosuch"], r"blocks=\['nosuch'\]: no such module in the model"),
        ([nn.Conv2d], r"matches no module of the model"),
    ],
)
def test_bad_blocks_named(blocks, message):
    with pytest.raises(FlowscopeError, match=message):
        signal_propagation(nn.Sequential(nn.Linear(3, 3)), torch.randn(2, 3), blocks=blocks)


def test_no_residual_block_and_shape_change_are_clear_errors():
    with pytest.raises(
        FlowscopeError, match=r"no residual block found: none of the model's modules"
    ):
        signal_propagation(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), torch.randn(2, 3))
    with pytest.raises(FlowscopeError, match=r"block '0' changes the shape \(2, 3\) -> \(2, 4\)"):
        signal_propagation(nn.Sequential(nn.Linear(3, 4)), torch.randn(2, 3), blocks=["0"])


def test_signal_plot_draws_the_frame():
    import matplotlib

    matplotlib.use("Agg")
    from flowscope.reporter.plots import signal_plot

    torch.manual_seed(3)
    nets = {
        "linear": nn.Sequential(*[LinearBlock(64, 0.5) for _ in range(4)]),
        "bn": nn.Sequential(*[PreActBN(64) for _ in range(4)]),
    }
    frames = [
        signal_propagation(net, torch.randn(32, 64)).assign(model=name)
        for name, net in nets.items()
    ]
    frame = pd.concat(frames, ignore_index=True)
    fig = signal_plot(frame, by="model", log=True)
    branch = fig.axes[2]
    assert [line.get_label() for line in branch.lines] == ["linear", "bn"]
    np.testing.assert_allclose(branch.lines[1].get_ydata(), frames[1].branch_var[1:])
    assert branch.get_yscale() == "log"
    assert signal_plot(frame, by="model", log=True, fig=fig) is fig  # redrawn in place
    assert len(fig.axes) == 3 and len(fig.axes[0].lines) == 2
    with pytest.raises(FlowscopeError, match=r"by='nosuch' is not a column"):
        signal_plot(frame, by="nosuch")
