"""A Lightning callback: ``Trainer(callbacks=[FlowscopeCallback("reports/run", every=50)])``.

Watches the LightningModule when training starts (after the sanity check), records every
``every``-th optimizer step (``trainer.global_step``; validation batches are not recorded),
and at the end of training merges the ranks (DDP), writes the records on rank 0 and
``report.html``. When training raises (``on_exception``, Ctrl-C included) the hooks are
removed and what was recorded is written all the same (:meth:`Session.crash`). Under
``precision="16-mixed"`` the
gradients seen during backward are scaled by the GradScaler; the callback reads the scale in
``on_after_backward`` and divides that step's gradient snapshots by it (see
:mod:`flowscope.integrations`). Under DDP it re-reads the averaged parameter gradients in
``on_after_backward`` (backward has synchronised them by then).

Imports Lightning (``lightning.pytorch``, else ``pytorch_lightning``); ``import flowscope``
never does.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from flowscope.integrations import Session
from flowscope.record.recorder import Recorder


def _callback_base() -> type:
    """Lightning's Callback class: ``lightning.pytorch``'s, else ``pytorch_lightning``'s."""
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(name).Callback
        except ModuleNotFoundError:
            continue
    raise ImportError(
        "flowscope.integrations.lightning needs Lightning: pip install 'flowscope[lightning]'"
        " (or pip install lightning)"
    )


if TYPE_CHECKING:
    from lightning.pytorch import Callback
else:
    Callback = _callback_base()

__all__ = ["FlowscopeCallback"]


def _watched(trainer: Any, pl_module: Any) -> Any:
    """The LightningModule, or the FSDP1 wrapper Lightning's FSDPStrategy put around it: that
    wrapper holds the flat parameter of the module's own parameters (the layer names are the
    same: wrapper segments are dropped)."""
    model = getattr(trainer, "model", None)
    return model if type(model).__name__ == "FullyShardedDataParallel" else pl_module


class FlowscopeCallback(Callback):
    """Record a Lightning training run with flowscope.

    Example:
        >>> from flowscope.integrations.lightning import FlowscopeCallback
        >>> callback = FlowscopeCallback("reports/run", every=50)

    Then ``pl.Trainer(max_steps=1000, callbacks=[callback]).fit(model, loader)`` records
    optimizer steps 0, 50, 100, ... and writes ``reports/run``; ``fs.load("reports/run")``
    reads it back. A whole fit is too long for a docstring: examples/lightning_train.py is
    one (tests/test_examples.py runs it).

    Args:
        dirpath: where rank 0 writes ``stats.parquet``, ``hists.parquet``, ``meta.json`` (and
            ``report.html``).
        every: record optimizer steps 0, every, 2*every, ...
        report: also write the HTML report.
        name: the ``run`` column (default: the LightningModule's class name).
        **watch_kwargs: more arguments for :func:`flowscope.watch` (``modules``, ``kinds``,
            ``bins``, ``hist_sample``, ...).

    Raises:
        FlowscopeError: for a bad argument, when the callback is made.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        every: int = 50,
        *,
        report: bool = True,
        name: str = "",
        **watch_kwargs: Any,
    ) -> None:
        super().__init__()
        self.session = Session(
            dirpath, every=every, report=report, name=name, watch_kwargs=watch_kwargs
        )

    @property
    def recorder(self) -> Recorder | None:
        """The recorder (None before training starts)."""
        return self.session.recorder

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.session.name = self.session.name or type(pl_module).__name__
        self.session.start(_watched(trainer, pl_module))

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self.session.resume()

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        plugin = getattr(trainer, "precision_plugin", None)
        self.session.after_backward(getattr(plugin, "scaler", None))

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.session.end_step(trainer.global_step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.session.finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.session.crash(exception)  # hooks off, what was recorded written
