"""The report: one self-contained ``report.html`` that answers "does signal and gradient flow
through this network, and if not, where does it break, and why?".

``report(source, out_dir)`` reads a run folder (``fs.watch`` records or a study run), asks the
doctor for verdicts, draws the figures of :mod:`flowscope.reporter.plots` as embedded PNGs,
writes CSV exports next to the page and renders the Jinja2 templates in
``flowscope/reporter/templates`` with autoescaping on. The page loads nothing from the
network: figures are ``data:`` URIs, styles are inline, and the data files are relative links.

Example:
    >>> import flowscope as fs  # doctest: +SKIP
    >>> fs.report("reports/init-scales")  # doctest: +SKIP
    PosixPath('reports/init-scales/report.html')
"""

from __future__ import annotations

import base64
import io
import json
import math
import multiprocessing as mp
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np
import pandas as pd

from flowscope import __version__
from flowscope.core.errors import FlowscopeError
from flowscope.doctor import RUN_COLUMNS
from flowscope.record.frames import Records, atomic_write_text, load, records_of
from flowscope.reporter import plots

if TYPE_CHECKING:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure, SubFigure

    from flowscope.record.recorder import Recorder

__all__ = ["REPORT_FILE", "report", "summary"]

REPORT_FILE = "report.html"
DPI = 100
PAD = 0.08  # inches of white around a figure cropped to its contents
MARGIN = 1.0  # inches of canvas around such a figure, for labels that stick out of it
STUDY_FILES = ("spec.json", "claims.json", "configs.json", "probes.parquet")
DATA_FILES = ("stats.parquet", "hists.parquet", "meta.json", *STUDY_FILES)
EXPORTS = {
    "summary.csv": "verdict and numbers per config / run",
    "layers.csv": "the doctor's checks per layer",
    "stats.csv": "every statistic per layer, kind and step",
    "claims.csv": "each claim of the source, held or not, with its numbers",
}


# -- what the report is made from -------------------------------------------------------------


@dataclass
class RunData:
    """A run folder's contents: records, plus the study files when it is a study run."""

    folder: Path
    records: Records
    spec: dict[str, Any] | None = None
    claims: list[dict[str, Any]] | None = None
    configs: list[dict[str, Any]] | None = None
    files: list[str] = field(default_factory=list)

    @property
    def by(self) -> str:
        """The grouping column: ``config`` for studies, else ``run``."""
        return plots.group_column(self.records.stats)


def read_run(folder: str | os.PathLike[str]) -> RunData:
    """Load a run folder: ``stats``/``hists``/``meta`` and any study files beside them.

    Example:
        >>> run = read_run("reports/init-scales")  # doctest: +SKIP
        >>> run.by, len(run.configs)  # doctest: +SKIP
        ('config', 16)

    Raises:
        FlowscopeError: for a folder that is not a flowscope run, or an unreadable JSON file.
    """
    path = Path(folder)
    records = load(path)
    extra: dict[str, Any] = {}
    for name in ("spec.json", "claims.json", "configs.json"):
        if (path / name).is_file():
            try:
                extra[name.removesuffix(".json")] = json.loads((path / name).read_text())
            except (OSError, ValueError) as err:
                raise FlowscopeError(f"cannot read {str(path / name)!r}: {err}") from err
    files = [f for f in DATA_FILES if (path / f).is_file()]
    return RunData(folder=path, records=records, files=files, **extra)


def _resolve(source: Any, out_dir: str | os.PathLike[str] | None) -> tuple[RunData, Path]:
    """The run data and the output folder, saving in-memory records first."""
    if isinstance(source, str | os.PathLike):
        run = read_run(source)
        return run, Path(out_dir) if out_dir is not None else run.folder
    records = records_of(source, "report() takes")
    out = Path(out_dir) if out_dir is not None else Path("reports") / _slug(records)
    records.save(out)
    return read_run(out), out


def _slug(records: Records) -> str:
    """A folder name for in-memory records: the run name or the model's class name."""
    name = str(records.meta.get("run") or records.meta.get("model") or "run")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"


# -- the summary frame ------------------------------------------------------------------------


