"""Run folders: atomic writes, resume after a crash, clear errors for damaged or foreign
folders (through ``fs.load`` and ``flowscope study run --out``), concurrent runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import flowscope as fs
from conftest import TINY_STUDY
from flowscope.cli.main import main
from flowscope.core.errors import FlowscopeError
from flowscope.record import frames
from flowscope.study import engine, spec

STUDY = {**TINY_STUDY, "run": {"seeds": [0], "probes": ["dead_units"]}}


@pytest.fixture
def study_file(write_study) -> Path:
    return write_study(STUDY, "tiny.toml")


def recorded() -> fs.Recorder:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    with fs.watch(model, name="demo") as rec:
        model(torch.randn(8, 4)).sum().backward()
    return rec


def half_written(monkeypatch: pytest.MonkeyPatch, then: str = "raise") -> None:
    """Make Parquet writes stop half way: write half the bytes, then fail (or die)."""
    real = pq.write_table

    def broken(table, where, **kwargs):
        real(table, where, **kwargs)
        data = Path(where).read_bytes()
        Path(where).write_bytes(data[: len(data) // 2])
        if then == "die":
            os._exit(9)  # like a SIGKILL: no finally, no cleanup
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(frames.pq, "write_table", broken)


def no_temporaries(folder: Path) -> bool:
    return not [p.name for p in folder.rglob(".*") if p.is_file()]


# -- atomic writes -----------------------------------------------------------------------------


def test_parquet_write_failing_half_way_leaves_no_file(tmp_path, monkeypatch):
    rec = recorded()
    half_written(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        rec.save(tmp_path / "run")
    monkeypatch.undo()
    assert not (tmp_path / "run" / "stats.parquet").exists()
    assert no_temporaries(tmp_path)
    with pytest.raises(FlowscopeError, match=r"missing stats\.parquet"):
        fs.load(tmp_path / "run")


def test_parquet_rewrite_failing_half_way_keeps_the_old_file(tmp_path, monkeypatch):
    rec = recorded()
    rec.save(tmp_path / "run")
    before = fs.load(tmp_path / "run").stats
    half_written(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        rec.save(tmp_path / "run")
    monkeypatch.undo()
    pd.testing.assert_frame_equal(fs.load(tmp_path / "run").stats, before)
    assert no_temporaries(tmp_path)


KILLED = """
import sys, pytest
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_reliability_run_folders import half_written
from flowscope.study import engine
from flowscope.study import spec
mp = pytest.MonkeyPatch()
real = engine.run_config
def second_config_dies(study, config, folder, device=None):
    if config.index == 1:
        half_written(mp, then="die")
    return real(study, config, folder, device)
