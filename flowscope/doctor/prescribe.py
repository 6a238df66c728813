"""The prescription: what to change, in words and numbers, for the verdicts found.

For scale and saturation problems, the init that fits the net's activation family (He for
ReLU-like nets, Xavier otherwise) with the target std for the layers' fan-in (exact from
the model, else estimated from the frame); for dead units, what revives them; for NaN/Inf,
where they start.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor, nn

from flowscope.core.activations import activation_type
from flowscope.doctor.rules import top_row, worst_layer
from flowscope.models.inits import INIT_TARGETS

__all__ = ["PRESCRIBED", "REINIT_TYPES", "prescribe"]

# activation families an init prescription is written for (the catalogue's)
PRESCRIBED = ("tanh", "sigmoid", "relu")
REINIT_TYPES = frozenset(t.__name__ for t in INIT_TARGETS)  # what fs.reinit touches


def _family_of(module_type: str) -> str | None:
    """The activation family of a module type in the catalogue, None if unknown."""
    known = activation_type(module_type)
    return None if known is None else known.family


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


def prescribe(
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
        where = worst_layer(table, flagged)
        fixes.append(
            f"NaN/Inf first appear at {where}: check the input and that layer's weights for "
            "NaN/Inf; at init they follow exploding scales (see the next fix); in training, "
            "lower the learning rate or clip gradients (torch.nn.utils.clip_grad_norm_)."
        )
    if {"vanishing", "exploding", "saturated"} & set(parts):
        fixes.append(_init_fix(table, gains, model, theory))
    if "dead" in parts:
        hits = flagged[flagged["verdict"] == "dead"]
        top = top_row(hits)
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
