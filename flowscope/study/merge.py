"""Merging a study's finished configs into the run folder's top-level files.

Every finished config's snapshots are stacked and the frames of all configs built once, each
row led by its config's columns; the probes concatenated; the claims checked; the files
written (``stats``, ``hists`` and ``probes.parquet`` on a thread while the claims run;
``configs.json``, ``claims.json``, ``meta.json``). Configs run by this process are merged
from memory; only those finished by an earlier run are read back from their folders.
"""

from __future__ import annotations

import json
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from flowscope.core.columns import PROBE_COLUMNS
from flowscope.core.errors import FlowscopeError
from flowscope.record import frames
from flowscope.record.snapshot import HistSpec
from flowscope.study.claims import Verdict, evaluate
from flowscope.study.spec import Study

__all__ = [
    "DONE_KEYS",
    "ConfigResult",
    "StudyResult",
    "concat_configs",
    "load_config",
    "merge",
    "probes_of",
]


@dataclass
class StudyResult:
    """What ``run_study`` leaves: the folder, merged frames and the claims' verdicts."""

    out_dir: Path
    stats: pd.DataFrame
    hists: pd.DataFrame
    probes: pd.DataFrame
    configs: list[dict[str, Any]]
    claims: list[Verdict]
    ran: int  # configs run now (the rest were finished before)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [c for c in self.configs if c["status"] == "failed"]


@dataclass
class ConfigResult:
    """One finished config as its folder holds it: done.json, snapshots (None: failed),
    probes."""

    done: dict[str, Any]
    snapshots: frames.Snapshots | None
    probes: pd.DataFrame


def merge(
    study: Study, out: Path, ran: int = 0, finished: dict[str, ConfigResult] | None = None
) -> StudyResult:
    """Merge the finished configs into the folder's top-level files and check the claims.

    ``finished``: configs run by this process, by id, merged as they are; every other config
    with a ``done.json`` is read from its folder.
    """
    snapshots: list[tuple[frames.Snapshots, pd.DataFrame]] = []  # (snapshots, config columns)
    probes: list[tuple[pd.DataFrame, pd.DataFrame]] = []
    statuses = []
    configs = study.configs()
    for config in configs:
        folder = out / "configs" / config.id
        if finished and config.id in finished:
            mine = finished[config.id]
            done, snaps, probe = mine.done, mine.snapshots, mine.probes
        elif (folder / "done.json").is_file():
            done, snaps, probe = load_config(folder)
        else:
            continue
        statuses.append({k: v for k, v in done.items() if k != "probes"})  # in probes_df
        columns = pd.DataFrame(index=range(1)).assign(**config.columns())  # one row
        if snaps is not None:
            snapshots.append((snaps, columns))
        probes.append((probe, columns))
    stats_df, hists_df = _frames(snapshots, ["config", *study.axis_columns, "seed"])
    probes_df = concat_configs(probes, study, PROBE_COLUMNS)
    meta = _meta(study, statuses, len(configs))
    # Parquet encoding releases the GIL: the frames are written while the claims are checked
    files = {"hists.parquet": hists_df, "stats.parquet": stats_df, "probes.parquet": probes_df}
    with ThreadPoolExecutor(max_workers=1) as writer:
        written = [
            writer.submit(frames.write_parquet, frame, out / name, meta)
            for name, frame in files.items()
        ]
        verdicts = evaluate(study.claims, stats_df, probes_df, study.axis_columns)
        for future in written:
            future.result()  # a failed write raises here
    frames.atomic_write_text(out / "configs.json", json.dumps(statuses, indent=2, default=str))
    claims_json = json.dumps([v.to_dict() for v in verdicts], indent=2, default=str)
    frames.atomic_write_text(out / "claims.json", claims_json)
    frames.atomic_write_text(out / "meta.json", json.dumps(meta, indent=2, default=str))
    return StudyResult(out, stats_df, hists_df, probes_df, statuses, verdicts, ran)


DONE_KEYS = ("config", "status", "error", "seconds", "device", "probes")


