"""Hooks on any PyTorch model: ``fs.watch(model)`` records per-layer distributions.

The recorder attaches forward hooks to the selected modules (every leaf by default), captures
dL/d(output) with ``output.register_hook`` set from inside the forward hook (full backward
hooks reject in-place ops such as ``ReLU(inplace=True)``), and reads parameters and their
gradients with post-accumulate-grad hooks. Every snapshot is reduced on the tensor's device by
:func:`flowscope.record.snapshot.snapshot`; nothing is copied to the host until a flush.

Hard cases: activation checkpointing re-runs forwards inside backward; such a recompute adds
no call and no second activation (``use_reentrant=False``: the first forward's hooks give the
gradients; ``use_reentrant=True``: the recomputed outputs' gradients are recorded under the
call they re-run, with a RuntimeWarning where that is ambiguous). Under ``torch.compile`` the
hooks run eagerly (dynamo breaks the graph around them). Only dense floating tensors are
recorded: float8 is counted in float32, sparse gradients densified; int, bool, complex and
meta tensors are skipped.

This module imports torch only; frames are built lazily by :mod:`flowscope.record.frames`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from flowscope.core.activations import saturation_of
from flowscope.core.errors import FlowscopeError
from flowscope.record import shards
from flowscope.record import writer as part_writer
from flowscope.record.checkpoint import Recomputes
from flowscope.record.deadunits import DEAD_UNITS, dead_indicator
from flowscope.record.hooks import Hooks
from flowscope.record.pending import Pending, SnapKey
from flowscope.record.reader import Reader, device_name, dtype_name
from flowscope.record.selection import (
    KINDS,
    ROOT,
    ModuleSelector,
    SaturationMap,
    check_kinds,
    float_tensors,
    hist_spec,
    saturation_table,
    select_modules,
    zero_output,
)
from flowscope.record.snapshot import RAW_FIELDS, HistSpec, split_row
from flowscope.record.writer import Part, PartWriter

if TYPE_CHECKING:
    import pandas as pd

    from flowscope.record.frames import Records, Snapshots

# the selection vocabulary is re-exported: callers of watch() import it from here
FLUSH_EVERY = 50  # recorded steps held in memory before a flush to the run folder

__all__ = ["KINDS", "ROOT", "ModuleSelector", "Recorder", "SnapKey", "select_modules", "watch"]


def watch(
    model: nn.Module,
    *,
    modules: ModuleSelector | Sequence[ModuleSelector] | None = None,
    kinds: Sequence[str] = KINDS,
    every: int = 1,
    bins: int = 64,
    hist_sample: int = 16384,
    log_bins_per_decade: int = 1,
    saturation: SaturationMap | None = None,
    drop_zeros: bool | Literal["auto"] = "auto",
    name: str = "",
    out: str | os.PathLike[str] | None = None,
    flush_every: int = FLUSH_EVERY,
    optimizer: torch.optim.Optimizer | None = None,
) -> Recorder:
    """Attach flowscope to ``model`` and return the recorder (also a context manager).

    Example:
        >>> import torch, flowscope as fs
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
        >>> with fs.watch(model) as rec:
        ...     model(torch.randn(8, 4)).sum().backward()
        >>> sorted(rec.stats.kind.unique())
        ['activation', 'gradient', 'weight', 'weight_grad']

        In a training loop: ``rec = fs.watch(model, out="runs/a", optimizer=opt)``,
        ``rec.step(loss=loss)`` after each optimizer step, ``rec.close()`` at the end. Every
        ``flush_every`` recorded steps the snapshots go to the run folder and leave memory.

    Args:
        model: any ``nn.Module``.
        modules: which modules to watch: a module type, a glob on qualified names
            (``"encoder.*.mlp"``), or a list of them. Default: every leaf module and every
            module that owns parameters directly.
        kinds: any of ``activation``, ``gradient``, ``weight``, ``weight_grad``,
            ``update_ratio`` (||W_after - W_before|| / ||W_after|| of each parameter over a
            recorded step's optimizer step; not recorded unless asked or ``optimizer`` given)
            and ``dead_units`` (per call of a ReLU-like module, which units output 0 for the
            whole batch: ``count`` the units, ``mean`` the dead share; not unless asked).
        every: record on steps 0, every, 2*every, ...; ``rec.step()`` advances the step.
        bins: bins of the linear histogram (over each snapshot's own range).
        hist_sample: histograms count a strided sample of at most this many elements;
            the statistics are always exact.
        log_bins_per_decade: resolution of the fixed log-magnitude histogram (1e-30..1e30).
        saturation: per module type (class or class name) the (lo, hi) interval outside which
            an output is saturated, or None to switch it off; merged into the defaults
            (tanh/softsign +-0.99, sigmoid 0.01/0.99, hardtanh at its clamp values).
        drop_zeros: leave exact zeros out of the linear histograms; "auto" does it for
            ReLU-like modules' activations.
        name: the ``run`` column of the frames.
        out: the run folder to stream into (:mod:`flowscope.record.runstore`): parts are
            written every ``flush_every`` recorded steps and at ``close()``; a folder that
            holds a run already is continued after its last step. Without it, a temporary
            folder is used once ``flush_every`` recorded steps are held (removed with the
            recorder), so a long loop stays bounded in memory and a short one never writes.
        flush_every: recorded steps held in memory before they are written out.
        optimizer: the optimizer: its learning rates are recorded each step (scalars
            ``lr``, ``lr.1``, ...) and ``update_ratio`` is recorded.

    Returns:
        The attached :class:`Recorder`.

    Raises:
        FlowscopeError: for an unknown kind, a selector that matches no module, or a
            setting out of range, or an ``out`` folder that is not a run folder or was
            recorded with other histogram settings.
    """
    if optimizer is not None and "update_ratio" not in kinds:
        kinds = [*([kinds] if isinstance(kinds, str) else kinds), "update_ratio"]
    return Recorder(
        model,
        modules=modules,
        kinds=kinds,
        every=every,
        hist=hist_spec(bins, hist_sample, log_bins_per_decade),
        saturation=saturation,
        drop_zeros=drop_zeros,
        name=name,
        out=out,
        flush_every=flush_every,
        optimizer=optimizer,
    )


class Recorder:
    """Hooks on a model and the snapshots they took. Build it with :func:`watch`.

    ``stats`` and ``hists`` are pandas frames (built on first access after new snapshots);
    ``records()`` bundles them with ``meta`` for saving. ``close()`` removes every hook and is
    safe to call twice.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        modules: ModuleSelector | Sequence[ModuleSelector] | None,
        kinds: Sequence[str],
        every: int,
        hist: HistSpec,
        saturation: SaturationMap | None,
        drop_zeros: bool | Literal["auto"],
        name: str,
        out: str | os.PathLike[str] | None = None,
        flush_every: int = 50,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise FlowscopeError(f"watch() needs a torch.nn.Module, got {type(model).__name__}")
        self.kinds = check_kinds(kinds)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise FlowscopeError(f"every must be an integer >= 1, got {every!r}")
        if drop_zeros not in (True, False, "auto"):
            raise FlowscopeError(f"drop_zeros must be True, False or 'auto', got {drop_zeros!r}")
        if not isinstance(flush_every, int) or isinstance(flush_every, bool) or flush_every < 1:
            raise FlowscopeError(f"flush_every must be an integer >= 1, got {flush_every!r}")
        if optimizer is not None and not isinstance(getattr(optimizer, "param_groups", None), list):
            raise FlowscopeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.model = model
        self.every = every
        self.hist = hist
        self.name = name
        self._drop_zeros = drop_zeros
        self._saturation = saturation_table(saturation)
        self._selector = modules
        self.targets = select_modules(model, modules)
        self.step_index = 0
        self.max_step_rows = MAX_STEP_ROWS
        self.flush_every = flush_every
        self.optimizer = optimizer
        self.out: Path | None = None  # the run folder, once there is one
        self._temporary = False  # out is a temporary folder of this recorder
        self._unwritten = False  # closing could not write everything to the run folder
        self._parts = 0  # the next part's number
        self._held_steps = 0  # recorded steps whose snapshots are in memory
        self._stored_rows = 0  # snapshots written to the run folder
        self._writer = PartWriter()  # the parts, on a thread: a step does not wait for them
        self._scalars: list[tuple[int, str, torch.Tensor]] = []  # on their devices
        self._host_scalars: list[tuple[list[int], list[str], Any]] = []
        self._before: dict[tuple[str, str], tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}
        self._store_finalizer: weakref.finalize | None = None
        self._closed = False
        self._paused = False
        self._forced = False  # this step is recorded whatever ``every`` says (step(record=))
        self._hooks = Hooks()  # on modules and parameters: until close()
        self._tensor_hooks = Hooks()  # on this step's outputs (their gradients): until step()
        self._module_hooks: dict[str, Any] = {}  # qualname -> its forward hook's handle
        self._params: dict[tuple[str, str], tuple[torch.Tensor, Any]] = {}  # -> (param, handle)
        self._calls: dict[str, int] = {}
        self._passes = _Passes()
        self._step_rows = 0
        self._warned: set[str] = set()
        self._layer_idx: dict[str, int] = {}
        # calls of this step whose outputs had no gradient to hook (a reentrant checkpoint's
        # first forward runs under no_grad), matched by recomputes; see _recompute
        self._recomputes = Recomputes()
        self._pending = Pending()
        # snapshots of a part of a sharded tensor -> the whole tensor's size, until the merge
        self.shards: dict[SnapKey, int] = {}
        # dead_units indicators (one float per unit, on the device), until the flush: ranks'
        # dead shares do not average into the global batch's, their indicators MIN-reduce
        self.dead_vectors: dict[SnapKey, torch.Tensor] = {}
        self._swapped = shards.managed(model)  # parameters FSDP swaps: read as stored
        hidden = shards.inside_fsdp1(model)
        if hidden:
            warnings.warn(f"flowscope: {hidden}", RuntimeWarning, stacklevel=3)
        self.started = time.time()
        if out is not None:
            self._open_store(Path(out))
        self._reader = Reader(self.hist, os.environ.get("FLOWSCOPE_KERNELS", "auto"))
        self._host: list[tuple[list[SnapKey], Any, Any, Any]] = []
        self._frames: Records | None = None
        self._frames_binned = False  # whether _frames has its histogram rows
        # a recorder dropped without close(): its hooks leave with it (they hold it weakly)
        self._finalizer = weakref.finalize(
            self, _dropped, self._hooks, self._tensor_hooks, type(model).__name__
        )
        self._finalizer.atexit = False
        _reset_compiled(model, self.targets)
        self._attach()

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook (module, tensor and parameter hooks; the inert stand-ins in deep
        copies of the model). Idempotent."""
        was_closed, self._closed = self._closed, True
        self._finalizer.detach()
        self._hooks.remove()
        self._tensor_hooks.remove()
        try:
            if not was_closed and self.out is not None and not self._temporary:
                self._complete_store()
            self._wait_for_part()
        finally:
            self._writer.close()
            self._reader.close()

    def _complete_store(self) -> None:
        """Write what is held, the snapshots of a part that failed on the writer's thread
        included (written again once, with a warning), and wait: the run folder is complete
        once the watch is closed, or close raises."""
        self._unwritten = True
        try:
            self._wait_for_part()
        except Exception as err:  # its snapshots are held again: the spill below has them
            self._skip("rewritten", f"writing a part of {self.out} failed ({err!r}); retried")
        self._spill()
        self._wait_for_part()
        self._unwritten = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def active(self) -> bool:
        """True when the current step is recorded."""
        return not (self._closed or self._paused) and (
            self.step_index % self.every == 0 or self._forced
        )

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Record nothing until :meth:`resume`, hooks left in place (evaluation passes between
        a training loop's batches; :meth:`close` would take the hooks off)."""
        self._paused = True

    def resume(self) -> None:
        """Record again after :meth:`pause`."""
        self._paused = False

    def step(self, *, loss: torch.Tensor | float | None = None, record: bool = False) -> None:
        """Advance to the next training step (call once per optimizer step, after it).

        Args:
            loss: this step's loss (a one-element tensor, kept on its device until the flush:
                no host sync), saved as the scalar ``loss`` of this step, whether or not the
                step was recorded.
            record: record the new step whatever ``every`` says (a loop's last step).

        Raises:
            FlowscopeError: for a loss with more than one element.
        """
        if loss is not None:
            self._scalars.append((self.step_index, "loss", _scalar(loss)))
        if self.optimizer is not None:
            self._learning_rates()
        if self.active:
            if self._before:
                self._update_ratios()
            self._held_steps += 1
        self.step_index += 1
        self._forced = record
        self._calls.clear()
        self._passes = _Passes()
        self._step_rows = 0
        self._recomputes.clear()
        self._tensor_hooks.remove()  # tensors of finished steps: hooks no longer needed
        self._reader.new_step()
        if self._held_steps >= self.flush_every:
            self._spill()
        if self.active:
            self._check_modules()

    # -- the training run: scalars, update ratios, the run folder ----------------------------

    def _learning_rates(self) -> None:
        """The optimizer's learning rate per parameter group, as scalars of this step."""
        for i, group in enumerate(self.optimizer.param_groups):  # type: ignore[union-attr]
            lr = group.get("lr")
            if lr is not None:
                self._scalars.append((self.step_index, "lr" if i == 0 else f"lr.{i}", _scalar(lr)))

    def _update_ratios(self) -> None:
        """||W - W_before|| / ||W|| of each parameter copied at this step's first forward,
        on its device, recorded as the ``update_ratio`` kind of this step."""
        before, self._before = self._before, {}
        for (qualname, pname), (module, param, old) in before.items():
            with torch.no_grad():
                new = param.detach()
                if new.shape != old.shape:  # replaced by one of another shape
                    continue
                diff = torch.linalg.vector_norm((new - old).double())
                ratio = (diff / torch.linalg.vector_norm(new.double())).reshape(1)
            key = self._key(qualname, module, "update_ratio", 0, pname, param)
            self._record(ratio, key)

    def _open_store(self, out: Path) -> None:
        """Use ``out`` as the run folder: a new one, or a run to continue after its last step."""
        from flowscope.record import frames, runstore

        if out.exists() and not out.is_dir():
            raise FlowscopeError(f"out={str(out)!r} is a file, not a run folder")
        if runstore.is_run_store(out):
            meta = json.loads((out / "meta.json").read_text())
            if frames.log_edges_of(meta) != self.hist.log or meta.get("bins") != self.hist.bins:
                raise FlowscopeError(
                    f"out={str(out)!r} holds a run recorded with bins={meta.get('bins')} and"
                    f" log edges {meta.get('log_edges')}; this watch has bins={self.hist.bins},"
                    f" log edges {_edges(self.hist)}: continue it with the same settings"
                    " or choose another folder"
                )
            self.step_index = runstore.last_step(out) + 1
            self._parts = runstore.next_part(out)
        elif out.is_dir() and any(out.iterdir()):
            raise FlowscopeError(
                f"out={str(out)!r} is not empty and holds no flowscope run (no meta.json naming"
                f" {runstore.FORMAT!r}): choose an empty or new folder"
            )
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self._write_meta()

    def _write_meta(self) -> None:
        from flowscope.record import frames, runstore

        assert self.out is not None
        meta = {**self.meta, "run": self.name, "format": runstore.FORMAT}
        frames.atomic_write_text(self.out / "meta.json", json.dumps(meta, indent=2, default=str))

    def _spill(self) -> None:
        """Hand the finished steps held in memory to the part writer and drop them: one
        transfer per device (the flush), then on the writer's thread one part per kind, each
        written then renamed, and ``meta.json`` (:mod:`flowscope.record.writer`)."""
        from flowscope.record import runstore

        self.flush()
        self._held_steps = 0
        if not self._host and not self._host_scalars:
            return
        if self.out is None:  # no folder given: a temporary one, removed with the recorder
            folder = Path(tempfile.mkdtemp(prefix="flowscope-run-"))
            self._temporary = True
            # removed with the recorder, once a part being written there is done (the write
            # would make the folder again)
            self._store_finalizer = weakref.finalize(
                self, part_writer.remove_store, self._writer, folder
            )
            self._open_store(folder)
        assert self.out is not None
        self._wait_for_part()  # parts in order, at most one in flight
        meta = {**self.meta, "run": self.name}
        folder_meta = {**meta, "format": runstore.FORMAT}
        host, scalars = self._host, self._host_scalars
        part = Part(self.out, self._parts, self.name, self.hist, meta, folder_meta, host, scalars)
        self._parts += 1
        self._host, self._host_scalars = [], []
        rows = sum(len(keys) for keys, *_ in host)
        self._writer.submit(
            part_writer.write_part, part, rows, rows + sum(len(st) for st, *_ in scalars)
        )

    def _wait_for_part(self) -> None:
        """Wait for the part being written; if writing it failed, hold its snapshots again
        (a later flush writes them) and raise the error."""

        def give_back(part: Part) -> None:
            self._host[:0], self._host_scalars[:0] = part.host, part.scalars
            self._parts = part.number

        self._stored_rows += self._writer.wait(give_back)

    @property
    def written(self) -> Path | None:
        """The run folder when it holds every snapshot and scalar of this watch (closed, with
        ``out=``), else None."""
        return self.out if self._closed and not self._temporary and not self._unwritten else None

    @property
    def retained(self) -> int:
        """Snapshots and scalars held in memory (pending or on the host, not yet written)."""
        return (
            len(self._pending.keys)
            + sum(len(keys) for keys, *_ in self._host)
            + self._writer.held
            + len(self._scalars)
            + sum(len(steps) for steps, *_ in self._host_scalars)
        )

    # -- hooks -------------------------------------------------------------------------------

    def _attach(self) -> None:
        try:
            self._hooks.forward_pre(self.model, _eager(_root_hook(weakref.ref(self))))
            for qualname, module in self.targets:
                self._hook_module(qualname, module)
        except BaseException:  # no recorder is returned: leave no hook behind (Ctrl-C too)
            self.close()
            raise

    def _hook_module(self, qualname: str, module: nn.Module) -> None:
        """The forward hook of one target, and the gradient hooks of its parameters."""
        hook = _forward_hook(weakref.ref(self), qualname, module)
        self._module_hooks[qualname] = self._hooks.forward(module, hook)
        if "weight_grad" in self.kinds:
            for pname, param in shards.own_parameters(module, self._swapped):
                self._hook_param(qualname, module, pname, param)

    def _hook_param(self, qualname: str, module: nn.Module, pname: str, param: Any) -> None:
        """The post-accumulate-grad hook of a parameter (tied ones: once)."""
        old = self._params.pop((qualname, pname), None)
        if old is not None:
            old[1].remove()
        if not (isinstance(param, nn.Parameter) and param.requires_grad):
            return
        if any(p is param for p, _ in self._params.values()):  # tied: hooked under its first
            return
        phook = _param_hook(weakref.ref(self), qualname, module, pname, param)
        handle = self._hooks.post_accumulate_grad(param, phook)
        self._params[(qualname, pname)] = (param, handle)

    def _on_forward(self, qualname: str, module: nn.Module, output: Any) -> None:
        """A target's forward ran on a recorded step: its outputs, their gradients, weights."""
        if _in_backward():  # activation checkpointing re-runs the forward in backward
            self._recompute(qualname, module, output)
            return
        call = self._calls.get(qualname, -1) + 1
        self._calls[qualname] = call
        self._layer_idx.setdefault(qualname, len(self._layer_idx))
        if call == 0:
            self._first_call(qualname, module)
            if "update_ratio" in self.kinds:
                self._keep_before(qualname, module)
        no_grad = False
        for path, tensor in float_tensors(output):
            plain = _plain(tensor)
            key = self._key(qualname, module, "activation", call, path, tensor)
            if plain is not tensor:  # a torch.func transform's tensor: its values only
                self._skip("functorch", _FUNCTORCH)
                if plain is not None and "activation" in self.kinds:
                    with torch._C._DisableFuncTorch():  # plain tensors in, plain rows out
                        self._record(plain, key, module)
                continue
            if "activation" in self.kinds:
                self._record(tensor, key, module)
            if DEAD_UNITS in self.kinds and zero_output(module):
                dead = dead_indicator(tensor)
                if dead is not None:
                    dkey = key._replace(kind=DEAD_UNITS)
                    self.dead_vectors[dkey] = dead  # for an exact merge across ranks
                    self._record(dead, dkey)
            if "gradient" in self.kinds and tensor.requires_grad and self._room():
                gkey = key._replace(kind="gradient", backward=0, order=1)
                self._tensor_hooks.tensor(tensor, self._grad_hook(gkey, module))
            no_grad |= not tensor.requires_grad
        if no_grad and "gradient" in self.kinds:
            self._recomputes.awaiting(qualname, call)

    def _first_call(self, qualname: str, module: nn.Module) -> None:
        """A target's first call of a recorded step: its weights; replaced parameters."""
        for pname, param in shards.own_parameters(module, self._swapped):
            plain = _plain(param)
            if (
                "weight_grad" in self.kinds
                and plain is param
                and isinstance(param, nn.Parameter)
                and self._params.get((qualname, pname), (param,))[0] is not param
            ):
                self._replaced(f"parameter {_qual(qualname, pname)!r}")
                self._hook_param(qualname, module, pname, param)
            if "weight" in self.kinds and plain is not None:
                with torch._C._DisableFuncTorch():
                    self._record(plain, self._key(qualname, module, "weight", 0, pname, param))

    def _keep_before(self, qualname: str, module: nn.Module) -> None:
        """A copy of the module's parameters before this step's update (on their device)."""
        for pname, param in shards.own_parameters(module, self._swapped):
            plain = _plain(param)
            if plain is None or not plain.is_floating_point() or plain.is_meta:
                continue
            with torch.no_grad(), torch._C._DisableFuncTorch():
                self._before[(qualname, pname)] = (module, param, plain.detach().clone())

    def _check_modules(self) -> None:
        """Targets replaced inside the watch (``model.fc = nn.Linear(...)``): hook the new."""
        try:
            now = select_modules(self.model, self._selector, self._swapped)
        except FlowscopeError:  # the selector matches nothing any more: keep what is hooked
            return
        hooked = dict(self.targets)
        for qualname, module in now:
            if hooked.get(qualname) is module:
                continue
            if qualname in hooked:
                self._module_hooks.pop(qualname).remove()  # the old module records no more
                self._replaced(f"module {qualname!r}")
            else:
                self._replaced(f"module {qualname!r}", "added")
            self._hook_module(qualname, module)
        self.targets = now

    def _replaced(self, what: str, how: str = "replaced") -> None:
        """Warn, once per name, that a target changed inside the watch."""
        self._skip(
            what,
            f"{what} was {how} inside the watch (noticed at step {self.step_index}): the new"
            " one is hooked from now on; what it did before was not recorded",
        )

    def _recompute(self, qualname: str, module: nn.Module, output: Any) -> None:
        """A forward re-run by activation checkpointing: no new call, no second activation.

        Non-reentrant checkpointing keeps the first forward's outputs in the graph, so their
        hooks already give the gradient. The reentrant kind runs the first forward under
        no_grad and the backward through the recomputed outputs: their gradient is recorded
        under the call they recompute (see :class:`~flowscope.record.checkpoint.Recomputes`).
        """
        self._passes.recomputing()  # its inner backward is part of this one
        call = self._recomputes.match(qualname) if "gradient" in self.kinds else None
        if call is None:
            return
        for path, tensor in float_tensors(output):
            if tensor.requires_grad:
                key = self._key(qualname, module, "gradient", call, path, tensor)
                self._tensor_hooks.tensor(tensor, self._grad_hook(key, module))

    def _grad_hook(self, key: SnapKey, module: nn.Module) -> Any:
        return _eager(_grad_hook(weakref.ref(self), key, module))

    def _on_grad(self, grad: torch.Tensor, key: SnapKey, module: nn.Module) -> None:
        """dL/d(output) of a recorded output, filed under the backward pass it came from."""
        backward, order = self._passes.current()
        self._record(grad, key._replace(backward=backward, order=order), module)

    def _on_param_grad(self, qualname: str, module: nn.Module, pname: str, param: Any) -> None:
        """A parameter's gradient accumulated: one row per backward pass."""
        self._layer_idx.setdefault(qualname, len(self._layer_idx))
        key = self._key(qualname, module, "weight_grad", 0, pname, param)
        backward, order = self._passes.current()
        self._record(param.grad, key._replace(backward=backward, order=order))

    def _key(
        self, qualname: str, module: nn.Module, kind: str, call: int, path: str, t: torch.Tensor
    ) -> SnapKey:
        layer = shards.user_name(qualname) or ROOT  # no wrapper names; cached by qualname
        forward = self._passes.forward
        device = "cpu" if t.is_cpu else device_name(t.device)  # t.device: ~0.3 us
        return SnapKey(
            self.step_index, self._layer_idx.get(qualname, -1), layer, shards.user_type(module),
            kind, call, forward if forward > 0 else 0, -1, 0, path, dtype_name(t.dtype), device,
        )  # fmt: skip

    def _record(self, t: torch.Tensor, key: SnapKey, module: nn.Module | None = None) -> None:
        """Reduce one tensor on its device and keep the result (no host transfer)."""
        if not self._room():
            return
        row = self.snapshot_row(t, key, module)
        if row is not None:
            self._pending.rows.append(row)
            self._pending.keys.append(key)
            self._step_rows += 1
            self._frames = None

    def _room(self) -> bool:
        """Whether this step may take one more snapshot (``max_step_rows``): a watch left
        running without ``step()`` (an inference loop, a forgotten ``close()``) stops
        recording with a warning instead of growing without bound."""
        if self._step_rows < self.max_step_rows:
            return True
        self._skip(
            "cap",
            f"{self._step_rows} snapshots in step {self.step_index} without rec.step(): nothing"
            " more is recorded until rec.step() (call it after each optimizer step, close the"
            " watch when done, or raise rec.max_step_rows)",
        )
        return False

    def _skip(self, what: str, message: str) -> None:
        """Warn once per recorder about something it could not record."""
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(f"flowscope: {message}", RuntimeWarning, stacklevel=3)

    def snapshot_row(
        self, t: torch.Tensor, key: SnapKey, module: nn.Module | None = None
    ) -> torch.Tensor | None:
        """The snapshot row of ``t`` taken as this recorder's hooks take it for ``key`` (the
        histogram settings, the saturation interval and zero rule of ``module``), on ``t``'s
        device and not kept; None for a tensor with no float values (meta, int, bool)."""
        if t.is_meta or not t.is_floating_point():  # no values (meta); int/bool/complex params
            return None
        part = None if type(t) in _PLAIN else shards.local_part(t)  # not a DTensor: ~0.2 us
        if part is not None:  # a DTensor: this rank's part (FSDP2, tensor parallel)
            if part.tensor is None:
                where = f"{key.layer!r} {key.kind} {key.tensor!r}"
                self._skip(part.problem, f"{part.problem} is not recorded ({where}, ...)")
                return None
            self.shards[key] = part.numel
            t = part.tensor
        plain = _plain(t)
        if plain is None:
            return None
        t = plain
        if t.layout != torch.strided:  # sparse gradients (nn.Embedding(sparse=True))
            t = t.to_dense()
        if t.dtype.itemsize == 1:  # float8: snapshots count it in float32, as fp16/bf16
            t = t.float()
        is_act = key.kind == "activation"
        sat = self._saturation_for(module) if is_act and module is not None else None
        drop = self._drop_zeros is True or (
            self._drop_zeros == "auto" and is_act and module is not None and zero_output(module)
        )
        return self._reader.row(t, sat, drop)

    # -- what is waiting for the flush: merges across ranks, loss-scale corrections ----------

    def pending(self) -> list[tuple[SnapKey, torch.Tensor]]:
        """The snapshots taken and not yet flushed, oldest first: (key, row on the device of
        the tensor it was taken of; see :func:`flowscope.record.snapshot.split_row`)."""
        self._reader.finish()
        return list(zip(self._pending.keys, self._pending.rows, strict=True))

    def set_pending(self, snapshots: Sequence[tuple[SnapKey, torch.Tensor]]) -> None:
        """Replace the snapshots waiting for the flush (merged across ranks, rescaled);
        frames asked for later are built from these."""
        self._pending = Pending([k for k, _ in snapshots], [r for _, r in snapshots])
        self._reader.forget()
        self._frames = None

    @property
    def recorded(self) -> int:
        """Snapshots taken so far, flushed or not."""
        held = len(self._pending.keys) + sum(len(keys) for keys, *_ in self._host)
        return held + self._writer.in_flight + self._stored_rows

    def _saturation_for(self, module: nn.Module) -> tuple[float, float] | None:
        for cls in type(module).__mro__:  # the user's intervals first, then the catalogue's
            if cls in self._saturation:
                return self._saturation[cls]
        return saturation_of(module)

    # -- results -----------------------------------------------------------------------------

    def flush(self) -> None:
        """Move pending snapshots to the host: one transfer per device and buffer."""
        if not self._closed:
            self._check_modules()
        if self._scalars:
            self._flush_scalars()
            self._frames = None
        self._reader.finish()
        pending, self._pending = self._pending, Pending()
        self.dead_vectors.clear()
        if self.shards:
            self.shards.clear()
            self._skip("unmerged", _UNMERGED)
        self._reader.new_rows()  # the old row blocks go with the old rows
        if not pending.keys:
            return
        by_device: dict[torch.device, list[int]] = {}
        for i, row in enumerate(pending.rows):
            by_device.setdefault(row.device, []).append(i)
        for rows in by_device.values():
            host = torch.stack([pending.rows[i] for i in rows]).cpu()  # the one transfer
            raw, lin, log = (part.numpy() for part in split_row(host, self.hist))
            self._host.append(([pending.keys[i] for i in rows], raw, lin, log))

    def _flush_scalars(self) -> None:
        """The scalars (loss, learning rates) to the host: one transfer per device."""
        scalars, self._scalars = self._scalars, []
        by_device: dict[torch.device, list[int]] = {}
        for i, (_, _, value) in enumerate(scalars):
            by_device.setdefault(value.device, []).append(i)
        for idx in by_device.values():
            values = torch.cat([scalars[i][2] for i in idx]).cpu().numpy()  # the one transfer
            steps = [scalars[i][0] for i in idx]
            self._host_scalars.append((steps, [scalars[i][1] for i in idx], values))

    def records(self) -> Records:
        """All snapshots so far as frames plus metadata (``frames.Records``)."""
        return self._built(binned=True)

    def _built(self, binned: bool) -> Records:
        """The frames, cached until the next snapshot; without ``binned`` the histogram
        frame may be empty (``stats`` and ``scalars`` of a streamed run of many steps then
        do not read every part's counts: 189 numbers a snapshot)."""
        import numpy as np

        from flowscope.record import frames

        if self._frames is None or (binned and not self._frames_binned):
            meta = {**self.meta, "run": self.name}
            snaps = self.snapshots(counts=binned)
            bins = None if binned else np.zeros(len(snaps), bool)
            self._frames = frames.records_from(snaps, meta, binned=bins)
            self._frames.scalars = self._scalar_frame()
            self._frames_binned = binned
        return self._frames

    def _scalar_frame(self) -> pd.DataFrame:
        """The scalars written to the run folder and those held, one frame."""
        import pandas as pd

        from flowscope.record import frames, runstore

        self._wait_for_part()  # its scalars on disk before the held ones are read
        held = pd.DataFrame(
            {
                "run": self.name,
                "step": [s for chunk in self._host_scalars for s in chunk[0]],
                "name": [n for chunk in self._host_scalars for n in chunk[1]],
                "value": [float(v) for chunk in self._host_scalars for v in chunk[2]],
            },
            columns=frames.SCALAR_COLUMNS,
        ).astype({"step": "int64", "value": "float64"})
        if self.out is None:
            return held
        stored = runstore.read(self.out, "scalars")
        if stored is None:
            return held
        return pd.concat([stored.to_pandas()[frames.SCALAR_COLUMNS], held], ignore_index=True)

    def snapshots(self, counts: bool = True) -> Snapshots:
        """All snapshots so far on the host, before they become frames (what the study engine
        saves per config; :class:`flowscope.record.frames.Snapshots`); without ``counts``,
        without the histograms (``lin`` and ``log`` of no columns)."""
        from flowscope.record import frames, loading

        self.flush()
        self._wait_for_part()
        held = frames.Snapshots.of(self._host, self.hist, self.name)
        if not counts:
            held.lin, held.log = held.lin[:, :0], held.log[:, :0]
        if self.out is None or (not self._stored_rows and not self._parts):
            return held
        stored = loading.read_store_snapshots(self.out, held.edges, counts=counts)
        return frames.Snapshots.concat([stored, held]) if stored is not None else held

    @property
    def stats(self) -> pd.DataFrame:
        """One row per (step, layer, kind, call, tensor); one column per statistic."""
        return self._built(binned=False).stats

    @property
    def hists(self) -> pd.DataFrame:
        """One row per histogram bin (linear: every bin; log: non-empty bins)."""
        return self.records().hists

    @property
    def scalars(self) -> pd.DataFrame:
        """One row per (step, name): the loss given to ``step(loss=...)``, learning rates."""
        return self._built(binned=False).scalars

    @property
    def meta(self) -> dict[str, Any]:
        """Versions, devices, dtypes, settings and times of this recording."""
        devices = sorted({str(p.device) for p in self.model.parameters()}) or ["cpu"]
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in self.model.parameters()})
        return {
            "flowscope": _flowscope_version(),
            "torch": torch.__version__,
            "model": type(self.model).__name__,
            "devices": devices,
            "dtypes": dtypes,
            "kinds": list(self.kinds),
            "every": self.every,
            "bins": self.hist.bins,
            "hist_sample": self.hist.sample,
            "log_edges": _edges(self.hist),
            "steps": self.step_index + 1,
            "started": self.started,
            "written": time.time(),
            "raw_fields": list(RAW_FIELDS),
        }

    def _repr_html_(self) -> str:
        """Jupyter: the view registered for recorders (:mod:`flowscope.record.display`)."""
        from flowscope.record import display

        return display.html("recorder", self)

    def save(self, out_dir: str) -> None:
        """Write ``stats.parquet``, ``hists.parquet`` and ``meta.json`` into ``out_dir``
        (a streamed run's folder is complete after ``close()`` already)."""
        self.records().save(out_dir)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step {self.step_index}"
        return f"<flowscope.Recorder {len(self.targets)} modules, {state}>"


