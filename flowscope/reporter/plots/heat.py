"""The log-magnitude histograms as heat maps: over layers (:func:`log_heatmap`), or over
steps per layer (:func:`log_heatmap_steps`, fastai's "colorful dimension").

Example:
    >>> import flowscope as fs
    >>> ax = log_heatmap(fs.load(model_dir).hists, kind="gradient")  # one run's records
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from flowscope.reporter.plots.common import (
    KIND_LABEL,
    at_step,
    axes_row,
    decade_label,
    first_call,
    flow_layers,
    kind_rows,
    name_ticks,
    new_ax,
    one_group,
    short_name,
    spread,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["log_heatmap", "log_heatmap_steps"]

# each colorbar by the panel it belongs to, so that a redraw updates it. Weak: the figure owns it
_COLORBARS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _magnitude_rows(log: pd.DataFrame) -> pd.DataFrame:
    """Log-histogram rows with ``row``: the decade index of |x| (sign merged); zeros get -inf."""
    lo, hi = log["lo"].to_numpy(float), log["hi"].to_numpy(float)
    mag = np.minimum(np.abs(lo), np.abs(hi))
    per_decade = _per_decade(lo, hi)
    with np.errstate(divide="ignore"):
        row = np.floor(np.log10(mag) * per_decade + 1e-9) / per_decade
    is_zero = (lo == 0) & (hi == 0)
    underflow = (mag == 0) & ~is_zero
    row = np.where(underflow, -np.inf, row)  # below every decade: shown with the zeros' row
    return log.assign(row=np.where(is_zero, -np.inf, row), is_zero=is_zero | underflow)


def _per_decade(lo: np.ndarray, hi: np.ndarray) -> int:
    ratio = np.abs(hi / np.where(lo == 0, np.nan, lo))
    regular = ratio[np.isfinite(ratio) & (ratio > 1)]
    return round(1 / math.log10(float(regular.min()))) if regular.size else 1


def _heat_matrix(log: pd.DataFrame, column: str) -> tuple[pd.DataFrame, list[float]]:
    """Fractions (rows: zero row then decades, columns: ``column`` values, sorted)."""
    rows = _magnitude_rows(log)
    decade = rows["row"].to_numpy(float)
    ok = ~np.isnan(decade)  # no magnitude (a non-finite bin): no row
    # counts summed per (decade, column) with numpy: pivot_table costs ~10 ms a call
    values, at = np.unique(decade[ok], return_inverse=True)
    where, columns = pd.factorize(rows[column][ok], sort=True)
    sums = np.zeros((len(values), len(columns)))
    np.add.at(sums, (at.ravel(), where), np.nan_to_num(rows["count"].to_numpy(float)[ok]))
    labels = [r if not np.isfinite(r) else round(r, 6) for r in values]
    decades = sorted(r for r in labels if np.isfinite(r))
    step = 1.0 / _per_decade(log["lo"].to_numpy(float), log["hi"].to_numpy(float))
    full = [-math.inf] + (
        list(np.round(np.arange(decades[0], decades[-1] + step / 2, step), 6)) if decades else []
    )
    table = pd.DataFrame(sums, index=labels, columns=columns).reindex(full, fill_value=0.0)
    return table / table.sum(axis=0).replace(0, np.nan), full


def _draw_heat(ax: Axes, table: pd.DataFrame, rows: list[float]) -> Any:
    from matplotlib.colors import LogNorm

    data = np.ma.masked_less_equal(table.to_numpy(float), 0)
    mesh = ax.pcolormesh(
        np.arange(table.shape[1] + 1),
        np.arange(len(rows) + 1),
        data,
        norm=LogNorm(vmin=1e-4, vmax=1.0),
        cmap="viridis",
        shading="flat",
    )
    ticks = [i for i, r in enumerate(rows) if not np.isfinite(r) or float(r).is_integer()]
    if len(ticks) > 12:
        ticks = [ticks[0], *ticks[1::2]]
    ax.set_yticks([t + 0.5 for t in ticks])
    ax.set_yticklabels(["0" if not np.isfinite(rows[t]) else f"1e{int(rows[t])}" for t in ticks])
    ax.set_facecolor("#f4f4f4")
    ax.tick_params(labelsize=7)
    return mesh


def _colorbar(fig: Any, mesh: Any, ax: Any) -> None:
    """A colorbar for ``mesh`` beside ``ax`` (one axes or a list); on a redraw, the same one."""
    from matplotlib.ticker import FuncFormatter

    host = ax[0] if isinstance(ax, list | tuple) else ax
    bar = _COLORBARS.get(host)
    if bar is not None and bar.ax in fig.axes:
        bar.update_normal(mesh)
    else:
        bar = fig.colorbar(mesh, ax=ax, fraction=0.05, pad=0.02)
        _COLORBARS[host] = bar
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: decade_label(v)))
    bar.ax.tick_params(labelsize=7)
    bar.set_label("fraction of values", fontsize=7)


def log_heatmap(
    hists: pd.DataFrame,
    *,
    kind: str = "activation",
    step: int | None = None,
    layers: Sequence[str] | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Heat map of |value| by decade (y) and layer (x): where each layer's mass sits.

    Colour is the fraction of the layer's (sampled) values in the decade, on a log scale;
    the bottom row ``0`` holds exact zeros (dead units, masked gradients).

    Example:
        >>> import flowscope as fs
        >>> rec = fs.load(model_dir)  # one run, e.g. "reports/my-model"
        >>> ax = log_heatmap(rec.hists, kind="gradient")
        >>> ax.get_title()
        'gradients dL/d(output): log-magnitude histogram per layer (step 1)'

    Args:
        hists: a hists frame of one config / run.
        kind: the recorded kind to draw.
        step: the step to draw (default: the last recorded).
        layers: layer names to draw (default: see :func:`flow_layers`).
        ax: the axes to draw on (default: a new pyplot figure).

    Returns:
        The axes.

    Raises:
        FlowscopeError: for several configs in one frame, an unrecorded step or kind.
    """
    frame, chosen = at_step(kind_rows(one_group(hists, "log_heatmap"), kind, "log_heatmap"), step)
    frame = first_call(frame)
    names = flow_layers(frame, layers)
    log = frame[(frame["hist"] == "log") & frame["layer"].isin(names)]
    table, rows = _heat_matrix(log, "layer")
    table = table.reindex(columns=names, fill_value=np.nan)
    ax = new_ax(ax, (min(max(4.0, 0.45 * len(names) + 1.5), 14.0), 3.4))
    mesh = _draw_heat(ax, table, rows)
    name_ticks(ax, names, offset=0.5)
    ax.set_ylabel("|value| (decade)", fontsize=8)
    ax.set_title(
        f"{KIND_LABEL.get(kind, kind)}: log-magnitude histogram per layer (step {chosen})",
        fontsize=9,
        y=1.0,  # fixed: nothing sits above the panel, and placing it measures the axis
    )
    _colorbar(ax.figure, mesh, ax)
    return ax


