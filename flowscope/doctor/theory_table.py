"""Mean-field predictions beside the measurement, for a model's Linear → [norm] → activation
chains (:mod:`flowscope.theory`): ``Diagnosis.theory``."""

from __future__ import annotations

import numpy as np
import pandas as pd
from torch import nn

__all__ = ["phase_notes", "theory_table"]


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


def phase_notes(model: nn.Module) -> list[str]:
    """Where each MLP chain of ``model`` sits on the mean-field phase diagram: χ₁, ξ_c and
    whether its depth is beyond ~6 ξ_c (Schoenholz et al. 2017), with the critical σ_w².

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(*[m for _ in range(30)
        ...                             for m in (torch.nn.Linear(64, 64), torch.nn.Tanh())])
        >>> from flowscope.models.inits import apply_init
        >>> gen = torch.Generator().manual_seed(0)
        >>> _ = apply_init(net, "meanfield", sigma_w2=1.0, sigma_b2=0.05, generator=gen)
        >>> print(phase_notes(net)[0])  # doctest: +NORMALIZE_WHITESPACE
        mean field, 30 Linear -> Tanh layers (0 ... 58): sigma_w^2 1, sigma_b^2 0.0511 ->
        ordered phase, chi_1 = 0.758, xi_c = 3.61 layers; depth 30 is beyond ~6 xi_c = 21.7:
        expect it not to train; the edge of chaos at this sigma_b^2 is sigma_w^2 = 1.77 (init
        'meanfield' with sigma_w2=1.77)
    """
    from flowscope.theory import depth_scales, edge_of_chaos, mlp_chains

    notes = []
    for chain in mlp_chains(model):
        if len({link.act_type for link in chain}) != 1:
            continue
        links = chain[1:]  # the first Linear's fan-in is the input's
        sw2 = float(np.mean([link.sigma_w2 for link in links]))
        sb2 = float(np.mean([link.sigma_b2 for link in links]))
        try:
            s = depth_scales(chain[0].activation, sw2, sb2)
            critical = edge_of_chaos(chain[0].activation, sb2)
        except Exception:  # an activation without a mean-field limit: nothing to say
            continue
        depth = len(chain)
        head = (
            f"mean field, {depth} Linear -> {chain[0].act_type} layers ({chain[0].name} ... "
            f"{chain[-1].name}): sigma_w^2 {sw2:.3g}, sigma_b^2 {sb2:.3g} -> "
        )
        fix = f"the edge of chaos at this sigma_b^2 is sigma_w^2 = {critical:.3g} (init " + (
            f"'meanfield' with sigma_w2={critical:.3g})"
        )
        chi, xi = s["chi_1"], s["xi_c"]
        if abs(chi - 1) < 0.02:  # within 2 %: sampling of the weights alone moves it that much
            body = f"at the edge of chaos (chi_1 = {chi:.3g}): depth is not limited by xi_c"
        elif s["phase"] == "vanishing":
            body = f"the signal shrinks toward q* = 0 (chi_1 = {chi:.3g} per layer); {fix}"
        elif s["phase"] == "unbounded":
            body = f"the variance grows without bound (chi_1 = {chi:.3g}); {fix}"
        elif depth > 6 * xi:
            body = (
                f"{s['phase']} phase, chi_1 = {chi:.3g}, xi_c = {xi:.3g} layers; depth {depth} is "
                f"beyond ~6 xi_c = {6 * xi:.3g}: expect it not to train; {fix}"
            )
        else:
            body = (
                f"{s['phase']} phase, chi_1 = {chi:.3g}, xi_c = {xi:.3g} layers; depth {depth} is "
                f"within ~6 xi_c = {6 * xi:.3g}"
            )
        notes.append(head + body)
    return notes
