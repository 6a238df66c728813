"""``python -m flowscope ...`` is the same as ``flowscope ...``."""

from flowscope.cli import run

run()
