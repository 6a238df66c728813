"""A diagnosis as text: per run a summary, why, the fix, and a per-layer table.

It reads only a diagnosis's ``layers``, ``runs`` and ``by`` (:class:`DiagnosisFrames`):
``Diagnosis.__str__`` calls :func:`format_diagnosis`, so this module cannot import it.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import pandas as pd

from flowscope.doctor.thresholds import NO_DATA, VERDICTS

__all__ = ["DiagnosisFrames", "format_diagnosis"]


class DiagnosisFrames(Protocol):
    """What the text reads of a ``Diagnosis``."""

    layers: pd.DataFrame
    runs: pd.DataFrame
    by: list[str]


def _fmt(value: Any, pct: bool = False) -> str:
    """A number for the tables: 3 significant digits, '-' when missing."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-" if value is None or np.isnan(value) else f"{value}"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.1%}" if pct else f"{value:.3g}"


def format_diagnosis(d: DiagnosisFrames, max_layers: int = 60) -> str:
    """The verdict table as text: per run a summary, why, the fix, and a per-layer table.

    Example:
        >>> from flowscope.doctor import Diagnosis
        >>> print(format_diagnosis(Diagnosis(pd.DataFrame(), pd.DataFrame(
        ...     {"run": ["a"], "verdict": ["healthy"]}))).splitlines()[0])
        flowscope doctor: 1 run(s), 1 healthy, 0 with problems
    """
    runs = d.runs
    healthy = int((runs["verdict"] == "healthy").sum())
    empty = int((runs["verdict"] == NO_DATA).sum())
    out = [
        f"flowscope doctor: {len(runs)} run(s), {healthy} healthy, "
        f"{len(runs) - healthy - empty} with problems"
        + (f", {empty} without data" if empty else "")
    ]
    for _, run in runs.iterrows():
        keys = ", ".join(f"{c}={run[c]!s}" for c in d.by if c in run.index)
        out.append("")
        out.append(f"[{keys}] {str(run['verdict']).upper()}")
        out.append(
            f"  act gain {_fmt(run.get('act_gain'))}/layer, dL/dh gain "
            f"{_fmt(run.get('grad_gain'))}/layer toward the input, dL/dh first/last "
            f"{_fmt(run.get('grad_ratio'))}, saturated {_fmt(run.get('saturated'), True)}, "
            f"dead units {_fmt(run.get('dead'), True)}, NaN/Inf {_fmt(run.get('nonfinite'))}, "
            f"worst layer {run.get('worst_layer') or '-'}"
        )
        if run.get("reason"):
            out.append(f"  why: {run['reason']}")
        if run.get("fix"):
            out.append(f"  fix: {run['fix']}")
        if len(runs) <= 3 and len(d.layers):
            out += _layer_lines(d, run, max_layers)
    if len(runs) and runs.get("thresholds") is not None:
        out += ["", f"thresholds: {runs['thresholds'].iloc[0]}"]
    out += [f"note: {note}" for note in getattr(d, "notes", [])]
    return "\n".join(out)


def _layer_lines(d: DiagnosisFrames, run: pd.Series, max_layers: int) -> list[str]:
    """The per-layer table of one run."""
    rows = d.layers
    for col in d.by:
        rows = rows[rows[col] == run[col]]
    wide = rows.pivot_table(
        index=["layer_idx", "layer", "module_type"],
        columns="check",
        values="value",
        aggfunc="first",
    )
    worst = (
        rows[rows["verdict"] != "healthy"]
        .groupby("layer")["verdict"]
        .agg(lambda v: "+".join(x for x in VERDICTS if x in set(v)))
    )
    checks = [c for c in ("act_scale", "grad_scale", "saturated", "dead_units", "zero_share")]
    shown = wide[[c for c in checks if c in wide.columns]].dropna(how="all")
    bad_only = wide.index[wide.index.get_level_values("layer").isin(worst.index)]
    shown = wide.loc[shown.index.union(bad_only)].sort_index()
    header = ["layer", "type", "act/first", "dL/dh/last", "saturated", "dead", "zeros", "verdict"]
    lines = []
    for index, vals in shown.iloc[:max_layers].iterrows():
        key: tuple[Any, ...] = tuple(index)  # type: ignore[arg-type]
        layer, mtype = str(key[1]), str(key[2])
        lines.append(
            [
                layer,
                mtype,
                _fmt(vals.get("act_scale")),
                _fmt(vals.get("grad_scale")),
                _fmt(vals.get("saturated"), True),
                _fmt(vals.get("dead_units"), True),
                _fmt(vals.get("zero_share"), True),
                worst.get(layer, "ok"),
            ]
        )
    if not lines:
        return []
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    text = ["  " + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    text += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in lines]
    if len(shown) > max_layers:
        text.append(f"  ... {len(shown) - max_layers} more layers (Diagnosis.layers has them all)")
    text.append(
        "  act/first: activation rms over the first layer of the same kind; dL/dh/last: "
        "dL/dh rms over the last layer of the same kind (nearest the loss)"
    )
    return text
