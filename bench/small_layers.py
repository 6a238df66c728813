"""The fixed cost per snapshot: a 20 x 128 ReLU MLP, bare against recorded every step.

166 snapshots per recorded step of small tensors, so what each snapshot costs around the
kernel (hooks, keys, the row, the ctypes call) shows. Bare and recorded steps run in
interleaved blocks in one process (this VM's speed drifts); the ratio of each repetition's
medians, then the median of those ratios.

    python bench/small_layers.py [--reps 15] [--block 20] [--batches 64,256] [--threads 1,2]
    python bench/small_layers.py --profile 200  # cProfile of 200 recorded steps
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import statistics
import time

import torch
import torch.nn.functional as F

import flowscope as fs
from flowscope.models.nets import build_net


def _setup(batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build_net("mlp", in_dim=128, width=128, depth=20, out_dim=10, activation="relu")
    return model, torch.randn(batch, 128, generator=g), torch.randint(0, 10, (batch,), generator=g)


def _stepper(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, after):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        after()

    return step


def _block(step, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(batch: int, threads: int, reps: int, block: int) -> tuple[float, float, float]:
    """(bare ms, recorded ms, median ratio) at one batch size and thread count."""
    torch.set_num_threads(threads)
    model, x, y = _setup(batch)
    watched = copy.deepcopy(model)
    rec = fs.watch(watched)

    def after() -> None:
        rec.step()
        if rec.step_index % 50 == 0:
            rec.flush()

    bare, recorded = _stepper(model, x, y, lambda: None), _stepper(watched, x, y, after)
    for _ in range(block):
        bare(), recorded()
    ratios, b_ms, r_ms = [], [], []
    for rep in range(reps):
        order = (bare, recorded) if rep % 2 == 0 else (recorded, bare)
        got = {id(f): _block(f, block) for f in order}
        b, r = got[id(bare)], got[id(recorded)]
        b_ms.append(b * 1e3)
        r_ms.append(r * 1e3)
        ratios.append(r / b)
    rec.close()
    return statistics.median(b_ms), statistics.median(r_ms), statistics.median(ratios)


def profile(steps: int, batch: int = 64) -> None:
    """cProfile of recorded steps, sorted by own time."""
    torch.set_num_threads(1)
    model, x, y = _setup(batch)
    rec = fs.watch(model)
    step = _stepper(model, x, y, rec.step)
    for _ in range(20):
        step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    rec.close()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--profile", type=int, default=0, help="profile this many steps instead")
    args = parser.parse_args()
    if args.profile:
        profile(args.profile)
        return
    print("| batch | threads | bare ms | recorded ms | ratio (median of reps) |")
    print("|---|---|---|---|---|")
    for batch in map(int, args.batches.split(",")):
        for threads in map(int, args.threads.split(",")):
            b, r, ratio = measure(batch, threads, args.reps, args.block)
            print(f"| {batch} | {threads} | {b:.2f} | {r:.2f} | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
