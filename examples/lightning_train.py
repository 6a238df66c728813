"""Record a Lightning training run with flowscope's callback.

    python examples/lightning_train.py [OUT_DIR]

Trains a small tanh MLP on a synthetic task, recording every ``EVERY``-th optimizer step
(default 20) of ``STEPS`` (default 200) into OUT_DIR (default ``reports/lightning-example``),
then writes the HTML report (``REPORT=0`` skips it). Validation batches are not recorded.
``STRATEGY=fsdp`` trains on two CPU processes with Lightning's ``ModelParallelStrategy``
(FSDP2: ``fully_shard`` in ``configure_model``); the callback merges the ranks' shards.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard

import flowscope as fs
from flowscope.integrations.lightning import FlowscopeCallback


class Classifier(pl.LightningModule):
    def __init__(self, fsdp: bool = False) -> None:
        super().__init__()
        self.fsdp = fsdp
        self.net = nn.Sequential(
            nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 4)
        )

    def configure_model(self) -> None:
        if self.fsdp:  # FSDP2 over the data-parallel ranks: each Linear, then the whole net
            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(n: int, seed: int) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=gen)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, x[:, :4].argmax(1)), batch_size=32
    )


def main(out_dir: str) -> None:
    steps, every = int(os.environ.get("STEPS", 200)), int(os.environ.get("EVERY", 20))
    torch.manual_seed(0)
    callback = FlowscopeCallback(out_dir, every=every, report=os.environ.get("REPORT", "1") != "0")
    fsdp = os.environ.get("STRATEGY") == "fsdp"
    parallel: dict[str, Any] = {}
    if fsdp:
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        parallel = {"devices": 2, "strategy": strategy}
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        **parallel,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(Classifier(fsdp), loader(32 * 16, 0), loader(64, 1))
    if trainer.global_rank:
        return  # rank 0 wrote the merged records
    stats = fs.load(out_dir).stats
    grad = stats.query("kind == 'gradient'").groupby("step")["std"].median()
    print(f"recorded steps {sorted(int(s) for s in stats.step.unique())} into {out_dir}")
    print(f"median gradient std per recorded step: {grad.round(6).to_dict()}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "reports/lightning-example")
