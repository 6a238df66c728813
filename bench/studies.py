"""Every built-in study end to end, as `make demo` runs one: wall time and each claim's verdict.

    python bench/studies.py                       # all of them; bench/results/studies.md
    python bench/studies.py init-scales batchnorm # some of them (the file lists those only)

Each study runs in a new process (``python -m flowscope study run NAME --fresh``, its
report included) into a temporary folder, on the CPU with the study's own seeds; the time is
the process's wall time, imports and the report included. The verdicts are read back from
the run folder's claims.json: status, origin, the judged value's [low, high] over the seeds
per setting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
STUDIES = [  # every built-in study
    "init-scales", "symmetry", "activations", "depth", "batchnorm", "isometry", "edge-of-chaos",
    "trainability", "residual", "residual-conv", "width",
]  # fmt: skip


def run(name: str, out: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "flowscope", "study", "run", name, "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run([*command, "--fresh"], capture_output=True, text=True, env=env, check=True)
    return time.perf_counter() - t0


def interval(numbers: dict) -> str:
    """The judged value's range over the seeds, setting by setting (the first three)."""
    parts = []
    for setting, (low, high) in list(numbers.get("interval", {}).items())[:3]:
        if low is None:
            parts.append(f"{setting}: –")
            continue
        span = f"{low:.3g}" if f"{low:.3g}" == f"{high:.3g}" else f"{low:.3g}…{high:.3g}"
        parts.append(span if setting == "all" else f"{setting}: {span}")
    more = len(numbers.get("interval", {})) - 3
    return "; ".join(parts) + (f" (+{more})" if more > 0 else "")


def main() -> None:
    names = sys.argv[1:] or STUDIES
    lines = [
        "# The built-in studies end to end",
        "",
        "`python bench/studies.py` — each study in a new process, `flowscope study run NAME",
        "--fresh` with its report, on the CPU (2 cores here), every seed of the study file.",
        "",
        "| study | configs | seeds | wall time | load average (1 min) before |",
        "| --- | --- | --- | --- | --- |",
    ]
    verdicts = []
    for name in names:
        load = os.getloadavg()[0]  # other processes on the 2 cores stretch the wall time
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / name
            seconds = run(name, out)
            spec = json.loads((out / "spec.json").read_text())
            claims = json.loads((out / "claims.json").read_text())
            configs = len(json.loads((out / "configs.json").read_text()))
        seeds = len(spec["run"]["seeds"])
        lines.append(f"| {name} | {configs} | {seeds} | {seconds:.0f} s | {load:.1f} |")
        print(f"{name}: {seconds:.1f} s", file=sys.stderr)
        for v in claims:
            verdicts.append(
                f"| {name} | `{v['id']}` | {v['status']} | {v['origin']} | "
                f"{interval(v['numbers'])} |"
            )
    lines += [
        "",
        "| study | claim | verdict | origin | judged value over the seeds |",
        "| --- | --- | --- | --- | --- |",
        *verdicts,
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not sys.argv[1:]:
        (RESULTS / "studies.md").write_text(text)


if __name__ == "__main__":
    main()
