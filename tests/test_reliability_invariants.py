"""Invariants over many random models: flowscope never changes the model it watches.

For random MLPs and CNNs (widths, depths, activations incl. in-place ones, norms, dropout,
train/eval mode, frozen parameters; float32, float64, bfloat16): outputs and every gradient
are bit-identical with and without flowscope; after the ``with`` block, whether it ends
normally, by an exception or by a KeyboardInterrupt raised in the body, no hook is left on any
module, parameter or tensor; the mode and the ``requires_grad`` flags are as they were.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import flowscope as fs

ACTIVATIONS = {
    "relu": lambda: nn.ReLU(),
    "relu_inplace": lambda: nn.ReLU(inplace=True),
    "tanh": lambda: nn.Tanh(),
    "gelu": lambda: nn.GELU(),
    "sigmoid": lambda: nn.Sigmoid(),
    "leaky_inplace": lambda: nn.LeakyReLU(0.1, inplace=True),
    "hardtanh_inplace": lambda: nn.Hardtanh(inplace=True),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


class Chain(nn.Sequential):
    """nn.Sequential that keeps its intermediate outputs, to check them for tensor hooks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen: list[torch.Tensor] = []
        for layer in self:
            x = layer(x)
            self.seen.append(x)
        return x


@dataclass
class Case:
    kind: str
    widths: list[int]
    activation: str
    norm: bool
    dropout: bool
    train: bool
    frozen: list[bool]
    dtype: str
    batch: int
    side: int
    seed: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    kind = draw(st.sampled_from(["mlp", "cnn"]))
    depth = draw(st.integers(1, 4))
    return Case(
        kind=kind,
        widths=draw(st.lists(st.integers(1, 9), min_size=depth + 1, max_size=depth + 1)),
        activation=draw(st.sampled_from(sorted(ACTIVATIONS))),
        norm=draw(st.booleans()),
        dropout=draw(st.booleans()),
        train=draw(st.booleans()),
        frozen=draw(st.lists(st.booleans(), min_size=depth, max_size=depth)),
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        batch=draw(st.integers(1, 5)),
        side=draw(st.integers(3, 6)),
        seed=draw(st.integers(0, 2**16)),
    )


def build(case: Case) -> tuple[Chain, torch.Tensor]:
    """The model and a batch for ``case``, the same every time it is called."""
    torch.manual_seed(case.seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(case.widths, case.widths[1:], strict=False)):
        if case.kind == "mlp":
            layers.append(nn.Linear(a, b))
            norm: nn.Module = nn.LayerNorm(b)
        else:
            layers.append(nn.Conv2d(a, b, 3, padding=1))
            norm = nn.BatchNorm2d(b)
        if case.frozen[i]:
            layers[-1].weight.requires_grad_(False)
        if case.norm:
            layers.append(norm)
        layers.append(ACTIVATIONS[case.activation]())
        if case.dropout:
            layers.append(nn.Dropout(0.3))
    model = Chain(*layers).to(DTYPES[case.dtype]).train(case.train)
    shape = (case.batch, case.widths[0])
    if case.kind == "cnn":
        shape += (case.side, case.side)
    x = torch.randn(shape, dtype=DTYPES[case.dtype], requires_grad=True)
    return model, x


def hooks_on(model: Chain, *tensors: torch.Tensor) -> int:
    """Hooks of every kind left on the model's modules, parameters and the given tensors."""
    n = 0
    for m in model.modules():
        for hooks in (
            m._forward_hooks,
            m._forward_pre_hooks,
            m._backward_hooks,
            m._backward_pre_hooks,
        ):
            n += len(hooks)
    for p in model.parameters():
        n += len(p._post_accumulate_grad_hooks or {})
        n += len(p._backward_hooks or {})
    for t in tensors:
        n += len(t._backward_hooks or {})
    return n


def step(model: Chain, x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # dropout draws the same masks in both runs
    out = model(x)
    out.float().pow(2).mean().backward()
    return out


def flags(model: nn.Module) -> tuple[list[bool], list[bool]]:
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=cases(), ending=st.sampled_from(["normal", "exception", "interrupt"]))
def test_watched_model_is_unchanged(case: Case, ending: str) -> None:
    bare, x_bare = build(case)
    watched, x = build(case)
    before = flags(watched)
    expected = step(bare, x_bare, case.seed)
    got = None
    raised = {"normal": None, "exception": RuntimeError, "interrupt": KeyboardInterrupt}[ending]
    with pytest.raises(raised) if raised else nullcontext(), fs.watch(watched) as rec:
        got = step(watched, x, case.seed)
        assert hooks_on(watched) > 0
        if raised:
            raise raised("raised in the body")
    assert got is not None and torch.equal(got, expected)
    assert torch.equal(x.grad, x_bare.grad)
    for (name, p), q in zip(watched.named_parameters(), bare.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        assert p.grad is None or torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(watched.named_buffers(), bare.buffers(), strict=True):
        assert torch.equal(b, c), name  # batchnorm running statistics too
    assert hooks_on(watched, x, *watched.seen) == 0
    assert flags(watched) == before
    # the block recorded what it saw: one activation row per module, whatever the ending
    assert (rec.stats.kind == "activation").sum() == len(watched)
    assert (rec.stats.kind == "gradient").sum() == len(watched)


def test_interrupt_before_backward_leaves_no_tensor_hook() -> None:
    """Gradient hooks wait on the outputs until backward; an interrupt before it removes them."""
    model, x = build(Case("mlp", [4, 5, 3], "tanh", False, False, True, [False, False],
                          "float32", 2, 3, 0))  # fmt: skip
    with pytest.raises(KeyboardInterrupt), fs.watch(model) as rec:
        out = model(x)
        assert hooks_on(model, *model.seen) > len(model)  # module hooks + waiting tensor hooks
        raise KeyboardInterrupt
    assert hooks_on(model, x, *model.seen) == 0
    out.sum().backward()  # the graph still works and nothing is recorded any more
    assert set(rec.stats.kind) == {"activation", "weight"}


def test_watching_draws_no_random_numbers() -> None:
    """Dropout masks come from the global generator: flowscope must not advance it."""
    case = Case("cnn", [2, 3], "relu", True, True, True, [False], "float32", 2, 4, 1)
    model, x = build(case)
    state = torch.get_rng_state()
    with fs.watch(model) as rec:
        model(x).sum().backward()
    watched = torch.get_rng_state()
    torch.set_rng_state(state)
    model(x).sum().backward()
    assert torch.equal(watched, torch.get_rng_state())
    assert not torch.equal(state, watched)  # dropout did draw: the check can fail
    assert not rec.stats.empty
