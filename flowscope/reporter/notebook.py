"""HTML for Jupyter: what ``Recorder._repr_html_`` and ``Records._repr_html_`` show.

A recorder shows its state (modules, step, schedule, snapshots waiting on the device) and,
once something was recorded, the table of its records; records show one row per layer at
the last recorded step: the scale (std) of activations, gradients, weights and weight
gradients, the zero and saturated fractions of the activations, and the NaN/Inf count,
which is highlighted when it is not zero. Every name is HTML-escaped. Figures are the
reporter's (``fs.report``); ``records_html(..., figure=True)`` adds the scale plot of
:mod:`flowscope.reporter.plots` when that module is installed.

Example:
    >>> import torch, flowscope as fs
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
    >>> with fs.watch(model) as rec:
    ...     model(torch.randn(2, 4)).sum().backward()
    >>> "<table" in recorder_html(rec)
    True
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import TYPE_CHECKING, Any, cast

import pandas as pd

if TYPE_CHECKING:
    from flowscope.record.frames import Records
    from flowscope.record.recorder import Recorder

__all__ = ["layer_table", "recorder_html", "records_html"]

STYLE = (
    "<style>.flowscope table{border-collapse:collapse;font-size:12px}"
    ".flowscope td,.flowscope th{padding:2px 8px;text-align:right;border-bottom:1px solid #ddd}"
    ".flowscope td.name,.flowscope th.name{text-align:left}"
    ".flowscope .bad{color:#b00020;font-weight:bold}.flowscope .dim{color:#777}</style>"
)
KIND_COLUMNS = {
    "activation": "act std",
    "gradient": "grad std",
    "weight": "weight std",
    "weight_grad": "wgrad std",
}


def recorder_html(rec: Recorder, *, max_rows: int = 40) -> str:
    """HTML summary of a recorder: its state and, if it recorded anything, its records.

    Showing the records flushes the snapshots waiting on the device (one transfer).

    Example:
        >>> import torch, flowscope as fs
        >>> rec = fs.watch(torch.nn.Linear(2, 2))
        >>> "waiting" in recorder_html(rec)
        True
    """
    pending = len(rec.pending())
    state = "closed" if rec.closed else "recording" if rec.active else "not recording this step"
    head = (
        f"<b>flowscope.Recorder</b> on <code>{_e(type(rec.model).__name__)}</code>: "
        f"{len(rec.targets)} modules, step {rec.step_index} (every {rec.every}), {state}; "
        f"kinds {_e(', '.join(rec.kinds))}; {pending} snapshot(s) waiting on the device"
    )
    if not rec.recorded:
        return f'<div class="flowscope">{STYLE}{head}. Nothing recorded yet.</div>'
    return f'<div class="flowscope">{STYLE}{head}.{_body(rec.records(), max_rows)}</div>'


def records_html(records: Records, *, max_rows: int = 40, figure: bool = False) -> str:
    """HTML summary of records: runs, steps, layers and a table per layer at the last step.

    Example:
        >>> import torch, flowscope as fs
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> with fs.watch(model) as rec:
        ...     model(torch.randn(2, 4)).sum().backward()
        >>> "act std" in records_html(rec.records())
        True

    Args:
        records: a :class:`flowscope.record.frames.Records` (``rec.records()``, ``fs.load(...)``).
        max_rows: at most this many layer rows (the rest are counted).
        figure: add the activation / gradient scale plot (needs :mod:`flowscope.reporter.plots`).
    """
    stats = records.stats
    runs = list(pd.unique(stats["run"])) if "run" in stats else []
    steps = sorted(pd.unique(stats["step"])) if len(stats) else []
    names = ", ".join(map(str, runs[:3])) + (", ..." if len(runs) > 3 else "")
    head = (
        f"<b>flowscope records</b>: {len(runs)} run(s){f' ({_e(names)})' if runs else ''}"
        f", {len(steps)} recorded step(s){_steps_text(steps)}, "
        f"{stats['layer'].nunique() if len(stats) else 0} layers, "
        f"kinds {_e(', '.join(sorted(pd.unique(stats['kind'])))) if len(stats) else '-'}"
    )
    body = _body(records, max_rows) + (_figure(stats) if figure else "")
    return f'<div class="flowscope">{STYLE}{head}.{body}</div>'


def _steps_text(steps: list[Any]) -> str:
    return f" ({steps[0]}..{steps[-1]})" if len(steps) > 1 else f" ({steps[0]})" if steps else ""


def layer_table(stats: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, layer) at each run's last step: the columns the HTML table shows.

    Example:
        >>> import torch, flowscope as fs
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
        >>> with fs.watch(model) as rec:
        ...     model(torch.randn(2, 4)).sum().backward()
        >>> layer_table(rec.stats).layer.tolist()
        ['0', '1']
    """
    if stats.empty:
        return pd.DataFrame(columns=["run", "layer", "type", *KIND_COLUMNS.values()])
    last = stats.groupby("run")["step"].transform("max")
    now = stats[(stats["step"] == last) & (stats["call"] == 0)]
    now = now.drop_duplicates(["run", "layer", "kind"])  # a module's first output / parameter
    now = now.assign(nonfinite=now["nan"] + now["inf"])
    keys = ["run", "layer_idx", "layer", "module_type"]
    std = now.set_index([*keys, "kind"])["std"].unstack("kind")  # keeps all-NaN rows
    std = std.rename(columns=KIND_COLUMNS).reindex(columns=list(KIND_COLUMNS.values()))
    acts = now[now["kind"] == "activation"].set_index(keys)[["frac_zero", "frac_saturated"]]
    bad = now.groupby(keys)["nonfinite"].sum()
    table = std.join(acts).join(bad.rename("nan+inf")).reset_index()
    table = table.sort_values(["run", "layer_idx"]).drop(columns="layer_idx")
    return table.rename(
        columns={"module_type": "type", "frac_zero": "zero", "frac_saturated": "sat"}
    )


