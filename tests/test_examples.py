"""The scripts in examples/ run as documented (small sizes via STEPS / EVERY / REPORT)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import flowscope as fs

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"STEPS": "4", "EVERY": "2", "REPORT": "0", "OMP_NUM_THREADS": "1"}


def run(args: list[str], out: Path, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, *args, str(out)],
        cwd=ROOT,
        env={**os.environ, **SMALL, **env},
        capture_output=True,
        text=True,
        timeout=240,
    )
    if result.returncode:
        pytest.fail(f"{' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result.stdout


def test_ddp_example_under_torchrun_writes_the_global_batch_and_the_report(tmp_path):
    out = tmp_path / "ddp"
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    stdout = run([*args, "examples/ddp_train.py"], out, REPORT="1")
    assert "rank 0 of 2" in stdout and stdout.count("records of the global batch") == 1
    stats = fs.load(out).stats
    assert sorted(stats.step.unique()) == [0, 2]
    first = stats.query("kind == 'activation' and layer == '0'")
    assert (first["count"] == 2 * 32 * 256).all()  # both ranks' 32 samples
    assert (out / "report.html").is_file()  # flowscope.reporter.page drew it on rank 0


@pytest.mark.parametrize("strategy", ["fsdp2", "fsdp1", "fsdp1-flat"])
def test_fsdp_example_under_torchrun_merges_the_shards(tmp_path, strategy):
    out = tmp_path / strategy
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    stdout = run([*args, "examples/fsdp_train.py"], out, STRATEGY=strategy)
    assert stdout.count("records of the global batch") == 1
    stats = fs.load(out).stats
    assert sorted(stats.step.unique()) == [0, 2]
    assert {"embed", "blocks.0.fc1", "blocks.2.norm", "head"} <= set(stats.layer)  # no wrappers
    fc1 = stats.query("layer == 'blocks.0.fc1' and tensor == 'weight'")
    assert (fc1["count"] == 64 * 256).all() and set(fc1.kind) == {"weight", "weight_grad"}
    first = stats.query("kind == 'activation' and layer == 'embed'")
    assert (first["count"] == 2 * 16 * 64).all()  # both ranks' 16 samples


def test_lightning_example(tmp_path):
    stdout = run(["examples/lightning_train.py"], tmp_path / "pl")
    assert "recorded steps [0, 2]" in stdout
    assert (tmp_path / "pl" / "stats.parquet").is_file()


def test_lightning_example_under_fsdp2(tmp_path):
    stdout = run(["examples/lightning_train.py"], tmp_path / "pl", STRATEGY="fsdp")
    assert stdout.count("recorded steps [0, 2]") == 1  # rank 0
    stats = fs.load(tmp_path / "pl").stats.query("layer == 'net.0' and step == 0")
    counts = dict(zip(stats.kind + "." + stats.tensor, stats["count"], strict=True))
    assert counts["weight.weight"] == counts["weight_grad.weight"] == 128 * 32  # whole tensors
    assert counts["activation."] == 2 * 32 * 128  # both ranks' batches


def test_hf_trainer_example(tmp_path):
    stdout = run(["examples/hf_trainer.py"], tmp_path / "hf")
    assert "recorded steps [0, 2]" in stdout and "transformer.h.1.mlp.c_proj" in stdout


def test_tensorboard_example(tmp_path):
    stdout = run(["examples/tensorboard_export.py"], tmp_path / "tb")
    assert "tensorboard --logdir" in stdout
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "tb" / "stats.csv").is_file() and (tmp_path / "tb" / "hists.csv").is_file()
