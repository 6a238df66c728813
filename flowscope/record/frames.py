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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from flowscope.core.columns import EXTRA, HIST_COLUMNS, KEYS, PASS_DEFAULTS, PASS_KEYS, STATS
from flowscope.core.errors import FlowscopeError
from flowscope.record import runstore
from flowscope.record.snapshot import RAW, HistSpec, LogEdges

META_KEY = b"flowscope"
FILES = ("stats.parquet", "hists.parquet", "meta.json")
SNAPSHOTS_FILE = "snapshots.parquet"  # a study config's folder (see Snapshots)
# the key columns of a snapshot: ``run``, then the fields of ``recorder.SnapKey``
SNAP_KEYS = [*KEYS, "dtype", "device"]
INT_KEYS = frozenset({"step", "layer_idx", "call", *PASS_KEYS})
# the scalars of a training run (``rec.step(loss=...)``, learning rates): one row per value
SCALAR_COLUMNS = ["run", "step", "name", "value"]
SCALARS_FILE = "scalars.parquet"


def _no_scalars() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run": pd.Series(dtype=object),
            "step": pd.Series(dtype=np.int64),
            "name": pd.Series(dtype=object),
            "value": pd.Series(dtype=np.float64),
        }
    )


@dataclass
class Records:
    """Frames and metadata of one recording (or one study config); ``scalars``: the loss and
    learning rate per step of a training run (columns ``SCALAR_COLUMNS``), empty without."""

    stats: pd.DataFrame
    hists: pd.DataFrame
    meta: dict[str, Any]
    scalars: pd.DataFrame = field(default_factory=_no_scalars)

    def _repr_html_(self) -> str:
        """Jupyter: the view registered for records (:mod:`flowscope.record.display`)."""
        from flowscope.record import display

        return display.html("records", self)

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write the three files into ``out_dir`` atomically (temporary file, then rename)."""
        out = Path(out_dir)
        if runstore.is_run_store(out):  # its meta.json would be replaced, its parts hidden
            raise FlowscopeError(
                f"{str(out)!r} is the folder of a streamed run (fs.watch(out=...)): its records"
                " are its parts; close the watch and read or report the folder, or save into"
                " another folder"
            )
        out.mkdir(parents=True, exist_ok=True)
        write_parquet(self.stats, out / "stats.parquet", self.meta)
        write_parquet(self.hists, out / "hists.parquet", self.meta)
        if len(self.scalars):
            write_parquet(self.scalars, out / SCALARS_FILE, self.meta)
        atomic_write_text(out / "meta.json", json.dumps(self.meta, indent=2, default=str))
        return out


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
    # dictionary pages for keys (names, kinds, steps) only: measured floats (bounds, counts,
    # moments) are mostly distinct, and trying them cost 25 % more time for a larger file
    keys = [f.name for f in table.schema if not pa.types.is_floating(f.type)]
    with _atomic(path) as tmp:
        pq.write_table(table.replace_schema_metadata(merged), tmp, use_dictionary=keys)


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


@dataclass
class Snapshots:
    """Snapshots on the host before they become frames, one row each: key columns
    (``SNAP_KEYS``), raw statistics (``stats.RAW_FIELDS``), linear counts, log counts on
    ``edges``.

    The study engine saves each config in this form (one small Parquet file, no pandas) and
    builds the frames of all its configs at once when it merges: per config, building and
    writing two frames cost ~15 ms against ~3 ms for this.
    """

    keys: dict[str, np.ndarray]
    raw: np.ndarray
    lin: np.ndarray
    log: np.ndarray
    edges: LogEdges

    def __len__(self) -> int:
        return len(self.raw)

    @classmethod
    def of(
        cls,
        host: Sequence[tuple[list[Any], np.ndarray, np.ndarray, np.ndarray]],
        spec: HistSpec,
        run: str,
    ) -> Snapshots:
        """From the recorder's host buffers: (``SnapKey`` list, raw, linear, log) chunks."""
        keys = [k for chunk in host for k in chunk[0]]
        if keys and list(keys[0]._fields) != SNAP_KEYS[1:]:
            raise AssertionError(f"SnapKey fields {keys[0]._fields} != {SNAP_KEYS[1:]}")
        fields = list(zip(*keys, strict=True)) or [()] * (len(SNAP_KEYS) - 1)
        columns = {"run": np.full(len(keys), run, dtype=object)}
        for name, values in zip(SNAP_KEYS[1:], fields, strict=True):
            columns[name] = np.array(values, dtype=np.int64 if name in INT_KEYS else object)
        widths = (len(RAW), spec.bins, spec.log.size)
        raw, lin, log = (
            np.concatenate([c[i + 1] for c in host]) if host else np.zeros((0, w))
            for i, w in enumerate(widths)
        )
        return cls(columns, raw, lin, log, spec.log)

    @classmethod
    def concat(cls, parts: Sequence[Snapshots]) -> Snapshots:
        """One under the other (same histogram layout)."""
        first = parts[0]
        if any(p.lin.shape[1] != first.lin.shape[1] or p.edges != first.edges for p in parts):
            raise ValueError("snapshots with different histogram layouts cannot be stacked")
        return cls(
            {k: np.concatenate([p.keys[k] for p in parts]) for k in first.keys},
            np.concatenate([p.raw for p in parts]),
            np.concatenate([p.lin for p in parts]),
            np.concatenate([p.log for p in parts]),
            first.edges,
        )

    @property
    def layout(self) -> tuple[int, LogEdges]:
        """What must agree for two sets of snapshots to share frames' bin columns."""
        return self.lin.shape[1], self.edges

    def save(self, path: Path, meta: dict[str, Any]) -> None:
        """One Parquet file (written atomically): keys, raw fields, and the two histograms as
        fixed-size lists; ``meta`` (with the log edges) in the schema."""
        columns: dict[str, Any] = {k: pa.array(v) for k, v in self.keys.items()}
        columns.update({name: self.raw[:, i] for name, i in RAW.items()})
        for name, counts in (("linear", self.lin), ("log", self.log)):
            flat = pa.array(np.ascontiguousarray(counts).reshape(-1))
            columns[name] = pa.FixedSizeListArray.from_arrays(flat, counts.shape[1])
        meta = {**meta, "log_edges": [self.edges.lo, self.edges.hi, self.edges.per_decade]}
        table = pa.table(columns).replace_schema_metadata(
            {META_KEY: json.dumps(meta, default=str).encode()}
        )
        # dictionary pages on every column and zstd: histogram counts repeat a lot (most log
        # bins are 0, neighbouring linear bins alike), and a 50-step part of a 20-layer MLP
        # measured 0.90 MB this way against 2.27 MB with dictionaries on the keys only and
        # snappy, in the same write time (35 ms)
        with _atomic(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")

    @classmethod
    def read(cls, path: Path) -> tuple[Snapshots, dict[str, Any]]:
        """What :meth:`save` wrote, and its metadata."""
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
        return cls.from_table(table, log_edges_of(meta), path.name), meta

    @classmethod
    def from_table(
        cls, table: pa.Table, edges: LogEdges, name: str, counts: bool = True
    ) -> Snapshots:
        """The snapshots in a table :meth:`save` wrote (or several, concatenated); without
        ``counts``, a table read without the histogram columns (``lin`` and ``log`` then
        have no columns)."""
        hists = ["linear", "log"] if counts else []
        need = [c for c in [*SNAP_KEYS, *RAW, *hists] if c not in PASS_DEFAULTS]
        missing = [c for c in need if c not in table.column_names]
        if missing:
            raise ValueError(f"{name} lacks columns {missing}")
        keys = {
            k: _key_column(table[k])
            if k in table.column_names
            else np.full(len(table), PASS_DEFAULTS[k], dtype=np.int64)  # written before them
            for k in SNAP_KEYS
        }
        raw = np.column_stack([table[name].to_numpy() for name in RAW]).reshape(-1, len(RAW))
        bins = [np.zeros((len(table), 0)), np.zeros((len(table), 0))]
        for i, hist in enumerate(hists):
            lists = table[hist].combine_chunks()
            width = lists.type.list_size
            bins[i] = lists.flatten().to_numpy().reshape(len(table), width)
        return cls(keys, raw, bins[0], bins[1], edges)

    def write_part(self, folder: Path, number: int, meta: dict[str, Any]) -> None:
        """This flush's part of a run store (:mod:`flowscope.record.runstore`)."""
        path = runstore.part_path(folder, "snapshots", number)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.save(path, meta)


def _key_column(column: pa.ChunkedArray) -> np.ndarray:
    """A key column as numpy; strings as one Python object per distinct value (a long run
    repeats a few dozen names over 10^5-10^6 rows: one str per row cost ~60 bytes each)."""
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        return column.to_numpy(zero_copy_only=False)
    coded = column.combine_chunks().dictionary_encode()
    names = coded.dictionary.to_numpy(zero_copy_only=False)
    return names[coded.indices.to_numpy(zero_copy_only=False)]


def write_scalars_part(
    folder: Path, number: int, run: str, steps: Sequence[int], names: Sequence[str], values: Any
) -> None:
    """This flush's scalars (loss, learning rates) as a part of a run store."""
    table = pa.table(
        {
            "run": pa.array([run] * len(steps), pa.string()),
            "step": pa.array(steps, pa.int64()),
            "name": pa.array(names, pa.string()),
            "value": pa.array(values, pa.float64()),
        }
    )
    path = runstore.part_path(folder, "scalars", number)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic(path) as tmp:
        pq.write_table(table, tmp)


def records_from(
    snaps: Snapshots,
    meta: dict[str, Any],
    front: pd.DataFrame | None = None,
    binned: np.ndarray | None = None,
) -> Records:
    """The stats and hists frames of ``snaps``; ``front``: columns to lead both frames with,
    one row per snapshot (the study engine's config columns); ``binned``: which snapshots
    (a boolean mask) get histogram rows, default all."""
    if not len(snaps):
        head = [] if front is None else list(front.columns)
        hists = pd.DataFrame(columns=[*head, *KEYS, *HIST_COLUMNS])
        return Records(pd.DataFrame(columns=[*head, *KEYS, *STATS, *EXTRA]), hists, meta)
    keys = pd.DataFrame(snaps.keys, columns=SNAP_KEYS)
    if front is not None:
        front = front.reset_index(drop=True)  # row i leads snapshot i, whatever its label
    key_columns = keys[KEYS] if front is None else pd.concat([front, keys[KEYS]], axis=1)
    raw = snaps.raw
    stats = pd.concat([key_columns, moments(raw), keys[["dtype", "device"]]], axis=1)
    stats["hist_stride"] = raw[:, RAW["stride"]].astype(np.int64)
    # linear then log bins, keys taken once for both (one take, one frame of bin columns)
    which = np.arange(len(snaps)) if binned is None else np.flatnonzero(binned)
    lin_rows, lin_cols = _linear_bin_columns(raw[which], snaps.lin[which])
    log_rows, log_cols = _log_bin_columns(snaps.log[which], snaps.edges)
    lin_rows, log_rows = which[lin_rows], which[log_rows]
    rows = np.concatenate([lin_rows, log_rows])
    kinds = np.array(["linear", "log"], dtype=object)
    bins = {
        "hist": np.repeat(kinds, [len(lin_rows), len(log_rows)]),
        **{c: np.concatenate([lin_cols[c], log_cols[c]]) for c in lin_cols},
    }
    hists = pd.concat([key_columns.take(rows).reset_index(drop=True), pd.DataFrame(bins)], axis=1)
    return Records(stats=stats, hists=hists, meta=meta)


def expected_passes(stats: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The rows a reader of one pass per step expects, and a sentence saying what was left out
    (the doctor and the report read these; ``stats`` or ``hists`` frames).

    With gradient accumulation, ``retain_graph`` or a gradient penalty a step holds several
    passes (columns ``forward``, ``backward``, ``order``). Kept: every activation and weight
    row (all micro-batches); ``gradient`` rows of order 1 (dL/dh, not a gradient penalty's
    backward through a ``create_graph`` graph); per parameter the ``weight_grad`` row of the
    last backward of the step (the accumulated gradient the optimizer applies). A one-pass
    frame comes back unchanged, with an empty sentence.

    Example:
        >>> frame = pd.DataFrame({"step": [0, 0], "layer": ["0", "0"], "kind": ["weight_grad"] * 2,
        ...                       "tensor": ["weight"] * 2, "backward": [0, 1], "order": [1, 1]})
        >>> rows, note = expected_passes(frame)
        >>> rows["backward"].tolist()
        [1]
        >>> note.split(", ")[-1]
        '1 earlier row left out'
    """
    if "backward" not in stats.columns or "order" not in stats.columns or stats.empty:
        return stats, ""
    kind = stats["kind"]
    second = (kind == "gradient") & (stats["order"] > 1)
    wgrad = kind == "weight_grad"
    earlier = pd.Series(False, index=stats.index)
    if wgrad.any():
        rows = stats[wgrad]
        by = [c for c in rows.columns if c not in {*STATS, *EXTRA, *PASS_KEYS, *HIST_COLUMNS}]
        last = rows.groupby(by, sort=False, dropna=False)["backward"].transform("max")
        earlier.loc[rows.index] = rows["backward"] < last
    notes = []
    if second.any():
        notes.append(
            f"gradients dL/dh: first order only, {int(second.sum())} rows of backward passes"
            " after a create_graph backward (a gradient penalty's) left out"
        )
    if earlier.any():
        notes.append(
            "weight gradients: the last backward pass of each step (the accumulated gradient),"
            f" {int(earlier.sum())} earlier row{'s' if earlier.sum() > 1 else ''} left out"
        )
    if not notes:
        return stats, ""
    return stats[~(second | earlier)].reset_index(drop=True), "; ".join(notes)


def moments(raw: np.ndarray) -> pd.DataFrame:
    """The statistics columns from raw snapshot vectors (rows of ``stats.RAW_FIELDS``)."""
    col = {name: raw[:, i] for name, i in RAW.items()}
    n = col["numel"]
    finite = n - col["nonfinite"]
    scale = col["scale"]  # a power of two: the sums are of (x - shift) / scale
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        d_mean = col["sum"] / finite
        var = np.maximum(col["sumsq"] / finite - d_mean**2, 0.0)  # of x / scale
        mean = scale * (col["shift"] / scale + d_mean)  # no overflow: scale is a power of 2
        lo, hi = col["min"], col["max"]
        out = {
            "count": n.astype(np.int64),
            "nan": col["nan"].astype(np.int64),
            "inf": (col["nonfinite"] - col["nan"]).astype(np.int64),
            "mean": mean,
            "std": scale * np.sqrt(var),
            "rms": scale * np.sqrt(var + (mean / scale) ** 2),
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
    lo = raw[:, RAW["min"]]
    width = raw[:, RAW["max"]] / bins - lo / bins  # finite up to float64's limits
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