def summary(
    stats: pd.DataFrame,
    *,
    diagnosis: Any = None,
    configs: Sequence[dict[str, Any]] | None = None,
    by: str | None = None,
) -> pd.DataFrame:
    """One row per config (studies) or run (``fs.watch``): axes, status, verdict, numbers.

    Example:
        >>> from flowscope.doctor import diagnose  # doctest: +SKIP
        >>> rec = fs.load("reports/init-scales")  # doctest: +SKIP
        >>> summary(rec.stats, diagnosis=diagnose(rec.stats, by=["config"]))  # doctest: +SKIP

    Args:
        stats: a stats frame.
        diagnosis: the doctor's ``Diagnosis`` for ``stats`` grouped by ``by`` (or None).
        configs: a study's ``configs.json`` entries (order, axes, seed, status, error);
            configs that failed have no stats rows and still get a row.
        by: the grouping column (default: ``config`` when present, else ``run``).

    Returns:
        Columns ``by``, ``label``, the sweep axes and ``seed`` (studies), ``status``,
        ``error``, then the doctor's ``verdict, act_gain, grad_gain, grad_ratio,
        worst_layer, saturated, dead, nonfinite, reason, fix, thresholds``.
    """
    by = by or plots.group_column(stats)
    if configs:
        table = _config_table(configs, by)
    else:
        groups = [str(g) for g in pd.unique(stats[by].astype(str))] if by in stats else []
        table = pd.DataFrame({by: groups, "status": "done", "error": None})
        table.insert(1, "label", [g or "(unnamed run)" for g in groups])
    runs = getattr(diagnosis, "runs", None)
    if runs is not None and not runs.empty:
        keep = [by] + [c for c in RUN_COLUMNS if c in runs.columns]
        table = table.merge(runs[keep].assign(**{by: runs[by].astype(str)}), on=by, how="left")
    for column in RUN_COLUMNS:
        if column not in table:
            table[column] = None
    return table


def _config_table(configs: Sequence[dict[str, Any]], by: str) -> pd.DataFrame:
    """One row per ``configs.json`` entry: id, label from the axis values, axes, status."""
    axes = list(dict.fromkeys(a for c in configs for a in c.get("axes", {})))
    several_seeds = len({c.get("seed") for c in configs}) > 1
    rows = []
    for c in configs:
        values = c.get("axes", {})
        label = " · ".join(str(values.get(a, "")) for a in axes) or str(c[by])
        if several_seeds:
            label += f" · seed {c.get('seed')}"
        rows.append(
            {
                by: str(c[by]),
                "label": label,
                **{a: values.get(a) for a in axes},
                "seed": c.get("seed"),
                "status": c.get("status", "done"),
                "error": c.get("error"),
            }
        )
    return pd.DataFrame(rows)


def _diagnose(stats: pd.DataFrame, by: str, source: Any = None) -> tuple[Any, str]:
    """The doctor's verdicts, or None and the reason there are none.

    ``source``: the Recorder the stats came from, if any; the doctor then also sees the
    model (exact fan-ins in its prescriptions).
    """
    if stats.empty:
        return None, "no statistics were recorded"
    from flowscope.doctor import diagnose

    try:
        return diagnose(source if source is not None else stats, by=[by]), ""
    except FlowscopeError as err:
        return None, f"the doctor could not judge these records: {err}"


# -- figures ----------------------------------------------------------------------------------


