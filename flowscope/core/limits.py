"""Sizes checked before anything is allocated: a tensor that cannot fit in this machine's
memory is refused with its size in words, not with an allocator's traceback minutes later.

Example:
    >>> check_fits("--input-shape (1000000, 1000000)", 10**12, memory=16 * 2**30)
    Traceback (most recent call last):
    ...
    flowscope.core.errors.FlowscopeError: --input-shape (1000000, 1000000): 1e+12 float32 \
values (3.6 TiB) do not fit in this machine's memory (16 GiB)
"""

from __future__ import annotations

import math
import os

from flowscope.core.errors import FlowscopeError

__all__ = ["check_fits", "human_bytes", "memory_bytes"]


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):  # not POSIX
        return None


def human_bytes(n: float) -> str:
    """``3.6 TiB``, ``16 GiB``, ``512 B``: binary units, at least 2 significant digits.

    Example:
        >>> human_bytes(4 * 10**12), human_bytes(16 * 2**30), human_bytes(512)
        ('3.6 TiB', '16 GiB', '512 B')
    """
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    power = min(int(math.log(n, 1024)) if n >= 1 else 0, len(units) - 1)
    value = n / 1024**power
    return f"{value:.0f} {units[power]}" if value >= 10 else f"{value:.2g} {units[power]}"


def check_fits(
    what: str,
    elements: int,
    itemsize: int = 4,
    dtype: str = "float32",
    memory: int | None = None,
) -> None:
    """Raise when ``elements`` values of ``itemsize`` bytes exceed this machine's memory.

    Args:
        what: the thing being sized, as the message should name it.
        elements: how many values (a Python int: no overflow).
        itemsize: bytes per value.
        dtype: the values' dtype, for the message.
        memory: the limit in bytes; default :func:`memory_bytes` (no check when unknown).

    Raises:
        FlowscopeError: naming ``what``, its size, and the memory there is.
    """
    limit = memory_bytes() if memory is None else memory
    need = elements * itemsize
    if limit is not None and need > limit:
        raise FlowscopeError(
            f"{what}: {elements:.2g} {dtype} values ({human_bytes(need)}) do not fit in this "
            f"machine's memory ({human_bytes(limit)})"
        )
