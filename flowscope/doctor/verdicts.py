"""The doctor: verdicts, the numbers behind them, thresholds, and what to change.

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
  with :class:`DeadUnits` where the model is at hand), else the share of exact zeros
  (``frac_zero``), an upper bound on the dead share;
- **non-finite**: any NaN or Inf in activations, gradients, weights or weight gradients.

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
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from flowscope.core.activations import activation_type, alive_units
from flowscope.core.errors import FlowscopeError
from flowscope.models.inits import INIT_TARGETS
from flowscope.record.frames import KEYS, records_of
from flowscope.record.hooks import forward_hooks
from flowscope.record.recorder import KINDS, ROOT, Recorder, watch

__all__ = [
    "VERDICTS",
    "DeadUnits",
    "Diagnosis",
    "Thresholds",
    "compare",
    "default_loss",
    "diagnose",
    "examine",
]

VERDICTS = ("non-finite", "exploding", "vanishing", "saturated", "dead", "healthy")
PRE_ACTIVATION = re.compile(r"Linear|Conv")
# activation families an init prescription is written for (the catalogue's)
PRESCRIBED = ("tanh", "sigmoid", "relu")
REINIT_TYPES = frozenset(t.__name__ for t in INIT_TARGETS)  # what fs.reinit touches
LAYER_COLUMNS = ["layer_idx", "layer", "module_type", "check", "verdict", "value", "threshold"]
RUN_COLUMNS = [
    "verdict",
    "act_gain",
    "grad_gain",
    "grad_ratio",
    "worst_layer",
    "saturated",
    "dead",
    "nonfinite",
    "reason",
    "fix",
    "thresholds",
]


@dataclass(frozen=True)
class Thresholds:
    """Every number the verdicts use. Change any: ``Thresholds(act_ratio=100)``.

    Example:
        >>> Thresholds().act_ratio, Thresholds(saturated=0.3).saturated
        (10.0, 0.3)

    Attributes:
        act_ratio: a layer's activation rms more than this many times above (exploding) or
            below (vanishing) the first layer of its role. One decade: the layers after it
            see inputs 10× off the scale their init assumed, and the drift compounds with
            depth (per-layer gain g gives g^(L-1)); the lecture's broken inits are 10^4–10^12
            off after ten layers, the healthy ones (Xavier/He) within 4×.
        grad_ratio: the same for the rms of dL/dh, relative to the last layer of its role
            (nearest the loss), growing toward the input = exploding. With one learning rate
            for all layers, a decade between first and last layer means some layers take
            updates 10× too large or too small relative to their weights.
        saturated: share of a layer's outputs beyond the activation's saturation interval.
            A tanh unit at |h| ≥ 0.99 passes at most 1 − 0.99² ≈ 2 % of its gradient, so a
            share p bounds E[φ'²] ≤ 1 − 0.98 p; at p = 0.5 the layer at least halves the
            gradient's mean square, the loss Xavier-on-ReLU shows (which is already enough
            to lose a decade in 7 layers). The lecture's tanh σ = 1 net has p ≈ 0.9.
        dead: share of a ReLU-like layer's units that output 0 for every sample of the
            batch. Deep plain ReLU nets at He init already show 8 % (batch 1000) to 18 %
            (batch 64) such units at depth 10 because inputs become correlated with depth
            (measured, docs/DOCTOR.md); a quarter is above that.
        dead_min_samples: samples per unit (batch × positions) needed to count dead units;
            with fewer, a unit that fires on half the inputs is silent on all of them by
            chance too often (2^-n), and the zero-share bound is used instead.
        zero_share: without per-unit counts, a ReLU-like layer whose outputs are at least
            this share exact zeros is reported dead: at most 1 − zero_share of its
            (sample, unit) pairs pass any gradient (a healthy ReLU layer: ≈ 0.5).
        nonfinite: NaN + Inf count tolerated (0: any NaN or Inf is a verdict).
    """

    act_ratio: float = 10.0
    grad_ratio: float = 10.0
    saturated: float = 0.5
    dead: float = 0.25
    dead_min_samples: int = 64
    zero_share: float = 0.9
    nonfinite: int = 0

    def __post_init__(self) -> None:
        for name in ("act_ratio", "grad_ratio"):
            value = getattr(self, name)
            if not _number(value) or not value > 1:
                raise FlowscopeError(f"Thresholds.{name} must be a number > 1, got {value!r}")
        for name in ("saturated", "dead", "zero_share"):
            value = getattr(self, name)
            if not _number(value) or not 0 < value <= 1:
                raise FlowscopeError(f"Thresholds.{name} must be in (0, 1], got {value!r}")
        for name in ("dead_min_samples", "nonfinite"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise FlowscopeError(f"Thresholds.{name} must be an integer >= 0, got {value!r}")

    def describe(self) -> str:
        """One line with every threshold (the ``thresholds`` column of ``runs``)."""
        return (
            f"act_ratio={self.act_ratio:g}, grad_ratio={self.grad_ratio:g}, "
            f"saturated={self.saturated:g}, dead={self.dead:g} "
            f"(>= {self.dead_min_samples} samples/unit), zero_share={self.zero_share:g}, "
            f"nonfinite={self.nonfinite}"
        )


def _number(value: object) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(float(value))
    )


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
            ``non-finite`` (count).
        runs: one row per group: ``[*by, verdict, act_gain, grad_gain, grad_ratio,
            worst_layer, saturated, dead, nonfinite, reason, fix, thresholds]``.
        by: the grouping columns.
        theory: for models with Linear → [norm] → activation chains (``model=`` given),
            mean-field predictions beside the measurement: ``[*by, layer_idx, layer,
            pred_rms, rms, pred_act_gain, act_gain, pred_grad_gain, grad_gain]``; else None.
    """

    layers: pd.DataFrame
    runs: pd.DataFrame
    by: list[str] = field(default_factory=lambda: ["run"])
    theory: pd.DataFrame | None = None

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
            carry the ``by`` columns, else they apply to every group.
        step: the step to judge; default the latest step of each group.

    Returns:
        A :class:`Diagnosis`.

    Raises:
        FlowscopeError: an unsupported source, missing columns, bad ``by``/``thresholds``/
            ``dead``/``step``, an empty frame, or one without activation or gradient rows.
    """
    stats, rec_model = _stats_of(source)
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
        table = _layer_table(group, _dead_for(dead, keys, by_cols))
        rows = _checks(table, thresholds)
        theory = _theory(model, table) if model is not None else None
        run = _verdict(table, rows, thresholds, model, theory)
        layer_frames.append(_with_keys(rows, keys))
        run_rows.append({**keys, **run})
        if theory is not None:
            theory_frames.append(_with_keys(theory, keys))
    layers = pd.concat(layer_frames, ignore_index=True)
    layers = layers[[*by_cols, *LAYER_COLUMNS, "reason"]]
    runs = pd.DataFrame(run_rows, columns=[*by_cols, *RUN_COLUMNS])
    theory_frame = pd.concat(theory_frames, ignore_index=True) if theory_frames else None
    return Diagnosis(layers=layers, runs=runs, by=by_cols, theory=theory_frame)


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


# -- one row per layer --------------------------------------------------------------------------


def _layer_table(group: pd.DataFrame, dead: pd.DataFrame) -> pd.DataFrame:
    """One row per layer: rms of activation and dL/dh, shares, non-finite count, weight std."""
    g = group.copy()
    g["finite"] = (g["count"] - g["nan"] - g["inf"]).clip(lower=0)
    g["sq"] = g["finite"] * g["rms"].astype(float) ** 2
    g["nonfinite"] = g["nan"] + g["inf"]
    base = g.groupby("layer", sort=False).agg(
        layer_idx=("layer_idx", "min"),
        module_type=("module_type", "first"),
        nonfinite=("nonfinite", "sum"),
    )
    acts = g[g["kind"] == "activation"]
    base["act_nonfinite"] = acts.groupby("layer", sort=False)["nonfinite"].sum()
    base["act_nonfinite"] = base["act_nonfinite"].fillna(0)
    for kind, prefix in (("activation", "act"), ("gradient", "grad")):
        rows = g[g["kind"] == kind]
        weighted = rows.assign(
            zw=rows["frac_zero"] * rows["finite"], sw=rows["frac_saturated"] * rows["finite"]
        )
        agg = weighted.groupby("layer", sort=False)[["finite", "sq", "zw", "sw"]].sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            base[f"{prefix}_rms"] = np.sqrt(agg["sq"] / agg["finite"])
            if kind == "activation":
                base["zero"] = agg["zw"] / agg["finite"]
                base["sat"] = agg["sw"] / agg["finite"]
    weights = g[(g["kind"] == "weight") & (g.get("tensor", "weight") == "weight")]
    base["weight_std"] = weights.groupby("layer", sort=False)["std"].first()
    base["weight_count"] = weights.groupby("layer", sort=False)["count"].first()
    table = base.reset_index().sort_values("layer_idx", kind="stable").reset_index(drop=True)
    if not dead.empty:
        table = table.merge(dead, on="layer", how="left")
    else:
        table["units"] = np.nan
        table["dead"] = np.nan
        table["samples"] = np.nan
    table["pre"] = table["module_type"].astype(str).str.contains(PRE_ACTIVATION)
    table["role"] = table["module_type"].astype(str) + ":" + _roles(table["layer"])
    return table


def _roles(layers: pd.Series) -> pd.Series:
    """The layer name with every number replaced by '#': layers of the same kind share it."""
    return layers.astype(str).str.replace(r"\d+", "#", regex=True)


# -- checks ---------------------------------------------------------------------------------


def _row(
    layer: pd.Series, check: str, verdict: str, value: float, limit: float, reason: str
) -> dict[str, Any]:
    """One row of the ``layers`` frame."""
    return {
        "layer_idx": int(layer["layer_idx"]),
        "layer": layer["layer"],
        "module_type": layer["module_type"],
        "check": check,
        "verdict": verdict,
        "value": float(value),
        "threshold": float(limit),
        "reason": reason,
    }


def _scale_pool(table: pd.DataFrame) -> pd.DataFrame:
    """The layers whose scales are compared: pre-activation layers, else all recorded ones.

    When no two of them share a role, they form one role (one stack, execution order).
    """
    recorded = table["act_rms"].notna() | table["grad_rms"].notna()
    pre = table[table["pre"] & recorded]
    pool = pre if len(pre) else table[recorded]
    if len(pool) >= 2 and pool["role"].value_counts().max() < 2:
        pool = pool.assign(role="*")
    return pool


def _checks(table: pd.DataFrame, th: Thresholds) -> pd.DataFrame:
    """Every per-layer check as rows of the ``layers`` frame."""
    rows: list[dict[str, Any]] = []
    pool = _scale_pool(table)
    for _, members in pool.groupby("role", sort=False):
        if len(members) >= 2:
            rows += _scale_rows(members, th)
    for _, layer in table.iterrows():
        rows += _share_rows(layer, th)
        count = int(layer["nonfinite"])
        bad = count > th.nonfinite
        reason = f"{count} NaN/Inf values" + (f" (> {th.nonfinite})" if bad else "")
        rows.append(
            _row(layer, "non-finite", "non-finite" if bad else "healthy", count, th.nonfinite,
                 reason)
        )  # fmt: skip
    frame = pd.DataFrame(rows, columns=[*LAYER_COLUMNS, "reason"])
    return frame.sort_values(["layer_idx", "check"], kind="stable").reset_index(drop=True)


def _scale_rows(members: pd.DataFrame, th: Thresholds) -> list[dict[str, Any]]:
    """act_scale and grad_scale rows of one role (layers of one kind, in order)."""
    rows = []
    act = members["act_rms"].to_numpy(float)
    grad = (
        members["grad_rms"].to_numpy(float) if "grad_rms" in members else np.full(len(act), np.nan)
    )
    ref_a = _first_positive(act)
    ref_g = _first_positive(grad[::-1])
    for i, (_, layer) in enumerate(members.iterrows()):
        with np.errstate(invalid="ignore", divide="ignore"):
            a, g = act[i] / ref_a, grad[i] / ref_g
            step_a = act[i] / act[i - 1] if i else np.nan
            step_g = grad[i] / grad[i + 1] if i + 1 < len(grad) else np.nan
        first, last = members["layer"].iloc[0], members["layer"].iloc[-1]
        if np.isfinite(act[i]) or act[i] == math.inf:
            verdict = _direction(a, th.act_ratio, up="exploding")
            rows.append(
                _row(layer, "act_scale", verdict, a, th.act_ratio,
                     f"activation rms {act[i]:.3g} = {a:.3g}× that of {first} (limit "
                     f"{th.act_ratio:g}× either way); ×{step_a:.3g} over the previous layer of "
                     "its kind")
            )  # fmt: skip
        if np.isfinite(grad[i]) or grad[i] == math.inf:
            verdict = _direction(g, th.grad_ratio, up="exploding")
            rows.append(
                _row(layer, "grad_scale", verdict, g, th.grad_ratio,
                     f"dL/dh rms {grad[i]:.3g} = {g:.3g}× that of {last} (limit {th.grad_ratio:g}×"
                     f" either way); ×{step_g:.3g} over the next layer of its kind")
            )  # fmt: skip
    return rows


def _first_positive(values: np.ndarray) -> float:
    """The first finite value > 0 (NaN if none)."""
    for v in values:
        if np.isfinite(v) and v > 0:
            return float(v)
    return math.nan


def _direction(ratio: float, limit: float, up: str) -> str:
    """exploding / vanishing / healthy for a ratio against a symmetric limit."""
    if np.isnan(ratio):
        return "healthy"
    if ratio > limit:
        return up
    if ratio < 1 / limit:
        return "vanishing"
    return "healthy"


def _share_rows(layer: pd.Series, th: Thresholds) -> list[dict[str, Any]]:
    """saturated / dead_units / zero_share rows of one layer (where they apply)."""
    rows = []
    mtype = str(layer["module_type"])
    sat = float(layer.get("sat", np.nan))
    if mtype == "ReLU6":  # its lower clamp is ReLU's zero floor: zeros are not saturation
        sat = max(sat - float(layer.get("zero", 0.0)), 0.0)
    kind = activation_type(mtype)
    if np.isfinite(sat) and (sat > 0 or (kind is not None and kind.xavier_like)):
        bad = sat > th.saturated
        rows.append(
            _row(layer, "saturated", "saturated" if bad else "healthy", sat, th.saturated,
                 f"{sat:.1%} of outputs beyond the saturation interval (limit {th.saturated:.0%})")
        )  # fmt: skip
    if kind is None or not kind.zero_output:
        return rows
    units = float(layer.get("units", np.nan))
    dead = float(layer.get("dead", np.nan))
    samples = float(layer.get("samples", np.nan))  # per unit: batch × positions
    if units > 0 and samples >= th.dead_min_samples:  # False for NaN: not counted
        share = dead / units
        bad = share > th.dead
        rows.append(
            _row(layer, "dead_units", "dead" if bad else "healthy", share, th.dead,
                 f"{int(dead)} of {int(units)} units output 0 for the whole batch ({share:.1%}; "
                 f"limit {th.dead:.0%})")
        )  # fmt: skip
        return rows
    zero = float(layer.get("zero", np.nan))
    if np.isfinite(zero):
        bad = zero >= th.zero_share
        why = (
            "units not counted"
            if pd.isna(units)
            else (f"{samples:.0f} samples/unit < {th.dead_min_samples}, units not counted")
        )
        rows.append(
            _row(layer, "zero_share", "dead" if bad else "healthy", zero, th.zero_share,
                 f"{zero:.1%} of outputs exactly 0 (limit {th.zero_share:.0%}; an upper bound on "
                 f"the dead-unit share, {why})")
        )  # fmt: skip
    return rows


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
    parts = [v for v in VERDICTS if v in found]
    gains = _main_role(table)
    measured = rows[rows["check"] == "dead_units"]
    sat_rows = rows[rows["check"] == "saturated"]
    return {
        "verdict": "+".join(parts) or "healthy",
        "act_gain": gains["act_gain"],
        "grad_gain": gains["grad_gain"],
        "grad_ratio": gains["grad_ratio"],
        "worst_layer": _worst_layer(table, rows),
        "saturated": float(sat_rows["value"].max()) if len(sat_rows) else 0.0,
        "dead": float(measured["value"].max()) if len(measured) else math.nan,
        "nonfinite": int(table["nonfinite"].sum()),
        "reason": _reason(parts, flagged, gains, th),
        "fix": _prescribe(parts, table, flagged, gains, model, theory),
        "thresholds": th.describe(),
    }


def _main_role(table: pd.DataFrame) -> dict[str, Any]:
    """Gains of the role (layers of one kind, >= 2) whose first/last scales differ most."""
    best: dict[str, Any] = {
        "act_gain": math.nan,
        "grad_gain": math.nan,
        "grad_ratio": math.nan,
        "act_ratio": math.nan,
        "layers": [],
        "score": -1.0,
    }
    pool = _scale_pool(table)
    for _, members in pool.groupby("role", sort=False):
        k = len(members)
        if k < 2:
            continue
        act = members["act_rms"].to_numpy(float)
        grad = members["grad_rms"].to_numpy(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            act_ratio = act[-1] / act[0]
            grad_ratio = grad[0] / grad[-1]
        # how far from 1 (|ln ratio|); 0 or inf (overflow) count as infinitely far
        ratios = [r for r in (act_ratio, grad_ratio) if not np.isnan(r)]
        far = [abs(math.log(r)) if 0 < r < math.inf else math.inf for r in ratios]
        score = max(far, default=0.0) + 1e-9 * k  # ties: the role with more layers
        if score > best["score"]:
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                best = {
                    "act_gain": float(np.power(act_ratio, 1 / (k - 1))),
                    "grad_gain": float(np.power(grad_ratio, 1 / (k - 1))),
                    "grad_ratio": float(grad_ratio),
                    "act_ratio": float(act_ratio),
                    "layers": members["layer"].tolist(),
                    "score": score,
                }
    return best


def _severity(row: pd.Series) -> float:
    """How far a check's value is from healthy, in units of its threshold."""
    value, limit = float(row["value"]), float(row["threshold"])
    if row["check"] == "non-finite":
        return math.inf if value > limit else 0.0
    if row["check"] in ("act_scale", "grad_scale"):
        if not np.isfinite(value) or value <= 0:
            return math.inf
        return abs(math.log(value)) / math.log(limit)
    return value / limit if limit > 0 else math.inf


