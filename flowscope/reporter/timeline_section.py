"""The report's "Verdict timeline" section: for each run with a few recorded steps or more,
the doctor's problems over its steps (:func:`flowscope.doctor.timeline.timeline`), as lines
and a table, ready for the ``_timeline.html.j2`` template.

Example:
    >>> import pandas as pd
    >>> stats = pd.DataFrame({"run": "a", "step": [0, 1, 2], "layer_idx": 0, "layer": "fc",
    ...     "module_type": "Linear", "kind": "activation", "count": 10, "nan": [0, 1, 3],
    ...     "inf": 0, "rms": 1.0, "frac_zero": 0.0, "frac_saturated": 0.0})
    >>> section = timeline_section(stats, "run", {"a": "run a"})
    >>> [(r["label"], r["rows"][0]["first_step"]) for r in section["runs"]]
    [('run a', 1)]
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from flowscope.core.errors import FlowscopeError
from flowscope.doctor.timeline import Timeline, timeline

__all__ = ["MIN_STEPS", "timeline_rows", "timeline_section"]

MIN_STEPS = 3  # fewer recorded steps: no story over time (a one-snapshot report has none)
MOST = 25  # table rows shown per run (the lines name every problem)


def timeline_rows(t: Timeline, key: dict[str, Any], most: int = MOST) -> dict[str, Any]:
    """One run's timeline (``key``: its ``by`` values) as template rows: ``lines``, ``rows``
    (at most ``most``), ``more`` (rows left out), ``last_step``."""
    frame = t.frame
    for col, value in key.items():
        frame = frame[frame[col].astype(str) == str(value)]
    prefix = "[" + " / ".join(str(v) for v in key.values()) + "] "
    lines = [line.removeprefix(prefix) for line in t.lines if len(t.last_step) == 1 or
             line.startswith(prefix)]  # fmt: skip
    shown = ["problem", "check", "layer", "module_type", "first_step", "last_step", "steps"]
    shown += ["persists", "value", "threshold"]
    rows: list[dict[str, Any]] = [
        {str(k): v for k, v in r.items()} for r in frame[shown].head(most).to_dict("records")
    ]
    end = t.last_step.get("/".join(str(v) for v in key.values()))
    return {"lines": lines, "rows": rows, "more": max(len(frame) - most, 0), "last_step": end}


def timeline_section(
    stats: pd.DataFrame, by: str, labels: dict[str, str], anchors: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """The section's content, or None when no run has ``MIN_STEPS`` recorded steps.

    Args:
        stats: the report's stats frame.
        by: its grouping column (``run`` or ``config``).
        labels: a run's label per value of ``by`` (as text).
        anchors: the id of each run's section on the page, to link to.

    Returns:
        ``{"runs": [{"label", "anchor", "lines", "rows", "more", "last_step", "steps"}],
        "problems": n, "error": "", "dead_units": bool, "frame": Timeline.frame}``
        (``frame`` only when the doctor read them); ``error`` says why the doctor
        could not read them; ``dead_units``: the runs hold per-unit dead counts (the kind
        ``dead_units``), so dead is judged per unit rather than by the share of zeros.
    """
    if stats.empty or by not in stats:
        return None
    per_run = stats.groupby(stats[by].astype(str))["step"].nunique()
    counts = {str(k): int(n) for k, n in per_run.items()}
    long = [k for k, n in counts.items() if n >= MIN_STEPS]
    if not long:
        return None
    mine = stats[stats[by].astype(str).isin(long)]
    per_unit = bool("kind" in mine and (mine["kind"] == "dead_units").any())
    try:
        t = timeline(mine, by=by)
    except FlowscopeError as err:
        error = f"the doctor could not read them: {err}"
        return {"runs": [], "problems": 0, "error": error, "dead_units": per_unit}
    runs = []
    for key in long:
        rows = timeline_rows(t, {by: key})
        rows["label"] = labels.get(key, key)
        rows["anchor"] = (anchors or {}).get(key, "")
        rows["steps"] = int(counts[key])
        runs.append(rows)
    return {
        "runs": runs,
        "problems": len(t.frame),
        "error": "",
        "dead_units": per_unit,
        "frame": t.frame,
    }
