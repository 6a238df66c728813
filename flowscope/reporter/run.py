"""What a report is made from: a run folder read into :class:`RunData`.

A run folder holds ``fs.watch`` records (``stats``/``hists`` Parquet and ``meta.json``) or a
study run (the same, with config columns, plus ``spec.json``, ``claims.json``,
``configs.json`` and ``probes.parquet``). Records in memory are saved into a folder first.

Example:
    >>> run = read_run(run_dir)  # a study run, e.g. "reports/init-scales"
    >>> run.by, run.files[:2]
    ('config', ['stats.parquet', 'hists.parquet'])
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowscope.core.errors import FlowscopeError
from flowscope.record.frames import Records, expected_passes
from flowscope.record.loading import load, records_of
from flowscope.reporter.plots import group_column

__all__ = ["DATA_FILES", "STUDY_FILES", "RunData", "read_run", "resolve_source"]

STUDY_FILES = ("spec.json", "claims.json", "configs.json", "probes.parquet")
# histograms of at most this many recorded steps (evenly spaced) go into a report: a long
# run's tidy histogram frame (~70 rows per snapshot) would not fit in memory otherwise
HIST_STEPS = 24
DATA_FILES = ("stats.parquet", "hists.parquet", "meta.json", *STUDY_FILES)


@dataclass
class RunData:
    """A run folder's contents: records, plus the study files when it is a study run."""

    folder: Path
    records: Records
    spec: dict[str, Any] | None = None
    claims: list[dict[str, Any]] | None = None
    configs: list[dict[str, Any]] | None = None
    files: list[str] = field(default_factory=list)
    passes_note: str = ""  # what of several passes per step was left out (expected_passes)

    @property
    def by(self) -> str:
        """The grouping column: ``config`` for studies, else ``run``."""
        return group_column(self.records.stats)


def read_run(folder: str | os.PathLike[str]) -> RunData:
    """Load a run folder: ``stats``/``hists``/``meta`` and any study files beside them.

    Example:
        >>> run = read_run(run_dir)  # a study run, e.g. "reports/init-scales"
        >>> run.by, sorted({c["axes"]["init"] for c in run.configs})  # its configs' inits
        ('config', ['small', 'xavier'])

    Raises:
        FlowscopeError: for a folder that is not a flowscope run, or an unreadable JSON file.
    """
    path = Path(folder)
    records = load(path, hist_steps=HIST_STEPS)
    stats, note = expected_passes(records.stats)
    if note:  # several passes per step: the page shows the one a reader expects, and says so
        records = Records(stats, expected_passes(records.hists)[0], records.meta, records.scalars)
    extra: dict[str, Any] = {}
    for name in ("spec.json", "claims.json", "configs.json"):
        if (path / name).is_file():
            try:
                extra[name.removesuffix(".json")] = json.loads((path / name).read_text())
            except (OSError, ValueError) as err:
                raise FlowscopeError(f"cannot read {str(path / name)!r}: {err}") from err
    files = [f for f in DATA_FILES if (path / f).is_file()]
    return RunData(folder=path, records=records, files=files, passes_note=note, **extra)


def resolve_source(source: Any, out_dir: str | os.PathLike[str] | None) -> tuple[RunData, Path]:
    """The run data of ``source`` and the folder its report goes to.

    ``source``: a run folder (the report goes into it, or ``out_dir``; a closed
    ``fs.watch(out=...)`` recorder counts as its folder), or Records / a Recorder, saved
    first into ``out_dir`` (default ``reports/<run name or model class>``).

    Raises:
        FlowscopeError: when ``source`` is none of these, or its files cannot be read.
    """
    if isinstance(getattr(source, "written", None), Path):  # a closed streamed watch
        source = source.written
    if isinstance(source, str | os.PathLike):
        run = read_run(source)
        return run, Path(out_dir) if out_dir is not None else run.folder
    records = records_of(source, "report() takes")
    out = Path(out_dir) if out_dir is not None else Path("reports") / _slug(records)
    records.save(out)
    return read_run(out), out


def _slug(records: Records) -> str:
    """A folder name for in-memory records: the run name or the model's class name."""
    name = str(records.meta.get("run") or records.meta.get("model") or "run")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"
