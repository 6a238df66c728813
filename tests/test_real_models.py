"""Real models, not only the toy MLP: a Hugging Face GPT-2 built from a config and a CNN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers  # a dev dependency: a missing one fails here, it is never skipped
from torch import nn

import flowscope as fs


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, attn_implementation="eager"
    )
    return transformers.GPT2LMHeadModel(config)


def test_gpt2_training_steps_are_recorded_exactly():
    model = tiny_gpt2()
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    captured: dict[str, torch.Tensor] = {}

    def grab(module, args, output):  # an independent capture of one layer's output
        output.retain_grad()
        captured["ln_f"] = output

    own = model.transformer.ln_f.register_forward_hook(grab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with fs.watch(model) as rec:
        for _ in range(2):
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.step()
    own.remove()
    stats = rec.stats
    assert sorted(stats.step.unique()) == [0, 1]
    assert set(stats.kind) == {"activation", "gradient", "weight", "weight_grad"}
    last = stats.query("step == 1 and layer == 'transformer.ln_f'").set_index("kind")
    out = captured["ln_f"].detach().double()
    assert last.loc["activation", "mean"] == pytest.approx(out.mean().item(), abs=1e-6)
    assert last.loc["activation", "std"] == pytest.approx(out.std(unbiased=False).item(), rel=1e-5)
    grad = captured["ln_f"].grad.double()
    assert last.loc["gradient", "rms"] == pytest.approx(grad.pow(2).mean().sqrt().item(), rel=1e-5)
    # attention projections are HF Conv1D leaves; each block's are recorded
    attn = stats.query("layer.str.endswith('attn.c_attn') and kind == 'activation'")
    assert len(attn) == 2 * 2  # 2 blocks x 2 steps
    # the tied embedding / lm_head weight is recorded once per step, under its first owner
    tied = stats.query("kind == 'weight_grad' and tensor == 'weight' and step == 0")
    assert ("transformer.wte" in set(tied.layer)) != ("lm_head" in set(tied.layer))


def test_gpt2_outputs_identical_with_and_without_flowscope():
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    a, b = tiny_gpt2(), tiny_gpt2()
    a.eval(), b.eval()
    la = a(ids, labels=ids).loss
    la.backward()
    with fs.watch(b):
        lb = b(ids, labels=ids).loss
        lb.backward()
    assert torch.equal(la, lb)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad)


def test_small_cnn_with_batchnorm_and_inplace_relu():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    x = torch.randn(16, 3, 12, 12)
    with fs.watch(model, modules=[nn.Conv2d, nn.BatchNorm2d]) as rec:
        nn.functional.cross_entropy(model(x), torch.randint(0, 4, (16,))).backward()
    bn = rec.stats.query("layer == '1' and kind == 'activation'").iloc[0]
    # training-mode batchnorm output: per channel zero mean and unit variance, so overall too
    assert bn["mean"] == pytest.approx(0.0, abs=1e-5)
    assert bn["std"] == pytest.approx(np.sqrt(1 - 1e-5 / (1 + 1e-5)), rel=1e-3)
    # the in-place ReLU overwrites the BN output: its record is still the pre-ReLU tensor,
    # and its gradient is zero exactly where the ReLU cut it
    assert bn["min"] < 0 and bn["count"] == 16 * 8 * 12 * 12
    bn_grad = rec.stats.query("layer == '1' and kind == 'gradient'").iloc[0]
    assert bn_grad["frac_zero"] == pytest.approx(0.5, abs=0.05)
