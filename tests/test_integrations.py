"""Lightning and Hugging Face callbacks, loss scaling, and the report hook.

Lightning and transformers are dev dependencies: a missing one fails its tests with the
command that installs it (they are never skipped).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import nn

import flowscope as fs
from flowscope.core.errors import FlowscopeError
from flowscope.integrations import Session, shift_log_hist, unscale_pending
from flowscope.record.snapshot import LogEdges

ROOT = Path(__file__).resolve().parents[1]


def require(module: str, extra: str) -> ModuleType:
    """Import a dev dependency, or fail the test saying how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        pytest.fail(
            f"{module} is needed by this test ({err}); it is a dev dependency: "
            f"pip install -e '.[dev]' (or pip install 'flowscope[{extra}]')",
            pytrace=False,
        )


# -- Lightning --------------------------------------------------------------------------------

BATCH, WIDTH, STEPS = 8, 16, 4


def _lightning_module(pl: ModuleType) -> object:
    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(5, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 3))
            self.initial = {k: v.clone() for k, v in self.net.state_dict().items()}

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Tiny()


def _loader() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(
        torch.randn(64, 5, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    )
    return torch.utils.data.DataLoader(data, batch_size=BATCH)


def _fit(pl: ModuleType, callback: object, **trainer_kwargs: object) -> object:
    module = _lightning_module(pl)
    settings: dict[str, object] = {
        "max_steps": STEPS,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "val_check_interval": 2,
        "limit_val_batches": 2,
        "num_sanity_val_steps": 1,
    }
    trainer = pl.Trainer(callbacks=[callback], **{**settings, **trainer_kwargs})
    trainer.fit(module, _loader(), _loader())
    return module


def test_lightning_callback_records_training_steps_only(tmp_path):
    pl = require("lightning.pytorch", "lightning")
    from flowscope.integrations.lightning import FlowscopeCallback

    callback = FlowscopeCallback(tmp_path / "run", every=2, report=False)
    module = _fit(pl, callback)
    stats = fs.load(tmp_path / "run").stats
    assert sorted(stats.step.unique()) == [0, 2]
    assert set(stats.kind) == {"activation", "gradient", "weight", "weight_grad"}
    assert stats.call.eq(0).all()  # sanity check and validation batches were not recorded
    act = stats.query("kind == 'activation' and layer == 'net.0'").set_index("step")
    assert act.loc[0, "count"] == BATCH * WIDTH
    first = next(iter(_loader()))[0]
    expected = nn.functional.linear(first, module.initial["0.weight"], module.initial["0.bias"])
    np.testing.assert_allclose(act.loc[0, "std"], expected.std(unbiased=False).item(), rtol=1e-5)
    assert callback.recorder is not None and callback.recorder.closed


def test_lightning_fp16_grad_scaler_gradients_are_unscaled(tmp_path):
    pl = require("lightning.pytorch", "lightning")
    from lightning.pytorch.plugins import MixedPrecision

    from flowscope.integrations.lightning import FlowscopeCallback

    runs = {}
    for label, enabled in (("scaled", True), ("plain", False)):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=enabled)
        callback = FlowscopeCallback(tmp_path / label, every=1, report=False)
        _fit(pl, callback, max_steps=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
        runs[label] = fs.load(tmp_path / label).stats.set_index(["layer", "kind", "tensor"])
    for kind in ("gradient", "weight_grad"):
        a = runs["scaled"].xs(kind, level="kind")
        b = runs["plain"].xs(kind, level="kind")
        np.testing.assert_allclose(a["std"], b["std"], rtol=1e-2)  # fp16: not 4096x
        np.testing.assert_allclose(a["absmax"], b["absmax"], rtol=1e-2)


# -- Hugging Face -----------------------------------------------------------------------------


def _gpt2(transformers: ModuleType) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def test_hf_trainer_callback_records_steps_and_not_evaluation(tmp_path):
    transformers = require("transformers", "hf")
    require("accelerate", "hf")
    from flowscope.integrations.hf import FlowscopeTrainerCallback

    model = _gpt2(transformers)
    initial = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(0, 50, (8,), generator=gen)), "labels": ids}
            for _ in range(8)]  # fmt: skip
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=2,
        per_device_eval_batch_size=2, eval_strategy="steps", eval_steps=1, report_to=[],
        use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    callback = FlowscopeTrainerCallback(tmp_path / "run", every=2, report=False)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=rows, eval_dataset=rows[:2], callbacks=[callback]
    )
    trainer.train()
    stats = fs.load(tmp_path / "run").stats
    assert sorted(stats.step.unique()) == [0, 2]
    assert stats.call.eq(0).all()  # evaluation after every step was not recorded
    assert {"activation", "gradient", "weight", "weight_grad"} == set(stats.kind)
    weight = stats.query("kind == 'weight' and layer == 'transformer.h.0.mlp.c_fc' and step == 0")
    np.testing.assert_allclose(weight["std"].iloc[0], initial.std(unbiased=False).item(), rtol=1e-5)
    act = stats.query("kind == 'activation' and layer == 'transformer.h.0.mlp.c_fc'")
    assert (act["count"] == 2 * 8 * 64).all()  # batch x tokens x 4*n_embd


