"""Bad user input through the CLI: one clear ``Error:`` line naming the value and what is
allowed, a non-zero exit, no traceback, and no work started (no run folder written)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from conftest import TINY_STUDY, study_toml
from flowscope.cli import doctor_cmd as doctor_cli
from flowscope.cli.main import main

STUDY = study_toml(TINY_STUDY)


def error_line(result: Result, code: int = 1) -> str:
    """The one ``Error:`` line of a failed command (checked: exit code, no traceback)."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def edited(text: str, section: str, line: str) -> str:
    """The study with ``line`` set in ``[section]`` (replacing the key if it is there)."""
    key = line.split("=")[0].strip()
    lines, out, current = text.splitlines(), [], ""
    for old in lines:
        if old.startswith("["):
            if current == section:
                out.append(line)
                line = ""
            current = old.strip("[]")
        if current == section and old.split("=")[0].strip() == key:
            continue
        out.append(old)
    if line:
        out += ([] if current == section else [f"[{section}]"]) + [line]
    return "\n".join(out) + "\n"


def run_file(tmp_path: Path, text: str, *extra: str) -> tuple[Result, Path]:
    path = tmp_path / "study.toml"
    path.write_text(text)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["study", "run", str(path), "--out", str(out), *extra])
    return result, out


# (section, line, what the error line must say)
WRONG_IN_FILE = [
    ("run", "seeds = 1.5", "run.seeds must be a non-empty list of integers (or one), got 1.5"),
    ("run", "seeds = [0, 1.5]", "got [0, 1.5]"),
    ("run", 'seeds = "0"', "run.seeds must be a non-empty list of integers (or one), got '0'"),
    ("run", 'kinds = "activation"', "run.kinds must be a non-empty list of activation, gradient"),
    ("run", 'probes = "dead_units"', "run.probes must be a list of strings, got 'dead_units'"),
    ("run", "modules = 3", "run.modules must be a list of strings, got 3"),
    ("run", 'kinds = ["activations"]', "unknown run.kinds entry 'activations'"),
    ("run", "kinds = []", "run.kinds must be a non-empty list of activation, gradient, weight"),
    ("run", "hist_sample = 4", "run.hist_sample must be an integer >= 16, got 4"),
    ("run", "lr = true", "run.lr must be a number > 0, got True"),
    ("run", "steps = 2.5", "run.steps must be an integer >= 0, got 2.5"),
    ("run", 'dtype = "float16"', "unknown run.dtype 'float16'"),
    ("run", 'mode = "training"', "did you mean 'train'"),
    ("net", "depth = -2", "net 'mlp': depth must be an integer >= 1, got -2"),
    ("net", 'width = "8"', "width must be an integer >= 1, got '8'"),
    ("data", "classes = 1", "classes must be an integer >= 2, got 1"),
    ("sweep", '"net.activation" = "tanh"', "needs a non-empty list of values, got 'tanh'"),
    ("sweep", '"net.activation" = ["tanh", "relux"]', "unknown activation 'relux'"),
    ("presets", 'half = "he"', "presets.half must be a table of strings, got 'he'"),
]


@pytest.mark.parametrize(("section", "line", "message"), WRONG_IN_FILE)
def test_wrong_values_in_a_study_file(tmp_path, section, line, message):
    text = edited(STUDY, section, line)
    result, out = run_file(tmp_path, text)
    line_out = error_line(result)
    assert message in line_out
    assert "study.toml" in line_out  # where
    assert not out.exists()  # validated before any work


def test_allowed_names_are_listed(tmp_path):
    line = error_line(run_file(tmp_path, edited(STUDY, "run", 'kinds = ["activations"]'))[0])
    assert "did you mean 'activation'? Allowed: activation, gradient, weight, weight_grad" in line


