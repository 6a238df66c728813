"""Reading what flowscope wrote: ``fs.load`` of any run folder (a streamed run store, a
folder of ``stats``/``hists`` Parquet files, one study config's snapshots), with a selection
of steps, layers and kinds, and :func:`records_of` for any accepted source.

A streamed run's parts are read with the selection pushed down as pyarrow filters
(:func:`read_store_snapshots`); with ``hist_steps`` the histogram counts are read for those
steps only. The frames themselves are built by :mod:`flowscope.record.frames`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from flowscope.core.columns import KEYS, PASS_DEFAULTS, PASS_KEYS, STATS
from flowscope.core.errors import FlowscopeError
from flowscope.record import runstore
from flowscope.record.frames import (
    FILES,
    SCALAR_COLUMNS,
    SCALARS_FILE,
    SNAPSHOTS_FILE,
    Records,
    Snapshots,
    log_edges_of,
    records_from,
)
from flowscope.record.snapshot import HistSpec, LogEdges

__all__ = ["load", "read_store_snapshots", "records_of", "spaced_steps"]


def load(
    run_dir: str | os.PathLike[str],
    *,
    steps: tuple[int, int] | None = None,
    layers: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    hist_steps: int | None = None,
) -> Records:
    """Read a run folder: one streamed by ``fs.watch(model, out=...)`` (finished or cut off),
    one written by ``Recorder.save`` / ``Records.save``, or one config's folder of a study run
    (``configs/<id>``, its snapshots).

    Example:
        >>> rec = load(model_dir)  # a folder written by rec.save, e.g. "reports/my-model"
        >>> tanh = rec.stats.query("kind == 'activation' and module_type == 'Tanh' and step == 0")
        >>> tanh.set_index("layer")["std"].round(2).to_dict()
        {'1': 0.47, '3': 0.29, '5': 0.22}

    Args:
        run_dir: the folder.
        steps: only steps ``lo <= step <= hi``; read from a streamed run's parts by their
            row groups' statistics, so a short range of a long run reads little.
        layers: only these layer names.
        kinds: only these kinds.
        hist_steps: histogram rows for at most this many recorded steps, evenly spaced,
            the first and the last included (the statistics keep every step): the tidy
            histogram frame of a long run has ~70 rows per snapshot; 0: none.

    Raises:
        FlowscopeError: when the folder or one of its files is missing or not flowscope's,
            or ``hist_steps`` is negative.
    """
    if hist_steps is not None and (isinstance(hist_steps, bool) or not hist_steps >= 0):
        raise FlowscopeError(f"hist_steps must be a count of steps >= 0, got {hist_steps!r}")
    folder = Path(run_dir)
    if runstore.is_run_store(folder):
        return _load_store(folder, _filters(steps, layers, kinds), hist_steps)
    records = _select(_load_files(folder), steps, layers, kinds)
    if hist_steps is not None and "step" in records.hists:
        keep = spaced_steps(records.stats["step"].to_numpy(), hist_steps)
        records.hists = records.hists[records.hists["step"].isin(keep)].reset_index(drop=True)
    return records


def spaced_steps(steps: np.ndarray, most: int) -> np.ndarray:
    """At most ``most`` of the distinct ``steps``, evenly spaced, first and last included
    (the first only for ``most`` 1, none for 0).

    Example:
        >>> spaced_steps(np.arange(10), 4).tolist(), spaced_steps(np.arange(10), 0).tolist()
        ([0, 3, 6, 9], [])
    """
    unique = np.unique(steps)
    if len(unique) <= most:
        return unique
    return unique[np.unique(np.linspace(0, len(unique) - 1, most).round().astype(int))]


def _filters(
    steps: tuple[int, int] | None, layers: Sequence[str] | None, kinds: Sequence[str] | None
) -> list[tuple[str, str, Any]]:
    """pyarrow filters for ``load``'s selection."""
    out: list[tuple[str, str, Any]] = []
    if steps is not None:
        lo, hi = steps
        out += [("step", ">=", int(lo)), ("step", "<=", int(hi))]
    if layers is not None:
        out.append(("layer", "in", list(layers)))
    if kinds is not None:
        out.append(("kind", "in", list(kinds)))
    return out


def _select(
    records: Records,
    steps: tuple[int, int] | None,
    layers: Sequence[str] | None,
    kinds: Sequence[str] | None,
) -> Records:
    """``records`` restricted to ``load``'s selection (folders read whole)."""
    if steps is None and layers is None and kinds is None:
        return records

    def keep(frame: pd.DataFrame) -> pd.DataFrame:
        mask = pd.Series(True, index=frame.index)
        if steps is not None and "step" in frame:
            mask &= frame["step"].between(*steps)
        if layers is not None and "layer" in frame:
            mask &= frame["layer"].isin(list(layers))
        if kinds is not None and "kind" in frame:
            mask &= frame["kind"].isin(list(kinds))
        return frame[mask].reset_index(drop=True)

    return Records(keep(records.stats), keep(records.hists), records.meta, keep(records.scalars))