def log_heatmap_steps(
    hists: pd.DataFrame,
    *,
    kind: str = "activation",
    layers: Sequence[str] | None = None,
    max_panels: int = 6,
    fig: Figure | None = None,
) -> list[Axes]:
    """fastai's "colorful dimension": per layer, |value| by decade (y) over training steps (x).

    Example:
        >>> import flowscope as fs
        >>> rec = fs.load(model_dir)  # one run recorded at steps 0 and 1
        >>> axes = log_heatmap_steps(rec.hists, kind="activation")
        >>> [ax.get_title() for ax in axes]
        ['1', '3', '5']

    Args:
        hists: a hists frame of one run / config with several recorded steps.
        kind: the recorded kind to draw.
        layers: layer names to draw (default: see :func:`flow_layers`), at most
            ``max_panels`` of them, evenly spread.
        max_panels: the most panels drawn.
        fig: an empty figure to draw on, or one this function drew on before (its panels
            are redrawn); default: a new pyplot figure.

    Returns:
        The axes, one per layer.

    Raises:
        FlowscopeError: for several configs in one frame, or an unrecorded kind.
    """
    frame = first_call(kind_rows(one_group(hists, "log_heatmap_steps"), kind, "log_heatmap_steps"))
    names = spread(flow_layers(frame, layers), max_panels)
    log = frame[frame["hist"] == "log"]
    _, rows = _heat_matrix(log[log["layer"].isin(names)], "step")
    fig, axes, _ = axes_row(fig, len(names), (2.4 * len(names) + 1.0, 3.0), key=("steps",))
    steps = sorted(int(s) for s in frame["step"].unique())
    mesh = None
    for i, (ax, name) in enumerate(zip(axes, names, strict=True)):
        table, _ = _heat_matrix(log[log["layer"] == name], "step")
        table = table.reindex(index=rows, columns=steps, fill_value=0.0)
        mesh = _draw_heat(ax, table, rows)
        ticks = spread([str(s) for s in steps], 5)
        ax.set_xticks([steps.index(int(t)) + 0.5 for t in ticks])
        ax.set_xticklabels(ticks, fontsize=7)
        ax.set_title(short_name(name), fontsize=8, y=1.0, pad=3)  # fixed y: no auto-placement pass
        ax.set_xlabel("step", fontsize=8)
        if i:
            ax.set_yticklabels([])
    axes[0].set_ylabel("|value| (decade)", fontsize=8)
    if mesh is not None:
        _colorbar(fig, mesh, axes)
    fig.suptitle(f"{KIND_LABEL.get(kind, kind)}: log-magnitude histogram over steps", fontsize=9)
    return axes
