"""Lazy queries over a run folder: pyarrow's Parquet reader with predicate pushdown (what
``fs.load`` uses) against DuckDB over the same parts (issue 17, item 3).

    python bench/query.py RUN_DIR            # a folder streamed by fs.watch(model, out=...)
    python bench/query.py RUN_DIR --write    # results into bench/results/query.md

Each query reads the same rows and columns and returns an Arrow table (building flowscope's
frames from it costs the same either way, so it is left out); the time is the median of 7
runs with the files in the page cache, and each reader is warmed once first. DuckDB is not a
dependency of flowscope: ``pip install duckdb`` to run this.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COUNTS = ("linear", "log")


def _queries(folder: Path) -> list[tuple[str, list[tuple[str, str, Any]], tuple[str, ...], str]]:
    """(what, pyarrow filters, columns skipped, the same as SQL WHERE)."""
    import pyarrow.parquet as pq

    from flowscope.record import runstore

    first = runstore.part_paths(folder, "snapshots")[0]
    table = pq.read_table(first, columns=["layer", "kind", "step"])
    layer = sorted(set(table["layer"].to_pylist()))[len(set(table["layer"].to_pylist())) // 2]
    last = runstore.last_step(folder)
    lo, hi = last // 2, last // 2 + 99
    return [
        ("every step's statistics, no histograms", [], COUNTS, "TRUE"),
        (
            f"one layer ({layer}), one kind (activation), every step, with histograms",
            [("layer", "==", layer), ("kind", "==", "activation")],
            (),
            f"layer = '{layer}' AND kind = 'activation'",
        ),
        (
            f"100 steps ({lo}..{hi}), every layer and kind, with histograms",
            [("step", ">=", lo), ("step", "<=", hi)],
            (),
            f"step BETWEEN {lo} AND {hi}",
        ),
    ]


def _median_s(fn: Any, runs: int = 7) -> tuple[float, int]:
    fn()
    times, rows = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        rows = fn().num_rows
        times.append(time.perf_counter() - t0)
    return statistics.median(times), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import duckdb
    import pyarrow.parquet as pq

    from flowscope.record import runstore

    folder = args.run
    parts = runstore.part_paths(folder, "snapshots")
    names = pq.ParquetFile(parts[0]).schema_arrow.names
    glob = str(folder / "parts" / "snapshots-*.parquet")
    con = duckdb.connect()
    con.execute(f"SET threads TO {os.cpu_count()}")
    lines = [
        "| query | rows | pyarrow (fs.load's reader) | DuckDB |",
        "|---|---|---|---|",
    ]
    for what, filters, skip, where in _queries(folder):
        cols = ", ".join(f'"{n}"' for n in names if n not in skip)

        def arrow(filters: Any = filters, skip: Any = skip) -> Any:
            return runstore.read(folder, "snapshots", filters, skip=skip)

        def duck(cols: str = cols, where: str = where) -> Any:
            sql = f"SELECT {cols} FROM read_parquet('{glob}') WHERE {where}"
            return con.sql(sql).to_arrow_table()

        t_arrow, n_arrow = _median_s(arrow)
        t_duck, n_duck = _median_s(duck)
        if n_arrow != n_duck:
            raise SystemExit(f"{what}: pyarrow read {n_arrow} rows, DuckDB {n_duck}")
        lines.append(f"| {what} | {n_arrow:,} | {t_arrow * 1e3:.0f} ms | {t_duck * 1e3:.0f} ms |")
    size = sum(p.stat().st_size for p in parts) / 2**20
    head = (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"duckdb {duckdb.__version__}; {len(parts)} parts, {size:.0f} MiB; "
        f"1-minute load average {os.getloadavg()[0]:.1f}; `python bench/query.py RUN_DIR`"
    )
    text = "\n".join(lines)
    print(head + "\n\n" + text)
    if args.write:
        body = f"# Lazy queries over a run folder: pyarrow or DuckDB\n\n{head}\n\n{text}\n"
        (ROOT / "bench" / "results" / "query.md").write_text(body)


if __name__ == "__main__":
    main()
