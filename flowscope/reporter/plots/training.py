"""A training run over its steps: the loss curve (:func:`loss_curve`), one statistic per
layer and step as a heat map (:func:`layer_steps`) and as lines for a few layers
(:func:`layer_lines`). All bin the steps into at most
``points`` buckets, so a run of 100 k steps draws as fast as one of 1 k: the loss as the
bucket's mean with a band from its minimum to its maximum (spikes stay visible), the heat
map as the bucket's mean of log10.

Example:
    >>> import pandas as pd
    >>> scalars = pd.DataFrame({"run": "", "step": range(5000), "name": "loss",
    ...                         "value": [1 / (1 + s) for s in range(5000)]})
    >>> ax = loss_curve(scalars, points=200)
    >>> len(ax.lines[0].get_xdata())  # 5000 steps drawn as 200 buckets
    200
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from flowscope.core.errors import FlowscopeError
from flowscope.reporter.plots.common import KIND_LABEL, flow_layers, new_ax, short_name, spread

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["envelope", "layer_lines", "layer_steps", "loss_curve"]


def envelope(steps: np.ndarray, values: np.ndarray, points: int) -> pd.DataFrame:
    """Per bucket of consecutive steps (at most ``points``): step (its middle), mean, min, max
    of the finite values."""
    order = np.argsort(steps, kind="stable")
    steps, values = steps[order], values[order]
    bucket = np.minimum((np.arange(len(steps)) * points) // max(len(steps), 1), points - 1)
    frame = pd.DataFrame({"bucket": bucket, "step": steps, "value": values})
    frame = frame[np.isfinite(frame["value"])]
    grouped = frame.groupby("bucket")
    return pd.DataFrame(
        {
            "step": grouped["step"].mean(),
            "mean": grouped["value"].mean(),
            "min": grouped["value"].min(),
            "max": grouped["value"].max(),
        }
    ).reset_index(drop=True)


def loss_curve(
    scalars: pd.DataFrame, name: str = "loss", ax: Axes | None = None, points: int = 600
) -> Axes:
    """The loss (or another scalar: ``lr``) over the steps, on a log y axis when positive.

    Raises:
        FlowscopeError: when ``scalars`` has no row named ``name``.
    """
    rows = scalars[scalars["name"] == name]
    if rows.empty:
        raise FlowscopeError(
            f"no scalar {name!r} in the frame (it has {sorted(set(scalars.name))})"
        )
    ax = new_ax(ax, (6.0, 3.0))
    env = envelope(rows["step"].to_numpy(), rows["value"].to_numpy(dtype=float), points)
    ax.fill_between(env["step"], env["min"], env["max"], alpha=0.25, linewidth=0)
    ax.plot(env["step"], env["mean"], linewidth=1.2)
    if len(env) and (env["min"] > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    return ax


def layer_steps(
    stats: pd.DataFrame,
    kind: str,
    column: str = "rms",
    ax: Axes | None = None,
    points: int = 300,
) -> Axes:
    """log10 of ``column`` per layer (y) and step (x) for one kind (every layer of the kind,
    its first call, first tensor ``weight`` for the parameter kinds).

    Raises:
        FlowscopeError: when ``stats`` has no row of ``kind``.
    """
    rows, layers = _kind_rows(stats, kind, column)
    steps = np.sort(rows["step"].unique())
    bucket = np.minimum((np.arange(len(steps)) * points) // len(steps), points - 1)
    rows["bucket"] = rows["step"].map(dict(zip(steps, bucket, strict=True)))
    with np.errstate(divide="ignore", invalid="ignore"):
        rows["log"] = np.log10(rows[column].abs())
    rows.loc[~np.isfinite(rows["log"]), "log"] = np.nan
    grid = rows.pivot_table(index="layer", columns="bucket", values="log", aggfunc="mean")
    grid = grid.reindex(index=layers)
    first = rows.groupby("bucket")["step"].min()
    last = rows.groupby("bucket")["step"].max()
    ax = new_ax(ax, (7.0, 3.2))
    lo, hi = float(first.min()), float(last.max())
    image = ax.imshow(
        grid.to_numpy(dtype=float),
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        extent=(lo - 0.5, hi + 0.5, -0.5, len(layers) - 0.5),
        cmap="viridis",
    )
    ax.figure.colorbar(image, ax=ax, label=f"log10 {column}")
    shown = spread(layers, 20)
    ax.set_yticks([layers.index(n) for n in shown])
    ax.set_yticklabels([short_name(n, 16) for n in shown], fontsize=7)
    ax.set_xlabel("step")
    ax.set_title(f"{KIND_LABEL.get(kind, kind.replace('_', ' '))}: {column} per layer")
    return ax


def layer_lines(
    stats: pd.DataFrame,
    kind: str,
    column: str = "rms",
    layers: list[str] | None = None,
    ax: Axes | None = None,
    points: int = 300,
    most: int = 4,
) -> Axes:
    """``column`` over the steps for a few layers of one kind, one line each (the bucket's
    mean) with a band from the bucket's minimum to its maximum, on a log y axis when
    positive; ``layers`` default: ``most`` of them spread from the first to the last.

    Example:
        >>> steps = range(3000)
        >>> stats = pd.DataFrame({"step": [s for s in steps for _ in (0, 1)],
        ...     "layer": ["a", "b"] * 3000, "layer_idx": [0, 1] * 3000, "call": 0,
        ...     "kind": "activation", "tensor": "output", "module_type": "ReLU",
        ...     "rms": [1.0 + s % 7 for s in steps for _ in (0, 1)]})
        >>> ax = layer_lines(stats, "activation", points=100)
        >>> [len(line.get_xdata()) for line in ax.lines]  # 3000 steps as 100 buckets
        [100, 100]

    Raises:
        FlowscopeError: when ``stats`` has no row of ``kind``, or ``layers`` names one it
            does not have.
    """
    rows, names = _kind_rows(stats, kind, column)
    if layers is None:
        layers = spread(names, most)
    unknown = [n for n in layers if n not in names]
    if unknown:
        raise FlowscopeError(f"no {kind!r} rows for layers {unknown}; it has {names}")
    ax = new_ax(ax, (6.5, 3.0))
    positive = True
    for name in layers:
        one = rows[rows["layer"] == name]
        env = envelope(one["step"].to_numpy(), one[column].to_numpy(dtype=float), points)
        line = ax.plot(env["step"], env["mean"], linewidth=1.1, label=short_name(name, 20))
        ax.fill_between(
            env["step"], env["min"], env["max"], alpha=0.2, linewidth=0, color=line[0].get_color()
        )
        positive &= bool(len(env) and (env["min"] > 0).all())
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(column)
    ax.set_title(f"{KIND_LABEL.get(kind, kind.replace('_', ' '))}: {column}")
    ax.legend(fontsize=7, loc="best")
    return ax


def _kind_rows(stats: pd.DataFrame, kind: str, column: str) -> tuple[pd.DataFrame, list[str]]:
    """One row per (layer, step) of ``kind`` (its first call; the ``weight`` tensor for the
    parameter kinds; the activation-function layers for the flow kinds), and the layers in
    execution order."""
    rows = stats[(stats["kind"] == kind) & (stats["call"] == 0)]
    if kind in ("weight", "weight_grad", "update_ratio"):
        rows = rows[rows["tensor"] == "weight"]
    elif kind in ("activation", "gradient"):
        rows = rows[rows["layer"].isin(flow_layers(rows))]
    if rows.empty:
        raise FlowscopeError(f"no {kind!r} rows to draw over the steps")
    rows = rows.groupby(["layer_idx", "layer", "step"], as_index=False)[[column]].mean()
    layers = rows.drop_duplicates("layer_idx").sort_values("layer_idx")["layer"].tolist()
    return rows, layers
