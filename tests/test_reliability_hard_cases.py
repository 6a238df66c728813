"""Hard cases for fs.watch, each number checked against an independent computation.

In-place ops, reused modules, structured / non-float / empty outputs, NaN and Inf, half
precision, no_grad and inference_mode, activation checkpointing (both kinds), torch.compile,
wrapped models, a forward that raises, 1000 layers, a 50M-element activation (buffers and
peak memory), two recorders on one model, an interrupted attach, sparse gradients, float8,
meta tensors and non-float parameters.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import warnings
import weakref

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import flowscope as fs
from flowscope.core.columns import KEYS, STATS
from flowscope.record.snapshot import RAW_FIELDS, LogEdges


def row(stats: pd.DataFrame, layer: str, kind: str, call: int = 0, tensor: str = "", step: int = 0):
    hit = stats[
        (stats.layer == layer)
        & (stats.kind == kind)
        & (stats.call == call)
        & (stats.tensor == tensor)
        & (stats.step == step)
    ]
    assert len(hit) == 1, (layer, kind, call, tensor, step, len(hit))
    return hit.iloc[0]


def assert_stats_of(r: pd.Series, t: torch.Tensor) -> None:
    """The row's statistics equal plain numpy over the tensor's finite values."""
    v = t.detach().double().numpy().ravel()
    finite = v[np.isfinite(v)]
    assert r["count"] == v.size
    assert r["nan"] == np.isnan(v).sum()
    assert r["inf"] == np.isinf(v).sum()
    if finite.size == 0:
        assert np.isnan(r["mean"]) and np.isnan(r["std"])
        return
    scale = max(np.sqrt((finite**2).mean()), 1e-30)
    assert r["mean"] == pytest.approx(finite.mean(), rel=1e-5, abs=1e-6 * scale)
    assert r["std"] == pytest.approx(finite.std(), rel=1e-5, abs=1e-6 * scale)
    extremes = (finite.min(), finite.max())  # eager sums run in float32 about a shift
    assert (r["min"], r["max"]) == pytest.approx(extremes, rel=1e-6, abs=1e-6 * scale)
    assert r["frac_zero"] == pytest.approx((finite == 0).mean())


def hooks_on(model: nn.Module, *tensors: torch.Tensor) -> int:
    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    n += sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    return n + sum(len(t._backward_hooks or {}) for t in tensors)


def frame(rec: fs.Recorder, strip: str = "") -> pd.DataFrame:
    """Keys and statistics, sorted, for comparing two recordings row by row; ``strip`` is a
    prefix taken off the layer names (a wrapper's)."""
    keys = [k for k in KEYS if k != "layer_idx"]
    stats = rec.stats.assign(layer=rec.stats.layer.str.removeprefix(strip))
    return stats[keys + STATS].sort_values(keys[1:]).reset_index(drop=True)


# -- in-place ops ------------------------------------------------------------------------------


class Triple(nn.Module):
    """Multiplies its input by 3 in place and returns it (as some user code does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(3)


def test_inplace_chain_keeps_each_modules_own_values_and_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.LeakyReLU(0.1, inplace=True), nn.Linear(8, 8),
        nn.Hardtanh(-0.5, 0.5, inplace=True), Triple(), nn.Linear(8, 3),
    )  # fmt: skip
    x = torch.randn(16, 6)
    ref, h = [], x
    by_hand = (
        model[0], lambda t: nn.functional.leaky_relu(t, 0.1), model[2],
        lambda t: nn.functional.hardtanh(t, -0.5, 0.5), lambda t: t * 3, model[5],
    )  # fmt: skip
    for fn in by_hand:  # out of place, so each step keeps its own value and gradient
        h = fn(h)
        h.retain_grad()
        ref.append(h)
    (h**2).sum().backward()
    model.zero_grad()
    with fs.watch(model) as rec:
        (model(x) ** 2).sum().backward()
    for i, t in enumerate(ref):
        assert_stats_of(row(rec.stats, str(i), "activation"), t)
        assert_stats_of(row(rec.stats, str(i), "gradient"), t.grad)
    assert row(rec.stats, "2", "activation")["max"] > 0.5  # taken before the clamp ran
    assert row(rec.stats, "3", "activation")["max"] <= 0.5  # taken before the x3 ran


def test_inplace_change_by_user_code_after_a_module():
    lin = nn.Linear(5, 5)
    x = torch.randn(7, 5)
    with fs.watch(lin) as rec:
        h = lin(x)
        kept = h.detach().clone()
        h.mul_(2)  # the user scales the output in place
        h.sum().backward()
    r = row(rec.stats, "<root>", "activation")
    assert_stats_of(r, kept)  # the value the module returned, not the scaled one
    assert_stats_of(row(rec.stats, "<root>", "gradient"), torch.full((7, 5), 2.0))


# -- a module reused several times -----------------------------------------------------------


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.Linear(6, 6)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = self.act(self.cell(x))
        return x


def test_module_reused_three_times_gets_calls_0_1_2_every_step():
    torch.manual_seed(0)
    model = Recurrent()
    xs = [torch.randn(4, 6), torch.randn(4, 6)]
    rec = fs.watch(model)
    for step, x in enumerate(xs):
        model.zero_grad()
        model(x).pow(2).sum().backward()
        rec.step()
        w, b = (p.detach().clone().requires_grad_() for p in (model.cell.weight, model.cell.bias))
        pre, post, h = [], [], x
        for _ in range(3):  # the same recurrence, by hand, on copies of the parameters
            a = nn.functional.linear(h, w, b)
            h = torch.tanh(a)
            a.retain_grad()
            h.retain_grad()
            pre.append(a)
            post.append(h)
        h.pow(2).sum().backward()
        stats = rec.stats
        for call in range(3):
            assert_stats_of(row(stats, "cell", "activation", call, step=step), pre[call])
            assert_stats_of(row(stats, "cell", "gradient", call, step=step), pre[call].grad)
            assert_stats_of(row(stats, "act", "activation", call, step=step), post[call])
            assert_stats_of(row(stats, "act", "gradient", call, step=step), post[call].grad)
        for pname in ("weight", "bias"):  # once per step, the gradient summed over the calls
            wg = row(stats, "cell", "weight_grad", tensor=pname, step=step)
            assert_stats_of(wg, {"weight": w, "bias": b}[pname].grad)
            row(stats, "cell", "weight", tensor=pname, step=step)
    rec.close()
    assert set(rec.stats.call) == {0, 1, 2}


# -- structured, non-float and empty outputs ------------------------------------------------


class Structured(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor):
        h = self.lin(x)
        deep = [[[[[h * 5]]]]]  # deeper than flowscope walks (4 levels)
        return (
            h,
            {"scaled": 2 * h, "none": None, "ids": h.argmax(1), "mask": h > 0, "n": 3},
            [h.sum(1)],
            None,
            deep,
        )


def test_structured_outputs_record_float_leaves_with_their_gradients():
    torch.manual_seed(0)
    model = Structured()
    x = torch.randn(5, 4)
    with fs.watch(model, modules=[Structured]) as rec:
        h, d, (s,), _, _ = model(x)
        h.retain_grad()
        d["scaled"].retain_grad()
        s.retain_grad()
        (h.pow(2).sum() + d["scaled"].pow(3).sum() + s.exp().sum()).backward()
    stats = rec.stats.query("kind in ['activation', 'gradient']")
    assert sorted(set(stats.tensor)) == ["0", "1.scaled", "2.0"]
    for path, t in (("0", h), ("1.scaled", d["scaled"]), ("2.0", s)):
        assert_stats_of(row(stats, "<root>", "activation", tensor=path), t)
        assert_stats_of(row(stats, "<root>", "gradient", tensor=path), t.grad)


class Returns(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor):
        return self.fn(x)


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: None,
        lambda x: x.argmax(1),
        lambda x: x > 0,
        lambda x: torch.complex(x, x),
        lambda x: x.to_sparse(),
        lambda x: {"a": None, "b": [None, 3]},
    ],
    ids=["none", "int", "bool", "complex", "sparse", "no-tensor"],
)
def test_outputs_without_dense_float_tensors_record_nothing_and_break_nothing(fn):
    model = Returns(fn)
    x = torch.randn(3, 4)
    with fs.watch(model) as rec:
        out = model(x)
    assert rec.stats.empty
    assert type(out) is type(fn(x))


def test_empty_tensors_have_count_zero_and_undefined_moments():
    lin = nn.Linear(3, 2)
    with fs.watch(lin) as rec:
        lin(torch.randn(0, 3)).sum().backward()
    for kind in ("activation", "gradient"):
        r = row(rec.stats, "<root>", kind)
        assert (r["count"], r["nan"], r["inf"]) == (0, 0, 0)
        assert np.isnan(r["mean"]) and np.isnan(r["std"]) and np.isnan(r["frac_zero"])
    wg = row(rec.stats, "<root>", "weight_grad", tensor="weight")
    assert (wg["count"], wg["frac_zero"], wg["absmax"]) == (6, 1.0, 0.0)  # zeros: exact


# -- NaN and Inf -------------------------------------------------------------------------------


class Poke(nn.Module):
    """Puts one NaN, +Inf and -Inf into its output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x * 1.0
        out[0, 0], out[1, 1], out[2, 2] = float("nan"), float("inf"), float("-inf")
        return out


class _Inject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        out[0, :2] = float("nan")
        out[3, 3] = float("inf")
        return out


class InjectGrad(nn.Module):
    """Identity forward; its backward puts two NaN and one Inf into the gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Inject.apply(x)


def test_nan_and_inf_are_counted_exactly_in_activations_and_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), Poke(), nn.Linear(5, 5), InjectGrad(), nn.Linear(5, 2))
    x = torch.randn(6, 4)
    a = model[0](x)
    p = model[1](a)
    b = model[2](p.nan_to_num(0.0, 0.0, 0.0))
    b.retain_grad()
    c = model[3](b)
    c.retain_grad()
    model[4](c).sum().backward()
    with fs.watch(model) as rec:
        model[4](
            model[3](model[2](model[1](model[0](x)).nan_to_num(0.0, 0.0, 0.0)))
        ).sum().backward()
    stats = rec.stats
    poke = row(stats, "1", "activation")
    assert (poke["nan"], poke["inf"]) == (1, 2)
    assert_stats_of(poke, p)  # mean, std, min, max over the 27 finite values
    grad = row(stats, "2", "gradient")  # the output of Linear 2 receives the injected gradient
    assert (grad["nan"], grad["inf"]) == (2, 1)
    assert_stats_of(grad, b.grad)
    assert_stats_of(row(stats, "3", "gradient"), c.grad)  # finite above the injection


# -- precision and grad modes ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients_and_weight_gradients_are_exact(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)
    x = torch.randn(16, 8, dtype=dtype)
    h0 = model[0](x)
    h1 = model[1](h0)
    h2 = model[2](h1)
    for t in (h0, h1, h2):
        t.retain_grad()
    h2.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with fs.watch(model) as rec:
        model(x).float().pow(2).mean().backward()
    for i, t in enumerate((h0, h1, h2)):
        r = row(rec.stats, str(i), "gradient")
        assert r["dtype"] == str(dtype).removeprefix("torch.")
        assert_stats_of(r, t.grad.float())
        assert_stats_of(row(rec.stats, str(i), "activation"), t.float())
    for name, g in grads.items():
        layer, pname = name.split(".")
        assert_stats_of(row(rec.stats, layer, "weight_grad", tensor=pname), g.float())


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_no_grad_and_inference_forwards_then_a_training_step(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))
    x_eval, x = torch.randn(9, 5), torch.randn(4, 5)
    with fs.watch(model) as rec:
        with mode():
            model(x_eval)
        model(x).pow(2).sum().backward()
    h = model[0](x_eval).detach()
    assert_stats_of(row(rec.stats, "0", "activation", call=0), h)
    assert_stats_of(row(rec.stats, "1", "activation", call=0), h.relu())
    assert len(rec.stats.query("kind == 'gradient' and call == 0")) == 0
    a = model[0](x)
    a.retain_grad()
    model.zero_grad()
    model[2](a.relu()).pow(2).sum().backward()
    assert_stats_of(row(rec.stats, "0", "gradient", call=1), a.grad)
    assert len(rec.stats.query("kind == 'weight'")) == 4  # read at the first call of the step


# -- activation checkpointing ------------------------------------------------------------------


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.act, self.b, self.head = (
            nn.Linear(6, 6),
            nn.Tanh(),
            nn.Linear(6, 6),
            nn.Linear(6, 2),
        )
        self.reentrant = reentrant

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.b(self.act(self.a(x))))  # act is used twice inside the segment

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reentrant is None:
            return self.head(self.block(x))
        return self.head(checkpoint(self.block, x, use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpoint_recompute_is_recognised_not_double_counted(reentrant):
    """The recompute in backward adds no call; gradients land on the calls they belong to."""
    x = torch.randn(5, 6, requires_grad=True)
    plain = Checkpointed(None)
    with fs.watch(plain) as expected:
        plain(x).pow(2).sum().backward()
    model = Checkpointed(reentrant)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unambiguous recompute warns about nothing
        with fs.watch(model) as rec:
            model(x).pow(2).sum().backward()
    pd.testing.assert_frame_equal(frame(rec), frame(expected), rtol=1e-6)
    assert sorted(set(rec.stats.query("layer == 'act'").call)) == [0, 1]
    assert hooks_on(model) == 0


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpoint_sequential_with_a_module_shared_across_segments(reentrant):
    torch.manual_seed(0)
    act = nn.Tanh()  # one instance in every segment
    lins = [nn.Linear(6, 6) for _ in range(4)]
    model = nn.ModuleList([*lins, act])
    chain = [lins[0], act, lins[1], act, lins[2], act, lins[3], act]
    x = torch.randn(3, 6, requires_grad=True)

    def plain_forward():
        h = x
        for f in chain:
            h = f(h)
        return h

    with fs.watch(model) as expected:
        plain_forward().pow(2).sum().backward()
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fs.watch(model) as rec:
            out = checkpoint_sequential(chain, 4, x, use_reentrant=reentrant)
            out.pow(2).sum().backward()
    pd.testing.assert_frame_equal(frame(rec), frame(expected), rtol=1e-6)
    assert sorted(set(rec.stats.query("layer == '4'").call)) == [0, 1, 2, 3]


def test_reentrant_checkpoint_that_cannot_be_matched_warns():
    """A segment that starts with a module run twice without gradient: which call a recompute
    re-runs is a guess (the latest), and flowscope says so instead of guessing silently."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    with (
        pytest.warns(RuntimeWarning, match=r"recompute of '<root>'.*ran 2 times"),
        fs.watch(lin) as rec,
    ):
        checkpoint(lambda t: lin(lin(t)), x, use_reentrant=True).sum().backward()
    assert sorted(rec.stats.query("kind == 'gradient'").call) == [0, 1]  # one per call, no more