# -- loss scaling -----------------------------------------------------------------------------


def _scaled_run(scaler: torch.amp.GradScaler | None) -> fs.Recorder:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = fs.watch(model, kinds=["gradient", "weight_grad"], log_bins_per_decade=4)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        loss = model(x).pow(2).mean()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            unscale_pending(rec, fs_loss_scale(scaler))
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
        rec.step()
    rec.close()
    return rec


def fs_loss_scale(scaler: torch.amp.GradScaler) -> torch.Tensor | float | None:
    from flowscope.integrations import loss_scale

    return loss_scale(scaler)


def test_grad_scaler_snapshots_divided_exactly_except_the_log_bins():
    scaled = _scaled_run(torch.amp.GradScaler("cpu", init_scale=2.0**16))
    plain = _scaled_run(None)
    keys = ["step", "layer", "kind", "tensor"]
    a = scaled.stats.sort_values(keys).reset_index(drop=True)
    b = plain.stats.sort_values(keys).reset_index(drop=True)
    for col in ("count", "mean", "std", "min", "max", "frac_zero"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-6, atol=1e-12, err_msg=col)
    lin_a = scaled.hists.query("hist == 'linear'").sort_values([*keys, "bin"])
    lin_b = plain.hists.query("hist == 'linear'").sort_values([*keys, "bin"])
    np.testing.assert_array_equal(lin_a["count"], lin_b["count"])
    for key, log_b in plain.hists.query("hist == 'log'").groupby(keys):
        log_a = scaled.hists.query("hist == 'log'").set_index(keys).loc[key]
        grid = np.arange(LogEdges(per_decade=4).size)
        got = np.zeros(len(grid))
        exact = np.zeros(len(grid))
        np.add.at(got, log_a["bin"].to_numpy(), log_a["count"].to_numpy())
        np.add.at(exact, log_b["bin"].to_numpy(), log_b["count"].to_numpy())
        assert got.sum() == pytest.approx(exact.sum())
        gap = np.abs(np.cumsum(got) - np.cumsum(exact))[:-1]
        assert np.all(gap <= exact[:-1] + exact[1:] + 1e-9), key  # at most one bin off


def test_shift_log_hist_by_whole_decades_is_exact_and_keeps_zero_and_inf_bins():
    edges = LogEdges(lo=-4, hi=4)
    x = torch.tensor([0.0, 3e-3, -0.5, 20.0, 7e3, float("inf"), -2e-5])  # overflow: Inf only
    from flowscope.record.snapshot import HistSpec, snapshot

    spec = HistSpec(log=edges)
    before = snapshot(x, spec)[2]
    after = shift_log_hist(before, torch.tensor(100.0, dtype=torch.float64), edges)
    expected = snapshot(x / 100, spec)[2]
    torch.testing.assert_close(after, expected)


def test_unscale_rejects_a_bad_scale_and_ignores_none():
    rec = fs.watch(nn.Linear(2, 2))
    assert unscale_pending(rec, None) == 0
    with pytest.raises(FlowscopeError, match="loss scale"):
        unscale_pending(rec, 0.0)


# -- the session, the report hook, lazy imports ------------------------------------------------


def test_session_validates_at_once(tmp_path):
    with pytest.raises(FlowscopeError, match="every"):
        Session(tmp_path, every=0)
    with pytest.raises(FlowscopeError, match="dirpath"):
        Session("", every=1)
    with pytest.raises(FlowscopeError, match="watch_kwargs"):
        Session(tmp_path, watch_kwargs={"every": 3})


