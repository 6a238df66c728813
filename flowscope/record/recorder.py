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
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from flowscope.core.activations import saturation_of
from flowscope.core.errors import FlowscopeError
from flowscope.record.checkpoint import Recomputes
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

if TYPE_CHECKING:
    import pandas as pd

    from flowscope.record.frames import Records, Snapshots

# the selection vocabulary is re-exported: callers of watch() import it from here
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
) -> Recorder:
    """Attach flowscope to ``model`` and return the recorder (also a context manager).

    Example:
        >>> import torch, flowscope as fs
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
        >>> with fs.watch(model) as rec:
        ...     model(torch.randn(8, 4)).sum().backward()
        >>> sorted(rec.stats.kind.unique())
        ['activation', 'gradient', 'weight', 'weight_grad']

        In a training loop: ``rec = fs.watch(model, every=50)``, ``rec.step()`` after each
        optimizer step, ``rec.close()`` at the end.

    Args:
        model: any ``nn.Module``.
        modules: which modules to watch: a module type, a glob on qualified names
            (``"encoder.*.mlp"``), or a list of them. Default: every leaf module and every
            module that owns parameters directly.
        kinds: any of ``activation``, ``gradient``, ``weight``, ``weight_grad``.
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

    Returns:
        The attached :class:`Recorder`.

    Raises:
        FlowscopeError: for an unknown kind, a selector that matches no module, or a
            setting out of range.
    """
    return Recorder(
        model,
        modules=modules,
        kinds=kinds,
        every=every,
        hist=hist_spec(bins, hist_sample, log_bins_per_decade),
        saturation=saturation,
        drop_zeros=drop_zeros,
        name=name,
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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise FlowscopeError(f"watch() needs a torch.nn.Module, got {type(model).__name__}")
        self.kinds = check_kinds(kinds)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise FlowscopeError(f"every must be an integer >= 1, got {every!r}")
        if drop_zeros not in (True, False, "auto"):
            raise FlowscopeError(f"drop_zeros must be True, False or 'auto', got {drop_zeros!r}")
        self.model = model
        self.every = every
        self.hist = hist
        self.name = name
        self._drop_zeros = drop_zeros
        self._saturation = saturation_table(saturation)
        self.targets = select_modules(model, modules)
        self.step_index = 0
        self._closed = False
        self._paused = False
        self._hooks = Hooks()  # on modules and parameters: until close()
        self._tensor_hooks = Hooks()  # on this step's outputs (their gradients): until step()
        self._calls: dict[str, int] = {}
        self._layer_idx: dict[str, int] = {}
        # calls of this step whose outputs had no gradient to hook (a reentrant checkpoint's
        # first forward runs under no_grad), matched by recomputes; see _recompute
        self._recomputes = Recomputes()
        self._pending = Pending()
        self._reader = Reader(self.hist, os.environ.get("FLOWSCOPE_KERNELS", "auto"))
        self._host: list[tuple[list[SnapKey], Any, Any, Any]] = []
        self._frames: Records | None = None
        self.started = time.time()
        self._attach()

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook (module, tensor and parameter hooks). Idempotent."""
        self._closed = True
        self._hooks.remove()
        self._tensor_hooks.remove()
        self._reader.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def active(self) -> bool:
        """True when the current step is recorded."""
        return not (self._closed or self._paused) and self.step_index % self.every == 0

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

    def step(self) -> None:
        """Advance to the next training step (call once per optimizer step)."""
        self.step_index += 1
        self._calls.clear()
        self._recomputes.clear()
        self._tensor_hooks.remove()  # tensors of finished steps: hooks no longer needed
        self._reader.new_step()

    # -- hooks -------------------------------------------------------------------------------

    def _attach(self) -> None:
        seen: set[int] = set()
        try:
            for qualname, module in self.targets:
                self._hooks.forward(module, self._forward_hook(qualname, module))
                if "weight_grad" not in self.kinds:
                    continue
                for pname, param in module.named_parameters(recurse=False):
                    if param.requires_grad and id(param) not in seen:
                        seen.add(id(param))
                        phook = self._param_hook(qualname, module, pname, param)
                        self._hooks.post_accumulate_grad(param, phook)
        except BaseException:  # no recorder is returned: leave no hook behind (Ctrl-C too)
            self.close()
            raise

    def _forward_hook(self, qualname: str, target: nn.Module) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if module is not target or not self.active:  # a deepcopy carries hooks along
                return
            if _in_backward():  # activation checkpointing re-runs the forward in backward
                self._recompute(qualname, module, output)
                return
            call = self._calls.get(qualname, -1) + 1
            self._calls[qualname] = call
            self._layer_idx.setdefault(qualname, len(self._layer_idx))
            if call == 0 and "weight" in self.kinds:
                for pname, param in module.named_parameters(recurse=False):
                    self._record(param, self._key(qualname, module, "weight", 0, pname, param))
            no_grad = False
            for path, tensor in float_tensors(output):
                key = self._key(qualname, module, "activation", call, path, tensor)
                if "activation" in self.kinds:
                    self._record(tensor, key, module)
                if "gradient" in self.kinds and tensor.requires_grad:
                    gkey = key._replace(kind="gradient")
                    self._tensor_hooks.tensor(tensor, self._grad_hook(gkey, module))
                no_grad |= not tensor.requires_grad
            if no_grad and "gradient" in self.kinds:
                self._recomputes.awaiting(qualname, call)

        return _eager(hook)

    def _recompute(self, qualname: str, module: nn.Module, output: Any) -> None:
        """A forward re-run by activation checkpointing: no new call, no second activation.

        Non-reentrant checkpointing keeps the first forward's outputs in the graph, so their
        hooks already give the gradient. The reentrant kind runs the first forward under
        no_grad and the backward through the recomputed outputs: their gradient is recorded
        under the call they recompute (see :class:`~flowscope.record.checkpoint.Recomputes`).
        """
        call = self._recomputes.match(qualname) if "gradient" in self.kinds else None
        if call is None:
            return
        for path, tensor in float_tensors(output):
            if tensor.requires_grad:
                key = self._key(qualname, module, "gradient", call, path, tensor)
                self._tensor_hooks.tensor(tensor, self._grad_hook(key, module))

    def _grad_hook(self, key: SnapKey, module: nn.Module) -> Any:
        def hook(grad: torch.Tensor) -> None:
            if not (self._closed or self._paused):
                self._record(grad, key, module)

        return _eager(hook)

    def _param_hook(
        self, qualname: str, module: nn.Module, pname: str, target: torch.Tensor
    ) -> Any:
        def hook(param: torch.Tensor) -> None:
            if param is target and self.active and param.grad is not None:
                self._layer_idx.setdefault(qualname, len(self._layer_idx))
                self._record(
                    param.grad, self._key(qualname, module, "weight_grad", 0, pname, param)
                )

        return _eager(hook)

    def _key(
        self, qualname: str, module: nn.Module, kind: str, call: int, path: str, t: torch.Tensor
    ) -> SnapKey:
        return SnapKey(
            step=self.step_index,
            layer_idx=self._layer_idx.get(qualname, -1),
            layer=qualname,
            module_type=type(module).__name__,
            kind=kind,
            call=call,
            tensor=path,
            dtype=dtype_name(t.dtype),
            device=device_name(t.device),
        )

    def _record(self, t: torch.Tensor, key: SnapKey, module: nn.Module | None = None) -> None:
        """Reduce one tensor on its device and keep the result (no host transfer)."""
        row = self.snapshot_row(t, key, module)
        if row is not None:
            self._pending.rows.append(row)
            self._pending.keys.append(key)
            self._frames = None

    def snapshot_row(
        self, t: torch.Tensor, key: SnapKey, module: nn.Module | None = None
    ) -> torch.Tensor | None:
        """The snapshot row of ``t`` taken as this recorder's hooks take it for ``key`` (the
        histogram settings, the saturation interval and zero rule of ``module``), on ``t``'s
        device and not kept; None for a tensor with no float values (meta, int, bool)."""
        if t.is_meta or not t.is_floating_point():  # no values (meta); int/bool/complex params
            return None
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
        return len(self._pending.keys) + sum(len(keys) for keys, *_ in self._host)

    def _saturation_for(self, module: nn.Module) -> tuple[float, float] | None:
        for cls in type(module).__mro__:  # the user's intervals first, then the catalogue's
            if cls in self._saturation:
                return self._saturation[cls]
        return saturation_of(module)

    # -- results -----------------------------------------------------------------------------

    def flush(self) -> None:
        """Move pending snapshots to the host: one transfer per device and buffer."""
        self._reader.finish()
        pending, self._pending = self._pending, Pending()
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

    def records(self) -> Records:
        """All snapshots so far as frames plus metadata (``frames.Records``)."""
        from flowscope.record import frames

        if self._frames is None:
            meta = {**self.meta, "run": self.name}
            self._frames = frames.records_from(self.snapshots(), meta)
        return self._frames

    def snapshots(self) -> Snapshots:
        """All snapshots so far on the host, before they become frames (what the study engine
        saves per config; :class:`flowscope.record.frames.Snapshots`)."""
        from flowscope.record import frames

        self.flush()
        return frames.Snapshots.of(self._host, self.hist, self.name)

    @property
    def stats(self) -> pd.DataFrame:
        """One row per (step, layer, kind, call, tensor); one column per statistic."""
        return self.records().stats

    @property
    def hists(self) -> pd.DataFrame:
        """One row per histogram bin (linear: every bin; log: non-empty bins)."""
        return self.records().hists

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
            "log_edges": [self.hist.log.lo, self.hist.log.hi, self.hist.log.per_decade],
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
        """Write ``stats.parquet``, ``hists.parquet`` and ``meta.json`` into ``out_dir``."""
        self.records().save(out_dir)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step {self.step_index}"
        return f"<flowscope.Recorder {len(self.targets)} modules, {state}>"


def _flowscope_version() -> str:
    from flowscope import __version__

    return __version__


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