class Canvases:
    """The report's figures, each built once and then redrawn in place for every config.

    A study draws the same figures for each of its configs, and matplotlib spends most of a
    figure's time on things that do not change between them. So, for one report:

    * each kind of figure (``key``) and size keeps its Figure and canvas; the plotting
      functions empty and redraw its panels (:func:`flowscope.reporter.plots.clear_panel`)
      instead of creating axes and ticks again;
    * a figure cropped to its contents (``tight``) is drawn once, centred on a canvas with a
      margin for labels that stick out, and cut from the pixels (``savefig(bbox_inches=
      "tight")`` draws twice);
    * the pixels go from the canvas straight into a PNG of at most 256 colours.

    Example:
        >>> canvases = Canvases()  # doctest: +SKIP
        >>> draw = lambda fig: plots.scale_plot(stats, fig=fig)  # doctest: +SKIP
        >>> canvases.png("scale", draw, (11.0, 4.0))  # doctest: +SKIP
        'data:image/png;base64,...'
    """

    def __init__(self) -> None:
        self._kept: dict[tuple[Any, ...], tuple[FigureCanvasAgg, Figure | SubFigure]] = {}

    def png(
        self,
        key: Any,
        draw: Callable[[Any], object],
        size: tuple[float, float],
        tight: bool = True,
    ) -> str:
        """``draw(fig)`` on the figure kept for ``key`` and ``size``, as a PNG data URI.

        ``tight=False`` for figures that lay themselves out to their size; else the image is
        cropped to what was drawn plus ``PAD``.
        """
        kept = self._kept.get((key, size, tight))
        if kept is None:
            kept = self._kept[(key, size, tight)] = self._canvas(size, tight)
        canvas, target = kept
        draw(target)
        _fixed_empty_labels(target)
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())
        if tight:
            cropped = None if _placed_outside(canvas, target) else _crop(rgba, round(PAD * DPI))
            if cropped is None:  # something reaches past the margin: let matplotlib measure
                buf = io.BytesIO()
                canvas.figure.savefig(
                    buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=PAD
                )
                from PIL import Image

                buf.seek(0)
                with Image.open(buf) as image:
                    cropped = np.asarray(image.convert("RGBA"))
            rgba = cropped
        return "data:image/png;base64," + base64.b64encode(_palette_png(rgba)).decode("ascii")

    def _canvas(
        self, size: tuple[float, float], tight: bool
    ) -> tuple[FigureCanvasAgg, Figure | SubFigure]:
        """A canvas and what to draw on: its figure, or a subfigure of ``size`` centred on it."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if not tight:
            fig = Figure(figsize=size, dpi=DPI)
            return FigureCanvasAgg(fig), fig
        (w, h), m = size, MARGIN
        fig = Figure(figsize=(w + 2 * m, h + 2 * m), dpi=DPI)
        spec = fig.add_gridspec(
            3, 3, width_ratios=[m, w, m], height_ratios=[m, h, m],
            left=0, right=1, bottom=0, top=1, wspace=0, hspace=0,
        )  # fmt: skip
        return FigureCanvasAgg(fig), fig.add_subfigure(spec[1, 1])


def _fixed_empty_labels(fig: Figure | SubFigure) -> None:
    """Skip placing axis labels that are empty: matplotlib measures every tick label to do it."""
    for ax in fig.axes:
        for axis, at in ((ax.xaxis, (0.5, -0.1)), (ax.yaxis, (-0.1, 0.5))):
            if not axis.label.get_text():
                axis.set_label_coords(*at)


def _placed_outside(canvas: Any, fig: Figure | SubFigure) -> bool:
    """Whether a legend or figure text lies off the canvas (placed far outside its figure,
    where no pixel of it shows); what axes draw stays within the margin or reaches its edge,
    which :func:`_crop` sees."""
    legends = [ax.get_legend() for ax in fig.axes]
    placed = [*fig.texts, *fig.legends, *(legend for legend in legends if legend is not None)]
    renderer = canvas.get_renderer()
    width, height = canvas.figure.bbox.size
    for artist in placed:
        box = artist.get_window_extent(renderer)
        if box.x0 < 0 or box.y0 < 0 or box.x1 > width or box.y1 > height:
            return True
    return False


def _crop(rgba: np.ndarray, pad: int) -> np.ndarray | None:
    """The image cut to its non-white pixels plus ``pad``; None when they come that close to
    an edge (the figure may reach past the canvas)."""
    ink = rgba.view(np.uint32)[..., 0] != np.uint32(0xFFFFFFFF)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if not rows.size:
        return rgba
    top, bottom, left, right = rows[0] - pad, rows[-1] + pad, cols[0] - pad, cols[-1] + pad
    if top < 0 or left < 0 or bottom >= rgba.shape[0] or right >= rgba.shape[1]:
        return None
    return rgba[top : bottom + 1, left : right + 1]


def _png(draw: Callable[[Any], object], size: tuple[float, float], tight: bool = True) -> str:
    """A one-off figure as a PNG data URI (see :class:`Canvases`)."""
    return Canvases().png(None, draw, size, tight)


def _palette_png(rgba: np.ndarray) -> bytes:
    """An RGBA image as a PNG of at most 256 colours: a third of the bytes, no visible change.

    Plots use few colours. The pixels' 32-bit values are factorized (a hash pass, ~2 ms);
    with at most 256 distinct ones they are the palette, exactly; with up to 4096, the 256
    most frequent are, and every other colour (antialiased edges) takes its nearest. More
    colours than that get a median cut (~25 ms).
    """
    from PIL import Image

    rgba = np.ascontiguousarray(rgba, dtype=np.uint8)
    h, w = rgba.shape[:2]
    codes, values = pd.factorize(rgba.view(np.uint32).ravel())
    if len(values) > 4096:
        image = Image.frombuffer("RGBA", (w, h), rgba, "raw", "RGBA", 0, 1).convert("RGB")
        small = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    else:
        rgb = np.asarray(values, dtype=np.uint32).view(np.uint8).reshape(-1, 4)[:, :3]
        if len(values) <= 256:
            palette, index = rgb, codes.astype(np.uint8)
        else:
            counts = np.bincount(codes, minlength=len(values))
            kept = np.argsort(-counts, kind="stable")[:256]
            palette = rgb[kept]
            far = rgb[:, None, :].astype(np.int32) - palette[None, :, :].astype(np.int32)
            nearest = (far**2).sum(axis=2).argmin(axis=1).astype(np.uint8)  # kept: itself
            index = nearest[codes]
        small = Image.frombuffer("P", (w, h), index.reshape(h, w), "raw", "P", 0, 1)
        small.putpalette(np.ascontiguousarray(palette).tobytes())
    out = io.BytesIO()
    small.save(out, format="PNG", optimize=False)
    return out.getvalue()


def _layer_count(frame: pd.DataFrame, kind: str) -> int:
    return len(plots.flow_layers(frame[frame["kind"] == kind]))


def config_figures(
    stats: pd.DataFrame, hists: pd.DataFrame, canvases: Canvases | None = None
) -> list[dict[str, str]]:
    """The figures of one config / run: ``[{"title", "caption", "src"}]`` (PNG data URIs).

    ``canvases``: figures kept from the previous config, redrawn (default: new ones).
    """
    canvases = canvases or Canvases()
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
        src = _saturation_png(canvases, stats)
        figs.append({"title": "Saturated and dead", **SATURATION, "src": src})
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


def _saturation_png(canvases: Canvases, stats: pd.DataFrame) -> str:
    n = _layer_count(stats, "activation")
    size = (min(max(5.0, 0.5 * n + 2), 14.0), 3.0)

    def draw(fig: Figure | SubFigure) -> None:
        plots.saturation_plot(stats, ax=plots.panels(fig, 1)[0])

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


def overview_figure(stats: pd.DataFrame, by: str, labels: dict[str, str], theory: Any) -> str:
    """The scale plot of every config / run as a PNG data URI."""
    if stats.empty or not {"activation", "gradient"} & set(stats["kind"].unique()):
        return ""
    width = 11.5 + (1.5 if len(labels) > 8 else 0.0)
    return _png(
        lambda f: plots.scale_plot(stats, by=by, labels=labels, theory=theory, fig=f),
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


# -- exports ----------------------------------------------------------------------------------


def _claims_frame(claims: list[dict[str, Any]] | None) -> pd.DataFrame | None:
    if claims is None:
        return None
    rows = []
    for c in claims:
        numbers = c.get("numbers") or {}
        rows.append(
            {
                "id": c.get("id"),
                "held": c.get("held"),
                "text": c.get("text"),
                "detail": c.get("detail"),
                "where": json.dumps(c.get("where") or {}, default=str),
                "numbers": json.dumps(numbers, default=str),
                "note": c.get("note", ""),
            }
        )
    return pd.DataFrame(rows, columns=["id", "held", "text", "detail", "where", "numbers", "note"])


def _write_exports(
    out: Path, run: RunData, table: pd.DataFrame, diagnosis: Any
) -> list[dict[str, str]]:
    """CSV files next to report.html; returns the links (name, what)."""
    frames: dict[str, pd.DataFrame | None] = {
        "summary.csv": table.assign(thresholds=table["thresholds"].map(_json_text)),
        "layers.csv": getattr(diagnosis, "layers", None),
        "stats.csv": run.records.stats,
        "claims.csv": _claims_frame(run.claims),
    }
    links = []
    for name, frame in frames.items():
        if frame is None:
            continue
        atomic_write_text(out / name, frame.to_csv(index=False))
        links.append({"href": quote(name), "name": name, "what": EXPORTS[name]})
    return links


def _json_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else json.dumps(value, default=str)


# -- formatting for the template --------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table cell: 3 significant digits, scientific when tiny or huge.

    Example:
        >>> fmt(0.22377), fmt(3.2e-9), fmt(None), fmt(70400.0), fmt(4)
        ('0.224', '3.20e-09', '—', '7.04e+04', '4')
    """
    if value is None or isinstance(value, bool):
        return "—" if value is None else str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(x):
        return "—"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def pct(value: Any) -> str:
    """A share as a percentage for a table cell.

    Example:
        >>> pct(0.905), pct(0.0), pct(2e-5), pct(None)
        ('90.5%', '0%', '<0.1%', '—')
    """
    x = _clean(value)
    if x is None:
        return "—"
    x = float(x)
    if x == 0:
        return "0%"
    return "<0.1%" if 0 < x < 1e-3 else f"{x:.1%}"


