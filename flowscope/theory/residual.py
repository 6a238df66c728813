"""Growth laws of the residual stream at init (Brock, De & Smith 2021, sections 3-4): the
expected second moment E[x_k²] of the stream after block k, for the block variants of
:mod:`flowscope.models.resnets`, from the input's second moment ``m0``.

Each block adds its branch to the stream, and a branch with zero-mean random weights is
uncorrelated with the stream it is added to, so second moments add:
``E[x_{k+1}²] = E[x_k²] + E[branch_k²]``. What the branch adds:

==============  ====================================  ===========================================
variant         E[branch_k²]                          E[x_k²]
==============  ====================================  ===========================================
``batchnorm``   1 (BN then a He layer: 2 · E[relu²])  m0 + k: linear in depth
``none``        E[x_k²] (He layers preserve it)       m0 · 2^k: exponential
``nf``          α² (unit-variance branch, scaled)     m0 + k α² (β_k = sqrt(1 + k α²) for m0 = 1)
``skipinit``    0 (the branch gain starts at 0)       m0
``sqrt_depth``  E[x_k²] / L                           m0 (1 + 1/L)^k: at most e · m0
==============  ====================================  ===========================================

The ``none`` and ``sqrt_depth`` rows assume E[relu(x)²] = E[x²] / 2 (a symmetric stream);
the ReLU branches shift the stream's channel means (Brock et al.'s "mean shift"), which
breaks that symmetry slightly: about 1% per block for ``none``.

Example:
    >>> stream_second_moment("batchnorm", 3).tolist()
    [2.0, 3.0, 4.0]
    >>> [round(float(v), 4) for v in stream_second_moment("nf", 2, alpha=0.2)]
    [1.04, 1.08]
"""

from __future__ import annotations

import numpy as np

from flowscope.core.errors import FlowscopeError, unknown

__all__ = ["GROWTH_VARIANTS", "stream_second_moment"]

GROWTH_VARIANTS = ("batchnorm", "none", "nf", "skipinit", "sqrt_depth")


def stream_second_moment(
    variant: str, depth: int, *, alpha: float = 0.2, m0: float = 1.0
) -> np.ndarray:
    """E[x_k²] for k = 1 .. ``depth`` (see the module's table)."""
    if variant not in GROWTH_VARIANTS:
        raise unknown("variant", variant, GROWTH_VARIANTS)
    if not isinstance(depth, int) or depth < 1:
        raise FlowscopeError(f"depth={depth!r}: allowed: an integer >= 1")
    k = np.arange(1, depth + 1, dtype=np.float64)
    if variant == "batchnorm":
        return m0 + k
    if variant == "none":
        return m0 * 2.0**k
    if variant == "nf":
        return m0 + k * alpha**2
    if variant == "skipinit":
        return np.full(depth, float(m0))
    return m0 * (1 + 1 / depth) ** k
