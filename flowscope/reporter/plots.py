"""Figures of signal and gradient flow, drawn from the tidy frames (seaborn + matplotlib).

Every function reads a frame (``stats`` or ``hists`` from :mod:`flowscope.record.frames`), draws
into the ``ax`` (one panel) or ``fig`` (several panels) it is given, or into a new pyplot
figure, and returns the axes. Plots never run models. Given a ``fig`` it drew before, a
function redraws that figure's panels in place (much faster than new axes; see
:func:`clear_panel`, which does the same for an ``ax``).

* :func:`layer_hists` (:func:`activation_hists`, :func:`gradient_hists`): the DD2424
  lecture 4 figures, one histogram per layer (rows of five), x range per layer; activations
  on a linear y axis, gradients on a log y axis; exact zeros left out (non-zero values only)
  where a layer has many of them, with the zero fraction written on the panel (and the
  saturated fraction where a layer saturates).
* :func:`scale_plot`: activation std and gradient std per layer on a log axis, one line per
  config (or run), with an optional theory line.
* :func:`log_heatmap` / :func:`log_heatmap_steps`: the log-magnitude histograms as a heat map
  over layers, or over steps per layer (fastai's "colorful dimension").
* :func:`saturation_plot`: saturated and zero ("dead") fractions per layer.

Which layers a figure shows: the activation-function modules (Tanh, ReLU, ...) when the
model has any, since their outputs are the lecture's "activations at each layer"; otherwise
every layer; or the names passed as ``layers``.

Example:
    >>> import flowscope as fs  # doctest: +SKIP
    >>> rec = fs.load("reports/my-model")  # doctest: +SKIP
    >>> axes = activation_hists(rec.hists, rec.stats)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from flowscope.core.catalogue import activation_type
from flowscope.core.errors import FlowscopeError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "activation_hists",
    "clear_panel",
    "flow_layers",
    "gradient_hists",
    "group_column",
    "hist_figsize",
    "is_activation_type",
    "layer_hists",
    "log_heatmap",
    "log_heatmap_steps",
    "panels",
    "saturation_plot",
    "scale_plot",
]

ZERO_SHARE = 0.01  # nonzero="auto" leaves exact zeros out of a panel above this share
KIND_LABEL = {
    "activation": "activations",
    "gradient": "gradients dL/d(output)",
    "weight": "weights",
    "weight_grad": "weight gradients dL/dW",
}
# What this module put on a figure, so that drawing the same figure again reuses it instead of
# adding more: the panel grid (key, every panel including hidden spares, figure-level extras
# such as a legend) and each colorbar by the panel it belongs to. Weak: the figure owns them.
_GRIDS: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], list[Any], list[Any]]] = (
    weakref.WeakKeyDictionary()
)
_COLORBARS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


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


def _one_group(frame: pd.DataFrame, what: str) -> pd.DataFrame:
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


def _at_step(frame: pd.DataFrame, step: int | None) -> tuple[pd.DataFrame, int]:
    """Rows of ``step`` (default: the last recorded step)."""
    if frame.empty:
        return frame, 0
    steps = sorted(int(s) for s in frame["step"].unique())
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        raise FlowscopeError(f"step {step} was not recorded; recorded steps: {steps}")
    return frame[frame["step"] == chosen], chosen


def _first_call(frame: pd.DataFrame) -> pd.DataFrame:
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


def _kind_rows(frame: pd.DataFrame, kind: str, what: str) -> pd.DataFrame:
    rows = frame[frame["kind"] == kind]
    if rows.empty:
        kinds = sorted(frame["kind"].unique()) if "kind" in frame.columns else []
        raise FlowscopeError(f"{what}: no {kind!r} rows in the frame (kinds there: {kinds})")
    return rows


def _text(name: object) -> str:
    """A name from a model or a file, safe for matplotlib (no mathtext from a ``$``)."""
    return str(name).replace("$", r"\$")


def _short(name: str, width: int = 22) -> str:
    short = name if len(name) <= width else "…" + name[-(width - 1) :]
    return _text(short)


def _axes_row(
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
    return _axes_row(fig, n, (0.0, 0.0), key=("panels",))[1]


def _with_grid(fig: Any, artist: Any) -> None:
    """Remove ``artist`` (a figure legend, ...) when :func:`_axes_row` reuses the grid."""
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


def _new_ax(ax: Axes | None, size: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.figure(figsize=size).subplots()


def _name_ticks(ax: Axes, names: Sequence[str], offset: float = 0.0, most: int = 30) -> None:
    """Layer names as x tick labels at positions 0, 1, ... (+ offset); at most ``most``."""
    shown = _spread(list(names), most)
    at = {n: i for i, n in enumerate(names)}
    ax.set_xticks([at[n] + offset for n in shown])
    ax.set_xticklabels([_short(n, 16) for n in shown], rotation=40, ha="right", fontsize=7)


def _spread(items: Sequence[str], most: int) -> list[str]:
    """At most ``most`` items, evenly spread, first and last kept."""
    if len(items) <= most:
        return list(items)
    picks = np.unique(np.round(np.linspace(0, len(items) - 1, most)).astype(int))
    return [items[i] for i in picks]


# -- the lecture's histogram rows -------------------------------------------------------------


def hist_figsize(panels: int, per_row: int = 5) -> tuple[float, float]:
    """The figure size (inches) :func:`layer_hists` uses for ``panels`` panels.

    Example:
        >>> hist_figsize(10)
        (10.9, 4.3)
    """
    cols = max(min(panels, per_row), 1)
    return round(2.1 * cols + 0.4, 2), round(1.9 * -(-panels // cols) + 0.5, 2)


Bins = tuple[np.ndarray, np.ndarray, np.ndarray]  # lo, hi, count of one histogram


def _panel_arrays(frame: pd.DataFrame, names: Sequence[str]) -> dict[str, tuple[Bins, Bins]]:
    """Per layer: its linear histogram (in bin order) and its log histogram, as arrays.

    One pass over the frame: selecting rows with pandas per panel costs more than the panel.
    """
    codes, uniques = pd.factorize(frame["layer"])
    at = {str(u): k for k, u in enumerate(uniques)}
    lo, hi = frame["lo"].to_numpy(float), frame["hi"].to_numpy(float)
    count, bins = frame["count"].to_numpy(float), frame["bin"].to_numpy()
    kind = frame["hist"]
    linear = kind.eq("linear").to_numpy(dtype=bool, na_value=False)
    log = kind.eq("log").to_numpy(dtype=bool, na_value=False)
    out = {}
    for name in names:
        mine = codes == at[name]
        lin = np.flatnonzero(mine & linear)
        lin = lin[np.argsort(bins[lin], kind="stable")]
        lg = np.flatnonzero(mine & log)
        out[name] = (lo[lin], hi[lin], count[lin]), (lo[lg], hi[lg], count[lg])
    return out


def _panel_counts(lin: Bins, log: Bins) -> tuple[np.ndarray, np.ndarray, float]:
    """Linear bin edges, counts with the zeros still in them, and the sample's zero count."""
    edges = np.append(lin[0], lin[1][-1:])
    counts = lin[2].copy()
    log_lo, log_hi, log_count = log
    is_zero = (log_lo == 0) & (log_hi == 0)
    bounded = np.isfinite(log_lo) & np.isfinite(log_hi)
    zeros = float(np.nansum(log_count[is_zero]))
    finite_total = float(np.nansum(log_count[bounded]))
    # zeros still in the linear counts: 0 when the recorder left them out (drop_zeros)
    zeros_in = min(max(counts.sum() - (finite_total - zeros), 0.0), zeros)
    if zeros_in > 0:
        counts = _remove_at_zero(edges, counts, zeros_in)
    return edges, counts, zeros


