"""The wheel carries what an installed flowscope needs: studies, templates, kernels."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from flowscope.study import spec

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_studies_and_templates(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("flowscope-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for study in spec.builtin_names():
        assert f"flowscope/studies/{study}.toml" in names, study
    assert "flowscope/reporter/templates/report.html.j2" in names
    assert "flowscope/record/snapshot.c" in names
    assert not any(n.startswith(("tests/", "reports/", "bench/")) for n in names)
