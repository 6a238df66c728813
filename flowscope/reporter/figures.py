"""Which figures a report shows, drawn as PNG data URIs: per config / run or per setting
(its seeds; :func:`config_figures`, for every group by :func:`all_figures`), and the overview
of all of them (:func:`overview_figure`, with the mean-field prediction of
:func:`theory_frame`).

Example:
    >>> import flowscope as fs
    >>> rec = fs.load(run_dir)  # a study run, e.g. "reports/init-scales"
    >>> small = "init == 'small' and seed == 0"  # one config
    >>> figs = config_figures(rec.stats.query(small), rec.hists.query(small))
    >>> [f["title"] for f in figs][:2]
    ['Activations per layer', 'Gradients per layer: dL/d(output)']
"""

from __future__ import annotations

import multiprocessing as mp
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

import pandas as pd

from flowscope.core.errors import FlowscopeError
from flowscope.reporter import plots
from flowscope.reporter.canvas import Canvases, figure_png
from flowscope.reporter.run import RunData

if TYPE_CHECKING:
    from matplotlib.figure import Figure, SubFigure

__all__ = [
    "HEAT",
    "HEAT_STEPS",
    "HIST_FIGURES",
    "SATURATION",
    "THEORY_NOTE",
    "all_figures",
    "config_figures",
    "overview_figure",
    "theory_frame",
    "training_figures",
]


# -- one config / run -------------------------------------------------------------------------


def _layer_count(frame: pd.DataFrame, kind: str) -> int:
    return len(plots.flow_layers(frame[frame["kind"] == kind]))


def config_figures(
    stats: pd.DataFrame,
    hists: pd.DataFrame,
    canvases: Canvases | None = None,
    band: str | None = None,
) -> list[dict[str, str]]:
    """The figures of one config / run: ``[{"title", "caption", "src"}]`` (PNG data URIs).

    ``canvases``: figures kept from the previous config, redrawn (default: new ones).
    ``band``: a column (``"seed"``) whose values in ``stats`` are repeats of one setting:
    the histograms and heat maps show the ``band`` value of ``hists`` (give it one), the
    saturated and dead fractions the median over all and their range.
    """
    canvases = canvases or Canvases()
    every = stats
    if band and band in stats and stats[band].nunique() > 1:
        shown = hists if band in hists and not hists.empty else stats
        stats = stats[stats[band] == shown[band].iloc[0]]  # the one the histograms show
    else:
        band = None
    kinds = set(hists["kind"].unique()) if not hists.empty else set()
    counts = {kind: _layer_count(hists, kind) for kind in kinds}
    figs = [
        {
            "title": title,
            "caption": caption,
            "src": _hist_png(canvases, stats, hists, kind, counts[kind]),
        }
        for kind, title, caption in HIST_FIGURES
        if kind in kinds
    ]
    flows = [k for k in ("activation", "gradient") if k in kinds]
    if flows and hists["step"].nunique() > 1:
        for kind in flows:
            title = f"{plots.KIND_LABEL[kind]} over training"
            src = _steps_heat_png(canvases, hists, kind, counts[kind])
            figs.append({"title": title, **HEAT_STEPS, "src": src})
    elif flows:
        title = "Where the values sit: log-magnitude heat map"
        most = max(counts[k] for k in flows)
        figs.append({"title": title, **HEAT, "src": _heat_png(canvases, hists, flows, most)})
    if "activation" in set(stats["kind"].unique()):
        src = _saturation_png(canvases, every, band)
        caption = SATURATION["caption"] + (SEED_BAND if band else "")
        figs.append({"title": "Saturated and dead", "caption": caption, "src": src})
    return figs


TRAINING = (
    ("activation", "rms", "Activation rms per layer over the steps"),
    ("gradient", "rms", "dL/dh rms per layer over the steps"),
    ("weight_grad", "rms", "Weight-gradient rms per layer over the steps"),
    ("update_ratio", "mean", "Update : weight ratio per layer over the steps"),
)
TRAINING_CAPTION = (
    "log10 of the statistic per layer (y) and step (x); steps are binned into at most 300"
    " columns (the mean of log10 per bin). The classic rule of thumb for the update : weight"
    " ratio ||dW|| / ||W|| is about 1e-3 per step."
)
LINES_CAPTION = (
    "The rms of the first, last and two middle layers (activation-function layers when the"
    " model has them) over the steps: steps binned into at most 300 points, the line their"
    " mean, the band their minimum to maximum."
)
LOSS_CAPTION = (
    "The loss given to rec.step(loss=...) at every step: steps binned into at most 600"
    " points, the line their mean, the band their minimum to maximum (spikes stay visible)."
)