def _worst_layer(table: pd.DataFrame, rows: pd.DataFrame) -> str:
    """Where NaN/Inf first appear in the forward pass, else the most extreme checked layer."""
    if table["nonfinite"].sum() > 0:
        first = table[table["act_nonfinite"] > 0] if "act_nonfinite" in table else table[:0]
        if first.empty:
            first = table[table["nonfinite"] > 0].iloc[::-1]
        return str(first["layer"].iloc[0])
    checked = rows[rows["check"] != "non-finite"]
    if checked.empty:
        return ""
    severity = checked.apply(_severity, axis=1)
    return str(checked["layer"].to_numpy()[int(np.argmax(severity.to_numpy(float)))])


def _reason(
    parts: list[str], flagged: pd.DataFrame, gains: Mapping[str, Any], th: Thresholds
) -> str:
    """The numbers behind the verdict, in words."""
    bits = []
    act_g, grad_g = gains["act_gain"], gains["grad_gain"]
    if np.isfinite(act_g):
        bits.append(
            f"activation rms ×{act_g:.3g} per layer (last/first {gains['act_ratio']:.3g}, "
            f"limit {th.act_ratio:g}× either way)"
        )
    if np.isfinite(grad_g):
        bits.append(
            f"dL/dh rms ×{grad_g:.3g} per layer toward the input (first/last "
            f"{gains['grad_ratio']:.3g}, limit {th.grad_ratio:g}× either way)"
        )
    for what, value in (("activation", act_g), ("dL/dh", grad_g)):
        if value == math.inf:
            bits.append(
                f"{what} rms overflowed to inf in some layers while their values are finite "
                "(the float32 sum of squares passed 3.4e38): exploding"
            )
    for check, label in (
        ("saturated", "saturated"),
        ("dead_units", "dead units"),
        ("zero_share", "zero outputs"),
    ):
        hits = flagged[flagged["check"] == check]
        if len(hits):
            top = _top(hits)
            bits.append(
                f"{len(hits)} layer(s) with {label} above {top['threshold']:.0%}, most in "
                f"{top['layer']!r} ({top['value']:.1%})"
            )
    bad = flagged[flagged["check"] == "non-finite"]
    if len(bad):
        bits.insert(0, f"{int(bad['value'].sum())} NaN/Inf values in {len(bad)} layer(s)")
    return "; ".join(bits)


