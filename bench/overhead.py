"""What recording costs, side by side with the tools people use today, in one run.

    python bench/overhead.py                 # the full table (a few minutes on 2 CPU cores)
    python bench/overhead.py --quick         # fewer repetitions, for a smoke run
    python bench/overhead.py --device cuda   # on a GPU: bench/results/overhead-cuda.{csv,md}
    python bench/overhead.py --study-only    # the study engine's row only, printed

Every mode gets its own copy of the model with its hooks attached; timing blocks of
``--steps`` training steps are interleaved across modes (bare, flowscope, ...), in an order
rotated every repetition, and repeated ``--reps`` times, so drift of the machine hits every
mode alike. Reported: the median time per step, the median over repetitions of the ratio to
the bare block of the same repetition, and the quartiles of those ratios. Modes:

* ``bare``: forward, cross-entropy, backward, SGD step.
* ``flowscope``: ``fs.watch(model)`` with every kind and both histograms, every step.
* ``flowscope/10``: the same, recording every 10th step.
* ``tensorboard``: what TensorBoard users do: a forward hook per leaf module that writes
  ``add_histogram(output.detach().cpu())`` and registers a tensor hook for the gradient.
* ``wandb``: ``wandb.watch(model, log="all", log_freq=1)`` in offline mode (skipped with a
  message when wandb is not installed).
* ``fastai``: fastai's ActivationStats idea: per leaf module mean, std and near-zero share,
  each fetched with ``.item()``.

Memory: peak RSS of a bare and a flowscope run at two batch sizes, each in its own process.
Study: ``init-scales`` through the engine against a bare loop of the same forward/backward
passes, and the report's plotting time on its own.
Results go to ``bench/results/overhead.{csv,md}`` with the machine and the command.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flowscope as fs
from flowscope.models.nets import build_net

RESULTS = Path(__file__).resolve().parent / "results"
DEVICE = torch.device("cpu")  # --device; models and batches live there


def sync() -> None:
    """Wait for the GPU (timing a CUDA step needs it); nothing on the CPU."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


# -- models ------------------------------------------------------------------------------------


class Transformer(nn.Module):
    """A small encoder classifier built from torch's own layers (no downloads)."""

    def __init__(self, vocab: int = 1000, d: int = 256, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(dim=1))


def make_case(name: str, batch: int | None = None) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model, input, labels) of one benchmark case."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "lecture-mlp":  # DD2424: 10 x 500 tanh, batch 1000
        n = batch or 1000
        model = build_net("mlp", in_dim=500, width=500, depth=10, out_dim=10, activation="tanh")
        x = torch.randn(n, 500, generator=g)
    elif name == "wide-mlp":  # 20 x 1024 ReLU
        n = batch or 256
        model = build_net("mlp", in_dim=1024, width=1024, depth=20, out_dim=10, activation="relu")
        x = torch.randn(n, 1024, generator=g)
    elif name == "small-mlp":  # 20 x 128 ReLU, batch 64: the fixed cost per snapshot shows
        n = batch or 64
        model = build_net("mlp", in_dim=128, width=128, depth=20, out_dim=10, activation="relu")
        x = torch.randn(n, 128, generator=g)
    elif name == "cnn":
        n = batch or 64
        model = build_net(
            "conv", in_channels=3, image_size=32, channels=32, depth=4, norm="batchnorm"
        )
        x = torch.randn(n, 3, 32, 32, generator=g)
    elif name == "transformer":
        n = batch or 16
        model = Transformer()
        x = torch.randint(0, 1000, (n, 64), generator=g)
    else:
        raise SystemExit(f"unknown case {name!r}")
    y = torch.randint(0, 10, (n,), generator=g)
    return model.to(DEVICE), x.to(DEVICE), y.to(DEVICE)


# -- modes: each returns (per-step callback, close) after attaching to its model ---------------


def attach_bare(model: nn.Module, tmp: str) -> tuple[Callable[[], None], Callable[[], None]]:
    return (lambda: None), (lambda: None)


def attach_flowscope(every: int, kernels: str = "auto") -> Callable:
    def attach(model: nn.Module, tmp: str) -> tuple[Callable[[], None], Callable[[], None]]:
        before = os.environ.get("FLOWSCOPE_KERNELS")
        os.environ["FLOWSCOPE_KERNELS"] = kernels  # read by the recorder when it is made
        try:
            rec = fs.watch(model, every=every)
        finally:
            if before is None:
                del os.environ["FLOWSCOPE_KERNELS"]
            else:
                os.environ["FLOWSCOPE_KERNELS"] = before

        def step() -> None:
            rec.step()
            if rec.step_index % 50 == 0:
                rec.flush()  # bounded device buffers, as a long run would

        return step, rec.close

    return attach


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]


