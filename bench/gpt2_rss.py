"""RSS of a GPT-2-shaped model's training run while it streams into a run folder: bounded?

    python bench/gpt2_rss.py 600          # 600 steps, every=2: 300 recorded, 6 flushes

``GPT2LMHeadModel`` from a transformers config (12 blocks, d = 256, 4 heads, vocabulary
2048, context 64), AdamW, batch 8 x 64 random tokens, ``fs.watch(model, out=..., every=2)``
and ``rec.step(loss=...)`` every step; every 50 steps it prints the step, VmRSS (MiB), the
snapshots held in memory (``rec.retained``) and the seconds so far. Results: the end of
bench/results/longrun.md.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from longrun import _rss_mib  # the same VmRSS reading as the long-run bench

ROOT = Path(__file__).resolve().parent.parent


def main(steps: int) -> None:
    sys.path.insert(0, str(ROOT))
    from transformers import GPT2Config, GPT2LMHeadModel

    import flowscope as fs

    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = GPT2Config(
        n_layer=12, n_embd=256, n_head=4, vocab_size=2048, n_positions=64, use_cache=False
    )
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    gen = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, 2048, (8, 64), generator=gen) for _ in range(20)]
    with tempfile.TemporaryDirectory() as folder:
        rec = fs.watch(model, out=Path(folder) / "run", every=2)
        t0 = time.perf_counter()
        for i in range(steps):
            ids = tokens[i % len(tokens)]
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
            if (i + 1) % 50 == 0:
                held, took = rec.retained, time.perf_counter() - t0
                print(f"step {i + 1}: RSS {_rss_mib():.0f} MiB, held {held}, {took:.0f} s")
        rec.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 600)
