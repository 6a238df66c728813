"""How a tensor becomes a snapshot row in the recorder, step after step.

Three ways, chosen per tensor: the C kernel for CPU float tensors (a final row at once,
written into rows carved from mmap blocks); a :class:`~flowscope.record.batched.Batch` on
the tensor's device for the torch path (GPUs, or ``FLOWSCOPE_KERNELS=eager``: a row filled
when the step's batch is reduced); and no read at all when the same tensor, unchanged, was
read already this step (a container's output that is its last child's). Torch only.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from flowscope.record import ckernel
from flowscope.record.batched import Batch
from flowscope.record.fields import RAW, HistSpec, row_width
from flowscope.record.pending import RowBlocks, Taken
from flowscope.record.snapshot import backend_for, compute_dtype, snapshot_row

__all__ = ["STAGING", "Reader", "device_name", "dtype_name"]

# values in one staging buffer of the torch path, per device type: a snapshot batch is
# reduced when it is full, and at every step
STAGING = {"cpu": 1 << 22, "cuda": 1 << 24}
_C_DTYPES = (torch.float32, torch.float64)  # the C kernel's; others are read as float32


class Reader:
    """The snapshot rows of one recorder: the histogram layout and backend it was made with
    (``FLOWSCOPE_KERNELS``, read once), its row blocks, staging batches and the tensors read
    this step."""

    def __init__(self, hist: HistSpec, backend: str) -> None:
        self.hist = hist
        self._backend = backend
        self._rows = RowBlocks(row_width(hist))
        self._taken: dict[int, Taken] = {}  # id(tensor) -> its snapshot, until step/flush
        self._batches: dict[tuple[torch.device, torch.dtype], Batch] = {}  # the torch path
        c_ok = backend_for(torch.empty(1), backend) == "c"
        self._c = ckernel.snapshotter(hist) if c_ok else None  # CPU float tensors

    def row(self, t: torch.Tensor, sat: tuple[float, float] | None, drop: bool) -> torch.Tensor:
        """The snapshot row of ``t``; read once when the same tensor, unchanged, comes again.

        A container's output is often its last child's output, the same tensor (and so is its
        gradient): the child's row serves for the container when the linear histogram is taken
        alike (``drop``) and the saturation interval is the same or absent (then the count is
        NaN, what no interval gives). Same = the same live tensor object at the same version
        (inference tensors keep no version: they are read every time).
        """
        taken = self._taken.get(id(t))
        inference = t.is_inference()
        if (
            taken is not None
            and not inference
            and taken.tensor() is t
            and taken.version == t._version
            and taken.drop_zeros == drop
        ):
            if taken.saturation == sat:
                return taken.row
            if sat is None and taken.final:  # the child's row without its saturated count
                row = self._rows.take()
                row.copy_(taken.row)
                row[RAW["saturated"]] = float("nan")
                return row
        row, final = self._take(t, sat, drop)
        if not inference:
            self._taken[id(t)] = Taken(weakref.ref(t), t._version, sat, drop, row, final)
        return row

    def _take(
        self, t: torch.Tensor, sat: tuple[float, float] | None, drop: bool
    ) -> tuple[torch.Tensor, bool]:
        """A new snapshot row of ``t`` and whether it is final: the C kernel's is; one taken
        with torch ops is staged and filled when the step's batch is reduced."""
        if t.numel() and self._c is not None and t.is_cpu:  # the C kernel (t.device: ~0.3 us)
            row = self._rows.take()
            self._c(t if t.dtype in _C_DTYPES else t.float(), sat, drop, row)
            return row, True
        if t.numel() and backend_for(t, self._backend) != "c":
            key = (t.device, compute_dtype(t))
            batch = self._batches.get(key)
            if batch is None:
                capacity = STAGING.get(t.device.type, STAGING["cpu"])
                batch = self._batches[key] = Batch(t.device, key[1], self.hist, capacity)
            return batch.add(t, sat, drop), False  # copied under no_grad: no detach needed
        out = self._rows.take() if t.device.type == "cpu" else None
        return snapshot_row(t, self.hist, sat, drop, out=out), True

    def finish(self) -> None:
        """Reduce every staged snapshot: their rows are final afterwards."""
        for batch in self._batches.values():
            batch.finish()

    def new_step(self) -> None:
        """A step ended: its tensors are not asked for again; its batches are reduced."""
        self._taken.clear()
        self.finish()

    def forget(self) -> None:
        """The rows handed out were replaced (a merge): do not serve them again."""
        self._taken.clear()

    def new_rows(self) -> None:
        """After a flush: new row blocks (the old ones go with the rows flushed)."""
        self._rows = RowBlocks(row_width(self.hist))
        self._taken.clear()

    def close(self) -> None:
        """Reduce what is staged and let the staging buffers go (the rows stay valid)."""
        self.finish()
        self._batches.clear()


_NAMES: dict[Any, str] = {}


def dtype_name(dtype: torch.dtype) -> str:
    """``"float32"`` for torch.float32 (made once per dtype: ~100 snapshots per step)."""
    name = _NAMES.get(dtype)
    if name is None:
        name = _NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def device_name(device: torch.device) -> str:
    name = _NAMES.get(device)
    if name is None:
        name = _NAMES[device] = str(device)
    return name
