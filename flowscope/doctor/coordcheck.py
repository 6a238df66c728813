"""The coordinate check (Yang et al. 2021, "Tensor Programs V", section 7 and the ``mup``
package's ``get_coord_data``): train the same model at several widths for a few steps and see
whether the size of each layer's activation coordinates depends on the width.

For every width the factory builds a model (seeded), Adam (or SGD) trains it for ``steps``
steps on one fixed batch — inputs N(0, 1) of ``input_shape``, a mean-squared-error loss to
fixed N(0, 1) targets of the output's shape — and ``fs.watch`` records every forward pass:
step ``t`` is the forward pass after ``t`` updates (``0``: at init). A coordinate's size is
the **rms** of the module's output (the recorder's statistic; ``mup`` uses the mean absolute
value, which scales the same). Per layer and step the **slope** of log size against log width
says how the size scales: ≈ 0 is width-stable; under the standard parametrization with Adam,
hidden and output coordinates grow about linearly with width once training starts (slope ≈ 1).

The check fails for a layer whose slope at some step after the first update exceeds
``threshold`` (0.5 by default: a size that grows like √width or faster); slopes at init are
shown but not judged (a μP readout shrinks like 1/width at init, by design).

Example:
    >>> import torch
    >>> from torch import nn
    >>> def make(width):
    ...     return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width),
    ...                          nn.ReLU(), nn.Linear(width, 1))
    >>> sp = coord_check(make, [32, 64, 128], input_shape=(8,), steps=3, lr=0.01)
    >>> sp.slopes.columns.tolist()
    ['layer', 'step', 'slope']
    >>> sp.unstable.layer.tolist()[-1], sp.ok
    ('4', False)
    >>> mup = coord_check(make, [32, 64, 128], input_shape=(8,), steps=3, lr=0.01,
    ...                   parametrization="mup")
    >>> mup.ok
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from flowscope.core.errors import FlowscopeError, unknown
from flowscope.models.mup import PARAMETRIZATIONS, apply_parametrization, param_groups
from flowscope.record.recorder import watch

__all__ = ["OPTIMIZERS", "CoordCheck", "coord_check", "width_slopes"]

OPTIMIZERS = ("adam", "sgd")
_MAX_ELEMENTS = 50_000_000  # one input batch: more is a typo, not a coordinate check


@dataclass
class CoordCheck:
    """What :func:`coord_check` measured: ``sizes`` (width, step, layer, size), ``slopes``
    (layer, step, slope) and the rows over the threshold (``unstable``)."""

    sizes: pd.DataFrame
    slopes: pd.DataFrame
    threshold: float
    parametrization: str

    @property
    def unstable(self) -> pd.DataFrame:
        """Layers and steps (after the first update) whose slope exceeds the threshold."""
        late = self.slopes[self.slopes.step >= 1]
        return late[late.slope > self.threshold].reset_index(drop=True)

    @property
    def ok(self) -> bool:
        return self.unstable.empty

    def summary(self, most: int = 8) -> str:
        """A few lines for a terminal: the verdict, the worst layers, the output layer."""
        widths = sorted(self.sizes.width.unique())
        last = int(self.slopes.step.max())
        at_last = self.slopes[self.slopes.step == last].set_index("layer").slope
        head = (
            f"coordinate check ({self.parametrization}), widths {', '.join(map(str, widths))}, "
            f"steps 0..{last}: slope of log rms vs log width, threshold {self.threshold:g}"
        )
        lines = [head]
        if self.ok:
            lines.append(f"OK: every layer's slope <= {self.threshold:g} after the first update")
        else:
            worst = self.unstable.sort_values("slope", ascending=False)
            worst = worst.drop_duplicates("layer").head(most)
            lines.append(f"UNSTABLE: {self.unstable.layer.nunique()} layer(s) grow with width")
            lines += [
                f"  {r.layer}: slope {r.slope:.2f} at step {r.step}" for r in worst.itertuples()
            ]

        output = at_last.index[-1]
        by_step = self.slopes[self.slopes.layer == output].sort_values("step").slope
        lines.append(
            f"output layer {output}: slope by step 0..{last}: "
            + " ".join(f"{v:.2f}" for v in by_step)
        )
        return "\n".join(lines)


def _slope(widths: np.ndarray, sizes: np.ndarray) -> float:
    if len(widths) < 2 or not (np.isfinite(sizes).all() and (sizes > 0).all()):
        return float("nan")
    return float(np.polyfit(np.log(widths), np.log(sizes), 1)[0])


def width_slopes(sizes: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Per layer and step the slope of log size against log width (NaN where a size is zero
    or not finite): columns layer, step, slope, by step and then by ``order`` of layers.

    Example:
        >>> sizes = pd.DataFrame({"width": [64, 128, 256], "step": 0, "layer": "fc",
        ...                       "size": [1.0, 2.0, 4.0]})
        >>> width_slopes(sizes, ["fc"]).slope.round(6).tolist()
        [1.0]
    """
    rows = []
    for (layer, _), group in sizes.groupby(["layer", "step"], sort=False):
        group = group.sort_values("width")
        slope = _slope(group.width.to_numpy(float), group["size"].to_numpy(float))
        rows.append((layer, int(group["step"].iloc[0]), slope))
    slopes = pd.DataFrame(rows, columns=["layer", "step", "slope"])
    slopes["layer"] = pd.Categorical(slopes.layer, categories=order, ordered=True)
    slopes = slopes.sort_values(["step", "layer"]).reset_index(drop=True)
    slopes["layer"] = slopes.layer.astype(str)
    return slopes


