"""``flowscope doctor MODULE:FACTORY``: build a model, run one batch, print the verdicts.

Exit status 0 when every check is healthy and 1 when a problem is found (or on an error),
so the command can guard a project's CI. torch is imported inside the command only, so
``flowscope --help`` stays instant.

Example:
    >>> from click.testing import CliRunner
    >>> result = CliRunner().invoke(doctor_cmd, ["torch.nn:Linear", "--input-shape", "2,3"])
    >>> result.exit_code, result.output.splitlines()[0]      # Linear() needs arguments
    (1, "Error: factory 'torch.nn:Linear' failed: TypeError: Linear.__init__() missing 2 \
required positional arguments: 'in_features' and 'out_features'")
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from flowscope.cli.errors import check_device, check_out_dir, clean_errors
from flowscope.core.errors import FlowscopeError, unknown
from flowscope.core.limits import check_fits

if TYPE_CHECKING:
    from torch import nn

    from flowscope.doctor import Diagnosis, Thresholds

__all__ = ["doctor_cmd", "load_factory", "parse_shape"]


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,3,32,32"`` → ``(8, 3, 32, 32)``.

    Example:
        >>> parse_shape("8, 3,32,32")
        (8, 3, 32, 32)

    Raises:
        FlowscopeError: anything but comma-separated integers >= 1.
    """
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(re.fullmatch(r"[0-9]+", p) and int(p) >= 1 for p in parts):
        raise FlowscopeError(
            f"--input-shape {text!r} is not a comma-separated list of integers >= 1 "
            "(batch first), e.g. 8,3,32,32"
        )
    return tuple(int(p) for p in parts)


