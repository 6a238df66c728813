"""Each built-in study's page (docs/studies/NAME.md) is what its study file says today."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from flowscope.cli.main import main
from flowscope.study import spec
from flowscope.study.pages import study_page

DOCS = Path(__file__).resolve().parents[1] / "docs" / "studies"


@pytest.mark.parametrize("name", spec.builtin_names())
def test_the_page_in_docs_is_the_study_file_as_it_is(name):
    page = (DOCS / f"{name}.md").read_text()
    assert page == study_page(spec.load(name)), f"regenerate: flowscope study page {name}"
    study = spec.load(name)
    sections = [line[5:-1] for line in page.splitlines() if line.startswith("### `")]
    assert sections == [c["id"] for c in study.claims]


def test_a_page_names_what_each_claim_measures_and_who_makes_it():
    page = study_page(spec.load("batchnorm"))
    gain = page.split("### `bn-gradient-gain-mean-field`")[1].split("### ")[0]
    assert "- **Made by:** theory" in gain
    assert "root mean square of dL/d(output)" in gain and "`layers.[1-8].linear`" in gain
    assert "/ (the same of `probe.meanfield_grad`" in gain and "between 0.97 and 1.03" in gain
    sigmoid = study_page(spec.load("activations")).split("sigmoid-saturation-kills-gradients")[1]
    assert "each divided by the same over `layers.*.act`" in sigmoid.split("### ")[0]


def test_cli_study_page_prints_the_page():
    result = CliRunner().invoke(main, ["study", "page", "depth"])
    assert result.exit_code == 0 and result.output == study_page(spec.load("depth"))
    bad = CliRunner().invoke(main, ["study", "page", "dept"])
    assert bad.exit_code == 1 and "unknown study 'dept'" in bad.output
