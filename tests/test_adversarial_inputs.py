"""Adversarial input, CLI and export cases of issue 18: what a new user tries, and what must
come out (an explicit verdict, one ``Error:`` line and its exit status, nothing written, the
model as it was, a CSV cell a spreadsheet shows as text).

Families: empty and degenerate inputs; CLI errors per command; study-file injection; the
state ``examine`` leaves behind; CSV injection.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner, Result
from torch import nn

import flowscope as fs
from conftest import TINY_STUDY, study_toml
from flowscope.cli.doctor_cmd import doctor_cmd
from flowscope.cli.main import main
from flowscope.doctor import diagnose, examine
from flowscope.reporter import export

pytestmark = pytest.mark.usefixtures("one_thread")

STUDY = study_toml(TINY_STUDY)
HUGE = 10**6  # a dimension whose square does not fit in any machine's memory (4 TB)


def error_line(result: Result, code: int) -> str:
    """The one ``Error:`` line of a failed command (checked: exit status, no traceback)."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))


def recorded(model: nn.Module, x: torch.Tensor) -> fs.Recorder:
    with fs.watch(model) as rec:
        model(x).pow(2).mean().backward()
    return rec


# -- empty and degenerate inputs ----------------------------------------------------------------


def test_a_batch_of_size_0_is_no_data_not_healthy(tmp_path):
    d = diagnose(recorded(mlp(), torch.zeros(0, 4)))
    run = d.runs.iloc[0]
    assert run["verdict"] == "no data" and not d.ok()
    assert "no activation or dL/dh value was recorded in any layer" in run["reason"]
    assert set(d.layers.query("check == 'values'")["verdict"]) == {"no data"}
    text = str(d)
    assert "1 run(s), 0 healthy, 0 with problems, 1 without data" in text
    assert "] NO DATA" in text and "HEALTHY" not in text


def test_a_batch_of_size_0_goes_through_the_report(tmp_path):
    page = fs.report(recorded(mlp(), torch.zeros(0, 4)), tmp_path / "r")
    html = Path(page).read_text()
    assert '<span class="badge no-data">no data</span>' in html
    assert pd.read_csv(tmp_path / "r" / "summary.csv")["verdict"].tolist() == ["no data"]
    layers = pd.read_csv(tmp_path / "r" / "layers.csv")
    assert set(layers.query("check == 'values'")["verdict"]) == {"no data"}


def test_an_empty_last_step_is_no_data_and_an_earlier_step_is_judged():
    model = mlp()
    rec = fs.watch(model)
    for n in (8, 0):
        model(torch.randn(n, 4)).pow(2).mean().backward()
        rec.step()
    rec.close()
    assert diagnose(rec).runs["verdict"].tolist() == ["no data"]
    assert diagnose(rec, step=0).runs["verdict"].tolist() != ["no data"]


def test_a_layer_with_an_empty_output_is_marked_and_the_rest_judged():
    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = mlp()
            self.empty = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x).sum() + self.empty(x[:0]).sum()

    model = Split()
    with fs.watch(model) as rec:
        model(torch.randn(16, 4)).backward()
    d = diagnose(rec)
    empty = d.layers.query("layer == 'empty' and check == 'values'")
    assert empty["verdict"].tolist() == ["no data"]
    assert d.runs.loc[0, "verdict"] != "no data"
    assert "1 layer(s) without any value, not judged: 'empty'" in d.runs.loc[0, "reason"]


def test_all_nan_layers_are_non_finite_and_the_report_draws(tmp_path):
    rec = recorded(mlp(), torch.full((3, 4), float("nan")))
    d = diagnose(rec)
    assert d.runs.loc[0, "verdict"] == "non-finite"
    assert "NaN/Inf values in 5 layer(s)" in d.runs.loc[0, "reason"]
    html = Path(fs.report(rec, tmp_path / "r")).read_text()
    assert '<span class="badge non-finite">non-finite</span>' in html


def test_constant_zero_tensors_are_no_data_not_healthy(tmp_path):
    model = mlp()
    for p in model.parameters():
        nn.init.zeros_(p)
    rec = recorded(model, torch.randn(8, 4))
    run = diagnose(rec).runs.iloc[0]
    assert run["verdict"] == "no data"
    assert run["reason"].startswith("every activation and dL/dh value is exactly 0")
    assert Path(fs.report(rec, tmp_path / "r")).is_file()


