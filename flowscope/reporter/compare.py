"""``fs.compare``: two diagnoses before and after a fix (the doctor's table), or two runs side
by side with a self-contained ``compare.html`` (:func:`compare_report`).

The runs' numbers come from :func:`flowscope.doctor.runcompare.compare_runs`; this module
draws them (:mod:`flowscope.reporter.plots.runs`, :func:`flowscope.reporter.plots.
layer_steps`) and renders ``compare.html.j2`` with the report's style sheet: the summary and
the problems B adds, the losses overlaid, both verdict timelines, the layers side by side at
the last step, and per kind a layer x step heat map of each run on one colour scale.

Example:
    >>> import tempfile, torch, flowscope as fs
    >>> tmp = Path(tempfile.mkdtemp())
    >>> def train(out, gain):
    ...     torch.manual_seed(0)
    ...     net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ...     with torch.no_grad():
    ...         net[2].weight.mul_(gain)  # gain 1000: '2' explodes
    ...     with fs.watch(net, out=out) as rec:
    ...         for step in range(3):
    ...             net(torch.randn(16, 8)).pow(2).mean().backward()
    ...             rec.step()
    >>> train(tmp / "a", 1.0), train(tmp / "b", 1000.0)
    (None, None)
    >>> c = fs.compare(tmp / "a", tmp / "b", out=tmp / "a-vs-b")  # two run folders
    >>> c.ok(), c.new[["problem", "check", "layer"]].values.tolist()
    (False, [['exploding', 'act_scale', '2'], ['exploding', 'grad_scale', '0']])
    >>> (tmp / "a-vs-b" / "compare.html").is_file(), fs.compare(tmp / "b", tmp / "a").ok()
    (True, True)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import pandas as pd

from flowscope import __version__
from flowscope.core.errors import FlowscopeError
from flowscope.doctor.diagnosis import Diagnosis
from flowscope.doctor.diagnosis import compare as compare_diagnoses
from flowscope.doctor.runcompare import LAYER_STATS, RunComparison, compare_runs
from flowscope.doctor.thresholds import Thresholds
from flowscope.record.frames import atomic_write_text
from flowscope.reporter.canvas import Canvases
from flowscope.reporter.timeline_section import timeline_rows

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["COMPARE_FILE", "compare", "compare_report"]

COMPARE_FILE = "compare.html"
HEAT_KINDS = (  # kind, column, label: the layer x step maps of both runs
    ("activation", "rms", "Activation rms"),
    ("gradient", "rms", "dL/dh rms"),
    ("update_ratio", "mean", "update : weight ratio"),
)


@overload
def compare(before: Diagnosis, after: Diagnosis) -> pd.DataFrame: ...


@overload
def compare(
    before: Any,
    after: Any,
    out: str | os.PathLike[str] | None = None,
    *,
    factor: float = 10.0,
    thresholds: Thresholds | None = None,
) -> RunComparison: ...


def compare(
    before: Any,
    after: Any,
    out: str | os.PathLike[str] | None = None,
    *,
    factor: float = 10.0,
    thresholds: Thresholds | None = None,
) -> pd.DataFrame | RunComparison:
    """Compare two diagnoses (before/after a fix) or two training runs (A, then B).

    Example:
        >>> a = Diagnosis(pd.DataFrame(), pd.DataFrame({"run": ["x"], "verdict": ["vanishing"]}))
        >>> b = Diagnosis(pd.DataFrame(), pd.DataFrame({"run": ["x"], "verdict": ["healthy"]}))
        >>> compare(a, b)[["measure", "before", "after"]].values.tolist()
        [['verdict', 'vanishing', 'healthy']]

    Args:
        before: a :class:`Diagnosis`, or run A: a run folder, ``Records`` or ``Recorder``.
        after: a :class:`Diagnosis`, or run B (compared with A).
        out: runs only: a folder for ``compare.html`` (not written when None).
        factor: runs only: a layer's rms differing by more than this factor is called out.
        thresholds: runs only: the doctor's limits for both.

    Returns:
        For two diagnoses the doctor's before/after frame (``flowscope.doctor.compare``);
        for two runs a :class:`RunComparison` (``ok()`` False when B has a problem A has
        not; ``summary()`` the text).

    Raises:
        FlowscopeError: a Diagnosis beside a run, a missing folder or one holding no run.
    """
    diagnoses = isinstance(before, Diagnosis), isinstance(after, Diagnosis)
    if all(diagnoses):
        if out is not None:
            raise FlowscopeError("compare() writes no page for two diagnoses; leave out out=")
        return compare_diagnoses(before, after)
    if any(diagnoses):
        raise FlowscopeError(
            "compare() takes two Diagnosis objects or two runs (folders, Records, Recorders), "
            f"got {type(before).__name__} and {type(after).__name__}"
        )
    result = compare_runs(before, after, factor=factor, thresholds=thresholds)
    if out is not None:
        compare_report(result, out)
    return result


def compare_report(c: RunComparison, out: str | os.PathLike[str]) -> Path:
    """Write ``compare.html`` for a comparison into ``out`` (made if missing).

    Returns:
        The page's path.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    from flowscope.reporter.page import environment

    env = environment()
    html = env.get_template("compare.html.j2").render(
        c=c,
        summary=c.summary(),
        new=_rows(c.new),
        gone=_rows(c.gone),
        timelines=[timeline_rows(t, {"run": ""}) for t in c.timelines],
        layers=c.layers.to_dict("records"),
        stats=list(LAYER_STATS.items()),
        figures=_figures(c),
        generated=time.strftime("%Y-%m-%d %H:%M"),
        version=__version__,
    )
    path = folder / COMPARE_FILE
    atomic_write_text(path, html)
    return path


