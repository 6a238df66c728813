"""Measuring, on real nets, what the mean-field theory predicts (the lecture's nets).

``python -m flowscope.theory.measure [seeds]`` prints theory against measurement for the
DD2424 lecture-4 nets. Torch and numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from flowscope.models.inits import apply_init
from flowscope.models.nets import build_net
from flowscope.theory.meanfield import predict_mlp

__all__ = ["measure_mlp"]


def measure_mlp(
    activation: str,
    init: str,
    *,
    fan_in: int = 500,
    depth: int = 10,
    batch: int = 1000,
    seed: int = 0,
    **init_params: object,
) -> dict[str, np.ndarray]:
    """Measure, on a real ``nets.mlp``, what :func:`predict_mlp` predicts.

    Example:
        >>> got = measure_mlp("tanh", "xavier", fan_in=64, depth=3, batch=256)
        >>> sorted(got)
        ['act_std', 'grad_gain', 'pre_std']

    Inputs are N(0, 1); weights from ``init`` with zero biases (``inits.apply_init``); the
    loss is ⟨output, r⟩ with r ~ N(0, 1) drawn independently, so dL/d(output) does not depend
    on the forward weights (the gradient-independence assumption of the theory; a loss such
    as mean(output²) correlates them and inflates the top layers' gradient gain by up to √2).

    Returns:
        ``pre_std`` and ``act_std`` per layer (std over batch × units of the Linear output and
        of the activation output) and ``grad_gain`` (length depth − 1: rms of dL/d(Linear
        output) at layer l over that at l + 1).
    """
    net = build_net("mlp", activation=activation, in_dim=fan_in, width=fan_in, depth=depth)
    params: dict[str, Any] = dict(init_params)
    apply_init(net, init, generator=torch.Generator().manual_seed(seed), **params)
    x = torch.randn(batch, fan_in, generator=torch.Generator().manual_seed(10_000 + seed))
    pre, post, h = [], [], x
    for block in net.layers:  # type: ignore[union-attr]
        s = block.linear(h)
        s.retain_grad()
        h = block.act(s)
        pre.append(s)
        post.append(h)
    r = torch.randn(h.shape, generator=torch.Generator().manual_seed(20_000 + seed))
    (h * r).sum().backward()
    grad = np.array([float(s.grad.double().pow(2).mean().sqrt()) for s in pre])
    return {
        "pre_std": np.array([float(s.detach().double().std(unbiased=False)) for s in pre]),
        "act_std": np.array([float(a.detach().double().std(unbiased=False)) for a in post]),
        "grad_gain": grad[:-1] / grad[1:],
    }


def _lecture_table(seeds: int = 1) -> str:
    """Theory against measurement on the DD2424 lecture-4 nets, as text."""
    lines = [
        "10 layers x 500 units, N(0,1) inputs, batch 1000; max |measured/predicted - 1| "
        f"over layers (and {seeds} seed(s))",
        f"{'config':<14} {'pre-act std':>11} {'act std':>9} {'layer gain':>10} "
        f"{'dL/dh gain':>10}   predicted: last pre-act std, dL/dh gain per layer",
    ]
    for act in ("tanh", "relu"):
        for init in ("small", "large", "xavier", "he"):
            pred = predict_mlp(act, init, fan_in=500, depth=10)
            worst = np.zeros(4)
            for seed in range(seeds):
                got = measure_mlp(act, init, seed=seed)
                gains = got["pre_std"][1:] / got["pre_std"][:-1]
                devs = [
                    got["pre_std"] / pred["pre_std"],
                    got["act_std"] / pred["act_std"],
                    gains / pred["act_gain"][1:],
                    got["grad_gain"] / pred["grad_gain"][:-1],
                ]
                worst = np.maximum(worst, [np.abs(d - 1).max() for d in devs])
            lines.append(
                f"{act + ' ' + init:<14} {worst[0]:>11.1%} {worst[1]:>9.1%} {worst[2]:>10.1%} "
                f"{worst[3]:>10.1%}   {pred['pre_std'][-1]:.3g}, {pred['grad_gain'][-2]:.4g}"
            )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m flowscope.theory.measure [seeds]
    import sys

    print(_lecture_table(int(sys.argv[1]) if len(sys.argv) > 1 else 1))
