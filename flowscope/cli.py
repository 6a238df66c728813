"""The ``flowscope`` command line (click). Heavy imports happen inside commands only."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from flowscope import __version__
from flowscope.errors import FlowscopeError


def clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn FlowscopeError into click's one-line ``Error: ...`` and exit status 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FlowscopeError as err:
            raise click.ClickException(str(err)) from err

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flowscope")
def main() -> None:
    """flowscope: see how signal and gradients flow through a PyTorch network."""


def run() -> None:
    """Console-script entry point."""
    main(prog_name="flowscope")


if __name__ == "__main__":  # pragma: no cover
    run()
