"""A Hugging Face ``TrainerCallback``: ``Trainer(..., callbacks=[FlowscopeTrainerCallback(...)])``.

Watches the model when training begins, records every ``every``-th optimizer step
(``state.global_step``; evaluation passes, which run between steps, are not recorded), and at
the end of training merges the ranks (DDP), writes the records on the main process and
``report.html``.

Under DDP the averaged parameter gradients are re-read in ``on_pre_optimizer_step``: after
gradient clipping (``max_grad_norm``), so ``weight_grad`` is the clipped gradient the optimizer
applies. With fp16 and a GradScaler, pass ``scaler=trainer.accelerator.scaler`` (the Trainer
does not hand it to callbacks): the gradients seen during backward are divided by the scale
at the end of the step (see :mod:`flowscope.integrations`). On CPU the Trainer uses bf16,
which needs no scaler.

When training raises, the Trainer calls no callback (there is no ``on_exception``). So at
``on_train_begin`` the callback finds its Trainer (the caller of the callback handler) and
wraps that Trainer's ``training_step``: an exception there (the forward, the loss, the
backward) removes the hooks and writes what was recorded (:meth:`Session.crash`) before it
propagates; the wrapper goes at ``on_train_end``. As a last resort, a finalizer on the
Trainer does the same when it is garbage-collected with training unfinished (an exception
elsewhere, e.g. in the optimizer step).

Imports ``transformers``; ``import flowscope`` never does.
"""

from __future__ import annotations

import functools
import os
import sys
import weakref
from types import FrameType
from typing import Any

from flowscope.integrations import Session
from flowscope.record.recorder import Recorder

try:
    from transformers import TrainerCallback
except ModuleNotFoundError as _err:
    raise ImportError(
        "flowscope.integrations.hf needs Hugging Face transformers: "
        "pip install 'flowscope[hf]' (or pip install transformers accelerate)"
    ) from _err

__all__ = ["FlowscopeTrainerCallback"]


class FlowscopeTrainerCallback(TrainerCallback):
    """Record a Hugging Face ``Trainer`` run with flowscope.

    Example:
        >>> from flowscope.integrations.hf import FlowscopeTrainerCallback
        >>> callback = FlowscopeTrainerCallback("reports/gpt2", every=100)

    Then ``Trainer(model, args, train_dataset=ds, callbacks=[callback]).train()`` records
    optimizer steps 0, 100, 200, ... and writes ``reports/gpt2``. A whole training run is too
    long for a docstring: examples/hf_trainer.py is one, a tiny GPT-2 built from a config
    (tests/test_examples.py runs it).

    Args:
        dirpath: where the main process writes the records (and ``report.html``).
        every: record optimizer steps 0, every, 2*every, ...
        report: also write the HTML report.
        name: the ``run`` column (default: the model's class name).
        scaler: the fp16 GradScaler, if any (``trainer.accelerator.scaler``); may be set
            after the Trainer is built.
        **watch_kwargs: more arguments for :func:`flowscope.watch`.

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
        scaler: Any = None,
        **watch_kwargs: Any,
    ) -> None:
        self.session = Session(
            dirpath, every=every, report=report, name=name, watch_kwargs=watch_kwargs
        )
        self.scaler = scaler
        self._trainer: weakref.ref[Any] | None = None

    @property
    def recorder(self) -> Recorder | None:
        """The recorder (None before training begins)."""
        return self.session.recorder

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is None:
            raise TypeError("on_train_begin got no model: is this callback in a Trainer?")
        self.session.start(model)
        trainer = _calling_trainer(self)
        if trainer is not None:
            self._guard(trainer)

    def _guard(self, trainer: Any) -> None:
        """Wrap ``trainer.training_step``: an exception there writes what was recorded."""
        _unwrap(trainer)  # a second train() after a crash: wrap the method, not the wrapper
        step, session = trainer.training_step, self.session

        @functools.wraps(step)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            try:
                return step(*args, **kwargs)
            except BaseException as err:
                session.crash(err)
                raise

        training_step._flowscope_guard = True  # type: ignore[attr-defined]
        trainer.training_step = training_step
        self._trainer = weakref.ref(trainer)
        weakref.finalize(trainer, session.crash)  # a no-op once finish() or crash() wrote

    def _unguard(self) -> None:
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is not None:
            _unwrap(trainer)
        self._trainer = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.session.resume()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        clipped = bool(getattr(args, "max_grad_norm", 0))  # clipping unscales the gradients
        self.session.after_backward(self.scaler, grads_unscaled=clipped)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.session.end_step(state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._unguard()
        self.session.finish()


def _unwrap(trainer: Any) -> None:
    """Take the callback's wrapper off ``trainer.training_step`` (nothing else)."""
    if getattr(vars(trainer).get("training_step"), "_flowscope_guard", False):
        del trainer.training_step  # the class's method again


def _calling_trainer(callback: Any, depth: int = 8) -> Any:
    """The object up the call stack whose callback handler holds ``callback`` (the Trainer
    running ``on_train_begin``), or None."""
    frame: FrameType | None = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        handler = getattr(owner, "callback_handler", None)
        if callback in getattr(handler, "callbacks", ()) and callable(
            getattr(owner, "training_step", None)
        ):
            return owner
        frame = frame.f_back
    return None