def _top(rows: pd.DataFrame) -> pd.Series:
    """The row with the largest value."""
    return rows.iloc[int(np.argmax(rows["value"].to_numpy(float)))]


def _family(table: pd.DataFrame) -> tuple[str, str]:
    """The net's activation family ('tanh', 'sigmoid', 'relu', 'linear') and display label.

    The label is the most common activation module type: 'tanh', 'relu', 'NewGELUActivation'.
    """
    types = table["module_type"].astype(str)
    families = {t: _family_of(t) for t in types.unique()}
    found = types[types.map(families).isin(PRESCRIBED)]
    if found.empty:
        return "linear", "linear layers"
    top = str(found.value_counts().index[0])
    family = str(families[top])  # one of PRESCRIBED
    return family, top.lower() if top in ("Tanh", "ReLU", "Sigmoid") else top


def _fan_in(table: pd.DataFrame, layers: list[str], model: nn.Module | None) -> tuple[float, bool]:
    """(fan-in of the role's layers, exact?): from the model, else estimated from the frame."""
    if model is not None:
        from flowscope.models.inits import fans

        named = dict(model.named_modules())
        found = [
            fans(named[n].weight)[0]
            for n in layers
            if n in named and isinstance(getattr(named[n], "weight", None), Tensor)
        ]
        if found:
            return float(np.median(found)), True
    # rms(W x) ≈ std(W) √fan_in rms(x): fan_in ≈ (rms_out / (rms_in std(W)))², where the
    # input is the output of the module recorded just before (a chain's activation).
    est = []
    order = table.reset_index(drop=True)
    for i in order.index[1:]:
        row, prev = order.loc[i], order.loc[i - 1]
        if row["layer"] not in layers or _family_of(str(prev["module_type"])) not in PRESCRIBED:
            continue
        if pd.notna(row.get("weight_std")) and row["weight_std"] > 0 and prev["act_rms"] > 0:
            est.append((row["act_rms"] / (prev["act_rms"] * row["weight_std"])) ** 2)
    return (float(np.median(est)), False) if est else (math.nan, False)