def _zero_bin(edges: np.ndarray) -> int:
    """Index of the linear bin that holds the value 0 (clamped, as the recorder bins)."""
    n, width = len(edges) - 1, edges[-1] - edges[0]
    return 0 if width <= 0 else int(np.clip((0 - edges[0]) / width * n, 0, n - 1))


def _remove_at_zero(edges: np.ndarray, counts: np.ndarray, zeros: float) -> np.ndarray:
    """Take ``zeros`` counts out of the bin(s) holding 0 (non-zero values only)."""
    at = _zero_bin(edges)
    for i in (at, at - 1, at + 1):  # 0 on a bin edge: rounding may have put zeros next door
        if 0 <= i < len(counts) and zeros > 0:
            take = min(counts[i], zeros)
            counts[i] -= take
            zeros -= take
    return counts


def layer_hists(
    hists: pd.DataFrame,
    stats: pd.DataFrame | None = None,
    *,
    kind: str = "activation",
    step: int | None = None,
    layers: Sequence[str] | None = None,
    nonzero: bool | Literal["auto"] = "auto",
    logy: bool | None = None,
    max_panels: int = 10,
    per_row: int = 5,
    fig: Figure | None = None,
) -> list[Axes]:
    """One histogram per layer, in rows: DD2424 lecture 4's figures.

    Each panel has its own x range (the layer's [min, max]); the y axis is linear for
    activations and logarithmic for gradients, as in the lecture. Where exact zeros are left
    out (non-zero values only), the panel states the zero fraction; with ``stats``, a panel
    whose layer saturates (over 1%, e.g. tanh at ±0.99) states the saturated fraction.

    Example:
        >>> import flowscope as fs  # doctest: +SKIP
        >>> rec = fs.load("reports/init-scales")  # doctest: +SKIP
        >>> one = rec.hists[rec.hists.config == "tanh-small"]  # doctest: +SKIP
        >>> axes = layer_hists(one, kind="gradient")  # doctest: +SKIP

    Args:
        hists: a hists frame of one config / run.
        stats: the matching stats frame; when given, zero fractions are exact (else they are
            estimated on the histogram sample).
        kind: ``"activation"`` or ``"gradient"`` (any recorded kind works).
        step: the step to draw (default: the last recorded).
        layers: layer names to draw (default: see :func:`flow_layers`).
        nonzero: leave exact zeros out; ``"auto"``: where zeros are over 1% of a layer.
        logy: log y axis (default: True for gradients and weight gradients).
        max_panels: draw at most this many layers, evenly spread (first and last kept).
        per_row: panels per row (the lecture draws one row; five stay readable on a laptop).
        fig: an empty figure to draw on, or one this function drew on before (its panels
            are redrawn); default: a new pyplot figure.

    Returns:
        The axes, one per layer drawn, in layer order.

    Raises:
        FlowscopeError: for several configs in one frame, an unrecorded step or kind, or an
            unknown layer name.
    """
    rows = _kind_rows(_one_group(hists, "layer_hists"), kind, "layer_hists")
    frame, chosen = _at_step(rows, step)
    frame = _first_call(frame)
    names = _spread(flow_layers(frame, layers), max_panels)
    logy = kind in ("gradient", "weight_grad") if logy is None else logy
    exact, saturated = None, pd.Series(dtype=float)
    if stats is not None and not stats.empty:
        snaps = _first_call(_at_step(stats[stats["kind"] == kind], chosen)[0])
        snaps = snaps.drop_duplicates("layer").set_index("layer")
        exact, saturated = snaps["frac_zero"], snaps["frac_saturated"].dropna()
    cols = min(len(names), per_row)
    size = hist_figsize(len(names), per_row)
    fig, axes, new = _axes_row(fig, len(names), size, per_row, key=("layer_hists", logy))
    by_layer = _panel_arrays(frame, names)
    for i, (ax, name) in enumerate(zip(axes, names, strict=True)):
        lin, log = by_layer[name]
        edges, counts, zeros = _panel_counts(lin, log)
        sample = float(np.nansum(log[2][~np.isnan(log[0])]))
        share = (
            float(exact[name]) if exact is not None and name in exact else zeros / max(sample, 1)
        )
        drop = nonzero is True or (nonzero == "auto" and share > ZERO_SHARE)
        if not drop:
            counts[_zero_bin(edges)] += zeros
        _draw_panel(ax, edges, counts, logy, new)
        ax.set_title(_short(name, 26), fontsize=8, y=1.0, pad=3)  # fixed y: no auto-placement pass
        notes = []
        if drop:
            notes.append("all zero" if counts.sum() == 0 else f"zero: {share:.1%}")
        if saturated.get(name, 0.0) > ZERO_SHARE:
            notes.append(f"saturated: {saturated[name]:.1%}")
        if notes:
            _note(ax, "\n".join(notes))
        if i % cols == 0:
            ax.set_ylabel("count (log)" if logy else "count", fontsize=8)
    what = KIND_LABEL.get(kind, kind)
    scale = "log y" if logy else "linear y"
    fig.suptitle(f"{what} per layer (step {chosen}; x range per layer, {scale})", fontsize=9)
    height = fig.get_figheight()
    fig.subplots_adjust(
        top=1 - 0.55 / height,
        bottom=0.4 / height,
        wspace=0.35,
        hspace=0.55,
        left=0.07,
        right=0.99,
    )
    return axes