def test_constant_nonzero_tensors_are_judged_on_their_scales(tmp_path):
    model = mlp()
    for p in model.parameters():
        nn.init.constant_(p, 0.5)
    rec = recorded(model, torch.ones(8, 4))
    d = diagnose(rec)
    stats = rec.stats.query("kind == 'activation'")
    assert (stats["std"] == 0).all() and (stats["rms"] > 0).all()  # constant, not empty
    assert d.runs.loc[0, "verdict"] not in ("healthy", "no data")  # dL/dh falls 600x
    assert Path(fs.report(rec, tmp_path / "r")).is_file()


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def mlp():
                torch.manual_seed(0)
                return nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                                     nn.Linear(8, 2))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_doctor_cli_on_an_empty_batch_says_no_data_and_exits_1(user_package):
    torch.save(torch.zeros(0, 10), user_package / "empty.pt")
    result = CliRunner().invoke(doctor_cmd, ["userpkg.models:mlp", "--input", "empty.pt"])
    assert result.exit_code == 1, result.output
    assert "] NO DATA" in result.output and "nothing to judge" in result.output


# -- CLI errors, per command ---------------------------------------------------------------------

UNWRITABLE = "/proc/flowscope-out"  # procfs refuses new folders, also to root

DOCTOR_ERRORS = [
    (["--out", UNWRITABLE], 2,
     f"Invalid value for '--out': '{UNWRITABLE}' cannot be created: No such file or directory;"
     " give a folder that exists or can be created, and can be written"),
    (["--out", "afile/sub"], 2, "'afile/sub' cannot be created: 'afile' is a file"),
    (["--out", "afile"], 2, "Invalid value for '--out': Directory 'afile' is a file."),
    (["--device", "nosuchdev"], 2,
     "Invalid value for '--device': 'nosuchdev' is not a torch device; use cpu, cuda, cuda:N"),
    (["--device", "meta"], 2, "'meta' tensors hold no values to measure; use cpu or cuda"),
    (["--input-shape", f"{HUGE},{HUGE}"], 1,
     f"Error: --input-shape '{HUGE},{HUGE}': 1e+12 float32 values (3.6 TiB) do not fit in "
     "this machine's memory"),
    (["--input-shape", "100000000000,100000000000"], 1, "1e+22 float32 values"),
    (["--fix", "nosuch"], 1, "Error: unknown init 'nosuch' in --fix: Allowed: constant,"),
    (["--fix", "kaimng"], 1, "lsuv"),
    (["--fix", "normal"], 1,
     "--fix 'normal': init 'normal' needs parameter 'std' (a finite number >= 0), got none; "
     "--fix takes schemes without parameters"),
    (["--fix", "he", "--out", "afile"], 2, "Directory 'afile' is a file."),
    (["--threshold", "act_ratio=0.5"], 1, "Thresholds.act_ratio must be a number > 1, got 0.5"),
    (["--threshold", "act_ratio"], 1, "--threshold takes KEY=VALUE, got 'act_ratio'"),
    (["--vocab", "0"], 2, "Invalid value for '--vocab': 0 is not in the range x>=1."),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "code", "message"), DOCTOR_ERRORS, ids=lambda v: str(v)[:30])
def test_doctor_errors_before_any_work(user_package, extra, code, message):
    (user_package / "afile").write_text("a file")
    args = ["userpkg.models:mlp", *(["--input-shape", "2,10"] if "--input-shape" not in extra
                                    else []), *extra]  # fmt: skip
    result = CliRunner().invoke(doctor_cmd, args)
    assert message in error_line(result, code)
    assert "flowscope doctor:" not in result.output  # no diagnosis ran
    assert not (user_package / "reports").exists()


def test_doctor_cuda_on_a_build_without_it():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(doctor_cmd, ["torch.nn:Identity", "--input-shape", "2",
                                             "--device", "cuda"])  # fmt: skip
    line = error_line(result, 1)
    assert line.startswith("Error: --device 'cuda' is not available here: ")
    assert line.endswith("; use --device cpu")


def test_doctor_input_that_is_not_a_tensor_file_is_one_line(user_package):
    (user_package / "x.pt").write_text("not a pickle\n" * 3)
    result = CliRunner().invoke(doctor_cmd, ["userpkg.models:mlp", "--input", "x.pt"])
    line = error_line(result, 1)
    assert "cannot load --input 'x.pt' with torch.load(weights_only=True)" in line
    assert len(result.output.strip().splitlines()) == 1


