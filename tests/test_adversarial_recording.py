"""Training code as people write it, against the recorder (issue 18, the recorder's side).

Families: several passes per step (accumulation, retain_graph, gradient penalty), torch.func
transforms, hooks that cannot outlive their watch (deepcopy, pickle, a dropped recorder,
bounded memory), compiled models, parameters and modules replaced inside a watch, the
integrations' error paths, the study's last step, watch's argument bounds. Each test checks
outputs/gradients bit-identical to an unwatched run, hooks counted after close, numbers
against a float64 recomputation, or an exact message.
"""

from __future__ import annotations

import copy
import gc
import io
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import flowscope as fs
from flowscope.core.errors import FlowscopeError
from flowscope.integrations import Session
from flowscope.record.frames import Snapshots, expected_passes
from flowscope.record.hooks import Inert

KEY = ["step", "layer", "kind", "call", "forward", "backward", "order", "tensor"]


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def hook_count(*objects: object) -> int:
    """Every module and tensor hook on the modules and parameters of ``objects``."""
    total = 0
    for obj in objects:
        modules = obj.modules() if isinstance(obj, nn.Module) else []
        for m in modules:
            for name in (
                "_forward_hooks",
                "_forward_pre_hooks",
                "_backward_hooks",
                "_backward_pre_hooks",
                "_state_dict_hooks",
                "_load_state_dict_pre_hooks",
            ):
                total += len(getattr(m, name, {}) or {})
            for p in m.parameters(recurse=False):
                total += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
                total += len(getattr(p, "_backward_hooks", None) or {})
    return total


def float64_stats(t: torch.Tensor) -> dict[str, float]:
    v = t.detach().double().reshape(-1)
    return {"count": v.numel(), "mean": v.mean().item(), "max": v.max().item()}


def row(stats: pd.DataFrame, **where: object) -> pd.Series:
    rows = stats
    for k, v in where.items():
        rows = rows[rows[k] == v]
    assert len(rows) == 1, (where, rows[KEY])
    return rows.iloc[0]


# -- several passes per step ---------------------------------------------------------------------


def accumulate(model: nn.Module, x: torch.Tensor, micro: int) -> list[torch.Tensor]:
    outs = []
    for chunk in x.chunk(micro):
        out = model(chunk)
        outs.append(out.detach())
        (out.pow(2).mean() / micro).backward()
    return outs


@pytest.mark.parametrize("micro", [2, 4])
def test_accumulation_gives_a_key_per_micro_batch_and_backward(micro):
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    with fs.watch(model := mlp()) as rec:
        accumulate(model, x, micro)
    stats = rec.stats
    assert not stats.duplicated(KEY).any()
    wg = stats[(stats.kind == "weight_grad") & (stats.layer == "0") & (stats.tensor == "weight")]
    assert wg["backward"].tolist() == list(range(micro))
    assert wg["forward"].tolist() == list(range(micro))
    acts = stats[(stats.kind == "activation") & (stats.layer == "1")]
    assert acts["forward"].tolist() == list(range(micro)) == acts["call"].tolist()
    # the last backward's row is the accumulated gradient the optimizer applies (float64)
    last = wg[wg.backward == micro - 1].iloc[0]
    want = float64_stats(model[0].weight.grad)
    assert last["max"] == pytest.approx(want["max"], rel=1e-6)
    assert last["mean"] == pytest.approx(want["mean"], rel=1e-5, abs=1e-9)