def _thresholds_text(value: Any) -> str:
    """The thresholds a verdict used, as short text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    if isinstance(value, dict):
        return ", ".join(f"{k} {fmt(v)}" for k, v in value.items())
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _verdict_threshold(layers: pd.DataFrame | None, by: str, group: str, verdict: Any) -> str:
    """'check value (threshold t)' of the layer check behind each part of a verdict."""
    if layers is None or layers.empty or not isinstance(verdict, str) or verdict == "healthy":
        return ""
    mine = layers[layers[by].astype(str) == group]
    out = []
    for part in verdict.split("+"):
        hit = mine[mine["verdict"] == part]
        if not hit.empty:
            row = hit.iloc[0]
            out.append(f"{row['check']} {fmt(row['value'])} (threshold {fmt(row['threshold'])})")
    return "; ".join(out)


def _shared_thresholds(table: pd.DataFrame) -> str:
    """The thresholds text when every row used the same ones, else ''."""
    texts = {_thresholds_text(v) for v in table["thresholds"]} - {""}
    return texts.pop() if len(texts) == 1 else ""


def _findings(layers: pd.DataFrame | None, by: str, group: str, most: int = 12) -> dict[str, Any]:
    """The doctor's non-healthy per-layer checks of one group, for a table."""
    if layers is None or layers.empty:
        return {"rows": [], "more": 0}
    part = layers[(layers[by].astype(str) == group) & (layers["verdict"] != "healthy")]
    rows = [
        {
            "layer": r["layer"],
            "module_type": r["module_type"],
            "check": r["check"],
            "verdict": r["verdict"],
            "value": fmt(r["value"]),
            "threshold": fmt(r["threshold"]),
            "reason": r.get("reason", ""),
        }
        for _, r in part.head(most).iterrows()
    ]
    return {"rows": rows, "more": max(len(part) - most, 0)}