def _prescribe(
    parts: list[str],
    table: pd.DataFrame,
    flagged: pd.DataFrame,
    gains: Mapping[str, Any],
    model: nn.Module | None,
    theory: pd.DataFrame | None,
) -> str:
    """What to change, in words and numbers (empty when healthy)."""
    fixes = []
    if "non-finite" in parts:
        where = _worst_layer(table, flagged)
        fixes.append(
            f"NaN/Inf first appear at {where}: check the input and that layer's weights for "
            "NaN/Inf; at init they follow exploding scales (see the next fix); in training, "
            "lower the learning rate or clip gradients (torch.nn.utils.clip_grad_norm_)."
        )
    if {"vanishing", "exploding", "saturated"} & set(parts):
        fixes.append(_init_fix(table, gains, model, theory))
    if "dead" in parts:
        hits = flagged[flagged["verdict"] == "dead"]
        top = _top(hits)
        what = "of its units never fire" if top["check"] == "dead_units" else "of its outputs are 0"
        fixes.append(
            f"Layer {top['layer']!r}: {top['value']:.0%} {what} on this batch: use He init "
            "with zero biases, LeakyReLU or ELU, or batchnorm before the activation; look for "
            "large negative biases or a learning rate that was too high."
        )
    return " ".join(fixes)