# -- torch.compile and wrappers --------------------------------------------------------------


def small() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def test_compiled_model_records_the_same_numbers_as_eager():
    """backend="aot_eager" runs dynamo and AOTAutograd (where hooks meet the compiler) without
    inductor's C++ build, which takes ~15 s here; inductor was checked by hand to agree."""
    x = torch.randn(5, 6)
    eager = small()
    with fs.watch(eager) as expected:
        eager(x).pow(2).sum().backward()
    model = small()
    torch._dynamo.reset()
    with fs.watch(model) as rec:  # watch, then compile: the usual order in a training script
        compiled = torch.compile(model, backend="aot_eager")
        compiled(x).pow(2).sum().backward()
    pd.testing.assert_frame_equal(frame(rec), frame(expected), rtol=1e-5)
    assert hooks_on(model) == 0
    model.zero_grad()
    with fs.watch(compiled) as rec2:  # compile, then watch: _orig_mod. is left out of names
        compiled(x).pow(2).sum().backward()
    pd.testing.assert_frame_equal(frame(rec2), frame(expected), rtol=1e-5)
    torch._dynamo.reset()


class DDPLike(nn.Module):
    """What DistributedDataParallel looks like from outside: the model under ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("wrap", [nn.DataParallel, DDPLike], ids=["DataParallel", "ddp-like"])
def test_wrapped_model_records_the_inner_layers(wrap):
    x = torch.randn(5, 6)
    with fs.watch(inner := small()) as expected:
        inner(x).pow(2).sum().backward()
    wrapped = wrap(small())
    with fs.watch(wrapped) as rec:
        wrapped(x).pow(2).sum().backward()
    assert set(rec.stats.layer) == {"module.0", "module.1", "module.2"}
    pd.testing.assert_frame_equal(frame(rec, "module."), frame(expected))
    assert hooks_on(wrapped) == 0


# -- failures inside the watched code ----------------------------------------------------------


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("shape mismatch in layer 2")


def test_forward_that_raises_keeps_completed_layers_and_removes_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), Boom(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="shape mismatch"), fs.watch(model) as rec:
        model(x)
    assert hooks_on(model) == 0
    h = model[0](x)
    assert_stats_of(row(rec.stats, "0", "activation"), h)
    assert_stats_of(row(rec.stats, "1", "activation"), torch.tanh(h))
    assert set(rec.stats.layer) == {"0", "1"}
    model[1](h).sum().backward()  # the half-built graph fires no hook any more
    assert set(rec.stats.kind) == {"activation", "weight"}


def test_interrupted_attach_leaves_no_hook(monkeypatch):
    """Regression: a KeyboardInterrupt while watch() attaches left the hooks already added
    on the model, with no recorder returned to remove them."""
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(5)])
    real = nn.Module.register_forward_hook
    calls = []

    def flaky(self, hook, **kwargs):
        calls.append(self)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, hook, **kwargs)

    monkeypatch.setattr(nn.Module, "register_forward_hook", flaky)
    with pytest.raises(KeyboardInterrupt):
        fs.watch(model)
    monkeypatch.undo()
    assert len(calls) == 3 and hooks_on(model) == 0


# -- size ---------------------------------------------------------------------------------------


def buffer_bytes(rec: fs.Recorder) -> int:
    pending = rec._pending
    n = sum(t.nbytes for t in pending.rows)
    return n + sum(a.nbytes + b.nbytes + c.nbytes for _, a, b, c in rec._host)


def test_a_thousand_layers():
    torch.manual_seed(0)
    layers = []
    for _ in range(500):
        layers += [nn.Linear(4, 4), nn.Tanh()]
    model = nn.Sequential(*layers)
    nn.init.eye_(model[998].weight)
    x = torch.randn(2, 4)
    with fs.watch(model) as rec:
        out = model(x)
        out.sum().backward()
    stats = rec.stats
    counts = stats.groupby("kind").size().to_dict()
    assert counts == {"activation": 1000, "gradient": 1000, "weight": 1000, "weight_grad": 1000}
    order = stats.query("kind == 'activation'").sort_values("layer_idx")
    assert order.layer.tolist() == [str(i) for i in range(1000)]
    assert_stats_of(row(stats, "999", "activation"), out)
    assert_stats_of(row(stats, "999", "gradient"), torch.ones(2, 4))
    per_snapshot = 8 * (len(RAW_FIELDS) + 64 + LogEdges().size)  # float64 raw + both hists
    assert buffer_bytes(rec) == 4000 * per_snapshot  # layers x bins, nothing else kept


class Wide(nn.Module):
    """Adds a learned scalar to a fixed (1, n) tensor: one n-element activation and gradient."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(()))
        self.register_buffer("base", (torch.arange(n) % 1000).float().reshape(1, n))

    def forward(self) -> torch.Tensor:
        return self.base + self.shift


