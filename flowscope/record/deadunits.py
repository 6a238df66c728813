"""The ``dead_units`` kind: which units of a ReLU-like module's output are dead this call.

A unit and its death are the catalogue's (:func:`flowscope.core.activations.alive_units`: a
feature of the last axis or a channel of a conv map, exactly 0 for every sample and position
of the batch). The recorder snapshots the per-unit indicator (1.0 dead, 0.0 alive) like any
tensor, on the output's device and with no host sync, so the row's ``count`` is the number of
units, its ``mean`` the dead share and its ``nonzero`` the dead count. The samples per unit
(batch × positions) are not stored twice: they are the same call's ``activation`` row's
``count`` over the units (the doctor's ``table.dead_counts`` joins the two).

Example:
    >>> out = torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    >>> dead_indicator(out).tolist()
    [1.0, 0.0, 1.0]
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowscope.core.activations import alive_units

__all__ = ["DEAD_UNITS", "dead_indicator"]

DEAD_UNITS = "dead_units"  # the kind


def dead_indicator(output: Tensor) -> Tensor | None:
    """Per unit 1.0 when dead in this batch, else 0.0 (float32, on the output's device; two
    reductions, no host sync); None for an output without a batch and a unit axis."""
    if output.dim() < 2 or output.numel() == 0:
        return None
    with torch.no_grad():
        return alive_units(output).logical_not().to(torch.float32)