def _init_fix(
    table: pd.DataFrame,
    gains: Mapping[str, Any],
    model: nn.Module | None,
    theory: pd.DataFrame | None,
) -> str:
    """The init prescription: scheme, target std, and the numbers that call for it."""
    family, act_label = _family(table)
    scheme, label, factor = ("he", "He", 2.0) if family == "relu" else ("xavier", "Xavier", 1.0)
    layers = gains["layers"]
    stds = table[table["layer"].isin(layers)]["weight_std"].dropna()
    std = float(stds.median()) if len(stds) else math.nan
    fan_in, exact = _fan_in(table, layers, model)
    head = [act_label]
    if np.isfinite(std):
        head.append(f"weight std {std:.3g}")
    if np.isfinite(fan_in):
        head.append(f"fan-in {fan_in:.0f}" if exact else f"fan-in ≈ {fan_in:.0f}")
    numbers = []
    if np.isfinite(gains["act_gain"]):
        numbers.append(f"activation gain {gains['act_gain']:.2f} per layer")
    if np.isfinite(gains["grad_gain"]):
        numbers.append(f"dL/dh gain {gains['grad_gain']:.2f} per layer toward the input")
    formula = "√(2/fan_in)" if scheme == "he" else "1/√fan_in"
    std_target = math.sqrt(factor / fan_in) if np.isfinite(fan_in) else math.nan
    at_target = abs(std / std_target - 1) < 0.2 if np.isfinite(std * std_target) else False
    types = set(table[table["layer"].isin(layers)]["module_type"].astype(str))
    how = (
        f'fs.reinit(model, "{scheme}")'
        if types <= REINIT_TYPES
        else f"re-initialise the {'/'.join(sorted(types))} weights yourself (fs.reinit "
        "covers nn.Linear and nn.Conv1d/2d/3d only; for Hugging Face models lower "
        "config.initializer_range)"
    )
    if at_target:
        target = f"the weights already have {label} scale (std {std_target:.3g}, {formula})"
    elif np.isfinite(std_target):
        target = f"use std {std_target:.3g} ({label}, {formula}): {how}"
    else:
        target = f"use {label} init (std {formula}): {how}"
    text = f"{', '.join(head)}: {', '.join(numbers) or 'saturated'} → {target}"
    if family == "sigmoid":
        text += (
            "; sigmoid's slope is at most 1/4, so dL/dh shrinks about 4× per layer even at "
            'Xavier scale: switch to tanh (Xavier) or ReLU (fs.reinit(model, "he"))'
        )
    text += "; or add batchnorm before the activation, or fs.lsuv(model, batch)."
    if theory is not None and len(theory):
        pa, pg = _geo(theory["pred_act_gain"]), _geo(theory["pred_grad_gain"])
        text += f" Mean-field theory for these weights: gain {pa:.2f} forward, {pg:.2f} backward."
    return text


