"""Record a training loop, then export it to TensorBoard and CSV.

    python examples/tensorboard_export.py [OUT_DIR]
    tensorboard --logdir OUT_DIR/tensorboard

Writes the records to OUT_DIR (default ``reports/tensorboard-example``), ``stats.csv`` and
``hists.csv`` next to the Parquet files, and TensorBoard event files (the log-magnitude
histograms and the per-layer statistics) to OUT_DIR/tensorboard. ``STEPS`` (default 100) and
``EVERY`` (default 10) set the length and the recording schedule.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

import flowscope as fs
from flowscope.reporter.export import to_csv, to_tensorboard


def main(out_dir: str) -> None:
    steps, every = int(os.environ.get("STEPS", 100)), int(os.environ.get("EVERY", 10))
    torch.manual_seed(0)
    model = nn.Sequential(
        *[m for _ in range(4) for m in (nn.Linear(64, 64), nn.ReLU())], nn.Linear(64, 1)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with fs.watch(model, every=every, name="mlp") as rec:
        for _ in range(steps):
            x = torch.randn(128, 64)
            nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
            opt.step()
            opt.zero_grad()
            rec.step()
    rec.save(out_dir)
    csv = to_csv(out_dir)
    logdirs = to_tensorboard(out_dir, Path(out_dir) / "tensorboard")
    print(f"records: {out_dir}; csv: {', '.join(p.name for p in csv)}")
    print(f"tensorboard --logdir {logdirs[0]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "reports/tensorboard-example")
