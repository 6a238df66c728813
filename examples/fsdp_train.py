"""Record a sharded (FSDP) training run with flowscope; the ranks' shards are merged, rank 0
writes.

    torchrun --nproc_per_node=2 examples/fsdp_train.py [OUT_DIR]

A small residual MLP whose blocks run under activation checkpointing is sharded with FSDP2's
``fully_shard`` (``STRATEGY=fsdp1`` or ``fsdp1-flat``: ``FullyShardedDataParallel`` with
``use_orig_params=True`` or ``False``). Each rank records its own batch shard and its own
shard of every parameter and gradient; ``save_merged`` combines them into the records of the
global batch and of the whole parameters, which rank 0 writes to OUT_DIR (default
``reports/fsdp-example``), then the HTML report. Layer names are the model's own
(``blocks.0.fc1``): no FSDP or checkpoint wrapper segments. Environment: ``STEPS`` (default
200), ``EVERY`` (default 20), ``REPORT=0`` to skip the report, ``STRATEGY``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

import flowscope as fs
from flowscope.integrations import distributed


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, width: int = 64, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(32, width)
        self.blocks = nn.ModuleList(checkpoint_wrapper(Block(width)) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def shard(model: Net, strategy: str, device: torch.device) -> nn.Module:
    """The model under FSDP2 (each block, then the root) or FSDP1 (each block wrapped)."""
    if strategy == "fsdp2":
        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    return FullyShardedDataParallel(
        model,
        use_orig_params=strategy == "fsdp1",
        device_id=device,
        auto_wrap_policy=ModuleWrapPolicy({Block}),
    )


def main(out_dir: str) -> None:
    steps, every = int(os.environ.get("STEPS", 200)), int(os.environ.get("EVERY", 20))
    strategy = os.environ.get("STRATEGY", "fsdp2")
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group("nccl" if cuda else "gloo")
    else:  # one process: a group of one (FSDP needs a process group)
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29511", rank=0, world_size=1)
    rank, world = distributed.rank_and_world()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    torch.manual_seed(0)  # the same initial weights on every rank
    model = shard(Net().to(device), strategy, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1 + rank)  # each rank draws its own batch shard
    rec = fs.watch(model, every=every, name=f"{strategy}-example")  # after sharding
    for _ in range(steps):
        x = torch.randn(16, 32, generator=gen).to(device)
        y = x[:, :10].argmax(1)
        nn.functional.cross_entropy(model(x), y).backward()
        distributed.record_synced_grads(rec)  # the reduced gradients' shards (FSDP1: weights too)
        opt.step()
        opt.zero_grad()
        rec.step()
    rec.close()
    written = distributed.save_merged(rec, out_dir)
    if written is not None:
        print(f"rank 0 of {world} ({strategy}): records of the global batch in {written}")
        if os.environ.get("REPORT", "1") != "0":
            print(f"report: {fs.report(written)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "reports/fsdp-example")
