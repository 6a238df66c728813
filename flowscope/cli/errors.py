"""What every click command of flowscope shares (imports click and errors only, no torch):
one ``Error:`` line for flowscope's errors, and the output-folder check made before work."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from flowscope.core.errors import FlowscopeError

__all__ = ["check_device", "check_out_dir", "clean_errors", "one_line"]


def one_line(text: str) -> str:
    """A message on one line: its lines joined with spaces (blank ones dropped).

    Example:
        >>> one_line("bad value\\n\\n  see the docs")
        'bad value see the docs'
    """
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn FlowscopeError into click's one-line ``Error: ...`` and exit status 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FlowscopeError as err:
            raise click.ClickException(one_line(str(err))) from err

    return wrapper


def check_out_dir(path: str | Path, option: str = "--out") -> Path:
    """``path`` as a folder that exists or can be created, and can be written; checked
    before any work starts, leaving nothing behind (folders made to try are removed).

    Example:
        >>> check_out_dir("/proc/flowscope-x")
        Traceback (most recent call last):
        ...
        click.exceptions.BadParameter: '/proc/flowscope-x' cannot be created: No such file or \
directory; give a folder that exists or can be created, and can be written

    Raises:
        click.BadParameter: (exit status 2) naming the option, the path and why.
    """
    out = Path(path)
    missing = []
    try:
        if out.exists() and not out.is_dir():
            _bad(option, f"{str(out)!r} is a file, not a folder")
        probe = out
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        if not probe.is_dir():
            _bad(option, f"{str(out)!r} cannot be created: {str(probe)!r} is a file")
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        verb = "created" if missing else "written"
        _bad(option, f"{str(out)!r} cannot be {verb}: {err.strerror or err}")
    finally:
        for folder in missing:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
    return out


def _bad(option: str, what: str) -> None:
    """Raise the usage error for an output folder."""
    raise click.BadParameter(
        f"{what}; give a folder that exists or can be created, and can be written",
        param_hint=f"'{option}'",
    )


def check_device(name: str) -> str:
    """``--device`` checked before any work: a torch device type that is usable here (exit 2
    for a name that is not one or is ``meta``, 1 when torch cannot use it here)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise click.BadParameter(
            f"{name!r} is not a torch device; use cpu, cuda, cuda:N (or mps, xpu where torch "
            "has them)",
            param_hint="'--device'",
        ) from None
    if device.type == "meta":
        raise click.BadParameter(
            "'meta' tensors hold no values to measure; use cpu or cuda", param_hint="'--device'"
        )
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as err:
        raise FlowscopeError(
            f"--device {name!r} is not available here: {one_line(str(err))[:160]} "
            f"(torch {torch.__version__}); use --device cpu"
        ) from None
    return name