def load_config(folder: Path) -> tuple[dict[str, Any], frames.Snapshots | None, pd.DataFrame]:
    """A finished config's done.json, snapshots and probes; a clear error when it is damaged."""
    try:
        done = json.loads((folder / "done.json").read_text())
        if isinstance(done, dict) and "probes" not in done and (folder / "stats.parquet").exists():
            raise ValueError("written by an earlier flowscope, which kept frames per config")
        if not isinstance(done, dict) or not all(k in done for k in DONE_KEYS):
            raise ValueError(f"done.json lacks {', '.join(DONE_KEYS)}")
        probes = probes_of(done)
        snaps = None
        if done["status"] != "failed":
            if not (folder / frames.SNAPSHOTS_FILE).is_file():
                raise ValueError(f"missing {frames.SNAPSHOTS_FILE}")
            snaps = frames.Snapshots.read(folder / frames.SNAPSHOTS_FILE)[0]
    except (OSError, ValueError) as err:  # pyarrow's errors are ValueErrors or OSErrors
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FlowscopeError(
            f"config folder {str(folder)!r} is damaged ({first}); delete that folder to rerun"
            " the config, or use --fresh"
        ) from err
    return done, snaps, probes


def probes_of(done: dict[str, Any]) -> pd.DataFrame:
    """The probe rows of a config's done.json as a frame (probe, step, layer, value)."""
    rows = done["probes"]
    if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == 4 for r in rows):
        raise ValueError("done.json: probes is not a list of [probe, step, layer, value]")
    return pd.DataFrame(rows, columns=PROBE_COLUMNS)


def _frames(
    parts: list[tuple[frames.Snapshots, pd.DataFrame]], config_columns: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The stats and hists frames of every config at once, each row led by its config's
    columns (``parts``: snapshots, their config's columns as one row). Configs whose
    histograms differ in layout (a swept ``run.bins``) are built group by group."""
    if not parts:
        no_snapshots = frames.Snapshots.of([], HistSpec(), "")
        empty = frames.records_from(no_snapshots, {}, pd.DataFrame(columns=config_columns))
        return empty.stats, empty.hists
    groups: dict[Any, list[int]] = {}
    for i, (snaps, _) in enumerate(parts):
        groups.setdefault(snaps.layout, []).append(i)
    built = []
    for members in groups.values():
        snaps = frames.Snapshots.concat([parts[i][0] for i in members])
        ones = pd.concat([parts[i][1] for i in members], ignore_index=True)[config_columns]
        owner = np.repeat(np.arange(len(members)), [len(parts[i][0]) for i in members])
        built.append(frames.records_from(snaps, {}, ones.take(owner)))
    if len(built) == 1:
        return built[0].stats, built[0].hists
    return (
        pd.concat([r.stats for r in built], ignore_index=True),
        pd.concat([r.hists for r in built], ignore_index=True),
    )


def concat_configs(
    parts: list[tuple[pd.DataFrame, pd.DataFrame]], study: Study, base: list[str]
) -> pd.DataFrame:
    """The configs' frames one under the other, each row led by its config's columns.

    ``parts``: (frame, its config's columns as one row). The one-row frames are concatenated
    (an empty frame's as no row) and repeated over the rows: the values and dtypes that
    assigning the columns to every frame before the concat gives, without building them
    once per frame.
    """
    config_columns = ["config", *study.axis_columns, "seed"]
    if not parts:
        return pd.DataFrame(columns=[*config_columns, *base])
    merged = pd.concat([frame for frame, _ in parts], ignore_index=True)
    ones = pd.concat([one.iloc[: min(len(f), 1)] for f, one in parts], ignore_index=True)
    repeat = np.repeat(np.arange(len(ones)), [len(f) for f, _ in parts if len(f)])
    front = ones[config_columns].take(repeat).set_axis(merged.index)
    rest = [c for c in merged.columns if c not in config_columns]
    return pd.concat([front, merged[rest]], axis=1)


def _meta(study: Study, statuses: list[dict[str, Any]], configs: int) -> dict[str, Any]:
    return {
        "study": study.name,
        "title": study.title,
        "source": study.source,
        "config_columns": ["config", *study.axis_columns, "seed"],
        "configs": configs,
        "finished": len(statuses),
        "failed": sum(s["status"] == "failed" for s in statuses),
        "diverged": sum(s["status"] == "diverged" for s in statuses),
        "seconds": round(sum(s["seconds"] for s in statuses), 3),
        "devices": sorted({s["device"] for s in statuses}),
        "dtype": study.run["dtype"],
        "flowscope": _flowscope_version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "written": time.time(),
    }


def _flowscope_version() -> str:
    from flowscope import __version__

    return __version__