def test_accumulation_outputs_and_gradients_bit_identical():
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(2))
    bare, watched = mlp(), mlp()
    outs_bare = accumulate(bare, x, 4)
    with fs.watch(watched):
        outs_watched = accumulate(watched, x, 4)
    assert all(torch.equal(a, b) for a, b in zip(outs_bare, outs_watched, strict=True))
    for a, b in zip(bare.parameters(), watched.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


def test_expected_passes_keeps_the_last_weight_gradient_and_says_so():
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
    with fs.watch(model := mlp()) as rec:
        accumulate(model, x, 4)
    kept, note = expected_passes(rec.stats)
    wg = kept[kept.kind == "weight_grad"]
    assert set(wg["backward"]) == {3} and len(wg) == 6
    assert note == (
        "weight gradients: the last backward pass of each step (the accumulated gradient),"
        " 18 earlier rows left out"
    )
    assert len(kept[kept.kind == "activation"]) == len(rec.stats.query("kind == 'activation'"))
    d = fs.diagnose(rec)
    assert f"several passes per step: {note}" in d.notes  # beside the mean-field notes
    assert f"note: several passes per step: {note}" in str(d).splitlines()


def test_retain_graph_double_backward_gives_two_backward_passes():
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(4))
    with fs.watch(model := mlp(), kinds=["gradient", "weight_grad"]) as rec:
        loss = model(x).pow(2).mean()
        loss.backward(retain_graph=True)
        loss.backward()
    stats = rec.stats
    assert not stats.duplicated(KEY).any()
    grads = stats[stats.kind == "gradient"]
    assert sorted(set(grads["backward"])) == [0, 1] and set(grads["order"]) == {1}
    # both passes' dL/dh equal; the second weight_grad row holds twice the first (float64)
    first = row(stats, kind="gradient", layer="1", backward=0)
    second = row(stats, kind="gradient", layer="1", backward=1)
    assert first["rms"] == second["rms"]
    w0 = row(stats, kind="weight_grad", layer="0", tensor="weight", backward=0)
    w1 = row(stats, kind="weight_grad", layer="0", tensor="weight", backward=1)
    assert w1["max"] == pytest.approx(2 * w0["max"], rel=1e-6)


def test_gradient_penalty_is_second_order_and_left_out_of_dl_dh():
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(5))
    model = mlp()
    with fs.watch(model) as rec:
        loss = model(x).pow(2).mean()
        params = list(model.parameters())
        g = torch.autograd.grad(loss, params, create_graph=True, retain_graph=True)
        (loss + sum(gi.pow(2).sum() for gi in g)).backward()
    stats = rec.stats
    assert not stats.duplicated(KEY).any()
    grads = stats[stats.kind == "gradient"]
    assert set(zip(grads.backward, grads.order, strict=True)) == {(0, 1), (1, 2)}
    kept, note = expected_passes(stats)
    assert set(kept[kept.kind == "gradient"]["order"]) == {1}
    assert note.startswith("gradients dL/dh: first order only, 5 rows")
    # the first-order row is dL/dh of the loss alone, recomputed in float64
    xd, md = x.double(), mlp().double()
    hd = md[:3](xd)
    hd.retain_grad()
    md[3:](hd).pow(2).mean().backward()
    first = row(kept, kind="gradient", layer="2")
    assert first["rms"] == pytest.approx(hd.grad.pow(2).mean().sqrt().item(), rel=1e-5)


def test_one_pass_keys_are_the_documented_defaults():
    with fs.watch(model := mlp()) as rec:
        model(torch.randn(4, 6)).sum().backward()
    stats = rec.stats
    assert list(stats.columns[:11]) == [
        *("run", "step", "layer_idx", "layer", "module_type", "kind", "call"),
        *("forward", "backward", "order", "tensor"),
    ]
    fwd = stats[stats.kind.isin(["activation", "weight"])]
    bwd = stats[stats.kind.isin(["gradient", "weight_grad"])]
    assert set(fwd.forward) == {0} and set(fwd.backward) == {-1} and set(fwd.order) == {0}
    assert set(bwd.forward) == {0} and set(bwd.backward) == {0} and set(bwd.order) == {1}
    assert expected_passes(stats) == (stats, "")


def test_reentrant_checkpoint_inner_backward_is_the_same_pass():
    from torch.utils.checkpoint import checkpoint

    model = mlp()
    x = torch.randn(4, 6, requires_grad=True)
    with fs.watch(model) as rec:
        checkpoint(model, x, use_reentrant=True).sum().backward()
    grads = rec.stats.query("kind in ['gradient', 'weight_grad']")
    assert len(grads) and set(grads.backward) == {0} and set(grads.order) == {1}


