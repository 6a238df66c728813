"""What the doctor's verdicts are, the columns it reports them in, and every number they use.

``VERDICTS`` lists the verdicts from the most to the least urgent (a run's verdict joins
the ones found in this order: ``exploding+saturated``); ``LAYER_COLUMNS`` and
``RUN_COLUMNS`` are the columns of ``Diagnosis.layers`` and ``Diagnosis.runs``;
:class:`Thresholds` holds the limits, derived in docs/DOCTOR.md.

Example:
    >>> VERDICTS[0], Thresholds(act_ratio=100).describe().split(",")[0]
    ('non-finite', 'act_ratio=100')
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flowscope.core.errors import FlowscopeError

__all__ = ["LAYER_COLUMNS", "NO_DATA", "RUN_COLUMNS", "VERDICTS", "Thresholds"]

VERDICTS = ("non-finite", "exploding", "vanishing", "saturated", "dead", "no data", "healthy")
NO_DATA = "no data"  # nothing to judge: the activations and dL/dh hold no value (a batch of 0)
LAYER_COLUMNS = ["layer_idx", "layer", "module_type", "check", "verdict", "value", "threshold"]
RUN_COLUMNS = [
    "verdict",
    "act_gain",
    "grad_gain",
    "grad_ratio",
    "worst_layer",
    "saturated",
    "dead",
    "nonfinite",
    "reason",
    "fix",
    "thresholds",
]


@dataclass(frozen=True)
class Thresholds:
    """Every number the verdicts use. Change any: ``Thresholds(act_ratio=100)``.

    Example:
        >>> Thresholds().act_ratio, Thresholds(saturated=0.3).saturated
        (10.0, 0.3)

    Attributes:
        act_ratio: a layer's activation rms more than this many times above (exploding) or
            below (vanishing) the first layer of its role. One decade: the layers after it
            see inputs 10× off the scale their init assumed, and the drift compounds with
            depth (per-layer gain g gives g^(L-1)); the lecture's broken inits are 10^4–10^12
            off after ten layers, the healthy ones (Xavier/He) within 4×.
        grad_ratio: the same for the rms of dL/dh, relative to the last layer of its role
            (nearest the loss), growing toward the input = exploding. With one learning rate
            for all layers, a decade between first and last layer means some layers take
            updates 10× too large or too small relative to their weights.
        saturated: share of a layer's outputs beyond the activation's saturation interval.
            A tanh unit at |h| ≥ 0.99 passes at most 1 − 0.99² ≈ 2 % of its gradient, so a
            share p bounds E[φ'²] ≤ 1 − 0.98 p; at p = 0.5 the layer at least halves the
            gradient's mean square, the loss Xavier-on-ReLU shows (which is already enough
            to lose a decade in 7 layers). The lecture's tanh σ = 1 net has p ≈ 0.9.
        dead: share of a ReLU-like layer's units that output 0 for every sample of the
            batch. Deep plain ReLU nets at He init already show 8 % (batch 1000) to 18 %
            (batch 64) such units at depth 10 because inputs become correlated with depth
            (measured, docs/DOCTOR.md); a quarter is above that.
        dead_min_samples: samples per unit (batch × positions) needed to count dead units;
            with fewer, a unit that fires on half the inputs is silent on all of them by
            chance too often (2^-n), and the zero-share bound is used instead.
        zero_share: without per-unit counts, a ReLU-like layer whose outputs are at least
            this share exact zeros is reported dead: at most 1 − zero_share of its
            (sample, unit) pairs pass any gradient (a healthy ReLU layer: ≈ 0.5).
        nonfinite: NaN + Inf count tolerated (0: any NaN or Inf is a verdict).
    """

    act_ratio: float = 10.0
    grad_ratio: float = 10.0
    saturated: float = 0.5
    dead: float = 0.25
    dead_min_samples: int = 64
    zero_share: float = 0.9
    nonfinite: int = 0

    def __post_init__(self) -> None:
        for name in ("act_ratio", "grad_ratio"):
            value = getattr(self, name)
            if not _number(value) or not value > 1:
                raise FlowscopeError(f"Thresholds.{name} must be a number > 1, got {value!r}")
        for name in ("saturated", "dead", "zero_share"):
            value = getattr(self, name)
            if not _number(value) or not 0 < value <= 1:
                raise FlowscopeError(f"Thresholds.{name} must be in (0, 1], got {value!r}")
        for name in ("dead_min_samples", "nonfinite"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise FlowscopeError(f"Thresholds.{name} must be an integer >= 0, got {value!r}")

    def describe(self) -> str:
        """One line with every threshold (the ``thresholds`` column of ``runs``)."""
        return (
            f"act_ratio={self.act_ratio:g}, grad_ratio={self.grad_ratio:g}, "
            f"saturated={self.saturated:g}, dead={self.dead:g} "
            f"(>= {self.dead_min_samples} samples/unit), zero_share={self.zero_share:g}, "
            f"nonfinite={self.nonfinite}"
        )


def _number(value: object) -> bool:
    """True for a finite int or float (a bool is not a number here)."""
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(float(value))
    )
