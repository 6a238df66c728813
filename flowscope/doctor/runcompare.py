"""Two training runs side by side (:func:`compare_runs`): per layer at each run's last step,
over the steps (loss), and the problems of the second that the first does not have.

The numbers come from the doctor: the per-layer table (:func:`flowscope.doctor.table.
layer_table`: rms of activations and of dL/dh pooled over a layer's calls), the run verdict
(:func:`flowscope.doctor.diagnosis.diagnose` at the last step) and the verdict timeline
(:func:`flowscope.doctor.timeline.timeline`). A problem is a (problem, layer) pair of the
timeline: "exploding in '4'" in B and not in A is new, even when A explodes elsewhere.

Example:
    >>> import pandas as pd
    >>> def run(nan):
    ...     return pd.DataFrame({"run": "", "step": [0, 1], "layer_idx": 0, "layer": "fc",
    ...         "module_type": "Linear", "kind": "activation", "count": 10, "nan": [0, nan],
    ...         "inf": 0, "rms": 1.0, "std": 1.0, "frac_zero": 0.0, "frac_saturated": 0.0})
    >>> c = compare_runs(run(0), run(2), names=("good", "bad"))
    >>> c.ok(), c.new[["problem", "layer", "first_step"]].values.tolist()
    (False, [['non-finite', 'fc', 1]])
    >>> compare_runs(run(2), run(0)).ok()  # B has no problem A lacks
    True
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flowscope.core.errors import FlowscopeError
from flowscope.doctor.diagnosis import diagnose
from flowscope.doctor.table import layer_table
from flowscope.doctor.thresholds import Thresholds
from flowscope.doctor.timeline import TIMELINE_COLUMNS, Timeline, timeline
from flowscope.record.frames import SCALAR_COLUMNS, Records, expected_passes
from flowscope.record.loading import load, records_of

__all__ = ["LAYER_STATS", "RunComparison", "compare_runs", "read_records"]

# per-layer numbers put side by side (``layer_table``'s columns), with their labels
LAYER_STATS = {
    "act_rms": "activation rms",
    "grad_rms": "dL/dh rms",
    "weight_std": "weight std",
    "zero": "zero share",
    "sat": "saturated share",
}
RATIOS = ("act_rms", "grad_rms")  # compared by a factor (the others are shown only)
_DEAD = pd.DataFrame(columns=["layer", "units", "dead", "samples"])


@dataclass
class RunComparison:
    """Run A against run B.

    Attributes:
        names: the two runs' names (their folders' names by default).
        layers: one row per layer (of either run, in A's order then B's): ``layer,
            module_type``, each of ``LAYER_STATS`` as ``<stat>_a`` and ``<stat>_b`` at each
            run's last step, ``act_ratio`` and ``grad_ratio`` (B over A), ``differs`` (the
            ratios beyond ``factor`` either way, as text: "activation rms x383").
        new: rows of B's timeline (``TIMELINE_COLUMNS``) whose (problem, layer) A's lacks.
        gone: rows of A's timeline whose (problem, layer) B's lacks.
        timelines: A's and B's :class:`Timeline`.
        verdicts: each run's verdict at its last step (``diagnose``).
        steps: each run's number of recorded steps and last step.
        scalars: both runs' scalars (``run`` is ``names[0]`` or ``names[1]``).
        stats: both runs' stats frames (one pass per step), for figures over the steps.
        factor: the ratio beyond which a layer's rms counts as different.
    """

    names: tuple[str, str]
    layers: pd.DataFrame
    new: pd.DataFrame
    gone: pd.DataFrame
    timelines: tuple[Timeline, Timeline]
    verdicts: tuple[str, str]
    steps: tuple[tuple[int, int], tuple[int, int]]
    scalars: pd.DataFrame
    stats: tuple[pd.DataFrame, pd.DataFrame] = field(repr=False)
    factor: float = 10.0

    def ok(self) -> bool:
        """True when B has no problem that A does not have (the CLI's exit status 0)."""
        return self.new.empty

    def summary(self) -> str:
        """The comparison in a few lines of text (what ``flowscope compare`` prints)."""
        return "\n".join(_summary_lines(self))

    def __str__(self) -> str:
        return self.summary()


def read_records(source: Any, who: str) -> tuple[Records, str]:
    """Records of a run folder, ``Records`` or ``Recorder``, and a name for it.

    Raises:
        FlowscopeError: naming ``who`` (``run A``) for a missing folder or one that holds no
            flowscope run.
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_dir():
            what = "is not a folder" if path.exists() else "does not exist"
            raise FlowscopeError(f"{who}: {str(path)!r} {what}; give a flowscope run folder")
        try:
            records = load(path, hist_steps=1)  # the histograms are not compared
        except FlowscopeError as err:
            raise FlowscopeError(f"{who}: {err}") from None
        return records, path.resolve().name
    if isinstance(getattr(source, "written", None), Path):  # a closed fs.watch(out=...)
        return read_records(source.written, who)
    records = records_of(source, f"compare() takes for {who}")
    return records, str(records.meta.get("run") or records.meta.get("model") or who)


def compare_runs(
    a: Any,
    b: Any,
    *,
    factor: float = 10.0,
    thresholds: Thresholds | None = None,
    names: tuple[str, str] | None = None,
) -> RunComparison:
    """Compare run B with run A: per layer, over the steps, and the problems B adds.

    Args:
        a: the reference run: a run folder, ``Records``, ``Recorder`` or stats DataFrame.
        b: the run compared with it (same types).
        factor: a layer's activation or dL/dh rms differing by more than this factor
            either way at the last step is called out (default 10, the doctor's
            ``act_ratio``).
        thresholds: the doctor's limits for both runs (default ``Thresholds()``).
        names: labels of the two runs (default: the folders' names, else "A" and "B").

    Returns:
        A :class:`RunComparison`; ``ok()`` is False when B has a problem A does not.

    Raises:
        FlowscopeError: a missing folder, one that is not a flowscope run, a run without
            activation or gradient rows, or a bad ``factor``.
    """
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 1:
        raise FlowscopeError(f"factor must be a number > 1, got {factor!r}")
    if not math.isfinite(factor):
        raise FlowscopeError(f"factor must be finite, got {factor!r}")
    sides = [_side(src, who) for src, who in ((a, "run A"), (b, "run B"))]
    label = names or (sides[0][2], sides[1][2])
    if label[0] == label[1]:
        label = (f"A: {label[0]}", f"B: {label[1]}")
    stats = (sides[0][0], sides[1][0])
    timelines = (
        timeline(stats[0], thresholds=thresholds),
        timeline(stats[1], thresholds=thresholds),
    )
    verdicts = tuple(_verdict(s, thresholds, who) for s, who in zip(stats, "AB", strict=True))
    scalars = pd.concat(
        [sc.assign(run=name) for (_, sc, _), name in zip(sides, label, strict=True)],
        ignore_index=True,
    )
    return RunComparison(
        names=(label[0], label[1]),
        layers=_layers(stats[0], stats[1], factor),
        new=_missing(timelines[1].frame, timelines[0].frame),
        gone=_missing(timelines[0].frame, timelines[1].frame),
        timelines=timelines,
        verdicts=(verdicts[0], verdicts[1]),
        steps=(_steps(stats[0]), _steps(stats[1])),
        scalars=scalars[SCALAR_COLUMNS],
        stats=stats,
        factor=float(factor),
    )


def _side(source: Any, who: str) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """One run's stats (one pass per step, one group), scalars and name."""
    if isinstance(source, pd.DataFrame):
        stats, scalars, name = source, pd.DataFrame(columns=SCALAR_COLUMNS), who[-1]
    else:
        records, name = read_records(source, who)
        stats, scalars = records.stats, records.scalars
    if stats.empty or "kind" not in stats:
        raise FlowscopeError(f"{who} ({name}) holds no statistics: nothing to compare")
    stats, _ = expected_passes(stats)
    if "run" in stats and stats["run"].nunique() > 1:
        raise FlowscopeError(
            f"{who} ({name}) holds {stats['run'].nunique()} runs; compare takes one run each"
        )
    return stats.assign(run=""), scalars.assign(run=""), name


def _verdict(stats: pd.DataFrame, thresholds: Thresholds | None, who: str) -> str:
    """The doctor's verdict at the run's last step."""
    try:
        return str(diagnose(stats, thresholds=thresholds).runs["verdict"].iloc[0])
    except FlowscopeError as err:
        raise FlowscopeError(f"run {who}: {err}") from None


def _steps(stats: pd.DataFrame) -> tuple[int, int]:
    """(recorded steps, last step)."""
    return int(stats["step"].nunique()), int(stats["step"].max())


def _layers(a: pd.DataFrame, b: pd.DataFrame, factor: float) -> pd.DataFrame:
    """Both runs' per-layer tables at their last steps, side by side, with B/A ratios."""
    tables = [
        layer_table(s[s["step"] == s["step"].max()], _DEAD)[["layer", "module_type", *LAYER_STATS]]
        for s in (a, b)
    ]
    merged = tables[0].merge(tables[1], on="layer", how="outer", suffixes=("_a", "_b"), sort=False)
    merged["module_type"] = merged.pop("module_type_a").fillna(merged.pop("module_type_b"))
    order = {name: i for i, name in enumerate([*tables[0]["layer"], *tables[1]["layer"]])}
    merged = merged.iloc[np.argsort(merged["layer"].map(order).to_numpy(), kind="stable")]
    differs = [[] for _ in range(len(merged))]  # type: list[list[str]]
    for col in RATIOS:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = merged[f"{col}_b"].to_numpy(float) / merged[f"{col}_a"].to_numpy(float)
        merged[col.replace("_rms", "_ratio")] = ratio
        off = (ratio > factor) | (ratio < 1 / factor)
        for i in np.flatnonzero(off):
            differs[i].append(f"{LAYER_STATS[col]} x{ratio[i]:.3g}")
    merged["differs"] = ["; ".join(d) for d in differs]
    cols = ["layer", "module_type"]
    cols += [f"{c}_{s}" for c in LAYER_STATS for s in "ab"]
    return merged[[*cols, "act_ratio", "grad_ratio", "differs"]].reset_index(drop=True)


def _missing(mine: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``mine`` whose (problem, layer) ``other`` has not."""
    seen = set(zip(other["problem"], other["layer"], strict=True))
    keep = [(p, layer) not in seen for p, layer in zip(mine["problem"], mine["layer"], strict=True)]
    rows = mine[np.asarray(keep, dtype=bool)] if len(mine) else mine
    return rows[TIMELINE_COLUMNS].reset_index(drop=True)


def _summary_lines(c: RunComparison) -> list[str]:
    """``RunComparison.summary`` as lines."""
    (na, nb), (sa, sb) = c.names, c.steps
    lines = [
        f"A: {na} ({sa[0]} recorded steps, last {sa[1]}): {c.verdicts[0]} at the last step",
        f"B: {nb} ({sb[0]} recorded steps, last {sb[1]}): {c.verdicts[1]} at the last step",
    ]
    losses = [_last(c.scalars, name) for name in c.names]
    if all(v is not None for v in losses):
        lines.append(f"loss at the last step: A {losses[0]:.4g}, B {losses[1]:.4g}")
    if c.new.empty:
        lines.append("no problem in B that A does not have")
    else:
        lines.append(f"in B, not in A ({len(c.new)}):")
        lines += [f"  {_problem(r)}" for r in c.new.to_dict("records")]
    if len(c.gone):
        lines.append(f"in A, gone in B ({len(c.gone)}):")
        lines += [f"  {_problem(r)}" for r in c.gone.to_dict("records")]
    far = c.layers[c.layers["differs"] != ""]
    if len(far):
        lines.append(f"layers whose rms differ by more than {c.factor:g}x at the last step (B/A):")
        lines += [
            f"  {r['layer']!r} ({r['module_type']}): {r['differs']}" for _, r in far.iterrows()
        ]
    return lines


def _problem(row: dict[Any, Any]) -> str:
    """One timeline row in words."""
    end = "persists" if row["persists"] else f"until step {row['last_step']}"
    if row["first_step"] == row["last_step"] and not row["persists"]:
        end = "that step only"
    return (
        f"{row['problem']} in {row['layer']!r} ({row['module_type']}) from step "
        f"{row['first_step']}, {end} ({row['check']} {row['value']:.3g}, threshold "
        f"{row['threshold']:g})"
    )


def _last(scalars: pd.DataFrame, run: str) -> float | None:
    """A run's loss at its last step (None without a loss)."""
    rows = scalars[(scalars["run"] == run) & (scalars["name"] == "loss")]
    return None if rows.empty else float(rows.sort_values("step")["value"].iloc[-1])
