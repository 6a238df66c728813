"""Record a Hugging Face Trainer run (a tiny GPT-2 built from a config; nothing downloaded).

    python examples/hf_trainer.py [OUT_DIR]

Trains for ``STEPS`` (default 60) on random tokens, recording every ``EVERY``-th optimizer
step (default 10) into OUT_DIR (default ``reports/hf-example``), then writes the HTML report
(``REPORT=0`` skips it). Evaluation passes are not recorded.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import flowscope as fs
from flowscope.integrations.hf import FlowscopeTrainerCallback


def main(out_dir: str) -> None:
    steps, every = int(os.environ.get("STEPS", 60)), int(os.environ.get("EVERY", 10))
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=256,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(64):
        ids = torch.randint(0, config.vocab_size, (32,), generator=gen)
        rows.append({"input_ids": ids, "labels": ids})
    callback = FlowscopeTrainerCallback(
        out_dir, every=every, report=os.environ.get("REPORT", "1") != "0", name="tiny-gpt2"
    )
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=steps,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
        )
        Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback]).train()
    stats = fs.load(out_dir).stats
    blocks = stats.query("kind == 'gradient' and layer.str.endswith('c_proj')")
    print(f"recorded steps {sorted(int(s) for s in stats.step.unique())} into {out_dir}")
    print(blocks.pivot_table(index="layer", columns="step", values="std").round(6).to_string())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "reports/hf-example")
