"""The study engine: run every config of a study into one run folder, resumably.

Layout of a run folder::

    spec.json            the resolved spec (and its fingerprint)
    configs/<id>/        one folder per finished config: snapshots.parquet (the raw
                         snapshots, frames.Snapshots) and done.json (status, probe values;
                         written last: its presence = finished)
    stats.parquet        all configs merged, with config columns (config, axes..., seed)
    hists.parquet        likewise
    probes.parquet       config columns + probe, step, layer, value
    configs.json         every config with its status (done | diverged | failed) and error
    claims.json          every claim of the source: held / not held / not measured, numbers
    meta.json            versions, device, dtype, times, config columns

A rerun skips configs whose ``done.json`` exists; a different spec in the same folder is
refused (the fingerprint differs) unless ``fresh=True``. The merge builds the frames of all
configs at once; it reads from disk only the configs finished by an earlier run: those run by
this call are merged from memory (what their files hold, without reading them back).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowscope.core.errors import FlowscopeError
from flowscope.models.inits import INIT_TARGETS, apply_init
from flowscope.models.mup import apply_parametrization, param_groups
from flowscope.models.nets import build_net
from flowscope.record import frames
from flowscope.record.recorder import watch
from flowscope.record.snapshot import RAW
from flowscope.study.data import make_data
from flowscope.study.merge import ConfigResult, StudyResult, merge, probes_of
from flowscope.study.probes import PROBES, ProbeContext, ProbeHooks, attached
from flowscope.study.spec import Config, Study, matches


def derive_seed(study: Study, config: Config) -> int:
    """The run's own seed from (study name, seed, axis values): stable across machines."""
    key = json.dumps([study.name, config.seed, config.axes], sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def resolve_device(name: str) -> torch.device:
    """The torch device for ``cpu`` / ``cuda``, refusing CUDA where there is none."""
    if name == "cuda" and not torch.cuda.is_available():
        raise FlowscopeError("device 'cuda' was asked for, but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise FlowscopeError(f"device must be 'cpu' or 'cuda', got {name!r}")
    return torch.device(name)


def run_study(
    study: Study,
    out_dir: str | Path,
    *,
    device: str | None = None,
    fresh: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> StudyResult:
    """Run (or resume) every config of ``study`` into ``out_dir``.

    Example:
        >>> from flowscope.study import spec
        >>> small = ["net.in_dim=16", "net.width=16", "net.depth=3", "data.dim=16"]  # quick
        >>> study = spec.load("init-scales", small)
        >>> result = run_study(study, "reports/init-scales")
        >>> result.ran, len(result.claims)
        (48, 19)
        >>> result.claims[0].id, result.claims[0].held
        ('tanh-small-activations-collapse', True)

    Args:
        study: a validated study (``flowscope.study.spec.load``).
        out_dir: the run folder; created if needed.
        device: overrides ``run.device`` of every config.
        fresh: discard finished configs of an earlier run in the same folder.
        progress: called as ``progress(done, total, config_id)`` after each config.

    Raises:
        FlowscopeError: the folder holds a run of a different spec, or CUDA is missing.
    """
    out = Path(out_dir)
    prepare_folder(study, out, fresh)
    configs = study.configs()
    ran = 0
    finished: dict[str, ConfigResult] = {}
    for i, config in enumerate(configs):
        folder = out / "configs" / config.id
        if not (folder / "done.json").is_file():
            finished[config.id] = run_config(study, config, folder, device)
            ran += 1
        if progress:
            progress(i + 1, len(configs), config.id)
    return merge(study, out, ran, finished)


def prepare_folder(study: Study, out: Path, fresh: bool) -> None:
    """Make ``out`` ready for ``study``: new, or holding the same spec (a resume); with
    ``fresh``, an earlier flowscope run folder is emptied first. Any other folder is refused
    (FlowscopeError)."""
    spec_file = out / "spec.json"
    if spec_file.is_file():
        old = _recorded_fingerprint(spec_file)
        if old != study.fingerprint() and not fresh:
            raise FlowscopeError(
                f"{str(out)!r} holds a run of a different spec (fingerprint {old} != "
                f"{study.fingerprint()}); use another --out or --fresh to discard it"
            )
    elif (out / "configs").exists() or (out / "stats.parquet").exists():
        # --fresh deletes configs/: never in a folder flowscope did not write
        raise FlowscopeError(
            f"{str(out)!r} is not a study run folder (no spec.json) and is left as it is;"
            " use another --out"
        )
    if fresh and (out / "configs").exists():
        shutil.rmtree(out / "configs")
    out.mkdir(parents=True, exist_ok=True)
    payload = {**study.to_dict(), "fingerprint": study.fingerprint(), "path": study.path}
    frames.atomic_write_text(spec_file, json.dumps(payload, indent=2, default=str))


def _recorded_fingerprint(spec_file: Path) -> str:
    """The fingerprint in a run folder's spec.json, or a clear error when it is not flowscope's."""
    try:
        payload = json.loads(spec_file.read_text())
    except (OSError, ValueError) as err:
        payload, problem = None, f"unreadable: {err}"
    else:
        problem = "no fingerprint"
    if not isinstance(payload, dict) or not isinstance(payload.get("fingerprint"), str):
        raise FlowscopeError(
            f"{spec_file} is not a flowscope run spec ({problem}); the folder is left as it"
            " is: use another --out, or delete the folder to start over"
        )
    return payload["fingerprint"]


def run_config(
    study: Study, config: Config, folder: Path, device: str | None = None
) -> ConfigResult:
    """One config: build, init, record, probe; write its folder, ``done.json`` last.

    Returns what the folder now holds, for ``merge`` to use without reading it back.
    """
    started = time.time()
    dev = resolve_device(device or config.run["device"])
    status, error = "done", None
    try:
        snaps, meta, probe_rows = _measure(study, config, dev)
    except (KeyboardInterrupt, FlowscopeError):
        raise
    except Exception as err:  # a crash in one config must not lose the others
        status, error = "failed", f"{type(err).__name__}: {err}"
        snaps, meta, probe_rows = None, {}, []
        print(f"flowscope: config {config.id} failed: {error}", file=sys.stderr)
    folder.mkdir(parents=True, exist_ok=True)
    if snaps is not None:
        status = "diverged" if snaps.raw[:, RAW["nonfinite"]].any() else status
        snaps.save(folder / frames.SNAPSHOTS_FILE, meta)
    done = {
        "config": config.id,
        "axes": config.axes,
        "seed": config.seed,
        "run_seed": derive_seed(study, config),
        "status": status,
        "error": error,
        "seconds": round(time.time() - started, 3),
        "device": str(dev),
        "probes": [list(r) for r in probe_rows],  # [probe, step, layer, value]: a few dozen
    }
    done = json.loads(json.dumps(done, default=str))  # as merge would read it back
    frames.atomic_write_text(folder / "done.json", json.dumps(done, indent=2))
    return ConfigResult(done, snaps, probes_of(done))


def _measure(
    study: Study, config: Config, dev: torch.device
) -> tuple[frames.Snapshots, dict[str, Any], list]:
    """Build, initialise, optionally train, and record one config: (snapshots, their
    metadata, probe rows)."""
    run = config.run
    gen = torch.Generator(device=dev).manual_seed(derive_seed(study, config))
    dtype = getattr(torch, run["dtype"])
    data_args = {k: v for k, v in config.data.items() if k != "name"}
    batch = make_data(config.data["name"], device=dev, generator=gen, **data_args)
    x = batch.x.to(dtype)
    net_args = {k: v for k, v in config.net.items() if k != "name"}
    model = build_net(config.net["name"], **net_args).to(device=dev, dtype=dtype)
    initialise(model, config.init, study.presets, gen)
    probes = [PROBES.get(name) for name in run["probes"]]
    initial = {n: p.detach() for n, p in model.named_parameters()}
    if run["steps"]:  # optimizer steps change the parameters in place: keep copies
        initial = {n: p.clone() for n, p in initial.items()}
    ctx = ProbeContext(model=model, x=x, initial=initial, y=batch.y)
    warm_up(model, x, run["warmup"])
    model.train(run["mode"] == "train")
    rows: list[tuple[str, int, str, torch.Tensor]] = []
    _probe(probes, "step", ctx, 0, rows)
    rec = watch(
        model,
        kinds=run["kinds"],
        modules=run["modules"] or None,
        every=run["record_every"],
        bins=run["bins"],
        hist_sample=run["hist_sample"],
        name=config.id,
    )
    loss_fn = LOSSES[run["loss"]]
    opt = optimizer_for(model, config) if run["steps"] else None
    # without a training step the end state is the recorded pass's: end probes that read a
    # forward pass hook into that one instead of running their own
    ready: dict[str, dict[str, torch.Tensor]] = {}
    riders = [
        (p.hooks, ready.setdefault(p.name, {}))
        for p in probes
        if p.when == "end" and p.hooks is not None and opt is None
    ]
    with rec:
        for step in range(max(run["steps"], 1)):
            loss_fn(_forward(model, x, riders if step == 0 else []), batch.y).backward()
            if step == 0:
                _probe(probes, "backward", ctx, 0, rows)
            if opt is not None:
                opt.step()
                opt.zero_grad()
                _probe(probes, "step", ctx, step + 1, rows)
                rec.step(record=step + 2 == run["steps"])  # the last step is always recorded
    _probe(probes, "end", ctx, run["steps"], rows, ready)
    return rec.snapshots(), {**rec.meta, "run": config.id}, _to_host(rows)


def optimizer_for(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """The config's optimizer: SGD or Adam at ``run.lr``; under ``run.parametrization =
    "mup"`` (Adam only) the model's readout is rescaled and the learning rates set per layer
    by :mod:`flowscope.models.mup`, with ``net.width / run.base_width`` as the multiplier."""
    run = config.run
    if run.get("parametrization", "sp") == "sp":
        kind = torch.optim.Adam if run.get("optimizer") == "adam" else torch.optim.SGD
        return kind(model.parameters(), lr=run["lr"])
    width, base = config.net.get("width"), run.get("base_width")
    if run.get("optimizer") != "adam" or not isinstance(width, int) or base is None:
        raise FlowscopeError(
            f"config {config.id}: run.parametrization = 'mup' needs run.optimizer = 'adam', "
            f"run.base_width and a net with a width; got optimizer={run.get('optimizer')!r}, "
            f"base_width={base!r}, net.width={width!r}"
        )
    apply_parametrization(model, "mup", width / base)
    return torch.optim.Adam(
        param_groups(model, lr=run["lr"], parametrization="mup", width_mult=width / base)
    )


def _forward(
    model: nn.Module, x: torch.Tensor, hooks: list[tuple[ProbeHooks, dict[str, torch.Tensor]]]
) -> torch.Tensor:
    """``model(x)`` with probe hooks attached for this pass only: (``Probe.hooks``, the dict
    they fill)."""
    with ExitStack() as stack:
        for attach, into in hooks:
            stack.enter_context(attached(attach, model, into))
        return model(x)


def initialise(
    model: nn.Module, init: dict[str, Any], presets: dict[str, dict[str, str]], gen: torch.Generator
) -> None:
    """Apply an init scheme to every Linear/Conv, or a preset of per-layer schemes; then the
    scheme's ``overrides`` (layer glob = scheme, e.g. to keep the softmax head fixed)."""
    name = init["name"]
    if name in presets:
        per_layer(model, presets[name], gen, every_layer=f"init preset {name!r}")
        return
    params = {k: v for k, v in init.items() if k not in ("name", "overrides")}
    apply_init(model, name, generator=gen, **params)
    per_layer(model, init.get("overrides", {}), gen)


def per_layer(
    model: nn.Module, table: dict[str, str], gen: torch.Generator, every_layer: str = ""
) -> None:
    """Re-initialise each Linear/Conv with the scheme of the first glob matching its name.

    ``every_layer`` names the table when each such layer must match (presets); otherwise
    layers that match nothing are left as they are (overrides).
    """
    for qualname, module in model.named_modules():
        if not isinstance(module, INIT_TARGETS):
            continue
        scheme = next((s for glob, s in table.items() if matches(glob, qualname)), None)
        if scheme is not None:
            apply_init(module, scheme, generator=gen)
        elif every_layer:
            raise FlowscopeError(f"{every_layer} has no entry matching layer {qualname!r}")


def warm_up(model: nn.Module, x: torch.Tensor, passes: int) -> None:
    """Train-mode forward passes without gradients: batchnorm running statistics settle."""
    if passes:
        model.train()
        with torch.no_grad():
            for _ in range(passes):
                model(x)


def _probe(
    probes: list, when: str, ctx: ProbeContext, step: int, rows: list, ready: dict | None = None
) -> None:
    """Rows of the probes run at ``when``; ``ready`` holds values captured already, by name."""
    for probe in probes:
        if probe.when == when:
            values = ready[probe.name] if ready and probe.name in ready else probe.fn(ctx)
            rows.extend((probe.name, step, layer, v) for layer, v in values.items())


def _to_host(rows: list[tuple[str, int, str, torch.Tensor]]) -> list[tuple[str, int, str, float]]:
    """All probe values in one transfer."""
    if not rows:
        return []
    values = torch.stack([r[3].to(torch.float64).reshape(()) for r in rows]).cpu().tolist()
    return [(p, s, layer, v) for (p, s, layer, _), v in zip(rows, values, strict=True)]


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.float(), y)


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    target = nn.functional.one_hot(y, out.shape[1]).to(out.dtype)
    return nn.functional.mse_loss(out, target)


def _sum_squares(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * out.float().pow(2).sum()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": _cross_entropy,
    "mse": _mse,
    "sum_squares": _sum_squares,
}
