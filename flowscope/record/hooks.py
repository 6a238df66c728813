"""The one way flowscope hooks a model: a set of handles that leave together.

Every place that hooks a model (the recorder, the doctor's dead-unit count, LSUV, the study
probes) keeps its handles in a :class:`Hooks`: a context manager whose exit removes every
handle, also when the body raises; removing twice is harmless. The shape of fastai's
``Hooks`` and torch's ``RemovableHandle``. Torch only.

Module hooks cannot outlive their set: ``copy.deepcopy`` of a hooked module (an EMA copy, a
target network) and pickling it (``torch.save``) carry an inert stand-in instead of the hook
(:class:`Inert`: no reference to whoever placed it), and the stand-ins in deep copies are
taken out of the copies when the set is removed.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    >>> seen = []
    >>> with Hooks() as hooks:
    ...     _ = hooks.forward(net[1], lambda m, args, out: seen.append(out.shape))
    ...     _ = net(torch.randn(2, 3))
    >>> seen, len(hooks)
    ([torch.Size([2, 3])], 0)
    >>> _ = net(torch.randn(2, 3))  # after the block: nothing fires
    >>> len(seen)
    1
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["Hooks", "Inert", "forward_hooks"]

ForwardHook = Callable[[nn.Module, Any, Any], Any]


class Inert:
    """What a deep copy or a pickle of a hooked module holds in place of a flowscope hook:
    does nothing, refers to nothing, pickles by name."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __repr__(self) -> str:
        return "<flowscope inert hook>"


class _Placed(functools.partial[Any]):
    """A module hook placed by :class:`Hooks` (a partial: called with no extra frame)."""

    home: int  # id() of the hook dict it was placed in
    key: int  # its handle's id there
    strays: list[tuple[weakref.ref[dict[int, Any]], int]]  # its Hooks' copies to clean

    def __deepcopy__(self, memo: dict[int, Any]) -> Inert:
        copied = memo.get(self.home)  # copy.deepcopy registers the dict's copy before its items
        if isinstance(copied, dict):
            self.strays.append((weakref.ref(copied), self.key))
        return Inert()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return Inert, ()


class Hooks:
    """Handles of hooks placed together, removed together (``remove()``, or the ``with`` exit).

    ``forward``, ``tensor`` and ``post_accumulate_grad`` place a hook and keep its handle;
    ``remove()`` takes every hook off and leaves the set empty and usable again.
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._strays: list[tuple[weakref.ref[dict[int, Any]], int]] = []  # in deep copies

    def forward(self, module: nn.Module, hook: ForwardHook) -> RemovableHandle:
        """``module.register_forward_hook(hook)``, kept."""
        placed = self._placed(hook)
        return self._home(placed, module._forward_hooks, module.register_forward_hook(placed))

    def forward_pre(
        self, module: nn.Module, hook: Callable[[nn.Module, Any], Any]
    ) -> RemovableHandle:
        """``module.register_forward_pre_hook(hook)``, kept."""
        placed = self._placed(hook)
        handle = module.register_forward_pre_hook(placed)
        return self._home(placed, module._forward_pre_hooks, handle)

    def _placed(self, hook: Callable[..., Any]) -> _Placed:
        placed = _Placed(hook)
        placed.strays = self._strays
        return placed

    def _home(
        self, placed: _Placed, hooks: dict[int, Any], handle: RemovableHandle
    ) -> RemovableHandle:
        placed.home, placed.key = id(hooks), handle.id
        return self.keep(handle)

    def tensor(self, tensor: torch.Tensor, hook: Callable[[torch.Tensor], Any]) -> RemovableHandle:
        """``tensor.register_hook(hook)`` (its gradient), kept."""
        return self.keep(tensor.register_hook(hook))

    def post_accumulate_grad(
        self, param: torch.Tensor, hook: Callable[[torch.Tensor], Any]
    ) -> RemovableHandle:
        """``param.register_post_accumulate_grad_hook(hook)``, kept."""
        return self.keep(param.register_post_accumulate_grad_hook(hook))

    def keep(self, handle: RemovableHandle) -> RemovableHandle:
        """Keep a handle placed elsewhere, to be removed with the others."""
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        """Remove every hook; the set is empty afterwards. Idempotent."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        strays, self._strays[:] = list(self._strays), []
        for copied, key in strays:
            hooks = copied()
            if hooks is not None:
                hooks.pop(key, None)

    close = remove

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def forward_hooks(
    modules: Iterable[tuple[str, nn.Module]], make: Callable[[str], ForwardHook]
) -> Hooks:
    """A forward hook ``make(name)`` on each named module, in one :class:`Hooks`; if placing
    one fails, those already placed are removed before the error propagates.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
        >>> seen = []
        >>> with forward_hooks(net.named_children(), lambda n: lambda m, a, o: seen.append(n)):
        ...     _ = net(torch.randn(1, 2))
        >>> seen
        ['0', '1']
    """
    hooks = Hooks()
    try:
        for name, module in modules:
            hooks.forward(module, make(name))
    except BaseException:
        hooks.remove()
        raise
    return hooks
