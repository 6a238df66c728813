"""The run store: a run folder that a training run streams its snapshots into.

Layout (pyarrow only; the tables themselves are made by :mod:`flowscope.record.frames`)::

    DIR/meta.json                        the recorder's metadata, ``"format": FORMAT``
    DIR/parts/snapshots-000000.parquet   one per flush: keys, raw sums, the two histograms
                                         as fixed-size list columns (one row per snapshot)
    DIR/parts/scalars-000000.parquet     one per flush: (step, name, value), the loss and
                                         learning rates of ``rec.step(loss=...)``

A part is written to a temporary name and renamed, so a run killed at any moment leaves
every flushed step readable and no half file under a part's name. A run that opens an
existing store appends after its last step (:func:`last_step`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["FORMAT", "PARTS", "is_run_store", "last_step", "next_part", "part_paths", "read"]

FORMAT = "flowscope-run/1"
PARTS = "parts"
KINDS_OF_PART = ("snapshots", "scalars")
_PART = re.compile(r"^(snapshots|scalars)-(\d{6})\.parquet$")


def is_run_store(folder: Path) -> bool:
    """Whether ``folder`` holds a run store (its ``meta.json`` names the format)."""
    return _format(folder) == FORMAT


def _format(folder: Path) -> str | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("format") if isinstance(meta, dict) else None


def part_paths(folder: Path, kind: str) -> list[Path]:
    """The finished parts of one kind (``snapshots`` or ``scalars``), in flush order."""
    parts = folder / PARTS
    if not parts.is_dir():
        return []
    found = [(m.group(2), p) for p in parts.iterdir() if (m := _PART.match(p.name))]
    return [p for number, p in sorted(found) if p.name.startswith(kind)]


def part_path(folder: Path, kind: str, number: int) -> Path:
    return folder / PARTS / f"{kind}-{number:06d}.parquet"


def next_part(folder: Path) -> int:
    """The number the next flush's parts take."""
    paths = [p for kind in KINDS_OF_PART for p in part_paths(folder, kind)]
    return max((int(p.stem.rsplit("-", 1)[1]) for p in paths), default=-1) + 1


def last_step(folder: Path) -> int:
    """The last step with a snapshot or a scalar in the store; -1 when it has none."""
    last = -1
    for kind in KINDS_OF_PART:
        for path in part_paths(folder, kind):
            meta = pq.ParquetFile(path).metadata
            col = meta.schema.to_arrow_schema().get_field_index("step")
            for g in range(meta.num_row_groups):
                stats = meta.row_group(g).column(col).statistics
                if stats is not None and stats.has_min_max:
                    last = max(last, int(stats.max))
    return last


def read(
    folder: Path,
    kind: str,
    filters: list[tuple[str, str, Any]] | None = None,
    skip: Sequence[str] = (),
) -> pa.Table | None:
    """The parts of one kind as one table, rows matching ``filters`` only (pushed down to
    the row groups' statistics), without the columns named in ``skip``; None when the store
    has no such part."""
    tables = []
    for path in part_paths(folder, kind):
        names = pq.ParquetFile(path).schema_arrow.names
        usable = [f for f in filters or [] if f[0] in names] or None
        columns = [n for n in names if n not in skip] if skip else None
        tables.append(pq.read_table(path, columns=columns, filters=usable))
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="default")
