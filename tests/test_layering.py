"""Imports go one way, and the CLI starts without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return {name.split(".")[0] for name in out.stdout.split()}


def test_torch_core_does_not_load_pandas_plots_or_click():
    mods = loaded_after(
        "import torch, flowscope as fs\n"
        "m = torch.nn.Linear(3, 3)\n"
        "with fs.watch(m) as rec:\n    m(torch.randn(2, 3)).sum().backward()\n"
        "import flowscope.record.snapshot, flowscope.record.recorder, flowscope.core.registry\n"
        "import flowscope.models.inits, flowscope.models.nets, flowscope.study.data\n"
        "import flowscope.core.activations"
    )
    assert "torch" in mods
    assert not mods & {"pandas", "matplotlib", "seaborn", "click", "pyarrow"}


def test_cli_help_does_not_import_torch():
    assert "torch" not in loaded_after("import flowscope.cli.main")


@pytest.mark.parametrize("argv", [["cli.py", "--help"], ["-m", "flowscope", "--help"]])
def test_cli_entry_points(argv):
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "Usage:" in out.stdout
