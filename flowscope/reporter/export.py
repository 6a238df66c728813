"""Records out to other tools: TensorBoard event files and CSV.

``to_tensorboard`` writes, per recorded snapshot, flowscope's own histogram through
``SummaryWriter.add_histogram_raw`` (the log-magnitude one by default: its fixed edges become
the bucket limits, so histograms of every layer, step and run line up) and the statistics as
scalars, so TensorBoard dashboards built on ``add_histogram`` keep working without a second
pass over the tensors. ``to_csv`` writes ``stats.csv`` and ``hists.csv`` next to the Parquet
files; :func:`csv_text` is every CSV flowscope writes: text cells a spreadsheet would run as a
formula (a module named ``=HYPERLINK(...)``) are written with a leading ``'``.

Tags: histograms ``<kind>/<layer>``, scalars ``<kind>.<statistic>/<layer>`` (TensorBoard
groups on the part before the first ``/``: one section per kind and statistic, one chart per
layer); the output path of a module returning several tensors and the call index of a module
called several times per forward are appended (``/1.hidden``, ``/call2``). The step is the
recorder's step. Records of several runs (a study) go to one sub-folder per run.

Example:
    >>> import torch, flowscope as fs
    >>> from flowscope.reporter.export import to_tensorboard
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
    >>> with fs.watch(model) as rec:
    ...     model(torch.randn(4, 8)).sum().backward()
    >>> to_tensorboard(rec, "runs/demo")
    [PosixPath('runs/demo')]
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pandas as pd

from flowscope.core.columns import KEYS
from flowscope.core.errors import FlowscopeError
from flowscope.record.frames import Records, atomic_write_text, log_edges_of
from flowscope.record.loading import records_of
from flowscope.record.recorder import Recorder
from flowscope.record.snapshot import LogEdges

__all__ = ["SCALARS", "csv_text", "records_of", "tag_of", "to_csv", "to_tensorboard"]

SCALARS = ("mean", "std", "rms", "absmax", "frac_zero", "frac_saturated", "nonfinite")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # OWASP's CSV injection list


def csv_text(frame: pd.DataFrame) -> str:
    """The frame as CSV text, with text cells a spreadsheet would execute neutralised.

    Example:
        >>> frame = pd.DataFrame({"layer": ['=HYPERLINK("http://x")', "fc"], "min": [-1.5, 2]})
        >>> print(csv_text(frame), end="")
        layer,min
        "'=HYPERLINK(""http://x"")",-1.5
        fc,2.0

    A text cell (and a column name) starting with ``=``, ``+``, ``-``, ``@``, a tab or a
    carriage return gets a leading ``'`` (OWASP's rule), so Excel, LibreOffice and Google
    Sheets show it as text; numbers are written as numbers, negative ones unquoted. The
    Parquet files keep the raw names.
    """
    out = frame.copy(deep=False)
    carriage_return = False
    for i in range(frame.shape[1]):
        series = frame.iloc[:, i]
        if series.dtype.kind in "biufcmM":  # numbers, booleans and times are not text
            continue
        flagged = series.map(_is_formula).to_numpy(dtype=bool)
        if flagged.any():
            series = series.astype(object)  # a categorical cannot take the new text
            fixed = series.where(~flagged, "'" + series[flagged].astype(str))
            out.isetitem(i, fixed.to_numpy(dtype=object))
        carriage_return |= bool(series.map(lambda v: isinstance(v, str) and "\r" in v).any())
    out.columns = pd.Index(["'" + c if _is_formula(c) else c for c in frame.columns], dtype=object)
    # csv quotes a cell holding a character of the line ending: with a CR in some cell, end
    # lines with CRLF (RFC 4180) so that cell is quoted instead of splitting its row
    return out.to_csv(index=False, lineterminator="\r\n" if carriage_return else "\n")


def _is_formula(value: Any) -> bool:
    """True for text a spreadsheet would read as a formula."""
    return isinstance(value, str) and value.startswith(FORMULA_STARTS)


def tag_of(layer: str, kind: str, call: int, tensor: str, stat: str | None = None) -> str:
    """The TensorBoard tag of one snapshot (``stat``: a scalar's tag, else the histogram's).

    Example:
        >>> tag_of("encoder.0", "gradient", 1, "0"), tag_of("fc", "activation", 0, "", "std")
        ('gradient/encoder.0/0/call1', 'activation.std/fc')
    """
    name = layer + (f"/{tensor}" if tensor else "") + (f"/call{call}" if call else "")
    return f"{kind}.{stat}/{name}" if stat else f"{kind}/{name}"


def to_tensorboard(
    source: Records | Recorder | str | os.PathLike[str],
    logdir: str | os.PathLike[str],
    *,
    hist: Literal["log", "linear"] = "log",
    scalars: Sequence[str] = SCALARS,
) -> list[Path]:
    """Write the records as TensorBoard histograms and scalars into ``logdir``.

    Example:
        >>> to_tensorboard(model_dir, "runs/my-model")  # model_dir: e.g. "reports/my-model"
        [PosixPath('runs/my-model')]

    Then ``tensorboard --logdir runs``.

    Args:
        source: a Records, a Recorder, or a folder written by ``rec.save`` / a study run.
        logdir: the TensorBoard log folder (one sub-folder per run when there are several).
        hist: which histogram to write: ``log`` (fixed edges; counts × ``hist_stride``
            estimate the whole tensor) or ``linear`` (each snapshot's own range).
        scalars: statistics to write per snapshot, from the stats frame (``nonfinite`` = NaN
            + Inf count); NaN values (e.g. no saturation interval) are left out.

    Returns:
        The event-file folders written, one per run.

    Raises:
        FlowscopeError: for a bad source, histogram kind or statistic, before writing.
        ImportError: when the ``tensorboard`` package is missing.
    """
    records = records_of(source)
    if hist not in ("log", "linear"):
        raise FlowscopeError(f"hist must be 'log' or 'linear', got {hist!r}")
    known = [*records.stats.columns, "nonfinite"]
    bad = [s for s in scalars if s not in known or s in KEYS]
    if bad:
        raise FlowscopeError(f"unknown statistic(s) {bad}; choose from {', '.join(SCALARS)}")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(
            "to_tensorboard needs tensorboard: pip install 'flowscope[tensorboard]'"
        ) from err
    edges = log_edges_of(records.meta)
    stats = records.stats.assign(nonfinite=records.stats["nan"] + records.stats["inf"])
    runs = list(pd.unique(stats["run"])) or [records.meta.get("run", "")]
    written = []
    for run in runs:
        folder = Path(logdir) / str(run) if len(runs) > 1 else Path(logdir)
        run_stats = stats[stats["run"] == run]
        run_hists = records.hists[(records.hists["run"] == run) & (records.hists["hist"] == hist)]
        with SummaryWriter(log_dir=str(folder)) as writer:
            _write_scalars(writer, run_stats, scalars)
            _write_hists(writer, run_stats, run_hists, edges, hist)
        written.append(folder)
    return written


def _rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The frame's rows as plain dicts."""
    return cast(list[dict[str, Any]], frame.to_dict("records"))


def _write_scalars(writer: Any, stats: pd.DataFrame, scalars: Sequence[str]) -> None:
    for row in _rows(stats):
        for stat in scalars:
            value = float(row[stat])
            if not math.isnan(value):
                tag = tag_of(row["layer"], row["kind"], row["call"], row["tensor"], stat)
                writer.add_scalar(tag, value, global_step=int(row["step"]))


_SNAP = ["step", "layer", "kind", "call", "tensor"]


def _write_hists(
    writer: Any, stats: pd.DataFrame, hists: pd.DataFrame, edges: LogEdges, hist: str
) -> None:
    by_key = {tuple(row[k] for k in _SNAP): row for row in _rows(stats)}
    for key, bins in hists.groupby(_SNAP, sort=False):
        step, layer, kind, call, tensor = cast(tuple[Any, ...], key)
        row = by_key[(step, layer, kind, call, tensor)]
        bins = bins[bins["count"] > 0].sort_values("bin")
        if bins.empty:
            continue
        if hist == "log":
            lows, limits = _log_limits(bins["bin"].to_numpy(), edges)
        else:
            lows, limits = bins["lo"].to_numpy(), bins["hi"].to_numpy()
        counts = bins["count"].to_numpy() * float(row["hist_stride"])
        finite = float(row["count"] - row["nan"] - row["inf"])
        writer.add_histogram_raw(
            tag_of(layer, kind, int(call), tensor),
            min=float(lows[0]),
            max=float(limits[-1]),
            num=float(counts.sum()),
            sum=float(row["mean"] * finite) if finite else 0.0,
            sum_squares=float(row["rms"] ** 2 * finite) if finite else 0.0,
            bucket_limits=limits.tolist(),
            bucket_counts=counts.tolist(),
            global_step=int(step),
        )


def _log_limits(bins: np.ndarray, edges: LogEdges) -> tuple[np.ndarray, np.ndarray]:
    """(lower edges, right limits) of log bins, finite and strictly increasing for TensorBoard.

    The zero bin ends at 0, the negative underflow bin just before it (at -10**(lo-1)), and
    the overflow bins, which reach ±Inf, stop a decade past 10**hi.
    """
    far = 10.0 ** (edges.hi + 1)
    bounds = np.array([edges.bounds(int(b)) for b in bins], dtype=np.float64)
    lows, limits = bounds[:, 0], bounds[:, 1]
    limits = np.where(bins == edges.zero_index - 1, -(10.0 ** (edges.lo - 1)), limits)
    return np.clip(lows, -far, far), np.clip(limits, -far, far)


def to_csv(
    source: Records | Recorder | str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """Write ``stats.csv`` and ``hists.csv`` (the same frames as the Parquet files).

    Example:
        >>> [path.name for path in to_csv(model_dir)]  # next to the records' Parquet files
        ['stats.csv', 'hists.csv']

    Args:
        source: a Records, a Recorder, or a records / study run folder.
        out_dir: where to write; default: the folder ``source`` names (next to its Parquet
            files). Required for records in memory.

    Returns:
        The two paths written.

    Raises:
        FlowscopeError: for a bad source, or records in memory without ``out_dir``.
    """
    records = records_of(source)
    if out_dir is None:
        if not isinstance(source, str | os.PathLike):
            raise FlowscopeError("to_csv needs out_dir for records that are not in a folder")
        out_dir = source
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, frame in (("stats.csv", records.stats), ("hists.csv", records.hists)):
        atomic_write_text(out / name, csv_text(frame))
        paths.append(out / name)
    return paths