def attach_tensorboard(model: nn.Module, tmp: str) -> tuple[Callable[[], None], Callable[[], None]]:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp)
    state = {"step": 0}
    handles = []
    for name, module in _leaves(model):

        def hook(m: nn.Module, args: Any, out: Any, name: str = name) -> None:
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return
            writer.add_histogram(f"{name}/act", out.detach().cpu(), state["step"])
            if out.requires_grad:
                out.register_hook(
                    lambda g: writer.add_histogram(f"{name}/grad", g.detach().cpu(), state["step"])
                )

        handles.append(module.register_forward_hook(hook))

    def step() -> None:
        state["step"] += 1

    def close() -> None:
        for h in handles:
            h.remove()
        writer.close()

    return step, close


def attach_wandb(model: nn.Module, tmp: str) -> tuple[Callable[[], None], Callable[[], None]]:
    import wandb

    run = wandb.init(mode="offline", dir=tmp, project="flowscope-bench", reinit="finish_previous")
    run.watch(model, log="all", log_freq=1)

    def step() -> None:
        run.log({"step": 1})

    def close() -> None:
        run.unwatch(model)
        run.finish()

    return step, close


def attach_fastai(model: nn.Module, tmp: str) -> tuple[Callable[[], None], Callable[[], None]]:
    stats: list[list[float]] = []
    handles = []
    for _, module in _leaves(model):

        def hook(m: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                o = out.detach().float()
                stats.append([o.mean().item(), o.std().item(), (o <= 0.05).float().mean().item()])

        handles.append(module.register_forward_hook(hook))
    return (lambda: None), (lambda: [h.remove() for h in handles])


MODES: dict[str, Callable] = {
    "bare": attach_bare,
    "flowscope": attach_flowscope(1),
    "flowscope/10": attach_flowscope(10),
    "flowscope-torch": attach_flowscope(1, "eager"),  # the GPU's code path, forced on the CPU
    "tensorboard": attach_tensorboard,
    "wandb": attach_wandb,
    "fastai": attach_fastai,
}


# -- timing ------------------------------------------------------------------------------------


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> None:
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_case(case: str, modes: list[str], reps: int, steps: int) -> list[dict[str, Any]]:
    """Interleaved blocks of ``steps`` steps per mode, ``reps`` times; medians per step."""
    base, x, y = make_case(case)
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            model = copy.deepcopy(base)
            try:
                step, close = MODES[mode](model, os.path.join(tmp, mode.replace("/", "_")))
            except ImportError as err:
                print(f"  {mode}: skipped ({err})", file=sys.stderr)
                continue
            opt = torch.optim.SGD(model.parameters(), lr=1e-4)
            runs[mode] = (model, opt, step, close, [])
            for _ in range(2):  # warm-up
                train_step(model, opt, x, y)
                step()
        order = list(runs)
        for rep in range(reps):
            k = rep % len(order)  # rotate: no mode always runs right after the same one
            for mode in order[k:] + order[:k]:
                model, opt, step, _, times = runs[mode]
                sync()
                t0 = time.perf_counter()
                for _ in range(steps):
                    train_step(model, opt, x, y)
                    step()
                sync()
                times.append((time.perf_counter() - t0) / steps)
        for _, (_, _, _, close, _) in runs.items():
            close()
    bare = runs["bare"][4]
    rows = []
    for mode, r in runs.items():
        # paired: each repetition's block against the bare block of the same repetition, so
        # the machine's slow drift (a shared VM) cancels; the median of those ratios
        ratios = sorted(t / b for t, b in zip(r[4], bare, strict=True))
        q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
        rows.append(
            {
                "case": case,
                "mode": mode,
                "ms_per_step": round(statistics.median(r[4]) * 1e3, 2),
                "ratio": round(statistics.median(ratios), 3),
                "ratio_iqr": f"{q1:.2f}-{q3:.2f}",
            }
        )
    return rows


# -- memory ------------------------------------------------------------------------------------


def peak_rss_child(case: str, mode: str, batch: int, steps: int) -> None:
    """Run in a child process: peak RSS (MiB) after ``steps`` steps, printed as JSON; on a GPU
    the peak of ``torch.cuda.max_memory_allocated`` instead."""
    model, x, y = make_case(case, batch)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    step, close = MODES[mode](model, tempfile.mkdtemp())
    for _ in range(steps):
        train_step(model, opt, x, y)
        step()
    close()
    if DEVICE.type == "cuda":
        sync()
        print(json.dumps({"rss_mib": torch.cuda.max_memory_allocated(DEVICE) / 2**20}))
        return
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child would report
    # its parent's peak; VmHWM belongs to this address space only
    status = Path("/proc/self/status").read_text()
    hwm = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"rss_mib": int(hwm.split()[1]) / 1024}))


