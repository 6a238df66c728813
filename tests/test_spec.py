"""Study files: validation up front with clear errors, overrides, grid expansion."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowscope.cli.main import main
from flowscope.core.errors import FlowscopeError
from flowscope.study import spec
from flowscope.study.spec_models import json_schema

DOCS = Path(__file__).resolve().parents[1] / "docs"

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
        ("source", {"file": "x"}, r"missing required key 'source.lines' \(the lines it repro"),
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
    src = study.source  # a lecture file of the seeds, or a paper with its address
    assert src["file"].endswith(".txt") or src.get("url", "").startswith("https://"), src
    assert src["lines"]
    assert study.claims, "every built-in study states its source's claims"
    raw = spec.read(name)
    assert raw["name"] == name


# -- the models behind the checks, and the schema published from them --------------------------


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("run", {"steps": -1}, "my.toml: run.steps must be an integer >= 0, got -1"),
        ("run", {"seeds": 1.5}, "run.seeds must be a non-empty list of integers (or one), got 1.5"),
        ("run", {"lr": True}, "my.toml: run.lr must be a number > 0, got True"),
        ("net", "mlp", "my.toml: 'net' must be a table, got 'mlp'"),
        ("presets", {"a": "he"}, "my.toml: presets.a must be a table of strings, got 'he'"),
        ("init.overrides", {"head": 3}, "my.toml: init.overrides.head must be a string, got 3"),
        ("claim.0.between", [1], "my.toml, claim 1 (c): 'between' must be a list of 2 numbers"),
        ("claim.0.id", 3, "my.toml, claim 1: 'id' must be a string, got 3"),
        ("claim", [3], "my.toml, claim 1: each [[claim]] must be a table, got 3"),
        (
            "sweep",
            {"run.lr": [0.1, 0]},
            "my.toml, config 3 of 4: run.lr must be a number > 0, got 0",
        ),
    ],
)
def test_errors_are_one_line_naming_file_key_value_and_what_is_allowed(path, value, message):
    with pytest.raises(FlowscopeError) as caught:
        spec.validate(with_(path, value), "my.toml")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value) and "pydantic" not in str(caught.value)


def test_a_wrong_value_is_told_before_a_key_not_written_yet():
    with pytest.raises(FlowscopeError, match=r"'net' must be a table, got 'mlp'"):
        spec.validate({"name": "x", "net": "mlp"}, "my.toml")  # also no source, init, data


def test_values_are_kept_as_written():
    raw = with_("claim.0.below", 1)
    raw["run"] = {"seeds": 3, "lr": 1}
    study = spec.validate(raw)
    assert study.claims[0]["below"] == 1 and isinstance(study.claims[0]["below"], int)
    assert study.run["lr"] == 1 and isinstance(study.run["lr"], int)
    assert study.run["seeds"] == [3]  # one seed is a list of one
    assert list(study.claims[0]) == [*MINIMAL["claim"][0]]  # the file's key order


def test_run_limits_agree_with_the_recorder():
    from flowscope.record.recorder import KINDS, hist_spec

    run = json_schema()["$defs"]["Run"]["properties"]
    assert tuple(run["kinds"]["items"]["enum"]) == KINDS == spec.STAT_KINDS
    bins, sample = run["bins"]["minimum"], run["hist_sample"]["minimum"]
    hist_spec(bins, sample, 1)
    for too_few in ((bins - 1, sample), (bins, sample - 1)):
        with pytest.raises(FlowscopeError):
            hist_spec(*too_few, 1)


def test_the_committed_schema_is_the_generated_one():
    committed = json.loads((DOCS / "study.schema.json").read_text())
    assert committed == json_schema(), "run: flowscope study schema > docs/study.schema.json"
    shown = CliRunner().invoke(main, ["study", "schema"])
    assert shown.exit_code == 0 and json.loads(shown.output) == committed


def test_every_key_of_the_schema_is_documented():
    schema, text = json_schema(), (DOCS / "STUDIES.md").read_text()
    tables = [schema, *schema["$defs"].values()]
    keys = {key for table in tables for key in table.get("properties", {})}
    assert not {key for key in keys if f"`{key}`" not in text}


@pytest.mark.parametrize("name", spec.builtin_names())
def test_every_builtin_study_passes_the_schema(name):
    jsonschema = pytest.importorskip("jsonschema")  # a dev dependency
    jsonschema.validate(spec.read(name), json_schema())


def test_cli_start_imports_neither_pydantic_nor_torch():
    code = "import sys, flowscope.cli.main; print(' '.join(sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert not {"pydantic", "torch"} & {m.split(".")[0] for m in loaded.stdout.split()}


def test_a_built_in_name_is_found_next_to_a_run_folder_of_that_name(tmp_path, monkeypatch):
    # `flowscope study run init-scales --out init-scales` leaves a folder of the study's name
    # in the working directory; the name must still mean the built-in study
    monkeypatch.chdir(tmp_path)
    (tmp_path / "init-scales").mkdir()
    assert spec.find("init-scales") == spec.builtin_dir() / "init-scales.toml"
    (tmp_path / "mine").mkdir()
    with pytest.raises(FlowscopeError, match="'mine' is a directory"):
        spec.find("mine")


def test_two_claims_with_one_id_are_refused():
    raw = spec.read("init-scales")
    raw["claim"] = [raw["claim"][0], {**raw["claim"][1], "id": raw["claim"][0]["id"]}]
    with pytest.raises(FlowscopeError, match=r"claims 1 and 2 share the id 'tanh-small"):
        spec.validate(raw, "init-scales.toml")


AGAINST_AN_AXIS = {"predicted": "probe.meanfield_grad", "across": "init", "expect": "same",
                   "below": None}  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"predicted": "gradient.rms"}, "predicted must be probe.NAME, got 'gradient.rms'"),
        ({"predicted": "probe.meanfield_gard"}, "meanfield_gard"),
        (AGAINST_AN_AXIS, "predicted goes with below/above/between"),
    ],
)
def test_a_bad_prediction_is_one_clear_line(extra, message):
    raw = spec.read("init-scales")
    first = {**raw["claim"][0], **extra}
    raw["claim"] = [{k: v for k, v in first.items() if v is not None}]
    with pytest.raises(FlowscopeError, match=re.escape(message)) as err:
        spec.validate(raw, "init-scales.toml")
    assert "\n" not in str(err.value)
