"""The one exception class of flowscope, and the "did you mean" helper its messages use."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FlowscopeError(ValueError):
    """Bad input or a state flowscope cannot work with.

    The message names the bad value, what is allowed, and where (study, run, layer).
    The CLI turns it into one ``Error: ...`` line and a non-zero exit.
    """


def unknown(what: str, value: object, allowed: Iterable[str], where: str = "") -> FlowscopeError:
    """Build the error for a name that is not one of ``allowed``.

    Example:
        >>> str(unknown("activation", "tahn", ["tanh", "relu"]))
        "unknown activation 'tahn': did you mean 'tanh'? Allowed: relu, tanh"
    """
    names = sorted(allowed)
    close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.6)
    hint = f": did you mean {close[0]!r}?" if close else ":"
    place = f" in {where}" if where else ""
    return FlowscopeError(f"unknown {what} {value!r}{place}{hint} Allowed: {', '.join(names)}")