def _note(ax: Axes, text: str) -> None:
    box = {"boxstyle": "round,pad=0.2", "fc": "white", "ec": "0.7", "alpha": 0.9}
    ax.text(0.97, 0.95, text, transform=ax.transAxes, ha="right", va="top", fontsize=7, bbox=box)


def _draw_panel(ax: Axes, edges: np.ndarray, counts: np.ndarray, logy: bool, new: bool) -> None:
    """One histogram panel; ``new``: set up its scale and ticks (a reused panel has them)."""
    from matplotlib.ticker import MaxNLocator

    if edges[-1] <= edges[0]:  # a constant layer: one bar of small width around its value
        half = max(abs(edges[0]), 1.0) * 1e-3
        edges = np.linspace(edges[0] - half, edges[0] + half, len(edges))
    # one filled step patch: a bar per bin costs ~1 ms each to lay out. It is made as one bin
    # and then given the data, with its limits from its vertices: matplotlib measures a new
    # patch curve segment by curve segment, ~3 ms for 64 bins
    baseline = 0.5 if logy else 0.0
    patch = ax.stairs(
        [baseline], edges[[0, -1]], fill=True, color="#4c72b0", linewidth=0, baseline=baseline
    )
    patch.set_data(counts, edges)
    ax.update_datalim(patch.get_path().vertices)
    if not new:
        return
    if logy:
        _log_y(ax)
    ax.xaxis.set_major_locator(MaxNLocator(3))
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
    ax.xaxis.get_offset_text().set_fontsize(7)
    ax.tick_params(labelsize=7)