def _geo(values: pd.Series) -> float:
    """Geometric mean of the finite positive values (NaN if none)."""
    v = values.to_numpy(float)
    v = v[np.isfinite(v) & (v > 0)]
    return float(np.exp(np.log(v).mean())) if len(v) else math.nan


def _theory(model: nn.Module, table: pd.DataFrame) -> pd.DataFrame | None:
    """Mean-field predictions beside the measurement for the model's MLP chains."""
    from flowscope.theory.meanfield import mlp_chains, predict_chain

    rows = []
    by_layer = table.set_index("layer")
    for chain in mlp_chains(model):
        names = [link.name for link in chain]
        if not all(n in by_layer.index for n in names):
            continue
        meas = by_layer.loc[names]
        if not meas["layer_idx"].is_monotonic_increasing or not meas["act_rms"].iloc[0] > 0:
            continue
        pred = predict_chain(chain, float(meas["act_rms"].iloc[0]) ** 2)
        act = meas["act_rms"].to_numpy(float)
        grad = meas["grad_rms"].to_numpy(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            act_gain = np.concatenate([[np.nan], act[1:] / act[:-1]])
            grad_gain = np.concatenate([grad[:-1] / grad[1:], [np.nan]])
        for i, name in enumerate(names):
            rows.append(
                {
                    "layer_idx": int(meas["layer_idx"].iloc[i]),
                    "layer": name,
                    "pred_rms": pred["pre_std"][i],
                    "rms": act[i],
                    "pred_act_gain": pred["act_gain"][i],
                    "act_gain": act_gain[i],
                    "pred_grad_gain": pred["grad_gain"][i],
                    "grad_gain": grad_gain[i],
                }
            )
    return pd.DataFrame(rows) if rows else None


# -- text -----------------------------------------------------------------------------------------


def _fmt(value: Any, pct: bool = False) -> str:
    """A number for the tables: 3 significant digits, '-' when missing."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-" if value is None or np.isnan(value) else f"{value}"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.1%}" if pct else f"{value:.3g}"


def format_diagnosis(d: Diagnosis, max_layers: int = 60) -> str:
    """The verdict table as text: per run a summary, why, the fix, and a per-layer table.

    Example:
        >>> print(format_diagnosis(Diagnosis(pd.DataFrame(), pd.DataFrame(
        ...     {"run": ["a"], "verdict": ["healthy"]}))).splitlines()[0])
        flowscope doctor: 1 run(s), 1 healthy, 0 with problems
    """
    runs = d.runs
    healthy = int((runs["verdict"] == "healthy").sum())
    out = [
        f"flowscope doctor: {len(runs)} run(s), {healthy} healthy, {len(runs) - healthy} "
        "with problems"
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
    return "\n".join(out)


def _layer_lines(d: Diagnosis, run: pd.Series, max_layers: int) -> list[str]:
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


# -- measuring a model --------------------------------------------------------------------------


def _family_of(module_type: str) -> str | None:
    known = activation_type(module_type)
    return None if known is None else known.family


def _can_die(module: nn.Module) -> bool:
    known = activation_type(module)
    return known is not None and known.zero_output


class DeadUnits:
    """Count units that output exactly 0 for every sample, with no_grad forward hooks.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        >>> with torch.no_grad():
        ...     _ = net[0].bias.copy_(torch.tensor([-9.0, -9, 9, 9, 9, 9]))
        >>> with DeadUnits(net) as dead:
        ...     _ = net(torch.randn(32, 4).clamp(-1, 1))
        >>> dead.frame()[["layer", "units", "dead", "samples"]].values.tolist()
        [['1', 6, 2, 32]]

    A unit and its death are the catalogue's (:func:`flowscope.core.activations.alive_units`:
    a feature of the last axis or a channel of a conv map, zero over the batch and every
    position), accumulated over every call. Hooks watch the modules whose output can be
    exactly zero (ReLU-like) unless ``modules`` names others; state stays on the tensor's
    device until ``frame()``. Hooks are removed on exit, also when the body raises.
    """

    def __init__(self, model: nn.Module, modules: Sequence[type[nn.Module]] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise FlowscopeError(f"DeadUnits needs a torch.nn.Module, got {type(model).__name__}")
        self._alive: dict[str, Tensor] = {}
        self._samples: dict[str, int] = {}
        self._types: dict[str, str] = {}
        watched = [
            (name or ROOT, m)
            for name, m in model.named_modules()
            if (isinstance(m, tuple(modules)) if modules is not None else _can_die(m))
        ]
        self._hooks = forward_hooks(watched, self._hook)

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, Tensor) or output.dim() < 2:
                return
            with torch.no_grad():
                alive = alive_units(output)
                seen = self._alive.get(name)
                if seen is None:
                    self._alive[name] = alive
                    self._types[name] = type(module).__name__
                elif seen.shape == alive.shape:
                    seen.logical_or_(alive)
                else:
                    return
                self._samples[name] = self._samples.get(name, 0) + output.numel() // alive.numel()

        return hook

    def __enter__(self) -> DeadUnits:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        self._hooks.remove()

    def frame(self) -> pd.DataFrame:
        """One row per watched layer: ``layer, module_type, units, dead, samples`` (per unit)."""
        names = list(self._alive)
        dead = [(~self._alive[n]).sum() for n in names]
        if len({t.device for t in dead}) == 1:
            counts = torch.stack(dead).tolist()  # one transfer
        else:  # layers on several devices
            counts = [int(t) for t in dead]
        rows = [
            {
                "layer": name,
                "module_type": self._types[name],
                "units": int(self._alive[name].numel()),
                "dead": int(count),
                "samples": self._samples[name],
            }
            for name, count in zip(names, counts, strict=True)
        ]
        return pd.DataFrame(rows, columns=["layer", "module_type", "units", "dead", "samples"])


def _float_tensors(output: Any, depth: int = 0) -> Iterator[Tensor]:
    """Floating-point tensors of a model output, in order (tensors, mappings, sequences)."""
    if isinstance(output, Tensor):
        if output.is_floating_point():
            yield output
    elif depth < 4 and isinstance(output, Mapping):
        for value in output.values():
            yield from _float_tensors(value, depth + 1)
    elif depth < 4 and isinstance(output, (tuple, list)):
        for value in output:
            yield from _float_tensors(value, depth + 1)


def default_loss(output: Any) -> Tensor:
    """The model's own ``output.loss`` if it is a tensor, else the mean of squares of the output.

    Example:
        >>> default_loss(torch.tensor([1.0, 3.0]))
        tensor(5.)

    For outputs that are tuples, lists or mappings (Hugging Face ``ModelOutput``), the first
    floating-point tensor (``logits``) is used.

    Raises:
        FlowscopeError: when the output holds no floating-point tensor.
    """
    own = getattr(output, "loss", None)
    if isinstance(own, Tensor):
        return own
    for tensor in _float_tensors(output):
        return tensor.float().pow(2).mean()
    raise FlowscopeError(
        f"the model's output ({type(output).__name__}) has no floating-point tensor to build "
        "a loss from; pass loss=..."
    )


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(x)``, ``model(*inputs)`` for a tuple/list, ``model(**inputs)`` for a mapping."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def examine(
    model: nn.Module,
    inputs: Any,
    *,
    loss: Callable[[Any], Tensor] | None = None,
    thresholds: Thresholds | None = None,
    name: str = "doctor",
    kinds: Sequence[str] = KINDS,
) -> tuple[Recorder, Diagnosis]:
    """One forward/backward under ``watch`` and :class:`DeadUnits`, then :func:`diagnose`.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        >>> rec, d = examine(net, torch.randn(16, 8))
        >>> d.runs.run.tolist(), rec.closed
        (['doctor'], True)

    Args:
        model: any module (its ``.grad`` fields are restored afterwards).
        inputs: a tensor, a tuple/list of positional inputs, or a mapping of keyword inputs.
        loss: output → scalar tensor; default :func:`default_loss`.
        thresholds: passed to :func:`diagnose`.
        name: the ``run`` column.
        kinds: what the recorder records.

    Returns:
        The (closed) recorder, to save, and the diagnosis (with dead units and theory).

    Raises:
        FlowscopeError: a loss that is not a scalar tensor; whatever the model raises on the
            inputs propagates unchanged.
    """
    if not isinstance(model, nn.Module):
        raise FlowscopeError(f"examine() needs a torch.nn.Module, got {type(model).__name__}")
    loss_fn = loss or default_loss
    saved = [(p, p.grad) for p in model.parameters()]
    rec = watch(model, name=name, kinds=kinds)
    try:
        with DeadUnits(model) as dead:
            value = loss_fn(call_model(model, inputs))
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise FlowscopeError(f"the loss must be a scalar tensor, got {value!r:.80}")
            if value.requires_grad:
                value.backward()
    finally:
        rec.close()
        for param, grad in saved:
            param.grad = grad
    return rec, diagnose(rec, thresholds=thresholds, model=model, dead=dead.frame())
