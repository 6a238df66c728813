"""The snapshots a recorder holds until a flush: their keys and rows.

Torch and numpy only. :class:`SnapKey` says where a snapshot came from (one row of the stats
frame); :class:`Pending` holds the keys and the rows on the tensors' devices; CPU rows come
from :class:`RowBlocks`; :class:`Taken` lets the recorder recognise a tensor it read already.
"""

from __future__ import annotations

import mmap
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["Pending", "RowBlocks", "SnapKey", "Taken"]


class SnapKey(NamedTuple):
    """Where a snapshot came from: one row of the stats frame (a named tuple: made ~100 times
    per recorded step, in a few hundred nanoseconds each)."""

    step: int
    layer_idx: int
    layer: str
    module_type: str
    kind: str
    call: int
    forward: int  # the step's forward pass (micro-batch) it came from
    backward: int  # the step's backward pass (-1: activation, weight)
    order: int  # 1: dL/dh, dL/dW; 2: after a create_graph backward; 0: activation, weight
    tensor: str
    dtype: str
    device: str


class Taken(NamedTuple):
    """A snapshot taken this step, kept to recognise the same tensor asked for again."""

    tensor: weakref.ref[torch.Tensor]
    version: int  # torch bumps it on every in-place change
    saturation: tuple[float, float] | None
    drop_zeros: bool
    row: torch.Tensor
    final: bool  # the C kernel's row; False: staged, filled when its batch is reduced


@dataclass
class Pending:
    """Snapshots not yet flushed: their keys and their results on the tensors' devices, one
    row each (raw | linear counts | log counts, see :func:`flowscope.record.snapshot.split_row`)."""

    keys: list[SnapKey] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)


class RowBlocks:
    """Rows for CPU snapshots, carved from anonymous-mmap blocks of ``ROWS`` rows.

    A recorded step leaves ~100 small results alive until the flush. Allocated one by one
    they sit in the malloc heap between the step's large activation buffers and keep it from
    shrinking: RSS grew by ~64 MB per recorded step (lecture MLP, batch 1000). mmap'd blocks
    live outside that heap.
    """

    ROWS = 512

    def __init__(self, width: int) -> None:
        self.width = width
        self.rows: tuple[torch.Tensor, ...] = ()
        self.used = self.ROWS

    def take(self) -> torch.Tensor:
        if self.used == self.ROWS:
            buf = mmap.mmap(-1, self.ROWS * self.width * 8)
            cells = np.frombuffer(buf, dtype=np.float64).reshape(self.ROWS, self.width)
            self.rows, self.used = torch.from_numpy(cells).unbind(0), 0  # views made at once
        self.used += 1
        return self.rows[self.used - 1]