def _clean(value: Any) -> Any:
    """None for the missing values pandas puts in a row (NaN, NA, NaT)."""
    try:
        return None if not isinstance(value, dict | list | tuple) and pd.isna(value) else value
    except (TypeError, ValueError):
        return value


def _verdict_counts(table: pd.DataFrame) -> list[tuple[str, int]]:
    counts = table["verdict"].fillna(table["status"]).value_counts()
    return [(str(k), int(v)) for k, v in counts.items()]


def _claim_rows(
    claims: list[dict[str, Any]] | None, labels: dict[str, str]
) -> list[dict[str, Any]]:
    rows = []
    for c in claims or []:
        numbers = dict(c.get("numbers") or {})
        values = numbers.pop("value", None)
        measured = (
            [(labels.get(str(k), str(k)), fmt(v)) for k, v in values.items()]
            if isinstance(values, dict)
            else ([("", fmt(values))] if values is not None else [])
        )
        test = ", ".join(f"{k} {_bound(v)}" for k, v in numbers.items())
        held = c.get("held")
        rows.append(
            {
                "id": c.get("id", ""),
                "text": c.get("text", ""),
                "held": held,
                "mark": {True: "held", False: "not held", None: "not measured"}.get(held, "?"),
                "measured": measured,
                "test": test,
                "detail": c.get("detail", ""),
                "note": c.get("note", ""),
                "where": ", ".join(f"{k}={v}" for k, v in (c.get("where") or {}).items()),
            }
        )
    return rows


