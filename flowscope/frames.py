"""Tidy frames: the one place where recorded tensors become pandas, and their files.

``stats``: one row per (run, step, layer, kind, call, tensor), one column per statistic.
``hists``: one row per histogram bin, ``hist`` = "linear" (every bin, over the snapshot's own
finite range) or "log" (non-empty bins on the fixed log-magnitude edges).
Both are saved as Parquet with flowscope's metadata in the file, and ``meta.json`` beside.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from flowscope.columns import EXTRA, HIST_COLUMNS, KEYS, STATS
from flowscope.errors import FlowscopeError
from flowscope.stats import RAW, HistSpec, LogEdges

META_KEY = b"flowscope"
FILES = ("stats.parquet", "hists.parquet", "meta.json")


@dataclass
class Records:
    """Frames and metadata of one recording (or one study config)."""

    stats: pd.DataFrame
    hists: pd.DataFrame
    meta: dict[str, Any]

    def _repr_html_(self) -> str:
        """Jupyter: per-layer table at the last step (:func:`flowscope.notebook.records_html`)."""
        from flowscope.notebook import records_html

        return records_html(self)

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write the three files into ``out_dir`` atomically (temporary file, then rename)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_parquet(self.stats, out / "stats.parquet", self.meta)
        write_parquet(self.hists, out / "hists.parquet", self.meta)
        atomic_write_text(out / "meta.json", json.dumps(self.meta, indent=2, default=str))
        return out


def load(run_dir: str | os.PathLike[str]) -> Records:
    """Read a folder written by ``Recorder.save`` / ``Records.save``.

    Example:
        >>> rec = load("reports/my-model")  # doctest: +SKIP
        >>> rec.stats.query("kind == 'gradient'")  # doctest: +SKIP

    Raises:
        FlowscopeError: when the folder or one of its files is missing or not flowscope's.
    """
    folder = Path(run_dir)
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise FlowscopeError(
            f"{str(folder)!r} is not a flowscope records folder: missing {', '.join(missing)}"
        )
    try:
        meta = json.loads((folder / "meta.json").read_text())
        stats = pq.read_table(folder / "stats.parquet").to_pandas()
        hists = pq.read_table(folder / "hists.parquet").to_pandas()
    except (OSError, ValueError, pa.ArrowException) as err:
        raise FlowscopeError(f"cannot read flowscope records in {str(folder)!r}: {err}") from err
    absent = [c for c in KEYS + STATS if c not in stats.columns]
    if absent:
        raise FlowscopeError(f"{str(folder / 'stats.parquet')!r} lacks columns {absent}")
    return Records(stats=stats, hists=hists, meta=meta)


def records_of(source: Any, who: str = "expected", also: str = "") -> Records:
    """Records from a Records, a Recorder (flushed) or a run folder written by flowscope.

    Example:
        >>> records_of(42)
        Traceback (most recent call last):
        ...
        flowscope.errors.FlowscopeError: expected Records, a Recorder or a run folder, got int

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


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves the old file or the new, never half."""
    with _atomic(path) as tmp:
        Path(tmp).write_text(text)


def write_parquet(frame: pd.DataFrame, path: Path, meta: dict[str, Any]) -> None:
    """Parquet with flowscope's metadata in the schema, written atomically."""
    # pyarrow's conversion thread pool costs more than it saves below ~10^5-10^6 rows
    threads = 1 if len(frame) < 500_000 else None
    table = pa.Table.from_pandas(frame, preserve_index=False, nthreads=threads)
    merged = {**(table.schema.metadata or {}), META_KEY: json.dumps(meta, default=str).encode()}
    with _atomic(path) as tmp:
        pq.write_table(table.replace_schema_metadata(merged), tmp)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: flipping it per write would race other threads