engine.run_config = second_config_dies
engine.run_study(spec.load({study!r}), {out!r})
"""


def test_process_killed_mid_write_then_resumed(tmp_path, study_file):
    """A process killed inside a Parquet write: the folder holds no file that reads as valid
    Parquet under a final name, and the rerun redoes exactly the unfinished config."""
    out = tmp_path / "run"
    code = KILLED.format(tests=str(Path(__file__).parent), study=str(study_file), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    first, second = sorted((out / "configs").iterdir())
    assert (first / "done.json").is_file()
    assert not (second / "done.json").exists() and not (second / "snapshots.parquet").exists()
    leftovers = [p for p in second.iterdir() if p.name.startswith(".snapshots.parquet.")]
    assert len(leftovers) == 1  # the half file, under a hidden temporary name
    with pytest.raises(Exception):  # noqa: B017 -- any pyarrow error: it is not valid Parquet
        pq.read_table(leftovers[0])
    resumed = engine.run_study(spec.load(str(study_file)), out)
    assert resumed.ran == 1 and [c["status"] for c in resumed.configs] == ["done", "done"]
    clean = engine.run_study(spec.load(str(study_file)), tmp_path / "clean")
    cols = ["config", "layer", "kind", "tensor", "mean", "std"]
    pd.testing.assert_frame_equal(resumed.stats[cols], clean.stats[cols])


def test_config_folder_with_partial_files_and_no_done_json_is_redone(tmp_path, study_file):
    study = spec.load(str(study_file))
    first = engine.run_study(study, tmp_path)
    folder = tmp_path / "configs" / first.configs[1]["config"]
    (folder / "done.json").unlink()
    (folder / "snapshots.parquet").write_bytes(b"PAR1 half")
    again = engine.run_study(study, tmp_path)
    assert again.ran == 1
    pd.testing.assert_frame_equal(again.stats, first.stats)
    pd.testing.assert_frame_equal(again.probes, first.probes)


# -- damaged and foreign folders ---------------------------------------------------------------


def run_cli(*args: str):
    result = CliRunner().invoke(main, ["study", "run", *args, "--no-report"])
    lines = result.output.strip().splitlines()
    return result, lines


def one_error_line(result, lines: list[str]) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    return errors[0]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:10])


def _earlier_flowscope(done: Path) -> None:
    """A config folder as flowscope wrote it before snapshots.parquet: frames, no probes."""
    record = json.loads(done.read_text())
    del record["probes"]
    done.write_text(json.dumps(record))
    (done.parent / "snapshots.parquet").rename(done.parent / "stats.parquet")


DAMAGE = {
    "done.json truncated": ("configs/{c}/done.json", _truncate, "damaged"),
    "done.json a list": ("configs/{c}/done.json", lambda p: p.write_text("[]"), "lacks"),
    "done.json probes garbage": (
        "configs/{c}/done.json",
        lambda p: p.write_text(p.read_text().replace('"probes": [', '"probes": [7, ')),
        "probes is not a list",
    ),
    "snapshots.parquet garbage": ("configs/{c}/snapshots.parquet", _truncate, "damaged"),
    "snapshots.parquet missing": (
        "configs/{c}/snapshots.parquet",
        Path.unlink,
        "missing snapshots",
    ),
    "an earlier flowscope's folder": ("configs/{c}/done.json", _earlier_flowscope, "earlier"),
    "spec.json a list": ("spec.json", lambda p: p.write_text("[1, 2]"), "not a flowscope run"),
    "spec.json truncated": ("spec.json", _truncate, "not a flowscope run spec (unreadable"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_run_folder_is_one_clear_error(damage, tmp_path, study_file):
    out = tmp_path / "run"
    result, _ = run_cli(str(study_file), "--out", str(out))
    assert result.exit_code == 0, result.output
    config = sorted(p.name for p in (out / "configs").iterdir())[0]
    where, spoil, message = DAMAGE[damage]
    target = out / where.format(c=config)
    spoil(target)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    line = one_error_line(*run_cli(str(study_file), "--out", str(out)))
    assert message in line
    assert (target.parent.name if "configs" in where else "spec.json") in line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing deleted


def test_fresh_never_deletes_a_folder_flowscope_did_not_write(tmp_path, study_file):
    """Regression: --fresh on a folder with a configs/ folder but no spec.json deleted it."""
    out = tmp_path / "project"
    (out / "configs").mkdir(parents=True)
    (out / "configs" / "settings.yaml").write_text("precious")
    line = one_error_line(*run_cli(str(study_file), "--out", str(out), "--fresh"))
    assert "not a study run folder (no spec.json)" in line and "another --out" in line
    assert (out / "configs" / "settings.yaml").read_text() == "precious"
    (out / "spec.json").write_text('{"model": "someone else\'s"}')
    line = one_error_line(*run_cli(str(study_file), "--out", str(out), "--fresh"))
    assert "spec.json is not a flowscope run spec (no fingerprint)" in line
    assert (out / "configs" / "settings.yaml").read_text() == "precious"


def test_out_that_is_a_file_is_a_usage_error(tmp_path, study_file):
    (tmp_path / "taken").write_text("x")
    result = CliRunner().invoke(main, ["study", "run", str(study_file), "--out",
                                       str(tmp_path / "taken")])  # fmt: skip
    assert result.exit_code == 2 and "is a file" in result.output


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "nope", "missing stats.parquet, hists.parquet, meta.json"),
        (lambda d: _file(d / "a-file"), "missing stats.parquet"),
        (lambda d: _with(d, "meta.json", b"{not json"), "cannot read flowscope records"),
        (lambda d: _foreign_parquet(d), "lacks columns"),
    ],
    ids=["absent", "a-file", "meta-not-json", "foreign-parquet"],
)
def test_load_of_a_foreign_or_damaged_folder_is_a_clear_error(tmp_path, make, message):
    folder = make(tmp_path)
    with pytest.raises(FlowscopeError, match=message) as err:
        fs.load(folder)
    assert str(folder) in str(err.value)


def _file(path: Path) -> Path:
    path.write_text("x")
    return path


def _with(root: Path, name: str, data: bytes) -> Path:
    recorded().save(root / "run")
    (root / "run" / name).write_bytes(data)
    return root / "run"


def _foreign_parquet(root: Path) -> Path:
    recorded().save(root / "run")
    pd.DataFrame({"a": [1, 2]}).to_parquet(root / "run" / "stats.parquet")
    return root / "run"


# -- two runs at once --------------------------------------------------------------------------


def test_two_processes_into_two_folders_do_not_interfere(tmp_path, study_file):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(seed: int) -> subprocess.Popen:
        out = str(tmp_path / f"run{seed}")
        args = ["study", "run", str(study_file), "--out", out, "--seeds", str(seed), "--no-report"]
        return subprocess.Popen(
            [sys.executable, "-m", "flowscope", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    procs = [start(0), start(1)]  # both running at once
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    for seed in (0, 1):
        got = pd.read_parquet(tmp_path / f"run{seed}" / "stats.parquet")
        assert set(got.seed) == {seed}
        study = spec.load(str(study_file), [f"run.seeds=[{seed}]"])
        alone = engine.run_study(study, tmp_path / f"alone{seed}").stats
        cols = ["config", "layer", "kind", "tensor", "count", "mean", "std", "min", "max"]
        pd.testing.assert_frame_equal(got[cols], alone[cols])
        done = [json.loads(p.read_text()) for p in (tmp_path / f"run{seed}").glob("*/*/done.json")]
        assert [d["seed"] for d in done] == [seed, seed]
