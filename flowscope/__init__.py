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

from flowscope.record import display as _display

__version__ = "0.1.0"

_LAZY = {
    "watch": "flowscope.record.recorder",
    "Recorder": "flowscope.record.recorder",
    "KINDS": "flowscope.record.recorder",
    "load": "flowscope.record.loading",
    "Records": "flowscope.record.frames",
    "FlowscopeError": "flowscope.core.errors",
    "diagnose": "flowscope.doctor",
    "Diagnosis": "flowscope.doctor",
    "Thresholds": "flowscope.doctor",
    "examine": "flowscope.doctor",
    "compare": "flowscope.reporter.compare",  # two diagnoses, or two runs (+ compare.html)
    "reinit": "flowscope.doctor",
    "lsuv": "flowscope.doctor",
    "signal_propagation": "flowscope.doctor.signal",
    "run_study": "flowscope.study.engine",
    "jacobian_spectrum": "flowscope.theory.spectrum",
    "report": "flowscope.reporter.page",
    "to_tensorboard": "flowscope.reporter.export",
    "to_csv": "flowscope.reporter.export",
}
# subpackages reached as attributes of the package (``from flowscope import distributed``)
_MODULES = {"distributed": "flowscope.integrations.distributed"}

__all__ = [*_LAZY, "__version__"]

if TYPE_CHECKING:
    from flowscope.core.errors import FlowscopeError  # noqa: F401
    from flowscope.doctor import (  # noqa: F401
        Diagnosis,
        Thresholds,
        diagnose,
        examine,
        lsuv,
        reinit,
    )
    from flowscope.doctor.signal import signal_propagation  # noqa: F401
    from flowscope.record.frames import Records  # noqa: F401
    from flowscope.record.loading import load  # noqa: F401
    from flowscope.record.recorder import KINDS, Recorder, watch  # noqa: F401
    from flowscope.reporter.compare import compare  # noqa: F401
    from flowscope.reporter.export import to_csv, to_tensorboard  # noqa: F401
    from flowscope.reporter.page import report  # noqa: F401
    from flowscope.study.engine import run_study  # noqa: F401
    from flowscope.theory.spectrum import jacobian_spectrum  # noqa: F401


# notebook views of the record layer's objects, drawn by the reporter (loaded when shown)
_display.register("recorder", "flowscope.reporter.notebook:recorder_html")
_display.register("records", "flowscope.reporter.notebook:records_html")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    raise AttributeError(f"module 'flowscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
