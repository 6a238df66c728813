"""Kernels per recorded step on the torch path (the GPU's), counted as aten calls.

    python bench/aten_calls.py            # table to stdout and bench/results/aten-calls.md

On a GPU every aten call that computes is a kernel launch (microseconds each), so a snapshot
path whose calls grow with the layers costs hundreds of milliseconds per recorded step on a
150-module model. Counted with torch.profiler (every ``aten::`` event, nested calls
included, as the issue that set the targets counted them) on the CPU with
``FLOWSCOPE_KERNELS=eager``, the code a GPU runs; the count is deterministic. Reported: calls
per recorded step for MLPs of k Linear + Tanh pairs, the bare step's, the calls per snapshot
(the recorded step's extra over its snapshots) and per added pair (8 snapshots: activation,
gradient of both modules, weight, bias and their gradients).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["FLOWSCOPE_KERNELS"] = "eager"

import flowscope as fs

RESULTS = Path(__file__).resolve().parent / "results"


def mlp(pairs: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(pairs):
        layers += [nn.Linear(64, 64), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(64, 10))


def aten_calls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def measure(pairs: int) -> dict[str, int]:
    model = mlp(pairs)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))

    def bare() -> None:
        model(x).sum().backward()

    bare()
    rec = fs.watch(model)
    rec.pause()

    def recorded() -> None:
        rec.resume()
        model(x).sum().backward()
        rec.step()  # the step's snapshots are reduced here
        rec.pause()

    recorded()  # warm: layouts cached, buffers allocated, as in a training loop
    base = aten_calls(bare)
    before = rec.recorded
    total = aten_calls(recorded)
    snaps = rec.recorded - before
    rec.close()
    return {"pairs": pairs, "bare": base, "recorded": total, "snapshots": snaps}


def main() -> list[dict[str, object]]:
    rows = [measure(k) for k in (1, 2, 4, 8)]
    out = []
    for r in rows:
        extra = r["recorded"] - r["bare"]
        out.append({**r, "extra": extra, "per_snapshot": round(extra / r["snapshots"], 1)})
    added = rows[-1]["pairs"] - rows[-2]["pairs"]
    per_pair = (rows[-1]["recorded"] - rows[-2]["recorded"]) / added
    bare_pair = (rows[-1]["bare"] - rows[-2]["bare"]) / added
    lines = [
        "# aten calls per recorded step, torch path (FLOWSCOPE_KERNELS=eager), torch "
        + torch.__version__,
        "",
        "Command: `python bench/aten_calls.py`",
        "",
        "| Linear+Tanh pairs | bare step | recorded step | snapshots | extra per snapshot |",
        "|---|---|---|---|---|",
        *(
            f"| {r['pairs']} | {r['bare']} | {r['recorded']} | {r['snapshots']} |"
            f" {r['per_snapshot']} |"
            for r in out
        ),
        "",
        f"Per added Linear + Tanh pair (8 snapshots): {per_pair:.0f} calls with flowscope, "
        f"{bare_pair:.0f} for the bare step itself, {per_pair - bare_pair:.0f} added by "
        "flowscope (target <= 80).",
    ]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "aten-calls.md").write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
