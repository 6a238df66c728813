"""What the package's docstring examples run on (``--doctest-modules``, see pyproject.toml).

An example that needs recorded data uses one of these names, made once per session into a
temporary folder and put into pytest's ``doctest_namespace``:

* ``model_dir``: a folder written by ``Recorder.save``: a 3-layer, 16-wide tanh MLP
  (``torch.nn.Sequential``) recorded by ``fs.watch(model, name="my-model")`` for 2 SGD steps;
* ``run_dir``: a study run folder: ``init-scales`` shrunk by ``SMALL_INIT_SCALES`` to two
  configs (tanh, init ``small`` and ``xavier``) of a 3-layer, 16-wide net.

Each example runs in an empty working folder of its own (what it writes, ``reports/demo``,
stays there), from ``torch.manual_seed(0)``, on one torch thread, and the pyplot figures it
opens are closed after it. The
modules whose import or examples need an optional package are not collected where it is
missing. The tests' own helpers are in tests/conftest.py.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _pytest.doctest import DoctestItem

os.environ.setdefault("MPLBACKEND", "Agg")  # examples draw figures; never open a window

OPTIONAL = {  # module -> the packages of which it needs one (the extras of pyproject.toml)
    "flowscope/integrations/lightning.py": ("lightning", "pytorch_lightning"),
    "flowscope/integrations/hf.py": ("transformers",),
    "flowscope/reporter/export.py": ("tensorboard",),
}
collect_ignore = [
    module
    for module, packages in OPTIONAL.items()
    if not any(importlib.util.find_spec(p) for p in packages)
]

# ``--set`` overrides of the built-in init-scales study: two configs that run in ~0.1 s
SMALL_INIT_SCALES = [
    "net.in_dim=16",
    "net.width=16",
    "net.depth=3",
    "data.dim=16",
    "data.n=64",
    'sweep.net.activation=["tanh"]',
    'sweep.init.name=["small", "xavier"]',
    'sweep.net.norm=["none"]',
]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fs.watch`` records of a small tanh MLP (2 SGD steps), saved into a folder."""
    import torch

    import flowscope as fs

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[m for _ in range(3) for m in (torch.nn.Linear(16, 16), torch.nn.Tanh())]
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with fs.watch(model, name="my-model") as rec:
        for _ in range(2):
            model(torch.randn(32, 16)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            rec.step()
    out = tmp_path_factory.mktemp("doctest-records") / "my-model"
    rec.save(str(out))
    return out


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A study run folder: the two configs of ``SMALL_INIT_SCALES``."""
    from flowscope.study import spec
    from flowscope.study.engine import run_study

    out = tmp_path_factory.mktemp("doctest-study") / "init-scales"
    run_study(spec.load("init-scales", SMALL_INIT_SCALES), out)
    return out


@pytest.fixture(autouse=True)
def _doctest_set_up(request: pytest.FixtureRequest) -> Iterator[None]:
    """For a docstring example: the names above, its own working folder, one thread."""
    if not isinstance(request.node, DoctestItem):
        yield
        return
    import torch

    namespace = request.getfixturevalue("doctest_namespace")
    for name in ("model_dir", "run_dir"):
        namespace[name] = request.getfixturevalue(name)
    request.getfixturevalue("monkeypatch").chdir(request.getfixturevalue("tmp_path"))
    torch.manual_seed(0)  # an example's output is not that of the examples run before it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors, and a machine that may be busy
    yield
    torch.set_num_threads(threads)
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")