def test_files_written_before_the_pass_columns_still_load(tmp_path):
    with fs.watch(model := mlp()) as rec:
        model(torch.randn(4, 6)).sum().backward()
    rec.save(tmp_path)
    for name in ("stats.parquet", "hists.parquet"):
        frame = pd.read_parquet(tmp_path / name).drop(columns=["forward", "backward", "order"])
        frame.to_parquet(tmp_path / name)
    stats = fs.load(tmp_path).stats
    assert list(stats.columns[7:11]) == ["forward", "backward", "order", "tensor"]
    assert set(stats.backward) == {-1} and set(stats.forward) == {0}
    snaps = rec.snapshots()
    snaps.keys = {k: v for k, v in snaps.keys.items() if k not in ("forward", "backward")}
    snaps.keys["order"] = snaps.keys["order"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    snaps.save(tmp_path / "snapshots.parquet", {})
    table = pq.read_table(tmp_path / "snapshots.parquet").drop(["order"])
    pq.write_table(table, tmp_path / "old.parquet")
    read, _ = Snapshots.read(tmp_path / "old.parquet")
    assert set(read.keys["backward"]) == {-1} and len(read) == len(snaps)
    assert isinstance(pa.__version__, str)


def test_report_says_which_pass_it_shows(tmp_path):
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(6))
    with fs.watch(model := mlp()) as rec:
        accumulate(model, x, 2)
    page = fs.report(rec, tmp_path / "acc")
    html = (page if page.suffix == ".html" else page / "report.html").read_text()
    assert "Several passes per step: weight gradients: the last backward pass" in html


# -- torch.func transforms -----------------------------------------------------------------------


def _func_cases():
    from torch.func import functional_call, grad, jacrev, vmap

    def loss(model, params, xi):
        return functional_call(model, params, (xi[None],)).pow(2).sum()

    def params(model):
        return {k: v.detach() for k, v in model.named_parameters()}

    return {
        "vmap": lambda m, x: vmap(m)(x),
        "per-sample-grads": lambda m, x: vmap(
            grad(lambda p, xi: loss(m, p, xi)), in_dims=(None, 0)
        )(params(m), x),
        "grad": lambda m, x: grad(lambda p, xi: loss(m, p, xi))(params(m), x[0]),
        "jacrev": lambda m, x: jacrev(lambda xi: m(xi))(x[0]),
    }


