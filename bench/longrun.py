"""A long training run, recorded every step, then its report (issue 17's table).

    python bench/longrun.py                          # this checkout, 2000 steps
    python bench/longrun.py --repo /tmp/old          # another checkout (the "before" column)
    python bench/longrun.py --steps 300 --quick      # a smoke run

The model: a 20 x 128 ReLU MLP (Linear + ReLU per layer, a 10-way head), Adam (lr 1e-3),
batch 256 of Gaussian inputs, cross-entropy, ``fs.watch(model, every=1)`` and
``rec.step(loss=...)`` every step (``rec.step()`` on a checkout without the run store), then
``fs.report``. Each measurement runs in a fresh process (``--child``) so RSS is its own:

* RSS (VmRSS) at step 200 and at the last step, and their difference;
* peak RSS of the whole process, report included (``ru_maxrss``);
* the time to write the report (``fs.report`` of the recorder);
* the run folder's size on disk (with the run store: the streamed parts plus the report;
  without: the report folder, where ``fs.report`` saves the records);
* the time per step with recording against a bare model trained in the same process, blocks
  of 50 steps alternating (bare, recorded, bare, ...): medians, and the median of the
  recorded / bare ratio of each pair of blocks.

Results go to ``bench/results/longrun.md`` (``--write``), with the machine and the command.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 50  # steps per timing block; bare and recorded blocks alternate


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def child(steps: int, out: Path) -> dict[str, Any]:
    """One measurement, in this process (``--child``)."""
    import torch
    from torch import nn

    import flowscope as fs

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))

    def mlp() -> nn.Module:
        layers: list[nn.Module] = []
        for _ in range(20):
            layers += [nn.Linear(128, 128), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(128, 10))

    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(256, 128, generator=gen), torch.randint(0, 10, (256,), generator=gen))
        for _ in range(20)
    ]

    def stepper(model: nn.Module, rec: Any = None, streamed: bool = False) -> Any:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(i: int) -> None:
            x, y = batches[i % len(batches)]
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if rec is not None:
                rec.step(loss=loss) if streamed else rec.step()

        return step

    def block(step: Any, start: int) -> float:
        t0 = time.perf_counter()
        for i in range(start, start + BLOCK):
            step(i)
        return (time.perf_counter() - t0) / BLOCK

    result: dict[str, Any] = {}
    model = mlp()
    streamed = "out" in inspect.signature(fs.watch).parameters
    run = out / "run"
    rec = fs.watch(model, out=run) if streamed else fs.watch(model)
    bare_step, rec_step = stepper(mlp()), stepper(model, rec, streamed)
    bare, recorded = [], []
    for start in range(0, steps, BLOCK):  # blocks interleaved: load on the machine hits both
        bare.append(block(bare_step, start))
        recorded.append(block(rec_step, start))
        if start + BLOCK == 200:
            result["rss_200"] = _rss_mib()
    result["rss_last"] = _rss_mib()
    rec.close()
    t0 = time.perf_counter()
    fs.report(rec, run)
    result["report_s"] = time.perf_counter() - t0
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["folder_mib"] = _folder_mib(run)
    result["bare_ms"] = statistics.median(bare) * 1e3
    result["recorded_ms"] = statistics.median(recorded) * 1e3
    result["ratio"] = statistics.median(r / b for r, b in zip(recorded, bare, strict=True))
    result["streamed"] = streamed
    result["flowscope"] = fs.__version__
    result["rows"] = int(rec.recorded)
    return result


def measure(repo: Path, steps: int) -> dict[str, Any]:
    """Run :func:`child` against the checkout ``repo`` in a fresh process."""
    out = Path(tempfile.mkdtemp(prefix="flowscope-longrun-"))
    env = {**os.environ, "PYTHONPATH": str(repo)}
    try:
        cmd = [sys.executable, __file__, "--child", "--steps", str(steps), "--out", str(out)]
        done = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"the child failed:\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def commit_of(repo: Path) -> str:
    git = ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"]
    return subprocess.run(git, capture_output=True, text=True, check=False).stdout.strip()


def table(rows: list[tuple[str, dict[str, Any]]], steps: int) -> str:
    head = "| | " + " | ".join(name for name, _ in rows) + " |"
    lines = [head, "|---" * (len(rows) + 1) + "|"]

    def line(label: str, fmt: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(fmt(r) for _, r in rows) + " |")

    line(
        f"RSS growth, step 200 to step {steps}",
        lambda r: f"{r['rss_last'] - r['rss_200']:+.0f} MiB",
    )
    line("RSS at step 200 / at the end", lambda r: f"{r['rss_200']:.0f} / {r['rss_last']:.0f} MiB")
    line("peak RSS, report included", lambda r: f"{r['peak_rss_mib']:.0f} MiB")
    line("time to write the report", lambda r: f"{r['report_s']:.1f} s")
    line("run folder on disk", lambda r: f"{r['folder_mib']:.1f} MiB")
    line(
        "time per step: bare / recorded (median of 50-step blocks)",
        lambda r: f"{r['bare_ms']:.2f} / {r['recorded_ms']:.2f} ms",
    )
    line("recording overhead per step (median of block ratios)", lambda r: f"{r['ratio']:.2f}x")
    line("snapshots recorded", lambda r: f"{r['rows']:,}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repo", type=Path, action="append", help="checkouts to compare")
    parser.add_argument("--write", action="store_true", help="write bench/results/longrun.md")
    parser.add_argument("--quick", action="store_true", help="(kept for symmetry; use --steps)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, os.environ.get("PYTHONPATH", str(ROOT)))
        print(json.dumps(child(args.steps, args.out)))
        return
    repos = args.repo or [ROOT]
    rows = []
    for repo in repos:
        result = measure(repo, args.steps)
        name = f"{'run store' if result['streamed'] else 'in memory'} ({commit_of(repo)})"
        print(name, json.dumps(result), file=sys.stderr)
        rows.append((name, result))
    text = table(rows, args.steps)
    print(text)
    if args.write:
        machine = (
            f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        )
        command = "python bench/longrun.py " + " ".join(sys.argv[1:])
        body = f"# A long run: memory, report, disk\n\n{machine}; `{command}`\n\n{text}\n"
        (ROOT / "bench" / "results" / "longrun.md").write_text(body)


if __name__ == "__main__":
    main()
