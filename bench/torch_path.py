"""Where the torch path's time goes: one batch of staged tensors reduced, op by op.

    python bench/torch_path.py            # bench/results/torch-path.md
    python bench/torch_path.py --device cuda

The torch path (``flowscope.record.batched``, every GPU's, forced on the CPU with
``FLOWSCOPE_KERNELS=eager``) stages a step's tensors in one buffer and reduces them together.
Here eight (1000, 500) float32 tensors (4M values: one full buffer, as the lecture MLP's
activations) are staged and reduced ``--reps`` times; reported per batch: the staging copies,
``Batch.finish`` (the reduction and both histograms), one pass over the same values (a
``mul`` into a kept tensor) for scale, and the profiler's self time of every aten op in the
finish.

``--compiled`` adds what ``torch.compile`` would give (a candidate the snapshot issue asked
to measure): the reduction's passes over the buffer (extremes, counts, the shifted sums;
not the merge per tensor nor the histograms), written once without ``out=`` and timed eager
and compiled with dynamic shapes, with the compile's own time.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flowscope.record.batched import Batch
from flowscope.record.fields import HistSpec

RESULTS = Path(__file__).resolve().parent / "results"


def buffer_passes(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, inv: torch.Tensor):
    """The per-chunk numbers ``batched._reduce`` takes from the (chunks, width) buffer: the
    non-finite, NaN, nonzero and saturated counts, the finite extremes, the shift c_k and
    the sums of (x - c_k) * inv and their squares; plain ops, as torch.compile wants them."""
    fin = torch.isfinite(v)
    mn = torch.where(fin, v, math.inf).amin(1)
    mx = torch.where(fin, v, -math.inf).amax(1)
    ck = torch.where(mx > -math.inf, mx, 0.0)
    d = torch.where(fin, v, ck[:, None]) * inv - ck[:, None] * inv
    counts = [(~fin).sum(1), (v != v).sum(1), (v != 0).sum(1), ((v <= lo) | (v >= hi)).sum(1)]
    return torch.stack([*(c.to(v.dtype) for c in counts), -mn, mx, ck, d.sum(1), (d * d).sum(1)])


def compiled_rows(device: torch.device, reps: int) -> list[str]:
    """Eager against torch.compile (dynamic shapes) of :func:`buffer_passes` on 4M values."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(4096, 1024, generator=g).to(device)
    lo, hi = (torch.full((4096, 1), b, device=device) for b in (-0.99, 0.99))
    inv = torch.full((4096, 1), 0.25, device=device)
    eager = timed(lambda: buffer_passes(v, lo, hi, inv), device, reps)
    # an empty inductor cache, as a first use in a fresh environment has
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="flowscope-inductor-")
    start = time.perf_counter()
    fn = torch.compile(buffer_passes, dynamic=True)
    fn(v, lo, hi, inv)
    sync(device)
    compile_s = time.perf_counter() - start
    fast = timed(lambda: fn(v, lo, hi, inv), device, reps)
    start = time.perf_counter()
    fn(v[:1000], lo[:1000], hi[:1000], inv[:1000])  # another batch size: no recompile
    sync(device)
    other = time.perf_counter() - start
    gap = (fn(v, lo, hi, inv) - buffer_passes(v, lo, hi, inv)).abs().max().item()
    return [
        "",
        "### torch.compile of the buffer passes (`--compiled`)",
        "",
        "| | ms |",
        "|---|---|",
        f"| the passes, eager (plain ops, temporaries allocated) | {eager * 1e3:.2f} |",
        f"| the same, `torch.compile(dynamic=True)` | {fast * 1e3:.2f} |",
        f"| first call: the compile, on an empty inductor cache | {compile_s * 1e3:.0f} |",
        f"| first call at another batch size | {other * 1e3:.1f} |",
        f"| largest difference, compiled - eager | {gap:.2g} |",
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after two warm ones."""
    for _ in range(2):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--compiled", action="store_true", help="also time torch.compile")
    parser.add_argument("--out", type=Path, default=RESULTS / "torch-path.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1000, 500, generator=g).to(device) for _ in range(8)]
    sat = [(-0.99, 0.99) if i % 2 else None for i in range(len(xs))]  # tanh outputs: half
    batch = Batch(device, torch.float32, HistSpec())
    values = sum(x.numel() for x in xs)

    def stage() -> None:
        for x, s in zip(xs, sat, strict=True):
            batch.add(x, s, False)

    def step() -> None:
        stage()
        batch.finish()

    whole = timed(step, device, args.reps)
    flat = torch.cat([x.view(-1) for x in xs])
    dst = flat.clone().split([x.numel() for x in xs])

    def copies() -> None:  # what staging costs: one copy per tensor into a kept buffer
        for d, x in zip(dst, xs, strict=True):
            d.view(x.shape).copy_(x)

    staging = timed(copies, device, args.reps)
    out = torch.empty_like(flat)
    one_pass = timed(lambda: torch.mul(flat, 2.0, out=out), device, args.reps)

    stage()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        batch.finish()
    ops = sorted(
        ((e.key, e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()
         if e.key.startswith("aten::")),
        key=lambda r: -r[2],
    )  # fmt: skip
    finish = whole - staging
    command = "python bench/torch_path.py" + ("" if device.type == "cpu" else " --device cuda")
    command += " --compiled" if args.compiled else ""
    lines = [
        "# The torch path, one batch: 8 tensors of (1000, 500) float32, 4M values",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.platform()}, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, device {device}",
        "",
        "| part | ms per batch | ns per value | in passes |",
        "|---|---|---|---|",
    ]
    parts = [
        ("the copies staging makes", staging),
        ("`Batch.finish` (stage + finish - copies)", finish),
        ("stage + finish", whole),
        ("one pass: `mul` into a kept tensor", one_pass),
    ]
    for name, sec in parts:
        lines.append(
            f"| {name} | {sec * 1e3:.2f} | {sec / values * 1e9:.2f} | {sec / one_pass:.1f} |"
        )
    lines += ["", "### aten ops of one finish (profiler self time, CPU side)", "",
              "| op | calls | ms |", "|---|---|---|"]  # fmt: skip
    lines += [f"| `{name}` | {count} | {ms:.3f} |" for name, count, ms in ops[:20]]
    if args.compiled:
        lines += compiled_rows(device, args.reps)
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
