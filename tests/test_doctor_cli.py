"""`flowscope doctor` through click's CliRunner: exit codes, output, records, clean errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

import flowscope as fs
from flowscope.cli.doctor_cmd import doctor_cmd
from flowscope.doctor import diagnose

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster


FACTORIES = textwrap.dedent(
    '''
    """Factories a user would point the doctor at."""
    import torch
    from torch import nn


    def small_cnn():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
        )


    def plain_cnn():
        """Six 3x3 convs + ReLU with PyTorch's default init: activations shrink ~0.6x/layer."""
        torch.manual_seed(0)
        layers, c = [], 3
        for _ in range(6):
            layers += [nn.Conv2d(c, 8, 3, padding=1), nn.ReLU()]
            c = 8
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


    def tiny_gpt2():
        import transformers

        torch.manual_seed(0)
        config = transformers.GPT2Config(
            vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
            attn_implementation="eager",
        )
        return transformers.GPT2LMHeadModel(config)


    def gpt2_without_residual_scaling():
        """GPT-2 with init std 1.0 instead of 0.02: attention saturates, logits explode."""
        import transformers

        torch.manual_seed(0)
        config = transformers.GPT2Config(
            vocab_size=97, n_positions=32, n_embd=32, n_layer=4, n_head=4,
            attn_implementation="eager", initializer_range=1.0,
        )
        return transformers.GPT2LMHeadModel(config)


    class EmbedMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 32)
            self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, ids):
            return self.fc2(torch.relu(self.fc1(self.emb(ids))))


    def embed_mlp():
        torch.manual_seed(0)
        return EmbedMLP()


    def not_a_model():
        return 42


    def broken():
        raise RuntimeError("cannot build")


    NUMBER = 3
    '''
)


@pytest.fixture
def factories(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def doctor(*args: str):
    return CliRunner().invoke(doctor_cmd, list(args), catch_exceptions=False)


def test_healthy_cnn_exits_0_and_writes_records(factories):
    out = factories / "out"
    result = doctor("userpkg.models:small_cnn", "--input-shape", "8,3,16,16", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "HEALTHY" in result.output and "Conv2d" in result.output
    for name in ("stats.parquet", "hists.parquet", "meta.json", "diagnosis.txt", "diagnosis.json"):
        assert (out / name).is_file()
    records = fs.load(out)
    assert records.stats.run.unique().tolist() == ["small_cnn"]
    assert diagnose(records).runs.loc[0, "verdict"] == "healthy"  # the saved frame agrees


def test_vanishing_cnn_exits_1_and_he_fixes_it(factories):
    result = doctor("userpkg.models:plain_cnn", "--input-shape", "8,3,16,16", "--fix", "he")
    assert result.exit_code == 1, result.output
    before, after = result.output.split("after fix 'he':")
    assert "VANISHING" in before and 'fs.reinit(model, "he")' in before
    assert "HEALTHY" in after
    assert (factories / "reports" / "doctor-plain_cnn" / "stats.parquet").is_file()  # default
    assert (factories / "reports" / "doctor-plain_cnn-he" / "stats.parquet").is_file()


def test_lsuv_fix_from_the_command_line(factories):
    result = doctor("userpkg.models:plain_cnn", "--input-shape", "8,3,16,16", "--fix", "lsuv")
    after = result.output.split("after fix 'lsuv':")[1]
    assert "HEALTHY" in after
    assert "verdict" in after and "vanishing" in after  # the before/after table


def test_thresholds_from_the_command_line(factories):
    shape = ["--input-shape", "8,3,16,16"]
    result = doctor("userpkg.models:plain_cnn", *shape, "--threshold", "act_ratio=1000")
    assert result.exit_code == 1  # still vanishing gradients, and dead channels
    assert (
        "VANISHING+DEAD" in result.output
        and "Layer '9': 38% of its units never fire" in result.output
    )
    loose = ["act_ratio=1000", "grad_ratio=1000", "dead=0.5"]
    result = doctor("userpkg.models:plain_cnn", *shape, *(f"--threshold={t}" for t in loose))
    assert result.exit_code == 0, result.output


def test_tiny_gpt2_is_healthy(factories):
    result = doctor("userpkg.models:tiny_gpt2", "--input-shape", "4,16")
    assert result.exit_code == 0, result.output
    assert "input_ids (4, 16), labels (4, 16)" in result.output  # ids, and the model's own loss
    assert "transformer.h.1.attn.c_attn" in result.output


def test_gpt2_with_a_huge_init_is_not(factories):
    result = doctor("userpkg.models:gpt2_without_residual_scaling", "--input-shape", "4,16")
    assert result.exit_code == 1, result.output
    assert "EXPLODING" in result.output  # dL/dh grows ~50x over four blocks
    assert "re-initialise the Conv1D weights yourself" in result.output


def test_input_from_a_file(factories):
    torch.save(torch.randn(4, 3, 16, 16), factories / "batch.pt")
    result = doctor("userpkg.models:small_cnn", "--input", "batch.pt")
    assert result.exit_code == 0 and "(4, 3, 16, 16)" in result.output


def test_token_ids_for_embedding_models_and_dict_inputs(factories):
    result = doctor("userpkg.models:embed_mlp", "--input-shape", "4,10")
    assert result.exit_code == 0, result.output
    assert "on input (4, 10)" in result.output  # ids, no labels (forward takes none)
    stats = fs.load(factories / "reports" / "doctor-embed_mlp").stats
    assert stats.query("layer == 'emb' and kind == 'activation'").iloc[0]["count"] == 4 * 10 * 32
    torch.save({"ids": torch.randint(0, 50, (2, 7))}, factories / "ids.pt")
    result = doctor("userpkg.models:embed_mlp", "--input", "ids.pt")
    assert result.exit_code == 0 and "on input ids (2, 7)" in result.output
    result = doctor("userpkg.models:embed_mlp", "--input-shape", "4,10", "--vocab", "500")
    assert "IndexError" in error_line(result)  # ids beyond the embedding: the model's complaint


# -- errors: one clean line each --------------------------------------------------------------


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code in (1, 2) and len(lines) == 1, result.output
    return lines[0]


def test_bad_input_shape_names_the_shape_and_the_complaint(factories):
    result = doctor("userpkg.models:small_cnn", "--input-shape", "8,16,16")
    line = error_line(result)
    assert result.exit_code == 1
    assert "(8, 16, 16)" in line and "RuntimeError" in line and "channels" in line
    assert "Traceback" not in result.output


def test_unparseable_shape(factories):
    line = error_line(doctor("userpkg.models:small_cnn", "--input-shape", "8,x"))
    assert "'8,x' is not a comma-separated list of integers" in line


def test_module_that_does_not_import(factories):
    line = error_line(doctor("userpkg.nope:small_cnn", "--input-shape", "2,3"))
    assert "cannot import module 'userpkg.nope': ModuleNotFoundError" in line


def test_missing_factory_gets_did_you_mean(factories):
    line = error_line(doctor("userpkg.models:smal_cnn", "--input-shape", "2,3"))
    assert "unknown factory 'smal_cnn'" in line and "did you mean 'small_cnn'" in line


def test_target_without_colon(factories):
    line = error_line(doctor("userpkg.models", "--input-shape", "2,3"))
    assert "expected MODULE:FACTORY" in line


def test_factory_that_is_not_callable(factories):
    line = error_line(doctor("userpkg.models:NUMBER", "--input-shape", "2,3"))
    assert "is a int, not a callable factory" in line


def test_factory_returning_something_else(factories):
    line = error_line(doctor("userpkg.models:not_a_model", "--input-shape", "2,3"))
    assert "returned a int, not a torch.nn.Module" in line


def test_factory_that_raises(factories):
    line = error_line(doctor("userpkg.models:broken", "--input-shape", "2,3"))
    assert "factory 'userpkg.models:broken' failed: RuntimeError: cannot build" in line


def test_unknown_threshold(factories):
    line = error_line(
        doctor("userpkg.models:small_cnn", "--input-shape", "2,3", "--threshold", "ratio=3")
    )
    assert "unknown threshold 'ratio'" in line


def test_unknown_fix_scheme(factories):
    result = doctor("userpkg.models:plain_cnn", "--input-shape", "4,3,8,8", "--fix", "kaiming")
    assert "unknown init 'kaiming'" in error_line(result)


def test_input_shape_and_input_are_exclusive(factories):
    result = doctor("userpkg.models:small_cnn")
    assert result.exit_code == 2 and "exactly one of --input-shape and --input" in result.output


def test_help_does_not_import_torch():
    code = "import sys, flowscope.cli.doctor_cmd; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