def _check(
    widths: Sequence[int], steps: int, lr: float, optimizer: str, shape: tuple[int, ...]
) -> list[int]:
    ws = list(widths)
    if len(ws) < 2 or any(not isinstance(w, int) or w < 1 for w in ws) or len(set(ws)) < len(ws):
        raise FlowscopeError(f"widths={ws!r}: allowed: two or more different integers >= 1")
    if not isinstance(steps, int) or steps < 1:
        raise FlowscopeError(f"steps={steps!r}: allowed: an integer >= 1")
    if not lr > 0:
        raise FlowscopeError(f"lr={lr!r}: allowed: a number above 0")
    if optimizer not in OPTIMIZERS:
        raise unknown("optimizer", optimizer, OPTIMIZERS)
    if math.prod(shape) > _MAX_ELEMENTS:
        raise FlowscopeError(
            f"input shape {shape} has {math.prod(shape):,} elements; "
            f"allowed: at most {_MAX_ELEMENTS:,}"
        )
    return sorted(ws)


def coord_check(
    factory: Callable[[int], nn.Module],
    widths: Sequence[int],
    *,
    input_shape: tuple[int, ...],
    batch: int = 64,
    steps: int = 5,
    lr: float = 1e-2,
    optimizer: str = "adam",
    parametrization: str = "sp",
    threshold: float = 0.5,
    seed: int = 0,
    device: str = "cpu",
) -> CoordCheck:
    """Train ``factory(width)`` for ``steps`` steps at each width; the sizes and their slopes.

    ``parametrization``: ``"sp"`` trains the model as the factory built it, one learning
    rate; ``"mup"`` applies :mod:`flowscope.models.mup` (Adam only) with the smallest width as
    the base width.
    """
    shape = (batch, *input_shape)
    ws = _check(widths, steps, lr, optimizer, shape)
    if parametrization not in PARAMETRIZATIONS:
        raise unknown("parametrization", parametrization, PARAMETRIZATIONS)
    if parametrization == "mup" and optimizer != "adam":
        raise FlowscopeError(
            f"optimizer={optimizer!r} with μP: allowed: adam (the μP rules here are Adam's)"
        )
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device)
    target: torch.Tensor | None = None
    frames = []
    for width in ws:
        torch.manual_seed(seed)
        try:
            model = factory(width)
        except Exception as err:
            raise FlowscopeError(
                f"factory(width={width}) failed: {type(err).__name__}: {err}"
            ) from err
        if not isinstance(model, nn.Module):
            raise FlowscopeError(
                f"factory(width={width}) returned a {type(model).__name__}, not a torch.nn.Module"
            )
        model = model.to(device)
        apply_parametrization(model, parametrization, width / ws[0])  # the smallest: the base
        mult = width / ws[0]
        groups = param_groups(model, lr=lr, parametrization=parametrization, width_mult=mult)
        opt: torch.optim.Optimizer = (
            torch.optim.Adam(groups) if optimizer == "adam" else torch.optim.SGD(groups)
        )
        with watch(model, kinds=["activation"], bins=1, hist_sample=16) as rec:
            for step in range(steps + 1):
                try:
                    out = model(x)
                except Exception as err:
                    raise FlowscopeError(
                        f"the model of width {width} failed on inputs of shape {shape}: "
                        f"{type(err).__name__}: {err}"
                    ) from err
                if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                    raise FlowscopeError(
                        f"the model of width {width} returned {type(out).__name__}; "
                        "allowed: a floating-point tensor"
                    )
                if target is None:
                    target = torch.randn(out.shape, generator=gen).to(out)
                if out.shape != target.shape:
                    raise FlowscopeError(
                        f"the output's shape changes with the width: {tuple(target.shape)} at "
                        f"width {ws[0]}, {tuple(out.shape)} at width {width}; allowed: a "
                        "factory whose width changes the hidden layers only"
                    )
                if step == steps:
                    break
                torch.nn.functional.mse_loss(out, target).backward()
                opt.step()
                opt.zero_grad()
                rec.step()
        stats = rec.stats
        stats = stats[stats.call == stats.call.min()]
        frames.append(stats[["step", "layer_idx", "layer", "rms"]].assign(width=width))
    sizes = pd.concat(frames, ignore_index=True).rename(columns={"rms": "size"})
    order = sizes.drop_duplicates("layer").sort_values("layer_idx").layer.tolist()
    slopes = width_slopes(sizes, order)
    sizes = sizes[["width", "step", "layer", "size"]]
    return CoordCheck(sizes, slopes, threshold, parametrization)
