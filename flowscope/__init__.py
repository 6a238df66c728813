"""flowscope: per-layer activation and gradient flow diagnostics for PyTorch.

Example:
    >>> import torch, flowscope as fs
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
    >>> with fs.watch(model) as rec:
    ...     model(torch.randn(4, 8)).sum().backward()
    >>> rec.stats.columns[:4].tolist()
    ['run', 'step', 'layer_idx', 'layer']

Names are imported lazily (PEP 562) so that ``flowscope --help`` starts without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "watch": "flowscope.recorder",
    "Recorder": "flowscope.recorder",
    "KINDS": "flowscope.recorder",
    "load": "flowscope.frames",
    "Records": "flowscope.frames",
    "FlowscopeError": "flowscope.errors",
    "report": "flowscope.report",
    "diagnose": "flowscope.doctor",
    "Diagnosis": "flowscope.doctor",
    "Thresholds": "flowscope.doctor",
    "examine": "flowscope.doctor",
    "compare": "flowscope.doctor",
    "reinit": "flowscope.fixes",
    "lsuv": "flowscope.fixes",
    "to_tensorboard": "flowscope.export",
    "to_csv": "flowscope.export",
}

__all__ = [*_LAZY, "__version__"]

if TYPE_CHECKING:
    from flowscope.doctor import Diagnosis, Thresholds, compare, diagnose, examine  # noqa: F401
    from flowscope.errors import FlowscopeError  # noqa: F401
    from flowscope.export import to_csv, to_tensorboard  # noqa: F401
    from flowscope.fixes import lsuv, reinit  # noqa: F401
    from flowscope.frames import Records, load  # noqa: F401
    from flowscope.recorder import KINDS, Recorder, watch  # noqa: F401
    from flowscope.report import report  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flowscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
