"""Study files: validation up front with clear errors, overrides, grid expansion."""

from __future__ import annotations

import copy

import pytest
import tomllib

from flowscope.core.errors import FlowscopeError
from flowscope.study import spec

MINIMAL = {
    "name": "tiny",
    "source": {"file": "002_2f5fb56b234155bd.txt", "lines": "850-1350"},
    "net": {"name": "mlp", "in_dim": 8, "width": 8, "depth": 2, "out_dim": 3},
    "init": {"name": "xavier"},
    "data": {"name": "gaussian", "n": 16, "dim": 8, "classes": 3},
    "sweep": {"net.activation": ["tanh", "relu"], "init.name": ["small", "he"]},
    "run": {"seeds": [0, 1]},
    "claim": [
        {
            "id": "c",
            "text": "shrinks",
            "where": {"activation": "tanh"},
            "of": "activation.std",
            "reduce": "gain",
            "below": 0.5,
        }
    ],
}


def with_(path: str, value) -> dict:
    raw = copy.deepcopy(MINIMAL)
    node = raw
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p] if not p.isdigit() else node[int(p)]
    node[leaf] = value
    return raw


def test_grid_is_the_cartesian_product_times_seeds():
    study = spec.validate(copy.deepcopy(MINIMAL))
    configs = study.configs()
    assert len(configs) == 2 * 2 * 2
    assert study.axis_columns == ["activation", "init"]
    first = configs[0]
    assert first.axes == {"activation": "tanh", "init": "small"} and first.seed == 0
    assert first.net["activation"] == "tanh" and first.init["name"] == "small"
    assert "activation" not in MINIMAL["net"]  # expanding leaves the raw spec untouched
    assert len({c.id for c in configs}) == len(configs)
    assert first.columns() == {"config": first.id, "activation": "tanh", "init": "small", "seed": 0}


def test_axis_columns_never_shadow_frame_columns():
    raw = with_("sweep", {"init.std": [0.1, 1.0], "net.depth": [1, 2]})
    raw["init"] = {"name": "normal", "std": 0.5}
    raw["claim"] = []
    study = spec.validate(raw)
    assert study.axis_columns == ["init_std", "depth"]  # "std" is a statistic's column


def test_overrides_parse_toml_values():
    raw = copy.deepcopy(MINIMAL)
    spec.apply_override(raw, "run.seeds=[3, 4, 5]")
    spec.apply_override(raw, "net.width = 4")
    spec.apply_override(raw, "run.loss=mse")  # a bare word is taken as a string
    spec.apply_override(raw, "sweep.net.activation=['elu']")
    study = spec.validate(raw)
    assert study.run["seeds"] == [3, 4, 5] and study.net["width"] == 4
    assert study.run["loss"] == "mse"


def test_fingerprint_ignores_claims_but_not_the_grid():
    a = spec.validate(copy.deepcopy(MINIMAL))
    b = spec.validate(with_("claim", []))
    c = spec.validate(with_("net.width", 9))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("colour", "red", r"unknown study key 'colour'"),
        ("net.name", "mpl", r"unknown net 'mpl'.*did you mean 'mlp'"),
        ("net.widht", 8, r"unknown net 'mlp' argument 'widht'.*did you mean 'width'"),
        ("sweep", {"init.name": ["xavir"]}, r"unknown init 'xavir'.*did you mean 'xavier'"),
        ("sweep", {"net.activation": ["tanh", "relux"]}, r"unknown activation 'relux'"),
        ("sweep", {"activation": ["tanh"]}, r"sweep axis 'activation' must be a dotted key"),
        ("sweep", {"net.depth": []}, r"needs a non-empty list"),
        ("sweep", {"run.stepz": [1]}, r"unknown run setting 'stepz'.*did you mean 'steps'"),
        ("run", {"steps": -1}, r"run\.steps must be an integer >= 0, got -1"),
        ("run", {"device": "tpu"}, r"unknown run\.device 'tpu'.*Allowed: cpu, cuda"),
        ("run", {"lr": 0}, r"run\.lr must be a number > 0, got 0"),
        ("run", {"seeds": []}, r"run\.seeds must be a non-empty list of integers"),
        ("run", {"probes": ["dead_unit"]}, r"unknown probe 'dead_unit'.*did you mean"),
        ("data.dimm", 3, r"unknown data 'gaussian' argument 'dimm'.*did you mean 'dim'"),
        ("source", {"file": "x"}, r"\[source\] needs 'file' and 'lines'"),
        ("claim.0.of", "activation.stdd", r"unknown claim 'of' statistic 'stdd'"),
        ("claim.0.of", "activations.std", r"did you mean 'activation'"),
        ("claim.0.reduce", "avg", r"unknown reduce 'avg'"),
        ("claim.0.where", {"activaton": "tanh"}, r"did you mean 'activation'"),
        ("claim.0.above", 1.0, r"exactly one of below, above, between, expect"),
        ("claim.0.colour", 1.0, r"unknown claim key 'colour'"),
    ],
)
def test_bad_specs_fail_clearly_before_any_work(path, value, message):
    with pytest.raises(FlowscopeError, match=message):
        spec.validate(with_(path, value), "my.toml")


def test_error_names_the_config_that_is_wrong():
    raw = with_("sweep", {"net.depth": [2, 0]})
    with pytest.raises(
        FlowscopeError, match=r"config 3 of 4: net .mlp.: depth must be an integer >= 1, got 0"
    ):
        spec.validate(raw, "my.toml")


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FlowscopeError, match=r"unknown study 'init-scale'.*did you mean"):
        spec.load("init-scale")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed")
    with pytest.raises(FlowscopeError, match=r"not valid TOML"):
        spec.load(str(bad))
    with pytest.raises(FlowscopeError, match=r"does not exist"):
        spec.load(str(tmp_path / "nope.toml"))
    with pytest.raises(FlowscopeError, match=r"--set needs key=value"):
        spec.load("init-scales", ["run.steps"])


@pytest.mark.parametrize("name", spec.builtin_names())
def test_every_builtin_study_is_valid_and_names_its_source(name):
    study = spec.load(name)
    assert study.source["file"].endswith(".txt") and study.source["lines"]
    assert study.claims, "every built-in study states its source's claims"
    raw = tomllib.loads((spec.builtin_dir() / f"{name}.toml").read_text())
    assert raw["name"] == name
