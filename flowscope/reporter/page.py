"""The report: one self-contained ``report.html`` that answers "does signal and gradient flow
through this network, and if not, where does it break, and why?".

``report(source, out_dir)`` reads a run folder (``fs.watch`` records or a study run,
:mod:`flowscope.reporter.run`), asks the doctor for verdicts, draws the figures of
:mod:`flowscope.reporter.plots` as embedded PNGs (:mod:`flowscope.reporter.figures`), writes
CSV exports next to the page (:mod:`flowscope.reporter.tables`) and renders the Jinja2
templates in ``flowscope/reporter/templates`` with autoescaping on. The page loads nothing
from the network: figures are ``data:`` URIs, styles are inline, and the data files are
relative links. A study run with several seeds gets a section and a summary row per
setting (its configs but for the seed), an overview line per setting banded over its seeds.

Example:
    >>> import flowscope as fs
    >>> page = fs.report(run_dir)  # a study run, e.g. "reports/init-scales"
    >>> page.relative_to(run_dir)  # the report goes into the run folder
    PosixPath('report.html')
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np
import pandas as pd

from flowscope import __version__
from flowscope.core.errors import FlowscopeError
from flowscope.doctor import RUN_COLUMNS
from flowscope.record.frames import Records, atomic_write_text
from flowscope.reporter.canvas import Canvases
from flowscope.reporter.figures import (
    THEORY_NOTE,
    all_figures,
    overview_figure,
    theory_frame,
    training_figures,
)
from flowscope.reporter.run import RunData, resolve_source
from flowscope.reporter.study_figures import study_figures
from flowscope.reporter.tables import settings, summary, write_exports, write_timeline
from flowscope.reporter.timeline_section import timeline_section

if TYPE_CHECKING:
    from flowscope.record.recorder import Recorder

__all__ = ["REPORT_FILE", "environment", "render", "report", "summary"]

REPORT_FILE = "report.html"


def _diagnose(stats: pd.DataFrame, by: str, source: Any = None) -> tuple[Any, str]:
    """The doctor's verdicts, or None and the reason there are none.

    ``source``: the Recorder the stats came from, if any; the doctor then also sees the
    model (exact fan-ins in its prescriptions). It judges ``stats`` either way: asking the
    recorder for its stats would read a streamed run's every part again, histograms too.
    """
    if stats.empty:
        return None, "no statistics were recorded"
    from flowscope.doctor import diagnose

    try:
        return diagnose(stats, by=[by], model=getattr(source, "model", None)), ""
    except FlowscopeError as err:
        return None, f"the doctor could not judge these records: {err}"


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


def _findings(
    layers: pd.DataFrame | None,
    by: str,
    group: str,
    most: int = 12,
    seeds: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The doctor's non-healthy per-layer checks of one group, for a table; with ``seeds``
    (config -> seed), of each of those configs, in their order, with a seed column."""
    if layers is None or layers.empty:
        return {"rows": [], "more": 0}
    keys = layers[by].astype(str)
    mine = keys.isin(list(seeds)) if seeds else keys == group
    part = layers[mine & (layers["verdict"] != "healthy")]
    if seeds:
        order = {c: i for i, c in enumerate(seeds)}
        part = part.iloc[np.argsort(part[by].astype(str).map(order).to_numpy(), kind="stable")]
    rows = [
        {
            **({"seed": seeds[str(r[by])]} if seeds else {}),
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
        for key in ("rule", "seeds", "interval"):  # shown apart from the test
            numbers.pop(key, None)
        test = ", ".join(f"{k} {_bound(v)}" for k, v in numbers.items())
        held = c.get("held")
        status = c.get("status") or (
            "held" if held is True else "not held" if held is False else "not measured"
        )
        rows.append(
            {
                "id": c.get("id", ""),
                "text": c.get("text", ""),
                "held": held,
                "mark": status,
                "origin": c.get("origin", "lecture"),
                "seeds": (c.get("numbers") or {}).get("seeds", 1),
                "interval": [
                    (labels.get(str(k), str(k)), _bound(v))
                    for k, v in ((c.get("numbers") or {}).get("interval") or {}).items()
                ],
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
        "steps": _steps_text(run.records.stats, meta.get("steps")),
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


def _steps_text(stats: pd.DataFrame, counted: Any) -> Any:
    """The steps a page shows: "3 recorded, 0-100" from the stats when several were recorded
    (``meta["steps"]`` counts the step rec.step() opened after the last one too), else
    what the recorder counted."""
    if "step" not in stats.columns or stats["step"].nunique() < 2:
        return counted
    steps = stats["step"]
    return f"{steps.nunique():,} recorded, {int(steps.min())}–{int(steps.max())}"


# -- the page ---------------------------------------------------------------------------------


def _css_class(value: Any) -> str:
    """CSS class of a verdict or status: its first part ("exploding+saturated": exploding)."""
    first = str(value).split("+")[0].lower()
    return re.sub(r"[^a-z0-9]+", "-", first).strip("-") or "none"


def environment() -> Any:
    """The Jinja2 environment of flowscope's templates: autoescaping on, undefined names an
    error, filters ``num`` (:func:`fmt`), ``pct`` and ``css`` (a verdict's CSS class)."""
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


def _canvases(n: int) -> list[Canvases]:
    """One canvas set per section (the training figures are drawn once each)."""
    return [Canvases() for _ in range(n)]


def _training(run: RunData, group: str, canvases: Canvases) -> list[dict[str, str]]:
    """The training-run figures of one run (``group``, a value of the grouping column)."""
    by, stats, scalars = run.by, run.records.stats, run.records.scalars
    mine = stats[stats[by].astype(str) == group]
    if by in scalars and len(scalars):
        scalars = scalars[scalars[by].astype(str) == group]
    return training_figures(mine, scalars, canvases, group)


def _sections(
    run: RunData,
    table: pd.DataFrame,
    groups: list[list[int]],
    diagnosis: Any,
    workers: int | None = None,
) -> list[dict[str, Any]]:
    """One section per config / run, or per setting (``groups`` of table rows, its seeds):
    its facts, verdict, findings and figures."""
    by, stats, hists = run.by, run.records.stats, run.records.hists
    layers = getattr(diagnosis, "layers", None)
    axes = [c for c in table.columns if c not in {by, "label", "status", "error", *RUN_COLUMNS}]
    rows = [{str(k): _clean(v) for k, v in raw.items()} for raw in table.to_dict("records")]
    if all(len(g) == 1 for g in groups):
        figures = all_figures(stats, hists, by, [str(r[by]) for r in rows], workers)
        if len(run.records.scalars) or "format" in run.records.meta:  # a training run's story
            figures = [
                _training(run, str(row[by]), canvases) + figs
                for row, figs, canvases in zip(rows, figures, _canvases(len(rows)), strict=True)
            ]
        return [
            {
                "anchor": f"cfg-{i}",
                "row": row,
                "axes": [(a, row[a]) for a in axes if row.get(a) is not None],
                "threshold": _verdict_threshold(layers, by, row[by], row["verdict"]),
                "findings": _findings(layers, by, row[by]),
                "figures": figures[i],
                "seeds": [],
            }
            for i, row in enumerate(rows)
        ]
    recorded = set(stats[by].astype(str).unique())
    # each setting's seeds, those with records first: the histograms show the first
    members = [sorted((rows[i] for i in g), key=lambda r: r[by] not in recorded) for g in groups]
    shown = [[str(r[by]) for r in m] for m in members]
    figures = all_figures(stats, hists, by, shown, workers, band="seed")
    axes = [a for a in axes if a != "seed"]
    return [
        _setting_section(i, [rows[j] for j in g], m[0], by, axes, layers, figures[i], recorded)
        for i, (g, m) in enumerate(zip(groups, members, strict=True))
    ]


GAINS = ("act_gain", "grad_gain", "grad_ratio")  # a setting shows their median over its seeds
LARGEST = ("saturated", "dead", "nonfinite")  # ... and the largest of these


def _setting_section(
    index: int,
    seeds: list[dict[str, Any]],
    shown: dict[str, Any],
    by: str,
    axes: Sequence[str],
    layers: pd.DataFrame | None,
    figures: list[dict[str, str]],
    recorded: set[str],
) -> dict[str, Any]:
    """The section of one setting from its seeds' summary rows (``shown``: the one whose
    histograms are drawn): the verdict most of them got, the numbers over them."""
    outcomes = [r["verdict"] or r["status"] for r in seeds]
    verdicts = Counter(outcomes).most_common()  # ties: in seed order
    lead = seeds[outcomes.index(verdicts[0][0])]
    row, spread = _setting_row(seeds, lead, axes)
    drawn = sum(str(r[by]) in recorded for r in seeds)
    note = f"Histograms and heat maps: seed {shown['seed']}, the first of the {len(seeds)}."
    if drawn > 1:
        note += " Fractions per layer: the median over the seeds and their range."
    statuses = Counter(r["status"] for r in seeds)
    worst = next((s for s in statuses if s != "done"), "done")
    if len(statuses) > 1:
        row["status"] = f"{worst} {statuses[worst]} of {len(seeds)}"
    # a status the verdicts do not show (a diverged seed has a verdict; a failed one has not)
    hidden = any(r["verdict"] and r["status"] != "done" for r in seeds)
    return {
        "anchor": f"cfg-{index}",
        "row": row,
        "axes": [(a, row[a]) for a in axes if row.get(a) is not None],
        "threshold": _verdict_threshold(layers, by, lead[by], lead["verdict"]),
        "findings": _findings(layers, by, lead[by], seeds={str(r[by]): r["seed"] for r in seeds}),
        "figures": figures,
        "seeds": [{**r, "outcome": o} for r, o in zip(seeds, outcomes, strict=True)],
        "verdicts": verdicts,
        "lead": {"seed": lead["seed"], "count": verdicts[0][1]},
        "spread": spread,
        "status_badge": row["status"] if hidden else "",
        "status_css": _css_class(worst),
        "figure_note": note,
    }


def _setting_row(
    seeds: list[dict[str, Any]], lead: dict[str, Any], axes: Sequence[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """A summary row for a setting: ``lead``'s verdict and text, the median gains, the
    largest saturated / dead / non-finite share; and each gain's range over the seeds."""
    row = dict(lead)
    row["label"] = " · ".join("" if lead[a] is None else str(lead[a]) for a in axes)
    row["label"] = row["label"] or "(no sweep)"
    spread = {}
    for key in GAINS:
        values = [float(r[key]) for r in seeds if r.get(key) is not None]
        row[key] = float(np.median(values)) if values else None
        spread[key] = f"{fmt(min(values))}–{fmt(max(values))}" if len(values) > 1 else ""
    for key in LARGEST:
        values = [r[key] for r in seeds if r.get(key) is not None]
        row[key] = max(values) if values else None
    worst = Counter(r["worst_layer"] for r in seeds if r.get("worst_layer")).most_common()
    row["worst_layer"] = ", ".join(name for name, _ in worst) or None
    errors: dict[str, list[str]] = {}  # error -> the seeds that raised it
    for r in seeds:
        if r.get("error"):
            errors.setdefault(str(r["error"]), []).append(str(r["seed"]))
    row["error"] = "; ".join(
        f"seed{'s' if len(s) > 1 else ''} {', '.join(s)}: {e}" for e, s in errors.items()
    )
    row["error"] = row["error"] or None
    return row, spread


def _overview(
    run: RunData,
    table: pd.DataFrame,
    groups: list[list[int]],
    sections: list[dict[str, Any]],
    theory: pd.DataFrame | None,
) -> str:
    """The scale plot of every config / run, or of every setting banded over its seeds."""
    by, stats = run.by, run.records.stats
    if len(groups) == len(table):
        labels = dict(zip(table[by], table["label"], strict=True))
        return overview_figure(stats, by, labels, theory)
    keys = table[by].astype(str).tolist()
    setting = {keys[i]: f"setting {n}" for n, g in enumerate(groups) for i in g}
    labels = {f"setting {n}": s["row"]["label"] for n, s in enumerate(sections)}
    stats = stats.assign(setting=stats[by].astype(str).map(setting))
    if theory is not None:  # the same prediction for every seed
        theory = theory.assign(setting=theory[by].astype(str).map(setting))
        theory = theory.drop_duplicates(["setting", "layer", "kind"])
    return overview_figure(stats, "setting", labels, theory, band="seed")


def render(
    run: RunData,
    out: Path,
    diagnosis: Any = None,
    problem: str = "",
    workers: int | None = None,
) -> str:
    """The HTML of the report of ``run``, with links relative to ``out`` (CSV exports written).

    Example:
        >>> from flowscope.reporter.run import read_run
        >>> run = read_run(model_dir)  # fs.watch records, e.g. "reports/my-model"
        >>> html = render(run, run.folder)
        >>> html[:15]
        '<!DOCTYPE html>'
    """
    by = run.by
    table = summary(run.records.stats, diagnosis=diagnosis, configs=run.configs, by=by)
    labels = dict(zip(table[by], table["label"], strict=True))
    exports = write_exports(out, run, table, diagnosis)
    data_links = [
        {"href": quote(Path(os.path.relpath(run.folder / f, out)).as_posix()), "name": f}
        for f in run.files
    ]
    groups = settings(table, by)
    sections = _sections(run, table, groups, diagnosis, workers)
    rows = []
    for section in sections:
        row = dict(section["row"])
        row["thresholds_text"] = _thresholds_text(row.get("thresholds"))
        rows.append({**section, "row": row})
    claims = _claim_rows(run.claims, labels)
    anchors = {str(s["row"][by]): s["anchor"] for s in sections if not s["seeds"]}
    timeline = timeline_section(
        run.records.stats, by, {str(k): str(v) for k, v in labels.items()}, anchors
    )
    if timeline is not None and "frame" in timeline:
        exports.append(write_timeline(out, timeline.pop("frame")))
    theory = theory_frame(run, table)
    seeds = len(groups) < len(table)  # a section per setting, over its seeds
    axis_names = [a for a in _axis_names(table, by) if not (seeds and a == "seed")]
    return (
        environment()
        .get_template("report.html.j2")
        .render(
            header=_header(run),
            by=by,
            unit="setting" if seeds else by,
            seeds=[_clean(s) for s in pd.unique(table["seed"])] if seeds else [],
            runs=len(table),
            group_header=" · ".join(axis_names) or by,
            thresholds=_shared_thresholds(table),
            sections=rows,
            verdict_counts=_verdict_counts(table),
            claims=claims,
            timeline=timeline,
            claims_held=sum(c["held"] is True for c in claims),
            claims_inconclusive=sum(c.get("status") == "inconclusive" for c in claims),
            overview=_overview(run, table, groups, rows, theory),
            study_figures=study_figures(run),
            theory_note=THEORY_NOTE if theory is not None else "",
            problem=problem,
            passes_note=run.passes_note,
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
        >>> import torch, flowscope as fs
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
        >>> with fs.watch(model, name="demo") as rec:
        ...     model(torch.randn(4, 8)).sum().backward()
        >>> fs.report(rec, "reports/demo")
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
    run, out = resolve_source(source, out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from flowscope.record.recorder import Recorder

    recorder = source if isinstance(source, Recorder) else None
    diagnosis, problem = _diagnose(run.records.stats, run.by, recorder)
    path = out / REPORT_FILE
    atomic_write_text(path, render(run, out, diagnosis, problem, workers))
    return path
