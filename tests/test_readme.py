"""The README's Python blocks run, in order, as one Python process (what a reader pastes)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list[str]:
    return BLOCK.findall(text)


def test_readme_has_python_blocks_to_run():
    assert len(python_blocks((ROOT / "README.md").read_text())) >= 3


def test_readme_python_blocks_run_in_order_in_one_process(tmp_path):
    blocks = python_blocks((ROOT / "README.md").read_text())
    script = tmp_path / "readme.py"
    script.write_text("\n\n".join(blocks))
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,  # what the blocks write (reports/...) lands here
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"},
    )
    assert out.returncode == 0, out.stderr[-4000:]
    # the blocks' promises, read from what they left behind
    assert (tmp_path / "reports" / "my-model" / "report.html").is_file()
    assert "verdict" in out.stdout