@pytest.mark.parametrize("case", ["vmap", "per-sample-grads", "grad", "jacrev"])
def test_functorch_transforms_do_not_crash_and_leave_results_alone(case):
    fn = _func_cases()[case]
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(7))
    want = fn(mlp(), x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fs.watch(model := mlp()):
            got = fn(model, x)
            fn(model, x)  # twice: still one warning
    flat = torch.utils._pytree.tree_leaves
    assert all(torch.equal(a, b) for a, b in zip(flat(want), flat(got), strict=True))
    said = [w for w in caught if "torch.func transforms" in str(w.message)]
    assert len(said) == 1
    assert hook_count(model) == 0


def test_vmap_activations_are_the_whole_batch_in_float64():
    from torch.func import vmap

    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fs.watch(model := mlp(), kinds=["activation"]) as rec:
            vmap(model)(x)
    got = row(rec.stats, layer="1")
    want = float64_stats(torch.tanh(model[0](x)))
    assert got["count"] == want["count"] == 40
    assert got["mean"] == pytest.approx(want["mean"], rel=1e-6)


# -- hooks that cannot outlive their watch ---------------------------------------------------------


def test_deepcopy_while_watched_carries_only_inert_hooks_removed_at_close():
    model = mlp()
    rec = fs.watch(model)
    ema = copy.deepcopy(model)
    inert = [h for m in ema.modules() for h in m._forward_hooks.values()]
    assert inert and all(isinstance(h, Inert) for h in inert)
    ema(torch.randn(2, 6)).sum().backward()  # the copy records nothing
    assert rec.recorded == 0
    rec.close()
    assert hook_count(model, ema) == 0


@pytest.mark.parametrize("when", ["watched", "closed"])
def test_an_ema_copy_pickles_and_loads(when):
    model = mlp()
    rec = fs.watch(model)
    ema = copy.deepcopy(model)
    if when == "closed":
        rec.close()
    buf = io.BytesIO()
    torch.save(ema, buf)
    torch.save(model, io.BytesIO())  # the watched model itself pickles too
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(3, 6)
    assert torch.equal(loaded(x), ema(x))
    rec.close()


def test_deepcopy_leaves_the_recorder_collectable():
    model = mlp()
    rec = fs.watch(model)
    ema = copy.deepcopy(model)
    rec.close()
    ref = __import__("weakref").ref(rec)
    del rec
    gc.collect()
    assert ref() is None and hook_count(ema) == 0


def test_a_dropped_recorder_detaches_itself_and_warns_once():
    model = mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fs.watch(model)  # dropped at once
        gc.collect()
    said = [w for w in caught if "dropped without close()" in str(w.message)]
    assert len(said) == 1 and "its 12 hooks were removed" in str(said[0].message)
    assert hook_count(model) == 0
    before = torch.randn(2, 6)
    assert torch.equal(model(before), mlp()(before))


def test_a_closed_recorder_is_not_warned_about():
    model = mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fs.watch(model):
            model(torch.randn(2, 6))
        gc.collect()
    assert not [w for w in caught if "dropped" in str(w.message)]


def test_memory_of_a_watch_never_stepped_is_bounded():
    model = mlp()
    rec = fs.watch(model)
    rec.max_step_rows = 50
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(40):
            model(torch.randn(2, 6)).sum().backward()
    said = [w for w in caught if "without rec.step()" in str(w.message)]
    assert len(said) == 1 and "50 snapshots in step 0" in str(said[0].message)
    assert rec.recorded == 50
    assert len(rec._tensor_hooks) <= 50
    rec.step()  # a new step records again
    model(torch.randn(2, 6))
    assert rec.recorded > 50
    rec.close()
    assert hook_count(model) == 0


def test_exception_inside_the_watch_with_several_passes_leaves_no_hook():
    model = mlp()
    with pytest.raises(ZeroDivisionError), fs.watch(model):
        model(torch.randn(2, 6)).sum().backward(retain_graph=True)
        raise ZeroDivisionError
    assert hook_count(model) == 0


# -- compiled models -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
def test_model_compiled_before_the_watch_records_everything(how):
    torch._dynamo.reset()
    model = mlp()
    if how == "torch.compile":  # the wrapper's graph would skip hooks added later: reset
        run = torch.compile(model, backend="eager")
    else:  # Module.compile compiles __call__ and sees hooks added later: nothing to reset
        model.compile(backend="eager")
        run = model
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(9))
    want = run(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = fs.watch(model)
    said = [w for w in caught if "torch._dynamo.reset() dropped them" in str(w.message)]
    assert len(said) == (how == "torch.compile")
    with rec:
        got = run(x)
        got.sum().backward()
    assert torch.equal(want, got)
    kinds = rec.stats.groupby("kind").size().to_dict()
    assert kinds == {"activation": 5, "gradient": 5, "weight": 6, "weight_grad": 6}
    torch._dynamo.reset()


def test_no_compile_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fs.watch(mlp()):
            pass


# -- parameters and modules replaced inside a watch ----------------------------------------------


def test_replaced_parameter_is_noticed_and_rehooked():
    model = mlp()
    with fs.watch(model, kinds=["weight_grad"]) as rec:
        model(torch.randn(2, 6)).sum().backward()
        rec.step()
        model[2].weight = nn.Parameter(torch.zeros(8, 8))
        with pytest.warns(RuntimeWarning, match=r"parameter '2.weight' was replaced"):
            model(torch.randn(2, 6)).sum().backward()
    got = rec.stats.query("step == 1 and layer == '2' and tensor == 'weight'")
    assert len(got) == 1
    assert got.iloc[0]["max"] == pytest.approx(model[2].weight.grad.double().max().item())
    assert hook_count(model) == 0


def test_replaced_module_is_noticed_at_step_and_hooked():
    model = mlp()
    with fs.watch(model) as rec:
        model(torch.randn(2, 6)).sum().backward()
        old = model[2]
        model[2] = nn.Linear(8, 8)
        with pytest.warns(RuntimeWarning, match=r"module '2' was replaced"):
            rec.step()
        model(torch.randn(2, 6)).sum().backward()
        old(torch.randn(1, 8))  # the old module records no more
    step1 = rec.stats.query("step == 1 and layer == '2'")
    assert set(step1.kind) == {"activation", "gradient", "weight", "weight_grad"}
    assert len(rec.stats.query("layer == '2' and kind == 'activation'")) == 2
    assert hook_count(model, old) == 0


def test_module_added_inside_a_watch_is_said_once_and_hooked():
    model = mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fs.watch(model, kinds=["activation"]) as rec:
            model.append(nn.Tanh())
            for _ in range(3):
                rec.step()
                model(torch.randn(2, 6))
    said = [w for w in caught if "module '5' was added inside the watch" in str(w.message)]
    assert len(said) == 1
    assert sorted(rec.stats.query("layer == '5'").step) == [1, 2, 3]


# -- the integrations' error paths -----------------------------------------------------------------


def _session_steps(session: Session, model: nn.Module, steps: int, fail_at: int) -> None:
    session.start(model)
    for step in range(steps):
        session.resume()
        if step == fail_at:
            raise RuntimeError("boom")
        model(torch.randn(4, 6)).sum().backward()
        session.after_backward()
        session.end_step(step + 1)


def test_session_crash_keeps_what_was_recorded(tmp_path):
    model = mlp()
    session = Session(tmp_path / "run", every=1, report=False)
    with pytest.raises(RuntimeError), pytest.warns(RuntimeWarning, match="RuntimeError during"):
        try:
            _session_steps(session, model, 6, fail_at=3)
        except RuntimeError as err:
            session.crash(err)
            raise
    assert hook_count(model) == 0
    stats = fs.load(tmp_path / "run").stats
    assert sorted(set(stats.step)) == [0, 1, 2]
    model(torch.randn(2, 6))  # inference afterwards records nothing
    assert session.recorder.recorded == len(stats)


class _Handler:
    def __init__(self, callbacks):
        self.callbacks = callbacks

    def on_train_begin(self, model):
        for cb in self.callbacks:
            cb.on_train_begin(None, None, None, model=model)


class FakeHFTrainer:
    """What the callback sees of a Hugging Face Trainer: its handler and training_step."""

    def __init__(self, model, callback, fail_at):
        self.model, self.callback_handler, self.fail_at = model, _Handler([callback]), fail_at
        self.state = type("State", (), {"global_step": 0})()

    def training_step(self, model, x):
        if self.state.global_step == self.fail_at:
            raise RuntimeError("boom")
        model(x).sum().backward()

    def train(self, steps):
        cb = self.callback_handler.callbacks[0]
        self.callback_handler.on_train_begin(self.model)
        for _ in range(steps):
            cb.on_step_begin(None, self.state, None)
            self.training_step(self.model, torch.randn(4, 6))
            cb.on_pre_optimizer_step(None, self.state, None)
            self.state.global_step += 1
            cb.on_step_end(None, self.state, None)
        cb.on_train_end(None, self.state, None)


def test_hf_callback_writes_and_unhooks_when_training_raises(tmp_path):
    pytest.importorskip("transformers")
    from flowscope.integrations.hf import FlowscopeTrainerCallback

    model = mlp()
    callback = FlowscopeTrainerCallback(tmp_path / "hf", every=1, report=False)
    trainer = FakeHFTrainer(model, callback, fail_at=3)
    with pytest.raises(RuntimeError, match="boom"), pytest.warns(RuntimeWarning):
        trainer.train(6)
    assert hook_count(model) == 0
    stats = fs.load(tmp_path / "hf").stats
    assert sorted(set(stats.step)) == [0, 1, 2]
    for _ in range(5):  # later inference: nothing recorded
        model(torch.randn(2, 6))
    assert callback.recorder.recorded == len(stats)


def test_hf_callback_unwraps_training_step_at_the_end(tmp_path):
    pytest.importorskip("transformers")
    from flowscope.integrations.hf import FlowscopeTrainerCallback

    model = mlp()
    callback = FlowscopeTrainerCallback(tmp_path / "hf", every=1, report=False)
    trainer = FakeHFTrainer(model, callback, fail_at=-1)
    trainer.train(2)
    assert "training_step" not in vars(trainer)
    assert sorted(set(fs.load(tmp_path / "hf").stats.step)) == [0, 1]
    assert hook_count(model) == 0


def test_hf_callback_after_a_crash_leaves_no_wrapper_behind(tmp_path):
    pytest.importorskip("transformers")
    from flowscope.integrations.hf import FlowscopeTrainerCallback

    model = mlp()
    callback = FlowscopeTrainerCallback(tmp_path / "hf", every=1, report=False)
    trainer = FakeHFTrainer(model, callback, fail_at=1)
    with pytest.raises(RuntimeError), pytest.warns(RuntimeWarning):
        trainer.train(3)
    trainer.fail_at, trainer.state.global_step = -1, 0
    trainer.train(2)  # again: the method is wrapped once, and unwrapped at the end
    assert "training_step" not in vars(trainer)
    assert hook_count(model) == 0


def test_lightning_callback_keeps_the_data_of_a_crashed_fit(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from flowscope.integrations.lightning import FlowscopeCallback

    class Crashing(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def training_step(self, batch, batch_idx):
            if self.global_step == 4:
                raise RuntimeError("boom at step 4")
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(64, 6))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    module = Crashing()
    callback = FlowscopeCallback(tmp_path / "pl", every=1, report=False)
    trainer = pl.Trainer(
        max_steps=8,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    with pytest.raises(RuntimeError, match="boom"), pytest.warns(RuntimeWarning):
        trainer.fit(module, loader)
    assert hook_count(module) == 0
    stats = fs.load(tmp_path / "pl").stats
    assert sorted(set(stats.step)) == [0, 1, 2, 3]


# -- the study's last step -----------------------------------------------------------------------


def test_study_records_the_last_step_as_documented(tmp_path):
    from flowscope.study import engine, spec

    raw = {
        "name": "last-step",
        "source": {"file": "002_2f5fb56b234155bd.txt", "lines": "850-1350"},
        "net": {"name": "mlp", "in_dim": 6, "width": 6, "depth": 2, "out_dim": 2},
        "init": {"name": "xavier"},
        "data": {"name": "gaussian", "n": 16, "dim": 6, "classes": 2},
        "sweep": {"net.activation": ["tanh"]},
        "run": {"seeds": [0], "steps": 10, "record_every": 4, "kinds": ["activation"]},
        "claim": [],
    }
    engine.run_study(spec.validate(json.loads(json.dumps(raw)), "last.toml"), tmp_path)
    steps = sorted(set(pd.read_parquet(tmp_path / "stats.parquet").step))
    assert steps == [0, 4, 8, 9]


@pytest.mark.parametrize(
    "steps,every,want", [(8, 4, [0, 4, 7]), (9, 4, [0, 4, 8]), (3, 1, [0, 1, 2])]
)
def test_step_record_forces_one_step(steps, every, want):
    model = mlp()
    with fs.watch(model, every=every, kinds=["activation"]) as rec:
        for step in range(steps):
            model(torch.randn(2, 6))
            rec.step(record=step + 2 == steps)
    assert sorted(set(rec.stats.step)) == want


# -- watch's argument bounds -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"bins": 10**7}, "bins must be an integer in [1, 4096], got 10000000"),
        ({"bins": 4097}, "bins must be an integer in [1, 4096], got 4097"),
        (
            {"hist_sample": 2**30},
            "hist_sample must be an integer in [16, 16777216], got 1073741824",
        ),
        (
            {"log_bins_per_decade": 1000},
            "log_bins_per_decade must be an integer in [1, 100], got 1000",
        ),
        ({"bins": 0}, "bins must be an integer >= 1, got 0"),
        (
            {"modules": []},
            "modules is empty: nothing would be recorded; pass module types or name patterns,"
            " or None for every leaf module",
        ),
        ({"modules": "nosuch.*"}, "modules selector 'nosuch.*' matches no module"),
        ({"modules": [nn.Conv2d]}, "modules selector <class 'torch.nn.modules.conv.Conv2d'>"),
    ],
)
def test_watch_rejects_out_of_range_settings_before_any_hook(kwargs, message):
    model = mlp()
    with pytest.raises(FlowscopeError) as err:
        fs.watch(model, **kwargs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert hook_count(model) == 0


def test_watch_accepts_the_bounds_themselves():
    model = mlp()
    with fs.watch(model, bins=4096, log_bins_per_decade=100, kinds=["activation"]) as rec:
        model(torch.randn(2, 6))
    lin = rec.hists.query("hist == 'linear' and layer == '0'")
    assert len(lin) == 4096 and int(lin["count"].sum()) == 16
    assert math.isfinite(float(rec.stats["std"].iloc[0])) and np.all(rec.stats["count"] > 0)


def test_real_hf_trainer_crash_writes_and_unhooks(tmp_path):
    transformers = pytest.importorskip("transformers")
    from flowscope.integrations.hf import FlowscopeTrainerCallback

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.calls = mlp(), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 4:  # the 4th training step (global step 3)
                raise RuntimeError("boom in step 3")
            return {"loss": self.net(x).pow(2).mean()}

    data = [{"x": torch.randn(6)} for _ in range(64)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf-out"),
        max_steps=8,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    model = Net()
    callback = FlowscopeTrainerCallback(tmp_path / "hf", every=1, report=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    with pytest.raises(RuntimeError, match="boom"), pytest.warns(RuntimeWarning):
        trainer.train()
    assert hook_count(model) == 0
    stats = fs.load(tmp_path / "hf").stats
    assert sorted(set(stats.step)) == [0, 1, 2]
    with torch.no_grad():
        for _ in range(3):
            model.net(torch.randn(2, 6))
    assert callback.recorder.recorded == len(stats)