def load_factory(target: str) -> tuple[Callable[[], Any], str]:
    """Import ``package.module:callable``; return the callable and its name.

    Example:
        >>> fn, name = load_factory("collections:OrderedDict")
        >>> name
        'OrderedDict'

    The current directory is importable, as with ``python -m``.

    Raises:
        FlowscopeError: a target without ``:``, a module that does not import (with the
            reason), or a missing attribute (with did-you-mean and the callables there).
    """
    module_name, attr = _split_target(target)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure is the user's module's
        raise FlowscopeError(
            f"cannot import module {module_name!r}: {type(err).__name__}: {err}"
        ) from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n))]
            raise unknown("factory", attr, names, f"module {module_name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FlowscopeError(f"{target!r} is a {type(obj).__name__}, not a callable factory")
    return obj, attr.split(".")[-1]


def _split_target(target: str) -> tuple[str, str]:
    """``("package.module", "callable")`` of a ``MODULE:FACTORY`` target, checked."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise FlowscopeError(
            f"expected MODULE:FACTORY such as mypkg.models:make_net, got {target!r}"
        )
    return module_name, attr


def _check_fix(fix: str) -> None:
    """``--fix`` checked before any work: ``lsuv`` or an init scheme usable without
    parameters."""
    from flowscope.models.inits import INITS

    if fix == "lsuv":
        return
    if fix not in INITS:
        raise unknown("init", fix, [*INITS.names(), "lsuv"], "--fix")
    try:
        INITS.get(fix).resolve({})
    except FlowscopeError as err:
        raise FlowscopeError(
            f"--fix {fix!r}: {err}; --fix takes schemes without parameters"
        ) from None


def _build(factory: Callable[[], Any], target: str) -> nn.Module:
    """Call the factory (or take a module as is) and check it made an nn.Module."""
    from torch import nn

    if isinstance(factory, nn.Module):
        return factory
    try:
        model = factory()
    except Exception as err:
        raise FlowscopeError(f"factory {target!r} failed: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise FlowscopeError(
            f"factory {target!r} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _vocab(model: nn.Module) -> int | None:
    """The vocabulary size when the model starts with a token embedding, else None."""
    from torch import nn

    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return int(emb.num_embeddings) if isinstance(emb, nn.Embedding) else None


def _inputs(
    model: nn.Module, shape: tuple[int, ...] | None, path: str | None, vocab: int | None, seed: int
) -> Any:
    """The batch: loaded from ``path``, or drawn for ``shape`` (token ids or N(0, 1))."""
    import torch

    if path is not None:
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise FlowscopeError(
                f"cannot load --input {path!r} with torch.load(weights_only=True): "
                f"{type(err).__name__}: {first}"
            ) from err
    assert shape is not None
    gen = torch.Generator().manual_seed(seed)
    vocab = vocab or _vocab(model)
    if vocab is None:
        return torch.randn(shape, generator=gen)
    ids = torch.randint(0, vocab, shape, generator=gen)
    if "labels" in inspect.signature(model.forward).parameters:
        return {"input_ids": ids, "labels": ids}  # the model's own loss
    return ids


def _to(inputs: Any, device: str) -> Any:
    """Move tensors (also inside tuples, lists and dicts) to ``device``."""
    import torch

    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: _to(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to(v, device) for v in inputs)
    return inputs


def _describe(inputs: Any) -> str:
    """Shapes of the inputs, for messages: ``(8, 3, 32, 32)`` or ``input_ids (2, 16), ...``."""
    import torch

    if isinstance(inputs, torch.Tensor):
        return str(tuple(inputs.shape))
    if isinstance(inputs, Mapping):
        return ", ".join(f"{k} {_describe(v)}" for k, v in inputs.items())
    if isinstance(inputs, (tuple, list)):
        return ", ".join(_describe(v) for v in inputs)
    return type(inputs).__name__


def _thresholds(pairs: tuple[str, ...]) -> Thresholds:
    """Thresholds from ``KEY=VALUE`` options."""
    from flowscope.doctor import Thresholds

    names = [f.name for f in fields(Thresholds)]
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise FlowscopeError(f"--threshold takes KEY=VALUE, got {pair!r}")
        if key not in names:
            raise unknown("threshold", key, names)
        try:
            values[key] = int(raw) if key in ("dead_min_samples", "nonfinite") else float(raw)
        except ValueError:
            raise FlowscopeError(f"--threshold {key}={raw!r} is not a number") from None
    return Thresholds(**values)


def _examine(model: nn.Module, inputs: Any, target: str, th: Thresholds, name: str) -> Any:
    """examine(), with the model's own complaint turned into one clean line."""
    from flowscope.doctor import examine

    try:
        return examine(model, inputs, thresholds=th, name=name)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise FlowscopeError(
            f"running {target} on input {_describe(inputs)} failed: {type(err).__name__}: {first}"
        ) from err


def _save(rec: Any, diagnosis: Diagnosis, out: Path) -> None:
    """Records (``Recorder.save``) plus the diagnosis as text and JSON."""
    payload = {
        "runs": json.loads(diagnosis.runs.to_json(orient="records")),
        "layers": json.loads(diagnosis.layers.to_json(orient="records")),
    }
    try:
        rec.save(out)
        (out / "diagnosis.txt").write_text(str(diagnosis) + "\n")
        (out / "diagnosis.json").write_text(json.dumps(payload, indent=1))
    except OSError as err:  # the folder was checked first; a full disk can still say no
        raise FlowscopeError(
            f"cannot write the records to {str(out)!r}: {err.strerror or err}"
        ) from err


@click.command("doctor")
@click.argument("target", metavar="MODULE:FACTORY")
@click.option("--input-shape", "shape", help="Input shape, batch first, e.g. 8,3,32,32.")
@click.option(
    "--input",
    "input_file",
    type=click.Path(exists=True, dir_okay=False),
    help="A batch saved with torch.save: a tensor, a tuple of tensors, or a dict of them.",
)
@click.option(
    "--vocab",
    type=click.IntRange(min=1),
    default=None,
    help="Draw token ids in [0, VOCAB) (default: when the model starts with an embedding).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Records folder (default: reports/doctor-<factory>).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random input.")
@click.option("--device", default="cpu", show_default=True, help="Where to run (cpu, cuda).")
@click.option(
    "--fix",
    default=None,
    metavar="SCHEME|lsuv",
    help="Also apply a fix (an init scheme such as he/xavier, or lsuv) and compare.",
)
@click.option(
    "--threshold",
    "threshold_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a threshold, e.g. --threshold act_ratio=100 (see docs/DOCTOR.md).",
)
@click.pass_context
@clean_errors
def doctor_cmd(
    ctx: click.Context,
    target: str,
    shape: str | None,
    input_file: str | None,
    vocab: int | None,
    out_dir: str | None,
    seed: int,
    device: str,
    fix: str | None,
    threshold_pairs: tuple[str, ...],
) -> None:
    """Diagnose MODULE:FACTORY on one batch: verdicts, numbers, thresholds, fixes.

    Builds the model by calling FACTORY() from MODULE (the current directory is
    importable), runs one forward/backward pass (the loss: the output's own `.loss` if it
    has one, else the mean of squares of the output), prints the verdict per layer and
    overall, and writes the records to --out. Exit status 1 when a problem is found.

    Example: flowscope doctor mypkg.models:make_net --input-shape 8,3,32,32
    """
    if (shape is None) == (input_file is None):
        raise click.UsageError("give exactly one of --input-shape and --input")
    dims = parse_shape(shape) if shape is not None else None
    if dims is not None:
        check_fits(f"--input-shape {shape!r}", math.prod(dims))
    thresholds = _thresholds(threshold_pairs)
    name = _split_target(target)[1].split(".")[-1]
    if fix is not None:
        _check_fix(fix)
    device = check_device(device)
    out = Path(out_dir or Path("reports") / f"doctor-{name}")
    check_out_dir(out)
    if fix is not None:
        check_out_dir(f"{out}-{fix}", "--out (with --fix)")
    factory, name = load_factory(target)

    import torch

    from flowscope.doctor import compare

    torch.manual_seed(seed)
    model = _build(factory, target).to(device)
    inputs = _to(_inputs(model, dims, input_file, vocab, seed), device)
    click.echo(f"flowscope doctor: {target} on input {_describe(inputs)}", err=True)
    rec, diagnosis = _examine(model, inputs, target, thresholds, name)
    click.echo(str(diagnosis))
    _save(rec, diagnosis, out)
    residual_problem = _residual(model, inputs, out)
    click.echo(f"records: {out}", err=True)
    if fix is not None:
        after = _apply_fix(model, inputs, fix, seed, device, target, thresholds, name, out)
        click.echo(f"\nafter fix {fix!r}:\n{after}")
        click.echo("\n" + compare(diagnosis, after).to_string(index=False))
    if not diagnosis.ok() or residual_problem:
        ctx.exit(1)


def _residual(model: nn.Module, inputs: Any, out: Path) -> bool:
    """For a model with residual blocks: its signal-propagation numbers (``signal.parquet``
    and ``signal.csv`` in ``out``, drawn by the report) and the doctor's line on the
    stream's growth; True when that growth is a problem. Models without blocks: nothing."""
    from torch import nn

    from flowscope.doctor.signal import residual_blocks, residual_growth, signal_propagation
    from flowscope.reporter.export import csv_text

    try:
        blocks = residual_blocks(model)
    except FlowscopeError:
        return False  # no residual block: nothing to say
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    conv = any(isinstance(m, convs) for _, block in blocks for m in block.modules())
    try:  # channels: dim 1 of conv maps, the last dim of (N, C) and (N, T, C)
        spp = signal_propagation(
            model, inputs, blocks=[n for n, _ in blocks], channel_dim=1 if conv else -1
        )
    except FlowscopeError as err:
        click.echo(f"residual stream: not measured: {err}")
        return False
    problem, line = residual_growth(spp, blocks)
    click.echo(line)
    try:
        spp.to_parquet(out / "signal.parquet", index=False)
        (out / "signal.csv").write_text(csv_text(spp))
        with (out / "diagnosis.txt").open("a") as text:
            text.write(line + "\n")
    except OSError as err:  # the folder was checked first; a full disk can still say no
        raise FlowscopeError(
            f"cannot write the signal propagation to {str(out)!r}: {err.strerror or err}"
        ) from err
    return problem


def _apply_fix(
    model: nn.Module,
    inputs: Any,
    fix: str,
    seed: int,
    device: str,
    target: str,
    th: Thresholds,
    name: str,
    out: Path,
) -> Diagnosis:
    """Apply ``fix`` (a scheme or lsuv), diagnose again, save to ``<out>-<fix>``."""
    import torch

    from flowscope.doctor.fixes import lsuv, reinit

    gen = torch.Generator(device=device).manual_seed(seed)
    if fix == "lsuv":
        table = lsuv(model, inputs, generator=gen)
        click.echo(table.to_string(index=False), err=True)
    else:
        reinit(model, fix, generator=gen)
    rec, after = _examine(model, inputs, target, th, name)
    _save(rec, after, Path(f"{out}-{fix}"))
    return after