def _bound(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    return fmt(value)


def _when(meta: dict[str, Any]) -> str:
    stamp = meta.get("written") or meta.get("started")
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(float(stamp or "")))
    except (TypeError, ValueError):
        return ""


def _header(run: RunData) -> dict[str, Any]:
    meta, spec = run.records.meta, run.spec or {}
    source = spec.get("source") or meta.get("source") or {}
    if isinstance(source, str):
        source = {"what": source}
    source = {k: str(source.get(k) or "") for k in ("what", "file", "lines")} if source else {}
    title = spec.get("title") or meta.get("title")
    if not title:
        title = f"flowscope report: {meta.get('run') or meta.get('model') or run.folder.name}"
    facts = {
        "study": meta.get("study") or spec.get("name"),
        "model": meta.get("model"),
        "devices": ", ".join(map(str, meta.get("devices", []) or [])),
        "dtype": meta.get("dtype") or ", ".join(map(str, meta.get("dtypes", []) or [])),
        "steps": meta.get("steps"),
        "torch": meta.get("torch"),
        "flowscope": meta.get("flowscope", __version__),
        "recorded": _when(meta),
    }
    return {
        "title": title,
        "description": spec.get("description", ""),
        "source": source,
        "facts": {k: v for k, v in facts.items() if v not in (None, "")},
    }


# -- the page ---------------------------------------------------------------------------------


def _css_class(value: Any) -> str:
    """CSS class of a verdict or status: its first part ("exploding+saturated": exploding)."""
    first = str(value).split("+")[0].lower()
    return re.sub(r"[^a-z0-9]+", "-", first).strip("-") or "none"