def test_fifty_million_element_activation_keeps_only_fixed_size_buffers():
    n = 50_000_000
    sizes = {}
    for numel in (1000, n):
        model = Wide(numel)
        with fs.watch(model) as rec:
            out = model()
            out.mean().backward()
            gone = weakref.ref(out)
            del out
        sizes[numel] = buffer_bytes(rec)
        gc.collect()
        assert gone() is None  # the recorder keeps no reference to the activation
    assert sizes[n] == sizes[1000] < 20_000
    stats = rec.stats
    act = row(stats, "<root>", "activation")
    assert act["count"] == n and act["frac_zero"] == pytest.approx(1 / 1000)
    assert act["mean"] == pytest.approx(499.5, rel=1e-9)
    # float32 squares are summed in float32 lanes of 128 values (blocks of 4096, then
    # float64): at most 128 * 2**-24 = 7.6e-6 relative on the sum of squares, half that on
    # the std; this periodic data (0..999 in every block) rounds alike in every block
    assert act["std"] == pytest.approx(np.sqrt((1000**2 - 1) / 12), rel=4e-6)
    assert (act["min"], act["max"]) == (0.0, 999.0)
    grad = row(stats, "<root>", "gradient")
    assert grad["count"] == n
    assert grad["mean"] == pytest.approx(1 / n, rel=1e-6) and grad["std"] < 1e-12
    assert row(stats, "<root>", "weight_grad", tensor="shift")["mean"] == pytest.approx(1.0)


