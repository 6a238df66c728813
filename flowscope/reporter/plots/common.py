"""What every figure of :mod:`flowscope.reporter.plots` shares: the rows it draws, the
layers in order, the panel grid it draws on (kept for a redraw), and panel text and ticks.

Example:
    >>> frame = pd.DataFrame({"layer": ["fc", "act"], "layer_idx": [0, 1],
    ...                       "module_type": ["Linear", "ReLU"], "run": ["a", "a"]})
    >>> group_column(frame), flow_layers(frame)
    ('run', ['act'])
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from flowscope.core.catalogue import activation_type
from flowscope.core.errors import FlowscopeError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "KIND_LABEL",
    "at_step",
    "axes_row",
    "clear_panel",
    "decade_label",
    "first_call",
    "flow_layers",
    "group_column",
    "is_activation_type",
    "kind_rows",
    "label_text",
    "log_y",
    "name_ticks",
    "new_ax",
    "note",
    "one_group",
    "panels",
    "short_name",
    "spread",
    "with_grid",
]

KIND_LABEL = {
    "activation": "activations",
    "gradient": "gradients dL/d(output)",
    "weight": "weights",
    "weight_grad": "weight gradients dL/dW",
}
# What the figure functions put on a figure, so that drawing the same figure again reuses it
# instead of adding more: the panel grid (key, every panel including hidden spares,
# figure-level extras such as a legend). Weak: the figure owns them.
_GRIDS: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], list[Any], list[Any]]] = (
    weakref.WeakKeyDictionary()
)


# -- selecting rows ---------------------------------------------------------------------------


def group_column(frame: pd.DataFrame) -> str:
    """``"config"`` for study frames, else ``"run"``.

    Example:
        >>> group_column(pd.DataFrame({"run": ["a"], "config": ["c0"]}))
        'config'
    """
    return "config" if "config" in frame.columns else "run"


def is_activation_type(module_type: str) -> bool:
    """Whether a module type is an activation function (its output: a layer's activations).

    Example:
        >>> is_activation_type("Tanh"), is_activation_type("NewGELUActivation")
        (True, True)
        >>> is_activation_type("Linear"), is_activation_type("LayerNorm")
        (False, False)
    """
    return activation_type(module_type) is not None  # the catalogue's, other libraries' too


def flow_layers(frame: pd.DataFrame, layers: Sequence[str] | None = None) -> list[str]:
    """The layers a figure shows, in execution order.

    Example:
        >>> f = pd.DataFrame({"layer": ["l0", "a0", "l1", "a1"], "layer_idx": [0, 1, 2, 3],
        ...                   "module_type": ["Linear", "Tanh", "Linear", "Tanh"]})
        >>> flow_layers(f)
        ['a0', 'a1']

    Args:
        frame: a stats or hists frame.
        layers: names to keep (in the frame's order); default: the activation-function
            modules when there are any, else every layer.

    Raises:
        FlowscopeError: when a name in ``layers`` is not in the frame.
    """
    # numpy on the layer codes: pandas' groupby on string columns costs milliseconds a call
    codes, uniques = pd.factorize(frame["layer"])
    rows = np.flatnonzero(codes >= 0)  # a missing name is no layer
    codes = codes[rows]
    lowest = np.full(len(uniques), np.inf)
    np.fmin.at(lowest, codes, frame["layer_idx"].to_numpy(float)[rows])
    order = np.argsort(lowest, kind="stable")  # by first index, ties in order of appearance
    names = [str(uniques[i]) for i in order]
    if layers is not None:
        missing = [n for n in layers if n not in set(names)]
        if missing:
            raise FlowscopeError(f"layers {missing} not in the frame; it has {names}")
        wanted = set(layers)
        return [n for n in names if n in wanted]
    first = rows[np.unique(codes, return_index=True)[1]]  # each layer's first row
    types = frame["module_type"].to_numpy(dtype=object)[first]
    acts = [names[k] for k, i in enumerate(order) if is_activation_type(str(types[i]))]
    return acts or names


def one_group(frame: pd.DataFrame, what: str) -> pd.DataFrame:
    """The frame, checked to hold a single config / run (figures of one network)."""
    col = group_column(frame)
    groups: list[Any] = list(frame[col].unique()) if col in frame.columns else []
    if len(groups) > 1:
        shown = ", ".join(repr(str(g)) for g in groups[:6])
        raise FlowscopeError(
            f"{what} draws one {col} at a time; the frame has {len(groups)} ({shown}"
            f"{', ...' if len(groups) > 6 else ''}): filter it, e.g. "
            f"frame[frame.{col} == {str(groups[0])!r}]"
        )
    return frame


def at_step(frame: pd.DataFrame, step: int | None) -> tuple[pd.DataFrame, int]:
    """Rows of ``step`` (default: the last recorded step)."""
    if frame.empty:
        return frame, 0
    steps = sorted(int(s) for s in frame["step"].unique())
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        raise FlowscopeError(f"step {step} was not recorded; recorded steps: {steps}")
    return frame[frame["step"] == chosen], chosen


def first_call(frame: pd.DataFrame) -> pd.DataFrame:
    """One snapshot per layer: the first call and the first output tensor."""
    if frame.empty:
        return frame
    # per (step, layer) the least (call, rank, tensor), ties in row order; then every row of
    # that call and tensor. In numpy: pandas' sort, drop_duplicates and merge took ~10 ms
    tensor = frame["tensor"]
    # a bare output ("") or a layer's "weight" before its bias or other outputs
    rank = (~tensor.isin(["", "weight"])).to_numpy(dtype=int)
    names, known = pd.factorize(tensor, sort=True)
    names = np.where(names < 0, len(known), names)  # a missing tensor name sorts last
    steps = pd.factorize(frame["step"], use_na_sentinel=False)[0]
    layers, seen = pd.factorize(frame["layer"], use_na_sentinel=False)
    group = steps * len(seen) + layers
    call = frame["call"].to_numpy()
    order = np.lexsort((names, rank, call))
    ids, at = np.unique(group[order], return_index=True)
    chosen = np.empty(group.max() + 1, dtype=np.int64)
    chosen[ids] = order[at]
    pick = chosen[group]
    keep = (call == call[pick]) & (names == names[pick])
    return frame[keep].reset_index(drop=True)


def kind_rows(frame: pd.DataFrame, kind: str, what: str) -> pd.DataFrame:
    """The rows of one recorded ``kind``; an error naming the kinds there when it has none."""
    rows = frame[frame["kind"] == kind]
    if rows.empty:
        kinds = sorted(frame["kind"].unique()) if "kind" in frame.columns else []
        raise FlowscopeError(f"{what}: no {kind!r} rows in the frame (kinds there: {kinds})")
    return rows


# -- panels -----------------------------------------------------------------------------------


def label_text(name: object) -> str:
    """A name from a model or a file, safe for matplotlib (no mathtext from a ``$``)."""
    return str(name).replace("$", r"\$")


def short_name(name: str, width: int = 22) -> str:
    """A layer name cut to its last ``width`` characters, for a panel title or tick.

    Example:
        >>> short_name("encoder.layers.11.mlp.act", 12)
        '….11.mlp.act'
    """
    short = name if len(name) <= width else "…" + name[-(width - 1) :]
    return label_text(short)


def axes_row(
    fig: Figure | None,
    n: int,
    size: tuple[float, float],
    per_row: int | None = None,
    key: tuple[Any, ...] = (),
) -> tuple[Figure, list[Axes], bool]:
    """``n`` panels on ``fig`` (or a new pyplot figure), ``per_row`` to a row; spares hidden.

    Returns the figure, the panels and whether they are new. On a figure this gave the same
    panels before (same ``n``, ``per_row`` and ``key``: the caller and what else fixes the
    panels' set-up), they come back emptied by :func:`clear_panel`, scales and tick settings
    kept, rather than as new axes: creating matplotlib axes and their ticks is most of the
    cost of a figure. A figure it gave other panels is cleared first.
    """
    per_row = min(n, per_row or n)
    rows = -(-n // per_row)
    if fig is None:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=size)
    shape = (rows, per_row, n, *key)
    kept = _GRIDS.get(fig)
    if kept is not None:
        old_shape, old_grid, extras = kept
        present = fig.axes
        if old_shape == shape and all(ax in present for ax in old_grid):
            for artist in extras:
                artist.remove()
            extras.clear()
            return fig, [clear_panel(ax) for ax in old_grid[:n]], False
        fig.clear()
    grid = list(fig.subplots(rows, per_row, squeeze=False).ravel())
    for spare in grid[n:]:
        spare.set_visible(False)
    _GRIDS[fig] = (shape, grid, [])
    return fig, grid[:n], True


def panels(fig: Any, n: int) -> list[Axes]:
    """``n`` panels side by side on ``fig`` (a Figure or SubFigure), for functions that draw
    on an ``ax``: the ones made for ``fig`` before, emptied by :func:`clear_panel`, or new
    ones (the report redraws its heat-map and saturation figures for every config this way).
    """
    return axes_row(fig, n, (0.0, 0.0), key=("panels",))[1]


def with_grid(fig: Any, artist: Any) -> None:
    """Remove ``artist`` (a figure legend, ...) when :func:`axes_row` reuses the grid."""
    if fig in _GRIDS:
        _GRIDS[fig][2].append(artist)


def clear_panel(ax: Axes) -> Axes:
    """Empty a panel so that the function that drew it can draw on it again; returns it.

    Much cheaper than new axes, whose creation and first ticks are most of what a figure
    costs in matplotlib. Data, notes, title, axis labels and legend go and the data limits
    are forgotten; scales, tick settings and a colorbar stay, for the function to set again
    (a colorbar of :func:`log_heatmap` is updated, not added twice). Figure functions with a
    ``fig`` argument do this themselves when given a figure they drew before; the report
    draws every config on the same figures this way.

    Example:
        >>> from matplotlib.figure import Figure
        >>> ax = Figure().subplots()
        >>> _ = ax.plot([1, 2]), ax.set_title("run a")
        >>> clear_panel(ax).lines, ax.get_title()
        (<Axes.ArtistList of 0 lines>, '')
    """
    for artist in [*ax.patches, *ax.texts, *ax.lines, *ax.collections, *ax.images]:
        artist.remove()
    legend = ax.get_legend()
    if legend is not None:
        legend.remove()
    ax.set_title("")
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.relim()
    ax.set_autoscale_on(True)
    return ax


def new_ax(ax: Axes | None, size: tuple[float, float]) -> Axes:
    """``ax``, or a panel on a new pyplot figure of ``size`` inches."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.figure(figsize=size).subplots()


def name_ticks(ax: Axes, names: Sequence[str], offset: float = 0.0, most: int = 30) -> None:
    """Layer names as x tick labels at positions 0, 1, ... (+ offset); at most ``most``."""
    shown = spread(list(names), most)
    at = {n: i for i, n in enumerate(names)}
    ax.set_xticks([at[n] + offset for n in shown])
    ax.set_xticklabels([short_name(n, 16) for n in shown], rotation=40, ha="right", fontsize=7)


def spread(items: Sequence[str], most: int) -> list[str]:
    """At most ``most`` items, evenly spread, first and last kept.

    Example:
        >>> spread(list("abcdefg"), 3)
        ['a', 'd', 'g']
    """
    if len(items) <= most:
        return list(items)
    picks = np.unique(np.round(np.linspace(0, len(items) - 1, most)).astype(int))
    return [items[i] for i in picks]


# -- panel text and ticks ---------------------------------------------------------------------


def note(ax: Axes, text: str) -> None:
    """``text`` in a box at the top right of a panel."""
    box = {"boxstyle": "round,pad=0.2", "fc": "white", "ec": "0.7", "alpha": 0.9}
    ax.text(0.97, 0.95, text, transform=ax.transAxes, ha="right", va="top", fontsize=7, bbox=box)


def log_y(ax: Axes, numticks: int = 5) -> None:
    """Log y axis, decades only, plain labels: mathtext labels and minor ticks are slow to draw."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(numticks=numticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: decade_label(v)))
    ax.yaxis.set_minor_locator(NullLocator())


def decade_label(v: float) -> str:
    """1, 10, 100, 1000, then 1e4, 1e-2: short labels for decade ticks.

    Example:
        >>> decade_label(100.0), decade_label(1e5), decade_label(0.001), decade_label(0.0)
        ('100', '1e5', '1e-3', '')
    """
    if v <= 0 or not math.isfinite(v):
        return ""
    return f"{v:g}" if 1e-2 <= v < 1e4 else f"1e{round(math.log10(v))}"
