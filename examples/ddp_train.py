"""Record a DDP training run with flowscope; the ranks' records are merged, rank 0 writes.

    torchrun --nproc_per_node=2 examples/ddp_train.py [OUT_DIR]

Each rank trains on its own shard of every batch; after the run, ``save_merged`` combines the
ranks' statistics and histograms into one record of the global batch and rank 0 writes it to
OUT_DIR (default ``reports/ddp-example``), then the HTML report. Without torchrun it runs as
one process. Environment: ``STEPS`` (default 200), ``EVERY`` (default 20), ``REPORT=0`` to
skip the report.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import flowscope as fs
from flowscope.integrations import distributed


def main(out_dir: str) -> None:
    steps, every = int(os.environ.get("STEPS", 200)), int(os.environ.get("EVERY", 20))
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = distributed.rank_and_world()
    device = torch.device(
        f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    )
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    ).to(device)
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1 + rank)  # each rank draws its own shard
    rec = fs.watch(model, every=every, name="ddp-example")
    for _ in range(steps):
        x = torch.randn(32, 64, generator=gen).to(device)
        y = (x[:, :10].argmax(1)).to(device)
        nn.functional.cross_entropy(ddp(x), y).backward()
        distributed.record_synced_grads(rec)  # weight_grad: the gradient DDP averaged
        opt.step()
        opt.zero_grad()
        rec.step()
    rec.close()
    written = distributed.save_merged(rec, out_dir)
    if written is not None:
        print(f"rank 0 of {world}: records of the global batch in {written}")
        if os.environ.get("REPORT", "1") != "0":
            print(f"report: {fs.report(written)}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "reports/ddp-example")
