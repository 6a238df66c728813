"""Activation checkpointing: which call a forward re-run inside backward recomputes.

A reentrant checkpoint (``use_reentrant=True``) runs its segment's first forward under
no_grad and the backward through a recomputed forward; the recorder files the recomputed
outputs' gradients under the calls they re-run. :class:`Recomputes` keeps, per step, the
calls whose outputs had no gradient to hook and matches each recompute to one of them.
"""

from __future__ import annotations

import warnings

__all__ = ["Recomputes"]


class Recomputes:
    """The calls of this step awaiting a recompute, and the matching rule.

    Example:
        >>> r = Recomputes()
        >>> r.awaiting("block.0", 0); r.awaiting("block.1", 0)
        >>> r.match("block.0"), r.match("block.1"), r.match("block.1")
        (0, 0, None)
    """

    def __init__(self) -> None:
        self._awaiting: list[tuple[str, int]] = []  # (module name, call) in forward order
        self._matched: set[int] = set()
        self._cursor: int | None = None

    def awaiting(self, qualname: str, call: int) -> None:
        """A call of ``qualname`` ran without gradient (a reentrant checkpoint's forward)."""
        self._awaiting.append((qualname, call))

    def clear(self) -> None:
        """A new step: nothing awaits."""
        self._awaiting.clear()
        self._matched.clear()
        self._cursor = None

    def match(self, qualname: str) -> int | None:
        """The call a recompute of ``qualname`` re-runs (None when none awaits).

        A checkpointed segment re-runs its modules in forward order, and segments re-run last
        first: the entry right after the previous match continues a segment; otherwise the
        latest unmatched call of the module starts one. Only a segment that starts with a
        module run several times without gradient is ambiguous; a warning says so.
        """
        nxt = -1 if self._cursor is None else self._cursor + 1
        ahead = self._awaiting[nxt][0] if 0 <= nxt < len(self._awaiting) else None
        if ahead == qualname and nxt not in self._matched:
            return self._take(nxt)
        free = [
            i for i, (q, _) in enumerate(self._awaiting) if q == qualname and i not in self._matched
        ]
        if not free:
            return None
        if len(free) > 1:
            warnings.warn(
                f"flowscope: checkpoint recompute of {qualname!r}, which ran {len(free)} times"
                " without gradient this step: its gradient is recorded under the latest of"
                " those calls",
                RuntimeWarning,
                stacklevel=3,
            )
        return self._take(free[-1])

    def _take(self, index: int) -> int:
        self._matched.add(index)
        self._cursor = index
        return self._awaiting[index][1]