def _rows(frame: pd.DataFrame) -> list[dict[Any, Any]]:
    """Timeline rows for a table."""
    return frame.to_dict("records")


def _figures(c: RunComparison) -> list[dict[str, str]]:
    """The page's figures: ``[{"id", "title", "caption", "src"}]``."""
    from flowscope.reporter.plots.runs import layer_pair, loss_overlay

    canvases, figs = Canvases(), []
    na, nb = c.names
    if (c.scalars["name"] == "loss").any():

        def draw_loss(fig: Figure) -> None:
            loss_overlay(c.scalars, ax=fig.subplots())

        figs.append(
            {
                "id": "loss",
                "title": "Loss over the steps",
                "caption": f"The loss of {na} and {nb}: steps binned into at most 600 points "
                "per run, the line their mean, the band their minimum to maximum.",
                "src": canvases.png("loss", draw_loss, (7.0, 3.0)),
            }
        )
    for col, label in (("act_rms", "Activation rms"), ("grad_rms", "dL/dh rms")):

        def draw_pair(fig: Figure, col: str = col, label: str = label) -> None:
            layer_pair(c.layers, [f"{col}_a", f"{col}_b"], [na, nb], fig.subplots(), label)

        try:
            src = canvases.png(("pair", col), draw_pair, (7.5, 3.0))
        except FlowscopeError:  # neither run recorded this kind
            continue
        figs.append(
            {
                "id": f"layers-{col}",
                "title": f"{label} per layer at the last step",
                "caption": f"{label} of each layer at each run's last recorded step, log y; "
                "layers in the order of run A, then those only B has.",
                "src": src,
            }
        )
    for kind, column, label in HEAT_KINDS:

        def draw_heat(fig: Figure, kind: str = kind, column: str = column) -> None:
            _heat_pair(c, kind, column, fig)

        try:
            src = canvases.png(("heat", kind), draw_heat, (13.0, 3.4))
        except FlowscopeError:  # a run did not record this kind (update_ratio: on request)
            continue
        figs.append(
            {
                "id": f"steps-{kind}",
                "title": f"{label} per layer over the steps",
                "caption": f"log10 of the {label} per layer (y) and step (x): {na} left, {nb} "
                "right, on one colour scale; steps binned into at most 300 columns.",
                "src": src,
            }
        )
    return figs


def _heat_pair(c: RunComparison, kind: str, column: str, fig: Figure) -> None:
    """Both runs' layer x step heat maps of ``kind`` side by side, one colour scale."""
    from flowscope.reporter.plots import layer_steps

    axes = fig.subplots(1, 2)
    images = []
    for ax, stats, name in zip(axes, c.stats, c.names, strict=True):
        layer_steps(stats, kind, column, ax=ax)
        ax.set_title(f"{name}: {ax.get_title()}", fontsize=9)
        images.append(ax.images[0])
    ranges = [im.get_array() for im in images]
    finite = [np.asarray(r, float)[np.isfinite(np.asarray(r, float))] for r in ranges]
    values = np.concatenate([f for f in finite if f.size] or [np.zeros(1)])
    for im in images:
        im.set_clim(float(values.min()), float(values.max()))
