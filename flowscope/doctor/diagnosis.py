"""The doctor's result (:class:`Diagnosis`) and :func:`diagnose`, which builds it.

``diagnose`` reads the stats frame (one recording, or a study's many configurations) and
checks, per group of rows (``by``, default ``["run"]``) at its latest step:

- **scale** of activations and of dL/dh (kind ``gradient``, not weight gradients: those can
  stay flat across layers while dL/dh vanishes, because dL/dW_l = δ_l a_{l-1}ᵀ multiplies a
  shrinking δ by a growing a, as in the lecture's tanh σ = 0.01 net). Layers are compared
  like with like: the *pre-activation* layers (module types containing ``Linear`` or
  ``Conv``, e.g. HF ``Conv1D``; all layers with activations when there are none) are grouped
  into *roles* by module type and name with digits replaced (``layers.#.linear``,
  ``transformer.h.#.attn.c_attn``), and each layer is compared with its role's first layer
  (activations, forward) or last layer (gradients, nearest the loss);
- **saturated**: the share of outputs beyond the activation's saturation interval
  (``frac_saturated``: tanh ±0.99, sigmoid 0.01/0.99, hardtanh/ReLU6 at their clamps);
- **dead**: units of a ReLU-like layer that are zero for the whole batch (measured per unit
  with :class:`DeadUnits` where the model is at hand, or recorded by ``fs.watch`` as the
  ``dead_units`` kind), else the share of exact zeros (``frac_zero``), an upper bound on the
  dead share;
- **non-finite**: any NaN or Inf in activations, gradients, weights or weight gradients;
- **no data**: a layer whose activations and dL/dh hold no value (an empty batch); a run is
  ``no data`` when no layer holds one, or when every value is exactly 0 (nothing else
  found), so an empty batch or an all-zero net is never called healthy.

Example:
    >>> import torch, flowscope as fs
    >>> from flowscope.models.nets import build_net
    >>> from flowscope.models.inits import apply_init
    >>> net = build_net("mlp", activation="tanh", width=64, in_dim=64, depth=8)
    >>> _ = apply_init(net, "small", generator=torch.Generator().manual_seed(0))
    >>> with fs.watch(net) as rec:
    ...     (net(torch.randn(128, 64)) ** 2).mean().backward()
    >>> d = diagnose(rec)
    >>> d.runs.verdict.tolist(), d.ok()
    (['vanishing'], False)

Thresholds live in :class:`Thresholds`; docs/DOCTOR.md gives their derivations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from flowscope.core.errors import FlowscopeError
from flowscope.doctor.prescribe import prescribe
from flowscope.doctor.render import format_diagnosis
from flowscope.doctor.rules import check_layers, explain, worst_layer
from flowscope.doctor.table import dead_counts, layer_table, main_role
from flowscope.doctor.theory_table import phase_notes, theory_table
from flowscope.doctor.thresholds import LAYER_COLUMNS, NO_DATA, RUN_COLUMNS, VERDICTS, Thresholds
from flowscope.record.frames import KEYS, expected_passes
from flowscope.record.loading import records_of
from flowscope.record.recorder import Recorder

__all__ = ["Diagnosis", "compare", "diagnose"]


@dataclass
class Diagnosis:
    """Verdicts per layer (``layers``) and per run (``runs``); ``str()`` is the report.

    Example:
        >>> d = Diagnosis(pd.DataFrame(columns=["run", *LAYER_COLUMNS, "reason"]),
        ...               pd.DataFrame({"run": ["a"], "verdict": ["healthy"]}))
        >>> d.ok()
        True

    Attributes:
        layers: one row per (group, layer, check): ``[*by, layer_idx, layer, module_type,
            check, verdict, value, threshold, reason]``. Checks: ``act_scale`` (value: rms
            over the role's first layer's), ``grad_scale`` (dL/dh rms over the role's last
            layer's), ``saturated``, ``dead_units`` (measured share), ``zero_share`` (bound),
            ``non-finite`` (count), ``values`` (0: a layer without any value, ``no data``).
        runs: one row per group: ``[*by, verdict, act_gain, grad_gain, grad_ratio,
            worst_layer, saturated, dead, nonfinite, reason, fix, thresholds]``.
        by: the grouping columns.
        theory: for models with Linear → [norm] → activation chains (``model=`` given),
            mean-field predictions beside the measurement: ``[*by, layer_idx, layer,
            pred_rms, rms, pred_act_gain, act_gain, pred_grad_gain, grad_gain]``; else None.
        notes: what the diagnosis left out: of several passes per step it reads the last
            weight gradient and the first-order dL/dh (``frames.expected_passes``).
    """

    layers: pd.DataFrame
    runs: pd.DataFrame
    by: list[str] = field(default_factory=lambda: ["run"])
    theory: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        """True when every run is healthy."""
        return bool((self.runs["verdict"] == "healthy").all())

    def __str__(self) -> str:
        return format_diagnosis(self)


# -- reading the source -----------------------------------------------------------------------


def _stats_of(source: object) -> tuple[pd.DataFrame, nn.Module | None]:
    """The stats frame of any accepted source, and the model when the source has one."""
    if isinstance(source, pd.DataFrame):
        return source, None
    if isinstance(source, Recorder):
        return source.stats, source.model
    return records_of(source, "diagnose() takes", "a stats DataFrame, ").stats, None


def _check_frame(stats: pd.DataFrame, by: list[str]) -> None:
    """Raise naming the missing columns."""
    need = [*by, "step", "layer_idx", "layer", "module_type", "kind", "count", "nan", "inf"]
    need += ["rms", "std", "frac_zero", "frac_saturated"]
    missing = [c for c in dict.fromkeys(need) if c not in stats.columns]
    if missing:
        raise FlowscopeError(
            f"the stats frame lacks columns {missing}; diagnose needs flowscope's stats frame "
            f"(keys {', '.join(KEYS)}) with the grouping columns by={by}"
        )


def _check_by(by: object) -> list[str]:
    """The grouping columns as a list of strings."""
    if by is None:
        return ["run"]
    cols = [by] if isinstance(by, str) else list(by)  # type: ignore[call-overload]
    if not cols or not all(isinstance(c, str) for c in cols):
        raise FlowscopeError(f"by must be a column name or a non-empty list of them, got {by!r}")
    return cols


def diagnose(
    source: Any,
    *,
    by: str | Sequence[str] | None = None,
    thresholds: Thresholds | None = None,
    model: nn.Module | None = None,
    dead: pd.DataFrame | None = None,
    step: int | None = None,
) -> Diagnosis:
    """Verdicts per layer and per run, with the numbers, thresholds, reasons and fixes.

    Example:
        >>> import torch, flowscope as fs
        >>> net = torch.nn.Sequential(*[m for _ in range(6)
        ...                             for m in (torch.nn.Linear(64, 64), torch.nn.ReLU())])
        >>> from flowscope.doctor.fixes import reinit
        >>> _ = reinit(net, "he", generator=torch.Generator().manual_seed(0))
        >>> with fs.watch(net) as rec:
        ...     (net(torch.randn(256, 64)) ** 2).mean().backward()
        >>> print(diagnose(rec).runs.loc[0, "verdict"])
        healthy

    Args:
        source: a stats DataFrame, a ``Records``, a ``Recorder`` or a run folder path.
        by: grouping columns, one diagnosis per group (default ``["run"]``; a study passes
            its config columns).
        thresholds: a :class:`Thresholds`; default ``Thresholds()``.
        model: the model the records came from (taken from a ``Recorder`` source when not
            given). Adds mean-field predictions for its Linear → [norm] → activation chains
            (``Diagnosis.theory``) and exact fan-ins to the prescriptions.
        dead: per-unit dead counts from :class:`DeadUnits` (``DeadUnits.frame()``); rows may
            carry the ``by`` columns, else they apply to every group. Default: the records'
            own ``dead_units`` rows (``fs.watch(kinds=[..., "dead_units"])``), if any.
        step: the step to judge; default the latest step of each group.

    Returns:
        A :class:`Diagnosis`.

    Raises:
        FlowscopeError: an unsupported source, missing columns, bad ``by``/``thresholds``/
            ``dead``/``step``, an empty frame, or one without activation or gradient rows.
    """
    stats, rec_model = _stats_of(source)
    if "kind" in stats.columns:  # several passes per step: judge the one a reader expects
        stats, passes = expected_passes(stats)
    else:
        passes = ""
    by_cols = _check_by(by)
    if thresholds is None:
        thresholds = Thresholds()
    if not isinstance(thresholds, Thresholds):
        raise FlowscopeError(f"thresholds must be a Thresholds, got {type(thresholds).__name__}")
    if model is None:
        model = rec_model
    if model is not None and not isinstance(model, nn.Module):
        raise FlowscopeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise FlowscopeError(f"step must be an integer or None, got {step!r}")
    _check_frame(stats, by_cols)
    dead = _check_dead(dead, by_cols)
    if stats.empty:
        raise FlowscopeError("the stats frame is empty: nothing was recorded")
    if not stats["kind"].isin(["activation", "gradient"]).any():
        raise FlowscopeError(
            "nothing to judge: the stats frame has no 'activation' or 'gradient' rows "
            f"(kinds recorded: {sorted(set(stats['kind']))}); record them with fs.watch"
        )
    layer_frames, run_rows, theory_frames = [], [], []
    for key, group in stats.groupby(by_cols, sort=True, dropna=False):
        keys = dict(zip(by_cols, key if isinstance(key, tuple) else (key,), strict=True))
        group = _at_step(group, step, keys)
        counts = dead_counts(group) if dead is None else _dead_for(dead, keys, by_cols)
        table = layer_table(group, counts)
        rows = check_layers(table, thresholds)
        theory = theory_table(model, table) if model is not None else None
        run = _verdict(table, rows, thresholds, model, theory)
        layer_frames.append(_with_keys(rows, keys))
        run_rows.append({**keys, **run})
        if theory is not None:
            theory_frames.append(_with_keys(theory, keys))
    layers = pd.concat(layer_frames, ignore_index=True)
    layers = layers[[*by_cols, *LAYER_COLUMNS, "reason"]]
    runs = pd.DataFrame(run_rows, columns=[*by_cols, *RUN_COLUMNS])
    theory_frame = pd.concat(theory_frames, ignore_index=True) if theory_frames else None
    notes = [f"several passes per step: {passes}"] if passes else []
    notes += phase_notes(model) if model is not None else []
    return Diagnosis(layers=layers, runs=runs, by=by_cols, theory=theory_frame, notes=notes)


def _with_keys(frame: pd.DataFrame, keys: Mapping[str, Any]) -> pd.DataFrame:
    """``frame`` with the group's key columns in front."""
    out = frame.copy()
    for i, (col, value) in enumerate(keys.items()):
        out.insert(i, col, [value] * len(out))
    return out


def _at_step(group: pd.DataFrame, step: int | None, keys: Mapping[str, Any]) -> pd.DataFrame:
    """The group's rows at ``step`` (default: its latest)."""
    steps = group["step"]
    chosen = int(steps.max()) if step is None else step
    rows = group[steps == chosen]
    if rows.empty:
        raise FlowscopeError(
            f"step {step} is not recorded for {dict(keys)}; recorded: {sorted(set(steps))[:20]}"
        )
    return rows


def _check_dead(dead: object, by: list[str]) -> pd.DataFrame | None:
    """The dead-unit frame, checked."""
    if dead is None:
        return None
    if not isinstance(dead, pd.DataFrame):
        raise FlowscopeError(f"dead must be a DataFrame from DeadUnits.frame(), got {dead!r}")
    missing = [c for c in ("layer", "units", "dead", "samples") if c not in dead.columns]
    if missing:
        raise FlowscopeError(f"dead lacks columns {missing}; build it with DeadUnits.frame()")
    return dead


def _dead_for(dead: pd.DataFrame | None, keys: Mapping[str, Any], by: list[str]) -> pd.DataFrame:
    """Dead-unit rows of one group, one per layer."""
    if dead is None:
        return pd.DataFrame(columns=["layer", "units", "dead", "samples"])
    rows = dead
    for col in by:
        if col in rows.columns:
            rows = rows[rows[col] == keys[col]]
    return rows.groupby("layer", as_index=False)[["units", "dead", "samples"]].sum()


# -- the run verdict ----------------------------------------------------------------------------


def _verdict(
    table: pd.DataFrame,
    rows: pd.DataFrame,
    th: Thresholds,
    model: nn.Module | None,
    theory: pd.DataFrame | None,
) -> dict[str, Any]:
    """One ``runs`` row (without the group keys)."""
    flagged = rows[rows["verdict"] != "healthy"]
    found = set(flagged["verdict"])
    if table["values"].sum() > 0:  # some layers have values: judged on those
        found.discard(NO_DATA)
    parts = [v for v in VERDICTS if v in found]
    gains = main_role(table)
    reason = explain(parts, flagged, gains, th)
    scales = table[["act_rms", "grad_rms"]].to_numpy(float)
    if not parts and not (np.isfinite(scales) & (scales > 0)).any():
        parts = [NO_DATA]  # values, but every one exactly 0: no scale to judge
        reason = (
            "every activation and dL/dh value is exactly 0 (constant zero tensors: zero "
            "weights or a zero input?): there is no scale to judge"
        )
    measured = rows[rows["check"] == "dead_units"]
    sat_rows = rows[rows["check"] == "saturated"]
    return {
        "verdict": "+".join(parts) or "healthy",
        "act_gain": gains["act_gain"],
        "grad_gain": gains["grad_gain"],
        "grad_ratio": gains["grad_ratio"],
        "worst_layer": worst_layer(table, rows),
        "saturated": float(sat_rows["value"].max()) if len(sat_rows) else 0.0,
        "dead": float(measured["value"].max()) if len(measured) else math.nan,
        "nonfinite": int(table["nonfinite"].sum()),
        "reason": reason,
        "fix": prescribe(parts, table, flagged, gains, model, theory),
        "thresholds": th.describe(),
    }


# -- before and after a fix --------------------------------------------------------------------


def compare(before: Diagnosis, after: Diagnosis) -> pd.DataFrame:
    """Before/after a fix, run by run: the verdict and the numbers behind it.

    Example:
        >>> a = Diagnosis(pd.DataFrame(), pd.DataFrame({"run": ["x"], "verdict": ["vanishing"],
        ...                                             "act_gain": [0.22]}))
        >>> b = Diagnosis(pd.DataFrame(), pd.DataFrame({"run": ["x"], "verdict": ["healthy"],
        ...                                             "act_gain": [0.98]}))
        >>> compare(a, b)[["measure", "before", "after"]].values.tolist()
        [['verdict', 'vanishing', 'healthy'], ['act_gain', 0.22, 0.98]]

    Returns:
        One row per (group, measure): ``[*by, measure, before, after]``; measures are the
        ``runs`` columns both sides have (verdict, gains, ratio, saturated, dead, NaN/Inf,
        worst layer).

    Raises:
        FlowscopeError: when the two were grouped by different columns.
    """
    if not isinstance(before, Diagnosis) or not isinstance(after, Diagnosis):
        raise FlowscopeError("compare() takes two Diagnosis objects (from diagnose())")
    if before.by != after.by:
        raise FlowscopeError(f"cannot compare diagnoses grouped by {before.by} and {after.by}")
    by = before.by
    measures = [c for c in RUN_COLUMNS[:8] if c in before.runs and c in after.runs]
    merged = before.runs.merge(after.runs, on=by, suffixes=("_before", "_after"))
    rows = [
        {**{c: run[c] for c in by}, "measure": m, "before": run[f"{m}_before"],
         "after": run[f"{m}_after"]}
        for _, run in merged.iterrows()
        for m in measures
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=[*by, "measure", "before", "after"])
