"""Long training runs, recorded, then their reports (issue 17's tables).

    python bench/longrun.py                          # this checkout, the 2000-step MLP
    python bench/longrun.py --repo /tmp/old          # another checkout (the "before" column)
    python bench/longrun.py --scenario long          # 100 000 steps of a small net, every=10
    python bench/longrun.py --scenario gpt2          # GPT-2 shape (12 x 256), 1000 steps
    python bench/longrun.py --scenario all --write   # the three, into bench/results

Scenarios (each in a fresh process, ``--child``, so RSS is its own):

* ``mlp``: a 20 x 128 ReLU MLP (Linear + ReLU per layer, a 10-way head), Adam (lr 1e-3),
  batch 256 of Gaussian inputs, cross-entropy, ``fs.watch(model, every=1, out=...)`` and
  ``rec.step(loss=...)`` every step (``rec.step()`` on a checkout without the run store),
  2000 steps, then ``fs.report``. Timing: blocks of 50 steps alternating with a bare copy
  of the model trained in the same process (bare, recorded, bare, ...); medians, and the
  median of the recorded / bare ratio of each pair of blocks.
* ``long``: a 4 x 64 ReLU MLP, batch 64, Adam, ``every=10``, 100 000 steps (10 000 recorded),
  then the report.
* ``gpt2``: ``GPT2LMHeadModel`` built from a transformers config (12 blocks, d = 256, 4
  heads, vocabulary 2048, context 64), AdamW, batch 8 x 64 random tokens, ``every=10``,
  1000 steps, then the report.

Measured for each: RSS (VmRSS) after 10 % of the steps and at the last step; peak RSS of
the whole process, report included (``ru_maxrss``); the time to write the report; the run
folder's size on disk (the streamed parts plus the report and its CSV exports).

Results go to ``bench/results/longrun.md`` (``--write``), with the machine, the load average
and the command.
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


def _mlp(depth: int, width: int, classes: int) -> Any:
    from torch import nn

    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def _setup(scenario: str) -> tuple[Any, Any, Any, int]:
    """(make a model, make its optimizer, the loss of a model on step i, every)."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(1)
    if scenario == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            n_layer=12, n_embd=256, n_head=4, vocab_size=2048, n_positions=64, use_cache=False
        )
        tokens = [torch.randint(0, 2048, (8, 64), generator=gen) for _ in range(20)]

        def gpt_loss(model: Any, i: int) -> Any:
            ids = tokens[i % len(tokens)]
            return model(input_ids=ids, labels=ids).loss

        return (
            lambda: GPT2LMHeadModel(config),
            lambda m: torch.optim.AdamW(m.parameters(), lr=3e-4),
            gpt_loss,
            10,
        )
    depth, width, batch, every = (20, 128, 256, 1) if scenario == "mlp" else (4, 64, 64, 10)
    batches = [
        (torch.randn(batch, width, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
        for _ in range(20)
    ]

    def mlp_loss(model: Any, i: int) -> Any:
        x, y = batches[i % len(batches)]
        return nn.functional.cross_entropy(model(x), y)

    return (
        lambda: _mlp(depth, width, 10),
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
        mlp_loss,
        every,
    )


def child(scenario: str, steps: int, out: Path) -> dict[str, Any]:
    """One measurement, in this process (``--child``)."""
    import torch

    import flowscope as fs

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    make, optimizer, loss_of, every = _setup(scenario)

    def stepper(model: Any, rec: Any = None, streamed: bool = False) -> Any:
        opt = optimizer(model)

        def step(i: int) -> None:
            loss = loss_of(model, i)
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

    result: dict[str, Any] = {"scenario": scenario, "steps": steps}
    model = make()
    streamed = "out" in inspect.signature(fs.watch).parameters
    run = out / "run"
    rec = fs.watch(model, out=run, every=every) if streamed else fs.watch(model, every=every)
    rec_step = stepper(model, rec, streamed)
    bare_step = stepper(make()) if scenario == "mlp" else None
    bare, recorded = [], []
    t_run = time.perf_counter()
    for start in range(0, steps, BLOCK):  # blocks interleaved: load on the machine hits both
        if bare_step is not None:
            bare.append(block(bare_step, start))
        recorded.append(block(rec_step, start))
        if start + BLOCK == steps // 10:
            result["rss_10pct"] = _rss_mib()
    result["train_s"] = time.perf_counter() - t_run
    result["rss_last"] = _rss_mib()
    rec.close()
    t0 = time.perf_counter()
    fs.report(rec, run)
    result["report_s"] = time.perf_counter() - t0
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["folder_mib"] = _folder_mib(run)
    result["recorded_ms"] = statistics.median(recorded) * 1e3
    if bare:
        result["bare_ms"] = statistics.median(bare) * 1e3
        result["ratio"] = statistics.median(r / b for r, b in zip(recorded, bare, strict=True))
    result["streamed"] = streamed
    result["flowscope"] = fs.__version__
    result["rows"] = int(rec.recorded)
    result["load_avg"] = os.getloadavg()[0]
    return result


def measure(repo: Path, scenario: str, steps: int) -> dict[str, Any]:
    """Run :func:`child` against the checkout ``repo`` in a fresh process."""
    out = Path(tempfile.mkdtemp(prefix="flowscope-longrun-"))
    env = {**os.environ, "PYTHONPATH": str(repo)}
    try:
        cmd = [sys.executable, __file__, "--child", "--scenario", scenario]
        cmd += ["--steps", str(steps), "--out", str(out)]
        done = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"the child failed:\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def commit_of(repo: Path) -> str:
    git = ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"]
    return subprocess.run(git, capture_output=True, text=True, check=False).stdout.strip()


STEPS = {"mlp": 2000, "long": 100_000, "gpt2": 1000}
NAMES = {
    "mlp": "20 x 128 ReLU MLP, Adam, batch 256, every step",
    "long": "4 x 64 ReLU MLP, Adam, batch 64, every=10",
    "gpt2": "GPT-2 shape (12 blocks, d = 256), AdamW, batch 8 x 64, every=10",
}


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """One column per measurement (a checkout or a scenario)."""
    head = "| | " + " | ".join(name for name, _ in rows) + " |"
    lines = [head, "|---" * (len(rows) + 1) + "|"]

    def line(label: str, fmt: Any) -> None:
        cells = []
        for _, r in rows:
            try:
                cells.append(fmt(r))
            except KeyError:
                cells.append("")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    line("steps trained / snapshots recorded", lambda r: f"{r['steps']:,} / {r['rows']:,}")
    line(
        "RSS growth, 10 % of the steps to the end",
        lambda r: f"{r['rss_last'] - r['rss_10pct']:+.0f} MiB",
    )
    line(
        "RSS at 10 % / at the end",
        lambda r: f"{r['rss_10pct']:.0f} / {r['rss_last']:.0f} MiB",
    )
    line("peak RSS, report included", lambda r: f"{r['peak_rss_mib']:.0f} MiB")
    line("time to write the report", lambda r: f"{r['report_s']:.1f} s")
    line("run folder on disk, report included", lambda r: f"{r['folder_mib']:.1f} MiB")
    line("training time, recorded", lambda r: f"{r['train_s']:.0f} s")
    line(
        "time per step: bare / recorded (median of 50-step blocks)",
        lambda r: f"{r['bare_ms']:.2f} / {r['recorded_ms']:.2f} ms",
    )
    line("recording overhead per step (median of block ratios)", lambda r: f"{r['ratio']:.2f}x")
    line("1-minute load average at the end", lambda r: f"{r['load_avg']:.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=[*STEPS, "all"], default="mlp")
    parser.add_argument("--steps", type=int, help="default: the scenario's (2000, 100000, 1000)")
    parser.add_argument("--repo", type=Path, action="append", help="checkouts to compare")
    parser.add_argument("--write", action="store_true", help="write bench/results/longrun.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, os.environ.get("PYTHONPATH", str(ROOT)))
        print(json.dumps(child(args.scenario, args.steps, args.out)))
        return
    scenarios = list(STEPS) if args.scenario == "all" else [args.scenario]
    repos = args.repo or [ROOT]
    rows = []
    for scenario in scenarios:
        for repo in repos:
            result = measure(repo, scenario, args.steps or STEPS[scenario])
            store = "run store" if result["streamed"] else "in memory"
            name = f"{NAMES[scenario]}: {store} ({commit_of(repo)})"
            print(name, json.dumps(result), file=sys.stderr)
            rows.append((name, result))
    text = table(rows)
    print(text)
    if args.write:
        machine = (
            f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        )
        command = "python bench/longrun.py " + " ".join(sys.argv[1:])
        body = f"# Long runs: memory, report, disk\n\n{machine}; `{command}`\n\n{text}\n"
        (ROOT / "bench" / "results" / "longrun.md").write_text(body)


if __name__ == "__main__":
    main()
