"""Figures a study's own measurements call for, beyond the per-layer ones every report draws:

* **signal propagation** when the study ran the ``spp_*`` probes (the ``residual`` study):
  :func:`flowscope.reporter.plots.signal_plot` — one figure per value of a ``depth`` axis
  (or one in all), a line per setting of the other axes, the median over the seeds;
* **signal propagation of one model** when ``flowscope doctor`` found residual blocks
  (``signal.parquet`` beside the records);
* **the coordinate check** when the study sweeps ``width`` and recorded activations at two
  or more steps (the ``width`` study): :func:`flowscope.reporter.plots.coord_plot` — one
  figure per setting of the other axes, activation rms against width per step (median over
  the seeds), with the slopes of the last hidden layer and the output in the caption.

Example:
    >>> from flowscope.reporter.run import read_run
    >>> study_figures(read_run(run_dir))  # init-scales: neither
    []
"""

from __future__ import annotations

import functools
from typing import Any

import pandas as pd

from flowscope.doctor.coordcheck import width_slopes
from flowscope.reporter import plots
from flowscope.reporter.canvas import figure_png
from flowscope.reporter.run import RunData

__all__ = ["study_figures"]

_SPP = {
    "spp_second_moment": "m2",
    "spp_channel_var": "channel_var",
    "spp_branch_var": "branch_var",
}


def study_figures(run: RunData) -> list[dict[str, str]]:
    """``[{"title", "src", "caption"}]`` for the report, in that order."""
    axes = [a for a in _axes(run) if a != "seed"]
    out = []
    probes_file = run.folder / "probes.parquet"
    if probes_file.exists():
        probes = pd.read_parquet(probes_file)
        if set(_SPP) <= set(probes["probe"].unique()):
            out += _signal(probes, axes)
    signal_file = run.folder / "signal.parquet"  # written by `flowscope doctor`
    if signal_file.exists():
        out.append(_one_signal(pd.read_parquet(signal_file)))
    stats = run.records.stats
    if "width" in axes and not stats.empty:
        acts = stats[stats["kind"] == "activation"]
        if acts["step"].nunique() >= 2 and acts["width"].nunique() >= 2:
            out += _coord(acts, [a for a in axes if a != "width"])
    return out


def _draw_signal(frame: pd.DataFrame, fig: Any) -> None:
    plots.signal_plot(frame, by="setting", log=True, fig=fig)


def _draw_coord(sizes: pd.DataFrame, fig: Any) -> None:
    plots.coord_plot(sizes, fig=fig)


def _axes(run: RunData) -> list[str]:
    configs = run.configs or []
    return list(configs[0]["axes"]) if configs and isinstance(configs[0].get("axes"), dict) else []


def _label(row: pd.Series, columns: list[str]) -> str:
    return ", ".join(f"{c}={row[c]}" for c in columns) or "all"


def _signal(probes: pd.DataFrame, axes: list[str]) -> list[dict[str, str]]:
    rows = probes[probes["probe"].isin(list(_SPP))]
    keys = [*axes, "layer"]
    wide = rows.pivot_table(index=keys, columns="probe", values="value", aggfunc="median")
    wide = wide.rename(columns=_SPP).reset_index()
    wide["depth_index"] = wide["layer"].str.extract(r"(\d+)$", expand=False).astype(float) + 1
    frame = pd.DataFrame(
        {
            "depth": wide["depth_index"],
            "block": wide["layer"],
            "channel_mean_sq": wide["m2"] - wide["channel_var"],
            "channel_var": wide["channel_var"],
            "branch_var": wide["branch_var"],
        }
    )
    split = "depth" if "depth" in axes else None
    others = [a for a in axes if a != split]
    frame["setting"] = wide.apply(lambda r: _label(r, others), axis=1)
    parts = wide.groupby(split, sort=True) if split else [("", wide)]
    figures = []
    for value, part in parts:
        sub = frame.loc[part.index].sort_values(["setting", "depth"])
        title = f"Signal propagation, depth {value}" if split else "Signal propagation"
        figures.append(
            {
                "title": title,
                "src": figure_png(functools.partial(_draw_signal, sub), (12.0, 3.4)),
                "caption": (
                    "Per residual block at init (median over the seeds): the stream's average "
                    "channel squared mean (the mean shift), its average channel variance, and "
                    "the variance of what the block's branch adds (Brock, De & Smith 2021, "
                    "Fig. 1); log y axes. The growth laws the claims check: "
                    "flowscope.theory.residual."
                ),
            }
        )
    return figures


def _one_signal(frame: pd.DataFrame) -> dict[str, str]:
    sub = frame.assign(setting="model")
    return {
        "title": "Signal propagation",
        "src": figure_png(functools.partial(_draw_signal, sub), (12.0, 3.4)),
        "caption": (
            "Per residual block of the model at init, on the doctor's input: the stream's "
            "average channel squared mean, its average channel variance and the variance of "
            "what each block's branch adds (Brock, De & Smith 2021); log y axes. The doctor's "
            "reading of the growth is in diagnosis.txt."
        ),
    }


def _coord(acts: pd.DataFrame, others: list[str]) -> list[dict[str, str]]:
    keys = [*others, "width", "step", "layer"]
    sizes = acts.groupby(keys, sort=False)["rms"].median().reset_index()
    sizes = sizes.rename(columns={"rms": "size"})
    order = acts.drop_duplicates("layer").sort_values("layer_idx")["layer"].tolist()
    parts = sizes.groupby(others, sort=False) if others else [((), sizes)]
    figures = []
    for _, part in parts:
        label = _label(part.iloc[0], others)
        part = part.assign(layer=pd.Categorical(part["layer"], categories=order, ordered=True))
        part = part.sort_values(["layer", "step", "width"])
        part["layer"] = part["layer"].astype(str)
        slopes = _slopes(part, [order[-2], order[-1]] if len(order) > 1 else order)
        figures.append(
            {
                "title": f"Coordinate check, {label}",
                "src": figure_png(functools.partial(_draw_coord, part), (13.0, 3.0)),
                "caption": (
                    f"{label}: activation rms against width at each step (median over the "
                    "seeds; step t is the forward pass after t updates), log-log axes. Flat "
                    "lines are width-stable (Tensor Programs V's coordinate check). Slope of "
                    f"log rms vs log width by step: {slopes}."
                ),
            }
        )
    return figures


def _slopes(sizes: pd.DataFrame, layers: list[str]) -> str:
    """``layer s0 s1 ...; ...``: each of ``layers``' slopes by step (coordcheck's fit)."""
    slopes = width_slopes(sizes[sizes["layer"].isin(layers)], layers)
    return "; ".join(
        f"{layer} " + " ".join(f"{v:.2f}" for v in slopes[slopes.layer == layer].slope)
        for layer in layers
    )