def _environment() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("flowscope.reporter", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = fmt
    env.filters["css"] = _css_class
    env.filters["pct"] = pct
    return env


def _axis_names(table: pd.DataFrame, by: str) -> list[str]:
    """The sweep axes (and seed when it varies) that make up a config's label."""
    skip = {by, "label", "status", "error", "seed", *RUN_COLUMNS}
    axes = [c for c in table.columns if c not in skip]
    if "seed" in table and table["seed"].nunique() > 1:
        axes.append("seed")
    return axes


def _figures_of(jobs: list[tuple[pd.DataFrame, pd.DataFrame]]) -> list[list[dict[str, str]]]:
    """:func:`config_figures` of each (stats, hists) in turn, on the same canvases."""
    canvases = Canvases()
    return [[] if stats.empty else config_figures(stats, hists, canvases) for stats, hists in jobs]


def all_figures(
    stats: pd.DataFrame, hists: pd.DataFrame, by: str, groups: Sequence[str], workers: int | None
) -> list[list[dict[str, str]]]:
    """:func:`config_figures` of every group, in order; in ``workers`` forked processes.

    Each process draws a run of consecutive groups on one :class:`Canvases`, so that every
    figure after a group's first is a redraw (a 16-config study: ~13 s in one process on 2
    busy CPUs). Workers are forked (Linux only), as torch's DataLoader does: nothing
    re-imports the caller's ``__main__`` (spawn would re-run a user's script), and the
    children use numpy/pandas/matplotlib only. ``workers=None``: one per CPU (at most 8)
    when there are 4+ CPUs and 4+ groups; with 2 busy CPUs forking measured slower than one
    process.
    """
    by_stats, by_hists = stats[by].astype(str), hists[by].astype(str)
    jobs = [(stats[by_stats == g], hists[by_hists == g]) for g in groups]
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


def _sections(
    run: RunData, table: pd.DataFrame, diagnosis: Any, workers: int | None = None
) -> list[dict[str, Any]]:
    """One section per config / run: its facts, verdict, findings and figures."""
    by = run.by
    layers = getattr(diagnosis, "layers", None)
    axes = [c for c in table.columns if c not in {by, "label", "status", "error", *RUN_COLUMNS}]
    figures = all_figures(
        run.records.stats, run.records.hists, by, table[by].astype(str).tolist(), workers
    )
    out = []
    for i, raw in enumerate(table.to_dict("records")):
        row = {k: _clean(v) for k, v in raw.items()}
        group = row[by]
        out.append(
            {
                "anchor": f"cfg-{i}",
                "row": row,
                "axes": [(a, row[a]) for a in axes if row.get(a) is not None],
                "threshold": _verdict_threshold(layers, by, group, row["verdict"]),
                "findings": _findings(layers, by, group),
                "figures": figures[i],
            }
        )
    return out


def render(
    run: RunData,
    out: Path,
    diagnosis: Any = None,
    problem: str = "",
    workers: int | None = None,
) -> str:
    """The HTML of the report of ``run``, with links relative to ``out`` (CSV exports written).

    Example:
        >>> run = read_run("reports/init-scales")  # doctest: +SKIP
        >>> html = render(run, Path("reports/init-scales"))  # doctest: +SKIP
    """
    by = run.by
    table = summary(run.records.stats, diagnosis=diagnosis, configs=run.configs, by=by)
    labels = dict(zip(table[by], table["label"], strict=True))
    exports = _write_exports(out, run, table, diagnosis)
    data_links = [
        {"href": quote(Path(os.path.relpath(run.folder / f, out)).as_posix()), "name": f}
        for f in run.files
    ]
    sections = _sections(run, table, diagnosis, workers)
    rows = []
    for section in sections:
        row = dict(section["row"])
        row["thresholds_text"] = _thresholds_text(row.get("thresholds"))
        rows.append({**section, "row": row})
    claims = _claim_rows(run.claims, labels)
    theory = theory_frame(run, table)
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            header=_header(run),
            by=by,
            group_header=" · ".join(_axis_names(table, by)) or by,
            thresholds=_shared_thresholds(table),
            sections=rows,
            verdict_counts=_verdict_counts(table),
            claims=claims,
            claims_held=sum(c["held"] is True for c in claims),
            overview=overview_figure(run.records.stats, by, labels, theory),
            theory_note=THEORY_NOTE if theory is not None else "",
            problem=problem,
            data_links=data_links,
            exports=exports,
            generated=time.strftime("%Y-%m-%d %H:%M"),
            version=__version__,
        )
    )


def report(
    source: str | os.PathLike[str] | Records | Recorder,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    workers: int | None = None,
) -> Path:
    """Write ``report.html`` (plus CSV exports) for a run folder, Records or Recorder.

    The page opens offline in any browser: figures are embedded PNGs, nothing is fetched.
    It shows, first, one summary row per config (studies) or run (``fs.watch``) with the
    doctor's verdict, the claims of the study's source held or not, and the scale of
    activations and gradients per layer for all configs; then per config the lecture's
    per-layer histograms, log-magnitude heat maps and saturated / dead fractions.

    Example:
        >>> import torch, flowscope as fs  # doctest: +SKIP
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())  # doctest: +SKIP
        >>> with fs.watch(model, name="demo") as rec:  # doctest: +SKIP
        ...     model(torch.randn(4, 8)).sum().backward()
        >>> fs.report(rec, "reports/demo")  # doctest: +SKIP
        PosixPath('reports/demo/report.html')

    Args:
        source: a run folder (``fs.watch`` records or a study run), a ``Records`` or a
            ``Recorder``; the latter two are saved into ``out_dir`` first.
        out_dir: where ``report.html`` and the CSV files go (default: the run folder; for
            records in memory ``reports/<run name or model class>``).
        workers: processes drawing the figures (forked, Linux); default one per CPU (at
            most 8) when there are 4+ CPUs and 4+ configs / runs, else 1.

    Returns:
        The path of ``report.html``.

    Raises:
        FlowscopeError: when ``source`` is not a run folder, Records or Recorder, or its
            files cannot be read.
    """
    run, out = _resolve(source, out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from flowscope.record.recorder import Recorder

    recorder = source if isinstance(source, Recorder) else None
    diagnosis, problem = _diagnose(run.records.stats, run.by, recorder)
    path = out / REPORT_FILE
    atomic_write_text(path, render(run, out, diagnosis, problem, workers))
    return path
