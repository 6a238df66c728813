"""The report's tables: the summary frame, its settings (a study's configs that differ only
by their seed), and the CSV files written next to the page.

Example:
    >>> import flowscope as fs
    >>> from flowscope.doctor import diagnose
    >>> stats = fs.load(run_dir).stats.query("seed == 0")  # a study run, e.g. "reports/init-scales"
    >>> table = summary(stats, diagnosis=diagnose(stats, by=["config"]))
    >>> table["verdict"].tolist()
    ['vanishing', 'healthy']
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from flowscope.doctor import RUN_COLUMNS
from flowscope.record.frames import atomic_write_text
from flowscope.record.loading import spaced_steps
from flowscope.reporter.export import csv_text
from flowscope.reporter.plots import group_column
from flowscope.reporter.run import RunData

__all__ = ["EXPORTS", "settings", "summary", "write_exports", "write_timeline"]

EXPORTS = {
    "summary.csv": "verdict and numbers per config / run",
    "layers.csv": "the doctor's checks per layer",
    "stats.csv": "every statistic per layer, kind and step",
    "claims.csv": "each claim of the source, held or not, with its numbers",
    "timeline.csv": "the verdict timeline: each problem's first and last step per layer",
}
CSV_STEPS = 200  # stats.csv of a longer run holds this many evenly spaced steps


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
        >>> import flowscope as fs
        >>> from flowscope.doctor import diagnose
        >>> stats = fs.load(run_dir).stats  # a study run: tanh, init small and xavier
        >>> stats = stats[stats["seed"] == 0]
        >>> table = summary(stats, diagnosis=diagnose(stats, by=["config"]))
        >>> table[["verdict", "act_gain", "grad_gain"]].round(2)
             verdict  act_gain  grad_gain
        0  vanishing      0.04       0.04
        1    healthy      0.66       0.74

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
    by = by or group_column(stats)
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


def settings(table: pd.DataFrame, by: str) -> list[list[int]]:
    """Positions of the :func:`summary` rows per setting, in order: a setting is the sweep
    axes' values without the seed. Each row is a setting of its own unless one has several
    seeds (a one-seed study, ``fs.watch`` runs).

    Example:
        >>> from flowscope.reporter.run import read_run
        >>> run = read_run(run_dir)  # a study run: tanh, init small and xavier
        >>> table = summary(run.records.stats, configs=run.configs)
        >>> [table["init"][rows[0]] for rows in settings(table, "config")]
        ['small', 'xavier']
    """
    skip = {by, "label", "status", "error", "seed", *RUN_COLUMNS}
    axes = [c for c in table.columns if c not in skip]
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, values in enumerate(table[axes].astype(str).itertuples(index=False, name=None)):
        groups.setdefault(values, []).append(i)
    if "seed" not in table or all(len(rows) == 1 for rows in groups.values()):
        return [[i] for i in range(len(table))]
    return list(groups.values())


# -- the CSV files ----------------------------------------------------------------------------


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
                "status": c.get("status"),
                "origin": c.get("origin", "lecture"),
                "text": c.get("text"),
                "detail": c.get("detail"),
                "where": json.dumps(c.get("where") or {}, default=str),
                "numbers": json.dumps(numbers, default=str),
                "note": c.get("note", ""),
            }
        )
    columns = ["id", "held", "status", "origin", "text", "detail", "where", "numbers", "note"]
    return pd.DataFrame(rows, columns=columns)


def write_exports(
    out: Path, run: RunData, table: pd.DataFrame, diagnosis: Any
) -> list[dict[str, str]]:
    """The CSV exports (:data:`EXPORTS`) written into ``out``, next to report.html.

    ``table``: the :func:`summary` of ``run``; ``diagnosis``: the doctor's (its per-layer
    checks), or None. Returns a link per file written: ``href``, ``name``, ``what``.
    """
    stats, what = _csv_steps(run.records.stats)
    frames: dict[str, pd.DataFrame | None] = {
        "summary.csv": table.assign(thresholds=table["thresholds"].map(_json_text)),
        "layers.csv": getattr(diagnosis, "layers", None),
        "stats.csv": stats,
        "claims.csv": _claims_frame(run.claims),
    }
    links = []
    for name, frame in frames.items():
        if frame is None:
            continue
        atomic_write_text(out / name, csv_text(frame))
        text = what if name == "stats.csv" and what else EXPORTS[name]
        links.append({"href": quote(name), "name": name, "what": text})
    return links


def write_timeline(out: Path, frame: pd.DataFrame) -> dict[str, str]:
    """``timeline.csv`` (the verdict timeline's frame, every row) written into ``out``; its
    link."""
    atomic_write_text(out / "timeline.csv", csv_text(frame))
    return {"href": "timeline.csv", "name": "timeline.csv", "what": EXPORTS["timeline.csv"]}


def _csv_steps(stats: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The stats rows of at most :data:`CSV_STEPS` evenly spaced steps, and what the link
    says when steps were left out (a 2000-step run's every-step CSV was 82 MB; the Parquet
    files keep every step)."""
    if "step" not in stats.columns or stats["step"].nunique() <= CSV_STEPS:
        return stats, ""
    keep = spaced_steps(stats["step"].to_numpy(), CSV_STEPS)
    what = (
        f"every statistic per layer and kind, at {len(keep)} evenly spaced steps of "
        f"{stats['step'].nunique()} (every step: the run's Parquet files, fs.load)"
    )
    return stats[stats["step"].isin(keep)], what


def _json_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else json.dumps(value, default=str)
