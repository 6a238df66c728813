"""The checks: the per-layer table becomes rows of ``Diagnosis.layers``, and their summary.

:func:`check_layers` runs every check on every layer it applies to (``act_scale``,
``grad_scale``, ``saturated``, ``dead_units``, ``zero_share``, ``non-finite``, and
``values`` for a layer whose activations and dL/dh hold no value at all: verdict ``no data``),
one row each with the value, the threshold and the reason. :func:`worst_layer` and :func:`explain`
read those rows back for a run: where it is worst, and the numbers behind its verdict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from flowscope.core.activations import activation_type
from flowscope.doctor.table import scale_pool
from flowscope.doctor.thresholds import LAYER_COLUMNS, NO_DATA, Thresholds

__all__ = ["check_layers", "explain", "top_row", "worst_layer"]


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


def check_layers(table: pd.DataFrame, th: Thresholds) -> pd.DataFrame:
    """Every per-layer check as rows of the ``layers`` frame."""
    rows: list[dict[str, Any]] = []
    pool = scale_pool(table)
    for _, members in pool.groupby("role", sort=False):
        if len(members) >= 2:
            rows += _scale_rows(members, th)
    for _, layer in table.iterrows():
        if layer.get("values") == 0:  # recorded, but empty: nothing to judge
            rows.append(
                _row(layer, "values", NO_DATA, 0, 1,
                     "its activations and dL/dh hold no value (an empty batch or an empty "
                     "output): nothing to judge")
            )  # fmt: skip
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


def worst_layer(table: pd.DataFrame, rows: pd.DataFrame) -> str:
    """Where NaN/Inf first appear in the forward pass, else the most extreme checked layer."""
    if table["nonfinite"].sum() > 0:
        first = table[table["act_nonfinite"] > 0] if "act_nonfinite" in table else table[:0]
        if first.empty:
            first = table[table["nonfinite"] > 0].iloc[::-1]
        return str(first["layer"].iloc[0])
    checked = rows[~rows["check"].isin(["non-finite", "values"])]
    if checked.empty:
        return ""
    severity = checked.apply(_severity, axis=1)
    return str(checked["layer"].to_numpy()[int(np.argmax(severity.to_numpy(float)))])


def explain(
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
            top = top_row(hits)
            bits.append(
                f"{len(hits)} layer(s) with {label} above {top['threshold']:.0%}, most in "
                f"{top['layer']!r} ({top['value']:.1%})"
            )
    empty = flagged[flagged["check"] == "values"]
    if NO_DATA in parts:
        bits.append(
            "no activation or dL/dh value was recorded in any layer (a batch of size 0?): "
            "nothing to judge"
        )
    elif len(empty):
        names = ", ".join(repr(n) for n in empty["layer"].head(3))
        bits.append(f"{len(empty)} layer(s) without any value, not judged: {names}")
    bad = flagged[flagged["check"] == "non-finite"]
    if len(bad):
        bits.insert(0, f"{int(bad['value'].sum())} NaN/Inf values in {len(bad)} layer(s)")
    return "; ".join(bits)


def top_row(rows: pd.DataFrame) -> pd.Series:
    """The row with the largest value."""
    return rows.iloc[int(np.argmax(rows["value"].to_numpy(float)))]