def _body(records: Records, max_rows: int) -> str:
    table = layer_table(records.stats)
    if table.empty:
        return " Nothing recorded."
    if table["run"].nunique() == 1:
        table = table.drop(columns="run")
    step = int(records.stats["step"].max())
    cols = [c for c in table.columns if not table[c].isna().all()]
    records_ = cast(list[dict[str, Any]], table.head(max_rows).to_dict("records"))
    rows = [_row(r, cols) for r in records_]
    more = len(table) - max_rows
    tail = (
        f'<tr><td class="name dim" colspan="{len(cols)}">... {more} more</td></tr>'
        if more > 0
        else ""
    )
    header = "".join(f'<th class="{_cls(c)}">{_e(c)}</th>' for c in cols)
    return (
        f"<table><caption>last recorded step ({step}); std per kind; zero / sat: fractions "
        f"of the activations</caption><tr>{header}</tr>{''.join(rows)}{tail}</table>"
    )


def _row(row: dict[str, Any], cols: list[str]) -> str:
    cells = []
    for c in cols:
        value = row[c]
        css = _cls(c) + (" bad" if c == "nan+inf" and value and not _isnan(value) else "")
        cells.append(f'<td class="{css}">{_fmt(value)}</td>')
    return f"<tr>{''.join(cells)}</tr>"


def _cls(column: str) -> str:
    return "name" if column in ("run", "layer", "type") else ""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.3g}"
    return _e(str(value))


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _figure(stats: pd.DataFrame) -> str:
    """The scale plot as an inline PNG, or nothing when matplotlib is absent."""
    try:
        from flowscope.reporter import plots
    except ModuleNotFoundError as err:
        if err.name != "flowscope.reporter.plots":
            raise
        return ""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2))
    plots.scale_plot(stats, fig=fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="activation and gradient scale per layer" src="data:image/png;base64,{data}">'