STUDY_RUN_ERRORS = [
    (["--out", UNWRITABLE], 2, f"'{UNWRITABLE}' cannot be created: No such file or directory"),
    (["--out", "afile/sub"], 2, "'afile/sub' cannot be created: 'afile' is a file"),
    (["--out", "afile"], 2, "Directory 'afile' is a file."),
    (["--set", "net.width=1e11"], 1, "width must be an integer >= 1, got 100000000000.0"),
    (["--set", "net.width=100000000000"], 1,
     "net 'mlp' with in_dim=8, width=100000000000, depth=2, out_dim=2, activation='tanh' "
     "cannot be built: RuntimeError: Storage size calculation overflowed"),
    (["--set", f"net.width={HUGE}"], 1,
     f"net 'mlp' with in_dim=8, width={HUGE}, depth=2, out_dim=2, activation='tanh': its "
     "parameters: 1e+12 float32 values (3.6 TiB) do not fit in this machine's memory"),
    (["--set", "data.n=100000000000"], 1,
     "data 'gaussian': a batch of shape (100000000000, 8): 8e+11 float32 values (2.9 TiB)"),
    (["--set", "run.device=cuda"], 1, "device 'cuda' was asked for"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "code", "message"), STUDY_RUN_ERRORS, ids=lambda v: str(v)[:30])
def test_study_run_errors_before_any_work(tmp_path, monkeypatch, extra, code, message):
    if "run.device=cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file")
    (tmp_path / "study.toml").write_text(STUDY)
    result = CliRunner().invoke(main, ["study", "run", "study.toml", *extra])
    assert message in error_line(result, code)
    assert not (tmp_path / "reports").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "study.toml"]


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("records")
    recorded(mlp(), torch.randn(8, 4)).save(folder)
    return folder


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--out", UNWRITABLE], f"Invalid value for '--out': '{UNWRITABLE}' cannot be created"),
        (["--out", "afile/sub"], "'afile/sub' cannot be created: 'afile' is a file"),
    ],
)
def test_report_output_folder_checked_first(records_dir, tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file")
    result = CliRunner().invoke(main, ["report", str(records_dir), *extra])
    assert message in error_line(result, 2)
    assert not (records_dir / "report.html").exists()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["report", "afile"], 2, "Invalid value for 'RUN_DIR': Directory 'afile' is a file."),
        (["report", "nowhere"], 1, "'nowhere' is not a flowscope records folder"),
        (["study", "page", "nosuch"], 1, "unknown study 'nosuch': Allowed: activations"),
        (["study", "show", "study.toml", "--set", "data.device=cuda"], 1,
         "unknown data 'gaussian' argument 'device'"),
        (["study", "show", "."], 1, "study file '.' is a directory, not a TOML file"),
        (["study", "list", "extra"], 2, "Got unexpected extra argument (extra)"),
        (["study", "run", "study.toml", "--seeds", "1,,2"], 1,
         "--seeds takes integers like 0,1,2; got '1,,2'"),
    ],
    ids=lambda v: str(v)[:40],
)  # fmt: skip
def test_other_commands_with_bad_values(tmp_path, monkeypatch, args, code, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file")
    (tmp_path / "study.toml").write_text(STUDY)
    assert message in error_line(CliRunner().invoke(main, args), code)
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["doctor", "torch.nn:Identity", "--input-shape", "2", "--device", "nosuchdev"], 2),
        (["study", "run", "activations", "--out", UNWRITABLE], 2),
    ],
)
def test_a_real_process_prints_no_traceback(tmp_path, args, code):
    proc = subprocess.run(
        [sys.executable, "-m", "flowscope.cli.main", *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert not (tmp_path / "reports").exists()


# -- study files: only the documented parameters --------------------------------------------------


@pytest.mark.parametrize(
    ("section", "line", "message"),
    [
        ("data", 'device = "cuda"', "unknown data 'gaussian' argument 'device'"),
        ("data", 'generator = "os.system"', "unknown data 'gaussian' argument 'generator'"),
        ("data", "sizes = 3", "unknown data 'gaussian' argument 'sizes'"),
        ("sweep", '"data.device" = ["cpu", "cuda"]', "unknown data 'gaussian' argument 'device'"),
        ("init", 'generator = "os.system"', "init 'xavier' takes no parameters"),
        ("net", 'device = "meta"', "unknown net 'mlp' argument 'device'"),
    ],
    ids=["data.device", "data.generator", "data.unknown", "sweep-device", "init", "net"],
)
def test_study_file_sets_only_documented_parameters(tmp_path, section, line, message):
    text = STUDY.replace(f"[{section}]\n", f"[{section}]\n{line}\n")
    if f"[{section}]" not in STUDY:
        text += f"\n[{section}]\n{line}\n"
    (tmp_path / "study.toml").write_text(text)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["study", "run", str(tmp_path / "study.toml"), "--out",
                                       str(out)])  # fmt: skip
    line_out = error_line(result, 1)
    assert message in line_out and "study.toml" in line_out
    if "argument" in message:
        assert "Allowed: classes, dim, n" in line_out or "Allowed: activation" in line_out
    assert not out.exists()


def test_the_python_api_still_takes_a_device_and_generator():
    from flowscope.study.data import DATA, make_data

    batch = make_data("gaussian", n=2, dim=3, device="cpu", generator=torch.Generator())
    assert batch.x.shape == (2, 3)
    assert DATA.arguments("teacher") == ["n", "dim", "classes", "kind", "hidden"]


# -- examine leaves the model as it was -----------------------------------------------------------


def bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8),
        nn.Tanh(), nn.Linear(8, 2),
    )  # fmt: skip