class _atomic:
    """Context manager yielding a temporary path in the target's folder, renamed on success."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> str:
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        os.close(fd)
        return self.tmp

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            with open(self.tmp, "rb") as f:  # on disk before the name points at it
                os.fsync(f.fileno())
            os.chmod(self.tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; files are for sharing
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.unlink(self.tmp)


def build_records(
    host: Sequence[tuple[list[Any], np.ndarray, np.ndarray, np.ndarray]],
    spec: HistSpec,
    meta: dict[str, Any],
    run: str,
) -> Records:
    """Frames from the recorder's host buffers: (keys, raw, linear counts, log counts) chunks."""
    keys = [k for chunk in host for k in chunk[0]]
    if not keys:
        return Records(_empty_stats(), pd.DataFrame(columns=KEYS + HIST_COLUMNS), meta)
    raw = np.concatenate([c[1] for c in host])
    lin = np.concatenate([c[2] for c in host])
    log = np.concatenate([c[3] for c in host])
    index = _key_frame(keys, run)
    key_columns = index[KEYS]
    stats = pd.concat([key_columns, moments(raw), index[["dtype", "device"]]], axis=1)
    stats["hist_stride"] = raw[:, RAW["stride"]].astype(np.int64)
    # linear then log bins, keys taken once for both (one take, one frame of bin columns)
    lin_rows, lin_cols = _linear_bin_columns(raw, lin)
    log_rows, log_cols = _log_bin_columns(log, spec.log)
    rows = np.concatenate([lin_rows, log_rows])
    kinds = np.array(["linear", "log"], dtype=object)
    bins = {
        "hist": np.repeat(kinds, [len(lin_rows), len(log_rows)]),
        **{c: np.concatenate([lin_cols[c], log_cols[c]]) for c in lin_cols},
    }
    hists = pd.concat([key_columns.take(rows).reset_index(drop=True), pd.DataFrame(bins)], axis=1)
    return Records(stats=stats, hists=hists, meta={**meta, "run": run})


def _key_frame(keys: Sequence[Any], run: str) -> pd.DataFrame:
    """One row per snapshot key (``SnapKey``): ``run``, its fields, in field order."""
    columns = {name: [getattr(k, name) for k in keys] for name in keys[0]._fields}
    return pd.DataFrame({"run": [run] * len(keys), **columns})


def _empty_stats() -> pd.DataFrame:
    return pd.DataFrame(columns=KEYS + STATS + EXTRA)


def moments(raw: np.ndarray) -> pd.DataFrame:
    """The statistics columns from raw snapshot vectors (rows of ``stats.RAW_FIELDS``)."""
    col = {name: raw[:, i] for name, i in RAW.items()}
    n = col["numel"]
    finite = n - col["nonfinite"]
    with np.errstate(invalid="ignore", divide="ignore"):
        d_mean = col["sum"] / finite
        var = np.maximum(col["sumsq"] / finite - d_mean**2, 0.0)
        mean = col["shift"] + d_mean
        lo = col["shift"] + col["min"]
        hi = col["shift"] + col["max"]
        out = {
            "count": n.astype(np.int64),
            "nan": col["nan"].astype(np.int64),
            "inf": (col["nonfinite"] - col["nan"]).astype(np.int64),
            "mean": mean,
            "std": np.sqrt(var),
            "rms": np.sqrt(var + mean**2),
            "min": lo,
            "max": hi,
            "absmax": np.maximum(np.abs(lo), np.abs(hi)),
            "frac_zero": (n - col["nonzero"]) / finite,
            "frac_saturated": col["saturated"] / finite,
        }
    return pd.DataFrame(out)


def _linear_bin_columns(raw: np.ndarray, lin: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """(snapshot row of each linear bin, its bin / lo / hi / count columns)."""
    snaps, bins = lin.shape
    lo = raw[:, RAW["shift"]] + raw[:, RAW["min"]]
    width = (raw[:, RAW["max"]] - raw[:, RAW["min"]]) / bins
    b = np.tile(np.arange(bins), snaps)
    rows = np.repeat(np.arange(snaps), bins)
    return rows, {
        "bin": b,
        "lo": lo[rows] + b * width[rows],
        "hi": lo[rows] + (b + 1) * width[rows],
        "count": lin.reshape(-1),
    }


def _log_bin_columns(log: np.ndarray, edges: LogEdges) -> tuple[np.ndarray, dict[str, Any]]:
    """(snapshot row of each non-empty log bin, its bin / lo / hi / count columns)."""
    rows, b = np.nonzero(log)
    bounds = _log_bounds(edges)
    return rows, {"bin": b, "lo": bounds[b, 0], "hi": bounds[b, 1], "count": log[rows, b]}


@functools.lru_cache(maxsize=8)
def _log_bounds(edges: LogEdges) -> np.ndarray:
    """(lo, hi) of every bin of ``edges``; read-only (shared between calls)."""
    bounds = np.array([edges.bounds(i) for i in range(edges.size)])
    bounds.flags.writeable = False
    return bounds


def log_edges_of(meta: dict[str, Any]) -> LogEdges:
    """The log-histogram edges a recording used, from its metadata."""
    lo, hi, per_decade = meta.get("log_edges", (-30, 30, 1))
    return LogEdges(lo=int(lo), hi=int(hi), per_decade=int(per_decade))
