"""The public names stay what they are, however the package's modules are imported.

``flowscope.report`` used to be both a lazily exported function and a submodule: the first
``fs.report(...)`` imported the submodule, which replaced the package attribute, and the
second call failed with "'module' object is not callable".
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import torch

import flowscope as fs

ROOT = Path(__file__).resolve().parents[1]


def recording() -> fs.Recorder:
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh())
    with fs.watch(model) as rec:
        model(torch.randn(8, 6)).sum().backward()
    return rec


def test_no_submodule_is_named_like_a_public_name():
    for name in fs.__all__:
        assert importlib.util.find_spec(f"flowscope.{name}") is None, name


def test_report_twice_in_one_process_and_after_every_module_is_imported(tmp_path):
    rec = recording()
    assert fs.report(rec, tmp_path / "a").is_file()  # the page it wrote
    assert fs.report(rec, tmp_path / "b").is_file()  # once failed here
    import flowscope.reporter.page  # noqa: F401  (the module that defines it)

    for info in pkgutil.walk_packages(fs.__path__, "flowscope."):
        if info.name != "flowscope.__main__":
            importlib.import_module(info.name)
    for name in fs.__all__:  # every public name is still what the facade exports
        value = getattr(fs, name)
        assert not isinstance(value, type(sys)), name
    assert fs.report(rec, tmp_path / "c").is_file()


def test_report_after_a_training_callback_wrote_its_report(tmp_path):
    # the Lightning and Hugging Face callbacks share this session; its finish() writes a
    # report the way they do, and fs.report must still be the function afterwards
    from flowscope.integrations import Session

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    session = Session(tmp_path / "run", every=1, report=True)
    session.start(model)
    for step in range(2):
        session.resume()
        model(torch.randn(8, 4)).sum().backward()
        session.after_backward()
        session.end_step(step + 1)
    assert (session.finish() / "report.html").is_file()
    assert fs.report(tmp_path / "run", tmp_path / "again").is_file()


def test_the_facade_loads_lazily():
    code = (
        "import flowscope, sys; print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_run_study_and_distributed_are_reachable_from_the_package():
    from flowscope import distributed

    assert callable(fs.run_study) and callable(distributed.merge_pending)
