"""Line plots per layer: the scale of activations and gradients of every config on one
log axis (:func:`scale_plot`), and the saturated and dead fractions of one
(:func:`saturation_plot`). Given a ``band`` column (``"seed"``), both draw the median over
its values per layer and a translucent band from their minimum to their maximum.

Example:
    >>> import flowscope as fs
    >>> axes = scale_plot(fs.load(run_dir).stats)  # a study run, e.g. "reports/init-scales"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from flowscope.core.errors import FlowscopeError
from flowscope.reporter.plots.common import (
    KIND_LABEL,
    at_step,
    axes_row,
    first_call,
    flow_layers,
    group_column,
    label_text,
    log_y,
    name_ticks,
    new_ax,
    note,
    one_group,
    short_name,
    with_grid,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["LINE_STYLES", "saturation_plot", "scale_plot"]


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
    band: str | None = None,
    fig: Figure | None = None,
) -> list[Axes]:
    """Activation and gradient scale per layer on a log axis, one line per config.

    Example:
        >>> import flowscope as fs
        >>> stats = fs.load(run_dir).stats  # a study run, e.g. "reports/init-scales"
        >>> one = stats[stats["seed"] == 0]  # seed 0 of every config
        >>> axes = scale_plot(one)
        >>> [ax.get_title() for ax in axes]
        ['activations: std per layer', 'gradients dL/d(output): std per layer']
        >>> len(axes[0].get_lines())  # one line per config: init small, xavier
        2

        Seeds of one setting as a band: one line per ``init`` (the median over the seeds)
        and one band (their range), here with a made-up second seed of twice the scale:

        >>> seeds = pd.concat([one, one.assign(seed=1, std=2 * one["std"])])
        >>> axes = scale_plot(seeds, by="init", band="seed")
        >>> len(axes[0].get_lines()), len(axes[0].collections)
        (2, 2)

    Args:
        stats: a stats frame, any number of configs / runs.
        by: the column whose values get one line each (default: ``config`` or ``run``).
        theory: predictions, drawn dashed in the line's colour: columns ``by``, ``layer``,
            ``kind`` (activation / gradient) and ``stat`` (e.g. ``std``).
        labels: legend label per value of ``by`` (default: the value).
        step: the step to draw (default: each group's last recorded step).
        layers: layer names to draw (default: see :func:`flow_layers`, per group).
        stat: the statistic on the y axis.
        band: a column whose values are repeats of one line (``"seed"``): the line is their
            median per layer, the band around it their minimum to maximum. Rows of one
            ``by`` value and one ``band`` value must be one config / run.
        fig: an empty figure to draw on, or one this function drew on before (its panels
            are redrawn); default: a new pyplot figure.

    Returns:
        Two axes: activations, gradients.

    Raises:
        FlowscopeError: for a missing column, an unrecorded step, or a ``band`` value that
            holds several configs of one line.
    """
    import seaborn as sns

    by = by or group_column(stats)
    for col in (by, stat, *([band] if band else [])):
        if col not in stats.columns:
            raise FlowscopeError(f"scale_plot: column {col!r} not in the stats frame")
    if band:
        _one_run_per_band(stats, band, "scale_plot", by)
    keys = stats[by].astype(str)
    groups = [str(g) for g in pd.unique(keys)]
    # tab20 pairs neighbours (dark, light): sweeps listed axis by axis read as pairs
    name = "tab10" if len(groups) <= 10 else "tab20" if len(groups) <= 20 else "husl"
    palette = sns.color_palette(name, len(groups))
    fig, axes, _ = axes_row(fig, 2, (11.0, 3.6), key=("scale_plot",))
    series = {g: _banded_series(stats[keys == g], stat, step, layers, band) for g in groups}
    banded = False
    for ax, kind in zip(axes, ("activation", "gradient"), strict=True):
        for color, g in zip(palette, groups, strict=True):
            s = series[g][kind]
            if s.empty:  # this kind was not recorded (a study of activations only)
                continue
            label = label_text((labels or {}).get(g, g))
            ax.plot(s["pos"], s[stat], marker="o", ms=3, lw=1.4, color=color, label=label, zorder=2)
            if "lo" in s:
                ax.fill_between(s["pos"], s["lo"], s["hi"], color=color, alpha=0.2, lw=0)
                banded = True
            if theory is not None:
                _theory_line(ax, theory, by, g, kind, stat, s, color)
        if all(series[g][kind][stat].isna().all() for g in groups):
            note(ax, f"no {KIND_LABEL[kind]} recorded")
        log_y(ax, numticks=8)
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
    if banded:
        from matplotlib.patches import Patch

        handles.append(Patch(color="0.3", alpha=0.2, lw=0))
        names.append(f"min–max over {label_text(band)}s")
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
    with_grid(fig, legend)
    fig.subplots_adjust(left=0.07, right=0.85, wspace=0.22, bottom=0.16)
    return axes


def _scale_series(
    stats: pd.DataFrame, stat: str, step: int | None, layers: Sequence[str] | None
) -> dict[str, pd.DataFrame]:
    """Per kind: layer position (1-based), layer name and the statistic, positive values only."""
    rows = first_call(at_step(stats[stats["kind"].isin(["activation", "gradient"])], step)[0])
    names = flow_layers(rows, layers) if not rows.empty else []
    pos = {n: i + 1 for i, n in enumerate(names)}
    out = {}
    for kind in ("activation", "gradient"):
        part = rows[(rows["kind"] == kind) & rows["layer"].isin(pos)].drop_duplicates("layer")
        part = part.assign(pos=part["layer"].map(pos)).sort_values("pos")
        values = part[stat].astype(float)
        out[kind] = part.assign(**{stat: values.where(values > 0)})[["pos", "layer", stat]]
    return out


def _banded_series(
    stats: pd.DataFrame,
    stat: str,
    step: int | None,
    layers: Sequence[str] | None,
    band: str | None,
) -> dict[str, pd.DataFrame]:
    """:func:`_scale_series`; with several ``band`` values, their median per layer and their
    range as columns ``lo`` and ``hi``."""
    values = list(pd.unique(stats[band])) if band else []
    if len(values) <= 1:
        return _scale_series(stats, stat, step, layers)
    parts = [_scale_series(stats[stats[band] == v], stat, step, layers) for v in values]
    return {kind: _spread([p[kind] for p in parts], stat) for kind in ("activation", "gradient")}


def _spread(parts: Sequence[pd.DataFrame], column: str) -> pd.DataFrame:
    """Per layer position: the median of ``column`` over ``parts``, and its ``lo`` and ``hi``."""
    rows = pd.concat(parts, ignore_index=True)
    out = rows.groupby(["pos", "layer"], sort=False)[column].agg(["median", "min", "max"])
    out = out.rename(columns={"median": column, "min": "lo", "max": "hi"}).reset_index()
    return out.sort_values("pos", kind="stable").reset_index(drop=True)


def _one_run_per_band(stats: pd.DataFrame, band: str, what: str, by: str | None = None) -> None:
    """Refuse a ``band`` value (of a line ``by``) holding several configs: no repeats of one."""
    col = group_column(stats)
    if col == by or col not in stats.columns:
        return
    keys = [by, band] if by else [band]
    counts = stats.groupby(keys, sort=False, dropna=False)[col].nunique()
    if (counts > 1).any():
        where = counts[counts > 1].index[0]
        values = where if by else [where]
        at = ", ".join(
            f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
            for k, v in zip(keys, values, strict=True)
        )
        how = "give each setting a column of its own and pass it as by" if by else "filter it"
        raise FlowscopeError(
            f"{what}: {at} holds {int(counts.max())} {col}s; a band spreads the repeats "
            f"(seeds) of one {col} of one setting: {how}"
        )


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
            ax.set_xticklabels(
                [short_name(n, 16) for n in names], rotation=40, ha="right", fontsize=7
            )
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# -- saturated and dead -----------------------------------------------------------------------


def saturation_plot(
    stats: pd.DataFrame,
    *,
    step: int | None = None,
    layers: Sequence[str] | None = None,
    band: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Saturated and exactly-zero ("dead") fractions of the activations per layer.

    Also draws the zero fraction of the gradients, and the non-finite fraction when any
    value is NaN or Inf. With a ``band`` column (``"seed"``) the frame may hold one config per
    value of it (the seeds of one setting): each line is their median per layer, with a band
    from their minimum to their maximum.

    Example:
        >>> import flowscope as fs
        >>> ax = saturation_plot(fs.load(model_dir).stats)  # one run, e.g. "reports/my-model"
        >>> [line.get_label() for line in ax.get_lines()]
        ['saturated (activations)', 'zero (activations)', 'zero (gradients)']

    Args:
        stats: a stats frame of one config / run (or, with ``band``, of one setting).
        step: the step to draw (default: the last recorded).
        layers: layer names to draw (default: see :func:`flow_layers`).
        band: a column whose values are repeats of one config (``"seed"``).
        ax: the axes to draw on (default: a new pyplot figure).

    Returns:
        The axes (y: fraction, 0 to 1).

    Raises:
        FlowscopeError: for several configs in one frame (in one ``band`` value) or an
            unrecorded step.
    """
    if band:
        if band not in stats.columns:
            raise FlowscopeError(f"saturation_plot: column {band!r} not in the stats frame")
        _one_run_per_band(stats, band, "saturation_plot")
    frame, chosen = at_step(stats if band else one_group(stats, "saturation_plot"), step)
    repeats = int(frame[band].nunique()) if band else 1
    frame = first_call(frame[frame["kind"].isin(["activation", "gradient"])])
    frame = frame.assign(frac_nonfinite=(frame["nan"] + frame["inf"]) / frame["count"])
    names = flow_layers(frame, layers)
    pos = {n: i for i, n in enumerate(names)}
    ax = new_ax(ax, (max(4.0, 0.45 * len(names) + 1.5), 2.8))
    lines = _saturation_lines(frame[frame["layer"].isin(pos)])
    for label, (kind, column) in lines.items():
        part = frame[(frame["kind"] == kind) & frame["layer"].isin(pos)]
        if repeats > 1:
            part = part.assign(pos=part["layer"].map(pos))
            part = _spread([p.drop_duplicates("layer") for _, p in part.groupby(band)], column)
        else:
            part = part.drop_duplicates("layer")
            part = part.assign(pos=part["layer"].map(pos)).sort_values("pos")
        color, marker, ls = LINE_STYLES[label]
        ax.plot(
            part["pos"], part[column], marker=marker, ms=4, lw=1.3, ls=ls, color=color, label=label
        )
        if repeats > 1:
            ax.fill_between(part["pos"], part["lo"], part["hi"], color=color, alpha=0.2, lw=0)
    ax.set_ylim(-0.03, 1.03)
    name_ticks(ax, names)
    ax.set_ylabel("fraction", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    over = f", {repeats} {label_text(band)}s: median, range" if repeats > 1 else ""
    ax.set_title(f"saturated and zero fractions per layer (step {chosen}{over})", fontsize=9, y=1.0)
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