def _flowscope_version() -> str:
    from flowscope import __version__

    return __version__


def _edges(hist: HistSpec) -> list[int]:
    return [hist.log.lo, hist.log.hi, hist.log.per_decade]


def _scalar(value: torch.Tensor | float) -> torch.Tensor:
    """A loss or learning rate as a float64 tensor of one element on its device (no sync)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise FlowscopeError(
                f"rec.step(loss=...) takes a tensor of one element, got shape {tuple(value.shape)}"
            )
        return value.detach().to(torch.float64, copy=True).reshape(1)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FlowscopeError(f"rec.step(loss=...) takes a tensor or a number, got {value!r}")
    return torch.tensor([float(value)], dtype=torch.float64)


_UNMERGED = (
    "parts of sharded parameters (FSDP, DTensor) were flushed unmerged: each rank's rows hold"
    " its own shard only; call flowscope.distributed.merge_pending(rec) on every rank first"
)
_PLAIN = (torch.Tensor, nn.Parameter)  # the types that are no DTensor (snapshot_row)
MAX_STEP_ROWS = 100_000  # snapshots one step may take (Recorder.max_step_rows): ~110 MB
_FUNCTORCH = (
    "under torch.func transforms (vmap, grad, jacrev, functional_call with them) only the"
    " values are recorded, unwrapped (a vmapped batch as one tensor); dL/dh and the"
    " transforms' gradients are not recorded"
)


class _Passes:
    """The forward and backward passes of one step, as the key columns name them.

    ``forward``: calls of the watched model's root this step, minus one (a micro-batch of
    gradient accumulation is one). A backward pass is one autograd graph task (a
    ``backward()`` or an ``autograd.grad`` call), numbered 0, 1, ... in the order its first
    snapshot came; its ``order`` is 2 when a backward with ``create_graph=True`` ran earlier
    since the last forward (a gradient penalty differentiates through that one's graph), else
    1. A reentrant checkpoint's inner backward belongs to the backward that recomputed it.
    """

    def __init__(self) -> None:
        self.forward = -1
        self._tasks: dict[int, tuple[int, int]] = {}  # graph task id -> (backward, order)
        self._graph_built = False  # a create_graph backward ran since the last forward
        self._alias: tuple[int, int] | None = None  # for a reentrant checkpoint's inner task

    def new_forward(self) -> None:
        self.forward += 1
        self._graph_built = False

    def current(self) -> tuple[int, int]:
        """(backward, order) of the backward running now (in a gradient hook)."""
        task = int(torch._C._current_graph_task_id())
        known = self._tasks.get(task)
        if known is None:
            if self._alias is not None:
                known = self._alias
            else:
                known = (len(set(self._tasks.values())), 2 if self._graph_built else 1)
            self._tasks[task] = known
        elif self._alias is not None and known != self._alias:
            self._alias = None  # back in an outer pass: the nested one is over
        if torch.is_grad_enabled():  # create_graph: a later backward may be of second order
            self._graph_built = True
        return known

    def recomputing(self) -> None:
        """A checkpoint recompute runs in this backward: a new task next is its inner one."""
        self._alias = None
        self._alias = self.current()


def _forward_hook(ref: weakref.ref[Recorder], qualname: str, target: nn.Module) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        rec = ref()  # weak: a dropped recorder's hooks record nothing and leave with it
        if rec is not None and module is target and rec.active:
            rec._on_forward(qualname, module, output)

    return _eager(hook)


def _root_hook(ref: weakref.ref[Recorder]) -> Any:
    def hook(module: nn.Module, args: Any) -> None:
        rec = ref()
        if rec is not None and rec.active and not _in_backward():
            rec._passes.new_forward()

    return hook


def _grad_hook(ref: weakref.ref[Recorder], key: SnapKey, module: nn.Module) -> Any:
    def hook(grad: torch.Tensor) -> None:
        rec = ref()
        if rec is not None and not (rec._closed or rec._paused):
            rec._on_grad(grad, key, module)

    return hook


def _param_hook(
    ref: weakref.ref[Recorder], qualname: str, module: nn.Module, pname: str, target: Any
) -> Any:
    def hook(param: torch.Tensor) -> None:
        rec = ref()
        if rec is not None and param is target and rec.active and param.grad is not None:
            rec._on_param_grad(qualname, module, pname, param)

    return _eager(hook)


def _dropped(hooks: Hooks, tensor_hooks: Hooks, model: str) -> None:
    """A recorder collected without ``close()``: take its hooks off, say so once."""
    count = len(hooks) + len(tensor_hooks)
    hooks.remove()
    tensor_hooks.remove()
    warnings.warn(
        f"flowscope: a Recorder watching a {model} was dropped without close(); its {count}"
        " hooks were removed. Use `with fs.watch(model) as rec:` or call rec.close()",
        RuntimeWarning,
        stacklevel=2,
    )


def _plain(t: torch.Tensor) -> torch.Tensor | None:
    """``t``, or the values under a torch.func transform's wrappers; None if unreadable."""
    functorch = torch._C._functorch
    if not functorch.is_functorch_wrapped_tensor(t):
        return t
    try:
        while functorch.is_functorch_wrapped_tensor(t):
            t = functorch.get_unwrapped(t)
    except RuntimeError:
        return None
    return t


def _qual(qualname: str, pname: str) -> str:
    return pname if qualname == ROOT else f"{qualname}.{pname}"


def _reset_compiled(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
    """Drop compiled code made before the watch: its graphs would skip the new hooks.

    Dynamo does not guard on hooks added after it traced a module, so a model compiled and
    run before ``watch`` would silently record only weight gradients. Compiled code of this
    process is reset (it recompiles at its next call, with the hooks) and a warning says so.
    """
    convert = sys.modules.get("torch._dynamo.convert_frame")
    if convert is None:  # nothing was ever compiled in this process
        return
    try:
        entries = torch._C._dynamo.eval_frame._debug_get_cache_entry_list
        codes = [c() for c in convert.input_codes.seen]
        cached = sum(len(entries(c)) for c in codes if c is not None)
    except (AttributeError, TypeError, RuntimeError):  # another torch: assume there is some
        cached = 1
    compiled = type(model).__name__ == "OptimizedModule" or any(
        getattr(m, "_compiled_call_impl", None) is not None
        for m in (model, *dict(targets).values())
    )
    if not cached:
        return
    from torch import _dynamo  # only once something was compiled: it is slow to import

    _dynamo.reset()
    what = f"this {type(model).__name__} was compiled" if compiled else "compiled code is cached"
    warnings.warn(
        f"flowscope: {what} (torch.compile) before the watch; graphs compiled before it would"
        " skip flowscope's hooks, so torch._dynamo.reset() dropped them: compiled models"
        " recompile at their next call, with the hooks",
        RuntimeWarning,
        stacklevel=4,
    )


def _in_backward() -> bool:
    """True while autograd runs a backward pass on this thread (a checkpoint recompute)."""
    return bool(torch._C._current_graph_task_id() != -1)


def _eager(hook: Any) -> Any:
    """The hook, run eagerly under ``torch.compile``: dynamo graph-breaks around it instead of
    tracing its bookkeeping (Python dicts, the C kernel call) into a compiled graph.

    A partial of one function disabled once: ``torch.compiler.disable`` on every new closure
    costs ~4 us, and a gradient hook is made per activation per recorded step."""
    return functools.partial(_run_eagerly, hook)


@torch.compiler.disable
def _run_eagerly(hook: Any, *args: Any) -> Any:
    return hook(*args)