def _load_store(
    folder: Path, filters: list[tuple[str, str, Any]], hist_steps: int | None = None
) -> Records:
    """A streamed run's parts (those finished: a run cut off reads up to its last flush)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        edges = log_edges_of(meta)
        # with hist_steps, the counts (189 numbers a snapshot) are read for those steps only:
        # reading them all first made a 2000-step run's report peak at 2.3 GiB
        counts = hist_steps is None
        snaps = read_store_snapshots(folder, edges, filters, counts=counts)
        scalars = runstore.read(folder, "scalars", [f for f in filters if f[0] == "step"])
        if snaps is None:
            snaps = Snapshots.of([], HistSpec(int(meta.get("bins", 64)), 1, edges), "")
        records = records_from(snaps, meta, binned=None if counts else np.zeros(len(snaps), bool))
        keep = spaced_steps(snaps.keys["step"], 0 if counts else cast(int, hist_steps))
        if len(keep):  # hist_steps=0: the statistics only
            step_in = ("step", "in", keep.tolist())
            binned = read_store_snapshots(folder, edges, [*filters, step_in])
            if binned is not None:
                records.hists = records_from(binned, meta).hists
    except (OSError, ValueError, pa.ArrowException) as err:
        raise FlowscopeError(f"cannot read the flowscope run {str(folder)!r}: {err}") from err
    if scalars is not None:
        records.scalars = scalars.to_pandas()[SCALAR_COLUMNS]
    return records


def read_store_snapshots(
    folder: Path,
    edges: LogEdges,
    filters: list[tuple[str, str, Any]] | None = None,
    counts: bool = True,
) -> Snapshots | None:
    """The snapshots of a run store's parts (``filters`` pushed down; without ``counts``,
    no histograms: ``lin`` and ``log`` of no columns); None when it has no part yet."""
    skip = () if counts else ("linear", "log")
    table = runstore.read(folder, "snapshots", filters, skip=skip)
    return None if table is None else Snapshots.from_table(table, edges, folder.name, counts)


def _load_files(folder: Path) -> Records:
    """A folder of ``stats``/``hists`` Parquet files, or a study config's snapshots."""
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing and (folder / SNAPSHOTS_FILE).is_file():  # one config of a study run
        try:
            snaps, meta = Snapshots.read(folder / SNAPSHOTS_FILE)
        except (OSError, ValueError, pa.ArrowException) as err:
            raise FlowscopeError(
                f"cannot read flowscope snapshots in {str(folder)!r}: {err}"
            ) from err
        return records_from(snaps, meta)
    if missing:
        raise FlowscopeError(
            f"{str(folder)!r} is not a flowscope records folder: missing {', '.join(missing)}"
        )
    try:
        meta = json.loads((folder / "meta.json").read_text())
        stats = pq.read_table(folder / "stats.parquet").to_pandas()
        hists = pq.read_table(folder / "hists.parquet").to_pandas()
        scalars = (
            pq.read_table(folder / SCALARS_FILE).to_pandas()
            if (folder / SCALARS_FILE).is_file()
            else Records(pd.DataFrame(), pd.DataFrame(), {}).scalars  # none, typed
        )
    except (OSError, ValueError, pa.ArrowException) as err:
        raise FlowscopeError(f"cannot read flowscope records in {str(folder)!r}: {err}") from err
    stats, hists = (_with_pass_keys(frame) for frame in (stats, hists))
    absent = [c for c in KEYS + STATS if c not in stats.columns]
    if absent:
        raise FlowscopeError(f"{str(folder / 'stats.parquet')!r} lacks columns {absent}")
    return Records(stats=stats, hists=hists, meta=meta, scalars=scalars)


def records_of(source: Any, who: str = "expected", also: str = "") -> Records:
    """Records from a Records, a Recorder (flushed) or a run folder written by flowscope.

    Example:
        >>> records_of(42)
        Traceback (most recent call last):
        ...
        flowscope.core.errors.FlowscopeError: expected Records, a Recorder or a run folder, got int

    Args:
        source: what to read.
        who: how the error message starts (``"diagnose() takes"``).
        also: more accepted types for the error message (``"a stats DataFrame, "``).
    """
    if isinstance(source, Records):
        return source
    if isinstance(source, str | os.PathLike):
        return load(source)
    if callable(getattr(source, "records", None)):  # a Recorder (frames does not import it)
        records = source.records()
        if isinstance(records, Records):
            return records
    raise FlowscopeError(
        f"{who} {also}Records, a Recorder or a run folder, got {type(source).__name__}"
    )


def _with_pass_keys(frame: pd.DataFrame) -> pd.DataFrame:
    """A frame written before the pass columns, with their one-pass values after ``call``."""
    missing = [c for c in PASS_KEYS if c not in frame.columns]
    if not missing or "call" not in frame.columns:
        return frame
    at = list(frame.columns).index("call") + 1
    for offset, name in enumerate(missing):
        frame.insert(at + offset, name, np.int64(PASS_DEFAULTS[name]))
    return frame
