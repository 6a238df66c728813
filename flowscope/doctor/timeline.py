"""The verdict timeline: the doctor's checks at every recorded step of a training run, and
for each problem the first step and layer where it appeared.

:func:`step_checks` runs the per-layer checks of :mod:`flowscope.doctor.rules` (the same
table as :func:`flowscope.doctor.table.layer_table`, the same roles and :class:`Thresholds`)
on every step at once, with pandas group-bys over (run, step, layer) instead of one
``diagnose(step=s)`` per step: ``act_scale`` / ``grad_scale`` (exploding, vanishing),
``saturated``, ``dead_units`` (dead: the share of a ReLU-like layer's units that output 0 for
the whole batch, from the ``dead_units`` rows ``fs.watch(kinds=[..., "dead_units"])`` records),
else ``zero_share`` (records without them: the share of exact zeros, an upper bound) and
``non-finite``. :func:`timeline` folds those rows
into one row per (problem, check, layer): first and last step, how many steps, whether it
persists to the last recorded step, and a line of text per problem naming where it began
(for NaN/Inf the first layer of the forward pass that produced them, as
:func:`flowscope.doctor.rules.worst_layer` does; for the others the most extreme layer at
that step).

Example:
    >>> import torch, flowscope as fs
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> rec = fs.watch(net)
    >>> for step in range(4):
    ...     if step == 2:
    ...         _ = torch.nn.init.constant_(net[0].bias, -100.0)  # every unit of '1' dies
    ...     net(torch.randn(32, 8)).pow(2).mean().backward()
    ...     rec.step()
    >>> rec.close()
    >>> t = timeline(rec)
    >>> t.frame[["problem", "layer", "first_step", "persists"]].values.tolist()
    [['vanishing', '0', 2, True], ['vanishing', '2', 2, True], ['dead', '1', 2, True]]
    >>> print(t.lines[-1])  # doctest: +NORMALIZE_WHITESPACE
    dead from step 2 in '1' (ReLU): 100% of outputs exactly 0 (limit 90%); 1 layer,
    persists to the last step (3)

(The dead ReLU passes no gradient to '0', and '2' sees only its bias: both vanish too.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from flowscope.core.activations import activation_type
from flowscope.core.errors import FlowscopeError
from flowscope.doctor.table import PRE_ACTIVATION, role_of
from flowscope.doctor.thresholds import VERDICTS, Thresholds
from flowscope.record.frames import expected_passes
from flowscope.record.loading import records_of

__all__ = ["CHECK_COLUMNS", "TIMELINE_COLUMNS", "Timeline", "step_checks", "timeline"]

CHECK_COLUMNS = [
    "step", "layer_idx", "layer", "module_type", "check", "verdict", "value", "threshold", "rank",
]  # fmt: skip
TIMELINE_COLUMNS = [
    "problem", "check", "layer", "layer_idx", "module_type", "first_step", "last_step",
    "steps", "persists", "value", "threshold",
]  # fmt: skip
_NEED = ["step", "layer_idx", "layer", "module_type", "kind", "count", "nan", "inf", "rms"]


@dataclass
class Timeline:
    """When each problem began: ``frame`` (one row per problem, check and layer), ``lines``
    (one per problem and run), ``str()`` the lines.

    Attributes:
        frame: ``[*by, problem, check, layer, layer_idx, module_type, first_step, last_step,
            steps, persists, value, threshold]``: ``steps`` the recorded steps flagged,
            ``persists`` flagged at the run's last recorded step, ``value`` the check's value
            at ``first_step`` (same units as ``Diagnosis.layers``).
        lines: per run and problem: where and when it first appeared.
        by: the grouping columns.
        last_step: each run's last recorded step (key: the ``by`` values joined by ``/``).
    """

    frame: pd.DataFrame
    lines: list[str]
    by: list[str] = field(default_factory=lambda: ["run"])
    last_step: dict[str, int] = field(default_factory=dict)

    def ok(self) -> bool:
        """True when no check flagged any layer at any step."""
        return self.frame.empty

    def __str__(self) -> str:
        return "\n".join(self.lines) if self.lines else "no problem at any recorded step"


def _stats_of(source: Any) -> pd.DataFrame:
    """The stats frame of a DataFrame, Records, Recorder or run folder."""
    if isinstance(source, pd.DataFrame):
        return source
    stats = records_of(source, "timeline() takes", "a stats DataFrame, ").stats
    assert isinstance(stats, pd.DataFrame)
    return stats


def _per_layer(stats: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """``layer_table``'s columns for every (group, step, layer) at once."""
    kind = stats["kind"]  # compared as it is stored (arrow strings stay in arrow)
    act, grad = (kind == "activation").to_numpy(bool), (kind == "gradient").to_numpy(bool)
    count = stats["count"].to_numpy(float)
    bad = stats["nan"].to_numpy(float) + stats["inf"].to_numpy(float)
    finite = np.clip(count - bad, 0, None)
    with np.errstate(invalid="ignore", over="ignore"):
        sq = finite * stats["rms"].to_numpy(float) ** 2
    zero = stats["frac_zero"].to_numpy(float) * finite
    # per-unit rows (record/deadunits.py): count = the units, mean = the dead share
    units = np.where((kind == "dead_units").to_numpy(bool), count, 0.0)
    dead = units * stats["mean"].to_numpy(float) if units.any() else units
    sat = stats["frac_saturated"].to_numpy(float) * finite
    cols = {
        "nonfinite": bad,
        "act_nonfinite": np.where(act, bad, 0.0),
        "act_fin": np.where(act, finite, 0.0),
        "act_sq": np.where(act, sq, 0.0),
        "zw": np.where(act, zero, 0.0),
        "sw": np.where(act, sat, 0.0),
        "grad_fin": np.where(grad, finite, 0.0),
        "grad_sq": np.where(grad, sq, 0.0),
        "act_count": np.where(act, count, 0.0),
        "units": units,
        "dead_n": dead,
    }
    # one int64 key per (group, step, layer), sorted once, summed with reduceat: a pandas
    # group-by on millions of (arrow) layer names spends its time hashing and copying
    names = [*by, "layer"]
    coded = [pd.factorize(stats[c], use_na_sentinel=False) for c in names]
    step = stats["step"].to_numpy(np.int64)
    key = np.zeros(len(stats), np.int64)
    for codes, uniques in coded[:-1]:
        key = key * len(uniques) + codes
    lo = int(step.min())
    key = (key * (int(step.max()) - lo + 1) + (step - lo)) * len(coded[-1][1]) + coded[-1][0]
    order = np.argsort(key, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(key[order]) != 0])
    first = order[starts]
    table = pd.DataFrame(
        {name: np.asarray(uniques, dtype=object)[codes[first]] for name, (codes, uniques) in
         zip(names, coded, strict=True)}
    )  # fmt: skip
    table["step"] = step[first]
    index = stats["layer_idx"].to_numpy()[order]
    table["layer_idx"] = np.minimum.reduceat(index, starts)
    table["module_type"] = stats["module_type"].iloc[first].astype(str).to_numpy(object)
    for name, values in cols.items():  # NaN skipped, as layer_table's sums do
        table[name] = np.add.reduceat(np.where(np.isnan(values), 0.0, values)[order], starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        table["act_rms"] = np.sqrt(table["act_sq"] / table["act_fin"])
        table["grad_rms"] = np.sqrt(table["grad_sq"] / table["grad_fin"])
        table["zero"] = table["zw"] / table["act_fin"]
        table["sat"] = table["sw"] / table["act_fin"]
        counted = table["units"].where(table["units"] > 0)  # NaN: no per-unit counts
        table["samples"] = table["act_count"] / counted  # per unit: batch × positions
        table["dead_share"] = table["dead_n"] / counted
    return table.sort_values([*by, "step", "layer_idx"], kind="stable").reset_index(drop=True)


def _scale_checks(table: pd.DataFrame, by: list[str], th: Thresholds) -> list[pd.DataFrame]:
    """act_scale / grad_scale flags: each layer of a role against its first (activations) or
    last (dL/dh) layer, per step (``rules.check_layers`` on ``table.scale_pool``)."""
    step = [*by, "step"]
    recorded = table["act_rms"].notna() | table["grad_rms"].notna()
    pre = table["module_type"].str.contains(PRE_ACTIVATION) & recorded
    has_pre = pre.groupby([table[c] for c in step], sort=False).transform("any")
    pool = table[pre.where(has_pre, recorded)].copy()
    if pool.empty:
        return []
    pool["role"] = role_of(pool["module_type"], pool["layer"])
    gstep = pool.groupby(step, sort=False, dropna=False)
    size = gstep["role"].transform("size")
    most = pool.groupby([*step, "role"], sort=False, dropna=False)["role"].transform("size")
    most = most.groupby([pool[c] for c in step], sort=False).transform("max")
    pool.loc[(size >= 2) & (most < 2), "role"] = "*"
    groups = [*step, "role"]
    members = pool.groupby(groups, sort=False, dropna=False)["layer"].transform("size")
    pool = pool[members >= 2]
    out = []
    for column, check, limit, forward in (
        ("act_rms", "act_scale", th.act_ratio, True),
        ("grad_rms", "grad_scale", th.grad_ratio, False),
    ):
        values = pool[column]
        positive = values.where(np.isfinite(values) & (values > 0)).groupby(
            [pool[c] for c in groups], sort=False
        )
        ref = positive.transform("first") if forward else positive.transform("last")
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = values / ref
        shown = np.isfinite(values) | (values == math.inf)
        for verdict, hit in (("exploding", ratio > limit), ("vanishing", ratio < 1 / limit)):
            rows = pool[shown & hit]
            r = ratio[shown & hit].to_numpy(float)
            with np.errstate(divide="ignore"):
                far = np.where(
                    np.isfinite(r) & (r > 0), np.abs(np.log(r)) / math.log(limit), np.inf
                )
            out.append(_flags(rows, by, check, verdict, r, limit, -far))
    return out


def _share_checks(table: pd.DataFrame, by: list[str], th: Thresholds) -> list[pd.DataFrame]:
    """saturated, dead_units / zero_share (dead) and non-finite flags (``rules._share_rows``
    and the non-finite row of ``rules.check_layers``)."""
    zeros = {t: _zero_output(t) for t in table["module_type"].unique()}
    zero_output = table["module_type"].map(zeros)
    sat = table["sat"].to_numpy(float)
    relu6 = (table["module_type"] == "ReLU6").to_numpy()
    with np.errstate(invalid="ignore"):
        less = sat - table["zero"].to_numpy(float)
        sat = np.where(relu6, np.where(less < 0, 0.0, less), sat)  # ReLU6's floor is no clamp
        saturated = sat > th.saturated
        zero = table["zero"].to_numpy(float)
        can_die = zero_output.to_numpy(bool)
        counted = can_die & (table["samples"].to_numpy(float) >= th.dead_min_samples)
        share = table["dead_share"].to_numpy(float)
        died = counted & (share > th.dead)
        dead = can_die & ~counted & (zero >= th.zero_share)
    count = table["nonfinite"].to_numpy(float)
    nonfinite = count > th.nonfinite
    # where NaN/Inf began: the first layer whose activations hold them, else the backward's
    # first (the last layer)
    idx = table["layer_idx"].to_numpy(float)
    origin = np.where(table["act_nonfinite"].to_numpy(float) > 0, idx, 1e12 - idx)
    return [
        _flags(table[saturated], by, "saturated", "saturated", sat[saturated], th.saturated,
               -sat[saturated] / th.saturated),
        _flags(table[died], by, "dead_units", "dead", share[died], th.dead,
               -share[died] / th.dead),
        _flags(table[dead], by, "zero_share", "dead", zero[dead], th.zero_share,
               -zero[dead] / th.zero_share),
        _flags(table[nonfinite], by, "non-finite", "non-finite", count[nonfinite], th.nonfinite,
               origin[nonfinite]),
    ]  # fmt: skip


def _zero_output(module_type: str) -> bool:
    """Whether a module type can output exact zeros (a ReLU-like unit can die)."""
    kind = activation_type(module_type)
    return kind is not None and kind.zero_output


def _flags(
    rows: pd.DataFrame,
    by: list[str],
    check: str,
    verdict: str,
    value: Any,
    limit: float,
    rank: Any,
) -> pd.DataFrame:
    """Flag rows of one check: the layer's keys plus check, verdict, value, threshold, rank."""
    out = rows[[*by, "step", "layer_idx", "layer", "module_type"]].copy()
    out["check"], out["verdict"] = check, verdict
    out["value"], out["threshold"], out["rank"] = np.asarray(value, float), float(limit), rank
    return out


def _prepare(
    source: Any, by: str | Sequence[str] | None, thresholds: Thresholds | None
) -> tuple[pd.DataFrame, list[str], Thresholds]:
    """The stats (one pass per step), the grouping columns and the thresholds, checked."""
    stats = _stats_of(source)
    cols = ["run"] if by is None else [by] if isinstance(by, str) else list(by)
    if not cols or not all(isinstance(c, str) for c in cols):
        raise FlowscopeError(f"by must be a column name or a non-empty list of them, got {by!r}")
    th = Thresholds() if thresholds is None else thresholds
    if not isinstance(th, Thresholds):
        raise FlowscopeError(f"thresholds must be a Thresholds, got {type(th).__name__}")
    missing = [c for c in [*cols, *_NEED, "frac_zero", "frac_saturated"] if c not in stats]
    if missing:
        raise FlowscopeError(
            f"the stats frame lacks columns {missing}; the timeline needs flowscope's stats "
            f"frame with the grouping columns by={cols}"
        )
    if not stats.index.is_unique:  # concatenated frames: the group-bys align on the index
        stats = stats.reset_index(drop=True)
    stats, _ = expected_passes(stats)
    return stats, cols, th


def step_checks(
    source: Any,
    *,
    by: str | Sequence[str] | None = None,
    thresholds: Thresholds | None = None,
) -> pd.DataFrame:
    """Every check that flags a layer, at every recorded step: what ``diagnose(step=s)``
    puts in ``Diagnosis.layers`` with a verdict other than healthy, for all ``s`` at once.

    Example:
        >>> stats = pd.DataFrame({"run": "", "step": [0, 1], "layer_idx": 0, "layer": "0",
        ...     "module_type": "Tanh", "kind": "activation", "count": 10, "nan": [0, 2],
        ...     "inf": 0, "rms": 0.5, "frac_zero": 0.0, "frac_saturated": [0.1, 0.7]})
        >>> step_checks(stats)[["step", "check", "value"]].values.tolist()
        [[1, 'non-finite', 2.0], [1, 'saturated', 0.7]]

    Args:
        source: a stats DataFrame, ``Records``, ``Recorder`` or run folder.
        by: grouping columns (default ``["run"]``), as for :func:`diagnose`.
        thresholds: default ``Thresholds()``.

    Returns:
        ``[*by, step, layer_idx, layer, module_type, check, verdict, value, threshold,
        rank]`` sorted by group, step, layer and check; ``rank`` orders a step's layers for
        the timeline's text (smaller: where the problem began, or the most extreme).

    Raises:
        FlowscopeError: an unsupported source, missing columns, bad ``by`` or thresholds.
    """
    return _checks(*_prepare(source, by, thresholds))


def _checks(stats: pd.DataFrame, by_cols: list[str], th: Thresholds) -> pd.DataFrame:
    """``step_checks`` on prepared input."""
    if stats.empty:
        return pd.DataFrame(columns=[*by_cols, *CHECK_COLUMNS])
    table = _per_layer(stats, by_cols)
    parts = [
        p
        for p in (*_scale_checks(table, by_cols, th), *_share_checks(table, by_cols, th))
        if len(p)
    ]
    if not parts:
        return pd.DataFrame(columns=[*by_cols, *CHECK_COLUMNS])
    flags = pd.concat(parts, ignore_index=True)[[*by_cols, *CHECK_COLUMNS]]
    order = [*by_cols, "step", "layer_idx", "check"]
    return flags.sort_values(order, kind="stable").reset_index(drop=True)


def timeline(
    source: Any,
    *,
    by: str | Sequence[str] | None = None,
    thresholds: Thresholds | None = None,
) -> Timeline:
    """For each problem of a training run, the first step and layer where it appeared.

    Example:
        >>> stats = pd.DataFrame({"run": "", "step": [0, 1, 2], "layer_idx": 0, "layer": "fc",
        ...     "module_type": "Linear", "kind": "activation", "count": 10, "nan": [0, 1, 3],
        ...     "inf": 0, "rms": 1.0, "frac_zero": 0.0, "frac_saturated": 0.0})
        >>> print(timeline(stats))  # doctest: +NORMALIZE_WHITESPACE
        non-finite first at step 1 in 'fc' (Linear): 1 NaN/Inf values; 1 layer,
        persists to the last step (2)

    Args:
        source: a stats DataFrame, ``Records``, ``Recorder`` or run folder.
        by: grouping columns (default ``["run"]``).
        thresholds: default ``Thresholds()``: the doctor's limits.

    Returns:
        A :class:`Timeline`; problems in the doctor's order of urgency (``VERDICTS``).

    Raises:
        FlowscopeError: an unsupported source, missing columns, bad ``by`` or thresholds.
    """
    stats, by_cols, th = _prepare(source, by, thresholds)
    flags = _checks(stats, by_cols, th)
    last = stats.groupby(by_cols, sort=True, dropna=False)["step"].max()
    last_step = {_key(k): int(v) for k, v in last.items()}
    if flags.empty:
        return Timeline(pd.DataFrame(columns=[*by_cols, *TIMELINE_COLUMNS]), [], by_cols, last_step)
    keys = [*by_cols, "verdict", "check", "layer"]
    grouped = flags.groupby(keys, sort=False, dropna=False)
    frame = grouped.agg(
        layer_idx=("layer_idx", "first"),
        module_type=("module_type", "first"),
        first_step=("step", "min"),
        last_step=("step", "max"),
        steps=("step", "size"),
        value=("value", "first"),  # flags are sorted by step: the value at the first step
        threshold=("threshold", "first"),
        rank=("rank", "first"),
    ).reset_index()
    frame = frame.rename(columns={"verdict": "problem"})
    ends = frame[by_cols].apply(lambda r: last_step[_key(tuple(r))], axis=1)
    frame["persists"] = frame["last_step"].to_numpy() == ends.to_numpy()
    frame["urgency"] = frame["problem"].map({v: i for i, v in enumerate(VERDICTS)})
    frame = frame.sort_values(
        [*by_cols, "urgency", "first_step", "rank", "layer_idx"], kind="stable"
    ).reset_index(drop=True)
    lines = [
        _line(rows, by_cols, th, last_step)
        for _, rows in frame.groupby([*by_cols, "urgency"], sort=False, dropna=False)
    ]
    return Timeline(frame[[*by_cols, *TIMELINE_COLUMNS]], lines, by_cols, last_step)


def _key(values: Any) -> str:
    """A group's key as text (``by`` values joined by '/')."""
    parts = values if isinstance(values, tuple) else (values,)
    return "/".join(str(v) for v in parts)


def _line(rows: pd.DataFrame, by: list[str], th: Thresholds, last: dict[str, int]) -> str:
    """One problem of one run in words: where and when it began, how far it spread."""
    top = rows.iloc[0]  # sorted: earliest step, then where it began / the most extreme
    problem, check, value = str(top["problem"]), str(top["check"]), float(top["value"])
    layers = rows["layer"].nunique()
    end = last[_key(tuple(top[c] for c in by))]
    if rows["persists"].any():
        span = f"persists to the last step ({end})"
    else:
        span = f"last seen at step {int(rows['last_step'].max())} (the run ends at {end})"
    where = f"in {top['layer']!r} ({top['module_type']})"
    run = " / ".join(f"{top[c]}" for c in by if str(top[c]))
    head = f"[{run}] " if run and len(last) > 1 else ""
    verb = "first at step" if problem == "non-finite" else "from step"
    return (
        f"{head}{problem} {verb} {int(top['first_step'])} {where}: {_what(check, value, th)}; "
        f"{layers} layer{'s' if layers != 1 else ''}, {span}"
    )


def _what(check: str, value: float, th: Thresholds) -> str:
    """A check's value and limit in words (as in the doctor's reasons)."""
    if check == "non-finite":
        return f"{value:.0f} NaN/Inf values"
    if check == "act_scale":
        return f"activation rms {value:.3g}x its role's first layer (limit {th.act_ratio:g}x)"
    if check == "grad_scale":
        return f"dL/dh rms {value:.3g}x its role's last layer (limit {th.grad_ratio:g}x)"
    if check == "saturated":
        return f"{value:.0%} of outputs saturated (limit {th.saturated:.0%})"
    if check == "dead_units":
        return f"{value:.0%} of units output 0 for the whole batch (limit {th.dead:.0%})"
    return f"{value:.0%} of outputs exactly 0 (limit {th.zero_share:.0%})"