def training_figures(
    stats: pd.DataFrame, scalars: pd.DataFrame, canvases: Canvases, key: str = ""
) -> list[dict[str, str]]:
    """The figures of a training run over its steps: the loss (and learning rate) curve,
    and per kind a layer x step heat map; none for a run of fewer than 3 steps."""
    figs = []
    for name in ("loss", "lr"):
        if (scalars["name"] == name).sum() >= 3:

            def draw_curve(fig: Figure, name: str = name) -> None:
                plots.loss_curve(scalars, name, ax=fig.subplots())

            src = canvases.png(("training", key, name), draw_curve, (6.5, 2.8))
            title = "Loss over the steps" if name == "loss" else "Learning rate over the steps"
            figs.append({"title": title, "caption": LOSS_CAPTION, "src": src})
    if stats["step"].nunique() < 3:
        return figs
    present = set(stats["kind"].unique())
    for kind, column, title in TRAINING:
        if kind not in present:
            continue

        def draw(fig: Figure, kind: str = kind, column: str = column) -> None:
            plots.layer_steps(stats, kind, column, ax=fig.subplots())

        try:
            src = canvases.png(("training", key, kind), draw, (7.5, 3.4))
        except FlowscopeError:  # no rows of this kind to draw (no weight tensor, ...)
            continue
        figs.append({"title": title, "caption": TRAINING_CAPTION, "src": src})
    flows = [k for k in ("activation", "gradient") if k in present]
    if flows:

        def draw_lines(fig: Figure) -> None:
            for ax, kind in zip(plots.panels(fig, len(flows)), flows, strict=True):
                plots.layer_lines(stats, kind, "rms", ax=ax)

        try:
            src = canvases.png(("training", key, "lines"), draw_lines, (6.0 * len(flows), 3.0))
        except FlowscopeError:  # no activation-function layer rows to draw
            return figs
        title = "Activation and dL/dh rms of a few layers over the steps"
        figs.append({"title": title, "caption": LINES_CAPTION, "src": src})
    return figs


def _hist_png(
    canvases: Canvases, stats: pd.DataFrame, hists: pd.DataFrame, kind: str, layers: int
) -> str:
    size = plots.hist_figsize(min(layers, 10))

    def draw(fig: Figure) -> None:
        plots.layer_hists(hists, stats, kind=kind, fig=fig)

    return canvases.png(("hists", kind), draw, size, tight=False)


def _heat_png(canvases: Canvases, hists: pd.DataFrame, flows: list[str], layers: int) -> str:
    width = min(max(4.5, 0.42 * layers + 2.0), 14.0)

    def draw(fig: Figure | SubFigure) -> None:
        for ax, kind in zip(plots.panels(fig, len(flows)), flows, strict=True):
            plots.log_heatmap(hists, kind=kind, ax=ax)
        fig.subplots_adjust(wspace=0.32)

    return canvases.png(("heat", *flows), draw, (width * len(flows), 3.6))


def _steps_heat_png(canvases: Canvases, hists: pd.DataFrame, kind: str, layers: int) -> str:
    n = min(layers, 6)

    def draw(fig: Figure) -> None:
        plots.log_heatmap_steps(hists, kind=kind, fig=fig)

    return canvases.png(("steps", kind), draw, (2.4 * n + 1.2, 3.0))


def _saturation_png(canvases: Canvases, stats: pd.DataFrame, band: str | None) -> str:
    n = _layer_count(stats, "activation")
    size = (min(max(5.0, 0.5 * n + 2), 14.0), 3.0)

    def draw(fig: Figure | SubFigure) -> None:
        plots.saturation_plot(stats, band=band, ax=plots.panels(fig, 1)[0])

    return canvases.png("saturation", draw, size)


HIST_FIGURES = [
    (
        "activation",
        "Activations per layer",
        "Histogram of each layer's output, x range per layer, linear y (DD2424 lecture 4). "
        "Where a layer has many exact zeros (ReLU), only non-zero values are drawn and the "
        "zero fraction is written on the panel; where it saturates, the saturated fraction.",
    ),
    (
        "gradient",
        "Gradients per layer: dL/d(output)",
        "Histogram of the gradient of the loss with respect to each layer's output, x range "
        "per layer, log y. Exact zeros are left out where they are over 1% of the layer.",
    ),
    (
        "weight_grad",
        "Weight gradients per layer: dL/dW",
        "Histogram of each layer's weight gradient, x range per layer, log y: the lecture's "
        "gradient figures. Exact zeros are left out where they are over 1% of the layer.",
    ),
]
HEAT = {
    "caption": "Colour: the fraction of a layer's values whose magnitude falls in each decade "
    "(log colour scale); the bottom row is exact zeros. A healthy net keeps its mass in the "
    "same decades from layer to layer; a diagonal drift is vanishing or exploding."
}
HEAT_STEPS = {
    "caption": "fastai's 'colorful dimension': per layer, the fraction of values in each "
    "decade of magnitude (y) at each recorded step (x); the bottom row is exact zeros."
}
SATURATION = {
    "caption": "Per layer: the fraction of activations at the saturation limits (tanh "
    "|x| >= 0.99, sigmoid < 0.01 or > 0.99), of exactly zero activations (dead ReLU units) "
    "and of exactly zero gradients (dotted)."
}
SEED_BAND = " Each line: the median over the seeds; the band around it: their range."


