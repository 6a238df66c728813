"""DD2424 lecture 4's figures: one histogram per layer, in rows, x range per layer.

Activations on a linear y axis, gradients on a log y axis; exact zeros left out (non-zero
values only) where a layer has many of them, with the zero fraction written on the panel
(and the saturated fraction where a layer saturates).

Example:
    >>> hist_figsize(3)
    (6.7, 2.4)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from flowscope.reporter.plots.common import (
    KIND_LABEL,
    at_step,
    axes_row,
    first_call,
    flow_layers,
    kind_rows,
    log_y,
    note,
    one_group,
    short_name,
    spread,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["ZERO_SHARE", "activation_hists", "gradient_hists", "hist_figsize", "layer_hists"]

ZERO_SHARE = 0.01  # nonzero="auto" leaves exact zeros out of a panel above this share


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
        >>> import flowscope as fs
        >>> rec = fs.load(run_dir)  # a study run, e.g. "reports/init-scales"
        >>> one = rec.hists.query("activation == 'tanh' and init == 'small' and seed == 0")
        >>> axes = layer_hists(one, kind="gradient")
        >>> [ax.get_title() for ax in axes]
        ['layers.0.act', 'layers.1.act', 'layers.2.act']

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
    rows = kind_rows(one_group(hists, "layer_hists"), kind, "layer_hists")
    frame, chosen = at_step(rows, step)
    frame = first_call(frame)
    names = spread(flow_layers(frame, layers), max_panels)
    logy = kind in ("gradient", "weight_grad") if logy is None else logy
    exact, saturated = None, pd.Series(dtype=float)
    if stats is not None and not stats.empty:
        snaps = first_call(at_step(stats[stats["kind"] == kind], chosen)[0])
        snaps = snaps.drop_duplicates("layer").set_index("layer")
        exact, saturated = snaps["frac_zero"], snaps["frac_saturated"].dropna()
    cols = min(len(names), per_row)
    size = hist_figsize(len(names), per_row)
    fig, axes, new = axes_row(fig, len(names), size, per_row, key=("layer_hists", logy))
    by_layer = _panel_arrays(frame, names)
    for i, (ax, name) in enumerate(zip(axes, names, strict=True)):
        lin, log = by_layer[name]
        edges, counts, zeros = _panel_counts(lin, log)
        sample = float(np.nansum(log[2][~np.isnan(log[0])]))
        share = (
            float(exact[name]) if exact is not None and name in exact else zeros / max(sample, 1)
        )
        drop = nonzero is True or (nonzero == "auto" and share > ZERO_SHARE)
        defined = bool(np.isfinite(edges).all())  # False: no finite value (NaN/Inf only)
        if not defined:  # divergence is data: an empty panel that says so
            edges, counts = np.array([0.0, 1.0]), np.zeros(1)
        elif not drop:
            counts[_zero_bin(edges)] += zeros
        _draw_panel(ax, edges, counts, logy, new)
        # fixed y: no auto-placement pass
        ax.set_title(short_name(name, 26), fontsize=8, y=1.0, pad=3)
        notes = []
        if not defined:
            notes.append("no finite value")
        elif drop:
            notes.append("all zero" if counts.sum() == 0 else f"zero: {share:.1%}")
        if saturated.get(name, 0.0) > ZERO_SHARE:
            notes.append(f"saturated: {saturated[name]:.1%}")
        if notes:
            note(ax, "\n".join(notes))
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
        log_y(ax)
    ax.xaxis.set_major_locator(MaxNLocator(3))
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
    ax.xaxis.get_offset_text().set_fontsize(7)
    ax.tick_params(labelsize=7)


def activation_hists(
    hists: pd.DataFrame, stats: pd.DataFrame | None = None, **kw: Any
) -> list[Axes]:
    """Per-layer activation histograms (linear y): ``layer_hists(kind="activation")``.

    Example:
        >>> import flowscope as fs
        >>> rec = fs.load(model_dir)
        >>> axes = activation_hists(rec.hists, rec.stats)
        >>> axes[0].get_yscale()
        'linear'
    """
    return layer_hists(hists, stats, kind="activation", **kw)


def gradient_hists(hists: pd.DataFrame, stats: pd.DataFrame | None = None, **kw: Any) -> list[Axes]:
    """Per-layer gradient histograms (log y): ``layer_hists(kind="gradient")``.

    Example:
        >>> import flowscope as fs
        >>> rec = fs.load(model_dir)
        >>> axes = gradient_hists(rec.hists, rec.stats)
        >>> axes[0].get_yscale()
        'log'
    """
    return layer_hists(hists, stats, kind="gradient", **kw)
