"""fs.watch on small models, every number checked against a manual forward / retain_grad()."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import flowscope as fs
from flowscope.core.errors import FlowscopeError


def mlp(inplace: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 30), nn.ReLU(inplace=inplace), nn.Linear(30, 5)
    )


def manual_pass(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Every module's output with .grad filled, by a plain loop without flowscope."""
    outs, h = [], x
    for layer in model:
        # ReLU out of place, so the pre-activation keeps its own gradient
        h = torch.relu(h) if isinstance(layer, nn.ReLU) else layer(h)
        h.retain_grad()
        outs.append(h)
    (h**2).mean().backward()
    return outs


def row(stats, layer: str, kind: str, tensor: str = "", call: int = 0, step: int = 0):
    query = "layer == @layer and kind == @kind and tensor == @tensor and call == @call"
    hit = stats.query(query + " and step == @step")
    assert len(hit) == 1, (layer, kind, tensor, call, step, len(hit))
    return hit.iloc[0]


def assert_stats_of(r, t: torch.Tensor) -> None:
    v = t.detach().double().numpy().ravel()
    scale = max(np.sqrt((v**2).mean()), 1e-30)
    assert r["count"] == v.size
    assert r["mean"] == pytest.approx(v.mean(), rel=1e-5, abs=1e-6 * scale)
    assert r["std"] == pytest.approx(v.std(), rel=1e-5, abs=1e-6 * scale)
    assert r["rms"] == pytest.approx(np.sqrt((v**2).mean()), rel=1e-5)
    assert (r["min"], r["max"]) == pytest.approx((v.min(), v.max()), rel=1e-6)
    assert r["frac_zero"] == pytest.approx((v == 0).mean())


@pytest.mark.parametrize("inplace", [False, True])
def test_activations_and_gradients_match_manual_pass(inplace):
    x = torch.randn(64, 20, generator=torch.Generator().manual_seed(1))
    ref_model = mlp()
    ref = manual_pass(ref_model, x)
    model = mlp(inplace)
    with fs.watch(model) as rec:
        (model(x) ** 2).mean().backward()
    stats = rec.stats
    for i, out in enumerate(ref):
        assert_stats_of(row(stats, str(i), "activation"), out)
        assert_stats_of(row(stats, str(i), "gradient"), out.grad)
    for name, p in ref_model.named_parameters():
        layer, pname = name.split(".")
        assert_stats_of(row(stats, layer, "weight", pname), p)
        assert_stats_of(row(stats, layer, "weight_grad", pname), p.grad)
    # the Linear before an in-place ReLU keeps its own (pre-ReLU) output and gradient
    assert row(stats, "2", "activation")["min"] < 0
    assert row(stats, "2", "gradient")["frac_zero"] == pytest.approx((ref[3] == 0).double().mean())


def test_saturation_is_per_module_type():
    model = nn.Sequential(nn.Linear(10, 10), nn.Tanh(), nn.Sigmoid())
    nn.init.normal_(model[0].weight, std=5.0)
    x = torch.randn(256, 10)
    with fs.watch(model, kinds="activation") as rec:
        model(x)
    h = model[1](model[0](x)).detach()
    s = rec.stats.set_index("layer")["frac_saturated"]
    assert np.isnan(s["0"])
    assert s["1"] == pytest.approx((h.abs() >= 0.99).double().mean().item())
    sig = torch.sigmoid(h)
    assert s["2"] == pytest.approx(((sig <= 0.01) | (sig >= 0.99)).double().mean().item())
    with fs.watch(model, kinds="activation", saturation={"Tanh": (-0.5, 0.5)}) as rec:
        model(x)
    assert rec.stats.set_index("layer")["frac_saturated"]["1"] == pytest.approx(
        (h.abs() >= 0.5).double().mean().item()
    )


def test_outputs_and_gradients_are_bit_identical():
    x = torch.randn(32, 20)
    a, b = mlp(inplace=True), mlp(inplace=True)
    (a(x) ** 2).mean().backward()
    with fs.watch(b):
        out_b = b(x)
        (out_b**2).mean().backward()
    assert torch.equal(a(x), out_b)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad)


