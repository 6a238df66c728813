"""The one way flowscope hooks a model: a set of handles that leave together.

Every place that hooks a model (the recorder, the doctor's dead-unit count, LSUV, the study
probes) keeps its handles in a :class:`Hooks`: a context manager whose exit removes every
handle, also when the body raises; removing twice is harmless. The shape of fastai's
``Hooks`` and torch's ``RemovableHandle``. Torch only.

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

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["Hooks", "forward_hooks"]

ForwardHook = Callable[[nn.Module, Any, Any], Any]


class Hooks:
    """Handles of hooks placed together, removed together (``remove()``, or the ``with`` exit).

    ``forward``, ``tensor`` and ``post_accumulate_grad`` place a hook and keep its handle;
    ``remove()`` takes every hook off and leaves the set empty and usable again.
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def forward(self, module: nn.Module, hook: ForwardHook) -> RemovableHandle:
        """``module.register_forward_hook(hook)``, kept."""
        return self.keep(module.register_forward_hook(hook))

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