def test_an_init_parameter_out_of_range_names_the_file_and_config(tmp_path):
    text = STUDY.replace('name = "xavier"', 'name = "normal"\nstd = -1')
    line = error_line(run_file(tmp_path, text)[0])
    assert "study.toml, config 1 of 2: init 'normal': std=-1 is not allowed" in line
    assert "std must be a finite number >= 0" in line


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "missing required key 'name'"),
        ('name = "x"\nnet = "mlp"\n', "'net' must be a table, got 'mlp'"),
        ("name = 3\n", "'name' must be a string, got 3"),
        ("name = [unclosed", "not valid TOML"),
        ("\x00\x01binary", "not valid TOML"),
    ],
    ids=["empty", "string-for-table", "int-for-string", "broken", "binary"],
)
def test_malformed_study_files(tmp_path, text, message):
    result, out = run_file(tmp_path, text)
    assert message in error_line(result)
    assert not out.exists()


def test_missing_file_and_directory_as_study_file(tmp_path):
    line = error_line(CliRunner().invoke(main, ["study", "run", str(tmp_path / "nope.toml")]))
    assert "study file" in line and "nope.toml' does not exist" in line
    line = error_line(CliRunner().invoke(main, ["study", "show", str(tmp_path)]))
    assert f"study file {str(tmp_path)!r} is a directory, not a TOML file" in line
    line = error_line(CliRunner().invoke(main, ["study", "run", "no-such-study"]))
    assert "unknown study 'no-such-study'" in line and "Allowed: activations" in line


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--seeds", "1.5"], 1, "--seeds takes integers like 0,1,2; got '1.5'"),
        (["--seeds", ""], 1, "--seeds takes integers like 0,1,2; got ''"),
        (["--set", "run.steps"], 1, "--set needs key=value (e.g. run.steps=10), got 'run.steps'"),
        (["--set", "=3"], 1, "--set needs key=value"),
        (["--set", "run.steps=-3"], 1, "run.steps must be an integer >= 0, got -3"),
        (["--set", "run.seeds=[]"], 1, "run.seeds must be a non-empty list of integers"),
        (["--set", "sweep.net.width=8"], 1, "sweep axis 'net.width' needs a non-empty list"),
        (["--set", "net.depth=1e9"], 1, "depth must be an integer >= 1, got 1000000000.0"),
        (["--set", "run.colour=1"], 1, "unknown run setting 'colour'"),
        (["--device", "gpu"], 2, "Invalid value for '--device': 'gpu' is not one of 'cpu', 'cuda'"),
        (["--seed", "3"], 2, "No such option '--seed'. (Did you mean one of: '--seeds'"),
    ],
)
def test_bad_cli_options(tmp_path, args, code, message):
    result, out = run_file(tmp_path, STUDY, *args)
    assert message in error_line(result, code)
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["study", "run"], "Missing argument 'NAME_OR_FILE'"),
        (["study", "runn", "x"], "No such command 'runn'"),
        (["studies"], "No such command 'studies'"),
    ],
)
def test_usage_errors_exit_2(args, message):
    assert message in error_line(CliRunner().invoke(main, args), 2)


# -- the doctor CLI (another engineer's; the gaps its own tests leave) -------------------------


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "typo.py").write_text("def make_net(:\n    pass\n")
    (pkg / "sideeffect.py").write_text("raise RuntimeError('needs a GPU cluster')\n")
    (pkg / "models.py").write_text(
        "from torch import nn\n\ndef mlp():\n    return nn.Sequential(nn.Linear(10, 4))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("target", "shape", "message"),
    [
        ("userpkg.typo:make_net", "2,10", "cannot import module 'userpkg.typo': SyntaxError"),
        ("userpkg.sideeffect:f", "2,10", "RuntimeError: needs a GPU cluster"),
        ("userpkg.models:mlp", "2,7", "on input (2, 7) failed: RuntimeError"),
        ("userpkg.models:mlp", "2,0", "'2,0' is not a comma-separated list of integers >= 1"),
        ("userpkg.models:mlp", "-2,10", "is not a comma-separated list of integers >= 1"),
    ],
    ids=["syntax-error", "raises-on-import", "shape-mismatch", "zero-dim", "negative"],
)
def test_doctor_bad_factory_or_shape(user_package, target, shape, message):
    result = CliRunner().invoke(doctor_cli.doctor_cmd, [target, "--input-shape", shape])
    assert message in error_line(result)
    assert not (user_package / "reports").exists()
