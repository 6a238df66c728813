"""What the merge of sharded parameters costs per flush: ``merge_pending`` under DDP, FSDP2 and
FSDP1 on the same model (issue 22).

    torchrun --nproc_per_node=2 bench/fsdp_merge.py [--write]

The model is examples/fsdp_train.py's residual MLP (width 256, 4 blocks; ~2.1 M parameters,
44 recorded modules) on gloo/CPU, or NCCL where there is a GPU. For each strategy: ``REPEATS``
times, one recorded step (forward, backward, ``record_synced_grads``) and then one
``merge_pending`` timed on its own between two barriers (the flush included: it is what the
merge adds in front of it). The median over the repeats, the rank-0 timings, and the number of
snapshots merged; also the median of ``record_synced_grads`` (once per recorded step: under
DDP it re-reads the averaged gradients, under FSDP1 it snapshots every flat shard).
Results: ``bench/results/fsdp-merge.md`` (``--write``).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import fsdp_train

import flowscope as fs
from flowscope.integrations import distributed

REPEATS = int(os.environ.get("REPEATS", 7))
STRATEGIES = ("ddp", "fsdp2", "fsdp1", "fsdp1-flat")


def wrapped(strategy: str, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(the model to run, the model to watch)."""
    torch.manual_seed(0)
    net = fsdp_train.Net(width=256, depth=4).to(device)
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(net), net
    model = fsdp_train.shard(net, strategy, device)
    return model, model


def measure(strategy: str, device: torch.device) -> tuple[float, int, float]:
    """Median seconds of one merge_pending, the snapshots it merged, and the median seconds
    of record_synced_grads (per recorded step; FSDP1: the flat shards' snapshots)."""
    model, watched = wrapped(strategy, device)
    gen = torch.Generator().manual_seed(1 + dist.get_rank())
    rec = fs.watch(watched, bins=64)
    times, synced, count = [], [], 0
    for _ in range(REPEATS):
        x = torch.randn(64, 32, generator=gen).to(device)
        nn.functional.cross_entropy(model(x), x[:, :10].argmax(1)).backward()
        start = time.perf_counter()
        distributed.record_synced_grads(rec)
        synced.append(time.perf_counter() - start)
        model.zero_grad()
        rec.step()
        dist.barrier()
        start = time.perf_counter()
        count = distributed.merge_pending(rec)
        dist.barrier()
        times.append(time.perf_counter() - start)
    rec.close()
    return statistics.median(times), count, statistics.median(synced)


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    rows = [(s, *measure(s, device)) for s in STRATEGIES]
    if dist.get_rank() == 0:
        ddp = rows[0][1]
        lines = [
            "| strategy | snapshots merged | merge_pending (ms) | vs DDP"
            " | record_synced_grads (ms) |",
            "|---|---|---|---|---|",
            *(
                f"| {s} | {n} | {t * 1e3:.1f} | {t / ddp:.2f}x | {g * 1e3:.1f} |"
                for s, t, n, g in rows
            ),
        ]
        load = os.getloadavg()[0]
        head = (
            f"{dist.get_world_size()} ranks, {'nccl' if cuda else 'gloo'}, torch"
            f" {torch.__version__}, {platform.processor() or platform.machine()},"
            f" {os.cpu_count()} cores, 1-minute load {load:.2f}; {REPEATS} repeats;"
            " command: torchrun --nproc_per_node=2 bench/fsdp_merge.py --write"
        )
        text = "\n".join([head, "", *lines])
        print(text)
        if "--write" in sys.argv:
            out = Path(__file__).parent / "results" / "fsdp-merge.md"
            out.write_text(f"# merge_pending per flush: DDP vs FSDP (issue 22)\n\n{text}\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