def test_examine_restores_batchnorm_state_bit_for_bit():
    model, x = bn_net(), torch.randn(32, 10) * 3 + 1
    before = copy.deepcopy(model.state_dict())
    model.eval()
    out_before = model(x)
    model.train()
    examine(model, x)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert int(model[1].num_batches_tracked) == 0
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    assert torch.equal(model(x), out_before)


def test_examine_restores_state_when_the_loss_raises():
    model, x = bn_net(), torch.randn(16, 10)
    model[3].weight.grad = torch.ones_like(model[3].weight)
    before = copy.deepcopy(model.state_dict())

    def bad_loss(out: torch.Tensor) -> torch.Tensor:
        return out  # not a scalar

    with pytest.raises(fs.FlowscopeError, match="the loss must be a scalar tensor"):
        examine(model, x, loss=bad_loss)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(model[3].weight.grad, torch.ones_like(model[3].weight))
    assert model[0].weight.grad is None


def test_examine_restores_a_buffer_the_forward_pass_replaced():
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen = self.seen + len(x)  # a new tensor object, not an in-place update
            return self.fc(x)

    model = Counter()
    buffer = model.seen
    examine(model, torch.randn(5, 4))
    assert model.seen is buffer and float(model.seen) == 0.0


# -- CSV injection -------------------------------------------------------------------------------

FORMULAS = ['=HYPERLINK("http://x")', "+1+2", "-2+3", "@SUM(A1)", "\tx", "\rx"]


def injected() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential()
    for i, name in enumerate(FORMULAS):
        model.add_module(name, nn.Linear(4, 4))
        model.add_module(f"act{i}", nn.Tanh())
    return model


def test_module_names_that_are_formulas_are_neutralised_in_stats_csv(tmp_path):
    model = injected()
    rec = recorded(model, torch.randn(8, 4))
    export.to_csv(rec, tmp_path)
    for name in ("stats.csv", "hists.csv"):
        back = pd.read_csv(tmp_path / name, keep_default_na=False)
        layers = set(back["layer"])
        assert {"'" + f for f in FORMULAS} <= layers, name
        assert not any(str(v).startswith(("=", "+", "-", "@", "\t", "\r")) for v in layers)
    stats = pd.read_csv(tmp_path / "stats.csv")
    assert pd.api.types.is_float_dtype(stats["min"]) and (stats["min"] < 0).any()
    assert set(fs.load(_saved(rec, tmp_path)).stats["layer"]) >= set(FORMULAS)  # Parquet raw


def _saved(rec: fs.Recorder, tmp_path: Path) -> Path:
    folder = tmp_path / "raw"
    rec.save(folder)
    return folder


@pytest.mark.filterwarnings("ignore:Glyph")  # a tab or CR in a layer name on a figure
def test_report_csv_exports_are_neutralised(tmp_path):
    rec = recorded(injected(), torch.randn(8, 4))
    fs.report(rec, tmp_path / "r")
    for name in ("layers.csv", "stats.csv"):
        text = (tmp_path / "r" / name).read_text()
        assert '"\'=HYPERLINK(""http://x"")"' in text, name
        assert "\n=" not in text and ",=" not in text and ",@" not in text
        back = pd.read_csv(tmp_path / "r" / name)
        assert "'@SUM(A1)" in set(back["layer"])


@pytest.mark.parametrize("cell", FORMULAS)
def test_each_formula_start_is_neutralised_and_numbers_are_not(cell):
    frame = pd.DataFrame({"layer": [cell, "fc"], "min": [-1.5, 2.0], "count": [-3, 4]})
    back = pd.read_csv(StringIO(export.csv_text(frame)), keep_default_na=False)
    assert back["layer"].tolist() == ["'" + cell, "fc"]
    assert back["min"].tolist() == [-1.5, 2.0] and back["count"].tolist() == [-3, 4]
    assert ",-1.5," in export.csv_text(frame)  # a negative number is written bare
