"""Two runs in one figure: their losses overlaid (:func:`loss_overlay`) and a per-layer
statistic of each at its last step (:func:`layer_pair`).

Example:
    >>> import pandas as pd
    >>> scalars = pd.DataFrame({"run": ["a"] * 50 + ["b"] * 50, "step": list(range(50)) * 2,
    ...                         "name": "loss", "value": [1.0] * 50 + [2.0] * 50})
    >>> ax = loss_overlay(scalars)
    >>> [line.get_label() for line in ax.lines]
    ['a', 'b']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from flowscope.core.errors import FlowscopeError
from flowscope.reporter.plots.common import name_ticks, new_ax
from flowscope.reporter.plots.training import envelope

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["layer_pair", "loss_overlay"]


def loss_overlay(
    scalars: pd.DataFrame,
    name: str = "loss",
    by: str = "run",
    ax: Axes | None = None,
    points: int = 600,
) -> Axes:
    """One scalar (the loss) of each run over the steps, overlaid: per run the mean of each
    bucket of steps (at most ``points``) and a band from its minimum to its maximum.

    Raises:
        FlowscopeError: when no run has a scalar ``name``.
    """
    rows = scalars[scalars["name"] == name]
    if rows.empty:
        raise FlowscopeError(f"no scalar {name!r} to draw (scalars: {sorted(set(scalars.name))})")
    ax = new_ax(ax, (6.5, 3.0))
    positive = True
    for run, mine in rows.groupby(by, sort=False):
        env = envelope(mine["step"].to_numpy(), mine["value"].to_numpy(dtype=float), points)
        (line,) = ax.plot(env["step"], env["mean"], linewidth=1.2, label=str(run))
        ax.fill_between(
            env["step"], env["min"], env["max"], alpha=0.2, linewidth=0, color=line.get_color()
        )
        positive &= bool(len(env)) and bool((env["min"] > 0).all())
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.legend(fontsize=8)
    return ax


def layer_pair(
    layers: pd.DataFrame,
    columns: Sequence[str],
    labels: Sequence[str],
    ax: Axes | None = None,
    title: str = "",
) -> Axes:
    """One line per column (``act_rms_a``, ``act_rms_b``) over the layers of ``layers`` in
    its row order, log y axis where positive; a missing value leaves a gap.

    Raises:
        FlowscopeError: when none of ``columns`` holds a finite value.
    """
    ax = new_ax(ax, (7.0, 3.0))
    x = np.arange(len(layers))
    drawn = False
    for column, label in zip(columns, labels, strict=True):
        values = layers[column].to_numpy(dtype=float)
        shown = np.where(np.isfinite(values) & (values > 0), values, np.nan)
        drawn |= bool(np.isfinite(shown).any())
        ax.plot(x, shown, marker="o", markersize=3, linewidth=1.2, label=label)
    if not drawn:
        raise FlowscopeError(f"no positive finite value in {list(columns)} to draw")
    ax.set_yscale("log")
    name_ticks(ax, [str(n) for n in layers["layer"]])
    ax.set_xlabel("layer")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return ax
