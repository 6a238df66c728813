"""The built-in studies run end to end (reduced sizes) and their numbers match theory."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from flowscope.cli.main import main
from flowscope.study import engine, spec

# Smaller nets and batches than the lectures', so the whole set runs in seconds.
REDUCED = {
    "init-scales": ["net.width=100", "net.in_dim=100", "data.dim=100", "data.n=200"],
    "symmetry": [],
    "activations": ["net.width=64", "net.in_dim=64", "data.dim=64"],
    "depth": ["sweep.net.depth=[5, 10, 20]", "net.width=32", "net.in_dim=32", "data.dim=32"],
    "batchnorm": ["net.width=64", "net.in_dim=64", "data.dim=64", "data.n=256", "run.warmup=100"],
    "isometry": [
        "net.width=16",
        "net.in_dim=16",
        "data.dim=16",
        "sweep.net.depth=[4, 8, 64]",
        "run.seeds=[0]",
    ],
    "edge-of-chaos": [
        "net.width=32",
        "net.in_dim=32",
        "data.dim=32",
        "data.n=16",
        "sweep.init.sigma_b2=[0.05, 0.2]",
        "run.seeds=[0]",
    ],
    "trainability": ["net.width=16", "net.in_dim=16", "data.dim=16", "run.steps=5", "run.seeds=0"],
    "residual": ["net.width=64", "data.dim=64", "data.n=64", "sweep.net.depth=[4, 8]"],
    "width": ["sweep.net.width=[32, 64, 128]", "run.base_width=32", "run.steps=2", "run.seeds=[0]"],
    "residual-conv": ["net.channels=8", "data.channels=8", "data.n=16", "run.seeds=[0]"],
}


def test_every_builtin_study_has_a_reduced_run_here():
    assert sorted(REDUCED) == spec.builtin_names()


@pytest.fixture(scope="module")
def init_scales(tmp_path_factory):
    study = spec.load("init-scales", REDUCED["init-scales"])
    return engine.run_study(study, tmp_path_factory.mktemp("init-scales"))


@pytest.mark.parametrize("name", [n for n in REDUCED if n != "init-scales"])
def test_builtin_study_runs_and_evaluates_every_claim(name, tmp_path):
    study = spec.load(name, REDUCED[name])
    result = engine.run_study(study, tmp_path)
    assert not result.failed
    assert len(result.claims) == len(study.claims)
    for verdict in result.claims:
        assert verdict.status != "not measured", (verdict.id, verdict.detail)
        assert verdict.held == {"held": True, "not held": False}.get(verdict.status)
        assert verdict.numbers["value"], verdict.id


def per_layer(result, activation: str, init: str, stat: str = "rms", seed: int = 0) -> np.ndarray:
    rows = result.stats.query(
        "activation == @activation and init == @init and norm == 'none' and seed == @seed "
        "and kind == 'activation' and layer.str.endswith('.act')"
    ).sort_values("layer_idx")
    return rows[stat].to_numpy()


def test_init_scales_tanh_small_shrinks_by_sigma_sqrt_n(init_scales):
    # tanh(s) ~ s for tiny s, so each layer multiplies the scale by sigma * sqrt(n) = 0.1
    rms = per_layer(init_scales, "tanh", "small")
    assert len(rms) == 10
    assert rms[1:] / rms[:-1] == pytest.approx(np.full(9, 0.01 * math.sqrt(100)), rel=0.1)


def test_init_scales_relu_he_keeps_the_second_moment(init_scales):
    # He: E[x_l^2] = (2/n) * n * E[relu(s)^2] / ... = E[x_{l-1}^2]: rms flat across layers
    rms = per_layer(init_scales, "relu", "he")
    assert rms.max() / rms.min() < 1.6
    assert np.exp(np.mean(np.log(rms[1:] / rms[:-1]))) == pytest.approx(1.0, abs=0.06)


def test_init_scales_relu_xavier_halves_the_variance(init_scales):
    rms = per_layer(init_scales, "relu", "xavier")
    gain = np.exp(np.mean(np.log(rms[1:] / rms[:-1])))
    assert gain**2 == pytest.approx(0.5, abs=0.06)


def test_init_scales_batchnorm_normalises_every_layer(init_scales):
    acts = init_scales.stats.query("norm == 'batchnorm' and kind == 'activation'")
    bn = acts[acts.layer.str.endswith(".norm")].set_index(["config", "layer"])
    lin = acts[acts.layer.str.endswith(".linear")].copy()
    lin["layer"] = lin.layer.str.replace(".linear", ".norm")
    var = lin.set_index(["config", "layer"])["std"].reindex(bn.index) ** 2
    assert bn["mean"].abs().max() < 1e-4
    # per feature (s - mu) / sqrt(v + eps): the std is sqrt(v / (v + eps)), eps = 1e-5
    expected = np.sqrt(var / (var + 1e-5)).to_numpy()
    assert bn["std"].to_numpy() == pytest.approx(expected, abs=2e-3)


def test_init_scales_claims_are_recorded_with_numbers(init_scales):
    claims = {v.id: v for v in init_scales.claims}
    assert claims["tanh-small-activations-collapse"].held is True
    assert claims["relu-large-activations-explode"].held is True
    assert claims["batchnorm-reduces-init-dependence"].held is True
    # the lecture says ~90-95% of ReLU gradients are zero; at the pre-activation it is ~50%
    mostly_zero = claims["relu-small-gradients-mostly-zero"]
    assert mostly_zero.held is False and mostly_zero.numbers["seeds"] == 3
    assert list(mostly_zero.numbers["value"].values()) == pytest.approx([0.5] * 3, abs=0.05)


# -- the CLI -----------------------------------------------------------------------------


def test_cli_study_list_and_show():
    runner = CliRunner()
    listed = runner.invoke(main, ["study", "list"])
    assert listed.exit_code == 0
    assert [line.split()[0] for line in listed.output.splitlines()] == spec.builtin_names()
    shown = runner.invoke(main, ["study", "show", "symmetry", "--set", "run.steps=2"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["run"]["steps"] == 2


def test_cli_study_run_and_resume(tmp_path):
    runner = CliRunner()
    args = ["study", "run", "symmetry", "--out", str(tmp_path), "--no-report", "--seeds", "0"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "held" in first.output and "5 configs run now" in first.output
    again = runner.invoke(main, args)
    assert "0 configs run now, 5 resumed" in again.output


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["study", "run", "init-scale"], 1, "unknown study 'init-scale'"),
        (["study", "run", "symmetry", "--set", "run.lr=-1"], 1, "run.lr must be a number > 0"),
        (["study", "run", "symmetry", "--seeds", "a,b"], 1, "--seeds takes integers"),
        (["study", "run", "symmetry", "--device", "tpu"], 2, "Invalid value for '--device'"),
        (["study", "show", "symmetry", "--set", "net.depht=2"], 1, "did you mean 'depth'"),
    ],
)
def test_cli_bad_input_is_one_clear_line(args, code, message, tmp_path):
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path)] if "run" in args else args)
    assert result.exit_code == code
    assert message in result.output
    assert "Traceback" not in result.output
