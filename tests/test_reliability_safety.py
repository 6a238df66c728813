"""Safety: study files are data, never code; tensors load with weights_only=True; nothing is
fetched from the network."""

from __future__ import annotations

import ast
import json
import socket
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import flowscope
import flowscope as fs
from conftest import TINY_STUDY, study_toml
from flowscope.cli import doctor_cmd as doctor_cli
from flowscope.cli.main import main

PACKAGE = Path(flowscope.__file__).parent


def payload(marker: Path) -> str:
    """Python that creates ``marker`` if anything evaluates it."""
    return f"__import__('pathlib').Path({str(marker)!r}).write_text('executed')"


def study_text(code: str) -> str:
    """A valid study whose free-text fields all hold ``code``."""
    study = {key: value for key, value in TINY_STUDY.items() if key != "sweep"}
    study.update(name=code, title=code, description=code, source={"file": code, "lines": code})
    claim = {"id": "c", "text": code, "of": "activation.std", "reduce": "gain", "below": 10.0}
    return study_toml({**study, "claim": [{**claim, "note": code}]})


def test_code_in_a_study_file_is_kept_as_text_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    code = payload(marker)
    path = tmp_path / "evil.toml"
    path.write_text(study_text(code))
    runner = CliRunner()
    shown = runner.invoke(main, ["study", "show", str(path), "--set", f"title={code}"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["title"] == code  # the --set value is a string too
    out = tmp_path / "run"
    ran = runner.invoke(main, ["study", "run", str(path), "--out", str(out), "--no-report"])
    assert ran.exit_code == 0, ran.output
    assert json.loads((out / "spec.json").read_text())["source"]["file"] == code
    assert not marker.exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("net.activation={code}", "unknown activation"),
        ("run.steps={code}", "run.steps must be an integer >= 0, got"),
        ("sweep.init.name=[{code!r}]", "unknown init"),
        ("run.dtype={code}", "unknown run.dtype"),
    ],
)
def test_code_in_names_is_an_unknown_name_not_a_call(tmp_path, override, message):
    marker = tmp_path / "PWNED"
    code = payload(marker)
    path = tmp_path / "evil.toml"
    path.write_text(study_text("x"))
    result = CliRunner().invoke(main, ["study", "show", str(path), "--set",
                                       override.format(code=code)])  # fmt: skip
    assert result.exit_code == 1 and message in result.output and "__import__" in result.output
    assert not marker.exists()


# -- static checks over flowscope's own source -------------------------------------------------

NETWORK_MODULES = {"socket", "urllib.request", "http.client", "requests", "httpx", "aiohttp",
                   "urllib3", "ftplib", "smtplib", "huggingface_hub"}  # fmt: skip
UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}
# lazy exports; the user's MODULE:FACTORY; Lightning under either of its two package names
IMPORTS_BY_NAME = {
    "__init__.py",
    "cli/doctor_cmd.py",
    "integrations/lightning.py",
    "record/display.py",  # the views the facade registers
}


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else getattr(fn, "attr", "")
            owner = ast.unparse(fn.value) if isinstance(fn, ast.Attribute) else ""
            yield node, name, owner


@pytest.mark.parametrize(
    "source", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_source_executes_no_data_and_opens_no_connection(source):
    tree = ast.parse(source.read_text())
    for node, name, owner in calls(tree):
        where = f"{source.name}:{node.lineno}"
        assert not (name in UNSAFE_CALLS and not owner), where
        if name in ("eval", "query") and owner and node.args:  # DataFrame.eval / .query
            first = node.args[0]  # evaluate their string: only a literal one is safe
            assert isinstance(first, ast.Constant) and isinstance(first.value, str), where
        assert not (owner in ("pickle", "cloudpickle", "dill", "marshal", "yaml") and
                    name in ("load", "loads")), where  # fmt: skip
        if name == "load" and owner == "torch":
            kw = {k.arg: k.value for k in node.keywords}
            assert isinstance(kw.get("weights_only"), ast.Constant), where
            assert kw["weights_only"].value is True, where
        if name == "import_module":
            assert str(source.relative_to(PACKAGE)) in IMPORTS_BY_NAME, where
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                assert name not in NETWORK_MODULES, f"{source.name}:{node.lineno} imports {name}"
        if isinstance(node, ast.Attribute):
            assert node.attr not in ("from_pretrained", "hub"), f"{source.name}:{node.lineno}"


def test_doctor_input_refuses_a_pickle_that_runs_code(tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, tmp_path / "batch.pt")
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(
        "from torch import nn\n\ndef mlp():\n    return nn.Sequential(nn.Linear(4, 2))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        doctor_cli.doctor_cmd, ["userpkg.models:mlp", "--input", str(tmp_path / "batch.pt")]
    )
    assert result.exit_code == 1
    assert "cannot load --input" in result.output and "weights_only=True" in result.output
    assert not marker.exists()


# -- no network --------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """Every attempt to resolve a name or open a connection is refused and remembered."""
    attempts: list[str] = []

    def refuse(what):
        def blocked(*args, **kwargs):
            attempts.append(f"{what}{args[1:] if what.startswith('socket.') else args}")
            raise OSError(f"network access in a test: {what}")

        return blocked

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    return attempts


def test_watch_study_and_report_fetch_nothing(tmp_path, offline):
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    with fs.watch(model) as rec:
        model(torch.randn(8, 4)).sum().backward()
    rec.save(tmp_path / "watched")
    assert len(fs.load(tmp_path / "watched").stats) == len(rec.stats)
    path = tmp_path / "s.toml"
    path.write_text(study_text("plain text"))
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["study", "run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text()
    for external in ('src="http', "src='http", "<link", "url(http", "@import"):
        assert external not in html  # self-contained: the browser fetches nothing either
    assert offline == []
