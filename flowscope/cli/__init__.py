"""The ``flowscope`` command (click): ``flowscope study|report|doctor ...``."""

from flowscope.cli.main import main, run

__all__ = ["main", "run"]