def test_session_writes_and_calls_the_reporter(tmp_path, monkeypatch):
    report = require("flowscope.reporter.page", "report")
    called = []
    monkeypatch.setattr(report, "report", lambda path: called.append(Path(path)))
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    session = Session(tmp_path / "s", every=1)
    session.start(model)
    model(torch.randn(2, 3))  # before the first batch: paused, not recorded
    for step in range(2):
        session.resume()
        model(torch.randn(4, 3)).sum().backward()
        session.after_backward()
        session.end_step(step + 1)
    assert session.finish() == tmp_path / "s" and called == [tmp_path / "s"]
    stats = fs.load(tmp_path / "s").stats
    assert sorted(stats.step.unique()) == [0, 1] and stats["call"].eq(0).all()


def test_a_finished_session_on_another_rank_writes_nothing_at_exit(tmp_path, monkeypatch):
    """finish() on rank 1 merges and writes nothing; the crash path (the HF Trainer's
    finalizer at exit) must not write a rank1 folder afterwards."""
    import flowscope.integrations as integrations

    monkeypatch.setattr(integrations, "rank_and_world", lambda group=None: (1, 2))
    monkeypatch.setattr(integrations, "merge_pending", lambda rec: rec.flush())
    model = nn.Linear(3, 3)
    session = Session(tmp_path / "s", every=1, report=False)
    session.start(model)
    session.resume()
    model(torch.randn(4, 3)).sum().backward()
    session.end_step(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the crash warning would raise
        assert session.finish() is None and session.crash() is None
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("module", "blocked"),
    [
        (
            "flowscope.integrations.lightning",
            ["lightning", "lightning.pytorch", "pytorch_lightning"],
        ),
        ("flowscope.integrations.hf", ["transformers"]),
    ],
)
def test_integration_without_its_package_says_how_to_install(module, blocked, monkeypatch):
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=r"pip install 'flowscope\["):
        importlib.import_module(module)


def test_flowscope_and_its_integration_helpers_do_not_import_frameworks():
    code = (
        "import flowscope, flowscope.integrations, flowscope.integrations.distributed\n"
        "import flowscope.reporter.export, flowscope.reporter.notebook\n"
        "import sys\nprint(' '.join(sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    loaded = {name.split(".")[0] for name in out.stdout.split()}
    assert not loaded & {"lightning", "pytorch_lightning", "transformers", "tensorboard"}


# -- notebooks ----------------------------------------------------------------------------------


def test_recorder_html_before_and_after_recording_escapes_names():
    from flowscope.reporter.notebook import recorder_html

    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    rec = fs.watch(model, modules=["0", "1"])
    assert "Nothing recorded yet" in recorder_html(rec)
    model(torch.randn(2, 3)).sum().backward()
    page = recorder_html(rec)
    assert "snapshot(s) waiting on the device" in page
    assert "<table>" in page and "act std" in page and "grad std" in page
    rec.close()
    assert "closed" in recorder_html(rec)


def test_records_html_flags_nonfinite_and_lists_runs():
    import pandas as pd

    from flowscope.record.frames import Records
    from flowscope.reporter.notebook import layer_table, records_html

    parts = []
    for name, scale in (("a", 1.0), ("b<i>", float("inf"))):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
        with fs.watch(model, name=name) as rec:
            model(torch.randn(4, 3) * scale)
        parts.append(rec.records())
    both = Records(
        pd.concat([p.stats for p in parts], ignore_index=True),
        pd.concat([p.hists for p in parts], ignore_index=True),
        parts[0].meta,
    )
    table = layer_table(both.stats)
    assert table.run.tolist() == ["a", "a", "b<i>", "b<i>"]  # all-NaN rows are kept
    nonfinite = table["nan+inf"].tolist()
    assert nonfinite[:2] == [0, 0] and nonfinite[2] == 12 and nonfinite[3] > 0
    page = records_html(both, max_rows=3)
    assert "2 run(s)" in page and "b&lt;i&gt;" in page and "<i>" not in page  # escaped
    assert 'class=" bad">12<' in page and "... 1 more" in page
    assert "<img" in records_html(parts[0], figure=True)