def hook_count(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
    for p in model.parameters():
        n += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return n


def test_no_hook_remains_after_the_block_or_an_exception():
    model = mlp()
    with fs.watch(model) as rec:
        assert hook_count(model) > 0
        model(torch.randn(4, 20)).sum().backward()
    assert hook_count(model) == 0
    before = len(rec.stats)
    model(torch.randn(4, 20)).sum().backward()  # nothing fires after the block
    assert len(rec.stats) == before
    with pytest.raises(RuntimeError, match="boom"), fs.watch(model):
        raise RuntimeError("boom")
    assert hook_count(model) == 0
    rec.close()  # closing twice is harmless


def test_gradient_after_close_is_not_recorded():
    model = mlp()
    rec = fs.watch(model, kinds=["activation", "gradient"])
    out = model(torch.randn(4, 20))
    rec.close()
    out.sum().backward()
    assert set(rec.stats.kind) == {"activation"}


def test_mode_and_requires_grad_untouched():
    model = mlp().eval()
    model[0].weight.requires_grad_(False)
    with fs.watch(model) as rec:
        model(torch.randn(4, 20)).sum().backward()
    assert not model.training and not model[0].weight.requires_grad
    grads = rec.stats.query("kind == 'weight_grad'")
    assert "weight" not in set(grads.query("layer == '0'").tensor)  # frozen: no gradient


def test_module_called_twice_gets_one_record_per_call():
    shared = nn.Linear(8, 8)
    x = torch.randn(16, 8)
    with fs.watch(shared) as rec:
        h1 = shared(x)
        h2 = shared(torch.tanh(h1))
        h1.retain_grad()
        h2.retain_grad()
        (h2**2).sum().backward()
    stats = rec.stats
    assert_stats_of(row(stats, "<root>", "activation", call=0), h1)
    assert_stats_of(row(stats, "<root>", "activation", call=1), h2)
    assert_stats_of(row(stats, "<root>", "gradient", call=0), h1.grad)
    assert_stats_of(row(stats, "<root>", "gradient", call=1), h2.grad)
    assert len(stats.query("kind == 'weight'")) == 2  # weight and bias, once per step


class TupleDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        return (h, {"scaled": 2 * h, "ids": torch.arange(3), "none": None}, h > 0)


def test_tuple_and_dict_outputs_and_non_float_tensors():
    model = TupleDict()
    x = torch.randn(5, 4)
    with fs.watch(model, modules=[TupleDict], kinds=["activation"]) as rec:
        model(x)
    h = model.lin(x)
    stats = rec.stats
    assert set(stats.tensor) == {"0", "1.scaled"}  # ints, bools and None are skipped
    assert_stats_of(row(stats, "<root>", "activation", "1.scaled"), 2 * h)


def test_every_and_step():
    model = mlp()
    rec = fs.watch(model, every=3, kinds=["activation", "weight_grad"])
    for _ in range(7):
        model(torch.randn(4, 20)).sum().backward()
        rec.step()
    rec.close()
    assert sorted(rec.stats.step.unique()) == [0, 3, 6]


def test_no_grad_records_activations_only():
    model = mlp()
    with fs.watch(model) as rec, torch.no_grad():
        model(torch.randn(4, 20))
    assert set(rec.stats.kind) == {"activation", "weight"}
    with fs.watch(model) as rec, torch.inference_mode():
        model(torch.randn(4, 20))
    assert set(rec.stats.kind) == {"activation", "weight"}


def test_non_finite_values_are_counted_not_fatal():
    model = mlp()
    x = torch.randn(4, 20)
    x[0, 0] = float("nan")
    x[1, 1] = float("inf")
    with fs.watch(model) as rec:
        model(x).sum().backward()
    first = row(rec.stats, "0", "activation")
    assert first["nan"] + first["inf"] > 0
    assert np.isfinite(row(rec.stats, "4", "gradient")["mean"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    model = mlp().to(dtype)
    x = torch.randn(16, 20).to(dtype)
    with fs.watch(model) as rec:
        out = model(x)
        out.float().pow(2).mean().backward()
    r = row(rec.stats, "4", "activation")
    assert r["dtype"] == str(dtype).removeprefix("torch.")
    assert_stats_of(r, out.float())


def test_selection_by_type_and_pattern():
    model = mlp()
    assert [n for n, _ in fs.watch(model, modules=nn.Linear).targets] == ["0", "2", "4"]
    assert [n for n, _ in fs.watch(model, modules=["1", nn.ReLU]).targets] == ["1", "3"]
    nested = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Tanh()), nn.Linear(2, 1))
    assert [n for n, _ in fs.watch(nested, modules="0.*").targets] == ["0.0", "0.1"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kinds": ["activations"]}, "did you mean 'activation'"),
        ({"kinds": []}, "kinds is empty"),
        ({"every": 0}, "every must be an integer >= 1, got 0"),
        ({"bins": 0}, "bins must be an integer >= 1, got 0"),
        ({"hist_sample": 2}, "hist_sample must be an integer >= 16"),
        ({"modules": "encoder.*"}, "matches no module"),
        ({"modules": [3]}, "module types or name patterns"),
        ({"drop_zeros": "yes"}, "drop_zeros must be True, False or 'auto'"),
        ({"saturation": {"Tanhh": (-1, 1)}}, "did you mean 'Tanh'"),
        ({"saturation": {nn.Tanh: (1, -1)}}, "lo < hi"),
    ],
)
def test_bad_arguments_fail_clearly(kwargs, message):
    model = mlp()
    with pytest.raises(FlowscopeError, match=message):
        fs.watch(model, **kwargs)
    assert hook_count(model) == 0


def test_not_a_module():
    with pytest.raises(FlowscopeError, match=r"needs a torch\.nn\.Module, got function"):
        fs.watch(lambda x: x)


