"""Mean-field predictions beside the measurement, for a model's Linear → [norm] → activation
chains (:mod:`flowscope.theory`): ``Diagnosis.theory``."""

from __future__ import annotations

import numpy as np
import pandas as pd
from torch import nn

__all__ = ["theory_table"]


def theory_table(model: nn.Module, table: pd.DataFrame) -> pd.DataFrame | None:
    """Mean-field predictions beside the measurement for the model's MLP chains."""
    from flowscope.theory import mlp_chains, predict_chain

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
