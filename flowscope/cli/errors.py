"""What every click command of flowscope shares (imports click and errors only, no torch)."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from flowscope.core.errors import FlowscopeError


def clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn FlowscopeError into click's one-line ``Error: ...`` and exit status 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FlowscopeError as err:
            raise click.ClickException(str(err)) from err

    return wrapper
