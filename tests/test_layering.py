"""Imports go one way, no module reads another's private names, and the CLI starts light.

The package is layered; each folder is one layer and imports only the layers before it
(lazy imports inside functions count the same), see docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flowscope"
# the layers in order; cli and integrations are both on top and do not import each other
LAYERS = ["core", "record", "models", "theory", "doctor", "study", "reporter"]
TOP = ["cli", "integrations"]
FACADE = {"flowscope", "flowscope.__main__"}  # the lazy public API may import anything


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> tuple[int, str]:
    """(rank, folder) of a flowscope module; the facade ranks above everything."""
    parts = module.split(".")
    if module in FACADE or len(parts) < 2:
        return len(LAYERS) + 1, "flowscope"
    folder = parts[1]
    if folder in TOP:
        return len(LAYERS), folder
    return LAYERS.index(folder), folder


def imports_of(module: str) -> Iterator[tuple[str, str, int]]:
    """(imported flowscope module, imported name or "", line) for every import in a module,
    inside functions too."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "flowscope":
                    yield alias.name, "", node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base]) if base else ".".join(up)
            if base.split(".")[0] != "flowscope":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub, "", node.lineno) if sub in MODULES else (base, alias.name, node.lineno)


def test_every_module_lives_in_a_layer():
    for module in MODULES:
        if module not in FACADE:
            assert module.split(".")[1] in LAYERS + TOP, module


def test_imports_run_only_from_a_layer_to_the_layers_before_it():
    wrong = []
    for module in MODULES:
        rank, folder = layer_of(module)
        for target, name, line in imports_of(module):
            if target == "flowscope" and name == "__version__":
                continue  # the version string, set before any layer loads
            t_rank, t_folder = layer_of(target)
            if t_folder != folder and t_rank >= rank:
                wrong.append(f"{module}:{line} imports {target} {name}".strip())
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_between_modules():
    graph = {m: {t for t, _, _ in imports_of(m) if t in MODULES and t != m} for m in MODULES}
    for m in FACADE:  # the facade imports lazily on attribute access: not a dependency
        graph[m] = set()
    for m in graph:  # a package's __init__ re-exporting its modules is not a cycle
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = [*stack[stack.index(t) :], t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def private_names(module: str) -> set[str]:
    """Names starting with one underscore that a module defines (functions, classes,
    module globals, attributes it assigns on ``self``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            receiver = node.value
            if isinstance(receiver, ast.Name) and receiver.id in ("self", "cls"):
                names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_module_reads_another_modules_private_names():
    own = {m: private_names(m) for m in MODULES}
    everyone = set().union(*own.values())
    wrong = []
    for module in MODULES:
        folder = module.split(".")[:2]
        for target, name, line in imports_of(module):  # from flowscope.x import _y
            private = name.startswith("_") and not name.startswith("__")
            if private and target.split(".")[:2] != folder:
                wrong.append(f"{module}:{line} imports {target}.{name}")
        tree = ast.parse(MODULES[module].read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            attr = node.attr
            if attr.startswith("__") or attr in own[module] or attr not in everyone:
                continue
            receiver = node.value
            if isinstance(receiver, ast.Name) and receiver.id in ("self", "cls"):
                continue
            wrong.append(f"{module}:{node.lineno} reads .{attr}")
    assert not wrong, "\n".join(wrong)


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
        "import flowscope.core.activations, flowscope.record.hooks"
    )
    assert "torch" in mods
    assert not mods & {"pandas", "matplotlib", "seaborn", "click", "pyarrow"}


def test_cli_help_does_not_import_torch():
    assert "torch" not in loaded_after("import flowscope.cli.main")


@pytest.mark.parametrize("argv", [["cli.py", "--help"], ["-m", "flowscope", "--help"]])
def test_cli_entry_points(argv):
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "Usage:" in out.stdout
