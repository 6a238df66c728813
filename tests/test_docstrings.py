"""The package's docstring examples are tests (``--doctest-modules``; their data: conftest.py at
the repository root), so none of them may be skipped: an example that cannot run in one
process is prose that names its script in examples/."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flowscope"


def test_no_docstring_example_is_skipped():
    skipped = [
        f"{path.relative_to(PACKAGE.parent)}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"doctest:.*\+SKIP", line)
    ]
    assert not skipped, f"skipped docstring examples: {', '.join(skipped)}"