def memory_rows(case: str, batches: tuple[int, int], steps: int) -> list[dict[str, Any]]:
    rows = []
    for batch in batches:
        rss = {}
        for mode in ("bare", "flowscope"):
            out = subprocess.run(
                [sys.executable, __file__, "--device", str(DEVICE), "--rss-child", case, mode,
                 str(batch), str(steps)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            rss[mode] = json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"]
        rows.append(
            {
                "case": case,
                "batch": batch,
                "bare_mib": round(rss["bare"], 1),
                "flowscope_mib": round(rss["flowscope"], 1),
                "added_mib": round(rss["flowscope"] - rss["bare"], 1),
            }
        )
    return rows


# -- host synchronisation (GPU) -----------------------------------------------------------------


def sync_rows(cases: list[str], steps: int = 3) -> list[dict[str, Any]]:
    """Recorded training steps under ``torch.cuda.set_sync_debug_mode("error")``: any host
    synchronisation in a hook (or in the step) raises. Warm-up steps run outside the check."""
    rows = []
    for case in cases:
        model, x, y = make_case(case)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        rec = fs.watch(model)
        for _ in range(2):
            train_step(model, opt, x, y)
            rec.step()
        sync()
        result = "none"
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(steps):
                train_step(model, opt, x, y)
                rec.step()
        except RuntimeError as err:
            result = f"SYNC: {str(err).splitlines()[0][:120]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
        rec.close()
        rows.append({"case": case, "steps": steps, "host syncs in hooks": result})
    return rows


# -- the study engine --------------------------------------------------------------------------


def study_rows(reps: int = 9) -> list[dict[str, Any]]:
    """init-scales through the engine vs the same passes bare, interleaved ``reps`` times (the
    order alternating, each engine run into a fresh folder): the median of the paired ratios,
    and the ratio of the fastest runs. Plotting (the report) is timed once, on its own."""
    from flowscope.study import engine, spec
    from flowscope.study.data import make_data

    study = spec.load("init-scales", ["run.seeds=[0]"])  # one seed: the recorded results' grid

    def bare() -> None:
        for config in study.configs():
            gen = torch.Generator().manual_seed(engine.derive_seed(study, config))
            data = {k: v for k, v in config.data.items() if k != "name"}
            batch = make_data(config.data["name"], generator=gen, **data)
            net = {k: v for k, v in config.net.items() if k != "name"}
            model = build_net(config.net["name"], **net)
            engine.initialise(model, config.init, study.presets, gen)
            nn.functional.cross_entropy(model(batch.x), batch.y).backward()

    def timed(run: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        run()
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        folders = iter(range(reps + 1))

        def through_engine() -> None:
            engine.run_study(study, Path(tmp) / f"run{next(folders)}")

        through_engine()  # warm: the C kernel, imports, allocator
        bare()
        pairs = []
        for rep in range(reps):
            order = [bare, through_engine] if rep % 2 == 0 else [through_engine, bare]
            times = {run: timed(run) for run in order}
            pairs.append((times[bare], times[through_engine]))
            print(f"study rep {rep}: bare {times[bare]:.2f} s", file=sys.stderr, end=", ")
            print(f"engine {times[through_engine]:.2f} s", file=sys.stderr)
        t_plot = None
        try:
            from flowscope.reporter.page import report

            t_plot = timed(lambda: report(Path(tmp) / "run0"))
        except ImportError:
            pass
    bare_s = [b for b, _ in pairs]
    engine_s = [e for _, e in pairs]
    ratios = sorted(e / b for b, e in pairs)
    return [
        {
            "case": f"init-scales (16 configs), {reps} interleaved runs",
            "engine_s": round(statistics.median(engine_s), 2),
            "bare_loop_s": round(statistics.median(bare_s), 2),
            "ratio": round(statistics.median(ratios), 2),
            "ratio_range": f"{ratios[0]:.2f}-{ratios[-1]:.2f}",
            "fastest_ratio": round(min(engine_s) / min(bare_s), 2),
            "report_s": None if t_plot is None else round(t_plot, 2),
        }
    ]


# -- output ------------------------------------------------------------------------------------


# the CPU targets: every step (the C kernel), every 10th, the torch path forced on the CPU;
# the small MLP measures the fixed cost per snapshot and has its own
TARGETS = {"flowscope": 1.10, "flowscope/10": 1.05, "flowscope-torch": 1.3}
CASE_TARGETS = {"small-mlp": {"flowscope": 2.0}}
GPU_TARGETS = {"flowscope": 1.10}  # ... and on a GPU, for the wide MLP and the transformer
LESS_OVERHEAD = 3.0  # flowscope's overhead must be this many times below these tools'


def summary(timing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case: flowscope's ratios against the targets, and how many times less overhead
    (ratio - 1) it adds than each of the other tools."""
    rows = []
    targets = GPU_TARGETS if DEVICE.type == "cuda" else TARGETS
    for case in dict.fromkeys(r["case"] for r in timing):
        ratio = {r["mode"]: r["ratio"] for r in timing if r["case"] == case}
        if "flowscope" not in ratio:
            continue
        own = max(ratio["flowscope"] - 1.0, 1e-9)
        row: dict[str, Any] = {"case": case}
        for mode, target in {**targets, **CASE_TARGETS.get(case, {})}.items():
            if mode in ratio:
                met = "yes" if ratio[mode] <= target else "no"
                row[f"{mode} (<= {target})"] = f"{ratio[mode]:.2f} {met}"
        for tool in ("tensorboard", "wandb", "fastai"):
            if tool in ratio:
                times = (ratio[tool] - 1.0) / own
                met = "" if tool == "fastai" else (" yes" if times >= LESS_OVERHEAD else " no")
                row[f"{tool} overhead / flowscope's"] = f"{times:.1f}x{met}"
        rows.append(row)
    return rows


def markdown(title: str, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(c for r in rows for c in r))  # rows may differ (case targets)
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "–")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
        "flowscope": fs.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="lecture-mlp,wide-mlp,cnn,transformer,small-mlp")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 reps, no memory/study parts")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to measure on a GPU")
    parser.add_argument(
        "--study-only", action="store_true", help="time only the study engine; print, write nothing"
    )
    parser.add_argument("--rss-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.study_only:
        print(markdown("Study engine vs a bare loop of the same passes", study_rows()))
        return
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    if args.rss_child:
        case, mode, batch, steps = args.rss_child
        peak_rss_child(case, mode, int(batch), int(steps))
        return
    reps = 3 if args.quick else args.reps
    if args.steps % 10:
        parser.error(
            "--steps must be a multiple of 10: every block then holds one recorded"
            " step of flowscope/10, whose median is otherwise biased"
        )
    timing = []
    for case in args.cases.split(","):
        print(f"timing {case} ...", file=sys.stderr)
        timing += time_case(case, args.modes.split(","), reps, args.steps)
        print(markdown(case, [r for r in timing if r["case"] == case]), file=sys.stderr)
    memory = [] if args.quick else memory_rows("lecture-mlp", (250, 1000), 20)
    gpu = DEVICE.type == "cuda"
    syncs = sync_rows(args.cases.split(",")) if gpu else []
    study = [] if args.quick or gpu else study_rows()  # the engine's timing is a CPU target
    stem = "overhead-cuda" if gpu else "overhead"  # a GPU run leaves the CPU table alone
    args.out.mkdir(parents=True, exist_ok=True)
    import csv

    with open(args.out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(timing[0]))
        writer.writeheader()
        writer.writerows(timing)
    command = "python bench/overhead.py " + " ".join(sys.argv[1:])
    md = [
        "# flowscope overhead, measured",
        "",
        f"Command: `{command.strip()}`  ",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()),
        "",
        markdown(
            "Time per training step (median); ratio to the bare step (median of the"
            " repetitions' paired ratios) and its quartiles",
            timing,
        ),
        markdown(
            (
                "Against the GPU target (every step <= 1.10x for the wide MLP and the transformer)"
                if gpu
                else "Against the targets (every step <= 1.10x, 20 x 128 MLP <= 2x; every 10th"
                " <= 1.05x; the torch path forced on the CPU <= 1.3x; >= 3x less overhead than"
                " TensorBoard-style hooks and wandb.watch)"
            ),
            summary(timing),
        ),
        markdown("Host synchronisation in recorded steps (set_sync_debug_mode('error'))", syncs),
        markdown(
            "Peak "
            + ("torch.cuda.max_memory_allocated" if gpu else "RSS")
            + ", lecture MLP, 20 steps (each in its own process)",
            memory,
        ),
        markdown("Study engine vs a bare loop of the same passes", study),
    ]
    (args.out / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