# -- every config / run -----------------------------------------------------------------------


def overview_figure(
    stats: pd.DataFrame, by: str, labels: dict[str, str], theory: Any, band: str | None = None
) -> str:
    """The scale plot of every config / run as a PNG data URI; with ``band`` (``"seed"``),
    one line per value of ``by`` (a setting) banded over its seeds."""
    if stats.empty or not {"activation", "gradient"} & set(stats["kind"].unique()):
        return ""
    width = 11.5 + (1.5 if len(labels) > 8 else 0.0)
    return figure_png(
        lambda f: plots.scale_plot(stats, by=by, labels=labels, theory=theory, band=band, fig=f),
        (width, 3.8),
    )


def theory_frame(run: RunData, table: pd.DataFrame) -> pd.DataFrame | None:
    """Mean-field predictions of activation std for the study MLPs theory covers, else None.

    Covered: net ``mlp`` without norm or residual, width = input dimension, unit-variance
    Gaussian inputs, zero biases; the predicted std of each ``layers.{l}.act`` output.
    """
    spec = run.spec or {}
    net, data = spec.get("net", {}), spec.get("data", {})
    if net.get("name") != "mlp" or data.get("name") != "gaussian" or run.by != "config":
        return None
    if net.get("residual") or net.get("in_dim", 500) != net.get("width", 500):
        return None
    from flowscope.theory import meanfield as theory

    rows = []
    for _, row in table[table["status"] != "failed"].iterrows():
        axes = {k: row[k] for k in ("activation", "init", "norm", "depth") if k in row}
        act = axes.get("activation", net.get("activation", "tanh"))
        init = axes.get("init", spec.get("init", {}).get("name"))
        if axes.get("norm", net.get("norm", "none")) != "none" or not init:
            continue
        depth = int(axes.get("depth", net.get("depth", 10)))
        init_spec = spec.get("init", {})
        params = {k: v for k, v in init_spec.items() if k != "name"}
        params = params if init == init_spec.get("name") else {}
        try:
            pred = theory.predict_mlp(act, str(init), int(net.get("width", 500)), depth, **params)
        except (FlowscopeError, TypeError, ValueError):
            continue
        for layer, std in enumerate(pred["act_std"]):
            rows.append((row[run.by], f"layers.{layer}.act", "activation", float(std)))
    return pd.DataFrame(rows, columns=[run.by, "layer", "kind", "std"]) if rows else None


THEORY_NOTE = (
    "Dashed: the mean-field prediction of the activation std (Poole et al. 2016) for the "
    "configs theory covers (no normalization, width = input size, zero biases)."
)


Job = tuple[pd.DataFrame, pd.DataFrame, str | None]


def _figures_of(jobs: list[Job]) -> list[list[dict[str, str]]]:
    """:func:`config_figures` of each (stats, hists, band) in turn, on the same canvases."""
    canvases = Canvases()
    return [[] if s.empty else config_figures(s, h, canvases, band) for s, h, band in jobs]


def all_figures(
    stats: pd.DataFrame,
    hists: pd.DataFrame,
    by: str,
    groups: Sequence[str | Sequence[str]],
    workers: int | None,
    band: str | None = None,
) -> list[list[dict[str, str]]]:
    """:func:`config_figures` of every group, in order; in ``workers`` forked processes.

    A group is a value of ``by``, or several (the seeds of one setting, ``band`` their
    column): the histograms and heat maps of the first, the fractions per layer of all.

    Each process draws a run of consecutive groups on one :class:`Canvases`, so that every
    figure after a group's first is a redraw (a 16-config study: ~13 s in one process on 2
    busy CPUs). Workers are forked (Linux only), as torch's DataLoader does: nothing
    re-imports the caller's ``__main__`` (spawn would re-run a user's script), and the
    children use numpy/pandas/matplotlib only. ``workers=None``: one per CPU (at most 8)
    when there are 4+ CPUs and 4+ groups; with 2 busy CPUs forking measured slower than one
    process.
    """
    by_stats, by_hists = stats[by].astype(str), hists[by].astype(str)
    jobs: list[Job] = []
    for g in groups:
        if isinstance(g, str):
            jobs.append((stats[by_stats == g], hists[by_hists == g], None))
        else:
            jobs.append((stats[by_stats.isin(g)], hists[by_hists == g[0]], band))
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        workers = min(cpus, 8) if cpus >= 4 and len(jobs) >= 4 else 1
    if workers <= 1 or len(jobs) <= 1 or "fork" not in mp.get_all_start_methods():
        return _figures_of(jobs)
    n = min(workers, len(jobs))  # one run of consecutive groups each: they share canvases
    parts = [jobs[i * len(jobs) // n : (i + 1) * len(jobs) // n] for i in range(n)]
    with warnings.catch_warnings():  # 3.12+: "process is multi-threaded" (torch's idle pool)
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*fork")
        with ProcessPoolExecutor(n, mp_context=mp.get_context("fork")) as pool:
            return [figures for part in pool.map(_figures_of, parts) for figures in part]