PEAK = """
import resource, torch, flowscope as fs
from torch import nn
n = {n}
class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(()))
        self.register_buffer("base", torch.randn(1, n))
    def forward(self):
        return self.base + self.shift
model = Wide()
with fs.watch(nn.Linear(2, 2)) as warm:  # kernels and imports loaded before measuring
    nn.Linear(2, 2)(torch.randn(1, 2))
warm.stats
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model().mean().backward()
bare = peak()
with fs.watch(model) as rec:
    model().mean().backward()
rec.stats
print(peak() - bare)
"""


def test_peak_memory_of_a_wide_layer_stays_within_a_few_copies():
    """Peak resident memory of a watched step over a bare one, for a 50M-element (200 MB)
    activation and gradient, in a fresh process: snapshots work in place or on transient
    temporaries (measured: ~0.5x with the numba kernels, ~2x with eager torch ops)."""
    n = 50_000_000
    code = PEAK.format(n=n)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    extra = int(proc.stdout.split()[-1])
    assert extra < 2.5 * 4 * n, extra / (4 * n)


# -- two recorders on one model ----------------------------------------------------------------


def test_nested_watches_get_independent_correct_numbers():
    x1, x2 = torch.randn(4, 6), torch.randn(4, 6)
    solo_model = small()
    with fs.watch(solo_model) as solo:
        solo_model(x1).pow(2).sum().backward()
    model = small()
    with fs.watch(model) as outer:
        with fs.watch(model, kinds=["activation", "gradient"]) as inner:
            model(x1).pow(2).sum().backward()
        assert hooks_on(model) > 0  # the inner close left the outer's hooks
        outer.step()
        model(x2).pow(2).sum().backward()
    assert hooks_on(model) == 0
    first = outer.stats.query("step == 0")
    pd.testing.assert_frame_equal(
        first[KEYS + STATS].reset_index(drop=True), solo.stats[KEYS + STATS]
    )
    assert set(outer.stats.step) == {0, 1}
    want = solo.stats.query("kind in ['activation', 'gradient']")[KEYS[1:] + STATS]
    got = inner.stats[KEYS[1:] + STATS]
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))


