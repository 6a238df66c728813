"""The per-layer table the checks read: one row per layer of one group at one step.

:func:`layer_table` pools a group's stats rows per layer (rms of activations and of dL/dh
over the finite values, zero and saturation shares, NaN/Inf count, weight std) and marks
the *pre-activation* layers (module types containing ``Linear`` or ``Conv``) and each
layer's *role*: its module type and its name with every number replaced by ``#``.
:func:`scale_pool` picks the layers whose scales are compared, :func:`main_role` the role
whose scales drift most, which gives a run its per-layer gains.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["PRE_ACTIVATION", "dead_counts", "layer_table", "main_role", "role_of", "scale_pool"]

PRE_ACTIVATION = re.compile(r"Linear|Conv")
DEAD_COLUMNS = ["layer", "units", "dead", "samples"]


def layer_table(group: pd.DataFrame, dead: pd.DataFrame) -> pd.DataFrame:
    """One row per layer: rms of activation and dL/dh, shares, non-finite count, weight std.

    Args:
        group: the stats rows of one group at one step.
        dead: that group's per-unit dead counts (``layer, units, dead, samples``), or empty.

    Returns:
        In execution order: ``layer, layer_idx, module_type, nonfinite, act_nonfinite,
        values`` (values in its activation and dL/dh rows; NaN without such rows), ``act_rms,
        grad_rms`` (rms over the finite values), ``zero, sat`` (activation shares),
        ``weight_std, weight_count, units, dead, samples`` (NaN where not recorded), ``pre``
        (a pre-activation layer) and ``role``.
    """
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
    flows = g[g["kind"].isin(["activation", "gradient"])]
    base["values"] = flows.groupby("layer", sort=False)["count"].sum()
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
    table["role"] = role_of(table["module_type"], table["layer"])
    return table


def dead_counts(group: pd.DataFrame) -> pd.DataFrame:
    """The per-unit dead counts of a group's ``dead_units`` rows (``fs.watch`` records them
    per call of a ReLU-like module), in :class:`~flowscope.doctor.measure.DeadUnits`' layout.

    Example:
        >>> group = pd.DataFrame({"layer": "1", "kind": ["activation", "dead_units"],
        ...                       "count": [512, 8], "mean": [0.3, 0.25]})
        >>> dead_counts(group).values.tolist()
        [['1', 8, 2, 64.0]]

    Args:
        group: the stats rows of one group at one step.

    Returns:
        ``layer, units, dead, samples``, one row per layer with ``dead_units`` rows: units
        and dead units summed over the layer's calls (each call's units counted apart),
        ``samples`` per unit = the layer's activation values over its units (NaN without
        activation rows). Empty when the group has no ``dead_units`` rows.
    """
    kind = group["kind"]
    rows = group[kind == "dead_units"]
    if rows.empty:
        return pd.DataFrame(columns=DEAD_COLUMNS)
    units = rows["count"].astype(float)
    dead = rows["mean"].astype(float) * units
    per = pd.DataFrame({"layer": rows["layer"], "units": units, "dead": dead})
    per = per.groupby("layer", sort=False)[["units", "dead"]].sum()
    acts = group[kind == "activation"].groupby("layer", sort=False)["count"].sum()
    per["samples"] = acts.reindex(per.index).astype(float) / per["units"].where(per["units"] > 0)
    per["units"] = per["units"].astype("int64")
    per["dead"] = per["dead"].round().astype("int64")
    return per.reset_index()[DEAD_COLUMNS]


def role_of(module_types: pd.Series, layers: pd.Series) -> pd.Series:
    """Each layer's role: its module type and its name with every number replaced by '#'
    (layers of the same kind share it: ``Linear:blocks.#.fc``)."""
    return module_types.astype(str) + ":" + layers.astype(str).str.replace(r"\d+", "#", regex=True)


def scale_pool(table: pd.DataFrame) -> pd.DataFrame:
    """The layers whose scales are compared: pre-activation layers, else all recorded ones.

    When no two of them share a role, they form one role (one stack, execution order).
    """
    recorded = table["act_rms"].notna() | table["grad_rms"].notna()
    pre = table[table["pre"] & recorded]
    pool = pre if len(pre) else table[recorded]
    if len(pool) >= 2 and pool["role"].value_counts().max() < 2:
        pool = pool.assign(role="*")
    return pool


def main_role(table: pd.DataFrame) -> dict[str, Any]:
    """Gains of the role (layers of one kind, >= 2) whose first/last scales differ most.

    Returns ``act_gain, grad_gain`` (per layer), ``act_ratio`` (last/first), ``grad_ratio``
    (first/last), ``layers`` (the role's layers) and ``score``; NaN gains and no layers when
    no role has two members.
    """
    best: dict[str, Any] = {
        "act_gain": math.nan,
        "grad_gain": math.nan,
        "grad_ratio": math.nan,
        "act_ratio": math.nan,
        "layers": [],
        "score": -1.0,
    }
    pool = scale_pool(table)
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