def _log_y(ax: Axes, numticks: int = 5) -> None:
    """Log y axis, decades only, plain labels: mathtext labels and minor ticks are slow to draw."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(numticks=numticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _power(v)))
    ax.yaxis.set_minor_locator(NullLocator())


def _power(v: float) -> str:
    """1, 10, 100, 1000, then 1e4, 1e-2: short labels for decade ticks."""
    if v <= 0 or not math.isfinite(v):
        return ""
    return f"{v:g}" if 1e-2 <= v < 1e4 else f"1e{round(math.log10(v))}"


def activation_hists(
    hists: pd.DataFrame, stats: pd.DataFrame | None = None, **kw: Any
) -> list[Axes]:
    """Per-layer activation histograms (linear y): ``layer_hists(kind="activation")``.

    Example:
        >>> axes = activation_hists(rec.hists, rec.stats)  # doctest: +SKIP
    """
    return layer_hists(hists, stats, kind="activation", **kw)


def gradient_hists(hists: pd.DataFrame, stats: pd.DataFrame | None = None, **kw: Any) -> list[Axes]:
    """Per-layer gradient histograms (log y): ``layer_hists(kind="gradient")``.

    Example:
        >>> axes = gradient_hists(rec.hists, rec.stats)  # doctest: +SKIP
    """
    return layer_hists(hists, stats, kind="gradient", **kw)


# -- scale per layer, all configs -------------------------------------------------------------


def scale_plot(
    stats: pd.DataFrame,
    *,
    by: str | None = None,
    theory: pd.DataFrame | None = None,
    labels: Mapping[str, str] | None = None,
    step: int | None = None,
    layers: Sequence[str] | None = None,
    stat: str = "std",
    fig: Figure | None = None,
) -> list[Axes]:
    """Activation and gradient scale per layer on a log axis, one line per config.

    Example:
        >>> import flowscope as fs  # doctest: +SKIP
        >>> axes = scale_plot(fs.load("reports/init-scales").stats)  # doctest: +SKIP

    Args:
        stats: a stats frame, any number of configs / runs.
        by: the column whose values get one line each (default: ``config`` or ``run``).
        theory: predictions, drawn dashed in the line's colour: columns ``by``, ``layer``,
            ``kind`` (activation / gradient) and ``stat`` (e.g. ``std``).
        labels: legend label per value of ``by`` (default: the value).
        step: the step to draw (default: each group's last recorded step).
        layers: layer names to draw (default: see :func:`flow_layers`, per group).
        stat: the statistic on the y axis.
        fig: an empty figure to draw on, or one this function drew on before (its panels
            are redrawn); default: a new pyplot figure.

    Returns:
        Two axes: activations, gradients.

    Raises:
        FlowscopeError: for a missing column or an unrecorded step.
    """
    import seaborn as sns

    by = by or group_column(stats)
    for col in (by, stat):
        if col not in stats.columns:
            raise FlowscopeError(f"scale_plot: column {col!r} not in the stats frame")
    keys = stats[by].astype(str)
    groups = [str(g) for g in pd.unique(keys)]
    # tab20 pairs neighbours (dark, light): sweeps listed axis by axis read as pairs
    name = "tab10" if len(groups) <= 10 else "tab20" if len(groups) <= 20 else "husl"
    palette = sns.color_palette(name, len(groups))
    fig, axes, _ = _axes_row(fig, 2, (11.0, 3.6), key=("scale_plot",))
    series = {g: _scale_series(stats[keys == g], stat, step, layers) for g in groups}
    for ax, kind in zip(axes, ("activation", "gradient"), strict=True):
        for color, g in zip(palette, groups, strict=True):
            s = series[g][kind]
            label = _text((labels or {}).get(g, g))
            ax.plot(s["pos"], s[stat], marker="o", ms=3, lw=1.4, color=color, label=label, zorder=2)
            if theory is not None:
                _theory_line(ax, theory, by, g, kind, stat, s, color)
        if all(series[g][kind][stat].isna().all() for g in groups):
            _note(ax, f"no {KIND_LABEL[kind]} recorded")
        _log_y(ax, numticks=8)
        ax.set_title(f"{KIND_LABEL[kind]}: {stat} per layer", fontsize=10, y=1.0)
        ax.set_xlabel("layer (execution order)", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        ax.tick_params(labelsize=8)
    _layer_ticks(axes, series)
    axes[0].set_ylabel(f"{stat} (log)", fontsize=9)
    handles, names = axes[0].get_legend_handles_labels()
    if theory is not None:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="0.3", ls="--", lw=2.8, alpha=0.45))
        names.append("theory")
    legend = fig.legend(
        handles,
        names,
        loc="center left",
        bbox_to_anchor=(0.86, 0.5),
        fontsize=8,
        frameon=False,
        title=by,
        title_fontsize=8,
    )
    _with_grid(fig, legend)
    fig.subplots_adjust(left=0.07, right=0.85, wspace=0.22, bottom=0.16)
    return axes


def _scale_series(
    stats: pd.DataFrame, stat: str, step: int | None, layers: Sequence[str] | None
) -> dict[str, pd.DataFrame]:
    """Per kind: layer position (1-based), layer name and the statistic, positive values only."""
    rows = _first_call(_at_step(stats[stats["kind"].isin(["activation", "gradient"])], step)[0])
    names = flow_layers(rows, layers) if not rows.empty else []
    pos = {n: i + 1 for i, n in enumerate(names)}
    out = {}
    for kind in ("activation", "gradient"):
        part = rows[(rows["kind"] == kind) & rows["layer"].isin(pos)].drop_duplicates("layer")
        part = part.assign(pos=part["layer"].map(pos)).sort_values("pos")
        values = part[stat].astype(float)
        out[kind] = part.assign(**{stat: values.where(values > 0)})[["pos", "layer", stat]]
    return out


def _theory_line(
    ax: Axes,
    theory: pd.DataFrame,
    by: str,
    group: str,
    kind: str,
    stat: str,
    measured: pd.DataFrame,
    color: Any,
) -> None:
    pred = theory[(theory[by].astype(str) == group) & (theory["kind"] == kind)]
    pred = pred.merge(measured[["layer", "pos"]], on="layer").sort_values("pos")
    if not pred.empty:
        # wide and pale beneath the measured line: visible where the two agree
        ax.plot(pred["pos"], pred[stat], ls="--", lw=2.8, color=color, alpha=0.45, zorder=1)


def _layer_ticks(axes: Sequence[Axes], series: Mapping[str, Mapping[str, pd.DataFrame]]) -> None:
    """Integer ticks; layer names when every group has the same layers (few enough)."""
    from matplotlib.ticker import MaxNLocator

    layer_sets = {
        tuple(s["activation"]["layer"]) or tuple(s["gradient"]["layer"]) for s in series.values()
    }
    for ax in axes:
        if len(layer_sets) == 1 and 0 < len(names := next(iter(layer_sets))) <= 16:
            ax.set_xticks(range(1, len(names) + 1))
            ax.set_xticklabels([_short(n, 16) for n in names], rotation=40, ha="right", fontsize=7)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# -- log-magnitude heat maps ------------------------------------------------------------------


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
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _power(v)))
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
        >>> ax = log_heatmap(one_config_hists, kind="gradient")  # doctest: +SKIP

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
    frame, chosen = _at_step(
        _kind_rows(_one_group(hists, "log_heatmap"), kind, "log_heatmap"), step
    )
    frame = _first_call(frame)
    names = flow_layers(frame, layers)
    log = frame[(frame["hist"] == "log") & frame["layer"].isin(names)]
    table, rows = _heat_matrix(log, "layer")
    table = table.reindex(columns=names, fill_value=np.nan)
    ax = _new_ax(ax, (min(max(4.0, 0.45 * len(names) + 1.5), 14.0), 3.4))
    mesh = _draw_heat(ax, table, rows)
    _name_ticks(ax, names, offset=0.5)
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
        >>> axes = log_heatmap_steps(training_run_hists, kind="activation")  # doctest: +SKIP

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
    frame = _first_call(
        _kind_rows(_one_group(hists, "log_heatmap_steps"), kind, "log_heatmap_steps")
    )
    names = _spread(flow_layers(frame, layers), max_panels)
    log = frame[frame["hist"] == "log"]
    _, rows = _heat_matrix(log[log["layer"].isin(names)], "step")
    fig, axes, _ = _axes_row(fig, len(names), (2.4 * len(names) + 1.0, 3.0), key=("steps",))
    steps = sorted(int(s) for s in frame["step"].unique())
    mesh = None
    for i, (ax, name) in enumerate(zip(axes, names, strict=True)):
        table, _ = _heat_matrix(log[log["layer"] == name], "step")
        table = table.reindex(index=rows, columns=steps, fill_value=0.0)
        mesh = _draw_heat(ax, table, rows)
        ticks = _spread([str(s) for s in steps], 5)
        ax.set_xticks([steps.index(int(t)) + 0.5 for t in ticks])
        ax.set_xticklabels(ticks, fontsize=7)
        ax.set_title(_short(name), fontsize=8, y=1.0, pad=3)  # fixed y: no auto-placement pass
        ax.set_xlabel("step", fontsize=8)
        if i:
            ax.set_yticklabels([])
    axes[0].set_ylabel("|value| (decade)", fontsize=8)
    if mesh is not None:
        _colorbar(fig, mesh, axes)
    fig.suptitle(f"{KIND_LABEL.get(kind, kind)}: log-magnitude histogram over steps", fontsize=9)
    return axes


# -- saturated and dead -----------------------------------------------------------------------


def saturation_plot(
    stats: pd.DataFrame,
    *,
    step: int | None = None,
    layers: Sequence[str] | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Saturated and exactly-zero ("dead") fractions of the activations per layer.

    Also draws the zero fraction of the gradients, and the non-finite fraction when any
    value is NaN or Inf.

    Example:
        >>> ax = saturation_plot(one_config_stats)  # doctest: +SKIP

    Args:
        stats: a stats frame of one config / run.
        step: the step to draw (default: the last recorded).
        layers: layer names to draw (default: see :func:`flow_layers`).
        ax: the axes to draw on (default: a new pyplot figure).

    Returns:
        The axes (y: fraction, 0 to 1).

    Raises:
        FlowscopeError: for several configs in one frame or an unrecorded step.
    """
    frame, chosen = _at_step(_one_group(stats, "saturation_plot"), step)
    frame = _first_call(frame[frame["kind"].isin(["activation", "gradient"])])
    frame = frame.assign(frac_nonfinite=(frame["nan"] + frame["inf"]) / frame["count"])
    names = flow_layers(frame, layers)
    pos = {n: i for i, n in enumerate(names)}
    ax = _new_ax(ax, (max(4.0, 0.45 * len(names) + 1.5), 2.8))
    lines = _saturation_lines(frame[frame["layer"].isin(pos)])
    for label, (kind, column) in lines.items():
        part = frame[(frame["kind"] == kind) & frame["layer"].isin(pos)].drop_duplicates("layer")
        part = part.assign(pos=part["layer"].map(pos)).sort_values("pos")
        color, marker, ls = LINE_STYLES[label]
        ax.plot(
            part["pos"], part[column], marker=marker, ms=4, lw=1.3, ls=ls, color=color, label=label
        )
    ax.set_ylim(-0.03, 1.03)
    _name_ticks(ax, names)
    ax.set_ylabel("fraction", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"saturated and zero fractions per layer (step {chosen})", fontsize=9, y=1.0)
    ax.legend(fontsize=7, loc="best", frameon=False)
    return ax


LINE_STYLES = {
    "saturated (activations)": ("#c44e52", "o", "-"),
    "zero (activations)": ("#4c72b0", "s", "-"),
    "zero (gradients)": ("#55a868", "s", ":"),
    "non-finite (activations)": ("#000000", "x", "-"),
    "non-finite (gradients)": ("#8172b2", "x", ":"),
}


def _saturation_lines(frame: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """The lines worth drawing: label -> (kind, column); adds a ``nonfinite`` fraction column."""
    acts = frame[frame["kind"] == "activation"]
    lines = {}
    if acts["frac_saturated"].notna().any():
        lines["saturated (activations)"] = ("activation", "frac_saturated")
    lines["zero (activations)"] = ("activation", "frac_zero")
    has_grads = (frame["kind"] == "gradient").any()
    if has_grads:
        lines["zero (gradients)"] = ("gradient", "frac_zero")
    if ((frame["nan"] + frame["inf"]) > 0).any():
        lines["non-finite (activations)"] = ("activation", "frac_nonfinite")
        if has_grads:
            lines["non-finite (gradients)"] = ("gradient", "frac_nonfinite")
    return lines