def test_closing_one_of_two_concurrent_recorders_keeps_the_other():
    model = small()
    a = fs.watch(model)
    b = fs.watch(model)
    hooks_both = hooks_on(model)
    a.close()
    assert hooks_on(model) == hooks_both // 2
    model(torch.randn(3, 6)).sum().backward()
    b.close()
    assert a.stats.empty
    assert len(b.stats) == 14 and hooks_on(model) == 0


# -- exotic tensors ----------------------------------------------------------------------------


def test_sparse_embedding_gradient_is_recorded_not_fatal():
    """Regression: nn.Embedding(sparse=True) made the weight_grad hook crash backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    ids = torch.tensor([[1, 2, 2, 7]])
    with fs.watch(model) as rec:
        model(ids).pow(2).sum().backward()
    dense = model[0].weight.grad.to_dense()
    r = row(rec.stats, "0", "weight_grad", tensor="weight")
    assert_stats_of(r, dense)
    assert r["frac_zero"] == pytest.approx(7 / 10)  # rows 1, 2 and 7 were used


def test_float8_output_is_recorded_in_float32():
    """Regression: a float8 output crashed the forward (the snapshot kernels have no float8)."""
    model = Returns(lambda x: x.to(torch.float8_e4m3fn))
    x = torch.randn(8, 4)
    with fs.watch(model) as rec:
        out = model(x)
    r = row(rec.stats, "<root>", "activation")
    assert r["dtype"] == "float8_e4m3fn"
    assert_stats_of(r, out.float())


def test_meta_device_model_runs_and_records_nothing():
    """A model on the meta device has no values: its forward runs, nothing is recorded (before
    the fix, reading the frame raised NotImplementedError)."""
    model = nn.Linear(3, 3, device="meta")
    with fs.watch(model) as rec:
        out = model(torch.randn(2, 3, device="meta"))
    assert out.is_meta and rec.stats.empty


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_float_parameters_are_skipped_not_fatal(dtype):
    """Regression: an int, bool or complex parameter crashed the forward (weight snapshot) or,
    for complex, the backward (weight_grad snapshot); flowscope records float tensors only."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    lin.extra = nn.Parameter(torch.ones(4, dtype=dtype), requires_grad=dtype.is_complex)
    x = torch.randn(5, 3)
    with fs.watch(lin) as rec:
        out = lin(x)
        loss = out.pow(2).sum() + (lin.extra.abs().sum() if dtype.is_complex else 0)
        loss.backward()
    assert "extra" not in set(rec.stats.tensor)
    assert_stats_of(row(rec.stats, "<root>", "weight_grad", tensor="weight"), lin.weight.grad)
    assert_stats_of(row(rec.stats, "<root>", "activation"), out)
