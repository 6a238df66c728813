"""The first recorded step in a fresh environment (empty caches), and in the next process.

    python bench/first_use.py            # table to stdout and bench/results/first-use.md

Each measurement is a new Python process with its own empty kernel cache
(``FLOWSCOPE_CACHE_DIR`` in a temporary folder): import torch and flowscope, build the
lecture MLP (10 x 500, batch 1000), watch it and time one forward/backward with every kind
recorded and the stats frame built, against the same step unwatched. "fresh" is the first
process on an empty cache (the C kernel is compiled), "cached" a second process on the
cache the first one left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, time
t0 = time.perf_counter()
import torch
import flowscope as fs
from flowscope.models.nets import build_net
imported = time.perf_counter() - t0
torch.manual_seed(0)
model = build_net("mlp", in_dim=500, width=500, depth=10, out_dim=10, activation="tanh")
x = torch.randn(1000, 500)
t = time.perf_counter()
model(x).sum().backward()
bare = time.perf_counter() - t
t = time.perf_counter()
with fs.watch(model) as rec:
    model(x).sum().backward()
rows = len(rec.stats)
first = time.perf_counter() - t
print(json.dumps({"import_s": imported, "bare_step_s": bare, "first_recorded_step_s": first,
                  "rows": rows}))
"""


def run(cache: str) -> dict[str, float]:
    env = {**os.environ, "FLOWSCOPE_CACHE_DIR": cache, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    rows = []
    for rep in range(3):
        with tempfile.TemporaryDirectory() as cache:
            rows.append({"run": f"fresh #{rep + 1}", **run(cache)})
            rows.append({"run": f"cached #{rep + 1}", **run(cache)})
    lines = [
        "# First recorded step, lecture MLP (10 x 500, batch 1000), new process each",
        "",
        "Command: `python bench/first_use.py`",
        "",
        "| run | import torch + flowscope (s) | bare step (s) | first recorded step (s) |",
        "|---|---|---|---|",
        *(
            f"| {r['run']} | {r['import_s']:.2f} | {r['bare_step_s']:.3f} |"
            f" {r['first_recorded_step_s']:.2f} |"
            for r in rows
        ),
        "",
        "The first recorded step includes compiling the C kernel on an empty cache (fresh) or",
        "loading it (cached), the hooks, every snapshot and building the stats frame.",
    ]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "first-use.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
