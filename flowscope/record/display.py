"""How a recorder and its records show in a notebook; this layer draws nothing itself.

:class:`~flowscope.record.recorder.Recorder` and :class:`~flowscope.record.frames.Records`
have ``_repr_html_``; the HTML comes from a view that a later layer provides. The package
facade (``flowscope/__init__.py``) registers the reporter's views by name, so the record
layer never imports the reporter: without a registered view an object shows as its repr.

Example:
    >>> register("example", "html:escape")
    >>> html("example", "<b>")
    '&lt;b&gt;'
"""

from __future__ import annotations

import html as _html
import importlib
from typing import Any

__all__ = ["html", "register"]

_VIEWS: dict[str, str] = {}  # what is shown ("recorder", "records") -> "module:function"


def register(what: str, view: str) -> None:
    """Show objects of kind ``what`` with the function named ``"module:function"``."""
    _VIEWS[what] = view


def html(what: str, obj: Any) -> str:
    """The HTML of ``obj`` from its registered view (its escaped repr when there is none)."""
    view = _VIEWS.get(what)
    if view is None:
        return f"<pre>{_html.escape(repr(obj))}</pre>"
    module, _, function = view.partition(":")
    return str(getattr(importlib.import_module(module), function)(obj))