def test_memory_does_not_grow_with_batch_size():
    model = mlp()
    sizes = []
    for batch in (8, 4096):
        with fs.watch(model) as rec:
            model(torch.randn(batch, 20)).sum().backward()
        rec.flush()
        sizes.append(sum(a.nbytes + b.nbytes + c.nbytes for _, a, b, c in rec._host))
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("kernels", ["c", "eager"])
def test_cpu_results_live_in_a_few_mmap_blocks_not_the_heap(kernels, monkeypatch):
    # one small allocation per snapshot kept alive until the flush fragmented the malloc heap
    # between the step's big activation buffers: RSS grew ~64 MB per recorded step
    monkeypatch.setenv("FLOWSCOPE_KERNELS", kernels)
    model = mlp()
    rec = fs.watch(model)
    for _ in range(3):
        model(torch.randn(64, 20)).sum().backward()
        rec.step()
    pending = rec._pending
    storages = {t.untyped_storage().data_ptr() for t in pending.rows}
    # the C kernel's rows: one 512-row mmap block; the torch path's: one result block per
    # reduced batch (a step's), never one allocation per snapshot
    assert len(pending.rows) > 40 and len(storages) == (1 if kernels == "c" else 3)
    rec.close()
    assert rec.stats.groupby("step").size().tolist() == [len(pending.rows) // 3] * 3


def test_deep_copy_of_model_is_not_watched():
    model = mlp()
    with fs.watch(model) as rec:
        twin = copy.deepcopy(model)
        twin(torch.randn(2, 20))
    assert len(rec.stats) == 0


class Block(nn.Module):
    """Linear then an activation; the block's output is the activation's own tensor (unless
    ``shift`` changes it in place after the activation's hook saw it)."""

    def __init__(self, act: nn.Module, shift: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.linear, self.act, self.shift = nn.Linear(8, 8), act, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.linear(x))
        return y.add_(self.shift) if self.shift else y


def counting_snapshots(monkeypatch) -> list[int]:
    from flowscope.record import reader

    calls, real = [], reader.Reader._take  # every read of a tensor goes through it
    monkeypatch.setattr(
        reader.Reader, "_take", lambda self, t, *a: calls.append(t.numel()) or real(self, t, *a)
    )
    return calls


def test_a_container_whose_output_is_its_childs_tensor_reads_it_once(monkeypatch):
    calls = counting_snapshots(monkeypatch)
    model = nn.Sequential(Block(nn.Tanh()))
    x = torch.randn(64, 8)
    with fs.watch(model, modules=["0", "0.act"], kinds=["activation", "gradient"]) as rec:
        out = model(x)
        out.retain_grad()
        (out**2).sum().backward()
    assert len(calls) == 2  # the tanh's output and its gradient; the block's rows are theirs
    stats = rec.stats
    for kind, want in (("activation", out.detach()), ("gradient", out.grad)):
        block, tanh = row(stats, "0", kind), row(stats, "0.act", kind)
        w = want.double()
        assert block["mean"] == pytest.approx(w.mean().item(), rel=1e-6)
        assert block["std"] == pytest.approx(w.std(unbiased=False).item(), rel=1e-6)
        assert (block["min"], block["max"]) == (w.min().item(), w.max().item())
        shared = ["count", "mean", "std", "min", "max", "frac_zero"]
        assert block[shared].tolist() == tanh[shared].tolist()
    # the block has no saturation interval: NaN, not the tanh's share
    tanh_act = row(stats, "0.act", "activation")
    saturated = (out.detach().abs() >= 0.99).double().mean().item()
    assert tanh_act["frac_saturated"] == pytest.approx(saturated)
    assert np.isnan(row(stats, "0", "activation")["frac_saturated"])
    hists = rec.hists.query("kind == 'activation'")
    counts = hists.groupby(["layer", "hist"])["count"].apply(list)
    assert counts["0", "linear"] == counts["0.act", "linear"]


def test_a_tensor_changed_in_place_or_histogrammed_otherwise_is_read_again(monkeypatch):
    calls = counting_snapshots(monkeypatch)
    x = torch.randn(64, 8)
    shifted = nn.Sequential(Block(nn.Tanh(), shift=1.0))
    with fs.watch(shifted, modules=["0", "0.act"], kinds=["activation"]) as rec, torch.no_grad():
        out = shifted(x)
    assert len(calls) == 2  # the in-place add bumped the version: read again
    assert row(rec.stats, "0", "activation")["mean"] == pytest.approx(out.mean().item(), rel=1e-6)
    tanh_mean = row(rec.stats, "0.act", "activation")["mean"]
    assert tanh_mean == pytest.approx(out.mean().item() - 1.0, rel=1e-5)
    # ReLU's linear histogram leaves its zeros out (drop_zeros="auto"), the block's does not
    relu = nn.Sequential(Block(nn.ReLU()))
    with fs.watch(relu, modules=["0", "0.act"], kinds=["activation"]) as rec, torch.no_grad():
        out = relu(x)
    assert len(calls) == 4
    lin = rec.hists.query("hist == 'linear'").groupby("layer")["count"].sum()
    assert lin["0"] == out.numel() and lin["0.act"] == (out != 0).sum().item()
