"""flowscope inside training frameworks: what the Lightning and Hugging Face callbacks share.

The callbacks live in :mod:`flowscope.integrations.lightning` and
:mod:`flowscope.integrations.hf`; each imports its framework, this module imports neither.
Both drive one :class:`Session`: watch the model when training starts, record every
``every``-th optimizer step (nothing in between: validation and evaluation passes are not
recorded), merge the ranks under ``torch.distributed``, write the records (rank 0) and, when
``flowscope.reporter.page`` is there, the HTML report.

**Loss scaling (AMP with a GradScaler).** ``scaler.scale(loss).backward()`` multiplies every
gradient by the scale ``S``, so the tensor hooks see ``S × dL/d(output)``, and the parameter
hooks ``S × dL/dθ`` (unscaling happens later, in ``scaler.unscale_`` / ``scaler.step``).
:func:`unscale_pending` divides one step's gradient snapshots by ``S`` before they are
flushed: counts, moments, min/max and the linear histogram (whose edges follow min/max) come
out exactly as for the unscaled gradients (``S`` is a power of two: dividing is exact in
floating point); the fixed log-magnitude histogram is shifted by ``log10(S)`` decades, and
since that is not a whole number of bins, each bin's count is split between the two bins it
now overlaps, in proportion to the overlap (each sample moves at most one bin from its true
one; the total is exact; under- and overflow bins stay where they are). A step whose scaled
gradients overflowed shows Inf in its gradient rows: the scaler skipped that step. With
bf16 autocast there is no scaler and nothing to undo.

Example:
    >>> import torch, flowscope as fs
    >>> model = torch.nn.Linear(4, 2)
    >>> scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    >>> rec = fs.watch(model, kinds=["gradient"])
    >>> scaler.scale(model(torch.randn(8, 4)).sum()).backward()
    >>> unscale_pending(rec, loss_scale(scaler))  # this step's gradient snapshot
    1
    >>> float(rec.stats["max"].iloc[0])  # d(sum)/d(output) is 1 everywhere
    1.0
    >>> rec.close()
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowscope.core.errors import FlowscopeError
from flowscope.integrations.distributed import merge_pending, rank_and_world, record_synced_grads
from flowscope.record.recorder import Recorder, watch
from flowscope.record.snapshot import RAW, LogEdges, split_row

__all__ = ["Session", "loss_scale", "unscale_pending"]

GRADIENT_KINDS = ("gradient", "weight_grad")


def loss_scale(scaler: Any) -> torch.Tensor | float | None:
    """The scale a GradScaler multiplies the loss by now (a device tensor: no sync), or None.

    None when there is no scaler or it is disabled (bf16, CPU without one).

    Example:
        >>> loss_scale(None) is None
        True
    """
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return None
    scale = getattr(scaler, "_scale", None)  # torch's GradScaler: a 1-element device tensor
    if isinstance(scale, torch.Tensor):
        return scale.detach().reshape(())
    return float(scaler.get_scale())  # another scaler, or before its first scale(): syncs


def unscale_pending(
    rec: Recorder,
    scale: torch.Tensor | float | None,
    *,
    step: int | None = None,
    kinds: Sequence[str] = GRADIENT_KINDS,
) -> int:
    """Divide one step's pending gradient snapshots by the loss scale (see the module notes).

    Call it once per recorded step, after the step's ``backward()`` and before anything
    flushes (``rec.stats``, ``rec.save``, ``merge_pending``). Device operations only.

    Example:
        >>> import torch, flowscope as fs
        >>> model = torch.nn.Linear(4, 2)
        >>> rec = fs.watch(model, kinds=["weight_grad"])
        >>> (model(torch.ones(1, 4)).sum() * 8).backward()
        >>> unscale_pending(rec, 8.0)
        2
        >>> rec.stats["max"].tolist()
        [1.0, 1.0]
        >>> rec.close()

    Args:
        rec: the recorder.
        scale: the scale used in this step's backward (:func:`loss_scale`); None: no-op.
        step: the step whose snapshots to divide (default: the recorder's current step).
        kinds: which kinds were recorded scaled.

    Returns:
        The number of snapshots divided.
    """
    if scale is None:
        return 0
    if isinstance(scale, float | int) and not (math.isfinite(scale) and scale > 0):
        raise FlowscopeError(f"the loss scale must be a finite number > 0, got {scale!r}")
    step = rec.step_index if step is None else step
    pending = rec.pending()
    edges = rec.hist.log
    done = 0
    for i, (key, row) in enumerate(pending):
        if key.step == step and key.kind in kinds:
            raw, lin, log = split_row(row, rec.hist)
            s = torch.as_tensor(scale, dtype=torch.float64, device=raw.device)
            pending[i] = key, torch.cat([_divide_raw(raw, s), lin, shift_log_hist(log, s, edges)])
            done += 1
    if done:
        rec.set_pending(pending)
    return done


def _divide_raw(raw: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The raw vector of x / s (s > 0): the shift, the scale and the extremes divided by s;
    the sums, of (x - shift) / scale, stay as they are."""
    out = raw.clone()
    for name in ("shift", "scale", "min", "max"):
        out[RAW[name]] = raw[RAW[name]] / s
    return out


def shift_log_hist(log: torch.Tensor, s: torch.Tensor, edges: LogEdges) -> torch.Tensor:
    """Log-magnitude counts of x / s from those of x, splitting bins by overlap (s > 0).

    Example:
        >>> e = LogEdges(lo=-2, hi=2)
        >>> h = torch.zeros(e.size, dtype=torch.float64); h[e.zero_index + 3] = 4.0  # [1, 10)
        >>> moved = shift_log_hist(h, torch.tensor(10 ** 0.25, dtype=torch.float64), e)
        >>> moved[e.zero_index + 2 : e.zero_index + 4].tolist()  # [0.1, 1) and [1, 10)
        [1.0, 3.0]
    """
    per, z = edges.per_sign, edges.zero_index
    t = torch.log10(s) * edges.per_decade  # bins to move towards zero
    q, f = t.floor(), t - t.floor()
    j = torch.arange(per, device=log.device)
    decade = (j >= 1) & (j <= per - 2)
    a = torch.where(decade, (j - q.long()).clamp(0, per - 1), j)
    b = torch.where(decade, (j - q.long() - 1).clamp(0, per - 1), j)
    keep = torch.where(decade, 1 - f, torch.ones_like(f))
    move = torch.where(decade, f, torch.zeros_like(f))

    def shifted(m: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(m).scatter_add_(0, a, m * keep)
        return out.scatter_add_(0, b, m * move)

    return torch.cat([shifted(log[:z].flip(0)).flip(0), log[z : z + 1], shifted(log[z + 1 :])])


# -- the callbacks' shared session --------------------------------------------------------------


class Session:
    """One recording driven by a training loop's events (used by the framework callbacks).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> session = Session("reports/doc-session", every=1, report=False)
        >>> session.start(model)
        >>> for step in range(2):
        ...     session.resume()                       # the batch starts
        ...     model(torch.randn(8, 4)).sum().backward()
        ...     session.after_backward()
        ...     session.end_step(step + 1)             # the optimizer stepped
        >>> session.finish()  # the records of steps 0 and 1
        PosixPath('reports/doc-session')

    Args:
        dirpath: where rank 0 writes the records (and ``report.html``).
        every: record every ``every``-th optimizer step (steps 0, every, 2*every, ...).
        report: also write ``report.html``.
        name: the ``run`` column (default: the model's class name).
        watch_kwargs: more arguments for :func:`flowscope.watch` (``modules``, ``kinds``,
            ``bins``, ...).

    Raises:
        FlowscopeError: for a bad ``dirpath`` or ``every`` (at once, not when training starts).
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        *,
        every: int = 50,
        report: bool = True,
        name: str = "",
        watch_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(dirpath, str | os.PathLike) or not str(dirpath):
            raise FlowscopeError(f"dirpath must be a folder path, got {dirpath!r}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise FlowscopeError(f"every must be an integer >= 1, got {every!r}")
        if "every" in (watch_kwargs or {}) or "name" in (watch_kwargs or {}):
            raise FlowscopeError("pass every and name as arguments, not in watch_kwargs")
        self.dirpath = Path(dirpath)
        self.every = every
        self.report = report
        self.name = name
        self.watch_kwargs = dict(watch_kwargs or {})
        self.recorder: Recorder | None = None
        self.written: Path | None = None
        self.finished = False  # finish() ran (on ranks > 0 it writes nothing)
        self._scale: torch.Tensor | float | None = None
        self._scaled_kinds: tuple[str, ...] = GRADIENT_KINDS
        self._paused = False

    def start(self, model: nn.Module) -> None:
        """Watch ``model`` (once; later calls do nothing), paused until the first batch."""
        if self.recorder is None:
            name = self.name or type(model).__name__
            self.recorder = watch(model, every=self.every, name=name, **self.watch_kwargs)
            self.pause()

    def pause(self) -> None:
        """Stop recording until :meth:`resume` (evaluation passes between batches)."""
        if self.recorder is not None and not self.recorder.closed:
            self.recorder.pause()  # the hooks stay; close() would remove them
            self._paused = True

    def resume(self) -> None:
        """Record again (a training batch starts)."""
        if self.recorder is not None and self._paused:
            self.recorder.resume()
            self._paused = False

    def after_backward(self, scaler: Any = None, *, grads_unscaled: bool = False) -> None:
        """After ``backward()`` of a recorded step: take DDP's averaged gradients, note the scale.

        Args:
            scaler: the GradScaler in use, if any.
            grads_unscaled: the parameters' ``.grad`` are already unscaled now (HF Trainer
                after gradient clipping); the gradients re-read from them are not divided.
        """
        rec = self.recorder
        if rec is None or not rec.active:
            return
        synced = rank_and_world()[1] > 1 and record_synced_grads(rec) > 0
        self._scale = loss_scale(scaler)
        self._scaled_kinds = ("gradient",) if synced and grads_unscaled else GRADIENT_KINDS

    def end_step(self, global_step: int) -> None:
        """The optimizer stepped: unscale this step's gradients, advance to ``global_step``."""
        rec = self.recorder
        if rec is None:
            return
        unscale_pending(rec, self._scale, kinds=self._scaled_kinds)
        self._scale = None
        while rec.step_index < global_step:
            rec.step()
        self.pause()

    def finish(self) -> Path | None:
        """Remove the hooks, merge the ranks, write the records (rank 0) and the report.

        Every rank must call it (the merge runs collectives). Returns the folder on rank 0.
        """
        rec = self.recorder
        if rec is None or self.finished:
            return self.written
        self.finished = True
        rec.close()
        merge_pending(rec)
        if rank_and_world()[0] != 0:
            return None
        rec.save(str(self.dirpath))
        self.written = self.dirpath
        if self.report:
            from flowscope.reporter.page import report

            report(self.dirpath)
        return self.written

    def abort(self) -> None:
        """Remove the hooks without writing."""
        if self.recorder is not None:
            self.recorder.close()

    def crash(self, error: BaseException | None = None) -> Path | None:
        """Training raised: remove the hooks and write what was recorded, with no merge
        across ranks (the other ranks may be gone: a collective could wait forever). One
        process writes ``dirpath``; under ``torch.distributed`` each rank writes
        ``dirpath/rank<r>``. A report that fails only warns: the training error is the one
        that propagates. Returns the folder written (None: nothing was recorded)."""
        rec = self.recorder
        if rec is None or self.finished or self.written is not None:
            self.abort()  # finished: rank 0 wrote the merged records, other ranks nothing
            return self.written
        unscale_pending(rec, self._scale, kinds=self._scaled_kinds)  # a step cut short
        self._scale = None
        rec.close()
        if not rec.recorded:
            return None
        rank, world = rank_and_world()
        out = self.dirpath if world == 1 else self.dirpath / f"rank{rank}"
        rec.save(str(out))
        self.written = out
        what = type(error).__name__ if error is not None else "training stopped"
        warnings.warn(
            f"flowscope: {what} during training: the hooks were removed and the"
            f" {rec.recorded} snapshots recorded up to step {rec.step_index} written to {out}",
            RuntimeWarning,
            stacklevel=2,
        )
        if self.report:
            try:
                from flowscope.reporter.page import report

                report(out)
            except Exception as err:  # the training error matters more than the page
                warnings.warn(
                    f"flowscope: no report for {out}: {err}", RuntimeWarning, stacklevel=2
                )
        return out
